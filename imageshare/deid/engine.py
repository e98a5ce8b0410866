"""The de-identification of one data set's attributes (PS3.15 Annex E), at every depth.

Every attribute gets one action: from Table E.1-1 as changed by the profile's options, or, for
attributes the table does not name, by rule: private attributes go unless the Retain Safe
Private option keeps a known-safe one; person names are emptied; free text is emptied, or
replaced by a dummy where an IOD needs a value, except a short list of technical labels that
are kept once cleaned of identifiers; every date, date-time and time at any depth is replaced
by a dummy, moved by the patient's offset (Retain Longitudinal Temporal Information with
Modified Dates: dates move, times of day stay) or kept (Full Dates); UIDs that are not
well-known DICOM UIDs are replaced consistently. Dates written in text (``2024-03-15``,
``15.03.2024``, ``20240315``, ``4th March 1981``, ``Mar 15, 2021``, ``March 2021``) are taken out
of every text value that is kept: free text, technical labels, and safe private attributes
(which go when they cannot be cleaned). Text whose bytes name someone only when read in another
encoding than the file declares (a name typed in Windows-1251, KOI8-R or UTF-8 in a file
declaring ISO 8859-5) is cleaned in that reading. File meta elements (group 0002) are not
allowed in a data set (PS3.10): found there or in a sequence item, they are removed; of the file
meta group, only what says what the file is and how it is encoded is kept. A report's birth
date (Subject Birth Date) is replaced by a dummy under every option, as the header's is; so
is the text of its observer, subject, procedure, specimen and participant context (an
organisation, a login, a staff number, an order's or a specimen's number and their issuer, a
device name), unless an option keeps that identity; a fetus's Subject ID (TID 1008, ``Fetus
A``) is a label that names no one and is kept.

Coded entries are judged as a whole: a code item is kept only when it is a code of the
standard's context groups (and then carries the standard's meaning); codes of private or local
schemes, and any code under a person or institution context, are replaced by a dummy code. In
a sequence an option keeps (a station's name and location codes under Retain Device Identity)
a code is kept unless it names someone, a date, or the institution whose identity is not kept.
Labels that other attributes refer to or that say which machine made the instance (graphic
layers, AE titles, station names) are replaced by a keyed pseudonym when they name someone or,
for devices, the institution (see :data:`PSEUDONYMOUS_LABELS`).
Sequences the table says to replace (``D``) are walked with every text value replaced by a
dummy; those it says to clean (``C``) with every text value cleaned of identifiers.

Pixel data and overlays' bitmaps are left to :mod:`imageshare.deid.pixels`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import lru_cache
from types import MappingProxyType
from typing import Any

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID_dictionary

from imageshare.deid.codes import (
    DUMMY_CODE,
    FETAL_SECTIONS,
    FETUS_CONTEXT,
    IDENTIFYING_CONCEPTS,
    SUBJECT_ID,
    standard_meaning,
)
from imageshare.deid.identity import (
    PERSON_CONTEXT_WORDS,
    Identity,
    identities_of,
    identity_of,
    normalise,
    values_of,
)
from imageshare.deid.profiles import BASIC_PROFILE_CODE, OPTIONS, Profile
from imageshare.deid.pseudonyms import Pseudonyms, age_at, shift_date, shift_datetime
from imageshare.deid.table import OPTION_LETTERS, TABLE

KNOWN_ACTIONS = {"D", "Z", "X", "K", "C", "U", "X/Z", "X/D", "X/Z/D", "Z/D", "X/Z/U*"}
TEXT_VRS = {"LO", "SH", "ST", "LT", "UT", "UC", "AE", "UR", "PN"}
DATE_VRS = {"DA", "DT"}
TEMPORAL_VRS = {"DA", "DT", "TM"}
_NUMBER_VRS = {"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"}
PIXEL_DATA = 0x7FE00010
# Pixel Data, Float and Double Float Pixel Data: kept at the top level only (the image); in a
# sequence item (a thumbnail nested where no reader looks) they go.
PIXEL_TAGS = {0x7FE00008, 0x7FE00009, PIXEL_DATA}
BINARY_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN"}
ICC_PROFILE = 0x00282000
# Documents carried as bytes (PDF, CDA, HPGL drawings): never kept, at any depth.
DOCUMENT_TAGS = {0x00420011, 0x00686300}
_ANYWHERE, _TOP_LEVEL = -1, 0
# Binary attributes the table does not name that are kept: the image, LUT and palette data
# needed to display it, waveform and spectroscopy samples, and the geometry that is the content
# of surface, tractography, registration, RT and presentation objects (numbers the IOD
# requires). Each is kept where it belongs: anywhere (``_ANYWHERE``), at the top level only
# (``_TOP_LEVEL``), or in an item of the sequence whose tag is given. Every other binary
# attribute the table does not name goes (PS3.15 E.1: what may carry identifying information
# and is not needed goes): documents (Encapsulated Document below the top level, HPGL
# Document), certificates and signatures, selector values of hanging protocols, record keys,
# calibration data, and retired ones.
KEPT_BINARY: dict[str, int] = {
    **dict.fromkeys((
        "RedPaletteColorLookupTableData", "GreenPaletteColorLookupTableData",
        "BluePaletteColorLookupTableData", "AlphaPaletteColorLookupTableData",
        "LargeRedPaletteColorLookupTableData", "LargeGreenPaletteColorLookupTableData",
        "LargeBluePaletteColorLookupTableData", "SegmentedRedPaletteColorLookupTableData",
        "SegmentedGreenPaletteColorLookupTableData", "SegmentedBluePaletteColorLookupTableData",
        "SegmentedAlphaPaletteColorLookupTableData", "GrayLookupTableData", "LUTData",
        "BlendingLookupTableData", "FilterLookupTableData", "WeightingLookupTableData",
        "ICCProfile", "VerticesOfThePolygonalOutline", "TwoDimensionalToThreeDimensionalMapData",
        "VectorGridData", "PointCoordinatesData", "VectorCoordinateData",
        "DoublePointCoordinatesData", "TrianglePointIndexList", "EdgePointIndexList",
        "VertexPointIndexList", "PrimitivePointIndexList", "LongPrimitivePointIndexList",
        "LongTrianglePointIndexList", "LongEdgePointIndexList", "LongVertexPointIndexList",
        "RecommendedDisplayCIELabValueList", "FloatingPointValues", "TrackPointIndexList",
        "AnnotationIndexList", "FillPattern", "VolumetricCurvePoints",
        "VolumetricCurveUpDirections", "UValueData", "VValueData",
        "CompensatorProximalThicknessMap", "CompensatorDistalThicknessMap", "BlockEdgeData",
    ), _ANYWHERE),
    **dict.fromkeys(("WaveformData", "ChannelMinimumValue", "ChannelMaximumValue",
                     "WaveformPaddingValue"), tag_for_keyword("WaveformSequence") or 0),
    **dict.fromkeys(("SpectroscopyData", "FirstOrderPhaseCorrectionAngle", "FloatPixelData",
                     "DoubleFloatPixelData", "ExtendedOffsetTable",
                     "ExtendedOffsetTableLengths"), _TOP_LEVEL),
}
# Technical labels the table does not name, that carry no identity and that IODs need: kept
# once cleaned of the patient's (and everyone else's) identifiers.
# Attributes the table does not list that say which machine made the object, kept (as
# labels: pseudonymised when they name the institution) under Retain Device Identity as the
# table keeps Station Name and the Performed/Scheduled Station AE Titles.
DEVICE_TITLES = frozenset({"StationAETitle"})
TECHNICAL_TEXT = {
    "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "PositionReferenceIndicator",
    "ConvolutionKernel", "FilterType", "ProcessingFunction", "TransducerData",
    "ContrastBolusRoute", "ReceiveCoilName", "TransmitCoilName", "SequenceName",
    "SequenceVariant", "ScanningSequence", "PulseSequenceName", "RescaleType", "LUTExplanation",
    "WindowCenterWidthExplanation", "TransducerType", "MIMETypeOfEncapsulatedDocument",
    "ConversionType", "FrameLabel", "CountsSource", "Units", "RadiopharmaceuticalRoute",
    "Radiopharmaceutical", "AcquisitionContrast", "PhotometricInterpretation", "DetectorType",
    "ImplementationVersionName", "ExposureControlMode", "FocusMethod",
    "DimensionDescriptionLabel", "SegmentLabel", "SegmentAlgorithmName", "ContentLabel",
    "GraphicLayer", "CollimatorType", "PatientPosition", "ViewPosition", "Laterality",
    "ImageLaterality", "BodyPartExamined", "ModalityLUTType", "VOILUTFunction",
    "PresentationLUTShape", "PixelPresentation", "VolumetricProperties",
    "VolumeBasedCalculationTechnique", "ComplexImageComponent", "AcquisitionType",
    "RectificationType", "PixelIntensityRelationship", "StackID", "LUTLabel",
    "TreatmentMachineName", "PrimaryDosimeterUnit", "ApplicatorID", "BeamName",
    "ReferencedFrameOfReferenceUID", "WaveformChannelNumber", "ChannelLabel",
    "FilterMaterial", "AnodeTargetMaterial", "GridFocalDistance", "CodingSchemeName",
    "CodingSchemeResponsibleOrganization", "GraphicLayerDescription", "OverlayType",
    "FrameType", "ImageType", "ContentQualification", "TextFormatID",
    "RealWorldValueLUTData", "DataPointRows", "DoseUnits", "DoseType", "DoseSummationType",
    "TissueHeterogeneityCorrection", "DVHType", "RTROIInterpretedType",
    "CodingSchemeDesignator", "CodingSchemeRegistry", "CodingSchemeExternalID",
    "CodingSchemeVersion",
}
# UIDs that name a kind of object or an encoding, never an instance (a vendor's private SOP
# class such as Philips' 1.3.46.670589.2.5.1.1): kept whether or not pydicom lists them, or
# the copy would claim to be an object of no known class.
CLASS_UID_TAGS = frozenset(int(tag_for_keyword(k) or 0) for k in (
    "SOPClassUID", "ReferencedSOPClassUID", "MediaStorageSOPClassUID", "AffectedSOPClassUID",
    "RequestedSOPClassUID", "ReferencedSOPClassUIDInFile", "SOPClassesInStudy",
    "RelatedGeneralSOPClassUID", "OriginalSpecializedSOPClassUID", "TransferSyntaxUID",
    "ReferencedTransferSyntaxUIDInFile"))
# Defined terms of coded strings that are also words names may hold (a person called Text):
# never taken for a staff or institution name (SR value and relationship types, Image Type).
DEFINED_TERMS = frozenset({
    "TEXT", "CODE", "NUM", "DATETIME", "DATE", "TIME", "UIDREF", "PNAME", "COMPOSITE", "IMAGE",
    "WAVEFORM", "SCOORD", "SCOORD3D", "TCOORD", "CONTAINER", "TABLE", "CONTAINS", "SEPARATE",
    "CONTINUOUS", "COMPLETE", "PARTIAL", "VERIFIED", "UNVERIFIED", "ORIGINAL", "DERIVED",
    "PRIMARY", "SECONDARY", "AXIAL", "LOCALIZER", "OTHER", "NONE", "YES", "MIXED", "VOLUME",
})
# Text that IODs require to have a value where it appears (Type 1): a dummy when not kept.
# The defined terms of Modality (PS3.3 C.7.3.1.1.1, current and retired): a modality is kept
# whatever the patient is called (Ko, a Korean family name, is also KO, Key Object Selection).
MODALITY_TERMS = frozenset({
    "AR", "ASMT", "AU", "BDUS", "BI", "BMD", "CFM", "CR", "CT", "CTPROTOCOL", "DMS", "DG", "DOC",
    "DX", "ECG", "EEG", "EMG", "EOG", "EPS", "ES", "FID", "GM", "HC", "HD", "IO", "IOL", "IVOCT",
    "IVUS", "KER", "KO", "LEN", "LS", "MG", "MR", "M3D", "NM", "OAM", "OCT", "OP", "OPM", "OPT",
    "OPTBSV", "OPTENF", "OPV", "OSS", "OT", "PA", "PLAN", "POS", "PR", "PT", "PX", "REG", "RESP",
    "RF", "RG", "RTDOSE", "RTIMAGE", "RTINTENT", "RTPLAN", "RTRAD", "RTRECORD", "RTSEGANN",
    "RTSTRUCT", "RWV", "SEG", "SM", "SMR", "SR", "SRF", "STAIN", "TEXTUREMAP", "TG", "US", "VA",
    "XA", "XAPROTOCOL", "XC", "CD", "DD", "DF", "DM", "EC", "FA", "FS", "LP", "MA", "MS", "OPR",
    "ST", "VF",
})
_MODALITY_TAGS = frozenset({0x00080060, 0x00080061})
# Concepts of report content items that hold the birth date (TID 1007 Subject Birth Date, and
# its SNOMED CT and LOINC equivalents): their date goes under every option, as the birth date
# of the header does (Table E.1-1: Z whatever the options), not shifted with the study's.
BIRTH_DATE_CONCEPTS = frozenset({("DCM", "121031"), ("SCT", "184099003"),
                                 ("SRT", "184099003"), ("LN", "21112-8")})
_CONCEPT_NAME = 0x0040A043
_CONTENT_SEQUENCE = 0x0040A730
_BIRTH_DATE_VALUES = (0x0040A121, 0x0040A120)  # Date, DateTime
# Report content items whose text says who someone is, where they work or which device made
# the report: :data:`imageshare.deid.codes.IDENTIFYING_CONCEPTS` (what each is, and the option
# that keeps it). A person's login or ID, or an organisation named by no header attribute, is
# found by no identity check: when Clean Structured Content keeps the report's text, theirs is
# replaced by a dummy, unless it is a fetus's label (TID 1008) or an option keeps it.
_TEXT_VALUE = 0x0040A160
# Labels that other attributes refer to by value, or that say which machine made an instance,
# with the prefix of their keyed pseudonym (the same for the same label, so that references
# still match and machines stay apart): a graphic layer, named in each of its annotations, is
# replaced by it when it names the patient or someone as a whole; a device label (every AE
# title, prefix ``AE``, and station names, kept by Retain Device Identity) when it names the
# institution or department whose identity the profile does not keep (``STMARYS_CT1``,
# ``SMH_MR2``, ``CARDIO-CT``), and is otherwise cleaned as other kept labels are.
PSEUDONYMOUS_LABELS: Mapping[int, str] = MappingProxyType({
    int(Tag("GraphicLayer")): "GL", int(Tag("StationName")): "SN",
    int(Tag("PerformedStationName")): "SN", int(Tag("ScheduledStationName")): "SN",
})
# (Prefixes of two letters: no name word of the institution (a ward called "Station 3") can
# be found in a pseudonym, nor its initials, which are three letters or more.)
_DEVICE_LABEL_PREFIXES = frozenset({"AE", "SN"})
# File meta elements a copy keeps (PS3.10 7.1: those that say what the file is and how it is
# encoded; the group length is worked out again when the file is written).
_KEPT_FILE_META = frozenset({0x00020000, 0x00020001, 0x00020002, 0x00020003, 0x00020010,
                             0x00020012, 0x00020013})
REQUIRED_TEXT = {"TextValue", "UnformattedTextValue",
                 "RTImageLabel",  # RT Image module
                 "ContentDescription"}  # Type 1 in an Alternate Content Description item
_CODE_VALUE_TAGS = {int(Tag(k)) for k in ("CodeValue", "LongCodeValue", "URNCodeValue")}
_CODE_TAGS = {int(Tag(k)) for k in (
    "CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning",
    "MappingResource", "ContextGroupVersion", "ContextGroupLocalVersion",
    "ContextGroupExtensionFlag", "ContextGroupExtensionCreatorUID", "ContextIdentifier",
    "ContextUID", "MappingResourceUID", "MappingResourceName", "LongCodeValue",
    "URNCodeValue")}
_CODE_CONTEXT_TAGS = _CODE_TAGS - {int(Tag(k)) for k in (
    "CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning",
    "LongCodeValue", "URNCodeValue")}
# How the combined actions of PS3.15 E.1.1 are carried out here: where the standard lets the
# IOD decide, a dummy value (valid whatever the attribute's type) or an empty one is used, and
# sequences of references keep their items with their UIDs replaced. Sequences are emptied or
# removed rather than filled with dummies where the standard allows it.
_COMBINED = {"X/Z": "Z", "X/D": "D", "X/Z/D": "D", "Z/D": "D", "X/Z/U*": "U"}
# X/Z on a sequence of references (Referenced Study Sequence): its items are kept with new
# UIDs, since IODs require it (Type 2) or at least one item when present.
_COMBINED_SEQUENCE = {"X/Z": "U", "X/D": "X", "X/Z/D": "D", "Z/D": "D", "X/Z/U*": "U"}
# Sequences that some IODs require (Type 2) where the table says X/Z: emptied, not removed.
_TYPE2_SEQUENCES = {tag_for_keyword("AcquisitionContextSequence")}
# Attributes the table removes (X) that some IODs require (Type 2, or 1C in a macro): a dummy.
_TYPE2_REMOVED = {tag_for_keyword(k) for k in ("TreatmentMachineName", "RequestedProcedureID")}
# Walking modes: how text the table does not name is treated inside a sequence.
NORMAL, DUMMY, CLEAN = "normal", "dummy", "clean"


def _dictionary_vr(tag: BaseTag) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


@dataclass(frozen=True)
class Rule:
    """One row of Table E.1-1."""

    basic: str
    options: dict[str, str]


def _parse_table() -> tuple[dict[int, Rule], list[tuple[int, int, Rule]]]:
    exact: dict[int, Rule] = {}
    masked: list[tuple[int, int, Rule]] = []
    for line in TABLE.strip().splitlines():
        tag, basic, *opts = line.split()
        options = {OPTION_LETTERS[o.split("=")[0]]: o.split("=")[1] for o in opts}
        rule = Rule(basic, options)
        if "X" in tag:
            mask = int("".join("0" if c == "X" else "F" for c in tag), 16)
            value = int(tag.replace("X", "0"), 16)
            masked.append((mask, value, rule))
        else:
            exact[int(tag, 16)] = rule
    return exact, masked


EXACT_RULES, MASKED_RULES = _parse_table()


def rule_for(tag: int) -> Rule | None:
    """The table row for ``tag`` (repeating groups included), if the table names it."""
    rule = EXACT_RULES.get(tag)
    if rule is not None:
        return rule
    for mask, value, masked in MASKED_RULES:
        if tag & mask == value:
            return masked
    return None


def effective_action(rule: Rule, profile: Profile) -> str:
    """The action the profile gives an attribute: the Basic Profile's, overridden by its
    options (keep beats clean beats the rest when several apply)."""
    chosen = [action for option, action in rule.options.items() if profile.has(option)]
    if "K" in chosen:
        return "K"
    if "C" in chosen:
        return "C"
    if chosen:
        return chosen[0]
    return rule.basic


def carried_out(action: str, tag: int, vr: str) -> str:
    """How a table action is carried out for an attribute: where the standard lets the IOD
    choose (``X/Z``, ``X/D``, ...), the choice made here (always one of those allowed)."""
    if vr == "SQ":
        if action == "X/Z" and tag in _TYPE2_SEQUENCES:
            return "Z"
        return _COMBINED_SEQUENCE.get(action, action)
    action = _COMBINED.get(action, action)
    return "D" if action == "X" and tag in _TYPE2_REMOVED else action


@dataclass
class InstanceReport:
    """What de-identification did to one instance."""

    actions: Counter[str] = field(default_factory=Counter)
    removed: list[str] = field(default_factory=list)
    private_removed: int = 0
    private_kept: int = 0
    uids_replaced: int = 0
    dates_shifted: int = 0
    dates_replaced: int = 0
    text_cleaned: int = 0
    codes_replaced: int = 0
    documents_removed: int = 0  # documents (PDF, CDA, HPGL) in sequence items, removed

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-friendly data."""
        return {
            "actions": dict(self.actions), "removed": sorted(set(self.removed)),
            "private_removed": self.private_removed, "private_kept": self.private_kept,
            "uids_replaced": self.uids_replaced, "dates_shifted": self.dates_shifted,
            "dates_replaced": self.dates_replaced, "text_cleaned": self.text_cleaned,
            "codes_replaced": self.codes_replaced,
            "documents_removed": self.documents_removed,
        }


