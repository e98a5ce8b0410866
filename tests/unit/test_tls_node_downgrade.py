"""A node registered for DICOM TLS is never taken at its word over the plain port: the same
AE title from the same host calling in plain text is treated as an unknown caller."""

from __future__ import annotations

from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from imageshare.exchange.nodes import Node
from imageshare.tls import server_context
from tests.listener import listening
from tests.unit.test_tls_redteam_s33 import _client_context, _settings, pki  # noqa: F401


def _find_status(port: int, tls_args=None) -> int:
    """The final status of a study-level C-FIND as MODALITY."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="IMAGESHARE", tls_args=tls_args)
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    try:
        statuses = [int(status.Status) for status, _ in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind)]
        return statuses[-1]
    finally:
        assoc.release()


def test_a_tls_node_calling_the_plain_port_is_not_trusted(archive, pki):  # noqa: F811
    archive.nodes.add(Node("MODALITY", "127.0.0.1", 104, tls=True))
    with listening(archive, None, refusals=archive.refused_callers, tls_port=0,
                   ssl_context=server_context(_settings(pki),
                                              require_client_certificate=True)) as served:
        assert _find_status(served.tls_port,
                            (_client_context(pki, pki.client), "localhost")) == 0x0000
        assert _find_status(served.port) != 0x0000
    [caller] = archive.refused_callers.all()
    assert "TLS" in caller.reason
