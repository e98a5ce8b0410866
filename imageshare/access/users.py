"""User accounts (argon2id password hashes, optional TOTP second factor) and personal API
tokens (stored as hashes)."""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Engine, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError

from imageshare.access.lockout import Lockout
from imageshare.access.policy import ENROLLING, ROLES, effective_role
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import SYSTEM, Actor
from imageshare.domain.errors import ImageShareError, NotFound
from imageshare.domain.identifiers import is_email_address
from imageshare.storage.index.database import run_read
from imageshare.storage.index.schema import account_invites, api_tokens, users
from imageshare.storage.secret_box import SecretBox

_hasher = PasswordHasher()
_CACHE_SECONDS = 300.0
# How precisely an API token's last use is recorded (one write a minute, not one a request).
TOKEN_USE_RESOLUTION = timedelta(seconds=60)
log = logging.getLogger(__name__)
TOTP_ISSUER = "ImageShare"


@dataclass(frozen=True)
class Account:
    """A user account as administrators see it (no secrets)."""

    username: str
    role: str
    disabled: bool
    locked: bool
    two_factor: bool
    created_at: datetime
    tokens: int
    email: str = ""


def _check_password(password: str) -> None:
    if len(password) < 8:
        raise ImageShareError("a password needs at least 8 characters")