@dataclass(frozen=True)
class PatientContext:
    """Who the instance is about: what the text cleaner and OCR look for, and the offset."""

    key: str
    pseudonym: str
    offset: timedelta
    identity: Identity
    patient: Identity
    # the source's dates (YYYYMMDD) that must not be left in numbers: the birth date, and
    # every date of the data set unless the profile keeps full dates
    dates: frozenset[str] = frozenset()
    # identifiers written in letters beyond ASCII, as bytes in UTF-8 and each single-byte
    # code page (see :data:`SINGLE_BYTE_ENCODINGS`): the code pages each form is written in,
    # by its bytes (one test per distinct form)
    encoded: Mapping[bytes, tuple[str, ...]] = field(default_factory=dict)

    @property
    def identifiers(self) -> tuple[str, ...]:
        """The identifying values as written, longest first."""
        return self.identity.raw


def identifiers_of(ds: Dataset) -> Identity:
    """The identifying values of ``ds`` (everyone named, IDs, birth date in every usual form,
    addresses, phone numbers, institution and staff names), for text cleaning and OCR."""
    return identity_of(ds)


_DIGITS = re.compile(r"\b\d[\d\s\-/.]{5,}\d\b")
_DATE_LIKE = re.compile(r"\b\d{1,4}[./-]\d{1,2}[./-]\d{1,4}\b")
# Dates written in text. Every quantifier is bounded (a separator is at most three characters,
# a day two digits, a year four), so each attempt reads a few characters from where it starts
# and a whole scan is linear in the text, whatever the text holds.
_A_DIGIT = re.compile(r"\d")
_NOT_ALNUM_BEFORE, _NOT_ALNUM_AFTER = r"(?<![^\W_])", r"(?![^\W_])"
_FULL_MONTH = (r"(?<![^\W\d_])(?:january|february|march|april|june|july|august|september"
               r"|october|november|december)(?![^\W\d_])")
