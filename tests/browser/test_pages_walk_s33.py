"""A new user's walk through the web pages in real Chromium, on a phone (375 px) and on a
laptop: the menu stays on the screen, wide tables and long links do not widen the page, a
refused form keeps what was typed, words instead of codes, and an administrator's first
sign-in (two-factor enrolment) through to the admin pages."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydicom import Dataset, dcmread

from tests.factory import ct_series, us_cine
from tests.peers import ADMIN_PASSWORD, RunningServer

pytestmark = pytest.mark.browser

PASSWORD = "sonographer-password"
NHS_NUMBER = "9434765919"
PAGE_WIDER_THAN_SCREEN = ("() => document.documentElement.scrollWidth"
                          " - document.documentElement.clientWidth")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A running server with a CT (NHS number on file) and an ultrasound loop."""
    root = tmp_path_factory.mktemp("walk")
    nhs = Dataset()
    nhs.PatientID = NHS_NUMBER
    nhs.IssuerOfPatientID = "NHS"
    ct = ct_series(root / "in" / "ct", count=3, size=64, patient_id="H4001",
                   patient_name="Jones^Alice", OtherPatientIDsSequence=[nhs])
    us = us_cine(root / "in" / "us", frames=4, rows=120, cols=160, patient_id="H4002",
                 patient_name="Smith^John")
    server = RunningServer(root / "data").start()
    try:
        server.cli("import", "--quiet", str(root / "in"))
        server.cli("user", "add", "sono", "--role", "sonographer", "--password", PASSWORD)
        server.cli("user", "add", "pat", "--role", "patient", "--password", PASSWORD)
        yield {"server": server,
               "ct": dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID,
               "us": dcmread(us, stop_before_pixels=True).StudyInstanceUID}
    finally:
        server.stop()


def assert_fits(page, what: str) -> None:
    """Nothing on the page is wider than the screen, and Sign out is on the screen."""
    wider = page.evaluate(PAGE_WIDER_THAN_SCREEN)
    assert wider <= 1, f"{what}: the page is {wider} px wider than the screen"
    sign_out = page.get_by_role("button", name="Sign out")
    if sign_out.count():
        box = sign_out.bounding_box()
        width = page.viewport_size["width"]
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, (
            f"{what}: Sign out is off the screen at {box}")


