"""The uploads capability as one service: the steps every way in (the invitee's page, the
staff import page) takes, so that no page writes the flow itself."""

from __future__ import annotations

from dataclasses import dataclass

from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError
from imageshare.uploads.intake import RoundReport, UploadIntake
from imageshare.uploads.invitations import Invitation, UploadInvitations
from imageshare.uploads.patients import PatientAccounts
from imageshare.uploads.receiving import UploadReceiver
from imageshare.uploads.review import UploadReview


@dataclass
class UploadService:
    """Invitations, receiving, intake, review and patient accounts of one installation."""

    invitations: UploadInvitations
    receiver: UploadReceiver
    intake: UploadIntake
    review: UploadReview
    patients: PatientAccounts

    def submit(self, invitation: Invitation, actor: Actor, uploader: str) -> RoundReport:
        """The uploader (or member of staff) sends what they uploaded: the round's complete
        files become DICOM waiting for review; the invitation waits for the hospital."""
        self.invitations.require_open(invitation)
        round_ = self.receiver.current_round(invitation)
        files = [f for f in self.receiver.files(invitation, round_) if f.status == "received"]
        if not files:
            raise ImageShareError("no file has arrived completely yet; add files first")
        self.receiver.finish_round(invitation, round_)
        try:
            report = self.intake.process(invitation, round_,
                                         self.receiver.round_folder(invitation, round_), actor,
                                         uploader)
        finally:
            self.receiver.discard_round(invitation, round_)
        self.invitations.mark_submitted(invitation, actor)
        return report
