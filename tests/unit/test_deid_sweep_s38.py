"""Found by a red team (session 38) building what equipment and PACS write beyond earlier
sweeps: highdicom-built segmentations, TID 1500 reports, Key Object Selections, presentation
states and legacy-converted enhanced CTs; every public text attribute of the data dictionary
holding the patient's name and ID, at the top level and in a sequence item; names from every
person-name attribute (also nested) written in descriptions; partial-precision date-times and
time fractions; references of a report to the images of the same export. Defects found and
closed in the de-identifier and the independent verifier:

- Under Clean Structured Content (teaching, research, accreditation), the observer context of
  a report or Key Object Selection (TID 1003/1004) kept the observer's organisation, login
  and device names, the subject ID (TID 1007) and a dose report's participant IDs and
  organisations (TID 1020/1021), whenever the header did not name them too: only identifiers
  known from the header were cleaned out of the text, and a login, an organisation or a
  subject ID named only there was not looked for in the report's other text or in the
  descriptions. Neither the de-identifier nor the verifier caught it. (A twin's Subject ID,
  ``A`` or ``2``, names no one and is kept.)
- A date-time of year or month precision (``2024``, ``202405+0100``: PS3.5 lets a DT stop at
  any component), and a date in the ACR-NEMA form (``2024.05.02``), were emptied instead of
  moved by Modified Dates: a Type 1 Acquisition DateTime came out empty.
"""

from __future__ import annotations

import io

from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence
from pydicom.uid import UID

from imageshare.deid.profiles import DEFAULT_PROFILES
from tests.deid_through import code as _code
from tests.deid_through import content_item as _item
from tests.deid_through import file_bytes as _file
from tests.deid_through import findings as _findings
from tests.deid_through import written as _written
from tests.factory import ct_header

NAME, PATIENT_ID, BIRTH_DATE, STUDY_DATE = ("Thistlewood^Agatha", "HN8841273", "19470203",
                                            "20240502")
TEACHING, RESEARCH = DEFAULT_PROFILES["teaching"], DEFAULT_PROFILES["research"]
ACCREDITATION = DEFAULT_PROFILES["accreditation"]
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
# What the observer context says that no header attribute of the report says.
ORGANISATION, LOGIN, DEVICE, SERIAL = "Crowthorne Infirmary", "u4471xq", "CTROOM-OKONJO", "SN7731"












def _observer_context() -> list[Dataset]:
    """TID 1002 as a modality writes it: a person observer (TID 1003) and a device observer
    (TID 1004), and the subject (TID 1007)."""
    context = "HAS OBS CONTEXT"
    return [
        _item(context, "CODE", ("121005", "DCM", "Observer Type"),
              ConceptCodeSequence=Sequence([_code("121006", "DCM", "Person")])),
        _item(context, "PNAME", ("121008", "DCM", "Person Observer Name"),
              PersonName="Ravensworth^Imelda"),
        _item(context, "TEXT", ("128774", "DCM", "Person Observer's Login Name"),
              TextValue=LOGIN),
        _item(context, "TEXT", ("121009", "DCM", "Person Observer's Organization Name"),
              TextValue=ORGANISATION),
        _item(context, "TEXT", ("121013", "DCM", "Device Observer Name"), TextValue=DEVICE),
        _item(context, "TEXT", ("121016", "DCM", "Device Observer Serial Number"),
              TextValue=SERIAL),
        _item(context, "TEXT", ("121030", "DCM", "Subject ID"), TextValue="EPR-00917733"),
        _item("CONTAINS", "TEXT", ("121106", "DCM", "Comment"), TextValue="no change"),
    ]


def _report(sop_class: str = COMPREHENSIVE_SR) -> Dataset:
    ds = ct_header(NAME, PATIENT_ID, BIRTH_DATE, STUDY_DATE)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.Modality = "KO" if sop_class == KOS else "SR"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([_code("126000", "DCM",
                                                 "Imaging Measurement Report")])
    ds.ContentSequence = Sequence(_observer_context())
    return ds


def _left(ds: Dataset) -> Dataset:
    """``ds`` with the header's identifiers taken out (what the verifier would pass)."""
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "ANONYMOUS", "X", ""
    ds.StudyDate = ds.SeriesDate = "19000101"
    return ds


def _text_of(output: bytes, concept: str) -> str:
    for item in dcmread(io.BytesIO(output)).ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == concept:
            return str(item.TextValue)
    raise AssertionError(concept)


# -- observer, subject and participant context under Clean Structured Content --------------

