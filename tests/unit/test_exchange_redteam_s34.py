"""Red team, session 34: exchange with other hospitals (retrievals, pushes, site addresses,
the inbox). Each test failed before the fix it names."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from imageshare.access.policy import INBOX
from imageshare.dicom import dicomweb_site
from imageshare.dicom.dicomweb_site import DicomwebSites
from imageshare.dicom.scu import DimseSites
from imageshare.domain.actors import Actor, cli_actor
from imageshare.domain.errors import ImageShareError, SiteUnreachable
from imageshare.exchange import nodes, site_api
from imageshare.exchange.nodes import Node
from imageshare.storage.index.schema import audit_events, instances
from imageshare.web.server import create_app
from tests.conftest import make_archive
from tests.factory import ct_series
from tests.peers import free_port
from tests.unit.test_exchange_uploads_redteam_s32 import (  # noqa: F401 - fixtures
    Hostile,
    _json,
    _Kept,
    _listing,
    _multipart,
    _node,
    hostile,
    internal,
)
from tests.unit.test_retention_pages import _admin_browser, _post
from tests.unit.test_web_pages import HTML


def _wait_for_audit(archive, action: str, outcome: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with archive.engine.connect() as conn:
            if conn.execute(select(audit_events.c.pk).where(
                    audit_events.c.action == action,
                    audit_events.c.outcome == outcome)).first() is not None:
                return
        time.sleep(0.1)
    raise AssertionError(f"no {action} {outcome} audited")


def _hang_up(h) -> None:
    """The site goes away in the middle of an answer (a cable pulled, a crash)."""
    h.close_connection = True
    h.connection.shutdown(2)


# -- a retrieval that breaks part way --------------------------------------------------------


def test_a_retrieval_cut_off_part_way_leaves_what_arrived_a_temporary_copy_not_the_record(
        archive, hostile, tmp_path):
    asked = generate_uid()
    first, second = ct_series(tmp_path / "a", 2, study_uid=asked, patient_id="9434765919")
    one, two = dcmread(first), dcmread(second)
    hostile.on("GET", f"/studies/{asked}/instances?",
               _json(_listing((one.SeriesInstanceUID, one.SOPInstanceUID),
                              (two.SeriesInstanceUID, two.SOPInstanceUID))))
    hostile.on("GET", f"/studies/{asked}/series/{one.SeriesInstanceUID}/instances/"
               f"{one.SOPInstanceUID}", _multipart(first.read_bytes()))
    hostile.on("GET", f"/studies/{asked}/series/{two.SeriesInstanceUID}/instances/"
               f"{two.SOPInstanceUID}", _hang_up)
    archive.nodes.add(_node(hostile))
    archive.exchange.retrieve("PARTNER", asked, cli_actor())
    _wait_for_audit(archive, "exchange.retrieve", "failure")
    with archive.engine.connect() as conn:
        classes = dict(conn.execute(select(
            instances.c.sop_uid, instances.c.retention_class)).tuples().all())
        (count, detail), = conn.execute(select(
            audit_events.c.instance_count, audit_events.c.detail).where(
            audit_events.c.action == "exchange.retrieve")).all()
    # Not part of the patient record (nor kept for ever): a copy that expires, as when the
    # retrieval completes.
    assert classes == {str(one.SOPInstanceUID): "temporary"}
    assert count == 1 and "PARTNER" in str(detail)


# -- where a site may be: never a metadata service, never a file ---------------------------


@pytest.mark.parametrize("url", [
    "file:///etc/passwd",
    "javascript:alert(1)//",
    "gopher://127.0.0.1:6379/_FLUSHALL",
    "http://169.254.169.254/latest/meta-data",
    "http://[fe80::1%25eth0]/dicomweb",
    "http://[::ffff:169.254.169.254]/dicomweb",
    "http://[fd00:ec2::254]/dicomweb",
    "http://0.0.0.0:8042/dicomweb",
    "https://partner:their-password@pacs.partner.example/dicomweb",
])
def test_a_site_address_that_is_a_file_a_metadata_service_or_carries_a_password_is_refused(
        archive, url):
    with pytest.raises(ImageShareError):
        archive.nodes.add(Node("PARTNER", "pacs.partner.example", 104, dicomweb_url=url))
    assert archive.nodes.find("PARTNER") is None


def test_the_admin_page_refuses_a_file_or_metadata_address_as_the_api_does(archive):
    """The page (and the CLI) register through the registry, which checked nothing."""
    browser, csrf = _admin_browser(archive, create_app(archive), "site-admin")
    with browser:
        for url in ("file:///etc/passwd", "http://169.254.169.254/dicomweb"):
            answer = _post(browser, csrf, "/admin/sites", ae_title="PARTNER", host="10.0.0.9",
                           port="104", dicomweb_url=url)
            assert answer.status_code == 400, answer.text[:300]
    assert archive.nodes.find("PARTNER") is None


def test_ordinary_site_addresses_are_still_taken(archive):
    for n, url in enumerate(("http://127.0.0.1:8042/dicom-web",
                             "https://10.2.3.4/dicomweb", "https://pacs.partner.nhs.uk/wado",
                             "http://[::1]:8080/dicomweb", "")):
        archive.nodes.add(Node(f"SITE{n}", "10.0.0.9", 104, dicomweb_url=url))
    assert nodes.forbidden_address("192.168.1.20") == nodes.forbidden_address("127.0.0.1") == ""


def test_a_site_registered_at_a_metadata_address_before_is_never_connected_to():
    """A node stored by an older version (no check then) is refused before any request."""
    node = Node("OLD", "10.0.0.9", 104, dicomweb_url="http://169.254.169.254/dicomweb",
                dicomweb_auth="Bearer secret-token")
    started = time.monotonic()
    with pytest.raises(SiteUnreachable, match="link-local") as refused:
        DicomwebSites(_Kept()).find_studies(node, {"PatientID": "9434765919"}, 30)
    assert time.monotonic() - started < 5
    assert "secret-token" not in str(refused.value)


def _as_metadata(monkeypatch, module) -> None:
    """The site's name resolves to an address no site may have (a DNS answer pointing at the
    metadata service): loopback stands for it here."""
    monkeypatch.setattr(module, "forbidden_address", lambda address: (
        "is at a link-local address" if address in ("127.0.0.1", "::1") else ""),
        raising=False)


def test_a_site_name_that_resolves_to_a_metadata_address_is_not_spoken_to(
        hostile, monkeypatch):
    hostile.on("GET", "", _json([]))
    hostile.on("POST", "", _json([]))
    _as_metadata(monkeypatch, dicomweb_site)
    node = Node("PARTNER", "127.0.0.1", 104, display_name="Partner Hospital",
                dicomweb_url=f"http://localhost:{hostile.port}/dicomweb",
                dicomweb_auth="Bearer partner-token")
    with pytest.raises(SiteUnreachable, match="link-local"):
        DicomwebSites(_Kept()).find_studies(node, {"PatientID": "9434765919"}, 5)
    with pytest.raises(SiteUnreachable, match="link-local"):
        DicomwebSites(_Kept()).check(node, 5)
    assert hostile.seen == []


def test_a_site_message_to_a_name_that_resolves_to_a_metadata_address_is_not_sent(
        hostile, monkeypatch):
    hostile.on("POST", "", _json({"id": "x"}))
    _as_metadata(monkeypatch, site_api)
    with pytest.raises(SiteUnreachable, match="link-local"):
        site_api.post_json(f"http://localhost:{hostile.port}/api/exchange/receipts", {},
                           {"Authorization": "Bearer partner-token"}, None, 5, True)
    assert hostile.seen == []


# -- a site that may no longer be sent to ----------------------------------------------------


def _answer(status: int) -> Callable[[BaseHTTPRequestHandler], None]:
    def answer(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return answer


def test_a_transfer_retrying_when_sending_to_its_site_is_withdrawn_sends_nothing_more(
        tmp_path, hostile):
    archive = make_archive(tmp_path, push_retry_seconds="1,1,1")
    try:
        hostile.on("POST", "/studies", _answer(503))  # busy: the transfer tries again
        (path,) = ct_series(tmp_path / "s", 1, patient_id="9434765919")
        uid = archive.ingest.store_copy(path, cli_actor()).study_uid
        archive.nodes.add(_node(hostile))
        transfer = archive.transfers.send(uid, "PARTNER", cli_actor())
        deadline = time.monotonic() + 30
        while not any(m == "POST" for m, _ in hostile.seen) and time.monotonic() < deadline:
            time.sleep(0.05)
        # The administrator withdraws "send to" (the site is no longer a destination).
        archive.nodes.add(replace(_node(hostile), send_to=False), replace=True)
        posts = sum(m == "POST" for m, _ in hostile.seen)
        while archive.transfers.get(transfer.public_id).state not in ("delivered", "failed") \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        ended = archive.transfers.get(transfer.public_id)
        assert ended.state == "failed" and "not allowed" in ended.reason
        assert sum(m == "POST" for m, _ in hostile.seen) == posts == 1
    finally:
        archive.close()


# -- a DICOM site whose search answer never ends ---------------------------------------------


@pytest.fixture
def flooding_pacs() -> Iterator[tuple[Node, list[int]]]:
    """A DICOM site answering any C-FIND with study after study, slowly (for a minute)."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    sent = [0]

    def on_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        for n in range(600):
            if event.is_cancelled or not event.assoc.is_established:
                return
            answer = Dataset()
            answer.QueryRetrieveLevel = "STUDY"
            answer.PatientID = "9434765919"
            answer.StudyInstanceUID = f"1.2.3.{n + 1}"
            sent[0] += 1
            yield 0xFF00, answer
            time.sleep(0.1)

    ae = AE(ae_title="FLOOD")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_FIND, on_find)])
    assert server is not None
    try:
        yield Node("FLOOD", "127.0.0.1", port, display_name="Flooding PACS"), sent
    finally:
        server.shutdown()


