"""The site-to-site messages of a transfer, in one process: an announcement only ever lands on
a study its sender really sent; an urgent one puts a banner on every staff page (and only
theirs) until someone decides; a receipt only lands on a transfer of ours sent to the site
that answers; a site message to a site that cannot be reached is tried again later."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import insert, select

from imageshare.domain.actors import Actor, cli_actor
from imageshare.exchange.nodes import Node
from imageshare.exchange.site_api import SiteApi
from imageshare.storage.index.schema import background_jobs, imaging_requests, transfers
from imageshare.web.server import create_app
from tests.factory import ct_series
from tests.peers import free_port

PASSWORD = "exchange-password"
HTML = {"Accept": "text/html"}


@pytest.fixture
def web(archive):
    archive.nodes.add(Node("SITEA", "127.0.0.1", 104, display_name="Hospital A", inbox=True))
    archive.nodes.add(Node("SITEB", "127.0.0.2", 104, display_name="Hospital B", inbox=True))
    archive.users.add("site-a", PASSWORD, "site", site_node="SITEA")
    archive.users.add("site-b", PASSWORD, "site", site_node="SITEB")
    archive.users.add("doctor", PASSWORD, "clinician")
    archive.users.add("pat", PASSWORD, "patient")
    with TestClient(create_app(archive)) as client:
        yield client


def _received(archive, tmp_path) -> str:
    site = Actor("user", "site-a", "site", "127.0.0.1")
    stored = [archive.ingest.store_copy(p, site)
              for p in ct_series(tmp_path / "sent", 2, patient_id="9434765919")]
    return stored[0].study_uid


def test_an_announcement_only_lands_on_a_study_its_sender_sent(archive, web, tmp_path):
    study_uid = _received(archive, tmp_path)
    elsewhere = archive.ingest.store_copy(
        ct_series(tmp_path / "ours", 1, patient_id="OURS1")[0], cli_actor()).study_uid
    for uid in (elsewhere, "1.2.3.4"):
        answer = web.post("/api/exchange/arrivals", auth=("site-a", PASSWORD), json={
            "origin": "SITEA", "study_uid": uid, "priority": "urgent", "note": "x"})
        assert answer.status_code == 404, answer.text
    assert web.post("/api/exchange/arrivals", auth=("site-a", PASSWORD), json={
        "origin": "SITEA", "study_uid": study_uid, "priority": "sometime"}).status_code == 422
    # Another account (here a member of staff) cannot dress up site A's study: only site
    # accounts may send site-to-site messages at all.
    assert web.post("/api/exchange/arrivals", auth=("doctor", PASSWORD), json={
        "origin": "SITEA", "study_uid": study_uid, "priority": "urgent"}).status_code == 403
    [item] = archive.inbox.items()
    assert (item.priority, item.message, item.announced_at) == ("routine", "", None)
    assert archive.arrivals.sender(item) == "site account site-a"


def test_an_urgent_arrival_shows_on_every_staff_page_until_someone_decides(
        archive, web, tmp_path):
    study_uid = _received(archive, tmp_path)
    answer = web.post("/api/exchange/arrivals", auth=("site-a", PASSWORD), json={
        "origin": "SITEA", "study_uid": study_uid, "priority": "urgent", "transfer": "t1",
        "note": "Trauma call, CT head", "contact": "ED 4412"})
    assert answer.status_code == 200, answer.text
    for path in ("/", "/inbox", "/requests", "/transfers"):
        page = web.get(path, auth=("doctor", PASSWORD), headers=HTML).text
        assert "urgent-banner" in page and "Hospital A" in page, path
        assert "Trauma call, CT head" in page and "ED 4412" in page
    patient_page = web.get("/account", auth=("pat", PASSWORD), headers=HTML).text
    assert "urgent-banner" not in patient_page and "Hospital A" not in patient_page
    [item] = archive.inbox.items()
    archive.inbox.accept(item.pk, cli_actor("doctor"), note="seen")
    assert "urgent-banner" not in web.get("/", auth=("doctor", PASSWORD), headers=HTML).text
    decided = archive.inbox.item(item.pk)
    # The receipt is queued for Hospital A, which has no ImageShare address here: the inbox
    # says so rather than pretending it went.
    assert decided.receipt_state in ("queued", "undeliverable")


def test_a_receipt_only_lands_on_our_transfer_to_the_site_that_answers(archive, web):
    now = datetime.now(UTC)
    with archive.engine.begin() as conn:
        conn.execute(insert(transfers).values(
            public_id="abc123", study_uid="1.2.3", site="SITEB", priority="urgent", note="",
            state="delivered", sent=2, total=2, failed=0, attempts=1, reason="",
            created_by="doctor", created_at=now, updated_at=now))
    receipt = {"origin": "SITEA", "transfer": "abc123", "outcome": "accepted", "by": "x"}
    assert web.post("/api/exchange/receipts", auth=("site-a", PASSWORD),
                    json=receipt).status_code == 404  # sent to B: A cannot answer for it
    assert web.post("/api/exchange/receipts", auth=("site-a", PASSWORD),  # nor pose as B
                    json={**receipt, "origin": "SITEB"}).status_code == 403
    assert archive.transfers.get("abc123").receipt_outcome == ""
    answer = web.post("/api/exchange/receipts", auth=("site-b", PASSWORD),
                      json={**receipt, "origin": "SITEB", "note": "thanks"})
    assert answer.status_code == 200, answer.text
    got = archive.transfers.get("abc123")
    assert (got.receipt_outcome, got.receipt_by, got.receipt_note) == ("accepted", "x",
                                                                        "thanks")
    assert [e["detail"]["receipt"] for e in archive.audit.events("exchange.receipt")] == [
        "accepted"]
    assert "accepted a study you sent" in archive.notifier.recent("doctor")[0]["text"]


def test_a_site_message_to_a_site_that_is_down_is_tried_again_later(archive):
    archive.nodes.add(Node("DOWN", "127.0.0.1", 104, display_name="Down Hospital",
                           dicomweb_url=f"http://127.0.0.1:{free_port()}/dicomweb"))
    site_api = SiteApi(archive.nodes, archive.jobs, retry_delays=(30.0,))
    heard: list[tuple[str, str]] = []
    site_api.on_outcome("probe", lambda ref, state, _detail: heard.append((ref, state)))
    site_api.queue("DOWN", "/api/exchange/receipts", {"outcome": "accepted"}, "probe", "r1",
                   "doctor", "Receipt to Down Hospital")
    archive.jobs.run_pending()  # or a worker of the queue takes it first
    deadline = time.monotonic() + 20
    while not heard and time.monotonic() < deadline:
        time.sleep(0.05)
    assert heard == [("r1", "retrying")]
    with archive.engine.connect() as conn:
        again = conn.execute(select(background_jobs).where(
            background_jobs.c.kind == "site-message",
            background_jobs.c.state == "queued")).mappings().all()
    assert len(again) == 1 and again[0]["dedupe_key"].endswith(":1")
    assert again[0]["params"]["body"] == {"outcome": "accepted"}
    waits = (again[0]["run_after"].replace(tzinfo=UTC) - datetime.now(UTC)).total_seconds()
    assert 20 < waits <= 30


def test_a_dicom_sender_asking_high_priority_makes_an_urgent_arrival_and_alerts_the_team(
        tmp_path):
    """DICOM carries a priority (C-STORE Priority HIGH) but no note: a registered inbox node
    sending with it makes its pending study urgent under the site's name, and the team is
    told once by e-mail; a routine send stays routine."""
    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    from imageshare.app import _make_listener
    from tests.conftest import make_archive
    from tests.mail import smtp_server

    with smtp_server() as (sink, port):
        archive = make_archive(tmp_path, smtp_host="127.0.0.1", smtp_port=port,
                               exchange_team_email="team@hospital.example")
        archive.nodes.add(Node("REMOTEPACS", "127.0.0.1", 104, display_name="St Elsewhere",
                               inbox=True, may_query=False, may_retrieve=False))
        listener = _make_listener(archive, shared_port=False)
        listener.start()
        try:
            routine, urgent = (ct_series(tmp_path / name, 2, patient_id=f"P-{name}")
                               for name in ("routine", "urgent"))
            ae = AE(ae_title="REMOTEPACS")
            ae.add_requested_context(CTImageStorage)
            assoc = ae.associate("127.0.0.1", listener.port, ae_title="IMAGESHARE")
            assert assoc.is_established
            for path in routine:
                assert assoc.send_c_store(dcmread(path)).Status == 0
            for path in urgent:
                assert assoc.send_c_store(dcmread(path), priority=1).Status == 0
            assoc.release()
            items = {i.study_uid: i for i in archive.inbox.items()}
            urgent_uid = str(dcmread(urgent[0]).StudyInstanceUID)
            routine_uid = str(dcmread(routine[0]).StudyInstanceUID)
            assert items[urgent_uid].priority == "urgent"
            assert items[routine_uid].priority == "routine"
            assert archive.arrivals.sender(items[urgent_uid]) == "St Elsewhere"
            [mail] = sink.wait_for("team@hospital.example")
            assert "URGENT" in mail["Subject"] and "St Elsewhere" in mail["Subject"]
            time.sleep(0.5)
            assert len(sink.to("team@hospital.example")) == 1  # once, not per instance
        finally:
            listener.stop()
            archive.close()


def test_only_an_answer_to_a_request_we_sent_that_site_is_shown_as_one(archive, web, tmp_path):
    """Site A says its images answer request R: kept only when R is a request we sent to
    site A; a made-up or another site's request id is not shown as 'answers our request'."""
    now = datetime.now(UTC)
    with archive.engine.begin() as conn:
        for public_id, site in (("to-a", "SITEA"), ("to-b", "SITEB")):
            conn.execute(insert(imaging_requests).values(
                public_id=public_id, direction="outgoing", site=site, nhs_number="9434765919",
                hospital_number="", patient_name="", birth_date="", reason="priors",
                priority="routine", state="open", detail="", created_by="doctor",
                created_at=now, updated_at=now))
    study_uid = _received(archive, tmp_path)
    for claimed, kept in (("to-b", ""), ("made-up", ""), ("to-a", "to-a")):
        answer = web.post("/api/exchange/arrivals", auth=("site-a", PASSWORD), json={
            "origin": "SITEA", "study_uid": study_uid, "request": claimed})
        assert answer.status_code == 200, answer.text
        [item] = archive.inbox.items()
        assert item.request_id == kept, claimed
