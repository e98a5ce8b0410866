"""Uploads by invitation (issue 13): invitations protected like share links, tus uploads that
resume, everything made DICOM for review (and kept out of the record until accepted), the
QC queue with its e-mail to the uploader, and patients' own access."""

from __future__ import annotations

import base64
import fcntl
import os
import re
import subprocess
import threading
import time
import zipfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from sqlalchemy import func, select

from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError
from imageshare.storage.index.schema import background_jobs, instances
from imageshare.uploads.convert import sniff
from imageshare.uploads.invitations import UploadRequest
from imageshare.uploads.receiving import safe_parts
from imageshare.uploads.service import INTAKE_JOB
from imageshare.web.server import create_app
from tests.conftest import ADMIN_PASSWORD, make_archive, make_started_archive, require_tool
from tests.factory import ct_series
from tests.mail import smtp_server
from tests.multipart_helpers import parse_multipart
from tests.unit.test_web_pages import browser_sign_in, csrf_of
from tests.upload_media import cd_folder, mp4, pdf, photo, png

PASSWORD = "uploads-password"
HTML = {"Accept": "text/html"}
TUS = {"Tus-Resumable": "1.0.0"}
NHS = "9434765919"
STAFF = Actor("user", "clerk", "radiographer", "127.0.0.1")


@pytest.fixture
def hospital(tmp_path) -> Iterator[tuple]:
    """An archive with a real SMTP server and its public URL, a clerk and the patient's
    record (hospital number H100)."""
    with smtp_server() as (sink, port):
        archive = make_started_archive(tmp_path, smtp_host="127.0.0.1", smtp_port=port,
                                       public_url="https://images.hospital.example",
                                       upload_chunk_bytes=256 * 1024)
        archive.users.ensure_admin(ADMIN_PASSWORD)
        archive.users.add("clerk", PASSWORD, "radiographer")
        try:
            yield archive, sink
        finally:
            archive.close()


def _invite(archive, **extra) -> tuple:
    fields = {"patient_name": "Lovelace^Ada", "hospital_number": "H100",
              "birth_date": "19151210", "nhs_number": NHS, "email": "ada@home.example",
              "reference": "Knee clinic 3 March", **extra}
    created = archive.uploads.invitations.invite(UploadRequest(**fields), STAFF)
    return created


def _open(client: TestClient, created) -> str:
    answer = client.post(created.path, data={"passcode": created.passcode},
                         follow_redirects=False)
    assert answer.status_code == 303, answer.text
    page = client.get(created.path + "/upload", headers=HTML)
    assert page.status_code == 200
    return csrf_of(page.text)


def _refused(response) -> bool:
    """Not served: 401, or (a browser page) sent to the sign-in page."""
    return response.status_code == 401 or (
        response.status_code == 303 and response.headers["location"].startswith("/login"))


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _tus_upload(client: TestClient, base: str, csrf: str, path: Path, name: str,
                chunk: int = 200 * 1024, drop_after: int | None = None) -> str:
    """Upload ``path`` with tus; with ``drop_after`` the connection "drops" after that many
    chunks and the upload is resumed from the offset the server gives."""
    size = path.stat().st_size
    created = client.post(base + "/files", headers={
        **TUS, "X-CSRF-Token": csrf, "Upload-Length": str(size),
        "Upload-Metadata": f"filename {_b64(Path(name).name)},relativePath {_b64(name)}"})
    assert created.status_code == 201, created.text
    url = created.headers["location"]
    data = path.read_bytes()
    offset, sent = 0, 0
    while offset < size:
        if drop_after is not None and sent == drop_after:
            # the connection drops halfway through a chunk: half of it arrives
            partial = data[offset:offset + chunk // 2]
            client.patch(url, content=partial, headers={
                **TUS, "X-CSRF-Token": csrf, "Upload-Offset": str(offset),
                "Content-Type": "application/offset+octet-stream"})
            head = client.head(url, headers={**TUS, "X-CSRF-Token": csrf})
            assert head.status_code == 200
            offset = int(head.headers["upload-offset"])
            assert 0 < offset < size
            drop_after = None
            continue
        answer = client.patch(url, content=data[offset:offset + chunk], headers={
            **TUS, "X-CSRF-Token": csrf, "Upload-Offset": str(offset),
            "Content-Type": "application/offset+octet-stream"})
        assert answer.status_code == 204, answer.text
        offset = int(answer.headers["upload-offset"])
        sent += 1
    return url


def _send(client: TestClient, base: str, csrf: str) -> str:
    """Press "Send": the files are taken at once and checked in the background; the page it
    leads to refreshes itself until the checks end. Returns that page once they have."""
    sent = client.post(base + "/send", data={"csrf_token": csrf}, headers=HTML,
                       follow_redirects=False)
    assert sent.status_code == 303, sent.text
    progress = sent.headers["location"]
    assert progress.startswith(base + "/sent/")
    deadline = time.monotonic() + 90
    while True:
        shown = client.get(progress, headers=HTML)
        assert shown.status_code == 200 and "your images were sent" in shown.text
        if 'data-state="done"' in shown.text or 'data-state="failed"' in shown.text:
            return shown.text
        assert 'http-equiv="refresh"' in shown.text  # it keeps the sender informed
        assert time.monotonic() < deadline, "the uploaded files were never checked"
        time.sleep(0.1)


def _media(tmp_path: Path) -> dict[str, Path]:
    media = tmp_path / "media"
    media.mkdir()
    return {"cd": cd_folder(media / "CD", nhs=NHS), "photo": photo(media / "IMG_0001.jpg"),
            "png": png(media / "screen.png"), "video": mp4(media / "clip.mp4"),
            "pdf": pdf(media / "letter.pdf")}


def _send_everything(client: TestClient, created, media: dict[str, Path],
                     drop_video: bool = False) -> None:
    csrf = _open(client, created)
    base = created.path
    cd = media["cd"]
    for file in sorted(p for p in cd.rglob("*") if p.is_file()):
        _tus_upload(client, base, csrf, file, "CD/" + str(file.relative_to(cd)))
    for key in ("photo", "png", "pdf"):
        _tus_upload(client, base, csrf, media[key], media[key].name)
    _tus_upload(client, base, csrf, media["video"], "clip.mp4",
                drop_after=2 if drop_video else None)
    assert 'data-state="done"' in _send(client, base, csrf)


def test_an_invitation_opens_only_with_its_passcode_and_locks_after_ten_wrong_ones(hospital):
    archive, sink = hospital
    created = _invite(archive)
    archive.uploads.invitations.mailer.flush()
    [body] = sink.bodies("ada@home.example")
    assert created.path in body and created.passcode not in body
    assert "Lovelace" not in body and "H100" not in body and NHS not in body
    assert len(created.token) >= 43  # 256 bits
    with TestClient(create_app(archive)) as client:
        assert _refused(client.get(created.path + "/upload", headers=HTML,
                                   follow_redirects=False))
        for _ in range(10):
            answer = client.post(created.path, data={"passcode": "WRONG"})
            if answer.status_code == 429:
                break
            assert answer.status_code in (401, 410)
        archive.throttle.forget_old()
    invitation = archive.uploads.invitations.by_public_id(created.public_id)
    assert invitation.failed_attempts + (10 if invitation.locked else 0) >= 1
    failures = archive.audit.events("upload.passcode")
    assert failures and all(e["outcome"] == "failure" for e in failures)


def test_the_uploader_sees_only_their_own_upload_and_nothing_of_the_archive(hospital,
                                                                             tmp_path):
    archive, _sink = hospital
    mine, theirs = _invite(archive), _invite(archive, email="bob@home.example")
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, mine)
        url = _tus_upload(client, mine.path, csrf, photo(tmp_path / "a.jpg"), "a.jpg")
        upload_id = url.rsplit("/", 1)[1]
        assert client.head(theirs.path + f"/files/{upload_id}", headers=TUS
                           ).status_code == 401
        assert _refused(client.get(theirs.path + "/upload", headers=HTML,
                                   follow_redirects=False))
        for path in ("/dicomweb/studies", "/uploads", "/my", "/inbox"):
            assert _refused(client.get(path, headers=HTML, follow_redirects=False)), path


