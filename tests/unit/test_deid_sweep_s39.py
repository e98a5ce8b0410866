"""Found by a red team (session 39) building a corpus of the PS3.15 Annex E options against
what modalities, RIS and PACS write: AE titles, station names and station codes, presentation
state layers and text, local codes, private UIDs. Coded entries of local schemes carrying a
patient's ID or name, nested person names, the patient's characteristics, comments and history,
and request attributes did not leak. Defects found and closed in the de-identifier and the
independent verifier:

- Under Retain Device Identity without Retain Institution Identity (research, accreditation),
  AE titles and station names that name the hospital or department the way labels are written
  (``STMARYS_CT1``, ``SMH_MR2``, ``CARDIO-CT``) came out as they were, and so did the codes of
  the station name and station location sequences the option keeps (``St Mary's CT 1``,
  ``Cardiology room 3``): a code in a sequence an option keeps was never looked at. Neither
  the de-identifier nor the verifier caught it. Such labels are now replaced by a keyed
  pseudonym (the same for the same label: which machine stays known), such codes by the
  dummy code.
- An institution's name run together (``STMARYS_CARDIAC_CT``) in a protocol name or
  description kept by Clean Descriptors was found by neither.
- Graphic layers named after the patient were all replaced by ``ANONYMOUS``: two layers of
  one presentation state got one name, and the annotations no longer said which layer they
  belong to. They are now renamed by a keyed pseudonym, consistently.
- A private UID kept by Retain Safe Private came out unchanged without Retain UIDs; the
  verifier did not look for the source's private UIDs, nor for the source's dates written in
  a UID that devices make from the date and time.
"""

from __future__ import annotations

import io

from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence
from pydicom.uid import UID

from imageshare.deid.profiles import DEFAULT_PROFILES, Profile
from tests.deid_through import code as _code
from tests.deid_through import file_bytes as _file
from tests.deid_through import findings as _findings
from tests.deid_through import written as _written
from tests.factory import ct_header

NAME, PATIENT_ID, BIRTH_DATE, STUDY_DATE = ("Lovelace^Ada", "MRN4471206", "19500310",
                                            "20240502")
INSTITUTION, DEPARTMENT = "St Mary's Hospital", "Cardiology"
BASIC, TEACHING = DEFAULT_PROFILES["basic"], DEFAULT_PROFILES["teaching"]
RESEARCH, ACCREDITATION = DEFAULT_PROFILES["research"], DEFAULT_PROFILES["accreditation"]
WITH_INSTITUTION = Profile("accreditation-site", ACCREDITATION.options
                           | {"retain_institution_identity"})
PRESENTATION_STATE = "1.2.840.10008.5.1.4.1.1.11.1"
GE_ACQUISITION = "GEMS_ACQU_01"  # its (0019,xx9E) is on the safe private list










def _header(name: str = NAME, patient_id: str = PATIENT_ID, birth_date: str = BIRTH_DATE,
            study_date: str = STUDY_DATE) -> Dataset:
    ds = ct_header(name, patient_id, birth_date, study_date)
    ds.InstitutionName, ds.InstitutionalDepartmentName = INSTITUTION, DEPARTMENT
    return ds


def _site_labelled() -> Dataset:
    """A CT as a hospital's modality worklist and scanner label it."""
    ds = _header()
    ds.StationName = "CT01"
    ds.PerformedStationAETitle = "STMARYS_CT1"
    ds.PerformedStationName = "CARDIO-CT"
    step = Dataset()
    step.ScheduledStationAETitle = ["STMARYS_CT1", "SMH_CT2"]
    step.ScheduledStationName = "CT01"
    ds.ScheduledProcedureStepSequence = Sequence([step])
    ds.PerformedStationNameCodeSequence = Sequence([_code("CT1", "99LOCAL", "St Mary's CT 1")])
    ds.PerformedStationGeographicLocationCodeSequence = Sequence([
        _code("R3", "99LOCAL", "Cardiology room 3")])
    ds.ScheduledStationNameCodeSequence = Sequence([_code("CT01", "99LOCAL", "Scanner CT01")])
    return ds


