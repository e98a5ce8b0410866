"""Launching ImageShare from an electronic health record (IHE Invoke Image Display).

An EHR is registered once (``imageshare ehr add NAME``), which makes a shared secret kept
sealed in the index. The EHR then opens ``/iid?...`` with the IID parameters plus ``ehr``
(its name), ``user`` (the ImageShare account the clinician has), ``expires`` (Unix seconds),
``nonce`` (random, 16-128 characters) and ``signature``: the lower-case hex HMAC-SHA256, with
the shared secret, of :func:`canonical_launch` of every other parameter. A signed URL opens
once, before it expires, and never later than ``iid_launch_max_seconds`` (plus
:data:`CLOCK_SKEW_SECONDS` for an EHR whose clock runs ahead) from now; it opens a person's
account, never an administrator's (second factor) or a machine's (a service or site account:
what it then sees would be nobody's in the audit trail); the patient's details alone never
open anything.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

from sqlalchemy import Engine, delete, insert, select
from sqlalchemy.exc import IntegrityError

from imageshare.access.policy import (
    CHANGING_PASSWORD,
    PERSON_ROLES,
    SECOND_FACTOR_ROLES,
    effective_role,
)
from imageshare.access.users import UserDirectory
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import Actor, cli_actor
from imageshare.domain.errors import ImageShareError, NotFound
from imageshare.storage.index.schema import ehr_systems, launch_nonces, users
from imageshare.storage.secret_box import SecretBox

SIGNED_PARAMETERS = ("ehr", "user", "expires", "nonce")
SIGNATURE = "signature"
# How far ahead of ours an EHR's clock may run: a link it signs for the longest validity is
# still taken (the nonce is kept until the link expires, so it still opens only once).
CLOCK_SKEW_SECONDS = 60
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class LaunchRefused(ImageShareError):
    """A signed launch URL that does not open ImageShare: why, in words fit for the user."""

    http_status = 403
    title = "Launch refused"

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # a short code for the audit trail


@dataclass(frozen=True)
class EhrSystem:
    """A registered EHR (no secret)."""

    name: str
    created_at: datetime


def canonical_launch(params: Sequence[tuple[str, str]]) -> bytes:
    """The bytes an EHR signs: every parameter but ``signature``, as ``name=value`` with both
    percent-encoded (RFC 3986, UTF-8, nothing left unencoded but ``A-Z a-z 0-9 - . _ ~``),
    sorted by name and then value, joined with ``&``."""
    pairs = sorted((quote(k, safe=""), quote(v, safe="")) for k, v in params if k != SIGNATURE)
    return "&".join(f"{k}={v}" for k, v in pairs).encode()


def sign_launch(params: Sequence[tuple[str, str]], secret: str) -> str:
    """The ``signature`` of a launch URL's parameters (what an EHR computes)."""
    return hmac.new(secret.encode(), canonical_launch(params), hashlib.sha256).hexdigest()


