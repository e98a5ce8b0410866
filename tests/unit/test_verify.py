"""The independent verifier: every place an identifier can hide in an output is found and named
(kind and place, never the value); clean outputs give no finding; the command line."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import zipfile
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence

from imageshare.deid.profiles import DEFAULT_PROFILES
from imageshare.deid.pseudonyms import Pseudonyms
from imageshare.deid.service import Deidentifier
from imageshare.verify import SourceIdentity, Verifier
from tests import corpus
from tests.conftest import require

SECRET = b"verify-secret-0123456789abcdefgh"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The corpus CT and its clean de-identified copy (basic profile)."""
    folder = tmp_path_factory.mktemp("verify")
    source = corpus.ct(folder, "1.2.826.0.1.3680043.8.498.771905")
    out = folder / "clean.dcm"
    deidentifier = Deidentifier(DEFAULT_PROFILES["basic"], Pseudonyms(SECRET))
    with open(source, "rb") as fp, open(out, "w+b") as target:
        assert not deidentifier.write(fp, target).held_back
    return source, out


@pytest.fixture(scope="module")
def identity(made):
    return Verifier.identity([dcmread(made[0], stop_before_pixels=True)])


def _check(ds: Dataset, identity: SourceIdentity, ocr: str = "never") -> list:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return Verifier(ocr=ocr).check_dicom(buffer, identity, "out.dcm")


def test_a_clean_de_identified_copy_gives_no_finding(made, identity):
    assert _check(dcmread(made[1]), identity) == []


def _plant(vector: str, ds: Dataset) -> None:
    item = Dataset()
    if vector == "name reversed, lower case, deep in a sequence":
        inner = Dataset()
        inner.TextValue = "seen: maria garcia"
        item.ContentSequence = Sequence([inner])
        deeper = Dataset()
        deeper.ContentSequence = Sequence([item])
        ds.ContentSequence = Sequence([deeper])
    elif vector == "private element with a creator":
        ds.private_block(0x0071, "SITE 1", create=True).add_new(0x01, "LO", "Garcia^Maria")
    elif vector == "private element without a creator":
        ds.add_new(0x00431010, "LO", corpus.PATIENT_ID)
    elif vector == "UN value":
        ds.add_new(0x00291001, "UN", f"NHS {corpus.NHS_NUMBER}".encode())
    elif vector == "NHS number with spaces":
        ds.ImageComments = "943 476 5919"
    elif vector == "birth date in UK form":
        ds.ImageComments = "born 04/03/1981"
    elif vector == "split across elements":
        ds.ImageComments = "943 476"
        ds.DerivationDescription = "5919"
    elif vector == "original UID in a reference":
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = dcmread(ds.filename_source).SOPInstanceUID
        ds.ReferencedImageSequence = Sequence([ref])
    elif vector == "original date kept":
        ds.InstanceCreationDate = corpus.STUDY_DATE
    elif vector == "institution name":
        ds.InstitutionName = corpus.INSTITUTION
    elif vector == "staff number":
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator = corpus.STAFF_NUMBER, "99STAFF"
        code.CodeMeaning = "staff"
        ds.PerformedProtocolCodeSequence = Sequence([code])
    elif vector == "preamble":
        ds.preamble = b"GARCIA MARIA".ljust(128, b"\0")
    elif vector == "file meta":
        ds.file_meta.SourceApplicationEntityTitle = "GARCIA"
    elif vector == "after the pixel data":
        ds.private_block(0x7FE1, "TRAILER", create=True).add_new(0x01, "LO", "Okafor")
    elif vector == "overlay description":
        ds.add_new(0x60000022, "LO", "for Lindqvist")
    elif vector == "other character set":
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageComments = "Señora García María"
    else:
        raise AssertionError(vector)


VECTORS = [
    ("name reversed, lower case, deep in a sequence", "patient name"),
    ("private element with a creator", "patient name"),
    ("private element without a creator", "patient ID"),
    ("UN value", "NHS number"),
    ("NHS number with spaces", "NHS number"),
    ("birth date in UK form", "birth date"),
    ("split across elements", "NHS number"),
    ("original UID in a reference", "original UID"),
    ("original date kept", "original date"),
    ("institution name", "institution"),
    ("staff number", "staff or institution code"),
    ("preamble", "patient name"),
    ("file meta", "patient name"),
    ("after the pixel data", "person name"),
    ("overlay description", "person name"),
    ("other character set", "patient name"),
]


@pytest.mark.parametrize(("vector", "kind"), VECTORS, ids=[v for v, _ in VECTORS])
def test_an_identifier_planted_anywhere_in_a_dicom_output_is_found(made, identity, vector,
                                                                   kind):
    ds = dcmread(made[1])
    ds.filename_source = made[0]
    _plant(vector, ds)
    del ds.filename_source
    findings = _check(ds, identity)
    assert any(f.kind.startswith(kind) for f in findings), (vector, findings)
    report = json.dumps([f.as_dict() for f in findings])
    for secret in ("GARCIA", "Garcia", corpus.PATIENT_ID, corpus.NHS_NUMBER, "943 476",
                   corpus.STAFF_NUMBER, "Okafor", "Lindqvist", corpus.STUDY_DATE):
        assert secret not in report  # findings say what and where, never the value


def _text_image(text: str, size: tuple[int, int] = (320, 120)) -> np.ndarray:
    image = Image.new("L", size, 0)
    font = ImageFont.truetype(corpus.FONT, 22)
    ImageDraw.Draw(image).text((10, 40), text, fill=255, font=font)
    return np.asarray(image)