# -- device labels under Retain Device Identity ----------------------------------------------

def test_ae_titles_and_station_names_naming_the_hospital_are_replaced_consistently() -> None:
    for profile in (ACCREDITATION, RESEARCH):
        outcome, output = _written(_site_labelled(), profile)
        assert not outcome.held_back, outcome.report.get("reason")
        for secret in (b"STMARYS", b"SMH", b"CARDIO", b"MARY"):
            assert secret not in output.upper(), (profile.name, secret)
        out = dcmread(io.BytesIO(output))
        performed = out.PerformedStationAETitle
        scheduled = out.ScheduledProcedureStepSequence[0].ScheduledStationAETitle
        # which machine is still known: the same label, the same pseudonym; another, another
        assert scheduled[0] == performed and scheduled[1] != performed
        assert len(performed) <= 16 and performed.isalnum()
        assert out.PerformedStationName not in ("", "CARDIO-CT", "ANONYMOUS")
        # labels that name no one stay as they are (the point of the option)
        assert out.StationName == "CT01"
        assert out.ScheduledProcedureStepSequence[0].ScheduledStationName == "CT01"
    # with the institution's identity kept too, so are the labels that name it
    outcome, output = _written(_site_labelled(), WITH_INSTITUTION)
    assert not outcome.held_back, outcome.report.get("reason")
    out = dcmread(io.BytesIO(output))
    assert out.PerformedStationAETitle == "STMARYS_CT1"
    assert out.PerformedStationName == "CARDIO-CT"
    assert list(out.ScheduledProcedureStepSequence[0].ScheduledStationAETitle) == [
        "STMARYS_CT1", "SMH_CT2"]
    assert out.PerformedStationNameCodeSequence[0].CodeMeaning == "St Mary's CT 1"


def test_station_codes_kept_by_retain_device_identity_do_not_name_the_hospital() -> None:
    outcome, output = _written(_site_labelled(), ACCREDITATION)
    assert not outcome.held_back, outcome.report.get("reason")
    out = dcmread(io.BytesIO(output))
    for keyword in ("PerformedStationNameCodeSequence",
                    "PerformedStationGeographicLocationCodeSequence"):
        code = out[keyword].value[0]
        assert (code.CodeValue, code.CodingSchemeDesignator) == ("REMOVED", "99DEID"), keyword
    kept = out.ScheduledStationNameCodeSequence[0]
    assert (kept.CodeValue, kept.CodeMeaning) == ("CT01", "Scanner CT01")


def test_a_hospital_name_run_together_in_a_protocol_name_is_cleaned() -> None:
    source = _header()
    source.ProtocolName = "STMARYS_CARDIAC_CT"
    source.SeriesDescription = "St-Marys calcium score"
    for profile in (TEACHING, ACCREDITATION):
        outcome, output = _written(source, profile)
        assert not outcome.held_back, outcome.report.get("reason")
        assert b"MARYS" not in output.upper(), profile.name
        out = dcmread(io.BytesIO(output))
        assert out.ProtocolName == "*_CARDIAC_CT"
        assert out.SeriesDescription == "St-* calcium score"


