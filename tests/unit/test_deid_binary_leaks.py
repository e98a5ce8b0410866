"""Leaks through binary and numeric values, found by a red team, closed in the de-identifier
and caught by the independent verifier: pixel data nested in a sequence item, binary
attributes the table does not name (documents, compressed text), ICC profiles with UTF-16
text, source dates in numbers (IS, DS), and staff or institution words in coded strings; and
a false positive: a short numeric patient ID found in a window width."""

from __future__ import annotations

import io
import struct
import zlib
from copy import deepcopy

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence

from imageshare.deid.engine import AttributeCleaner
from imageshare.deid.profiles import Profile
from imageshare.deid.pseudonyms import Pseudonyms
from imageshare.deid.service import TRUST_PIXELS, Deidentifier
from imageshare.verify import SourceIdentity, Verifier
from tests.factory import ct_header

SECRET = b"binary-leaks-secret-0123456789ab"
BIRTH_DATE, STUDY_DATE = "19810304", "20240315"
PATIENT_ID = "PAT123456"
BASIC = Profile("basic", frozenset())
FULL_DATES = Profile("full-dates", frozenset({"retain_full_dates"}))
MODIFIED_DATES = Profile("modified-dates", frozenset({"retain_modified_dates"}))
PROTOCOL = 0x00400260  # Performed Protocol Code Sequence: its items hold no images
NESTED_PIXELS = "pixel data inside a sequence item"
KEPT_DOCUMENT = "document left in the data set"


def _source(patient_id: str = PATIENT_ID) -> Dataset:
    """A CT header of one patient with staff and institution, as a Part 10 data set."""
    ds = ct_header("Smith^John", patient_id, BIRTH_DATE, STUDY_DATE)
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = "Houseman^Gregory"
    ds.OperatorsName = "Cole^Ann"
    ds.InstitutionName = "Kent Springfield Hospital"
    return ds


def _with_image(ds: Dataset) -> Dataset:
    """``ds`` with a small blank 16-bit image (no burned-in text)."""
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.BurnedInAnnotation = "NO"
    ds.PixelData = np.zeros((8, 8), np.uint16).tobytes()
    return ds


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _outcome(source: Dataset, profile: Profile = BASIC):
    """The de-identifier's outcome for ``source``, verified by the verifier."""
    deidentifier = Deidentifier(profile, Pseudonyms(SECRET), verifier=Verifier(ocr="never"),
                                burned_in=TRUST_PIXELS)
    return deidentifier.instance(deepcopy(source))


def _cleaned(source: Dataset, profile: Profile = BASIC) -> tuple[Dataset, dict]:
    """``source`` after the attribute cleaner, and its report."""
    ds = deepcopy(source)
    report = AttributeCleaner(profile, Pseudonyms(SECRET)).apply(ds)
    return ds, report.as_dict() | {"_report": report}


def _identity(source: Dataset, keep: frozenset[str] = frozenset()) -> SourceIdentity:
    return Verifier.identity([source], keep)


def _findings(output: Dataset, identity: SourceIdentity, raw: bool = True) -> list:
    """What the verifier finds in ``output``: written as a Part 10 file (read by the raw
    reader) or without its preamble (read with pydicom)."""
    buffer = io.BytesIO()
    if raw:
        output.save_as(buffer, enforce_file_format=True)
    else:
        output.preamble = None
        output.save_as(buffer, enforce_file_format=False)
        assert buffer.getvalue()[128:132] != b"DICM"
    buffer.seek(0)
    return Verifier(ocr="never").check_dicom(buffer, identity, "out.dcm")


def _kinds(findings: list) -> set[str]:
    return {f.kind for f in findings}


