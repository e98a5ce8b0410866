"""Leaks through text, found by a red team, closed in the de-identifier and caught by the
independent verifier: dates written with month names, dates in kept technical labels and in
kept safe private attributes, names written another way (compound, run together, CJK without
word boundaries), names that are also common words, and file meta elements inside the data
set."""

from __future__ import annotations

import io
import re
import struct
import time
from copy import deepcopy

import pytest
from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from imageshare.deid.engine import AttributeCleaner, clean_text, mask_dates
from imageshare.deid.identity import identity_of
from imageshare.deid.profiles import Profile
from imageshare.deid.pseudonyms import Pseudonyms
from imageshare.deid.service import SAFE_PRIVATE, TRUST_PIXELS, Deidentifier
from imageshare.verify import SourceIdentity, Verifier
from imageshare.verify.identity import KEEP_DATES, written_dates
from tests.factory import ct_header

SECRET = b"text-leaks-secret-0123456789abcd"
BIRTH_DATE, STUDY_DATE = "19810304", "20240315"
PATIENT_ID = "HX77123"
BASIC = Profile("basic", frozenset())
DESCRIPTORS = Profile("descriptors", frozenset({"clean_descriptors"}))
SAFE = Profile("safe", frozenset({"retain_safe_private", "clean_descriptors"}))


def _source(name: str = "Garcia^Maria", charset: str = "ISO_IR 192") -> Dataset:
    """A CT header of one patient, as a Part 10 data set (no pixel data)."""
    ds = ct_header(name, PATIENT_ID, BIRTH_DATE, STUDY_DATE, charset)
    ds.ContentDate = STUDY_DATE
    ds.StudyTime = "101112"
    return ds


def _verifier_findings(output: Dataset, identity: SourceIdentity) -> list:
    """What the verifier finds in ``output`` written as a Part 10 file."""
    buffer = io.BytesIO()
    output.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return Verifier(ocr="never").check_dicom(buffer, identity, "out.dcm")


def _kinds(findings: list) -> set[str]:
    return {f.kind for f in findings}


def _deidentified(source: Dataset, profile: Profile):
    """The de-identifier's outcome for ``source``, verified by the verifier."""
    deidentifier = Deidentifier(profile, Pseudonyms(SECRET), verifier=Verifier(ocr="never"),
                                burned_in=TRUST_PIXELS)
    return deidentifier.instance(deepcopy(source))


# -- 1. dates written with month names -------------------------------------------------------

# The source's birth date (4 March 1981) and study date (15 March 2024), written out.
WRITTEN_DATES = ["DOB March 4, 1981", "born 4th March 1981", "seen Mar 15, 2024",
                 "15 Mar 2024", "04-Mar-1981", "born 4th of March 1981", "MAR 04 1981",
                 "on 15Mar2024", "2024 Mar 15", "Mar. 15th, 2024", "seen march 15th 2024",
                 "4 Mar 81"]


@pytest.mark.parametrize("text", [*WRITTEN_DATES, "Sept 3rd, 2021", "1st Jan 2000"])
def test_dates_written_with_month_names_are_taken_out_of_free_text(text):
    cleaned = clean_text(f"Note: {text} - review", identity_of(_source()))
    assert cleaned.startswith("Note: ") and cleaned.endswith(" - review")
    assert not any(c.isdigit() for c in cleaned), cleaned
    assert not re.search(r"(?i)mar|sept|jan", cleaned), cleaned


def test_a_month_with_its_year_is_taken_out_as_numeric_ones_are():
    # numeric month and year ("03/2021") was already taken out (a run of digits)
    identity = identity_of(_source())
    assert "2021" not in clean_text("since 03/2021", identity)
    assert clean_text("since March 2021, and Mar. 2021", identity) == "since *, and *"


def test_numeric_dates_stay_taken_out_of_free_text():
    identity = identity_of(_source())
    for text in ("15.03.2024", "2024-03-15", "03/15/2024", "20240315", "4/3/81"):
        assert any(c.isdigit() for c in text)
        assert not any(c.isdigit() for c in clean_text(text, identity)), text


def test_words_and_numbers_that_are_not_dates_stay():
    for text in ("Finding 3 may represent a cyst", "MAR 3 kernel", "syngo VE11C 4.0.12.345",
                 "FC13 B30f", "8 mayo", "march 2 fast", "Series 12 of 30"):
        if text == "march 2 fast":  # a full month name with a day: read as a date
            assert mask_dates(text) == "* fast"
            continue
        assert mask_dates(text) == text


