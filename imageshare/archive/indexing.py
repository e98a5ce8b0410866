"""Index writes for one received instance: upsert patient/study/series, add the instance."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal

from sqlalchemy import Connection, and_, bindparam, insert, select, update

from imageshare.archive.header import InstanceHeader
from imageshare.storage.index.schema import (
    cache_generations,
    inbox_items,
    instances,
    patient_identifiers,
    patients,
    series,
    studies,
)

Status = Literal["stored", "duplicate", "replaced", "kept_first", "conflict", "held"]
# The issuer under which instances held for reconciliation are filed, beside the record.
HELD_PREFIX = "held:"

# Statements of the hot path, built once: building a statement costs more than running it.
_INSTANCE_PK = select(instances.c.pk).where(instances.c.sop_uid == bindparam("sop_uid"))
_STUDY_FACTS = (
    select(studies.c.pk, patients.c.patient_id, patients.c.issuer, studies.c.modalities,
           patients.c.name_norm, patients.c.birth_date)
    .join(patients, patients.c.pk == studies.c.patient_pk)
    .where(studies.c.study_uid == bindparam("study_uid"))
)
_SERIES_FACTS = select(series.c.pk, series.c.study_pk).where(
    series.c.series_uid == bindparam("series_uid")
)
_INSERT_INSTANCE = insert(instances)
_COUNT_SERIES_INSTANCE = (
    update(series)
    .where(series.c.pk == bindparam("series_key"))
    .values(num_instances=series.c.num_instances + 1)
)
_COUNT_STUDY_INSTANCE = (
    update(studies)
    .where(studies.c.pk == bindparam("study_key"))
    .values(
        num_instances=studies.c.num_instances + 1,
        num_series=studies.c.num_series + bindparam("new_series"),
        modalities=bindparam("new_modalities"),
        updated_at=bindparam("now"),
    )
)


@dataclass(frozen=True)
class IndexOutcome:
    """What indexing one instance did. ``obsolete_blob`` is a blob key to delete afterwards.

    ``reason`` is told to the sender; ``audit_reason`` (for the audit trail only) may name
    patients the sender is not entitled to know.
    """

    status: Status
    reason: str = ""
    obsolete_blob: str | None = None
    audit_reason: str = ""


@dataclass(frozen=True)
class ExistingInstance:
    """The stored instance under a SOP Instance UID that arrived again."""

    pk: int
    blob_key: str
    size: int
    series_uid: str
    study_uid: str
    sha256: str | None = None  # None for instances stored before digests were recorded


def find_instance(conn: Connection, sop_uid: str) -> ExistingInstance | None:
    """The stored instance with this SOP Instance UID, if any."""
    if conn.execute(_INSTANCE_PK, {"sop_uid": sop_uid}).first() is None:
        return None  # the common case, answered by the unique index alone
    row = conn.execute(
        select(
            instances.c.pk, instances.c.blob_key, instances.c.size, series.c.series_uid,
            studies.c.study_uid, instances.c.sha256,
        )
        .join(series, series.c.pk == instances.c.series_pk)
        .join(studies, studies.c.pk == series.c.study_pk)
        .where(instances.c.sop_uid == sop_uid)
    ).first()
    return ExistingInstance(*row) if row else None


def _patient_pk(conn: Connection, h: InstanceHeader, now: datetime) -> int:
    pk = conn.execute(
        select(patients.c.pk).where(
            and_(patients.c.patient_id == h.patient_id, patients.c.issuer == h.issuer)
        )
    ).scalar()
    if pk is None:
        pk = conn.execute(  # type: ignore[index]  # an INSERT has a key
            insert(patients).values(
                patient_id=h.patient_id, issuer=h.issuer, name=h.patient_name,
                name_norm=h.name_norm, birth_date=h.birth_date, sex=h.sex,
                attrs=h.patient_json, created_at=now,
            )
        ).inserted_primary_key[0]
    if h.other_ids:
        known = {
            (r.value, r.issuer)
            for r in conn.execute(
                select(patient_identifiers.c.value, patient_identifiers.c.issuer).where(
                    patient_identifiers.c.patient_pk == pk
                )
            )
        }
        new = [
            {"patient_pk": pk, "value": v, "issuer": i, "kind": k}
            for v, i, k in dict.fromkeys(h.other_ids)
            if (v, i) not in known
        ]
        if new:
            conn.execute(insert(patient_identifiers), new)
    return int(pk)


def _describe_patient(patient_id: str, issuer: str) -> str:
    return f"{patient_id!r}" + (f" (issuer {issuer!r})" if issuer else "")


@dataclass
class _KnownStudy:
    pk: int
    patient_id: str
    issuer: str
    modalities: str
    name_norm: str = ""
    birth_date: str = ""


def _comparable_name(name_norm: str) -> str:
    """The alphabetic group of a folded name without trailing empty components."""
    return name_norm.split("=")[0].rstrip("^ ")


def patient_differs(h: InstanceHeader, name_norm: str, birth_date: str) -> str:
    """What of the instance's patient contradicts the record ("" when nothing does). A value
    missing on either side contradicts nothing."""
    differences = []
    theirs, ours = _comparable_name(h.name_norm), _comparable_name(name_norm)
    if theirs and ours and theirs != ours:
        differences.append("name")
    if h.birth_date and birth_date and h.birth_date != birth_date:
        differences.append("birth date")
    return " and ".join(differences)


def _mismatch(h: InstanceHeader, differs: str) -> IndexOutcome:
    return IndexOutcome(
        "conflict",
        f"patient ID {_describe_patient(h.patient_id, h.issuer)} is on record with another "
        f"{differs}; the instance was not filed under that patient (reconcile it first)",
        audit_reason=f"patient {differs} differs from the record",
    )


@dataclass(frozen=True)
class _KnownSeries:
    pk: int
    study_pk: int


class KnownParents:
    """Studies and series the index writer has seen, so that the next instance of the same
    series needs no look-up. Only the index writer thread uses it; it must be cleared whenever
    a transaction fails (entries may name rows that were rolled back). Entries live at most
    ``max_age`` seconds, and everything is forgotten within ``check_every`` seconds of another
    process (another instance) counting a change in the index's ``parents`` generation (see
    :func:`parents_changed_in`)."""

    _LIMIT = 20_000

    def __init__(self, max_age: float = 30.0, check_every: float = 1.0) -> None:
        self.studies: dict[str, _KnownStudy] = {}
        self.series: dict[str, _KnownSeries] = {}
        self._max_age = max_age
        self._since = time.monotonic()
        self._check_every = check_every
        self._checked = float("-inf")
        self._generation: int | None = None

    def clear(self) -> None:
        """Forget everything."""
        self.studies.clear()
        self.series.clear()
        self._since = time.monotonic()

    def _bound(self, conn: Connection) -> None:
        now = time.monotonic()
        if now - self._checked > self._check_every:
            generation = conn.execute(_GENERATION).scalar()
            if generation != self._generation:
                self.clear()
                self._generation = generation
            self._checked = now
        if (len(self.studies) + len(self.series) > self._LIMIT
                or now - self._since > self._max_age):
            self.clear()

    def study(self, conn: Connection, study_uid: str) -> _KnownStudy | None:
        """The study's key facts, from memory or the index."""
        self._bound(conn)
        known = self.studies.get(study_uid)
        if known is None:
            row = conn.execute(_STUDY_FACTS, {"study_uid": study_uid}).first()
            if row is None:
                return None
            known = self.studies[study_uid] = _KnownStudy(*row)
        return known

    def one_series(self, conn: Connection, series_uid: str) -> _KnownSeries | None:
        """The series' key and its study's key, from memory or the index."""
        self._bound(conn)
        known = self.series.get(series_uid)
        if known is None:
            row = conn.execute(_SERIES_FACTS, {"series_uid": series_uid}).first()
            if row is None:
                return None
            known = self.series[series_uid] = _KnownSeries(*row)
        return known


