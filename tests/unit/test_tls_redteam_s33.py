"""Red team of DICOM TLS (BCP 195, PS3.15 B.9), the PROXY protocol and the TLS settings, with
real handshakes on loopback: slow peers are let go at a deadline, idle handshakes cannot take
a thread each, BCP 195 is what the DICOM TLS port speaks, and certificates that cannot work
are refused at start with the reason."""

from __future__ import annotations

import datetime
import socket
import socketserver
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from imageshare.dicom import proxy_protocol
from imageshare.dicom.proxy_protocol import (
    V2_SIGNATURE,
    ProxyHeaderError,
    proxy_server_class,
    read_proxy_header,
)
from imageshare.dicom.tls_server import tls_server_class
from imageshare.domain.errors import ConfigurationError
from imageshare.settings import load_settings
from imageshare.tls import check_tls_settings, exposure_warnings, server_context

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Identity:
    """PEM files of a key and its certificate."""

    key: Path
    cert: Path


def _write(folder: Path, name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate,
           password: bytes | None = None) -> Identity:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption())
    key_path, cert_path = folder / f"{name}.key", folder / f"{name}.crt"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8, encryption))
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Identity(key_path, cert_path)


def _certificate(name: str, key: ec.EllipticCurvePrivateKey,
                 issuer: tuple[str, ec.EllipticCurvePrivateKey] | None = None,
                 start: datetime.datetime = NOW - DAY,
                 end: datetime.datetime = NOW + DAY) -> x509.Certificate:
    issuer_name, issuer_key = issuer or (name, key)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end))
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None),
                                        critical=True)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                               ExtendedKeyUsageOID.CLIENT_AUTH]),
                        critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class Pki:
    """A CA and what it signed, plus identities that must not be accepted."""

    folder: Path
    ca: Path
    server: Identity
    client: Identity
    expired_client: Identity
    rogue_client: Identity
    self_signed: Identity

    def make(self, name: str, *, start: datetime.datetime = NOW - DAY,
             end: datetime.datetime = NOW + DAY, password: bytes | None = None) -> Identity:
        """Another identity signed by the CA."""
        ca_key = serialization.load_pem_private_key(
            (self.folder / "ca.key").read_bytes(), password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(name, key, ("ca", ca_key), start, end)
        return _write(self.folder, name, key, cert, password)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _write(folder, "ca", ca_key, _certificate("ca", ca_key))
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    _write(folder, "rogue-ca", rogue_key, _certificate("rogue-ca", rogue_key))

    def signed(name: str, by: tuple[str, ec.EllipticCurvePrivateKey] = ("ca", ca_key),
               **dates: Any) -> Identity:
        key = ec.generate_private_key(ec.SECP256R1())
        return _write(folder, name, key, _certificate(name, key, by, **dates))

    alone = ec.generate_private_key(ec.SECP256R1())
    return Pki(folder, ca.cert, signed("server"), signed("client"),
               signed("expired", start=NOW - 3 * DAY, end=NOW - DAY),
               signed("rogue", ("rogue-ca", rogue_key)),
               _write(folder, "alone", alone, _certificate("alone", alone)))


def _settings(pki: Pki, **values: Any) -> Any:
    base = {"tls_certificate": str(pki.server.cert), "tls_private_key": str(pki.server.key),
            "tls_ca_file": str(pki.ca), "dicom_tls_port": 2762}
    return load_settings({**base, **values}, environ={})


def _serve(server_class: type, context: ssl.SSLContext | None) -> Iterator[Any]:
    ae = AE(ae_title="IMAGESHARE")
    ae.add_supported_context(Verification)
    ae.network_timeout = ae.acse_timeout = 5
    server = ae.make_server(("127.0.0.1", 0), server_class=server_class, ssl_context=context)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        socketserver.BaseServer.shutdown(server)  # made with make_server: not listed by the AE
        server.server_close()


@pytest.fixture
def tls_listener(pki: Pki) -> Iterator[Any]:
    """A DICOM TLS listener as ImageShare's (client certificates required), with a 1.5 s
    handshake deadline and at most 2 handshakes pending from one address."""
    quick = type("Quick", (tls_server_class(ThreadedAssociationServer),),
                 {"handshake_seconds": 1.5, "pending_per_address": 2})
    context = server_context(_settings(pki), require_client_certificate=True)
    yield from _serve(quick, context)


def _port(server: Any) -> int:
    return int(server.server_address[1])


def _client_context(pki: Pki, identity: Identity | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if identity is not None:
        context.load_cert_chain(str(identity.cert), str(identity.key))
    return context


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the peer closed ``sock`` within ``seconds`` (while we keep it open)."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _echo(port: int, context: ssl.SSLContext) -> bool:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="IMAGESHARE",
                         tls_args=(context, "localhost"))
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status and status.Status == 0)