def _output(**values: object) -> Dataset:
    """A de-identified-looking output: new UIDs, a pseudonym, and ``values``."""
    ds = _source("PSEUDO99")
    ds.PatientName = "PSEUDO99"
    for keyword in ("PatientBirthDate", "ReferringPhysicianName", "OperatorsName",
                    "InstitutionName"):
        delattr(ds, keyword)
    ds.StudyDate = ds.SeriesDate = "19000101"
    ds.StudyTime = "000000"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


RAW_AND_PYDICOM = pytest.mark.parametrize("raw", [True, False], ids=["raw", "pydicom"])


# -- 1. pixel data nested in a sequence item ---------------------------------------------------

def _nested_thumbnail(ds: Dataset) -> Dataset:
    item = _item(Rows=4, Columns=4, SamplesPerPixel=1, BitsAllocated=8)
    item.add_new(0x7FE00010, "OB", bytes(range(16)))
    ds.add_new(PROTOCOL, "SQ", Sequence([item]))
    return ds


def test_the_engine_removes_pixel_data_nested_in_a_sequence_item():
    source = _with_image(_nested_thumbnail(_source()))
    source[PROTOCOL].value[0].add_new(0x7FE00008, "OF", b"\0" * 16)
    outcome = _outcome(source)
    assert not outcome.held_back, outcome.report
    item = outcome.dataset[PROTOCOL].value[0]
    assert 0x7FE00010 not in item and 0x7FE00008 not in item
    assert outcome.dataset.PixelData == source.PixelData  # the image itself stays


@RAW_AND_PYDICOM
def test_the_verifier_flags_pixel_data_nested_in_a_sequence_item(raw):
    findings = _findings(_nested_thumbnail(_output()), _identity(_source()), raw)
    assert NESTED_PIXELS in _kinds(findings)


