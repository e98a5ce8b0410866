"""A ``site`` account speaks for the one connected site it is linked to: what it announces,
the receipts, requests and answers it sends come from that site whatever the body's ``origin``
says; an unlinked one sends no site-to-site message; it cannot attach documents to our
studies nor open a browser session."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy import insert

from imageshare.domain.actors import Actor, cli_actor
from imageshare.domain.errors import ImageShareError
from imageshare.exchange.nodes import Node
from imageshare.storage.index.schema import imaging_requests, transfers
from imageshare.web.server import create_app
from tests.factory import ct_series

PASSWORD = "site-account-password"
SITEB = ("siteb", PASSWORD)


@pytest.fixture
def web(archive):
    archive.nodes.add(Node("SITEB", "127.0.0.1", 104, display_name="Hospital B", inbox=True))
    archive.nodes.add(Node("HOSPC", "127.0.0.1", 105, display_name="Hospital C", inbox=True))
    archive.users.add("siteb", PASSWORD, "site", site_node="siteb")
    archive.users.add("loose", PASSWORD, "site")
    archive.users.add("doctor", PASSWORD, "clinician")
    with TestClient(create_app(archive)) as client:
        yield client


def _received(archive, tmp_path, account: str = "siteb") -> str:
    sender = Actor("user", account, "site", "127.0.0.1")
    return [archive.ingest.store_copy(p, sender) for p in
            ct_series(tmp_path / account, 1, patient_id="9434765919")][0].study_uid


def _transfer(archive, public_id: str, site: str) -> None:
    now = datetime.now(UTC)
    with archive.engine.begin() as conn:
        conn.execute(insert(transfers).values(
            public_id=public_id, study_uid="1.2.3", site=site, priority="routine", note="",
            state="delivered", sent=1, total=1, failed=0, attempts=1, reason="",
            created_by="doctor", created_at=now, updated_at=now))


def test_a_site_account_is_linked_to_a_registered_node(archive, web):
    assert archive.users.site_node("siteb") == "SITEB"
    assert archive.users.account("siteb").site_node == "SITEB"
    assert archive.users.site_node("loose") == ""
    with pytest.raises(ImageShareError, match="no connected site"):
        archive.users.link_site("loose", "NOWHERE")
    with pytest.raises(ImageShareError, match="not a site account"):
        archive.users.link_site("doctor", "SITEB")
    with pytest.raises(ImageShareError, match="no connected site"):
        archive.users.add("sitez", PASSWORD, "site", site_node="NOWHERE")
    assert archive.users.link_site("loose", "hospc") == "HOSPC"
    archive.users.set_role("loose", "clinician")  # a new role starts unlinked
    archive.users.set_role("loose", "site")
    assert archive.users.site_node("loose") == ""


def test_a_site_account_is_not_spelled_like_another_site(archive, web):
    """What a sender stores waits in the inbox under its name (an AE title for a DICOM node,
    the username for a site account): an account named like another site's node would mix
    its arrivals with that site's and could announce them."""
    with pytest.raises(ImageShareError, match="speaks only for the connected site 'HOSPC'"):
        archive.users.add("hospc", PASSWORD, "site", site_node="SITEB")
    with pytest.raises(ImageShareError, match="speaks only for the connected site 'HOSPC'"):
        archive.users.add("HOSPC", PASSWORD, "site")
    archive.users.add("hospc", PASSWORD, "site", site_node="hospc")  # its own: fine
    archive.users.add("york", PASSWORD, "site", site_node="SITEB")
    archive.nodes.add(Node("LEEDS", "127.0.0.1", 106, inbox=True))
    with pytest.raises(ImageShareError, match="speaks only for the connected site 'LEEDS'"):
        archive.users.add("leeds", PASSWORD, "site", site_node="SITEB")
    # A node is not registered under the name of a site account linked to another site.
    with pytest.raises(ImageShareError, match="'york', linked to another site"):
        archive.nodes.add(Node("YORK", "127.0.0.1", 107, inbox=True))
    assert archive.nodes.find("YORK") is None