def test_ocr_finds_text_in_pixels_icons_and_overlays(made, identity):
    require(shutil.which("tesseract") is not None, "Tesseract OCR (tesseract-ocr)")
    from pydicom.pixels.utils import pack_bits

    ds = dcmread(made[1])
    pixels = _text_image(f"{corpus.GIVEN} {corpus.FAMILY}", (256, 256)).astype(np.uint16)
    ds.PixelData = pixels.tobytes()
    icon = Dataset()
    icon.Rows, icon.Columns = 120, 320
    icon.SamplesPerPixel, icon.PhotometricInterpretation = 1, "MONOCHROME2"
    icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 8, 8, 7, 0
    icon.PixelData = _text_image(corpus.PATIENT_ID).tobytes()
    ds.IconImageSequence = Sequence([icon])
    bits = (_text_image("DOB 04/03/1981", (256, 256)) > 127).astype(np.uint8)
    ds.add_new(0x60000010, "US", 256)
    ds.add_new(0x60000011, "US", 256)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", pack_bits(bits.ravel()))
    places = {f.where.split(",")[0] for f in _check(ds, identity, ocr="always")}
    assert {"OCR of pixels", "OCR of icon image 1", "OCR of overlay 6000"} <= places


def test_pdf_text_png_jpeg_and_mp4_metadata_zip_comments_and_names_are_searched(identity):
    from fpdf import FPDF

    verifier = Verifier(ocr="never")
    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("helvetica", size=12)
    pdf.cell(0, 10, f"Report for {corpus.GIVEN} {corpus.FAMILY}")
    data = bytes(pdf.output())
    assert b"GARCIA" not in data.upper()  # compressed: only the PDF's text shows it
    assert {f.where for f in verifier.check_pdf(data, identity, "r.pdf")} == {"text of PDF"}

    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", f"{corpus.FAMILY} scan")
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG", pnginfo=info)
    assert verifier.check_image(png.getvalue(), identity, "a.png")
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, "JPEG", comment=corpus.PATIENT_ID.encode())
    assert verifier.check_image(jpeg.getvalue(), identity, "a.jpg")

    import av

    mp4 = io.BytesIO()
    with av.open(mp4, "w", format="mp4") as container:
        container.metadata["title"] = f"{corpus.GIVEN} {corpus.FAMILY}"
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert any(f.where == "video metadata" for f in verifier.check_video(
        mp4.getvalue(), identity, "a.mp4"))

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.comment = f"export of {corpus.FAMILY}".encode()
        zf.writestr(f"S0001/{corpus.FAMILY}/IM1.dcm", b"not dicom")
    archive.seek(0)
    wheres = {f.where for f in verifier.check_zip(archive, identity, "e.zip")}
    assert {"zip comment", "file or folder name"} <= wheres


def test_verification_is_cheap_next_to_de_identification(made, identity):
    """No OCR needed: reading the output's header, its raw bytes and its values."""
    import time

    verifier = Verifier(ocr="never")
    with open(made[1], "rb") as fp:
        started = time.perf_counter()
        for _ in range(20):
            fp.seek(0)
            assert verifier.check_dicom(fp, identity, "out") == []
        per_file = (time.perf_counter() - started) / 20
    assert per_file < 0.05


def test_verify_command_passes_a_clean_export_and_reports_a_leaky_one(made, tmp_path):
    source, clean = made
    export = tmp_path / "export"
    export.mkdir()
    shutil.copy(clean, export / "IM000001.dcm")
    command = [sys.executable, "-m", "imageshare", "verify", str(export), "--source",
               str(source), "--ocr", "never", "--data-dir", str(tmp_path / "var")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 finding(s)" in done.stdout
    leaky = dcmread(clean)
    leaky.ImageComments = f"{corpus.GIVEN} {corpus.FAMILY}"
    leaky.save_as(export / "IM000002.dcm")
    report = tmp_path / "findings.json"
    done = subprocess.run(command + ["--report", str(report)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "IM000002.dcm: patient name in (0020,4000) ImageComments" in done.stdout
    assert corpus.FAMILY not in done.stdout
    assert json.loads(report.read_text())["findings"][0]["file"] == "IM000002.dcm"


def test_bare_verify_scrubs_the_blob_store_instead_of_an_export(tmp_path):
    done = subprocess.run([sys.executable, "-m", "imageshare", "verify", "--data-dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "0 blob(s) checked" in done.stdout and "0 corrupt, 0 missing" in done.stdout


def test_identity_collects_names_in_every_order_ids_dates_and_uids(made):
    ds = dcmread(made[0], stop_before_pixels=True)
    identity = Verifier.identity([ds])
    assert identity.in_text("MARIA GARCIA") and identity.in_text("garcia, maria")
    assert identity.in_text("04.03.1981") and identity.in_text("1981-03-04")
    assert identity.in_text(f"uid {ds.StudyInstanceUID}")
    assert not identity.in_text("GARCIAS")  # a longer word is not the name
    other = deepcopy(ds)
    other.PatientName = "Smith^John"
    union = Verifier.identity([ds, other])
    assert union.in_text("John Smith") and union.in_text("Maria")


def test_the_verifier_shares_nothing_with_the_de_identification_engine():
    import ast

    import imageshare.verify as package

    for path in Path(package.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith("imageshare.deid"), (path.name, name)