def test_a_second_browser_opening_the_invitation_ends_the_first_ones_session(hospital):
    archive, _sink = hospital
    created = _invite(archive)
    app = create_app(archive)
    with TestClient(app) as first, TestClient(app) as second:
        _open(first, created)
        _open(second, created)
        assert _refused(first.get(created.path + "/upload", headers=HTML,
                                  follow_redirects=False))
        assert second.get(created.path + "/upload", headers=HTML).status_code == 200


def test_tus_refuses_a_chunk_at_the_wrong_offset_and_an_upload_past_the_limit(hospital,
                                                                             tmp_path):
    archive, _sink = hospital
    created = _invite(archive, max_mb=1)
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        options = client.options(created.path + "/files", headers=TUS)
        assert options.headers["tus-version"] == "1.0.0"
        assert "creation" in options.headers["tus-extension"]
        made = client.post(created.path + "/files", headers={
            **TUS, "X-CSRF-Token": csrf, "Upload-Length": "1000",
            "Upload-Metadata": f"filename {_b64('x.jpg')}"})
        url = made.headers["location"]
        wrong = client.patch(url, content=b"x" * 10, headers={
            **TUS, "X-CSRF-Token": csrf, "Upload-Offset": "5",
            "Content-Type": "application/offset+octet-stream"})
        assert wrong.status_code == 409
        no_version = client.patch(url, content=b"x", headers={
            "X-CSRF-Token": csrf, "Upload-Offset": "0",
            "Content-Type": "application/offset+octet-stream"})
        assert no_version.status_code == 412
        too_big = client.post(created.path + "/files", headers={
            **TUS, "X-CSRF-Token": csrf, "Upload-Length": str(2 << 20),
            "Upload-Metadata": f"filename {_b64('big.mp4')}"})
        assert too_big.status_code == 413
        assert "limited to 1 MB" in too_big.json()["detail"]
        escaping = client.post(created.path + "/files", headers={
            **TUS, "X-CSRF-Token": csrf, "Upload-Length": "10",
            "Upload-Metadata": f"relativePath {_b64('../../etc/passwd')}"})
        assert escaping.status_code == 400
        assert client.delete(url, headers={**TUS, "X-CSRF-Token": csrf}).status_code == 204
        assert client.head(url, headers=TUS).status_code == 404


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../b", "C:/x", "a//b", ".."])
def test_paths_that_would_leave_the_upload_are_refused(path):
    from imageshare.domain.errors import ImageShareError

    with pytest.raises(ImageShareError):
        safe_parts(path)


def test_files_are_recognised_by_their_content_not_their_name(tmp_path):
    assert sniff(photo(tmp_path / "x.pdf").read_bytes()[:16]) == "jpeg"
    assert sniff(pdf(tmp_path / "y.jpg").read_bytes()[:16]) == "pdf"
    assert sniff(mp4(tmp_path / "z.png", frames=3).read_bytes()[:16]) == "video"
    assert sniff(b"MZ\x90\x00 not anything") == "unknown"


def test_a_cd_photos_video_and_pdf_become_valid_dicom_waiting_for_review(hospital, tmp_path):
    """The whole intake, with the video's connection dropped halfway and resumed."""
    dciodvfy = require_tool("dciodvfy")
    archive, _sink = hospital
    created = _invite(archive)
    media = _media(tmp_path)
    with TestClient(create_app(archive)) as client:
        _send_everything(client, created, media, drop_video=True)
    invitation = archive.uploads.invitations.by_public_id(created.public_id)
    assert invitation.status == "submitted"
    studies = archive.uploads.review.studies(invitation)
    assert len(studies) == 2  # the CD's study, and the study of the converted files
    files = [f for s in studies for f in s.files]
    kinds = sorted(str(f["kind"]) for f in files)
    assert kinds == ["dicom", "dicom", "dicom", "pdf", "photo", "photo", "video"]
    cd_study = next(s for s in studies if s.files[0]["kind"] == "dicom")
    assert all(f["identity"] == "match" for f in cd_study.files)  # NHS number matches
    # Nothing of it is in the record: QIDO-RS, search, retrieval see none of it.
    admin = archive.users.create_token("admin", "t", origin="cli")
    with TestClient(create_app(archive)) as api:
        listed = api.get("/dicomweb/studies", headers={"Authorization": f"Bearer {admin}"})
        assert listed.status_code == 200 and listed.json() == []
        # Nor is it another hospital's arrival: the exchange inbox neither lists nor decides
        # it (the QC page does, where the uploader is told).
        auth = {"Authorization": f"Bearer {admin}"}
        assert api.get("/api/exchange/inbox", headers=auth).json() == []
        assert archive.inbox.counts()[0] == 0
        taken = api.post(f"/api/exchange/inbox/{studies[0].item.pk}/accept", headers=auth,
                         json={"reconcile": True})
        assert taken.status_code == 400 and "on its page under Uploads" in taken.text
    assert all(s.item.status == "pending" for s in archive.uploads.review.studies(invitation))
    # Each converted file is valid DICOM of the right class, with the invited identity, and
    # its original is kept with its SHA-256.
    import hashlib

    for f in files:
        if f["kind"] == "dicom":
            continue
        [inst] = archive.retrieve.select(Actor("system", "t", "admin", "t"), "t",
                                         sop_uids=[str(f["sop_uid"])], include_review=True,
                                         audit=False)
        target = tmp_path / f"{f['kind']}-{f['pk']}.dcm"
        with archive.retrieve.open(inst) as src:
            target.write_bytes(src.read())
        checked = subprocess.run([dciodvfy, str(target)], capture_output=True, text=True)
        assert "Error" not in checked.stdout + checked.stderr, checked.stderr
        ds = dcmread(target)
        assert ds.PatientID == "H100" and str(ds.PatientName) == "Lovelace^Ada"
        assert ds.OtherPatientIDsSequence[0].PatientID == NHS
        assert "Uploaded by the invited person" in ds.ContributingEquipmentSequence[0]\
            .ContributionDescription
        original = media[{"photo": "photo", "video": "video", "pdf": "pdf"}[str(f["kind"])]] \
            if f["label"] != "screen.png" else media["png"]
        assert f["original_sha256"] == hashlib.sha256(original.read_bytes()).hexdigest()
        if f["kind"] == "video":
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.77.1.4.1"
            assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.102"
        if f["kind"] == "photo":
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.77.1.4"
            if f["label"] == "IMG_0001.jpg":  # EXIF orientation 6: turned upright
                assert (ds.Rows, ds.Columns) == (640, 480)
            if f["label"] == "screen.png":  # a screenshot stays exact: lossless
                import numpy as np
                from PIL import Image

                assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"  # RLE
                assert ds.LossyImageCompression == "00"
                with Image.open(media["png"]) as shot:
                    assert np.array_equal(ds.pixel_array, np.asarray(shot.convert("RGB")))
        if f["kind"] == "pdf":
            assert bytes(ds.EncapsulatedDocument)[:5] == b"%PDF-"


