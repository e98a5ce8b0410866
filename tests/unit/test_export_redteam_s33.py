"""Exports under attack (session 33): DICOM media as PS3.10/PS3.11 want it, no patient data
staged outside the data folder, exports that go stale when their images are corrected or
deleted, scopes kept whole by the job, room checked before writing, every export and download
audited with its patient and study, share downloads that survive a deleted instance."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import tempfile
import time
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.fileset import FileSet
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from imageshare.access.scope import Grant, Scope
from imageshare.archive.corrections import PatientDetails
from imageshare.domain.actors import Actor
from imageshare.export.service import ExportRequest
from imageshare.export.writers import DicomdirWriter
from imageshare.sharing.links import NewShare
from imageshare.storage.index.schema import background_jobs
from imageshare.storage.index.schema import instances as instances_table
from tests.conftest import require
from tests.factory import ct_series, us_cine

SYSTEM = Actor("system", "tests", "admin", "tests")
CLIN = Actor("user", "clin", "clinician", "tests")
PASSWORD = "a-long-password"
# PS3.10 8.2 / PS3.12: a File ID component is 1 to 8 of upper-case letters, digits and "_".
FILE_ID = re.compile(r"\A[A-Z0-9_]{1,8}(/[A-Z0-9_]{1,8}){0,7}\Z")


@pytest.fixture(autouse=True)
def _tesseract():
    require(shutil.which("tesseract") is not None, "Tesseract OCR (Debian package tesseract-ocr)")


def _implicit(paths: list[Path]) -> list[Path]:
    """The files rewritten in Implicit VR Little Endian (what most modalities send)."""
    for path in paths:
        ds = dcmread(path)
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
    return paths


@pytest.fixture
def study(archive, tmp_path):
    stored = [archive.ingest.store_copy(p, SYSTEM) for p in _implicit(ct_series(
        tmp_path / "ct", 2, patient_id="H5150", patient_name="Lovelace^Ada"))]
    uid = stored[0].study_uid
    archive.ingest.store_copy(us_cine(tmp_path / "us", frames=4, patient_id="H5150",
                                      patient_name="Lovelace^Ada", study_uid=uid), SYSTEM)
    archive.users.add("clin", PASSWORD, "clinician")
    return uid


def _wait(client, job, auth=("clin", PASSWORD)):
    for _ in range(600):
        job = client.get(f"/api/jobs/{job['id']}", auth=auth).json()
        if job["state"] in ("done", "failed") or "out of resources" in (job["error"] or ""):
            return job
        time.sleep(0.05)
    raise AssertionError(job)


def _export(client, study, **body):
    started = client.post(f"/api/studies/{study}/exports", json=body,
                          auth=("clin", PASSWORD))
    assert started.status_code == 202, started.text
    job = _wait(client, started.json())
    assert job["state"] == "done", job
    return job


def _download(client, job):
    return client.get(f"/api/jobs/{job['id']}/file", auth=("clin", PASSWORD))


@pytest.mark.parametrize("deidentify", [False, True])
def test_dicomdir_media_holds_only_transfer_syntaxes_of_the_general_purpose_profiles(
        archive, anonymous, study, tmp_path, deidentify):
    """Instances stored as Implicit VR Little Endian go onto the media as Explicit VR Little
    Endian (STD-GEN-CD/DVD-RAM takes nothing else uncompressed): DCMTK's dcmmkdir, checking
    the files against the profile, takes every one of them."""
    job = _export(anonymous, study, format="dicomdir", deidentify=deidentify)
    download = _download(anonymous, job)
    assert download.status_code == 200, download.text
    media = tmp_path / "media"
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive_zip:
        names = archive_zip.namelist()
        archive_zip.extractall(media)
    assert "DICOMDIR" in names and all(FILE_ID.match(n) for n in names), names
    files = [n for n in names if n != "DICOMDIR"]
    assert len(files) == 3
    for name in files:
        assert dcmread(media / name).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    if shutil.which("dcmmkdir"):
        check = tmp_path / "check"
        shutil.copytree(media, check, ignore=shutil.ignore_patterns("DICOMDIR"))
        made = subprocess.run(["dcmmkdir", "-Pgp", "+r", "+D", "DICOMDIR",
                               *sorted({n.split("/")[0] for n in files})],
                              cwd=check, capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        assert "cannot be added" not in made.stderr, made.stderr


def test_dicomdir_media_stages_no_patient_data_in_the_system_temporary_folder(
        tmp_path, monkeypatch):
    """The file-set's working copies stay inside the export's own (private) folder, never in
    the system's temporary folder, which may be shared, memory-backed or another disk."""
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    writer = DicomdirWriter(tmp_path / "out" / "media")
    for path in ct_series(tmp_path / "ct", 2, patient_id="H5150", patient_name="Lovelace^Ada"):
        writer.add(dcmread(path))
    staged = [Path(root, f) for root, _dirs, found in os.walk(system_tmp) for f in found]
    assert staged == []
    writer.close()
    assert sorted(p.name for p in (tmp_path / "out" / "media").iterdir()) == [
        "DICOMDIR", "PT000000"]


