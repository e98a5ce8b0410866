"""Invitations to upload: staff invite one person (a patient, or a partner site's clinician
without an account) to send images for a named patient, before an appointment.

An invitation carries the patient's identity as the hospital knows it, the appointment or
referral it is for, an expiry and a size limit. It is protected like a share link: a random
token (256 bits; only its SHA-256 is kept) in the link, and a passcode (argon2-hashed, shown
once to staff, who give it by phone or text message) to open it; ten wrong passcodes lock it.
Opening it starts one browser session; opening it again ends the previous one (one person at
a time). The uploader sees only their own files. Staff importing a USB stick or CD in the
browser make an invitation of kind ``staff`` (no token, no passcode) for the same pipeline.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, insert, select, update

from imageshare.access.passcodes import (
    count_try,
    forget_tries,
    hash_passcode,
    lock_when_used_up,
    passcode_matches,
)
from imageshare.access.users import as_utc, secret_hash
from imageshare.archive.corrections import PatientDetails
from imageshare.audit.trail import AuditEvent, AuditTrail, Outcome
from imageshare.domain.actors import Actor
from imageshare.domain.errors import (
    Forbidden,
    ImageShareError,
    LinkGone,
    NotFound,
    PublicUrlMissing,
)
from imageshare.domain.identifiers import is_email_address
from imageshare.exchange.inbox import UPLOAD_SITE_PREFIX
from imageshare.notify import Mailer
from imageshare.storage.index.database import from_row
from imageshare.storage.index.schema import upload_invitations, upload_sessions

REOPEN_DAYS = 7  # how long, at least, a link reopened by a rejection works again
_PASSCODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


@dataclass(frozen=True)
class UploadRequest:
    """What staff fill in to invite someone to upload (or to import media themselves)."""

    patient_name: str
    hospital_number: str
    birth_date: str = ""
    nhs_number: str = ""
    issuer: str = ""
    email: str = ""
    reference: str = ""
    expected_modality: str = ""
    expected_body_part: str = ""
    days: int = 14
    max_mb: int = 0


@dataclass(frozen=True)
class CreatedInvitation:
    """A new invitation: its link token and passcode are shown once, here."""

    public_id: str
    token: str
    passcode: str
    expires_at: datetime

    @property
    def path(self) -> str:
        """The link's path (no patient data in it)."""
        return f"/u/{self.token}"


@dataclass(frozen=True)
class Invitation:
    """An invitation (or a staff import batch) as stored."""

    pk: int
    public_id: str
    kind: str
    created_by: str
    email: str
    patient_name: str
    birth_date: str
    nhs_number: str
    hospital_number: str
    issuer: str
    reference: str
    expected_modality: str
    expected_body_part: str
    max_bytes: int
    status: str
    message: str
    failed_attempts: int
    locked: bool
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    opened_at: datetime | None
    submitted_at: datetime | None

    @property
    def state(self) -> str:
        """open, submitted, closed, revoked, locked or expired."""
        if self.revoked_at is not None:
            return "revoked"
        if self.locked:
            return "locked"
        if self.status == "open" and as_utc(self.expires_at) <= datetime.now(UTC):
            return "expired"
        return self.status

    @property
    def review_site(self) -> str:
        """The name its uploads wait under for review (no patient data)."""
        return f"{UPLOAD_SITE_PREFIX}{self.public_id}"

    def actor(self, source: str) -> Actor:
        """The person using this invitation's link."""
        return Actor("upload", self.public_id, "uploader", source)

    def details(self) -> PatientDetails:
        """The patient's identity as the hospital knows it."""
        return PatientDetails(self.patient_name, self.hospital_number, self.issuer,
                              self.nhs_number, self.birth_date)