# Any month, also abbreviated ("may" counts only with a year or an ordinal day: it is a verb)
_MONTH = (r"(?<![^\W\d_])(?:january|february|march|april|june|july|august|september"
          r"|october|november|december|jan|feb|mar|apr|may|jun|jul|aug|sept|sep|oct|nov"
          r"|dec)(?![^\W\d_])")
_DAY = r"(?<!\d)(?:3[01]|[12]\d|0?[1-9])(?!\d)"
_NTH = r"(?:st|nd|rd|th)(?![^\W\d_])"
_SEP = r"[\s,.\-/']{0,3}"
_OF = rf"(?:of{_SEP})?"
_YEAR4 = r"(?<!\d)(?:1[89]\d\d|2[01]\d\d)(?!\d)"
_YEAR = rf"(?:{_YEAR4}|(?<!\d)\d\d(?!\d))"
_WRITTEN_DATE = re.compile(
    _NOT_ALNUM_BEFORE + "(?:"
    + rf"{_DAY}(?:{_NTH})?{_SEP}{_OF}{_MONTH}{_SEP}{_YEAR}"  # 4 March 1981, 04-Mar-81
    + rf"|{_MONTH}{_SEP}{_DAY}(?:{_NTH})?{_SEP}{_YEAR4}"  # March 4, 1981; Mar 15th 2021
    + rf"|{_YEAR4}{_SEP}{_MONTH}(?:{_SEP}{_DAY}(?:{_NTH})?)?"  # 2021 Mar 15, 1981 March
    + rf"|{_MONTH}{_SEP}{_YEAR4}"  # March 2021
    + rf"|{_DAY}{_NTH}{_SEP}{_OF}{_MONTH}"  # 4th of March, 4th Mar
    + rf"|{_DAY}{_SEP}{_OF}{_FULL_MONTH}"  # 4 March
    + rf"|{_MONTH}{_SEP}{_DAY}{_NTH}"  # Mar 4th
    + rf"|{_FULL_MONTH}{_SEP}{_DAY}"  # March 4
    + ")" + _NOT_ALNUM_AFTER, re.IGNORECASE)
# 2024-03-15, 15.03.2024, 03/15/2024 (the same separator twice), read as dates when real days
_NUMERIC_DATE = re.compile(
    _NOT_ALNUM_BEFORE + r"(?:(\d{4})([-./ ])(\d{1,2})\2(\d{1,2})"
    r"|(\d{1,2})([-./ ])(\d{1,2})\6(\d{4}))" + _NOT_ALNUM_AFTER)
# 20240315 (also with a time: 20240315101010), 15032024, 03152024, when real days
_COMPACT_DATE = re.compile(_NOT_ALNUM_BEFORE + r"\d{8,14}" + _NOT_ALNUM_AFTER)
_FIRST_YEAR, _LAST_YEAR = 1800, 2199


def _calendar_date(year: int, month: int, day: int) -> bool:
    """True when (year, month, day) is a real day in the years dates are written for."""
    if not _FIRST_YEAR <= year <= _LAST_YEAR:
        return False
    try:
        date(year, month, day)
    except ValueError:
        return False
    return True