def test_a_free_text_value_with_written_dates_comes_out_without_them():
    source = _source()
    source.ImageComments = "Patient seen Mar 15, 2024; DOB 4th March 1981; follow up June 2025"
    outcome = _deidentified(source, DESCRIPTORS)
    assert not outcome.held_back, outcome.report.get("reason")
    comments = outcome.dataset.ImageComments
    for leaked in ("2024", "1981", "2025", "Mar", "June"):
        assert leaked not in comments
    assert comments.startswith("Patient seen")


@pytest.mark.parametrize("text", WRITTEN_DATES)
def test_the_verifier_finds_the_source_dates_however_they_are_written(text):
    identity = SourceIdentity.of([_source()])
    assert {"birth date", "original date"} & set(identity.in_text(text)), text


def test_the_verifier_finds_two_digit_years_and_the_month_of_birth():
    identity = SourceIdentity.of([_source()])
    assert "birth date" in identity.in_text("born 04-MAR-81")
    assert "birth date" in identity.in_text("born March 1981")


def test_the_verifier_does_not_take_other_dates_or_numbers_for_the_source_dates():
    identity = SourceIdentity.of([_source()])
    for text in ("seen Mar 16, 2024", "5 March 1982", "March 2024", "version 3.15.2024x",
                 "B30f", "4.0.12", "kernel 20240316"):
        assert identity.in_text(text) == [], text


def test_with_full_dates_kept_the_study_date_in_text_is_not_a_finding():
    identity = SourceIdentity.of([_source()], keep=frozenset({KEEP_DATES}))
    assert identity.in_text("seen 15 Mar 2024") == []
    assert identity.in_text("DOB 4th March 1981") == ["birth date", "birth date"]


ADVERSARIAL = [
    "4th of " * 15_000, "1 March " * 12_500, "Mar 1, " * 15_000, "1-" * 50_000,
    "0" * 100_000, "a1" * 50_000, "15.03." * 17_000, "May " * 25_000, "2024 Mar " * 11_000,
    " " * 100_000 + "1", "4th" * 33_000, "1 of " * 20_000,
]


@pytest.mark.parametrize("text", ADVERSARIAL, ids=[t[:10] for t in ADVERSARIAL])
def test_dates_are_read_in_time_linear_in_the_text(text):
    identity = identity_of(_source())
    source_identity = SourceIdentity.of([_source()])
    started = time.perf_counter()
    clean_text(text, identity)
    mask_dates(text)
    source_identity.in_text(text)
    list(written_dates(text.upper().split()))
    assert time.perf_counter() - started < 5, "a crafted text must not stall the scan"


# -- 2. dates (and identifiers) inside kept technical labels --------------------------------

TECHNICAL = {
    "WindowCenterWidthExplanation": "WINDOW1 {}",
    "ConvolutionKernel": "B30f {}",
    "SoftwareVersions": "syngo VE11C 4.0.12 {}",
}


@pytest.mark.parametrize("written", ["20240315", "2024-03-15", "15.03.2024", "15 Mar 2024"])
def test_dates_in_kept_technical_labels_are_taken_out(written):
    source = _source()
    for keyword, pattern in TECHNICAL.items():
        setattr(source, keyword, pattern.format(written))
    source.FilterType = f"BODY {PATIENT_ID}"
    outcome = _deidentified(source, BASIC)
    assert not outcome.held_back, outcome.report.get("reason")
    out = outcome.dataset
    for keyword, pattern in TECHNICAL.items():
        assert str(out.data_element(keyword).value) == pattern.format("*"), keyword
    assert out.FilterType == "BODY *"


def test_version_numbers_in_technical_labels_are_kept():
    source = _source()
    source.SoftwareVersions = ["syngo CT VA48A", "4.0.12.345", "3.2.1"]
    source.ConvolutionKernel = "FC13"
    outcome = _deidentified(source, BASIC)
    assert not outcome.held_back, outcome.report.get("reason")
    assert list(outcome.dataset.SoftwareVersions) == ["syngo CT VA48A", "4.0.12.345", "3.2.1"]
    assert outcome.dataset.ConvolutionKernel == "FC13"


@pytest.mark.parametrize("written", ["20240315", "2024-03-15", "15.03.2024", "3/15/2024",
                                     "15 March 2024", "19810304", "04.03.1981"])
def test_the_verifier_finds_a_source_date_left_in_a_technical_label(written):
    source = _source()
    identity = SourceIdentity.of([source])
    output = _deidentified(source, BASIC).dataset
    assert _verifier_findings(output, identity) == []
    output.WindowCenterWidthExplanation = f"WINDOW1 {written}"
    kinds = _kinds(_verifier_findings(output, identity))
    assert kinds & {"original date", "birth date"}, (written, kinds)


# -- 3. safe private attributes kept ---------------------------------------------------------

