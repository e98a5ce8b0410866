"""Patients' own access: staff invite a patient by e-mail to make an account (role
``patient``) bound to their record; the account then reaches that record's accepted studies
(view and download) and nothing else, through the same policy as every other grant."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Engine, insert, select, update

from imageshare.access.scope import DOWNLOAD, VIEW, Grant
from imageshare.access.users import UserDirectory
from imageshare.archive.record import study_in_record
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError, PublicUrlMissing
from imageshare.domain.identifiers import is_email_address
from imageshare.notify import Mailer
from imageshare.storage.index.schema import patient_accounts, patients, studies


class PatientAccounts:
    """Invites patients to accounts and says what each patient account may reach."""

    def __init__(self, engine: Engine, users: UserDirectory, audit: AuditTrail,
                 mailer: Mailer, public_url: str) -> None:
        self._engine = engine
        self._users = users
        self._audit = audit
        self._mailer = mailer
        self._public_url = public_url.rstrip("/")

    def invite(self, email: str, patient_id: str, issuer: str, actor: Actor) -> None:
        """E-mail ``email`` an invitation to a patient account bound to the record
        (``patient_id``, ``issuer``); the link carries no patient data."""
        email = email.strip()
        if not is_email_address(email):
            raise ImageShareError("give the patient's e-mail address")
        if not patient_id.strip():
            raise ImageShareError("the patient's hospital number is required")
        if not self._public_url:
            raise PublicUrlMissing("e-mails with links cannot be sent until an administrator "
                                   "sets IMAGESHARE_PUBLIC_URL; nothing was sent")
        secret = self._users.invite(email, actor.name, role="patient")
        with self._engine.begin() as conn:
            conn.execute(insert(patient_accounts).values(
                email=email[:254], patient_id=patient_id.strip()[:64], issuer=issuer[:64],
                invited_by=actor.name, created_at=datetime.now(UTC)))
            self._audit.record(AuditEvent(actor=actor, action="patient.invite",
                                          outcome="success", patient_id=patient_id,
                                          detail={"role": "patient"}), conn=conn)
        self._mailer.send(
            email, "Your images at the hospital",
            "The hospital invites you to make an account to see and download your own images "
            "and to share them with a doctor of your choice.\n\n"
            f"Make it here (the link works once, for 14 days): {self._public_url}/invite/"
            f"{secret}\n\nThis message contains no patient information.\n")

    def records(self, actor: Actor) -> list[tuple[str, str]]:
        """The (patient ID, issuer) records a patient account belongs to; an invitation for
        the account's e-mail address is bound to the account on first use."""
        if actor.kind != "user" or actor.role != "patient":
            return []
        with self._engine.connect() as conn:
            rows = conn.execute(select(patient_accounts.c.patient_id, patient_accounts.c.issuer)
                                .where(patient_accounts.c.username == actor.name)).all()
        if rows:
            return [(r.patient_id, r.issuer) for r in rows]
        email = self._users.email_of(actor.name)
        if not email:
            return []
        with self._engine.begin() as conn:
            bound = conn.execute(update(patient_accounts).where(
                patient_accounts.c.email == email, patient_accounts.c.username == "")
                .values(username=actor.name)).rowcount
            if bound:
                self._audit.record(AuditEvent(actor=actor, action="patient.bind",
                                              outcome="success"), conn=conn)
            rows = conn.execute(select(patient_accounts.c.patient_id, patient_accounts.c.issuer)
                                .where(patient_accounts.c.username == actor.name)).all()
        return [(r.patient_id, r.issuer) for r in rows]

    def grants_for(self, actor: Actor) -> tuple[Grant, ...]:
        """Every accepted study of the patient's record, to view and download."""
        records = self.records(actor)
        if not records:
            return ()
        uids: set[str] = set()
        with self._engine.connect() as conn:
            for patient_id, issuer in records:
                uids.update(conn.execute(
                    select(studies.c.study_uid).join(patients,
                                                     patients.c.pk == studies.c.patient_pk)
                    .where(patients.c.patient_id == patient_id, patients.c.issuer == issuer,
                           study_in_record())).scalars())
        return tuple(Grant(uid, rights=frozenset({VIEW, DOWNLOAD})) for uid in sorted(uids))

    def invited(self, limit: int = 200) -> list[dict[str, object]]:
        """Patient accounts invited, newest first (for staff)."""
        with self._engine.connect() as conn:
            return [dict(r) for r in conn.execute(select(patient_accounts).order_by(
                patient_accounts.c.pk.desc()).limit(limit)).mappings()]