def test_review_rejects_with_a_mail_and_accepts_into_the_record_where_a_patient_sees_it(
        hospital, tmp_path):
    archive, sink = hospital
    created = _invite(archive)
    media = _media(tmp_path)
    with TestClient(create_app(archive)) as client:
        _send_everything(client, created, media)
    invitation = archive.uploads.invitations.by_public_id(created.public_id)
    studies = archive.uploads.review.studies(invitation)
    cd_study = next(s for s in studies if s.files[0]["kind"] == "dicom")
    own = next(s for s in studies if s is not cd_study)
    clerk = TestClient(create_app(archive))
    browser_sign_in(clerk, "clerk", PASSWORD)
    csrf = csrf_of(clerk.get("/uploads", headers=HTML).text)
    review = clerk.get(f"/uploads/{created.public_id}", headers=HTML)
    assert "NHS number matches the invitation" in review.text
    rejected = clerk.post(f"/uploads/{created.public_id}/studies/{cd_study.item.pk}/reject",
                          data={"csrf_token": csrf, "message": "Please send the 2024 CD"},
                          follow_redirects=False)
    assert rejected.status_code == 303
    accepted = clerk.post(f"/uploads/{created.public_id}/studies/{own.item.pk}/accept",
                          data={"csrf_token": csrf}, follow_redirects=False)
    assert accepted.status_code == 303
    archive.uploads.invitations.mailer.flush()
    assert any("Please send the 2024 CD" in b for b in sink.bodies("ada@home.example"))
    assert archive.uploads.invitations.by_public_id(created.public_id).status == "open"
    # The accepted study is in the record, under the hospital's patient; the rejected one
    # is gone.
    admin = archive.users.create_token("admin", "t", origin="cli")
    auth = {"Authorization": f"Bearer {admin}"}
    listed = clerk.get("/dicomweb/studies", headers=auth).json()
    assert [s["0020000D"]["Value"][0] for s in listed] == [own.item.study_uid]
    assert listed[0]["00100020"]["Value"] == ["H100"]
    # The video round-trips through WADO-RS as MPEG-4: the very pictures that were uploaded
    # (the same H.264 packets, not re-encoded; the phone's metadata left out).
    [video] = [f for f in own.files if f["kind"] == "video"]
    series = clerk.get(f"/dicomweb/studies/{own.item.study_uid}/instances", headers=auth,
                       params={"SOPInstanceUID": video["sop_uid"]}).json()
    series_uid = series[0]["0020000E"]["Value"][0]
    answer = clerk.get(f"/dicomweb/studies/{own.item.study_uid}/series/{series_uid}/instances/"
                       f"{video['sop_uid']}/bulkdata/7FE00010", headers={
                           **auth, "Accept": 'multipart/related; type="video/mp4"'})
    assert answer.status_code == 200, answer.text
    [(headers, body)] = parse_multipart(answer)
    assert headers["content-type"].startswith("video/mp4")
    assert body[4:8] == b"ftyp"
    assert _video_packets(body) == _video_packets(media["video"].read_bytes())
    # The patient, invited to an account, sees and downloads only that study.
    archive.uploads.patients.invite("ada@home.example", "H100", "", STAFF)
    archive.uploads.invitations.mailer.flush()
    secret = re.search(r"/invite/([\w-]+)", "".join(sink.bodies("ada@home.example"))).group(1)
    patient = TestClient(create_app(archive))
    made = patient.post(f"/invite/{secret}", data={"username": "ada", "password": PASSWORD},
                        follow_redirects=False)
    assert made.status_code in (200, 303), made.text
    browser_sign_in(patient, "ada", PASSWORD)
    mine = patient.get("/my", headers=HTML)
    assert own.item.study_uid in mine.text and cd_study.item.study_uid not in mine.text
    download = patient.get(f"/my/studies/{own.item.study_uid}/download")
    assert download.status_code == 200
    with zipfile.ZipFile(__import__("io").BytesIO(download.content)) as z:
        assert len(z.namelist()) == 4
    assert patient.get(f"/viewer/{own.item.study_uid}", headers=HTML).status_code == 200
    other = archive.ingest.store_copy(cd_folder(tmp_path / "other", patient_id="X9")
                                      .joinpath("PT000000/ST000000/SE000000/IM000000"),
                                      Actor("system", "t", "admin", "t")).study_uid
    assert patient.get(f"/viewer/{other}", headers=HTML).status_code in (403, 404)
    assert patient.get(f"/my/studies/{other}/download").status_code == 404
    csrf = csrf_of(mine.text)
    shared = patient.post(f"/my/studies/{own.item.study_uid}/share",
                          data={"csrf_token": csrf, "email": "dr.who@elsewhere.example",
                                "days": "7"}, headers=HTML)
    assert shared.status_code == 200 and "Passcode" in shared.text
    assert [e for e in archive.audit.events("share.create") if e["actor"] == "user:ada"]
    clerk.close()
    patient.close()


def test_a_zip_bomb_and_a_zip_that_climbs_out_are_refused(hospital, tmp_path):
    archive, _sink = hospital
    created = _invite(archive)
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("zeros.dcm", b"\0" * (50 << 20))
    climb = tmp_path / "climb.zip"
    with zipfile.ZipFile(climb, "w") as z:
        z.writestr("../../evil.jpg", photo(tmp_path / "e.jpg").read_bytes())
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        _tus_upload(client, created.path, csrf, bomb, "bomb.zip")
        _tus_upload(client, created.path, csrf, climb, "climb.zip")
        assert "zip bomb" in _send(client, created.path, csrf)
    invitation = archive.uploads.invitations.by_public_id(created.public_id)
    from imageshare.uploads.intake import results

    outcomes = {str(r["label"]): (r["outcome"], r["detail"])
                for r in results(archive.engine, invitation)}
    assert outcomes["bomb.zip"][0] == "refused" and "zip bomb" in str(outcomes["bomb.zip"][1])
    assert any("unsafe path" in str(d) for o, d in outcomes.values())
    assert not (tmp_path.parent / "evil.jpg").exists()


def test_a_video_that_is_not_h264_is_refused_saying_so(hospital, tmp_path):
    archive, _sink = hospital
    created = _invite(archive)
    clip = mp4(tmp_path / "clip.mp4", frames=5, codec="mpeg4")
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        _tus_upload(client, created.path, csrf, clip, "clip.mp4")
        assert "not H.264" in _send(client, created.path, csrf)
    from imageshare.uploads.intake import results

    [row] = results(archive.engine, archive.uploads.invitations.by_public_id(
        created.public_id))
    assert row["outcome"] == "refused" and "not H.264" in str(row["detail"])


def test_staff_import_a_cd_in_the_browser_for_the_patient_of_a_study(hospital, tmp_path):
    archive, _sink = hospital
    cd = cd_folder(tmp_path / "CD", patient_id="THEIRS-1", name="Lovelace^Ada")
    clerk = TestClient(create_app(archive))
    browser_sign_in(clerk, "clerk", PASSWORD)
    form = clerk.get("/uploads/import", headers=HTML)
    csrf = csrf_of(form.text)
    started = clerk.post("/uploads/import", data={
        "csrf_token": csrf, "patient_name": "Lovelace^Ada", "hospital_number": "H100",
        "birth_date": "1915-12-10", "reference": "CD from St Elsewhere"},
        follow_redirects=False)
    assert started.status_code == 303
    base = started.headers["location"].removesuffix("/upload")
    for file in sorted(p for p in cd.rglob("*") if p.is_file()):
        _tus_upload(clerk, base, csrf, file, "CD/" + str(file.relative_to(cd)))
    assert "Review the imported studies" in _send(clerk, base, csrf)
    public_id = base.rsplit("/", 1)[1]
    invitation = archive.uploads.invitations.by_public_id(public_id)
    [study] = archive.uploads.review.studies(invitation)
    assert {f["identity"] for f in study.files} == {"name"}
    archive.uploads.review.accept(invitation, study.item.pk, STAFF)
    record = archive.catalogue.record(study.item.study_uid, include_review=False)
    assert record.patient.patient_id == "H100"
    clerk.close()


def test_an_intake_cut_off_by_a_restart_runs_again_without_doubling_anything(
        hospital, tmp_path):
    """Sending queues the intake as a durable job. A first attempt that stored everything and
    then died (before the job was marked done) is run again by the next worker: the same
    instances are made again, so nothing is stored twice and every file has one result."""
    archive, _sink = hospital
    created = _invite(archive)
    media = _media(tmp_path)
    archive.jobs.close()  # no worker runs the job before the first attempt below
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        for key in ("photo", "png", "pdf", "video"):
            _tus_upload(client, created.path, csrf, media[key], media[key].name)
        sent = client.post(created.path + "/send", data={"csrf_token": csrf}, headers=HTML,
                           follow_redirects=False)
        assert sent.status_code == 303
        waiting = client.get(sent.headers["location"], headers=HTML)
        assert 'data-state="queued"' in waiting.text and "0 of 4" in waiting.text
    invitation = archive.uploads.invitations.by_public_id(created.public_id)
    with archive.engine.connect() as conn:
        params = conn.execute(select(background_jobs.c.params)).scalar_one()
    first = archive.uploads.intake.process(
        invitation, params["round"], archive.uploads.receiver.round_folder(
            invitation, params["round"]), STAFF, params["uploader"],
        datetime.fromisoformat(params["at"]))
    assert first.stored == 4
    archive.jobs._stop.clear()
    assert archive.jobs.run_pending() == 1  # the job itself, as after the restart
    [study] = archive.uploads.review.studies(invitation)
    assert sorted(str(f["kind"]) for f in study.files) == ["pdf", "photo", "photo", "video"]
    with archive.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(instances)).scalar() == 4
        job = conn.execute(select(background_jobs)).mappings().one()
    assert job["state"] == "done" and job["summary"] == "4 file(s) received"
    assert not archive.uploads.receiver.round_folder(invitation, params["round"]).exists()