class UploadInvitations:
    """Creates, opens, locks, reopens and closes invitations to upload; everything audited."""

    def __init__(self, engine: Engine, audit: AuditTrail, mailer: Mailer, public_url: str,
                 default_max_bytes: int, max_days: int) -> None:
        self._engine = engine
        self._audit = audit
        self.mailer = mailer
        self.public_url = public_url.rstrip("/")
        self.default_max_bytes = default_max_bytes
        self.max_days = max_days

    # -- creating ----------------------------------------------------------------------------

    def _checked(self, request: UploadRequest) -> tuple[PatientDetails, int]:
        details = PatientDetails(request.patient_name, request.hospital_number, request.issuer,
                                 request.nhs_number, request.birth_date).checked()
        max_bytes = (request.max_mb << 20) if request.max_mb > 0 else self.default_max_bytes
        if max_bytes > self.default_max_bytes * 16:
            raise ImageShareError("the size limit is too large")
        return details, max_bytes

    def _insert(self, kind: str, details: PatientDetails, request: UploadRequest,
                max_bytes: int, owner: Actor, token_hash: str | None, passcode_hash: str,
                expires: datetime) -> Invitation:
        public_id = secrets.token_hex(8)
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            conn.execute(insert(upload_invitations).values(
                public_id=public_id, kind=kind, token_hash=token_hash,
                passcode_hash=passcode_hash, created_by=owner.name,
                email=request.email.strip()[:254], patient_name=details.name,
                birth_date=details.birth_date, nhs_number=details.nhs_number,
                hospital_number=details.patient_id, issuer=details.issuer,
                reference=request.reference.strip()[:256],
                expected_modality=request.expected_modality.strip().upper()[:16],
                expected_body_part=request.expected_body_part.strip().upper()[:64],
                max_bytes=max_bytes, status="open", created_at=now, expires_at=expires))
            self._audit.record(AuditEvent(
                actor=owner, action="upload.invite" if kind == "invitation" else "upload.import",
                outcome="success", patient_id=details.patient_id, issuer=details.issuer,
                detail={"upload": public_id, "max_bytes": max_bytes,
                        "recipient": "e-mail" if request.email else ""}), conn=conn)
        return self.by_public_id(public_id)

    def invite(self, request: UploadRequest, owner: Actor) -> CreatedInvitation:
        """Make an invitation and e-mail its link (never the passcode, never patient data)
        to the person; nothing is made without IMAGESHARE_PUBLIC_URL or a valid address."""
        email = request.email.strip()
        if not is_email_address(email):
            raise ImageShareError("give the e-mail address of the person to invite")
        if not self.public_url:
            raise PublicUrlMissing(
                "e-mails with links cannot be sent until an administrator sets "
                "IMAGESHARE_PUBLIC_URL; nothing was created or sent")
        if not 1 <= request.days <= self.max_days:
            raise ImageShareError(f"an invitation lasts 1 to {self.max_days} days")
        details, max_bytes = self._checked(request)
        token = secrets.token_urlsafe(32)
        passcode = "".join(secrets.choice(_PASSCODE_ALPHABET) for _ in range(10))
        expires = datetime.now(UTC) + timedelta(days=request.days)
        made = self._insert("invitation", details, request, max_bytes, owner,
                            secret_hash(token), hash_passcode(passcode), expires)
        created = CreatedInvitation(made.public_id, token, passcode, expires)
        self.mailer.send(
            email, "You are invited to send images to the hospital",
            "The hospital asks you to send images (for example the contents of a CD, photos, "
            "videos or letters) before your appointment.\n\n"
            f"Send them here: {self.public_url}{created.path}\n\n"
            "You will need the passcode, which the hospital gives you separately (by phone or "
            f"text message).\nThe link works until {expires:%d %B %Y}.\n\n"
            "This message contains no patient information.\n")
        return created

    def staff_import(self, request: UploadRequest, owner: Actor) -> Invitation:
        """A batch for a member of staff importing media in the browser (no link, no
        passcode), for the patient as the hospital knows them."""
        details, max_bytes = self._checked(request)
        return self._insert("staff", details, request, max_bytes, owner, None, "",
                            datetime.now(UTC) + timedelta(days=2))

    # -- finding -----------------------------------------------------------------------------

    def by_public_id(self, public_id: str) -> Invitation:
        """One invitation; NotFound otherwise."""
        with self._engine.connect() as conn:
            row = conn.execute(select(upload_invitations).where(
                upload_invitations.c.public_id == public_id)).mappings().first()
        if row is None:
            raise NotFound("no such upload")
        return from_row(Invitation, row)

    def by_token(self, token: str) -> Invitation:
        """The invitation behind a link; NotFound for an unknown token, LinkGone when it
        was revoked, locked or expired."""
        if not token or len(token) > 128:
            raise NotFound("no such link")
        with self._engine.connect() as conn:
            row = conn.execute(select(upload_invitations).where(
                upload_invitations.c.token_hash == secret_hash(token))).mappings().first()
        if row is None:
            raise NotFound("no such link")
        invitation = from_row(Invitation, row)
        state = invitation.state
        if state in ("revoked", "locked"):
            raise LinkGone(f"this link has been {state}")
        if state == "expired" or as_utc(invitation.expires_at) <= datetime.now(UTC):
            # Sent or closed, it ends on its date too: the page says what was sent for whom.
            raise LinkGone("this link has expired")
        return invitation

    def all(self, limit: int = 200) -> list[Invitation]:
        """Invitations and batches, newest first."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(upload_invitations).order_by(
                upload_invitations.c.pk.desc()).limit(limit)).mappings().all()
        return [from_row(Invitation, r) for r in rows]

    # -- opening -----------------------------------------------------------------------------

    def check_passcode(self, invitation: Invitation, passcode: str, source: str) -> bool:
        """True for the right passcode; wrong ones count, and the tenth locks the link. Each
        try is counted before the passcode is checked (and uncounted when right), so that
        tries sent at the same moment (from many addresses, to several instances) cannot get
        past the ten between them; a locked invitation refuses even the right passcode."""
        actor = invitation.actor(source)
        with self._engine.begin() as conn:
            tries = count_try(conn, upload_invitations, invitation.pk)
        if tries is None:  # locked meanwhile (or by the tries in flight)
            self._audit.record(AuditEvent(
                actor=actor, action="upload.passcode", outcome="failure",
                detail={"upload": invitation.public_id, "locked": True}))
            return False
        if not passcode_matches(invitation_hash(self._engine, invitation.pk), passcode):
            with self._engine.begin() as conn:
                locked = lock_when_used_up(conn, upload_invitations, invitation.pk, tries)
                self._audit.record(AuditEvent(
                    actor=actor, action="upload.passcode", outcome="failure",
                    detail={"upload": invitation.public_id, "failures": tries,
                            "locked": locked}), conn=conn)
            return False
        with self._engine.begin() as conn:
            if not forget_tries(conn, upload_invitations, invitation.pk,
                                opened_at=datetime.now(UTC)):
                return False
            self._audit.record(AuditEvent(actor=actor, action="upload.open", outcome="success",
                                          detail={"upload": invitation.public_id}), conn=conn)
        return True

    def start_session(self, invitation: Invitation) -> tuple[str, str]:
        """A browser session for an opened invitation: (cookie secret, CSRF token). Any
        earlier session of the invitation ends: one person at a time."""
        secret, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            conn.execute(update(upload_sessions).where(
                upload_sessions.c.invitation_pk == invitation.pk,
                upload_sessions.c.ended_at.is_(None)).values(ended_at=now))
            conn.execute(insert(upload_sessions).values(
                invitation_pk=invitation.pk, token_hash=secret_hash(secret), csrf_token=csrf,
                created_at=now))
        return secret, csrf

    def session(self, invitation: Invitation, secret: str) -> str | None:
        """The CSRF token of the live session with this cookie secret, or None."""
        if not secret:
            return None
        with self._engine.connect() as conn:
            return conn.execute(select(upload_sessions.c.csrf_token).where(
                upload_sessions.c.invitation_pk == invitation.pk,
                upload_sessions.c.token_hash == secret_hash(secret),
                upload_sessions.c.ended_at.is_(None))).scalar()

    # -- the uploader's and staff's steps ----------------------------------------------------

    def require_open(self, invitation: Invitation) -> None:
        """Raise unless files may be added now, saying why not in the invited person's words
        (what ended the invitation and what to do; nothing about the patient)."""
        state = invitation.state
        if state == "open":
            return
        if state == "expired":
            ended = as_utc(invitation.expires_at)
            raise Forbidden(f"this invitation ended on {ended.day} {ended:%B %Y}; ask the "
                            "hospital for a new link to send your images")
        if state == "revoked":
            raise Forbidden("the hospital withdrew this invitation; ask them for a new link "
                            "if you still need to send images")
        if state == "locked":
            raise Forbidden("this invitation locked after too many wrong passcodes; ask the "
                            "hospital for a new link")
        raise Forbidden("this upload was sent already; the hospital will tell you if they "
                        "need anything else")

    def record_withdrawal(self, invitation: Invitation, actor: Actor, upload_id: str) -> None:
        """Audit that ``actor`` withdrew the file ``upload_id`` before sending it."""
        self._audit.record(AuditEvent(actor=actor, action="upload.withdraw", outcome="success",
                                      patient_id=invitation.hospital_number,
                                      issuer=invitation.issuer,
                                      detail={"upload": invitation.public_id,
                                              "file": upload_id}))

    def record_file_step(self, actor: Actor, action: str, outcome: Outcome, public_id: str,
                    detail: dict[str, Any]) -> None:
        """Audit a step of a file's transfer on the upload ``public_id``, naming its patient
        with the issuer (none when there is no such upload)."""
        patient_id = issuer = ""
        try:
            invitation = self.by_public_id(public_id[:64])
            patient_id, issuer = invitation.hospital_number, invitation.issuer
        except NotFound:
            pass
        self._audit.record(AuditEvent(actor=actor, action=action, outcome=outcome,
                                      patient_id=patient_id, issuer=issuer,
                                      detail={"upload": public_id[:64], **detail}))

    def mark_submitted(self, invitation: Invitation, actor: Actor) -> None:
        """The uploader (or member of staff) finished sending this round."""
        with self._engine.begin() as conn:
            conn.execute(update(upload_invitations).where(
                upload_invitations.c.pk == invitation.pk).values(
                status="submitted", submitted_at=datetime.now(UTC)))
            self._audit.record(AuditEvent(actor=actor, action="upload.submit",
                                          outcome="success",
                                          patient_id=invitation.hospital_number,
                                          issuer=invitation.issuer,
                                          detail={"upload": invitation.public_id}), conn=conn)

    def reopen(self, invitation: Invitation, message: str) -> datetime:
        """Let the uploader send again (after a rejection), with the hospital's message; the
        link works at least :data:`REOPEN_DAYS` more days (a rejection after it expired
        must not ask for images through a dead link). Returns until when it works."""
        until = max(as_utc(invitation.expires_at),
                    datetime.now(UTC) + timedelta(days=REOPEN_DAYS))
        with self._engine.begin() as conn:
            conn.execute(update(upload_invitations).where(
                upload_invitations.c.pk == invitation.pk).values(
                status="open", message=message[:4000], expires_at=until))
        return until

    def close(self, invitation: Invitation) -> None:
        """Nothing more to send or review."""
        with self._engine.begin() as conn:
            conn.execute(update(upload_invitations).where(
                upload_invitations.c.pk == invitation.pk).values(status="closed"))

    def revoke(self, invitation: Invitation, actor: Actor) -> None:
        """End an invitation for good."""
        with self._engine.begin() as conn:
            conn.execute(update(upload_invitations).where(
                upload_invitations.c.pk == invitation.pk).values(revoked_at=datetime.now(UTC)))
            self._audit.record(AuditEvent(actor=actor, action="upload.revoke",
                                          outcome="success",
                                          detail={"upload": invitation.public_id}), conn=conn)


def invitation_hash(engine: Engine, pk: int) -> str:
    """The stored passcode hash of an invitation."""
    with engine.connect() as conn:
        value: Any = conn.execute(select(upload_invitations.c.passcode_hash).where(
            upload_invitations.c.pk == pk)).scalar_one()
    return str(value)
