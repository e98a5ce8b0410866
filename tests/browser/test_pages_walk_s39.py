"""Walks of 5 December (session 39), in real Chromium against a running ImageShare: a patient
whose "Send" is refused still sees the room left and the files that arrived, and a second
press of Send is told the images were sent; a viewer says a CT series has images (not
frames) and an ultrasound clip is a loop of frames; a share of one image with a report and a
key images note says so (not "3 images") and names the report as a report; an information
governance officer types a user name or part of a patient ID once in the audit trail, on a
laptop and on a phone, and the read is audited with what was asked; the invitation,
upload and review pages fit a phone."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.browser.test_pages_walk_s33 import assert_fits, enrol_two_factor, sign_in
from tests.conftest import ROOT
from tests.factory import ct_series, us_cine
from tests.peers import ADMIN_PASSWORD, RunningServer

pytestmark = pytest.mark.browser

PASSWORD = "clinician-password"
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
SCREENSHOTS = ROOT / "docs" / "screenshots"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"


def _shot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"walk39-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def _document(image: Path, sop_class: str, modality: str, folder: Path) -> Path:
    """A non-image object of ``image``'s study, in a series of its own: a Basic Text SR (a
    report) or a Key Object Selection (the key images note) referencing ``image``."""
    source = dcmread(image, stop_before_pixels=True)
    ds = Dataset()
    ds.file_meta = Dataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
                    "ReferringPhysicianName", "StudyDescription", "SpecificCharacterSet",
                    "OtherPatientIDsSequence"):
        if keyword in source:
            setattr(ds, keyword, source.data_element(keyword).value)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 90 + len(modality), 1
    ds.ContentDate, ds.ContentTime = source.StudyDate, "110000"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = source.SeriesInstanceUID
    series.ReferencedSOPSequence = [reference]
    evidence = Dataset()
    evidence.StudyInstanceUID = source.StudyInstanceUID
    evidence.ReferencedSeriesSequence = [series]
    ds.CurrentRequestedProcedureEvidenceSequence = [evidence]
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    if sop_class == KEY_OBJECT_SELECTION:
        ds.ConceptNameCodeSequence = [_code("113000", "DCM", "Of Interest")]
        item.ValueType = "IMAGE"
        item.ReferencedSOPSequence = [reference]
    else:
        ds.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic imaging report")]
        item.ValueType = "TEXT"
        item.ConceptNameCodeSequence = [_code("121071", "DCM", "Finding")]
        item.TextValue = "No pneumothorax."
    ds.ContentSequence = [item]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{modality.lower()}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A running server: a CT study of 3 images; a CT study of one image with its report and
    its key images note; an ultrasound clip of 40 frames; a clinician and a radiographer."""
    root = tmp_path_factory.mktemp("walk39")
    ct = ct_series(root / "in" / "ct", count=3, size=64, patient_id="H3901",
                   patient_name="Jones^Alice", StudyDescription="CT chest")
    [one] = ct_series(root / "in" / "one", count=1, size=64, patient_id="H3902",
                      patient_name="Brown^Bob", StudyDescription="CT wrist")
    _document(one, BASIC_TEXT_SR, "SR", root / "in" / "sr")
    _document(one, KEY_OBJECT_SELECTION, "KO", root / "in" / "ko")
    us = us_cine(root / "in" / "us", frames=40, patient_id="H3903")
    server = RunningServer(root / "data")
    server.extra_env["IMAGESHARE_PUBLIC_URL"] = server.url
    server.start()
    try:
        server.cli("import", "--quiet", str(root / "in"))
        server.cli("user", "add", "doc", "--role", "clinician", "--password", PASSWORD)
        server.cli("user", "add", "clerk", "--role", "radiographer", "--password", PASSWORD)
        yield {"server": server, "root": root,
               "ct": dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID,
               "one": dcmread(one, stop_before_pixels=True).StudyInstanceUID,
               "us": dcmread(us, stop_before_pixels=True).StudyInstanceUID,
               "photo": _photo(root / "IMG_0001.jpg")}
    finally:
        server.stop()


