"""What changed on 3 December, walked in real Chromium as its users meet it, on a laptop
(1280x800) and a phone (390x844): an administrator's confirmation pages (disable, reset),
two-factor sign-in (a mistyped code keeps the key; the code prompt can sign out), the
current password asked before a token or two-factor set-up, a site's pinned certificate,
cancelling a transfer, a form refused by its field rules, and a shared report and video."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import UID, generate_uid

from tests.browser.test_pages_walk_s33 import PAGE_WIDER_THAN_SCREEN, sign_in
from tests.factory import us_cine
from tests.peers import ADMIN_PASSWORD, RunningServer
from tests.upload_media import mp4, pdf

pytestmark = pytest.mark.browser

PASSWORD = "sonographer-password"
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
FINGERPRINT = "ab" * 32


def _video(folder: Path, study_uid: str) -> Path:
    """An H.264 clip (Video Photographic Image Storage) in the study."""
    ds = dcmread(us_cine(folder / "v", frames=2, patient_id="H5002", patient_name="Smith^John",
                         study_uid=study_uid))
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.102")  # MPEG-4 AVC/H.264
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesDescription = "Phone clip"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(
        "1.2.840.10008.5.1.4.1.1.77.1.4.1")
    ds.Rows, ds.Columns, ds.NumberOfFrames = 240, 320, 8
    ds.PhotometricInterpretation = "YBR_PARTIAL_420"
    ds.PixelData = encapsulate([mp4(folder / "clip.mp4", frames=8).read_bytes()],
                               has_bot=False)
    ds["PixelData"].VR = "OB"
    path = folder / "video.dcm"
    ds.save_as(path, enforce_file_format=False)
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A running server with an ultrasound study holding a loop and a video, a sonographer,
    a nurse to disable and reset, a reviewer, and a DICOM port that takes a call and never
    answers it (a transfer to it stays sending)."""
    root = tmp_path_factory.mktemp("walk34")
    loop = us_cine(root / "in" / "us", frames=4, rows=120, cols=160, patient_id="H5002",
                   patient_name="Smith^John")
    study = dcmread(loop, stop_before_pixels=True).StudyInstanceUID
    _video(root / "in" / "video", study)
    report = pdf(root / "report.pdf")
    silent = socket.create_server(("127.0.0.1", 0), backlog=8)
    server = RunningServer(root / "data").start()
    try:
        server.cli("import", "--quiet", str(root / "in"))
        server.cli("user", "add", "sono", "--role", "sonographer", "--password", PASSWORD)
        server.cli("user", "add", "nurse", "--role", "clinician", "--password", PASSWORD)
        server.cli("user", "add", "drwho", "--role", "reviewer", "--password", PASSWORD)
        yield {"server": server, "study": study, "report": report,
               "silent_port": silent.getsockname()[1]}
    finally:
        silent.close()  # first: a call still waiting on it ends at once
        server.stop()


def assert_fits(page, what: str) -> None:
    """Nothing on the page is wider than the screen."""
    wider = page.evaluate(PAGE_WIDER_THAN_SCREEN)
    assert wider <= 1, f"{what}: the page is {wider} px wider than the screen"


def alert(page) -> str:
    """The one refusal on the page."""
    refusals = page.locator("main [role=alert]")
    assert refusals.count() == 1
    return refusals.inner_text().strip()


def refusal_is_next_to(page, form: str) -> bool:
    """The refusal stands just above the form it refuses, and the keyboard is in the
    required field left empty (which the refusal describes) or, with none, on the refusal."""
    return page.evaluate("""(selector) => {
        const form = document.querySelector(selector);
        const refusal = document.querySelector("main [role=alert]");
        const focused = document.activeElement;
        const described = form.contains(focused) && focused.required
            && (focused.getAttribute("aria-describedby") || "").includes(refusal.id);
        return form.previousElementSibling === refusal && (described || focused === refusal);
    }""", form)