class EhrLaunches:
    """Registered EHRs and the check of their signed launch URLs."""

    def __init__(self, engine: Engine, box: SecretBox, users: UserDirectory,
                 audit: AuditTrail, max_seconds: int) -> None:
        self._engine = engine
        self._box = box
        self._users = users
        self._audit = audit
        self.max_seconds = max_seconds

    # -- administration ----------------------------------------------------------------------

    def add(self, name: str, actor: Actor | None = None) -> str:
        """Register an EHR; returns its new shared secret (shown once, stored sealed)."""
        if not name or len(name) > 64 or not set(name) <= _NAME_CHARS:
            raise ImageShareError("an EHR name is 1-64 letters, digits, '-', '_' or '.'")
        secret = secrets.token_urlsafe(32)
        try:
            with self._engine.begin() as conn:
                conn.execute(insert(ehr_systems).values(
                    name=name, secret=self._box.seal(secret), created_at=datetime.now(UTC)))
        except IntegrityError as exc:
            raise ImageShareError(f"an EHR named {name!r} is already registered") from exc
        self._audit.record(AuditEvent(actor=actor or cli_actor(), action="ehr.add",
                                      outcome="success", detail={"ehr": name}))
        return secret

    def remove(self, name: str, actor: Actor | None = None) -> None:
        """Forget an EHR: its launch URLs stop working at once. NotFound if unknown."""
        with self._engine.begin() as conn:
            gone = conn.execute(delete(ehr_systems).where(ehr_systems.c.name == name)).rowcount
        if not gone:
            raise NotFound(f"no EHR named {name!r}")
        self._audit.record(AuditEvent(actor=actor or cli_actor(), action="ehr.remove",
                                      outcome="success", detail={"ehr": name}))

    def systems(self) -> list[EhrSystem]:
        """Every registered EHR, by name."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(ehr_systems.c.name, ehr_systems.c.created_at)
                                .order_by(ehr_systems.c.name)).all()
        return [EhrSystem(r.name, r.created_at) for r in rows]

    # -- launches --------------------------------------------------------------------------

    def verify(self, params: Sequence[tuple[str, str]], source: str) -> Actor:
        """The user a signed launch URL opens ImageShare for; raises LaunchRefused (audited
        as ``ehr.launch`` refused, with the EHR's name and the reason) otherwise. The nonce is
        spent by a successful check."""
        values = dict(params)
        ehr = values.get("ehr", "")[:64]
        try:
            return self._verify(params, values, ehr, source)
        except LaunchRefused as exc:
            self._audit.record(AuditEvent(
                actor=Actor("anonymous", f"ehr:{ehr}" if ehr else "anonymous", source=source,
                            registered=False),
                action="ehr.launch", outcome="refused",
                detail={"ehr": ehr, "reason": exc.reason,
                        "request_type": values.get("requestType", "")[:16]}))
            raise

    def _verify(self, params: Sequence[tuple[str, str]], values: dict[str, str], ehr: str,
                source: str) -> Actor:
        names = [k for k, _ in params]
        if any(names.count(k) != 1 for k in (*SIGNED_PARAMETERS, SIGNATURE)):
            raise LaunchRefused("The launch link is incomplete: it needs ehr, user, expires, "
                                "nonce and signature once each.", "incomplete")
        with self._engine.connect() as conn:
            sealed = conn.execute(select(ehr_systems.c.secret)
                                  .where(ehr_systems.c.name == ehr)).scalar()
        # An unknown EHR and a wrong signature read the same (the audit trail tells them
        # apart): a stranger cannot learn which systems are registered by trying names.
        unsigned = ("The launch link's signature is not right: the link was changed or signed "
                    "with another key.")
        if sealed is None:
            raise LaunchRefused(unsigned, "unknown-ehr")
        expected = sign_launch(params, self._box.open(sealed))
        if not hmac.compare_digest(expected.encode(), values[SIGNATURE].lower().encode()):
            raise LaunchRefused(unsigned, "bad-signature")
        now = datetime.now(UTC)
        try:
            expires = datetime.fromtimestamp(int(values["expires"]), UTC)
        except (ValueError, OverflowError, OSError) as exc:
            raise LaunchRefused("The launch link's expiry is not a time.",
                                "bad-expiry") from exc
        if expires <= now:
            raise LaunchRefused("The launch link has expired: open the images again from the "
                                "record.", "expired")
        if expires > now + timedelta(seconds=self.max_seconds + CLOCK_SKEW_SECONDS):
            raise LaunchRefused(f"The launch link is valid for longer than "
                                f"{self.max_seconds} seconds.", "too-long")
        nonce = values["nonce"]
        if not 16 <= len(nonce) <= 128:
            raise LaunchRefused("The launch link's nonce must be 16-128 characters.",
                                "bad-nonce")
        actor = self._user(values["user"][:128], source)
        try:
            with self._engine.begin() as conn:
                conn.execute(delete(launch_nonces).where(launch_nonces.c.expires_at < now))
                conn.execute(insert(launch_nonces).values(ehr=ehr, nonce=nonce,
                                                          expires_at=expires))
        except IntegrityError as exc:
            raise LaunchRefused("This launch link was used already: each link opens once. "
                                "Open the images again from the record.", "replayed") from exc
        return actor

    def _user(self, username: str, source: str) -> Actor:
        try:
            account = self._users.account(username)
        except NotFound:
            account = None
        if account is None or account.disabled or account.locked:
            raise LaunchRefused("The launch link names no usable ImageShare account.",
                                "unknown-user")
        if account.role in SECOND_FACTOR_ROLES:
            raise LaunchRefused("Administrators sign in with their second factor; a launch "
                                "link cannot open an administrator's account.", "admin")
        if account.role not in PERSON_ROLES:
            raise LaunchRefused("A launch link opens a person's account, not a machine's.",
                                "machine")
        with self._engine.connect() as conn:
            row = conn.execute(select(users.c.role, users.c.totp_enabled,
                                      users.c.must_change_password)
                               .where(users.c.username == account.username)).first()
        if row is None:
            raise LaunchRefused("The launch link names no usable ImageShare account.",
                                "unknown-user")
        # What the account may do now is decided once, for every channel (a temporary
        # password to change first, a second factor to set up first): a launch link opens
        # only an account that effective_role gives its whole role.
        role = effective_role(row.role, bool(row.totp_enabled),
                              must_change_password=bool(row.must_change_password))
        if role == CHANGING_PASSWORD:
            raise LaunchRefused("This account must first choose its own password: sign in to "
                                "ImageShare once with the password you were given, then open "
                                "the images again from the record.", "password-change")
        if role != row.role:
            raise LaunchRefused("This account must first set up its second factor: sign in to "
                                "ImageShare once and follow the steps, then open the images "
                                "again from the record.", "second-factor")
        return Actor("user", account.username, role, source)