def _in_thread(call: Callable[[], object], seconds: float) -> list[BaseException | object]:
    """What ``call`` returned or raised, if it ended within ``seconds`` (else nothing)."""
    outcome: list[BaseException | object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return outcome


def test_a_dicom_search_answer_that_trickles_on_ends_at_the_timeout(flooding_pacs):
    node, _sent = flooding_pacs
    outcome = _in_thread(lambda: DimseSites("IMAGESHARE", timeout=5).find_studies(
        node, {"PatientID": "9434765919"}, 2), 10)
    assert outcome, "the search was still reading the site's answer after 10 s"
    assert isinstance(outcome[0], SiteUnreachable) and "within 2 s" in str(outcome[0])


def test_a_dicom_search_answer_with_too_many_studies_is_cut_off(flooding_pacs):
    node, sent = flooding_pacs
    sites = DimseSites("IMAGESHARE", timeout=5)
    sites.find_max_results = 5
    outcome = _in_thread(lambda: sites.find_studies(node, {"PatientID": "9434765919"}, 30),
                         10)
    assert outcome and isinstance(outcome[0], SiteUnreachable)
    assert "more than 5 studies" in str(outcome[0])
    time.sleep(0.5)
    assert sent[0] < 10  # the association was aborted: the site stopped sending


# -- the inbox: a forward that may not happen decides nothing --------------------------------

HOSPITAL = Actor("node", "DISTRICT", "node", "DISTRICT@10.1.0.9",
                 grants=frozenset({"dicom.store", INBOX}))


@pytest.mark.parametrize("forward_to", ["MODALITY", "NOWHERE"])
def test_accepting_on_the_page_with_a_forward_that_may_not_happen_accepts_nothing(
        archive, tmp_path, forward_to):
    for path in ct_series(tmp_path / "theirs", 2, patient_id="SENT9"):
        archive.ingest.store_copy(path, HOSPITAL)
    (item,) = archive.inbox.items()
    # A modality of ours: it stores, it is never sent to (a form can name it all the same).
    archive.nodes.add(Node("MODALITY", "10.0.0.7", 104, send_to=False, retrieve_from=False,
                           searchable=False))
    browser, csrf = _admin_browser(archive, create_app(archive), "inbox-admin")
    with browser:
        answer = _post(browser, csrf, f"/inbox/{item.pk}/accept", note="ok",
                       forward_to=forward_to)
    assert archive.inbox.item(item.pk).status == "pending"  # not accepted behind an error
    assert archive.transfers.recent() == []
    assert answer.status_code in (400, 404) and "nothing was accepted" in answer.text


# -- a push the site refused instance by instance ----------------------------------------------


def test_an_instance_the_site_lists_as_failed_is_not_counted_delivered(hostile, tmp_path):
    paths = ct_series(tmp_path / "s", 2, patient_id="9434765919")
    refused = dcmread(paths[0])
    # Some sites answer 202 (or even 200) with the refusal in a Failed SOP Sequence.
    hostile.on("POST", "/studies", _json({"00081198": {"vr": "SQ", "Value": [{
        "00081150": {"vr": "UI", "Value": [refused.SOPClassUID]},
        "00081155": {"vr": "UI", "Value": [refused.SOPInstanceUID]},
        "00081197": {"vr": "US", "Value": [0xA700]}}]}}, status=202))
    delivered: list[Path] = []
    result = DicomwebSites(_Kept()).send(_node(hostile), paths, lambda _p: None,
                                         delivered.append)
    assert (result.received, result.failed, delivered) == (0, 2, [])


# -- cancelling a running transfer ---------------------------------------------------------------


def _slowly_taken(seconds: float) -> Callable[[BaseHTTPRequestHandler], None]:
    def answer(h: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)
        _json({})(h)

    return answer


def test_a_running_transfer_is_cancelled_between_instances_and_stays_cancelled(
        archive, client, hostile, tmp_path):
    hostile.on("POST", "/studies", _slowly_taken(0.4))
    uid = ""
    for path in ct_series(tmp_path / "s", 8, patient_id="9434765919"):
        uid = archive.ingest.store_copy(path, cli_actor()).study_uid
    archive.nodes.add(_node(hostile))
    # Signed in first (password hashing takes a while on a loaded machine): the cancel then
    # comes while the transfer is under way, not after its last instance.
    browser, csrf = _admin_browser(archive, create_app(archive), "sender")
    transfer = archive.transfers.send(uid, "PARTNER", cli_actor())
    deadline = time.monotonic() + 30
    while not hostile.seen and time.monotonic() < deadline:
        time.sleep(0.05)
    with browser:
        page = browser.get(f"/transfers/{transfer.public_id}", headers=HTML).text
        assert "Cancel this transfer" in page
        answer = _post(browser, csrf, f"/transfers/{transfer.public_id}/cancel")
    assert answer.status_code == 303
    time.sleep(2.5)  # the instance on its way is finished; no other one is sent
    posts = sum(m == "POST" for m, _ in hostile.seen)
    time.sleep(1.0)
    ended = archive.transfers.get(transfer.public_id)
    assert ended.state == "cancelled" and "cancelled by sender" in ended.reason
    assert posts == sum(m == "POST" for m, _ in hostile.seen) < 8
    assert ended.sent + ended.failed == 8 and ended.sent >= 1
    (event,) = [e for e in archive.audit.events(action="exchange.push")
                if e["detail"].get("reason") == "cancelled"]
    assert event["outcome"] == "failure" and event["detail"]["site"] == "PARTNER"
    again = client.post(f"/api/exchange/transfers/{transfer.public_id}/cancel")
    assert again.status_code == 400


def test_a_password_stored_in_an_old_site_address_is_not_shown_on_the_sites_page(archive):
    """Registered by an older version, which let credentials into the address."""
    from imageshare.storage.index.schema import nodes as nodes_table

    archive.nodes.add(Node("OLDSITE", "10.0.0.9", 104,
                           dicomweb_url="https://pacs.partner.example/dicomweb"))
    with archive.engine.begin() as conn:
        conn.execute(nodes_table.update().values(
            dicomweb_url="https://partner:hunter2-secret@pacs.partner.example/dicomweb"))
    browser, _csrf = _admin_browser(archive, create_app(archive), "sites-admin")
    with browser:
        page = browser.get("/admin/sites", headers=HTML).text
    assert "pacs.partner.example/dicomweb" in page and "hunter2-secret" not in page


# -- another hospital's patient under one of our hospital numbers ------------------------------


def test_another_hospitals_patient_under_our_hospital_number_is_never_filed_as_ours(tmp_path):
    """Their H100 is another person than our H100: accepting keeps the study apart, held
    for reconciliation, instead of filing it in our patient's record."""
    built = make_archive(tmp_path, patient_mismatch="hold")
    try:
        built.nodes.add(Node("DISTRICT", "10.1.0.9", 104, inbox=True))
        built.ingest.store_copy(ct_series(tmp_path / "ours", 1, patient_id="H100",
                                          patient_name="Lovelace^Ada",
                                          PatientBirthDate="19151210")[0], cli_actor())
        held = built.ingest.store_copy(ct_series(
            tmp_path / "theirs", 1, patient_id="H100", patient_name="Other^Person",
            PatientBirthDate="19800101")[0], HOSPITAL)
        assert held.outcome == "held"
        (item,) = built.inbox.items()
        assert built.inbox.local_match(item) is None  # shown as no local patient
        done = built.inbox.accept(item.pk, cli_actor())
        patient = built.catalogue.record(held.study_uid).patient
        assert (patient.name, patient.birth_date) == ("Other^Person", "19800101")
        assert "held for reconciliation" in done
    finally:
        built.close()