def _compact_date(digits: str) -> bool:
    """A run of digits that is a date: ``YYYYMMDD`` (also followed by a time of day, as in a
    DT value), or ``DDMMYYYY`` / ``MMDDYYYY``."""
    if 8 <= len(digits) <= 14 and _calendar_date(int(digits[:4]), int(digits[4:6]),
                                                 int(digits[6:8])):
        return True
    if len(digits) != 8:
        return False
    first, second, year = int(digits[:2]), int(digits[2:4]), int(digits[4:])
    return _calendar_date(year, second, first) or _calendar_date(year, first, second)


def _numeric_date(match: re.Match[str]) -> str:
    if match.group(1):
        year, month, day = int(match.group(1)), int(match.group(3)), int(match.group(4))
        return "*" if _calendar_date(year, month, day) else match.group()
    first, second, year = int(match.group(5)), int(match.group(7)), int(match.group(8))
    real = _calendar_date(year, second, first) or _calendar_date(year, first, second)
    return "*" if real else match.group()


def mask_dates(text: str) -> str:
    """``text`` with every date written in it replaced by ``*``: numeric dates that are real
    calendar days (``20240315``, ``2024-03-15``, ``15.03.2024``, ``03/15/2024``, also followed by
    a time as in ``20240315101010``), and dates with English month names or their
    abbreviations, with or without ordinals and commas (``4th March 1981``, ``4th of March``,
    ``March 4, 1981``, ``Mar 15 2021``, ``15-Mar-21``, ``2021 Mar 15``, and the month with its
    year: ``March 2021``). A day and month alone count when the month is written in full or
    the day as an ordinal (``4 March``, ``March 4th``; not ``Mar 3`` nor ``may 2``).

    The patterns are fixed (none is built from the text) and their quantifiers bounded, so
    the time taken grows linearly with the text."""
    if not text or _A_DIGIT.search(text) is None:
        return text
    text = _WRITTEN_DATE.sub("*", text)
    text = _NUMERIC_DATE.sub(_numeric_date, text)
    return _COMPACT_DATE.sub(lambda m: "*" if _compact_date(m.group()) else m.group(), text)


def _local_char(char: str) -> bool:
    return char.isalnum() or char in "_.+-"


def _domain_char(char: str) -> bool:
    return char.isalnum() or char in "_.-"


def mask_emails(text: str) -> str:
    """``text`` with every e-mail address (word@host.domain) replaced by ``*``.

    Runs once over the text from each ``@``, so its time grows linearly with the text
    whatever the text holds (a regular expression over free text could backtrack).
    """
    parts: list[str] = []
    done = 0  # text[:done] is settled
    at = text.find("@")
    while at != -1:
        start = at
        while start > done and _local_char(text[start - 1]):
            start -= 1
        while start < at and not (text[start].isalnum() or text[start] == "_"):
            start += 1  # an address starts with a word character
        end = at + 1
        while end < len(text) and _domain_char(text[end]):
            end += 1
        while end > at + 1 and not (text[end - 1].isalnum() or text[end - 1] == "_"):
            end -= 1  # and ends with one
        host = text[at + 1:end]
        dot = host.find(".")
        if start < at and 0 < dot < len(host) - 1:
            parts.append(text[done:start])
            parts.append("*")
            done = end
        at = text.find("@", max(end, at + 1))
    parts.append(text[done:])
    return "".join(parts)


def clean_text(text: str, identity: Identity) -> str:
    """Free ``text`` without the patient's identifiers (or anyone else's), dates (numeric or
    with month names, see :func:`mask_dates`), long numbers and e-mail addresses."""
    cleaned = identity.without_phones(mask_emails(text))  # whole, before other numbers
    cleaned = mask_dates(cleaned)
    cleaned = _DATE_LIKE.sub("*", cleaned)
    cleaned = _DIGITS.sub("*", cleaned)
    return identity.clean(cleaned)


def clean_label(text: str, identity: Identity) -> str:
    """A kept technical label (or kept private text) without dates, e-mail addresses and
    anyone's identifiers; the rest of it (version numbers, kernel names, ...) as it was."""
    cleaned = mask_dates(mask_emails(text))
    return identity.clean(cleaned) if identity.found_in(cleaned) else cleaned


def _dummy(vr: str, element: DataElement) -> Any:
    if vr == "PN":
        return "ANONYMOUS"  # a person other than the patient (the patient gets the pseudonym)
    if vr == "DA":
        return "19000101"
    if vr == "DT":
        return "19000101000000"
    if vr == "TM":
        return "000000"
    if vr in ("IS", "DS"):
        return "0"
    if vr in _NUMBER_VRS:
        return 0
    if vr in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
        return b"\0\0" if element.value else b""
    return "ANONYMOUS"


_KEPT_BINARY_TAGS = {tag_for_keyword(keyword): where for keyword, where in KEPT_BINARY.items()}
# UTF-16 text (Latin-1 characters, big or little endian) in binary values: runs of at least
# four characters (a fixed pattern, never built from data)
_UTF16_BE = re.compile(rb"(?:\x00[\x20-\x7e\xa0-\xff]){4,}")
_UTF16_LE = re.compile(rb"(?:[\x20-\x7e\xa0-\xff]\x00){4,}")


def _kept_binary(tag: int, parent: int, top: bool) -> str:
    """For a binary attribute the table does not name: ``K`` where :data:`KEPT_BINARY`
    keeps it (``I``: an ICC profile, kept once read), ``X`` elsewhere."""
    where = _KEPT_BINARY_TAGS.get(tag)
    if where is None or not (where == _ANYWHERE or where == parent
                             or (where == _TOP_LEVEL and top)):
        return "X"
    return "I" if tag == ICC_PROFILE else "K"


def binary_texts(data: bytes) -> list[str]:
    """The text that binary ``data`` may carry: all of it read as Latin-1, and its UTF-16
    runs (big and little endian, Latin-1 characters) as text."""
    texts = [data.decode("latin-1")]
    for pattern, encoding in ((_UTF16_BE, "utf-16-be"), (_UTF16_LE, "utf-16-le")):
        runs = [m.group().decode(encoding) for m in pattern.finditer(data)]
        if runs:
            texts.append("\n".join(runs))
    return texts


# Encodings that text in binary values is written in besides Latin-1 and UTF-16 runs of Latin-1
# letters: UTF-8, the Japanese, Chinese and Korean multi-byte encodings vendors write private
# text in whatever the data set declares (Shift-JIS, EUC-JP, ISO 2022 JP, GB18030, Big5,
# EUC-KR, ISO 2022 KR), and UTF-16 of any letters (a CJK name two bytes a character).
LEGACY_ENCODINGS = ("utf-8", "shift_jis", "euc_jp", "iso2022_jp", "gb18030", "big5", "euc_kr",
                    "iso2022_kr", "utf-16-le", "utf-16-be")


def legacy_texts(data: bytes) -> list[str]:
    """``data`` read in each of :data:`LEGACY_ENCODINGS` (what cannot be read skipped):
    names written in other scripts' encodings that Latin-1 would read as noise. None when
    ``data`` is plain ASCII without escape sequences (nothing else to read)."""
    if data.isascii() and b"\x1b" not in data and b"\0" not in data:
        return []
    return [data.decode(encoding, "ignore") for encoding in LEGACY_ENCODINGS]


# Single-byte code pages that text is typed in at modalities and RIS terminals whatever the data
# set declares (Windows and DOS code pages, KOI8, the ISO 8859 parts): a Cyrillic, Greek,
# Central European, Baltic, Turkish, Hebrew, Arabic or Thai name written in one of them reads
# as other letters in the declared character set, where no identifier is found.
SINGLE_BYTE_ENCODINGS = ("cp1251", "koi8_r", "koi8_u", "cp866", "iso8859_5", "cp1250",
                         "iso8859_2", "cp852", "cp1253", "iso8859_7", "cp1254", "iso8859_9",
                         "cp1257", "iso8859_13", "cp1255", "iso8859_8", "cp1256", "iso8859_6",
                         "cp874", "cp1252", "cp850", "mac_roman")


def single_byte_texts(data: bytes) -> list[str]:
    """``data`` (stored text) read in each of :data:`SINGLE_BYTE_ENCODINGS`, the readings
    that differ. None when ``data`` is 7-bit (the same in every one of them) or valid UTF-8
    beyond ASCII (text in those code pages never is: it was written in UTF-8)."""
    if data.isascii() or _is_utf8(data):
        return []
    return list(dict.fromkeys(data.decode(encoding, "ignore")
                              for encoding in SINGLE_BYTE_ENCODINGS))


