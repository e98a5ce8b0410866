"""Text hidden in compressed frames (JPEG comments and application segments anywhere in the
frame, in UTF-16, after the end-of-image marker; JPEG 2000 comments) never leaves in a
de-identified copy, and the verifier finds it when it is there."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from imageshare.deid.frame_extras import FrameUnreadable, strip_extras
from imageshare.deid.profiles import DEFAULT_PROFILES
from imageshare.deid.pseudonyms import Pseudonyms
from imageshare.deid.service import Deidentifier
from imageshare.verify import Verifier
from tests.factory import ct_series

SECRET = b"extras-secret-0123456789abcdefgh"
NAME, PID = "Quennell^Marguerite", "HX77120"


def _segment(marker: int, body: bytes) -> bytes:
    return b"\xff" + bytes([marker]) + struct.pack(">H", len(body) + 2) + body


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _hide(frame: bytes) -> bytes:
    """``frame`` with the patient's name put where the old check did not look: a comment
    after 64 KB of other segments, an Exif-like APP1 segment in UTF-16, between the scan's
    tables, and after the end-of-image marker."""
    filler = _segment(0xFE, b"x" * 65000)
    hidden = (filler + _segment(0xFE, f"Patient {NAME} {PID}".encode())
              + _segment(0xE1, f"Exif {NAME}".encode("utf-16-le"))
              + _segment(0xEB, b"vendor data " + PID.encode()))
    return frame[:2] + hidden + frame[2:] + f"{NAME} born 19700101".encode()


def _source(folder: Path) -> tuple[Path, np.ndarray]:
    """An 8-bit MR-like image, JPEG baseline, whose frame hides the patient's name."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = dcmread(ct_series(folder, count=1, patient_id=PID, patient_name=NAME)[0])
    ds.Modality, ds.BurnedInAnnotation = "MR", "NO"
    pixels = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) % 251).astype(np.uint8)
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    for keyword in ("RescaleIntercept", "RescaleSlope", "WindowCenter", "WindowWidth"):
        delattr(ds, keyword)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([_hide(_jpeg(pixels))])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    path = folder / "mr-jpeg.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, dcmread(path).pixel_array


def _leaks(data: bytes) -> list[str]:
    forms = []
    for text in (NAME, "Quennell", "Marguerite", PID):
        for codec in ("latin-1", "utf-16-le", "utf-16-be"):
            if text.encode(codec) in data or text.upper().encode(codec) in data:
                forms.append(f"{text} ({codec})")
    return forms


def _deidentifier() -> Deidentifier:
    return Deidentifier(DEFAULT_PROFILES["basic"], Pseudonyms(SECRET), verifier=Verifier())


def test_a_streamed_copy_leaves_every_hidden_segment_and_trailing_byte_behind(tmp_path):
    source, pixels = _source(tmp_path / "in")
    assert _leaks(source.read_bytes())
    out = tmp_path / "out.dcm"
    with open(source, "rb") as fp, open(out, "w+b") as target:
        outcome = _deidentifier().write(fp, target)
    assert not outcome.held_back, outcome.report.get("reason")
    assert outcome.report["compressed_extras_removed"] == 5
    written = out.read_bytes()
    assert _leaks(written) == []
    copy = dcmread(out)
    assert copy.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert np.array_equal(copy.pixel_array, pixels)  # the image itself untouched
    (frame,) = generate_frames(copy.PixelData, number_of_frames=1)
    assert frame.rstrip(b"\0").endswith(b"\xff\xd9")


def test_an_instance_in_memory_is_cleaned_the_same_way(tmp_path):
    source, pixels = _source(tmp_path / "in")
    outcome = _deidentifier().instance(dcmread(source))
    assert not outcome.held_back, outcome.report.get("reason")
    assert outcome.dataset is not None
    buffer = io.BytesIO()
    outcome.dataset.save_as(buffer, enforce_file_format=True)
    assert _leaks(buffer.getvalue()) == []
    assert np.array_equal(dcmread(io.BytesIO(buffer.getvalue())).pixel_array, pixels)


def test_a_name_in_a_kept_colour_profile_holds_the_instance_back(tmp_path):
    source, _ = _source(tmp_path / "in")
    ds = dcmread(source)
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    icc = _segment(0xE2, b"ICC_PROFILE\0\x01\x01" + f"desc {NAME}".encode())
    ds.PixelData = encapsulate([frame[:2] + icc + frame[2:]])
    outcome = _deidentifier().instance(ds)
    assert outcome.held_back
    assert "JPEG" in outcome.report["reason"]