def _client_hello() -> bytes:
    """The bytes of a real TLS ClientHello (Python's ssl, in memory)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.create_default_context()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# --- BCP 195 on the DICOM TLS port -------------------------------------------------------

def test_the_dicom_tls_port_echoes_with_a_certificate_of_the_configured_authority(
        tls_listener: Any, pki: Pki) -> None:
    assert _echo(_port(tls_listener), _client_context(pki, pki.client))


@pytest.mark.parametrize("who", ["rogue_client", "expired_client", "self_signed", None])
def test_certificates_not_chaining_to_the_authority_or_not_valid_now_are_refused(
        tls_listener: Any, pki: Pki, who: str | None) -> None:
    identity = getattr(pki, who) if who else None
    assert not _echo(_port(tls_listener), _client_context(pki, identity))
    assert _echo(_port(tls_listener), _client_context(pki, pki.client))  # still serving


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls_before_1_2_is_refused(tls_listener: Any, pki: Pki,
                                   version: ssl.TLSVersion) -> None:
    context = _client_context(pki, pki.client)
    try:
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = version
        context.set_ciphers("ALL:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot even offer the old version")
    with socket.create_connection(("127.0.0.1", _port(tls_listener)), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, OSError)):
            context.wrap_socket(raw, server_hostname="localhost")


@pytest.mark.parametrize("ciphers", [
    "AES128-SHA:AES256-SHA:AES128-SHA256:AES256-GCM-SHA384",  # no forward secrecy
    "ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384",  # CBC
    "ECDHE-ECDSA-CHACHA20-POLY1305:DES-CBC3-SHA:@SECLEVEL=0",  # not listed; 3DES
])
def test_tls_1_2_suites_outside_bcp_195_are_refused(tls_listener: Any, pki: Pki,
                                                   ciphers: str) -> None:
    context = _client_context(pki, pki.client)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.set_ciphers(ciphers)
    except ssl.SSLError:
        pytest.skip("this OpenSSL offers none of them")
    with socket.create_connection(("127.0.0.1", _port(tls_listener)), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, OSError)):
            context.wrap_socket(raw, server_hostname="localhost")


def test_the_server_chooses_the_suite_and_renegotiation_is_off(pki: Pki) -> None:
    context = server_context(_settings(pki), require_client_certificate=True)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert context.options & ssl.OP_NO_RENEGOTIATION
    assert context.options & ssl.OP_NO_COMPRESSION
    for suite in context.get_ciphers():
        assert suite["aead"] or suite["protocol"] == "TLSv1.3", suite["name"]
        assert suite["kea"] in ("kx-ecdhe", "kx-dhe", "kx-any"), suite["name"]


# --- peers that never finish ------------------------------------------------------------

def test_a_peer_dripping_its_client_hello_is_let_go_at_the_handshake_deadline(
        tls_listener: Any, pki: Pki) -> None:
    hello = _client_hello()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", _port(tls_listener)), timeout=5) as sock:
        closed = False
        for byte in hello[:-1]:  # a byte every 0.3 s: each read is well within 1.5 s
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            if _closed_within(sock, 0.3):
                closed = True
                break
            if time.monotonic() - started > 6:
                break
    assert closed, "the handshake went on past its deadline"
    assert time.monotonic() - started < 4
    assert _echo(_port(tls_listener), _client_context(pki, pki.client))


def test_idle_handshakes_from_one_address_are_bounded_and_the_next_is_closed_at_once(
        tls_listener: Any, pki: Pki) -> None:
    port = _port(tls_listener)
    with socket.create_connection(("127.0.0.1", port)) as one, \
            socket.create_connection(("127.0.0.1", port)) as two:
        time.sleep(0.3)  # both are waiting for a handshake
        with socket.create_connection(("127.0.0.1", port)) as three:
            assert _closed_within(three, 1.0)
        assert not _closed_within(one, 0.1) and not _closed_within(two, 0.1)
    time.sleep(0.2)
    assert _echo(port, _client_context(pki, pki.client))  # the slots were given back


def test_plain_dicom_on_the_tls_port_is_refused_at_once(tls_listener: Any) -> None:
    associate_rq = bytes.fromhex("01000000004a00010000") + b"IMAGESHARE      " + b"ECHOSCU         "
    with socket.create_connection(("127.0.0.1", _port(tls_listener)), timeout=5) as sock:
        sock.sendall(associate_rq + bytes(32))
        started = time.monotonic()
        assert _closed_within(sock, 3)
        assert time.monotonic() - started < 3


# --- the PROXY protocol ---------------------------------------------------------------

@pytest.fixture
def proxied_listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A plain DICOM listener that reads the PROXY header from 127.0.0.1 within 1 s."""
    monkeypatch.setattr(proxy_protocol, "HEADER_SECONDS", 1.0)
    yield from _serve(proxy_server_class(ThreadedAssociationServer, "127.0.0.1"), None)


