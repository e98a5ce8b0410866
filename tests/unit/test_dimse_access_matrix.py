"""The DIMSE column of the role x action matrix: who may ECHO, STORE, FIND, MOVE and GET.

Callers: a node registered with every right, one registered to store only, a registered AE
title called from another host (impersonation), and an AE title nobody registered. Default
deny: only C-ECHO is answered to everyone. Every refused cell leaves an audit row naming the
service and the reason, and the caller is listed for administrators.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from imageshare.app import _make_listener
from imageshare.dicom import statuses
from imageshare.domain.actors import cli_actor
from imageshare.exchange.nodes import Node
from tests.conftest import make_archive
from tests.factory import ct_series
from tests.peers import ADMIN_PASSWORD, free_port

SERVICES = ("ECHO", "STORE", "FIND", "MOVE", "GET")
# caller -> the services it is allowed; every other cell must be refused.
ALLOWED = {
    "FULLNODE": set(SERVICES),
    "STOREONLY": {"ECHO", "STORE"},
    "SPOOFED": {"ECHO"},  # registered at 192.0.2.10, calling from 127.0.0.1
    "STRANGER": {"ECHO"},  # not registered at all
}
# The refusal each service answers (one table: imageshare/dicom/statuses.py).
REFUSAL = {"ECHO": statuses.ECHO_NOT_AUTHORISED.code, "STORE": statuses.STORE_NOT_AUTHORISED.code,
           "FIND": statuses.FIND_NOT_AUTHORISED.code, "MOVE": statuses.MOVE_NOT_AUTHORISED.code,
           "GET": statuses.GET_NOT_AUTHORISED.code}
POLICY_ACTION = {"ECHO": "dicom.echo", "STORE": "dicom.store", "FIND": "dicom.query",
                 "MOVE": "dicom.retrieve", "GET": "dicom.retrieve"}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("matrix")
    archive = make_archive(tmp, dicom_port=free_port(), dicom_processes=1)
    archive.users.ensure_admin(ADMIN_PASSWORD)
    stored = ct_series(tmp / "stored", count=1, patient_id="MATRIX1")[0]
    archive.ingest.store_copy(stored, cli_actor())
    received: list[Dataset] = []
    destination = AE(ae_title="MOVEDEST")
    destination.add_supported_context(CTImageStorage)

    def keep(event):
        received.append(event.dataset)
        return 0x0000

    dest_server = destination.start_server(("127.0.0.1", 0), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, keep)])
    archive.nodes.add(Node("MOVEDEST", "127.0.0.1", dest_server.server_address[1],
                           may_query=False, may_retrieve=False, may_store=False))
    archive.nodes.add(Node("FULLNODE", "127.0.0.1", 104))
    archive.nodes.add(Node("STOREONLY", "localhost", 104, may_query=False,
                           may_retrieve=False))
    archive.nodes.add(Node("SPOOFED", "192.0.2.10", 104))
    listener = _make_listener(archive, shared_port=False)
    listener.start()
    yield {"archive": archive, "port": listener.port, "study": dcmread(stored),
           "received": received, "tmp": tmp}
    listener.stop()
    dest_server.shutdown()
    archive.close()


def _call(site: dict, caller: str, service: str) -> int:
    """Run one service as ``caller``; the final status (0 = success)."""
    ae = AE(ae_title=caller)
    for context in (Verification, CTImageStorage, StudyRootQueryRetrieveInformationModelFind,
                    StudyRootQueryRetrieveInformationModelMove,
                    StudyRootQueryRetrieveInformationModelGet):
        ae.add_requested_context(context)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = site["study"].StudyInstanceUID
    handlers = []
    if service == "GET":
        from pynetdicom import build_role

        roles = [build_role(CTImageStorage, scp_role=True)]
        handlers = [(evt.EVT_C_STORE, lambda event: 0x0000)]
    else:
        roles = []
    assoc = ae.associate("127.0.0.1", site["port"], ext_neg=roles, evt_handlers=handlers,
                         ae_title="IMAGESHARE")
    assert assoc.is_established
    try:
        if service == "ECHO":
            return assoc.send_c_echo().Status
        if service == "STORE":
            ds = ct_series(site["tmp"] / f"{caller}-store", count=1,
                           patient_id=f"NEW-{caller}")[0]
            return assoc.send_c_store(ds).Status
        if service == "FIND":
            identifier.PatientID = ""
            answers = [(s.Status, i) for s, i in assoc.send_c_find(
                identifier, StudyRootQueryRetrieveInformationModelFind)]
            if answers[-1][0] == 0 and not any(i for _s, i in answers if i is not None):
                return 0xFFFF  # "success" with nothing found would hide a refusal
            return answers[-1][0]
        if service == "MOVE":
            answers = [s for s, _i in assoc.send_c_move(
                identifier, "MOVEDEST", StudyRootQueryRetrieveInformationModelMove)]
            return _final(answers[-1])
        answers = [s for s, _i in assoc.send_c_get(
            identifier, StudyRootQueryRetrieveInformationModelGet)]
        return _final(answers[-1])
    finally:
        assoc.release()


def _final(last: Dataset) -> int:
    """A retrieval's final status; "success" with nothing sent would hide a refusal."""
    if last.Status == 0x0000 and not last.get("NumberOfCompletedSuboperations", 1):
        return 0xFFFF
    return last.Status


