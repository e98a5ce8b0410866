"""Red team of share links (session 34): a share keeps working when part of it is deleted,
shows a shared video, never shares less than its sender named, keeps a signed-off case
final, refuses (and audits) another owner's share pages, and keeps its answers out of
caches."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import UID, generate_uid
from sqlalchemy import update

from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError
from imageshare.sharing.links import NewShare
from imageshare.storage.index.schema import instances
from tests.factory import us_cine
from tests.unit.test_sharing import (  # noqa: F401 - the sharing tests' fixtures
    HTML,
    OWNER,
    _tesseract,
    make_share,
    open_link,
    study,
)
from tests.upload_media import mp4

REVIEWER = Actor("share", "x", "share-recipient", "192.0.2.9")


def manifest_of(page: str) -> dict:
    found = re.search(r'<script id="manifest" type="application/json">(.*?)</script>', page)
    assert found is not None
    return json.loads(found.group(1))


def _store_video(archive, study_uid: str, tmp_path: Path) -> str:
    """An H.264 video (Video Photographic Image Storage) added to the study; its SOP UID."""
    ds = dcmread(us_cine(tmp_path / "v", frames=2, patient_id="H4242",
                         patient_name="Hopper^Grace", study_uid=study_uid))
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.102")  # MPEG-4 AVC/H.264
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(
        "1.2.840.10008.5.1.4.1.1.77.1.4.1")
    ds.Rows, ds.Columns, ds.NumberOfFrames = 240, 320, 4
    ds.PhotometricInterpretation = "YBR_PARTIAL_420"
    ds.PixelData = encapsulate([mp4(tmp_path / "clip.mp4", frames=4).read_bytes()],
                               has_bot=False)
    ds["PixelData"].VR = "OB"
    path = tmp_path / "video.dcm"
    ds.save_as(path, enforce_file_format=False)
    return archive.ingest.store_copy(path, OWNER).sop_instance_uid


def test_an_instance_deleted_since_it_was_shared_leaves_the_rest_of_the_share_working(
        archive, anonymous, study):
    """One image of a shared study rejected (misfiled) after the link was sent: the case,
    viewer and presentation still open with everything else, and the deleted image is not
    served (its cached de-identified copy included)."""
    created = make_share(archive, study)
    open_link(anonymous, created)
    share = archive.shares.by_token(created.path.removeprefix("/s/"))
    archive.shares.prepare(share)
    ct = next(s for s in archive.catalogue.record(study).series if s.modality == "CT")
    gone = next(i for i in archive.shares.items(share) if i.sop_uid == ct.instances[0].sop_uid)
    with archive.engine.begin() as conn:
        conn.execute(update(instances).where(instances.c.sop_uid == gone.sop_uid)
                     .values(retention_class="inbox"))
    assert archive.deletion.instances([gone.sop_uid], OWNER, "misfiled", ["inbox"]).instances
    for page in ("/case", "/viewer", "/present"):
        assert anonymous.get(created.path + page, headers=HTML).status_code == 200, page
    shown = manifest_of(anonymous.get(created.path + "/viewer", headers=HTML).text)
    sops = {f["sop"] for s in shown["series"] for f in s["frames"]}
    assert gone.public_sop_uid not in sops and len(sops) == 2
    url = (f"{created.path}/dicomweb/studies/{gone.public_study_uid}/series/"
           f"{gone.public_series_uid}/instances/{gone.public_sop_uid}/rendered")
    assert anonymous.get(url).status_code == 404


def test_a_shared_video_plays_in_the_link_viewer_and_shows_its_first_picture(
        archive, anonymous, study, tmp_path):
    """An identifiable share holding a video (a phone clip, a video endoscopy): the viewer
    gets it as one video (as the archive's own viewer does), its thumbnail is its first
    picture, and the player gets an MP4 that no cache keeps."""
    video_sop = _store_video(archive, study, tmp_path)
    archive.users.add("drwho", "a-long-password", "reviewer")
    created = make_share(archive, study, deidentified=False, recipient_user="drwho")
    anonymous.post("/login", data={"username": "drwho", "password": "a-long-password"},
                   headers=HTML)
    assert open_link(anonymous, created).status_code == 303
    viewer = anonymous.get(created.path + "/viewer", headers=HTML).text
    shown = manifest_of(viewer)
    [series] = [s for s in shown["series"] if any(f["sop"] == video_sop for f in s["frames"])]
    assert series["video"] is True and series["frames"] == [
        {"sop": video_sop, "frame": 1, "multi": False, "video": True}]
    # Its series is called a video, not "1 frame", in the viewer and on the case page.
    assert '<span class="muted">1 video</span>' in viewer
    assert "<p>1 video" in anonymous.get(created.path + "/case", headers=HTML).text
    base = f"{shown['base']}/studies/{series['study']}/series/{series['uid']}"
    thumbnail = anonymous.get(f"{base}/thumbnail", headers={"Accept": "image/*"})
    assert thumbnail.status_code == 200 and thumbnail.content.startswith(b"\xff\xd8")
    still = anonymous.get(f"{base}/instances/{video_sop}/rendered",
                          headers={"Accept": "image/jpeg"})
    assert still.status_code == 200 and still.headers["content-type"] == "image/jpeg"
    played = anonymous.get(f"{base}/instances/{video_sop}/rendered", headers={"Accept": "*/*"})
    assert played.status_code == 200 and played.headers["content-type"] == "video/mp4"
    assert played.content[4:8] == b"ftyp"
    assert "no-store" in played.headers["cache-control"]
    assert played.headers["x-content-type-options"] == "nosniff"
    assert anonymous.get(f"{base}/instances/{video_sop}/frames/2/rendered").status_code == 404


@pytest.mark.parametrize("asked", ["sop_uids", "series_uids"])
def test_a_share_naming_an_image_or_series_not_in_the_study_is_refused_whole(
        archive, anonymous, study, asked):
    """Two clips asked for, one of them not in the study (a typo, another study's clip): the
    sender is told, and no link that holds less than they believe is made."""
    ct = next(s for s in archive.catalogue.record(study).series if s.modality == "CT")
    real = ct.instances[0].sop_uid if asked == "sop_uids" else ct.series_uid
    auth = ("sono", "a-long-password")
    made = anonymous.post(f"/api/studies/{study}/shares", auth=auth,
                          json={asked: [real, "1.2.3.4.5"], "days": 7})
    assert made.status_code == 400
    assert "nothing was shared" in made.json()["detail"] and "1.2.3.4.5" not in made.text
    assert anonymous.get("/api/shares", auth=auth).json() == []
    assert anonymous.post(f"/api/studies/{study}/shares", auth=auth,
                          json={asked: [real], "days": 7}).status_code == 201


def test_feedback_from_a_page_opened_before_the_sign_off_is_refused(archive, study):
    """The mentor signs the case off in one tab while feedback is sent from another opened
    before: the logbook's signed-off record stays final."""
    created = make_share(archive, study)
    stale = archive.shares.by_token(created.path.removeprefix("/s/"))
    archive.shares.give_feedback(stale, REVIEWER, "yes", 4, "", "agree", "")
    archive.shares.sign_off(archive.shares.by_token(created.path.removeprefix("/s/")),
                            REVIEWER, "Competent")
    with pytest.raises(ImageShareError, match="signed off"):
        archive.shares.give_feedback(stale, REVIEWER, "no", 1, "late", "disagree", "late")
    assert len(archive.shares.feedback(stale)) == 1


def test_another_owners_share_pages_are_not_found_and_every_refusal_is_audited(
        archive, anonymous, study):
    created = make_share(archive, study)
    archive.users.add("nosy", "a-long-password", "clinician")
    anonymous.post("/login", data={"username": "nosy", "password": "a-long-password"},
                   headers=HTML)
    home = anonymous.get("/", headers=HTML)
    found = re.search(r'name="csrf-token" content="([^"]+)"', home.text)
    assert found is not None
    csrf = found.group(1)
    asked = [anonymous.get(f"/shares/{created.public_id}", headers=HTML),
             anonymous.get(f"/shares/{created.public_id}/revoke", headers=HTML),
             anonymous.post(f"/shares/{created.public_id}/revoke", headers=HTML,
                            data={"csrf_token": csrf, "confirm": "yes"}),
             anonymous.post(f"/shares/{created.public_id}/revoke", headers=HTML,
                            data={"csrf_token": csrf}, follow_redirects=False)]
    assert [r.status_code for r in asked] == [404, 404, 404, 404]
    denied = [e for e in archive.audit.events("access.denied", limit=50)
              if e["actor"] == "user:nosy"]
    assert len(denied) == 4 and {e["detail"]["wanted"] for e in denied} == {"share.create"}
    assert archive.shares.by_token(created.path.removeprefix("/s/")).state == "active"


def test_the_logbook_export_is_kept_by_no_cache(archive, anonymous, study):
    make_share(archive, study, title="FAST 1")
    anonymous.post("/login", data={"username": "sono", "password": "a-long-password"},
                   headers=HTML)
    for form in ("csv", "pdf"):
        exported = anonymous.get(f"/logbook.{form}")
        assert exported.status_code == 200
        assert exported.headers["cache-control"] == "no-store"
        assert exported.headers["x-content-type-options"] == "nosniff"


def test_marks_that_are_not_json_are_refused_with_the_reason_not_a_server_error(
        archive, anonymous, study):
    created = make_share(archive, study)
    open_link(anonymous, created)
    case = anonymous.get(created.path + "/case", headers=HTML)
    found = re.search(r'name="csrf_token" value="([^"]+)"', case.text)
    assert found is not None
    share = archive.shares.by_token(created.path.removeprefix("/s/"))
    sop = archive.shares.items(share)[0].public_sop_uid
    sent = {"X-CSRF-Token": found.group(1), "Content-Type": "application/json"}
    for body, field in ((b"{not json", "body"), (b"[]", "body"),
                        (b'{"sop_uid": 5}', "sop_uid"),
                        (json.dumps({"sop_uid": sop, "frame": 0}).encode(), "frame")):
        refused = anonymous.post(created.path + "/annotations", content=body, headers=sent)
        assert refused.status_code == 422 and field in refused.json()["detail"], body
    kept = anonymous.post(created.path + "/annotations", headers=sent, content=json.dumps(
        {"sop_uid": sop, "frame": 1, "marks": [
            {"kind": "arrow", "points": [[1, 2], [3, 4]], "label": "here"}]}).encode())
    assert kept.status_code == 200 and kept.json() == {"marks": 1}


PDF = (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[]"
       b"/Count 0>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n")


def test_the_report_shared_with_a_study_is_read_with_the_view_right_and_only_if_shared(
        archive, anonymous, study):
    """A referring clinician opens a view-only share of the whole study and reads its
    report (no download right needed: it was shared); a share of one series does not reach
    the report, not even by its UID."""
    report = archive.attachments.attach(study, "report.pdf", PDF, "Radiology report", OWNER)
    archive.users.add("drwho", "a-long-password", "reviewer")
    anonymous.post("/login", data={"username": "drwho", "password": "a-long-password"},
                   headers=HTML)
    whole = make_share(archive, study, deidentified=False, recipient_user="drwho")
    assert open_link(anonymous, whole).status_code == 303
    case = anonymous.get(whole.path + "/case", headers=HTML)
    link = f"{whole.path}/documents/{report.sop_instance_uid}"
    assert f'href="{link}"' in case.text and "Radiology report" in case.text
    read = anonymous.get(link)
    assert read.status_code == 200 and read.content == PDF
    assert read.headers["content-type"] == "application/pdf"
    assert read.headers["content-security-policy"] == "sandbox"
    assert read.headers["content-disposition"].startswith("attachment;")
    assert "no-store" in read.headers["cache-control"]
    assert any(e["detail"].get("format") == "document"
               for e in archive.audit.events("share.view", study_uid=study))
    us = next(s for s in archive.catalogue.record(study).series if s.modality == "US")
    narrow = make_share(archive, study, deidentified=False, recipient_user="drwho",
                        series_uids=(us.series_uid,))
    assert open_link(anonymous, narrow).status_code == 303
    assert "documents/" not in anonymous.get(narrow.path + "/case", headers=HTML).text
    assert anonymous.get(
        f"{narrow.path}/documents/{report.sop_instance_uid}").status_code == 404
    archive.shares.revoke(whole.public_id, OWNER)
    # the signed-in recipient is refused (403), as an anonymous browser would be asked (401)
    assert anonymous.get(link).status_code == 403


def test_the_trail_names_the_person_who_used_an_identifiable_link(archive, anonymous, study):
    """Only the named account, signed in, can use an identifiable share's link: each use
    (opened, viewed, an image shown) says which person it was, as ATNA wants of a use of
    identifiable data; a de-identified link's uses name nobody."""
    archive.users.add("drwho", "a-long-password", "reviewer")
    anonymous.post("/login", data={"username": "drwho", "password": "a-long-password"},
                   headers=HTML)
    created = make_share(archive, study, deidentified=False, recipient_user="drwho")
    open_link(anonymous, created)
    anonymous.get(created.path + "/case", headers=HTML)
    uses = [e for e in archive.audit.events(detail=("share", created.public_id))
            if e["action"] in ("share.open", "share.view")]
    assert {e["action"] for e in uses} == {"share.open", "share.view"}
    assert all(e["detail"].get("user") == "drwho" for e in uses)
    plain = make_share(archive, study)
    open_link(anonymous, plain)
    assert all("user" not in e["detail"]
               for e in archive.audit.events(detail=("share", plain.public_id)))


def test_the_invitation_says_the_minute_the_link_ends_not_only_the_day(
        archive, study, monkeypatch):
    """A one-day link made at 15:00 ends at 15:00 the next day: an e-mail saying only the
    date lets the recipient believe it works until that evening."""
    sent: list[str] = []
    monkeypatch.setattr(archive.shares.mailer, "send",
                        lambda to, subject, body: sent.append(body))
    archive.shares.public_url = "https://imageshare.example"
    created = archive.shares.create_and_send(
        NewShare(study, days=1, recipient_email="mentor@elsewhere.example"), OWNER, None)
    [body] = sent
    assert f"{created.expires_at:%d %B %Y, %H:%M} UTC" in body
    assert "Hopper" not in body and "H4242" not in body


def test_a_series_is_described_by_what_it_holds():
    from imageshare.web.pages.templating import series_size

    still = {"sop": "1", "frame": 1}
    clip = {"sop": "2", "frame": 1, "video": True}
    assert series_size([still] * 12) == "12 images"
    assert series_size([still]) == "1 image"
    assert series_size([clip]) == "1 video"
    assert series_size([clip, clip, still]) == "2 videos, 1 image"
    loop = [{"sop": "3", "frame": n, "multi": True} for n in range(1, 41)]
    assert series_size(loop) == "a 40-frame loop"