def _photo(path: Path) -> Path:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(39).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _invite(page, base: str, name: str, hospital_number: str) -> tuple[str, str]:
    """The clerk invites someone to upload for a patient: the link and its passcode."""
    page.goto(base + "/uploads")
    form = page.locator("form[action='/uploads/invite']")
    family, _, given = name.partition("^")
    form.locator("input[name=family_name]").fill(family)
    form.locator("input[name=given_name]").fill(given)
    form.locator("input[name=hospital_number]").fill(hospital_number)
    form.locator("input[name=email]").fill("patient@home.example")
    form.locator("input[name=reference]").fill("Fracture clinic")
    form.locator("button[type=submit]").click()
    page.wait_for_selector("code.upload-passcode")
    return (page.inner_text("code.share-link").strip(),
            page.inner_text("code.upload-passcode").strip())


def _open(page, link: str, passcode: str) -> None:
    page.goto(link)
    page.fill("input[name=passcode]", passcode)
    page.click("button[type=submit]")
    page.wait_for_selector("#drop[data-ready]")


ROOM = re.compile(r"Up to \d+(\.\d)? GB\.")


def test_a_refused_send_keeps_the_room_left_and_a_second_send_says_the_images_went(
        chromium, site):
    base = site["server"].url
    staff = chromium.new_context(viewport=LAPTOP)
    clerk = staff.new_page()
    sign_in(clerk, base, "clerk", PASSWORD)
    link, passcode = _invite(clerk, base, "Green^Gail", "H3910")
    phone = chromium.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    first = phone.new_page()
    _open(first, link, passcode)
    assert ROOM.search(first.inner_text("#drop")), first.inner_text("#drop")
    # Send pressed before any file arrived (the form posted by Enter, or a page whose script
    # did not load): refused, and the page still says how much may be sent.
    with first.expect_navigation():  # (else the old page may be read before the new one)
        first.evaluate("() => document.getElementById('send-form').submit()")
    assert "No file has arrived completely yet" in first.inner_text("[data-refusal]")
    assert ROOM.search(first.inner_text("#drop")), (
        "after a refused send the page no longer says how much may be sent")
    # A file arrives; a second tab (the same person) sends it; the first tab's Send is then
    # refused and says the images went, instead of showing an empty upload page.
    first.wait_for_selector("#drop[data-ready]")
    first.set_input_files("#pick-files", [str(site["photo"])])
    first.wait_for_selector("#files li.done")
    second = phone.new_page()
    second.goto(link + "/upload")
    assert second.locator("#files li.done").count() == 1
    assert "IMG_0001.jpg" in second.inner_text("#files")
    # The line above the list counts the file that arrived before, in the page as served
    # and once the page's script has run.
    second.wait_for_selector("#drop[data-ready]")
    assert second.inner_text("#overall-text") == "1 file(s) arrived before, ready to send"
    second.click("#send")
    second.wait_for_selector("#intake")
    with first.expect_navigation():  # (else the old page may be read before the new one)
        first.evaluate("() => document.getElementById('send-form').submit()")
    main = first.inner_text("main")
    assert "sent already" in main
    assert "Your images were sent to the hospital" in main, main
    staff.close()
    phone.close()


def test_a_viewer_counts_images_and_calls_a_clip_a_loop(chromium, site, screenshot):
    base = site["server"].url
    context = chromium.new_context(viewport=LAPTOP)
    page = context.new_page()
    sign_in(page, base, "doc", PASSWORD)
    page.goto(f"{base}/viewer/{site['ct']}")
    sizes = page.locator(".series-button .muted")
    page.wait_for_selector(".series-button")
    assert sizes.first.inner_text().strip() == "3 images", sizes.first.inner_text()
    page.goto(f"{base}/viewer/{site['us']}")
    page.wait_for_selector(".series-button")
    assert sizes.first.inner_text().strip() == "a 40-frame loop", sizes.first.inner_text()
    screenshot(page, "loop")
    context.close()