def test_an_export_whose_images_were_corrected_is_not_handed_out(archive, anonymous, study,
                                                                 tmp_path):
    """Images filed under the wrong patient and corrected after the export was made: the old
    file (with the wrong name in every header) is refused, audited as a failed download; a
    new export carries the corrected name. Images added to the study meanwhile do not make an
    export stale."""
    job = _export(anonymous, study, format="zip", deidentify=False)
    later = ct_series(tmp_path / "later", 1, patient_id="H5150", patient_name="Lovelace^Ada",
                      study_uid=study)
    archive.ingest.store_copy(later[0], SYSTEM)
    assert _download(anonymous, job).status_code == 200
    archive.corrections.correct_study(study, PatientDetails("Byron^Ada", "H5150"),
                                      "filed under a wrong name", SYSTEM)
    refused = _download(anonymous, job)
    assert refused.status_code == 400
    assert "changed" in refused.json()["detail"] and "Ada" not in refused.text
    failed = [e for e in archive.audit.events("study.export.download")
              if e["outcome"] == "failure"]
    assert failed and failed[0]["study_uid"] == study
    again = _download(anonymous, _export(anonymous, study, format="zip", deidentify=False))
    with zipfile.ZipFile(io.BytesIO(again.content)) as archive_zip:
        assert all(b"Byron" in archive_zip.read(n) for n in archive_zip.namelist())


def test_an_export_whose_instances_are_gone_is_not_handed_out(archive, anonymous, study):
    """An instance taken out of the index after the export was made (deleted): the export
    holding it is no longer handed out."""
    job = _export(anonymous, study, format="zip")
    with archive.engine.begin() as conn:
        first = conn.execute(instances_table.select().limit(1)).first()
        conn.execute(instances_table.delete().where(instances_table.c.pk == first.pk))
    assert _download(anonymous, job).status_code == 400


def test_the_export_and_its_download_are_audited_with_patient_and_study(archive, anonymous,
                                                                        study):
    job = _export(anonymous, study, format="zip")
    assert _download(anonymous, job).status_code == 200
    [made] = [e for e in archive.audit.events("study.export")
              if e["outcome"] == "success" and e["detail"].get("format") == "zip"]
    assert made["patient_id"] == "H5150" and made["study_uid"] == study
    [taken] = list(archive.audit.events("study.export.download"))
    assert taken["outcome"] == "success"
    assert taken["patient_id"] == "H5150" and taken["study_uid"] == study
    assert taken["instance_count"] == 3


def test_an_export_that_does_not_fit_on_the_disk_is_refused_before_anything_is_written(
        archive, anonymous, study, monkeypatch):
    real = shutil.disk_usage
    exports = archive.settings.data_dir / "exports"

    def little_room(path):
        usage = real(path)
        if Path(path).resolve().is_relative_to(exports.resolve()):
            return usage._replace(free=1 << 20)
        return usage

    monkeypatch.setattr(shutil, "disk_usage", little_room)
    started = anonymous.post(f"/api/studies/{study}/exports", json={"format": "dicomdir"},
                             auth=("clin", PASSWORD))
    job = _wait(anonymous, started.json())
    assert "out of resources" in job["error"], job
    assert not [p for p in exports.rglob("*") if p.is_file()]
    failed = [e for e in archive.audit.events("study.export") if e["outcome"] == "failure"]
    assert failed and failed[0]["study_uid"] == study
    assert "out of resources" in failed[0]["detail"]["reason"]


