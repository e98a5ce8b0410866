"""Revocation lists on the DICOM TLS port as an operator renews them (session 39 review): the
lists in ``tls_crl_file`` now are the ones that count, a changed file is checked as at start
before it counts, a list appended next to its renewal is no reason to refuse to start, an
authority without a list is warned about, and a refused modality's log line says why. DCMTK's
echoscu is the peer; the lists are made with ``cryptography``."""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from pathlib import Path

import pytest

from imageshare.domain.errors import ConfigurationError
from imageshare.settings import Settings, load_settings
from imageshare.tls import check_tls_settings, exposure_warnings, server_context
from tests.interop.test_tls_revocation import (
    _authority,
    _crl,
    _replace,
    pki,  # noqa: F401 - a fixture of these tests
    tls_server,
)
from tests.interop.test_tls_revocation import _echo as _echoscu
from tests.peers import free_port, wait_for_port
from tests.pki import Identity, Pki

pytestmark = pytest.mark.interop

NOW = datetime.datetime.now(datetime.UTC)
MINUTE = datetime.timedelta(minutes=1)
DAY = datetime.timedelta(days=1)


def _echo(pki: Pki, identity: Identity, port: int) -> bool:
    """True when ImageShare accepted an association from ``identity`` on ``port``."""
    return _echoscu(pki, identity, port).returncode == 0


def test_the_lists_in_the_file_now_count_and_a_changed_file_is_checked_before_it_counts(
        pki, tmp_path):
    """Before: every list ever read stayed in the listener's store (growing with each
    renewal), so a list taken back out of the file kept counting; a changed file was used
    unchecked, so a list in the authority's name but not signed by it refused every peer of
    that authority, and an untrusted authority's certificate and list slipped into the file
    let that authority's modalities in."""
    hospital = _authority(pki)
    crl = tmp_path / "hospital.crl.pem"
    first = _crl(hospital, [pki.client], NOW - 10 * MINUTE, NOW + 7 * DAY)
    crl.write_bytes(first)
    tls_port = free_port()
    server = tls_server(pki, tmp_path / "data", crl, tls_port)
    server.start()
    try:
        wait_for_port(tls_port)
        server.cli("node", "add", "ECHOSCU", "--host", "127.0.0.1", "--port", "104")
        assert server.log_path is not None
        assert not _echo(pki, pki.client, tls_port)
        assert _echo(pki, pki.orthanc, tls_port)
        # The refusal says why, in OpenSSL's words (and nothing about the patient).
        assert "CERTIFICATE_VERIFY_FAILED (certificate revoked)" in server.log_path.read_text()

        # A list revoking the wrong scanner by mistake is installed, then the previous list
        # is put back: the scanner is let in again (the list put back is the one in force).
        _replace(crl, _crl(hospital, [pki.client, pki.orthanc], NOW - 2 * MINUTE,
                           NOW + 7 * DAY))
        assert not _echo(pki, pki.orthanc, tls_port)
        _replace(crl, first)
        assert _echo(pki, pki.orthanc, tls_port)
        assert not _echo(pki, pki.client, tls_port)

        # A list in the hospital authority's name that it did not sign: not used, said in
        # the log; the list before stays in force.
        _replace(crl, _crl(hospital, [], NOW - MINUTE, NOW + 7 * DAY,
                           signer=_authority(pki, "rogue-ca")))
        assert _echo(pki, pki.orthanc, tls_port)
        assert not _echo(pki, pki.client, tls_port)
        log = server.log_path.read_text()
        assert "revocation list of 'test-ca' is not signed by an authority in tls_ca_file" in log
        assert "the revocation lists read before stay in force" in log

        # An untrusted authority's certificate and its own list added to the file do not
        # make it trusted.
        rogue = _authority(pki, "rogue-ca")
        _replace(crl, first + rogue.cert.read_bytes()
                 + _crl(rogue, [], NOW - MINUTE, NOW + 7 * DAY))
        assert not _echo(pki, pki.rogue, tls_port)
        assert _echo(pki, pki.orthanc, tls_port)

        # A stale list copied over the file: not used, said in the log.
        _replace(crl, _crl(hospital, [], NOW - 8 * DAY, NOW - DAY))
        assert _echo(pki, pki.orthanc, tls_port)
        assert not _echo(pki, pki.client, tls_port)
        assert "list of 'test-ca' was due to be renewed" in server.log_path.read_text()
    finally:
        server.stop()


