"""New users' walks of 4 December (session 38), in real Chromium: a clinician imports a
patient's small photo and reads its size in kilobytes (not "0.0 of 0.0 MB"); a keyboard user
skips the menu; a phone shows dates and NHS numbers on one line; the viewer's step buttons
have names, a measurement is said in words on a readable plate clear of the image's middle
and its label has a dark outline; thumbnails that are links say where they go; a refused
patient is told what to do; an information-governance officer sees refusals stand out in
the audit trail; a teaching case lists a large file in megabytes."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread

from tests.browser.test_pages_walk_s33 import enrol_two_factor, sign_in
from tests.factory import ct_series
from tests.peers import ADMIN_PASSWORD, RunningServer

pytestmark = pytest.mark.browser

PASSWORD = "clinician-password"
NHS_NUMBER = "9434765919"
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 375, "height": 740}


def _photo(path: Path, width: int, height: int) -> Path:
    """A JPEG (or PNG by suffix) of noise: a phone photo of ``width`` x ``height``."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(38).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A running server with a CT study (NHS number on file), a clinician and a patient."""
    root = tmp_path_factory.mktemp("walk38")
    nhs = Dataset()
    nhs.PatientID = NHS_NUMBER
    nhs.IssuerOfPatientID = "NHS"
    ct = ct_series(root / "in", count=3, size=64, patient_id="H3801",
                   patient_name="Jones^Alice", OtherPatientIDsSequence=[nhs],
                   StudyDescription="CT chest")
    server = RunningServer(root / "data")
    server.extra_env["IMAGESHARE_PUBLIC_URL"] = server.url
    server.start()
    try:
        server.cli("import", "--quiet", str(root / "in"))
        server.cli("user", "add", "doc", "--role", "clinician", "--password", PASSWORD)
        server.cli("user", "add", "pat", "--role", "patient", "--password", PASSWORD)
        yield {"server": server, "study": dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID,
               "photo": _photo(root / "photo.jpg", 80, 60),
               "poster": _photo(root / "poster.png", 700, 700)}
    finally:
        server.stop()


def test_a_small_photo_shows_its_size_in_kilobytes_and_the_bars_are_named(
        chromium, site, screenshot):
    base = site["server"].url
    context = chromium.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    page = context.new_page()
    sign_in(page, base, "doc", PASSWORD)
    page.goto(base + "/uploads/import")
    page.fill("input[name=family_name]", "Jones")
    page.fill("input[name=given_name]", "Alice")
    page.fill("input[name=hospital_number]", "H3801")
    page.click("main button[type=submit]")
    page.wait_for_selector("#drop[data-ready]")
    # The room left reads in the unit that suits it (4 GB, not 4096 MB).
    room = page.locator("#drop .muted").inner_text()
    assert re.search(r"Up to \d+(\.\d)? GB\.", room), room
    page.set_input_files("#pick-files", [str(site["photo"])])
    page.wait_for_selector("#files li.done")
    overall = page.locator("#overall-text")
    size = site["photo"].stat().st_size
    assert size < 50 * 1024
    expected = f"({round(size / 1024)} of {round(size / 1024)} KB)"
    page.wait_for_function("([e]) => document.getElementById('overall-text').textContent"
                           ".includes(e)", arg=[expected])
    assert "0.0 of 0.0 MB" not in overall.inner_text()
    # Each bar says whose progress it is; the overall bar is named by its line.
    assert page.get_by_role("progressbar", name="photo.jpg").count() == 1
    assert page.get_by_role("progressbar", name=re.compile("1 of 1 file")).count() == 1
    screenshot(page, "small-photo")
    # The review page says an NHS number and a birth date were not given, as it does for
    # the reference, instead of leaving a label with nothing after it.
    batch = page.url.rsplit("/upload", 1)[0]
    page.goto(batch)
    facts = page.locator("main dl.inline")
    for label in ("NHS number", "Born"):
        said = facts.locator(f"dt:text-is('{label}') + dd").inner_text().strip()
        assert said == "—", f"{label}: {said!r}"
    context.close()