def test_an_export_keeps_a_scope_of_single_series_whole(archive, study):
    """A caller whose scope is one series of the study exports that series only: the job
    applies the same scope when it runs, not the scope's studies alone."""
    series = next(s.series_uid for s in archive.catalogue.record(study).series
                  if s.modality == "US")
    scope = Scope([Grant(study, series, rights=frozenset({"view", "download"}))])
    job = archive.exports.start(ExportRequest(study, format="zip", deidentify=False), CLIN,
                                scope)
    assert job.total == 1
    for _ in range(600):
        job = archive.jobs.get(job.id, "clin")
        if job.state in ("done", "failed"):
            break
        time.sleep(0.05)
    assert job.state == "done", job
    _job, path, _temporary = archive.exports.result(job.id, CLIN)
    with zipfile.ZipFile(path) as archive_zip:
        assert len(archive_zip.namelist()) == 1


def test_a_deleted_instance_leaves_the_rest_of_a_share_downloadable(archive, anonymous, study):
    owner = Actor("user", "clin", "clinician", "127.0.0.1")
    created = archive.shares.create(NewShare(study, allow_download=True), owner, None)
    opened = anonymous.post(created.path, data={"passcode": created.passcode},
                            headers={"Accept": "text/html"}, follow_redirects=False)
    assert opened.status_code == 303
    share = archive.shares.by_token(created.path.removeprefix("/s/"))
    gone = archive.shares.items(share)[0].sop_uid
    with archive.engine.begin() as conn:
        conn.execute(instances_table.delete().where(instances_table.c.sop_uid == gone))
    download = anonymous.get(created.path + "/download?format=zip")
    assert download.status_code == 200, download.text
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive_zip:
        assert len(archive_zip.namelist()) == 2



def test_an_identifiable_zip_hands_out_the_archives_own_bytes(archive, anonymous, study):
    """Each file of an identifiable ZIP export is the stored instance byte for byte (streamed,
    never rebuilt in memory): its SHA-256 is the one the archive recorded at ingest."""
    job = _export(anonymous, study, format="zip", deidentify=False)
    with archive.engine.connect() as conn:
        recorded = {r.sha256 for r in conn.execute(instances_table.select())}
    with zipfile.ZipFile(io.BytesIO(_download(anonymous, job).content)) as archive_zip:
        exported = {hashlib.sha256(archive_zip.read(n)).hexdigest()
                    for n in archive_zip.namelist()}
    assert len(exported) == 3 and exported == recorded


def test_a_short_export_password_is_refused_when_asked_not_when_the_job_runs(anonymous,
                                                                              study):
    refused = anonymous.post(f"/api/studies/{study}/exports", auth=("clin", PASSWORD),
                             json={"format": "zip", "password": "short"})
    assert refused.status_code == 400 and "8 characters" in refused.json()["detail"]


def test_encrypted_dicomdir_media_opens_with_its_password(anonymous, study, tmp_path):
    import pyzipper

    job = _export(anonymous, study, format="dicomdir", password="usb-stick-secret")
    with pyzipper.AESZipFile(io.BytesIO(_download(anonymous, job).content)) as aes:
        aes.setpassword(b"usb-stick-secret")
        assert "DICOMDIR" in aes.namelist()
        aes.extractall(tmp_path / "media")
    assert len(FileSet(tmp_path / "media" / "DICOMDIR")) == 3


def test_an_export_is_not_handed_out_after_its_day_even_if_housekeeping_never_ran(
        archive, anonymous, study):
    """Finished exports are kept for a day; with the housekeeping task off (or late) the file
    is still on disk, but it is not handed out any more."""
    job = _export(anonymous, study, format="zip")
    row = background_jobs.update().where(background_jobs.c.public_id == job["id"])
    # Asked for more than a day ago, finished an hour ago (a long export): still handed out.
    with archive.engine.begin() as conn:
        conn.execute(row.values(created_at=datetime.now(UTC) - timedelta(hours=30),
                                finished_at=datetime.now(UTC) - timedelta(hours=1)))
    assert _download(anonymous, job).status_code == 200
    # Finished more than a day ago: not any more.
    with archive.engine.begin() as conn:
        conn.execute(row.values(finished_at=datetime.now(UTC) - timedelta(hours=25)))
    refused = _download(anonymous, job)
    assert refused.status_code == 400 and "expired" in refused.json()["detail"]
    assert [e["outcome"] for e in archive.audit.events("study.export.download")] == [
        "failure", "success"]  # newest first