def sign_in(page, base: str, username: str, password: str) -> None:
    page.goto(base + "/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_load_state()


def enrol_two_factor(page, base: str) -> None:
    """Turn two-factor sign-in on for the signed-in account (an administrator needs it)."""
    import pyotp

    page.goto(base + "/account")
    page.click("#two-factor button[type=submit]")
    page.wait_for_load_state()
    secret = page.locator(".totp-secret").inner_text().strip()
    page.fill("#two-factor input[name=code]", pyotp.TOTP(secret).now())
    page.click("#two-factor button[type=submit]")
    page.wait_for_load_state()


def test_a_sonographer_on_a_phone_finds_shares_and_a_refusal_keeps_the_typing(
        chromium, site, screenshot):
    base = site["server"].url
    context = chromium.new_context(viewport={"width": 375, "height": 740}, is_mobile=True,
                                   has_touch=True)
    page = context.new_page()
    sign_in(page, base, "sono", PASSWORD)
    assert page.url == base + "/"
    assert_fits(page, "the start page")

    # Find the patient by NHS number from the header's search box.
    page.locator("header input[name=q]").fill(NHS_NUMBER)
    page.locator("header input[name=q]").press("Enter")
    page.wait_for_load_state()
    assert page.get_by_role("link", name="Jones, Alice").count() == 1
    assert NHS_NUMBER not in page.url
    assert_fits(page, "the search results")
    screenshot(page, "phone-search")

    # The study: words, not DICOM codes; the page fits the phone.
    page.goto(f"{base}/studies/{site['us']}")
    assert page.locator("dl dd", has_text="other").count() >= 1, "Sex shown as a code"
    assert_fits(page, "the study page")
    screenshot(page, "phone-study")

    # The viewer takes the phone's screen: no scrolling past the image.
    page.get_by_role("link", name="Open viewer").first.click()
    page.wait_for_load_state()
    page.wait_for_selector("#canvas")
    taller = page.evaluate("() => document.documentElement.scrollHeight - window.innerHeight")
    assert taller <= 1, f"the viewer page is {taller} px taller than the screen"
    assert_fits(page, "the viewer")
    screenshot(page, "phone-viewer")
    page.goto(f"{base}/studies/{site['us']}")

    # A refused share: the error page says why and leads back to the form as it was typed.
    page.fill("#share input[name=title]", "FAST views for Dr Mentor")
    page.fill("#share textarea[name=message]", "Please look at the second loop")
    page.evaluate("() => document.querySelector('#share input[name=days]')"
                  ".removeAttribute('max')")
    page.fill("#share input[name=days]", "9999")
    page.click("#share button[type=submit]")
    page.wait_for_load_state()
    assert page.locator("main [role=alert]").inner_text().strip() != ""
    assert_fits(page, "the refusal")
    screenshot(page, "phone-refused")
    page.get_by_role("link", name="Back to the form").click()
    page.wait_for_url(f"{base}/studies/{site['us']}")
    page.wait_for_load_state()
    assert page.input_value("#share input[name=title]") == "FAST views for Dr Mentor"
    assert page.input_value("#share textarea[name=message]") == "Please look at the second loop"

    # Made: the long link breaks instead of widening the page.
    page.fill("#share input[name=days]", "7")
    page.click("#share button[type=submit]")
    page.wait_for_load_state()
    assert page.locator("h1").inner_text() == "Share created"
    link = page.locator(".share-link").inner_text().strip()
    passcode = page.locator(".share-passcode").inner_text().strip()
    assert_fits(page, "the new share")
    screenshot(page, "phone-share-created")

    # A page reached after the share was made does not bring the old typing back.
    page.goto(f"{base}/studies/{site['us']}")
    assert page.input_value("#share input[name=title]") == ""

    # A refusal shown on the form's own page (a wrong password) keeps the address typed.
    page.goto(base + "/account")
    page.fill("#email input[name=email]", "sono@hospital.example")
    page.fill("#email input[name=current]", "not-my-password")
    page.click("#email button[type=submit]")
    page.wait_for_load_state()
    assert page.locator("main [role=alert]").count() == 1
    assert page.input_value("#email input[name=email]") == "sono@hospital.example"
    assert page.input_value("#email input[name=current]") == ""
    assert_fits(page, "the account page")

    page.goto(base + "/shares")
    assert page.get_by_text("FAST views for Dr Mentor").count() == 1
    assert_fits(page, "My shares")
    for path in ("/notifications", "/account", "/shared-with-me", "/teaching"):
        page.goto(base + path)
        assert_fits(page, path)
    context.close()

    # The recipient opens the link on their phone.
    recipient = chromium.new_context(viewport={"width": 375, "height": 740})
    tab = recipient.new_page()
    tab.goto(link)
    tab.fill("input[name=passcode]", "WRONGCODE1")
    tab.click("button[type=submit]")
    tab.wait_for_load_state()
    assert "not right" in tab.locator("main [role=alert]").inner_text()
    tab.fill("input[name=passcode]", passcode)
    tab.click("button[type=submit]")
    tab.wait_for_load_state()
    assert tab.url.endswith("/case")
    assert "Smith" not in tab.inner_text("body")
    assert_fits(tab, "the shared case")
    screenshot(tab, "phone-recipient")
    recipient.close()


def test_an_administrators_first_sign_in_enrols_two_factor_and_the_menu_fits(
        chromium, site, screenshot):
    import pyotp

    base = site["server"].url
    context = chromium.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    sign_in(page, base, "admin", ADMIN_PASSWORD)
    page.goto(base + "/account")
    # Until two-factor sign-in is on there is no menu, but there is a way out.
    assert page.get_by_role("button", name="Sign out").count() == 1
    page.click("#two-factor button[type=submit]")
    page.wait_for_load_state()
    secret = page.locator(".totp-secret").inner_text().strip()
    page.fill("#two-factor input[name=code]", "00000")
    page.click("#two-factor button[type=submit]")
    page.wait_for_load_state()
    assert page.locator("main [role=alert]").count() == 1
    # A mistyped code shows the same key again: the one the phone has scanned still works.
    assert page.locator(".totp-secret").inner_text().strip() == secret
    page.fill("#two-factor input[name=code]", pyotp.TOTP(secret).now())
    page.click("#two-factor button[type=submit]")
    page.wait_for_load_state()
    notice = page.locator("main .flash[role=status]")
    assert notice.inner_text() == "Two-factor sign-in is on."
    assert "success" in (notice.get_attribute("class") or "")
    assert_fits(page, "the administrator's start page")
    for path in ("/admin/users", "/admin/sites", "/admin/audit", "/admin/holds",
                 "/admin/deletions", "/admin/retention", "/admin/reports"):
        response = page.goto(base + path)
        assert response is not None and response.status == 200, path
        assert page.locator("h1").count() == 1, path
        assert_fits(page, path)
        unlabelled = page.evaluate(
            "() => [...document.querySelectorAll('main input:not([type=hidden]), main select,"
            " main textarea')].filter(e => !(e.labels && e.labels.length)"
            " && !e.getAttribute('aria-label')).map(e => e.name)")
        assert unlabelled == [], f"{path}: inputs with no label: {unlabelled}"
    page.goto(base + "/admin/users")
    assert page.locator("form[action='/admin/users'] select[name=role]").input_value() == "", (
        "a new user's role is preselected (it was: admin)")
    screenshot(page, "admin-users")
    page.set_viewport_size({"width": 375, "height": 740})
    page.goto(base + "/admin/audit")
    assert_fits(page, "the audit trail on a phone")
    screenshot(page, "phone-audit")
    context.close()


def test_a_patient_is_not_offered_a_search_they_may_not_use(chromium, site, screenshot):
    base = site["server"].url
    context = chromium.new_context(viewport={"width": 375, "height": 740})
    page = context.new_page()
    sign_in(page, base, "pat", PASSWORD)
    assert page.locator("input[name=q]").count() == 0, "a search box that only refuses"
    assert page.get_by_role("link", name="My images").count() >= 1
    assert page.get_by_text("Recent studies").count() == 0
    assert_fits(page, "the patient's start page")
    screenshot(page, "phone-patient-home")
    context.close()