@lru_cache(maxsize=256)
def single_byte_forms(identifiers: tuple[str, ...]) -> Mapping[bytes, tuple[str, ...]]:
    """``identifiers`` written in letters beyond ASCII (as written, in upper, lower and title
    case), encoded in UTF-8 and in each of :data:`SINGLE_BYTE_ENCODINGS` that can write them:
    what a value typed in one of those holds when it names someone; the encodings of each
    distinct form by its bytes (the same patient's instances share one, cached)."""
    forms: dict[bytes, list[str]] = {}
    for ident in identifiers:
        if ident.isascii():
            continue  # the same bytes in every code page: found as declared
        for written in {ident, ident.upper(), ident.lower(), ident.title()}:
            for encoding in ("utf-8", *SINGLE_BYTE_ENCODINGS):
                try:
                    form = written.encode(encoding)
                except UnicodeEncodeError:
                    continue
                forms.setdefault(form, []).append(encoding)
    return MappingProxyType({form: tuple(encodings) for form, encodings in forms.items()})


def _declares_utf8(ds: Dataset) -> bool:
    """True when ``ds`` (or the data set its item belongs to) is read as UTF-8."""
    charset = getattr(ds, "_character_set", None) or ()  # Python codec names (pydicom's)
    names = [charset] if isinstance(charset, str) else list(charset)
    return any(str(name).lower().replace("-", "").replace("_", "") == "utf8"
               for name in names)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def misread_texts(data: bytes) -> list[str]:
    """``data`` read in every encoding it may really be written in: :func:`legacy_texts` and
    :func:`single_byte_texts`."""
    return legacy_texts(data) + single_byte_texts(data)


def _icc_identifies(value: Any, ctx: PatientContext) -> bool:
    """True when an ICC profile's text (its descriptions and copyright, ASCII or UTF-16)
    names anyone named in the data set, or carries one of its identifiers or a date."""
    if not isinstance(value, bytes | bytearray) or not value:
        return False
    return any(ctx.identity.found_in(text) or mask_dates(text) != text
               for text in binary_texts(bytes(value))) or any(
        ctx.identity.found_in(text) for text in legacy_texts(bytes(value)))


def _curve_names_someone(element: DataElement, ctx: PatientContext) -> bool:
    """True for retired Curve Data (50xx group, kept cleaned under Clean Graphics) whose bytes
    carry a name or identifier of the data set as text (a curve's label written into it): it
    cannot be cleaned in place, so it goes."""
    value = element.value
    if BaseTag(element.tag).group & 0xFF00 != 0x5000 or not isinstance(
            value, bytes | bytearray) or not value:
        return False
    data = bytes(value)
    return any(ctx.identity.found_in(text) for text in binary_texts(data) + legacy_texts(data))


def _stray_overlay(tag: BaseTag, top: bool) -> bool:
    """True for an attribute of a 60xx group that is no overlay a viewer shows (PS3.3
    C.9.2: overlays are the even groups 6000-601E of the top-level data set): in a sequence
    item, or in a group beyond 601E."""
    group = tag.group
    return group & 0xFF00 == 0x6000 and group % 2 == 0 and (not top or group > 0x601E)


def _curve_audio(tag: BaseTag) -> bool:
    """True for the retired Audio Sample Data of a curve group (50xx,200C): recorded sound,
    which Clean Graphics (that keeps curves) cannot clean."""
    return tag.group & 0xFF00 == 0x5000 and tag.group % 2 == 0 and tag.element == 0x200C


def _holds_date(value: Any, dates: frozenset[str]) -> bool:
    """True when a number's value (as stored, or as read) holds one of ``dates``."""
    if not dates or value is None:
        return False
    if isinstance(value, bytes | bytearray):
        text = bytes(value).decode("latin-1")
    else:
        text = "\\".join(str(v) for v in values_of(value))
    return any(day in text for day in dates)


def _names_someone(value: str, everyone: Identity) -> bool:
    """True when a coded string value is, as a whole, a word of the name of someone named
    in the data set (staff, the institution; three characters or more), and not one of the
    :data:`DEFINED_TERMS`."""
    norm = normalise(value)
    return len(norm) >= 3 and norm not in DEFINED_TERMS and norm in everyone.words


def _add_date(value: str, dates: set[str]) -> None:
    """Add the date (``YYYYMMDD``) that a DA or DT value starts with, if it is one."""
    for part in value.split("\\"):
        day = part.strip(" \0")[:8]
        if len(day) == 8 and day.isdigit() and day not in ("19000101", "00000000"):
            dates.add(day)


def _dates_of(ds: Dataset, dates: set[str], depth: int = 0) -> None:
    """Add the dates (``YYYYMMDD``) of every DA and DT value of ``ds``, at any depth."""
    if depth > 16:
        return
    for tag in ds.keys():
        raw = ds.get_item(tag)
        vr = raw.VR if raw.VR not in (None, "UN") else _dictionary_vr(BaseTag(tag))
        try:
            if vr == "SQ":
                for item in ds[tag].value or []:
                    _dates_of(item, dates, depth + 1)
            elif vr in DATE_VRS and raw.value:
                value = raw.value
                _add_date(bytes(value).decode("latin-1") if isinstance(value, bytes | bytearray)
                          else "\\".join(str(v) for v in values_of(value)), dates)
        except (ValueError, TypeError, KeyError, AttributeError, NotImplementedError):
            continue  # what cannot be read here is dealt with by the walk


