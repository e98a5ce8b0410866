"""Share links: passcode, scope, expiry, lockout, revocation, de-identified content, audit."""

from __future__ import annotations

import io
import math
import re
import shutil
import time
import zipfile
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text, update

from imageshare.domain.actors import Actor
from imageshare.sharing.links import NewShare
from imageshare.storage.index.schema import shares
from tests.conftest import require
from tests.factory import ct_series, us_cine

OWNER = Actor("user", "sono", "sonographer", "127.0.0.1")
HTML = {"Accept": "text/html"}


@pytest.fixture(autouse=True)
def _tesseract():
    require(shutil.which("tesseract") is not None, "Tesseract OCR (Debian package tesseract-ocr)")


@pytest.fixture
def study(archive, tmp_path):
    archive.users.add("sono", "a-long-password", "sonographer")
    us = archive.ingest.store_copy(us_cine(tmp_path / "us", frames=4, patient_id="H4242",
                                           patient_name="Hopper^Grace"), OWNER).study_uid
    for path in ct_series(tmp_path / "ct", 2, patient_id="H4242", patient_name="Hopper^Grace",
                          study_uid=us):
        archive.ingest.store_copy(path, OWNER)
    return us


def make_share(archive, study, **options):
    return archive.shares.create(NewShare(study, **options), OWNER, None)


def open_link(client, created, passcode=None):
    return client.post(created.path, data={"passcode": passcode or created.passcode},
                       headers=HTML, follow_redirects=False)


def test_a_link_is_opened_with_its_passcode_and_shows_the_case(archive, anonymous, study):
    created = make_share(archive, study, title="FAST for review", message="Please look")
    landing = anonymous.get(created.path, headers=HTML)
    assert landing.status_code == 200 and 'name="passcode"' in landing.text
    assert "Hopper" not in landing.text and "FAST" not in landing.text
    assert anonymous.get(created.path + "/case", headers=HTML,
                         follow_redirects=False).status_code in (303, 401)
    assert open_link(anonymous, created, "WRONGCODE1").status_code == 401
    opened = open_link(anonymous, created)
    assert opened.status_code == 303
    case = anonymous.get(created.path + "/case", headers=HTML)
    assert case.status_code == 200 and "Please look" in case.text
    assert "Hopper" not in case.text and "H4242" not in case.text


def test_the_token_is_long_random_and_stored_only_as_a_hash(archive, anonymous, study):
    created = make_share(archive, study)
    token = created.path.removeprefix("/s/")
    assert len(token) * 6 >= 256  # 43 URL-safe characters: 256 bits of entropy
    bits_of_passcode = len(created.passcode) * math.log2(32)
    assert bits_of_passcode >= 50
    with archive.engine.connect() as conn:
        dump = " ".join(str(r) for r in conn.execute(text("SELECT * FROM shares")))
    assert token not in dump and created.passcode not in dump
    altered = token[:-1] + ("A" if token[-1] != "A" else "B")
    assert anonymous.get(f"/s/{altered}", headers=HTML).status_code == 404


def test_only_the_shared_instances_exist_under_the_link(archive, anonymous, study):
    us_series = next(s.series_uid for s in archive.catalogue.record(study).series
                     if s.modality == "US")
    created = make_share(archive, study, series_uids=(us_series,))
    open_link(anonymous, created)
    share = archive.shares.by_token(created.path.removeprefix("/s/"))
    [item] = archive.shares.items(share)
    base = f"{created.path}/dicomweb/studies/{item.public_study_uid}/series/"
    ok = anonymous.get(f"{base}{item.public_series_uid}/instances/{item.public_sop_uid}"
                       "/frames/2/rendered")
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/jpeg"
    # the real (identifiable) UIDs, the other series and made-up UIDs do not exist here
    for bad in (f"{created.path}/dicomweb/studies/{study}/series/{item.series_uid}/instances/"
                f"{item.sop_uid}/rendered",
                f"{base}1.2.3/instances/{item.public_sop_uid}/rendered",
                f"{base}{item.public_series_uid}/instances/1.2.3.4/rendered"):
        assert anonymous.get(bad).status_code == 404, bad
    assert item.public_study_uid != study
    # the archive's own DICOMweb stays closed to the link
    assert anonymous.get(f"/dicomweb/studies/{study}/series").status_code == 401


