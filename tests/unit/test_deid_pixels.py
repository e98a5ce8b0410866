"""Burned-in text: blanked by region and by OCR-found words, verified with Tesseract; images
that may still show the patient are held back; the command line and its report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from imageshare.deid.engine import identifiers_of
from imageshare.deid.pixels import BurnedInTextCleaner
from imageshare.deid.profiles import DEFAULT_PROFILES, Profile
from imageshare.deid.pseudonyms import Pseudonyms
from imageshare.deid.service import Deidentifier
from tests.conftest import require

SECRET = b"test-secret-for-pseudonyms-0123456789"
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf"


@pytest.fixture(autouse=True)
def _tesseract():
    require(shutil.which("tesseract") is not None, "Tesseract OCR (Debian package tesseract-ocr)")


def ultrasound_with_text(banner: str, body_text: str = "", frames: int = 1,
                         manufacturer: str = "SonoSite") -> Dataset:
    """A US image (RGB) with white text burned into the banner and, optionally, lower down."""
    rows, cols = 480, 640
    font = ImageFont.truetype(FONT, 22) if shutil.os.path.exists(FONT) else None
    image = Image.new("RGB", (cols, rows), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse((170, 120, 470, 420), fill=(90, 90, 90))
    draw.text((12, 10), banner, fill=(255, 255, 255), font=font)
    if body_text:
        draw.text((200, 430), body_text, fill=(255, 255, 255), font=font)
    pixels = np.asarray(image)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "GARCIA^MARIA", "HX77123", "19810304"
    ds.Modality, ds.Manufacturer = "US", manufacturer
    ds.StudyDate, ds.StudyTime = "20240102", "101010"
    data = np.stack([pixels] * frames) if frames > 1 else pixels
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.FrameTime = 33.3
    ds.set_pixel_data(data, "RGB", 8, generate_instance_uid=False)
    return ds


def read_identifiers(ds: Dataset, identity) -> list[str]:
    cleaner = BurnedInTextCleaner(regions=[])
    frame = ds.pixel_array if int(ds.get("NumberOfFrames", 1)) == 1 else ds.pixel_array[0]
    found = []
    for line in cleaner.read_lines(frame):
        found += [line.words[i] for i in sorted(identity.hits_in_line(list(line.words)))]
    return found


def test_ocr_reads_the_planted_banner_before_cleaning():
    ds = ultrasound_with_text("GARCIA MARIA  HX77123  04/03/1981")
    found = read_identifiers(ds, identifiers_of(ds))
    assert {"GARCIA", "HX77123"} <= {w.upper() for w in found}


def test_banner_region_is_blanked_and_ocr_finds_nothing_after():
    ds = ultrasound_with_text("GARCIA MARIA  HX77123  04/03/1981")
    ids = identifiers_of(ds)
    outcome = Deidentifier(DEFAULT_PROFILES["basic"], Pseudonyms(SECRET)).instance(ds)
    assert not outcome.held_back
    pixels = outcome.report["pixels"]
    assert pixels["regions"] and pixels["identifiers_found"] == []
    assert read_identifiers(outcome.dataset, ids) == []
    assert outcome.dataset.BurnedInAnnotation == "NO"


def test_text_outside_the_regions_is_found_by_ocr_and_blanked():
    ds = ultrasound_with_text("SONOSITE EDGE", body_text="GARCIA HX77123")
    ids = identifiers_of(ds)
    outcome = Deidentifier(DEFAULT_PROFILES["teaching"], Pseudonyms(SECRET)).instance(ds)
    assert not outcome.held_back
    assert outcome.report["pixels"]["blanked_words"] >= 1
    assert read_identifiers(outcome.dataset, ids) == []
    # the rest of the image is untouched (the scan area is still there)
    assert outcome.dataset.pixel_array[270, 320].tolist() == [90, 90, 90]


def test_cine_loops_are_blanked_on_every_frame():
    ds = ultrasound_with_text("GARCIA MARIA HX77123", frames=6)
    outcome = Deidentifier(DEFAULT_PROFILES["basic"], Pseudonyms(SECRET)).instance(ds)
    frames = outcome.dataset.pixel_array
    assert frames.shape == (6, 480, 640, 3)
    assert int(frames[:, :40, :, :].max()) == 0


def test_without_clean_pixel_data_a_possibly_burned_in_image_is_held_back():
    ds = ultrasound_with_text("GARCIA MARIA")
    profile = Profile("metadata-only", frozenset({"retain_modified_dates"}))
    outcome = Deidentifier(profile, Pseudonyms(SECRET)).instance(ds)
    assert outcome.held_back and "burned-in" in outcome.report["reason"]


def test_real_ultrasound_file_loses_its_banner():
    ds = dcmread(get_testdata_file("US1_UNCR.dcm"))
    before = {w for w, _ in BurnedInTextCleaner(regions=[]).read_words(ds.pixel_array)}
    assert "BAPTIST" in before
    outcome = Deidentifier(DEFAULT_PROFILES["basic"], Pseudonyms(SECRET)).instance(ds)
    after = {w for w, _ in BurnedInTextCleaner(regions=[]).read_words(
        outcome.dataset.pixel_array)}
    assert "BAPTIST" not in after


def test_command_line_deidentifies_a_folder_into_a_zip_with_a_report(tmp_path):
    source = tmp_path / "Garcia Maria"  # a patient's name in the input path
    source.mkdir()
    for i in range(2):
        ultrasound_with_text("GARCIA MARIA HX77123").save_as(source / f"GARCIA_{i}.dcm",
                                                              enforce_file_format=True)
    (source / "notes.txt").write_text("not dicom")
    out = tmp_path / "out" / "case.zip"
    done = subprocess.run(
        [sys.executable, "-m", "imageshare", "deidentify", str(source), "--out", str(out),
         "--format", "zip", "--profile", "teaching", "--data-dir", str(tmp_path / "var"),
         "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 written, 0 held back" in done.stdout
    with zipfile.ZipFile(out) as archive:
        names = archive.namelist()
        assert names == ["S0001/SE0001/IM000001.dcm", "S0002/SE0001/IM000001.dcm"]
        for name in names:
            data = archive.read(name)
            assert b"GARCIA" not in data.upper() and b"HX77123" not in data
    report = json.loads((out.parent / "case-report.json").read_text())
    assert report["written"] == 2
    assert all("Garcia" not in f["input"] for f in report["files"])
    assert report["files"][0]["pixels"]["checked"] is True


def test_encapsulated_pdf_reports_are_held_back_and_the_preamble_is_cleared(tmp_path):
    from pydicom.uid import generate_uid as new_uid

    ds = ultrasound_with_text("X")
    ds.preamble = b"GARCIA MARIA".ljust(128, b"\0")
    outcome = Deidentifier(DEFAULT_PROFILES["basic"], Pseudonyms(SECRET)).instance(ds)
    assert outcome.dataset.preamble == b"\0" * 128
    pdf = Dataset()
    pdf.SOPClassUID, pdf.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.104.1", new_uid()
    pdf.PatientName, pdf.PatientID = "GARCIA^MARIA", "HX77123"
    pdf.EncapsulatedDocument = b"%PDF-1.4 GARCIA MARIA\n%%EOF\n"
    held = Deidentifier(DEFAULT_PROFILES["basic"], Pseudonyms(SECRET)).instance(pdf)
    assert held.held_back and "encapsulated" in held.report["reason"]