def test_a_frame_whose_markers_cannot_be_followed_is_held_back(tmp_path):
    source, _ = _source(tmp_path / "in")
    ds = dcmread(source)
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    ds.PixelData = encapsulate([frame[:2] + b"\xff\xfe\xff\xff" + NAME.encode()])
    path = tmp_path / "broken.dcm"
    ds.save_as(path)
    with open(path, "rb") as fp, open(tmp_path / "out.dcm", "w+b") as target:
        outcome = _deidentifier().write(fp, target)
    assert outcome.held_back
    assert "cannot be read" in outcome.report["reason"]


def test_jpeg_2000_comments_and_trailing_bytes_are_removed_and_the_image_kept():
    ds = dcmread(get_testdata_file("JPEG2000.dcm"))
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    siz_end = 4 + struct.unpack(">H", frame[4:6])[0]  # after SOC and SIZ
    comment = b"\xff\x64" + struct.pack(">HH", len(NAME) + 4, 1) + NAME.encode()
    hidden = frame[:siz_end] + comment + frame[siz_end:] + NAME.encode()
    stripped = strip_extras(hidden)
    assert stripped.removed == strip_extras(frame).removed + 2
    assert NAME.encode() not in stripped.frame
    ds.PixelData = encapsulate([stripped.frame])
    assert np.array_equal(ds.pixel_array, dcmread(get_testdata_file("JPEG2000.dcm")).pixel_array)


def test_a_jpeg_without_its_end_is_unreadable():
    with pytest.raises(FrameUnreadable):
        strip_extras(_jpeg(np.zeros((8, 8), np.uint8))[:-2])


def test_the_verifier_finds_the_name_anywhere_in_a_frame_it_did_not_write(tmp_path):
    source, _ = _source(tmp_path / "in")
    identity = Verifier.identity([dcmread(source, stop_before_pixels=True)])
    plain = dcmread(source)
    plain.PatientName, plain.PatientID = "Anon", "X1"
    plain.StudyInstanceUID = plain.SeriesInstanceUID = plain.SOPInstanceUID = generate_uid()
    plain.PatientBirthDate = ""
    buffer = io.BytesIO()
    plain.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    findings = Verifier(ocr="never").check_dicom(buffer, identity, "out.dcm")
    wheres = {f.where for f in findings}
    assert any("pixel data" in where for where in wheres), findings
    clean = strip_extras(next(generate_frames(plain.PixelData, number_of_frames=1))).frame
    plain.PixelData = encapsulate([clean])
    buffer = io.BytesIO()
    plain.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    assert not [f for f in Verifier(ocr="never").check_dicom(buffer, identity, "out.dcm")
                if "pixel data" in f.where]


def test_a_multi_frame_instance_in_split_fragments_keeps_every_frame_and_its_offsets(tmp_path):
    source, _ = _source(tmp_path / "in")
    ds = dcmread(source)
    images = [np.full((64, 64), 40 * i, np.uint8) for i in range(1, 5)]
    ds.NumberOfFrames = len(images)
    ds.PixelData = encapsulate([_hide(_jpeg(image)) for image in images],
                               fragments_per_frame=2, has_bot=True)
    path = tmp_path / "cine.dcm"
    ds.save_as(path, enforce_file_format=True)
    expected = dcmread(path).pixel_array
    out = tmp_path / "out.dcm"
    with open(path, "rb") as fp, open(out, "w+b") as target:
        outcome = _deidentifier().write(fp, target)
    assert not outcome.held_back, outcome.report.get("reason")
    assert outcome.report["compressed_extras_removed"] == 5 * len(images)
    assert _leaks(out.read_bytes()) == []
    copy = dcmread(out)
    assert np.array_equal(copy.pixel_array, expected)
    offsets = np.frombuffer(copy.PixelData[8:8 + 4 * len(images)], "<u4")
    starts = [0]
    for frame in generate_frames(copy.PixelData, number_of_frames=len(images)):
        starts.append(starts[-1] + 8 + len(frame))
    assert list(offsets) == starts[:-1]


def test_a_frame_too_large_to_walk_is_refused_before_it_is_read(monkeypatch):
    from imageshare.deid import frame_extras

    monkeypatch.setattr(frame_extras, "MAX_FRAME_BYTES", 500)
    frame = _jpeg(np.zeros((64, 64), np.uint8))
    pieces = [frame[:200], frame[200:]]
    with pytest.raises(FrameUnreadable, match="too large"):
        list(frame_extras.frames_of(pieces + [b"x" * 500]))
    items = io.BytesIO(struct.pack("<HHL", 0xFFFE, 0xE000, 2000) + b"\0" * 2000)
    with pytest.raises(FrameUnreadable, match="too large"):
        next(frame_extras.encapsulated_items(items, 2008))
