"""A sonographer's day in a real browser: sign in, search, view CT and a cine loop, change
window/level, attach a report, correct an emergency study. Screenshots go to test-artifacts/."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset

from tests.factory import ct_series, us_cine
from tests.peers import RunningServer

pytestmark = pytest.mark.browser

PASSWORD = "sonographer-password"
NHS_NUMBER = "9434765919"
PDF = (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[]"
       b"/Count 0>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n")
CANVAS_SUM = """() => {
  const c = document.getElementById('canvas');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let s = 0;
  for (let i = 0; i < d.length; i += 4) s += d[i] + d[i + 1] + d[i + 2];
  return s;
}"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A running server holding a CT, a 60-frame ultrasound loop and an emergency scan."""
    root = tmp_path_factory.mktemp("browser")
    nhs = Dataset()
    nhs.PatientID = NHS_NUMBER
    nhs.IssuerOfPatientID = "NHS"
    ct = ct_series(root / "in" / "ct", count=30, size=256, patient_id="H4001",
                   patient_name="Jones^Alice", OtherPatientIDsSequence=[nhs])
    us = us_cine(root / "in" / "us", frames=60, rows=480, cols=640, patient_id="H4002",
                 patient_name="Smith^John")
    emergency = us_cine(root / "in" / "emergency", frames=4, patient_id="EMERG01",
                        patient_name="Unknown^Female")
    server = RunningServer(root / "data").start()
    try:
        server.cli("import", "--quiet", str(root / "in"))
        server.cli("user", "add", "sono", "--role", "sonographer", "--password", PASSWORD)
        from pydicom import dcmread

        yield {
            "server": server,
            "ct": dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID,
            "us": dcmread(us, stop_before_pixels=True).StudyInstanceUID,
            "emergency": dcmread(emergency, stop_before_pixels=True).StudyInstanceUID,
        }
    finally:
        server.stop()


@pytest.fixture
def page(chromium, site):
    """A signed-in sonographer's browser tab on a ward-tablet-sized screen."""
    context = chromium.new_context(viewport={"width": 1280, "height": 800})
    tab = context.new_page()
    outside: list[str] = []
    tab.on("request", lambda r: outside.append(r.url)
           if not r.url.startswith(site["server"].url) else None)
    tab.goto(site["server"].url + "/")
    assert "/login" in tab.url
    tab.fill("input[name=username]", "sono")
    tab.fill("input[name=password]", PASSWORD)
    tab.click("button[type=submit]")
    tab.wait_for_url(site["server"].url + "/")
    yield tab
    assert outside == [], f"the page fetched from outside ImageShare: {outside[:3]}"
    context.close()


def search_for(page, text: str) -> None:
    """Type in the header's search box (the search is posted: nothing in the URL)."""
    page.fill("header input[name=q]", text)
    page.press("header input[name=q]", "Enter")
    page.wait_for_selector("main h2:text('Results')")
    assert text.replace(" ", "") not in page.url.replace("%20", "")


def open_viewer(page, site, study_uid: str):
    page.goto(f"{site['server'].url}/viewer/{study_uid}")
    page.wait_for_function("() => window.imageshareViewer && "
                           "window.imageshareViewer.shown.length > 0", timeout=15000)


def test_sign_in_and_search_by_nhs_number_and_partial_name(page, site, screenshot):
    search_for(page, "943 476 5919")
    assert page.locator("table.results tbody tr").count() == 1
    assert "Jones, Alice" in page.inner_text("table.results")
    assert "9434765919" not in page.url
    screenshot(page, "nhs-number")
    search_for(page, "smi")
    rows = page.inner_text("table.results")
    assert "Smith, John" in rows and "Jones" not in rows
    page.goto(site["server"].url + "/")
    page.click("form.search summary")
    page.fill("form.search input[name=nhs]", "9434765918")
    page.click("form.search button[type=submit]")
    assert "not a valid NHS number" in page.inner_text("main")
    assert "9434765918" not in page.url
    screenshot(page, "bad-nhs-number")


def test_a_ct_study_opens_and_scrolls(page, site, screenshot):
    page.goto(f"{site['server'].url}/studies/{site['ct']}")
    assert "Jones, Alice" in page.inner_text(".banner")
    page.click("text=Open viewer")
    page.wait_for_function("() => window.imageshareViewer && "
                           "window.imageshareViewer.shown.length > 0", timeout=15000)
    first = page.evaluate(CANVAS_SUM)
    assert page.evaluate("window.imageshareViewer.firstImageMs") < 5000
    page.focus("#canvas")
    for _ in range(5):
        page.keyboard.press("ArrowDown")
    page.wait_for_function("() => window.imageshareViewer.index === 5 && "
                           "window.imageshareViewer.shown.at(-1)[1] === 5")
    assert page.inner_text("#position") == "6 / 30"
    assert page.evaluate(CANVAS_SUM) != first
    page.mouse.move(640, 450)
    page.mouse.wheel(0, 300)
    page.wait_for_function("() => window.imageshareViewer.index === 6")
    screenshot(page, "ct-slice-7")


