"""The uploads capability as one service: the steps every way in (the invitee's page, the
staff import page) takes, so that no page writes the flow itself.

Sending a round queues its intake as a background job (``upload-intake``): a large CD is
made DICOM while the sender watches its progress, and a restart in the middle runs the
round again (the intake makes the same instances again) instead of losing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError
from imageshare.jobs.queue import Job, JobQueue, actor_from, actor_params
from imageshare.uploads.intake import UploadIntake
from imageshare.uploads.invitations import Invitation, UploadInvitations
from imageshare.uploads.patients import PatientAccounts
from imageshare.uploads.receiving import UploadReceiver
from imageshare.uploads.review import UploadReview

INTAKE_JOB = "upload-intake"


@dataclass
class UploadService:
    """Invitations, receiving, intake, review and patient accounts of one installation."""

    invitations: UploadInvitations
    receiver: UploadReceiver
    intake: UploadIntake
    review: UploadReview
    patients: PatientAccounts
    jobs: JobQueue

    def __post_init__(self) -> None:
        self.jobs.register(INTAKE_JOB, self._run_intake)

    def submit(self, invitation: Invitation, actor: Actor, uploader: str) -> Job:
        """The uploader (or member of staff) sends what they uploaded: the invitation waits
        for the hospital and the round's complete files are queued to become DICOM waiting
        for review (the returned job, owned by ``actor``, tells how far it got)."""
        self.invitations.require_open(invitation)
        round_ = self.receiver.current_round(invitation)
        files = [f for f in self.receiver.files(invitation, round_) if f.status == "received"]
        if not files:
            raise ImageShareError("no file has arrived completely yet; add files first")
        self.receiver.finish_round(invitation, round_)
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
        job.done = 0

        def step() -> None:
            job.done += 1

        report = self.intake.process(invitation, round_, folder, actor_from(params["actor"]),
                                     params["uploader"], datetime.fromisoformat(params["at"]),
                                     progress=step)
        self.receiver.discard_round(invitation, round_)
        job.done = max(job.done, job.total)
        job.summary = (f"{report.stored + report.held} file(s) received"
                       + (f", {report.refused} could not be used" if report.refused else ""))
