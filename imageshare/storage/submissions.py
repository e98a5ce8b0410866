"""Forms that create something, handled once per rendering.

Each rendering of such a form (create a share link, make a teaching case) carries a fresh
random key; the first sending of a key does the work and records what it made, a second
sending of the same key (a double click, a resend after a dropped answer) does nothing and
finds what the first made, waiting for it while the first still runs. A sending that failed
leaves nothing, so that the person can correct the form and send it again.
"""

from __future__ import annotations

import secrets
import string
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import ColumnElement, Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from imageshare.domain.errors import ServiceBusy
from imageshare.storage.index.schema import form_submissions as table

KEY_FIELD = "form_key"
_KEY_CHARACTERS = frozenset(string.ascii_letters + string.digits + "-_")
_KEPT = timedelta(days=1)
_POLL = 0.1


def new_form_key() -> str:
    """A fresh key for one rendering of a form."""
    return secrets.token_urlsafe(16)


def valid_key(key: str) -> bool:
    """True for a key :func:`new_form_key` could have made (anything else is ignored)."""
    return 16 <= len(key) <= 64 and set(key) <= _KEY_CHARACTERS


class FormSubmissions:
    """Which form renderings were handled, and what they made."""

    def __init__(self, engine: Engine, wait_seconds: float = 30.0) -> None:
        self._engine = engine
        self._wait = wait_seconds

    def once(self, actor: str, kind: str, key: str, work: Callable[[], str]
             ) -> tuple[str, bool]:
        """Run ``work`` (which returns a short reference to what it made) unless ``actor``
        already sent the form rendering ``key`` of ``kind``: ``(reference, True)`` after
        running it, ``(reference of the first sending, False)`` for a repeat. Without a
        valid key (API clients, old pages) ``work`` runs. Raises :class:`ServiceBusy` when
        the first sending is still running after the wait."""
        if not valid_key(key):
            return work(), True
        while True:
            if self._claim(actor, kind, key):
                break
            found = self._result_of(actor, kind, key)
            if found is not None:
                return found, False
            # The first sending failed and let its key go: this one does the work.
        try:
            result = work()
        except BaseException:
            with self._engine.begin() as conn:
                conn.execute(delete(table).where(*self._row(actor, kind, key)))
            raise
        with self._engine.begin() as conn:
            conn.execute(update(table).where(*self._row(actor, kind, key))
                         .values(result=result))
        return result, True

    def _claim(self, actor: str, kind: str, key: str) -> bool:
        now = datetime.now(UTC)
        try:
            with self._engine.begin() as conn:
                conn.execute(delete(table).where(table.c.created_at < now - _KEPT))
                conn.execute(insert(table).values(actor=actor, kind=kind, form_key=key,
                                                  result="", created_at=now))
        except IntegrityError:
            return False
        return True

    def _result_of(self, actor: str, kind: str, key: str) -> str | None:
        """What the first sending made, once it finished; None when it failed (its key is
        free again)."""
        deadline = time.monotonic() + self._wait
        while True:
            with self._engine.connect() as conn:
                row = conn.execute(select(table.c.result)
                                   .where(*self._row(actor, kind, key))).first()
            if row is None:
                return None
            if row.result:
                return str(row.result)
            if time.monotonic() > deadline:
                raise ServiceBusy("the same form is still being handled: look again in a "
                                  "minute before sending it again")
            time.sleep(_POLL)

    @staticmethod
    def _row(actor: str, kind: str, key: str) -> tuple[ColumnElement[bool], ...]:
        return (table.c.actor == actor, table.c.kind == kind, table.c.form_key == key)