def test_a_deidentified_share_never_serves_an_identifiable_byte(archive, anonymous, study):
    created = make_share(archive, study, allow_download=True)
    open_link(anonymous, created)
    share = archive.shares.by_token(created.path.removeprefix("/s/"))
    items = archive.shares.items(share)
    identifiers = [b"Hopper", b"HOPPER", b"Grace", b"H4242", study.encode(),
                   *[i.sop_uid.encode() for i in items], *[i.series_uid.encode() for i in items]]
    bodies = [anonymous.get(created.path + "/case", headers=HTML).content,
              anonymous.get(created.path + "/viewer", headers=HTML).content]
    download = anonymous.get(created.path + "/download?format=zip")
    assert download.status_code == 200
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive_zip:
        assert len(archive_zip.namelist()) == 3
        bodies += [archive_zip.read(n) for n in archive_zip.namelist()]
        bodies += [n.encode() for n in archive_zip.namelist()]
    bodies.append(download.headers["content-disposition"].encode())
    for body in bodies:
        for identifier in identifiers:
            assert identifier not in body


def test_a_view_only_share_refuses_downloads(archive, anonymous, study):
    created = make_share(archive, study, allow_download=False)
    open_link(anonymous, created)
    assert anonymous.get(created.path + "/download?format=zip").status_code == 403
    denied = list(archive.audit.events("access.denied"))
    assert denied[0]["detail"]["wanted"] == "share.download"


def test_an_expired_link_serves_nothing(archive, anonymous, study):
    created = make_share(archive, study)
    open_link(anonymous, created)
    with archive.engine.begin() as conn:
        conn.execute(update(shares).values(expires_at=datetime.now(UTC) - timedelta(minutes=1)))
    landing = anonymous.get(created.path, headers=HTML)
    assert landing.status_code == 410 and "expired" in landing.text
    assert "Hopper" not in landing.text
    case = anonymous.get(created.path + "/case", follow_redirects=False)
    assert case.status_code == 401


def test_ten_wrong_passcodes_lock_the_link(archive, anonymous, study):
    created = make_share(archive, study)
    for _ in range(10):
        assert open_link(anonymous, created, "NOTTHECODE").status_code in (401, 410)
    locked = open_link(anonymous, created)
    assert locked.status_code == 410 and "locked" in locked.text
    failures = [e for e in archive.audit.events("share.passcode") if e["outcome"] == "failure"]
    assert len(failures) == 10 and failures[0]["detail"]["locked"] is True


def test_passcodes_tried_at_the_same_moment_get_no_more_than_ten_tries(archive, study):
    """Twenty wrong passcodes at once (as from many addresses): no more than ten are
    checked, the link ends locked, and the right passcode then opens nothing."""
    import threading

    created = make_share(archive, study)
    share = archive.shares.by_token(created.path.removeprefix("/s/"))
    start = threading.Barrier(20)

    def guess(passcode: str) -> None:
        start.wait()
        assert not archive.shares.check_passcode(share, passcode, "192.0.2.1")

    guesses = [threading.Thread(target=guess, args=(f"WRONG{n:02d}",)) for n in range(20)]
    for thread in guesses:
        thread.start()
    for thread in guesses:
        thread.join(60)
    checked = [e for e in archive.audit.events("share.passcode")
               if e["outcome"] == "failure" and "failures" in e["detail"]]
    assert len(checked) == 10
    assert not archive.shares.check_passcode(share, created.passcode, "192.0.2.1")


def test_revoking_ends_the_link_for_good(archive, anonymous, study):
    created = make_share(archive, study)
    open_link(anonymous, created)
    share = archive.shares.by_token(created.path.removeprefix("/s/"))
    item = archive.shares.items(share)[0]
    url = (f"{created.path}/dicomweb/studies/{item.public_study_uid}/series/"
           f"{item.public_series_uid}/thumbnail")
    shown = anonymous.get(url)
    # No browser keeps a shared image to show it again after a revocation.
    assert shown.status_code == 200 and "no-store" in shown.headers["cache-control"]
    archive.shares.revoke(created.public_id, OWNER)
    assert anonymous.get(url).status_code == 401
    landing = anonymous.get(created.path, headers=HTML)
    assert landing.status_code == 410 and "revoked" in landing.text


