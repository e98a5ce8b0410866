"""Red-team replay (session 31): attacks on the web application from outside (share links,
uploads, teaching, partners), each proven against the app as it runs, then closed."""

from __future__ import annotations

import re
import time

import pyotp
import pytest

from imageshare.domain.actors import Actor
from imageshare.domain.errors import NotFound
from imageshare.sharing.links import NewShare
from tests.factory import ct_series, us_cine

OWNER = Actor("user", "sono", "sonographer", "127.0.0.1")
HTML = {"Accept": "text/html"}
PASSWORD = "a-long-password"


@pytest.fixture
def study(archive, tmp_path):
    archive.users.add("sono", PASSWORD, "sonographer")
    us = archive.ingest.store_copy(us_cine(tmp_path / "us", frames=2, patient_id="H4242",
                                           patient_name="Hopper^Grace"), OWNER).study_uid
    for path in ct_series(tmp_path / "ct", 2, patient_id="H4242", patient_name="Hopper^Grace",
                          study_uid=us):
        archive.ingest.store_copy(path, OWNER)
    return us


def _enrol_two_factor(archive, username: str) -> pyotp.TOTP:
    totp = pyotp.parse_uri(archive.users.begin_two_factor(username))
    assert isinstance(totp, pyotp.TOTP)
    archive.users.confirm_two_factor(username, totp.now())
    return totp


def _csrf(client, path: str) -> str:
    found = re.search(r'name="csrf-token" content="([^"]+)"', client.get(path, headers=HTML).text)
    assert found is not None
    return found.group(1)


def _identifiable_share(archive, study, recipient: str):
    return archive.shares.create(NewShare(study, deidentified=False, recipient_user=recipient,
                                          allow_download=True), OWNER, None)


# -- MFA on share sessions -------------------------------------------------------------------


def test_a_recipient_who_owes_the_second_factor_cannot_open_an_identifiable_share(
        archive, anonymous, study):
    """Password alone (the TOTP code not given) must not open an identifiable share named
    for an account with two-factor sign-in: the share's patient data is behind the second
    factor like everything else of that account's."""
    archive.users.add("chief", PASSWORD, "clinician")
    _enrol_two_factor(archive, "chief")
    created = _identifiable_share(archive, study, "chief")
    signed = anonymous.post("/login", data={"username": "chief", "password": PASSWORD},
                            headers=HTML, follow_redirects=False)
    assert signed.headers["location"].startswith("/login/code")  # the code is still owed
    landing = anonymous.get(created.path, headers=HTML)
    assert f"/login/code?next={created.path}" in landing.text  # it says what is missing
    opened = anonymous.post(created.path, data={"passcode": created.passcode}, headers=HTML,
                            follow_redirects=False)
    assert opened.status_code != 303
    case = anonymous.get(created.path + "/case", headers=HTML, follow_redirects=False)
    assert case.status_code != 200 and "Hopper" not in case.text
    download = anonymous.get(created.path + "/download", follow_redirects=False)
    assert download.status_code != 200
    # nor did the passcode open the share's items to the account (opened_at)
    share = archive.shares.by_public_id(created.public_id, "sono")
    assert share.opened_at is None


def test_an_administrator_who_has_not_set_up_the_second_factor_cannot_open_an_identifiable_share(
        archive, anonymous, study):
    """An administrator without a second factor may only enrol, on every channel: also on a
    share link naming them."""
    archive.users.add("boss", PASSWORD, "admin")
    created = _identifiable_share(archive, study, "boss")
    anonymous.post("/login", data={"username": "boss", "password": PASSWORD}, headers=HTML)
    opened = anonymous.post(created.path, data={"passcode": created.passcode}, headers=HTML,
                            follow_redirects=False)
    assert opened.status_code != 303
    assert anonymous.get(created.path + "/case", headers=HTML,
                         follow_redirects=False).status_code != 200


