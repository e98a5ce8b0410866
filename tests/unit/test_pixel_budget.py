"""Decompression bombs: the pixel budget is checked before anything is decoded, on every path
that decodes (ingest, rendering, frames, transcoding, exports, de-identification)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
from pydicom import dcmread

from imageshare.archive import pixel_budget
from imageshare.archive.pixel_budget import PixelLimits, check_pixel_budget, decoding
from imageshare.archive.transcode import transcode
from imageshare.deid.pixels import BurnedInTextCleaner
from imageshare.domain.actors import cli_actor
from imageshare.domain.errors import ImageTooLarge, NotAcceptable, UndecodableImage
from imageshare.export.media import cine_to_mp4
from tests.conftest import ROOT, act_as_admin, make_archive
from tests.factory import ct_series
from tests.multipart_helpers import encode_multipart
from tests.oversized import rle_bomb
from tests.peers import ADMIN_PASSWORD

ACTOR = cli_actor()


@pytest.fixture(autouse=True)
def default_budget():
    """Each test starts, and leaves the process, with the default budget."""
    pixel_budget.configure(PixelLimits())
    yield
    pixel_budget.configure(PixelLimits())


def _count_instances(archive) -> int:
    from sqlalchemy import func, select

    from imageshare.storage.index.schema import instances

    with archive.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(instances)).scalar()


def test_a_file_claiming_65535_by_65535_pixels_is_refused_at_ingest_with_the_reason(
        archive, tmp_path):
    bomb = rle_bomb(tmp_path / "bomb.dcm", 65535, 65535, real=False)
    assert bomb.stat().st_size < 2000
    with pytest.raises(ImageTooLarge) as refused:
        archive.ingest.store_copy(bomb, ACTOR)
    assert "4.0 GiB once decoded" in str(refused.value)
    assert "65535 × 65535 pixels" in str(refused.value)
    assert _count_instances(archive) == 0
    assert not list(archive.settings.staging_dir.iterdir())


def test_many_frames_of_a_modest_size_are_refused_by_the_instance_budget(archive, tmp_path):
    bomb = rle_bomb(tmp_path / "frames.dcm", 1024, 1024, frames=5000, real=False)
    with pytest.raises(ImageTooLarge, match="per instance"):
        archive.ingest.store_copy(bomb, ACTOR)


def test_stow_of_a_bomb_answers_with_a_failure_reason_and_stores_nothing(
        client, archive, tmp_path):
    bomb = rle_bomb(tmp_path / "bomb.dcm", 65535, 65535, real=False)
    body, content_type = encode_multipart([bomb.read_bytes()])
    response = client.post("/dicomweb/studies", content=body,
                           headers={"Content-Type": content_type})
    assert response.status_code == 409
    failed = response.json()["00081198"]["Value"][0]
    assert failed["00081197"]["Value"] == [0xC000]
    assert "decoded" in failed["00000902"]["Value"][0]
    assert _count_instances(archive) == 0


def test_unreadable_image_dimensions_are_a_refusal_with_the_reason(archive, tmp_path):
    bomb = rle_bomb(tmp_path / "bad.dcm", 64, 64, real=True)
    ds = dcmread(bomb)
    ds.NumberOfFrames = "7531"
    ds.save_as(bomb, enforce_file_format=True)
    # The value of (0028,0008) itself, explicit VR little endian: a random UID may hold
    # "7531" too (the first "7531" in the file was once a UID's, and the test failed).
    frames = b"\x28\x00\x08\x00IS\x04\x00"
    data = bomb.read_bytes()
    assert data.count(frames + b"7531") == 1
    bomb.write_bytes(data.replace(frames + b"7531", frames + b"many"))
    with pytest.raises(UndecodableImage, match="NumberOfFrames is not a whole number"):
        archive.ingest.store_copy(bomb, ACTOR)


def test_rendering_over_the_budget_answers_422_with_the_reason(tmp_path):
    """An instance stored before the budget was lowered (or by an older version)."""
    ct = ct_series(tmp_path / "ct", count=1, size=256)[0]
    first = make_archive(tmp_path)
    first.users.ensure_admin(ADMIN_PASSWORD)
    first.ingest.store_copy(ct, ACTOR)
    first.close()
    archive = make_archive(tmp_path, max_decoded_frame_bytes=64 * 1024)
    from fastapi.testclient import TestClient

    from imageshare.web.server import create_app

    study, series, sop = (str(dcmread(ct).get(k)) for k in
                          ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
    base = f"/dicomweb/studies/{study}/series/{series}/instances/{sop}"
    try:
        with TestClient(create_app(archive)) as client:
            act_as_admin(client, archive)
            for path in (f"{base}/rendered", f"{base}/thumbnail", f"{base}/frames/1/rendered"):
                response = client.get(path, headers={"Accept": "image/jpeg"})
                assert response.status_code == 422, path
                assert response.headers["content-type"] == "application/problem+json"
                assert "per frame" in response.json()["detail"]
    finally:
        archive.close()


def test_frames_decoded_for_wado_rs_are_checked_against_the_budget(tmp_path):
    bomb = rle_bomb(tmp_path / "rle.dcm", 512, 512, real=True)
    archive = make_archive(tmp_path)
    archive.users.ensure_admin(ADMIN_PASSWORD)
    archive.ingest.store_copy(bomb, ACTOR)
    pixel_budget.configure(PixelLimits(max_frame_bytes=1000))
    from fastapi.testclient import TestClient

    from imageshare.web.server import create_app

    ds = dcmread(bomb, stop_before_pixels=True)
    url = (f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/"
           f"instances/{ds.SOPInstanceUID}/frames/1")
    try:
        with TestClient(create_app(archive)) as client:
            act_as_admin(client, archive)
            accept = ('multipart/related; type="application/octet-stream"; '
                      "transfer-syntax=1.2.840.10008.1.2.1")
            response = client.get(url, headers={"Accept": accept})
            assert response.status_code == 422
            assert "per frame" in response.json()["detail"]
    finally:
        archive.close()


def test_transcoding_an_instance_over_the_budget_is_not_acceptable(tmp_path):
    bomb = rle_bomb(tmp_path / "rle.dcm", 512, 512, real=True)
    pixel_budget.configure(PixelLimits(max_frame_bytes=1000))
    with open(bomb, "rb") as stream, pytest.raises(NotAcceptable, match="per frame"):
        transcode(stream, "1.2.840.10008.1.2.1")


def test_mp4_export_and_pixel_cleaning_refuse_an_image_over_the_budget(tmp_path):
    bomb = dcmread(rle_bomb(tmp_path / "cine.dcm", 64, 64, frames=4, real=True))
    pixel_budget.configure(PixelLimits(max_instance_bytes=64 * 64 * 3))
    with pytest.raises(ImageTooLarge, match="per instance"):
        cine_to_mp4(bomb)
    report = BurnedInTextCleaner(ocr=object()).clean(bomb, ("Bomb",))
    assert report.held_back
    assert "ImageTooLarge" in report.reason


def test_mp4_export_decodes_a_cine_within_the_budget(tmp_path):
    cine = dcmread(rle_bomb(tmp_path / "cine.dcm", 64, 64, frames=4, real=True))
    assert cine_to_mp4(cine)[4:8] == b"ftyp"


def test_decodes_beyond_the_concurrency_bound_wait_and_then_answer_busy(tmp_path):
    pixel_budget.configure(PixelLimits(max_concurrent_decodes=1, wait_seconds=0.2))
    header = dcmread(rle_bomb(tmp_path / "a.dcm", 64, 64), stop_before_pixels=True)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with decoding(header):
            holding.set()
            release.wait(5)

    worker = threading.Thread(target=hold)
    worker.start()
    holding.wait(5)
    try:
        from imageshare.domain.errors import ServiceBusy

        with pytest.raises(ServiceBusy) as busy:
            with decoding(header):
                pass
        assert busy.value.http_status == 503
    finally:
        release.set()
        worker.join()
    with decoding(header):  # the slot is free again
        pass


def test_the_budget_counts_decoded_bytes_including_unpacked_single_bits(tmp_path):
    ds = dcmread(rle_bomb(tmp_path / "a.dcm", 100, 100), stop_before_pixels=True)
    ds.BitsAllocated = 1
    assert check_pixel_budget(ds).frame_bytes == 100 * 100
    ds.BitsAllocated, ds.SamplesPerPixel, ds.NumberOfFrames = 16, 3, 7
    assert check_pixel_budget(ds).total_bytes == 100 * 100 * 3 * 2 * 7


def test_rendering_the_reported_12000_pixel_rle_bomb_stays_within_half_a_gigabyte(tmp_path):
    """The red-team file: 2.2 MB of RLE claiming 12000 x 12000 took one /rendered request to
    3.8 GB. Within the default budget it renders, in bounded memory (measured in a process
    of its own)."""
    bomb = rle_bomb(tmp_path / "bomb.dcm", 12000, 12000, real=True)
    assert bomb.stat().st_size < 2_500_000
    script = (
        "import json, resource, sys\n"
        "from imageshare.archive.rendering import RenderOptions, render_frame\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "with open(sys.argv[1], 'rb') as fh:\n"
        "    data = render_frame(fh, 0, RenderOptions())\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'jpeg': len(data), 'grew_kib': after - before}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(bomb)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, check=True)
    measured = json.loads(done.stdout)
    assert measured["jpeg"] > 0
    assert measured["grew_kib"] < 512 * 1024, measured
