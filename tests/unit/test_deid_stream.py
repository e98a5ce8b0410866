"""Streaming de-identification (pixel data that needs no cleaning is copied byte for byte,
never loaded), half-blanked burned-in dates, and the exit codes of ``imageshare deidentify``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from pydicom import dcmread
from pydicom.data import get_testdata_file

from imageshare.deid.profiles import DEFAULT_PROFILES, Profile
from imageshare.deid.pseudonyms import Pseudonyms
from imageshare.deid.service import TRUST_PIXELS, Deidentifier
from imageshare.verify import Verifier
from tests import corpus
from tests.conftest import require
from tests.factory import ct_series, us_cine

SECRET = b"stream-secret-0123456789abcdefgh"


def _pixel_bytes(path: Path) -> bytes:
    ds = dcmread(path)
    return bytes(ds.PixelData)


def test_pixel_data_that_needs_no_cleaning_is_copied_as_stored_without_being_loaded(tmp_path):
    source = us_cine(tmp_path / "in", frames=40, rows=240, cols=320)  # 9.2 MB of pixels
    deidentifier = Deidentifier(Profile("attributes", frozenset({"retain_modified_dates"})),
                                Pseudonyms(SECRET), verifier=Verifier(ocr="never"),
                                burned_in=TRUST_PIXELS)
    out = tmp_path / "out.dcm"
    tracemalloc.start()
    with open(source, "rb") as fp, open(out, "w+b") as target:
        outcome = deidentifier.write(fp, target)
    _current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert not outcome.held_back
    assert outcome.report["pixel_data"] == "copied as stored"
    assert peak < 3_000_000, f"{peak} bytes held in memory for a 9.2 MB loop"
    assert _pixel_bytes(out) == _pixel_bytes(source)
    assert dcmread(out).PatientName != dcmread(source).PatientName


def test_compressed_ct_without_burned_in_text_keeps_its_compressed_pixels(tmp_path):
    source = Path(get_testdata_file("JPEG2000.dcm"))
    ds = dcmread(source)
    ds.BurnedInAnnotation = "NO"
    copy = tmp_path / "ct-j2k.dcm"
    ds.save_as(copy)
    deidentifier = Deidentifier(DEFAULT_PROFILES["basic"], Pseudonyms(SECRET),
                                verifier=Verifier())
    out = tmp_path / "out.dcm"
    with open(copy, "rb") as fp, open(out, "w+b") as target:
        outcome = deidentifier.write(fp, target)
    assert not outcome.held_back, outcome.report.get("reason")
    # the encoder's comment is left behind, the coded image copied as it is
    assert outcome.report["pixel_data"] == "copied without the text its frames carried"
    assert outcome.report["compressed_extras_removed"] == 1
    assert outcome.report["verification"]["findings"] == []
    assert b"Kakadu" in _pixel_bytes(copy) and b"Kakadu" not in _pixel_bytes(out)
    assert np.array_equal(dcmread(out).pixel_array, ds.pixel_array)
    assert dcmread(out).file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID


def test_a_date_of_birth_in_the_image_is_blanked_with_its_whole_line(tmp_path):
    """The reported leak: "DOB 01/0" left legible. The cleaned box covers the whole line with
    a margin, and the verifier's own OCR reads nothing of it afterwards."""
    require(shutil.which("tesseract") is not None, "Tesseract OCR (tesseract-ocr)")
    image = Image.new("RGB", (320, 240), (0, 0, 0))
    font = ImageFont.truetype(corpus.FONT, 20)
    ImageDraw.Draw(image).text((40, 150), "DOB 04/03/1981", fill=(255, 255, 255), font=font)
    ds = dcmread(us_cine(tmp_path / "in", frames=1, rows=240, cols=320))
    del ds.NumberOfFrames, ds.FrameTime, ds.CineRate, ds.FrameIncrementPointer
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"
    ds.PatientBirthDate = corpus.BIRTH_DATE
    ds.PixelData = np.asarray(image).tobytes()
    deidentifier = Deidentifier(DEFAULT_PROFILES["basic"], Pseudonyms(SECRET),
                                verifier=Verifier())
    outcome = deidentifier.instance(ds)
    assert not outcome.held_back, outcome.report.get("reason")
    assert outcome.report["pixels"]["blanked_lines"] >= 1
    left = ds.pixel_array
    x0, y0, x1, y1 = ImageDraw.Draw(image).textbbox((40, 150), "DOB 04/03/1981", font=font)
    assert int(left[y0 - 2:y1 + 2, x0 - 2:x1 + 2].max()) == 0  # every stroke, with a margin
    assert outcome.report["verification"]["findings"] == []


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imageshare", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture()
def inputs(tmp_path):
    folder = tmp_path / "in"
    ct_series(folder / "ct", count=2, size=64, BurnedInAnnotation="NO")
    corpus.encapsulated_pdf(folder, "1.2.826.0.1.3680043.8.498.424242")
    return folder