def test_a_proxy_header_dripped_a_byte_at_a_time_is_let_go_at_the_deadline(
        proxied_listener: Any) -> None:
    header = b"PROXY TCP4 192.0.2.7 192.0.2.1 40000 104\r\n"
    started = time.monotonic()
    closed = False
    with socket.create_connection(("127.0.0.1", _port(proxied_listener)), timeout=5) as sock:
        for byte in header[:-1]:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            if _closed_within(sock, 0.25):
                closed = True
                break
    assert closed, "the PROXY header was waited for past its deadline"
    assert time.monotonic() - started < 3


def _read(data: bytes) -> tuple[str, int] | None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(data)
        theirs.shutdown(socket.SHUT_WR)
        ours.settimeout(5)
        return read_proxy_header(ours)


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 192.0.2.7 not-an-address 40000 104\r\n",
    b"PROXY TCP4 192.0.2.7 2001:db8::1 40000 104\r\n",
    b"PROXY TCP4 192.0.2.7 192.0.2.1 40000 99999\r\n",
    b"PROXY TCP4 192.0.2.7 192.0.2.1 40000 x\r\n",
    b"PROXY TCP4 192.0.2.7 192.0.2.1 000000040000 104\r\n",
])
def test_a_version_1_header_with_a_broken_destination_or_port_is_refused(line: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        _read(line)


@pytest.mark.parametrize(("family", "length"), [(0x11, 4), (0x21, 12)])
def test_a_version_2_proxy_header_shorter_than_its_addresses_is_refused(
        family: int, length: int) -> None:
    with pytest.raises(ProxyHeaderError):
        _read(V2_SIGNATURE + struct.pack("!BBH", 0x21, family, length) + bytes(length))


def test_well_formed_proxy_headers_still_name_the_client() -> None:
    assert _read(b"PROXY TCP4 192.0.2.7 192.0.2.1 40000 104\r\n") == ("192.0.2.7", 40000)
    assert _read(b"PROXY TCP6 2001:db8::7 2001:db8::1 1 104\r\n") == ("2001:db8::7", 1)
    body = socket.inet_aton("192.0.2.7") + socket.inet_aton("192.0.2.1") + struct.pack(
        "!HH", 40000, 104)
    assert _read(V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 12) + body) == (
        "192.0.2.7", 40000)


