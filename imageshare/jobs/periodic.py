"""Periodic tasks: queued exactly once per period across every instance.

Each instance looks every few seconds whether a task's current period (the Unix time divided
by the period) has its job yet; the job is named after the task and the period, and the index
keeps one job per name (its record kept at least until the period is over), so whichever
instance comes first queues it and the queue runs it once (retried, and taken over if its
instance dies, like any job).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from imageshare.jobs.queue import JobQueue, periodic_key

log = logging.getLogger("imageshare.jobs")


@dataclass(frozen=True)
class PeriodicTask:
    """A kind of job to queue once every ``every`` seconds (0: never)."""

    kind: str
    every: float
    description: str


class PeriodicTasks:
    """Queues each task's job once per period; ``clock`` gives the Unix time."""

    def __init__(self, queue: JobQueue, tasks: Sequence[PeriodicTask],
                 clock: Callable[[], float] = time.time) -> None:
        self._queue = queue
        self._tasks = [t for t in tasks if t.every > 0]
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def queue_due(self) -> list[str]:
        """Queue the jobs of the current periods that nobody queued yet; returns their
        kinds."""
        now = self._clock()
        queued = []
        for task in self._tasks:
            period = int(now // task.every)
            # Run a little into the period (at most a minute): not in the rush of a start.
            if self._queue.submit_once(periodic_key(task.kind, task.every, period), task.kind,
                                       task.description, {"period": period},
                                       delay=min(60.0, task.every / 10)):
                queued.append(task.kind)
        return queued

    def start(self) -> None:
        """Look for due periods in the background until :meth:`stop`."""
        if not self._tasks or self._thread is not None:
            return
        pause = max(0.5, min(30.0, min(t.every for t in self._tasks) / 4))

        def run() -> None:
            while True:
                try:
                    self.queue_due()
                except Exception as exc:  # noqa: BLE001 - e.g. the index away, or no pooled
                    # connection in time: an ended thread would queue nothing any more
                    log.warning("periodic tasks not queued (%s); trying again",
                                type(exc).__name__)
                if self._stop.wait(pause):
                    return

        self._thread = threading.Thread(target=run, name="periodic", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop looking."""
        self._stop.set()
