"""Found by a red team (session 35) building object types hospitals send that earlier sweeps did
not cover: a TID 1500 report nested eight levels deep with names, IDs and UIDs in its text,
person, UID and date-time items; Key Object Selection; RT Structure Sets and Plans whose ROI,
plan, beam and set-up labels name the patient; an ECG with annotations; a presentation state
with text objects and named layers; patient demographics in Other Patient IDs, issuer
qualifiers, request attributes, admitting diagnoses, occupation, military rank, branch of
service, address, telephone and religion; curves; enhanced multi-frame per-frame dates; names
in ISO 2022 IR 149 (Korean), GB18030 and UTF-8; and vendors' private blocks. No planted
identifier leaked from these. Defects found and closed in the de-identifier and the
independent verifier:

- A name written in Shift-JIS, EUC-JP, GB18030 or EUC-KR (as Japanese, Chinese and Korean
  modalities write private text, whatever the data set declares) in a safe private attribute
  kept by Retain Safe Private came out: both read such bytes as Latin-1 only.
- A safe private attribute whose value does not fit its VR (an FD of ten bytes, text where an
  IS belongs, as a malformed Siemens header has) failed the whole file instead of going.
- A Korean patient called Ko had their Key Object Selection document's Modality KO replaced by
  ANONYMOUS (the engine) and held back (the verifier).
- An ECG of a patient called Lead (or Peak, Mass, ...) was held back: the verifier took the
  standard meaning of a standard code ("Lead I", "R wave peak") for the patient's name.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from imageshare.deid.profiles import DEFAULT_PROFILES, Profile
from imageshare.deid.pseudonyms import Pseudonyms
from imageshare.deid.service import Deidentifier, Outcome
from imageshare.verify import Verifier
from imageshare.verify.identity import keep_for_options
from tests.factory import ct_header

SECRET = b"s35-sweep-secret-0123456789abcdef"
NAME, PATIENT_ID = "Hargreaves^Winifred", "MRN4471932"
BIRTH_DATE, STUDY_DATE = "19610423", "20240315"
STAFF, OTHER_STAFF = "Okonjo^Balthazar", "Quentina^Zebedee"
INSTITUTION = "Llandudno Clinic"
# What must not come out (upper case, as bytes): the patient, staff and institution named in
# the header, their IDs, and the birth date.
SECRETS = (b"HARGREAVES", b"WINIFRED", b"4471932", b"19610423", b"OKONJO", b"BALTHAZAR",
           b"QUENTINA", b"ZEBEDEE", b"ACC99812", b"LLANDUDNO", b"07700900461")
RESEARCH = DEFAULT_PROFILES["research"]
SIEMENS = "SIEMENS MR HEADER"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _written(ds: Dataset, profile: Profile, verified: bool = True) -> tuple[Outcome, bytes]:
    """``ds`` saved as a file and de-identified through the product path."""
    source = io.BytesIO()
    ds.save_as(source, enforce_file_format=True)
    source.seek(0)
    target = io.BytesIO()
    outcome = Deidentifier(profile, Pseudonyms(SECRET),
                           verifier=Verifier(ocr="never") if verified else None).write(
        source, target)
    return outcome, target.getvalue()


def _findings(source: Dataset, output: bytes, profile: Profile = RESEARCH) -> list[str]:
    """What the verifier finds in ``output`` (bytes of a file) against ``source``."""
    verifier = Verifier(ocr="never")
    identity = verifier.identity([source], keep_for_options(profile.options))
    return [str(f) for f in verifier.check_dicom(io.BytesIO(output), identity, "output")]


def _item(value_type: str, relationship: str, concept: Dataset, **values: object) -> Dataset:
    item = Dataset()
    item.RelationshipType, item.ValueType = relationship, value_type
    item.ConceptNameCodeSequence = Sequence([concept])
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _measurement_report() -> Dataset:
    """A TID 1500 measurement report: identifiers in text, person, UID, date-time, date, time
    and private-code items eight containers deep, a verifier and a creation date."""
    ds = ct_header(NAME, PATIENT_ID, BIRTH_DATE, STUDY_DATE)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.88.34")
    ds.Modality = "SR"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([_code("126000", "DCM", "Imaging Measurement Report")])
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "VERIFIED"
    observer = Dataset()
    observer.VerifyingObserverName, observer.VerificationDateTime = STAFF, "20240316101010"
    observer.VerifyingOrganization = INSTITUTION
    observer.VerifyingObserverIdentificationCodeSequence = Sequence([
        _code("ZEB1", "99LOCAL", "Zebedee Quentina")])
    ds.VerifyingObserverSequence = Sequence([observer])
    ds.InstanceCreationDate, ds.InstanceCreationTime = STUDY_DATE, "101010"
    ds.ContentDate, ds.ContentTime = STUDY_DATE, "101010"
    leaves = [
        _item("TEXT", "CONTAINS", _code("121106", "DCM", "Comment"),
              TextValue="Winifred Hargreaves MRN4471932 seen 15/03/2024, born 23.04.1961"),
        _item("PNAME", "HAS OBS CONTEXT", _code("121008", "DCM", "Person Observer Name"),
              PersonName=OTHER_STAFF),
        _item("UIDREF", "HAS OBS CONTEXT",
              _code("121018", "DCM", "Procedure Study Instance UID"),
              UID=ds.StudyInstanceUID),
        _item("DATETIME", "HAS OBS CONTEXT", _code("111526", "DCM", "DateTime Started"),
              DateTime="20240315101010.123+0100"),
        _item("DATE", "HAS OBS CONTEXT", _code("111018", "DCM", "Content Date"),
              Date=STUDY_DATE),
        _item("CODE", "HAS OBS CONTEXT", _code("121005", "DCM", "Observer Type"),
              ConceptCodeSequence=Sequence([_code("HARG1", "99X", "Hargreaves code")])),
    ]
    container = top = _item("CONTAINER", "CONTAINS", _code("126010", "DCM",
                                                            "Imaging Measurements"),
                            ContinuityOfContent="SEPARATE")
    for _ in range(7):
        inner = _item("CONTAINER", "CONTAINS", _code("125007", "DCM", "Measurement Group"),
                      ContinuityOfContent="SEPARATE")
        container.ContentSequence = Sequence([inner])
        container = inner
    container.ContentSequence = Sequence(leaves)
    ds.ContentSequence = Sequence([top])
    return ds


def _rt_structure_set() -> Dataset:
    ds = ct_header(NAME, PATIENT_ID, BIRTH_DATE, STUDY_DATE)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.481.3")
    ds.Modality = "RTSTRUCT"
    ds.StructureSetLabel, ds.StructureSetName = "Hargreaves pelvis", "HARGREAVES_W"
    ds.StructureSetDescription = "for Winifred"
    ds.StructureSetDate, ds.StructureSetTime = STUDY_DATE, "101010"
    rois, observations = [], []
    for number, name in enumerate(("PTV_Hargreaves", "Bladder", "Winifred CTV"), 1):
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID = number, generate_uid()
        roi.ROIName, roi.ROIDescription = name, "contoured for Hargreaves"
        roi.ROIGenerationAlgorithm, roi.ROIGenerationDescription = "MANUAL", "by Okonjo"
        rois.append(roi)
        observation = Dataset()
        observation.ObservationNumber, observation.ReferencedROINumber = number, number
        observation.ROIObservationLabel = "Hargreaves obs"
        observation.RTROIInterpretedType, observation.ROIInterpreter = "PTV", STAFF
        observations.append(observation)
    ds.StructureSetROISequence = Sequence(rois)
    ds.RTROIObservationsSequence = Sequence(observations)
    return ds


def _rt_plan() -> Dataset:
    ds = ct_header(NAME, PATIENT_ID, BIRTH_DATE, STUDY_DATE)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.481.5")
    ds.Modality = "RTPLAN"
    ds.RTPlanLabel, ds.RTPlanName = "HARGREAVES", "Winifred plan"
    ds.RTPlanDescription, ds.RTPlanGeometry = "Hargreaves 60Gy", "PATIENT"
    ds.RTPlanDate, ds.RTPlanTime = STUDY_DATE, "101010"
    ds.PrescriptionDescription = "for Hargreaves"
    beam = Dataset()
    beam.BeamNumber, beam.BeamName, beam.BeamDescription = 1, "Hargreaves AP", "Winifred"
    beam.BeamType, beam.RadiationType = "STATIC", "PHOTON"
    ds.BeamSequence = Sequence([beam])
    fraction = Dataset()
    fraction.FractionGroupNumber, fraction.FractionGroupDescription = 1, "Hargreaves boost"
    ds.FractionGroupSequence = Sequence([fraction])
    tolerance = Dataset()
    tolerance.ToleranceTableNumber, tolerance.ToleranceTableLabel = 1, "HARGREAVES TT"
    ds.ToleranceTableSequence = Sequence([tolerance])
    setup = Dataset()
    setup.PatientSetupNumber, setup.PatientPosition = 1, "HFS"
    setup.SetupTechniqueDescription, setup.PatientSetupLabel = "Winifred setup", "Hargreaves"
    ds.PatientSetupSequence = Sequence([setup])
    return ds


def _ecg(name: str = NAME) -> Dataset:
    """A 12-lead ECG (one channel kept short) with a text annotation naming the patient and
    SCP-ECG measurements."""
    ds = ct_header(name, PATIENT_ID, BIRTH_DATE, STUDY_DATE)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.9.1.1")
    ds.Modality, ds.AcquisitionDateTime = "ECG", "20240315101010+0100"
    channel = Dataset()
    channel.ChannelSourceSequence = Sequence([_code("5.6.3-9-1", "SCPECG", "Lead I")])
    channel.ChannelLabel = "Hargreaves lead"
    channel.WaveformBitsStored, channel.ChannelSensitivity = 16, 1
    channel.ChannelSensitivityUnitsSequence = Sequence([_code("uV", "UCUM", "uV")])
    channel.ChannelSensitivityCorrectionFactor = 1
    channel.ChannelBaseline, channel.ChannelSampleSkew = 0, 0
    group = Dataset()
    group.MultiplexGroupTimeOffset, group.WaveformOriginality = 0, "ORIGINAL"
    group.NumberOfWaveformChannels, group.NumberOfWaveformSamples = 1, 4
    group.SamplingFrequency, group.MultiplexGroupLabel = 500, "Winifred rhythm"
    group.ChannelDefinitionSequence = Sequence([channel])
    group.WaveformBitsAllocated, group.WaveformSampleInterpretation = 16, "SS"
    group.WaveformData = np.zeros(4, np.int16).tobytes()
    ds.WaveformSequence = Sequence([group])
    text = Dataset()
    text.UnformattedTextValue = "Hargreaves: sinus rhythm, MRN4471932"
    text.AnnotationGroupNumber = 0
    annotations = [text]
    for value, meaning, number in (("5.13.5-7", "PR Interval", 160),
                                   ("D.4.1-R", "R wave peak", 40)):
        annotation = Dataset()
        annotation.ConceptNameCodeSequence = Sequence([_code(value, "SCPECG", meaning)])
        annotation.NumericValue = number
        annotation.MeasurementUnitsCodeSequence = Sequence([_code("ms", "UCUM", "ms")])
        annotations.append(annotation)
    ds.WaveformAnnotationSequence = Sequence(annotations)
    return ds


def _presentation_state() -> Dataset:
    ds = ct_header(NAME, PATIENT_ID, BIRTH_DATE, STUDY_DATE)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.11.1")
    ds.Modality, ds.ContentLabel = "PR", "HARGREAVES"
    ds.ContentDescription, ds.ContentCreatorName = "Winifred annotations", STAFF
    ds.PresentationCreationDate, ds.PresentationCreationTime = STUDY_DATE, "101010"
    layer = Dataset()
    layer.GraphicLayer, layer.GraphicLayerOrder = "HARGREAVES", 1
    layer.GraphicLayerDescription = "Okonjo layer"
    ds.GraphicLayerSequence = Sequence([layer])
    text = Dataset()
    text.UnformattedTextValue = "Winifred Hargreaves 23/04/1961"
    text.BoundingBoxAnnotationUnits = "PIXEL"
    text.BoundingBoxTopLeftHandCorner, text.BoundingBoxBottomRightHandCorner = [1, 1], [50, 10]
    text.BoundingBoxTextHorizontalJustification = "LEFT"
    annotation = Dataset()
    annotation.GraphicLayer, annotation.TextObjectSequence = "HARGREAVES", Sequence([text])
    ds.GraphicAnnotationSequence = Sequence([annotation])
    return ds


def _demographics() -> Dataset:
    """Identifiers in the patient and request sequences and demographic attributes."""
    ds = ct_header(NAME, PATIENT_ID, BIRTH_DATE, STUDY_DATE)
    qualifiers = Dataset()
    qualifiers.UniversalEntityID = "2.16.840.1.113883.2.1.4.1.4471932"
    qualifiers.UniversalEntityIDType, qualifiers.IdentifierTypeCode = "ISO", "MR"
    facility = Dataset()
    facility.LocalNamespaceEntityID = "LLANDUDNO WARD"
    qualifiers.AssigningFacilitySequence = Sequence([facility])
    qualifiers.AssigningJurisdictionCodeSequence = Sequence([_code("LLAN", "99L", "Llandudno")])
    other = Dataset()
    other.PatientID, other.IssuerOfPatientID, other.TypeOfPatientID = (
        "OTHER4471932", "LLANDUDNO", "TEXT")
    other.IssuerOfPatientIDQualifiersSequence = Sequence([qualifiers])
    ds.OtherPatientIDsSequence = Sequence([other])
    ds.IssuerOfPatientIDQualifiersSequence = Sequence([qualifiers])
    request = Dataset()
    request.RequestedProcedureID = request.AccessionNumber = "ACC99812"
    request.RequestedProcedureDescription = "CT for Hargreaves"
    request.ScheduledProcedureStepID = "SPS4471932"
    request.ScheduledProcedureStepDescription = "Winifred chest"
    request.ReasonForTheRequestedProcedure = "Hargreaves cough"
    ds.RequestAttributesSequence = Sequence([request])
    patient = Dataset()
    patient.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.1.4"
    patient.ReferencedSOPInstanceUID = generate_uid()
    ds.ReferencedPatientSequence = Sequence([patient])
    ds.AccessionNumber = "ACC99812"
    ds.AdmittingDiagnosesDescription = "Hargreaves: pneumonia"
    ds.AdmittingDiagnosesCodeSequence = Sequence([_code("J18", "I10", "Winifred pneumonia")])
    ds.Occupation, ds.MilitaryRank = "Baker for Okonjo", "Major Winifred"
    ds.BranchOfService = "Llandudno Fusiliers"
    ds.PatientAddress, ds.PatientTelephoneNumbers = "1 Sea Road, Llandudno", "07700900461"
    ds.PatientReligiousPreference = "Llandudno chapel"
    ds.PatientAge, ds.PatientSex = "062Y", "F"
    ds.InstanceCreationDate, ds.InstanceCreationTime = STUDY_DATE, "101010"
    ds.AcquisitionDateTime = "20240315101010.000000+0100"
    ds.PatientBirthName, ds.PatientMotherBirthName = OTHER_STAFF, "Balthazar^Ada"
    ds.ResponsiblePerson, ds.ResponsiblePersonRole = STAFF, "FATHER"
    return ds


def _curves_and_frames() -> Dataset:
    """A retired curve with its labels, and an enhanced CT's per-frame dates and comments."""
    ds = ct_header(NAME, PATIENT_ID, BIRTH_DATE, STUDY_DATE)
    ds.add_new(0x50000005, "US", 2)
    ds.add_new(0x50000010, "US", 4)
    ds.add_new(0x50000020, "CS", "POLY")
    ds.add_new(0x50000022, "LO", "Hargreaves curve")
    ds.add_new(0x50002500, "LO", "Winifred label")
    ds.add_new(0x50003000, "OW", np.arange(8, dtype=np.uint16).tobytes())
    frames = []
    for _ in range(2):
        content = Dataset()
        content.FrameAcquisitionDateTime = content.FrameReferenceDateTime = "20240315101010"
        content.FrameComments, content.FrameLabel = "Hargreaves frame", "Winifred"
        frame = Dataset()
        frame.FrameContentSequence = Sequence([content])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    return ds


