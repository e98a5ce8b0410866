"""Found by a hunt (session 41) for identifiers that survive de-identification in what
hospitals send, each checked by running the product path. Defects closed in the de-identifier
and the independent verifier:

- The study date (20240611) written with a two-digit year in a kept label (``CT 11/06/24``,
  ``11.06.24``, ``11-06-24``, ``24/06/11``) came out under profiles that move or remove
  dates, and so did the birth date written year first (``61/08/22``): neither the
  de-identifier nor the verifier read them (only the birth date day first or month first).
  The patient's own event dates (study, series, acquisition, content) and the birth date are
  now looked for in those forms, as whole tokens; other numbers (``5/3/2``, ``1.25.10``) are
  not taken for dates. The study date's six digits in a label (``SP_110624``, a
  segmentation's Content Label) came out as well; they are now a date as a whole word.
- A phone number written in international form (``+44 113 496 0123``,
  ``+44 (0)113 496 0123``, ``0044 113 496 0123``) lost only its national part: the country
  code stayed; one run together (``+441134960123``) was found by the verifier but not cleaned,
  so the instance was held back; with the header in international form, the number written
  nationally (``0113 496 0123``) kept its ``0113`` and the verifier did not find it when the
  header's number had no spaces. The whole number now goes, and the verifier looks for its
  national significant number.
- A report's Subject ID of several words (TID 1007 ``Fetus A`` outside a fetus's context)
  was looked for without word boundaries: a series "Fetus Anatomy" and a comment "Fetus
  Anatomy survey normal" held the instance back. It is now looked for as whole words.

Looked at and left: mammography labels (``MAMMO1``, ``L MLO``) are imaging words only where
a device label is tested for naming the institution; a patient ID ``MAMMO1`` is still looked
for and cleaned everywhere, so nothing leaks there.
"""

from __future__ import annotations

import io

from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence
from pydicom.uid import UID

from imageshare.deid.profiles import DEFAULT_PROFILES, Profile
from tests.deid_through import code as _code
from tests.deid_through import content_item as _item
from tests.deid_through import file_bytes as _file
from tests.deid_through import findings as _findings
from tests.deid_through import written as _written
from tests.factory import ct_header
from tests.unit.test_deid_hunt_s40 import enhanced_ct

NAME, BIRTH_DATE, STUDY_DATE = "Pankhurst^Sylvia", "19610822", "20240611"
ADDRESS, PHONE = "14 Elm Grove, Leeds LS6 2AB", "0113 496 0123"
BASIC, TEACHING = DEFAULT_PROFILES["basic"], DEFAULT_PROFILES["teaching"]
FULL_DATES = Profile("full-dates", frozenset({"retain_full_dates", "clean_descriptors"}))
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def _enhanced_ct(frame_label: str = "AXIAL", phone: str = PHONE, **top: str) -> Dataset:
    """An enhanced CT header of the patient with a frame label and top-level text."""
    return enhanced_ct("MRN5520917", frame_label, phone, **top)


def _frame_label(output: bytes) -> str:
    ds = dcmread(io.BytesIO(output))
    return str(ds.PerFrameFunctionalGroupsSequence[0].FrameContentSequence[0].FrameLabel)


def _label_out(label: str, profile: Profile, phone: str = PHONE) -> str:
    outcome, output = _written(_enhanced_ct(label, phone), profile)
    assert not outcome.held_back, (label, outcome.report.get("reason"))
    return _frame_label(output)


def _left_in_label(label: str, profile: Profile = BASIC, phone: str = PHONE) -> list[str]:
    """What the verifier finds in a de-identified copy into which ``label`` was written back
    as its frame label (as an engine missing it would)."""
    source = _enhanced_ct(phone=phone)
    outcome, output = _written(source.copy(), profile)
    assert not outcome.held_back, outcome.report.get("reason")
    copy = dcmread(io.BytesIO(output))
    copy.PerFrameFunctionalGroupsSequence[0].FrameContentSequence[0].FrameLabel = label
    return _findings(source, _file(copy), profile)


# -- dates with a two-digit year -------------------------------------------------------------

def test_a_study_or_birth_date_with_a_two_digit_year_goes_from_a_kept_label() -> None:
    for profile in (BASIC, TEACHING):
        assert _label_out("CT 11/06/24", profile) == "CT *"
        for written_date in ("11.06.24", "11-06-24", "24/06/11", "6/11/24", "61/08/22",
                             "22/08/61"):
            assert _label_out(written_date, profile) == "*", (profile.name, written_date)
        # numbers that are not the patient's dates stay
        for other in ("5/3/2", "1.25.10", "v 2.4.1", "12.05.30"):
            assert _label_out(other, profile) == other
    # a profile that keeps the dates keeps them written short as well
    assert _label_out("CT 11/06/24", FULL_DATES) == "CT 11/06/24"


