"""A DICOM node's host is where ImageShare opens associations (C-MOVE destinations, pushes,
retrievals): an address where a cloud metadata service answers, or one no site has, is
refused when the node is registered, as a DICOMweb address already is."""

from __future__ import annotations

import pytest

from imageshare.domain.errors import ImageShareError
from imageshare.exchange.nodes import Node
from tests.conftest import act_as_admin


@pytest.mark.parametrize("host", [
    "169.254.169.254", "[fe80::1]", "fe80::1%eth0", "0.0.0.0", "::", "224.0.0.1",
    "100.100.100.200", "fd00:ec2::254", "::ffff:169.254.169.254", "pacs/../x", "user@pacs",
])
def test_a_node_at_an_address_no_site_has_is_refused(archive, client, host):
    with pytest.raises(ImageShareError):
        archive.nodes.add(Node("SITEX", host, 104))
    act_as_admin(client, archive)
    answer = client.post("/api/nodes", json={"ae_title": "SITEX", "host": host, "port": 104})
    assert answer.status_code == 400, answer.text
    assert "host" in answer.json()["detail"]
    assert archive.nodes.all() == []


@pytest.mark.parametrize("host", ["10.1.2.3", "127.0.0.1", "pacs.example.org", "::1",
                                  "192.168.0.20"])
def test_hospital_addresses_and_host_names_are_taken(archive, host):
    archive.nodes.add(Node("SITEX", host, 104))
    assert [n.host for n in archive.nodes.all()] == [host]


# -- at connection time: a host name whose DNS answer points where no site is ---------------


@pytest.fixture
def echo_port():
    """A real DICOM Verification SCP on a free local port; yields (port, associations)."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    seen: list[str] = []
    ae = AE(ae_title="ECHOSCP")
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
        (evt.EVT_CONN_OPEN, lambda event: seen.append(event.address[0]))])
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()


def _resolving_to(monkeypatch, *addresses: str) -> None:
    """The DNS answer for pacs.example.org (every other name resolves as it does)."""
    import socket

    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):
        if host != "pacs.example.org":
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, port)) for a in addresses]
    monkeypatch.setattr("imageshare.dicom.scu.socket.getaddrinfo", fake)


def test_a_node_whose_host_name_resolves_to_a_metadata_address_is_not_connected_to(
        monkeypatch, echo_port):
    """DNS rebinding: a name registered while it pointed at a PACS, answering later with
    the cloud metadata address, gets no association (and nothing is sent there)."""
    from imageshare.dicom.scu import DimseSites
    from imageshare.domain.errors import SiteUnreachable

    port, seen = echo_port
    _resolving_to(monkeypatch, "169.254.169.254", "fe80::1")
    with pytest.raises(SiteUnreachable, match="metadata") as refused:
        DimseSites("IMAGESHARE", timeout=5).check(Node("REBOUND", "pacs.example.org", port), 5)
    assert "not connected to" in str(refused.value)
    assert seen == []


def test_a_node_by_host_name_is_reached_at_its_first_allowed_address(monkeypatch, echo_port):
    from imageshare.dicom.scu import DimseSites

    port, seen = echo_port
    _resolving_to(monkeypatch, "169.254.169.254", "127.0.0.1")
    DimseSites("IMAGESHARE", timeout=5).check(Node("ECHOSCP", "pacs.example.org", port), 5)
    assert seen == ["127.0.0.1"]


def test_a_node_by_a_name_that_does_not_resolve_is_unreachable_with_the_reason():
    from imageshare.dicom.scu import DimseSites
    from imageshare.domain.errors import SiteUnreachable

    with pytest.raises(SiteUnreachable, match="does not resolve"):
        DimseSites("IMAGESHARE", timeout=5).check(Node("NOWHERE", "no-such-host.invalid", 104), 5)
