"""Account lockout after wrong passwords or codes, per account AND source address.

Five failures for one account from one address lock that account for that address for a
while; the account still opens from everywhere else. So nobody can lock an account (an
administrator's included) out by guessing from afar: at most they lock themselves out. The
per-address throttle (:mod:`imageshare.access.throttle`) limits guessing across accounts. An
IPv6 address counts as its /64 network (:func:`~imageshare.access.throttle.address_key`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from imageshare.access.throttle import address_key
from imageshare.storage.index.database import take_write_lock
from imageshare.storage.index.schema import login_failures

MAX_FAILURES = 5
LOCKOUT = timedelta(minutes=15)


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Lockout:
    """Counts failed sign-ins per (account, address) in the index, so that it holds across
    server processes."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def locked(self, user_pk: int, source: str) -> bool:
        """True while ``user_pk`` is locked for sign-ins from ``source``."""
        with self._engine.connect() as conn:
            until = conn.execute(select(login_failures.c.locked_until).where(
                login_failures.c.user_pk == user_pk,
                login_failures.c.source == address_key(source))).scalar()
        return until is not None and _utc(until) > datetime.now(UTC)

    def failed(self, user_pk: int, source: str) -> bool:
        """Count one failure from ``source``; returns True when it locked the account there."""
        now = datetime.now(UTC)
        key = (login_failures.c.user_pk == user_pk,
               login_failures.c.source == address_key(source))
        with self._engine.begin() as conn:
            # Failures counted at once by several processes each count (no lost update).
            take_write_lock(conn)
            row = conn.execute(select(login_failures.c.failures, login_failures.c.locked_until,
                                      login_failures.c.last_failure_at).where(*key)
                               .with_for_update()).first()
            if row is None:
                try:
                    with conn.begin_nested():
                        conn.execute(insert(login_failures).values(
                            user_pk=user_pk, source=address_key(source), failures=1,
                            last_failure_at=now))
                    return False
                except IntegrityError:
                    row = conn.execute(select(login_failures.c.failures,
                                              login_failures.c.locked_until,
                                              login_failures.c.last_failure_at)
                                       .where(*key).with_for_update()).first()
            assert row is not None
            # Failures older than a lockout period are forgotten.
            stale = now - _utc(row.last_failure_at) > LOCKOUT
            failures = 1 if stale else row.failures + 1
            locks = failures >= MAX_FAILURES
            conn.execute(update(login_failures).where(*key).values(
                failures=0 if locks else failures, last_failure_at=now,
                locked_until=now + LOCKOUT if locks else row.locked_until))
        return locks

    def cleared(self, user_pk: int, source: str) -> None:
        """A right password from ``source``: its count starts again."""
        with self._engine.begin() as conn:
            conn.execute(delete(login_failures).where(
                login_failures.c.user_pk == user_pk,
                login_failures.c.source == address_key(source)))

    def clear_all(self, user_pk: int) -> None:
        """Lift every lockout of the account (an administrator reset it)."""
        with self._engine.begin() as conn:
            conn.execute(delete(login_failures).where(login_failures.c.user_pk == user_pk))

    def locked_accounts(self) -> set[int]:
        """Accounts locked from at least one address right now."""
        with self._engine.connect() as conn:
            return set(conn.execute(
                select(login_failures.c.user_pk).where(
                    login_failures.c.locked_until > datetime.now(UTC))
                .group_by(login_failures.c.user_pk).having(func.count() > 0)).scalars())