def test_window_level_changes_the_pixels(page, site, screenshot):
    open_viewer(page, site, site["ct"])
    before = page.evaluate(CANVAS_SUM)
    box = page.locator("#canvas").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 150, y + 80, steps=8)
    page.mouse.up()
    page.wait_for_function("() => window.imageshareViewer.window !== null")
    page.wait_for_function(f"() => ({CANVAS_SUM})() !== {before}", timeout=10000)
    assert "W/L as stored" not in page.inner_text("#overlay-br")
    screenshot(page, "ct-windowed")
    page.keyboard.press("r")
    page.wait_for_function(f"() => ({CANVAS_SUM})() === {before}", timeout=10000)


def test_a_60_frame_ultrasound_loop_plays_at_its_frame_rate(page, site, screenshot):
    open_viewer(page, site, site["us"])
    page.wait_for_function("() => window.imageshareViewer.playing", timeout=20000)
    assert page.evaluate("window.imageshareViewer.fps") == pytest.approx(30.03, abs=0.01)
    page.wait_for_timeout(300)
    start = page.evaluate("performance.now()")
    page.wait_for_timeout(2000)
    shown = page.evaluate(f"window.imageshareViewer.shown.filter(s => s[0] >= {start})")
    elapsed = (shown[-1][0] - shown[0][0]) / 1000
    steps = sum((b[1] - a[1]) % 60 for a, b in zip(shown, shown[1:], strict=False))
    rate = steps / elapsed
    assert 30.03 * 0.8 < rate < 30.03 * 1.2, f"played at {rate:.1f} frames/s"
    assert len({s[1] for s in shown}) >= 50  # the loop really went round
    screenshot(page, "cine-playing")
    page.keyboard.press(" ")
    page.wait_for_function("() => !window.imageshareViewer.playing")
    paused_at = page.evaluate("window.imageshareViewer.index")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("window.imageshareViewer.index") == (paused_at + 1) % 60


def test_attach_a_pdf_report_and_see_it_listed(page, site, screenshot, tmp_path: Path):
    report = tmp_path / "report.pdf"
    report.write_bytes(PDF)
    page.goto(f"{site['server'].url}/studies/{site['ct']}")
    page.set_input_files("input[type=file][name=file]", str(report))
    page.fill("input[name=title]", "Radiology report")
    page.click("#reports button[type=submit]")
    page.wait_for_selector("text=The document was attached")
    assert "Radiology report" in page.inner_text("#reports")
    screenshot(page, "report-attached")
    link = page.get_attribute("#reports ul.documents a", "href")
    response = page.request.get(site["server"].url + link)
    assert response.headers["content-type"] == "application/pdf" and response.body() == PDF


def test_correct_an_emergency_study_and_find_it_under_the_new_name(page, site, screenshot):
    page.goto(f"{site['server'].url}/studies/{site['emergency']}")
    page.click("text=Correct patient details")
    page.fill("input[name=family]", "Okafor")
    page.fill("input[name=given]", "Grace")
    page.fill("input[name=patient_id]", "H7788")
    page.fill("input[name=nhs_number]", "401 023 2137")
    page.fill("input[name=birth_date]", "1990-05-17")
    page.select_option("select[name=sex]", "F")
    page.fill("form[action$='/patient'] input[name=reason]", "Emergency scan; identified")
    screenshot(page, "correction-form")
    page.click("form[action$='/patient'] button[type=submit]")
    page.wait_for_selector("text=The patient details were corrected")
    assert "Okafor, Grace" in page.inner_text(".banner")
    assert "Emergency scan; identified" in page.inner_text("#history")
    search_for(page, "okafor")
    assert re.search(r"Okafor, Grace", page.inner_text("table.results"))
    screenshot(page, "found-under-new-name")
    search_for(page, "unknown")
    assert "No studies found" in page.inner_text("main")


def test_a_measurement_drawn_in_the_viewer_is_saved_and_shown_again(page, site, screenshot):
    open_viewer(page, site, site["ct"])
    page.click("[data-tool=length]")
    box = page.locator("#canvas").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    before = page.evaluate(CANVAS_SUM)
    page.mouse.move(x - 100, y)
    page.mouse.down()
    page.mouse.move(x + 100, y, steps=5)
    page.mouse.up()
    assert page.evaluate(CANVAS_SUM) != before  # the line is drawn
    page.click("#save-marks")
    page.wait_for_function("() => window.imageshareViewer.savedMarks === 1")
    screenshot(page, "measurement")
    open_viewer(page, site, site["ct"])
    marks = page.evaluate("Object.values(window.imageshareViewer.marks).flat()")
    assert len(marks) == 1 and marks[0]["kind"] == "length" and marks[0]["author"] == "sono"
    # 200 CSS pixels across a 256x256 CT fitted into the canvas: the mark is in image pixels
    fit = min(box["width"], box["height"]) / 256
    (x1, _), (x2, _) = marks[0]["points"]
    assert abs(x2 - x1) == pytest.approx(200 / fit, abs=3)
