"""The adversarial corpus (tests/corpus.py) through every profile and every option: nothing of
the patient (or of anyone named) comes out, the independent verifier finds nothing in what was
written, dates and times follow the options, coded entries keep only standard codes."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.datadict import keyword_for_tag

from imageshare.deid.profiles import DEFAULT_PROFILES, OPTIONS, Profile
from imageshare.deid.pseudonyms import Pseudonyms
from imageshare.deid.service import Deidentifier
from imageshare.verify import Verifier
from tests import corpus
from tests.conftest import require

SECRET = b"corpus-secret-0123456789abcdefgh"
HEADER_CASES = ("CT", "MR (Japanese, implicit VR)", "Comprehensive SR", "Presentation state",
                "Encapsulated PDF")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return {c.name: c for c in corpus.build(tmp_path_factory.mktemp("corpus"))}


@pytest.fixture(scope="module")
def outputs(cases, tmp_path_factory):
    """Every case through a profile, once per module: (outcome, output path)."""
    folder = tmp_path_factory.mktemp("out")
    made: dict[tuple[str, str], tuple] = {}

    def run(profile: Profile, name: str):
        key = (profile.name, name)
        if key not in made:
            deidentifier = Deidentifier(profile, Pseudonyms(SECRET), verifier=Verifier())
            out = folder / f"{profile.name}-{cases[name].path.name}"
            with open(cases[name].path, "rb") as source, open(out, "w+b") as target:
                made[key] = (deidentifier.write(source, target), out)
        return made[key]

    return run


def _texts(ds: Dataset) -> list[str]:
    """Every value of a data set as text, at any depth (decoded with its character sets)."""
    out = []
    for element in ds.iterall():
        if element.VR in ("SQ", "OB", "OW", "OF", "OD", "UN") or element.tag == 0x7FE00010:
            continue
        out.append(str(element.value))
    return out


def _leaks(path: Path, profile: Profile) -> list[str]:
    """The corpus's secrets found in the output's bytes (any case) or decoded values."""
    data = path.read_bytes().upper()
    ds = dcmread(path)
    text = " ".join(_texts(ds)).upper()
    secrets = list(corpus.SECRETS) + ["山田", "太郎", "やまだ", "ﾔﾏﾀﾞ"]
    if profile.has("retain_institution_identity"):
        secrets.remove("Swithin")
    return [s for s in secrets if s.upper().encode() in data or s.upper() in text]


def _check(outcome, path: Path, case, profile: Profile) -> None:
    if case.held_back:
        assert outcome.held_back, case.name
        return
    assert not outcome.held_back, (case.name, outcome.report.get("reason"))
    assert outcome.report["verification"]["findings"] == []
    assert _leaks(path, profile) == [], case.name
    ds = dcmread(path)
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.preamble == b"\0" * 128
    assert "SourceApplicationEntityTitle" not in ds.file_meta
    _dates_follow_the_profile(ds, dcmread(case.path), profile)
    _codes_are_standard(ds, profile)


def _dates_follow_the_profile(out: Dataset, source: Dataset, profile: Profile) -> None:
    """No date, date-time or time of the source is left as it was (at any depth, private
    ones included) unless the profile keeps it; modified dates all move by one offset."""
    originals = {corpus.STUDY_DATE, corpus.OTHER_DATE, corpus.BIRTH_DATE}
    times = {corpus.STUDY_TIME, corpus.OTHER_TIME, "101530", "101200", "101300", "101245"}
    offsets = set()
    for element in out.iterall():
        value = str(element.value or "")
        if element.VR == "DA" and value:
            if profile.has("retain_full_dates"):
                continue
            assert value not in originals, keyword_for_tag(element.tag)
            if profile.has("retain_modified_dates") and value != "19000101":
                source_value = source.get(element.tag)
                if source_value is not None and source_value.value:
                    offsets.add(dt.datetime.strptime(value, "%Y%m%d")
                                - dt.datetime.strptime(str(source_value.value), "%Y%m%d"))
        elif element.VR == "DT" and value and not profile.has("retain_full_dates"):
            assert value[:8] not in originals, keyword_for_tag(element.tag)
        elif element.VR == "TM" and value and not (profile.has("retain_full_dates")
                                                    or profile.has("retain_modified_dates")):
            assert value not in times, keyword_for_tag(element.tag)
    assert len(offsets) <= 1, "dates moved by different offsets"


def _codes_are_standard(ds: Dataset, profile: Profile) -> None:
    """Every code left is a standard one with its standard meaning, or the dummy code (or the
    institution's own code, when the profile keeps the institution's identity)."""
    from imageshare.deid.codes import standard_meaning

    kept = ("InstitutionCodeSequence",) if profile.has("retain_institution_identity") else ()
    for item in _items(ds, kept):
        if "CodeValue" in item:
            scheme, value = str(item.CodingSchemeDesignator), str(item.CodeValue)
            if scheme == "99DEID":
                assert item.CodeMeaning == "Removed by de-identification"
            else:
                assert item.CodeMeaning == standard_meaning(scheme, value), (scheme, value)


def _items(ds: Dataset, skip: tuple[str, ...] = ()):
    for element in ds:
        if element.VR == "SQ" and element.keyword not in skip:
            for item in element.value:
                yield item
                yield from _items(item, skip)


@pytest.mark.parametrize("profile", sorted(DEFAULT_PROFILES))
@pytest.mark.parametrize("name", HEADER_CASES)
def test_every_profile_leaves_nothing_identifying_in_any_object_type(cases, outputs, profile,
                                                                      name):
    outcome, path = outputs(DEFAULT_PROFILES[profile], name)
    _check(outcome, path, cases[name], DEFAULT_PROFILES[profile])


@pytest.mark.parametrize("profile", sorted(DEFAULT_PROFILES))
@pytest.mark.parametrize("name", ["US cine", "Secondary capture"])
def test_burned_in_text_is_removed_on_every_frame_and_verified(cases, outputs, profile, name):
    require(shutil.which("tesseract") is not None, "Tesseract OCR (tesseract-ocr)")
    outcome, path = outputs(DEFAULT_PROFILES[profile], name)
    _check(outcome, path, cases[name], DEFAULT_PROFILES[profile])
    assert outcome.report["pixels"]["blanked_lines"] >= 1
    # the verifier read the written frames with its own OCR (and found nothing)
    assert Verifier.text_prone(dcmread(cases[name].path, stop_before_pixels=True))


@pytest.mark.parametrize("option", ["none", *sorted(OPTIONS)])
def test_the_basic_profile_with_any_one_option_leaves_nothing(cases, outputs, option):
    options = {"clean_pixel_data"} | ({option} if option != "none" else set())
    profile = Profile(f"basic+{option}", frozenset(options))
    for name in HEADER_CASES:
        outcome, path = outputs(profile, name)
        _check(outcome, path, cases[name], profile)


def test_site_chosen_codes_are_replaced_and_standard_codes_keep_their_standard_meaning(
        cases, outputs):
    outcome, path = outputs(DEFAULT_PROFILES["teaching"], "Comprehensive SR")
    ds = dcmread(path)
    findings = ds.ContentSequence[2]
    concepts = [item.ConceptCodeSequence[0] for item in findings.ContentSequence
                if item.ValueType == "CODE"]
    # a local code naming the requesting doctor: replaced
    assert (concepts[0].CodeValue, concepts[0].CodingSchemeDesignator) == ("REMOVED", "99DEID")
    # a standard code with the site's own meaning: kept, with the standard's meaning
    assert (concepts[1].CodeValue, concepts[1].CodeMeaning) == ("121071", "Finding")
    # the document title (LOINC) stays
    assert ds.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    ct_out = dcmread(outputs(DEFAULT_PROFILES["research"], "CT")[1])
    # operator's staff code under a person context, even with device identity kept
    person = ct_out.get("OperatorIdentificationSequence")
    assert person is None or all(
        c.CodingSchemeDesignator == "99DEID" for item in person
        for c in item.get("PersonIdentificationCodeSequence", []))
    # an SRT code of the standard's context groups keeps its standard meaning
    region = ct_out.AnatomicRegionSequence[0]
    assert (region.CodingSchemeDesignator, region.CodeValue) == ("SRT", "T-D4000")
    assert "GARCIA" not in region.CodeMeaning.upper()


def test_with_modified_dates_times_of_day_stay_and_dates_move_together(cases, outputs):
    _outcome, path = outputs(DEFAULT_PROFILES["teaching"], "Comprehensive SR")
    ds = dcmread(path)
    source = dcmread(cases["Comprehensive SR"].path)
    assert ds.StudyTime == source.StudyTime  # the profile's rule: times of day are kept
    moved = dt.datetime.strptime(ds.StudyDate, "%Y%m%d")
    offset = dt.datetime.strptime(source.StudyDate, "%Y%m%d") - moved
    verification = ds.VerifyingObserverSequence[0].VerificationDateTime
    original = source.VerifyingObserverSequence[0].VerificationDateTime
    assert dt.datetime.strptime(original[:8], "%Y%m%d") - dt.datetime.strptime(
        verification[:8], "%Y%m%d") == offset
    assert verification[8:] == original[8:]


def test_without_date_options_times_are_replaced_at_any_depth(cases, outputs):
    _outcome, path = outputs(DEFAULT_PROFILES["basic"], "Comprehensive SR")
    ds = dcmread(path)
    values = {str(e.value) for e in ds.iterall() if e.VR in ("TM", "DT") and e.value}
    assert values <= {"000000", "19000101000000"}, values


def test_a_jpeg_comment_naming_the_patient_in_streamed_pixel_data_is_left_behind(
        cases, tmp_path):
    """Compressed pixel data that needs no cleaning is copied frame by frame without the
    comments inside it."""
    import io

    import numpy as np
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    ds = dcmread(cases["CT"].path)
    del ds[0x7FE10010:0x7FE20000]
    for group in range(0x6000, 0x6020, 2):
        for tag in [t for t in ds.keys() if t.group == group]:
            del ds[tag]
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(
        buffer, "JPEG", comment=f"{corpus.PATIENT_NAME}".encode())
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    source = tmp_path / "ct-jpeg.dcm"
    ds.save_as(source, enforce_file_format=True)
    deidentifier = Deidentifier(DEFAULT_PROFILES["basic"], Pseudonyms(SECRET),
                                verifier=Verifier())
    with open(source, "rb") as fp, open(tmp_path / "out.dcm", "w+b") as out:
        outcome = deidentifier.write(fp, out)
    assert not outcome.held_back, outcome.report["reason"]
    assert outcome.report["compressed_extras_removed"] == 1
    written = (tmp_path / "out.dcm").read_bytes()
    assert str(corpus.PATIENT_NAME).encode() in source.read_bytes()
    assert str(corpus.PATIENT_NAME).encode() not in written
    assert not dcmread(tmp_path / "out.dcm").pixel_array.any()
