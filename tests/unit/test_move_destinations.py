"""Where a C-MOVE may send: a site registered as one this archive does not send to
(``--no-send-to``) receives nothing because a third AE asked for it (A801 with the reason,
audited), while it may still retrieve to itself; every C-MOVE's audit event names its
destination, and the ATNA message makes that AE the receiving participant (PS3.15 A.5.3.3)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelMove

from imageshare.app import _make_listener
from imageshare.audit.atna import AtnaConfig, audit_message
from imageshare.domain.actors import cli_actor
from imageshare.exchange.nodes import Node
from tests.conftest import make_archive
from tests.factory import ct_series
from tests.peers import ADMIN_PASSWORD, free_port


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("destinations")
    archive = make_archive(tmp, dicom_port=free_port(), dicom_processes=1)
    archive.users.ensure_admin(ADMIN_PASSWORD)
    stored = ct_series(tmp / "stored", count=2, patient_id="DEST1")
    for path in stored:
        archive.ingest.store_copy(path, cli_actor())
    received: dict[str, list[str]] = {"VIEWER": [], "NOSEND": []}
    servers = []
    for title in received:
        ae = AE(ae_title=title)
        ae.add_supported_context(CTImageStorage)

        def keep(event, title=title):
            received[title].append(event.dataset.SOPInstanceUID)
            return 0x0000

        server = ae.start_server(("127.0.0.1", 0), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, keep)])
        servers.append(server)
        # A viewing station people here send to, and a site registered not to be sent to
        # (it may query and retrieve for itself).
        archive.nodes.add(Node(title, "127.0.0.1", server.server_address[1],
                               send_to=title == "VIEWER"))
    archive.nodes.add(Node("WORKSTATION", "127.0.0.1", 104))
    listener = _make_listener(archive, shared_port=False)
    listener.start()
    yield {"archive": archive, "port": listener.port, "study": dcmread(stored[0]),
           "received": received}
    listener.stop()
    for server in servers:
        server.shutdown()
    archive.close()


def _move(site: dict, caller: str, destination: str) -> Dataset:
    ae = AE(ae_title=caller)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", site["port"], ae_title="IMAGESHARE")
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = site["study"].StudyInstanceUID
    try:
        answers = [s for s, _i in assoc.send_c_move(
            identifier, destination, StudyRootQueryRetrieveInformationModelMove)]
    finally:
        assoc.release()
    return answers[-1]


def test_a_site_not_sent_to_receives_nothing_a_third_ae_asks_for(site) -> None:
    final = _move(site, "WORKSTATION", "NOSEND")
    assert final.Status == 0xA801
    assert final.ErrorComment == "destination does not receive from this archive"
    assert site["received"]["NOSEND"] == []
    refusals = [e for e in site["archive"].audit.events(action="dicom.retrieve", limit=100)
                if e["outcome"] == "refused" and e["actor"] == "node:WORKSTATION"]
    assert refusals[0]["detail"]["reason"] == (
        "move destination NOSEND does not receive from this archive")


def test_a_site_not_sent_to_may_still_retrieve_to_itself(site) -> None:
    final = _move(site, "NOSEND", "NOSEND")
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 2
    assert len(site["received"]["NOSEND"]) == 2


def test_the_move_is_audited_with_its_destination_as_the_receiving_participant(site) -> None:
    final = _move(site, "WORKSTATION", "VIEWER")
    assert final.Status == 0x0000 and len(site["received"]["VIEWER"]) == 2
    moved = [e for e in site["archive"].audit.events(action="study.move", limit=100)
             if e["actor"] == "node:WORKSTATION"]
    assert moved[0]["detail"]["destination"] == "VIEWER"
    assert moved[0]["instance_count"] == 2
    row = {**moved[0], "detail": json.dumps(moved[0]["detail"])}  # as the trail stores it
    message = audit_message(row, AtnaConfig("127.0.0.1", 514)).decode()
    # VIEWER receives (Destination Role ID); the workstation only asked (no role); we send.
    assert ('UserID="VIEWER" UserIsRequestor="false"><RoleIDCode csd-code="110152"'
            in message)
    requestor = message.split('UserID="node:WORKSTATION"', 1)[1].split("</ActiveParticipant>")[0]
    assert "RoleIDCode" not in requestor


def test_a_retrieve_matching_more_than_a_response_can_count_is_refused_with_the_number(
        site, monkeypatch) -> None:
    """The Number of ... Sub-operations are US (at most 65,535): a patient or study with more
    instances is refused A701 with the count and what to do, nothing sent, audited as a
    failure (pynetdicom alone answered C516 without a word). Here the limit is lowered to 1
    so that the two-instance study is over it."""
    from pynetdicom import build_role
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

    from imageshare.dicom import scp

    monkeypatch.setattr(scp, "MAX_SUB_OPERATIONS", 1)
    before = len(site["received"]["VIEWER"])
    final = _move(site, "WORKSTATION", "VIEWER")
    assert final.Status == 0xA701
    assert final.ErrorComment == "2 instances match: retrieve by study or series"
    assert len(site["received"]["VIEWER"]) == before
    [failed] = [e for e in site["archive"].audit.events(action="study.move", limit=100)
                if e["outcome"] == "failure"]
    assert "2 instances match" in failed["detail"]["reason"]

    ae = AE(ae_title="WORKSTATION")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    got: list[str] = []
    assoc = ae.associate("127.0.0.1", site["port"], ae_title="IMAGESHARE",
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, lambda e: got.append("x") or 0)])
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = site["study"].StudyInstanceUID
    try:
        *_, (last, _i) = list(assoc.send_c_get(
            identifier, StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    assert last.Status == 0xA701 and got == []
    assert last.ErrorComment == "2 instances match: retrieve by study or series"