def test_removing_a_node_unlinks_its_site_accounts(archive, web):
    """A node removed and registered again (another endpoint, perhaps another hospital) is
    not spoken for by the accounts linked to the old one until someone links them again."""
    archive.nodes.remove("SITEB", cli_actor())
    archive.nodes.add(Node("SITEB", "10.9.9.9", 104, inbox=True))
    assert archive.users.site_node("siteb") == ""
    assert archive.users.account("siteb").site_node == ""
    [removed] = archive.audit.events("node.remove")
    assert removed["detail"]["unlinked_site_accounts"] == ["siteb"]
    assert archive.users.link_site("siteb", "SITEB") == "SITEB"


def test_an_announcement_comes_from_the_accounts_own_site(archive, web, tmp_path):
    study_uid = _received(archive, tmp_path)
    posed = web.post("/api/exchange/arrivals", auth=SITEB, json={
        "origin": "HOSPC", "study_uid": study_uid, "priority": "urgent",
        "note": "From Hospital C radiology", "transfer": "deadbeefdeadbeef"})
    assert posed.status_code == 403, posed.text
    assert "SITEB" in posed.text and "HOSPC" in posed.text
    [item] = archive.inbox.items()
    assert (item.origin, item.priority, item.announced_at) == ("", "routine", None)
    # Its own announcement still lands, with or without the origin in the body.
    for body in ({"origin": "siteb"}, {}):
        answer = web.post("/api/exchange/arrivals", auth=SITEB, json={
            **body, "study_uid": study_uid, "priority": "urgent", "transfer": "t1"})
        assert answer.status_code == 200, answer.text
    [item] = archive.inbox.items()
    assert (item.origin, item.sender_name, item.priority) == ("SITEB", "Hospital B", "urgent")


def test_an_unlinked_site_account_sends_no_site_message(archive, web, tmp_path):
    study_uid = _received(archive, tmp_path, "loose")
    _transfer(archive, "t-loose", "HOSPC")
    for path, body in (
            ("/api/exchange/arrivals", {"origin": "HOSPC", "study_uid": study_uid}),
            ("/api/exchange/receipts", {"origin": "HOSPC", "transfer": "t-loose",
                                        "outcome": "rejected"}),
            ("/api/exchange/requests/incoming", {"origin": "HOSPC", "reason": "x"}),
            ("/api/exchange/requests/answers", {"origin": "HOSPC", "request": "r1",
                                                "state": "declined"})):
        answer = web.post(path, auth=("loose", PASSWORD), json=body)
        assert answer.status_code == 403, (path, answer.text)
        assert "not linked" in answer.text and "link-site" in answer.text
    assert archive.transfers.get("t-loose").receipt_outcome == ""
    assert archive.requests.listed("incoming", cli_actor()) == []


def test_a_receipt_only_lands_on_a_transfer_to_the_accounts_site(archive, web):
    _transfer(archive, "to-c", "HOSPC")
    _transfer(archive, "to-b", "SITEB")
    forged = {"origin": "HOSPC", "transfer": "to-c", "outcome": "rejected", "by": "Dr C"}
    assert web.post("/api/exchange/receipts", auth=SITEB, json=forged).status_code == 403
    assert web.post("/api/exchange/receipts", auth=SITEB,
                    json={**forged, "origin": ""}).status_code == 404
    assert archive.transfers.get("to-c").receipt_outcome == ""
    answer = web.post("/api/exchange/receipts", auth=SITEB, json={
        "origin": "SITEB", "transfer": "to-b", "outcome": "accepted", "by": "Dr B"})
    assert answer.status_code == 200, answer.text
    assert archive.transfers.get("to-b").receipt_outcome == "accepted"