def _refusals(site: dict, caller: str, action: str) -> list[dict]:
    return [e for e in site["archive"].audit.events(action=action, limit=10000)
            if e["outcome"] == "refused" and e["actor"] == f"node:{caller}"]


@pytest.mark.parametrize("caller", sorted(ALLOWED))
@pytest.mark.parametrize("service", SERVICES)
def test_each_dimse_service_is_allowed_only_to_the_callers_granted_it(site, caller, service):
    action = POLICY_ACTION[service]
    before = len(_refusals(site, caller, action))
    status = _call(site, caller, service)
    refusals = _refusals(site, caller, action)
    if service in ALLOWED[caller]:
        assert status == 0x0000, (caller, service, hex(status))
        assert len(refusals) == before
    else:
        assert status == REFUSAL[service], (caller, service, hex(status))
        assert len(refusals) == before + 1, (caller, service)
        detail = refusals[0]["detail"]
        assert detail["service"] == f"C-{service}"
        assert detail["host"] == "127.0.0.1"
        expected = {"SPOOFED": "calling host does not match the registered host",
                    "STRANGER": "AE title not registered",
                    "STOREONLY": f"C-{service} not granted to this AE title"}[caller]
        assert detail["reason"] == expected


def test_refused_callers_are_listed_with_host_count_and_last_seen(site):
    for _ in range(2):
        _call(site, "LISTED", "STORE")
    _call(site, "SPOOFED", "FIND")
    listed = {(c.ae_title, c.host): c for c in site["archive"].refused_callers.all()}
    caller = listed[("LISTED", "127.0.0.1")]
    assert caller.count == 2 and caller.service == "C-STORE"
    assert caller.reason == "AE title not registered" and not caller.registered
    assert listed[("SPOOFED", "127.0.0.1")].registered_host == "192.0.2.10"


def test_a_refused_modality_registered_in_one_step_may_store_at_once(site):
    assert _call(site, "NEWSCANNER", "STORE") == REFUSAL["STORE"]
    node = site["archive"].refused_callers.register("NEWSCANNER", "127.0.0.1", cli_actor())
    assert node.may_store and not node.may_query
    assert "NEWSCANNER" not in {c.ae_title for c in site["archive"].refused_callers.all()}
    assert _call(site, "NEWSCANNER", "STORE") == 0x0000
    assert _call(site, "NEWSCANNER", "FIND") != 0x0000  # store only, unless granted more
    (added,) = [e for e in site["archive"].audit.events(action="node.add")
                if e["detail"].get("ae_title") == "NEWSCANNER"]
    assert added["detail"]["from"] == "refused callers"