def _instances(archive) -> list[tuple[str, str]]:
    """Every indexed instance: (SOP Instance UID, retention class)."""
    with archive.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(select(
            instances.c.sop_uid, instances.c.retention_class))]


def test_tus_creation_with_upload_takes_the_first_bytes_with_the_announcement(hospital,
                                                                             tmp_path):
    archive, _sink = hospital
    created = _invite(archive)
    data = photo(tmp_path / "IMG_0002.jpg").read_bytes()
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        options = client.options(created.path + "/files", headers=TUS)
        assert "creation-with-upload" in options.headers["tus-extension"].split(",")
        meta = f"filename {_b64('IMG_0002.jpg')}"
        octets = {"Content-Type": "application/offset+octet-stream"}
        whole = client.post(created.path + "/files", content=data, headers={
            **TUS, **octets, "X-CSRF-Token": csrf, "Upload-Length": str(len(data)),
            "Upload-Metadata": meta})
        assert whole.status_code == 201 and whole.headers["upload-offset"] == str(len(data))
        head = client.head(whole.headers["location"], headers=TUS)
        assert head.headers["upload-offset"] == str(len(data))
        half = len(data) // 2
        part = client.post(created.path + "/files", content=data[:half], headers={
            **TUS, **octets, "X-CSRF-Token": csrf, "Upload-Length": str(len(data)),
            "Upload-Metadata": f"filename {_b64('IMG_0003.jpg')}"})
        assert part.status_code == 201 and part.headers["upload-offset"] == str(half)
        rest = client.patch(part.headers["location"], content=data[half:], headers={
            **TUS, **octets, "X-CSRF-Token": csrf, "Upload-Offset": str(half)})
        assert rest.status_code == 204 and rest.headers["upload-offset"] == str(len(data))
        wrong_type = client.post(created.path + "/files", content=data, headers={
            **TUS, "Content-Type": "image/jpeg", "X-CSRF-Token": csrf,
            "Upload-Length": str(len(data)), "Upload-Metadata": meta})
        assert wrong_type.status_code == 415
        too_long = client.post(created.path + "/files", content=data, headers={
            **TUS, **octets, "X-CSRF-Token": csrf, "Upload-Length": "100",
            "Upload-Metadata": f"filename {_b64('IMG_0004.jpg')}"})
        assert too_long.status_code == 400 and "Upload-Length" in too_long.json()["detail"]
        files = archive.uploads.receiver.files(
            archive.uploads.invitations.by_public_id(created.public_id))
        assert [f.status for f in files] == ["received", "received", "receiving"]
        assert files[2].offset == 0  # nothing of the refused body was kept


def test_a_cd_is_stored_for_review_as_it_arrives_and_reaches_the_qc_queue_only_once_sent(
        hospital, tmp_path):
    """Each DICOM file is stored (in the upload class, out of the record) when its last byte
    arrives, so that Send has little left to do; the reviewer sees nothing before Send, and
    then one result per file, nothing stored twice. A DICOM file the CD's DICOMDIR does not
    list is reported too (it was sent, so the reviewer sees it)."""
    archive, _sink = hospital
    created = _invite(archive)
    cd = cd_folder(tmp_path / "CD", nhs=NHS)
    extra = ct_series(tmp_path / "loose", 1, patient_id="OTHER-77",
                      patient_name="Lovelace^Ada", PatientBirthDate="19151210")[0]
    invitation = archive.uploads.invitations.by_public_id(created.public_id)
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        for file in sorted(p for p in cd.rglob("*") if p.is_file()):
            _tus_upload(client, created.path, csrf, file, "CD/" + str(file.relative_to(cd)))
        _tus_upload(client, created.path, csrf, extra, "CD/LOOSE.dcm")
        stored = _instances(archive)
        assert len(stored) == 4 and {c for _uid, c in stored} == {"upload"}
        assert archive.uploads.review.studies(invitation) == []  # not sent: not shown
        admin = archive.users.create_token("admin", "t", origin="cli")
        listed = client.get("/dicomweb/studies", headers={"Authorization": f"Bearer {admin}"})
        assert listed.status_code == 200 and listed.json() == []
        assert 'data-state="done"' in _send(client, created.path, csrf)
    assert len(_instances(archive)) == 4  # nothing made twice
    cd_study, loose = archive.uploads.review.studies(invitation)  # the loose file's own study
    files = cd_study.files + loose.files
    assert sorted(str(f["outcome"]) for f in files) == ["stored"] * 4
    assert len({f["sop_uid"] for f in files}) == 4
    assert [str(f["label"]) for f in loose.files] == ["CD/LOOSE.dcm"]
    assert all(f["identity"] == "match" for f in cd_study.files)


def test_send_reports_what_was_stored_on_arrival_without_reading_the_files_again(
        hospital, tmp_path):
    """What each DICOM file showed when it was stored on arrival (study, the patient's match
    with the invitation, modality, body part) is recorded then, so that Send only reports
    it: a received file changed afterwards does not change the report (the instance stored
    is what counts)."""
    archive, _sink = hospital
    created = _invite(archive)
    cd = cd_folder(tmp_path / "CD", nhs=NHS)
    invitation = archive.uploads.invitations.by_public_id(created.public_id)
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        for file in sorted(p for p in cd.rglob("*") if p.is_file()):
            _tus_upload(client, created.path, csrf, file, "CD/" + str(file.relative_to(cd)))
        studies = {str(dcmread(p, stop_before_pixels=True).StudyInstanceUID)
                   for p in cd.rglob("*") if p.is_file() and p.name != "DICOMDIR"}
        received = archive.uploads.receiver.round_folder(invitation, 1)
        for file in received.rglob("*"):
            if file.is_file() and file.name != "DICOMDIR":
                spoiled = file.with_name(file.name + ".new")
                spoiled.write_bytes(b"\0" * 200)
                os.replace(spoiled, file)  # a new file at the path; the stored blob stays
        assert 'data-state="done"' in _send(client, created.path, csrf)
    (study,) = archive.uploads.review.studies(invitation)
    assert len(study.files) == 3
    assert {str(f["outcome"]) for f in study.files} == {"stored"}
    assert {str(f["identity"]) for f in study.files} == {"match"}
    assert {str(f["modality"]) for f in study.files} == {"CT"}
    assert {str(f["study_uid"]) for f in study.files} == studies


def test_two_files_sent_under_one_name_are_each_reported_once_as_themselves(hospital,
                                                                          tmp_path):
    """Two different DICOM files announced at the same path (the second kept under another
    name): the report has one line for each, with its own instance."""
    archive, _sink = hospital
    created = _invite(archive)
    first, second = (_cd_slices(tmp_path, name, 1)[0] for name in ("a", "b"))
    invitation = archive.uploads.invitations.by_public_id(created.public_id)
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        for path in (first, second):
            _tus_upload(client, created.path, csrf, path, "IM0001.dcm")
        kept = sorted(p.name for p in
                      archive.uploads.receiver.round_folder(invitation, 1).iterdir())
        assert 'data-state="done"' in _send(client, created.path, csrf)
    lines = {str(f["label"]): str(f["sop_uid"])
             for study in archive.uploads.review.studies(invitation) for f in study.files}
    assert len(lines) == 2 and sorted(lines) == kept
    assert lines["IM0001.dcm"] == str(dcmread(first, stop_before_pixels=True).SOPInstanceUID)
    assert set(lines.values()) == {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                                   for p in (first, second)}


def test_a_chunk_for_a_file_id_that_is_no_file_is_not_found(hospital):
    """Ids that are no file's (dots, too long for a file name, unknown) answer 404, not an
    error of the server."""
    archive, _sink = hospital
    created = _invite(archive)
    with TestClient(create_app(archive), raise_server_exceptions=False) as client:
        csrf = _open(client, created)
        for upload_id in ("%2E", "%2E%2E", "x" * 300, "0" * 32):
            answer = client.patch(created.path + "/files/" + upload_id, content=b"0123",
                                  headers={**TUS, "X-CSRF-Token": csrf, "Upload-Offset": "0",
                                           "Content-Type": "application/offset+octet-stream"})
            assert answer.status_code == 404, (upload_id, answer.status_code)


