"""A sonographer shares a de-identified ultrasound case with a reviewer by e-mail; the reviewer
opens it with the passcode, plays a clip, comments and gives feedback; the sonographer is told;
then the share is revoked. Real SMTP server (aiosmtpd) on loopback, real Chromium."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from pydicom import dcmread

from tests.factory import us_cine
from tests.mail import MailSink, smtp_server
from tests.peers import RunningServer

pytestmark = pytest.mark.browser
PASSWORD = "sonographer-password"


@pytest.fixture(scope="module")
def mail() -> Iterator[tuple[MailSink, int]]:
    with smtp_server() as running:
        yield running


@pytest.fixture(scope="module")
def site(tmp_path_factory, mail) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("sharing")
    clip = us_cine(root / "in", frames=30, rows=240, cols=320, patient_id="H9001",
                   patient_name="Lamarr^Hedy")
    server = RunningServer(root / "data", extra_env={
        "IMAGESHARE_SMTP_HOST": "127.0.0.1", "IMAGESHARE_SMTP_PORT": str(mail[1])})
    # Links in e-mails come only from the public address (never from a request's Host).
    server.extra_env["IMAGESHARE_PUBLIC_URL"] = server.url
    server.start()
    try:
        server.cli("import", "--quiet", str(root / "in"))
        server.cli("user", "add", "sono", "--role", "sonographer", "--password", PASSWORD,
                   "--email", "sono@hospital.example")
        yield {"server": server, "study": dcmread(clip, stop_before_pixels=True).StudyInstanceUID}
    finally:
        server.stop()


def test_share_review_feedback_and_revoke(chromium, site, mail, screenshot):
    sink, _port = mail
    base = site["server"].url
    sender = chromium.new_context(viewport={"width": 1280, "height": 900})
    sono = sender.new_page()
    sono.goto(base + "/login")
    sono.fill("input[name=username]", "sono")
    sono.fill("input[name=password]", PASSWORD)
    sono.click("button[type=submit]")
    sono.wait_for_url(base + "/")
    sono.goto(f"{base}/studies/{site['study']}")
    sono.fill("#share input[name=recipient_email]", "mentor@elsewhere.example")
    sono.fill("#share input[name=title]", "Accreditation case 7")
    sono.fill("#share textarea[name=message]", "Please review my FAST views")
    sono.click("#share button[type=submit]")
    sono.wait_for_selector("code.share-passcode")
    link = sono.inner_text("code.share-link").strip()
    passcode = sono.inner_text("code.share-passcode").strip()
    screenshot(sono, "share-created")

    [invitation] = sink.wait_for("mentor@elsewhere.example")
    body = invitation.get_payload(decode=True).decode()
    assert link in body and passcode not in body
    for identifier in ("Lamarr", "Hedy", "H9001", site["study"]):
        assert identifier not in body and identifier not in invitation["Subject"]

    receiver = chromium.new_context(viewport={"width": 1280, "height": 900})
    mentor = receiver.new_page()
    mentor.goto(link)
    mentor.fill("input[name=passcode]", passcode)
    mentor.click("button[type=submit]")
    mentor.wait_for_selector("text=Please review my FAST views")
    assert "Lamarr" not in mentor.content()
    mentor.click("text=Open viewer")
    mentor.wait_for_function("() => window.imageshareViewer && window.imageshareViewer.playing",
                             timeout=60000)
    frame_url = mentor.evaluate(
        "() => performance.getEntriesByType('resource').map(e => e.name)"
        ".find(n => n.includes('/rendered'))")
    screenshot(mentor, "reviewer-viewer")
    mentor.fill(".viewer-comment textarea[name=body]", "Nice subxiphoid view")
    mentor.click(".viewer-comment button[type=submit]")
    mentor.wait_for_selector("text=Nice subxiphoid view")
    mentor.select_option("#feedback select[name=view_obtained]", "yes")
    mentor.select_option("#feedback select[name=image_quality]", "4")
    mentor.select_option("#feedback select[name=agreement]", "agree")
    mentor.fill("#feedback textarea[name=findings]", "No pericardial effusion")
    mentor.click("#feedback button[type=submit]")
    mentor.wait_for_selector("#feedback dl.feedback")
    screenshot(mentor, "reviewer-feedback")

    notices = sink.wait_for("sono@hospital.example", count=2)
    for notice in notices:
        text = notice.get_payload(decode=True).decode()
        assert "Lamarr" not in text and "H9001" not in text
    sono.goto(base + "/notifications")
    assert "gave feedback" in sono.inner_text("main")
    sono.click("text=A reviewer gave feedback on a case you shared")
    assert "No pericardial effusion" in sono.inner_text("#feedback")
    assert "Nice subxiphoid view" in sono.inner_text("#comments")
    assert "opened with the passcode" in sono.inner_text("#accesses")
    screenshot(sono, "owner-sees-feedback")
    sono.click("text=Revoke this share")
    sono.click("text=Yes, revoke the link")
    sono.wait_for_selector("text=The share was revoked")

    mentor.goto(link)
    assert "revoked" in mentor.inner_text("main")
    after = httpx.get(frame_url, cookies={c["name"]: c["value"] for c in receiver.cookies()})
    assert after.status_code != 200 and not after.headers.get("content-type", "").startswith(
        "image/")
    screenshot(mentor, "link-revoked")
    sender.close()
    receiver.close()