def test_a_link_opened_with_the_full_session_closes_when_the_session_drops_to_the_code_stage(
        archive, anonymous, study):
    """The link's cookie alone is not enough: the account behind it must be fully signed in
    on every request (a later password-only session of the same name does not inherit it)."""
    archive.users.add("chief", PASSWORD, "clinician")
    totp = _enrol_two_factor(archive, "chief")
    created = _identifiable_share(archive, study, "chief")
    code = totp.generate_otp(int(time.time()) // totp.interval + 1)
    anonymous.post("/login", data={"username": "chief", "password": PASSWORD}, headers=HTML)
    anonymous.post("/login/code", data={"code": code, "csrf_token": _csrf(anonymous,
                                                                          "/login/code")},
                   headers=HTML)
    opened = anonymous.post(created.path, data={"passcode": created.passcode}, headers=HTML,
                            follow_redirects=False)
    assert opened.status_code == 303
    assert anonymous.get(created.path + "/case", headers=HTML).status_code == 200
    # a password-only session (someone with the password, not the phone) in this browser
    anonymous.cookies.delete("imageshare_session")
    anonymous.post("/login", data={"username": "chief", "password": PASSWORD}, headers=HTML)
    case = anonymous.get(created.path + "/case", headers=HTML, follow_redirects=False)
    assert case.status_code != 200 and "Hopper" not in case.text


# -- upload invitations: passcode guesses at the same moment ---------------------------------


@pytest.fixture
def inviting(tmp_path):
    """An archive that can e-mail invitations (a real SMTP server, a public URL)."""
    from tests.conftest import make_archive
    from tests.mail import smtp_server

    with smtp_server() as (_sink, port):
        built = make_archive(tmp_path, smtp_host="127.0.0.1", smtp_port=port,
                             public_url="https://images.hospital.example")
        try:
            yield built
        finally:
            built.close()


def _upload_invitation(archive):
    from imageshare.uploads.invitations import UploadRequest

    staff = Actor("user", "clerk", "radiographer", "127.0.0.1")
    return archive.uploads.invitations.invite(UploadRequest(
        patient_name="Lovelace^Ada", hospital_number="H100", birth_date="19151210",
        email="ada@home.example"), staff)


def test_upload_passcodes_tried_at_the_same_moment_get_no_more_than_ten_tries(inviting):
    """Twenty wrong passcodes at once against one invitation (each request found it open):
    no more than ten are checked, it ends locked, and the right passcode then opens
    nothing (as for share links)."""
    import threading

    created = _upload_invitation(inviting)
    invitations = inviting.uploads.invitations
    invitation = invitations.by_token(created.path.removeprefix("/u/"))
    start = threading.Barrier(20)

    def guess(passcode: str) -> None:
        start.wait()
        assert not invitations.check_passcode(invitation, passcode, "192.0.2.1")

    guesses = [threading.Thread(target=guess, args=(f"WRONG{n:02d}",)) for n in range(20)]
    for thread in guesses:
        thread.start()
    for thread in guesses:
        thread.join(60)
    checked = [e for e in inviting.audit.events("upload.passcode")
               if e["outcome"] == "failure" and "failures" in e["detail"]]
    assert len(checked) <= 10
    assert invitations.by_public_id(created.public_id).locked
    assert not invitations.check_passcode(invitation, created.passcode, "192.0.2.1")


# -- caching of answers that carry patient data -----------------------------------------------


def test_json_api_answers_are_never_kept_by_a_browser_or_proxy_cache(archive, client, study):
    """Answers of the JSON API name patients, studies, reviewers' comments and addresses:
    no shared or browser cache may keep them (Cache-Control: no-store), and none is sniffed
    into another type."""
    created = archive.shares.create(NewShare(study, title="FAST review"),
                                    Actor("user", "admin", "admin", "127.0.0.1"), None)
    for path in ("/api/me", "/api/shares", f"/api/shares/{created.public_id}", "/api/audit",
                 "/api/exchange/inbox", "/api/exchange/requests", "/api/nodes",
                 f"/api/studies/{study}/consent"):
        answer = client.get(path)
        assert answer.status_code == 200, (path, answer.status_code, answer.text)
        assert "no-store" in answer.headers.get("cache-control", ""), path
        assert answer.headers.get("x-content-type-options") == "nosniff", path
    signed = client.post("/api/session", json={"username": "sono", "password": PASSWORD})
    assert signed.status_code == 200
    assert "no-store" in signed.headers.get("cache-control", "")  # it carries the CSRF token


# -- the teaching library: what attached photos and videos carry about the patient --------------

IDENTIFYING = ("Marple", "H31337", "51.5007", "Kings Road")


def _photo_with_exif() -> bytes:
    """A phone photo of a specimen: EXIF naming the patient, the place (GPS), turned 90°."""
    import io

    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: shown turned upright
    exif[0x010E] = "Marple^Jane H31337 excision"  # ImageDescription
    exif[0x013B] = "Kings Road clinic"  # Artist
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2] = "N", (51.0, 30.0, 0.5007)
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (180, 60, 60)).save(out, format="JPEG", exif=exif,
                                                  comment=b"Marple H31337")
    return out.getvalue()