def test_the_verifier_finds_a_date_with_a_two_digit_year_left_in_a_label() -> None:
    for written_date in ("CT 11/06/24", "11.06.24", "24/06/11", "24-6-11"):
        assert any(f.startswith("original date in") for f in _left_in_label(written_date)), \
            written_date
    assert any(f.startswith("birth date in") for f in _left_in_label("DOB 61/08/22"))
    for other in ("5/3/2", "1.25.10", "12.05.30", "24/11/06 kV"):
        assert _left_in_label(other) == [], other


def test_a_study_date_written_as_six_digits_goes_from_a_label() -> None:
    seg = ct_header(NAME, "MRN5520917", BIRTH_DATE, STUDY_DATE)
    seg.SOPClassUID = seg.file_meta.MediaStorageSOPClassUID = UID(
        "1.2.840.10008.5.1.4.1.1.66.4")
    seg.Modality, seg.ContentLabel = "SEG", "SP_110624"
    for profile in (BASIC, TEACHING):
        outcome, output = _written(seg.copy(), profile)
        assert not outcome.held_back, outcome.report.get("reason")
        assert b"110624" not in output
        assert _label_out("AX_240611", profile) == "AX_*"
        assert _label_out("AX_123456", profile) == "AX_123456"
    assert any(f.startswith("original date in") for f in _left_in_label("SP_110624"))
    assert _left_in_label("SP_123456") == []


# -- phone numbers in international form ----------------------------------------------------

def test_a_phone_number_in_international_form_goes_whole() -> None:
    for profile in (BASIC, TEACHING):
        for number in ("+44 113 496 0123", "+44 (0)113 496 0123", "0044 113 496 0123",
                       "+441134960123", "+44 113-496-0123"):
            assert _label_out(f"tel {number} ext", profile) == "tel * ext", (profile.name,
                                                                              number)
    # in a description cleaned as free text
    outcome, output = _written(_enhanced_ct(
        StudyDescription="CT chest, call +44 (0)113 496 0123 first"), TEACHING)
    assert not outcome.held_back, outcome.report.get("reason")
    assert dcmread(io.BytesIO(output)).StudyDescription == "CT chest, call * first"
    # the header's number in international form, written nationally in a label
    for header in ("+44 113 496 0123", "+441134960123"):
        assert _label_out("tel 0113 496 0123", BASIC, phone=header) == "tel *", header


def test_the_verifier_finds_a_national_number_of_an_international_header() -> None:
    assert any(f.startswith("phone number in") for f in _left_in_label(
        "tel 0113 496 0123", phone="+441134960123"))
    assert _left_in_label("tel 0113 555 0199", phone="+441134960123") == []


# -- a Subject ID of several words ----------------------------------------------------------

def _report(subject_id: str, comment: str, series: str) -> Dataset:
    """A report whose TID 1007 Subject ID (no fetus's context) is ``subject_id``."""
    ds = ct_header(NAME, "MRN5520917", BIRTH_DATE, STUDY_DATE)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(COMPREHENSIVE_SR)
    ds.Modality, ds.SeriesDescription = "SR", series
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([_code("126000", "DCM",
                                                 "Imaging Measurement Report")])
    ds.ContentSequence = Sequence([
        _item("HAS OBS CONTEXT", "TEXT", ("121030", "DCM", "Subject ID"),
              TextValue=subject_id),
        _item("CONTAINS", "TEXT", ("121106", "DCM", "Comment"), TextValue=comment)])
    return ds


def test_a_subject_id_of_several_words_is_found_on_word_boundaries_only() -> None:
    outcome, output = _written(_report("Fetus A", "Fetus Anatomy survey normal",
                                       "Fetus Anatomy"), TEACHING)
    assert not outcome.held_back, outcome.report.get("reason")
    out = dcmread(io.BytesIO(output))
    assert out.SeriesDescription == "Fetus Anatomy"
    assert out.ContentSequence[1].TextValue == "Fetus Anatomy survey normal"
    assert out.ContentSequence[0].TextValue != "Fetus A"

    # where it is written as a whole it still goes, however joined
    outcome, output = _written(_report("Twin B", "Twin-B smaller than Twin A", "TWIN B"),
                               TEACHING)
    assert not outcome.held_back, outcome.report.get("reason")
    out = dcmread(io.BytesIO(output))
    assert out.SeriesDescription == "*"
    assert out.ContentSequence[1].TextValue == "* smaller than Twin A"


def test_the_verifier_looks_for_a_subject_id_of_several_words_as_whole_words() -> None:
    source = _report("Fetus A", "ok", "Fetus Anatomy")
    left = _report("X", "Fetus Anatomy survey normal", "Fetus Anatomy")
    left.PatientName, left.PatientID, left.PatientBirthDate = "ANONYMOUS", "X", ""
    left.StudyDate = left.SeriesDate = "19000101"
    assert _findings(source, _file(left), TEACHING) == []
    left.ContentSequence[1].TextValue = "FETUS-A anatomy"
    findings = _findings(source, _file(left), TEACHING)
    assert any("ContentSequence[2]" in f and "login or ID" in f for f in findings), findings