def _with_safe_private(source: Dataset) -> Dataset:
    block = source.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    block.add_new(0x0C, "IS", "1000")  # a b-value: kept as it is
    block.add_new(0x0D, "LO", f"DIRECTIONAL Garcia {PATIENT_ID} 15.03.2024")
    block.add_new(0x0E, "UN", f"Maria Garcia {PATIENT_ID}".encode())
    item = Dataset()
    item.PatientName = "Garcia^Maria"
    block.add_new(0x27, "SQ", Sequence([item]))  # never a sequence: it goes
    return source


def test_kept_safe_private_text_is_cleaned_and_what_cannot_be_cleaned_goes():
    source = _with_safe_private(_source())
    cleaner = AttributeCleaner(SAFE, Pseudonyms(SECRET), SAFE_PRIVATE)
    ds = deepcopy(source)
    report = cleaner.apply(ds)
    kept = {e.tag.element & 0xFF: e.value for e in ds.iterall()
            if e.tag.is_private and not e.tag.is_private_creator}
    assert kept == {0x0C: "1000", 0x0D: "DIRECTIONAL * * *"}
    assert report.private_kept == 2 and report.private_removed == 2


def test_kept_safe_private_text_passes_the_verifier_once_cleaned():
    source = _with_safe_private(_source())
    outcome = _deidentified(source, SAFE)
    assert not outcome.held_back, outcome.report.get("reason")


@pytest.mark.parametrize(("text", "kind"), [
    ("DIRECTIONAL 15.03.2024", "original date"),
    ("DIRECTIONAL 15 Mar 2024", "original date"),
    ("born 4th March 1981", "birth date"),
    (f"ID {PATIENT_ID}", "patient ID"),
    ("Maria Garcia", "patient name"),
])
def test_the_verifier_finds_identity_in_any_kept_private_text(text, kind):
    source = _source()
    identity = SourceIdentity.of([source])
    output = _deidentified(source, SAFE).dataset
    output.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0D, "LO", text)
    assert kind in _kinds(_verifier_findings(output, identity))


# -- 4. names written another way -------------------------------------------------------------

def test_each_part_of_a_compound_surname_is_cleaned_however_it_is_joined():
    identity = identity_of(_source("Smith-Jones^Anna"))
    cleaned = clean_text("Seen by Smith Jones, SmithJones, Jones and smith-jones.", identity)
    assert "Smith" not in cleaned and "Jones" not in cleaned and "smith" not in cleaned
    assert cleaned.startswith("Seen by ")


def test_a_three_part_name_run_together_is_cleaned():
    identity = identity_of(_source("Lopez^Maria Del Carmen"))
    cleaned = clean_text("MariaDelCarmen Lopez, called DelCarmen, or Maria-Del-Carmen", identity)
    for leaked in ("Maria", "Carmen", "Lopez"):
        assert leaked not in cleaned, cleaned


JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"


@pytest.mark.parametrize("text", ["患者山田太郎様の検査", "山田様", "やまだたろうさん"])
def test_a_japanese_name_is_cleaned_out_of_running_japanese_text(text):
    source = _source(JAPANESE)
    source.StudyDescription = text
    ds = deepcopy(source)
    AttributeCleaner(DESCRIPTORS, Pseudonyms(SECRET)).apply(ds)
    for leaked in ("山田", "太郎", "やまだ", "たろう"):
        assert leaked not in str(ds.get("StudyDescription", "")), text


def test_a_japanese_name_in_half_width_kana_is_found_in_full_width_text():
    identity = identity_of(_source("ﾔﾏﾀﾞ^ﾀﾛｳ"))
    assert identity.found_in("ヤマダさんの検査")
    assert "ヤマダ" not in identity.clean("ヤマダさんの検査")


def test_the_verifier_finds_names_written_another_way():
    compound = SourceIdentity.of([_source("Smith-Jones^Maria Del Carmen")])
    for text in ("Smith Jones", "Jones", "SmithJones", "MariaDelCarmen", "DelCarmen"):
        assert "patient name" in compound.in_text(text), text
    japanese = SourceIdentity.of([_source(JAPANESE)])
    assert "patient name" in japanese.in_text("患者山田太郎様の検査")
    assert japanese.in_text("山の検査") == []  # one character of a name is no name


def test_the_verifier_finds_a_japanese_name_in_running_text_of_an_output():
    source = _source(JAPANESE, charset="ISO_IR 192")
    identity = SourceIdentity.of([source])
    output = _deidentified(source, BASIC).dataset
    assert _verifier_findings(output, identity) == []
    output.ImageComments = "患者山田太郎様の検査"
    assert "patient name" in _kinds(_verifier_findings(output, identity))


