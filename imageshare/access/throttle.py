"""Rate limiting of failed sign-ins per source address (on top of the per-account lockout)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, delete, func, insert, select

from imageshare.domain.errors import TooManyRequests
from imageshare.storage.index.schema import sign_in_failures


class SignInThrottle:
    """Refuses sign-ins from an address after ``limit`` failures within ``window`` seconds.

    The failures are counted in the index, so every instance of one service counts the same
    ones (a guesser spreading attempts over the instances behind a load balancer is held as
    if there were one).
    """

    def __init__(self, engine: Engine, limit: int = 20, window: float = 600.0) -> None:
        self._engine = engine
        self._limit = limit
        self._window = timedelta(seconds=window)

    def check(self, source: str) -> None:
        """Raise TooManyRequests while ``source`` is over its limit."""
        since = datetime.now(UTC) - self._window
        with self._engine.connect() as conn:
            count = conn.execute(select(func.count()).select_from(sign_in_failures).where(
                sign_in_failures.c.source == source[:255],
                sign_in_failures.c.failed_at > since)).scalar_one()
        if count >= self._limit:
            raise TooManyRequests("too many failed sign-ins from this address; wait a few "
                                  "minutes and try again")

    def failed(self, source: str) -> None:
        """Count a failed sign-in from ``source`` (and forget its failures past the window)."""
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            conn.execute(delete(sign_in_failures).where(
                sign_in_failures.c.source == source[:255],
                sign_in_failures.c.failed_at <= now - self._window))
            conn.execute(insert(sign_in_failures).values(source=source[:255], failed_at=now))

    def forget_old(self) -> int:
        """Remove every failure past the window (all addresses); returns how many."""
        with self._engine.begin() as conn:
            return conn.execute(delete(sign_in_failures).where(
                sign_in_failures.c.failed_at <= datetime.now(UTC) - self._window)).rowcount
