"""Teaching files and accreditation review end to end, in Chromium against a real server and a
real SMTP server (aiosmtpd):

- an educator builds a teaching case from a colour ultrasound study (no patient identifier on
  any of its pages), attaches a PDF, a photo and an MP4, marks an image and presents the case,
  revealing the diagnosis on demand;
- a trainee shares an accreditation case with a mentor by e-mail; the mentor comments on a
  named clip, gives feedback and signs off; the trainee's logbook PDF lists it.

Screenshots of each step go to docs/screenshots/teaching-*.png."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator

import av
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pypdf import PdfReader

from tests.browser.test_sharing_flow import mail  # noqa: F401 - the SMTP server fixture
from tests.conftest import ROOT
from tests.factory import us_cine
from tests.peers import RunningServer

pytestmark = pytest.mark.browser
PASSWORD = "teaching-password"
SCREENSHOTS = ROOT / "docs" / "screenshots"
IDENTIFIERS = ("Franklin", "Rosalind", "H5150", "ACC001", "19700101")


@pytest.fixture(scope="module")
def site(tmp_path_factory, mail) -> Iterator[dict]:  # noqa: F811 - the fixture above
    root = tmp_path_factory.mktemp("teaching")
    clip = us_cine(root / "in" / "a", frames=30, rows=240, cols=320, patient_id="H5150",
                   patient_name="Franklin^Rosalind")
    study = dcmread(clip, stop_before_pixels=True).StudyInstanceUID
    _beating(clip)
    _beating(us_cine(root / "in" / "b", frames=20, rows=240, cols=320, patient_id="H5150",
                     patient_name="Franklin^Rosalind", study_uid=study))
    server = RunningServer(root / "data", extra_env={
        "IMAGESHARE_SMTP_HOST": "127.0.0.1", "IMAGESHARE_SMTP_PORT": str(mail[1])})
    server.extra_env["IMAGESHARE_PUBLIC_URL"] = server.url
    server.start()
    files = root / "files"
    files.mkdir()
    _pdf(files / "pathology.pdf")
    Image.new("RGB", (120, 90), (180, 60, 60)).save(files / "specimen.png")
    (files / "echo-clip.mp4").write_bytes(_mp4())
    try:
        server.cli("import", "--quiet", str(root / "in"))
        server.cli("user", "add", "edu", "--role", "educator", "--password", PASSWORD,
                   "--email", "edu@hospital.example")
        server.cli("user", "add", "trainee", "--role", "sonographer", "--password", PASSWORD,
                   "--email", "trainee@hospital.example")
        yield {"server": server, "study": study, "files": files}
    finally:
        server.stop()


def _beating(path) -> None:
    """Give a synthetic clip a visible picture: a ring that grows and shrinks on grey."""
    ds = dcmread(path)
    frames, rows, cols = int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns)
    y, x = np.mgrid[0:rows, 0:cols]
    distance = np.hypot(x - cols / 2, y - rows / 2)
    data = np.zeros((frames, rows, cols, 3), np.uint8)
    for f in range(frames):
        radius = 40 + 25 * np.sin(2 * np.pi * f / frames)
        ring = np.abs(distance - radius) < 8
        data[f, ..., :] = 40
        data[f][ring] = (230, 200, 120)
    ds.PixelData = data.tobytes()
    ds.save_as(path, enforce_file_format=True)


def _pdf(path) -> None:
    """A one-page PDF (a pathology report) with an author in its document information."""
    from pypdf import PdfWriter

    writer = PdfWriter()
    writer.add_blank_page(595, 842)
    writer.add_metadata({"/Author": "Dr Pathologist", "/Title": "Specimen report"})
    with open(path, "wb") as out:
        writer.write(out)


def _mp4() -> bytes:
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for i in range(20):
            image = np.zeros((120, 160, 3), np.uint8)
            image[:, (i * 8) % 160] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def _shot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"teaching-{name}.png"), full_page=True)


def _sign_in(chromium, base: str, username: str):
    context = chromium.new_context(viewport={"width": 1280, "height": 860},
                                   accept_downloads=True)
    page = context.new_page()
    page.goto(base + "/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(base + "/")
    return context, page


def _no_identifier(page) -> None:
    text = page.content()
    for identifier in IDENTIFIERS:
        assert identifier not in text, (page.url, identifier)


def test_educator_builds_and_presents_a_teaching_case(chromium, site):
    base = site["server"].url
    context, edu = _sign_in(chromium, base, "edu")
    edu.goto(f"{base}/studies/{site['study']}")
    form = "#teaching"
    edu.fill(f"{form} input[name=title]", "Echo: pericardial effusion")
    edu.fill(f"{form} input[name=body_part]", "heart")
    edu.fill(f"{form} input[name=collection]", "Cardiac MDT")
    edu.fill(f"{form} textarea[name=history]", "Breathless after a viral illness.")
    edu.fill(f"{form} input[name=diagnosis]", "Pericardial effusion with tamponade")
    edu.click(f"{form} button[type=submit]")
    edu.wait_for_selector("text=de-identified, verified copy")
    case_url = edu.url.split("?")[0]
    _no_identifier(edu)
    _shot(edu, "1-case-created")

    for name in ("pathology.pdf", "specimen.png", "echo-clip.mp4"):
        edu.set_input_files("#files input[type=file]", str(site["files"] / name))
        edu.fill("#files input[name=title]", name)
        edu.click("#files button[type=submit]")
        edu.wait_for_selector(f"#files a:text('{name}')")
    kinds = edu.eval_on_selector_all("#files li.attachment", "els => els.map(e => e.dataset.kind)")
    assert kinds == ["pdf", "image", "video"]
    _no_identifier(edu)
    _shot(edu, "2-files-attached")

    edu.goto(case_url + "/viewer")
    edu.wait_for_function("() => window.imageshareViewer && window.imageshareViewer.view")
    _no_identifier(edu)
    edu.click("button[data-tool=arrow]")
    box = edu.locator("#canvas").bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    edu.mouse.move(cx + 120, cy + 90)
    edu.mouse.down()
    edu.mouse.move(cx + 20, cy + 10, steps=5)
    edu.mouse.up()
    edu.click("#save-marks")
    edu.wait_for_function("() => window.imageshareViewer.savedMarks >= 1")
    _shot(edu, "3-image-marked")

    edu.goto(case_url + "/present")
    edu.wait_for_selector("text=What are the findings, and what is the diagnosis?")
    _no_identifier(edu)
    _shot(edu, "4-present-question")
    edu.keyboard.press("PageDown")
    edu.wait_for_function("() => window.imagesharePresentation.shownFrames > 10",
                          timeout=30000)  # the cine plays
    assert edu.evaluate("document.querySelector('[data-slide=images]').hidden") is False
    _shot(edu, "5-present-cine")
    edu.keyboard.press("End")
    assert edu.is_hidden("#reveal")
    _shot(edu, "6-present-answer-hidden")
    edu.keyboard.press("r")
    edu.wait_for_selector("#reveal >> text=Pericardial effusion with tamponade")
    assert edu.is_hidden("#reveal-button")  # revealed: the button has done its work
    _shot(edu, "7-present-diagnosis-revealed")
    context.close()


def test_trainee_shares_mentor_reviews_signs_off_and_the_logbook_lists_it(chromium, site,
                                                                         mail):  # noqa: F811
    sink, _port = mail
    base = site["server"].url
    context, trainee = _sign_in(chromium, base, "trainee")
    trainee.goto(f"{base}/studies/{site['study']}")
    trainee.fill("#case input[name=title]", "FUSIC heart: case 12")
    trainee.click("#case button[type=submit]")
    trainee.wait_for_selector("h1:text('FUSIC heart: case 12')")
    trainee.fill("textarea[name=description]", "ICU, hypotension. PLAX and A4C views.")
    trainee.click("form.card button[type=submit]")
    assert trainee.input_value("#share select[name=profile]") == "accreditation"
    trainee.fill("#share input[name=recipient_email]", "mentor@elsewhere.example")
    trainee.fill("#share textarea[name=interpretation]", "Small effusion, good LV function")
    trainee.click("#share button[type=submit]")
    trainee.wait_for_selector("code.share-passcode")
    passcode = trainee.inner_text("code.share-passcode").strip()
    _shot(trainee, "8-trainee-shared")

    [invitation] = sink.wait_for("mentor@elsewhere.example")
    body = invitation.get_payload(decode=True).decode()
    link = re.search(re.escape(base) + r"/s/[A-Za-z0-9_-]+", body).group(0)

    mentor_context = chromium.new_context(viewport={"width": 1280, "height": 860})
    mentor = mentor_context.new_page()
    mentor.goto(link)
    mentor.fill("input[name=passcode]", passcode)
    mentor.click("button[type=submit]")
    mentor.wait_for_selector("text=Small effusion, good LV function")
    assert "PLAX and A4C views" in mentor.inner_text("#about")
    _no_identifier(mentor)
    clip = mentor.eval_on_selector("#feedback select[name=sop] option:nth-child(3)",
                                   "o => ({value: o.value, name: o.textContent})")
    mentor.select_option("#comments select[name=sop]", clip["value"])
    mentor.fill("#comments textarea[name=body]", "Apex foreshortened in this clip")
    mentor.click("#comments button[type=submit]")
    mentor.wait_for_selector(f"text=on {clip['name']}")
    mentor.select_option("#feedback select[name=sop]", clip["value"])
    mentor.select_option("#feedback select[name=view_obtained]", "partly")
    mentor.select_option("#feedback select[name=image_quality]", "3")
    mentor.select_option("#feedback select[name=agreement]", "agree")
    mentor.fill("#feedback textarea[name=findings]", "Small effusion, no tamponade")
    mentor.click("#feedback button[type=submit]")
    mentor.wait_for_selector("text=your feedback was sent")
    _shot(mentor, "9-mentor-feedback-confirmed")
    mentor.fill("#signoff textarea[name=note]", "Competent in PLAX and A4C")
    mentor.click("#signoff button[type=submit]")
    mentor.wait_for_selector("text=You signed off this case")
    _shot(mentor, "10-mentor-signed-off")

    notices = sink.wait_for("trainee@hospital.example", count=3)
    assert any("signed off" in n["Subject"] for n in notices)
    for notice in notices:
        text = notice.get_payload(decode=True).decode()
        for identifier in IDENTIFIERS:
            assert identifier not in text

    trainee.goto(base + "/shares")
    trainee.click("text=FUSIC heart: case 12")
    assert f"on {clip['name']}" in trainee.inner_text("#comments")
    assert clip["name"] in trainee.inner_text("#feedback")
    assert "opened with the passcode" in trainee.inner_text("#accesses")
    _shot(trainee, "11-owner-sees-clip-and-visits")
    trainee.goto(base + "/logbook")
    assert "signed off" in trainee.inner_text("table.logbook")
    _shot(trainee, "12-logbook")
    with trainee.expect_download() as download:
        trainee.click("text=Export PDF")
    text = "".join(p.extract_text() for p in PdfReader(download.value.path()).pages)
    assert "FUSIC heart: case 12" in text and "Competent in PLAX and A4C" in text
    for identifier in IDENTIFIERS:
        assert identifier not in text

    # Revoked while the mentor has the viewer open: the next image they ask for takes them to
    # the link's own "revoked" page, not the staff sign-in page.
    mentor.goto(link + "/viewer")
    mentor.wait_for_function("() => window.imageshareViewer && window.imageshareViewer.view")
    trainee.goto(base + "/shares")
    trainee.click("text=FUSIC heart: case 12")
    trainee.click("text=Revoke this share")
    _shot(trainee, "13-revoke-asks-first")
    trainee.click("text=Yes, revoke the link")
    trainee.wait_for_selector("text=The share was revoked")
    mentor.click(".series-button[aria-current=false] >> nth=0")
    mentor.wait_for_selector("text=This link no longer works", timeout=30000)
    assert "revoked" in mentor.inner_text("main")
    assert mentor.locator("input[name=password]").count() == 0
    _shot(mentor, "14-revoked-mid-session")
    mentor_context.close()
    context.close()
