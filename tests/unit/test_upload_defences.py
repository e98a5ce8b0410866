"""Defences of the upload feature found wanting by a red team: zip bombs that hid behind a
prefix or in many small members, zip files expanding past the invitation's limit, the
uploader's page telling archive facts, tus headers of non-ASCII digits, and originals served
without nosniff and sandbox."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from imageshare.archive.importing import Importer
from imageshare.storage.index.schema import instances
from imageshare.uploads.intake import results
from imageshare.web.server import create_app
from tests.factory import ct_series
from tests.unit import test_uploads
from tests.unit.test_uploads import (
    HTML,
    PASSWORD,
    STAFF,
    TUS,
    _b64,
    _invite,
    _open,
    _send,
    _send_one,
    _tus_upload,
)
from tests.unit.test_web_pages import browser_sign_in
from tests.upload_media import photo

hospital = test_uploads.hospital  # the same archive, SMTP server and clerk


def _dicom_bytes(tmp_path: Path, pixels: np.ndarray, **extra: object) -> list[bytes]:
    """One CT slice per 2-D array in ``pixels`` (uint16), as Part 10 bytes: the invited
    patient's, so that anything let through would be stored."""
    rows, columns = pixels.shape[1:]
    made = []
    for index, path in enumerate(ct_series(tmp_path / f"src-{generate_uid()[-8:]}",
                                           len(pixels), size=8, patient_id="H100",
                                           patient_name="Lovelace^Ada",
                                           PatientBirthDate="19151210", **extra)):
        ds = dcmread(path)
        ds.Rows, ds.Columns = rows, columns
        ds.PixelData = pixels[index].astype("<u2").tobytes()
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        made.append(out.getvalue())
    return made


def _zip(members: list[bytes], prefix: bytes = b"") -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for number, data in enumerate(members, 1):
            z.writestr(f"IMAGES/IM{number:04d}.dcm", data)
    return prefix + out.getvalue()


def _instance_count(archive) -> int:
    with archive.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(instances)).scalar() or 0)


def _outcomes(archive, created) -> dict[str, tuple[str, str]]:
    invitation = archive.uploads.invitations.by_public_id(created.public_id)
    return {str(r["label"]): (str(r["outcome"]), str(r["detail"]))
            for r in results(archive.engine, invitation)}


def _upload_and_send(archive, created, tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        _tus_upload(client, created.path, csrf, path, name)
        return _send(client, created.path, csrf)


def test_a_zip_bomb_behind_a_prefix_is_refused_and_nothing_of_it_stored(hospital, tmp_path):
    """``JUNK`` + a zip file, named .bin: the walker finds the zip from its end, so the bomb
    check runs where it opens it, not on the first bytes."""
    archive, _sink = hospital
    created = _invite(archive, max_mb=1)
    zeros = np.zeros((3, 1600, 1600), dtype=np.uint16)  # 5 MB each, a few KB compressed
    bomb = _zip(_dicom_bytes(tmp_path, zeros), prefix=b"JUNK")
    assert len(bomb) < 1 << 20 and zipfile.is_zipfile(io.BytesIO(bomb))
    shown = _upload_and_send(archive, created, tmp_path, "bomb.bin", bomb)
    assert "zip bomb" in shown and 'data-state="done"' in shown
    outcome, detail = _outcomes(archive, created)["bomb.bin"]
    assert outcome == "refused" and "zip bomb" in detail
    assert _instance_count(archive) == 0


def test_many_small_highly_compressed_members_are_refused_as_a_zip_bomb(hospital, tmp_path):
    """A hundred members of just under 1 MiB each (below the per-member ratio rule): the
    ratio over the whole zip file refuses it, in an upload and in ``imageshare import``."""
    archive, _sink = hospital
    created = _invite(archive)
    zeros = np.zeros((100, 700, 700), dtype=np.uint16)  # 980 kB each
    members = _dicom_bytes(tmp_path, zeros)
    assert all(len(m) < 1 << 20 for m in members)
    small = _zip(members)
    assert len(small) < 2 << 20
    shown = _upload_and_send(archive, created, tmp_path, "small.zip", small)
    assert "zip bomb" in shown
    outcome, detail = _outcomes(archive, created)["small.zip"]
    assert outcome == "refused" and "zip bomb" in detail
    assert _instance_count(archive) == 0
    # the same walker for staff and the command line: prefixed too, refused the same way
    prefixed = tmp_path / "cd.bin"
    prefixed.write_bytes(b"JUNK" + small)
    report = Importer(archive.ingest).run([prefixed], STAFF)
    assert report.stored == 0 and _instance_count(archive) == 0
    assert [reason for _label, reason in report.refused if "zip bomb" in reason]


def test_what_a_zip_file_expands_to_counts_against_the_invitations_limit(hospital,
                                                                        tmp_path):
    archive, _sink = hospital
    created = _invite(archive, max_mb=1)
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2, (4, 512, 512), dtype=np.uint16)  # 512 kB each, ~10x smaller
    packed = _zip(_dicom_bytes(tmp_path, bits))
    assert len(packed) < 1 << 20  # the upload itself fits the limit
    shown = _upload_and_send(archive, created, tmp_path, "scans.zip", packed)
    outcome, detail = _outcomes(archive, created)["scans.zip"]
    assert outcome == "refused", detail
    assert "zip bomb" not in detail and "limit of 1 MB" in detail
    assert "limit of 1 MB" in shown
    assert _instance_count(archive) == 0


