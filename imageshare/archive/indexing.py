"""Index writes for one received instance (upsert patient/study/series, add the instance),
and the summaries of studies and series they keep up to date.

A study's and a series' counts and a study's modalities (``num_series``, ``num_instances``,
``modalities``) describe the patient record only: instances waiting for a person's decision
(another hospital's in the inbox, held arrivals, uploads) are left out of them until they are
accepted, when :func:`summarise_studies` counts them in."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal

from sqlalchemy import Connection, and_, bindparam, delete, func, insert, literal, select, update
from sqlalchemy.exc import IntegrityError

from imageshare.archive.header import InstanceHeader
from imageshare.archive.record import REVIEW_CLASSES, instance_in_record
from imageshare.archive.tombstones import tombstone
from imageshare.domain.errors import ImageShareError
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
# The issuer under which an upload waiting for review files a patient the record does not
# know: until a person accepted it, what an uploader sent never becomes the record of a
# Patient ID (and never blocks the hospital's own images of that ID as "on record with
# another name").
REVIEW_PREFIX = "review:"
# The same for another hospital's study of a patient the record does not know (kept apart
# from uploads: an upload is filed under its invited patient when accepted, whatever its
# files say, while an accepted inbox study is filed under its own Patient ID).
INBOX_PREFIX = "inbox:"
_WAITING_PREFIXES = (HELD_PREFIX, REVIEW_PREFIX, INBOX_PREFIX)


def waiting_issuer(prefix: str, issuer: str) -> str:
    """The issuer under which arrivals for ``issuer``'s record wait (as stored: at most 64
    characters; the real issuer stays in the patient's attributes)."""
    return (prefix + issuer)[:64]


def issuers_standing_for(issuer: str) -> list[str]:
    """The record's issuer and those under which arrivals for it wait (held, for review)."""
    return [issuer, *(waiting_issuer(p, issuer) for p in _WAITING_PREFIXES)]


# Statements of the hot path, built once: building a statement costs more than running it.
_INSTANCE_PK = select(instances.c.pk).where(instances.c.sop_uid == bindparam("sop_uid"))
_STUDY_FACTS = (
    select(studies.c.pk, patients.c.patient_id, patients.c.issuer, studies.c.modalities,
           patients.c.name_norm, patients.c.birth_date, studies.c.num_instances > 0)
    .join(patients, patients.c.pk == studies.c.patient_pk)
    .where(studies.c.study_uid == bindparam("study_uid"))
)
_SERIES_FACTS = select(series.c.pk, series.c.study_pk).where(
    series.c.series_uid == bindparam("series_uid")
)
_INSERT_INSTANCE = insert(instances)
# Counting an instance of the record locks its study's row first, then its series' row; every
# writer of these summaries (summarise_studies too) locks in that order, so that a batch of
# arrivals and an acceptance in the same study wait for each other instead of deadlocking.
_COUNT_STUDY_INSTANCE = (
    update(studies)
    .where(studies.c.pk == bindparam("study_key"))
    .values(num_instances=studies.c.num_instances + 1, updated_at=bindparam("now"))
)
_COUNT_STUDY_INSTANCE_AND_MODALITY = _COUNT_STUDY_INSTANCE.values(
    modalities=bindparam("new_modalities"))
_COUNT_SERIES_INSTANCE = (
    update(series)
    .where(series.c.pk == bindparam("series_key"))
    .values(num_instances=series.c.num_instances + 1)
    .returning(series.c.num_instances)
)
_COUNT_STUDY_SERIES = (
    update(studies)
    .where(studies.c.pk == bindparam("study_key"))
    .values(num_series=studies.c.num_series + 1)
)
_STUDY_RECORD_COUNT = select(studies.c.num_instances).where(
    studies.c.pk == bindparam("study_key"))
# The study's modalities as stored, its row locked.
_STUDY_MODALITIES = select(studies.c.modalities).where(
    studies.c.pk == bindparam("study_key")).with_for_update()


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


def _patient_pk(conn: Connection, h: InstanceHeader, now: datetime,
                add_ids: bool = True) -> int:
    """The patient row of ``h`` (made when new, with its other IDs); ``add_ids``: the
    header's other IDs are added to a patient already on record too (not for what waits for
    review: a sender's identifiers become part of a record only once a person accepted)."""
    pk = conn.execute(
        select(patients.c.pk).where(
            and_(patients.c.patient_id == h.patient_id, patients.c.issuer == h.issuer)
        )
    ).scalar()
    if pk is not None and not add_ids:
        return int(pk)
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
    in_record: bool = False  # holds an instance of the record (once true, stays so here)


