"""The uploads capability as one service: the steps every way in (the invitee's page, the
staff import page) takes, so that no page writes the flow itself.

Sending a round queues its intake as a background job (``upload-intake``): a large CD is
made DICOM while the sender watches its progress, and a restart in the middle runs the
round again (the intake makes the same instances again) instead of losing it.

A DICOM file (most of a CD) is stored for review as soon as it has arrived, so that a large
CD is mostly stored by the time the sender presses Send; it waits in the ``upload`` class,
out of the record and out of the QC queue until its round is sent. A file withdrawn before
Send, and every file of an invitation that ended unsent, is removed again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from imageshare.archive.deletion import ArchiveDeletion
from imageshare.audit.trail import Outcome
from imageshare.domain.actors import SYSTEM, Actor
from imageshare.domain.errors import (
    AuditUnavailable,
    Forbidden,
    ImageShareError,
    LinkGone,
    NotAuthenticated,
    NotFound,
    OutOfResources,
    TooManyRequests,
    UploadQuotaExceeded,
)
from imageshare.jobs.queue import Job, JobElsewhere, JobQueue, actor_from, actor_params
from imageshare.uploads.intake import UploadIntake
from imageshare.uploads.invitations import Invitation, UploadInvitations
from imageshare.uploads.patients import PatientAccounts
from imageshare.uploads.receiving import UploadFile, UploadReceiver
from imageshare.uploads.review import UploadReview

log = logging.getLogger("imageshare.uploads")
INTAKE_JOB = "upload-intake"
CLEANUP_JOB = "upload-cleanup"
ELSEWHERE_LIMIT = timedelta(days=1)  # an intake waits this long for the instance with the files
ORPHAN_AGE = timedelta(days=2)  # an instance of no upload older than this is removed
# The steps of the tus file transfer, each audited (tus termination is upload.withdraw).
FILE_STEPS = ("upload.announce", "upload.chunk", "upload.offset", "upload.withdraw")
# Errors that are a refusal (of a right, a limit) rather than a failure of the request.
_REFUSALS = (Forbidden, NotAuthenticated, LinkGone, TooManyRequests, UploadQuotaExceeded,
             OutOfResources)


@dataclass
class UploadService:
    """Invitations, receiving, intake, review and patient accounts of one installation."""

    invitations: UploadInvitations
    receiver: UploadReceiver
    intake: UploadIntake
    review: UploadReview
    patients: PatientAccounts
    jobs: JobQueue
    deletion: ArchiveDeletion

    def __post_init__(self) -> None:
        self.jobs.register(INTAKE_JOB, self._run_intake)
        self.jobs.register(CLEANUP_JOB, self._run_cleanup)

    def ensure_room(self, incoming: int, actor: Actor) -> None:
        """Raise OutOfResources (a 507, audited) unless ``incoming`` more bytes of an upload
        fit on the disk above the free-space floor (checked before they are written)."""
        self.intake.ensure_room(self.receiver.root, incoming, actor)

    def received(self, invitation: Invitation, file: UploadFile, offset: int,
                 actor: Actor) -> UploadFile:
        """Bytes of ``file`` arrived up to ``offset``; a DICOM file complete is stored for
        review at once (by ``actor``, the uploader or member of staff)."""
        done = self.receiver.end_append(
            invitation, file, offset,
            lambda path: self.intake.on_arrival(path, invitation, actor))
        if done.status == "removed":  # withdrawn meanwhile: what it was stored as goes too
            self._remove_made([done], actor, "withdrawn by the uploader before sending")
            raise NotFound("this file was withdrawn")
        return done

    def withdraw(self, invitation: Invitation, upload_id: str, actor: Actor) -> None:
        """Forget a file not yet sent (tus termination), with the instance it became. The
        file is withdrawn first (a Send at the same moment leaves it out, or the withdrawal
        is refused); when its instance cannot be removed (a legal hold), the file is put
        back as it was."""
        found = self.receiver.unsent(invitation, upload_id)
        self.receiver.withdraw(invitation, found)
        try:
            self._remove_made([found], actor, "withdrawn by the uploader before sending")
        except BaseException:
            self.receiver.restore(invitation, found)
            raise
        self.receiver.drop_bytes(invitation, found)
        self.invitations.record_withdrawal(invitation, actor, upload_id)

    def record_step(self, action: str, actor: Actor, public_id: str, upload_id: str = "",
                    offset: int | None = None, length: int | None = None,
                    error: BaseException | None = None) -> None:
        """Audit one step of a file's transfer (``action``, one of :data:`FILE_STEPS`) by
        ``actor`` on the upload ``public_id`` (naming its patient, with the issuer), file
        ``upload_id``: a success (how far the file got), or ``error``'s refusal or failure
        with its reason. An error that is the audit trail's own is not recorded again."""
        if action not in FILE_STEPS:
            raise ValueError(f"not a step of a file's transfer: {action}")
        if isinstance(error, AuditUnavailable):
            return
        detail: dict[str, Any] = {}
        if upload_id:
            detail["file"] = upload_id[:64]
        if offset is not None:
            detail["offset"] = offset
        if length is not None:
            detail["length"] = length
        outcome: Outcome = "success"
        if error is not None:
            outcome = "refused" if isinstance(error, _REFUSALS) else "failure"
            detail["reason"] = (str(error)[:200] if isinstance(error, ImageShareError)
                                else type(error).__name__)
        self.invitations.record_file_step(actor, action, outcome, public_id, detail)

    def revoke(self, invitation: Invitation, actor: Actor) -> None:
        """End an invitation for good; what was uploaded and never sent is removed."""
        self.invitations.revoke(invitation, actor)
        self._forget(invitation, actor, "the upload was revoked before it was sent")

    def forget_abandoned(self, actor: Actor = SYSTEM) -> int:
        """Remove what was uploaded for invitations that ended (expired or revoked) before
        it was sent; returns the files forgotten. One invitation's failure (a legal hold)
        does not stop the others."""
        forgotten = 0
        for public_id in self.receiver.with_unsent_files():
            invitation = self.invitations.by_public_id(public_id)
            if invitation.state in ("expired", "revoked"):
                try:
                    forgotten += self._forget(invitation, actor,
                                              "the upload ended before it was sent")
                except ImageShareError as exc:
                    log.warning("unsent files of upload %s kept: %s", public_id, exc)
        orphans = self.receiver.orphans(datetime.now(UTC) - ORPHAN_AGE)
        if orphans:
            try:
                self.deletion.instances(orphans, actor, "uploaded, never sent by anyone",
                                        only_classes=("upload",))
            except ImageShareError as exc:
                log.warning("%d instance(s) of unsent uploads kept: %s", len(orphans), exc)
        return forgotten

    def _forget(self, invitation: Invitation, actor: Actor, reason: str) -> int:
        unsent = self.receiver.all_unsent(invitation)
        self._remove_made(unsent, actor, reason)
        self.receiver.forget_unsent(invitation, unsent)
        return len(unsent)

    def _remove_made(self, files: list[UploadFile], actor: Actor, reason: str) -> None:
        """Delete the instances these files (about to be forgotten) were made into on
        arrival, waiting for review (``upload``, or ``held`` for another patient's details),
        unless another file of any upload, received or sent, is the same instance; an
        instance that was there before (a duplicate) or is in the record is never touched."""
        made = {f.sop_uid for f in files if f.sop_uid and f.outcome in ("stored", "held")}
        gone = made - self.receiver.referenced(made, besides={f.upload_id for f in files})
        if gone:
            self.deletion.instances(gone, actor, reason, only_classes=("upload", "held"))

    def _run_cleanup(self, job: Job, _params: dict[str, Any]) -> None:
        job.summary = f"{self.forget_abandoned()} file(s) of ended uploads removed"

    def submit(self, invitation: Invitation, actor: Actor, uploader: str) -> Job:
        """The uploader (or member of staff) sends what they uploaded: the invitation waits
        for the hospital and the round's complete files are queued to become DICOM waiting
        for review (the returned job, owned by ``actor``, tells how far it got)."""
        self.invitations.require_open(invitation)
        round_ = self.receiver.current_round(invitation)
        files = [f for f in self.receiver.files(invitation, round_) if f.status == "received"]
        if not files:
            raise ImageShareError("no file has arrived completely yet; add files first")
        if not self.receiver.finish_round(invitation, round_):
            # Sent a moment ago (a second press, another tab): that Send's job checks them.
            raise ImageShareError("these files were sent already")
        self.invitations.mark_submitted(invitation, actor)
        return self.jobs.submit(
            actor.name, INTAKE_JOB, f"Checking {len(files)} uploaded file(s)",
            {"upload": invitation.public_id, "round": round_, "actor": actor_params(actor),
             "uploader": uploader, "at": datetime.now(UTC).isoformat()},
            total=len(files), notify=actor.kind == "user")

    def _run_intake(self, job: Job, params: dict[str, Any]) -> None:
        """Make one sent round DICOM for review (on whichever instance leased the job)."""
        invitation = self.invitations.by_public_id(params["upload"])
        round_ = int(params["round"])
        folder = self.receiver.round_folder(invitation, round_)
        if not folder.exists():
            self._not_here(job, invitation, round_, datetime.fromisoformat(params["at"]))
            return
        job.done = 0

        def step() -> None:
            job.done += 1

        report = self.intake.process(invitation, round_, folder, actor_from(params["actor"]),
                                     params["uploader"], datetime.fromisoformat(params["at"]),
                                     progress=step)
        self.review.reopen_sent(invitation, report.studies)
        self.receiver.discard_round(invitation, round_)
        job.done = max(job.done, job.total)
        # the uploader reads it too: counted as they are told (nothing of the archive)
        job.summary = (f"{report.received} file(s) received"
                       + (f", {report.refused} could not be used" if report.refused else ""))

    def _not_here(self, job: Job, invitation: Invitation, round_: int,
                  sent_at: datetime) -> None:
        """The round's files are not in this instance's data dir: an earlier attempt
        finished them (its results stand), or the instance that received them is to run the
        job (it goes back to the queue), or that instance has been gone for a day."""
        counts = self.intake.reported(invitation, round_)
        if counts is not None:
            made, refused = counts
            job.done = job.total
            job.summary = (f"{made} file(s) received"
                           + (f", {refused} could not be used" if refused else ""))
            return
        if datetime.now(UTC) - sent_at > ELSEWHERE_LIMIT:
            raise ImageShareError(
                "the uploaded files are kept by another ImageShare instance (in its data "
                "folder) that has not run their checks for a day; start it again, or ask "
                "the sender to send them once more")
        raise JobElsewhere("the uploaded files are kept by another ImageShare instance; "
                           "queued for it")
