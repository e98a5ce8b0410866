"""One thread that applies index changes in batches: concurrent stores share one commit.

Each caller waits for its own result, so a store is acknowledged only after the commit that
contains it. Within a batch every change runs in its own savepoint: one failure does not
sink the others. A change may come with a :class:`Prerequisite` (e.g. "the blob is on disk"):
the writer commits nothing of the change until the prerequisite is met (on PostgreSQL it runs
the SQL while the caller finishes that work; on SQLite, whose write lock stops every other
writer, it waits for the work before taking the lock).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from imageshare.archive.indexing import RacedAnotherWriter

T = TypeVar("T")
log = logging.getLogger("imageshare.index")
_STOP = object()


class Prerequisite:
    """Something a change must wait for before it may be committed (set once, by the caller)."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._error: BaseException | None = None

    def succeeded(self) -> None:
        """The work is done."""
        self._done.set()

    def failed(self, error: BaseException) -> None:
        """The work failed: the change must not be committed."""
        self._error = error
        self._done.set()

    def wait_quietly(self) -> None:
        """Block until set, whatever the outcome."""
        self._done.wait()

    def wait(self) -> None:
        """Block until set; raise if the work failed."""
        self._done.wait()
        if self._error is not None:
            raise RuntimeError("prerequisite failed") from self._error


class IndexWriter:
    """Serialises index writes; call :meth:`submit` from any thread."""

    def __init__(self, engine: Engine, max_batch: int = 64) -> None:
        self._engine = engine
        # SQLite's write lock is the whole database's: taken only once the batch's work
        # (blobs hashed and fsynced) is done, so that other writers (audit events, sessions,
        # job leases, in every process) do not wait for that I/O too. PostgreSQL locks rows:
        # there the SQL runs while the work finishes.
        self._work_first = engine.dialect.name == "sqlite"
        self._failure_hooks: list[Callable[[], None]] = []
        self._queue: queue.Queue[Any] = queue.Queue()
        self._max_batch = max_batch
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)
        self._thread.start()

    @property
    def engine(self) -> Engine:
        """The engine the writer commits with."""
        return self._engine

    def on_failure(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` (in the writer thread) whenever a change or a commit fails."""
        self._failure_hooks.append(hook)

    def _failed(self) -> None:
        for hook in self._failure_hooks:
            hook()

    def submit(
        self, change: Callable[[Connection], T], prerequisite: Prerequisite | None = None
    ) -> T:
        """Run ``change`` inside a committed transaction and return its result (or raise)."""
        return self.submit_async(change, prerequisite).result()

    def submit_async(
        self, change: Callable[[Connection], T], prerequisite: Prerequisite | None = None
    ) -> Future[T]:
        """Queue ``change``; the future resolves after the commit that contains it."""
        future: Future[T] = Future()
        self._queue.put((change, future, prerequisite))
        return future

    def close(self) -> None:
        """Finish queued work and stop the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            self._apply(batch)

    def _apply(self, batch: list[Any]) -> None:
        if self._work_first:
            for _change, _future, prerequisite in batch:
                if prerequisite is not None:
                    prerequisite.wait_quietly()
        if len(batch) == 1:
            self._apply_one(*batch[0])
            return
        results: list[tuple[Future[Any], bool, Any]] = []
        retry: list[Any] = []
        try:
            with self._engine.begin() as conn:
                for item in batch:
                    change, future, prerequisite = item
                    try:
                        with conn.begin_nested():  # one failure does not sink the others
                            value = change(conn)
                            if prerequisite is not None:
                                prerequisite.wait()
                        results.append((future, True, value))
                    except (IntegrityError, OperationalError, RacedAnotherWriter):
                        self._failed()
                        retry.append(item)  # raced another writer: alone, after this commit
                    except Exception as exc:  # noqa: BLE001 - handed to the waiting caller
                        self._failed()
                        results.append((future, False, exc))
        except Exception as exc:  # noqa: BLE001 - the commit itself failed: nothing was stored
            self._failed()
            log.error("index commit failed: %s", type(exc).__name__)
            for _change, future, prerequisite in batch:
                self._fail(future, prerequisite, exc)
            return
        for future, ok, value in results:
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        for item in retry:
            self._apply_one(*item)

    def _apply_one(
        self, change: Callable[[Connection], Any], future: Future[Any],
        prerequisite: Prerequisite | None,
    ) -> None:
        """A lone change needs no savepoint: its failure rolls back its own transaction.

        A change that lost a race with another process (a unique key taken meanwhile, a
        serialisation failure) is run once more, on fresh data.
        """
        for attempt in (1, 2):
            try:
                with self._engine.begin() as conn:
                    value = change(conn)
                    if prerequisite is not None:
                        prerequisite.wait()
            except (IntegrityError, OperationalError, RacedAnotherWriter) as exc:
                self._failed()
                if attempt == 1:
                    log.info("index change raced another writer; retrying")
                    continue
                self._fail(future, prerequisite, exc)
                return
            except Exception as exc:  # noqa: BLE001 - handed to the waiting caller
                self._failed()
                self._fail(future, prerequisite, exc)
                return
            future.set_result(value)
            return

    @staticmethod
    def _fail(future: Future[Any], prerequisite: Prerequisite | None, exc: Exception) -> None:
        if prerequisite is not None:
            prerequisite.wait_quietly()
        future.set_exception(exc)