def test_an_administrator_enrols_confirms_changes_pins_a_site_and_cancels_a_transfer(
        chromium, site, screenshot):
    import pyotp

    base = site["server"].url
    context = chromium.new_context(viewport=LAPTOP)
    page = context.new_page()

    # (2) Enrolment: a mistyped code shows the same key again.
    sign_in(page, base, "admin", ADMIN_PASSWORD)
    page.goto(base + "/account")
    page.click("#two-factor button[type=submit]")
    page.wait_for_load_state()
    secret = page.locator(".totp-secret").inner_text().strip()
    page.fill("#two-factor input[name=code]", "000000")
    page.click("#two-factor button[type=submit]")
    page.wait_for_load_state()
    screenshot(page, "enrol-wrong-code")
    assert "not right" in alert(page)
    assert refusal_is_next_to(page, "form[action='/account/two-factor/confirm']")
    assert page.evaluate("() => document.activeElement.name") == "code"
    assert page.locator(".totp-secret").inner_text().strip() == secret
    totp = pyotp.TOTP(secret)
    page.fill("#two-factor input[name=code]", totp.now())
    page.click("#two-factor button[type=submit]")
    page.wait_for_load_state()
    page.click("header button:has-text('Sign out')")
    page.wait_for_load_state()

    # (2) The code prompt: Sign out ends the half-session.
    sign_in(page, base, "admin", ADMIN_PASSWORD)
    assert "/login/code" in page.url
    screenshot(page, "code-prompt")
    page.set_viewport_size(PHONE)
    assert_fits(page, "the code prompt")
    screenshot(page, "code-prompt-phone")
    page.set_viewport_size(LAPTOP)
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_load_state()
    screenshot(page, "code-prompt-signed-out")
    page.goto(base + "/admin/users")
    assert "/login" in page.url
    sign_in(page, base, "admin", ADMIN_PASSWORD)
    # The code of the next half minute: each code is taken once (the last one turned it on).
    page.fill("input[name=code]", totp.at(time.time() + totp.interval))
    page.click("form[action='/login/code'] button[type=submit]")
    page.wait_for_load_state()
    assert page.url == base + "/"

    # (1) Disable asks first, on a page of its own; Cancel goes back; confirmed: a notice.
    page.goto(base + "/admin/users")
    page.locator("tr[data-user=nurse]").get_by_role("button", name="Disable").click()
    page.wait_for_load_state()
    screenshot(page, "confirm-disable")
    assert page.locator("h1").inner_text() == "Disable nurse?"
    assert "signed out everywhere" in page.locator("main .card").inner_text()
    confirm_box = page.get_by_role("button", name="Disable nurse").bounding_box()
    cancel_box = page.get_by_role("link", name="Cancel").bounding_box()
    assert confirm_box and cancel_box
    assert abs(confirm_box["y"] + confirm_box["height"] / 2
               - cancel_box["y"] - cancel_box["height"] / 2) <= 2, "Cancel sits askew"
    page.get_by_role("link", name="Cancel").click()
    page.wait_for_load_state()
    assert page.url.startswith(base + "/admin/users")
    assert "active" in page.locator("tr[data-user=nurse]").inner_text()
    page.locator("tr[data-user=nurse]").get_by_role("button", name="Disable").click()
    page.wait_for_load_state()
    page.get_by_role("button", name="Disable nurse").click()
    page.wait_for_load_state()
    screenshot(page, "disabled")
    assert "disabled" in page.locator("tr[data-user=nurse]").inner_text()
    assert page.locator("main .flash[role=status]").inner_text().startswith(
        "The account was disabled: its sessions ended")

    # (1) Reset password (and two-factor), confirmed: the temporary password is shown.
    row = page.locator("tr[data-user=nurse]")
    row.locator("input[name=reset_two_factor]").check()
    row.get_by_role("button", name="Reset password").click()
    page.wait_for_load_state()
    screenshot(page, "confirm-reset")
    page.set_viewport_size(PHONE)
    assert_fits(page, "the reset confirmation")
    screenshot(page, "confirm-reset-phone")
    page.set_viewport_size(LAPTOP)
    page.get_by_role("button", name="Reset password and two-factor").click()
    page.wait_for_load_state()
    screenshot(page, "reset-done")
    assert page.locator(".temporary-password").inner_text().strip()
    assert "nurse" in page.locator("main .flash.success").inner_text()
    tops = {round(b.bounding_box()["y"]) for b in
            page.locator("tr[data-user=nurse] td.actions button").all()}
    assert len(tops) == 1 or max(tops) - min(tops) <= 4, "a user's actions wrap askew"

    # (4) A site with a bad fingerprint, then with a metadata address, then pinned.
    page.goto(base + "/admin/sites")
    screenshot(page, "sites-form")
    form = page.locator("form[action='/admin/sites']")
    form.locator("input[name=display_name]").fill("Partner hospital")
    form.locator("input[name=ae_title]").fill("PARTNER")
    form.locator("input[name=host]").fill("127.0.0.1")
    form.locator("input[name=port]").fill(str(site["silent_port"]))
    form.locator("input[name=tls]").check()
    form.locator("input[name=tls_certificate]").fill("not-a-fingerprint")
    form.get_by_role("button", name="Save site").click()
    page.wait_for_load_state()
    screenshot(page, "site-bad-fingerprint")
    assert "64 hexadecimal digits" in alert(page)
    assert refusal_is_next_to(page, "form[action='/admin/sites']")
    assert page.evaluate("() => document.activeElement.getAttribute('role')") == "alert"
    assert form.locator("input[name=ae_title]").input_value() == "PARTNER"
    assert form.locator("input[name=tls_certificate]").input_value() == "not-a-fingerprint"
    form.locator("input[name=tls_certificate]").fill("")
    form.locator("input[name=tls]").uncheck()
    form.locator("input[name=dicomweb_url]").fill("http://169.254.169.254/dicomweb")
    form.get_by_role("button", name="Save site").click()
    page.wait_for_load_state()
    screenshot(page, "site-metadata-address")
    assert "link-local" in alert(page)
    assert form.locator("input[name=dicomweb_url]").input_value() == (
        "http://169.254.169.254/dicomweb")
    page.goto(base + "/admin/sites")
    form.locator("input[name=display_name]").fill("Pinned hospital")
    form.locator("input[name=ae_title]").fill("PINNED")
    form.locator("input[name=host]").fill("127.0.0.1")
    form.locator("input[name=port]").fill("11112")
    form.locator("input[name=tls]").check()
    form.locator("input[name=tls_certificate]").fill(FINGERPRINT)
    form.locator("input[name=send_to]").uncheck()
    form.get_by_role("button", name="Save site").click()
    page.wait_for_load_state()
    form.locator("input[name=display_name]").fill("Partner hospital")
    form.locator("input[name=ae_title]").fill("PARTNER")
    form.locator("input[name=host]").fill("127.0.0.1")
    form.locator("input[name=port]").fill(str(site["silent_port"]))
    form.get_by_role("button", name="Save site").click()
    page.wait_for_load_state()
    screenshot(page, "sites-pinned")
    pinned = page.locator("table.results tr", has_text="PINNED").inner_text()
    assert "(TLS, certificate pinned)" in pinned and "abababab…abababab" in pinned
    page.set_viewport_size(PHONE)
    assert_fits(page, "the sites page")
    screenshot(page, "sites-phone")
    page.set_viewport_size(LAPTOP)

    # (6) A port that is not a number: each field named in words; the typing kept.
    page.goto(base + "/admin/sites")
    form.locator("input[name=display_name]").fill("Typo hospital")
    form.locator("input[name=ae_title]").fill("TYPO")
    form.locator("input[name=host]").fill("10.1.2.3")
    page.evaluate("() => { const form = document.querySelector(\"form[action='/admin/sites']\");"
                  " form.port.type = 'text'; form.host.required = false; }")
    form.locator("input[name=port]").fill("one-oh-four")
    form.locator("input[name=host]").fill("")
    form.get_by_role("button", name="Save site").click()
    page.wait_for_load_state()
    screenshot(page, "field-rules")
    problems = page.locator("main [role=alert] li").all_inner_texts()
    assert problems == ["Host is required", "Port: must be a whole number"], problems
    page.set_viewport_size(PHONE)
    assert_fits(page, "the field rules refusal")
    screenshot(page, "field-rules-phone")
    page.set_viewport_size(LAPTOP)
    page.get_by_role("link", name="Back to the form").click()
    page.wait_for_load_state()
    assert form.locator("input[name=ae_title]").input_value() == "TYPO"
    assert form.locator("input[name=display_name]").input_value() == "Typo hospital"

    # (5) A transfer to a site that never answers: Cancel, and what the page says after.
    page.goto(f"{base}/studies/{site['study']}")
    page.select_option("select[name=site]", "PARTNER")
    page.click(f"form[action='/studies/{site['study']}/send'] button[type=submit]")
    page.wait_for_load_state()
    assert "/transfers/" in page.url
    screenshot(page, "transfer-sending")
    assert page.locator(".transfer-state").inner_text() in ("queued", "sending")
    # Left alone, the page looks again by itself; in use, it does not reload under the keyboard.
    with page.expect_navigation(timeout=10_000):
        pass
    cancel = page.get_by_role("button", name="Cancel this transfer")
    cancel.focus()
    page.evaluate("() => { window.stillHere = true; }")
    page.wait_for_timeout(3_000)
    assert page.evaluate("() => window.stillHere === true"), "the page reloaded under the focus"
    page.set_viewport_size(PHONE)
    assert_fits(page, "a transfer on a phone")
    assert page.get_by_text("what it has received already stays there").is_visible()
    screenshot(page, "transfer-sending-phone")
    page.set_viewport_size(LAPTOP)
    # Cancel asks first; declined, nothing happens.
    asked: list[str] = []

    def decline(dialog) -> None:
        asked.append(dialog.message)
        dialog.dismiss()

    page.once("dialog", decline)
    cancel.click()
    page.wait_for_timeout(300)
    assert asked and "Partner hospital" in asked[0]
    assert page.locator(".transfer-state").inner_text() in ("queued", "sending")
    page.once("dialog", lambda dialog: dialog.accept())
    cancel.click()
    page.wait_for_load_state()
    screenshot(page, "transfer-cancelled")
    assert page.locator(".transfer-state").inner_text() == "cancelled"
    said = page.locator("main .flash[role=status]").inner_text()
    assert "cancelled by admin" in said and "nothing more is sent to Partner hospital" in said
    assert page.locator("td.receipt").inner_text().strip() == "none: not delivered"
    assert page.get_by_role("button", name="Cancel this transfer").count() == 0
    page.goto(base + "/transfers")
    assert "cancelled" in page.locator("td.transfer-state").first.inner_text()
    context.close()


