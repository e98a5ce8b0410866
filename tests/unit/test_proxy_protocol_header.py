"""The PROXY protocol header a TCP load balancer puts before a DICOM association: versions 1
and 2 read to the client's address; anything else, or too long, is refused."""

from __future__ import annotations

import socket
import struct

import pytest

from imageshare.dicom.proxy_protocol import (
    V2_SIGNATURE,
    ProxyHeaderError,
    read_proxy_header,
    trusted_networks,
)
from imageshare.domain.errors import ConfigurationError


def _read(data: bytes) -> tuple[tuple[str, int] | None, bytes]:
    """The header read from a connection that sent ``data`` (then an A-ASSOCIATE-RQ's first
    bytes), and what is left for DICOM."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(data + b"\x01\x00")
        theirs.shutdown(socket.SHUT_WR)
        ours.settimeout(5)
        found = read_proxy_header(ours)
        return found, ours.recv(16)


def _v2(command: int, family: int, addresses: bytes) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", command, family, len(addresses)) + addresses


def test_version_1_names_the_client_and_leaves_dicom_untouched():
    assert _read(b"PROXY TCP4 10.1.2.3 10.0.0.1 40000 104\r\n") == (("10.1.2.3", 40000),
                                                                      b"\x01\x00")
    assert _read(b"PROXY TCP6 2001:db8::7 2001:db8::1 5000 104\r\n")[0] == ("2001:db8::7", 5000)
    assert _read(b"PROXY UNKNOWN\r\n")[0] is None  # the balancer's own check


def test_version_2_names_the_client_of_tcp4_and_tcp6_and_none_for_local():
    four = socket.inet_aton("192.168.9.4") + socket.inet_aton("10.0.0.1") + struct.pack(
        "!HH", 51000, 104)
    assert _read(_v2(0x21, 0x11, four)) == (("192.168.9.4", 51000), b"\x01\x00")
    six = (socket.inet_pton(socket.AF_INET6, "fd00::9") + socket.inet_pton(
        socket.AF_INET6, "fd00::1") + struct.pack("!HH", 6000, 104))
    assert _read(_v2(0x21, 0x21, six))[0] == ("fd00::9", 6000)
    assert _read(_v2(0x20, 0x00, b""))[0] is None


@pytest.mark.parametrize("data", [
    b"\x01\x00\x00\x00\x00\xcd\x00\x01ORTHANC         ",  # DICOM without a header
    b"PROXY TCP4 10.1.2.3 10.0.0.1 40000\r\n",  # a field missing
    b"PROXY TCP4 not-an-address 10.0.0.1 1 104\r\n",
    b"PROXY TCP4 10.1.2.3 10.0.0.1 99999 104\r\n",
    b"PROXY TCP6 10.1.2.3 10.0.0.1 1 104\r\n",  # family and address disagree
    b"PROXY TCP4 " + b"1" * 200 + b"\r\n",  # longer than version 1 allows
    V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 4000),  # longer than version 2 allows
    V2_SIGNATURE + struct.pack("!BBH", 0x31, 0x11, 12),  # not version 2
    b"PROXY TCP4 10.1.2.3",  # cut off
])
def test_anything_else_is_refused(data):
    with pytest.raises(ProxyHeaderError):
        _read(data)


def test_trusted_proxies_are_addresses_or_networks_and_a_typo_is_a_clear_error():
    networks = trusted_networks("127.0.0.1, 10.20.0.0/16,::1")
    assert len(networks) == 3
    with pytest.raises(ConfigurationError, match="not an address"):
        trusted_networks("127.0.0.1,lb.example")