def test_the_verifier_flags_encapsulated_pixel_data_nested_in_a_sequence_item():
    """Undefined length pixel data in an item: read as its fragments, not as a sequence."""
    output = _output()
    output.add_new(PROTOCOL, "SQ", Sequence([_item(Rows=4)]))
    buffer = io.BytesIO()
    output.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    # append, after the item's Rows, encapsulated pixel data with one fragment
    fragments = (struct.pack("<HHL", 0xFFFE, 0xE000, 0)
                 + struct.pack("<HHL", 0xFFFE, 0xE000, 4) + b"\xff\xd8\xff\xd9"
                 + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    element = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + fragments
    rows = struct.pack("<HH2sH", 0x0028, 0x0010, b"US", 2) + struct.pack("<H", 4)
    at = data.index(rows) + len(rows)
    data = data[:at] + element + data[at:]
    # the item and sequence lengths grow by the element's length
    item_at = data.rindex(struct.pack("<HH", 0xFFFE, 0xE000), 0, at)
    (item_length,) = struct.unpack_from("<L", data, item_at + 4)
    data = data[:item_at + 4] + struct.pack("<L", item_length + len(element)) + data[item_at + 8:]
    sequence_at = data.index(struct.pack("<HH2sH", 0x0040, 0x0260, b"SQ", 0))
    (sequence_length,) = struct.unpack_from("<L", data, sequence_at + 8)
    data = (data[:sequence_at + 8] + struct.pack("<L", sequence_length + len(element))
            + data[sequence_at + 12:])
    findings = Verifier(ocr="never").check_dicom(io.BytesIO(data), _identity(_source()),
                                                 "out.dcm")
    assert NESTED_PIXELS in _kinds(findings), findings


def test_the_verifier_still_reads_icon_images_with_ocr_only():
    output = _output()
    icon = _item(Rows=4, Columns=4, SamplesPerPixel=1, BitsAllocated=8, BitsStored=8,
                 HighBit=7, PixelRepresentation=0, PhotometricInterpretation="MONOCHROME2")
    icon.PixelData = bytes(16)
    output.IconImageSequence = Sequence([icon])
    assert NESTED_PIXELS not in _kinds(_findings(output, _identity(_source())))


# -- 2. binary attributes the table does not name ----------------------------------------------

def _pdf(text: str) -> bytes:
    stream = zlib.compress(f"BT ({text}) Tj ET".encode())
    head = b"1 0 obj\n<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream)
    return b"%PDF-1.4\n" + head + stream + b"\nendstream\nendobj\n%%EOF\n"


SECRET_TEXT = b"IN;LB patient Smith, John MRN PAT123456 DOB 1981-03-04\x03;"


def test_the_engine_removes_documents_in_sequence_items_and_hpgl_documents():
    source = _with_image(_source())
    source.add_new(PROTOCOL, "SQ", Sequence([_item(
        MIMETypeOfEncapsulatedDocument="application/pdf",
        EncapsulatedDocument=_pdf("Patient Smith John MRN PAT123456"))]))
    source.add_new(0x00686300, "OB", zlib.compress(SECRET_TEXT))  # HPGL Document
    outcome = _outcome(source)
    assert not outcome.held_back, outcome.report
    assert "EncapsulatedDocument" not in outcome.dataset[PROTOCOL].value[0]
    assert 0x00686300 not in outcome.dataset
    assert outcome.report["attributes"]["documents_removed"] == 2


def test_unlisted_binary_attributes_go_unless_needed_to_display_the_image():
    source = _source()
    source.RedPaletteColorLookupTableData = b"\1\0" * 4
    source.SegmentedGreenPaletteColorLookupTableData = b"\1\0" * 4
    source.ModalityLUTSequence = Sequence([_item(LUTDescriptor=[4, 0, 16], LUTData=[1, 2, 3, 4])])
    source.SpectroscopyData = b"\0" * 8
    source.WaveformSequence = Sequence([_item(WaveformData=b"\1\2\3\4")])
    source.add_new(PROTOCOL, "SQ", Sequence([_item(WaveformData=b"\1\2\3\4",
                                                   SpectroscopyData=b"\0" * 8)]))
    source.add_new(0x00720065, "OB", b"selector PAT123456")  # Selector OB Value
    source.add_new(0x04000120, "OB", b"signature")  # Signature
    ds, _ = _cleaned(source)
    for keyword in ("RedPaletteColorLookupTableData", "SegmentedGreenPaletteColorLookupTableData",
                    "SpectroscopyData"):
        assert keyword in ds, keyword
    assert "LUTData" in ds.ModalityLUTSequence[0]
    assert "WaveformData" in ds.WaveformSequence[0]
    assert "WaveformData" not in ds[PROTOCOL].value[0]
    assert "SpectroscopyData" not in ds[PROTOCOL].value[0]
    assert 0x00720065 not in ds and 0x04000120 not in ds


@RAW_AND_PYDICOM
def test_the_verifier_flags_documents_the_engine_removes(raw):
    output = _output()
    output.add_new(PROTOCOL, "SQ", Sequence([_item(
        MIMETypeOfEncapsulatedDocument="application/pdf",
        EncapsulatedDocument=_pdf("nothing here"))]))
    assert KEPT_DOCUMENT in _kinds(_findings(output, _identity(_source()), raw))
    output = _output()
    output.add_new(0x00686300, "OB", b"IN;")
    assert KEPT_DOCUMENT in _kinds(_findings(output, _identity(_source()), raw))


@RAW_AND_PYDICOM
def test_the_verifier_reads_compressed_binary_values(raw):
    output = _output()
    output.ICCProfile = zlib.compress(SECRET_TEXT)
    kinds = _kinds(_findings(output, _identity(_source()), raw))
    assert "patient ID" in kinds and "patient name" in kinds


# -- 3. ICC profiles with UTF-16 text ---------------------------------------------------------

def _mluc(text: str, encoding: str = "utf-16-be") -> bytes:
    data = text.encode(encoding)
    return (b"mluc" + b"\0" * 4 + struct.pack(">II", 1, 12) + b"enUS"
            + struct.pack(">II", len(data), 28) + data)


def _icc(description: str, copyright_: str, encoding: str = "utf-16-be") -> bytes:
    """An ICC v4 profile whose description and copyright are 'mluc' (UTF-16) text; padded so
    that every byte is ASCII (the verifier's ASCII path, where NULs split every letter)."""
    for pad in range(64):
        tags = [(b"desc", _mluc(description + " " * pad, encoding)),
                (b"cprt", _mluc(copyright_, encoding))]
        body, table, at = b"", b"", 0x200
        for signature, data in tags:
            table += signature + struct.pack(">II", at, len(data))
            body += data + b"\0" * (0x100 - len(data) % 0x100)
            at += 0x100 * ((len(data) + 0xFF) // 0x100)
        header = struct.pack(">I", 0x200 + len(body)) + b"lcms" + bytes([4, 0x30, 0, 0])
        header += b"mntrRGB XYZ "
        head = header + b"\0" * (128 - len(header)) + struct.pack(">I", len(tags)) + table
        profile = head + b"\0" * (0x200 - len(head)) + body
        if profile.isascii():
            return profile
    raise AssertionError("no ASCII layout")


@pytest.mark.parametrize(("description", "copyright_"), [
    ("Calibrated: Dr Houseman", "ACME workstation"),
    ("Display 3", "Springfield workstation"),
    ("Calibrated 2024-03-15", "ACME"),
])
@pytest.mark.parametrize("encoding", ["utf-16-be", "utf-16-le"])
def test_the_engine_removes_an_icc_profile_whose_text_names_someone(description, copyright_,
                                                                    encoding):
    source = _source()
    source.ICCProfile = _icc(description, copyright_, encoding)
    ds, _ = _cleaned(source)
    assert "ICCProfile" not in ds


def test_the_engine_keeps_an_icc_profile_without_identifying_text():
    source = _source()
    source.ICCProfile = _icc("sRGB IEC61966-2.1", "Copyright ACME Displays")
    ds, _ = _cleaned(source)
    assert ds.ICCProfile == source.ICCProfile
    assert not _findings(_output(ICCProfile=source.ICCProfile), _identity(source))


@RAW_AND_PYDICOM
@pytest.mark.parametrize("encoding", ["utf-16-be", "utf-16-le"])
def test_the_verifier_reads_utf16_text_in_binary_values(raw, encoding):
    identity = _identity(_source())
    kinds = _kinds(_findings(_output(ICCProfile=_icc("Calibrated: Dr Houseman", "ACME",
                                                     encoding)), identity, raw))
    assert "person name" in kinds
    kinds = _kinds(_findings(_output(ICCProfile=_icc("Calibrated 2024-03-15", "ACME",
                                                     encoding)), identity, raw))
    assert "original date" in kinds


# -- 4. source dates in numbers (IS, DS) ------------------------------------------------------

def _dated_numbers(ds: Dataset) -> Dataset:
    ds.AcquisitionNumber = STUDY_DATE
    ds.SpatialResolution = "20240315.1015"
    ds.ImagesInAcquisition = "1015"
    ds.add_new(0x00181110, "DS", BIRTH_DATE)  # Distance Source to Detector
    return ds


@pytest.mark.parametrize("profile", [BASIC, MODIFIED_DATES], ids=lambda p: p.name)
def test_the_engine_replaces_numbers_that_hold_a_source_date(profile):
    outcome = _outcome(_with_image(_dated_numbers(_source())), profile)
    assert not outcome.held_back, outcome.report
    ds = outcome.dataset
    assert str(ds.AcquisitionNumber) == "0" and str(ds.SpatialResolution) == "0"
    assert str(ds.DistanceSourceToDetector) == "0"
    assert str(ds.ImagesInAcquisition) == "1015"  # not a date: kept


def test_with_full_dates_kept_only_the_birth_date_goes_from_numbers():
    outcome = _outcome(_with_image(_dated_numbers(_source())), FULL_DATES)
    assert not outcome.held_back, outcome.report
    assert str(outcome.dataset.AcquisitionNumber) == STUDY_DATE
    assert str(outcome.dataset.DistanceSourceToDetector) == "0"


@RAW_AND_PYDICOM
def test_the_verifier_finds_source_dates_in_numbers(raw):
    identity = _identity(_source())
    assert "original date" in _kinds(_findings(_output(AcquisitionNumber=STUDY_DATE),
                                               identity, raw))
    assert "original date" in _kinds(_findings(_output(SpatialResolution="20240315.1015"),
                                               identity, raw))
    assert "birth date" in _kinds(_findings(_output(SpatialResolution=BIRTH_DATE), identity,
                                            raw))
    assert not _findings(_output(AcquisitionNumber="20240316", SpatialResolution="0.5"),
                         identity, raw)


# -- 5. false positive: a short numeric patient ID in numbers --------------------------------

@RAW_AND_PYDICOM
def test_a_short_numeric_patient_id_is_not_found_in_numbers(raw):
    source = _source("400")
    output = _output(WindowCenter="40", WindowWidth="400", AcquisitionNumber="400")
    assert not _findings(output, _identity(source), raw)


def test_a_ct_with_a_short_numeric_patient_id_is_not_held_back():
    source = _with_image(_source("400"))
    source.WindowCenter, source.WindowWidth = "40", "400"
    outcome = _outcome(source)
    assert not outcome.held_back, outcome.report


@RAW_AND_PYDICOM
def test_a_longer_patient_id_is_still_found_in_numbers(raw):
    output = _output(AcquisitionNumber="123456")
    assert "patient ID" in _kinds(_findings(output, _identity(_source("123456")), raw))


# -- 6. staff and institution words in coded strings ------------------------------------------

IMAGE_TYPE = ["ORIGINAL", "PRIMARY", "AXIAL", "KENT", "COLE", "HOUSEMAN"]


def test_the_engine_removes_coded_values_that_are_staff_or_institution_words():
    source = _source()
    source.ImageType = IMAGE_TYPE
    source.add_new(0x00189004, "CS", "COLE")  # Content Qualification: a table-less CS
    ds, _ = _cleaned(source)
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL", "ANONYMOUS", "ANONYMOUS",
                                  "ANONYMOUS"]
    assert ds.ContentQualification == "ANONYMOUS"


def test_the_engine_keeps_defined_terms_and_words_that_only_contain_a_name():
    source = _source()
    source.ImageType = ["DERIVED", "SECONDARY", "COLES", "KENTISH"]
    ds, _ = _cleaned(source)
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "COLES", "KENTISH"]


@RAW_AND_PYDICOM
def test_the_verifier_finds_staff_and_institution_words_in_coded_strings(raw):
    identity = _identity(_source())
    for word, kind in (("KENT", "institution"), ("COLE", "person name"),
                       ("HOUSEMAN", "person name")):
        output = _output(ImageType=["ORIGINAL", "PRIMARY", word])
        assert kind in _kinds(_findings(output, identity, raw)), word
    output = _output(ImageType=["ORIGINAL", "PRIMARY", "AXIAL", "COLES"])
    assert not _findings(output, identity, raw)


def test_defined_terms_stay_though_someone_is_named_with_them():
    """A person called Text (pydicom's reportsi.dcm): SR value types stay TEXT."""
    source = _source()
    source.OperatorsName = "Text^Ann"
    source.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    source.ContentSequence = Sequence([_item(ValueType="TEXT", RelationshipType="CONTAINS")])
    ds, _ = _cleaned(source)
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert ds.ContentSequence[0].ValueType == "TEXT"
    output = _output(ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])
    output.ContentSequence = Sequence([_item(ValueType="TEXT", RelationshipType="CONTAINS")])
    assert not _findings(output, _identity(source))
