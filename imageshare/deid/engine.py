"""The de-identification of one data set's attributes (PS3.15 Annex E), at every depth.

Every attribute gets one action: from Table E.1-1 as changed by the profile's options, or, for
attributes the table does not name, by rule: private attributes go unless the Retain Safe
Private option keeps a known-safe one; free text, person names and unknown values go unless
they are on a short list of technical attributes; dates move by the patient's offset; UIDs
that are not well-known DICOM UIDs are replaced consistently. Pixel data is left to
:mod:`imageshare.deid.pixels`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID_dictionary

from imageshare.deid.profiles import BASIC_PROFILE_CODE, OPTIONS, Profile
from imageshare.deid.pseudonyms import Pseudonyms, age_at, shift_date, shift_datetime
from imageshare.deid.table import OPTION_LETTERS, TABLE

KNOWN_ACTIONS = {"D", "Z", "X", "K", "C", "U", "X/Z", "X/D", "X/Z/D", "Z/D", "X/Z/U*"}
TEXT_VRS = {"LO", "SH", "ST", "LT", "UT", "UC", "AE", "UR", "PN"}
DATE_VRS = {"DA", "DT"}
_NUMERIC_VRS = {"US", "SS", "UL", "SL", "FL", "FD", "IS", "DS", "AT", "OB", "OW", "OF", "OD",
                "OL", "OV", "UV", "SV", "TM", "CS", "US or SS", "US or OW", "OB or OW",
                "US or SS or OW"}
PIXEL_DATA = 0x7FE00010
# Technical text attributes the table does not name that carry no identity and that IODs need.
SAFE_TEXT = {
    "CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning", "LongCodeValue",
    "URNCodeValue", "ContextIdentifier", "ContextGroupVersion", "MappingResource",
    "MappingResourceName", "ContextGroupExtensionCreatorUID", "Manufacturer",
    "ManufacturerModelName", "SoftwareVersions", "PositionReferenceIndicator",
    "ConvolutionKernel", "FilterType", "ProcessingFunction", "TransducerData",
    "ContrastBolusRoute", "ReceiveCoilName", "TransmitCoilName", "SequenceName",
    "SequenceVariant", "ScanningSequence", "PulseSequenceName", "RescaleType", "LUTExplanation",
    "WindowCenterWidthExplanation", "LUTDescriptor", "TransducerType",
    "ProcessingFunctionDescription", "ValueType", "DocumentTitle",
    "MIMETypeOfEncapsulatedDocument", "ConversionType", "FrameLabel", "CountsSource", "Units",
    "RadiopharmaceuticalRoute", "Radiopharmaceutical", "ConceptNameCodeSequence",
    "AcquisitionContrast", "PhotometricInterpretation", "DetectorType",
    "ImplementationVersionName", "ExposureControlMode", "FocusMethod",
    "AnatomicRegionModifierSequence", "DerivationCodeSequence", "DimensionDescriptionLabel",
    "SegmentLabel", "SegmentAlgorithmName", "ContentLabel", "GraphicLayer",
    "MeasurementUnitsCodeSequence", "CollimatorType", "PatientPosition", "ViewPosition",
    "Laterality", "ImageLaterality", "BodyPartExamined", "ModalityLUTType", "VOILUTFunction",
    "PresentationLUTShape", "PixelPresentation", "VolumetricProperties",
    "VolumeBasedCalculationTechnique", "ComplexImageComponent", "AcquisitionType",
    "RectificationType", "PixelIntensityRelationship",
}
# How the combined actions of PS3.15 E.1.1 are carried out here: where the standard lets the
# IOD decide, a dummy value (valid whatever the attribute's type) or an empty one is used, and
# sequences of references keep their items with their UIDs replaced.
_COMBINED = {"X/Z": "Z", "X/D": "D", "X/Z/D": "D", "Z/D": "D", "X/Z/U*": "U"}


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


@dataclass
class InstanceReport:
    """What de-identification did to one instance."""

    actions: Counter[str] = field(default_factory=Counter)
    removed: list[str] = field(default_factory=list)
    private_removed: int = 0
    private_kept: int = 0
    uids_replaced: int = 0
    dates_shifted: int = 0
    text_cleaned: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-friendly data."""
        return {
            "actions": dict(self.actions), "removed": sorted(set(self.removed)),
            "private_removed": self.private_removed, "private_kept": self.private_kept,
            "uids_replaced": self.uids_replaced, "dates_shifted": self.dates_shifted,
            "text_cleaned": self.text_cleaned,
        }


