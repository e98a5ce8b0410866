"""Colour frames stored as baseline JPEG reach the viewer as stored (no decode, no second
lossy encode), showing the same picture; anything that needs rendering still gets it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import get_frame
from pydicom.pixels import pixel_array

from tests.unit.test_web_pages import SYSTEM

ECHO = "color3d_jpeg_baseline.dcm"  # 120 frames, JPEG baseline, YBR_FULL_422


def test_an_echo_frame_is_sent_as_stored_and_shows_the_same_picture(archive, client):
    source = Path(get_testdata_file(ECHO))
    stored = archive.ingest.store_copy(source, SYSTEM)
    header = dcmread(source, stop_before_pixels=True)
    url = (f"/dicomweb/studies/{stored.study_uid}/series/{stored.series_uid}/instances/"
           f"{stored.sop_instance_uid}/frames/77/rendered")
    sent = client.get(url, headers={"Accept": "image/jpeg"})
    assert sent.status_code == 200 and sent.headers["content-type"] == "image/jpeg"
    ds = dcmread(source)
    assert sent.content == get_frame(ds.PixelData, 76, number_of_frames=120)
    shown = np.asarray(Image.open(io.BytesIO(sent.content)).convert("RGB"), dtype=int)
    with open(source, "rb") as fp:
        decoded = pixel_array(fp, index=76).astype(int)
    assert shown.shape == (int(header.Rows), int(header.Columns), 3)
    assert np.abs(shown - decoded).mean() < 1.0


def test_a_windowed_or_resized_frame_is_still_rendered(archive, client):
    stored = archive.ingest.store_copy(Path(get_testdata_file(ECHO)), SYSTEM)
    base = (f"/dicomweb/studies/{stored.study_uid}/series/{stored.series_uid}/instances/"
            f"{stored.sop_instance_uid}/frames/1/rendered")
    resized = client.get(base, headers={"Accept": "image/jpeg"}, params={"viewport": "64,48"})
    assert Image.open(io.BytesIO(resized.content)).size == (64, 48)
    png = client.get(base, headers={"Accept": "image/png"})
    assert png.content.startswith(b"\x89PNG")


def test_a_quality_asked_for_is_honoured_not_passed_over(archive, client):
    """A viewer on a slow line asks for quality=20: it gets a smaller re-encoded picture,
    not the stored frame (which it gets when it names no quality)."""
    source = Path(get_testdata_file(ECHO))
    stored = archive.ingest.store_copy(source, SYSTEM)
    url = (f"/dicomweb/studies/{stored.study_uid}/series/{stored.series_uid}/instances/"
           f"{stored.sop_instance_uid}/frames/5/rendered")
    as_stored = get_frame(dcmread(source).PixelData, 4, number_of_frames=120)
    low = client.get(url, headers={"Accept": "image/jpeg"}, params={"quality": "20"})
    assert low.status_code == 200 and low.content != as_stored
    assert len(low.content) < len(as_stored)
    assert Image.open(io.BytesIO(low.content)).size == Image.open(io.BytesIO(as_stored)).size