def _in_record(conn: Connection, study: _KnownStudy) -> bool:
    """Whether the study holds an instance of the record (looked up again until it does)."""
    if not study.in_record:
        study.in_record = bool(conn.execute(_STUDY_RECORD_COUNT, {"study_key": study.pk})
                               .scalar())
    return study.in_record


def _comparable_name(name_norm: str) -> str:
    """The alphabetic group of a folded name without trailing empty components."""
    return name_norm.split("=")[0].rstrip("^ ")


def _person_differs(name_norm: str, birth_date: str, other_name_norm: str,
                    other_birth_date: str) -> str:
    """What of one person's folded name and birth date contradicts another's ("" when
    nothing does). A value missing on either side contradicts nothing."""
    differences = []
    theirs, ours = _comparable_name(name_norm), _comparable_name(other_name_norm)
    if theirs and ours and theirs != ours:
        differences.append("name")
    if birth_date and other_birth_date and birth_date != other_birth_date:
        differences.append("birth date")
    return " and ".join(differences)


def patient_differs(h: InstanceHeader, name_norm: str, birth_date: str) -> str:
    """What of the instance's patient contradicts the record ("" when nothing does). A value
    missing on either side contradicts nothing."""
    return _person_differs(h.name_norm, h.birth_date, name_norm, birth_date)