def test_a_keyboard_user_skips_the_menu_and_a_phone_keeps_dates_on_one_line(
        chromium, site, screenshot):
    base = site["server"].url
    context = chromium.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    page = context.new_page()
    # The browser's own request for an icon (once, on the first page) is not seen by the
    # page's events, but its failure is logged on the console: a 404 for /favicon.ico.
    missing: list[str] = []
    page.on("console", lambda m: missing.append(m.text) if "404" in m.text else None)
    sign_in(page, base, "doc", PASSWORD)
    page.goto(base + "/")
    page.wait_for_load_state("networkidle")
    assert missing == [], f"the page asked for what is not there: {missing}"
    page.keyboard.press("Tab")
    first = page.evaluate("() => [document.activeElement.textContent.trim(),"
                          " document.activeElement.getBoundingClientRect().top]")
    assert first[0] == "Skip to content" and first[1] >= 0, first
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    assert page.evaluate("() => !!document.activeElement.closest('main')"), (
        "after skipping, the next stop is not in the page's content")
    screenshot(page, "skip-link")
    # Dates and NHS numbers are read whole, not broken over three lines.
    row = page.locator("table.results tbody tr").first
    for cell in (2, 3, 4):
        lines = row.locator("td").nth(cell).evaluate(
            "td => { const r = document.createRange(); r.selectNodeContents(td);"
            " return new Set([...r.getClientRects()].map(b => Math.round(b.top))).size }")
        text = row.locator("td").nth(cell).inner_text()
        assert lines <= 1, f"{text!r} is broken over {lines} lines on a phone"
    # A search that finds nothing says what to try next.
    page.locator("header input[name=q]").fill("Nobody^Atall")
    page.locator("header input[name=q]").press("Enter")
    page.wait_for_load_state()
    empty = page.locator("main p.empty")
    assert empty.inner_text().startswith("No studies found. Check the spelling")
    assert empty.get_by_role("link", name="look for the patient at other hospitals").count() == 1
    context.close()


def test_the_viewer_names_its_steps_and_says_a_measurement_readably(
        chromium, site, screenshot):
    base = site["server"].url
    context = chromium.new_context(viewport=LAPTOP)
    # Counts the labels drawn with a dark outline (strokeText) on the image.
    context.add_init_script(
        "window.__outlined = [];"
        "const s = CanvasRenderingContext2D.prototype.strokeText;"
        "CanvasRenderingContext2D.prototype.strokeText = function (t, ...a) {"
        " window.__outlined.push(String(t)); return s.call(this, t, ...a); };")
    page = context.new_page()
    sign_in(page, base, "doc", PASSWORD)
    page.goto(f"{base}/viewer/{site['study']}")
    page.wait_for_function("() => (document.getElementById('position').textContent || '')"
                           ".includes('/ 3')")
    page.get_by_role("button", name="Next image").click()
    assert page.inner_text("#position").startswith("2 / 3")
    page.get_by_role("button", name="Previous image").click()
    assert page.inner_text("#position").startswith("1 / 3")
    page.click("[data-tool=length]")
    box = page.locator("#canvas").bounding_box()
    assert box is not None
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 120, cy)
    page.mouse.down()
    page.mouse.move(cx + 120, cy, steps=4)
    page.mouse.up()
    status = page.locator("#status")
    said = status.inner_text()
    assert re.match(r"Length \d+(\.\d)? mm: not saved yet", said), said
    assert any(t.endswith(" mm") for t in page.evaluate("() => window.__outlined")), (
        "the measurement's label has no outline (yellow on white bone is unreadable)")
    plate = status.bounding_box()
    assert plate is not None
    assert not (plate["y"] <= cy <= plate["y"] + plate["height"]), (
        "the status line covers the middle of the image, where one measures")
    background = status.evaluate("e => getComputedStyle(e).backgroundColor")
    alpha = re.findall(r"[\d.]+", background)
    assert len(alpha) == 4 and float(alpha[3]) >= 0.6 and max(map(float, alpha[:3])) < 60, (
        f"the status words sit on no dark plate: {background}")
    screenshot(page, "measured")
    context.close()