def _png_with_text() -> bytes:
    import io

    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Description", "Marple^Jane H31337")
    info.add_itxt("Location", "51.5007 Kings Road")
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 60, 200)).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def _video_with_place() -> bytes:
    import tempfile
    from pathlib import Path

    from tests.upload_media import mp4

    with tempfile.TemporaryDirectory() as folder:
        return mp4(Path(folder) / "clip.mp4", frames=6, width=64, height=48, metadata={
            "location": "+51.5007-000.1246/", "title": "Marple H31337"}).read_bytes()


def test_photos_and_videos_attached_to_a_teaching_case_keep_no_identifying_metadata(
        archive, tmp_path):
    """A teaching case is de-identified: a photo's EXIF (description, author, GPS), a PNG's
    text and a phone video's container metadata (place filmed) do not reach the library; the
    picture itself (and which way up it is) and the video's frames do."""
    import io

    from PIL import Image

    from imageshare.teaching.library import CaseFields

    educator = Actor("user", "edu", "educator", "127.0.0.1")
    archive.users.add("edu", PASSWORD, "educator")
    study = archive.ingest.store_copy(us_cine(tmp_path / "us", frames=2, patient_id="H31337",
                                              patient_name="Marple^Jane"), OWNER).study_uid
    case = archive.teaching.create(educator, CaseFields(title="Melanoma"), study)
    for name, content in (("photo", _photo_with_exif()), ("screen", _png_with_text()),
                          ("clip", _video_with_place())):
        assert any(word.encode() in content for word in IDENTIFYING), name  # the attack
        kept = archive.teaching.attach(case, educator, io.BytesIO(content), len(content),
                                       name)
        with archive.teaching.open_attachment(case, kept, educator) as stream:
            served = stream.read()
        assert kept.size == len(served)
        for word in IDENTIFYING:
            assert word.encode() not in served, (name, word)
        if kept.kind == "image":
            before, after = Image.open(io.BytesIO(content)), Image.open(io.BytesIO(served))
            assert after.size == before.size
            assert after.getexif().get(0x0112, 1) == before.getexif().get(0x0112, 1)
            assert after.tobytes() == before.tobytes()  # the pixels are untouched
        else:
            import av

            with av.open(io.BytesIO(served), "r") as container:
                assert len(list(container.decode(video=0))) == 6


# -- an export's file after the right to export it was taken away ------------------------------


def test_an_export_file_is_not_served_once_its_owner_may_no_longer_export(archive, anonymous,
                                                                          study):
    """An identifiable export finished for a clinician is not served after their role
    changed to one that may not export (the file is kept a day): the right is checked when
    the bytes leave, not only when the job was queued."""
    import base64

    archive.users.add("clin", PASSWORD, "clinician")
    basic = {"Authorization": "Basic " + base64.b64encode(f"clin:{PASSWORD}".encode()).decode()}
    started = anonymous.post(f"/api/studies/{study}/exports", headers=basic,
                             json={"format": "zip", "deidentify": False})
    assert started.status_code == 202, started.text
    job_id = started.json()["id"]
    for _ in range(200):
        if anonymous.get(f"/api/jobs/{job_id}", headers=basic).json()["state"] == "done":
            break
        time.sleep(0.05)
    assert anonymous.get(f"/api/jobs/{job_id}/file", headers=basic).status_code == 200
    archive.users.set_role("clin", "reviewer")
    refused = anonymous.get(f"/api/jobs/{job_id}/file", headers=basic)
    assert refused.status_code == 403 and not refused.content.startswith(b"PK")


# -- an opened share link in a browser left behind ---------------------------------------------


def test_a_link_opened_in_a_browser_asks_for_its_passcode_again_after_twelve_hours(
        archive, anonymous, study):
    """A link's browser session lasts no longer than a staff session (12 hours): a shared
    computer left with the case open does not show it to the next person for the weeks the
    link lives."""
    from datetime import timedelta

    from sqlalchemy import update

    from imageshare.storage.index.schema import share_sessions

    created = archive.shares.create(NewShare(study), OWNER, None)
    opened = anonymous.post(created.path, data={"passcode": created.passcode}, headers=HTML,
                            follow_redirects=False)
    assert opened.status_code == 303
    assert anonymous.get(created.path + "/case", headers=HTML).status_code == 200
    with archive.engine.begin() as conn:
        conn.execute(update(share_sessions).values(
            created_at=share_sessions.c.created_at - timedelta(hours=13)))
    later = anonymous.get(created.path + "/case", headers=HTML, follow_redirects=False)
    assert later.status_code != 200
    assert anonymous.get(created.path, headers=HTML).text.count('name="passcode"') == 1


