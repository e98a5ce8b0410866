"""Defences of the upload feature found wanting by a red team: zip bombs that hid behind a
prefix or in many small members, zip files expanding past the invitation's limit, the
uploader's page telling archive facts, tus headers of non-ASCII digits, originals served
without nosniff and sandbox; and a batch without a cap on its work: DICOMDIRs of any size,
listing a file any number of times, zip files of more members than an upload may hold files,
and photos growing without limit when converted."""

from __future__ import annotations

import io
import re
import zipfile
from copy import deepcopy
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom import dcmread
from pydicom.fileset import FileSet
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from imageshare.archive import importing
from imageshare.archive.corrections import PatientDetails
from imageshare.archive.importing import Importer
from imageshare.domain.errors import ImageShareError
from imageshare.storage.index.schema import instances
from imageshare.uploads import convert, intake
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
from tests.upload_media import photo, png

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


# A batch's work is bounded by what it holds, not by what its files claim (the budget of
# items is made small here: the real one is an upload's limit of 20,000 files).


def _cd(tmp_path: Path, extra: list[list[str]] | None = None, repeat_first: int = 0,
        first_in_lower_case: bool = False) -> Path:
    """CD media with two instances whose DICOMDIR also lists ``extra`` references, the first
    instance ``repeat_first`` times more, and (if asked) once more spelt in lower case."""
    media = tmp_path / "cdrom"
    fileset = FileSet()
    for path in ct_series(tmp_path / "src", count=2, patient_id="H100"):
        fileset.add(dcmread(path))
    fileset.write(media)
    ds = dcmread(media / "DICOMDIR")
    template = next(r for r in ds.DirectoryRecordSequence if "ReferencedFileID" in r)
    first = [str(part) for part in template.ReferencedFileID]
    lower = [[part.lower() for part in first]] if first_in_lower_case else []
    for reference in [*(extra or []), *[first] * repeat_first, *lower]:
        record = deepcopy(template)
        record.ReferencedFileID = reference
        ds.DirectoryRecordSequence.append(record)
    ds.save_as(media / "DICOMDIR", enforce_file_format=True)
    return media


def test_a_file_the_dicomdir_lists_many_times_is_stored_once(archive, tmp_path):
    """Listed 40 times more, and once more in lower case (the same file on disk): read,
    hashed and stored once."""
    media = _cd(tmp_path, repeat_first=40, first_in_lower_case=True)
    report = Importer(archive.ingest).run([media], STAFF)
    assert (report.stored, report.duplicates, report.refused) == (2, 0, [])
    assert report.repeated == 1


def test_a_dicomdir_larger_than_the_limit_is_not_parsed_and_its_cd_is_read_file_by_file(
        archive, tmp_path, monkeypatch):
    media = _cd(tmp_path)
    assert (media / "DICOMDIR").stat().st_size > 512
    monkeypatch.setattr(importing, "MAX_DICOMDIR_BYTES", 512)

    def parsed(*_args, **_kwargs):
        raise AssertionError("the DICOMDIR was parsed")

    monkeypatch.setattr(importing, "read_partial", parsed)
    report = Importer(archive.ingest).run([media], STAFF)
    assert report.stored == 2  # every real file of the CD
    [(label, reason)] = report.refused
    assert label == str(media / "DICOMDIR")
    assert "larger than" in reason and "read file by file" in reason


@pytest.mark.parametrize(("extra", "repeat_first", "why"), [
    ([["NOWHERE", f"F{n:05d}"] for n in range(20)], 0, "lists more files than"),
    ([["NOWHERE", f"F{n:05d}"] for n in range(200)], 0, "more entries than"),
    ([], 200, "more entries than"),
])
def test_a_dicomdir_listing_more_than_the_budget_is_read_only_as_far_as_the_budget(
        archive, tmp_path, monkeypatch, extra, repeat_first, why):
    """20 or 200 files that are not there, or one file 200 times, with a budget of 10 items:
    the DICOMDIR is parsed no further than the budget needs (none of it when it holds more
    records than 10 files need), and the CD's real files are read from its folder."""
    media = _cd(tmp_path, extra=extra, repeat_first=repeat_first)
    records: list[int] = []
    real = importing.read_sequence_item

    def counted(*args, **kwargs):
        records.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(importing, "read_sequence_item", counted)
    report = Importer(archive.ingest, max_items=10).run([media], STAFF)
    assert report.stored == 2
    [(label, reason)] = report.refused
    assert label == str(media / "DICOMDIR") and why in reason, reason
    assert len(records) <= 4 * 10 + 16 + 1


def _upload_all(archive, created, tmp_path: Path, files: dict[str, bytes]) -> str:
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        for name, data in files.items():
            (tmp_path / name).write_bytes(data)
            _tus_upload(client, created.path, csrf, tmp_path / name, name)
        return _send(client, created.path, csrf)


def test_a_zip_of_more_files_than_an_upload_may_hold_is_not_read(hospital, tmp_path,
                                                                  monkeypatch):
    """The budget (an upload's limit of files, 5 here) counts zip members: a zip file of 8
    small members is refused whole, nothing of it stored, and what follows is reported as not
    read, except a file stored when it arrived (reported as stored)."""
    archive, _sink = hospital
    monkeypatch.setattr(intake, "MAX_FILES", 5)
    monkeypatch.setattr(intake, "_RESULTS_AT_ONCE", 2)  # results go through their file
    created = _invite(archive)
    members = _dicom_bytes(tmp_path, np.ones((8, 8, 8), dtype=np.uint16))
    [arrived] = _dicom_bytes(tmp_path, np.ones((1, 8, 8), dtype=np.uint16))
    shown = _upload_all(archive, created, tmp_path, {
        "a.zip": _zip(members), "b.dcm": arrived,
        "z.png": png(tmp_path / "screen.png").read_bytes()})
    outcomes = _outcomes(archive, created)
    assert set(outcomes) == {"a.zip", "b.dcm", "z.png"}
    assert outcomes["a.zip"][0] == "refused" and "at most 5 files" in outcomes["a.zip"][1]
    assert outcomes["z.png"][0] == "refused" and "not read" in outcomes["z.png"][1]
    assert outcomes["b.dcm"][0] == "stored"
    assert "at most 5 files" in shown
    assert _instance_count(archive) == 1


