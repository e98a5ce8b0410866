"""Red team of the web application (session 38), replaying attacks as a partner hospital, an
EHR, an uploading patient, a patient with an account and members of staff: a teaching case's
PDF opened in the archive's own origin, an EHR launch opening an account that must first
choose its own password, a transfer receipt sent again (a retried site message) or turned
round afterwards, a patient or a colleague trying the addresses of studies or cases not theirs
without a trace, and file names that hide control or text-direction characters."""

from __future__ import annotations

import base64
import re
import shutil
import time
from datetime import UTC, datetime
from urllib.parse import urlencode

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import insert

from imageshare.domain.actors import Actor
from imageshare.ehr.launch import sign_launch
from imageshare.exchange.nodes import Node
from imageshare.storage.index.schema import transfers
from imageshare.web.server import create_app
from tests.conftest import make_archive, require
from tests.factory import ct_series
from tests.unit.test_attack_replay_s31 import _upload_invitation, inviting  # noqa: F401
from tests.unit.test_patient_account_links import (  # noqa: F401 - its fixture
    _invite_by_staff,
    _sign_up,
    hospital,
)
from tests.unit.test_teaching_library import (  # noqa: F401 - its fixture
    csrf,
    educator,
    make_case,
    pdf_bytes,
    png_bytes,
)
from tests.unit.test_web_pages import browser_sign_in, csrf_of

HTML = {"Accept": "text/html"}
PASSWORD = "red-team-s38-password"
SYSTEM = Actor("system", "tests", "admin", "tests")


# -- a teaching case's files ------------------------------------------------------------------


def test_a_teaching_cases_pdf_is_saved_and_its_files_shown_sandboxed(archive, educator):  # noqa: F811
    """A PDF attached to a teaching case (made by anyone, anywhere) can carry scripts and
    forms: opened in the browser it would run in ImageShare's own origin with the educator's
    session. It is saved, as a study's documents are; photos and videos still show in the
    browser, but sandboxed (no script, no same-origin access), as uploads' originals are."""
    require(shutil.which("tesseract") is not None, "Tesseract OCR (Debian package tesseract-ocr)")
    path = make_case(educator)
    page = educator.get(path, headers=HTML)
    for name, content in (("report.pdf", pdf_bytes()), ("photo.png", png_bytes())):
        sent = educator.post(f"{path}/files", headers=HTML, files={
            "file": (name, content, "application/octet-stream")},
            data={"csrf_token": csrf(page.text), "title": name})
        assert sent.status_code == 200, sent.text
    case = archive.teaching.get(path.rsplit("/", 1)[1])
    kept = {a.kind: a for a in archive.teaching.attachments(case)}
    pdf = educator.get(f"{path}/files/{kept['pdf'].public_id}")
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF-")
    assert pdf.headers["content-disposition"].startswith("attachment;")
    assert pdf.headers["content-security-policy"] == "sandbox"
    photo = educator.get(f"{path}/files/{kept['image'].public_id}")
    assert photo.headers["content-disposition"].startswith("inline;")
    assert photo.headers["content-security-policy"] == "sandbox"
    assert photo.headers["x-content-type-options"] == "nosniff"


# -- EHR launch -------------------------------------------------------------------------------


def _launch_url(secret: str, user: str, **context: str) -> str:
    params = {**context, "ehr": "epr", "user": user, "expires": str(int(time.time()) + 120),
              "nonce": f"n-{time.monotonic_ns()}-launch38"}
    items = list(params.items())
    return "/iid?" + urlencode([*items, ("signature", sign_launch(items, secret))])


def test_a_launch_link_does_not_open_an_account_that_must_first_choose_its_password(
        archive, tmp_path):
    """An account made with a temporary password (one an administrator saw) must choose its
    own before it does anything else, on every channel: a launch link naming it shows no
    patient's studies and signs no browser in; the refusal is audited with its reason."""
    [path] = ct_series(tmp_path / "ct", 1, patient_id="H38", patient_name="Hidden^Harriet")
    stored = archive.ingest.store_copy(path, SYSTEM)
    archive.users.add("newdoc", PASSWORD, "clinician", temporary=True)
    secret = archive.ehr_launches.add("epr")
    with TestClient(create_app(archive)) as browser:
        answer = browser.get(_launch_url(secret, "newdoc", requestType="PATIENT",
                                         patientID="H38"), headers=HTML,
                             follow_redirects=False)
        assert answer.status_code == 403
        assert "Hidden" not in answer.text and stored.study_uid not in answer.text
        assert "set-cookie" not in answer.headers
        assert browser.get("/", headers=HTML, follow_redirects=False).status_code in (303, 401)
    [refused] = archive.audit.events("ehr.launch")
    assert (refused["outcome"], refused["detail"]["reason"]) == ("refused", "password-change")