def test_names_written_another_way_pass_the_verifier_once_cleaned():
    source = _source("Smith-Jones^Maria Del Carmen")
    source.ImageComments = "Smith Jones (MariaDelCarmen), DelCarmen"
    outcome = _deidentified(source, DESCRIPTORS)
    assert not outcome.held_back, outcome.report.get("reason")
    assert outcome.dataset.ImageComments.count("*") >= 3


# -- 5. names that are also common words ------------------------------------------------------

def test_a_patient_named_ward_is_found_where_written_as_a_name():
    identity = SourceIdentity.of([_source("Ward^John")])
    for text in ("Mr Ward", "seen by mr ward", "WARD, JOHN", "Ward"):
        assert "patient name" in identity.in_text(text), text
    # the word, not the name: all in lower case and after no title
    assert identity.in_text("admitted to ward 5") == []


def test_ward_5_is_no_finding_when_the_patient_is_not_ward():
    identity = SourceIdentity.of([_source()])
    assert identity.in_text("Ward 5") == [] and identity.in_text("ward 5") == []


def test_a_patient_named_ward_left_in_an_output_is_a_finding():
    source = _source("Ward^John")
    identity = SourceIdentity.of([source])
    output = _deidentified(source, BASIC).dataset
    assert _verifier_findings(output, identity) == []
    output.ImageComments = "Mr Ward"
    assert "patient name" in _kinds(_verifier_findings(output, identity))


def test_placeholders_written_for_unknown_names_are_no_name():
    identity = SourceIdentity.of([_source("Anonymous^Unknown")])
    assert identity.in_text("ANONYMOUS") == [] and identity.in_text("Unknown") == []


def test_the_de_identifier_has_no_common_word_exemption_for_names():
    identity = identity_of(_source("Ward^Lane"))
    assert clean_text("Mr Ward, Lane", identity) == "Mr *, *"


# -- 6. file meta elements inside the data set -----------------------------------------------

def test_file_meta_elements_inside_the_data_set_are_removed():
    source = _source()
    source.add_new(0x00020016, "AE", "GARCIA")
    item = Dataset()
    item.add_new(0x00020013, "SH", "GARCIA 1.0")
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = generate_uid()
    source.ReferencedImageSequence = Sequence([item])
    ds = deepcopy(source)
    AttributeCleaner(BASIC, Pseudonyms(SECRET)).apply(ds)
    assert not [e for e in ds.iterall() if e.tag.group == 0x0002]
    assert "ReferencedImageSequence" in ds  # the item stays, without the file meta element


def _output_with_meta_in_an_item() -> tuple[bytes, SourceIdentity]:
    source = _source()
    identity = SourceIdentity.of([source])
    output = _deidentified(source, BASIC).dataset
    item = Dataset()
    item.add_new(0x00020016, "AE", "STATION")
    output.ReferencedPerformedProcedureStepSequence = Sequence([item])
    buffer = io.BytesIO()
    output.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), identity


META_KIND = "file meta element (group 0002) inside the data set"


def test_the_verifier_flags_a_file_meta_element_in_a_sequence_item():
    data, identity = _output_with_meta_in_an_item()
    findings = Verifier(ocr="never").check_dicom(io.BytesIO(data), identity, "out.dcm")
    assert META_KIND in _kinds(findings)


def test_the_verifier_flags_a_file_meta_element_after_the_data_set_began():
    source = _source()
    identity = SourceIdentity.of([source])
    output = _deidentified(source, BASIC).dataset
    buffer = io.BytesIO()
    output.save_as(buffer, enforce_file_format=True)
    assert Verifier(ocr="never").check_dicom(io.BytesIO(buffer.getvalue()), identity,
                                             "out.dcm") == []
    element = struct.pack("<HH", 0x0002, 0x0016) + b"AE" + struct.pack("<H", 8) + b"STATION "
    findings = Verifier(ocr="never").check_dicom(io.BytesIO(buffer.getvalue() + element),
                                                 identity, "out.dcm")
    assert META_KIND in _kinds(findings)


def test_the_verifier_flags_file_meta_in_the_data_set_also_when_pydicom_reads_the_file():
    data, identity = _output_with_meta_in_an_item()
    without_preamble = data[132:]  # not a Part 10 file: read by pydicom, not the raw reader
    assert dcmread(io.BytesIO(without_preamble), force=True).file_meta
    findings = Verifier(ocr="never").check_dicom(io.BytesIO(without_preamble), identity,
                                                 "out.dcm")
    assert META_KIND in _kinds(findings)
    assert sum(f.kind == META_KIND for f in findings) == 1  # the file meta group is fine
