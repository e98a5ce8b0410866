"""Rate limiting of failed sign-ins per source address (on top of the per-account lockout)."""

from __future__ import annotations

import threading
import time
from collections import deque

from imageshare.domain.errors import TooManyRequests


class SignInThrottle:
    """Refuses sign-ins from an address after ``limit`` failures within ``window`` seconds.

    It lives in each server process; the account lockout in the index holds across them.
    """

    def __init__(self, limit: int = 20, window: float = 600.0) -> None:
        self._limit = limit
        self._window = window
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, source: str, now: float) -> deque[float]:
        failures = self._failures.setdefault(source, deque())
        while failures and now - failures[0] > self._window:
            failures.popleft()
        return failures

    def check(self, source: str) -> None:
        """Raise TooManyRequests while ``source`` is over its limit."""
        with self._lock:
            if len(self._recent(source, time.monotonic())) >= self._limit:
                raise TooManyRequests("too many failed sign-ins from this address; wait a few "
                                      "minutes and try again")

    def failed(self, source: str) -> None:
        """Count a failed sign-in from ``source``."""
        with self._lock:
            self._recent(source, time.monotonic()).append(time.monotonic())
            if len(self._failures) > 10_000:
                self._failures = {k: v for k, v in self._failures.items() if v}
