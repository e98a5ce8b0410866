"""An adversarial corpus: one patient's identifiers planted in every place a real hospital's
files carry them, on real object types (US cine, CT, MR, Comprehensive SR, Secondary Capture,
Grayscale Softcopy Presentation State, Encapsulated PDF), built with pydicom.

Places: the usual attributes; code sequences with site-chosen text (institution, operator and
staff codes, local procedure codes naming the patient, SR concept codes naming the requesting
doctor, a standard code with a site's own meaning); dates, times and date-times at every depth
(standard, private, SR content, nested sequences, UN-encoded); nested sequences five deep;
private attributes with and without creators, private sequences, private data after the pixel
data; UN-encoded standard attributes; other character sets; SR trees (TEXT, PNAME, DATE, TIME,
DATETIME, CODE, UIDREF, NUM, verifying observer, referenced request); an encapsulated PDF;
overlay planes with drawn text; icon images with drawn text; burned-in text in ultrasound
banners and in the image, changing between the frames of a loop; identifiers split across
elements; the Part 10 preamble; JPEG comments inside compressed pixel data.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf"

# The patient and everyone around them.
FAMILY, GIVEN, MIDDLE = "GARCIA", "MARIA", "ELENA"
PATIENT_NAME = f"{FAMILY}^{GIVEN}^{MIDDLE}"
PATIENT_ID = "HX77123"
NHS_NUMBER = "9434765919"
BIRTH_DATE = "19810304"
ADDRESS = "12 Acacia Avenue, Brighton BN1 1AA"
PHONE = "01632 960123"
ACCESSION = "ACC7731905"
INSTITUTION = "St Swithin Royal Hospital"
DEPARTMENT = "Maternity Ultrasound"
REFERRER = "Okafor^Chidi"
SONOGRAPHER = "Lindqvist^Astrid"
STAFF_NUMBER = "STF-40417"
REQUESTER = "Pemberton^Hugh"
STUDY_DATE, STUDY_TIME = "20240102", "101112"
OTHER_DATE, OTHER_TIME, OTHER_DATETIME = "20231215", "093417", "20240102113459"
# Values that must never come out of any profile (what tests look for in the outputs).
SECRETS = (FAMILY, GIVEN, MIDDLE, PATIENT_ID, NHS_NUMBER, BIRTH_DATE, "Acacia", "BN1 1AA",
           "960123", ACCESSION, "Swithin", "Okafor", "Chidi", "Lindqvist", "Astrid",
           STAFF_NUMBER, "Pemberton")

US_MF, CT, MR = ("1.2.840.10008.5.1.4.1.1.3.1", "1.2.840.10008.5.1.4.1.1.2",
                 "1.2.840.10008.5.1.4.1.1.4")
COMPREHENSIVE_SR, SC = "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.7"
GSPS, PDF = "1.2.840.10008.5.1.4.1.1.11.1", "1.2.840.10008.5.1.4.1.1.104.1"


@dataclass(frozen=True)
class Case:
    """One file of the corpus: a name, the path, and whether OCR is needed to clean it."""

    name: str
    path: Path
    pixels: bool  # burned-in text: the pixel path (OCR) is needed
    held_back: bool = False  # no automatic de-identification can show it safe


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _person(name: str, staff: str = "") -> Dataset:
    item = Dataset()
    item.PersonName = name
    if staff:
        item.PersonIdentificationCodeSequence = [_code(staff, "99STAFF", name.replace("^", " "))]
    item.InstitutionName = INSTITUTION
    item.PersonTelephoneNumbers = PHONE
    return item


def _base(sop_class: str, modality: str, study_uid: str, charset: str = "ISO_IR 192"
          ) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = "SSRH_US_01"
    ds.preamble = f"{PATIENT_NAME} {PATIENT_ID}".encode().ljust(128, b"\0")
    ds.SpecificCharacterSet = charset
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceCreationDate, ds.InstanceCreationTime = STUDY_DATE, "101530"
    ds.InstanceCreatorUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.StudyDate, ds.StudyTime = STUDY_DATE, STUDY_TIME
    ds.SeriesDate, ds.SeriesTime = STUDY_DATE, "101200"
    ds.ContentDate, ds.ContentTime = STUDY_DATE, "101300"
    ds.AcquisitionDateTime = "20240102101250.123456+0000"
    ds.AccessionNumber = ACCESSION
    ds.Modality = modality
    ds.Manufacturer, ds.ManufacturerModelName = "SonoSite", "Edge II"
    ds.SoftwareVersions = "3.2.1"
    ds.StationName, ds.DeviceSerialNumber = "SSRH-MAT-US1", "SN-0042-7781"
    ds.InstitutionName, ds.InstitutionAddress = INSTITUTION, "Swithin Road, Brighton BN2 9ZZ"
    ds.InstitutionalDepartmentName = DEPARTMENT
    ds.InstitutionCodeSequence = [_code("SSRH", "99LOCAL", INSTITUTION)]
    ds.ReferringPhysicianName = REFERRER
    ds.ReferringPhysicianTelephoneNumbers = PHONE
    ds.OperatorsName = SONOGRAPHER
    ds.OperatorIdentificationSequence = [_person(SONOGRAPHER, STAFF_NUMBER)]
    ds.PerformingPhysicianName = REQUESTER
    ds.RequestingPhysician = REQUESTER
    ds.StudyDescription = f"Obstetric scan {FAMILY} {GIVEN}"
    ds.SeriesDescription = f"Growth, ordered by Dr {REQUESTER.split('^')[0]}"
    ds.ProcedureCodeSequence = [_code("US-OB-GARCIA", "99LOCAL",
                                      f"Obstetric scan for {GIVEN} {FAMILY}")]
    ds.StudyID = "STU7731"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.IssuerOfPatientID = "RXH01"
    ds.PatientBirthDate, ds.PatientSex = BIRTH_DATE, "F"
    ds.PatientAddress = ADDRESS
    ds.PatientTelephoneNumbers = PHONE
    ds.OtherPatientNames = [f"{FAMILY}-LOPEZ^{GIVEN}", "Müller^Jürgen"]
    other = Dataset()
    other.PatientID, other.IssuerOfPatientID = NHS_NUMBER, "NHS"
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = [other]
    ds.PatientComments = f"Lives at {ADDRESS}, call {PHONE}"
    ds.ImageComments = f"NHS 943 476 and DOB 04/03/1981 for {GIVEN}"
    ds.DerivationDescription = "5919"  # the rest of the NHS number: split across elements
    # times of day the Basic Profile must not keep
    ds.DateOfLastCalibration, ds.TimeOfLastCalibration = OTHER_DATE, OTHER_TIME
    equipment = Dataset()
    equipment.Manufacturer = "ImageShare test rig"
    equipment.InstitutionName = INSTITUTION
    equipment.ContributionDateTime = OTHER_DATETIME
    equipment.ContributionDescription = f"Edited by {SONOGRAPHER.split('^')[0]}"
    equipment.OperatorsName = SONOGRAPHER
    equipment.PurposeOfReferenceCodeSequence = [_code("109103", "DCM",
                                                      "Modifying Equipment")]
    ds.ContributingEquipmentSequence = [equipment]
    # a request with the accession number and times, five levels down
    request = Dataset()
    request.AccessionNumber = ACCESSION
    request.RequestedProcedureID = "RP-" + ACCESSION
    request.ScheduledProcedureStepID = "SPS-" + PATIENT_ID
    request.RequestedProcedureDescription = f"Scan {FAMILY}"
    deep = Dataset()
    deep.ReferencedSOPClassUID = sop_class
    deep.ReferencedSOPInstanceUID = generate_uid()
    deeper = Dataset()
    deeper.PurposeOfReferenceCodeSequence = [_code("PUR1", "99LOCAL", f"For {GIVEN} {FAMILY}")]
    deeper.ObservationDateTime = OTHER_DATETIME
    deeper.add_new(0x00404030, "SQ", Sequence([_person(REQUESTER)]))  # Performed Station...
    deep.ReferencedImageSequence = [deeper]
    request.ReferencedStudySequence = [deep]
    ds.RequestAttributesSequence = [request]
    ds.AnatomicRegionSequence = [_code("T-D4000", "SRT", "Abdomen of " + FAMILY)]
    # private attributes: with a creator, without one, nested, and a date
    block = ds.private_block(0x0019, "ACME US 1.0", create=True)
    block.add_new(0x10, "LO", f"{FAMILY}^{GIVEN}")
    block.add_new(0x11, "DA", BIRTH_DATE)
    block.add_new(0x12, "TM", OTHER_TIME)
    inner = Dataset()
    inner.private_block(0x0029, "ACME US 1.0", create=True).add_new(0x01, "LO", PATIENT_ID)
    block.add_new(0x13, "SQ", Sequence([inner]))
    ds.add_new(0x00311010, "LO", f"orphan {NHS_NUMBER}")  # private, no creator
    # UN-encoded values: a standard attribute and a private one
    ds.add_new(0x00102180, "UN", f"Teacher {FAMILY}".encode())  # Occupation
    ds.add_new(0x00191014, "UN", f"{GIVEN} {FAMILY}".encode())
    ds.add_new(0x00080013, "TM", "101530")
    return ds


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.truetype(FONT, size)
    except OSError:
        return ImageFont.load_default()


def _draw(image: Image.Image, xy: tuple[int, int], text: str, size: int = 20,
          fill: tuple[int, int, int] | int = (255, 255, 255)) -> None:
    ImageDraw.Draw(image).text(xy, text, fill=fill, font=_font(size))


def _icon(text: str) -> Dataset:
    image = Image.new("L", (128, 64), 0)
    _draw(image, (4, 20), text, size=18, fill=255)
    icon = Dataset()
    icon.Rows, icon.Columns = 64, 128
    icon.SamplesPerPixel, icon.PhotometricInterpretation = 1, "MONOCHROME2"
    icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 8, 8, 7, 0
    icon.PixelData = np.asarray(image).tobytes()
    return icon


def _overlay(ds: Dataset, rows: int, cols: int, text: str) -> None:
    from pydicom.pixels.utils import pack_bits

    image = Image.new("L", (cols, rows), 0)
    _draw(image, (20, rows // 2), text, size=22, fill=255)
    bits = (np.asarray(image) > 127).astype(np.uint8)
    ds.add_new(0x60000010, "US", rows)
    ds.add_new(0x60000011, "US", cols)
    ds.add_new(0x60000022, "LO", f"Annotation for {FAMILY}")
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60001500, "LO", f"{GIVEN} label")
    ds.add_new(0x60003000, "OW", pack_bits(bits.ravel()))


def _grey_image(ds: Dataset, pixels: np.ndarray, bits: int = 16) -> None:
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, 12 if bits == 16 else 8, (
        11 if bits == 16 else 7)
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()


def ct(folder: Path, study_uid: str) -> Path:
    """A CT slice: every header vector, an overlay and an icon with the patient's name drawn,
    private data after the pixel data."""
    ds = _base(CT, "CT", study_uid)
    ds.BurnedInAnnotation = "NO"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.0
    ds.KVP, ds.AcquisitionNumber = 120, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.PatientPosition = "HFS"
    ds.AcquisitionDate, ds.AcquisitionTime = STUDY_DATE, "101245"
    ds.IconImageSequence = [_icon(FAMILY)]
    rng = np.random.default_rng(7)
    _grey_image(ds, rng.integers(0, 2000, (256, 256), dtype=np.uint16))
    _overlay(ds, 256, 256, f"{FAMILY} {PATIENT_ID}")
    after = ds.private_block(0x7FE1, "ACME TRAILER", create=True)
    after.add_new(0x01, "LO", f"{FAMILY} after pixels")
    path = folder / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def mr_japanese(folder: Path) -> Path:
    """An MR image of another patient named in ISO 2022 IR 87 (Japanese), written implicit
    VR little endian."""
    ds = _base(MR, "MR", generate_uid(), charset="")
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"
    ds.OtherPatientNames = ["Yamada^Taro", PATIENT_NAME]  # an alias
    ds.StudyDescription = "山田 太郎 MRI"
    ds.BurnedInAnnotation = "NO"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
    ds.MRAcquisitionType, ds.EchoTime, ds.RepetitionTime = "2D", 10.0, 500.0
    ds.EchoTrainLength, ds.MagneticFieldStrength = 1, 1.5
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 3.0
    ds.PatientPosition = "HFS"
    del ds.OtherPatientIDsSequence
    del ds[0x00102180]  # no UN in implicit VR
    del ds[0x00191014]
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    _grey_image(ds, np.random.default_rng(3).integers(0, 1000, (64, 64), dtype=np.uint16))
    path = folder / "mr.dcm"
    ds.save_as(path, enforce_file_format=True, implicit_vr=True, little_endian=True)
    return path


def _content(value_type: str, relationship: str, concept: Dataset, **values: object
             ) -> Dataset:
    item = Dataset()
    item.RelationshipType, item.ValueType = relationship, value_type
    item.ConceptNameCodeSequence = [concept]
    for key, value in values.items():
        setattr(item, key, value)
    return item


def sr(folder: Path, study_uid: str, image_uid: str) -> Path:
    """A Comprehensive SR report with identifiers in every kind of content item, five levels
    deep, and in its request and verification."""
    ds = _base(COMPREHENSIVE_SR, "SR", study_uid)
    for keyword in ("AnatomicRegionSequence", "ImageComments", "DerivationDescription",
                    "TimeOfLastCalibration", "DateOfLastCalibration", "IconImageSequence"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic Imaging Report")]
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "VERIFIED"
    observer = Dataset()
    observer.VerifyingObserverName = REQUESTER
    observer.VerifyingOrganization = INSTITUTION
    observer.VerificationDateTime = OTHER_DATETIME
    observer.VerifyingObserverIdentificationCodeSequence = [
        _code("PEMB01", "99STAFF", "Dr Hugh Pemberton")]
    ds.VerifyingObserverSequence = [observer]
    request = Dataset()
    request.StudyInstanceUID = study_uid
    request.AccessionNumber = ACCESSION
    request.RequestedProcedureID = "RP-" + ACCESSION
    request.RequestedProcedureDescription = f"Report for {FAMILY}"
    request.RequestedProcedureCodeSequence = [_code("OBREP", "99LOCAL", f"{GIVEN} report")]
    request.PlacerOrderNumberImagingServiceRequest = "PL-" + PATIENT_ID
    request.FillerOrderNumberImagingServiceRequest = "FL-" + PATIENT_ID
    request.ReferencedStudySequence = []
    ds.ReferencedRequestSequence = [request]
    ds.PerformedProcedureCodeSequence = [_code("OBUS", "99LOCAL", f"Scan of {FAMILY}")]
    evidence = Dataset()
    evidence.StudyInstanceUID = study_uid
    series = Dataset()
    series.SeriesInstanceUID = generate_uid()
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = US_MF, image_uid
    series.ReferencedSOPSequence = [ref]
    evidence.ReferencedSeriesSequence = [series]
    ds.CurrentRequestedProcedureEvidenceSequence = [evidence]
    image = _content("IMAGE", "CONTAINS", _code("121080", "DCM", "Best illustration of "
                                                "finding"))
    image_ref = Dataset()
    image_ref.ReferencedSOPClassUID, image_ref.ReferencedSOPInstanceUID = US_MF, image_uid
    image.ReferencedSOPSequence = [image_ref]
    deepest = _content("TEXT", "CONTAINS", _code("121106", "DCM", "Comment"),
                       TextValue=f"Seen with {SONOGRAPHER.replace('^', ' ')}")
    level4 = _content("CONTAINER", "CONTAINS", _code("121070", "DCM", "Findings"),
                      ContinuityOfContent="SEPARATE", ContentSequence=[deepest])
    level3 = _content("CONTAINER", "CONTAINS", _code("121070", "DCM", "Findings"),
                      ContinuityOfContent="SEPARATE", ContentSequence=[level4])
    findings = _content("CONTAINER", "CONTAINS", _code("121070", "DCM", "Findings"),
                        ContinuityOfContent="SEPARATE", ContentSequence=[
        _content("TEXT", "CONTAINS", _code("121071", "DCM", "Finding"),
                 TextValue=f"{GIVEN} {FAMILY} (DOB 04/03/1981, NHS 943 476 5919) is well"),
        _content("TEXT", "CONTAINS", _code("121071", "DCM", "Finding"),
                 TextValue=f"Patient {GIVEN[:3]}"),  # split across two items:
        _content("TEXT", "CONTAINS", _code("121071", "DCM", "Finding"),
                 TextValue=f"{GIVEN[3:]} seen"),
        _content("CODE", "CONTAINS", _code("121073", "DCM", "Impression"),
                 ConceptCodeSequence=[_code("PEMB", "99LOCAL", "Requested by Dr Pemberton")]),
        _content("CODE", "CONTAINS", _code("121073", "DCM", "Impression"),
                 ConceptCodeSequence=[_code("121071", "DCM", f"{FAMILY} finding")]),
        _content("DATE", "CONTAINS", _code("111060", "DCM", "Study Date"), Date=OTHER_DATE),
        _content("TIME", "CONTAINS", _code("111061", "DCM", "Study Time"), Time=OTHER_TIME),
        _content("DATETIME", "CONTAINS", _code("111018", "DCM", "Content Date"),
                 DateTime=OTHER_DATETIME, ObservationDateTime=OTHER_DATETIME),
        _content("UIDREF", "CONTAINS", _code("121012", "DCM", "Device Observer UID"),
                 UID=study_uid),
        _content("NUM", "CONTAINS", _code("121206", "DCM", "Distance"), MeasuredValueSequence=[
            _measured(12.5)]),
        level3, image])
    ds.ContentSequence = [
        _content("PNAME", "HAS OBS CONTEXT", _code("121008", "DCM", "Person Observer Name"),
                 PersonName=REQUESTER),
        _content("TEXT", "HAS OBS CONTEXT", _code("121011", "DCM",
                                                  "Person Observer's Role in this Procedure"),
                 TextValue=f"Consultant, {INSTITUTION}"),
        findings]
    path = folder / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _measured(value: float) -> Dataset:
    item = Dataset()
    item.NumericValue = value
    item.MeasurementUnitsCodeSequence = [_code("mm", "UCUM", "mm")]
    return item


def us_cine(folder: Path, study_uid: str) -> tuple[Path, str]:
    """An ultrasound loop (6 frames): the banner (name, ID, DOB) on every frame, and in the
    image the patient's name on frames 2-3, the birth date on frame 4 and the NHS number on
    frame 5 only."""
    rows, cols, frames = 240, 320, 6
    data = np.zeros((frames, rows, cols, 3), dtype=np.uint8)
    for index in range(frames):
        image = Image.new("RGB", (cols, rows), (0, 0, 0))
        draw = ImageDraw.Draw(image)
        draw.pieslice((40, -80, 280, 220), 55, 125, fill=(70, 70, 70))
        _draw(image, (6, 4), f"{FAMILY} {GIVEN}  {PATIENT_ID}", size=14)
        if index in (1, 2):
            _draw(image, (30, 150), f"{GIVEN} {FAMILY}", size=20)
        if index == 3:
            _draw(image, (30, 180), "DOB 04/03/1981", size=20)
        if index == 4:
            _draw(image, (30, 200), "NHS 943 476 5919", size=20)
        data[index] = np.asarray(image)
    ds = _base(US_MF, "US", study_uid)
    ds.NumberOfFrames, ds.FrameTime = frames, 33.3
    ds.FrameIncrementPointer = 0x00181063
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL"]
    ds.PatientOrientation = ""
    ds.PixelData = data.tobytes()
    path = folder / "us.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ds.SOPInstanceUID


def secondary_capture(folder: Path, study_uid: str) -> Path:
    """A screen capture of a worksheet: dark text on light, a name and birth date in the body,
    JPEG-compressed with a JPEG comment naming the patient (the pixel path decodes it)."""
    image = Image.new("RGB", (320, 200), (235, 235, 235))
    _draw(image, (10, 20), "Fetal growth worksheet", size=16, fill=(0, 0, 0))
    _draw(image, (10, 70), f"Patient {GIVEN} {FAMILY}", size=18, fill=(0, 0, 0))
    _draw(image, (10, 110), "D.O.B. 04/03/1981", size=18, fill=(0, 0, 0))
    _draw(image, (10, 150), "EFW 1450 g", size=18, fill=(0, 0, 0))
    buffer = io.BytesIO()
    image.convert("YCbCr").save(buffer, "JPEG", quality=95,
                                comment=f"{PATIENT_NAME} {PATIENT_ID}".encode())
    ds = _base(SC, "OT", study_uid)
    for keyword in ("AcquisitionDateTime",):
        delattr(ds, keyword)
    ds.ConversionType = "WSD"
    ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = OTHER_DATE, OTHER_TIME
    ds.Rows, ds.Columns = 200, 320
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, \
        "YBR_FULL_422", 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.BurnedInAnnotation = "YES"
    ds.PatientOrientation = ""
    ds.LossyImageCompression = "01"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    path = folder / "sc.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def presentation_state(folder: Path, study_uid: str, image_uid: str) -> Path:
    """A Grayscale Softcopy Presentation State with a text annotation naming the patient, a
    content label and creator, and its creation date and time."""
    ds = _base(GSPS, "PR", study_uid)
    ds.Laterality = ""
    for keyword in ("AnatomicRegionSequence", "ImageComments", "DerivationDescription",
                    "TimeOfLastCalibration", "DateOfLastCalibration", "AcquisitionDateTime"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.ContentLabel = FAMILY
    ds.ContentDescription = f"Marks for {GIVEN} {FAMILY}"
    ds.PresentationCreationDate, ds.PresentationCreationTime = OTHER_DATE, OTHER_TIME
    ds.ContentCreatorName = SONOGRAPHER
    series = Dataset()
    series.SeriesInstanceUID = generate_uid()
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = CT, image_uid
    series.ReferencedImageSequence = [ref]
    ds.ReferencedSeriesSequence = [series]
    area = Dataset()
    area.DisplayedAreaTopLeftHandCorner, area.DisplayedAreaBottomRightHandCorner = [1, 1], [
        256, 256]
    area.PresentationSizeMode = "SCALE TO FIT"
    area.PresentationPixelSpacing = [0.7, 0.7]
    ds.DisplayedAreaSelectionSequence = [area]
    text = Dataset()
    text.UnformattedTextValue = f"Patient {FAMILY} DOB 04/03/1981"
    text.AnchorPointAnnotationUnits, text.AnchorPoint = "PIXEL", [100.0, 100.0]
    text.AnchorPointVisibility = "Y"
    annotation = Dataset()
    annotation.GraphicLayer = "MARKS"
    annotation.TextObjectSequence = [text]
    ds.GraphicAnnotationSequence = [annotation]
    layer = Dataset()
    layer.GraphicLayer, layer.GraphicLayerOrder = "MARKS", 1
    layer.GraphicLayerDescription = f"{SONOGRAPHER.split('^')[0]}'s marks"
    ds.GraphicLayerSequence = [layer]
    ds.PresentationLUTShape = "IDENTITY"
    path = folder / "pr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def encapsulated_pdf(folder: Path, study_uid: str) -> Path:
    """An Encapsulated PDF report naming the patient (held back: no automatic cleaning)."""
    from fpdf import FPDF

    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("helvetica", size=12)
    pdf.cell(0, 10, f"Report for {GIVEN} {FAMILY}, born 04/03/1981, NHS 943 476 5919")
    data = bytes(pdf.output())
    ds = _base(PDF, "DOC", study_uid)
    for keyword in ("AnatomicRegionSequence",):
        delattr(ds, keyword)
    ds.ConversionType = "WSD"
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = f"Report {FAMILY}"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic Imaging Report")]
    ds.EncapsulatedDocument = data + (b"\0" if len(data) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(data)
    path = folder / "pdf.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def build(folder: Path) -> list[Case]:
    """Write the corpus into ``folder``; returns its cases."""
    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    us_path, us_uid = us_cine(folder, study)
    ct_path = ct(folder, study)
    from pydicom import dcmread

    ct_uid = dcmread(ct_path, stop_before_pixels=True).SOPInstanceUID
    return [
        Case("CT", ct_path, pixels=False),
        Case("MR (Japanese, implicit VR)", mr_japanese(folder), pixels=False),
        Case("Comprehensive SR", sr(folder, study, us_uid), pixels=False),
        Case("Presentation state", presentation_state(folder, study, ct_uid), pixels=False),
        Case("Encapsulated PDF", encapsulated_pdf(folder, study), pixels=False, held_back=True),
        Case("US cine", us_path, pixels=True),
        Case("Secondary capture", secondary_capture(folder, study), pixels=True),
    ]
