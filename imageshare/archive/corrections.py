"""Retrospective patient details: correct the identity a study was filed under (an emergency
scan under a temporary name) and merge two records of one patient.

A change rewrites the stored instances' headers (new blobs, fsynced, before the commit),
repoints the index, keeps a history row per changed attribute (old, new, who, when, why) and
is audited, all in one committed transaction; the old blobs are deleted only afterwards.
"""

from __future__ import annotations

import functools
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence
from sqlalchemy import Connection, Engine, and_, delete, func, insert, select, update

from imageshare.archive.dicom_json import NHS_ISSUER
from imageshare.archive.header import PATIENT_KEYWORDS, level_json
from imageshare.archive.index_writer import IndexWriter
from imageshare.archive.record import patient_in_record
from imageshare.archive.studies import PatientRecord, StudyCatalogue
from imageshare.archive.tombstones import remove_blobs, tombstone
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError, NotFound
from imageshare.domain.identifiers import is_valid_nhs_number, normalise_name
from imageshare.storage.blobs import BlobStore, StoredBlob, new_blob_key, store_file
from imageshare.storage.files import owned_prefix
from imageshare.storage.index.database import from_row
from imageshare.storage.index.schema import (
    instances,
    patient_changes,
    patient_identifiers,
    patients,
    series,
    studies,
)

log = logging.getLogger("imageshare.corrections")
_SEXES = {"", "M", "F", "O"}
_ATTEMPTS = 3


@dataclass(frozen=True)
class PatientDetails:
    """A patient identity: DICOM person name (``FAMILY^Given``), hospital number and its
    issuer, NHS number, date of birth (YYYYMMDD) and sex (M, F, O or empty)."""

    name: str
    patient_id: str
    issuer: str = ""
    nhs_number: str = ""
    birth_date: str = ""
    sex: str = ""
    # Further identifiers to keep in the headers: (value, issuer), e.g. a sending site's ID.
    other_ids: tuple[tuple[str, str], ...] = ()

    def checked(self) -> PatientDetails:
        """A tidied copy; raises ImageShareError for values a record cannot hold."""
        name = self.name.strip()
        patient_id = self.patient_id.strip()
        nhs = re.sub(r"[\s-]", "", self.nhs_number)
        birth = self.birth_date.strip().replace("-", "")
        sex = self.sex.strip().upper()
        if not name:
            raise ImageShareError("the patient's name is required (FAMILY^Given)")
        if len(name) > 64 * 5:
            raise ImageShareError("the name is too long")
        if not patient_id or len(patient_id) > 64 or "\\" in patient_id:
            raise ImageShareError("the hospital number is required (at most 64 characters)")
        if nhs and not is_valid_nhs_number(nhs):
            raise ImageShareError(f"{self.nhs_number.strip()!r} is not a valid NHS number")
        if birth:
            try:
                born = datetime.strptime(birth, "%Y%m%d").date()
            except ValueError as exc:
                raise ImageShareError("the date of birth must be a date like 1970-01-31"
                                      ) from exc
            if born > date.today():
                raise ImageShareError("the date of birth is in the future")
        if sex not in _SEXES:
            raise ImageShareError("sex must be M, F, O or empty")
        return PatientDetails(name, patient_id, self.issuer.strip()[:64], nhs, birth, sex,
                              self.other_ids)

    @staticmethod
    def of(record: PatientRecord) -> PatientDetails:
        """The details an index record holds."""
        return PatientDetails(record.name, record.patient_id, record.issuer,
                              record.nhs_number, record.birth_date, record.sex)


@dataclass(frozen=True)
class PatientChange:
    """One changed attribute in the history."""

    change_id: str
    kind: str
    study_uid: str
    attribute: str
    old_value: str
    new_value: str
    reason: str
    actor: str
    at: datetime


_LABELS = {"name": "Patient's name", "patient_id": "Hospital number", "issuer": "Issuer",
           "nhs_number": "NHS number", "birth_date": "Date of birth", "sex": "Sex"}


def _differences(old: PatientDetails, new: PatientDetails) -> list[tuple[str, str, str]]:
    return [(label, getattr(old, field), getattr(new, field))
            for field, label in _LABELS.items() if getattr(old, field) != getattr(new, field)]


