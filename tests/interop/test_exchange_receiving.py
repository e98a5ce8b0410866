"""The receiving side of a transfer between two real ImageShare sites: what the sender entered
(priority, note, contact) travels with the study and is shown under the sender's hospital
name; an urgent arrival alerts the receiving team by e-mail (a real SMTP server) and on every
staff page; accepting or rejecting sends a receipt back that the sender's transfer page shows,
delivered by the job queue even when the sender was down and the receiver restarted.
Requests for prior imaging go from one site to the other and their answers come back."""

from __future__ import annotations

import time

import httpx
import pytest
from pydicom import dcmread

from tests.factory import ct_series
from tests.mail import smtp_server
from tests.peers import RunningServer
from tests.sites import Preparing

pytestmark = pytest.mark.interop
STAFF = ("staff", "staff-password-1")
NHS = "9434765919"


def api(server, method, path, **kwargs):
    with httpx.Client(base_url=server.url, auth=STAFF, timeout=60) as client:
        response = client.request(method, path, **kwargs)
    assert response.status_code < 300, response.text
    return response.json()


def page(server, path):
    with httpx.Client(base_url=server.url, auth=STAFF, timeout=60) as client:
        response = client.get(path, headers={"Accept": "text/html"})
    assert response.status_code == 200, response.text
    return response.text


def until(check, timeout=60, what="the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout} s")


@pytest.fixture(scope="module")
def mail():
    with smtp_server() as running:
        yield running


@pytest.fixture(scope="module")
def sites(tmp_path_factory, mail):
    """Two sites for the whole module, each knowing the other by name over DICOM and its
    site API (an account with the ``site`` role at the other); A holds the studies it will
    push, B a prior study of the same patient."""
    tmp_path = tmp_path_factory.mktemp("sites")
    _sink, smtp_port = mail
    quick = {"IMAGESHARE_PUSH_RETRY_SECONDS": "0.5,1,1"}
    a = RunningServer(tmp_path / "a", ae_title="SITEA", extra_env=quick)
    b = RunningServer(tmp_path / "b", ae_title="SITEB", extra_env={
        **quick, "IMAGESHARE_SMTP_HOST": "127.0.0.1", "IMAGESHARE_SMTP_PORT": str(smtp_port),
        "IMAGESHARE_EXCHANGE_TEAM_EMAIL": "radiology-team@b.example",
        "IMAGESHARE_PUBLIC_URL": "https://images.b.example"})
    at_a, at_b = Preparing(a), Preparing(b)
    uids = {}
    try:
        for here in (at_a, at_b):
            here.user(*STAFF, "clinician")
        a_at_b = at_b.user("site-sitea", "service-password", "site", token=True)
        b_at_a = at_a.user("site-siteb", "service-password", "site", token=True)
        at_a.site("SITEB", b, "Hospital B", a_at_b)
        at_b.site("SITEA", a, "Hospital A", b_at_a)
        # Each site account speaks for the site it belongs to.
        at_b.archive.users.link_site("site-sitea", "SITEA")
        at_a.archive.users.link_site("site-siteb", "SITEB")
        for name, count, holder in (("urgent", 2, at_a), ("routine", 2, at_a),
                                    ("prior", 2, at_b)):
            files = ct_series(tmp_path / name, count, patient_id=NHS,
                              patient_name="Franklin^Rosalind")
            holder.studies(files)
            uids[name] = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    finally:
        at_a.close()
        at_b.close()
    a.start()
    try:
        b.start()
        yield a, b, uids
    finally:
        a.stop()
        b.stop()


def _push(a, study_uid, priority, note="", contact=""):
    queued = api(a, "POST", "/api/exchange/push", json={
        "site": "SITEB", "study_uid": study_uid, "priority": priority, "note": note,
        "contact": contact})
    transfer = f"/api/exchange/transfers/{queued['public_id']}"
    done = until(lambda: (t := api(a, "GET", transfer))["state"] in ("delivered", "failed")
                 and t, what="the delivery")
    assert done["state"] == "delivered", done
    return queued["public_id"]


def _item(b, study_uid):
    def announced():
        found = [i for i in api(b, "GET", "/api/exchange/inbox") if i["study_uid"] == study_uid]
        return found[0] if found and found[0]["announced_at"] else None
    return until(announced, what="the announcement")


