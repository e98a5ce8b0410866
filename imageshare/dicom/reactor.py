"""The two threads pynetdicom runs for every association this server accepts, woken when
there is work instead of polling for it.

pynetdicom's DUL thread (the network side) and its association thread (the DIMSE side) each
sleep 1 ms whenever a turn of their loop found nothing to do: an open association costs
about 60 ms of CPU a second even when idle, and on a 2-core machine four busy associations
spend a sizeable share of every stored instance on waking up for nothing. Here, for accepted
associations only, those sleeps become waits that end at once when there is work: the DUL
waits on its socket and on an eventfd written whenever another thread hands it something to
send (or asks it to stop); the association thread waits on an event set whenever a DIMSE
message or an ACSE primitive is queued for it. Either wait ends after :data:`IDLE_WAIT` at
most, so that pynetdicom's timers (ARTIM, network and DIMSE timeouts) are still looked at.

Associations this server requests (C-MOVE sub-operations, pushes) keep pynetdicom's own loop:
their callers spin on the association thread pausing, which a longer wait would slow. Every
association, requested or accepted, gets one correction of pynetdicom's: its reactor no
longer takes the answer a ``send_*`` call is waiting for (see
:func:`_reactor_takes_no_awaited_answer`).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import _version
from pynetdicom import association as _association
from pynetdicom import dimse as _dimse
from pynetdicom import dul as _dul
from pynetdicom import transport as _transport
from pynetdicom._globals import MODE_ACCEPTOR

log = logging.getLogger("imageshare.dicom")
IDLE_WAIT = 0.25
_ASSOCIATION_SLEEP = 0.001  # the one sleep of pynetdicom's association loop (not its spins)
_install_lock = threading.Lock()
_installed = False


class _Waker:
    """Wakes one accepted association's DUL thread and association thread."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.dimse_side = threading.Event()
        self._lock = threading.Lock()  # a write never reaches a number closed and reused
        self._closed = False

    def wake_network_side(self) -> None:
        """The DUL has something to send, or is asked to stop."""
        with self._lock:
            if not self._closed:
                os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        """Release the eventfd (the DUL thread ended)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.fd)

    def __del__(self) -> None:  # an association whose DUL thread never ran
        self.close()

    def wait_network_side(self, dul: Any) -> None:
        """Until the peer sent something, another thread woke the DUL, or IDLE_WAIT."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        sock = getattr(dul.socket, "socket", None)
        if sock is not None and getattr(dul.socket, "_is_connected", False):
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return  # decrypted bytes waiting that the file descriptor does not show
            try:
                poller.register(sock, select.POLLIN)
            except (OSError, ValueError):  # closed meanwhile: pynetdicom finds out
                return
        try:
            events = poller.poll(IDLE_WAIT * 1000)
        except OSError:
            time.sleep(0.001)
            return
        if any(fd == self.fd for fd, _ in events):
            try:
                os.eventfd_read(self.fd)
            except OSError:  # read by nobody else; nothing to drain
                pass

    def wait_dimse_side(self) -> None:
        """Until a message or primitive was queued for the association, or IDLE_WAIT."""
        self.dimse_side.wait(IDLE_WAIT)
        self.dimse_side.clear()


def no_delay(sock: Any) -> None:
    """Send a connection's small writes at once (TCP_NODELAY): pynetdicom writes each PDU
    on its own, and a short one behind another not yet acknowledged would otherwise wait for
    the peer's delayed acknowledgement (tens of milliseconds)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not TCP (a test's socket pair), or closed already
        pass


def _after_put(queue: Any, wake: Callable[[], None]) -> None:
    """Make every put on ``queue`` call ``wake`` once the item is in."""
    put = queue.put

    def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        wake()

    queue.put = put_and_wake


def _waker(thread: threading.Thread) -> _Waker | None:
    return getattr(thread, "_imageshare_waker", None)


class _Sleeps:
    """What pynetdicom's modules see as ``time``: the real module, except that the idle
    sleep of an accepted association's two threads waits for work instead."""

    def __init__(self, network_side: bool) -> None:
        self._network_side = network_side

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        """pynetdicom's sleep."""
        thread = threading.current_thread()
        waker = _waker(thread)
        if waker is None:
            time.sleep(seconds)
        elif self._network_side and isinstance(thread, _dul.DULServiceProvider):
            waker.wait_network_side(thread)
        elif (not self._network_side and seconds == _ASSOCIATION_SLEEP
              and isinstance(thread, _association.Association)):
            waker.wait_dimse_side()
        else:
            time.sleep(seconds)