def test_a_request_and_an_answer_come_from_the_accounts_site(archive, web):
    posed = web.post("/api/exchange/requests/incoming", auth=SITEB, json={
        "origin": "HOSPC", "nhs_number": "9434765919", "reason": "priors"})
    assert posed.status_code == 403, posed.text
    assert archive.requests.listed("incoming", cli_actor()) == []
    made = web.post("/api/exchange/requests/incoming", auth=SITEB, json={
        "nhs_number": "9434765919", "reason": "priors", "request_id": "theirs1"})
    assert made.status_code == 201, made.text
    [incoming] = archive.requests.listed("incoming", cli_actor())
    assert incoming.site == "SITEB"  # fulfilling it pushes to B, never elsewhere
    now = datetime.now(UTC)
    with archive.engine.begin() as conn:
        for public_id, site in (("ask-c", "HOSPC"), ("ask-b", "SITEB")):
            conn.execute(insert(imaging_requests).values(
                public_id=public_id, direction="outgoing", site=site, nhs_number="",
                hospital_number="H1", patient_name="", birth_date="", reason="r",
                priority="routine", state="sent", detail="", created_by="doctor",
                created_at=now, updated_at=now))
    answer = {"origin": "HOSPC", "request": "ask-c", "state": "declined", "detail": "no"}
    assert web.post("/api/exchange/requests/answers", auth=SITEB,
                    json=answer).status_code == 403
    assert web.post("/api/exchange/requests/answers", auth=SITEB,
                    json={**answer, "origin": ""}).status_code == 404
    assert archive.requests.get("ask-c").state == "sent"
    ok = web.post("/api/exchange/requests/answers", auth=SITEB,
                  json={"request": "ask-b", "state": "fulfilled"})
    assert ok.status_code == 200, ok.text
    assert archive.requests.get("ask-b").state == "fulfilled"


def test_a_site_account_attaches_no_document_and_gets_no_browser_session(
        archive, web, tmp_path):
    study_uid = archive.ingest.store_copy(
        ct_series(tmp_path / "ours", 1, patient_id="OURS1")[0], cli_actor()).study_uid
    pdf = ("r.pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n", "application/pdf")
    for uid in (study_uid, "1.2.3.4.5.6.7"):
        answer = web.post(f"/studies/{uid}/documents", auth=SITEB,
                          data={"title": "Discharge letter"}, files={"file": pdf})
        assert answer.status_code == 403, (uid, answer.status_code)
    assert [s.modality for s in archive.catalogue.record(study_uid).series] == ["CT"]
    assert archive.users.sign_in("siteb", PASSWORD) is None
    assert archive.users.sign_in("doctor", PASSWORD) is not None
    assert web.post("/api/session", json={"username": "siteb", "password": PASSWORD}
                    ).status_code in (401, 403)


def test_upgrading_links_a_site_account_only_when_one_node_matches(tmp_path):
    from importlib import import_module

    migration = import_module("imageshare.storage.migrations.versions.0028_site_account_nodes")
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'up.sqlite'}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE nodes (ae_title TEXT, display_name TEXT)"))
        conn.execute(sa.text("CREATE TABLE users (pk INTEGER PRIMARY KEY, username TEXT, "
                             "role TEXT, site_node TEXT DEFAULT '')"))
        conn.execute(sa.text("INSERT INTO nodes VALUES ('HOSPB', 'Hospital B'), "
                             "('HOSPC', 'Hospital C'), ('TWIN', 'twin'), ('X', 'Twin')"))
        conn.execute(sa.text(
            "INSERT INTO users (pk, username, role) VALUES (1, 'hospb', 'site'), "
            "(2, 'hospital c', 'site'), (3, 'twin', 'site'), (4, 'hospital-a', 'site'), "
            "(5, 'hospc', 'clinician'), (6, 'HOSPC', 'site'), (7, 'Hospital C', 'site')"))
        migration._link_existing(conn)
        linked = dict(conn.execute(sa.text("SELECT pk, site_node FROM users")).all())
    # 2, 6 and 7 all claim HOSPC: none is linked; 3 matches two nodes; 4 matches none.
    assert linked == {1: "HOSPB", 2: "", 3: "", 4: "", 5: "", 6: "", 7: ""}


def test_listing_requests_for_imaging_is_audited(archive):
    """They name their patients: every listing is a read of patient data."""
    reader = Actor("user", "clerk", "radiographer", "10.0.0.5")
    archive.requests.listed("incoming", reader)
    [event] = archive.audit.events("exchange.request.read")
    assert event["actor"] == "user:clerk" and event["detail"] == {
        "direction": "incoming", "requests": 0}
