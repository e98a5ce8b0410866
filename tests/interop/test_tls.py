"""TLS with real peers: HTTPS, DICOM TLS (BCP 195) from DCMTK and Orthanc, and ImageShare's own
DICOM TLS to Orthanc, with a throwaway openssl CA."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time

import httpx
import pytest
from pydicom import dcmread

from imageshare.dicom.scu import DimseSites
from imageshare.domain.errors import SiteUnreachable
from imageshare.exchange.nodes import Node
from imageshare.exchange.sites import RetrieveProgress
from imageshare.settings import load_settings
from imageshare.tls import client_context
from tests.conftest import require, require_tool
from tests.factory import ct_series
from tests.peers import OrthancServer, RunningServer, free_port, wait_for_port
from tests.pki import make_pki

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    require_tool("openssl")
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(pki, tmp_path_factory):
    """ImageShare with HTTPS and a DICOM TLS port that requires client certificates; its plain
    DICOM port listens beyond loopback (to be warned about)."""
    folder = tmp_path_factory.mktemp("tls-server")
    tls_port = free_port()
    server = RunningServer(folder / "data", scheme="https", ca_file=str(pki.ca), extra_env={
        "IMAGESHARE_TLS_CERTIFICATE": str(pki.server.cert),
        "IMAGESHARE_TLS_PRIVATE_KEY": str(pki.server.key),
        "IMAGESHARE_TLS_CA_FILE": str(pki.ca),
        "IMAGESHARE_DICOM_TLS_PORT": str(tls_port),
        "IMAGESHARE_DICOM_HOST": "0.0.0.0",
        "IMAGESHARE_DICOM_PROCESSES": "1",
    })
    server.tls_port = tls_port
    server.start()
    wait_for_port(tls_port)
    server.cli("node", "add", "ECHOSCU", "--host", "127.0.0.1", "--port", "104")
    # STORESCU is one of the modalities every test server registers
    yield server
    server.stop()


def _tls(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def _dcmtk_tls(tool: str, pki, identity, port: int, *files: str):
    return _tls(require_tool(tool), "+tls", str(identity.key), str(identity.cert),
                "+cf", str(pki.ca), "-aec", "IMAGESHARE", "127.0.0.1", str(port), *files)


def test_https_speaks_bcp195_only(tls_server, pki):
    with tls_server.http() as client:
        assert client.get("/healthz").json()["status"] == "ok"
    context = ssl.create_default_context(cafile=str(pki.ca))
    with socket.create_connection(("127.0.0.1", tls_server.http_port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as conn:
        assert conn.version() in ("TLSv1.2", "TLSv1.3")
    weak = ssl.create_default_context(cafile=str(pki.ca))
    weak.maximum_version = ssl.TLSVersion.TLSv1_2
    weak.set_ciphers("AES128-SHA:AES256-SHA:AES128-SHA256")  # no forward secrecy, no AEAD
    with socket.create_connection(("127.0.0.1", tls_server.http_port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            weak.wrap_socket(raw, server_hostname="localhost")
    with pytest.raises(httpx.HTTPError):  # plain HTTP is not answered
        httpx.get(f"http://127.0.0.1:{tls_server.http_port}/healthz", timeout=5)


def test_a_plain_dicom_port_beyond_loopback_is_warned_about_at_start(tls_server):
    log = tls_server.log_path.read_text()
    assert "WARNING: DICOM listens on 0.0.0.0" in log
    assert "WARNING: HTTP listens" not in log


def test_dcmtk_echoes_and_stores_over_dicom_tls_with_a_client_certificate(
        tls_server, pki, tmp_path):
    echo = _dcmtk_tls("echoscu", pki, pki.client, tls_server.tls_port)
    assert echo.returncode == 0, echo.stderr
    path = ct_series(tmp_path / "ct", count=1, size=32, patient_id="TLS1")[0]
    store = _dcmtk_tls("storescu", pki, pki.client, tls_server.tls_port, str(path))
    assert store.returncode == 0, store.stderr
    with tls_server.http() as client:
        found = client.get("/dicomweb/instances",
                           params={"SOPInstanceUID": dcmread(path).SOPInstanceUID})
        assert found.status_code == 200


def test_dicom_tls_refuses_peers_without_a_trusted_certificate(tls_server, pki):
    rogue = _dcmtk_tls("echoscu", pki, pki.rogue, tls_server.tls_port)
    assert rogue.returncode != 0
    anonymous = _tls(require_tool("echoscu"), "+tla", "+cf", str(pki.ca), "-aec", "IMAGESHARE",
                     "127.0.0.1", str(tls_server.tls_port))
    assert anonymous.returncode != 0
    plain = _tls(require_tool("echoscu"), "-to", "5", "-aec", "IMAGESHARE", "127.0.0.1",
                 str(tls_server.tls_port))
    assert plain.returncode != 0


def test_a_silent_peer_does_not_hold_up_other_tls_associations(tls_server, pki):
    with socket.create_connection(("127.0.0.1", tls_server.tls_port)):
        time.sleep(0.2)  # connected, never says a word
        started = time.monotonic()
        echo = _dcmtk_tls("echoscu", pki, pki.client, tls_server.tls_port)
        assert echo.returncode == 0, echo.stderr
        assert time.monotonic() - started < 10


@pytest.fixture(scope="module")
def tls_orthanc(tls_server, pki, tmp_path_factory):
    """Orthanc with DICOM TLS (client certificates required), knowing ImageShare's TLS port;
    registered at ImageShare as a TLS node."""
    require(shutil.which("Orthanc") is not None, "Orthanc (Debian package orthanc)")
    orthanc = OrthancServer(tmp_path_factory.mktemp("orthanc"))
    orthanc.start(
        {"IMAGESHARE": {"AET": "IMAGESHARE", "Host": "127.0.0.1", "Port": tls_server.tls_port,
                        "UseDicomTls": True}},
        extra={"DicomTlsEnabled": True, "DicomTlsCertificate": str(pki.orthanc.cert),
               "DicomTlsPrivateKey": str(pki.orthanc.key),
               "DicomTlsTrustedCertificates": str(pki.ca),
               "DicomTlsRemoteCertificateRequired": True},
    )
    tls_server.cli("node", "add", "ORTHANC", "--host", "127.0.0.1", "--port",
                   str(orthanc.dicom_port), "--tls", "--replace")
    yield orthanc
    orthanc.stop()


def test_orthanc_stores_over_dicom_tls_and_imageshare_moves_back_over_tls(
        tls_server, tls_orthanc, tmp_path):
    path = ct_series(tmp_path / "ct", count=1, size=32, patient_id="TLS2")[0]
    ds = dcmread(path)
    with tls_orthanc.http() as orthanc:
        orthanc_id = orthanc.post("/instances", content=path.read_bytes()).json()["ID"]
        stored = orthanc.post("/modalities/IMAGESHARE/store", content=orthanc_id)
        assert stored.status_code == 200, stored.text
        with tls_server.http() as client:
            found = client.get("/dicomweb/instances",
                               params={"SOPInstanceUID": ds.SOPInstanceUID})
            assert found.status_code == 200
        orthanc.delete(f"/instances/{orthanc_id}")
        assert orthanc.get("/instances").json() == []
        moved = orthanc.post("/modalities/IMAGESHARE/move", json={
            "Level": "Study", "Resources": [{"StudyInstanceUID": ds.StudyInstanceUID}],
            "TargetAet": "ORTHANC"})
        assert moved.status_code == 200, moved.text
        assert len(orthanc.get("/instances").json()) == 1


def test_imageshare_finds_and_sends_to_a_node_over_dicom_tls(pki, tls_orthanc, tmp_path):
    settings = load_settings({
        "tls_certificate": str(pki.server.cert), "tls_private_key": str(pki.server.key),
        "tls_ca_file": str(pki.ca)}, environ={})
    sites = DimseSites("IMAGESHARE", 20, client_context(settings))
    node = Node("ORTHANC", "127.0.0.1", tls_orthanc.dicom_port, tls=True)
    path = ct_series(tmp_path / "ct", count=1, size=32, patient_id="TLS3")[0]
    sent = sites.send(node, [path], lambda _progress: None)
    assert sent == RetrieveProgress(1, 1, 0)
    found = sites.find_studies(node, {"PatientID": "TLS3"}, 20)
    assert [f["0020000D"]["Value"][0] for f in found] == [dcmread(path).StudyInstanceUID]
    untrusting = DimseSites("IMAGESHARE", 20, ssl.create_default_context())
    with pytest.raises(SiteUnreachable):
        untrusting.find_studies(node, {"PatientID": "TLS3"}, 20)
    plain = Node("ORTHANC", "127.0.0.1", tls_orthanc.dicom_port)
    with pytest.raises(SiteUnreachable):
        sites.find_studies(plain, {"PatientID": "TLS3"}, 5)


def test_dicomweb_sites_over_https_are_checked_against_the_configured_authorities(
        tls_server, pki, tmp_path):
    from imageshare.dicom.dicomweb_site import DicomwebSites

    tls_server.cli("user", "add", "partner", "--role", "radiographer", "--password",
                   "partner-password")
    path = ct_series(tmp_path / "ct", count=1, size=32, patient_id="TLS4")[0]
    _dcmtk_tls("storescu", pki, pki.client, tls_server.tls_port, str(path))
    site = Node("PARTNER", "127.0.0.1", 104, dicomweb_url=tls_server.dicomweb,
                dicomweb_auth="partner:partner-password")
    settings = load_settings({"tls_ca_file": str(pki.ca)}, environ={})
    trusting = DicomwebSites(lambda _stream: None, tls=client_context(settings))
    found = trusting.find_studies(site, {"PatientID": "TLS4"}, 20)
    assert [f["0020000D"]["Value"][0] for f in found] == [dcmread(path).StudyInstanceUID]
    untrusting = DicomwebSites(lambda _stream: None,
                               tls=client_context(load_settings({}, environ={})))
    with pytest.raises(SiteUnreachable):
        untrusting.find_studies(site, {"PatientID": "TLS4"}, 20)


def test_a_decompression_bomb_sent_by_c_store_is_refused_with_the_reason(
        tls_server, pki, tmp_path):
    from pynetdicom import AE, _config

    from tests.oversized import rle_bomb

    bomb = rle_bomb(tmp_path / "bomb.dcm", 65535, 65535, real=False)
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.1.2.5")
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", tls_server.tls_port, ae_title="IMAGESHARE",
                             tls_args=(context, "localhost"))
        assert assoc.is_established
        status = assoc.send_c_store(bomb)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    assert status.Status & 0xF000 in (0xA000, 0xC000), hex(status.Status)
    assert "decoded" in status.ErrorComment
    with tls_server.http() as client:
        found = client.get("/dicomweb/instances", params={"PatientID": "BOMB1"})
        assert (found.status_code, found.json()) == (200, [])