def test_one_writer_per_file_across_the_processes_of_a_server(hospital, tmp_path):
    """A file being written by one process of the server (several serve HTTP on one port)
    refuses a second writer in any other with 423, changing nothing; once the first is done
    the upload goes on from where it is."""
    archive, _sink = hospital
    created = _invite(archive)
    data = photo(tmp_path / "IMG_0007.jpg").read_bytes()
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        started = client.post(created.path + "/files", headers={
            **TUS, "X-CSRF-Token": csrf, "Upload-Length": str(len(data)),
            "Upload-Metadata": f"filename {_b64('IMG_0007.jpg')}"})
        assert started.status_code == 201
        url = started.headers["location"]
        invitation = archive.uploads.invitations.by_public_id(created.public_id)
        part = archive.uploads.receiver.part_path(invitation, url.rsplit("/", 1)[1])
        patch = {**TUS, "X-CSRF-Token": csrf, "Upload-Offset": "0",
                 "Content-Type": "application/offset+octet-stream"}
        other = os.open(part, os.O_WRONLY)  # another process writing this file now
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            busy = client.patch(url, content=data, headers=patch)
            assert busy.status_code == 423 and "try again" in busy.json()["detail"]
            assert part.stat().st_size == 0
        finally:
            os.close(other)
        done = client.patch(url, content=data, headers=patch)
        assert done.status_code == 204 and done.headers["upload-offset"] == str(len(data))
        (file,) = archive.uploads.receiver.files(invitation)
        assert file.status == "received"


def test_a_file_withdrawn_before_send_and_an_upload_that_ended_unsent_leave_nothing_behind(
        hospital, tmp_path):
    archive, _sink = hospital
    cd = cd_folder(tmp_path / "CD", nhs=NHS)
    files = sorted(p for p in cd.rglob("*") if p.is_file() and p.name != "DICOMDIR")
    withdrawn, revoked, expired = _invite(archive), _invite(archive), _invite(archive)
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, withdrawn)
        urls = [_tus_upload(client, withdrawn.path, csrf, f, f.name) for f in files[:2]]
        assert len(_instances(archive)) == 2
        gone = client.delete(urls[0], headers={**TUS, "X-CSRF-Token": csrf})
        assert gone.status_code == 204
        assert len(_instances(archive)) == 1  # the withdrawn file's instance went with it
        [audited] = archive.audit.events("upload.withdraw")
        assert audited["detail"] == {"upload": withdrawn.public_id,
                                     "file": urls[0].rsplit("/", 1)[1]}
        assert audited["patient_id"] == "H100"
    for created in (revoked, expired):
        with TestClient(create_app(archive)) as client:
            csrf = _open(client, created)
            _tus_upload(client, created.path, csrf, files[2], files[2].name)
    # the same instance in two invitations: stored once, kept while one still holds it
    assert len(_instances(archive)) == 2
    staff = TestClient(create_app(archive))
    browser_sign_in(staff, "clerk", PASSWORD)
    token = csrf_of(staff.get("/uploads", headers=HTML).text)
    ended = staff.post(f"/uploads/{revoked.public_id}/revoke", data={"csrf_token": token},
                       headers=HTML, follow_redirects=False)
    assert ended.status_code == 303 and ended.headers["location"] == "/uploads"
    assert archive.uploads.invitations.by_public_id(revoked.public_id).state == "revoked"
    assert len(_instances(archive)) == 2  # the expiring invitation still holds it
    from sqlalchemy import update

    from imageshare.storage.index.schema import upload_invitations

    with archive.engine.begin() as conn:
        conn.execute(update(upload_invitations).where(
            upload_invitations.c.public_id == expired.public_id).values(
            expires_at=datetime(2020, 1, 1)))
    assert archive.uploads.forget_abandoned() == 1
    # the expired invitation's file was the same instance as the revoked one's: nothing of
    # either upload refers to it now; it goes once it is two days old (an intake running
    # now may still be about to report an instance it made)
    assert len(_instances(archive)) == 2
    with archive.engine.begin() as conn:
        conn.execute(update(instances).values(received_at=datetime(2020, 1, 1)))
    assert archive.uploads.forget_abandoned() == 0
    assert len(_instances(archive)) == 1  # only the first invitation's file, still unsent
    ended_invitation = archive.uploads.invitations.by_public_id(expired.public_id)
    assert archive.uploads.receiver.files(ended_invitation) == []
    assert not archive.uploads.receiver.folder(ended_invitation).joinpath("round-1").exists()
    staff.close()


def test_an_intake_waits_for_the_instance_that_keeps_the_files_and_is_not_run_twice(
        hospital, tmp_path):
    """With several instances the received files are in the data folder of the one that
    took them: another instance that leases the intake job hands it back (not counted as
    an attempt); once its results are written, a repeat keeps them instead of emptying
    them."""
    from imageshare.storage.index.schema import upload_results

    archive, _sink = hospital
    created = _invite(archive)
    media = _media(tmp_path)
    archive.jobs.close()  # the jobs are run below, by hand
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        for key in ("photo", "pdf"):
            _tus_upload(client, created.path, csrf, media[key], media[key].name)
        sent = client.post(created.path + "/send", data={"csrf_token": csrf}, headers=HTML,
                           follow_redirects=False)
        assert sent.status_code == 303
    invitation = archive.uploads.invitations.by_public_id(created.public_id)
    folder = archive.uploads.receiver.round_folder(invitation, 1)
    away = folder.rename(tmp_path / "on-the-other-instance")  # as seen from another one
    archive.jobs._stop.clear()
    assert archive.jobs.run_pending() == 1
    with archive.engine.connect() as conn:
        job = conn.execute(select(background_jobs)).mappings().one()
    assert job["state"] == "queued" and job["attempts"] == 0
    assert "another ImageShare instance" in job["error"]
    away.rename(folder)  # the instance that keeps the files takes it
    with archive.engine.begin() as conn:
        conn.execute(background_jobs.update().values(run_after=datetime(2020, 1, 1)))
    assert archive.jobs.run_pending() == 1
    with archive.engine.connect() as conn:
        job = conn.execute(select(background_jobs)).mappings().one()
        results = conn.execute(select(func.count()).select_from(upload_results)).scalar()
    assert job["state"] == "done" and job["summary"] == "2 file(s) received"
    assert results == 2 and not folder.exists()
    # run again (as after a crash between the intake's end and the job's): results stand
    archive.uploads._run_intake(_job_of(job), job["params"])
    with archive.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(upload_results)).scalar() == 2


def _job_of(row):
    """The job of a ``background_jobs`` row, as a worker holds it."""
    from imageshare.jobs.queue import Job

    return Job(row["public_id"], row["started_by"], row["kind"], row["description"],
               total=row["total"])


def test_kept_originals_are_sealed_like_the_images_when_encryption_is_on(tmp_path):
    """A patient's photo is kept as they sent it, beside the images: with encryption at rest
    on, its bytes on disk are sealed too, and the reviewer still gets the original back."""
    with smtp_server() as (_sink, port):
        archive = make_archive(tmp_path, encrypt_blobs=True, smtp_host="127.0.0.1",
                               smtp_port=port, public_url="https://images.hospital.example")
        _sealed_original(archive, tmp_path)


def _send_one(archive, path: Path) -> tuple:
    """An invitation that sent the one file at ``path``, once checked: the invitation, its
    one study and that study's one file."""
    created = _invite(archive)
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        _tus_upload(client, created.path, csrf, path, path.name)
        assert 'data-state="done"' in _send(client, created.path, csrf)
    invitation = archive.uploads.invitations.by_public_id(created.public_id)
    [study] = archive.uploads.review.studies(invitation)
    [file] = study.files
    return invitation, study, file


