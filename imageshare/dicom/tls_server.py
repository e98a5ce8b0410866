"""The DICOM TLS listener's server class: the TLS handshake happens in each association's own
thread, with a time limit.

pynetdicom wraps an accepted socket with ``do_handshake_on_connect`` in the accepting thread,
on a socket without a timeout: one peer that connects and says nothing would stop every
further TLS association. Here the accepting thread only accepts; the handshake must end within
:data:`HANDSHAKE_SECONDS` in all (CPython's ``do_handshake`` counts the socket's timeout as
one deadline, not per read: a peer dripping a byte at a time is let go at it too), and at most
:data:`PENDING_PER_ADDRESS` handshakes from one address are waited for at once (its further
connections are closed at once: one host's idle sockets cannot take a thread each, nor keep
other nodes out).
"""

from __future__ import annotations

import logging
import ssl
import threading
from typing import Any

from imageshare.dicom.reactor import no_delay

log = logging.getLogger("imageshare.dicom")
HANDSHAKE_SECONDS = 30.0
PENDING_PER_ADDRESS = 8


class _HandshakeInThread:
    """Mix-in for a pynetdicom ``ThreadedAssociationServer`` with an ``ssl_context``."""

    handshake_seconds = HANDSHAKE_SECONDS
    pending_per_address = PENDING_PER_ADDRESS
    _pending_lock = threading.Lock()

    def _begin_handshake(self, host: str) -> bool:
        """Count a handshake from ``host``; False when it has too many pending already."""
        with self._pending_lock:
            pending: dict[str, int] = self.__dict__.setdefault("_pending", {})
            if pending.get(host, 0) >= self.pending_per_address:
                return False
            pending[host] = pending.get(host, 0) + 1
            return True

    def _end_handshake(self, host: str) -> None:
        with self._pending_lock:
            pending: dict[str, int] = self.__dict__["_pending"]
            pending[host] -= 1
            if not pending[host]:
                del pending[host]

    def get_request(self) -> tuple[Any, Any]:
        """Accept a connection; wrap it for TLS without shaking hands yet."""
        client, address = self.socket.accept()  # type: ignore[attr-defined]  # mixin
        no_delay(client)
        context = self.ssl_context  # type: ignore[attr-defined]  # mixin
        if context is not None:
            client.settimeout(self.handshake_seconds)
            client = context.wrap_socket(client, server_side=True,
                                         do_handshake_on_connect=False)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Shake hands (within the time limit), then serve the association."""
        if isinstance(request, ssl.SSLSocket):
            host = str(client_address[0])
            if not self._begin_handshake(host):
                log.warning("DICOM TLS connection from %s closed: %d handshakes from there "
                            "already pending", host, self.pending_per_address)
                self.shutdown_request(request)  # type: ignore[attr-defined]  # mixin
                return
            try:
                request.do_handshake()  # the timeout bounds the whole handshake (CPython)
                # From now on, as plain connections: no read or write waits longer than the
                # network timeout (a peer stopping in the middle of a PDU is let go).
                request.settimeout(self.ae.network_timeout)  # type: ignore[attr-defined]  # mixin
            except (OSError, ValueError) as exc:
                log.warning("DICOM TLS handshake with %s failed: %s", client_address[0],
                            _why(exc))
                self.shutdown_request(request)  # type: ignore[attr-defined]  # mixin
                return
            finally:
                self._end_handshake(host)
        super().process_request_thread(request, client_address)  # type: ignore[misc]  # mixin


def _why(exc: OSError | ValueError) -> str:
    """Why a handshake failed, in OpenSSL's words: its reason and, for a peer's certificate
    that was not accepted, why not (``certificate revoked``, ``certificate has expired``)."""
    reason = getattr(exc, "reason", None) or type(exc).__name__
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"{reason} ({exc.verify_message})"
    return str(reason)


_classes: dict[type, type] = {}
_lock = threading.Lock()


def tls_server_class(base: type) -> type:
    """``base`` (a pynetdicom association server class) with the handshake in each
    association's thread."""
    with _lock:
        if base not in _classes:
            _classes[base] = type(f"Tls{base.__name__}", (_HandshakeInThread, base), {})
        return _classes[base]