def _study_of_another_patient(archive, tmp_path: Path) -> tuple[str, bytes]:
    """A study in the archive for a patient other than the invited one: its UID, and the
    Part 10 bytes of an instance of it (stored)."""
    [path] = ct_series(tmp_path / "theirs", 1, patient_id="OTHER-9", patient_name="Other^Bob")
    archive.ingest.store_copy(path, STAFF)
    return str(dcmread(path).StudyInstanceUID), path.read_bytes()


def test_the_uploader_is_told_nothing_of_the_archive_and_the_reviewer_everything(
        hospital, tmp_path):
    """A file of a study that is another patient's in the archive, and a file the archive
    holds already: the uploader reads "received" for both, as for a new file; the reviewer
    reads what the archive said."""
    archive, _sink = hospital
    study_uid, stored_bytes = _study_of_another_patient(archive, tmp_path)
    [clash] = _dicom_bytes(tmp_path, np.ones((1, 8, 8), dtype=np.uint16),
                           study_uid=study_uid)
    [fresh] = _dicom_bytes(tmp_path, np.ones((1, 8, 8), dtype=np.uint16))
    created = _invite(archive)
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        for name, data in (("clash.dcm", clash), ("again.dcm", stored_bytes),
                           ("fresh.dcm", fresh)):
            (tmp_path / name).write_bytes(data)
            _tus_upload(client, created.path, csrf, tmp_path / name, name)
        sent = _send(client, created.path, csrf)
        page = client.get(created.path + "/upload", headers=HTML).text
    outcomes = _outcomes(archive, created)
    assert outcomes["fresh.dcm"][0] == "stored"
    assert outcomes["again.dcm"][0] not in ("stored", "refused")  # the archive knew it
    assert outcomes["clash.dcm"][0] != "stored"
    archive_facts = [study_uid, "OTHER-9", "Other", "duplicate", "conflict", "held",
                     "already", "another patient", "belongs"]
    for shown in (sent, page):
        listed = re.findall(r"<li>([^<]*)</li>", shown.split('class="upload-results"')[1])
        assert listed and all(line.endswith(": received") for line in listed), listed
        for fact in archive_facts:
            assert fact not in shown, fact
    assert "3 file(s) received" in sent and "could not be used" not in sent
    clerk = TestClient(create_app(archive))
    browser_sign_in(clerk, "clerk", PASSWORD)
    review = clerk.get(f"/uploads/{created.public_id}", headers=HTML)
    assert review.status_code == 200
    assert study_uid in review.text or "another patient" in review.text
    assert outcomes["again.dcm"][0] in review.text
    clerk.close()


def test_tus_byte_counts_take_only_ascii_digits(hospital):
    """``str.isdigit`` takes "¹" and "²", which ``int`` refuses: a 400 saying why, not a
    500; and more than 19 digits is no byte count either."""
    archive, _sink = hospital
    created = _invite(archive)
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        meta = f"filename {_b64('a.jpg')}"
        for length in ("¹".encode("latin-1"), b"1" * 20, b"-1", b"1e3"):
            answer = client.post(created.path + "/files", headers={
                **TUS, "X-CSRF-Token": csrf, "Upload-Length": length,
                "Upload-Metadata": meta})
            assert answer.status_code == 400, (length, answer.text)
            assert "digits 0-9" in answer.text
        made = client.post(created.path + "/files", headers={
            **TUS, "X-CSRF-Token": csrf, "Upload-Length": "10", "Upload-Metadata": meta})
        assert made.status_code == 201
        for offset in ("²".encode("latin-1"), b"0" * 20):
            answer = client.patch(made.headers["location"], content=b"x", headers={
                **TUS, "X-CSRF-Token": csrf, "Upload-Offset": offset,
                "Content-Type": "application/offset+octet-stream"})
            assert answer.status_code == 400, (offset, answer.text)
            assert "digits 0-9" in answer.text


def test_an_original_is_served_unsniffed_and_sandboxed(hospital, tmp_path):
    archive, _sink = hospital
    invitation, _study, kept = _send_one(archive, photo(tmp_path / "IMG_0007.jpg"))
    clerk = TestClient(create_app(archive))
    browser_sign_in(clerk, "clerk", PASSWORD)
    answer = clerk.get(f"/uploads/{invitation.public_id}/originals/{kept['pk']}")
    assert answer.status_code == 200
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["content-security-policy"] == "sandbox"
    assert answer.content == (tmp_path / "IMG_0007.jpg").read_bytes()
    clerk.close()