def test_an_impersonated_ae_title_cannot_be_registered_over_the_real_one(site):
    from imageshare.domain.errors import ImageShareError

    _call(site, "SPOOFED", "FIND")
    with pytest.raises(ImageShareError, match="impersonation"):
        site["archive"].refused_callers.register("SPOOFED", "127.0.0.1", cli_actor())
    assert site["archive"].nodes.get("SPOOFED").host == "192.0.2.10"


def test_move_to_an_unregistered_destination_is_refused_and_audited(site):
    ae = AE(ae_title="FULLNODE")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", site["port"], ae_title="IMAGESHARE")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = site["study"].StudyInstanceUID
    try:
        (status, _i), *_ = list(assoc.send_c_move(
            identifier, "NOWHERE", StudyRootQueryRetrieveInformationModelMove))
    finally:
        assoc.release()
    assert status.Status == 0xA801
    refusal = _refusals(site, "FULLNODE", "dicom.retrieve")[0]
    assert refusal["detail"]["reason"] == "move destination NOWHERE not registered"


def test_store_from_any_ae_lets_strangers_store_but_still_not_query(tmp_path):
    archive = make_archive(tmp_path, dicom_port=free_port(), store_from_any_ae=True)
    listener = _make_listener(archive, shared_port=False)
    listener.start()
    try:
        here = {"archive": archive, "port": listener.port, "tmp": tmp_path,
                "study": dcmread(ct_series(tmp_path / "q", count=1)[0])}
        assert _call(here, "ANYONE", "STORE") == 0x0000
        assert _call(here, "ANYONE", "FIND") == REFUSAL["FIND"]
    finally:
        listener.stop()
        archive.close()


def test_administrators_list_and_register_refused_callers_over_the_api_and_page(
        archive, client):
    from imageshare.domain.actors import Actor

    caller = Actor("node", "US-ROOM3", "node", "US-ROOM3@10.1.2.3", registered=False)
    for _ in range(3):
        archive.refused_callers.record(caller, "10.1.2.3", "dicom.store", "C-STORE",
                                       "AE title not registered")
    (listed,) = client.get("/api/nodes/refused").json()
    assert (listed["ae_title"], listed["host"], listed["count"]) == ("US-ROOM3", "10.1.2.3", 3)
    assert listed["last_seen"] and listed["reason"] == "AE title not registered"
    page = client.get("/admin/sites", headers={"Accept": "text/html"})
    assert "US-ROOM3" in page.text and "10.1.2.3" in page.text
    response = client.post("/api/nodes/refused/register",
                           json={"ae_title": "US-ROOM3", "host": "10.1.2.3"})
    assert response.status_code == 201
    node = archive.nodes.get("US-ROOM3")
    assert (node.host, node.may_store, node.may_query) == ("10.1.2.3", True, False)
    assert client.get("/api/nodes/refused").json() == []
    assert any(e["detail"].get("from") == "refused callers"
               for e in archive.audit.events(action="node.add"))


def test_cli_lists_refused_callers(archive, capsys):
    from imageshare.cli import run
    from imageshare.domain.actors import Actor

    archive.refused_callers.record(Actor("node", "CT2", "node", registered=False), "10.9.9.9",
                                   "dicom.query", "C-FIND", "AE title not registered")
    assert run(["node", "refused", "--data-dir", str(archive.settings.data_dir)]) == 0
    assert "CT2\t10.9.9.9\t1\tC-FIND\tAE title not registered" in capsys.readouterr().out


def test_the_refused_callers_list_is_bounded(archive, monkeypatch):
    from imageshare.domain.actors import Actor
    from imageshare.exchange.nodes import RefusedCallers

    monkeypatch.setattr(RefusedCallers, "KEEP", 5)
    for number in range(8):
        archive.refused_callers.record(Actor("node", f"SCAN{number}", "node", registered=False),
                                       "10.6.6.6", "dicom.store", "C-STORE",
                                       "AE title not registered")
    listed = [c.ae_title for c in archive.refused_callers.all()]
    assert listed == [f"SCAN{n}" for n in (7, 6, 5, 4, 3)]
    assert len([e for e in archive.audit.events(action="dicom.store")]) == 8