def test_the_verifier_finds_the_hospital_in_labels_and_local_codes_left_in_an_output(
        ) -> None:
    source = _site_labelled()
    source.ProcedureCodeSequence = Sequence([_code(PATIENT_ID, "99LOCAL", "Lovelace Ada")])
    left = _header("ANONYMOUS", "X", "", "19000101")
    left.InstitutionName = left.InstitutionalDepartmentName = "ANONYMOUS"
    left.PerformedStationAETitle = "STMARYS_CT1"
    left.StationName = "SMH_MR2"
    left.PerformedStationName = "CARDIO-CT"
    left.ProtocolName = "STMARYS_CARDIAC_CT"
    left.PerformedStationNameCodeSequence = Sequence([_code("SMH1", "99LOCAL", "CT 1")])
    left.ProcedureCodeSequence = Sequence([_code(PATIENT_ID, "99LOCAL", "Lovelace Ada")])
    left.AnatomicRegionSequence = Sequence([_code("T-D1100", "SRT", "Lovelace")])
    request = Dataset()
    request.ReasonForRequestedProcedureCodeSequence = Sequence([
        _code("X1", "99LOCAL", "MRN 4471206 follow-up")])
    left.RequestAttributesSequence = Sequence([request])
    for big_endian in (False, True):  # read raw, and read by pydicom
        findings = _findings(source, _file(left, big_endian), ACCREDITATION)
        for place in ("PerformedStationAETitle", "(0008,1010) StationName",
                      "PerformedStationName", "ProtocolName",
                      "PerformedStationNameCodeSequence[1] > (0008,0100)"):
            assert any(place in f and "institution" in f for f in findings), (place, findings)
        for place, kind in (("ProcedureCodeSequence[1] > (0008,0100)", "patient ID"),
                            ("ProcedureCodeSequence[1] > (0008,0104)", "patient name"),
                            ("AnatomicRegionSequence[1] > (0008,0104)", "patient name"),
                            ("ReasonForRequestedProcedureCodeSequence[1] > (0008,0104)",
                             "patient ID")):
            assert any(place in f and kind in f for f in findings), (place, findings)
    # kept by the profile: the hospital's labels are no finding
    left.ProcedureCodeSequence = Sequence([_code("P1", "99LOCAL", "CT heart")])
    left.AnatomicRegionSequence = Sequence([_code("T-D1100", "SRT", "Head")])
    left.RequestAttributesSequence[0].ReasonForRequestedProcedureCodeSequence[0].CodeMeaning = (
        "follow-up")
    assert _findings(source, _file(left), WITH_INSTITUTION) == []
    assert _findings(source, _file(left), ACCREDITATION) != []


# -- presentation states ---------------------------------------------------------------------

def _presentation_state() -> Dataset:
    ds = _header()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(PRESENTATION_STATE)
    ds.Modality = "PR"
    layers = []
    for order, (layer, description) in enumerate((
            ("LOVELACE_ADA", "Ada Lovelace measurements"), (PATIENT_ID, "notes MRN4471206"),
            ("ARROWS", "arrows")), start=1):
        item = Dataset()
        item.GraphicLayer, item.GraphicLayerOrder = layer, order
        item.GraphicLayerDescription = description
        layers.append(item)
    ds.GraphicLayerSequence = Sequence(layers)
    annotations = []
    for layer, text in (("LOVELACE_ADA", "Lovelace, Ada"), (PATIENT_ID, "MRN 4471206"),
                        ("ARROWS", "stenosis")):
        annotation = Dataset()
        annotation.GraphicLayer = layer
        text_object = Dataset()
        text_object.UnformattedTextValue = text
        text_object.AnchorPointAnnotationUnits = "PIXEL"
        text_object.AnchorPoint = [10.0, 10.0]
        text_object.AnchorPointVisibility = "N"
        annotation.TextObjectSequence = Sequence([text_object])
        annotations.append(annotation)
    ds.GraphicAnnotationSequence = Sequence(annotations)
    return ds


