"""Exports from the archive: background jobs with progress, formats, roles, audit."""

from __future__ import annotations

import io
import shutil
import time
import zipfile

import pytest
from pydicom import dcmread
from pydicom.fileset import FileSet

from imageshare.domain.actors import Actor
from tests.conftest import require
from tests.factory import ct_series, us_cine

SYSTEM = Actor("system", "tests", "admin", "tests")
PASSWORD = "a-long-password"


@pytest.fixture(autouse=True)
def _tesseract():
    require(shutil.which("tesseract") is not None, "Tesseract OCR (Debian package tesseract-ocr)")


@pytest.fixture
def study(archive, tmp_path):
    ct = [archive.ingest.store_copy(p, SYSTEM) for p in ct_series(
        tmp_path / "ct", 2, patient_id="H5150", patient_name="Lovelace^Ada")][0].study_uid
    archive.ingest.store_copy(us_cine(tmp_path / "us", frames=8, patient_id="H5150",
                                      patient_name="Lovelace^Ada", study_uid=ct), SYSTEM)
    return ct


def run_export(client, study, auth, **body):
    started = client.post(f"/api/studies/{study}/exports", json=body, auth=auth)
    assert started.status_code == 202, started.text
    job = started.json()
    for _ in range(600):
        job = client.get(f"/api/jobs/{job['id']}", auth=auth).json()
        if job["state"] in ("done", "failed"):
            break
        time.sleep(0.05)
    assert job["state"] == "done", job
    download = client.get(job["download"], auth=auth)
    assert download.status_code == 200
    assert "Lovelace" not in download.headers["content-disposition"]
    return job, zipfile.ZipFile(io.BytesIO(download.content))


def test_deidentified_zip_export_holds_no_patient_data(archive, anonymous, study):
    archive.users.add("clin", PASSWORD, "clinician")
    job, archive_zip = run_export(anonymous, study, ("clin", PASSWORD), format="zip",
                                  profile="teaching")
    assert job["total"] == 3 and job["percent"] == 100
    names = archive_zip.namelist()
    assert len(names) == 3 and all(n.startswith("S0001/") for n in names)
    for name in names:
        data = archive_zip.read(name)
        assert b"Lovelace" not in data and b"H5150" not in data
        assert dcmread(io.BytesIO(data)).PatientIdentityRemoved == "YES"
    events = [e for e in archive.audit.events("study.export") if e["outcome"] == "success"]
    assert any(e["detail"].get("deidentified") for e in events)


def test_identifiable_export_needs_the_right_and_is_audited(archive, anonymous, study):
    archive.users.add("edu", PASSWORD, "educator")
    refused = anonymous.post(f"/api/studies/{study}/exports", auth=("edu", PASSWORD),
                             json={"format": "zip", "deidentify": False})
    assert refused.status_code == 403
    denied = [e for e in archive.audit.events("access.denied") if e["actor"] == "user:edu"]
    assert denied and denied[0]["detail"]["wanted"] == "study.export"
    archive.users.add("clin", PASSWORD, "clinician")
    _job, archive_zip = run_export(anonymous, study, ("clin", PASSWORD), format="zip",
                                   deidentify=False)
    assert any(b"Lovelace" in archive_zip.read(n) for n in archive_zip.namelist())


def test_cine_exports_as_mp4_at_its_frame_rate(archive, anonymous, study):
    import av

    archive.users.add("clin", PASSWORD, "clinician")
    _job, archive_zip = run_export(anonymous, study, ("clin", PASSWORD), format="mp4")
    [name] = archive_zip.namelist()
    assert name.endswith(".mp4")
    with av.open(io.BytesIO(archive_zip.read(name))) as video:
        stream = video.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert float(stream.average_rate) == pytest.approx(30.03, abs=0.05)
        assert sum(1 for _ in video.decode(stream)) == 8


def test_dicomdir_media_and_stills(archive, anonymous, study, tmp_path):
    archive.users.add("clin", PASSWORD, "clinician")
    _job, media = run_export(anonymous, study, ("clin", PASSWORD), format="dicomdir")
    assert "DICOMDIR" in media.namelist()
    media.extractall(tmp_path / "media")
    fileset = FileSet(tmp_path / "media" / "DICOMDIR")
    assert len(fileset) == 3
    _job, stills = run_export(anonymous, study, ("clin", PASSWORD), format="png")
    assert len([n for n in stills.namelist() if n.endswith(".png")]) == 3


def test_an_encrypted_zip_needs_its_password(archive, anonymous, study):
    import pyzipper

    archive.users.add("clin", PASSWORD, "clinician")
    _job, encrypted = run_export(anonymous, study, ("clin", PASSWORD), format="zip",
                                 password="usb-stick-secret")
    name = encrypted.namelist()[0]
    with pytest.raises(RuntimeError):
        encrypted.read(name)
    raw = io.BytesIO()
    encrypted.fp.seek(0)
    raw.write(encrypted.fp.read())
    with pyzipper.AESZipFile(raw) as aes:
        aes.setpassword(b"usb-stick-secret")
        assert dcmread(io.BytesIO(aes.read(name))).PatientIdentityRemoved == "YES"


def test_jobs_belong_to_whoever_started_them(archive, anonymous, study):
    archive.users.add("clin", PASSWORD, "clinician")
    archive.users.add("other", PASSWORD, "clinician")
    job, _zip = run_export(anonymous, study, ("clin", PASSWORD), format="zip")
    assert anonymous.get(f"/api/jobs/{job['id']}", auth=("other", PASSWORD)).status_code == 404
    assert anonymous.get(f"/api/jobs/{job['id']}/file",
                         auth=("other", PASSWORD)).status_code == 404


def test_only_an_export_job_has_a_file_and_its_right_comes_from_what_it_exports(
        archive, anonymous, study):
    """The download asks the export itself whether it is identifiable (not the words of its
    description), and another kind of job with a result is no export to download."""
    archive.users.add("clin", PASSWORD, "clinician")
    job, _zip = run_export(anonymous, study, ("clin", PASSWORD), format="zip")
    clin = Actor("user", "clin", "clinician", "tests")
    assert archive.exports.is_identifiable(job["id"], clin) is False
    other = archive.jobs.submit("clin", "recover", "Export (de-identified zip) of 1 instance(s)",
                                {"since": "", "until": ""}, notify=False)
    from imageshare.domain.errors import NotFound

    with pytest.raises(NotFound):
        archive.exports.is_identifiable(other.id, clin)
    assert anonymous.get(f"/api/jobs/{other.id}/file",
                         auth=("clin", PASSWORD)).status_code == 404
