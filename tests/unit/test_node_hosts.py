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