def test_the_observer_context_of_a_report_does_not_leave_with_its_text_kept() -> None:
    for sop_class in (COMPREHENSIVE_SR, KOS):
        outcome, output = _written(_report(sop_class), TEACHING)
        assert not outcome.held_back, outcome.report.get("reason")
        for secret in (ORGANISATION, LOGIN, DEVICE, SERIAL, "00917733"):
            assert secret.encode() not in output, secret
        assert _text_of(output, "121106") == "no change"  # the report's own text is kept


def test_a_fetus_keeps_its_subject_id_which_names_no_one() -> None:
    source = _report()
    source.ContentSequence[6].TextValue = "B"  # TID 1008: the second of twins
    outcome, output = _written(source, TEACHING)
    assert not outcome.held_back, outcome.report.get("reason")
    assert _text_of(output, "121030") == "B"


def test_device_observer_names_stay_when_the_profile_keeps_device_identity() -> None:
    outcome, output = _written(_report(), ACCREDITATION)
    assert not outcome.held_back, outcome.report.get("reason")
    assert _text_of(output, "121013") == DEVICE
    assert _text_of(output, "121016") == SERIAL
    assert ORGANISATION.encode() not in output and LOGIN.encode() not in output


def test_the_verifier_finds_observer_context_left_in_a_report() -> None:
    source = _report()
    left = _left(_report())
    for big_endian in (False, True):  # read raw, and read by pydicom
        findings = _findings(source, _file(left, big_endian), TEACHING)
        for index in (3, 4, 5, 6, 7):
            assert any(f"ContentSequence[{index}]" in f and "report" in f
                       for f in findings), (big_endian, index, findings)
        assert not any("ContentSequence[8]" in f for f in findings)


def test_the_verifier_accepts_device_observer_names_a_profile_keeps() -> None:
    source = _report()
    left = _left(_report())
    left.ContentSequence[1].PersonName = "ANONYMOUS"
    for index in (2, 3, 6):
        left.ContentSequence[index].TextValue = "ANONYMOUS"
    assert _findings(source, _file(left), ACCREDITATION) == []
    assert _findings(source, _file(left), TEACHING) != []


def test_a_login_or_organisation_named_only_in_the_observer_context_is_cleaned_elsewhere(
        ) -> None:
    source = _report()
    source.ContentSequence[7].TextValue = f"reported at {ORGANISATION} by {LOGIN}"
    source.StudyDescription = "CT EPR-00917733"
    for profile in (TEACHING, ACCREDITATION):
        outcome, output = _written(source, profile)
        assert not outcome.held_back, outcome.report.get("reason")
        for secret in (ORGANISATION, LOGIN, "00917733"):
            assert secret.encode() not in output, (profile.name, secret)
        assert _text_of(output, "121106") == "reported at * by *"


def test_the_verifier_looks_for_the_observer_context_elsewhere_in_an_output() -> None:
    source = _report()
    left = _left(_report())
    left.ContentSequence[1].PersonName = "ANONYMOUS"
    for index in (2, 3, 4, 5, 6):
        left.ContentSequence[index].TextValue = "ANONYMOUS"
    left.ContentSequence[7].TextValue = f"reported at {ORGANISATION} by {LOGIN}"
    left.StudyDescription = "CT EPR-00917733"
    findings = _findings(source, _file(left), TEACHING)
    assert any("ContentSequence[8]" in f and "institution" in f for f in findings), findings
    assert any("ContentSequence[8]" in f and "login" in f for f in findings), findings
    assert any("StudyDescription" in f for f in findings), findings
    left.ContentSequence[7].TextValue = "no change"
    left.StudyDescription = "CT"
    assert _findings(source, _file(left), TEACHING) == []


# -- dates of partial precision --------------------------------------------------------------

def test_a_date_time_of_year_or_month_precision_is_moved_not_emptied() -> None:
    source = ct_header(NAME, PATIENT_ID, BIRTH_DATE, STUDY_DATE)
    source.AcquisitionDateTime = "2024"
    source.DateTimeOfLastCalibration = "202405+0100"
    source.ContentDate = "2024.05.02"  # ACR-NEMA form
    outcome, output = _written(source, TEACHING)
    assert not outcome.held_back, outcome.report.get("reason")
    out = dcmread(io.BytesIO(output))
    study = out.StudyDate  # STUDY_DATE moved by the patient's offset
    assert study != STUDY_DATE and len(study) == 8
    assert out.ContentDate == study
    # moved as the middle of the year and month: within a year of the study's date
    assert len(out.AcquisitionDateTime) == 4
    assert abs(int(out.AcquisitionDateTime) - int(study[:4])) <= 1
    moved = out.DateTimeOfLastCalibration
    assert len(moved) == 11 and moved[6:] == "+0100" and moved[:6] == study[:6]