def test_a_share_with_a_report_and_key_images_counts_one_image(chromium, site, screenshot):
    base = site["server"].url
    context = chromium.new_context(viewport=LAPTOP)
    page = context.new_page()
    sign_in(page, base, "doc", PASSWORD)
    page.goto(f"{base}/studies/{site['one']}")
    page.fill("#share input[name=title]", "Wrist for a second opinion")
    page.click("#share button[type=submit]")
    page.wait_for_selector("code.share-passcode")
    link = page.inner_text("code.share-link").strip()
    passcode = page.inner_text("code.share-passcode").strip()
    # The recipient opens the case (its report and key images note shared with the image).
    recipient = chromium.new_context(viewport=PHONE)
    other = recipient.new_page()
    other.goto(link)
    other.fill("input[name=passcode]", passcode)
    other.click("button[type=submit]")
    other.wait_for_url(link + "/case")
    recipient.close()
    page.goto(base + "/shares")
    page.locator("main a", has_text="Wrist for a second opinion").first.click()
    page.wait_for_selector(".share-state")
    holds = page.inner_text(".share-holds")
    assert holds == "1 image, 1 report and 1 key images note", holds
    screenshot(page, "share-detail")
    context.close()


@pytest.fixture(scope="module")
def admin(chromium, site) -> dict:
    """The administrator's signed-in browser state, with a second factor enrolled (the
    audit trail needs one): each test opens its own window on it."""
    base = site["server"].url
    context = chromium.new_context(viewport=LAPTOP)
    page = context.new_page()
    sign_in(page, base, "admin", ADMIN_PASSWORD)
    enrol_two_factor(page, base)
    state = context.storage_state()
    context.close()
    return state


def test_an_officer_types_a_name_or_part_of_a_patient_id_once(chromium, site, admin):
    base = site["server"].url
    # Something to find: the clinician opens a study of patient H3901, and someone fails to
    # sign in as the clinician.
    context = chromium.new_context(viewport=LAPTOP)
    page = context.new_page()
    sign_in(page, base, "doc", "not-the-password")
    sign_in(page, base, "doc", PASSWORD)
    page.goto(f"{base}/studies/{site['ct']}")
    context.close()

    context = chromium.new_context(viewport=LAPTOP, storage_state=admin)
    page = context.new_page()
    page.goto(base + "/admin/audit")
    search = page.get_by_label(re.compile("Who, patient ID"))
    search.fill("3901")
    with page.expect_navigation():
        search.press("Enter")
    assert "3901" not in page.url  # typed patient IDs stay out of the address and history
    # Each event found shows where the text is: its patient, or its detail.
    found = [(p, d) for p, d in zip(
        page.locator("table.results tbody td:nth-child(6)").all_inner_texts(),
        page.locator("table.results tbody td:nth-child(9)").all_inner_texts(), strict=True)]
    assert any("H3901" == p for p, _ in found), found
    assert found and all("3901" in p + d for p, d in found), found
    assert "matching “3901”" in page.inner_text(".audit-count")
    # A user name, in any case; the action chosen from a list, not typed to the letter.
    page.get_by_label(re.compile("Who, patient ID")).fill("DOC")
    page.get_by_label("Action").select_option("session.start")
    with page.expect_navigation():  # the filtered page, not the one before it
        page.get_by_role("button", name="Filter").click()
    rows = page.locator("table.results tbody tr")
    assert rows.count() >= 2
    whos = rows.locator("td:nth-child(2)").all_inner_texts()
    assert all("doc" in w.lower() for w in whos), whos
    assert set(rows.locator("td:nth-child(4)").all_inner_texts()) == {"session.start"}
    assert rows.filter(has=page.locator("td:nth-child(5)", has_text="failure")).count() >= 1
    # Wildcards are themselves: "%" finds no event (it is in none), not every event.
    page.get_by_label(re.compile("Who, patient ID")).fill("%")
    page.get_by_label("Action").select_option("")
    with page.expect_navigation():  # the filtered page, not the one before it
        page.get_by_role("button", name="Filter").click()
    assert page.locator("table.results").count() == 0
    said = page.inner_text(".audit-count")
    assert said.startswith("No event matches “%”") and "clear the filter" in said, said
    page.get_by_role("link", name="Clear the filter").click()
    page.wait_for_load_state()
    assert page.locator("table.results tbody tr").count() > 5
    # The officer's own reads are in the trail with what they asked for.
    page.goto(base + "/admin/audit?action=audit.read&text=admin")
    assert page.locator("table.results tbody tr").count() >= 4
    context.close()
    [read] = [e for e in _audit_rows(site) if e["detail"].get("text") == "3901"]
    assert read["action"] == "audit.read" and read["actor"].endswith("admin")


