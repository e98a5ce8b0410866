"""Rate limiting of failed sign-ins per source address (on top of the per-account lockout)."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, delete, func, insert, select

from imageshare.domain.errors import TooManyRequests
from imageshare.storage.index.schema import sign_in_failures

# One IPv6 end site holds a /64 at the least (RFC 6177): counted per address, a guesser there
# would have 2**64 fresh addresses, each with its own allowance.
IPV6_PREFIX = 64


def address_key(source: str) -> str:
    """The caller ``source`` as failures are counted: an IPv4 address as it is (an
    IPv4-mapped IPv6 one as IPv4), an IPv6 address as its /64 network, anything else (a test
    client's name) as given, at most 255 characters."""
    try:
        address = ipaddress.ip_address(source.strip().split("%", 1)[0])
    except ValueError:
        return source[:255]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
    return str(address)


class SignInThrottle:
    """Refuses sign-ins from an address after ``limit`` failures within ``window`` seconds.

    The failures are counted in the index, so every instance of one service counts the same
    ones (a guesser spreading attempts over the instances behind a load balancer is held as
    if there were one), per :func:`address_key` (an IPv6 caller per /64 network).
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
                sign_in_failures.c.source == address_key(source),
                sign_in_failures.c.failed_at > since)).scalar_one()
        if count >= self._limit:
            raise TooManyRequests("too many failed sign-ins from this address; wait a few "
                                  "minutes and try again")

    def failed(self, source: str) -> None:
        """Count a failed sign-in from ``source`` (and forget its failures past the window)."""
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            conn.execute(delete(sign_in_failures).where(
                sign_in_failures.c.source == address_key(source),
                sign_in_failures.c.failed_at <= now - self._window))
            conn.execute(insert(sign_in_failures).values(source=address_key(source),
                                                         failed_at=now))

    def forget_old(self) -> int:
        """Remove every failure past the window (all addresses); returns how many."""
        with self._engine.begin() as conn:
            return conn.execute(delete(sign_in_failures).where(
                sign_in_failures.c.failed_at <= datetime.now(UTC) - self._window)).rowcount