def test_a_refused_patient_is_told_what_to_do(chromium, site):
    base = site["server"].url
    context = chromium.new_context(viewport=PHONE)
    page = context.new_page()
    sign_in(page, base, "pat", PASSWORD)
    response = page.goto(base + "/admin/users")
    assert response is not None and response.status == 403
    assert page.title() == "Not allowed · ImageShare"
    text = page.locator("main").inner_text()
    assert "ask an ImageShare administrator" in text and "signed in as pat" in text
    context.close()


def test_thumbnail_links_say_where_they_go_and_a_large_file_reads_in_megabytes(
        chromium, site, screenshot):
    base = site["server"].url
    context = chromium.new_context(viewport=LAPTOP)
    page = context.new_page()
    sign_in(page, base, "doc", PASSWORD)
    unnamed = ("() => [...document.querySelectorAll('main a')].filter(a =>"
               " !a.innerText.trim() && !a.getAttribute('aria-label') &&"
               " ![...a.querySelectorAll('img')].some(i => i.alt.trim())).map(a => a.href)")
    page.goto(f"{base}/studies/{site['study']}")
    form = page.locator(f"form[action='/studies/{site['study']}/teaching']")
    form.locator("input[name=title]").fill("Chest for the MDT")
    form.locator("button[type=submit]").click()
    page.wait_for_url(re.compile(r".*/teaching/[0-9a-f]+\?notice=.*"), timeout=60_000)
    assert page.evaluate(unnamed) == [], "a thumbnail link with no name"
    assert page.get_by_role("link", name=re.compile("^Open CT .*in the viewer$")).count() == 1
    page.set_input_files("#files input[name=file]", str(site["poster"]))
    page.click("#files button[type=submit]")
    page.wait_for_load_state()
    size = site["poster"].stat().st_size
    assert size > 1024 * 1024
    listed = page.locator("#files li.attachment").inner_text()
    assert f"{size / 1048576:.1f} MB" in listed, listed
    screenshot(page, "teaching-case")

    # The same study shared: the recipient's thumbnail link says where it goes.
    page.goto(f"{base}/studies/{site['study']}")
    page.fill("#share input[name=title]", "For a second opinion")
    page.click("#share button[type=submit]")
    page.wait_for_selector("code.share-passcode")
    link = page.inner_text("code.share-link").strip()
    passcode = page.inner_text("code.share-passcode").strip()
    recipient = chromium.new_context(viewport=PHONE)
    other = recipient.new_page()
    other.goto(link)
    other.fill("input[name=passcode]", passcode)
    other.click("button[type=submit]")
    other.wait_for_url(link + "/case")
    assert other.evaluate(unnamed) == [], "a thumbnail link with no name"
    assert other.get_by_role("link", name=re.compile("^Open CT .*in the viewer$")).count() == 1
    recipient.close()
    context.close()


def test_refusals_stand_out_in_the_audit_trail(chromium, site, screenshot):
    base = site["server"].url
    context = chromium.new_context(viewport=LAPTOP)
    page = context.new_page()
    sign_in(page, base, "doc", "not-the-password")  # a refused sign-in, audited
    sign_in(page, base, "admin", ADMIN_PASSWORD)
    enrol_two_factor(page, base)
    page.goto(base + "/admin/audit")
    rows = page.locator("table.results tbody tr")
    background = "r => getComputedStyle(r.querySelector('td')).backgroundColor"
    refused = rows.filter(has=page.locator("td:nth-child(5)", has_text="failure")).first
    success = rows.filter(has=page.locator("td:nth-child(5)", has_text="success")).first
    assert refused.count() == 1 and success.count() == 1
    assert refused.evaluate(background) != success.evaluate(background), (
        "a refused sign-in looks like the thousands of successful reads around it")
    # A study's shortened UID says it is shortened, and the whole UID is at hand.
    study = rows.locator("td:nth-child(7) a").first
    assert study.inner_text().startswith("…")
    assert study.get_attribute("title") == site["study"]
    screenshot(page, "audit")
    context.close()
