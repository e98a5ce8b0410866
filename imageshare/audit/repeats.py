"""One audit event for a viewing, not one per frame: the repeats of an access within a window.

A viewer shows a study by fetching each of its frames, renderings and thumbnails; each fetch
is a read of patient data, and recording each as its own event buries one viewing under
hundreds of identical rows (and makes the trail's reports and ATNA feed unusable). The first
fetch of a study by one user from one address is recorded; the same successful access again
within the window is the same viewing. What is refused or fails is always recorded.

The window is held in this process: several instances behind a load balancer each record a
viewing once (an extra row, never a missing one).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

# Enough for every viewing of a busy day's window; the oldest is forgotten first (its next
# fetch is then recorded again: a row more, never one less).
_MOST = 8192


class RepeatWindow:
    """Tells whether an access was already recorded within the last ``seconds``."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._seen: OrderedDict[Hashable, float] = OrderedDict()
        self._lock = threading.Lock()

    def seen(self, key: Hashable) -> bool:
        """True when ``key`` was :meth:`note`-d less than the window ago (never when the
        window is 0)."""
        if self.seconds <= 0:
            return False
        with self._lock:
            at = self._seen.get(key)
            return at is not None and self._clock() - at < self.seconds

    def note(self, key: Hashable) -> None:
        """Remember that ``key`` was recorded now."""
        if self.seconds <= 0:
            return
        with self._lock:
            self._seen[key] = self._clock()
            self._seen.move_to_end(key)
            while len(self._seen) > _MOST:
                self._seen.popitem(last=False)