def apply_details(ds: Dataset, details: PatientDetails) -> None:
    """Write ``details`` into the patient attributes of ``ds``."""
    ds.PatientName = details.name
    ds.PatientID = details.patient_id
    if details.issuer:
        ds.IssuerOfPatientID = details.issuer
    elif "IssuerOfPatientID" in ds:
        del ds.IssuerOfPatientID
    ds.PatientBirthDate = details.birth_date
    ds.PatientSex = details.sex
    kept = [item for item in ds.get("OtherPatientIDsSequence", []) or []
            if str(item.get("IssuerOfPatientID", "")).upper() != NHS_ISSUER
            and not is_valid_nhs_number(str(item.get("PatientID", "")))]
    if details.nhs_number:
        item = Dataset()
        item.PatientID = details.nhs_number
        item.IssuerOfPatientID = NHS_ISSUER
        item.TypeOfPatientID = "TEXT"
        kept.append(item)
    for value, issuer in details.other_ids:
        if not any(str(i.get("PatientID", "")) == value for i in kept):
            item = Dataset()
            item.PatientID = value[:64]
            item.IssuerOfPatientID = issuer[:64]
            item.TypeOfPatientID = "TEXT"
            kept.append(item)
    if kept:
        ds.OtherPatientIDsSequence = Sequence(kept)
    elif "OtherPatientIDsSequence" in ds:
        del ds.OtherPatientIDsSequence
    if (0x0010, 0x1000) in ds:
        del ds[0x0010, 0x1000]
    if any(ord(c) > 127 for c in details.name):
        ds.SpecificCharacterSet = "ISO_IR 192"


