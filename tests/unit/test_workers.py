"""The server's further processes: a worker that dies is started again, and one started
again still gets its grace on stop."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from imageshare import workers as workers_module
from imageshare.workers import Worker, Workers, die_with_server, restart_pause


def drain_slowly(ready) -> None:  # noqa: ANN001 - a multiprocessing Event
    """A worker that takes a moment to drain on SIGTERM, then exits 0 (and dies with the
    process that started it, as the server's workers do)."""
    die_with_server()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ready.set()
    stop.wait()
    time.sleep(0.5)


def test_a_dead_worker_is_started_again_and_drains_on_stop_like_the_first():
    workers = Workers()
    workers.start([Worker("test-worker", "test worker", drain_slowly, ())])
    workers.wait_ready(threading.Event())
    (first,) = workers.processes
    workers.supervise(interval=0.1)
    os.kill(first.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        (current,) = workers.processes or [first]
        if current is not first and current.is_alive():
            break
        assert time.monotonic() < deadline, "the worker was not started again"
        time.sleep(0.05)
    time.sleep(0.5)  # it has set its handler
    workers.terminate()
    workers.join(grace=2)
    assert current.exitcode == 0  # drained, not killed with its parent thread


def exit_at_once(ready) -> None:  # noqa: ANN001
    """A worker that stops by itself, as asked to."""
    ready.set()


def test_a_worker_that_ended_by_itself_with_exit_code_0_is_not_started_again():
    workers = Workers()
    workers.start([Worker("quiet-worker", "test worker", exit_at_once, ())])
    workers.wait_ready(threading.Event())
    workers.supervise(interval=0.05)
    time.sleep(1)
    assert workers.processes == []
    workers.terminate()
    workers.join(grace=1)


def test_a_restart_that_fails_is_tried_again_and_the_stop_still_reaches_everyone(
        monkeypatch):
    workers = Workers()
    workers.start([Worker("flaky-worker", "test worker", drain_slowly, ()),
                   Worker("steady-worker", "test worker", drain_slowly, ())])
    workers.wait_ready(threading.Event())
    first, steady = workers.processes
    real_start, failed = Workers._start, []

    def start_failing_once(self, process) -> None:  # noqa: ANN001
        if not failed:
            failed.append(process.name)
            raise OSError(24, "Too many open files")
        real_start(self, process)

    monkeypatch.setattr(Workers, "_start", start_failing_once)
    workers.supervise(interval=0.1)
    os.kill(first.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        current = workers.processes[0]
        if current is not first and current.is_alive():
            break
        assert time.monotonic() < deadline, "the worker was not started again"
        time.sleep(0.05)
    assert failed == ["flaky-worker"]  # the first try failed, the next one started it
    time.sleep(0.5)
    workers.terminate()
    workers.join(grace=2)
    assert current.exitcode == 0 and steady.exitcode == 0


def test_workers_outlive_a_dead_forkserver_and_still_drain_on_stop():
    """The forkserver that forked the workers is killed (the OOM killer, an operator):
    multiprocessing then believes every worker ended, but they still serve, so none is
    started again or cut off, and a stop still waits for each to drain."""
    import multiprocessing.forkserver

    workers = Workers()
    workers.start([Worker("lasting-worker", "test worker", drain_slowly, ())])
    workers.wait_ready(threading.Event())
    (first,) = workers.processes
    workers.supervise(interval=0.1)
    forkserver = multiprocessing.forkserver._forkserver._forkserver_pid
    assert forkserver is not None
    os.kill(forkserver, signal.SIGKILL)
    time.sleep(1.5)  # the supervisor looked several times
    assert workers.processes == [first]
    assert Path(f"/proc/{first.pid}").exists()
    workers.terminate()
    began = time.monotonic()
    workers.join(grace=5)
    assert time.monotonic() - began >= 0.4  # it drained (0.5 s) rather than being left
    deadline = time.monotonic() + 5
    while _running(first.pid):
        assert time.monotonic() < deadline, "the worker did not stop"
        time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _restarted(workers, old, deadline: float):
    while True:
        (current,) = workers.processes or [old]
        if current is not old and current.is_alive():
            return current
        assert time.monotonic() < deadline, "the worker was not started again"
        time.sleep(0.02)


def test_a_worker_that_keeps_dying_is_started_again_after_a_growing_pause_never_given_up(
        monkeypatch):
    """Killed again and again (the OOM killer under memory pressure): the worker is started
    again after a pause that grows (here shortened), not left stopped for good after twenty
    deaths in an hour as before."""
    assert [restart_pause(n) for n in (0, 2, 3, 4, 6, 20)] == [0, 0, 2, 4, 16, 300]
    pauses: list[int] = []
    monkeypatch.setattr(workers_module, "restart_pause",
                        lambda deaths: pauses.append(deaths) or (0.3 if deaths == 22 else 0.0))
    workers = Workers()
    workers.start([Worker("dying-worker", "test worker", drain_slowly, ())])
    workers.wait_ready(threading.Event())
    (current,) = workers.processes
    workers.supervise(interval=0.02)
    for _ in range(23):
        os.kill(current.pid, signal.SIGKILL)
        current = _restarted(workers, current, time.monotonic() + 30)
    assert max(pauses) == 22  # asked after each death, the count of the hour growing
    workers.terminate()
    workers.join(grace=2)