class UserDirectory:
    """Creates users, checks passwords and API tokens, and turns them into Actors."""

    def __init__(self, engine: Engine, secrets_box: SecretBox,
                 audit: AuditTrail | None = None) -> None:
        self._engine = engine
        self._audit = audit
        self.lockout = Lockout(engine)
        self._box = secrets_box
        # Recent password checks (time, actor, stored hash); a hit still asks the index that
        # the hash and role are unchanged, so a change made on another instance counts at once.
        self._verified: dict[tuple[str, bytes], tuple[float, Actor, str]] = {}
        self._lock = threading.Lock()

    def add(self, username: str, password: str, role: str, email: str = "") -> None:
        """Create a user; raises ImageShareError for an unknown role or a taken name."""
        if role not in ROLES:
            raise ImageShareError(f"unknown role {role!r}; roles: {', '.join(sorted(ROLES))}")
        if not username or len(username) > 128 or username != username.strip():
            raise ImageShareError("a username has 1 to 128 characters, no surrounding spaces")
        _check_password(password)
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    insert(users).values(
                        username=username, password_hash=_hasher.hash(password), role=role,
                        disabled=False, created_at=datetime.now(UTC), email=email.strip()[:254],
                    )
                )
        except IntegrityError as exc:
            raise ImageShareError(f"user {username!r} exists already") from exc

    def ensure_admin(self, password: str) -> str | None:
        """Create ``admin`` if there are no users; returns a generated password, if any."""
        with self._engine.connect() as conn:
            if conn.execute(select(users.c.pk).limit(1)).first() is not None:
                return None
        generated = None
        if not password:
            generated = password = secrets.token_urlsafe(15)
        self.add("admin", password, "admin")
        return generated

    def authenticate(
        self, username: str, password: str, source: str = "", code: str | None = None
    ) -> Actor | None:
        """The user's Actor when the password is right and the account enabled, else None.

        An account with two-factor sign-in also needs its current TOTP ``code``; without one
        (HTTP Basic) it is refused: such accounts use API tokens for programs. Every failure
        counts towards the lockout and gives the same answer.
        """
        verified = self._verify(username, password, source, code, defer_code=False)
        return verified[0] if verified else None

    def sign_in(self, username: str, password: str, source: str = "") -> tuple[Actor, str] | None:
        """Check a browser sign-in's password: (Actor, stage) or None (same for every failure).

        The stage is ``full``; ``code`` when the account's TOTP code must follow
        (:meth:`check_code`); ``enrol`` when an administrator has yet to set up two-factor
        sign-in, which is required for administrators.
        """
        verified = self._verify(username, password, source, None, defer_code=True)
        if verified is None:
            return None
        actor, has_code = verified
        if has_code:
            return actor, "code"
        return actor, "enrol" if actor.role == ENROLLING else "full"

    def check_code(self, username: str, code: str, source: str = "") -> bool:
        """True when ``code`` is the user's current TOTP code; a wrong one counts as a failed
        sign-in from ``source``."""
        with self._engine.connect() as conn:
            row = conn.execute(select(users.c.pk, users.c.totp_secret, users.c.disabled)
                               .where(users.c.username == username)).first()
        if row is None or row.disabled or self.lockout.locked(row.pk, source):
            return False
        if not self._accept_code(row.pk, row.totp_secret, code):
            self.lockout.failed(row.pk, source)
            return False
        self.lockout.cleared(row.pk, source)
        return True

    def _verify(self, username: str, password: str, source: str, code: str | None,
                defer_code: bool) -> tuple[Actor, bool] | None:
        """(Actor, whether a TOTP code is still due) when the credentials are right."""
        cache_key = (username, hashlib.sha256(password.encode()).digest())
        now = time.monotonic()
        with self._lock:
            hit = self._verified.get(cache_key)
        if (code is None and hit and now - hit[0] < _CACHE_SECONDS
                and self._still_allowed(username, source, hit[2], hit[1].role)):
            return Actor("user", hit[1].name, hit[1].role, source), False
        with self._engine.connect() as conn:
            row = conn.execute(
                select(users.c.pk, users.c.password_hash, users.c.role, users.c.disabled,
                       users.c.totp_enabled, users.c.totp_secret)
                .where(users.c.username == username)
            ).first()
        if row is None:
            _hasher.hash(password)  # same cost for unknown users
            return None
        locked = self.lockout.locked(row.pk, source)
        try:
            _hasher.verify(row.password_hash, password)
        except (VerificationError, InvalidHashError):
            self.lockout.failed(row.pk, source)
            return None
        if row.disabled or locked:
            return None  # the same answer as a wrong password
        actor = Actor("user", username, effective_role(row.role, row.totp_enabled), source)
        if row.totp_enabled:
            if defer_code:
                return actor, True
            if code is None or not self._accept_code(row.pk, row.totp_secret, code):
                self.lockout.failed(row.pk, source)
                return None
        self.lockout.cleared(row.pk, source)
        if not row.totp_enabled:
            with self._lock:
                self._verified[cache_key] = (now, actor, row.password_hash)
        return actor, False

    def _accept_code(self, user_pk: int, secret: str | None, code: str) -> bool:
        """True for the current (or adjacent) TOTP code, used at most once."""
        code = code.strip().replace(" ", "")
        if not secret or not code.isdigit():
            return False
        totp = pyotp.TOTP(self._box.open(secret))
        step_now = int(time.time()) // totp.interval
        for step in (step_now, step_now - 1, step_now + 1):
            if totp.generate_otp(step) == code:
                with self._engine.begin() as conn:
                    used = conn.execute(
                        update(users).where(users.c.pk == user_pk)
                        .where((users.c.totp_last_step.is_(None))
                               | (users.c.totp_last_step < step))
                        .values(totp_last_step=step)
                    ).rowcount
                return used == 1
        return False

    def _still_allowed(self, username: str, source: str, password_hash: str, role: str) -> bool:
        """Not disabled, locked (from ``source``), given a second factor, a new password or
        another role since the password was last checked (cheap, no argon2)."""
        with self._engine.connect() as conn:
            row = conn.execute(select(users.c.pk, users.c.disabled, users.c.totp_enabled,
                                      users.c.password_hash, users.c.role)
                               .where(users.c.username == username)).first()
        if (row is None or row.disabled or row.totp_enabled
                or row.password_hash != password_hash
                or effective_role(row.role, row.totp_enabled) != role):
            return False
        return not self.lockout.locked(row.pk, source)

    def invite(self, email: str, invited_by: str, role: str = "reviewer",
               days: int = 14, share_pk: int | None = None) -> str:
        """A one-time invitation for ``email`` to create an account with ``role``; returns
        its secret (only the hash is kept). ``share_pk`` binds it to the identifiable share
        that the new account is to receive."""
        if role not in ("reviewer", "patient"):
            raise ImageShareError("only reviewers and patients are invited by link")
        secret = secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            conn.execute(insert(account_invites).values(
                token_hash=secret_hash(secret), email=email.strip()[:254], role=role,
                invited_by=invited_by, created_at=now, expires_at=now + timedelta(days=days),
                share_pk=share_pk))
        return secret

    def invitation(self, secret: str) -> tuple[str, str] | None:
        """(e-mail, role) of a live invitation, else None."""
        with self._engine.connect() as conn:
            row = conn.execute(select(account_invites).where(
                account_invites.c.token_hash == secret_hash(secret))).mappings().first()
        if (row is None or row["used_at"] is not None
                or as_utc(row["expires_at"]) <= datetime.now(UTC)):
            return None
        return row["email"], row["role"]

    def accept_invitation(self, secret: str, username: str, password: str) -> str:
        """Create the invited account (once: the invitation is used up first, so two
        acceptances cannot both make one); returns its role."""
        found = self.invitation(secret)
        if found is None:
            raise ImageShareError("this invitation has expired or was used already")
        email, role = found
        _check_password(password)
        with self._engine.begin() as conn:
            taken = conn.execute(update(account_invites).where(
                account_invites.c.token_hash == secret_hash(secret),
                account_invites.c.used_at.is_(None)).values(used_at=datetime.now(UTC))
            ).rowcount
        if not taken:
            raise ImageShareError("this invitation has expired or was used already")
        try:
            self.add(username.strip(), password, role, email)
        except ImageShareError:
            with self._engine.begin() as conn:  # a taken name: the invitation stays usable
                conn.execute(update(account_invites).where(
                    account_invites.c.token_hash == secret_hash(secret)).values(used_at=None))
            raise
        return role

    def set_email(self, username: str, email: str) -> None:
        """Set (or, with "", clear) the address the user's notifications go to; raises
        ImageShareError for an address that is not valid, NotFound for no such user."""
        email = email.strip()
        if email and (len(email) > 254 or not is_email_address(email)):
            raise ImageShareError("that e-mail address is not valid")
        with self._engine.begin() as conn:
            changed = conn.execute(update(users).where(users.c.username == username)
                                   .values(email=email)).rowcount
        if not changed:
            raise NotFound("no such user")

    def email_of(self, username: str) -> str:
        """The user's e-mail address ("" when none is known)."""
        with self._engine.connect() as conn:
            return conn.execute(select(users.c.email).where(users.c.username == username)
                                ).scalar() or ""

    def forget_cached(self, username: str) -> None:
        """Drop remembered password checks of ``username`` (after a change to the account)."""
        with self._lock:
            for key in [k for k in self._verified if k[0] == username]:
                del self._verified[key]

    # -- administration ------------------------------------------------------------------

    def accounts(self) -> list[Account]:
        """Every account, by name."""
        now = datetime.now(UTC)
        tokens = (select(func.count(api_tokens.c.pk))
                  .where(api_tokens.c.user_pk == users.c.pk)
                  .where(api_tokens.c.revoked_at.is_(None)).scalar_subquery())
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(users.c.pk, users.c.username, users.c.role, users.c.disabled,
                       users.c.locked_until, users.c.totp_enabled, users.c.created_at,
                       users.c.email, tokens.label("tokens"))
                .order_by(users.c.username)
            ).all()
        locked = self.lockout.locked_accounts()
        return [
            Account(r.username, r.role, r.disabled,
                    r.pk in locked or (r.locked_until is not None
                                       and as_utc(r.locked_until) > now),
                    r.totp_enabled, as_utc(r.created_at), r.tokens, r.email or "")
            for r in rows
        ]

    def account(self, username: str) -> Account:
        """One account; raises NotFound."""
        for account in self.accounts():
            if account.username == username:
                return account
        raise NotFound(f"no user {username!r}")

    def _change(self, username: str, **values: object) -> None:
        with self._engine.begin() as conn:
            changed = conn.execute(
                update(users).where(users.c.username == username).values(**values)
            ).rowcount
        if not changed:
            raise NotFound(f"no user {username!r}")
        self.forget_cached(username)

    def set_disabled(self, username: str, disabled: bool) -> None:
        """Disable (sessions and tokens stop working at once) or enable an account."""
        self._change(username, disabled=disabled)

    def set_role(self, username: str, role: str) -> None:
        """Give ``username`` another role."""
        if role not in ROLES:
            raise ImageShareError(f"unknown role {role!r}")
        self._change(username, role=role)

    def set_password(self, username: str, password: str, *, reset_two_factor: bool = False
                     ) -> None:
        """Set a new password and lift a lockout; optionally remove the second factor (lost
        phone), which the user must then set up again."""
        _check_password(password)
        values: dict[str, object] = {
            "password_hash": _hasher.hash(password), "failed_logins": 0, "locked_until": None,
        }
        if reset_two_factor:
            values.update(totp_enabled=False, totp_secret=None, totp_last_step=None)
        self._change(username, **values)
        with self._engine.connect() as conn:
            user_pk = conn.execute(select(users.c.pk).where(users.c.username == username)
                                   ).scalar()
        if user_pk is not None:
            self.lockout.clear_all(user_pk)

    def change_own_password(self, username: str, current: str, new: str) -> None:
        """The user's own password change; the current password must be right."""
        with self._engine.connect() as conn:
            stored = conn.execute(select(users.c.password_hash)
                                  .where(users.c.username == username)).scalar()
        try:
            _hasher.verify(stored or "", current)
        except (VerificationError, InvalidHashError) as exc:
            raise ImageShareError("the current password is wrong") from exc
        self.set_password(username, new)

    # -- two-factor sign-in ---------------------------------------------------------------

    def seal_stored_secrets(self) -> int:
        """Encrypt TOTP secrets still stored in plaintext (written by an older version);
        returns how many were sealed."""
        sealed = 0
        with self._engine.begin() as conn:
            rows = conn.execute(select(users.c.pk, users.c.totp_secret)
                                .where(users.c.totp_secret.is_not(None))).all()
            for row in rows:
                if row.totp_secret and not SecretBox.is_sealed(row.totp_secret):
                    conn.execute(update(users).where(users.c.pk == row.pk)
                                 .values(totp_secret=self._box.seal(row.totp_secret)))
                    sealed += 1
        return sealed

    def two_factor_enabled(self, username: str) -> bool:
        """True when ``username`` signs in with a TOTP code."""
        with self._engine.connect() as conn:
            return bool(conn.execute(select(users.c.totp_enabled)
                                     .where(users.c.username == username)).scalar())

    def begin_two_factor(self, username: str) -> str:
        """A new TOTP secret for ``username`` (not yet in force); returns its otpauth:// URI
        for an authenticator app."""
        if self.two_factor_enabled(username):
            raise ImageShareError("two-factor sign-in is already set up")
        secret = pyotp.random_base32()
        self._change(username, totp_secret=self._box.seal(secret))  # encrypted at rest
        return pyotp.TOTP(secret).provisioning_uri(name=username, issuer_name=TOTP_ISSUER)

    def confirm_two_factor(self, username: str, code: str) -> None:
        """Put the pending TOTP secret in force once the user proves it with a code."""
        with self._engine.connect() as conn:
            row = conn.execute(select(users.c.pk, users.c.totp_secret)
                               .where(users.c.username == username)).first()
        if row is None or not row.totp_secret:
            raise ImageShareError("start setting up two-factor sign-in first")
        if not self._accept_code(row.pk, row.totp_secret, code):
            raise ImageShareError("that code is not right; check the phone's clock and retry")
        self._change(username, totp_enabled=True)

    # -- API tokens -----------------------------------------------------------------------

    def tokens(self, username: str) -> list[dict[str, object]]:
        """The user's tokens (names and times, never secrets), newest first."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(api_tokens.c.pk, api_tokens.c.name, api_tokens.c.created_at,
                       api_tokens.c.last_used_at, api_tokens.c.revoked_at, api_tokens.c.origin)
                .join(users, users.c.pk == api_tokens.c.user_pk)
                .where(users.c.username == username).order_by(api_tokens.c.pk.desc())
            ).all()
        return [dict(r._mapping) for r in rows]

    def revoke_token(self, username: str, token_pk: int, actor: Actor = SYSTEM) -> None:
        """Revoke one of the user's own tokens for good (``actor``'s ``token.revoke``,
        audited)."""
        with self._engine.begin() as conn:
            user_pk = conn.execute(select(users.c.pk).where(users.c.username == username)
                                   ).scalar()
            changed = conn.execute(
                update(api_tokens).where(api_tokens.c.pk == token_pk)
                .where(api_tokens.c.user_pk == user_pk).where(api_tokens.c.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC))
            ).rowcount
            if changed and self._audit is not None:
                self._audit.record(AuditEvent(actor=actor, action="token.revoke",
                                              outcome="success", detail={"token": token_pk}),
                                   conn)
        if not changed:
            raise NotFound("no such token")

    def create_token(self, username: str, name: str, origin: str = "web",
                     actor: Actor = SYSTEM) -> str:
        """A new API token for ``username``; only its hash is kept, so show it once
        (``actor``'s ``token.create``, audited).

        ``origin`` is ``cli`` for tokens made on the server's command line (they work for an
        administrator who has no second factor yet: machines), else ``web``."""
        secret = "is_" + secrets.token_urlsafe(32)
        with self._engine.begin() as conn:
            user_pk = conn.execute(select(users.c.pk).where(users.c.username == username)).scalar()
            if user_pk is None:
                raise ImageShareError(f"no user {username!r}")
            conn.execute(
                insert(api_tokens).values(
                    user_pk=user_pk, name=name[:128], token_hash=secret_hash(secret),
                    created_at=datetime.now(UTC), origin="cli" if origin == "cli" else "web",
                )
            )
            if self._audit is not None:
                self._audit.record(AuditEvent(actor=actor, action="token.create",
                                              outcome="success", detail={"name": name[:128]}),
                                   conn)
        return secret

    def authenticate_token(self, secret: str, source: str = "") -> Actor | None:
        """The Actor owning a valid (not expired, not revoked) token, else None."""
        now = datetime.now(UTC)
        # Looked up in the database on every request (no cache: a revocation or a disabled
        # account counts at once on every instance), as one statement without a transaction
        # around it.
        row = run_read(self._engine, lambda conn: conn.execute(
            _TOKEN_LOOKUP, {"token_hash": secret_hash(secret)}).first())
        if row is None or row.revoked_at is not None or row.disabled:
            return None
        if row.expires_at is not None and as_utc(row.expires_at) <= now:
            return None
        if row.last_used_at is None or now - as_utc(row.last_used_at) > TOKEN_USE_RESOLUTION:
            self._stamp_token_use(row.pk, now)
        return Actor("user", row.username,
                     effective_role(row.role, row.totp_enabled, row.origin == "cli"), source)


    def _stamp_token_use(self, pk: int, now: datetime) -> None:
        # When a token was last used is bookkeeping: a request is not refused because the
        # stamp could not be written (the request's own audit row decides that).
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    update(api_tokens).where(api_tokens.c.pk == pk).values(last_used_at=now)
                )
        except OperationalError as exc:
            log.warning("could not record when an API token was last used (%s)",
                        type(exc).__name__)


_TOKEN_LOOKUP = (
    select(api_tokens.c.pk, api_tokens.c.expires_at, api_tokens.c.revoked_at,
           api_tokens.c.origin, api_tokens.c.last_used_at, users.c.username, users.c.role,
           users.c.disabled, users.c.totp_enabled)
    .join(users, users.c.pk == api_tokens.c.user_pk)
    .where(api_tokens.c.token_hash == bindparam("token_hash"))
)


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; they are UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def secret_hash(secret: str) -> str:
    """What is stored of a token or session secret (high-entropy, so SHA-256 suffices)."""
    return hashlib.sha256(secret.encode()).hexdigest()
