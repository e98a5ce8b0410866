"""Accreditation review of a shared case (FUSIC, BSE): the profile chosen, the reviewer seeing
what the trainee wrote, feedback per clip and per case with nothing preset, the mentor's
sign-off, the trainee's logbook (PDF, CSV), visits instead of rendered frames, confirmation
before revoking, the "revoked" page mid-session, e-mail addresses set in the web app."""

from __future__ import annotations

import csv
import io
import re
import shutil

import pytest
from pypdf import PdfReader

from imageshare.domain.actors import Actor
from tests.conftest import require
from tests.factory import us_cine

OWNER = Actor("user", "trainee", "sonographer", "127.0.0.1")
HTML = {"Accept": "text/html"}
PASSWORD = "a-long-password"


@pytest.fixture(autouse=True)
def _tesseract():
    require(shutil.which("tesseract") is not None, "Tesseract OCR (Debian package tesseract-ocr)")


def csrf(text: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', text).group(1)


@pytest.fixture
def trainee(archive, anonymous, tmp_path):
    """A trainee, signed in, with a case of two ultrasound clips."""
    archive.users.add("trainee", PASSWORD, "sonographer")
    study = archive.ingest.store_copy(us_cine(tmp_path / "a", frames=3, patient_id="H777",
                                              patient_name="Lovelace^Ada"), OWNER).study_uid
    archive.ingest.store_copy(us_cine(tmp_path / "b", frames=3, patient_id="H777",
                                      patient_name="Lovelace^Ada", study_uid=study), OWNER)
    anonymous.post("/login", data={"username": "trainee", "password": PASSWORD}, headers=HTML)
    page = anonymous.get(f"/studies/{study}", headers=HTML)
    token = re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)
    made = anonymous.post(f"/studies/{study}/case", headers=HTML, follow_redirects=False,
                          data={"csrf_token": token, "title": "FUSIC heart 12"})
    case_id = made.headers["location"].split("?")[0].rsplit("/", 1)[1]
    anonymous.post(f"/cases/{case_id}", headers=HTML, data={
        "csrf_token": token, "title": "FUSIC heart 12",
        "description": "Breathless after surgery; parasternal long axis and A4C."})
    anonymous.token = token
    anonymous.case_id = case_id
    return anonymous


def share_case(trainee, **fields):
    shared = trainee.post(f"/cases/{trainee.case_id}/share", headers=HTML, data={
        "csrf_token": trainee.token, "interpretation": "Impaired LV, no effusion", **fields})
    assert shared.status_code == 200, shared.text
    passcode = re.search(r'class="share-passcode[^"]*">([^<]+)<', shared.text).group(1)
    link = re.search(r'class="share-link">[^<]*(/s/[^<]+)<', shared.text).group(1)
    return link, passcode


@pytest.fixture
def mentor(trainee):
    """A mentor's browser holding the opened case link."""
    link, passcode = share_case(trainee)
    browser = trainee.__class__(trainee.app, base_url=str(trainee.base_url))
    browser.post(link, data={"passcode": passcode}, headers=HTML)
    browser.link = link
    return browser


def test_a_case_share_goes_out_under_the_accreditation_profile_unless_another_is_chosen(
        archive, trainee):
    form = trainee.get(f"/cases/{trainee.case_id}", headers=HTML)
    assert re.search(r"<option selected>accreditation</option>", form.text)
    share_case(trainee)
    share_case(trainee, profile="teaching")
    assert [s.profile for s in archive.shares.owned("trainee")] == ["teaching", "accreditation"]


def test_the_reviewer_sees_the_description_and_the_senders_interpretation(mentor):
    case = mentor.get(mentor.link + "/case", headers=HTML)
    assert "Breathless after surgery" in case.text
    assert "Impaired LV, no effusion" in case.text
    assert "Lovelace" not in case.text and "H777" not in case.text


def test_feedback_has_no_preset_choice_and_incomplete_feedback_keeps_nothing(archive, mentor):
    case = mentor.get(mentor.link + "/case", headers=HTML)
    form = case.text.split('class="grid feedback-form"')[1].split("</form>")[0]
    for name in ("view_obtained", "image_quality", "agreement"):
        assert f'<select name="{name}" required>' in form
        select = form.split(f'name="{name}"')[1].split("</select>")[0]
        assert re.findall(r"<option[^>]*selected", select) == [
            '<option value="" selected']  # only the empty "Choose…" is preselected
    refused = mentor.post(mentor.link + "/feedback", headers=HTML, data={
        "csrf_token": csrf(case.text), "view_obtained": "yes", "agreement": "agree"})
    assert refused.status_code == 400 and "image quality" in refused.text
    share = archive.shares.owned("trainee")[0]
    assert archive.shares.feedback(share) == []


