"""Revoked client certificates on the DICOM TLS port (``tls_crl_file``), with DCMTK's echoscu
as the peer and a throwaway openssl authority that issues the revocation lists."""

from __future__ import annotations

import datetime
import os
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from imageshare.domain.errors import ConfigurationError
from imageshare.settings import load_settings
from imageshare.tls import check_tls_settings, exposure_warnings
from tests.conftest import require_tool
from tests.peers import RunningServer, free_port, wait_for_port
from tests.pki import Identity, Pki, make_pki

pytestmark = pytest.mark.interop

NOW = datetime.datetime.now(datetime.UTC)


def _crl(issuer: Identity, revoked: list[Identity], issued: datetime.datetime,
         next_update: datetime.datetime, signer: Identity | None = None) -> bytes:
    """A PEM revocation list in the name of ``issuer`` naming ``revoked``, signed with the key
    of ``signer`` (the issuer itself unless said)."""
    name = x509.load_pem_x509_certificate(issuer.cert.read_bytes()).subject
    key = serialization.load_pem_private_key((signer or issuer).key.read_bytes(), password=None)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(name)
               .last_update(issued).next_update(next_update))
    for identity in revoked:
        serial = x509.load_pem_x509_certificate(identity.cert.read_bytes()).serial_number
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial)
            .revocation_date(issued).build())
    return builder.sign(key, hashes.SHA256()).public_bytes(  # type: ignore[arg-type]
        serialization.Encoding.PEM)


def _authority(pki: Pki, name: str = "test-ca") -> Identity:
    return Identity(pki.ca.parent / f"{name}.key", pki.ca.parent / f"{name}.crt")


def _replace(path: Path, data: bytes) -> None:
    """Write ``path`` the way an operator's renewal job should: a new file renamed over."""
    temporary = path.with_suffix(".new")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def tls_server(pki: Pki, data: Path, crl: Path, tls_port: int) -> RunningServer:
    """A server (not started) whose DICOM TLS port ``tls_port`` requires client certificates
    of ``pki``'s authority and checks them against the lists in ``crl``."""
    return RunningServer(data, extra_env={
        "IMAGESHARE_TLS_CERTIFICATE": str(pki.server.cert),
        "IMAGESHARE_TLS_PRIVATE_KEY": str(pki.server.key),
        "IMAGESHARE_TLS_CA_FILE": str(pki.ca),
        "IMAGESHARE_TLS_CRL_FILE": str(crl),
        "IMAGESHARE_HTTP_TLS": "false",
        "IMAGESHARE_DICOM_TLS_PORT": str(tls_port),
        "IMAGESHARE_DICOM_PROCESSES": "1",
    })


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    require_tool("openssl")
    return make_pki(tmp_path_factory.mktemp("pki"))


def _echo(pki: Pki, identity: Identity, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("echoscu"), "+tls", str(identity.key),
                           str(identity.cert), "+cf", str(pki.ca), "-aec", "IMAGESHARE",
                           "127.0.0.1", str(port)], capture_output=True, text=True,
                          timeout=60)


def test_a_revoked_client_certificate_is_refused_and_a_new_list_counts_without_a_restart(
        pki, tmp_path):
    """A modality whose certificate the hospital's authority revoked (a stolen laptop, a
    decommissioned scanner) still had its associations on the DICOM TLS port accepted: only
    the signature and dates of a client certificate were checked."""
    crl = tmp_path / "hospital.crl.pem"
    crl.write_bytes(_crl(_authority(pki), [pki.client], NOW - datetime.timedelta(minutes=5),
                         NOW + datetime.timedelta(days=7)))
    tls_port = free_port()
    server = tls_server(pki, tmp_path / "data", crl, tls_port)
    server.start()
    try:
        wait_for_port(tls_port)
        server.cli("node", "add", "ECHOSCU", "--host", "127.0.0.1", "--port", "104")
        revoked = _echo(pki, pki.client, tls_port)
        assert revoked.returncode != 0, revoked.stdout
        kept = _echo(pki, pki.orthanc, tls_port)
        assert kept.returncode == 0, kept.stdout + kept.stderr
        # The authority revokes the second certificate too; the running server reads the
        # renewed list at the next handshake.
        _replace(crl, _crl(_authority(pki), [pki.client, pki.orthanc],
                           NOW - datetime.timedelta(minutes=1),
                           NOW + datetime.timedelta(days=7)))
        now_revoked = _echo(pki, pki.orthanc, tls_port)
        assert now_revoked.returncode != 0, now_revoked.stdout
        assert server.log_path is not None
        # Both refusals are logged, saying why (the server writes its line after the peer
        # saw the alert: wait for it a little).
        deadline = time.monotonic() + 10
        log = server.log_path.read_text()
        while log.count("certificate revoked") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            log = server.log_path.read_text()
        assert log.count("CERTIFICATE_VERIFY_FAILED (certificate revoked)") == 2, log[-3000:]
    finally:
        server.stop()


def _settings(pki: Pki, crl: Path, **values: str) -> object:
    base = {"tls_certificate": str(pki.server.cert), "tls_private_key": str(pki.server.key),
            "tls_ca_file": str(pki.ca), "dicom_tls_port": 2762, "tls_crl_file": str(crl)}
    return load_settings({**base, **values}, environ={})


def test_a_revocation_list_that_would_refuse_every_peer_or_none_is_refused_at_start(
        pki, tmp_path):
    """An out-of-date list (OpenSSL then refuses every peer of that authority), a list signed
    by an authority that is not trusted (OpenSSL cannot check it: every peer refused) and a
    file with no list at all are said at start, with what to do."""
    crl = tmp_path / "crl.pem"
    crl.write_bytes(_crl(_authority(pki), [], NOW - datetime.timedelta(days=8),
                         NOW - datetime.timedelta(days=1)))
    with pytest.raises(ConfigurationError, match="list of 'test-ca' was due to be renewed"):
        check_tls_settings(_settings(pki, crl))  # type: ignore[arg-type]
    crl.write_bytes(_crl(_authority(pki, "rogue-ca"), [], NOW - datetime.timedelta(hours=1),
                         NOW + datetime.timedelta(days=1)))
    with pytest.raises(ConfigurationError, match="not signed by an authority in tls_ca_file"):
        check_tls_settings(_settings(pki, crl))  # type: ignore[arg-type]
    crl.write_bytes(pki.server.cert.read_bytes())
    with pytest.raises(ConfigurationError, match="holds no revocation list"):
        check_tls_settings(_settings(pki, crl))  # type: ignore[arg-type]
    crl.write_bytes(_crl(_authority(pki), [], NOW - datetime.timedelta(hours=1),
                         NOW + datetime.timedelta(days=7)))
    with pytest.raises(ConfigurationError, match="needs tls_ca_file"):
        check_tls_settings(_settings(pki, crl, tls_ca_file=""))  # type: ignore[arg-type]
    check_tls_settings(_settings(pki, crl))  # type: ignore[arg-type]  # a current list is fine
    assert not [w for w in exposure_warnings(_settings(pki, crl)) if "tls_crl_file" in w]  # type: ignore[arg-type]
    crl.write_bytes(_crl(_authority(pki), [], NOW - datetime.timedelta(hours=1),
                         NOW + datetime.timedelta(hours=3)))
    check_tls_settings(_settings(pki, crl))  # type: ignore[arg-type]
    assert [w for w in exposure_warnings(_settings(pki, crl))  # type: ignore[arg-type]
            if "revocation list of 'test-ca' is due to be renewed" in w]