def _sealed_original(archive, tmp_path: Path) -> None:
    try:
        picture = photo(tmp_path / "IMG_0005.jpg")
        invitation, _study, kept = _send_one(archive, picture)
        row, store = archive.uploads.review.original(invitation, int(kept["pk"]))
        with store.open(str(row["original_key"])) as original:
            assert original.read() == picture.read_bytes()
        folder = archive.settings.data_dir / "upload-originals"
        [on_disk] = [p for p in folder.rglob("*") if p.is_file()]
        assert b"\xff\xd8\xff" not in on_disk.read_bytes()[:64]  # not the JPEG as it was
        assert on_disk.read_bytes() != picture.read_bytes()
    finally:
        archive.close()


def test_a_video_plays_in_the_viewer_as_mp4_whether_stored_as_a_file_or_a_bare_stream(
        hospital, tmp_path):
    """WADO-RS rendered gives a video instance as video/mp4 (PS3.18), which the viewer puts
    in the browser's player: the uploaded MP4 as it was, and a bare H.264 stream (as
    modalities store it) put into an MP4 file without re-encoding."""
    import io

    import av
    from pydicom.encaps import encapsulate

    from imageshare.archive.viewing import viewer_manifest

    archive, _sink = hospital
    clip = mp4(tmp_path / "clip.mp4", frames=12)
    invitation, study, video = _send_one(archive, clip)
    record = archive.catalogue.record(study.item.study_uid, include_review=True)
    [series] = viewer_manifest(record, archive.retrieve.header)["series"]
    assert series["video"] and series["frames"][0]["video"]
    admin = archive.users.create_token("admin", "t", origin="cli")
    auth = {"Authorization": f"Bearer {admin}"}
    url = (f"/dicomweb/studies/{study.item.study_uid}/series/{series['uid']}/instances/"
           f"{video['sop_uid']}/rendered")
    # a bare H.264 stream of the same clip, stored as another instance of the series
    [inst] = archive.retrieve.select(Actor("system", "t", "admin", "t"), "t",
                                     sop_uids=[str(video["sop_uid"])], include_review=True,
                                     audit=False)
    with archive.retrieve.open(inst) as src:
        ds = dcmread(src)
    bare = io.BytesIO()
    with av.open(str(clip)) as source, av.open(bare, "w", format="h264") as target:
        copy = target.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                packet.stream = copy
                target.mux(packet)
    assert bare.getvalue()[:4] == b"\0\0\0\1"  # Annex B, no MP4 box
    from pydicom.uid import generate_uid

    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PixelData = encapsulate([bare.getvalue()], has_bot=False)
    stored = tmp_path / "bare.dcm"
    ds.save_as(stored)
    archive.uploads.review.accept(invitation, study.item.pk, STAFF)  # now in the record
    with open(stored, "rb") as fh:  # a modality's clip of the same study, in the record
        archive.ingest.store_stream(fh, STAFF)
    with TestClient(create_app(archive)) as api:
        played = api.get(url, headers={**auth, "Accept": "*/*"})
        assert played.status_code == 200, played.text
        assert played.headers["content-type"] == "video/mp4"
        assert played.content[4:8] == b"ftyp"  # the uploaded clip, as an MP4 file
        assert played.headers["accept-ranges"] == "bytes"
        whole = played.content
        part = api.get(url, headers={**auth, "Accept": "*/*", "Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == whole[100:200]
        assert part.headers["content-range"] == f"bytes 100-199/{len(whole)}"
        tail = api.get(url, headers={**auth, "Accept": "*/*", "Range": "bytes=-50"})
        assert tail.status_code == 206 and tail.content == whole[-50:]
        beyond = api.get(url, headers={**auth, "Accept": "*/*",
                                       "Range": f"bytes={len(whole)}-"})
        assert beyond.status_code == 416
        assert beyond.headers["content-range"] == f"bytes */{len(whole)}"
        with av.open(io.BytesIO(played.content)) as container:
            assert sum(1 for _ in container.decode(video=0)) == 12
        remuxed = api.get(url.replace(str(video["sop_uid"]), str(ds.SOPInstanceUID)),
                          headers={**auth, "Accept": "video/mp4"})
        assert remuxed.status_code == 200 and remuxed.content[4:8] == b"ftyp"
        with av.open(io.BytesIO(remuxed.content)) as container:
            frames = sum(1 for _ in container.decode(video=0))
        assert frames == 12  # every frame, not re-encoded
        still = api.get(url, headers={**auth, "Accept": "image/png"})  # its first picture
        assert still.status_code == 200 and still.content[:8] == b"\x89PNG\r\n\x1a\n"
        thumbnail = api.get(f"/dicomweb/studies/{study.item.study_uid}/series/"
                            f"{series['uid']}/thumbnail", headers={**auth, "Accept": "image/jpeg"})
        assert thumbnail.status_code == 200 and thumbnail.content[:3] == b"\xff\xd8\xff"


def _cd_slices(tmp_path: Path, name: str, count: int, **extra) -> list[Path]:
    return ct_series(tmp_path / name, count, size=16, patient_id="OTHER-77",
                     patient_name="Lovelace^Ada", PatientBirthDate="19151210", **extra)


def _file_of(archive, created, name: str):
    invitation = archive.uploads.invitations.by_public_id(created.public_id)
    return next(f for f in archive.uploads.receiver.files(invitation) if f.path == name)


def test_what_is_withdrawn_goes_also_when_held_for_another_patients_details_but_not_under_a_hold(
        hospital, tmp_path):
    """A file whose patient is on record with other details is held (not merged); withdrawn,
    its held instance goes with it. Under a legal hold nothing is deleted, and the file is
    kept too (the refusal is the answer)."""
    archive, _sink = hospital
    [known] = ct_series(tmp_path / "known", 1, size=16, patient_id="OTHER-77",
                        patient_name="Someone^Else", PatientBirthDate="19800101")
    with open(known, "rb") as fh:
        archive.ingest.store_stream(fh, STAFF)  # the record's own patient OTHER-77
    created = _invite(archive)
    first, second = _cd_slices(tmp_path, "cd", 2)
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        url = _tus_upload(client, created.path, csrf, first, "a.dcm")
        assert _file_of(archive, created, "a.dcm").outcome == "held"
        assert len(_instances(archive)) == 2
        assert client.delete(url, headers={**TUS, "X-CSRF-Token": csrf}).status_code == 204
        assert len(_instances(archive)) == 1  # the held copy went with its file
        url = _tus_upload(client, created.path, csrf, second, "b.dcm")
        sop = _file_of(archive, created, "b.dcm").sop_uid
        admin = Actor("user", "admin", "admin", "t")
        study_uid = dcmread(second).StudyInstanceUID
        archive.retention.place_hold(admin, "litigation", study_uid=study_uid)
        refused = client.delete(url, headers={**TUS, "X-CSRF-Token": csrf})
        assert refused.status_code == 409 and "legal hold" in refused.json()["detail"]
        assert _file_of(archive, created, "b.dcm").status == "received"  # kept, to be sent
        assert sop in {uid for uid, _class in _instances(archive)}


def test_a_review_decides_only_what_was_sent_and_a_study_whose_intake_failed_is_shown(
        hospital, tmp_path):
    """Round 1 sends a slice of a study and a photo; the photo is rejected (the invitation
    reopens); another slice of the same study is uploaded but not sent. Accepting the study
    takes in the sent slice only; the unsent one can still be withdrawn and leaves nothing.
    The rejected study stays listed as decided. Then the intake of round 2 (another study)
    never runs: its study is still shown for review, from the files sent, and accepted."""
    archive, _sink = hospital
    created = _invite(archive)
    study_uid = "1.2.826.0.1.3680043.8.498.777"
    first, second = _cd_slices(tmp_path, "cd", 2, study_uid=study_uid)
    [third] = _cd_slices(tmp_path, "later", 1)  # another study, sent in round 2
    picture = photo(tmp_path / "IMG_7.jpg")
    invitation = archive.uploads.invitations.by_public_id(created.public_id)
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        _tus_upload(client, created.path, csrf, first, "one.dcm")
        _tus_upload(client, created.path, csrf, picture, picture.name)
        assert 'data-state="done"' in _send(client, created.path, csrf)
        ct, photos = archive.uploads.review.studies(invitation)
        archive.uploads.review.reject(invitation, photos.item.pk, STAFF, "Not this photo.")
        unsent = _tus_upload(client, created.path, csrf, second, "two.dcm")
        pending = [s for s in archive.uploads.review.studies(invitation)
                   if s.item.status == "pending"]
        assert [s.item.study_uid for s in pending] == [study_uid]
        archive.uploads.review.accept(invitation, ct.item.pk, STAFF)
        classes = dict(_instances(archive))
        assert classes[dcmread(first).SOPInstanceUID] == "clinical"
        assert classes[dcmread(second).SOPInstanceUID] == "upload"  # not sent: not decided
        assert client.delete(unsent, headers={**TUS, "X-CSRF-Token": csrf}).status_code == 204
        assert dcmread(second).SOPInstanceUID not in dict(_instances(archive))
        decided = {s.item.status for s in archive.uploads.review.studies(invitation)}
        assert decided == {"accepted", "rejected"}  # the rejected study is still listed
        archive.jobs.close()  # the next intake never runs
        _tus_upload(client, created.path, csrf, third, "three.dcm")
        sent = client.post(created.path + "/send", data={"csrf_token": csrf}, headers=HTML,
                           follow_redirects=False)
        assert sent.status_code == 303
    later = [s for s in archive.uploads.review.studies(invitation) if s.item.status == "pending"]
    assert [s.item.study_uid for s in later] == [dcmread(third).StudyInstanceUID]
    archive.uploads.review.accept(invitation, later[0].item.pk, STAFF)
    assert dict(_instances(archive))[dcmread(third).SOPInstanceUID] == "clinical"


def test_a_file_withdrawn_while_its_last_bytes_are_stored_is_not_brought_back(hospital,
                                                                           tmp_path):
    archive, _sink = hospital
    created = _invite(archive)
    [slice_] = _cd_slices(tmp_path, "cd", 1)
    invitation = archive.uploads.invitations.by_public_id(created.public_id)
    receiver, intake = archive.uploads.receiver, archive.uploads.intake
    made = receiver.create(invitation, slice_.stat().st_size, "late.dcm")
    found = receiver.begin_append(invitation, made.upload_id, 0, made)
    receiver.part_path(invitation, made.upload_id).write_bytes(slice_.read_bytes())
    store = intake.on_arrival

    def withdrawn_meanwhile(path: Path, *args):  # the DELETE comes while it is stored
        stored = store(path, *args)
        receiver.terminate(invitation, receiver.unsent(invitation, made.upload_id))
        return stored

    intake.on_arrival = withdrawn_meanwhile
    from imageshare.domain.errors import NotFound

    with pytest.raises(NotFound, match="withdrawn"):
        archive.uploads.received(invitation, found, slice_.stat().st_size, STAFF)
    assert receiver.files(invitation) == []  # not brought back as received
    assert _instances(archive) == []  # and what it was stored as is gone
    assert not any(receiver.round_folder(invitation, 1).rglob("*.dcm"))


def test_a_phone_video_keeps_its_pictures_but_not_where_it_was_filmed(hospital, tmp_path):
    """A phone's video carries the place it was filmed (GPS) and other details in its
    container's metadata: the DICOM video keeps the streams as they are, not that."""
    import av


    archive, _sink = hospital
    clip = mp4(tmp_path / "IMG_0042.MOV.mp4", frames=10, width=64, height=48, metadata={
        "com.apple.quicktime.location.ISO6709": "+51.5074-000.1278+011/",
        "title": "Ada at home"})
    assert b"+51.5074" in clip.read_bytes() and b"Ada at home" in clip.read_bytes()
    inst = _the_one_uploaded(archive, clip)
    with archive.retrieve.open(inst) as src:
        stored = src.read()
    assert b"+51.5074" not in stored and b"Ada at home" not in stored
    with archive.retrieve.open(inst) as src:
        ds = dcmread(src)
    import io

    from pydicom.encaps import generate_fragments

    video = b"".join(generate_fragments(ds.PixelData))
    with av.open(io.BytesIO(video)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 10


def test_a_16_bit_png_is_scaled_to_8_bits_and_marked_lossy_not_clipped(hospital, tmp_path):
    import numpy as np
    from PIL import Image


    archive, _sink = hospital
    scan = tmp_path / "scan.png"
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(scan)
    with archive.retrieve.open(_the_one_uploaded(archive, scan)) as src:
        ds = dcmread(src)
    assert ds.LossyImageCompression == "01"  # not claimed exact
    grey = ds.pixel_array[..., 0].astype(int)
    assert grey.max() >= 250 and len(np.unique(grey)) > 200  # the whole range, not clipped


def test_a_file_announced_again_from_its_start_does_not_count_twice_against_the_limit(
        hospital, tmp_path):
    """A phone loses its connection while announcing a large video and sends it again from
    its start: the unfinished first announcement is dropped, not counted against the size
    limit."""
    archive, _sink = hospital
    created = _invite(archive, max_mb=1)
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        headers = {**TUS, "X-CSRF-Token": csrf, "Upload-Length": str(700 * 1024),
                   "Upload-Metadata": f"filename {_b64('clip.mp4')}"}
        first = client.post(created.path + "/files", headers=headers)
        assert first.status_code == 201
        again = client.post(created.path + "/files", headers=headers)  # the same file, anew
        assert again.status_code == 201  # 1.4 MB would pass the 1 MB limit
        other = client.post(created.path + "/files", headers={
            **headers, "Upload-Metadata": f"filename {_b64('other.mp4')}"})
        assert other.status_code == 413  # a different file still counts
        assert client.head(first.headers["location"], headers=TUS).status_code == 404


def _video_packets(mp4_bytes: bytes) -> list[bytes]:
    """The coded pictures of an MP4 file's video stream, in order."""
    import io

    import av

    with av.open(io.BytesIO(mp4_bytes)) as container:
        return [bytes(p) for p in container.demux(video=0) if p.size]


def _the_one_uploaded(archive, path: Path):
    """Invite, upload ``path`` alone, send it; the instance it became (waiting for review)."""
    from imageshare.storage.index.schema import upload_results

    created = _invite(archive)
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        _tus_upload(client, created.path, csrf, path, path.name)
        assert 'data-state="done"' in _send(client, created.path, csrf)
    with archive.engine.connect() as conn:
        sop = conn.execute(select(upload_results.c.sop_uid)).scalar_one()
    [inst] = archive.retrieve.select(Actor("system", "t", "admin", "t"), "t", sop_uids=[sop],
                                     include_review=True, audit=False)
    return inst


def test_files_announced_at_once_by_several_processes_cannot_pass_the_size_limit_together(
        hospital):
    """Several HTTP processes take one uploader's files at the same moment: each
    announcement sees the others', so together they stay within the limit."""
    from concurrent.futures import ThreadPoolExecutor

    from imageshare.domain.errors import UploadQuotaExceeded

    archive, _sink = hospital
    created = _invite(archive, max_mb=1)
    invitation = archive.uploads.invitations.by_public_id(created.public_id)
    start = threading.Barrier(8)

    def announce(number: int) -> bool:
        start.wait()
        try:
            archive.uploads.receiver.create(invitation, 300 * 1024, f"file-{number}.dcm")
        except UploadQuotaExceeded:
            return False
        return True

    for _ in range(3):
        with ThreadPoolExecutor(8) as pool:
            taken = list(pool.map(announce, range(8)))
        assert sum(taken) <= 3  # 3 x 300 KB fit in 1 MB, 4 do not
        assert archive.uploads.receiver.used_bytes(invitation) <= 1 << 20


def test_an_upload_waiting_for_review_never_becomes_the_record_of_its_patient_id(
        hospital, tmp_path):
    """Files an uploader sent for a hospital number the archive does not know yet are kept
    apart until a person accepted them: the hospital's own images of that number, with the
    real patient's details, are stored, not refused as "on record with another name"; once
    accepted, the upload is filed under the invited patient."""
    archive, _sink = hospital
    created = _invite(archive, hospital_number="H300", patient_name="Person^Real",
                      birth_date="19700101", nhs_number="")
    planted = ct_series(tmp_path / "planted", 1, patient_id="H300",
                        patient_name="Fake^Planted", PatientBirthDate="19990909")[0]
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        _tus_upload(client, created.path, csrf, planted, "scan.dcm")
        assert _instances(archive)[0][1] == "upload"  # stored for review as it arrived
        own = ct_series(tmp_path / "own", 2, patient_id="H300", patient_name="Person^Real",
                        PatientBirthDate="19700101")
        for path in own:
            assert archive.ingest.store_copy(path, STAFF).outcome == "stored"
        assert 'data-state="done"' in _send(client, created.path, csrf)
    record = archive.catalogue.record(dcmread(own[0]).StudyInstanceUID).patient
    assert (record.patient_id, record.issuer, record.name) == ("H300", "", "Person^Real")
    invitation = archive.uploads.invitations.by_public_id(created.public_id)
    (uploaded,) = archive.uploads.review.studies(invitation)
    archive.uploads.review.accept(invitation, uploaded.item.pk, STAFF, file_anyway=True)
    filed = archive.catalogue.record(uploaded.item.study_uid).patient
    assert (filed.patient_id, filed.issuer, filed.name) == ("H300", "", "Person^Real")


def test_a_file_another_upload_sent_too_is_decided_only_by_that_uploads_review(hospital,
                                                                               tmp_path):
    """Two invitations for one patient send the same CD slice (the second finds it stored:
    a duplicate), and the second one a slice of its own. Rejecting the second's study deletes
    only its own slice: the first's waits for the first's review, whose page still shows it."""
    archive, _sink = hospital
    shared, own = _cd_slices(tmp_path, "cd", 2)
    first, second = _invite(archive), _invite(archive, email="ada.daughter@home.example")
    with TestClient(create_app(archive)) as client:
        for created, files in ((first, [shared]), (second, [shared, own])):
            csrf = _open(client, created)
            for path in files:
                _tus_upload(client, created.path, csrf, path, path.name)
            assert 'data-state="done"' in _send(client, created.path, csrf)
    review = archive.uploads.review
    invitation_b = archive.uploads.invitations.by_public_id(second.public_id)
    [study_b] = review.studies(invitation_b)
    assert review.sent_of(invitation_b, study_b.item.study_uid) == {dcmread(own).SOPInstanceUID}
    review.reject(invitation_b, study_b.item.pk, STAFF, "Please send the knee, not the hip.")
    left = dict(_instances(archive))
    assert left == {dcmread(shared).SOPInstanceUID: "upload"}
    invitation_a = archive.uploads.invitations.by_public_id(first.public_id)
    [study_a] = review.studies(invitation_a)
    assert study_a.item.status == "pending"
    review.accept(invitation_a, study_a.item.pk, STAFF, file_anyway=True)
    assert dict(_instances(archive)) == {dcmread(shared).SOPInstanceUID: "clinical"}


def test_files_of_a_study_already_in_the_record_are_not_moved_to_the_invited_patient(
        hospital, tmp_path):
    """An uploaded slice belongs to a study the record holds for another patient (a CD of
    the wrong patient from this hospital): filing it under the invited patient would move
    the record's own instances of that study too, so it is refused even when confirmed."""
    archive, _sink = hospital
    study_uid = "1.2.826.0.1.3680043.8.498.4242"
    ours, uploaded = ct_series(tmp_path / "ours", 2, size=16, patient_id="R555",
                               patient_name="Babbage^Charles", study_uid=study_uid,
                               PatientBirthDate="17911226")
    with open(ours, "rb") as fh:
        archive.ingest.store_stream(fh, STAFF)
    invitation, study, _file = _send_one(archive, uploaded)
    with pytest.raises(ImageShareError, match="already in the record under another patient"):
        archive.uploads.review.accept(invitation, study.item.pk, STAFF, file_anyway=True)
    record = archive.catalogue.record(study_uid, include_review=False)
    assert record.patient.patient_id == "R555"
    assert dict(_instances(archive)) == {dcmread(ours).SOPInstanceUID: "clinical",
                                         dcmread(uploaded).SOPInstanceUID: "upload"}


def test_send_pressed_twice_at_once_queues_one_check_of_the_files(hospital, tmp_path,
                                                                  monkeypatch):
    """Two Sends at the same moment (a double press, two tabs, two processes) both saw the
    round's files waiting: the first takes them and queues their check; the second is told
    they were sent already and queues nothing."""
    archive, _sink = hospital
    created = _invite(archive)
    [slice_] = _cd_slices(tmp_path, "cd", 1)
    archive.jobs.close()  # the check stays queued: the jobs are counted below
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        _tus_upload(client, created.path, csrf, slice_, "a.dcm")
    invitation = archive.uploads.invitations.by_public_id(created.public_id)
    receiver = archive.uploads.receiver
    round_, files = receiver.current_round(invitation), receiver.files(invitation)
    archive.uploads.submit(invitation, STAFF, "clerk")
    monkeypatch.setattr(receiver, "current_round", lambda _invitation: round_)  # as both read
    monkeypatch.setattr(receiver, "files", lambda _invitation, _round=None: files)
    with pytest.raises(ImageShareError, match="sent already"):
        archive.uploads.submit(invitation, STAFF, "clerk")
    with archive.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(background_jobs).where(
            background_jobs.c.kind == INTAKE_JOB)).scalar() == 1


def test_withdrawing_the_second_of_two_files_of_one_name_removes_its_own_bytes(hospital,
                                                                              tmp_path):
    """Two files announced at one path (the second kept under a name with its id): the
    second withdrawn, the first is still sent and the second is not."""
    archive, _sink = hospital
    created = _invite(archive)
    first, second = (_cd_slices(tmp_path, name, 1)[0] for name in ("a", "b"))
    invitation = archive.uploads.invitations.by_public_id(created.public_id)
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        _tus_upload(client, created.path, csrf, first, "IM0001.dcm")
        again = _tus_upload(client, created.path, csrf, second, "IM0001.dcm")
        assert client.delete(again, headers={**TUS, "X-CSRF-Token": csrf}).status_code == 204
        [left] = list(archive.uploads.receiver.round_folder(invitation, 1).iterdir())
        assert left.name == "IM0001.dcm" and left.read_bytes() == first.read_bytes()
        assert 'data-state="done"' in _send(client, created.path, csrf)
    sent = {str(f["sop_uid"]) for study in archive.uploads.review.studies(invitation)
            for f in study.files}
    assert sent == {str(dcmread(first, stop_before_pixels=True).SOPInstanceUID)}


def test_a_file_whose_bytes_all_arrived_but_never_completed_is_completed_when_asked(
        hospital, tmp_path):
    """The process writing a file's last bytes ended before completing it: asked how far
    the file got (HEAD), the server completes it, so that the client (told it has all) sends
    nothing more and the file is still sent and stored."""
    archive, _sink = hospital
    created = _invite(archive)
    [slice_] = _cd_slices(tmp_path, "cd", 1)
    data = slice_.read_bytes()
    invitation = archive.uploads.invitations.by_public_id(created.public_id)
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        announced = client.post(created.path + "/files", headers={
            **TUS, "X-CSRF-Token": csrf, "Upload-Length": str(len(data)),
            "Upload-Metadata": f"filename {_b64('a.dcm')},relativePath {_b64('a.dcm')}"})
        url = announced.headers["location"]
        upload_id = url.rsplit("/", 1)[1]
        archive.uploads.receiver.part_path(invitation, upload_id).write_bytes(data)
        head = client.head(url, headers={**TUS, "X-CSRF-Token": csrf})
        assert head.headers["upload-offset"] == str(len(data))
        assert _file_of(archive, created, "a.dcm").status == "received"
        assert 'data-state="done"' in _send(client, created.path, csrf)
    [study] = archive.uploads.review.studies(invitation)
    assert [str(f["sop_uid"]) for f in study.files] == [dcmread(slice_).SOPInstanceUID]


def test_a_file_and_a_folder_of_one_name_are_refused_saying_so(hospital, tmp_path):
    archive, _sink = hospital
    created = _invite(archive)
    [slice_] = _cd_slices(tmp_path, "cd", 1)
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        _tus_upload(client, created.path, csrf, slice_, "scan")
        refused = client.post(created.path + "/files", headers={
            **TUS, "X-CSRF-Token": csrf, "Upload-Length": "10",
            "Upload-Metadata": f"filename {_b64('a.dcm')},relativePath {_b64('scan/a.dcm')}"})
        assert refused.status_code == 400, refused.text
        assert "a file and a folder of this upload have the same name" in refused.text