def _filed_patient(conn: Connection, patient_id: str, issuer: str) -> tuple[str, str] | None:
    """The folded name and birth date of the patient filed under this Patient ID and issuer
    (None when there is none)."""
    row = conn.execute(select(patients.c.name_norm, patients.c.birth_date).where(
        patients.c.patient_id == patient_id, patients.c.issuer == issuer)).first()
    return (row[0], row[1]) if row is not None else None


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
    under_review: bool = False,
    joins_waiting: bool = False,
) -> IndexOutcome:
    """Add a new instance (its SOP Instance UID is not yet indexed) with its parents;
    ``sha256`` is the digest of its blob.

    Refuses (``conflict``) an instance whose study belongs to another patient, or whose series
    belongs to another study, and changes nothing then. An instance whose Patient ID is on
    record with another name or birth date is never filed under that record: it is refused,
    or with ``patient_mismatch="hold"`` the new study it starts is filed beside the record
    (issuer ``held:...``) as ``held`` for reconciliation; the record itself never changes.
    An arrival waiting for review (``under_review``: an upload, another hospital's study)
    whose Patient ID has no record files its new study under issuer ``review:...`` (an
    upload) or ``inbox:...`` (another hospital's), not as a new record: what it says of the
    patient becomes a record only when a person accepts it (:func:`file_under_record`).
    An instance of the record is refused from a study that only waits for review; one whose
    origin is unknown (``joins_waiting``: found again by start-up recovery) joins such a
    study as waiting too.
    """
    study = known.study(conn, h.study_uid)
    held = ""
    waiting_prefix = REVIEW_PREFIX if retention_class == "upload" else INBOX_PREFIX
    if (study is not None and study.patient_id == h.patient_id
            and study.issuer == waiting_issuer(HELD_PREFIX, h.issuer)):
        # More of a study already held for reconciliation: held with it.
        h = replace(h, issuer=study.issuer)
        retention_class = "held"
        held = "the study is held for reconciliation"
    elif (under_review and study is not None and study.patient_id == h.patient_id
          and study.issuer == waiting_issuer(waiting_prefix, h.issuer)):
        h = replace(h, issuer=study.issuer)  # more of a study waiting for review
    reviewed = retention_class in REVIEW_CLASSES  # waits for a person
    if (joins_waiting and not reviewed and study is not None and study.patient_id == h.patient_id
            and not _in_record(conn, study)):
        for prefix, waiting_class in ((HELD_PREFIX, "held"), (REVIEW_PREFIX, "upload"),
                                      (INBOX_PREFIX, "inbox"), ("", "inbox")):
            if study.issuer == (waiting_issuer(prefix, h.issuer) if prefix else h.issuer):
                h, retention_class, reviewed = replace(h, issuer=study.issuer), waiting_class, True
                break
    if study is not None and not reviewed and not _in_record(conn, study):
        # The archive's own instance of a study that so far only waits for a person's
        # decision: not added (it would make the study, as another site sent it, part of
        # the record before anyone accepted it).
        return IndexOutcome(
            "conflict",
            f"study {h.study_uid} waits for review (received from outside); it can be added "
            "to once a person has accepted it",
            audit_reason="the study waits for review")
    if study is not None and (study.patient_id, study.issuer) != (h.patient_id, h.issuer):
        fresh = conn.execute(_STUDY_FACTS, {"study_uid": h.study_uid}).first()
        if fresh is not None and (fresh[1], fresh[2]) != (study.patient_id, study.issuer):
            # Filed under another patient since it was remembered (an acceptance, a
            # correction): the change is run again on fresh data.
            raise RacedAnotherWriter(f"study {h.study_uid} was refiled meanwhile")
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
        record = _filed_patient(conn, h.patient_id, h.issuer)
        differs = patient_differs(h, record[0], record[1]) if record is not None else ""
        if differs and patient_mismatch != "hold":
            return _mismatch(h, differs)
        if differs:
            held = f"patient {differs} differs from the record of this Patient ID"
            h = replace(h, issuer=waiting_issuer(HELD_PREFIX, h.issuer))
            retention_class = "held"
        elif record is None and under_review:
            real_issuer = h.issuer
            h = replace(h, issuer=waiting_issuer(waiting_prefix, h.issuer))
            waiting = _filed_patient(conn, h.patient_id, h.issuer)
            differs = patient_differs(h, waiting[0], waiting[1]) if waiting is not None else ""
            # Another person under this Patient ID waits already: not mixed in (an upload is
            # filed under the invited patient when accepted, whatever its files say).
            if differs and waiting_prefix == INBOX_PREFIX:
                return IndexOutcome(
                    "conflict",
                    f"patient ID {_describe_patient(h.patient_id, real_issuer)} "
                    f"waits for review with another {differs}; the instance was not filed "
                    "(send it again once that one is decided)",
                    audit_reason=f"patient {differs} differs from one waiting for review")
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
        patient_pk = _patient_pk(conn, h, now, add_ids=not reviewed)
        study_pk = conn.execute(  # type: ignore[index]  # an INSERT has a key
            insert(studies).values(
                study_uid=h.study_uid, patient_pk=patient_pk, modalities="", num_series=0,
                num_instances=0, attrs=h.study_json, created_at=now, updated_at=now,
                **h.study,
            )
        ).inserted_primary_key[0]
        study = known.studies[h.study_uid] = _KnownStudy(
            study_pk, h.patient_id, h.issuer, "", h.name_norm, h.birth_date
        )
    else:
        study_pk = study.pk
        if h.other_ids and not reviewed:
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
    if retention_class not in REVIEW_CLASSES:
        _count_in(conn, study, series_pk, h.series["modality"], now)
    if held:
        return IndexOutcome("held", f"held for reconciliation: {held}")
    return IndexOutcome("stored")


def _count_in(conn: Connection, study: _KnownStudy, series_pk: int, modality: str,
              now: datetime) -> None:
    """Count a new instance of the record in its study's and series' summaries."""
    study.in_record = True
    counts = {"study_key": study.pk, "now": now}
    if not modality or modality in study.modalities.split("\\"):
        conn.execute(_COUNT_STUDY_INSTANCE, counts)
    else:
        # A modality not known here: merged into what is stored (another instance of
        # ImageShare, or an acceptance, may have added one since this was remembered).
        stored = conn.execute(_STUDY_MODALITIES, {"study_key": study.pk}).scalar_one()
        listed = {m for m in stored.split("\\") if m}
        study.modalities = "\\".join(sorted(listed | {modality}))[:128]
        conn.execute(_COUNT_STUDY_INSTANCE_AND_MODALITY,
                     {**counts, "new_modalities": study.modalities})
    if conn.execute(_COUNT_SERIES_INSTANCE, {"series_key": series_pk}).scalar_one() == 1:
        conn.execute(_COUNT_STUDY_SERIES, {"study_key": study.pk})  # its first: one more