def test_comments_and_feedback_reach_the_owner_and_everything_is_audited(
        archive, anonymous, study):
    created = make_share(archive, study, allow_download=True)
    open_link(anonymous, created)
    case = anonymous.get(created.path + "/case", headers=HTML)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', case.text).group(1)
    share = archive.shares.by_token(created.path.removeprefix("/s/"))
    clip = next(i for i in archive.shares.items(share))
    assert anonymous.post(created.path + "/comments", headers=HTML,
                          data={"body": "Good view", "sop": clip.public_sop_uid}
                          ).status_code == 403  # no CSRF token
    anonymous.post(created.path + "/comments", headers=HTML,
                   data={"body": "Good view", "sop": clip.public_sop_uid, "csrf_token": csrf})
    anonymous.post(created.path + "/feedback", headers=HTML, data={
        "csrf_token": csrf, "view_obtained": "yes", "image_quality": "4",
        "agreement": "agree", "findings": "No free fluid"})
    anonymous.get(created.path + "/download?format=mp4")
    assert [c["body"] for c in archive.shares.comments(share)] == ["Good view"]
    documents = [s for s in archive.catalogue.record(study).series if s.modality == "SR"]
    assert documents and documents[0].instances[0].sop_class_uid == (
        "1.2.840.10008.5.1.4.1.1.88.33")  # the comment, as DICOM, in the real study
    assert archive.shares.feedback(share)[0]["image_quality"] == 4
    assert archive.notifier.unread("sono") == 2
    archive.shares.revoke(created.public_id, OWNER)
    actions = {e["action"] for e in archive.audit.events(limit=500)
               if e["detail"].get("share") == created.public_id}
    assert {"share.create", "share.open", "share.view", "share.comment", "share.feedback",
            "share.download", "share.revoke"} <= actions


def test_identifiable_shares_need_a_named_signed_in_recipient(archive, anonymous, study):
    with pytest.raises(Exception, match="named user"):
        make_share(archive, study, deidentified=False)
    archive.users.add("drwho", "a-long-password", "reviewer")
    created = make_share(archive, study, deidentified=False, recipient_user="drwho")
    open_link(anonymous, created)
    assert anonymous.get(created.path + "/case", headers=HTML,
                         follow_redirects=False).status_code != 200
    anonymous.post("/login", data={"username": "drwho", "password": "a-long-password"},
                   headers=HTML)
    open_link(anonymous, created)
    case = anonymous.get(created.path + "/case", headers=HTML)
    assert case.status_code == 200


def test_a_reviewer_account_sees_identifiable_shares_in_one_place(archive, anonymous, study,
                                                                   tmp_path):
    archive.users.add("drno", "a-long-password", "reviewer", email="drno@elsewhere.example")
    other = archive.ingest.store_copy(us_cine(tmp_path / "other", frames=2, patient_id="H1",
                                              patient_name="Other^Person"), OWNER).study_uid
    identifiable = make_share(archive, study, deidentified=False, recipient_user="drno")
    make_share(archive, study, recipient_email="drno@elsewhere.example")
    anonymous.post("/login", data={"username": "drno", "password": "a-long-password"},
                   headers=HTML)
    listing = anonymous.get("/shared-with-me", headers=HTML)
    assert listing.text.count("<tr>") == 3  # header + two shares
    # an identifiable share still asks for its passcode before anything opens
    assert f"/studies/{study}" not in listing.text
    assert anonymous.get(f"/studies/{study}", headers=HTML).status_code == 403
    open_link(anonymous, identifiable)
    listing = anonymous.get("/shared-with-me", headers=HTML)
    assert f"/studies/{study}" in listing.text
    assert anonymous.get(f"/studies/{study}", headers=HTML).status_code == 200
    assert anonymous.get(f"/viewer/{study}", headers=HTML).status_code == 200
    assert anonymous.get(f"/studies/{other}", headers=HTML).status_code == 403
    home = anonymous.get("/", headers=HTML)
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', home.text).group(1)
    found = anonymous.post("/search", headers=HTML, data={"csrf_token": csrf, "q": "Other"})
    assert found.status_code == 200 and other not in found.text


