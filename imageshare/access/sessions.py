"""Browser sessions: an opaque cookie (only its hash is stored) and a CSRF token per session.

A session ends when it is revoked (sign-out), after IDLE without use, or after LIFETIME (one
still owing its TOTP code after CODE_STAGE_LIFETIME).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, insert, select, update

from imageshare.access.policy import AWAITING_CODE, ENROLLING, effective_role
from imageshare.access.users import as_utc, secret_hash
from imageshare.domain.actors import Actor
from imageshare.domain.errors import NotAuthenticated
from imageshare.storage.index.schema import sessions, users

IDLE = timedelta(minutes=30)
LIFETIME = timedelta(hours=12)
# A session that gave the password and still owes its TOTP code: a code is at hand within a
# minute, so a half-signed-in browser left open (or a stolen password) gets no hours.
CODE_STAGE_LIFETIME = timedelta(minutes=10)
# A session's last use is written at most this often: every request reads the session, but a
# write (a commit, and the index's write lock) per request would slow every page, frame and
# upload chunk; the idle limit is then kept to within this much.
SEEN_EVERY = timedelta(seconds=30)
COOKIE = "imageshare_session"


@dataclass(frozen=True)
class Session:
    """A signed-in browser: who, and the CSRF token its state-changing requests must carry."""

    actor: Actor
    csrf_token: str


class SessionStore:
    """Creates, finds and ends browser sessions."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def start(self, username: str, source: str, stage: str = "full") -> tuple[str, str]:
        """A new session for ``username``: (cookie secret, CSRF token); show neither twice.

        ``stage`` ``enrol`` is a session that may only set up two-factor sign-in, ``code`` one
        that may only send its TOTP code; :meth:`advance` moves it on.
        """
        secret, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            user_pk = conn.execute(select(users.c.pk).where(users.c.username == username)
                                   ).scalar_one()
            conn.execute(insert(sessions).values(
                token_hash=secret_hash(secret), user_pk=user_pk, csrf_token=csrf,
                source=source[:255], created_at=now, last_seen_at=now, stage=stage,
            ))
        return secret, csrf

    def find(self, secret: str, source: str) -> Session | None:
        """The live session for a cookie secret (its use is noted, at most every
        :data:`SEEN_EVERY`), or None."""
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            row = conn.execute(
                select(sessions.c.pk, sessions.c.csrf_token, sessions.c.created_at,
                       sessions.c.last_seen_at, sessions.c.revoked_at, users.c.username,
                       users.c.role, users.c.disabled, users.c.totp_enabled,
                       users.c.must_change_password, sessions.c.stage)
                .join(users, users.c.pk == sessions.c.user_pk)
                .where(sessions.c.token_hash == secret_hash(secret))
            ).first()
            if row is None or row.revoked_at is not None or row.disabled:
                return None
            age = now - as_utc(row.created_at)
            if (now - as_utc(row.last_seen_at) > IDLE or age > LIFETIME
                    or (row.stage == "code" and age > CODE_STAGE_LIFETIME)):
                return None
            if now - as_utc(row.last_seen_at) >= SEEN_EVERY:
                conn.execute(update(sessions).where(sessions.c.pk == row.pk)
                             .values(last_seen_at=now))
        role = {"enrol": ENROLLING, "code": AWAITING_CODE}.get(
            row.stage, effective_role(row.role, row.totp_enabled,
                                      must_change_password=row.must_change_password))
        return Session(Actor("user", row.username, role, source), row.csrf_token)

    def advance(self, secret: str, stage: str = "full") -> tuple[str, str]:
        """Move a session to ``stage`` (the code was right, two-factor was set up). The
        session gets a new secret and CSRF token, so a secret seen before is worthless."""
        new_secret, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self._engine.begin() as conn:
            changed = conn.execute(
                update(sessions).where(sessions.c.token_hash == secret_hash(secret))
                .where(sessions.c.revoked_at.is_(None))
                .values(stage=stage, token_hash=secret_hash(new_secret), csrf_token=csrf)
            ).rowcount
        if not changed:
            raise NotAuthenticated("the session has ended; sign in again")
        return new_secret, csrf

    def end_all(self, username: str, keep: str = "") -> int:
        """End every session of ``username`` (password change or reset, account disabled)
        except the one whose cookie secret is ``keep``; returns how many ended."""
        with self._engine.begin() as conn:
            user_pk = conn.execute(select(users.c.pk).where(users.c.username == username)
                                   ).scalar()
            stmt = (update(sessions).where(sessions.c.user_pk == user_pk)
                    .where(sessions.c.revoked_at.is_(None)))
            if keep:
                stmt = stmt.where(sessions.c.token_hash != secret_hash(keep))
            return conn.execute(stmt.values(revoked_at=datetime.now(UTC))).rowcount

    def end(self, secret: str) -> None:
        """Sign out: the session can never be used again."""
        with self._engine.begin() as conn:
            conn.execute(update(sessions).where(sessions.c.token_hash == secret_hash(secret))
                         .values(revoked_at=datetime.now(UTC)))