def _in_other_scripts(charset: str, name: str, text: str) -> Dataset:
    ds = ct_header(name, PATIENT_ID, BIRTH_DATE, STUDY_DATE, charset=charset)
    ds.StudyDescription = ds.SeriesDescription = text
    ds.ReferringPhysicianName = name
    return ds


CASES = {
    "TID 1500 report nested eight deep": _measurement_report,
    "RT Structure Set": _rt_structure_set,
    "RT Plan": _rt_plan,
    "ECG with annotations": _ecg,
    "presentation state with text objects": _presentation_state,
    "demographics and request sequences": _demographics,
    "curves and per-frame dates": _curves_and_frames,
}
SCRIPTS = {
    "Korean, ISO 2022 IR 149": ("ISO 2022 IR 149", "김^민수", "김민수 흉부 CT", "민수"),
    "Chinese, GB18030": ("GB18030", "王^伟", "王伟 胸部CT", "王伟"),
    "Japanese, ISO 2022 IR 87": ("\\ISO 2022 IR 87", "Yamada^Tarou=山田^太郎", "山田太郎 胸部CT",
                                 "山田"),
}


@pytest.mark.parametrize("profile", sorted(DEFAULT_PROFILES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_object_types_hospitals_send_leave_nothing_and_stay_readable(case, profile):
    outcome, data = _written(CASES[case](), DEFAULT_PROFILES[profile])
    assert not outcome.held_back, outcome.report.get("reason")
    assert [s for s in SECRETS if s in data.upper()] == []
    out = dcmread(io.BytesIO(data))
    assert out.PatientIdentityRemoved == "YES"
    assert "PatientBirthDate" not in out or not out.PatientBirthDate


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_names_in_korean_chinese_and_japanese_encodings_leave_nothing(script):
    charset, name, text, part = SCRIPTS[script]
    outcome, data = _written(_in_other_scripts(charset, name, text), DEFAULT_PROFILES["teaching"])
    assert not outcome.held_back, outcome.report.get("reason")
    out = dcmread(io.BytesIO(data))
    assert part not in str(out.get("StudyDescription", "")) + str(out.PatientName)
    for encoding in ("utf-8", "euc_kr", "gb18030", "iso2022_jp"):
        try:
            encoded = part.encode(encoding).removeprefix(b"\x1b$B").removesuffix(b"\x1b(B")
        except UnicodeEncodeError:
            continue
        assert encoded not in data, encoding


def test_a_deep_report_keeps_its_structure_with_references_and_dates_moved_together():
    source = _measurement_report()
    study = str(source.StudyInstanceUID)
    outcome, data = _written(source, DEFAULT_PROFILES["teaching"])
    assert not outcome.held_back, outcome.report.get("reason")
    out = dcmread(io.BytesIO(data))
    container = out.ContentSequence[0]
    for _ in range(7):
        container = container.ContentSequence[0]
    leaves = {item.ConceptNameCodeSequence[0].CodeMeaning: item
              for item in container.ContentSequence}
    assert leaves["Procedure Study Instance UID"].UID == out.StudyInstanceUID != study
    started = leaves["DateTime Started"].DateTime
    assert started[8:] == "101010.123+0100"  # the time of day and its zone stay
    assert started[:8] == leaves["Content Date"].Date == out.StudyDate != STUDY_DATE
    assert leaves["Person Observer Name"].PersonName != OTHER_STAFF
    assert "Hargreaves" not in leaves["Comment"].TextValue


# -- safe private attributes in other scripts' encodings, and that do not fit their VR ----------

def _with_safe_private(charset: str, name: str, value: bytes, vr: str = "UN",
                       element: int = 0x0019100D) -> Dataset:
    """A header with a Siemens safe private attribute (PS3.15 E.3.10) holding ``value``."""
    ds = ct_header(name, PATIENT_ID, BIRTH_DATE, STUDY_DATE, charset=charset)
    ds.add_new(0x00190010, "LO", SIEMENS)
    ds.add_new(element, vr, value)
    ds.add_new(0x0019100C, "IS", "1000")  # B_value: kept
    return ds


LEGACY = {
    "Shift-JIS": ("\\ISO 2022 IR 87", "Yamada^Tarou=山田^太郎", "山田太郎", "shift_jis"),
    "EUC-JP": ("\\ISO 2022 IR 87", "Yamada^Tarou=山田^太郎", "山田太郎", "euc_jp"),
    "GB18030": ("GB18030", "王^伟", "王伟", "gb18030"),
    "EUC-KR": ("ISO 2022 IR 149", "김^민수", "김민수", "euc_kr"),
    "UTF-16": ("ISO_IR 192", "王^伟", "王伟", "utf-16-le"),
}


@pytest.mark.parametrize("encoding", sorted(LEGACY))
def test_a_name_in_another_scripts_encoding_in_a_safe_private_value_does_not_leave(encoding):
    charset, name, written, codec = LEGACY[encoding]
    blob = written.encode(codec)
    outcome, data = _written(_with_safe_private(charset, name, b"X " + blob + b" "), RESEARCH,
                             verified=False)
    assert not outcome.held_back, outcome.report.get("reason")
    assert blob not in data
    out = dcmread(io.BytesIO(data))
    assert (0x0019, 0x100D) not in out
    assert out[0x0019100C].value == 1000  # the safe attribute without a name stays


@pytest.mark.parametrize("encoding", sorted(LEGACY))
def test_the_verifier_finds_a_name_in_another_scripts_encoding_in_binary_values(encoding):
    charset, name, written, codec = LEGACY[encoding]
    source = _in_other_scripts(charset, name, "CT")
    outcome, data = _written(source.copy(), RESEARCH, verified=False)
    assert not outcome.held_back
    out = dcmread(io.BytesIO(data))
    assert _findings(source, data) == []
    out.add_new(0x00190010, "LO", SIEMENS)
    out.add_new(0x0019100D, "UN", b"X " + written.encode(codec) + b" ")
    planted = io.BytesIO()
    out.save_as(planted, enforce_file_format=True)
    assert any("patient name" in f for f in _findings(source, planted.getvalue()))


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_safe_private_value_that_does_not_fit_its_vr_goes_instead_of_failing_the_file(syntax):
    # B_matrix is six FD (48 bytes): ten bytes cannot be read; B_value is an IS: text is none
    ds = _with_safe_private("ISO_IR 100", NAME, b"Winifred\0\0", vr="UN", element=0x00191027)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.add_new(0x0019100C, "UN", "Øverby".encode("utf-16-le"))
    outcome, data = _written(ds, RESEARCH)
    assert not outcome.held_back, outcome.report.get("reason")
    out = dcmread(io.BytesIO(data))
    assert (0x0019, 0x1027) not in out and (0x0019, 0x100C) not in out
    assert b"WINIFRED" not in data.upper()


# -- codes and defined terms that are also someone's name --------------------------------------

def _key_objects(name: str) -> Dataset:
    ds = ct_header(name, "KR123456", BIRTH_DATE, STUDY_DATE)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(KOS)
    ds.Modality = "KO"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([_code("113000", "DCM", "Of Interest")])
    ds.ContentSequence = Sequence([_item(
        "TEXT", "CONTAINS", _code("113012", "DCM", "Key Object Description"),
        TextValue=f"For {name.split('^')[0]}, key images")])
    return ds


def test_a_key_object_selection_of_a_patient_called_ko_keeps_its_modality():
    outcome, data = _written(_key_objects("Ko^Minsu"), DEFAULT_PROFILES["teaching"])
    assert not outcome.held_back, outcome.report.get("reason")
    out = dcmread(io.BytesIO(data))
    assert out.Modality == "KO"
    assert "Ko" not in out.ContentSequence[0].TextValue.split(", ")[0].split()


@pytest.mark.parametrize("name", ["Lead^Ivy", "Peak^Ann^R", "Wave^Tom"])
def test_an_ecg_of_a_patient_named_like_its_standard_codes_is_not_held_back(name):
    outcome, data = _written(_ecg(name), DEFAULT_PROFILES["teaching"])
    assert not outcome.held_back, outcome.report.get("reason")
    out = dcmread(io.BytesIO(data))
    source = out.WaveformSequence[0].ChannelDefinitionSequence[0].ChannelSourceSequence[0]
    assert (source.CodeValue, source.CodeMeaning) == ("5.6.3-9-1", "Lead I")
    peak = out.WaveformAnnotationSequence[2].ConceptNameCodeSequence[0]
    assert (peak.CodeValue, peak.CodeMeaning) == ("D.4.1-R", "R wave peak")
    assert name.split("^")[0].upper().encode() not in data.upper().replace(
        b"LEAD I", b"").replace(b"R WAVE PEAK", b"").replace(b"WAVEFORM", b"")


def test_the_verifier_still_finds_a_name_in_codes_that_are_not_the_standards():
    source = _ecg("Lead^Ivy")
    outcome, data = _written(source.copy(), DEFAULT_PROFILES["teaching"], verified=False)
    assert not outcome.held_back
    assert _findings(source, data, DEFAULT_PROFILES["teaching"]) == []
    for value, scheme, meaning in (("5.6.3-9-1", "SCPECG", "Lead I Ivy"),
                                   ("LEAD", "99LOCAL", "Lead")):
        out = dcmread(io.BytesIO(data))
        out.WaveformSequence[0].ChannelDefinitionSequence[0].ChannelSourceSequence = Sequence(
            [_code(value, scheme, meaning)])
        planted = io.BytesIO()
        out.save_as(planted, enforce_file_format=True)
        found = _findings(source, planted.getvalue(), DEFAULT_PROFILES["teaching"])
        assert any("patient name" in f and "ChannelSourceSequence" in f for f in found), meaning


def test_the_verifier_finds_a_modality_that_is_no_defined_term_but_a_name():
    source = _key_objects("Ko^Minsu")
    outcome, data = _written(source.copy(), DEFAULT_PROFILES["teaching"], verified=False)
    assert _findings(source, data, DEFAULT_PROFILES["teaching"]) == []
    out = dcmread(io.BytesIO(data))
    out.Modality = "KO\\MINSU"
    planted = io.BytesIO()
    out.save_as(planted, enforce_file_format=True)
    assert any("Modality" in f for f in _findings(source, planted.getvalue(),
                                                   DEFAULT_PROFILES["teaching"]))


# -- names stored with another VR than their own --------------------------------------------------

def _misfiled(vr: str) -> Dataset:
    """The patient's and the referrer's names written with a wrong VR (as some converters do
    when their dictionary lacks the attribute), both named again in descriptions."""
    ds = ct_header(NAME, PATIENT_ID, BIRTH_DATE, STUDY_DATE)
    ds.ReferringPhysicianName = STAFF
    for tag, name in ((0x00100010, NAME), (0x00080090, STAFF)):
        ds[tag].VR = vr
        ds[tag].value = name.encode() if vr in ("OB", "UN") else name
    ds.StudyDescription = "Referred by Dr Okonjo, Balthazar"
    ds.SeriesDescription = "Winifred Hargreaves, chest"
    return ds


@pytest.mark.parametrize("vr", ["LO", "SH", "UT", "OB"])
def test_names_stored_with_another_vr_are_still_cleaned_out_of_descriptions(vr):
    outcome, data = _written(_misfiled(vr), DEFAULT_PROFILES["teaching"])
    assert not outcome.held_back, outcome.report.get("reason")
    out = dcmread(io.BytesIO(data))
    assert out.StudyDescription == "Referred by Dr *, *"
    assert out.SeriesDescription == "*, chest"
    assert [s for s in SECRETS if s in data.upper()] == []


@pytest.mark.parametrize("vr", ["LO", "OB"])
def test_the_verifier_looks_for_names_stored_with_another_vr(vr):
    source = _misfiled(vr)
    outcome, data = _written(source.copy(), DEFAULT_PROFILES["teaching"], verified=False)
    assert _findings(source, data, DEFAULT_PROFILES["teaching"]) == []
    out = dcmread(io.BytesIO(data))
    out.StudyDescription = "Referred by Dr Okonjo"
    planted = io.BytesIO()
    out.save_as(planted, enforce_file_format=True)
    found = _findings(source, planted.getvalue(), DEFAULT_PROFILES["teaching"])
    assert any("person name" in f and "StudyDescription" in f for f in found)