def test_a_sonographer_is_asked_for_the_password_and_shares_a_report_and_a_video(
        chromium, site, screenshot):
    base = site["server"].url
    context = chromium.new_context(viewport=LAPTOP)
    page = context.new_page()
    sign_in(page, base, "sono", PASSWORD)

    # (3) A token and two-factor set-up ask for the current password.
    page.goto(base + "/account")
    screenshot(page, "account")
    for section in ("#tokens", "#two-factor"):
        assert page.locator(f"{section} label", has_text="Current password").count() == 1
    page.fill("#tokens input[name=name]", "Weasis on my workstation")
    page.fill("#tokens input[name=current]", "not-my-password")
    page.click("#tokens button[type=submit]")
    page.wait_for_load_state()
    screenshot(page, "account-token-wrong-password")
    # Said at the token form (one of four asking for the password), the name kept, the
    # keyboard in the password field.
    assert alert(page) == "The current password is wrong."
    assert page.locator("#tokens [role=alert]").count() == 1
    assert refusal_is_next_to(page, "form[action='/account/tokens']")
    assert page.input_value("#tokens input[name=name]") == "Weasis on my workstation"
    assert page.evaluate("() => document.activeElement.name") == "current"
    page.fill("#tokens input[name=current]", PASSWORD)
    page.click("#tokens button[type=submit]")
    page.wait_for_load_state()
    assert page.locator(".new-token").inner_text().strip()
    page.fill("#two-factor input[name=current]", "not-my-password")
    page.click("#two-factor button[type=submit]")
    page.wait_for_load_state()
    screenshot(page, "account-2fa-wrong-password")
    assert page.locator("#two-factor [role=alert]").count() == 1
    page.set_viewport_size(PHONE)
    assert_fits(page, "the account page")
    screenshot(page, "account-phone")
    page.set_viewport_size(LAPTOP)

    # (7) A PDF report attached; the study shared; the recipient reads it and plays the clip.
    page.goto(f"{base}/studies/{site['study']}")
    page.set_input_files("input[name=file]", str(site["report"]))
    page.fill("form[action$='/documents'] input[name=title]", "Radiology report")
    page.click("form[action$='/documents'] button[type=submit]")
    page.wait_for_load_state()
    page.fill("#share input[name=title]", "Clip and report")
    page.check("#share input[name=identifiable]")
    page.fill("#share input[name=recipient_user]", "drwho")
    page.click("#share button[type=submit]")
    page.wait_for_load_state()
    link = page.locator(".share-link").inner_text().strip()
    passcode = page.locator(".share-passcode").inner_text().strip()
    context.close()

    recipient = chromium.new_context(viewport=PHONE)
    tab = recipient.new_page()
    sign_in(tab, base, "drwho", PASSWORD)
    tab.goto(link)
    tab.fill("input[name=passcode]", passcode)
    tab.click("main button[type=submit]")
    tab.wait_for_load_state()
    screenshot(tab, "recipient-case-phone")
    assert_fits(tab, "the shared case")
    report = tab.locator("#documents").get_by_role("link", name="Radiology report")
    assert report.count() == 1
    tab.get_by_role("link", name="Open viewer").click()
    tab.wait_for_load_state()
    clip = tab.locator(".series-button", has_text="Phone clip")
    clip.click()
    tab.wait_for_function("() => { const v = document.querySelector('video');"
                          " return v && v.readyState >= 2 && v.videoWidth > 0; }",
                          timeout=15_000)
    screenshot(tab, "recipient-viewer-phone")
    recipient.close()