# -- a transfer's receipt ---------------------------------------------------------------------


@pytest.fixture
def sent_transfer(archive):
    """A transfer of ours delivered to Hospital B, whose site account answers with receipts."""
    archive.nodes.add(Node("SITEB", "127.0.0.2", 104, display_name="Hospital B", inbox=True))
    archive.users.add("site-b", PASSWORD, "site", site_node="SITEB")
    archive.users.add("doctor", PASSWORD, "clinician")
    now = datetime.now(UTC)
    with archive.engine.begin() as conn:
        conn.execute(insert(transfers).values(
            public_id="t38", study_uid="1.2.38", site="SITEB", priority="urgent", note="",
            state="delivered", sent=2, total=2, failed=0, attempts=1, reason="",
            created_by="doctor", created_at=now, updated_at=now))
    with TestClient(create_app(archive)) as client:
        yield client


def test_a_receipt_sent_again_tells_the_sender_once(archive, sent_transfer):
    """Site messages are delivered again when an answer was lost: the same receipt arriving
    twice is taken once (one notification, one audit event), not a second 'accepted'."""
    receipt = {"transfer": "t38", "outcome": "accepted", "by": "Dr B", "note": "thanks"}
    for _ in range(2):
        answer = sent_transfer.post("/api/exchange/receipts", auth=("site-b", PASSWORD),
                                    json=receipt)
        assert answer.status_code == 200, answer.text
    assert [n["text"] for n in archive.notifier.recent("doctor")] == [
        "Hospital B accepted a study you sent"]
    assert len(list(archive.audit.events("exchange.receipt"))) == 1


def test_a_receipt_cannot_be_turned_round_afterwards(archive, sent_transfer):
    """Once the receiving site said it accepted the study, a later 'rejected' for the same
    transfer (a replayed or forged message) does not overturn what the sender was told."""
    accepted = {"transfer": "t38", "outcome": "accepted", "by": "Dr B"}
    assert sent_transfer.post("/api/exchange/receipts", auth=("site-b", PASSWORD),
                              json=accepted).status_code == 200
    turned = sent_transfer.post("/api/exchange/receipts", auth=("site-b", PASSWORD),
                                json={**accepted, "outcome": "rejected", "note": "oops"})
    assert turned.status_code == 400, turned.text
    assert "given already: accepted" in turned.json()["detail"]
    got = archive.transfers.get("t38")
    assert (got.receipt_outcome, got.receipt_note) == ("accepted", "")
    assert [e["outcome"] for e in archive.audit.events("exchange.receipt")] == [
        "refused", "success"]


# -- a patient's own studies ------------------------------------------------------------------


def test_a_patient_reaching_for_another_patients_study_is_an_audited_refusal(
        hospital):  # noqa: F811
    """A patient trying the UIDs of other studies on their download and share addresses gets
    the same 404 as for no study at all, and every such try is in the audit trail (an
    information governance officer sees the probing), as every other refusal is."""
    archive, sink, studies = hospital
    clerk = TestClient(create_app(archive))
    browser_sign_in(clerk, "clerk", "patients-password")
    ada = _sign_up(archive, _invite_by_staff(archive, sink, clerk, "ada@home.example",
                                             "H100"), "ada")
    bob_study = studies["H200"]
    assert ada.get(f"/my/studies/{bob_study}/download").status_code == 404
    form = ada.get("/my", headers=HTML)
    shared = ada.post(f"/my/studies/{bob_study}/share", headers=HTML, data={
        "csrf_token": csrf_of(form.text), "email": "gp@surgery.example", "days": "7"})
    assert shared.status_code == 404
    tries = [(e["action"], e["outcome"], e["study_uid"]) for e in archive.audit.events()
             if "ada" in e["actor"] and e["outcome"] != "success"]
    assert sorted(tries) == [("access.denied", "refused", bob_study),
                             ("patient.download", "refused", bob_study)]


# -- another member of staff's case -----------------------------------------------------------