@dataclass(frozen=True)
class PatientContext:
    """Who the instance is about: what the text cleaner looks for, and the date offset."""

    key: str
    pseudonym: str
    offset: timedelta
    identifiers: tuple[str, ...]


_DIGITS = re.compile(r"\b\d[\d\s\-/.]{5,}\d\b")
_DATE_LIKE = re.compile(r"\b\d{1,4}[./-]\d{1,2}[./-]\d{1,4}\b")
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.]+\b")


def identifiers_of(ds: Dataset) -> tuple[str, ...]:
    """Identifying strings of the patient in ``ds``, for text cleaning and OCR checks."""
    found: set[str] = set()

    def add(value: Any) -> None:
        text = str(value or "").strip()
        if len(text) >= 2:
            found.add(text)

    for keyword in ("PatientID", "AccessionNumber", "StudyID", "OtherPatientIDs",
                    "IssuerOfPatientID", "MedicalRecordLocator", "AdmissionID"):
        for v in _values(ds.get(keyword)):
            add(v)
    for item in ds.get("OtherPatientIDsSequence", []) or []:
        add(item.get("PatientID"))
    _collect_names_and_ids(ds, found, depth=0)  # every person name, at any depth
    birth = str(ds.get("PatientBirthDate", "") or "")
    if len(birth) == 8 and birth.isdigit():
        found.update({birth, f"{birth[:4]}-{birth[4:6]}-{birth[6:]}",
                      f"{birth[6:]}/{birth[4:6]}/{birth[:4]}",
                      f"{birth[6:]}.{birth[4:6]}.{birth[:4]}",
                      f"{birth[4:6]}/{birth[6:]}/{birth[:4]}"})
    return tuple(sorted(found, key=len, reverse=True))


def _values(value: Any) -> list[Any]:
    """An element value as a list (multi-valued or not)."""
    return list(value) if isinstance(value, MultiValue | list) else [value]


def _value_of(values: list[Any]) -> Any:
    """The element value for a list: one value, several, or empty."""
    return values if len(values) > 1 else (values[0] if values else "")


_ID_SUFFIXES = ("ID", "IDs", "Number", "Numbers", "Identifier")
_NOT_IDENTIFYING = {"StudyID", "SeriesNumber", "InstanceNumber", "AcquisitionNumber"}


def _collect_names_and_ids(ds: Dataset, found: set[str], depth: int) -> None:
    """Every person name, and every identifier-like text value (keywords ending in ID,
    Number, Identifier), at any depth: whoever is named in the data set is not to be named
    in its free text either. Other values are not decoded."""
    if depth > 8:
        return
    for tag in list(ds.keys()):
        tag = BaseTag(tag)
        if tag.is_private or tag == PIXEL_DATA:
            continue
        vr = ds.get_item(tag).VR or _dictionary_vr(tag)
        if vr == "SQ":
            for item in ds[tag].value or []:
                _collect_names_and_ids(item, found, depth + 1)
        elif vr == "PN":
            for v in _values(ds[tag].value):
                for part in re.split(r"[\^= ,]+", str(v or "")):
                    if len(part) >= 2:
                        found.add(part)
        elif vr in ("LO", "SH"):
            keyword = keyword_for_tag(tag)
            if keyword.endswith(_ID_SUFFIXES) and keyword not in _NOT_IDENTIFYING:
                for v in _values(ds[tag].value):
                    if len(str(v or "").strip()) >= 3:
                        found.add(str(v).strip())


def clean_text(text: str, identifiers: tuple[str, ...]) -> str:
    """``text`` without the patient's identifiers, dates, long numbers and e-mail addresses."""
    cleaned = _EMAIL.sub("*", text)
    cleaned = _DATE_LIKE.sub("*", cleaned)
    cleaned = _DIGITS.sub("*", cleaned)
    for ident in identifiers:
        if len(ident) >= 2:
            cleaned = re.sub(rf"(?<![^\W_]){re.escape(ident)}(?![^\W_])", "*", cleaned,
                             flags=re.IGNORECASE)
    return cleaned


