"""A node's certificate can be pinned: over DICOM TLS its AE title is then accepted with that
certificate only, not with any other the same authority signed (another hospital's node, a
stolen workstation's): IHE ATNA's Authenticate Node binds the certificate to the node. The
pin is registered as the certificate's SHA-256 fingerprint, from a file on the command line,
and a wrong one is refused with the reason."""

from __future__ import annotations

import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from imageshare.cli import run
from imageshare.domain.errors import ImageShareError
from imageshare.exchange.nodes import Node, certificate_fingerprint
from imageshare.tls import server_context
from tests.listener import listening
from tests.unit.test_tls_node_downgrade import _find_status
from tests.unit.test_tls_redteam_s33 import _client_context, _settings, pki  # noqa: F401


def _sha256(path) -> str:
    der = x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def _listener(archive, pki):  # noqa: F811
    """The listener with a DICOM TLS port that requires a client certificate."""
    return listening(archive, None, refusals=archive.refused_callers, tls_port=0,
                     ssl_context=server_context(_settings(pki),
                                                require_client_certificate=True))


def test_a_pinned_node_is_accepted_with_its_own_certificate_only(archive, pki):  # noqa: F811
    pin = _sha256(pki.client.cert)
    archive.nodes.add(Node("MODALITY", "127.0.0.1", 104, tls=True,
                           tls_certificate=":".join(pin[i:i + 2] for i in range(0, 64, 2))
                           .upper()))
    assert archive.nodes.find("MODALITY").tls_certificate == pin  # stored normalised
    with _listener(archive, pki) as served:
        own = (_client_context(pki, pki.client), "localhost")
        other = (_client_context(pki, pki.server), "localhost")  # same CA, another holder
        assert _find_status(served.tls_port, own) == 0x0000
        assert _find_status(served.tls_port, other) != 0x0000
    [caller] = archive.refused_callers.all()
    assert caller.reason == ("the certificate presented is not the one registered for this "
                             "AE title")


def test_an_unpinned_tls_node_takes_any_certificate_of_the_authorities(archive, pki):  # noqa: F811
    archive.nodes.add(Node("MODALITY", "127.0.0.1", 104, tls=True))
    with _listener(archive, pki) as served:
        assert _find_status(served.tls_port, (_client_context(pki, pki.server),
                                              "localhost")) == 0x0000


def test_a_pin_is_a_sha256_fingerprint_for_a_tls_node(archive) -> None:
    assert certificate_fingerprint("sha256 Fingerprint=" + "AB:" * 31 + "CD") == (
        "ab" * 31 + "cd")
    for wrong in ("abc", "zz" * 32, "ab" * 20):  # too short, not hex, a SHA-1
        with pytest.raises(ImageShareError, match="64 hexadecimal digits"):
            archive.nodes.add(Node("MODALITY", "10.0.0.1", 104, tls=True,
                                   tls_certificate=wrong))
    with pytest.raises(ImageShareError, match="DICOM TLS only"):
        archive.nodes.add(Node("MODALITY", "10.0.0.1", 104, tls_certificate="ab" * 32))
    assert archive.nodes.find("MODALITY") is None


def test_the_command_line_pins_the_certificate_in_a_file(tmp_path, pki, capsys):  # noqa: F811
    assert run(["node", "add", "MODALITY", "--host", "127.0.0.1", "--port", "104", "--tls",
                "--pin-certificate", str(pki.client.cert),
                "--data-dir", str(tmp_path / "data")]) == 0
    from imageshare.app import build_archive
    from imageshare.settings import load_settings

    archive = build_archive(load_settings({"data_dir": str(tmp_path / "data")}, environ={}))
    try:
        assert archive.nodes.find("MODALITY").tls_certificate == _sha256(pki.client.cert)
    finally:
        archive.close()
