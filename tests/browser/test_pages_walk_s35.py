"""New users' walks of 4 December, in real Chromium: a clinician finds a patient's study,
sees the patient's prior beside it, shares it de-identified with an outside reviewer (told
that the PDF report stays out, and that no e-mail went when none is set up) and reads who
opened it in words; the reviewer opens the link on a phone; a transfer to a site that does
not answer says it is retrying, then that it failed and why, and offers to send again; a
PACS manager is asked before removing a site or rejecting an inbox study; refusals read as
sentences."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from pydicom import Dataset, dcmread

from tests.browser.test_pages_walk_s33 import PAGE_WIDER_THAN_SCREEN, enrol_two_factor, sign_in
from tests.factory import ct_series
from tests.peers import ADMIN_PASSWORD, RunningServer
from tests.upload_media import pdf

pytestmark = pytest.mark.browser

PASSWORD = "clinician-password"
NHS_NUMBER = "9434765919"
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 375, "height": 740}


def _closed_port() -> int:
    """A loopback port nothing listens on (a call to it is refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A running server with a patient's study and her prior (NHS number on file), a
    clinician, a PDF report to attach, a site that never answers, and a partner hospital
    whose stores land in the inbox."""
    root = tmp_path_factory.mktemp("walk35")
    nhs = Dataset()
    nhs.PatientID = NHS_NUMBER
    nhs.IssuerOfPatientID = "NHS"
    current = ct_series(root / "in" / "current", count=3, size=64, patient_id="H7001",
                        patient_name="Jones^Alice", OtherPatientIDsSequence=[nhs],
                        StudyDescription="CT chest")
    prior = ct_series(root / "in" / "prior", count=3, size=64, patient_id="H7001",
                      patient_name="Jones^Alice", OtherPatientIDsSequence=[nhs],
                      StudyDescription="CT chest (prior)", StudyDate="20240105")
    arriving = ct_series(root / "arriving", count=1, size=32, patient_id="X55",
                         patient_name="Other^Person")
    server = RunningServer(root / "data")
    # Links could be e-mailed (a public address) but no mail server is set up.
    server.extra_env["IMAGESHARE_PUBLIC_URL"] = server.url
    server.start()
    try:
        server.cli("import", "--quiet", str(root / "in"))
        server.cli("user", "add", "doc", "--role", "clinician", "--password", PASSWORD)
        server.cli("node", "add", "NOWHERE", "--host", "127.0.0.1", "--port",
                   str(_closed_port()), "--name", "Nowhere hospital", "--no-query",
                   "--no-store")
        server.cli("node", "add", "PARTNER", "--host", "127.0.0.1", "--port", "104",
                   "--name", "Partner hospital", "--inbox", "--no-send-to")
        yield {"server": server, "report": pdf(root / "report.pdf"), "arriving": arriving,
               "current": dcmread(current[0], stop_before_pixels=True).StudyInstanceUID,
               "prior": dcmread(prior[0], stop_before_pixels=True).StudyInstanceUID}
    finally:
        server.stop()


def assert_fits(page, what: str) -> None:
    """Nothing on the page is wider than the screen."""
    wider = page.evaluate(PAGE_WIDER_THAN_SCREEN)
    assert wider <= 1, f"{what}: the page is {wider} px wider than the screen"


def as_sentence(text: str) -> bool:
    """A message that reads as a sentence: a capital first, a full stop last."""
    text = text.strip()
    return bool(text) and text[0].isupper() and text[-1] in ".!?"


def test_a_clinician_compares_shares_and_follows_and_a_transfer_says_it_retries(
        chromium, site, screenshot):
    base = site["server"].url
    context = chromium.new_context(viewport=LAPTOP)
    page = context.new_page()
    sign_in(page, base, "doc", PASSWORD)

    # A transfer to a site that does not answer, started first: it is followed at the end.
    page.goto(f"{base}/studies/{site['prior']}")
    page.select_option("select[name=site]", "NOWHERE")
    page.click(f"form[action='/studies/{site['prior']}/send'] button[type=submit]")
    page.wait_for_load_state()
    transfer_url = page.url
    # Once an attempt failed the page says it tries again, not "sending 0/3" as if nothing
    # had happened.
    page.wait_for_selector(".transfer-retrying", timeout=20_000)
    screenshot(page, "transfer-retrying")
    assert page.locator(".transfer-state").inner_text().startswith("retrying (attempt ")
    retrying = page.locator(".transfer-retrying").inner_text()
    assert "did not get through" in retrying and "trying again by itself" in retrying
    assert "0 of 3 images have arrived there so far" in retrying
    page.get_by_role("link", name="Open the study that was sent").click()
    page.wait_for_url(f"{base}/studies/{site['prior']}")
    assert page.get_by_role("link", name="Transfers").count() == 1

    # The study page lists the patient's other studies: the prior is one click away.
    page.locator("header input[name=q]").fill(NHS_NUMBER)
    page.locator("header input[name=q]").press("Enter")
    page.wait_for_load_state()
    page.locator("table.results tbody tr", has_text="CT chest").filter(
        has_not_text="prior").get_by_role("link").click()
    page.wait_for_url(f"{base}/studies/{site['current']}")
    others = page.locator("#other-studies")
    assert others.get_by_role("heading").inner_text() == "This patient's other studies"
    assert "05 Jan 2024 · CT chest (prior)" in others.inner_text()
    screenshot(page, "other-studies")
    others.get_by_role("link", name="Open in the viewer").click()
    page.wait_for_url(f"{base}/viewer/{site['prior']}")
    page.go_back()
    page.wait_for_load_state()

    # A refusal reads as a sentence.
    page.evaluate("() => document.querySelector('#share input[name=days]')"
                  ".removeAttribute('max')")
    page.fill("#share input[name=days]", "9999")
    page.click("#share button[type=submit]")
    page.wait_for_load_state()
    refusal = page.locator("main [role=alert]").inner_text()
    assert as_sentence(refusal), f"the refusal does not read as a sentence: {refusal!r}"
    page.goto(f"{base}/studies/{site['current']}")

    # A PDF report attached, then a de-identified share to an outside reviewer's address.
    page.set_input_files("input[name=file]", str(site["report"]))
    page.fill("form[action$='/documents'] input[name=title]", "Radiology report")
    page.click("form[action$='/documents'] button[type=submit]")
    page.wait_for_load_state()
    page.fill("#share input[name=recipient_email]", "reviewer@elsewhere.example")
    page.fill("#share input[name=title]", "Second opinion CT chest")
    page.click("#share button[type=submit]")
    page.wait_for_load_state()
    screenshot(page, "share-created")
    created = page.locator("main").inner_text()
    # No mail server here: the page does not claim the link was e-mailed.
    assert "sent by e-mail" not in created
    assert "nothing was sent to the recipient's address" in page.locator(
        ".not-mailed").inner_text()
    # The report is named as left out, before anyone opens the link.
    left_out = page.locator(".left-out")
    assert left_out.locator("li").all_inner_texts() == ["Radiology report (PDF)"]
    assert "share identifiably" in left_out.inner_text()
    link = page.locator(".share-link").inner_text().strip()
    passcode = page.locator(".share-passcode").inner_text().strip()
    follow = page.get_by_role("link", name="Follow or revoke this share").get_attribute("href")

    # The reviewer on a phone: told a document was left out (not "an image held back").
    reviewer = chromium.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    tab = reviewer.new_page()
    tab.goto(link)
    tab.fill("input[name=passcode]", passcode)
    tab.click("main button[type=submit]")
    tab.wait_for_load_state()
    screenshot(tab, "reviewer-phone")
    said = tab.locator("main p.muted").first.inner_text()
    assert "1 document (PDF) was left out" in said and "image" not in said.split(".", 1)[1]
    assert tab.locator("#documents").count() == 0
    assert_fits(tab, "the shared case on a phone")
    reviewer.close()

    # Who opened it, in words: no audit codes, no "(s)", the sharer named "you".
    page.goto(base + follow)
    screenshot(page, "share-followed")
    header = page.locator("main > p").first.inner_text()
    assert "3 images and 1 document" in header and "instance" not in header
    assert "“Radiology report”" in page.locator(".held-back").inner_text()
    visits = page.locator("#accesses tbody").inner_text()
    assert "user:" not in visits and "share." not in visits and "(s)" not in visits
    assert page.locator("tr.visit", has_text="you").locator("td").nth(3).inner_text() == (
        "made the share")
    recipient = page.locator("tr.visit", has_text="the link's recipient")
    assert "opened with the passcode" in recipient.inner_text()
    # A visit within one minute shows one time, not "14:43 UTC – 14:43 UTC".
    first, _, last = recipient.locator("td").first.inner_text().partition(" – ")
    assert last != first

    # Back to the transfer: it failed, says why as a sentence, and offers to send again.
    page.goto(transfer_url)
    page.wait_for_selector(".transfer-failed", timeout=90_000)
    screenshot(page, "transfer-failed")
    failed = page.locator(".transfer-failed").inner_text()
    assert failed.startswith("Not delivered: ") and as_sentence(failed)
    assert "0 of 3 images arrived at Nowhere hospital" in failed
    page.get_by_role("button", name="Send again to Nowhere hospital").click()
    page.wait_for_load_state()
    assert "/transfers/" in page.url and page.url != transfer_url
    assert page.locator(".transfer-state").inner_text().split()[0] in (
        "queued", "sending", "retrying")
    context.close()


def _store_as_partner(server: RunningServer, paths) -> None:
    """C-STORE the files to the server as the partner hospital (its stores go to the inbox)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title="PARTNER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="IMAGESHARE")
    assert assoc.is_established
    try:
        for path in paths:
            assert assoc.send_c_store(dcmread(path)).Status == 0
    finally:
        assoc.release()


def test_a_pacs_manager_is_asked_before_rejecting_a_study_or_removing_a_site(
        chromium, site, screenshot):
    server = site["server"]
    _store_as_partner(server, site["arriving"])
    base = server.url
    context = chromium.new_context(viewport=LAPTOP)
    page = context.new_page()
    sign_in(page, base, "admin", ADMIN_PASSWORD)
    enrol_two_factor(page, base)

    asked: list[str] = []
    answers: list[bool] = []  # how to answer the next questions (none left: decline)

    def answer(dialog) -> None:
        asked.append(dialog.message)
        if answers and answers.pop(0):
            dialog.accept()
        else:
            dialog.dismiss()

    page.on("dialog", answer)

    # Reject (beside Accept, in the same form) asks first; declined, the study stays.
    page.goto(base + "/inbox")
    row = page.locator("tr.inbox-item", has_text="Other, Person")
    assert row.count() == 1
    row.get_by_role("button", name="Reject").click()
    page.wait_for_timeout(300)
    assert len(asked) == 1 and "Partner hospital" in asked[0] and "deleted" in asked[0]
    assert page.locator("tr.inbox-item", has_text="Other, Person").count() == 1
    # Accept does not ask.
    row.get_by_role("button", name="Accept").click()
    page.wait_for_load_state()
    assert len(asked) == 1
    assert page.locator("main .flash[role=status]").inner_text().startswith(
        "The study was accepted")

    # Remove asks first, naming the site; declined, nothing changes; accepted, it goes.
    page.goto(base + "/admin/sites")
    remove = page.get_by_role("button", name="Remove Partner hospital")
    assert remove.count() == 1
    remove.click()
    page.wait_for_timeout(300)
    assert len(asked) == 2 and asked[1].startswith("Remove Partner hospital?")
    assert page.get_by_role("button", name="Remove Partner hospital").count() == 1
    answers.append(True)
    remove.click()
    page.wait_for_load_state()
    screenshot(page, "site-removed")
    assert page.locator("main .flash[role=status]").inner_text() == "The site was removed."
    assert page.get_by_role("button", name="Remove Partner hospital").count() == 0
    context.close()