def file_under_record(conn: Connection, study_pk: int) -> None:
    """An accepted study of another site filed under issuer ``inbox:...`` (its patient had no
    record when it arrived) moves to the record of its Patient ID: made from what the study
    says of the patient when there is none yet, or the one there is when it names the same
    person. Raises :class:`ImageShareError` (nothing changed) when that record has another
    name or birth date: a person reconciles the patient first."""
    row = conn.execute(
        select(patients).join(studies, studies.c.patient_pk == patients.c.pk)
        .where(studies.c.pk == study_pk)).mappings().first()
    if row is None or not row["issuer"].startswith(INBOX_PREFIX):
        return
    # The issuer as sent (the stored one may have been cut to fit beside the prefix).
    sent = ((row["attrs"] or {}).get("00100021") or {}).get("Value") or []
    issuer = str(sent[0]) if sent else row["issuer"][len(INBOX_PREFIX):]
    find = select(patients).where(patients.c.patient_id == row["patient_id"],
                                  patients.c.issuer == issuer)
    target = conn.execute(find).mappings().first()
    if target is None:
        values = {k: v for k, v in row.items() if k != "pk"}
        try:
            with conn.begin_nested():  # another acceptance may make it at the same moment
                target_pk = conn.execute(insert(patients).values(  # type: ignore[index]  # an INSERT has a key
                    **{**values, "issuer": issuer})).inserted_primary_key[0]
                conn.execute(insert(patient_identifiers).from_select(
                    ["patient_pk", "value", "issuer", "kind"],
                    select(literal(target_pk), patient_identifiers.c.value,
                           patient_identifiers.c.issuer, patient_identifiers.c.kind)
                    .where(patient_identifiers.c.patient_pk == row["pk"])))
        except IntegrityError:
            target = conn.execute(find).mappings().first()
            if target is None:
                raise
    if target is not None:
        differs = _person_differs(row["name_norm"], row["birth_date"], target["name_norm"],
                                  target["birth_date"])
        if differs:
            raise ImageShareError(
                f"hospital number {row['patient_id']} is on record with another {differs}: "
                "reconcile the patient first")
        target_pk = target["pk"]
    conn.execute(update(studies).where(studies.c.pk == study_pk).values(patient_pk=target_pk))
    if conn.execute(select(studies.c.pk).where(studies.c.patient_pk == row["pk"])).first() \
            is None:
        conn.execute(delete(patient_identifiers).where(
            patient_identifiers.c.patient_pk == row["pk"]))
        conn.execute(delete(patients).where(patients.c.pk == row["pk"]))
    parents_changed_in(conn)


def summarise_studies(conn: Connection, study_pks: Iterable[int],
                      updated: datetime | None = None) -> None:
    """Set the counts and modalities of these studies and of their series from the instances
    that are part of the record (after instances joined or left it other than by being
    indexed: accepted, retrieved, deleted), and make every instance's :class:`KnownParents`
    forget what it remembered; ``updated``: when the studies' record changed (instances
    joined it). Each study's row is locked before its series' rows, as indexing locks them,
    so that an instance indexed meanwhile is neither lost nor counted twice."""
    for study_pk in sorted(set(study_pks)):
        conn.execute(select(studies.c.pk).where(studies.c.pk == study_pk)
                     .with_for_update()).all()
        conn.execute(select(series.c.pk).where(series.c.study_pk == study_pk)
                     .order_by(series.c.pk).with_for_update()).all()
        counted = conn.execute(
            select(series.c.pk, series.c.modality, func.count(instances.c.pk))
            .select_from(series.outerjoin(instances, and_(
                instances.c.series_pk == series.c.pk, instance_in_record())))
            .where(series.c.study_pk == study_pk)
            .group_by(series.c.pk, series.c.modality)).all()
        for series_pk, _modality, count in counted:
            conn.execute(update(series).where(series.c.pk == series_pk)
                         .values(num_instances=count))
        shown = [(modality, count) for _pk, modality, count in counted if count]
        conn.execute(update(studies).where(studies.c.pk == study_pk).values(
            num_series=len(shown), num_instances=sum(count for _m, count in shown),
            modalities="\\".join(sorted({m for m, _c in shown if m}))[:128],
            **({"updated_at": updated} if updated is not None else {})))
    parents_changed_in(conn)


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
    tombstone(conn, [existing.blob_key])
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