def test_a_trusted_proxy_seen_through_a_dual_stack_socket_is_still_trusted() -> None:
    """Listening on "::", an IPv4 balancer connects as ::ffff:a.b.c.d; its header is read,
    and IPv4-mapped sources are named as IPv4 (as the registered host resolves)."""
    seen: list[Any] = []

    class Served:
        def process_request_thread(self, request: Any, client_address: Any) -> None:
            seen.append(client_address)

        def shutdown_request(self, request: Any) -> None:
            seen.append("closed")

    server = proxy_server_class(Served, "127.0.0.1")()
    for header in (b"PROXY TCP4 192.0.2.7 192.0.2.1 40000 104\r\n",
                   b"PROXY TCP6 ::ffff:192.0.2.8 ::ffff:192.0.2.1 40001 104\r\n"):
        ours, theirs = socket.socketpair()
        with ours, theirs:
            theirs.sendall(header)
            server.process_request_thread(ours, ("::ffff:127.0.0.1", 5000))
    assert seen == [("192.0.2.7", 40000), ("192.0.2.8", 40001)]


@pytest.mark.parametrize("setting", ["0.0.0.0/0", "10.0.0.5, ::/0", "0/0"])
def test_trusting_every_address_as_a_proxy_is_refused_like_a_star(setting: str) -> None:
    with pytest.raises(ConfigurationError):
        proxy_server_class(ThreadedAssociationServer, setting)


# --- settings refused at start ----------------------------------------------------------

def test_an_expired_or_not_yet_valid_server_certificate_is_refused_at_start(pki: Pki) -> None:
    with pytest.raises(ConfigurationError, match="expired on"):
        check_tls_settings(_settings(pki, tls_certificate=str(pki.expired_client.cert),
                                     tls_private_key=str(pki.expired_client.key)))
    future = pki.make("future", start=NOW + 3 * DAY, end=NOW + 9 * DAY)
    with pytest.raises(ConfigurationError, match="not valid before"):
        check_tls_settings(_settings(pki, tls_certificate=str(future.cert),
                                     tls_private_key=str(future.key)))
    check_tls_settings(_settings(pki))  # the valid one is accepted


def test_an_encrypted_private_key_is_refused_with_the_reason_and_never_prompts(
        pki: Pki) -> None:
    locked = pki.make("locked", password=b"secret")
    settings = _settings(pki, tls_certificate=str(locked.cert),
                         tls_private_key=str(locked.key))
    with pytest.raises(ConfigurationError, match="pass phrase"):
        check_tls_settings(settings)
    with pytest.raises(ConfigurationError, match="pass phrase"):
        server_context(settings, require_client_certificate=False)


def test_a_ca_file_without_authorities_is_refused_at_start(pki: Pki, tmp_path: Path) -> None:
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigurationError, match="tls_ca_file"):
        check_tls_settings(load_settings({"tls_ca_file": str(junk)}, environ={}))
    with pytest.raises(ConfigurationError, match="tls_ca_file"):
        check_tls_settings(_settings(pki, tls_ca_file=str(junk)))


def test_a_private_key_others_can_read_is_warned_about(pki: Pki, tmp_path: Path) -> None:
    shared = pki.make("shared", end=NOW + 90 * DAY)
    settings = _settings(pki, tls_certificate=str(shared.cert),
                         tls_private_key=str(shared.key))
    assert not any("tls_private_key" in line for line in exposure_warnings(settings))
    shared.key.chmod(0o644)
    assert any("chmod 600" in line for line in exposure_warnings(settings))


def test_a_certificate_about_to_expire_is_warned_about_at_start(pki: Pki) -> None:
    settings = _settings(pki)  # expires in a day
    assert any(line.startswith("tls_certificate expires on")
               for line in exposure_warnings(settings))
    lasting = pki.make("lasting", end=NOW + 90 * DAY)
    assert exposure_warnings(_settings(pki, tls_certificate=str(lasting.cert),
                                       tls_private_key=str(lasting.key))) == []


def test_a_peer_that_shakes_hands_then_says_nothing_is_let_go(tls_listener: Any,
                                                              pki: Pki) -> None:
    context = _client_context(pki, pki.client)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", _port(tls_listener)), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as conn:
        conn.settimeout(15)
        try:
            assert conn.recv(1) == b""
        except (ConnectionResetError, ssl.SSLError):
            pass
    assert time.monotonic() - started < 12  # the listener's ARTIM / network timeout is 5 s
