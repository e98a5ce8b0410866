"""A clerk invites a patient to upload before an appointment; the patient, on a phone-sized
browser, uploads a CD folder with its DICOMDIR, two photos, an MP4 and a PDF over a connection
that drops halfway through the video and resumes; the clerk rejects the CD (the patient gets
the message by e-mail) and accepts the rest; the patient, invited to an account, sees the
accepted study and shares it with a doctor. Real SMTP server (aiosmtpd), real Chromium."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator

import pytest

from tests.conftest import ROOT
from tests.mail import smtp_server
from tests.peers import RunningServer
from tests.upload_media import cd_folder, mp4, pdf, photo, png

pytestmark = pytest.mark.browser
PASSWORD = "clerk-password-1"
NHS = "9434765919"
SCREENSHOTS = ROOT / "docs" / "screenshots"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[dict]:
    with smtp_server() as (sink, port):
        yield from _site(tmp_path_factory, sink, port)


def _site(tmp_path_factory, sink, port: int) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("uploads")
    server = RunningServer(root / "data", extra_env={
        "IMAGESHARE_SMTP_HOST": "127.0.0.1", "IMAGESHARE_SMTP_PORT": str(port),
        "IMAGESHARE_UPLOAD_CHUNK_BYTES": str(256 * 1024)})
    server.extra_env["IMAGESHARE_PUBLIC_URL"] = server.url
    server.start()
    media = root / "media"
    media.mkdir()
    try:
        server.cli("user", "add", "clerk", "--role", "radiographer", "--password", PASSWORD)
        yield {"server": server, "sink": sink, "cd": cd_folder(media / "CD", nhs="1234567881"),
               "photos": [photo(media / "IMG_0001.jpg"), png(media / "wound.png")],
               "video": mp4(media / "knee.mp4", frames=60), "pdf": pdf(media / "letter.pdf")}
    finally:
        server.stop()


def _shot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"upload-{name}.png"), full_page=True)


def _link(body: str, base: str, path: str) -> str:
    return re.search(re.escape(base) + path + r"[\w/-]+", body).group(0)


def test_invite_upload_resume_review_and_patient_access(chromium, site):
    server, sink = site["server"], site["sink"]
    base = server.url
    staff = chromium.new_context(viewport={"width": 1280, "height": 900})
    clerk = staff.new_page()
    clerk.goto(base + "/login")
    clerk.fill("input[name=username]", "clerk")
    clerk.fill("input[name=password]", PASSWORD)
    clerk.click("button[type=submit]")
    clerk.wait_for_url(base + "/")
    clerk.goto(base + "/uploads")
    form = clerk.locator("form[action='/uploads/invite']")
    form.locator("input[name=family_name]").fill("Lovelace")
    form.locator("input[name=given_name]").fill("Ada")
    form.locator("input[name=birth_date]").fill("1915-12-10")
    form.locator("input[name=nhs_number]").fill(NHS)
    form.locator("input[name=hospital_number]").fill("H100")
    form.locator("input[name=email]").fill("ada@home.example")
    form.locator("input[name=reference]").fill("Knee clinic, 3 March")
    form.locator("button[type=submit]").click()
    clerk.wait_for_selector("code.upload-passcode")
    passcode = clerk.inner_text("code.upload-passcode").strip()
    assert "The link was sent by e-mail" in clerk.inner_text("main")  # a mail server took it
    _shot(clerk, "1-invited")

    [mail] = sink.wait_for("ada@home.example")
    body = mail.get_payload(decode=True).decode()
    link = _link(body, base, "/u/")
    assert passcode not in body and "Lovelace" not in body and NHS not in body

    phone = chromium.new_context(viewport={"width": 390, "height": 844}, is_mobile=True,
                                 has_touch=True)
    ada = phone.new_page()
    ada.goto(link)
    ada.fill("input[name=passcode]", passcode)
    ada.click("button[type=submit]")
    ada.wait_for_selector("#drop[data-ready]")  # the page's script listens for files
    dropped = {"patches": 0, "aborted": False}

    def drop_once(route) -> None:
        if route.request.method == "PATCH":
            dropped["patches"] += 1
            if dropped["patches"] == 3 and not dropped["aborted"]:
                dropped["aborted"] = True  # halfway through the video: the connection drops
                route.abort("connectionreset")
                return
        route.continue_()

    ada.route("**/files/*", drop_once)
    ada.set_input_files("#pick-files", [str(site["video"])])
    ada.wait_for_selector("#files li.retrying, #files li.done", timeout=120000)
    ada.wait_for_selector("#files li.done", timeout=60000)
    assert dropped["aborted"]
    ada.unroute("**/files/*")
    ada.set_input_files("#pick-folder", str(site["cd"]))
    ada.set_input_files("#pick-files", [str(p) for p in (*site["photos"], site["pdf"])])
    ada.wait_for_function(
        "() => { const rows = [...document.querySelectorAll('#files li')];"
        " return rows.length >= 8 && rows.every(r => r.className === 'done'); }",
        timeout=120000)
    _shot(ada, "2-uploaded-on-a-phone")
    ada.click("#send")
    ada.wait_for_selector("text=your images were sent", timeout=120000)
    # the files are checked in the background; the page follows until that is done
    ada.wait_for_selector("#intake[data-state=done]", timeout=120000)
    assert "could not be used" not in ada.inner_text("#intake")
    _shot(ada, "3-sent")

    clerk.goto(base + "/uploads")
    clerk.click("text=Lovelace")
    clerk.wait_for_selector(".upload-study")
    _shot(clerk, "4-review")
    cd_study = clerk.locator(".upload-study", has_text="PT000000")
    assert "not the invited patient" in cd_study.inner_text()  # another NHS number
    cd_study.locator("textarea[name=message]").fill("This CD is another patient's. Please "
                                                     "send your own CD.")
    cd_study.locator("button.danger").click()
    clerk.wait_for_load_state()
    assert clerk.locator(".upload-study", has_text="PT000000").count() == 0  # deleted
    assert "open" in clerk.inner_text(".banner")  # the invitation reopened
    own = clerk.locator(".upload-study[data-status=pending]")
    assert "knee.mp4" in own.inner_text() and "letter.pdf" in own.inner_text()
    # the video, made DICOM, plays in the viewer (its MPEG-4 stream as video/mp4)
    review_page = clerk.url
    own.locator("text=Open in the viewer").click()
    clerk.wait_for_selector(".series-list .series-button")
    videos = clerk.locator(".series-button", has_text="Videos")
    if videos.count():
        videos.first.click()
    clerk.wait_for_function(
        "() => { const v = document.getElementById('video');"
        " return v && !v.hidden && v.readyState >= 2 && v.videoWidth === 320; }",
        timeout=60000)
    _shot(clerk, "4b-video-in-the-viewer")
    clerk.goto(review_page)
    own = clerk.locator(".upload-study[data-status=pending]")
    own.locator("text=Accept into the record").click()
    clerk.wait_for_selector(".upload-study[data-status=accepted]")
    _shot(clerk, "5-decided")
    rejection = sink.wait_for("ada@home.example", count=2)[-1]
    assert "another patient's" in rejection.get_payload(decode=True).decode()

    clerk.goto(base + "/uploads")
    patient_form = clerk.locator("form[action='/uploads/patients']")
    patient_form.locator("input[name=email]").fill("ada@home.example")
    patient_form.locator("input[name=hospital_number]").fill("H100")
    patient_form.locator("button[type=submit]").click()
    account_mail = sink.wait_for("ada@home.example", count=3)[-1]
    invite = _link(account_mail.get_payload(decode=True).decode(), base, "/invite/")
    ada.goto(invite)
    ada.fill("input[name=username]", "ada")
    ada.fill("input[name=password]", "ada-password-123")
    ada.click("button[type=submit]")
    ada.goto(base + "/login")
    ada.fill("input[name=username]", "ada")
    ada.fill("input[name=password]", "ada-password-123")
    ada.click("button[type=submit]")
    ada.goto(base + "/my")
    assert ada.locator(".my-study").count() == 1
    _shot(ada, "6-my-images")
    ada.fill(".my-study input[name=email]", "dr.second@elsewhere.example")
    ada.click(".my-study button[type=submit]")
    ada.wait_for_selector("code.share-passcode")
    _shot(ada, "7-shared-with-a-doctor")
    assert sink.wait_for("dr.second@elsewhere.example")
    staff.close()
    phone.close()
    shutil.rmtree(site["cd"].parent / "CD-src", ignore_errors=True)