def test_graphic_layers_naming_the_patient_are_renamed_apart_and_checked() -> None:
    for profile in (BASIC, TEACHING):  # annotations replaced, and cleaned (Clean Graphics)
        outcome, output = _written(_presentation_state(), profile)
        assert not outcome.held_back, outcome.report.get("reason")
        for secret in (b"LOVELACE", b"Lovelace", b"4471206"):
            assert secret not in output, (profile.name, secret)
        out = dcmread(io.BytesIO(output))
        names = [item.GraphicLayer for item in out.GraphicLayerSequence]
        assert len(set(names)) == 3 and names[2] == "ARROWS", names
        assert all(len(n) <= 16 and n.replace("_", "").isalnum() for n in names)
        # each annotation still belongs to its own layer
        assert [a.GraphicLayer for a in out.GraphicAnnotationSequence] == names
    # and what is left in them is found
    source = _presentation_state()
    left = _presentation_state()
    left.PatientName, left.PatientID, left.PatientBirthDate = "ANONYMOUS", "X", ""
    left.StudyDate = left.SeriesDate = "19000101"
    left.InstitutionName = left.InstitutionalDepartmentName = "ANONYMOUS"
    findings = _findings(source, _file(left), TEACHING)
    for place in ("GraphicLayerSequence[1] > (0070,0002)",
                  "GraphicLayerSequence[1] > (0070,0068)",
                  "GraphicLayerSequence[2] > (0070,0002)",
                  "GraphicAnnotationSequence[1] > (0070,0008) TextObjectSequence[1]",
                  "GraphicAnnotationSequence[2] > (0070,0008) TextObjectSequence[1]"):
        assert any(place in f for f in findings), (place, findings)
    assert not any("GraphicLayerSequence[3]" in f or "GraphicAnnotationSequence[3]" in f
                   for f in findings), findings


# -- UIDs --------------------------------------------------------------------------------------

def _with_private_uid(ds: Dataset, uid: str) -> Dataset:
    block = ds.private_block(0x0019, GE_ACQUISITION, create=True)
    block.add_new(0x9E, "UI", uid)
    return ds


def test_a_private_uid_kept_by_retain_safe_private_is_replaced_unless_uids_are_kept() -> None:
    original = "1.2.840.113619.2.55.3.20240502101010.7"
    outcome, output = _written(_with_private_uid(_header(), original), RESEARCH)
    assert not outcome.held_back, outcome.report.get("reason")
    assert original.encode() not in output and b"20240502" not in output
    out = dcmread(io.BytesIO(output))
    assert str(out[0x0019109E].value).startswith("2.25.")
    keeping = Profile("research-uids", RESEARCH.options | {"retain_uids"})
    outcome, output = _written(_with_private_uid(_header(), original), keeping)
    assert not outcome.held_back, outcome.report.get("reason")
    assert dcmread(io.BytesIO(output))[0x0019109E].value == original


def test_the_verifier_finds_a_private_uid_or_a_source_date_in_a_uid_left_in_an_output(
        ) -> None:
    original = "1.2.840.113619.2.55.3.604688119.7"
    source = _with_private_uid(_header(), original)
    left = _with_private_uid(_header("ANONYMOUS", "X", "", "19000101"), original)
    left.InstitutionName = left.InstitutionalDepartmentName = "ANONYMOUS"
    reference = Dataset()
    reference.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    # made by a device from the study's date and time, named nowhere in the source
    reference.ReferencedSOPInstanceUID = "1.3.46.670589.11.0.5.20240502101010"
    left.ReferencedImageSequence = Sequence([reference])
    for big_endian in (False, True):
        findings = _findings(source, _file(left, big_endian), RESEARCH)
        assert any("original UID (private)" in f and "(0019,109E)" in f
                   for f in findings), findings
        assert any("original date" in f and "ReferencedSOPInstanceUID" in f
                   for f in findings), findings
    # a UID under 2.25 is a number from a UUID or a hash: digits that look like a date are
    # chance; and a profile that keeps UIDs keeps them as they are
    reference.ReferencedSOPInstanceUID = "2.25.20240502101010"
    left[0x0019109E].value = "2.25.1"
    assert _findings(source, _file(left), RESEARCH) == []
    reference.ReferencedSOPInstanceUID = "1.3.46.670589.11.0.5.20240502101010"
    left[0x0019109E].value = original
    keeping = Profile("research-uids", RESEARCH.options | {"retain_uids"})
    assert _findings(source, _file(left), keeping) == []
