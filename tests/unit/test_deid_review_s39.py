"""Found by a review (session 39) of the report-context and device-label changes of sessions
38 and 39, each checked by running the engine. Defects closed in the de-identifier and the
independent verifier:

- Report content items whose TEXT is an identifier were missing from the concept lists and
  came out as they were under Clean Structured Content: a person observer's staff number
  (TID 1003 Identifier within Person Observer's Role), the procedure context's accession,
  placer and filler numbers and their issuer (TID 1005), a specimen's container identifier
  and the institution that issued a specimen identifier (TID 1009, TID 8001). The
  de-identifier now keeps one list of such concepts; the verifier its own, of the same
  concepts.
- A Subject ID ("Fetus A") was collected word by word, so "Fetus growth normal" lost its
  first word and a series "OB FETUS BIOMETRY" became "OB * BIOMETRY"; the fetuses' labels
  were replaced by "*" so twins read the same. A fetus's Subject ID (TID 1008) is a label
  that names no one and is kept; any other login or ID is looked for as a whole value only.
- A department's initials were taken for the institution's ("Magnetic Resonance Imaging":
  MRI), so station names and AE titles MRI1 and MRI_3T were pseudonymised and the verifier
  held them back; a four-letter department word (CARE of "Intensive Care Unit") was found
  inside CARESTREAM1; CARDIO2 was kept while CARDIO_2 was pseudonymised.
- Station pseudonyms began with STATION: a ward named "Station 3" made every one of them
  look like the ward to the verifier.
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

NAME, PATIENT_ID, BIRTH_DATE, STUDY_DATE = ("Pankhurst^Sylvia", "MRN5520917", "19610822",
                                            "20240611")
INSTITUTION = "St Mary's Hospital"
TEACHING, ACCREDITATION = DEFAULT_PROFILES["teaching"], DEFAULT_PROFILES["accreditation"]
WITH_INSTITUTION = Profile("accreditation-site", ACCREDITATION.options
                           | {"retain_institution_identity"})
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
# What the report's context says that no header attribute says.
STAFF_NUMBER, ACCESSION, PLACER, FILLER = "STF-88213", "RAD7741902", "PL55120934", "FL66231045"
ORDER_ISSUER, SPECIMEN, CONTAINER = "NORTHGATE-PAS", "S24-1187-A", "BLK-4471-2"
LAB = "Northgate Pathology Laboratory"












def _text(concept: str, meaning: str, value: str, relationship: str = "HAS OBS CONTEXT"
          ) -> Dataset:
    return _item(relationship, "TEXT", (concept, "DCM", meaning), TextValue=value)


def _report(content: list[Dataset]) -> Dataset:
    ds = ct_header(NAME, PATIENT_ID, BIRTH_DATE, STUDY_DATE)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(COMPREHENSIVE_SR)
    ds.Modality = "SR"
    ds.AccessionNumber = "A1001"  # the header's: not the report's
    ds.InstitutionName = INSTITUTION
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([_code("126000", "DCM",
                                                 "Imaging Measurement Report")])
    ds.ContentSequence = Sequence(content)
    return ds


def _text_of(output: bytes, index: int) -> str:
    return str(dcmread(io.BytesIO(output)).ContentSequence[index].TextValue)


# -- identifiers in the report's context ------------------------------------------------------

def _context_report() -> Dataset:
    """TID 1003 with a staff number, TID 1005 with the order's numbers and their issuer,
    TID 1009 with a specimen, its container and the laboratory that issued its identifier."""
    return _report([
        _text("128775", "Identifier within Person Observer's Role", STAFF_NUMBER),  # 0
        _text("121022", "Accession Number", ACCESSION),  # 1
        _text("110190", "Issuer of Identifier", ORDER_ISSUER, "HAS CONCEPT MOD"),  # 2
        _text("121020", "Placer Number", PLACER),  # 3
        _text("121021", "Filler Number", FILLER),  # 4
        _text("121041", "Specimen Identifier", SPECIMEN),  # 5
        _text("111724", "Issuer of Specimen Identifier", LAB),  # 6
        _text("111700", "Specimen Container Identifier", CONTAINER),  # 7
        _text("121106", "Comment", f"block {CONTAINER} reviewed, staff {STAFF_NUMBER}, "
              f"order {ACCESSION}", "CONTAINS"),  # 8
    ])


def test_identifiers_in_a_reports_context_are_replaced_and_cleaned_elsewhere() -> None:
    source = _context_report()
    source.StudyDescription = f"CT order {PLACER}"
    outcome, output = _written(source, TEACHING)
    assert not outcome.held_back, outcome.report.get("reason")
    for secret in (STAFF_NUMBER, ACCESSION, PLACER, FILLER, ORDER_ISSUER, SPECIMEN,
                   CONTAINER, LAB, "88213", "7741902"):
        assert secret.encode() not in output, secret
    assert _text_of(output, 8) == "block * reviewed, staff *, order *"
    assert dcmread(io.BytesIO(output)).StudyDescription == "CT order *"


def test_the_issuer_of_a_specimen_identifier_is_kept_with_the_institutions_identity() -> None:
    outcome, output = _written(_context_report(), WITH_INSTITUTION)
    assert not outcome.held_back, outcome.report.get("reason")
    assert _text_of(output, 6) == LAB
    assert _text_of(output, 2) == ORDER_ISSUER
    for secret in (STAFF_NUMBER, ACCESSION, SPECIMEN, CONTAINER):
        assert secret.encode() not in output, secret


def test_the_verifier_reports_identifiers_left_in_a_reports_context() -> None:
    source = _context_report()
    left = _context_report()
    left.PatientName, left.PatientID, left.PatientBirthDate = "ANONYMOUS", "X", ""
    left.StudyDate = left.SeriesDate = "19000101"
    left.InstitutionName = "ANONYMOUS"
    left.AccessionNumber = ""
    left.ContentSequence[8].TextValue = "reviewed"
    findings = _findings(source, _file(left), TEACHING)
    for index in range(1, 9):
        assert any(f"ContentSequence[{index}]" in f and "report" in f for f in findings), (
            index, findings)
    # what the institution's identity keeps is no finding; the others still are
    kept = _findings(source, _file(left), WITH_INSTITUTION)
    assert not any("ContentSequence[7]" in f or "ContentSequence[3]" in f for f in kept), kept
    assert any("ContentSequence[6]" in f for f in kept), kept
    # a staff number named only in the report's context, left in its other text
    for index in range(8):
        left.ContentSequence[index].TextValue = "ANONYMOUS"
    left.ContentSequence[8].TextValue = f"staff {STAFF_NUMBER}"
    findings = _findings(source, _file(left), TEACHING)
    assert any("ContentSequence[9]" in f and "login or ID" in f for f in findings), findings


# -- a fetus's label, and IDs looked for as a whole ----------------------------------------

def _fetus(label: str, by_number: int = 0) -> Dataset:
    """A TID 5000 section of one fetus with its TID 1008 subject context."""
    context = [
        _item("HAS OBS CONTEXT", "CODE", ("121024", "DCM", "Subject Class"),
              ConceptCodeSequence=Sequence([_code("121026", "DCM", "Fetus")])),
        _text("121030", "Subject ID", label),
    ]
    if by_number:
        measured = Dataset()
        measured.NumericValue = str(by_number)
        measured.MeasurementUnitsCodeSequence = Sequence([_code("1", "UCUM", "no units")])
        context[0] = _item("HAS OBS CONTEXT", "NUM", ("121037", "DCM", "Fetus number"),
                           MeasuredValueSequence=Sequence([measured]))
    section = _item("CONTAINS", "CONTAINER", ("125008", "DCM", "Fetus Summary"),
                    ContinuityOfContent="SEPARATE")
    section.ContentSequence = Sequence([*context, _text(
        "121106", "Comment", "Fetus growth normal", "CONTAINS")])
    return section


def _obstetric_report(labels: tuple[str, str], by_number: bool = False) -> Dataset:
    ds = _report([
        _text("121030", "Subject ID", "Trial Subject 4417"),  # TID 1007: the mother
        _fetus(labels[0], 1 if by_number else 0),
        _fetus(labels[1], 2 if by_number else 0),
        _text("121106", "Comment", "Subject tolerated the study well", "CONTAINS"),
    ])
    ds.SeriesDescription = "OB FETUS BIOMETRY"
    return ds


def _fetus_label(output: bytes, index: int) -> str:
    section = dcmread(io.BytesIO(output)).ContentSequence[index]
    return str(section.ContentSequence[1].TextValue)


def test_a_fetus_keeps_its_label_and_report_words_are_not_taken_for_it() -> None:
    for labels, by_number in ((("Fetus A", "Fetus B"), False), (("F1", "F2"), True),
                              (("Twin 1", "Twin 2"), True)):
        outcome, output = _written(_obstetric_report(labels, by_number), TEACHING)
        assert not outcome.held_back, (labels, outcome.report.get("reason"))
        # the twins are still told apart
        assert (_fetus_label(output, 1), _fetus_label(output, 2)) == labels
        out = dcmread(io.BytesIO(output))
        assert out.SeriesDescription == "OB FETUS BIOMETRY"
        assert str(out.ContentSequence[1].ContentSequence[2].TextValue) == "Fetus growth normal"
        # the mother's Subject ID (TID 1007) is replaced; its words alone are not identifiers
        assert b"4417" not in output
        assert str(out.ContentSequence[3].TextValue) == "Subject tolerated the study well"


def test_the_verifier_accepts_a_fetus_label_and_looks_for_an_id_as_a_whole() -> None:
    source = _obstetric_report(("Fetus A", "Fetus B"))
    left = _obstetric_report(("Fetus A", "Fetus B"))
    left.PatientName, left.PatientID, left.PatientBirthDate = "ANONYMOUS", "X", ""
    left.StudyDate = left.SeriesDate = "19000101"
    left.InstitutionName = "ANONYMOUS"
    left.AccessionNumber = ""
    left.ContentSequence[0].TextValue = "ANONYMOUS"
    assert _findings(source, _file(left), TEACHING) == []
    left.ContentSequence[3].TextValue = "Trial Subject 4417 tolerated the study well"
    findings = _findings(source, _file(left), TEACHING)
    assert any("ContentSequence[4]" in f and "login or ID" in f for f in findings), findings
    # a Subject ID outside a fetus's context is still a finding
    left.ContentSequence[3].TextValue = "well"
    left.ContentSequence[0].TextValue = "Fetus A"
    findings = _findings(source, _file(left), TEACHING)
    assert any("ContentSequence[1]" in f and "report" in f for f in findings), findings


# -- device labels that are modalities or merely contain a short word -----------------------

def _labelled(department: str, station: str, ae: str) -> Dataset:
    ds = ct_header(NAME, PATIENT_ID, BIRTH_DATE, STUDY_DATE)
    ds.InstitutionName, ds.InstitutionalDepartmentName = INSTITUTION, department
    ds.StationName = station
    ds.PerformedStationAETitle = ae
    return ds


def test_modality_labels_are_not_taken_for_the_department() -> None:
    for department, station, ae in (("Magnetic Resonance Imaging", "MRI1", "MRI_3T"),
                                    ("Magnetic Resonance Imaging", "MRI", "PACS_MRI"),
                                    ("Positron Emission Tomography", "PET_CT1", "PET2")):
        source = _labelled(department, station, ae)
        outcome, output = _written(source, ACCREDITATION)
        assert not outcome.held_back, (department, outcome.report.get("reason"))
        out = dcmread(io.BytesIO(output))
        assert (out.StationName, out.PerformedStationAETitle) == (station, ae)
        left = _labelled("ANONYMOUS", station, ae)
        left.PatientName, left.PatientID, left.PatientBirthDate = "ANONYMOUS", "X", ""
        left.StudyDate = left.SeriesDate = "19000101"
        left.InstitutionName = "ANONYMOUS"
        assert _findings(source, _file(left), ACCREDITATION) == []
    # the institution's own initials still name it
    outcome, output = _written(_labelled("Magnetic Resonance Imaging", "SMH_MR2", "SMH2"),
                               ACCREDITATION)
    assert not outcome.held_back, outcome.report.get("reason")
    assert b"SMH" not in output


def test_a_short_department_word_is_found_only_as_a_whole_piece_of_a_label() -> None:
    source = _labelled("Intensive Care Unit", "CARESTREAM1", "CARE_2")
    outcome, output = _written(source, ACCREDITATION)
    assert not outcome.held_back, outcome.report.get("reason")
    out = dcmread(io.BytesIO(output))
    assert out.StationName == "CARESTREAM1"  # a manufacturer's name, not the unit's
    assert out.PerformedStationAETitle not in ("CARE_2", "")
    # an abbreviation names the department numbered with or without a separator
    for ae in ("CARDIO2", "CARDIO_2"):
        outcome, output = _written(_labelled("Cardiology", "CT01", ae), ACCREDITATION)
        assert not outcome.held_back, outcome.report.get("reason")
        assert b"CARDIO" not in output, ae
        source = _labelled("Cardiology", "CARESTREAM1", ae)
        left = _labelled("ANONYMOUS", "CARESTREAM1", ae)
        left.PatientName, left.PatientID, left.PatientBirthDate = "ANONYMOUS", "X", ""
        left.StudyDate = left.SeriesDate = "19000101"
        left.InstitutionName = "ANONYMOUS"
        findings = _findings(source, _file(left), ACCREDITATION)
        assert any("PerformedStationAETitle" in f and "institution" in f
                   for f in findings), (ae, findings)
        assert not any("StationName" in f and "Performed" not in f for f in findings), findings


def test_a_ward_called_station_does_not_hold_back_the_stations_pseudonyms() -> None:
    source = _labelled("Station 3", "STATION3_CT", "WARDCT1")
    outcome, output = _written(source, ACCREDITATION)
    assert not outcome.held_back, outcome.report.get("reason")
    out = dcmread(io.BytesIO(output))
    assert "STATION" not in out.StationName.upper()
    assert out.StationName != "" and out.PerformedStationAETitle == "WARDCT1"
    # the same ward label made twice gets the same pseudonym
    _, again = _written(_labelled("Station 3", "STATION3_CT", "WARDCT1"), ACCREDITATION)
    assert dcmread(io.BytesIO(again)).StationName == out.StationName


def test_the_station_ae_title_is_kept_where_device_identity_is_and_only_there() -> None:
    """Station AE Title (0008,0055) says which machine made the image, as the Performed Station
    AE Title does: kept under Retain Device Identity (unless it names the institution), gone
    without it."""
    source = _labelled("Radiology", "CT1", "CT_SCAN_1")
    source.StationAETitle = "CT_SCAN_1"
    outcome, output = _written(source, ACCREDITATION)
    assert not outcome.held_back, outcome.report.get("reason")
    assert dcmread(io.BytesIO(output)).StationAETitle == "CT_SCAN_1"
    outcome, output = _written(source, TEACHING)
    assert not outcome.held_back, outcome.report.get("reason")
    assert dcmread(io.BytesIO(output)).get("StationAETitle", "") in ("", None)
    assert b"CT_SCAN_1" not in output
    source.StationAETitle = "SMH_CT1"  # the institution's initials
    outcome, output = _written(source, ACCREDITATION)
    assert not outcome.held_back, outcome.report.get("reason")
    assert b"SMH" not in output and dcmread(io.BytesIO(output)).StationAETitle
