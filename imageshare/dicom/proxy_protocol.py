"""The PROXY protocol (HAProxy's, versions 1 and 2) on the DICOM listener.

Behind a TCP load balancer every association seems to come from the balancer, so the check
that a registered AE calls from its registered host, the audit trail's "from where" and the
refused-callers list would all name the balancer. A balancer that sends the PROXY protocol
(HAProxy ``send-proxy`` or ``send-proxy-v2``) first tells who connected to it; the listener
reads that header, before anything else on the connection (before a TLS handshake too), from
the addresses in ``IMAGESHARE_TRUSTED_PROXIES`` only, and serves the association as coming
from there. A connection from a trusted proxy without a valid header is closed; nobody
else's header is believed (it is not valid DICOM and the association fails).

The header is parsed field by field (no regular expressions), with its length bounded before
it is read: version 1 is at most 107 bytes, version 2 at most 16 + 536.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import threading
import time
from typing import Any

from imageshare.domain.errors import ConfigurationError

log = logging.getLogger("imageshare.dicom")

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107
V2_MAX_ADDRESSES = 536
HEADER_SECONDS = 10.0

Address = tuple[str, int]


def _plain(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The address as the host check compares it: an IPv4-mapped IPv6 address (how a
    dual-stack socket shows an IPv4 peer) as its IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class ProxyHeaderError(Exception):
    """The connection does not start with a valid PROXY protocol header."""


def _receive(sock: socket.socket, count: int, deadline: float | None = None) -> bytes:
    """Exactly ``count`` raw bytes (before any TLS layer: the socket's own recv), all of them
    by ``deadline`` (a ``time.monotonic()`` value) when one is given."""
    data = b""
    while len(data) < count:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProxyHeaderError("the PROXY header did not arrive in time")
            sock.settimeout(remaining)
        piece = socket.socket.recv(sock, count - len(data))
        if not piece:
            raise ProxyHeaderError("the connection closed before the PROXY header ended")
        data += piece
    return data


def read_proxy_header(sock: socket.socket, seconds: float | None = None) -> Address | None:
    """The address and port the balancer's client connected from, read from the PROXY
    header at the start of ``sock`` (all of it within ``seconds`` when given: a balancer
    sends it at once); None when the header names none (v1 ``UNKNOWN``, v2 ``LOCAL``, such
    as the balancer's own health checks). ProxyHeaderError otherwise."""
    deadline = None if seconds is None else time.monotonic() + seconds
    head = _receive(sock, 12, deadline)
    if head == V2_SIGNATURE:
        return _version_2(sock, deadline)
    if head.startswith(b"PROXY "):
        return _version_1(sock, head, deadline)
    raise ProxyHeaderError("no PROXY protocol header")


def _version_1(sock: socket.socket, line: bytes, deadline: float | None) -> Address | None:
    while not line.endswith(b"\r\n"):
        if len(line) >= V1_MAX:
            raise ProxyHeaderError("the PROXY header is too long")
        line += _receive(sock, 1, deadline)
    try:
        fields = line[:-2].decode("ascii").split(" ")
    except UnicodeDecodeError as exc:
        raise ProxyHeaderError("the PROXY header is not ASCII") from exc
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return None
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("the PROXY header is not TCP4, TCP6 or UNKNOWN")
    version = 4 if fields[1] == "TCP4" else 6
    try:
        source, destination = (ipaddress.ip_address(field) for field in fields[2:4])
    except ValueError as exc:
        raise ProxyHeaderError("the PROXY header's addresses are not valid") from exc
    ports = [int(field) if field.isdigit() and len(field) <= 5 else -1 for field in fields[4:6]]
    if (source.version != version or destination.version != version
            or not all(0 <= port <= 65535 for port in ports)):
        raise ProxyHeaderError("the PROXY header's addresses or ports are not valid")
    return _plain(source), ports[0]


def _version_2(sock: socket.socket, deadline: float | None) -> Address | None:
    command, family, length = struct.unpack("!BBH", _receive(sock, 4, deadline))
    if command >> 4 != 2 or command & 0x0F not in (0, 1):
        raise ProxyHeaderError("the PROXY header's version or command is not valid")
    if length > V2_MAX_ADDRESSES:
        raise ProxyHeaderError("the PROXY header is too long")
    body = _receive(sock, length, deadline)
    if command & 0x0F == 0:  # LOCAL: the balancer itself (a health check)
        return None
    if family in (0x11, 0x21) and length < (12 if family == 0x11 else 36):
        raise ProxyHeaderError("the PROXY header is shorter than its addresses")
    if family == 0x11:  # TCP over IPv4
        return socket.inet_ntop(socket.AF_INET, body[:4]), struct.unpack("!H", body[8:10])[0]
    if family == 0x21:  # TCP over IPv6
        return (_plain(ipaddress.IPv6Address(body[:16])),
                struct.unpack("!H", body[32:34])[0])
    return None  # unspecified, UDP or a UNIX socket: no address to name


def trusted_networks(setting: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The networks of ``IMAGESHARE_TRUSTED_PROXIES`` (addresses or CIDR; ``*``, anyone,
    and ``0.0.0.0/0`` or ``::/0``, the same, are refused: a PROXY header from anyone would
    let a caller name any address)."""
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for item in (part.strip() for part in setting.split(",")):
        if item == "*":  # anyone could name any address: the host check would mean nothing
            raise ConfigurationError("trusted_proxies '*' cannot be used with "
                                     "dicom_proxy_protocol: name the load balancers")
        if item:
            try:
                network = ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ConfigurationError(
                    f"trusted_proxies: {item[:64]!r} is not an address or network") from exc
            if network.prefixlen == 0:  # every address: the same as '*'
                raise ConfigurationError(
                    f"trusted_proxies {item[:64]!r} (every address) cannot be used with "
                    "dicom_proxy_protocol: name the load balancers")
            networks.append(network)
    return networks


class _ProxyProtocolInThread:
    """Mix-in for a pynetdicom association server: the PROXY header of a connection from a
    trusted proxy is read in the association's own thread (the acceptor only accepts)."""

    trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Read the PROXY header (from a trusted proxy), then serve as from its source."""
        try:
            peer = ipaddress.ip_address(_plain(ipaddress.ip_address(client_address[0])))
        except ValueError:
            peer = None
        if peer is not None and any(peer in network for network in self.trusted):
            try:
                previous = request.gettimeout()
                source = read_proxy_header(request, HEADER_SECONDS)
                request.settimeout(previous)
            except (ProxyHeaderError, OSError) as exc:
                log.info("DICOM connection from proxy %s closed: %s", client_address[0],
                         exc if isinstance(exc, ProxyHeaderError) else type(exc).__name__)
                self.shutdown_request(request)  # type: ignore[attr-defined]  # mixin
                return
            if source is None:  # the balancer's own check: nothing to serve
                self.shutdown_request(request)  # type: ignore[attr-defined]  # mixin
                return
            client_address = source
        super().process_request_thread(request, client_address)  # type: ignore[misc]  # mixin


_classes: dict[tuple[type, str], type] = {}
_lock = threading.Lock()


def proxy_server_class(base: type, trusted_proxies: str) -> type:
    """``base`` (a pynetdicom association server class) reading the PROXY protocol from
    ``trusted_proxies`` (the setting's text)."""
    with _lock:
        if (base, trusted_proxies) not in _classes:
            _classes[(base, trusted_proxies)] = type(
                f"Proxied{base.__name__}", (_ProxyProtocolInThread, base),
                {"trusted": trusted_networks(trusted_proxies)})
        return _classes[(base, trusted_proxies)]
