"""One thread that applies index changes in batches: concurrent stores share one commit.

Each caller waits for its own result, so a store is acknowledged only after the commit that
contains it. Within a batch every change runs in its own savepoint: one failure does not
sink the others.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine

T = TypeVar("T")
log = logging.getLogger("imageshare.index")
_STOP = object()


class IndexWriter:
    """Serialises index writes; call :meth:`submit` from any thread."""

    def __init__(self, engine: Engine, max_batch: int = 64) -> None:
        self._engine = engine
        self._queue: queue.Queue[Any] = queue.Queue()
        self._max_batch = max_batch
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)
        self._thread.start()

    def submit(self, change: Callable[[Connection], T]) -> T:
        """Run ``change`` inside a committed transaction and return its result (or raise)."""
        future: Future[T] = Future()
        self._queue.put((change, future))
        return future.result()

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

    def _apply(self, batch: list[tuple[Callable[[Connection], Any], Future[Any]]]) -> None:
        results: list[tuple[Future[Any], bool, Any]] = []
        try:
            with self._engine.begin() as conn:
                for change, future in batch:
                    try:
                        with conn.begin_nested():
                            results.append((future, True, change(conn)))
                    except Exception as exc:  # noqa: BLE001 - handed to the waiting caller
                        results.append((future, False, exc))
        except Exception as exc:  # noqa: BLE001 - the commit itself failed: nothing was stored
            log.error("index commit failed: %s", type(exc).__name__)
            for _change, future in batch:
                future.set_exception(exc)
            return
        for future, ok, value in results:
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
