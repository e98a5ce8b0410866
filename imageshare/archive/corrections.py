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

from imageshare.archive.dicom_json import NHS_ISSUER, nhs_number_of
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
        issuer = self.issuer.strip()
        if not name:
            raise ImageShareError("the patient's name is required (FAMILY^Given)")
        if not _fits_person_name(name):
            raise ImageShareError("the name is too long or malformed (at most 64 characters "
                                  "and five ^-separated parts per form of the name)")
        if not patient_id or len(patient_id) > 64:
            raise ImageShareError("the hospital number is required (at most 64 characters)")
        if len(issuer) > 64:
            raise ImageShareError("the issuer of the hospital number has at most 64 "
                                  "characters")
        for label, value in (("name", name), ("hospital number", patient_id),
                             ("issuer", issuer)):
            if not _is_text_value(value):
                raise ImageShareError(f"the {label} may not contain a backslash or control "
                                      "characters")
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
        return PatientDetails(name, patient_id, issuer, nhs, birth, sex, self.other_ids)

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


def _is_text_value(value: str) -> bool:
    """Whether ``value`` can be one value of a PN or LO attribute: no backslash (it would
    make several values) and no control characters (PS3.5 6.2 allows none there)."""
    return "\\" not in value and not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value)


def _fits_person_name(name: str) -> bool:
    """Whether ``name`` is a valid PN value: at most three component groups (``=``), each of
    at most 64 characters and five ``^``-separated components (PS3.5 6.2)."""
    groups = name.split("=")
    return len(groups) <= 3 and all(len(g) <= 64 and g.count("^") <= 4 for g in groups)


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
        # Told, in the change's transaction, of studies that left their hospital number (the
        # shares a patient made of them are no longer that patient's to keep open).
        self.on_refiled: Callable[[Connection, list[str], Actor], object] = (
            lambda _conn, _uids, _actor: None)

    # -- public --------------------------------------------------------------------------

    def correct_study(self, study_uid: str, details: PatientDetails, reason: str,
                      actor: Actor) -> str:
        """File ``study_uid`` under ``details``; returns the change id.

        With the same hospital number (and issuer) the patient record itself is corrected, so
        all its studies change. With another one the study moves to that record, which is
        created if new; an existing record must have the same name and date of birth
        (otherwise merge the records) and no other NHS number or sex, and the study takes
        that record's details (an NHS number or sex it lacked is written into all its
        studies). An NHS number on another patient's record is refused. Raises
        ImageShareError with a reason fit for the user.
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
            before = {study_uid: old}
            if existing is not None:
                theirs = PatientDetails.of(existing)
                new = _filed_under(theirs, new)
                if _differences(theirs, new):  # the record gains an NHS number or sex
                    before = {uid: theirs for uid in self._study_uids(existing.pk)} | before
            uids = list(before)
        else:
            uids = self._study_uids(study.patient.pk)
            before = dict.fromkeys(uids, old)
        if new.nhs_number:
            self._nhs_number_free(new.nhs_number, new.patient_id, new.issuer, study.patient.pk)
        return self._apply(uids, study.patient.pk, new, "correction", reason, actor, before)

    def _nhs_number_free(self, nhs_number: str, patient_id: str, issuer: str,
                         old_pk: int) -> None:
        """Raise ImageShareError when another patient's record (not the one corrected, nor
        the one the study goes to) holds ``nhs_number``: one NHS number is one person, and two
        records holding it would be found, shared and sent as one."""
        with self._engine.connect() as conn:
            holders = set(conn.execute(
                select(patient_identifiers.c.patient_pk).where(
                    patient_identifiers.c.value == nhs_number,
                    patient_identifiers.c.issuer == NHS_ISSUER,
                    patient_in_record(patient_identifiers.c.patient_pk))).scalars())
            holders |= set(conn.execute(select(patients.c.pk).where(
                patients.c.patient_id == nhs_number, patients.c.issuer == NHS_ISSUER,
                patient_in_record(patients.c.pk))).scalars())
            if not holders:
                return
            own = set(conn.execute(select(patients.c.pk).where(
                patients.c.patient_id == patient_id, patients.c.issuer == issuer)).scalars())
            others = holders - own - {old_pk}
            holder = conn.execute(select(patients.c.patient_id).where(
                patients.c.pk.in_(sorted(others))).limit(1)).scalar() if others else None
        if holder is not None:
            raise ImageShareError(
                f"NHS number {nhs_number} is already on the record with hospital number "
                f"{holder}; check the number, or merge the two records")

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
        if source.nhs_number and target.nhs_number and source.nhs_number != target.nhs_number:
            raise ImageShareError(
                "the two records have different NHS numbers, so they are not the same "
                "patient; correct the wrong NHS number first if one of them is wrong")
        uids = self._study_uids(source.pk)
        return self._apply(uids, source.pk, PatientDetails.of(target), "merge", reason, actor,
                           dict.fromkeys(uids, PatientDetails.of(source)))

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
               reason: str, actor: Actor, before: dict[str, PatientDetails]) -> str:
        """Rewrite every instance of ``study_uids`` with ``new`` and commit; ``before``: each
        study's details as the caller saw them (a change made meanwhile by someone else is
        refused, not overwritten)."""
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
                    reason=reason, actor=actor, before=before))
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
                reason: str, actor: Actor, before: dict[str, PatientDetails]
                ) -> set[str] | None:
        """The index side of a change, in the index writer's transaction: the old blobs kept
        as evidence (their study is under a legal hold); None when the instances changed
        meanwhile (one arrived, went or was sent again: nothing is then changed, the caller
        rewrites them again). Raises ImageShareError when the studies' patient details were
        changed meanwhile (another correction or merge), so that neither change is lost
        half-way (its rewritten blobs left behind, its history naming the wrong old
        values)."""
        rows_now = conn.execute(
            select(studies.c.study_uid, patients.c.patient_id, patients.c.issuer,
                   patients.c.name, patients.c.birth_date, patients.c.sex, patients.c.attrs)
            .join(patients, patients.c.pk == studies.c.patient_pk)
            .where(studies.c.study_uid.in_(study_uids))).all()
        seen = {r.study_uid: PatientDetails(r.name, r.patient_id, r.issuer,
                                            nhs_number_of(r.attrs or {}), r.birth_date, r.sex)
                for r in rows_now}
        if any(_differences(seen.get(uid, PatientDetails("", "")), was)
               for uid, was in before.items()):
            raise ImageShareError("the patient details of this study were changed by someone "
                                  "else meanwhile; reload the page and check them")
        current = {r.pk: r.blob_key for r in conn.execute(
            select(instances.c.pk, instances.c.blob_key)
            .join(series, series.c.pk == instances.c.series_pk)
            .join(studies, studies.c.pk == series.c.study_pk)
            .where(studies.c.study_uid.in_(study_uids)))}
        if current != {w[0]: w[3] for w in written}:
            return None
        held = {uid for uid in study_uids if self.on_hold(conn, uid)}
        study_of = {r.pk: r.study_uid for r in conn.execute(
            select(instances.c.pk, studies.c.study_uid)
            .join(series, series.c.pk == instances.c.series_pk)
            .join(studies, studies.c.pk == series.c.study_pk)
            .where(studies.c.study_uid.in_(study_uids)))}
        now = datetime.now(UTC)
        attrs = level_json(header, PATIENT_KEYWORDS) if header is not None else {}
        values = {"name": new.name, "name_norm": normalise_name(new.name),
                  "birth_date": new.birth_date, "sex": new.sex, "attrs": attrs}
        target_pk = conn.execute(select(patients.c.pk).where(and_(
            patients.c.patient_id == new.patient_id, patients.c.issuer == new.issuer))).scalar()
        # Another patient's record that this change does not rewrite whole keeps its row when
        # it already says what the study now says (the study was filed under it as it
        # stands): its other studies' headers say what its row says.
        rewrites_record = target_pk is None or target_pk == old_pk or not conn.execute(
            select(func.count()).select_from(studies).where(
                studies.c.patient_pk == target_pk,
                studies.c.study_uid.not_in(study_uids))).scalar()
        if not rewrites_record:
            row = conn.execute(select(patients).where(patients.c.pk == target_pk)).one()
            rewrites_record = bool(_differences(PatientDetails(
                row.name, row.patient_id, row.issuer, nhs_number_of(row.attrs or {}),
                row.birth_date, row.sex), new))
            if rewrites_record and conn.execute(
                    select(patients.c.pk).where(patients.c.pk == target_pk,
                                                patient_in_record(patients.c.pk))).first():
                # A record with this number was made (or changed) meanwhile, with other
                # details: the check the caller made against the records no longer holds.
                raise ImageShareError(
                    f"a record with hospital number {new.patient_id} was made or changed "
                    "meanwhile with other details; reload the page and check them")
        if target_pk is None:
            target_pk = conn.execute(insert(patients).values(  # type: ignore[index]  # an INSERT has a key
                patient_id=new.patient_id, issuer=new.issuer, created_at=now, **values)
            ).inserted_primary_key[0]
        elif rewrites_record:
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
        if rewrites_record:
            conn.execute(delete(patient_identifiers).where(and_(
                patient_identifiers.c.patient_pk == target_pk,
                patient_identifiers.c.issuer == NHS_ISSUER)))
            if new.nhs_number:
                conn.execute(insert(patient_identifiers).values(
                    patient_pk=target_pk, value=new.nhs_number, issuer=NHS_ISSUER,
                    kind="TEXT"))
        if target_pk != old_pk and not conn.execute(
                select(func.count()).select_from(studies)
                .where(studies.c.patient_pk == old_pk)).scalar():
            conn.execute(delete(patient_identifiers)
                         .where(patient_identifiers.c.patient_pk == old_pk))
            conn.execute(delete(patients).where(patients.c.pk == old_pk))
        rows = [
            {"change_id": change_id, "kind": kind, "study_uid": uid, "attribute": label,
             "old_value": was[:324], "new_value": now_is[:324], "reason": reason,
             "actor": actor.label[:128], "at": now}
            for uid in study_uids for label, was, now_is in _differences(before[uid], new)
        ]
        if rows:
            conn.execute(insert(patient_changes), rows)
        self._audit.record([
            AuditEvent(actor=actor, action=f"patient.{kind}", outcome="success",
                       patient_id=new.patient_id, study_uid=uid,
                       instance_count=sum(study_of.get(w[0]) == uid for w in written),
                       detail={"change_id": change_id,
                               "previous_patient_id": before[uid].patient_id,
                               "attributes": [d[0] for d in _differences(before[uid], new)],
                               **({"originals_kept_for_legal_hold": True}
                                  if uid in held else {})})
            for uid in study_uids if _differences(before[uid], new)
        ], conn=conn)
        left = [uid for uid in study_uids
                if (before[uid].patient_id, before[uid].issuer) != (new.patient_id, new.issuer)]
        if left:
            self.on_refiled(conn, left, actor)
        self._parents_changed(conn)
        return kept


def _filed_under(existing: PatientDetails, asked: PatientDetails) -> PatientDetails:
    """The details a study moved to ``existing`` (another patient's record, with the hospital
    number asked for) is filed under: that record's own, so that its other studies, its
    stored headers and the index keep agreeing; the identifiers asked to be kept
    (``other_ids``) come along, and an NHS number or sex the record lacks is filled in (the
    caller then rewrites the record's other studies too). Raises ImageShareError when the
    details asked for describe someone else (another name, date of birth, NHS number or
    sex)."""
    if (normalise_name(existing.name), existing.birth_date) != (
            normalise_name(asked.name), asked.birth_date):
        raise ImageShareError(
            f"hospital number {asked.patient_id} already belongs to a record with another "
            "name or date of birth; check the number, or merge the two records")
    differing = [label for field, label in (("nhs_number", "NHS number"), ("sex", "sex"))
                 if getattr(asked, field) and getattr(existing, field)
                 and getattr(asked, field) != getattr(existing, field)]
    if differing:
        raise ImageShareError(
            f"the record with hospital number {asked.patient_id} has another "
            f"{' and '.join(differing)}; check the number, or correct that record first "
            "(from one of its studies)")
    return PatientDetails(existing.name, existing.patient_id, existing.issuer,
                          existing.nhs_number or asked.nhs_number, existing.birth_date,
                          existing.sex or asked.sex, asked.other_ids)


def _reason(reason: str) -> str:
    reason = (reason or "").strip()
    if not reason:
        raise ImageShareError("say why the details change (kept in the history)")
    if len(reason) > 2000:
        raise ImageShareError("the reason has at most 2000 characters")
    if any(ord(c) < 32 and c not in "\t\r\n" or c == "\x7f" for c in reason):
        raise ImageShareError("the reason may not contain control characters")
    return reason


def describe(change: PatientChange) -> dict[str, Any]:
    """A history row for pages and the API."""
    return {"attribute": change.attribute, "old": change.old_value, "new": change.new_value,
            "who": change.actor, "when": change.at, "why": change.reason, "kind": change.kind}