def _audit_rows(site) -> list[dict]:
    """The audit rows, as the command line exports them (JSON lines)."""
    import json

    out = site["server"].cli("audit", "export", "--format", "jsonl").stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_the_upload_pages_and_the_audit_trail_fit_a_phone(chromium, site, admin):
    base = site["server"].url
    staff = chromium.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    clerk = staff.new_page()
    sign_in(clerk, base, "clerk", PASSWORD)
    clerk.goto(base + "/uploads")
    _shot(clerk, "phone-uploads")
    assert_fits(clerk, "the uploads page")
    link, passcode = _invite(clerk, base, "White^Wendy", "H3912")
    _shot(clerk, "phone-invited")
    assert_fits(clerk, "the invitation sent")
    # Without a mail server nothing was sent: the heading does not say it was.
    assert clerk.inner_text("h1") == "Invitation to upload made: pass it on"
    patient = chromium.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    person = patient.new_page()
    person.goto(link)
    _shot(person, "phone-passcode")
    assert_fits(person, "the passcode page")
    person.fill("input[name=passcode]", passcode)
    person.click("button[type=submit]")
    person.wait_for_selector("#drop[data-ready]")
    person.set_input_files("#pick-files", [str(site["photo"])])
    person.wait_for_selector("#files li.done")
    person.wait_for_function("() => document.getElementById('overall-text').textContent"
                             ".startsWith('1 of 1 file(s) arrived')")
    _shot(person, "phone-upload")
    assert_fits(person, "the upload page")
    person.click("#send")
    person.wait_for_selector("#intake[data-state=done]", timeout=120_000)
    _shot(person, "phone-sent")
    assert_fits(person, "the sent page")
    clerk.goto(base + "/uploads")
    clerk.locator("main a", has_text="White").first.click()
    clerk.wait_for_selector(".upload-study")
    _shot(clerk, "phone-review")
    assert_fits(clerk, "the review page")
    # A value that wraps to a new line starts at the box's edge, not outside it.
    outside = clerk.evaluate(
        "() => [...document.querySelectorAll('main dl.inline')].flatMap(dl =>"
        " [...dl.children].filter(c => c.getBoundingClientRect().left <"
        " dl.getBoundingClientRect().left - 1).map(c => c.textContent.trim()))")
    assert outside == [], f"sticking out of their box on a phone: {outside}"
    patient.close()
    staff.close()

    for viewport, label in ((PHONE, "phone"), (LAPTOP, "laptop")):
        context = chromium.new_context(viewport=viewport, is_mobile=viewport is PHONE,
                                       storage_state=admin)
        page = context.new_page()
        page.goto(base + "/admin/audit")
        _shot(page, f"{label}-audit")
        assert_fits(page, f"the audit trail on a {label}")
        box = page.get_by_label(re.compile("Who, patient ID")).bounding_box()
        assert box is not None and box["width"] >= 200, box
        context.close()
