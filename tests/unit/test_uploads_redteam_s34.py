"""Upload and media import defences found wanting by the session-34 red team: tus uploads
written past the free-disk floor (and a full disk answered with a 500 the page retried for
ever), damaged media whose unreadable folders vanished from the report (or stopped the
other discs), and special files (pipes, devices) on media opened before being refused."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from imageshare.archive.importing import Importer
from imageshare.domain.errors import OutOfResources
from imageshare.storage.index.schema import series
from imageshare.uploads.intake import results
from imageshare.web.pages import uploads as upload_pages
from imageshare.web.server import create_app
from tests.factory import ct_series
from tests.unit import test_uploads
from tests.unit.test_uploads import STAFF, TUS, _b64, _invite, _open, _send, _tus_upload
from tests.upload_media import cd_folder, pdf, photo, png

hospital = test_uploads.hospital  # the same archive, SMTP server and clerk


def _announce(client: TestClient, created, csrf: str, name: str, length: int,
              body: bytes | None = None):
    headers = {**TUS, "X-CSRF-Token": csrf, "Upload-Length": str(length),
               "Upload-Metadata": f"filename {_b64(name)},relativePath {_b64(name)}"}
    if body is not None:
        headers["Content-Type"] = "application/offset+octet-stream"
    return client.post(created.path + "/files", headers=headers, content=body)


def _patch(client: TestClient, url: str, csrf: str, offset: int, body: bytes):
    return client.patch(url, content=body, headers={
        **TUS, "X-CSRF-Token": csrf, "Upload-Offset": str(offset),
        "Content-Type": "application/offset+octet-stream"})


def _parts(archive, created) -> list[Path]:
    invitation = archive.uploads.invitations.by_public_id(created.public_id)
    folder = archive.uploads.receiver.folder(invitation) / "parts"
    return sorted(folder.iterdir()) if folder.exists() else []


def test_an_upload_below_the_free_disk_floor_is_refused_before_a_byte_is_written(hospital):
    archive, _sink = hospital
    created = _invite(archive)
    with TestClient(create_app(archive), raise_server_exceptions=False) as client:
        csrf = _open(client, created)
        url = _announce(client, created, csrf, "a.jpg", 100_000).headers["location"]
        archive.ingest.min_free_mb = 1 << 40  # the disk is now below the floor
        answer = _announce(client, created, csrf, "b.jpg", 1000, b"x" * 1000)
        assert answer.status_code == 507, answer.text
        assert "H100" not in answer.text and "Lovelace" not in answer.text
        more = _patch(client, url, csrf, 0, b"y" * 50_000)
        assert more.status_code == 507, more.text
        invitation = archive.uploads.invitations.by_public_id(created.public_id)
        assert [f.path for f in archive.uploads.receiver.files(invitation)] == ["a.jpg"]
        assert [p.stat().st_size for p in _parts(archive, created)] == [0]
    failures = [e for e in archive.audit.events("instance.store")
                if e["outcome"] == "failure"]
    assert failures


def test_a_file_larger_than_the_room_left_above_the_floor_is_refused_when_announced(
        hospital):
    archive, _sink = hospital
    created = _invite(archive, max_mb=8 << 10)  # 8 GB: the size limit is not what refuses
    facts = os.statvfs(archive.uploads.receiver.root.parent)
    free = facts.f_bavail * facts.f_frsize
    archive.ingest.min_free_mb = max(1, (free - (1 << 30)) >> 20)  # about 1 GB above it
    with TestClient(create_app(archive), raise_server_exceptions=False) as client:
        csrf = _open(client, created)
        answer = _announce(client, created, csrf, "huge.mp4", 4 << 30)
        assert answer.status_code == 507, answer.text
        assert _announce(client, created, csrf, "small.jpg", 1000).status_code == 201


def _send_in_chunks(client: TestClient, url: str, csrf: str, data: bytes, start: int = 0,
                    chunk: int = 200 * 1024):
    offset, answer = start, None
    while offset < len(data):
        answer = _patch(client, url, csrf, offset, data[offset:offset + chunk])
        if answer.status_code != 204:
            return answer
        offset = int(answer.headers["upload-offset"])
    return answer


def test_a_disk_that_fills_during_a_chunk_answers_507_and_the_upload_resumes(
        hospital, monkeypatch):
    archive, _sink = hospital
    created = _invite(archive)
    data = os.urandom(1 << 20)
    with TestClient(create_app(archive), raise_server_exceptions=False) as client:
        csrf = _open(client, created)
        url = _announce(client, created, csrf, "clip.bin", len(data)).headers["location"]
        real = os.pwrite
        calls = {"n": 0}

        def full_after_two(fd: int, chunk: bytes, at: int) -> int:
            calls["n"] += 1
            if calls["n"] > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, chunk, at)

        monkeypatch.setattr(upload_pages.os, "pwrite", full_after_two)
        answer = _send_in_chunks(client, url, csrf, data)
        assert answer is not None and answer.status_code == 507, answer.text
        monkeypatch.setattr(upload_pages.os, "pwrite", real)
        head = client.head(url, headers={**TUS, "X-CSRF-Token": csrf})
        kept = int(head.headers["upload-offset"])
        assert 0 < kept < len(data)
        done = _send_in_chunks(client, url, csrf, data, kept)
        assert done is not None and done.status_code == 204
        assert int(done.headers["upload-offset"]) == len(data)


def test_a_short_write_is_carried_on_never_counted_whole(hospital, monkeypatch):
    archive, _sink = hospital
    created = _invite(archive)
    data = os.urandom(600 * 1024)
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        url = _announce(client, created, csrf, "a.bin", len(data)).headers["location"]
        real = os.pwrite
        monkeypatch.setattr(upload_pages.os, "pwrite",
                            lambda fd, chunk, at: real(fd, bytes(chunk[:4096]), at))
        answer = _send_in_chunks(client, url, csrf, data)
        assert answer is not None and answer.status_code == 204
    invitation = archive.uploads.invitations.by_public_id(created.public_id)
    [found] = archive.uploads.receiver.files(invitation)
    assert found.status == "received"
    kept = archive.uploads.receiver.round_folder(invitation, found.round) / "a.bin"
    assert kept.read_bytes() == data


def _two_discs(tmp_path: Path) -> tuple[Path, Path, Path]:
    first, second = tmp_path / "disc1", tmp_path / "disc2"
    ct_series(first / "GOOD", 2, size=8, patient_id="P1")
    ct_series(first / "BAD", 2, size=8, patient_id="P1")
    ct_series(second, 2, size=8, patient_id="P2")
    return first, second, first / "BAD"


def test_a_folder_of_the_media_that_cannot_be_read_is_named_and_the_rest_is_read(
        archive, tmp_path, monkeypatch):
    first, second, bad = _two_discs(tmp_path)
    real = os.scandir

    def damaged(path: object = ".") -> object:
        if Path(os.fsdecode(path)) == bad:  # type: ignore[arg-type]
            raise OSError(errno.EIO, "Input/output error", str(bad))
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", damaged)
    report = Importer(archive.ingest).run([first, second], STAFF)
    assert report.stored == 4
    assert any(label == str(bad) and "cannot read" in reason
               for label, reason in report.refused), report.refused


def test_a_disc_that_cannot_be_listed_does_not_stop_the_other_discs(archive, tmp_path,
                                                                   monkeypatch):
    first, second, _bad = _two_discs(tmp_path)
    real = Path.iterdir

    def damaged(self: Path):  # type: ignore[no-untyped-def]
        if self == first:
            raise OSError(errno.EIO, "Input/output error", str(first))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", damaged)
    report = Importer(archive.ingest).run([first, second], STAFF)
    assert report.stored == 2
    assert any(label == str(first) and "cannot read" in reason
               for label, reason in report.refused), report.refused


@pytest.mark.timeout(60)
def test_a_pipe_on_the_media_is_refused_without_being_opened(archive, tmp_path):
    """A named pipe with a writer waiting: opening it (even to refuse it afterwards) lets
    the writer go on; it must be refused by what it is, unopened."""
    media = tmp_path / "usb"
    ct_series(media / "IMAGES", 1, size=8, patient_id="P1")
    pipe = media / "IMAGES" / "FIFO"
    os.mkfifo(pipe)
    opened = threading.Event()

    def writer() -> None:
        fd = os.open(pipe, os.O_WRONLY)  # blocks until someone opens it to read
        opened.set()
        os.close(fd)

    waiting = threading.Thread(target=writer, daemon=True)
    waiting.start()
    time.sleep(0.5)  # the writer is waiting in open() by now
    try:
        report = Importer(archive.ingest).run([media], STAFF)
        assert report.stored == 1
        assert any(label.endswith("FIFO") and "not a regular file" in reason
                   for label, reason in report.refused), report.refused
        assert not opened.wait(0.5), "the pipe was opened"
    finally:
        release = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)
        waiting.join(5)
        os.close(release)


def test_a_cds_contents_dropped_item_by_item_leave_its_viewer_program_out(hospital,
                                                                        tmp_path):
    """The files of a disc selected and dropped (DICOMDIR beside its folders, and the
    viewer program's folder with its manual and icons): the images are read through the
    DICOMDIR, the viewer's PDF and pictures are not made the patient's documents and
    photos; a photo dropped beside them still is."""
    archive, _sink = hospital
    created = _invite(archive)
    cd = cd_folder(tmp_path / "CD", nhs=test_uploads.NHS)
    viewer = cd / "VIEWER"
    viewer.mkdir()
    pdf(viewer / "MANUAL.PDF")
    png(viewer / "ICON.PNG")
    photo(tmp_path / "IMG_0001.jpg")
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        for file in sorted(p for p in cd.rglob("*") if p.is_file()):
            _tus_upload(client, created.path, csrf, file, str(file.relative_to(cd)))
        _tus_upload(client, created.path, csrf, tmp_path / "IMG_0001.jpg", "IMG_0001.jpg")
        shown = _send(client, created.path, csrf)
    assert 'data-state="done"' in shown
    invitation = archive.uploads.invitations.by_public_id(created.public_id)
    made = {str(r["label"]): (str(r["kind"]), str(r["outcome"]))
            for r in results(archive.engine, invitation)}
    assert made["VIEWER/MANUAL.PDF"] == ("other", "skipped"), made
    assert made["VIEWER/ICON.PNG"] == ("other", "skipped"), made
    assert made["IMG_0001.jpg"] == ("photo", "stored"), made
    stored = [outcome for kind, outcome in made.values() if kind == "dicom"]
    assert stored.count("stored") == 3, made
    with archive.engine.connect() as conn:
        modalities = set(conn.execute(select(series.c.modality)).scalars())
    assert "DOC" not in modalities


def _pdf_with_script(path: Path) -> Path:
    from pypdf import PdfReader, PdfWriter
    from pypdf.generic import DictionaryObject, NameObject, TextStringObject

    plain = pdf(path.with_name("plain-" + path.name))
    writer = PdfWriter(clone_from=PdfReader(plain))
    script = DictionaryObject({
        NameObject("/S"): NameObject("/JavaScript"),
        NameObject("/JS"): TextStringObject("app.launchURL('https://attacker.example/');")})
    writer.root_object[NameObject("/OpenAction")] = writer._add_object(script)
    with open(path, "wb") as out:
        writer.write(out)
    return path


def test_a_pdf_with_javascript_is_flagged_for_the_reviewer_and_a_broken_one_refused(
        hospital, tmp_path):
    archive, _sink = hospital
    created = _invite(archive)
    scripted = _pdf_with_script(tmp_path / "letter.pdf")
    plain = pdf(tmp_path / "plain.pdf")
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7\n" + os.urandom(4000))
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        for path in (scripted, plain, broken):
            _tus_upload(client, created.path, csrf, path, path.name)
        shown = _send(client, created.path, csrf)
    assert "JavaScript" not in shown  # the uploader is told "received", as for any file
    invitation = archive.uploads.invitations.by_public_id(created.public_id)
    made = {str(r["label"]): (str(r["outcome"]), str(r["detail"]))
            for r in results(archive.engine, invitation)}
    assert made["letter.pdf"][0] == "stored"
    assert made["letter.pdf"][1].startswith("the PDF holds JavaScript"), made
    assert made["plain.pdf"] == ("stored", ""), made
    assert made["broken.pdf"][0] == "refused" and "cannot be read" in made["broken.pdf"][1]
    [study] = archive.uploads.review.studies(invitation)
    assert [c.name for c in study.checks if not c.passed] == ["Documents"]


def test_a_chunk_saying_another_upload_length_is_refused_and_changes_nothing(hospital):
    archive, _sink = hospital
    created = _invite(archive)
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        url = _announce(client, created, csrf, "a.bin", 1000).headers["location"]
        answer = client.patch(url, content=b"z" * 10, headers={
            **TUS, "X-CSRF-Token": csrf, "Upload-Offset": "0", "Upload-Length": "10",
            "Content-Type": "application/offset+octet-stream"})
        assert answer.status_code == 400, answer.text
        head = client.head(url, headers={**TUS, "X-CSRF-Token": csrf})
        assert head.headers["upload-offset"] == "0" and head.headers["upload-length"] == "1000"
        same = client.patch(url, content=b"z" * 1000, headers={
            **TUS, "X-CSRF-Token": csrf, "Upload-Offset": "0", "Upload-Length": "1000",
            "Content-Type": "application/offset+octet-stream"})
        assert same.status_code == 204 and same.headers["upload-offset"] == "1000"


def test_a_round_checked_while_the_disk_is_full_stops_and_keeps_its_files_for_later(
        hospital, tmp_path):
    """At Send, a disk below the floor is no fault of the files: they are not recorded as
    failed and deleted with the round, but kept for the job's next attempt (the job queue
    tries an out-of-resources failure again), which stores them."""
    archive, _sink = hospital
    created = _invite(archive)
    letter, picture = pdf(tmp_path / "letter.pdf"), photo(tmp_path / "IMG_0002.jpg")
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        for path in (letter, picture):
            _tus_upload(client, created.path, csrf, path, path.name)
    invitation = archive.uploads.invitations.by_public_id(created.public_id)
    folder = archive.uploads.receiver.round_folder(invitation, 1)
    archive.ingest.min_free_mb = 1 << 40
    with pytest.raises(OutOfResources):
        archive.uploads.intake.process(invitation, 1, folder, STAFF, "the invited person")
    assert sorted(p.name for p in folder.iterdir()) == ["IMG_0002.jpg", "letter.pdf"]
    assert results(archive.engine, invitation) == []
    archive.ingest.min_free_mb = 0
    report = archive.uploads.intake.process(invitation, 1, folder, STAFF,
                                            "the invited person")
    assert report.stored == 2 and report.refused == 0