_GENERATION = select(cache_generations.c.generation).where(
    cache_generations.c.name == "parents")


def parents_changed_in(conn: Connection) -> None:
    """Count a change of patients, studies or series made in ``conn``'s transaction, so that
    every instance's :class:`KnownParents` forgets what it remembers (within a second)."""
    bumped = conn.execute(update(cache_generations).where(
        cache_generations.c.name == "parents").values(
        generation=cache_generations.c.generation + 1)).rowcount
    if not bumped:
        conn.execute(insert(cache_generations).values(name="parents", generation=1))


class RacedAnotherWriter(Exception):
    """Another process changed the rows an index change had read: run the change again."""


def index_instance(
    conn: Connection,
    h: InstanceHeader,
    blob_key: str,
    size: int,
    source: str,
    now: datetime,
    known: KnownParents,
    retention_class: str = "clinical",
    patient_mismatch: str = "refuse",
    sha256: str | None = None,
) -> IndexOutcome:
    """Add a new instance (its SOP Instance UID is not yet indexed) with its parents;
    ``sha256`` is the digest of its blob.

    Refuses (``conflict``) an instance whose study belongs to another patient, or whose series
    belongs to another study, and changes nothing then. An instance whose Patient ID is on
    record with another name or birth date is never filed under that record: it is refused,
    or with ``patient_mismatch="hold"`` the new study it starts is filed beside the record
    (issuer ``held:...``) as ``held`` for reconciliation; the record itself never changes.
    """
    study = known.study(conn, h.study_uid)
    held = ""
    if (study is not None and study.patient_id == h.patient_id
            and study.issuer == (HELD_PREFIX + h.issuer)[:64]):
        # More of a study already held for reconciliation: held with it.
        h = replace(h, issuer=study.issuer)
        retention_class = "held"
        held = "the study is held for reconciliation"
    if study is not None and (study.patient_id, study.issuer) != (h.patient_id, h.issuer):
        return IndexOutcome(
            "conflict",
            f"study {h.study_uid} already belongs to another patient than "
            f"{_describe_patient(h.patient_id, h.issuer)}; reconcile the patient first",
            audit_reason=f"study belongs to patient "
            f"{_describe_patient(study.patient_id, study.issuer)}",
        )
    if study is not None:
        differs = patient_differs(h, study.name_norm, study.birth_date)
        if differs and not study.issuer.startswith(HELD_PREFIX):
            return _mismatch(h, differs)
    else:
        record = conn.execute(
            select(patients.c.name_norm, patients.c.birth_date).where(
                patients.c.patient_id == h.patient_id, patients.c.issuer == h.issuer)).first()
        differs = patient_differs(h, record[0], record[1]) if record is not None else ""
        if differs and patient_mismatch != "hold":
            return _mismatch(h, differs)
        if differs:
            held = f"patient {differs} differs from the record of this Patient ID"
            h = replace(h, issuer=(HELD_PREFIX + h.issuer)[:64])
            retention_class = "held"
    series_row = known.one_series(conn, h.series_uid)
    if series_row is not None and study is None and known.study(conn, h.study_uid) is not None:
        # Another process filed this study and series between the two look-ups: not a
        # conflict, a race; the change is run again on fresh data.
        raise RacedAnotherWriter(f"study {h.study_uid} was filed meanwhile")
    if series_row is not None and (study is None or series_row.study_pk != study.pk):
        return IndexOutcome(
            "conflict", f"series {h.series_uid} already belongs to another study"
        )
    if study is None:
        patient_pk = _patient_pk(conn, h, now)
        study_pk = conn.execute(  # type: ignore[index]  # an INSERT has a key
            insert(studies).values(
                study_uid=h.study_uid, patient_pk=patient_pk, modalities="", num_series=0,
                num_instances=0, attrs=h.study_json, created_at=now, updated_at=now,
                **h.study,
            )
        ).inserted_primary_key[0]
        modalities = ""
        study = known.studies[h.study_uid] = _KnownStudy(
            study_pk, h.patient_id, h.issuer, modalities, h.name_norm, h.birth_date
        )
    else:
        study_pk = study.pk
        modalities = study.modalities
        if h.other_ids:
            _patient_pk(conn, h, now)
    new_series = series_row is None
    if new_series:
        series_pk = conn.execute(  # type: ignore[index]  # an INSERT has a key
            insert(series).values(
                series_uid=h.series_uid, study_pk=study_pk, num_instances=0,
                attrs=h.series_json, created_at=now, **h.series,
            )
        ).inserted_primary_key[0]
        known.series[h.series_uid] = _KnownSeries(series_pk, study_pk)
    else:
        assert series_row is not None
        series_pk = series_row.pk
    conn.execute(
        _INSERT_INSTANCE,
        {
            "sop_uid": h.sop_instance_uid, "series_pk": series_pk,
            "sop_class_uid": h.sop_class_uid, "transfer_syntax": h.transfer_syntax,
            "blob_key": blob_key, "size": size, "sha256": sha256,
            "retention_class": retention_class,
            "received_from": source[:128], "received_at": now, **h.instance,
        },
    )
    conn.execute(_COUNT_SERIES_INSTANCE, {"series_key": series_pk})
    modality = h.series["modality"]
    listed = [m for m in modalities.split("\\") if m]
    if modality and modality not in listed:
        study.modalities = "\\".join(sorted([*listed, modality]))[:128]
    conn.execute(
        _COUNT_STUDY_INSTANCE,
        {"study_key": study_pk, "new_series": int(new_series),
         "new_modalities": study.modalities, "now": now},
    )
    if held:
        return IndexOutcome("held", f"held for reconciliation: {held}")
    return IndexOutcome("stored")


