"""Quality control of uploads: each study an upload made, with its checks, accepted into the
record (filed under the invited patient, through the inbox's own accept) or rejected with a
message e-mailed to the uploader, which reopens the invitation for new images."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Engine, delete, or_, select, union, update

from imageshare.archive.corrections import PatientCorrections, PatientDetails
from imageshare.archive.record import patient_in_record
from imageshare.archive.studies import StudyCatalogue, StudyRecord
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError, NotFound
from imageshare.domain.identifiers import normalise_name
from imageshare.exchange.inbox import Inbox, InboxItem
from imageshare.storage.blobs import BlobStore
from imageshare.storage.index.schema import (
    inbox_items,
    instances,
    patient_changes,
    patients,
    series,
    studies,
    upload_files,
    upload_results,
)
from imageshare.uploads import convert
from imageshare.uploads.invitations import Invitation, UploadInvitations

# The store's outcomes that made an instance out of an uploaded file (not one found stored).
_MADE_HERE = ("stored", "held", "replaced")


@dataclass(frozen=True)
class Check:
    """One check shown to the reviewer: what, whether it passed, and why."""

    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class UploadedStudy:
    """A study an upload made, waiting for a decision (or decided)."""

    item: InboxItem
    study: StudyRecord | None
    checks: tuple[Check, ...]
    files: tuple[dict[str, object], ...]

    @property
    def passed(self) -> bool:
        """True when every check passed."""
        return all(c.passed for c in self.checks)


class UploadReview:
    """The QC queue: studies of uploads, their checks, accept and reject."""

    def __init__(self, engine: Engine, invitations: UploadInvitations, inbox: Inbox,
                 catalogue: StudyCatalogue, corrections: PatientCorrections,
                 originals: BlobStore, audit: AuditTrail) -> None:
        self._engine = engine
        self._invitations = invitations
        self._inbox = inbox
        self._catalogue = catalogue
        self._corrections = corrections
        self._originals = originals
        self._audit = audit

    def items(self, invitation: Invitation) -> list[InboxItem]:
        """Every inbox item the invitation's sent uploads made (pending and decided); a
        study whose files were stored on arrival but not yet sent is not shown."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(inbox_items.c.pk).where(
                inbox_items.c.site == invitation.review_site,
                or_(inbox_items.c.status != "pending",
                    inbox_items.c.study_uid.in_(self._sent_studies(invitation))))
                .order_by(inbox_items.c.pk)).scalars().all()
        return [self._inbox.item(pk) for pk in rows]

    @staticmethod
    def _sent_instances(invitation: Invitation) -> Any:
        """The instances the invitation sent: reported by an intake, or files of a sent
        round stored on arrival (reviewable even when their intake never finished). A file
        it found stored already is its own only when no other upload made that instance
        (another upload's waits for that one's review; a re-run intake finds its own)."""
        def rows(table: Any, mine: bool, made: bool) -> Any:
            chosen = select(table.c.sop_uid).where(
                table.c.invitation_pk == invitation.pk if mine
                else table.c.invitation_pk != invitation.pk, table.c.sop_uid != "")
            if table is upload_files and mine:
                chosen = chosen.where(table.c.status == "done")
            return chosen.where(table.c.outcome.in_(_MADE_HERE) if made
                                else table.c.outcome.not_in(_MADE_HERE))

        found = union(rows(upload_results, True, False), rows(upload_files, True, False)
                      ).subquery()
        made_elsewhere = union(
            rows(upload_results, False, True).where(
                upload_results.c.sop_uid.in_(select(found.c.sop_uid))),
            rows(upload_files, False, True).where(
                upload_files.c.sop_uid.in_(select(found.c.sop_uid))))
        return union(rows(upload_results, True, True), rows(upload_files, True, True),
                     select(found.c.sop_uid).where(found.c.sop_uid.not_in(made_elsewhere)))

    def _sent_studies(self, invitation: Invitation) -> Any:
        return (select(studies.c.study_uid)
                .join(series, series.c.study_pk == studies.c.pk)
                .join(instances, instances.c.series_pk == series.c.pk)
                .where(instances.c.sop_uid.in_(self._sent_instances(invitation))))

    def sent_of(self, invitation: Invitation, study_uid: str) -> set[str]:
        """The SOP Instance UIDs of ``study_uid`` that the invitation sent (what its review
        decides: nothing uploaded and not sent)."""
        with self._engine.connect() as conn:
            return set(conn.execute(
                select(instances.c.sop_uid)
                .join(series, series.c.pk == instances.c.series_pk)
                .join(studies, studies.c.pk == series.c.study_pk)
                .where(studies.c.study_uid == study_uid,
                       instances.c.sop_uid.in_(self._sent_instances(invitation)))).scalars())

    def reopen_sent(self, invitation: Invitation, study_uids: set[str]) -> None:
        """Studies a round just sent that still have instances waiting for review are to be
        decided again (a study decided before got more of it in this round)."""
        for uid in study_uids:
            waiting = self.sent_of(invitation, uid)
            with self._engine.begin() as conn:
                if not waiting or not conn.execute(select(instances.c.pk).where(
                        instances.c.sop_uid.in_(sorted(waiting)),
                        instances.c.retention_class.in_(["upload", "held"])).limit(1)
                        ).first():
                    continue
                conn.execute(update(inbox_items).where(
                    inbox_items.c.site == invitation.review_site,
                    inbox_items.c.study_uid == uid, inbox_items.c.status != "pending")
                    .values(status="pending", decided_by="", decided_at=None))

    def pending_count(self, invitation: Invitation) -> int:
        """Studies of the invitation still waiting for a decision."""
        return sum(1 for i in self.items(invitation) if i.status == "pending")

    def studies(self, invitation: Invitation) -> list[UploadedStudy]:
        """The invitation's studies with their checks and files."""
        with self._engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(select(upload_results).where(
                upload_results.c.invitation_pk == invitation.pk).order_by(
                upload_results.c.pk)).mappings()]
        found = []
        for item in self.items(invitation):
            files = tuple(r for r in rows if r["study_uid"] == item.study_uid)
            try:
                study: StudyRecord | None = self._catalogue.record(item.study_uid)
            except NotFound:
                study = None
            found.append(UploadedStudy(item, study, self.checks(invitation, study, files),
                                       files))
        return found

    def unused(self, invitation: Invitation) -> list[dict[str, object]]:
        """The invitation's files that are in none of its studies to review: refused,
        skipped, refused as against what the archive holds, or found in the archive already
        (a duplicate of a study in the record), with what the archive said: the reviewer's
        to read (the uploader is told only what depends on their file)."""
        reviewed = {i.study_uid for i in self.items(invitation)}
        return [r for r in self._files(invitation) if r["study_uid"] not in reviewed]

    def checks(self, invitation: Invitation, study: StudyRecord | None,
               files: tuple[dict[str, object], ...]) -> tuple[Check, ...]:
        """Identity by NHS number, readability, and the expected modality and body part."""
        if study is None:
            return (Check("Readable", False, "nothing of it is stored any more"),)
        identities = {str(f["identity"]) for f in files if f["identity"]}
        patient = study.patient
        if "mismatch" in identities:
            identity = Check("Patient", False, "the patient in the files is not the invited "
                             "patient (name, date of birth or NHS number differ)")
        elif invitation.nhs_number and patient.nhs_number == invitation.nhs_number:
            identity = Check("Patient", True, "NHS number matches the invitation")
        elif "name" in identities:
            identity = Check("Patient", True, "no NHS number in the files; name and date of "
                             "birth match the invitation")
        elif (normalise_name(patient.name) == normalise_name(invitation.patient_name)
              and patient.birth_date == invitation.birth_date):
            identity = Check("Patient", True, "made from the invitation's details")
        else:
            identity = Check("Patient", False, "the details differ from the invitation's")
        count = sum(len(s.instances) for s in study.series)
        readable = Check("Readable", count > 0, f"{count} instance(s) stored and indexed")
        checks = [identity, readable]
        active = [str(f["label"]) for f in files
                  if str(f["detail"]).startswith(convert.ACTIVE_PDF)]
        if active:
            checks.append(Check("Documents", False, f"{len(active)} PDF document(s) hold "
                                "scripts, actions or embedded files (see each file below); "
                                "open them with care before accepting"))
        modalities = {s.modality for s in study.series}
        if invitation.expected_modality:
            ok = invitation.expected_modality in modalities
            checks.append(Check("Modality", ok, f"expected {invitation.expected_modality}, "
                                f"found {', '.join(sorted(modalities)) or 'none'}"))
        if invitation.expected_body_part:
            parts = {str(f["body_part"]).upper() for f in files if f["body_part"]}
            ok = invitation.expected_body_part in parts
            checks.append(Check("Body part", ok, f"expected {invitation.expected_body_part}, "
                                f"found {', '.join(sorted(parts)) or 'not recorded'}"))
        return tuple(checks)

    def _own_item(self, invitation: Invitation, pk: int) -> InboxItem:
        item = self._inbox.item(pk)
        if item.site != invitation.review_site:
            raise NotFound("no such study in this upload")
        if item.status != "pending":
            raise ImageShareError("this study was decided already")
        if not self.sent_of(invitation, item.study_uid):
            raise NotFound("no such study in this upload")  # nothing of it was sent yet
        return item

    def accept(self, invitation: Invitation, pk: int, actor: Actor, file_anyway: bool = False,
               note: str = "") -> str:
        """Accept a study into the record, filed under the invited patient (the files' own
        patient ID kept as an other ID). A study whose patient is not the invited one is
        accepted only with ``file_anyway`` (a person checked it). Returns what was done."""
        item = self._own_item(invitation, pk)
        study = self._catalogue.record(item.study_uid)
        target = self._invited_record(invitation)
        patient = study.patient
        uploaded = [r for r in self._files(invitation) if r["study_uid"] == item.study_uid]
        if any(r["identity"] == "mismatch" for r in uploaded) and not file_anyway:
            raise ImageShareError("the patient in these files is not the invited patient; "
                                  "check them, then confirm filing them under the invited "
                                  "patient, or reject them")
        same = ((patient.patient_id, patient.issuer) == (target.patient_id, target.issuer)
                and normalise_name(patient.name) == normalise_name(target.name)
                and patient.birth_date == target.birth_date
                and (not target.nhs_number or patient.nhs_number == target.nhs_number))
        if not same:
            if (patient.patient_id, patient.issuer) == (target.patient_id, target.issuer):
                raise ImageShareError(
                    "the files carry the invited hospital number with other details; correct "
                    "the patient's record first, then accept")
            if self._catalogue.in_record(item.study_uid):
                # Filing it under the invited patient would move what the record holds of
                # this study (never uploaded) along with the files.
                raise ImageShareError(
                    "these files belong to a study already in the record under another "
                    "patient; they cannot be filed under the invited patient: reject them, "
                    "or reconcile the patients first")

        def file_under_invited(claimed: InboxItem) -> str:
            """Once the item is this decision's (two reviewers at once change nothing
            twice): the study filed under the invited patient."""
            if same:
                return "accepted"
            other = ((patient.patient_id, "upload"),) if patient.patient_id else ()
            self._corrections.correct_study(
                claimed.study_uid, replace(target, other_ids=other),
                f"upload {invitation.public_id} filed under the invited patient", actor)
            return f"filed under hospital number {target.patient_id} and accepted"

        done = self._inbox.accept(pk, actor, reconcile=False, note=note, upload_review=True,
                                  sop_uids=self.sent_of(invitation, item.study_uid),
                                  prepare=file_under_invited)
        self._audit.record(AuditEvent(actor=actor, action="upload.accept", outcome="success",
                                      patient_id=target.patient_id, issuer=target.issuer,
                                      study_uid=item.study_uid,
                                      detail={"upload": invitation.public_id, "done": done}))
        if self.pending_count(invitation) == 0 and invitation.status == "submitted":
            self._invitations.close(invitation)
        return done

    def _invited_record(self, invitation: Invitation) -> PatientDetails:
        """Whom an upload is filed under: the record with the invited hospital number as it
        is now (its NHS number, sex and any correction since the invitation kept: the
        invitation's copy may lack them), else the invitation's details (a patient new
        here). A record merged into another since the invitation is refused with the
        number it went to, rather than made again."""
        invited = invitation.details().checked()
        with self._engine.connect() as conn:
            study_uid = conn.execute(
                select(studies.c.study_uid).join(patients, patients.c.pk == studies.c.patient_pk)
                .where(patients.c.patient_id == invited.patient_id,
                       patients.c.issuer == invited.issuer, patient_in_record(patients.c.pk))
                .order_by(studies.c.pk).limit(1)).scalar()
            merged_into = None if study_uid else conn.execute(
                select(patient_changes.c.new_value).where(
                    patient_changes.c.kind == "merge",
                    patient_changes.c.attribute == "Hospital number",
                    patient_changes.c.old_value == invited.patient_id)
                .order_by(patient_changes.c.pk.desc()).limit(1)).scalar()
        if study_uid:
            record = PatientDetails.of(self._catalogue.record(study_uid).patient)
            if invited.nhs_number and record.nhs_number and (
                    invited.nhs_number != record.nhs_number):
                raise ImageShareError(
                    "the invitation gives another NHS number than the patient's record with "
                    f"hospital number {invited.patient_id}; check which is right, correct it, "
                    "then accept")
            return replace(record, nhs_number=record.nhs_number or invited.nhs_number)
        if merged_into:
            raise ImageShareError(
                f"the invited patient's record (hospital number {invited.patient_id}) was "
                f"merged into hospital number {merged_into} after the invitation; check that "
                "record, then invite again for it or import the files there")
        return invited

    def reject(self, invitation: Invitation, pk: int, actor: Actor, message: str) -> None:
        """Reject a study (its instances and originals are deleted), tell the uploader why by
        e-mail, and reopen the invitation for new images."""
        message = message.strip()
        if not message:
            raise ImageShareError("say what the uploader should send instead")
        item = self._own_item(invitation, pk)
        self._inbox.reject(pk, actor, message[:2000], upload_review=True,
                           sop_uids=self.sent_of(invitation, item.study_uid))
        for row in self._files(invitation):
            if row["study_uid"] == item.study_uid and row["original_key"]:
                self._originals.delete(str(row["original_key"]))
        with self._engine.begin() as conn:
            conn.execute(delete(upload_results).where(
                upload_results.c.invitation_pk == invitation.pk,
                upload_results.c.study_uid == item.study_uid))
        self._audit.record(AuditEvent(actor=actor, action="upload.reject", outcome="success",
                                      patient_id=invitation.hospital_number,
                                      issuer=invitation.issuer,
                                      study_uid=item.study_uid,
                                      detail={"upload": invitation.public_id}))
        if invitation.kind == "invitation":
            until = self._invitations.reopen(invitation, message)
            if invitation.email and self._invitations.public_url:
                self._invitations.mailer.send(
                    invitation.email, "The hospital asks you to send images again",
                    "The hospital looked at the images you sent and could not use some of "
                    f"them. Their message:\n\n{message}\n\n"
                    "Please send new images with the same link and passcode as before "
                    f"(the link works until {until:%d %B %Y}).\n")

    def _files(self, invitation: Invitation) -> list[dict[str, object]]:
        with self._engine.connect() as conn:
            return [dict(r) for r in conn.execute(select(upload_results).where(
                upload_results.c.invitation_pk == invitation.pk).order_by(
                upload_results.c.pk)).mappings()]

    def original(self, invitation: Invitation, result_pk: int) -> tuple[dict[str, object],
                                                                          BlobStore]:
        """A kept original file's row (and the store holding it)."""
        with self._engine.connect() as conn:
            row = conn.execute(select(upload_results).where(
                upload_results.c.pk == result_pk,
                upload_results.c.invitation_pk == invitation.pk)).mappings().first()
        if row is None or not row["original_key"]:
            raise NotFound("no such original file")
        return dict(row), self._originals