def test_another_owners_case_is_not_found_and_every_try_is_an_audited_refusal(archive):
    """A case ("my archive") is its owner's: a colleague opening, changing, sharing or
    deleting it by its address gets the same 404 as for no case, each try audited as a
    refusal (as for another's share), and the case is left as it was."""
    archive.users.add("owner", PASSWORD, "clinician")
    archive.users.add("nosy", PASSWORD, "clinician")
    case = archive.cases.create(Actor("user", "owner", "clinician", "tests"), "MDT list")
    with TestClient(create_app(archive)) as nosy:
        assert browser_sign_in(nosy, "nosy", PASSWORD).status_code == 303
        token = csrf_of(nosy.get("/cases", headers=HTML).text)
        answers = [nosy.get(f"/cases/{case.public_id}", headers=HTML)] + [
            nosy.post(f"/cases/{case.public_id}{tail}", headers=HTML, data={
                "csrf_token": token, "title": "Mine now", "recipient_email": "x@y.example"})
            for tail in ("", "/share", "/delete")]
    assert [a.status_code for a in answers] == [404] * 4
    assert archive.cases.get(case.public_id, "owner").title == "MDT list"
    denied = [e["detail"]["route"] for e in archive.audit.events("access.denied")
              if "nosy" in e["actor"]]
    assert sorted(denied) == sorted(["/cases/{public_id}", "/cases/{public_id}",
                                     "/cases/{public_id}/share", "/cases/{public_id}/delete"])


# -- an invited upload's file names -----------------------------------------------------------


def _tus_metadata(**values: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


def test_a_file_name_with_control_or_text_direction_characters_is_refused_when_announced(
        inviting):  # noqa: F811
    """A file name is shown to the staff who review the upload and written into the DICOM
    made of the file: one holding a line break, an escape (which DICOM reads as a switch of
    character set) or a right-to-left override ("scan<RLO>gpj.exe" shows as "scanexe.jpg")
    is refused when the file is announced, saying why, and nothing is kept; names in any
    script and with spaces are still taken."""
    created = _upload_invitation(inviting)
    token = created.path.removeprefix("/u/")
    with TestClient(create_app(inviting)) as uploader:
        assert uploader.post(created.path, data={"passcode": created.passcode}, headers=HTML,
                             follow_redirects=False).status_code == 303
        page = uploader.get(f"{created.path}/upload", headers=HTML)
        tus = {"Tus-Resumable": "1.0.0", "Upload-Length": "10",
               "X-CSRF-Token": re.search(r'name="csrf-token" content="([^"]+)"',
                                         page.text).group(1)}
        for name in ("scan\u202egpj.exe", "letter\r\nX-Injected: 1.pdf", "a\x1b$B.jpg",
                     "CD/DICOM/IM\x07001", "scan\u061cgpj.exe", "letter\u2028X.pdf",
                     "sc\u200ban.jpg", "\ufeffscan.jpg"):
            answer = uploader.post(f"/u/{token}/files", headers={
                **tus, "Upload-Metadata": _tus_metadata(filename=name, relativePath=name)})
            assert answer.status_code == 400, name
            assert "text-direction characters" in answer.json()["detail"]
        invitation = inviting.uploads.invitations.by_token(token)
        assert inviting.uploads.receiver.files(invitation) == []
        persian = "\u0633\u0648\u0646\u0648\u06af\u0631\u0627\u0641\u06cc\u200c\u0647\u0627.jpg"
        for name in ("échographie 12 mai.jpg", persian):  # a zero-width non-joiner is a letter's
            taken = uploader.post(f"/u/{token}/files", headers={
                **tus, "Upload-Metadata": _tus_metadata(filename=name)})
            assert taken.status_code == 201, name
    assert sorted(f.path for f in inviting.uploads.receiver.files(invitation)) == sorted([
        "échographie 12 mai.jpg", persian])


# -- an upload invitation without a mail server -----------------------------------------------


def test_an_invitation_made_without_a_mail_server_does_not_claim_it_was_emailed(tmp_path):
    """With no SMTP server set up, the invitation page says that nothing was e-mailed and that
    the clerk must pass the link on: the patient would otherwise wait for a message that never
    comes."""
    archive = make_archive(tmp_path, public_url="https://images.hospital.example")
    try:
        archive.users.add("clerk", PASSWORD, "radiographer")
        clerk = TestClient(create_app(archive))
        assert browser_sign_in(clerk, "clerk", PASSWORD).status_code == 303
        answer = clerk.post("/uploads/invite", headers=HTML, data={
            "csrf_token": csrf_of(clerk.get("/uploads", headers=HTML).text),
            "patient_name": "Lovelace^Ada", "hospital_number": "H100",
            "birth_date": "1915-12-10", "email": "ada@home.example", "days": "7"})
        assert answer.status_code == 200, answer.text
        assert "upload-passcode" in answer.text
        assert "sent by e-mail" not in answer.text
        assert "nothing was sent to the person" in answer.text
    finally:
        archive.close()