class AttributeCleaner:
    """Applies a profile to data sets, with consistent pseudonyms."""

    def __init__(self, profile: Profile, pseudonyms: Pseudonyms,
                 safe_private: frozenset[tuple[str, int, int]] = frozenset()) -> None:
        self.profile = profile
        self.pseudonyms = pseudonyms
        self.safe_private = safe_private
        self._decisions: dict[tuple[int, str, str], str] = {}
        self._encoded_marks: dict[tuple[bool, bool], Dataset] = {}
        self._method_codes = [BASIC_PROFILE_CODE] + [OPTIONS[o] for o in sorted(profile.options)]
        self._full_dates = profile.has("retain_full_dates")
        self._modified_dates = profile.has("retain_modified_dates")
        # attributes the profile's options keep: not looked for in other values
        self._retained = frozenset(tag for tag, rule in EXACT_RULES.items()
                                   if rule.basic != "K"
                                   and effective_action(rule, profile) == "K")

    # -- entry point -----------------------------------------------------------------------

    def context(self, ds: Dataset) -> PatientContext:
        """The patient context of ``ds`` (pseudonym, date offset, identifiers)."""
        patient_id = str(ds.get("PatientID", "") or "").strip()
        issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
        if patient_id:
            key = f"{issuer}|{patient_id}"
        else:
            key = f"name|{ds.get('PatientName', '')}|{ds.get('PatientBirthDate', '')}"
        everyone, patient = identities_of(ds, self.profile.has("retain_institution_identity"),
                                          self._retained)
        dates: set[str] = set()
        if self._full_dates:
            _add_date(str(ds.get("PatientBirthDate", "") or ""), dates)
        else:
            _dates_of(ds, dates)
        return PatientContext(key, self.pseudonyms.patient_id(key),
                              self.pseudonyms.date_offset(key), everyone, patient,
                              frozenset(dates), single_byte_forms(tuple(everyone.raw)))

    def apply(self, ds: Dataset, ctx: PatientContext | None = None) -> InstanceReport:
        """De-identify ``ds`` in place (not its pixels); returns what was done."""
        ctx = ctx or self.context(ds)
        report = InstanceReport()
        age = None
        if self.profile.has("retain_patient_characteristics") and not ds.get("PatientAge"):
            age = age_at(str(ds.get("PatientBirthDate", "") or ""),
                         str(ds.get("StudyDate", "") or ds.get("SeriesDate", "") or ""))
        self._walk(ds, ctx, report, NORMAL, top=True)
        if age:
            ds.PatientAge = age
        # with their own VRs (a name stored as OB would not take the pseudonym's text)
        ds[0x00100020] = DataElement(0x00100020, "LO", ctx.pseudonym)
        ds[0x00100010] = DataElement(0x00100010, "PN", ctx.pseudonym)
        self._mark(ds)
        if getattr(ds, "preamble", None):
            ds.preamble = b"\0" * 128  # the Part 10 preamble is free for anything
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            if "MediaStorageSOPInstanceUID" in meta and not self.profile.has("retain_uids"):
                meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            # this copy is written by ImageShare, not by the software that made the original
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            meta.ImplementationVersionName = "IMAGESHARE"
            # every other element of the group goes: application entity titles, presentation
            # addresses, private information, RTV elements and elements no dictionary knows
            # (a vendor's name, a site's) say who sent it or carry anything
            for tag in [t for t in meta.keys() if int(t) not in _KEPT_FILE_META]:
                del meta[tag]
        return report

    def apply_part(self, ds: Dataset, ctx: PatientContext) -> InstanceReport:
        """De-identify attributes that belong to a data set read in parts (those stored after
        the pixel data), with the context of the whole."""
        report = InstanceReport()
        self._walk(ds, ctx, report, NORMAL, top=True)
        return report

    # -- walking ---------------------------------------------------------------------------

    def _walk(self, ds: Dataset, ctx: PatientContext, report: InstanceReport, mode: str,
              top: bool = False, person: bool = False, trusted: bool = False,
              parent: int = _TOP_LEVEL, fetal: bool = False) -> None:
        """De-identify the attributes of ``ds`` (the top level, or an item of the sequence
        ``parent``, ``fetal`` when that sequence is a fetus's subject context) and of its
        sequences' items."""
        private_groups_kept: dict[tuple[int, int], bool] = {}
        concept = not top and _CONCEPT_NAME in ds
        birth_date = concept and _holds_birth_date(ds)
        identifying = concept and _TEXT_VALUE in ds and self._identifying(ds, fetal)
        code_item = not top and any(t in ds for t in _CODE_VALUE_TAGS)
        if code_item:
            self._code_item(ds, ctx, report, person, trusted)
        for tag in list(ds.keys()):
            tag = BaseTag(tag)
            if tag == PIXEL_DATA and top:
                continue
            if tag in PIXEL_TAGS and not top:
                # an image in a sequence item (a thumbnail): not the instance's image
                report.actions["X"] += 1
                report.removed.append(keyword_for_tag(tag))
                del ds[tag]
                continue
            if code_item and tag in _CODE_TAGS:
                continue
            if tag.is_private:
                self._private(ds, tag, report, private_groups_kept, ctx)
                continue
            if tag.group == 0x0002:
                # file meta belongs in the file meta group only (PS3.10), never in a data set
                report.actions["X"] += 1
                report.removed.append(keyword_for_tag(tag) or f"{int(tag):08X}")
                del ds[tag]
                continue
            if tag.element == 0:
                del ds[tag]  # group lengths (retired) would be wrong afterwards
                continue
            if _stray_overlay(tag, top) or _curve_audio(tag):
                # an overlay where no viewer shows it (a hidden bitmap, never read by OCR), or
                # sound kept in a curve group: nothing can check either
                report.actions["X"] += 1
                report.removed.append(keyword_for_tag(tag) or f"{int(tag):08X}")
                del ds[tag]
                continue
            raw = ds.get_item(tag)
            vr = raw.VR if raw.VR not in (None, "UN") else _dictionary_vr(tag)
            action = self._decide(int(tag), vr, mode)
            if action == "B":  # binary, not named by the table: kept only where it belongs
                action = _kept_binary(int(tag), parent, top)
                if action == "I":
                    action = "X" if _icc_identifies(raw.value, ctx) else "K"
            elif action == "N":  # a number the table does not name: not a source date
                if _holds_date(raw.value, ctx.dates):
                    report.actions["C"] += 1
                    self._numbers(ds[tag], ctx, report)
                    continue
                action = "K"
            if action == "X" and tag in DOCUMENT_TAGS:
                report.documents_removed += 1
            if action in ("C", "T") and (vr in TEXT_VRS or vr == "CS") and vr != "PN":
                self._reread(ds, tag, raw.value, ctx)
            if action == "K" and vr != "SQ":  # most attributes: no need to decode the value
                report.actions["K"] += 1
                continue
            if action == "X":
                report.actions["X"] += 1
                report.removed.append(keyword_for_tag(tag) or f"{int(tag):08X}")
                del ds[tag]
                continue
            self._act(ds, ds[tag], action, ctx, report, mode, person, trusted)
        # private creators whose elements all went
        for (group, block), kept in private_groups_kept.items():
            if not kept:
                creator_tag = Tag(group, block)
                if creator_tag in ds:
                    del ds[creator_tag]
        if birth_date:  # after the walk, which would have shifted it
            for value_tag in _BIRTH_DATE_VALUES:
                if value_tag in ds and ds[value_tag].value:
                    ds[value_tag].value = _dummy(ds[value_tag].VR, ds[value_tag])
                    report.dates_replaced += 1
        if identifying and _more_than_a_label(ds[_TEXT_VALUE].value):
            ds[_TEXT_VALUE].value = _dummy("UT", ds[_TEXT_VALUE])
            report.text_cleaned += 1
        if top:
            self._drop_overlays_without_data(ds)

    def _identifying(self, item: Dataset, fetal: bool = False) -> bool:
        """True when ``item`` is a report content item whose concept is one of
        :data:`IDENTIFYING_CONCEPTS` and the profile has no option that keeps it; a Subject
        ID among a fetus's subject context (``fetal``: TID 1008, a label such as ``Fetus A``
        that tells the fetuses apart and names no one) is not."""
        for code in _concepts_of(item):
            if code in IDENTIFYING_CONCEPTS:
                if fetal and code == SUBJECT_ID:
                    return False
                option = IDENTIFYING_CONCEPTS[code][1]
                return option is None or not self.profile.has(option)
        return False

    @staticmethod
    def _reread(ds: Dataset, tag: BaseTag, stored: Any, ctx: PatientContext) -> None:
        """A kept text value whose stored bytes name someone only when read in another
        encoding than the data set declares (a surname typed in Windows-1251 or KOI8-R at a
        modality, in a file declaring ISO 8859-5): given that reading, so that it is cleaned
        like any other; the cleaned text is written in the declared character set."""
        if not isinstance(stored, bytes | bytearray):
            return  # a value made in memory: no other reading of it
        data = bytes(stored)
        if data.isascii() or not ctx.encoded:
            return  # 7-bit, or no identifier beyond ASCII: the same in every code page
        if _declares_utf8(ds) and _is_utf8(data):
            return  # UTF-8 declared and written: the declared reading is the one
        encodings = [encoding for form, found in ctx.encoded.items() if form in data
                     for encoding in found]
        if not encodings or ctx.identity.found_in(
                "\\".join(str(v or "") for v in values_of(ds[tag].value))):
            return  # no identifier in any code page, or found as declared: cleaned as it is
        single = ds[tag].VR in ("ST", "LT", "UT", "UR")  # a backslash is a character there
        for encoding in sorted(set(encodings)):
            text = data.decode(encoding, "ignore")
            if ctx.identity.found_in(text):
                text = text.strip(" \0")
                ds[tag].value = text if single else _value_of(text.split("\\"))
                return

    def _decide(self, tag: int, vr: str, mode: str) -> str:
        """The action for an attribute (cached per tag, VR and walking mode)."""
        key = (tag, vr, mode)
        action = self._decisions.get(key)
        if action is None:
            rule = rule_for(tag)
            if rule is not None:
                action = carried_out(effective_action(rule, self.profile), tag, vr)
                if action == "K" and rule.basic != "K" and vr in TEXT_VRS - {"PN"}:
                    action = "T"  # kept by an option: still not if it names someone else
            else:
                action = self._rule_for_unlisted(vr, keyword_for_tag(tag), mode)
            self._decisions[key] = action
        return action

    def _rule_for_unlisted(self, vr: str, keyword: str, mode: str) -> str:
        if vr == "SQ":
            return "K"  # its items are cleaned in turn
        if keyword in DEVICE_TITLES and self.profile.has("retain_device_identity"):
            return "T"  # as the Performed and Scheduled Station AE Titles the table names
        if vr == "UI":
            return "U"
        if vr in TEMPORAL_VRS:
            if self._full_dates:
                return "K"
            return "C" if self._modified_dates else "D"
        if not keyword or vr == "UN":
            return "X"
        if vr in ("IS", "DS"):
            return "N"  # kept unless it holds a source date
        if any(part in BINARY_VRS for part in vr.split(" or ")):
            return "B"  # kept only when it is image, LUT or geometry data (KEPT_BINARY)
        if vr == "PN":
            return "Z" if mode == NORMAL else "D"
        if vr == "CS":
            return "T"  # kept unless it names someone
        if vr in TEXT_VRS:
            if keyword in TECHNICAL_TEXT:
                return "T"
            if mode == CLEAN:
                return "C"
            if mode == DUMMY or keyword in REQUIRED_TEXT:
                return "D"
            return "Z"
        return "K"

    def _act(self, ds: Dataset, element: DataElement, action: str, ctx: PatientContext,
             report: InstanceReport, mode: str, person: bool, trusted: bool) -> None:
        vr = element.VR
        report.actions[action] += 1
        tag = element.tag
        if action == "X":
            report.removed.append(element.keyword or str(tag))
            del ds[tag]
            return
        if vr == "SQ":
            self._sequence(element, action, ctx, report, mode, person, trusted, ds)
            return
        if action == "K":
            return
        if action == "Z":
            element.value = b"" if vr in ("OB", "OW", "UN") else (
                None if vr in _NUMBER_VRS else "")
            return
        if action == "U" or (vr == "UI" and action in ("D", "C")):
            self._replace_uids(element, report)
            return
        if vr in TEMPORAL_VRS:
            if action == "C" and not self._modified_dates and not self._full_dates:
                action = "D"  # cleaned dates without the option: nothing can be kept
            self._temporal(element, ctx, report, dummy=action == "D")
            return
        if action in ("T", "C") and self._label_prefix(element):
            self._label(element, action, ctx, report)
            return
        if action == "T":
            self._technical(element, ctx, report)
            return
        if action == "C":
            if _curve_names_someone(element, ctx):
                report.removed.append(element.keyword or str(tag))
                del ds[tag]
                return
            self._clean(element, ctx, report)
            return
        if action == "D":
            element.value = _dummy(vr, element)
            return
        raise ValueError(f"unknown de-identification action {action!r}")

    def _sequence(self, element: DataElement, action: str, ctx: PatientContext,
                  report: InstanceReport, mode: str, person: bool, trusted: bool,
                  owner: Dataset | None = None) -> None:
        """The items of the sequence ``element`` of ``owner`` walked (or emptied)."""
        if action == "Z":
            element.value = Sequence([])
            return
        inner_person = person or any(w in (element.keyword or "")
                                     for w in PERSON_CONTEXT_WORDS)
        inner_mode = {"D": DUMMY, "C": CLEAN}.get(action, mode)
        inner_trusted = trusted or action == "K" and rule_for(int(element.tag)) is not None
        items = element.value or []
        fetal = fetus_context(items) or (
            element.tag == _CONTENT_SEQUENCE and owner is not None and fetal_section(owner))
        for item in items:
            self._walk(item, ctx, report, inner_mode, person=inner_person,
                       trusted=inner_trusted, parent=int(element.tag), fetal=fetal)

    def _code_item(self, item: Dataset, ctx: PatientContext, report: InstanceReport,
                   person: bool, trusted: bool) -> None:
        """A coded entry: kept only when it is a standard code (with the standard's meaning),
        else replaced by the dummy code. In a sequence an option keeps (``trusted``: a
        station's name or location under Retain Device Identity), any code is kept unless
        its value or meaning carries anyone's identifier or a date, or names the institution
        or department whose identity the profile does not keep."""
        scheme = str(item.get("CodingSchemeDesignator", "") or "")
        value = str(item.get("CodeValue") or item.get("LongCodeValue")
                    or item.get("URNCodeValue") or "")
        if trusted:
            texts = [value, str(item.get("CodeMeaning", "") or "")]
            if not any(ctx.identity.found_in(t) or mask_dates(t) != t
                       or ctx.identity.names_place(t) for t in texts if t):
                return
            meaning = None
        else:
            meaning = None if person else standard_meaning(scheme, value)
        for tag in _CODE_CONTEXT_TAGS:
            if tag in item:
                del item[tag]
        if meaning is not None:
            if str(item.get("CodeMeaning", "")) != meaning:
                item.CodeMeaning = meaning
            version = str(item.get("CodingSchemeVersion", "") or "")
            if version and not all(c.isdigit() or c == "." for c in version):
                del item.CodingSchemeVersion
            return
        for tag in _CODE_TAGS:
            if tag in item:
                del item[tag]
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = DUMMY_CODE
        report.codes_replaced += 1

    def _replace_uids(self, element: DataElement, report: InstanceReport) -> None:
        if element.VR != "UI" or self.profile.has("retain_uids") \
                or int(element.tag) in CLASS_UID_TAGS:
            return
        new = []
        for value in values_of(element.value):
            text = str(value or "").strip()
            if not text or text in UID_dictionary:
                new.append(text)
            else:
                new.append(self.pseudonyms.uid(text))
                report.uids_replaced += 1
        element.value = _value_of(new)

    def _temporal(self, element: DataElement, ctx: PatientContext, report: InstanceReport,
                  dummy: bool) -> None:
        """A DA, DT or TM value: kept (full dates), moved by the patient's offset (modified
        dates: dates move, times of day stay) or replaced by a dummy."""
        vr = element.VR
        if self._full_dates or (vr == "TM" and not dummy):
            return
        if dummy or not self._modified_dates:
            if element.value not in (None, ""):
                element.value = _dummy(vr, element)
                report.dates_replaced += 1
            return
        shifted = []
        for value in values_of(element.value):
            text = str(value or "")
            moved = (shift_date if vr == "DA" else shift_datetime)(text, ctx.offset)
            if moved is None:
                continue  # not a full date: cannot be moved, so it goes
            shifted.append(moved)
            report.dates_shifted += 1
        element.value = _value_of(shifted)

    def _technical(self, element: DataElement, ctx: PatientContext,
                   report: InstanceReport, identity: Identity | None = None) -> None:
        """A technical label or code string, kept: without dates and identifiers (a code
        string that carries one is replaced as a whole). ``identity``: what is looked for
        (by default the patient's own in code strings, everyone's in other text)."""
        values = values_of(element.value)
        if identity is None:
            identity = ctx.patient if element.VR == "CS" else ctx.identity
        texts = [str(v or "") for v in values]
        if element.VR == "CS":
            # the patient's identifiers anywhere in it; anyone else's name (staff, the
            # institution) as a whole value only, since defined terms are words too
            modality = int(element.tag) in _MODALITY_TAGS
            cleaned = [t if modality and t.strip() in MODALITY_TERMS else
                       "ANONYMOUS" if identity.found_in(t) or mask_dates(t) != t
                       or _names_someone(t, ctx.identity) or ctx.identity.holds_date(t)
                       else t for t in texts]
        else:
            cleaned = [clean_label(t, identity) for t in texts]
        if cleaned == texts:
            return
        report.text_cleaned += 1
        element.value = _value_of(cleaned)

    @staticmethod
    def _label_prefix(element: DataElement) -> str:
        """The pseudonym prefix of a label of :data:`PSEUDONYMOUS_LABELS` (``AE`` for every
        AE title); "" for any other attribute."""
        if element.VR == "AE":
            return "AE"
        return PSEUDONYMOUS_LABELS.get(int(element.tag), "")

    def _label(self, element: DataElement, action: str, ctx: PatientContext,
               report: InstanceReport) -> None:
        """A kept label of :data:`PSEUDONYMOUS_LABELS`. A device label (AE title, station
        name): each value that names the institution or department whose identity the
        profile does not keep replaced by its keyed pseudonym, the others cleaned as any kept
        label is (``action`` ``T``) or as free text (``C``). A graphic layer: each value
        that carries the patient's identifier, someone's name as a whole or a date replaced
        by its keyed pseudonym."""
        prefix = self._label_prefix(element)
        texts = [str(v or "") for v in values_of(element.value)]
        if prefix in _DEVICE_LABEL_PREFIXES:
            named = [self.pseudonyms.label(prefix, t) if ctx.identity.names_place(t) else t
                     for t in texts]
            if named != texts:
                report.text_cleaned += 1
                element.value = _value_of(named)
            (self._technical if action == "T" else self._clean)(element, ctx, report)
            return
        replaced = [self.pseudonyms.label(prefix, t) if t.strip() and (
            ctx.patient.found_in(t) or mask_dates(t) != t or _names_someone(t, ctx.identity))
            else t for t in texts]
        if replaced != texts:
            report.text_cleaned += 1
            element.value = _value_of(replaced)

    def _numbers(self, element: DataElement, ctx: PatientContext,
                 report: InstanceReport) -> None:
        """An IS or DS value the table does not name: each number that holds a source date
        (``20240315``, ``20240315.1015``) replaced by 0."""
        texts = [str(v if v is not None else "") for v in values_of(element.value)]
        numbers = ["0" if any(day in t for day in ctx.dates) else t for t in texts]
        if numbers != texts:
            report.dates_replaced += 1
            element.value = _value_of(numbers)

    def _clean(self, element: DataElement, ctx: PatientContext, report: InstanceReport) -> None:
        vr = element.VR
        if vr in TEXT_VRS or vr == "CS":
            if vr == "PN":
                element.value = "ANONYMOUS"
                return
            values = values_of(element.value)
            cleaned = [clean_text(str(v or ""), ctx.identity) for v in values]
            if cleaned != [str(v or "") for v in values]:
                report.text_cleaned += 1
            element.value = _value_of(cleaned)
            return
        # numbers and binary values "cleaned": nothing identifying to take out

    def _private(self, ds: Dataset, tag: BaseTag, report: InstanceReport,
                 kept_blocks: dict[tuple[int, int], bool], ctx: PatientContext) -> None:
        if tag.is_private_creator:
            kept_blocks.setdefault((tag.group, tag.element), False)
            return
        block = tag.element >> 8
        creator_tag = Tag(tag.group, block)
        creator = ds[creator_tag].value if creator_tag in ds else None
        safe = (
            creator is not None and self.profile.has("retain_safe_private")
            and (str(creator).strip(), tag.group, tag.element & 0xFF) in self.safe_private
        )
        if safe and self._safe_private_kept(ds, tag, ctx, report):
            kept_blocks[(tag.group, block)] = True
            report.private_kept += 1
            return
        del ds[tag]
        report.private_removed += 1

    def _safe_private_kept(self, ds: Dataset, tag: BaseTag, ctx: PatientContext,
                           report: InstanceReport) -> bool:
        """True when the safe private attribute ``tag`` of ``ds`` stays: cleaned (see
        :meth:`_safe_private`) and still readable and writable as its VR says. A value that
        does not fit its VR (an FD of ten bytes, text in an IS) cannot be shown to be
        anything and goes, rather than failing the whole instance."""
        try:
            stored = ds.get_item(tag).value
            if isinstance(stored, bytes | bytearray) and any(
                    ctx.identity.found_in(text) for text in misread_texts(bytes(stored))):
                return False  # a name in another script's encoding, whatever the VR says
            element = ds[tag]
            if not self._safe_private(element, ctx, report):
                return False
            encoding = getattr(ds, "original_encoding", (False, True))
            buffer = DicomBytesIO()
            buffer.is_implicit_VR = bool(encoding[0]) if encoding[0] is not None else False
            buffer.is_little_endian = encoding[1] if encoding[1] is not None else True
            probe = Dataset()
            probe.add(element)
            write_dataset(buffer, probe)
        except Exception:  # noqa: BLE001 - whatever cannot be read or written goes
            return False
        return True

    def _safe_private(self, element: DataElement, ctx: PatientContext,
                      report: InstanceReport) -> bool:
        """A private attribute of the safe list, cleaned like other kept values: dates as
        the profile says, text cleaned of dates and everyone's identifiers. False when it
        must go: a sequence or person name (never safe), or bytes or a number that carry an
        identifier or a date."""
        vr = element.VR
        if vr in TEMPORAL_VRS:
            if not self._full_dates:
                self._temporal(element, ctx, report, dummy=not self._modified_dates)
            return True
        if vr in ("SQ", "PN"):
            return False
        if vr == "UI":  # replaced as every other UID is (unless the profile keeps UIDs)
            self._replace_uids(element, report)
            return True
        if vr in TEXT_VRS or vr == "CS":
            self._technical(element, ctx, report, ctx.identity)
            return True
        value = element.value
        if isinstance(value, bytes | bytearray):
            texts = binary_texts(bytes(value)) + legacy_texts(bytes(value))
        elif vr in ("IS", "DS"):
            texts = [str(v if v is not None else "").strip(" \0") for v in values_of(value)]
            if not all(_is_number(t) for t in texts if t):
                return False  # not a number (text in a number's place): cannot be read
        else:
            return True  # binary numbers: nothing to read
        return not any(ctx.identity.found_in(t) or mask_dates(t) != t for t in texts)

    def _drop_overlays_without_data(self, ds: Dataset) -> None:
        for group in range(0x6000, 0x6020, 2):
            if Tag(group, 0x0010) in ds and Tag(group, 0x3000) not in ds:
                for tag in [t for t in ds.keys() if BaseTag(t).group == group]:
                    del ds[tag]

    def _marks(self) -> Dataset:
        """The attributes saying how the data set was de-identified (built once)."""
        marks = Dataset()
        marks.PatientIdentityRemoved = "YES"
        marks.DeidentificationMethod = [f"ImageShare profile {self.profile.name}"[:64],
                                        BASIC_PROFILE_CODE[1][:64]] + [
            OPTIONS[o][1][:64] for o in sorted(self.profile.options)]
        items = []
        for value, meaning in self._method_codes:
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning[:64]
            items.append(item)
        marks.DeidentificationMethodCodeSequence = Sequence(items)
        if self._full_dates:
            marks.LongitudinalTemporalInformationModified = "UNMODIFIED"
        elif self._modified_dates:
            marks.LongitudinalTemporalInformationModified = "MODIFIED"
        else:
            marks.LongitudinalTemporalInformationModified = "REMOVED"
        return marks

    def _mark(self, ds: Dataset) -> None:
        """Patient Identity Removed, De-identification Method (Code Sequence), and whether
        dates were kept (PS3.15 E.1.1, PS3.3 C.7.1.1). The attributes are encoded once per
        transfer syntax encoding and added as raw elements, written as they are."""
        encoding = getattr(ds, "original_encoding", (False, True))
        implicit, little = (encoding if encoding and encoding[0] is not None
                            else (False, True))
        raw = self._encoded_marks.get((implicit, little))
        if raw is None:
            buffer = DicomBytesIO()
            buffer.is_implicit_VR, buffer.is_little_endian = implicit, little
            write_dataset(buffer, self._marks())
            raw = read_dataset(DicomBytesIO(buffer.getvalue()), implicit, little)  # type: ignore[arg-type]  # pydicom's own file-like is not typed as BinaryIO
            self._encoded_marks[(implicit, little)] = raw
        for tag in raw.keys():
            ds[tag] = raw.get_item(tag)


