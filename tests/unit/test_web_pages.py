"""The web app's pages, driven in-process like a browser: forms, cookies, CSRF, redirects."""

from __future__ import annotations

import re

import pytest

from imageshare.domain.actors import Actor
from tests.factory import ct_series, us_cine
from tests.unit.test_sessions import enrol_two_factor, next_code

HTML = {"Accept": "text/html"}
PASSWORD = "a-long-password"
PDF = b"%PDF-1.4\n%%EOF\n"
SYSTEM = Actor("system", "tests", "admin", "tests")


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf-token" content="([^"]*)"', html).group(1)


def browser_sign_in(client, username, password=PASSWORD, code=None):
    response = client.post("/login", data={"username": username, "password": password},
                           headers=HTML, follow_redirects=False)
    if code is not None:
        assert response.headers["location"].startswith("/login/code")
        form = client.get(response.headers["location"], headers=HTML)
        response = client.post("/login/code", data={"code": code, "csrf_token": csrf_of(
            form.text)}, headers=HTML, follow_redirects=False)
    return response


def search(client, **fields):
    """Post the search form as the browser does (searches never go in a URL)."""
    form = client.get("/", headers=HTML)
    return client.post("/search", headers=HTML,
                       data={"csrf_token": csrf_of(form.text), **fields})


@pytest.fixture
def browser(archive, anonymous):
    archive.users.add("sono", PASSWORD, "sonographer")
    assert browser_sign_in(anonymous, "sono").status_code == 303
    return anonymous


@pytest.fixture
def stored(archive, tmp_path):
    ct = [archive.ingest.store_copy(p, SYSTEM) for p in ct_series(
        tmp_path / "ct", 3, patient_id="H100", patient_name="Doe^Jane")][0].study_uid
    us = archive.ingest.store_copy(us_cine(tmp_path / "us", frames=4, patient_id="EMERG7",
                                           patient_name="Unknown^Patient"), SYSTEM).study_uid
    return {"ct": ct, "us": us}


def test_anonymous_browsers_are_sent_to_the_sign_in_page(anonymous):
    response = anonymous.get("/search?q=x", headers=HTML, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=%2Fsearch%3Fq%3Dx"
    login = anonymous.get("/login", headers=HTML)
    assert login.status_code == 200 and 'name="password"' in login.text
    assert "default-src 'self'" in login.headers["content-security-policy"]


def test_wrong_password_shows_one_message_and_is_audited(archive, anonymous):
    archive.users.add("sono", PASSWORD, "sonographer")
    response = browser_sign_in(anonymous, "sono", "wrong-password")
    unknown = browser_sign_in(anonymous, "nobody", "wrong-password")
    assert response.status_code == unknown.status_code == 401
    assert "Wrong username or password" in response.text
    assert "imageshare_session" not in response.headers.get("set-cookie", "")
    failures = [e for e in archive.audit.events("session.start") if e["outcome"] == "failure"]
    assert len(failures) == 2


def test_home_lists_recent_studies_and_search_finds_by_name(browser, stored):
    home = browser.get("/", headers=HTML)
    assert home.status_code == 200
    assert stored["ct"] in home.text and stored["us"] in home.text
    found = search(browser, q="doe")
    assert stored["ct"] in found.text and stored["us"] not in found.text
    bad = search(browser, nhs="1234567890")
    assert bad.status_code == 400 and "not a valid NHS number" in bad.text


def test_study_page_shows_patient_series_devices_and_is_audited(archive, browser, stored):
    page = browser.get(f"/studies/{stored['ct']}", headers=HTML)
    assert page.status_code == 200
    assert "Doe, Jane" in page.text and "H100" in page.text
    assert "ImageShare tests" in page.text  # manufacturer from the series
    assert f"/dicomweb/studies/{stored['ct']}/series/" in page.text
    assert "Who viewed" not in page.text  # only for administrators
    views = list(archive.audit.events("study.view", stored["ct"]))
    assert views and views[0]["actor"] == "user:sono"


def test_a_form_without_the_csrf_token_changes_nothing(archive, browser, stored):
    response = browser.post(f"/studies/{stored['ct']}/comments", data={"body": "hello"},
                            headers=HTML)
    assert response.status_code == 403
    assert archive.comments.for_study(stored["ct"]) == []
    denied = list(archive.audit.events("access.denied"))
    assert denied and denied[0]["actor"] == "user:sono"


def test_comments_and_reports_are_added_from_the_study_page(archive, browser, stored):
    page = browser.get(f"/studies/{stored['ct']}", headers=HTML)
    csrf = csrf_of(page.text)
    browser.post(f"/studies/{stored['ct']}/comments", data={"body": "No fracture.",
                                                              "csrf_token": csrf})
    response = browser.post(f"/studies/{stored['ct']}/documents",
                            data={"csrf_token": csrf, "title": "Discharge letter"},
                            files={"file": ("letter.pdf", PDF, "application/pdf")},
                            headers=HTML)
    assert response.status_code == 200 and "attached" in response.text
    assert "No fracture." in response.text and "Discharge letter" in response.text
    sop = re.search(r'/documents/([0-9.]+)"', response.text).group(1)
    pdf = browser.get(f"/studies/{stored['ct']}/documents/{sop}")
    assert pdf.content == PDF and pdf.headers["content-type"] == "application/pdf"
    assert list(archive.audit.events("study.download", stored["ct"]))


def test_viewer_page_carries_the_frames_and_the_cine_rate(browser, stored):
    page = browser.get(f"/viewer/{stored['us']}", headers=HTML)
    assert page.status_code == 200
    manifest = re.search(r'<script id="manifest" type="application/json">(.*?)</script>',
                         page.text, re.S).group(1)
    assert '"frameRate": 30.03' in manifest and '"cine": true' in manifest
    assert manifest.count('"multi": true') == 4


def test_correcting_patient_details_through_the_form(archive, browser, stored):
    form = browser.get(f"/studies/{stored['us']}/patient", headers=HTML)
    assert 'value="EMERG7"' in form.text
    response = browser.post(f"/studies/{stored['us']}/patient", headers=HTML, data={
        "csrf_token": csrf_of(form.text), "family": "Patel", "given": "Asha",
        "patient_id": "H555", "nhs_number": "943 476 5919", "birth_date": "1985-04-12",
        "sex": "F", "reason": "Emergency scan identified"})
    assert response.status_code == 200, response.text
    assert "Patel, Asha" in response.text and "Emergency scan identified" in response.text
    found = search(browser, q="patel")
    assert stored["us"] in found.text


def test_admin_must_set_up_two_factor_then_manages_users(archive, anonymous):
    from tests.conftest import ADMIN_PASSWORD

    first = browser_sign_in(anonymous, "admin", ADMIN_PASSWORD)
    assert first.headers["location"] == "/account#two-factor"
    blocked = anonymous.get("/admin/users", headers=HTML, follow_redirects=False)
    assert blocked.status_code == 303 and blocked.headers["location"] == "/account#two-factor"
    account = anonymous.get("/account", headers=HTML)
    setup = anonymous.post("/account/two-factor", data={"csrf_token": csrf_of(account.text)},
                           headers=HTML)
    secret = re.search(r'class="totp-secret">([A-Z2-7]+)<', setup.text).group(1)
    import pyotp

    done = anonymous.post("/account/two-factor/confirm", headers=HTML, follow_redirects=False,
                          data={"csrf_token": csrf_of(setup.text),
                                "code": pyotp.TOTP(secret).now()})
    assert done.status_code == 303
    users = anonymous.get("/admin/users", headers=HTML)
    assert users.status_code == 200
    added = anonymous.post("/admin/users", headers=HTML, data={
        "csrf_token": csrf_of(users.text), "username": "rev1", "role": "reviewer"})
    temporary = re.search(r'class="temporary-password">([^<]+)<', added.text).group(1)
    assert archive.users.authenticate("rev1", temporary) is not None
    asked = anonymous.post("/admin/users/rev1/disable",
                           data={"csrf_token": csrf_of(added.text)})
    assert archive.users.authenticate("rev1", temporary) is not None  # asked, not done
    anonymous.post("/admin/users/rev1/disable",
                   data={"csrf_token": csrf_of(asked.text), "confirm": "yes"})
    assert archive.users.authenticate("rev1", temporary) is None


def test_two_factor_sign_in_in_the_browser(archive, anonymous):
    archive.users.add("sono", PASSWORD, "sonographer")
    totp = enrol_two_factor(archive, "sono")
    response = browser_sign_in(anonymous, "sono", code=next_code(totp))
    assert response.status_code == 303 and response.headers["location"] == "/"
    assert anonymous.get("/", headers=HTML).status_code == 200


def test_a_reviewer_cannot_open_a_study_not_shared_with_them(archive, anonymous, stored):
    archive.users.add("rev", PASSWORD, "reviewer")
    browser_sign_in(anonymous, "rev")
    for path in (f"/studies/{stored['ct']}", f"/viewer/{stored['ct']}"):
        response = anonymous.get(path, headers=HTML)
        assert response.status_code == 403
        assert "Doe" not in response.text
    denied = [e for e in archive.audit.events("access.denied") if e["actor"] == "user:rev"]
    assert {e["study_uid"] for e in denied} == {stored["ct"]}


def test_a_session_cookie_works_only_for_its_own_user(archive, anonymous, stored):
    archive.users.add("rev", PASSWORD, "reviewer")
    archive.users.add("sono", PASSWORD, "sonographer")
    browser_sign_in(anonymous, "rev")
    reviewer_cookie = anonymous.cookies.get("imageshare_session")
    browser_sign_in(anonymous, "sono")
    sono_csrf = csrf_of(anonymous.get("/", headers=HTML).text)
    anonymous.cookies.set("imageshare_session", reviewer_cookie)
    response = anonymous.post(f"/studies/{stored['ct']}/comments", headers=HTML,
                              data={"body": "x", "csrf_token": sono_csrf})
    assert response.status_code == 403
    assert archive.comments.for_study(stored["ct"]) == []


def test_marks_drawn_on_an_image_are_kept_and_stored_as_a_presentation_state(
        archive, browser, stored):
    page = browser.get(f"/viewer/{stored['ct']}", headers=HTML)
    csrf = csrf_of(page.text)
    record = archive.catalogue.record(stored["ct"])
    sop = record.series[0].instances[0].sop_uid
    marks = [{"kind": "length", "points": [[5, 5], [45, 5]]},
             {"kind": "arrow", "points": [[60, 60], [30, 30]], "label": "lesion"}]
    saved = browser.post(f"/api/studies/{stored['ct']}/annotations", json={
        "sop_uid": sop, "frame": 1, "marks": marks}, headers={"X-CSRF-Token": csrf})
    assert saved.status_code == 200 and saved.json() == {"marks": 2}
    again = browser.get(f"/viewer/{stored['ct']}", headers=HTML)
    assert '"lesion"' in again.text and '"author": "sono"' in again.text
    states = [s for s in archive.catalogue.record(stored["ct"]).series if s.modality == "PR"]
    assert states and states[0].instances[0].sop_class_uid == "1.2.840.10008.5.1.4.1.1.11.1"
    outside = browser.post(f"/api/studies/{stored['ct']}/annotations", json={
        "sop_uid": sop, "frame": 1, "marks": [{"kind": "arrow", "points": [[0, 0], [999, 9]]}]},
        headers={"X-CSRF-Token": csrf})
    assert outside.status_code == 400