# -- e-mails the hospital sends with words an outsider chose -----------------------------------


def test_a_patient_cannot_write_their_own_lines_into_the_hospitals_share_emails(tmp_path):
    """A patient chooses their user name when they make their account; the hospital's
    e-mail announcing their share names them. A name with line breaks would put the
    patient's own lines (a fake instruction, a link) into a message sent by the hospital to
    any address: such names are refused, and an e-mail never carries a sender's line
    breaks."""
    from fastapi.testclient import TestClient

    from imageshare.web.server import create_app
    from tests.conftest import make_archive
    from tests.mail import smtp_server

    phishing = "Ward 7\r\n\r\nURGENT: confirm your identity at https://evil.example/login"
    with smtp_server() as (sink, port):
        archive = make_archive(tmp_path, smtp_host="127.0.0.1", smtp_port=port,
                               public_url="https://images.hospital.example")
        try:
            clerk = Actor("user", "clerk", "radiographer", "127.0.0.1")
            study_uid = archive.ingest.store_copy(us_cine(
                tmp_path / "us", frames=2, patient_id="H4242", patient_name="Hopper^Grace"),
                clerk).study_uid
            archive.uploads.patients.invite("pat@home.example", "H4242", "", clerk)
            archive.notifier.mailer.flush()
            [invitation] = sink.bodies("pat@home.example")
            secret = invitation.split("/invite/")[1].split()[0]
            with TestClient(create_app(archive)) as browser:
                made = browser.post(f"/invite/{secret}", headers=HTML, follow_redirects=False,
                                    data={"username": phishing, "password": PASSWORD})
                assert made.status_code == 400 and "line breaks" in made.text  # refused
            with pytest.raises(NotFound):
                archive.users.account(phishing)
            # an account of such a name made before names were checked: its share's e-mail
            created = archive.shares.create(NewShare(
                study_uid, recipient_email="gp@surgery.example"), clerk, None)
            archive.shares.invite(created, "gp@surgery.example",
                                  "https://images.hospital.example" + created.path, phishing)
            archive.notifier.mailer.flush()
            [mail] = sink.bodies("gp@surgery.example")
            assert not any(line.startswith("URGENT") for line in mail.splitlines()), mail
        finally:
            archive.close()


def test_a_partner_site_cannot_write_its_own_lines_into_the_urgent_alert_email(tmp_path):
    """The urgent-arrival e-mail to the receiving team quotes the sending site's contact:
    a partner (or whoever holds its account) cannot add lines of its own to a message the
    hospital's team trusts ("call this number", "sign in here")."""
    from fastapi.testclient import TestClient

    from imageshare.exchange.nodes import Node
    from imageshare.web.server import create_app
    from tests.conftest import make_archive
    from tests.mail import smtp_server

    with smtp_server() as (sink, port):
        archive = make_archive(tmp_path, smtp_host="127.0.0.1", smtp_port=port,
                               exchange_team_email="team@hospital.example")
        try:
            archive.nodes.add(Node("SITEA", "127.0.0.1", 104, display_name="Hospital A",
                                   inbox=True))
            archive.users.add("site-a", PASSWORD, "site", site_node="SITEA")
            site = Actor("user", "site-a", "site", "127.0.0.1")
            study_uid = archive.ingest.store_copy(
                ct_series(tmp_path / "sent", 1, patient_id="9434765919")[0], site).study_uid
            with TestClient(create_app(archive)) as partner:
                answer = partner.post("/api/exchange/arrivals", auth=("site-a", PASSWORD),
                                      json={"study_uid": study_uid, "priority": "urgent",
                                            "contact": "ED 4412\n\nIT NOTICE: sign in again "
                                                       "at https://evil.example/login"})
                assert answer.status_code == 200, answer.text
            [mail] = sink.wait_for("team@hospital.example")
            body = mail.get_payload(decode=True).decode()
            assert "ED 4412" in body
            assert not any(line.startswith("IT NOTICE") for line in body.splitlines()), body
        finally:
            archive.close()
