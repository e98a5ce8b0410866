"""The server's further processes (sharing the DICOM port, the HTTP socket, or both):
started so that a Ctrl-C during their start-up reaches only the server, waited for until they
serve, started again when one dies, and stopped together under one deadline."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import inspect
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

READY_SECONDS = 120  # a worker still not listening by then is reported and left out
# A worker that keeps dying is started again after a pause that doubles with each death
# within the hour (from the third), up to this: never left stopped for good.
MAX_RESTART_PAUSE = 300.0


def restart_pause(deaths_within_the_hour: int) -> float:
    """Seconds to wait before starting again a worker that died this often in the hour."""
    if deaths_within_the_hour < 3:
        return 0.0
    return min(MAX_RESTART_PAUSE, 2.0 ** (deaths_within_the_hour - 2))


@dataclass
class Worker:
    """One further process: ``target(*args, ready)`` runs in it (``ready``: an Event it sets
    once it serves)."""

    name: str
    what: str  # what it serves: "DICOM", "HTTP", "DICOM+HTTP"
    target: Callable[..., None]
    args: tuple[Any, ...]
    process: multiprocessing.process.BaseProcess | None = None
    ready: Any = None
    restarts: list[float] = field(default_factory=list)
    pausing: bool = False  # waiting before it is started again (it keeps dying)
    on_restart: Callable[[], None] | None = None  # e.g. forget what the dead process held
    on_give_up: Callable[[], None] | None = None  # not started again: e.g. leave its place
    handle: int | None = None  # a pidfd of ``process``: whether it runs, asked of the kernel

    def ended(self, timeout: float = 0.0) -> bool:
        """Whether its process has ended (waiting up to ``timeout`` seconds), asked of the
        kernel: multiprocessing learns of it from the forkserver, so a forkserver that died
        would make every worker look ended."""
        if self.process is None:
            return True
        if self.handle is None:
            self.process.join(timeout)
            return not self.process.is_alive()
        waiting = select.poll()  # a pidfd is readable once its process has ended
        waiting.register(self.handle, select.POLLIN)
        return bool(waiting.poll(int(timeout * 1000)))

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to its process (through the pidfd: never to a process that took
        the number of one that ended); nothing if it has ended."""
        if self.process is None or self.ended():
            return
        try:
            if self.handle is not None:
                signal.pidfd_send_signal(self.handle, signum)
            elif self.process.pid is not None:
                os.kill(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def forget_process(self) -> None:
        """Let go of the process (ended, or replaced) and its pidfd."""
        if self.handle is not None:
            os.close(self.handle)
        self.process, self.handle = None, None


@contextmanager
def sigint_ignored() -> Iterator[None]:
    """SIGINT ignored meanwhile (in the main thread; elsewhere signal handlers cannot be
    changed), and so in the processes started meanwhile until they set their own handler: an
    ignored signal stays ignored across fork and exec. A Ctrl-C in a terminal reaches the
    whole process group: the server stops its workers itself, rather than each printing a
    KeyboardInterrupt from wherever its start-up was."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def fork_forkserver() -> bool:
    """Start multiprocessing's forkserver as a fork of this process, not a fresh interpreter:
    it, and every worker it forks, then share the pages of every module this process
    imported (kept from the garbage collector, which would otherwise copy them), instead of
    importing their own copies. Only while this process has a single thread (forking a
    process with several is unsafe), and only on a Python whose forkserver works as this
    expects (3.11 and 3.12; later ones authenticate their clients); False, having done
    nothing, when it cannot, or when a forkserver was started already."""
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    known = ("_lock", "_forkserver_pid", "_forkserver_address", "_forkserver_alive_fd")
    if (threading.active_count() != 1 or server is None
            or not all(hasattr(server, name) for name in known)
            or set(inspect.signature(multiprocessing.forkserver.main).parameters)
            != {"listener_fd", "alive_r", "preload", "main_path", "sys_path"}):
        return False
    from multiprocessing import connection, resource_tracker, util

    with server._lock:
        if server._forkserver_pid is not None:
            return False
        resource_tracker.ensure_running()  # its descriptor is handed to every worker
        with socket.socket(socket.AF_UNIX) as listener:
            address = connection.arbitrary_address("AF_UNIX")  # type: ignore[attr-defined]
            listener.bind(address)
            if not util.is_abstract_socket_namespace(address):
                os.chmod(address, 0o600)
            listener.listen()
            alive_r, alive_w = os.pipe()  # EOF for the forkserver when this process ends
            gc.freeze()  # here and in the fork: what exists now stays shared
            try:
                pid = os.fork()
            except OSError:
                log.warning("could not fork the workers' forkserver; starting a fresh one")
                os.close(alive_r)
                os.close(alive_w)
                return False
            if pid == 0:
                code = 0
                try:
                    os.close(alive_w)
                    # Not the server's handler; and a SIGTERM sent to every process of the
                    # service (systemd's stop) is for the workers: this one ends with the
                    # server (the pipe, and the parent-death signal).
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)
                    signal.signal(signal.SIGHUP, signal.SIG_IGN)
                    die_with_parent()
                    multiprocessing.forkserver.main(listener.fileno(), alive_r, [])
                except SystemExit as stop:  # how it ends once this process has ended
                    code = stop.code if isinstance(stop.code, int) else 0
                except BaseException:  # noqa: BLE001 - reported; the fork must not return
                    code = 1
                    log.exception("the forkserver failed")
                finally:
                    os._exit(code)
            os.close(alive_r)
        server._forkserver_address = address
        server._forkserver_alive_fd = alive_w
        server._forkserver_pid = pid
    return True


def die_with_server() -> None:
    """In a worker: end it at once (SIGKILL) when the server's process has ended, even if
    that was killed, so that no worker outlives the server holding its ports. Watched
    through the pipe multiprocessing keeps from the process that started the worker to it
    (that end closes when the process ends), whichever process forked it."""
    server = multiprocessing.parent_process()
    if server is None:
        return

    def watch() -> None:
        server.join()
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="server-watch", daemon=True).start()


def die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies (even by SIGKILL). The parent is
    the *thread* that started it (for the forkserver forked by the server: its main
    thread)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_context(
        preload: Sequence[str] = (),
) -> multiprocessing.context.ForkServerContext | multiprocessing.context.SpawnContext:
    """How workers are started: forked from one process that imported ``preload`` once (the
    forkserver, itself started afresh), so that the workers share those modules' memory
    rather than each importing its own copy; where Linux's forkserver is not available, a
    fresh interpreter each (spawn). ``preload`` counts only before the first worker starts."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    if preload:
        context.set_forkserver_preload(list(preload))
    return context


class Workers:
    """The further processes of one server (``preload``: the modules they run, imported once
    for all of them; see :func:`worker_context`)."""

    def __init__(self, preload: Sequence[str] = ()) -> None:
        self.context = worker_context(preload)
        self._workers: list[Worker] = []
        self._stopping = threading.Event()
        self._joined = threading.Event()
        self._lock = threading.Lock()
        self._watch: threading.Thread | None = None
        self._prepared = False

    @property
    def processes(self) -> list[multiprocessing.process.BaseProcess]:
        """The processes running now."""
        return [w.process for w in self._workers
                if w.process is not None and w.process.pid is not None]

    def start(self, workers: Sequence[Worker]) -> None:
        """Start ``workers`` (see :meth:`wait_ready`)."""
        with self._lock:
            for worker in workers:
                self._spawn(worker)
                self._workers.append(worker)

    def wait_ready(self, stopping: threading.Event) -> None:
        """Wait (up to two minutes each) until every worker started serves; not for one that
        died, nor once the server is asked to stop (``stopping``)."""
        for worker in list(self._workers):
            self._wait_ready(worker, stopping)

    def _spawn(self, worker: Worker) -> None:
        """Start ``worker``'s process; it becomes ``worker.process`` only once started (a
        start that fails leaves the one before, to be tried again)."""
        ready = self.context.Event()
        process = self.context.Process(
            target=worker.target, args=(*worker.args, ready), name=worker.name, daemon=True)
        self._start(process)
        try:
            handle = os.pidfd_open(process.pid) if process.pid else None
        except OSError:  # a kernel without pidfds: multiprocessing's word is taken
            handle = None
        worker.forget_process()
        worker.ready, worker.process, worker.handle = ready, process, handle

    def _start(self, process: multiprocessing.process.BaseProcess) -> None:
        if self.context.get_start_method() == "forkserver":
            if not self._prepared:
                self.prepare()  # its processes start with SIGINT ignored, as it did
            process.start()  # (waits, with Ctrl-C heard, until it has its modules)
            return
        with sigint_ignored():  # spawn: briefly, while the new interpreter is started
            process.start()

    def prepare(self) -> None:
        """Start the process workers are forked from now (if not running): while this
        process has a single thread, as a fork of it, sharing every module it imported (see
        :func:`fork_forkserver`); otherwise a fresh interpreter, which imports the modules
        while this process starts (the first worker's start would otherwise wait for that)."""
        if self.context.get_start_method() == "forkserver":
            with sigint_ignored():
                if not fork_forkserver():
                    multiprocessing.forkserver.ensure_running()
        self._prepared = True

    def _wait_ready(self, worker: Worker, stopping: threading.Event) -> None:
        deadline = time.monotonic() + READY_SECONDS
        while not worker.ready.wait(0.2):
            if stopping.is_set() or self._stopping.is_set():
                return
            if worker.ended() or time.monotonic() > deadline:
                log.error("%s %s did not start; continuing without it", worker.what,
                          worker.name)
                return

    def supervise(self, interval: float = 1.0) -> None:
        """From now on, a worker that dies is started again (after a pause that grows while
        it keeps dying: :func:`restart_pause`), with the reason in the log; one that ended
        by itself with exit code 0 (asked to stop) is not."""
        if self._stopping.is_set():
            return
        self._watch = threading.Thread(target=self._supervise, args=(interval,),
                                       name="worker-watch", daemon=True)
        self._watch.start()

    def _supervise(self, interval: float) -> None:
        # This thread lives until the workers were joined: under spawn, Linux kills a
        # process whose parent *thread* ended (the workers ask for it, to die with the
        # server).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        while not self._stopping.wait(interval):
            for worker in list(self._workers):
                try:
                    self._look_after(worker)
                except Exception:  # noqa: BLE001 - the others are still looked after
                    log.exception("%s %s could not be started again", worker.what,
                                  worker.name)
        self._joined.wait()

    def _look_after(self, worker: Worker) -> None:
        with self._lock:
            process = worker.process
            if self._stopping.is_set() or process is None or not worker.ended():
                return
            process.join(1)  # its exit code, if the forkserver still tells it
            if process.exitcode == 0:
                log.warning("%s %s stopped (asked to); it is not started again",
                            worker.what, worker.name)
                self._give_up(worker)
                return
            now = time.monotonic()
            worker.restarts = [t for t in worker.restarts if now - t < 3600]
            pause = restart_pause(len(worker.restarts))
            if worker.restarts and now - worker.restarts[-1] < pause:
                if not worker.pausing:
                    worker.pausing = True
                    log.error("%s %s keeps stopping (%d times within the hour); starting it "
                              "again in %.0f s", worker.what, worker.name,
                              len(worker.restarts), pause)
                return
            worker.pausing = False
            log.error("%s %s stopped unexpectedly (exit code %s); starting it again",
                      worker.what, worker.name, process.exitcode)
            worker.restarts.append(now)
            if worker.on_restart is not None:
                worker.on_restart()
            self._spawn(worker)

    @staticmethod
    def _give_up(worker: Worker) -> None:
        worker.forget_process()
        if worker.on_give_up is not None:
            worker.on_give_up()

    def terminate(self) -> None:
        """Send every worker SIGTERM (once); none is started again from now on."""
        with self._lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
            for worker in self._workers:
                try:
                    worker.send_signal(signal.SIGTERM)
                except OSError as exc:  # the others still get theirs
                    log.warning("%s could not be sent SIGTERM: %s", worker.name, exc)

    def join(self, grace: float) -> None:
        """After :meth:`terminate`: wait for every worker until one deadline (HTTP, then
        background jobs, each get the grace); any still running then is killed."""
        deadline = time.monotonic() + 2 * grace + 5
        try:
            for worker in self._workers:
                if worker.process is None:
                    continue
                if not worker.ended(max(0.0, deadline - time.monotonic())):
                    log.warning("%s did not stop in time; killed", worker.name)
                    worker.send_signal(signal.SIGKILL)
                    worker.ended(5)
                worker.process.join(1)  # its exit code, as far as the forkserver tells it
        finally:
            self._joined.set()
