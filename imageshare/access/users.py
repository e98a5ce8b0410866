"""User accounts (argon2id password hashes) and personal API tokens (stored as hashes)."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from datetime import UTC, datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from imageshare.access.policy import ROLES
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError
from imageshare.storage.index.schema import api_tokens, users

_hasher = PasswordHasher()
_CACHE_SECONDS = 300.0
MAX_FAILED_LOGINS = 5
LOCKOUT = timedelta(minutes=15)


class UserDirectory:
    """Creates users, checks passwords and API tokens, and turns them into Actors."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._verified: dict[tuple[str, bytes], tuple[float, Actor]] = {}
        self._lock = threading.Lock()

    def add(self, username: str, password: str, role: str) -> None:
        """Create a user; raises ImageShareError for an unknown role or a taken name."""
        if role not in ROLES:
            raise ImageShareError(f"unknown role {role!r}; roles: {', '.join(sorted(ROLES))}")
        if not username or len(username) > 128:
            raise ImageShareError("a username has 1 to 128 characters")
        if len(password) < 8:
            raise ImageShareError("a password needs at least 8 characters")
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    insert(users).values(
                        username=username, password_hash=_hasher.hash(password), role=role,
                        disabled=False, created_at=datetime.now(UTC),
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

    def authenticate(self, username: str, password: str, source: str = "") -> Actor | None:
        """The user's Actor when the password is right and the account enabled, else None."""
        cache_key = (username, hashlib.sha256(password.encode()).digest())
        now = time.monotonic()
        with self._lock:
            hit = self._verified.get(cache_key)
        if hit and now - hit[0] < _CACHE_SECONDS and self._still_allowed(username):
            return Actor("user", hit[1].name, hit[1].role, source)
        with self._engine.connect() as conn:
            row = conn.execute(
                select(users.c.pk, users.c.password_hash, users.c.role, users.c.disabled,
                       users.c.locked_until).where(users.c.username == username)
            ).first()
        if row is None:
            _hasher.hash(password)  # same cost for unknown users
            return None
        wall = datetime.now(UTC)
        locked = row.locked_until is not None and as_utc(row.locked_until) > wall
        try:
            _hasher.verify(row.password_hash, password)
        except (VerificationError, InvalidHashError):
            self._failed_login(row.pk, wall)
            return None
        if row.disabled or locked:
            return None  # the same answer as a wrong password
        with self._engine.begin() as conn:
            conn.execute(update(users).where(users.c.pk == row.pk)
                         .values(failed_logins=0, locked_until=None))
        actor = Actor("user", username, row.role, source)
        with self._lock:
            self._verified[cache_key] = (now, actor)
        return actor

    def _still_allowed(self, username: str) -> bool:
        """Not disabled or locked since the password was last checked (cheap, no argon2)."""
        with self._engine.connect() as conn:
            row = conn.execute(select(users.c.disabled, users.c.locked_until)
                               .where(users.c.username == username)).first()
        if row is None or row.disabled:
            return False
        return row.locked_until is None or as_utc(row.locked_until) <= datetime.now(UTC)

    def _failed_login(self, user_pk: int, now: datetime) -> None:
        """Count a wrong password; after MAX_FAILED_LOGINS the account locks for a while."""
        with self._engine.begin() as conn:
            failed = conn.execute(
                update(users).where(users.c.pk == user_pk)
                .values(failed_logins=users.c.failed_logins + 1)
                .returning(users.c.failed_logins)
            ).scalar_one()
            if failed >= MAX_FAILED_LOGINS:
                conn.execute(update(users).where(users.c.pk == user_pk).values(
                    failed_logins=0, locked_until=now + LOCKOUT))

    def create_token(self, username: str, name: str) -> str:
        """A new API token for ``username``; only its hash is kept, so show it once."""
        secret = "is_" + secrets.token_urlsafe(32)
        with self._engine.begin() as conn:
            user_pk = conn.execute(select(users.c.pk).where(users.c.username == username)).scalar()
            if user_pk is None:
                raise ImageShareError(f"no user {username!r}")
            conn.execute(
                insert(api_tokens).values(
                    user_pk=user_pk, name=name[:128], token_hash=secret_hash(secret),
                    created_at=datetime.now(UTC),
                )
            )
        return secret

    def authenticate_token(self, secret: str, source: str = "") -> Actor | None:
        """The Actor owning a valid (not expired, not revoked) token, else None."""
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            row = conn.execute(
                select(
                    api_tokens.c.pk, api_tokens.c.expires_at, api_tokens.c.revoked_at,
                    users.c.username, users.c.role, users.c.disabled,
                )
                .join(users, users.c.pk == api_tokens.c.user_pk)
                .where(api_tokens.c.token_hash == secret_hash(secret))
            ).first()
            if row is None or row.revoked_at is not None or row.disabled:
                return None
            if row.expires_at is not None and as_utc(row.expires_at) <= now:
                return None
            conn.execute(
                update(api_tokens).where(api_tokens.c.pk == row.pk).values(last_used_at=now)
            )
        return Actor("user", row.username, row.role, source)


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; they are UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def secret_hash(secret: str) -> str:
    """What is stored of a token or session secret (high-entropy, so SHA-256 suffices)."""
    return hashlib.sha256(secret.encode()).hexdigest()