def test_feedback_on_a_named_clip_is_confirmed_and_the_owner_sees_which_clip(archive, mentor,
                                                                             trainee):
    case = mentor.get(mentor.link + "/case", headers=HTML)
    form = case.text.split('class="grid feedback-form"')[1]
    clips = re.findall(r'<option value="([0-9.]+)">(Series \d+, image \d+)</option>', form)
    assert len(clips) == 2
    sop, name = clips[1]
    mentor.post(mentor.link + "/comments", headers=HTML, data={
        "csrf_token": csrf(case.text), "body": "Foreshortened apex", "sop": sop})
    sent = mentor.post(mentor.link + "/feedback", headers=HTML, data={
        "csrf_token": csrf(case.text), "sop": sop, "view_obtained": "partly",
        "image_quality": "3", "agreement": "disagree", "findings": "LV looks normal"})
    assert sent.status_code == 200 and "your feedback was sent" in sent.text
    assert f"<dt>On</dt><dd>{name}</dd>" in sent.text
    share = archive.shares.owned("trainee")[0]
    detail = trainee.get(f"/shares/{share.public_id}", headers=HTML)
    assert f'on <strong class="clip-name">{name}</strong>' in detail.text
    assert f"<dt>On</dt><dd>{name}</dd>" in detail.text


def test_the_mentor_signs_off_after_feedback_and_the_logbook_exports_it(archive, mentor,
                                                                       trainee):
    case = mentor.get(mentor.link + "/case", headers=HTML)
    early = mentor.post(mentor.link + "/signoff", headers=HTML,
                        data={"csrf_token": csrf(case.text), "note": "Competent"})
    assert early.status_code == 400 and "feedback" in early.text
    mentor.post(mentor.link + "/feedback", headers=HTML, data={
        "csrf_token": csrf(case.text), "view_obtained": "yes", "image_quality": "4",
        "agreement": "agree"})
    signed = mentor.post(mentor.link + "/signoff", headers=HTML,
                         data={"csrf_token": csrf(case.text), "note": "Competent in PLAX"})
    assert signed.status_code == 200 and "You signed off this case" in signed.text
    assert "Sign off this case" not in signed.text  # once only
    page = trainee.get("/logbook", headers=HTML)
    assert "FUSIC heart 12" in page.text and "signed off" in page.text
    rows = list(csv.reader(io.StringIO(trainee.get("/logbook.csv").text)))
    assert rows[0][0] == "Case" and rows[1][0] == "FUSIC heart 12"
    assert rows[1][4] == "signed off" and rows[1][8] == "Competent in PLAX"
    pdf = trainee.get("/logbook.pdf")
    assert pdf.headers["content-type"] == "application/pdf"
    text = "".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf.content)).pages)
    assert "FUSIC heart 12" in text and "Competent in PLAX" in text
    assert "Lovelace" not in text and "H777" not in text
    assert {e["detail"]["format"] for e in archive.audit.events("logbook.export")} == {
        "csv", "pdf"}


def test_the_access_log_shows_one_row_per_visit_not_per_rendered_frame(archive, mentor,
                                                                       trainee):
    share = archive.shares.owned("trainee")[0]
    items = archive.shares.items(share)
    for _view in range(2):
        mentor.get(mentor.link + "/case", headers=HTML)
        for item in items:
            for frame in (1, 2, 3):
                assert mentor.get(
                    f"{mentor.link}/dicomweb/studies/{item.public_study_uid}/series/"
                    f"{item.public_series_uid}/instances/{item.public_sop_uid}/frames/"
                    f"{frame}/rendered").status_code == 200
    detail = trainee.get(f"/shares/{share.public_id}", headers=HTML)
    visits = re.findall(r'<tr class="visit">.*?</tr>', detail.text, re.S)
    recipient = [v for v in visits if "the link&#39;s recipient" in v]
    assert len(recipient) == 1  # 2 page views and 12 rendered frames: one visit
    assert "12 images shown" in recipient[0] and "opened with the passcode" in recipient[0]