def _settings(pki: Pki, crl: Path, **values: object) -> Settings:
    base: dict[str, object] = {
        "tls_certificate": str(pki.server.cert), "tls_private_key": str(pki.server.key),
        "tls_ca_file": str(pki.ca), "dicom_tls_port": 2762, "tls_crl_file": str(crl)}
    return load_settings({**base, **values}, environ={})


def test_an_old_list_left_next_to_its_renewal_is_no_reason_to_refuse_to_start(pki, tmp_path):
    """Operators append the renewed list to the file; OpenSSL checks against the newest, but
    the start-up check refused the old one's time being over (and warned it was due)."""
    hospital = _authority(pki)
    crl = tmp_path / "crl.pem"
    crl.write_bytes(_crl(hospital, [], NOW - 8 * DAY, NOW - DAY)
                    + _crl(hospital, [pki.client], NOW - MINUTE, NOW + 7 * DAY))
    check_tls_settings(_settings(pki, crl))
    assert not [w for w in exposure_warnings(_settings(pki, crl)) if "tls_crl_file" in w]
    # Only old lists: still refused, with the newest one's date.
    crl.write_bytes(_crl(hospital, [], NOW - 8 * DAY, NOW - 2 * DAY)
                    + _crl(hospital, [], NOW - 3 * DAY, NOW - DAY))
    with pytest.raises(ConfigurationError, match=f"renewed on {NOW - DAY:%Y-%m-%d}"):
        check_tls_settings(_settings(pki, crl))


def test_an_authority_without_a_revocation_list_is_warned_about_by_name(pki, tmp_path):
    """Every peer an authority in tls_ca_file signed is refused when tls_crl_file has no list
    of it (OpenSSL cannot check them): that happened without a word."""
    authorities = tmp_path / "authorities.pem"
    authorities.write_bytes(pki.ca.read_bytes()
                            + _authority(pki, "rogue-ca").cert.read_bytes())
    crl = tmp_path / "crl.pem"
    crl.write_bytes(_crl(_authority(pki), [], NOW - MINUTE, NOW + 7 * DAY))
    settings = _settings(pki, crl, tls_ca_file=str(authorities))
    check_tls_settings(settings)
    (warning,) = [w for w in exposure_warnings(settings) if "tls_crl_file" in w]
    assert "no revocation list of the authority 'CN=rogue-ca'" in warning
    assert "test-ca" not in warning
    # Not when every authority has its list, nor when client certificates are not checked.
    assert not [w for w in exposure_warnings(_settings(pki, crl)) if "tls_crl_file" in w]
    assert not [w for w in exposure_warnings(_settings(
        pki, crl, tls_ca_file=str(authorities), dicom_tls_require_client_certificate=False))
        if "tls_crl_file" in w]


def test_the_dicom_tls_port_hands_out_no_session_ticket_to_resume_past_a_revocation(
        pki, tmp_path):
    """A TLS 1.3 session ticket lets a client resume without showing its certificate again,
    so a certificate revoked since would still get in: the server context that requires
    client certificates issues none."""
    crl = tmp_path / "crl.pem"
    crl.write_bytes(_crl(_authority(pki), [], NOW - MINUTE, NOW + 7 * DAY))
    server = server_context(_settings(pki, crl), require_client_certificate=True)
    client = ssl.create_default_context(cafile=str(pki.ca))
    client.check_hostname = False
    client.load_cert_chain(str(pki.orthanc.cert), str(pki.orthanc.key))
    near, far = socket.socketpair()
    served: list[bytes] = []

    def serve() -> None:
        with server.wrap_socket(far, server_side=True) as tls:
            served.append(tls.recv(1))
            tls.sendall(b"y")

    thread = threading.Thread(target=serve)
    thread.start()
    with client.wrap_socket(near) as tls:
        tls.sendall(b"x")
        assert tls.recv(1) == b"y"  # any ticket the server sends comes before this byte
        assert tls.version() == "TLSv1.3"
        assert tls.session is not None and not tls.session.has_ticket
    thread.join(timeout=10)
    assert served == [b"x"]