def test_deidentify_exits_0_when_everything_was_written(inputs, tmp_path):
    (inputs / "pdf.dcm").unlink()
    done = _cli("deidentify", str(inputs), "--out", str(tmp_path / "out"), "--quiet",
                "--data-dir", str(tmp_path / "var"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 written, 0 held back" in done.stdout


def test_deidentify_exits_3_with_the_count_when_files_are_held_back(inputs, tmp_path):
    out = tmp_path / "out"
    done = _cli("deidentify", str(inputs), "--out", str(out), "--quiet", "--data-dir",
                str(tmp_path / "var"))
    assert done.returncode == 3, done.stdout + done.stderr
    assert "1 file(s) held back for review" in done.stdout
    report = json.loads((out / "deidentification-report.json").read_text())
    assert report["written"] == 2 and report["held_back"] == 1
    held = [f for f in report["files"] if f.get("held_back")]
    assert "encapsulated" in held[0]["reason"]
    written = [f for f in report["files"] if "output" in f]
    assert all(f["verification"]["findings"] == [] for f in written)
    assert sorted(p.name for p in out.iterdir()) == ["S0001", "deidentification-report.json"]


def test_deidentify_exits_1_on_failure(inputs, tmp_path):
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff")
    done = _cli("deidentify", str(broken), "--out", str(tmp_path / "out"), "--quiet",
                "--data-dir", str(tmp_path / "var"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "failed:" in done.stdout
    done = _cli("deidentify", str(inputs), "--out", str(tmp_path / "out2"), "--profile",
                "no-such-profile", "--data-dir", str(tmp_path / "var"))
    assert done.returncode == 1 and "unknown profile" in done.stderr


def test_deidentify_help_documents_the_exit_codes():
    done = _cli("deidentify", "--help", timeout=60)
    assert done.returncode == 0
    for line in ("0  every input file", "3  some files were held back", "1  failure"):
        assert line in done.stdout


@pytest.mark.parametrize("mode", ["streamed", "in memory"])
def test_a_cut_off_image_in_a_folder_fails_with_the_reason_and_is_not_written(
        tmp_path, mode):
    folder = tmp_path / "in"
    (whole,) = ct_series(folder, count=1, size=64, BurnedInAnnotation="NO", Modality="MR")
    cut = whole.read_bytes()[:-3000]
    if mode == "streamed":  # the element's length says what is there: the image needs more
        ds = dcmread(whole)
        ds.PixelData = ds.PixelData[:-3000]
        ds.save_as(whole)
    else:  # the element's length runs past the end of the file
        whole.write_bytes(cut)
    out = tmp_path / "out"
    done = _cli("deidentify", str(folder), "--out", str(out), "--quiet", "--data-dir",
                str(tmp_path / "var"))
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads((out / "deidentification-report.json").read_text())
    assert report["written"] == 0 and report["failed"] == 1
    assert "cut off" in report["files"][0]["error"]
    assert not (out / "S0001").exists()