def _reactor_takes_no_awaited_answer(assoc: _association.Association) -> None:
    """Close pynetdicom's race between its reactor and a ``send_*`` call on the same
    association (pynetdicom issue 875).

    A ``send_*`` call pauses the reactor by clearing its checkpoint and waiting until the
    reactor says it is paused; but the reactor says so just before it looks at the
    checkpoint, so a call that clears it in between goes on while the reactor, not paused,
    takes the peer's answer off the queue and drops it as an unexpected message: the call
    then waits for the DIMSE timeout and aborts the association. Here the reactor's one
    non-blocking look at the queue finds nothing while a pause is asked for."""
    dimse = assoc.dimse
    get_msg = dimse.get_msg
    if not isinstance(getattr(assoc, "_reactor_checkpoint", None), threading.Event):
        return

    def guarded(block: bool = False) -> Any:
        if (not block and threading.current_thread() is assoc
                and not assoc._reactor_checkpoint.is_set()):
            return None, None
        return get_msg(block)

    dimse.get_msg = guarded  # type: ignore[method-assign]


def _as_expected() -> bool:
    """Whether pynetdicom has the pieces this module changes (they are internal)."""
    return (all(hasattr(_dul.DULServiceProvider, name) for name in (
                "run_reactor", "stop_dul", "kill_dul", "_read_pdu_data"))
            and all(hasattr(_association.Association, name) for name in (
                "_run_reactor", "kill"))
            and hasattr(_dimse.DIMSEServiceProvider, "get_msg")
            and hasattr(_transport.AssociationSocket, "_create_socket")
            and hasattr(_dul, "time") and hasattr(_association, "time"))


def install() -> None:
    """Make the associations accepted from now on wait for work instead of polling, and the
    connections of associations requested from now on send their PDUs at once (once per
    process; later calls do nothing)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        _installed = True
    if not _as_expected():
        log.warning("pynetdicom %s is not laid out as expected: its associations keep "
                    "their own polling loop", getattr(_version, "__version__", "?"))
        return
    association_init = _association.Association.__init__
    association_kill = _association.Association.kill
    stop_dul = _dul.DULServiceProvider.stop_dul
    kill_dul = _dul.DULServiceProvider.kill_dul
    run_reactor = _dul.DULServiceProvider.run_reactor

    def init(self: Any, ae: Any, mode: str) -> None:
        association_init(self, ae, mode)
        _reactor_takes_no_awaited_answer(self)
        if self.mode != MODE_ACCEPTOR:
            return
        waker = _Waker()
        self._imageshare_waker = self.dul._imageshare_waker = waker
        dul = self.dul

        def from_elsewhere() -> None:
            if threading.current_thread() is not dul:
                waker.wake_network_side()

        _after_put(dul.to_provider_queue, from_elsewhere)
        _after_put(dul.event_queue, from_elsewhere)
        _after_put(dul.to_user_queue, waker.dimse_side.set)
        _after_put(self.dimse.msg_queue, waker.dimse_side.set)

    def kill(self: Any) -> None:
        association_kill(self)
        waker = _waker(self)
        if waker is not None:
            waker.dimse_side.set()

    def stop(self: Any) -> bool:
        waker = _waker(self)
        if waker is not None and self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            waker.wake_network_side()
        return bool(stop_dul(self))

    def kill_network_side(self: Any) -> None:
        kill_dul(self)
        waker = _waker(self)
        if waker is not None:
            waker.wake_network_side()

    def reactor(self: Any) -> None:
        try:
            run_reactor(self)
        finally:
            waker = _waker(self)
            if waker is not None:
                waker.dimse_side.set()  # the association notices at once that the DUL ended
                waker.close()

    create_socket = _transport.AssociationSocket._create_socket

    def requesting(self: Any, address: Any) -> Any:
        made = create_socket(self, address)
        no_delay(made)  # associations this process requests send their PDUs at once too
        return made

    _transport.AssociationSocket._create_socket = requesting  # type: ignore[method-assign]
    _association.Association.__init__ = init  # type: ignore[method-assign]
    _association.Association.kill = kill  # type: ignore[method-assign]
    _dul.DULServiceProvider.stop_dul = stop  # type: ignore[method-assign]
    _dul.DULServiceProvider.kill_dul = kill_network_side  # type: ignore[method-assign]
    _dul.DULServiceProvider.run_reactor = reactor  # type: ignore[method-assign]
    _dul.time = _Sleeps(network_side=True)  # type: ignore[assignment]
    _association.time = _Sleeps(network_side=False)  # type: ignore[assignment]
