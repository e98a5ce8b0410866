"""Patients' own access: staff invite a patient by e-mail to make an account (role
``patient``) bound to their record; the account then reaches that record's accepted studies
(view and download) and nothing else, through the same policy as every other grant.

The record is bound to the account made with the one-time invitation sent for it (stored
with the record, ``invite_pk``; the invitation records the account made with it), never to
an account because of its e-mail address: an address is the user's to change, so changing it
never changes which patient's images an account sees."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Engine, and_, insert, or_, select, update

from imageshare.access.scope import DOWNLOAD, VIEW, Grant
from imageshare.access.users import UserDirectory
from imageshare.archive.record import study_in_record
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError, PublicUrlMissing
from imageshare.domain.identifiers import is_email_address
from imageshare.notify import Mailer
from imageshare.storage.index.schema import (
    account_invites,
    patient_accounts,
    patients,
    studies,
)


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
        with self._engine.begin() as conn:
            invite_pk, secret = self._users.new_invitation(conn, email, actor.name,
                                                           role="patient")
            conn.execute(insert(patient_accounts).values(
                email=email[:254], patient_id=patient_id.strip()[:64], issuer=issuer[:64],
                invited_by=actor.name, created_at=datetime.now(UTC), invite_pk=invite_pk))
            self._audit.record(AuditEvent(actor=actor, action="patient.invite",
                                          outcome="success", patient_id=patient_id,
                                          issuer=issuer, detail={"role": "patient"}),
                               conn=conn)
        self._mailer.send(
            email, "Your images at the hospital",
            "The hospital invites you to make an account to see and download your own images "
            "and to share them with a doctor of your choice.\n\n"
            f"Make it here (the link works once, for 14 days): {self._public_url}/invite/"
            f"{secret}\n\nThis message contains no patient information.\n")

    def records(self, actor: Actor) -> list[tuple[str, str]]:
        """The (patient ID, issuer) records a patient account belongs to: those bound to it,
        and those whose invitation made this account (bound to it on first use, audited).
        The account's e-mail address plays no part."""
        if actor.kind != "user" or actor.role != "patient":
            return []
        made_with = select(account_invites.c.pk).where(
            account_invites.c.accepted_by == actor.name, account_invites.c.role == "patient")
        mine = or_(patient_accounts.c.username == actor.name,
                   and_(patient_accounts.c.username == "",
                        patient_accounts.c.invite_pk.in_(made_with)))
        with self._engine.connect() as conn:
            rows = conn.execute(select(patient_accounts.c.pk, patient_accounts.c.username,
                                       patient_accounts.c.patient_id, patient_accounts.c.issuer)
                                .where(mine)).all()
        unbound = [r for r in rows if r.username != actor.name]
        if unbound:
            with self._engine.begin() as conn:
                for row in unbound:
                    bound = conn.execute(update(patient_accounts).where(
                        patient_accounts.c.pk == row.pk, patient_accounts.c.username == "")
                        .values(username=actor.name)).rowcount
                    if bound:
                        self._audit.record(AuditEvent(
                            actor=actor, action="patient.bind", outcome="success",
                            patient_id=row.patient_id, issuer=row.issuer,
                            detail={"issuer": row.issuer, "record": row.pk}), conn=conn)
                rows = conn.execute(select(patient_accounts.c.pk, patient_accounts.c.username,
                                           patient_accounts.c.patient_id,
                                           patient_accounts.c.issuer)
                                    .where(patient_accounts.c.username == actor.name)).all()
        return sorted({(r.patient_id, r.issuer) for r in rows})

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