def replace_instance_blob(
    conn: Connection, existing: ExistingInstance, h: InstanceHeader, blob_key: str, size: int,
    source: str, now: datetime, sha256: str | None = None,
) -> IndexOutcome:
    """Point an indexed instance at new content (overwrite mode)."""
    conn.execute(
        update(instances)
        .where(instances.c.pk == existing.pk)
        .values(
            blob_key=blob_key, size=size, sha256=sha256, transfer_syntax=h.transfer_syntax,
            sop_class_uid=h.sop_class_uid, received_from=source[:128], received_at=now,
            **h.instance,
        )
    )
    return IndexOutcome("replaced", obsolete_blob=existing.blob_key)


def note_inbox_arrival(conn: Connection, study_uid: str, site: str, now: datetime,
                       note: str = "") -> None:
    """Count an instance of ``study_uid`` received from ``site`` in the inbox (a new item, or
    a pending one growing; a study decided before is opened for review again). ``note`` says
    why it is there when it is not simply another site's study."""
    updated = conn.execute(
        update(inbox_items).where(inbox_items.c.study_uid == study_uid,
                                  inbox_items.c.site == site)
        .values(instances=inbox_items.c.instances + 1, last_received=now, status="pending")
    ).rowcount
    if not updated:
        conn.execute(insert(inbox_items).values(
            study_uid=study_uid, site=site[:64], status="pending", instances=1,
            first_received=now, last_received=now, note=note[:2000]))