def test_an_urgent_push_alerts_the_receiving_team_and_the_receipt_reaches_the_sender(
        sites, mail):
    a, b, uids = sites
    sink, _port = mail
    study_uid = uids["urgent"]
    transfer_id = _push(a, study_uid, "urgent",
                        note="Head injury, transferring to your neurosurgery",
                        contact="Dr Okafor, ED registrar, bleep 4412")
    item = _item(b, study_uid)
    assert (item["sender_name"], item["priority"], item["origin"]) == (
        "Hospital A", "urgent", "SITEA")
    assert item["message"] == "Head injury, transferring to your neurosurgery"
    assert item["contact"] == "Dr Okafor, ED registrar, bleep 4412"

    # In the app: a banner on every staff page, a count on the inbox link.
    for path in ("/", "/exchange", "/notifications"):
        html = page(b, path)
        assert "urgent-banner" in html and "Hospital A" in html, path
        assert "Head injury, transferring to your neurosurgery" in html
    assert "SITEA" not in page(b, "/inbox").split("<main>")[1].split("</table>")[0]

    # By e-mail to the team address: who sent it and how urgent, no patient details.
    message = until(lambda: sink.messages and sink.messages[0], what="the e-mail")
    assert sink.recipients[0] == ["radiology-team@b.example"]
    body = message.get_content() if hasattr(message, "get_content") else message.get_payload()
    assert "URGENT" in message["Subject"] and "Hospital A" in message["Subject"]
    assert "https://images.b.example/inbox" in body and "bleep 4412" in body
    assert "Franklin" not in body and NHS not in body and "Head injury" not in body

    # Accepted: the receipt goes back and the sender's transfer page shows it.
    api(b, "POST", f"/api/exchange/inbox/{item['pk']}/accept",
        json={"note": "Received, patient expected 03:30"})
    receipt = until(lambda: (t := api(a, "GET", f"/api/exchange/transfers/{transfer_id}"))[
        "receipt_outcome"] and t, what="the receipt")
    assert (receipt["receipt_outcome"], receipt["receipt_by"]) == ("accepted", "staff")
    assert receipt["receipt_note"] == "Received, patient expected 03:30"
    html = page(a, f"/transfers/{transfer_id}")
    assert "accepted" in html and "Received, patient expected 03:30" in html
    assert "Hospital B" in html
    assert "urgent-banner" not in page(b, "/")  # decided: no longer alerting


def test_a_rejection_receipt_survives_the_sender_down_and_the_receiver_restarting(
        sites, mail):
    a, b, uids = sites
    sink, _port = mail
    study_uid = uids["routine"]
    transfer_id = _push(a, study_uid, "routine", note="for your records")
    item = _item(b, study_uid)
    assert item["priority"] == "routine" and item["sender_name"] == "Hospital A"
    html = page(b, "/")
    assert "urgent-banner" not in html and 'title="1 waiting for a decision"' in html
    mailed = len(sink.messages)
    time.sleep(1)
    assert len(sink.messages) == mailed  # routine arrivals: a count on the inbox, no e-mail

    a.stop()  # the sender is down when the receiving team decides
    api(b, "POST", f"/api/exchange/inbox/{item['pk']}/reject",
        json={"note": "Wrong patient: not ours"})
    until(lambda: "retrying:" in page(b, "/inbox"), what="the receipt waiting")
    b.stop()  # ... and the receiver restarts meanwhile: the receipt is kept in its queue
    b.start()
    a.start()
    receipt = until(lambda: (t := api(a, "GET", f"/api/exchange/transfers/{transfer_id}"))[
        "receipt_outcome"] and t, timeout=90, what="the receipt after the restarts")
    assert (receipt["receipt_outcome"], receipt["receipt_note"]) == (
        "rejected", "Wrong patient: not ours")
    assert "rejected" in page(a, f"/transfers/{transfer_id}")


def test_a_request_for_prior_imaging_is_fulfilled_and_the_requester_sees_it(sites):
    a, b, uids = sites
    prior_uid = uids["prior"]
    # A asks B from its request page (a browser form: posted with the session's CSRF token).
    with httpx.Client(base_url=a.url, timeout=60) as browser:
        browser.post("/login", data={"username": STAFF[0], "password": STAFF[1]},
                     headers={"Accept": "text/html"})
        form = browser.get("/requests", headers={"Accept": "text/html"})
        assert form.status_code == 200
        token = form.text.split('name="csrf_token" value="')[1].split('"')[0]
        made = browser.post("/requests", data={
            "csrf_token": token, "site": "SITEB", "nhs_number": "943 476 5919",
            "reason": "prior CT for comparison", "priority": "urgent"},
            headers={"Accept": "text/html"})
        assert made.status_code in (200, 303), made.text
    [outgoing] = api(a, "GET", "/api/exchange/requests", params={"direction": "outgoing"})
    assert outgoing["state"] == "sent" and outgoing["remote_id"]
    [incoming] = api(b, "GET", "/api/exchange/requests", params={"direction": "incoming"})
    assert (incoming["site"], incoming["reason"]) == ("SITEA", "prior CT for comparison")
    html = page(b, f"/requests/{incoming['public_id']}")
    assert "Hospital A" in html and prior_uid in html  # the matching studies, to choose from

    api(b, "POST", f"/api/exchange/requests/{incoming['public_id']}/fulfil",
        json={"study_uids": [prior_uid]})
    answered = until(lambda: (r := api(a, "GET", "/api/exchange/requests",
                                       params={"direction": "outgoing"})[0])["state"]
                     == "fulfilled" and r, what="the answer")
    assert answered["answered_by"] == "staff"
    item = _item(a, prior_uid)
    assert item["request_id"] == outgoing["public_id"] and item["sender_name"] == "Hospital B"
    assert "fulfilled" in page(a, "/requests")

    # A second request, declined with a reason: the requester's list says why.
    api(a, "POST", "/api/exchange/requests", json={
        "site": "SITEB", "reason": "MRI from 2019", "nhs_number": NHS})
    incoming = [r for r in api(b, "GET", "/api/exchange/requests",
                               params={"direction": "incoming"}) if r["state"] == "open"][0]
    api(b, "POST", f"/api/exchange/requests/{incoming['public_id']}/decline",
        json={"reason": "No MRI held for this patient"})
    until(lambda: "No MRI held for this patient" in page(a, "/requests"),
          what="the declined answer")
