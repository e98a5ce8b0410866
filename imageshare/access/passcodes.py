"""Passcodes of links (share links, upload invitations): stored as argon2 hashes, and tried at
most ten times before the link locks. The tries are counted in the link's own row (columns
``failed_attempts`` and ``locked``), before the passcode is checked, so that tries sent at
the same moment (from many addresses, to several instances) cannot get past ten between
them."""

from __future__ import annotations

from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Connection, Table, update

MAX_PASSCODE_FAILURES = 10
_hasher = PasswordHasher()


def hash_passcode(passcode: str) -> str:
    """The stored form of a passcode made for a link."""
    return _hasher.hash(passcode)


def passcode_matches(stored: str, passcode: str) -> bool:
    """True when ``passcode`` (as typed: spaces around it and case do not matter) is the one
    ``stored`` was made of."""
    try:
        return _hasher.verify(stored, passcode.strip().upper())
    except (VerificationError, InvalidHashError):
        return False


def count_try(conn: Connection, table: Table, pk: int) -> int | None:
    """Count one more try on the link ``pk`` of ``table``; the tries counted so far, or None
    when the link is locked (or its tries are used up by tries in flight)."""
    tries: int | None = conn.execute(
        update(table).where(table.c.pk == pk, table.c.locked.is_(False),
                            table.c.failed_attempts < MAX_PASSCODE_FAILURES)
        .values(failed_attempts=table.c.failed_attempts + 1)
        .returning(table.c.failed_attempts)).scalar()
    return tries


def lock_when_used_up(conn: Connection, table: Table, pk: int, tries: int) -> bool:
    """Lock the link after a wrong passcode that was its last try; True when it locked."""
    if tries < MAX_PASSCODE_FAILURES:
        return False
    conn.execute(update(table).where(table.c.pk == pk).values(locked=True))
    return True


def forget_tries(conn: Connection, table: Table, pk: int, **values: Any) -> bool:
    """After the right passcode: the tries start again (and ``values`` are set) unless the
    link locked meanwhile; False when it did."""
    return bool(conn.execute(update(table).where(table.c.pk == pk, table.c.locked.is_(False))
                             .values(failed_attempts=0, **values)).rowcount)