def _concepts_of(item: Dataset) -> list[tuple[str, str]]:
    """The (scheme, code value) of the concept names of ``item`` (none if unreadable)."""
    try:
        concepts = item[_CONCEPT_NAME].value or []
    except (ValueError, TypeError, KeyError, AttributeError, NotImplementedError):
        return []
    return [(str(concept.get("CodingSchemeDesignator", "") or "").strip(),
             str(concept.get("CodeValue", "") or "").strip())
            for concept in (concepts if isinstance(concepts, Sequence) else [])]


def fetus_context(items: Any) -> bool:
    """True when the content items ``items`` (of one sequence) are a fetus's subject context
    (PS3.16 TID 1008: a Fetus Number, or the Subject Class Fetus, among them)."""
    for item in items if isinstance(items, Sequence | list) else []:
        try:
            codes = _concepts_of(item) + [
                (str(c.get("CodingSchemeDesignator", "") or "").strip(),
                 str(c.get("CodeValue", "") or "").strip())
                for c in item.get("ConceptCodeSequence") or []]
        except (ValueError, TypeError, KeyError, AttributeError, NotImplementedError):
            continue
        if any(code in FETUS_CONTEXT for code in codes):
            return True
    return False


def fetal_section(item: Dataset) -> bool:
    """True when the report content item ``item`` is a section about one fetus (see
    :data:`imageshare.deid.codes.FETAL_SECTIONS`): its content is that fetus's context."""
    return any(code in FETAL_SECTIONS for code in _concepts_of(item))


def _more_than_a_label(value: Any) -> bool:
    """True when ``value`` has more than two letters or digits: a twin's Subject ID ``A`` or
    ``2`` (TID 1008) says which fetus, not who anyone is, and is kept."""
    text = value.decode("latin-1") if isinstance(value, bytes | bytearray) else str(value or "")
    return sum(c.isalnum() for c in text) > 2


def _holds_birth_date(item: Dataset) -> bool:
    """True when ``item`` is a report content item whose concept is the birth date (see
    :data:`BIRTH_DATE_CONCEPTS`)."""
    return any(code in BIRTH_DATE_CONCEPTS for code in _concepts_of(item))


def _is_number(text: str) -> bool:
    """True when ``text`` is a decimal number as IS and DS values are written."""
    try:
        float(text)
    except ValueError:
        return False
    return text.isascii() and not any(c.isalpha() and c not in "eE" for c in text)


def _value_of(values: list[Any]) -> Any:
    """The element value for a list: one value, several, or empty."""
    return values if len(values) > 1 else (values[0] if values else "")