def test_revoking_asks_first_and_a_reviewer_mid_session_is_told_the_link_was_revoked(
        archive, mentor, trainee):
    share = archive.shares.owned("trainee")[0]
    detail = trainee.get(f"/shares/{share.public_id}", headers=HTML)
    unconfirmed = trainee.post(f"/shares/{share.public_id}/revoke", headers=HTML,
                               data={"csrf_token": trainee.token}, follow_redirects=False)
    assert unconfirmed.headers["location"] == f"/shares/{share.public_id}/revoke"
    assert archive.shares.owned("trainee")[0].state == "active"
    question = trainee.get(f"/shares/{share.public_id}/revoke", headers=HTML)
    assert "Yes, revoke the link" in question.text and "No, keep it" in question.text
    assert f'href="/shares/{share.public_id}/revoke"' in detail.text
    done = trainee.post(f"/shares/{share.public_id}/revoke", headers=HTML,
                        data={"csrf_token": trainee.token, "confirm": "yes"})
    assert "The share was revoked" in done.text
    assert archive.shares.owned("trainee")[0].state == "revoked"
    after = mentor.get(mentor.link + "/case", headers=HTML)
    assert after.status_code == 410
    assert "This link no longer works" in after.text and "revoked" in after.text
    assert 'name="password"' not in after.text  # not the staff sign-in page
    item = archive.shares.items(share)[0]
    frame = mentor.get(f"{mentor.link}/dicomweb/studies/{item.public_study_uid}/series/"
                       f"{item.public_series_uid}/instances/{item.public_sop_uid}/frames/1/"
                       "rendered", headers={"Accept": "image/jpeg"})
    # No Basic challenge: a browser would answer it with a password prompt mid-session.
    assert frame.status_code == 401 and "www-authenticate" not in frame.headers
    assert "www-authenticate" in mentor.get("/dicomweb/studies").headers


def test_staff_set_their_e_mail_address_on_the_account_page_and_admins_on_the_users_page(
        archive, trainee, anonymous):
    page = trainee.get("/account", headers=HTML)
    assert "None is set: you get no e-mail" in page.text
    bad = trainee.post("/account/email", headers=HTML,
                       data={"csrf_token": csrf(page.text), "email": "not an address",
                             "current": PASSWORD})
    assert bad.status_code == 400 and archive.users.email_of("trainee") == ""
    trainee.post("/account/email", headers=HTML,
                 data={"csrf_token": csrf(page.text), "email": "trainee@example.org",
                       "current": PASSWORD})
    assert archive.users.email_of("trainee") == "trainee@example.org"
    assert [(e["detail"]["user"], e["outcome"]) for e in archive.audit.events("user.email")
            ] == [("trainee", "success"), ("trainee", "failure")]


def test_an_administrator_sets_a_staff_members_e_mail_address_on_the_users_page(archive):
    import pyotp
    from fastapi.testclient import TestClient

    from imageshare.web.server import create_app
    from tests.conftest import ADMIN_PASSWORD
    from tests.unit.test_web_pages import browser_sign_in, csrf_of

    archive.users.add("sono2", PASSWORD, "sonographer")
    with TestClient(create_app(archive)) as admin:
        browser_sign_in(admin, "admin", ADMIN_PASSWORD)
        account = admin.get("/account", headers=HTML)
        setup = admin.post("/account/two-factor", headers=HTML,
                           data={"csrf_token": csrf_of(account.text)})
        secret = re.search(r'class="totp-secret">([A-Z2-7]+)<', setup.text).group(1)
        admin.post("/account/two-factor/confirm", headers=HTML, data={
            "csrf_token": csrf_of(setup.text), "code": pyotp.TOTP(secret).now()})
        users = admin.get("/admin/users", headers=HTML)
        assert 'aria-label="E-mail address of sono2"' in users.text
        bad = admin.post("/admin/users/sono2/email", headers=HTML, data={
            "csrf_token": csrf_of(users.text), "email": "sono2 at example"})
        assert bad.status_code == 400 and "not valid" in bad.text
        admin.post("/admin/users/sono2/email", headers=HTML, data={
            "csrf_token": csrf_of(users.text), "email": "sono2@example.org"})
    assert archive.users.email_of("sono2") == "sono2@example.org"
    assert archive.users.account("sono2").email == "sono2@example.org"
