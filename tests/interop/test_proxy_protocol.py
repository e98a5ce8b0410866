"""DICOM behind a TCP load balancer (HAProxy, Debian's) sending the PROXY protocol: the
listener serves each association as coming from the balancer's client, so a registered AE is
still accepted only from its own host, and the balancer's own address proves nothing."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests.conftest import require_tool
from tests.factory import ct_series
from tests.peers import RunningServer, free_port, wait_for_port

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def behind_haproxy(tmp_path_factory) -> Iterator[tuple[RunningServer, int]]:
    """An instance trusting 127.0.0.1 for the PROXY protocol, with HAProxy on 127.0.0.1 in
    front of its DICOM port (send-proxy-v2), and the AE VIAPROXY registered at 127.0.0.2."""
    haproxy = require_tool("haproxy")
    folder = tmp_path_factory.mktemp("proxy")
    server = RunningServer(folder / "data", modalities=(), extra_env={
        "IMAGESHARE_DICOM_PROXY_PROTOCOL": "true", "IMAGESHARE_TRUSTED_PROXIES": "127.0.0.1",
        "IMAGESHARE_DICOM_PROCESSES": "1"})
    server.register("VIAPROXY", host="127.0.0.2")
    server.start()
    try:
        with _haproxy(haproxy, folder, server.dicom_port, "send-proxy-v2") as front:
            yield server, front
    finally:
        server.stop()


@contextmanager
def _haproxy(haproxy: str, folder: Path, port: int, send: str) -> Iterator[int]:
    """HAProxy on 127.0.0.1 passing TCP to ``port`` with its PROXY header (``send``:
    send-proxy or send-proxy-v2); yields the port it listens on."""
    front = free_port()
    config = folder / "haproxy.cfg"
    config.write_text(
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n"
        "  timeout server 60s\n"
        f"frontend dicom\n  bind 127.0.0.1:{front}\n  default_backend instances\n"
        f"backend instances\n  server a 127.0.0.1:{port} {send}\n")
    process = subprocess.Popen([haproxy, "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        wait_for_port(front)
        yield front
    finally:
        process.terminate()
        process.wait(10)


_SLICE: list[Path] = []


def _store(port: int, source: str, tls: Any = None) -> bool:
    """A C-STORE as VIAPROXY from the local address ``source`` (over DICOM TLS with ``tls``,
    an SSL context): accepted and stored? (Only a registered AE calling from its registered
    host may store.)"""
    if not _SLICE:
        _SLICE.extend(ct_series(Path(tempfile.mkdtemp(prefix="proxy-slice-")), 1, size=16))
    ae = AE(ae_title="VIAPROXY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="IMAGESHARE", bind_address=(source, 0),
                         tls_args=(tls, "localhost") if tls is not None else None)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_store(_SLICE[0])
        return bool(status and status.get("Status") == 0x0000)
    finally:
        assoc.release()


def test_behind_the_balancer_an_ae_is_accepted_from_its_own_host_only(behind_haproxy):
    server, front = behind_haproxy
    assert _store(front, "127.0.0.2")  # its registered host, through the balancer
    assert not _store(front, "127.0.0.3")  # another host, through the same balancer
    refused = server.cli("node", "refused").stdout
    assert "VIAPROXY" in refused and "127.0.0.3" in refused  # named by its real address


def test_a_trusted_proxy_without_its_header_is_not_served(behind_haproxy):
    server, _front = behind_haproxy
    # 127.0.0.1 is the trusted balancer: a connection from it must begin with a PROXY header
    assert not _store(server.dicom_port, "127.0.0.1")


def test_anyone_else_connects_directly_and_cannot_name_another_address(behind_haproxy):
    server, _front = behind_haproxy
    import socket

    assert _store(server.dicom_port, "127.0.0.2")  # not a proxy: served as itself
    assert not _store(server.dicom_port, "127.0.0.3")  # and checked as itself
    # a PROXY header from someone who is not a trusted proxy is not believed: it is not DICOM
    with socket.create_connection(("127.0.0.1", server.dicom_port),
                                  source_address=("127.0.0.3", 0), timeout=10) as raw:
        raw.sendall(b"PROXY TCP4 127.0.0.2 127.0.0.1 40000 104\r\n")
        try:
            answer = raw.recv(64)
        except ConnectionResetError:
            answer = b""
        assert answer == b"" or answer[:1] == b"\x07"  # closed or aborted, never accepted


def test_over_dicom_tls_the_header_comes_before_the_handshake(tmp_path_factory):
    """HAProxy passes DICOM TLS through untouched (TCP), with its PROXY header first: the
    listener reads the header, then shakes hands, then checks the modality's own host."""
    import ssl

    from tests.pki import make_pki

    haproxy = require_tool("haproxy")
    require_tool("openssl")
    folder = tmp_path_factory.mktemp("proxy-tls")
    pki = make_pki(folder / "pki")
    tls_port = free_port()
    server = RunningServer(folder / "data", scheme="https", ca_file=str(pki.ca), modalities=(),
                           extra_env={
                               "IMAGESHARE_TLS_CERTIFICATE": str(pki.server.cert),
                               "IMAGESHARE_TLS_PRIVATE_KEY": str(pki.server.key),
                               "IMAGESHARE_TLS_CA_FILE": str(pki.ca),
                               "IMAGESHARE_DICOM_TLS_PORT": str(tls_port),
                               "IMAGESHARE_DICOM_PROXY_PROTOCOL": "true",
                               "IMAGESHARE_TRUSTED_PROXIES": "127.0.0.1",
                               "IMAGESHARE_DICOM_PROCESSES": "1"})
    server.register("VIAPROXY", host="127.0.0.2")
    server.start()
    try:
        wait_for_port(tls_port)
        context = ssl.create_default_context(cafile=str(pki.ca))
        context.load_cert_chain(str(pki.client.cert), str(pki.client.key))
        with _haproxy(haproxy, folder, tls_port, "send-proxy") as front:
            assert _store(front, "127.0.0.2", context)
            assert not _store(front, "127.0.0.3", context)
    finally:
        server.stop()
