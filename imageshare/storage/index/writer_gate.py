"""Writers of one SQLite database take turns through a gate before they ask for its write lock.

SQLite lets one writer in at a time. A writer that finds the lock taken sleeps in SQLite's
busy handler, 1, 2, 5, 10, 15 ms and longer between attempts, so under steady concurrent
writing (six browser connections storing files, four DICOM processes) most of the time a
waiting writer loses is sleep after the lock was already free. The gate hands the turn over
at once: threads of one process queue on a lock, and one thread per process at a time takes
an advisory lock (``flock``) on a file beside the database, which the kernel releases if the
process dies, and a connection dropped without ending its transaction ends its turn with it.
A turn that is not to be had within the database's busy timeout is given up and the writer
tries SQLite's own lock once, without waiting again: the gate only precedes that lock, which
still decides, and a writer is refused with "database is locked" after the busy timeout, as
without the gate.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
import weakref
from pathlib import Path

_POLL_FIRST = 0.00005  # seconds between attempts at another process's turn: then doubling
_POLL_MOST = 0.001
ENTERED, NESTED, TIMED_OUT = "entered", "nested", "timed out"
_GATES: weakref.WeakValueDictionary[str, WriterGate] = weakref.WeakValueDictionary()
_REGISTRY = threading.Lock()


def gate_for(database: Path, timeout: float) -> WriterGate:
    """The one gate of this process for the database at ``database`` (shared by every engine
    on it, so that a thread holding the turn through one engine is known to all); a turn is
    waited for at most ``timeout`` seconds."""
    key = str(database.resolve())
    with _REGISTRY:
        gate = _GATES.get(key)
        if gate is None:
            gate = _GATES[key] = WriterGate(Path(key), timeout)
        return gate


class WriterGate:
    """The turn to write to the SQLite database at ``database`` (a file ``<database>-writers``
    holds the lock between processes)."""

    def __init__(self, database: Path, timeout: float) -> None:
        self.path = database.with_name(database.name + "-writers")
        self.timeout = timeout
        self._fresh()

    def _fresh(self) -> None:
        """No turn held and no file open (at creation, and in a forked child: a turn taken
        through the parent's open file would be the parent's too)."""
        self._local = threading.Lock()
        self._opening = threading.Lock()
        self._fd = -1
        self._holder: weakref.ref[object] | None = None  # not kept alive by its turn
        self._thread = 0

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)

    def _file(self) -> int:
        if self._fd < 0:
            with self._opening:
                if self._fd < 0:
                    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                       0o600)
        return self._fd

    def enter(self, holder: object) -> str:
        """Wait for the turn of ``holder`` (a database connection about to begin a write
        transaction). Returns ENTERED; NESTED when this thread holds the turn already (for
        another transaction: it must not wait on itself); TIMED_OUT when the turn was not
        given within the timeout. In the last two cases the writer goes on without it."""
        if self._thread == threading.get_ident():
            return NESTED
        deadline = time.monotonic() + self.timeout
        if not self._local.acquire(timeout=self.timeout):
            return TIMED_OUT
        locked = False
        try:
            locked = self._take_file_lock(deadline)
        except OSError:
            pass
        except BaseException:  # interrupted while waiting: nothing may stay taken
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)  # nothing if it was not taken
            self._local.release()
            raise
        if not locked:
            self._local.release()
            return TIMED_OUT
        self._holder = weakref.ref(holder, self._holder_gone)
        self._thread = threading.get_ident()
        return ENTERED

    def _holder_gone(self, gone: weakref.ref[object]) -> None:
        """The connection holding the turn was dropped without ending its transaction (its
        database connection is rolled back by the pool): its turn ends with it."""
        if self._holder is gone:
            self._end_turn()

    def _take_file_lock(self, deadline: float) -> bool:
        pause = _POLL_FIRST
        while True:
            try:
                fcntl.flock(self._file(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(pause)
                pause = min(pause * 2, _POLL_MOST)

    def leave(self, holder: object) -> None:
        """End ``holder``'s turn (its transaction committed or rolled back); nothing when it
        had none."""
        current = self._holder
        if current is not None and current() is holder:
            self._end_turn()

    def _end_turn(self) -> None:
        self._holder, self._thread = None, 0
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._local.release()


def _after_fork() -> None:
    """In a forked child (a worker), every gate starts afresh: no turn held, and its own
    open file for the lock between processes."""
    global _REGISTRY
    _REGISTRY = threading.Lock()
    for gate in list(_GATES.values()):
        inherited = gate._fd  # noqa: SLF001
        gate._fresh()  # noqa: SLF001
        if inherited >= 0:  # else the parent's turn would outlive the parent in its children
            with contextlib.suppress(OSError):
                os.close(inherited)


os.register_at_fork(after_in_child=_after_fork)