class PatientCorrections:
    """Corrects and merges patient records, rewriting stored headers; everything audited."""

    def __init__(
        self, engine: Engine, writer: IndexWriter, blobs: BlobStore, audit: AuditTrail,
        catalogue: StudyCatalogue, staging_dir: Path,
        parents_changed: Callable[[Connection], None],
    ) -> None:
        self._engine = engine
        self._writer = writer
        self._blobs = blobs
        self._audit = audit
        self._catalogue = catalogue
        self._staging = staging_dir
        self._parents_changed = parents_changed
        # Whether a legal hold covers a study (imageshare.retention.facts.study_on_hold): its
        # content before a change is kept as evidence.
        self.on_hold: Callable[[Connection, str], bool] = lambda _conn, _uid: False

    # -- public --------------------------------------------------------------------------

    def correct_study(self, study_uid: str, details: PatientDetails, reason: str,
                      actor: Actor) -> str:
        """File ``study_uid`` under ``details``; returns the change id.

        With the same hospital number (and issuer) the patient record itself is corrected, so
        all its studies change. With another one the study moves to that record, which is
        created if new; an existing record must have the same name and date of birth
        (otherwise merge the records). Raises ImageShareError with a reason fit for the user.
        """
        reason = _reason(reason)
        new = details.checked()
        study = self._catalogue.record(study_uid)
        old = PatientDetails.of(study.patient)
        if not _differences(old, new):
            raise ImageShareError("nothing to change: the details are the same")
        same_record = (old.patient_id, old.issuer) == (new.patient_id, new.issuer)
        if not same_record:
            existing = self._patient(new.patient_id, new.issuer)
            if existing is not None and (normalise_name(existing.name), existing.birth_date) != (
                    normalise_name(new.name), new.birth_date):
                raise ImageShareError(
                    f"hospital number {new.patient_id} already belongs to a record with another "
                    "name or date of birth; check the number, or merge the two records")
            uids = [study_uid]
        else:
            uids = self._study_uids(study.patient.pk)
        return self._apply(uids, study.patient.pk, new, "correction", reason, actor, old)

    def merge(self, source_study_uid: str, target_patient_id: str, target_issuer: str,
              reason: str, actor: Actor) -> str:
        """Move every study of the patient of ``source_study_uid`` to the record with
        ``target_patient_id``; the studies take that record's details and the emptied
        record goes. Returns the change id."""
        reason = _reason(reason)
        source = self._catalogue.record(source_study_uid).patient
        target = self._patient(target_patient_id.strip(), target_issuer.strip())
        if target is None:
            raise NotFound(f"no patient record with hospital number {target_patient_id!r}")
        if target.pk == source.pk:
            raise ImageShareError("the study is already filed under that record")
        return self._apply(self._study_uids(source.pk), source.pk, PatientDetails.of(target),
                           "merge", reason, actor, PatientDetails.of(source))

    def history(self, study_uid: str) -> list[PatientChange]:
        """Every correction and merge that touched the study, oldest first."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(patient_changes).where(patient_changes.c.study_uid == study_uid)
                .order_by(patient_changes.c.pk)
            ).mappings().all()
        return [from_row(PatientChange, r) for r in rows]

    # -- work ----------------------------------------------------------------------------

    def _patient(self, patient_id: str, issuer: str) -> PatientRecord | None:
        with self._engine.connect() as conn:
            study_uid = conn.execute(
                select(studies.c.study_uid).join(patients, patients.c.pk == studies.c.patient_pk)
                .where(and_(patients.c.patient_id == patient_id, patients.c.issuer == issuer),
                       patient_in_record(patients.c.pk))  # not one known only from the inbox
                .limit(1)
            ).scalar()
        return self._catalogue.record(study_uid).patient if study_uid else None

    def _study_uids(self, patient_pk: int) -> list[str]:
        with self._engine.connect() as conn:
            return list(conn.execute(select(studies.c.study_uid)
                                     .where(studies.c.patient_pk == patient_pk)).scalars())

    def _instances(self, study_uids: list[str]) -> list[tuple[int, str]]:
        with self._engine.connect() as conn:
            return [tuple(r) for r in conn.execute(
                select(instances.c.pk, instances.c.blob_key)
                .join(series, series.c.pk == instances.c.series_pk)
                .join(studies, studies.c.pk == series.c.study_pk)
                .where(studies.c.study_uid.in_(study_uids)).order_by(instances.c.pk))]

    def _rewrite(self, blob_key: str, details: PatientDetails
                 ) -> tuple[str, StoredBlob, Dataset]:
        """A new durable blob holding the instance with ``details``; (key, blob, header)."""
        key = new_blob_key()
        path = self._staging / f"{owned_prefix('correct-')}{uuid.uuid4().hex}.dcm"
        try:
            with self._blobs.open(blob_key) as fp:
                ds = dcmread(fp, defer_size="512 KB")
                apply_details(ds, details)
                ds.save_as(path, enforce_file_format=False)
            stored = store_file(self._blobs, key, path)
        finally:
            path.unlink(missing_ok=True)
        return key, stored, ds

    def _apply(self, study_uids: list[str], old_pk: int, new: PatientDetails, kind: str,
               reason: str, actor: Actor, old: PatientDetails) -> str:
        change_id = uuid.uuid4().hex
        for _attempt in range(_ATTEMPTS):
            todo = self._instances(study_uids)
            written: list[tuple[int, str, StoredBlob, str]] = []
            header: Dataset | None = None
            try:
                for pk, key in todo:
                    new_key, stored, header = self._rewrite(key, new)
                    written.append((pk, new_key, stored, key))
                done = self._writer.submit(functools.partial(
                    self._commit, study_uids=study_uids, old_pk=old_pk, new=new,
                    header=header, written=written, change_id=change_id, kind=kind,
                    reason=reason, actor=actor, old=old))
            except BaseException:
                for _pk, new_key, _size, _old in written:
                    self._blobs.delete(new_key)
                raise
            if done is not None:
                remove_blobs(self._blobs, self._writer,
                             [old for *_rest, old in written if old not in done])
                return change_id
            for _pk, new_key, _size, _old in written:
                self._blobs.delete(new_key)
        raise ImageShareError("images kept arriving for this patient during the change; "
                              "try again when the transfer has finished")

    def _commit(self, conn: Connection, study_uids: list[str], old_pk: int,
                new: PatientDetails, header: Dataset | None,
                written: list[tuple[int, str, StoredBlob, str]], change_id: str, kind: str,
                reason: str, actor: Actor, old: PatientDetails) -> set[str] | None:
        """The index side of a change, in the index writer's transaction: the old blobs kept
        as evidence (their study is under a legal hold); None when the set of instances
        changed meanwhile (nothing is then changed)."""
        current = {r[0] for r in conn.execute(
            select(instances.c.pk).join(series, series.c.pk == instances.c.series_pk)
            .join(studies, studies.c.pk == series.c.study_pk)
            .where(studies.c.study_uid.in_(study_uids)))}
        if current != {w[0] for w in written}:
            return None
        held = {uid for uid in study_uids if self.on_hold(conn, uid)}
        study_of = dict(conn.execute(
            select(instances.c.pk, studies.c.study_uid)
            .join(series, series.c.pk == instances.c.series_pk)
            .join(studies, studies.c.pk == series.c.study_pk)
            .where(studies.c.study_uid.in_(study_uids))).tuples().all())
        now = datetime.now(UTC)
        attrs = level_json(header, PATIENT_KEYWORDS) if header is not None else {}
        values = {"name": new.name, "name_norm": normalise_name(new.name),
                  "birth_date": new.birth_date, "sex": new.sex, "attrs": attrs}
        target_pk = conn.execute(select(patients.c.pk).where(and_(
            patients.c.patient_id == new.patient_id, patients.c.issuer == new.issuer))).scalar()
        if target_pk is None:
            target_pk = conn.execute(insert(patients).values(  # type: ignore[index]  # an INSERT has a key
                patient_id=new.patient_id, issuer=new.issuer, created_at=now, **values)
            ).inserted_primary_key[0]
        else:
            conn.execute(update(patients).where(patients.c.pk == target_pk).values(**values))
        conn.execute(update(studies).where(studies.c.study_uid.in_(study_uids))
                     .values(patient_pk=target_pk, updated_at=now))
        for pk, key, stored, _old in written:
            conn.execute(update(instances).where(instances.c.pk == pk)
                         .values(blob_key=key, size=stored.size, sha256=stored.sha256))
        kept: set[str] = set()
        for uid in study_uids:
            olds = [old_key for pk, *_rest, old_key in written if study_of.get(pk) == uid]
            tombstone(conn, olds, uid, kept=uid in held)
            if uid in held:
                kept.update(olds)
        conn.execute(delete(patient_identifiers).where(and_(
            patient_identifiers.c.patient_pk == target_pk,
            patient_identifiers.c.issuer == NHS_ISSUER)))
        if new.nhs_number:
            conn.execute(insert(patient_identifiers).values(
                patient_pk=target_pk, value=new.nhs_number, issuer=NHS_ISSUER, kind="TEXT"))
        if target_pk != old_pk and not conn.execute(
                select(func.count()).select_from(studies)
                .where(studies.c.patient_pk == old_pk)).scalar():
            conn.execute(delete(patient_identifiers)
                         .where(patient_identifiers.c.patient_pk == old_pk))
            conn.execute(delete(patients).where(patients.c.pk == old_pk))
        rows = [
            {"change_id": change_id, "kind": kind, "study_uid": uid, "attribute": label,
             "old_value": before[:324], "new_value": after[:324], "reason": reason,
             "actor": actor.label[:128], "at": now}
            for uid in study_uids for label, before, after in _differences(old, new)
        ]
        if rows:
            conn.execute(insert(patient_changes), rows)
        self._audit.record([
            AuditEvent(actor=actor, action=f"patient.{kind}", outcome="success",
                       patient_id=new.patient_id, study_uid=uid,
                       instance_count=len(written),
                       detail={"change_id": change_id, "previous_patient_id": old.patient_id,
                               "attributes": [d[0] for d in _differences(old, new)],
                               **({"originals_kept_for_legal_hold": True}
                                  if uid in held else {})})
            for uid in study_uids
        ], conn=conn)
        self._parents_changed(conn)
        return kept


def _reason(reason: str) -> str:
    reason = (reason or "").strip()
    if not reason:
        raise ImageShareError("say why the details change (kept in the history)")
    return reason[:2000]


def describe(change: PatientChange) -> dict[str, Any]:
    """A history row for pages and the API."""
    return {"attribute": change.attribute, "old": change.old_value, "new": change.new_value,
            "who": change.actor, "when": change.at, "why": change.reason, "kind": change.kind}