def _dummy(vr: str, element: DataElement, ctx: PatientContext) -> Any:
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
    if vr == "UI":
        return None  # replaced by the UID action
    if vr in ("US", "SS", "UL", "SL", "FL", "FD"):
        return 0
    if vr in ("OB", "OW", "OF", "OD", "OL", "UN"):
        return b"\0\0" if element.value else b""
    if vr == "CS":
        return "ANONYMOUS"[:16]
    if vr in ("SH", "AE"):
        return "ANONYMOUS"
    return "ANONYMOUS"


class AttributeCleaner:
    """Applies a profile to data sets, with consistent pseudonyms."""

    def __init__(self, profile: Profile, pseudonyms: Pseudonyms,
                 safe_private: frozenset[tuple[str, int, int]] = frozenset()) -> None:
        self.profile = profile
        self.pseudonyms = pseudonyms
        self.safe_private = safe_private
        self._decisions: dict[tuple[int, str], str] = {}
        self._encoded_marks: dict[tuple[bool, bool], Dataset] = {}
        self._method_codes = [BASIC_PROFILE_CODE] + [OPTIONS[o] for o in sorted(profile.options)]
        self._full_dates = profile.has("retain_full_dates")
        self._modified_dates = profile.has("retain_modified_dates")

    # -- entry point -----------------------------------------------------------------------

    def context(self, ds: Dataset) -> PatientContext:
        """The patient context of ``ds`` (pseudonym, date offset, identifiers)."""
        patient_id = str(ds.get("PatientID", "") or "").strip()
        issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
        if patient_id:
            key = f"{issuer}|{patient_id}"
        else:
            key = f"name|{ds.get('PatientName', '')}|{ds.get('PatientBirthDate', '')}"
        return PatientContext(key, self.pseudonyms.patient_id(key),
                              self.pseudonyms.date_offset(key), identifiers_of(ds))

    def apply(self, ds: Dataset, ctx: PatientContext | None = None) -> InstanceReport:
        """De-identify ``ds`` in place (not its pixels); returns what was done."""
        ctx = ctx or self.context(ds)
        report = InstanceReport()
        age = None
        if self.profile.has("retain_patient_characteristics") and not ds.get("PatientAge"):
            age = age_at(str(ds.get("PatientBirthDate", "") or ""),
                         str(ds.get("StudyDate", "") or ds.get("SeriesDate", "") or ""))
        self._walk(ds, ctx, report, top=True)
        if age:
            ds.PatientAge = age
        ds.PatientID = ctx.pseudonym
        ds.PatientName = ctx.pseudonym
        self._mark(ds)
        if getattr(ds, "preamble", None):
            ds.preamble = b"\0" * 128  # the Part 10 preamble is free for anything
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            if "MediaStorageSOPInstanceUID" in meta and not self.profile.has("retain_uids"):
                meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            for keyword in ("PrivateInformationCreatorUID", "PrivateInformation",
                            "SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                            "ReceivingApplicationEntityTitle",
                            "SourcePresentationAddress", "SendingPresentationAddress",
                            "ReceivingPresentationAddress"):
                if keyword in meta:
                    del meta[keyword]
        return report

    # -- walking ---------------------------------------------------------------------------

    def _walk(self, ds: Dataset, ctx: PatientContext, report: InstanceReport,
              top: bool = False) -> None:
        private_groups_kept: dict[tuple[int, int], bool] = {}
        for tag in list(ds.keys()):
            tag = BaseTag(tag)
            if tag == PIXEL_DATA and top:
                continue
            if tag.is_private:
                self._private(ds, tag, report, private_groups_kept, ctx)
                continue
            if tag.group == 0x0002:
                continue  # file meta is handled apart
            if tag.element == 0:
                del ds[tag]  # group lengths (retired) would be wrong afterwards
                continue
            raw = ds.get_item(tag)
            vr = raw.VR or _dictionary_vr(tag)
            action = self._decide(int(tag), vr)
            if action == "K" and vr != "SQ":  # most attributes: no need to decode the value
                report.actions["K"] += 1
                continue
            if action == "X":
                report.actions["X"] += 1
                report.removed.append(keyword_for_tag(tag) or f"{int(tag):08X}")
                del ds[tag]
                continue
            self._act(ds, ds[tag], action, ctx, report)
        # private creators whose elements all went
        for (group, block), kept in private_groups_kept.items():
            if not kept:
                creator_tag = Tag(group, block)
                if creator_tag in ds:
                    del ds[creator_tag]
        if top:
            self._drop_overlays_without_data(ds)

    def _decide(self, tag: int, vr: str) -> str:
        """The action for an attribute (cached per tag and VR)."""
        key = (tag, vr)
        action = self._decisions.get(key)
        if action is None:
            rule = rule_for(tag)
            if rule is not None:
                action = effective_action(rule, self.profile)
            else:
                action = self._rule_for_unlisted(vr, keyword_for_tag(tag))
            action = _COMBINED.get(action, action)
            self._decisions[key] = action
        return action

    @staticmethod
    def _rule_for_unlisted(vr: str, keyword: str) -> str:
        if vr == "SQ":
            return "K"  # its items are cleaned in turn
        if vr == "UI":
            return "U"
        if vr in DATE_VRS:
            return "C"
        if vr == "PN":
            return "Z"
        if vr in TEXT_VRS:
            return "K" if keyword in SAFE_TEXT else "X"
        if vr == "UN" or not keyword:
            return "X"
        return "K"

    def _act(self, ds: Dataset, element: DataElement, action: str, ctx: PatientContext,
             report: InstanceReport) -> None:
        vr = element.VR
        action = _COMBINED.get(action, action)
        report.actions[action] += 1
        tag = element.tag
        if action == "X":
            report.removed.append(element.keyword or str(tag))
            del ds[tag]
            return
        if vr == "SQ":
            if action == "Z":
                element.value = Sequence([])
                return
            for item in element.value or []:
                self._walk(item, ctx, report)
            return
        if action == "K":
            return
        if action == "Z":
            element.value = b"" if vr in ("OB", "OW", "UN") else ("" if vr not in (
                "US", "SS", "UL", "SL", "FL", "FD") else None)
            return
        if action == "U" or (vr == "UI" and action in ("D", "C")):
            self._replace_uids(element, report)
            return
        if action == "C" or (action == "D" and vr in DATE_VRS):
            self._clean(element, ctx, report, dummy=action == "D")
            return
        if action == "D":
            element.value = _dummy(vr, element, ctx)
            return
        raise ValueError(f"unknown de-identification action {action!r}")

    def _replace_uids(self, element: DataElement, report: InstanceReport) -> None:
        if element.VR != "UI" or self.profile.has("retain_uids"):
            return
        new = []
        for value in _values(element.value):
            text = str(value or "").strip()
            if not text or text in UID_dictionary:
                new.append(text)
            else:
                new.append(self.pseudonyms.uid(text))
                report.uids_replaced += 1
        element.value = _value_of(new)

    def _clean(self, element: DataElement, ctx: PatientContext, report: InstanceReport,
               dummy: bool) -> None:
        vr = element.VR
        if vr in DATE_VRS or vr == "TM":
            if self._full_dates:
                return
            if vr == "TM":
                element.value = "000000" if dummy else element.value
                return
            shifted = []
            for value in _values(element.value):
                text = str(value or "")
                moved = (shift_date if vr == "DA" else shift_datetime)(text, ctx.offset)
                if moved is None:
                    continue
                shifted.append(moved)
                report.dates_shifted += 1
            if dummy and not (self._modified_dates or not shifted):
                shifted = ["19000101" if vr == "DA" else "19000101000000"]
            element.value = _value_of(shifted)
            return
        if vr == "UI":
            self._replace_uids(element, report)
            return
        if vr in TEXT_VRS or vr == "CS":
            if vr == "PN":
                element.value = "ANONYMOUS"
                return
            values = _values(element.value)
            cleaned = [clean_text(str(v or ""), ctx.identifiers) for v in values]
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
        if safe:
            kept_blocks[(tag.group, block)] = True
            report.private_kept += 1
            return
        del ds[tag]
        report.private_removed += 1

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
            raw = read_dataset(DicomBytesIO(buffer.getvalue()), implicit, little)
            self._encoded_marks[(implicit, little)] = raw
        for tag in raw.keys():
            ds[tag] = raw.get_item(tag)