def test_a_walk_with_a_budget_stops_at_it_and_staff_imports_have_none(archive, tmp_path):
    """A walk given a budget (an upload's, 5 here) reads no zip file beyond it and a folder
    up to it, reporting the rest; ``imageshare import`` (staff on the server, a whole archive
    perhaps) reads everything."""
    members = _dicom_bytes(tmp_path, np.ones((8, 8, 8), dtype=np.uint16))
    bundle = tmp_path / "eight.zip"
    bundle.write_bytes(_zip(members))
    report = Importer(archive.ingest, max_items=5).run([bundle], STAFF)
    assert report.stored == 0 and _instance_count(archive) == 0
    [(label, reason)] = report.refused
    assert label == str(bundle) and "at most 5 files" in reason
    folder = tmp_path / "loose"
    folder.mkdir()
    for number, data in enumerate(members, 1):
        (folder / f"IM{number}.dcm").write_bytes(data)
    report = Importer(archive.ingest, max_items=5).run([folder], STAFF)
    assert report.stored == 5 and _instance_count(archive) == 5
    assert report.refused == [(str(folder / "IM6.dcm"), importing.over_budget(5))]
    report = Importer(archive.ingest).run([bundle, folder], STAFF)
    assert report.refused == [] and _instance_count(archive) == 8


def test_a_zip_whose_end_record_understates_its_members_is_not_opened(archive, tmp_path):
    """Opening a zip file reads its whole list of members into memory: one that says it
    holds 2 files in a list long enough for thousands is refused before it is opened."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for number in range(3000):
            z.writestr(f"{number}", b"")
    data = bytearray(out.getvalue())
    end = data.rindex(b"PK\x05\x06")
    data[end + 8:end + 12] = (2).to_bytes(2, "little") * 2  # members: on this disk, in all
    lying = tmp_path / "lying.zip"
    lying.write_bytes(bytes(data))
    report = Importer(archive.ingest).run([lying], STAFF)
    assert report.skipped == 0
    [(label, reason)] = report.refused
    assert label == str(lying) and "built to mislead" in reason


def _columns(width: int = 2000, height: int = 2000) -> bytes:
    """A PNG of alternating black and white columns: a few kB that no lossless DICOM
    encoding keeps small (each pixel differs from the next)."""
    pixels = np.zeros((height, width), dtype=np.uint8)
    pixels[:, ::2] = 255
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", optimize=True)
    return out.getvalue()


def test_a_png_growing_past_the_upload_limit_when_converted_is_refused(hospital, tmp_path):
    """16 kB of PNG is 12 MB of pixels kept exactly: beyond a few times the file, the growth
    counts against the invitation's limit (1 MB), so it is refused, saying what to send."""
    archive, _sink = hospital
    created = _invite(archive, max_mb=1)
    data = _columns()
    assert len(data) < 64 << 10
    shown = _upload_and_send(archive, created, tmp_path, "columns.png", data)
    outcome, detail = _outcomes(archive, created)["columns.png"]
    assert outcome == "refused" and "once converted" in detail and "JPEG" in detail
    assert "once converted" in shown
    assert _instance_count(archive) == 0


class _NothingLeft:
    def bytes_left(self) -> int:
        return 0

    def claim_bytes(self, count: int) -> bool:
        raise AssertionError("nothing is claimed of a photo refused before it is encoded")


def test_a_png_too_large_for_any_lossless_encoding_is_refused_before_encoding(tmp_path,
                                                                           monkeypatch):
    """RLE takes at least 1/64 of the pixels' bytes: when even that does not fit, nothing is
    encoded."""
    source = tmp_path / "columns.png"
    source.write_bytes(_columns())

    def encoder(*_args, **_kwargs):
        raise AssertionError("the photo was encoded")

    monkeypatch.setattr(convert, "get_encoder", encoder)
    where = convert.Placement(generate_uid(), generate_uid(), 901, 1, datetime.now(UTC),
                              "ada@home.example", "", "original file columns.png")
    with pytest.raises(ImageShareError, match="once converted"):
        convert.photo(source, PatientDetails("Lovelace^Ada", "H100"), where, io.BytesIO(),
                      _NothingLeft())


def test_every_tus_answer_says_the_version_also_when_refused(hospital):
    """tus 1.0: every answer to a tus request carries Tus-Resumable, refusals too (a client
    library checks it before reading the status); a refused version (412) lists the
    versions the server speaks in Tus-Version."""
    archive, _sink = hospital
    created = _invite(archive)
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        refused = client.post(created.path + "/files", headers={
            **TUS, "X-CSRF-Token": csrf, "Upload-Length": "-1"})
        assert refused.status_code == 400 and refused.headers["tus-resumable"] == "1.0.0"
        old = client.post(created.path + "/files", headers={
            "Tus-Resumable": "0.2.2", "X-CSRF-Token": csrf, "Upload-Length": "10"})
        assert old.status_code == 412
        assert old.headers["tus-version"] == "1.0.0"
        assert old.headers["tus-resumable"] == "1.0.0"