def test_cases_group_studies_in_folders_and_are_shared_as_one(archive, anonymous, study,
                                                              tmp_path):
    second = archive.ingest.store_copy(us_cine(tmp_path / "b", frames=3, patient_id="H4242",
                                               patient_name="Hopper^Grace"), OWNER).study_uid
    anonymous.post("/login", data={"username": "sono", "password": "a-long-password"},
                   headers=HTML)
    page = anonymous.get(f"/studies/{study}", headers=HTML)
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)
    created = anonymous.post(f"/studies/{study}/case", headers=HTML, follow_redirects=False,
                             data={"csrf_token": csrf, "title": "FAST teaching",
                                   "folder": "Accreditation"})
    case_id = created.headers["location"].split("?")[0].rsplit("/", 1)[1]
    anonymous.post(f"/studies/{second}/case", headers=HTML,
                   data={"csrf_token": csrf, "case": case_id})
    listing = anonymous.get("/cases", headers=HTML)
    assert "Accreditation" in listing.text and "FAST teaching" in listing.text
    case = archive.cases.get(case_id, "sono")
    assert {i.study_uid for i in archive.cases.items(case)} == {study, second}
    shared = anonymous.post(f"/cases/{case_id}/share", headers=HTML,
                            data={"csrf_token": csrf, "download": "1"})
    passcode = re.search(r'class="share-passcode[^"]*">([^<]+)<', shared.text).group(1)
    link = re.search(r'class="share-link">[^<]*(/s/[^<]+)<', shared.text).group(1)
    recipient = anonymous.__class__(anonymous.app, base_url=str(anonymous.base_url))
    recipient.post(link, data={"passcode": passcode}, headers=HTML)
    download = recipient.get(link + "/download?format=zip")
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive_zip:
        studies = {n.split("/")[0] for n in archive_zip.namelist()}
    assert len(archive_zip.namelist()) == 4 and len(studies) == 2


def test_a_selection_of_clips_is_shared_over_the_api(archive, anonymous, study):
    clip = next(s for s in archive.catalogue.record(study).series if s.modality == "US")
    auth = ("sono", "a-long-password")
    made = anonymous.post(f"/api/studies/{study}/shares", auth=auth, json={
        "sop_uids": [clip.instances[0].sop_uid], "days": 7})
    assert made.status_code == 201
    body = made.json()
    assert "/s/" in body["url"] and len(body["passcode"]) == 10
    share = archive.shares.by_public_id(body["id"], "sono")
    assert len(archive.shares.items(share)) == 1
    listed = anonymous.get("/api/shares", auth=auth).json()
    assert listed[0]["id"] == body["id"] and listed[0]["state"] == "active"
    assert anonymous.delete(f"/api/shares/{body['id']}", auth=auth).status_code == 204
    assert anonymous.get(f"/api/shares/{body['id']}", auth=auth).json()["state"] == "revoked"
    too_long = anonymous.post(f"/api/studies/{study}/shares", auth=auth, json={"days": 400})
    assert too_long.status_code == 400 and "1 to 90 days" in too_long.json()["detail"]


def test_a_deidentified_share_made_over_the_api_has_its_copies_prepared_at_once(
        archive, anonymous, study):
    made = anonymous.post(f"/api/studies/{study}/shares", auth=("sono", "a-long-password"),
                          json={"days": 7})
    assert made.status_code == 201
    share = archive.shares.by_public_id(made.json()["id"], "sono")
    folder = archive.settings.data_dir / "share-cache" / share.public_id
    deadline = time.monotonic() + 120
    while True:
        items = archive.shares.items(share)
        prepared = {p.parent.name for p in folder.glob("*/*.dcm")} | {
            i.public_sop_uid for i in items if i.held_back}
        if prepared >= {i.public_sop_uid for i in items} or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # Every copy was made before the recipient asked for any (as for shares made on a page).
    assert prepared >= {i.public_sop_uid for i in items} and len(items) == 3


def test_a_recipient_is_invited_to_create_a_reviewer_account(archive, anonymous, study):
    archive.shares.public_url = "https://imageshare.example"
    created = make_share(archive, study, recipient_email="mentor@elsewhere.example")
    anonymous.post("/login", data={"username": "sono", "password": "a-long-password"},
                   headers=HTML)
    detail = anonymous.get(f"/shares/{created.public_id}", headers=HTML)
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', detail.text).group(1)
    invited = anonymous.post(f"/shares/{created.public_id}/invite", headers=HTML,
                             data={"csrf_token": csrf}, follow_redirects=False)
    assert invited.status_code == 303
    secret = archive.users.invite("mentor@elsewhere.example", "sono")  # as mailed
    guest = anonymous.__class__(anonymous.app, base_url=str(anonymous.base_url))
    assert guest.get(f"/invite/{secret}", headers=HTML).status_code == 200
    done = guest.post(f"/invite/{secret}", headers=HTML, follow_redirects=False,
                      data={"username": "mentor", "password": "mentor-password"})
    assert done.status_code == 303
    assert archive.users.account("mentor").role == "reviewer"
    assert guest.get(f"/invite/{secret}", headers=HTML).status_code == 410  # once only
    guest.post("/login", data={"username": "mentor", "password": "mentor-password"},
               headers=HTML)
    mine = guest.get("/shared-with-me", headers=HTML)
    assert "with the link and passcode you were sent" in mine.text
