"""Signing in and out, as one service for every way in (the JSON API and the web pages):
password, TOTP code, the per-address throttle, the account lockout and the audit events."""

from __future__ import annotations

from dataclasses import dataclass

from imageshare.access.policy import PERSON_ROLES
from imageshare.access.sessions import SessionStore
from imageshare.access.throttle import SignInThrottle
from imageshare.access.users import UserDirectory
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import Actor
from imageshare.domain.errors import Forbidden, NotAuthenticated, NotFound

WRONG_CREDENTIALS = "wrong username, password or code, or the account is locked"
WRONG_CODE = "that code is not right"
MACHINE_ACCOUNT = (
    "this account is for a program (a service or another hospital's ImageShare), not a "
    "person: it has no web pages and no browser session; programs use an API token or "
    "HTTP Basic with the JSON API, DICOMweb and FHIR. A person signs in with their own "
    "account.")


@dataclass(frozen=True)
class SignedIn:
    """A started session: who, at which stage (``full``, ``code`` or ``enrol``), its secret
    (the cookie) and its CSRF token."""

    actor: Actor
    stage: str
    secret: str
    csrf: str


class SignIn:
    """Starts, advances and ends sessions; every failure answers the same and is counted
    (throttle per address, lockout per account) and audited."""

    def __init__(self, users: UserDirectory, sessions: SessionStore, throttle: SignInThrottle,
                 audit: AuditTrail) -> None:
        self._users = users
        self._sessions = sessions
        self._throttle = throttle
        self._audit = audit

    def start(self, username: str, password: str, source: str,
              code: str | None = None) -> SignedIn:
        """Check the password and start a session. With ``code`` (one request with both) an
        account with two-factor sign-in must give its TOTP code now; without it such an
        account's session starts at the ``code`` stage. Raises TooManyRequests for an
        address over its limit, NotAuthenticated for anything wrong, and Forbidden (audited
        ``session.start`` refused) for a machine's account (``service``, ``site``) with its
        right password: a browser session is a person's."""
        self._throttle.check(source)
        if self._is_machine(username[:128]):
            self._refuse_machine(username, password, source, code)
        result = self._users.sign_in(username[:128], password[:1024], source)
        if result is not None and result[1] == "code" and code is not None:
            result = ((result[0], "full") if self._users.check_code(username[:128], code[:16],
                                                                     source) else None)
        if result is None:
            self._throttle.failed(source)
            self._audit.record(AuditEvent(
                actor=Actor("anonymous", username[:64], source=source, registered=False),
                action="session.start", outcome="failure"))
            raise NotAuthenticated(WRONG_CREDENTIALS)
        actor, stage = result
        secret, csrf = self._sessions.start(actor.name, source, stage)
        self._audit.record(AuditEvent(actor=actor, action="session.start", outcome="success",
                                      detail={"stage": stage}))
        return SignedIn(actor, stage, secret, csrf)

    def _is_machine(self, username: str) -> bool:
        """True when ``username`` is an account of a machine (a role no person is given)."""
        try:
            return self._users.account(username).role not in PERSON_ROLES
        except NotFound:
            return False

    def _refuse_machine(self, username: str, password: str, source: str,
                        code: str | None) -> None:
        """Refuse a machine account a browser session: a wrong password (or a locked or
        disabled account) answers and counts as every failed sign-in; the right one says
        why there is no session, audited as ``session.start`` refused."""
        actor = self._users.authenticate(username[:128], password[:1024], source,
                                         code=code[:16] if code else None)
        if actor is None:
            self._throttle.failed(source)
            self._audit.record(AuditEvent(
                actor=Actor("anonymous", username[:64], source=source, registered=False),
                action="session.start", outcome="failure"))
            raise NotAuthenticated(WRONG_CREDENTIALS)
        self._audit.record(AuditEvent(actor=actor, action="session.start", outcome="refused",
                                      detail={"reason": "machine account"}))
        raise Forbidden(MACHINE_ACCOUNT)

    def confirm_code(self, actor: Actor, secret: str, code: str,
                     source: str) -> tuple[str, str]:
        """Check the second step's TOTP code; the session gets full access under a new
        secret, returned with its CSRF token. Raises NotAuthenticated for a wrong code."""
        self._throttle.check(source)
        if not self._users.check_code(actor.name, code[:16], source):
            self._throttle.failed(source)
            self._audit.record(AuditEvent(actor=actor, action="session.code",
                                          outcome="failure"))
            raise NotAuthenticated(WRONG_CODE)
        new_secret, csrf = self._sessions.advance(secret, "full")
        self._audit.record(AuditEvent(actor=actor, action="session.code", outcome="success"))
        return new_secret, csrf

    def end(self, actor: Actor, secret: str | None) -> None:
        """End the session whose cookie is ``secret`` (if any)."""
        if secret:
            self._sessions.end(secret)
        self._audit.record(AuditEvent(actor=actor, action="session.end", outcome="success"))
