"""Who an instance is about, as the de-identification engine looks for it in free text and in
burned-in text: every identifying value of the data set (names of anyone named, IDs, birth
date in the usual written forms, addresses, phone numbers, institution and staff names), and
a matcher that finds them in text or in a line of words read by OCR, ignoring case,
punctuation and the order of name parts. Names are also found by each part of a compound
(``Smith-Jones``: ``Smith``, ``Jones``, ``Smith Jones``, ``SmithJones``), with their parts
run together (``MariaDelCarmen``), and, for names written in Chinese, Japanese or Korean
characters (two or more), anywhere in running text, since those scripts put no space between
words.

No regular expression is ever built from these values: matching is plain string search on
normalised text.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from typing import Any

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

PIXEL_DATA = 0x7FE00010
_MONTHS = ("JANUARY", "FEBRUARY", "MARCH", "APRIL", "MAY", "JUNE", "JULY", "AUGUST",
           "SEPTEMBER", "OCTOBER", "NOVEMBER", "DECEMBER")
# Words of institution names and addresses that say nothing about which one it is.
_GENERIC_WORDS = {
    "HOSPITAL", "HOSPITALS", "CLINIC", "CENTRE", "CENTER", "MEDICAL", "UNIVERSITY", "TRUST",
    "FOUNDATION", "HEALTH", "HEALTHCARE", "GENERAL", "ROYAL", "INFIRMARY", "DEPARTMENT",
    "RADIOLOGY", "IMAGING", "SAINT", "NATIONAL", "SERVICE", "SERVICES", "STREET", "ROAD",
    "LANE", "AVENUE", "UNITED", "KINGDOM", "CHILDREN", "CHILDRENS", "WOMENS", "COUNTY",
    "DISTRICT", "REGIONAL", "COMMUNITY", "THE", "AND", "OF", "FOR", "UNIT", "WARD", "NONE",
    "ANONYMOUS", "UNKNOWN", "OTHER", "PATIENT",
}
# Keywords (at any depth) whose values identify a person, a place or an institution.
_IDENTIFYING_TEXT = {
    "PatientID", "OtherPatientIDs", "IssuerOfPatientID", "AccessionNumber", "StudyID",
    "AdmissionID", "MedicalRecordLocator", "PatientAddress", "PatientTelephoneNumbers",
    "PatientTelecomInformation", "PersonAddress", "PersonTelephoneNumbers",
    "PersonTelecomInformation", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers", "MilitaryRank", "BranchOfService",
    "RegionOfResidence", "CountryOfResidence", "PatientReligiousPreference",
    "PerformedProcedureStepID", "RequestedProcedureID", "ScheduledProcedureStepID",
    "PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest",
    "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID", "VerifyingOrganization",
}
# Institution attributes: not looked for when the profile keeps the institution's identity.
_INSTITUTION_TEXT = {"InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName"}
_INSTITUTION_CODES = ("InstitutionCodeSequence", "InstitutionalDepartmentTypeCodeSequence")
# Device identity is the table's business (kept only with Retain Device Identity).
_DEVICE = {"StationName", "DeviceSerialNumber", "DeviceID", "DetectorID", "DeviceUID"}
_ID_SUFFIXES = ("ID", "IDs", "Number", "Numbers", "Identifier")
_NOT_IDENTIFYING = {"SeriesNumber", "InstanceNumber", "AcquisitionNumber", "StackID",
                    "ReferencedFrameNumber", "ReferencedSegmentNumber", "ImageID"}
# Sequences whose code items name a person or an institution.
PERSON_CONTEXT_WORDS = ("Person", "Operator", "Physician", "Observer", "Institution",
                        "Organization", "Performer", "Participant", "Author", "Custodial",
                        "Verifying", "Requesting", "Referring", "ContentCreator",
                        "Responsible", "Insurance")
_SPLIT = re.compile(r"[\^=,;:/\\()\[\]{}<>\"'`|\s]+")
_WORDS = re.compile(r"[\W_]+")
# What separates the pieces of one name part: "Smith-Jones", "O'Brien", "St. John".
_PIECES = re.compile(r"[\W_]+")
# Consecutive name pieces run together are looked for up to this many pieces.
_MAX_RUN = 4
# Chinese, Japanese and Korean characters (Han, kana, half-width kana, Hangul).
_CJK_RANGES = ((0x1100, 0x11FF), (0x3040, 0x30FF), (0x3130, 0x318F), (0x31F0, 0x31FF),
               (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF),
               (0xFF66, 0xFF9F), (0x20000, 0x2FFFF))


_ASCII_NOT_ALNUM = {c: None for c in range(128) if not chr(c).isalnum()}


def normalise(text: str) -> str:
    """Upper case letters and digits only (accents dropped): what is compared."""
    if text.isascii():
        return text.upper().translate(_ASCII_NOT_ALNUM)
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed.upper() if c.isalnum() and not unicodedata.combining(c))


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in _CJK_RANGES)


def cjk_form(text: str) -> str:
    """``text`` as CJK names are compared: compatibility forms folded (half-width kana become
    full-width, voiced marks stay on their kana), letters and digits only, case folded."""
    return "".join(c for c in unicodedata.normalize("NFKC", text).casefold() if c.isalnum())


def _cjk_name(text: str) -> str:
    """The CJK form of a name piece of two or more CJK characters; "" for any other."""
    if text.isascii():
        return ""
    form = cjk_form(text)
    return form if sum(1 for c in form if _is_cjk(c)) >= 2 else ""


def values_of(value: Any) -> list[Any]:
    """An element value as a list (multi-valued or not)."""
    return list(value) if isinstance(value, MultiValue | list) else [value]


def date_forms(value: str) -> set[str]:
    """A DA value (``YYYYMMDD``) in the ways people write it: ISO, UK (dd/mm/yyyy, also with
    dashes, dots, spaces and two-digit years), US, compact, and with month names."""
    text = str(value or "").strip()[:8]
    try:
        day = date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return set()
    d, m, y = f"{day.day:02d}", f"{day.month:02d}", f"{day.year:04d}"
    forms = {text, f"{y}-{m}-{d}", f"{y}/{m}/{d}", f"{y}.{m}.{d}", f"{d}{m}{y}", f"{m}{d}{y}",
             f"{d}{m}{y[2:]}"}
    for sep in ("/", "-", ".", " "):
        forms |= {f"{d}{sep}{m}{sep}{y}", f"{day.day}{sep}{day.month}{sep}{y}",
                  f"{d}{sep}{m}{sep}{y[2:]}", f"{m}{sep}{d}{sep}{y}",
                  f"{day.month}{sep}{day.day}{sep}{y}"}
    month = _MONTHS[day.month - 1]
    nth = f"{day.day}{_ordinal_suffix(day.day)}"
    for name in {month, month[:3], month[:4]}:
        forms |= {f"{d} {name} {y}", f"{day.day} {name} {y}", f"{name} {day.day} {y}",
                  f"{d}-{name}-{y}", f"{d}{name}{y}", f"{name} {day.day}, {y}",
                  f"{name} {d}, {y}", f"{nth} {name} {y}", f"{nth} of {name} {y}",
                  f"{name} {nth} {y}", f"{name} {nth}, {y}"}
    return forms


def _ordinal_suffix(day: int) -> str:
    if day in (11, 12, 13):
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


@dataclass(frozen=True)
class Identity:
    """The identifying values of one instance, normalised for matching."""

    words: frozenset[str]  # name parts and single-word identifiers (normalised)
    phrases: tuple[str, ...]  # longer identifiers: IDs, numbers, dates (normalised)
    raw: tuple[str, ...]  # as written, longest first (for cleaning free text)
    cjk: frozenset[str] = frozenset()  # CJK names (cjk_form), found anywhere in text

    def is_empty(self) -> bool:
        """True when nothing identifying was found."""
        return not self.words and not self.phrases and not self.cjk

    def _cjk_in(self, text: str) -> bool:
        """True when ``text`` carries a CJK name, wherever it is (no word boundaries)."""
        if not self.cjk or text.isascii():
            return False
        form = cjk_form(text)
        return any(name in form for name in self.cjk)

    def found_in(self, text: str) -> bool:
        """True when ``text`` carries any of the identifiers (any case, any punctuation)."""
        if not text:
            return False
        norm = normalise(text)
        if not norm:
            return False
        if any(p in norm for p in self.phrases):
            return True
        if any(normalise(w) in self.words for w in _WORDS.split(text) if w):
            return True
        return self._cjk_in(text)

    def clean(self, text: str) -> str:
        """``text`` with every identifier (as a whole word, any case; a CJK name wherever it
        is) replaced by ``*``."""
        if not text:
            return text
        lowered = text.casefold()
        if len(lowered) != len(text):
            return "*" if self.found_in(text) else text
        spans: list[tuple[int, int]] = []
        for ident in self.raw:
            needle = ident.casefold()
            anywhere = not needle.isascii() and bool(_cjk_name(needle))
            start = lowered.find(needle)
            while start >= 0:
                end = start + len(needle)
                before = lowered[start - 1] if start else " "
                after = lowered[end] if end < len(lowered) else " "
                if anywhere or (not before.isalnum() and not after.isalnum()):
                    spans.append((start, end))
                start = lowered.find(needle, start + 1)
        if not spans:
            # a CJK name written in another form (half-width kana, spaced out)
            return "*" if self._cjk_in(text) else text
        out, last = [], 0
        for start, end in sorted(spans):
            if start < last:
                last = max(last, end)
                continue
            out.append(text[last:start])
            out.append("*")
            last = end
        out.append(text[last:])
        cleaned = "".join(out)
        return "*" if self._cjk_in(cleaned) else cleaned

    def hits_in_line(self, words: list[str]) -> set[int]:
        """Indexes of the OCR words (one line, in reading order) that carry an identifier or
        a part of one: whole name parts, identifiers spread over several words, and partial
        reads of at least four characters of a longer identifier."""
        norms = [normalise(w) for w in words]
        hits: set[int] = set()
        for i, norm in enumerate(norms):
            if len(norm) < 2:
                continue
            if norm in self.words:
                hits.add(i)
                continue
            if len(norm) >= 4 and any(norm in p or p in norm for p in self.phrases
                                      if len(p) >= 4):
                hits.add(i)
                continue
            if len(norm) >= 4 and any(w in norm for w in self.words if len(w) >= 4):
                hits.add(i)
                continue
            if self._cjk_in(words[i]):
                hits.add(i)
        # identifiers spread over several words ("943 476 5919", "04 / 03 / 1981")
        line = "".join(norms)
        owner = [i for i, n in enumerate(norms) for _ in n]
        for phrase in self.phrases:
            for start, length in _occurrences(line, phrase):
                hits.update(owner[start:start + length])
        return hits


def _occurrences(line: str, phrase: str) -> Iterable[tuple[int, int]]:
    """Where ``phrase`` (or a run of at least 6 of its characters) occurs in ``line``."""
    if len(phrase) < 4:
        return
    start = line.find(phrase)
    while start >= 0:
        yield start, len(phrase)
        start = line.find(phrase, start + 1)
    if len(phrase) > 6:
        for offset in range(len(phrase) - 5):
            part = phrase[offset:offset + 6]
            at = line.find(part)
            if at >= 0:
                yield at, 6


def _dictionary_vr(tag: BaseTag) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


class _Collector:
    def __init__(self) -> None:
        self.words: set[str] = set()
        self.phrases: set[str] = set()
        self.raw: set[str] = set()
        self.cjk: set[str] = set()

    def name(self, value: Any) -> None:
        """A person name (PN): every part as written, every piece of a compound part
        (``Smith-Jones``), consecutive pieces run together or joined by a space or hyphen
        (in the order written and in the order spoken: given, middle, family), and CJK
        names to be found anywhere in text."""
        text = str(value or "")
        for part in _SPLIT.split(text):
            part = part.strip(".-")
            norm = normalise(part)
            if len(norm) >= 2 and norm not in ("ANONYMOUS", "UNKNOWN"):
                self.words.add(norm)
                self.raw.add(part)
        for group in text.split("="):
            components = [[p for p in _PIECES.split(c)
                           if p and normalise(p) not in ("ANONYMOUS", "UNKNOWN")]
                          for c in group.split("^")]
            written = [p for component in components for p in component]
            spoken = [p for i in (1, 2, 0) if i < len(components) for p in components[i]]
            for pieces in (written, spoken):
                self._pieces(pieces)

    def _pieces(self, pieces: list[str]) -> None:
        for piece in pieces:
            norm = normalise(piece)
            if len(norm) >= 2 and norm not in ("ANONYMOUS", "UNKNOWN"):
                self.words.add(norm)
                self.raw.add(piece)
            cjk = _cjk_name(piece)
            if cjk:
                self.cjk.add(cjk)
        for size in range(2, min(len(pieces), _MAX_RUN) + 1):
            for start in range(len(pieces) - size + 1):
                run = pieces[start:start + size]
                norm = "".join(normalise(p) for p in run)
                if len(norm) < 4:
                    continue
                self.words.add(norm)
                self.raw.update(joiner.join(run) for joiner in ("", " ", "-"))

    def text(self, value: Any, whole: bool = True) -> None:
        """An identifying value: the whole of it, and its significant words and numbers."""
        text = str(value or "").strip()
        norm = normalise(text)
        if len(norm) < 2 or norm in _GENERIC_WORDS:
            return
        if whole:
            self.raw.add(text)
            if len(norm) >= 4:
                self.phrases.add(norm)
            else:
                self.words.add(norm)
        for part in _SPLIT.split(text):
            part = part.strip(".-")
            pnorm = normalise(part)
            if len(pnorm) >= 4 and pnorm not in _GENERIC_WORDS:
                self.raw.add(part)
                (self.phrases if any(c.isdigit() for c in pnorm) else self.words).add(pnorm)
        digits = "".join(c for c in text if c.isdigit())
        if len(digits) >= 5:
            self.phrases.add(digits)

    def birth_date(self, value: Any) -> None:
        text = str(value or "").strip()
        forms = _DATE_FORMS.get(text)
        if forms is None:
            forms = _DATE_FORMS[text] = frozenset(date_forms(text))
            if len(_DATE_FORMS) > 10_000:
                _DATE_FORMS.clear()
        self.raw.update(forms)
        self.phrases.update(normalise(form) for form in forms)


_PATIENT_NAMES = ("PatientName", "OtherPatientNames", "PatientBirthName",
                  "PatientMotherBirthName")
_PATIENT_TEXT = ("PatientID", "OtherPatientIDs", "PatientAddress", "PatientTelephoneNumbers",
                 "MedicalRecordLocator", "AdmissionID")
_DATE_FORMS: dict[str, frozenset[str]] = {}
_COLLECTED_VRS = {"SQ", "PN", "LO", "SH", "ST", "LT", "UT", "UC"}


def _identity(found: _Collector) -> Identity:
    raw = tuple(sorted((r for r in found.raw if len(r.strip()) >= 2), key=len, reverse=True))
    phrases = tuple(sorted(found.phrases, key=len, reverse=True))
    return Identity(frozenset(found.words), phrases, raw, frozenset(found.cjk))


def identities_of(ds: Dataset, keep_institution: bool = False,
                  retained: frozenset[int] = frozenset()) -> tuple[Identity, Identity]:
    """The identifying values of ``ds`` (the patient and everyone and everything named; the
    institution's names and codes only when its identity is not kept), and the patient's own
    only (names, IDs, birth date, address, phone numbers): what coded strings (CS) are checked
    against, since other people's names can be words such as TEXT or IMAGE that are also
    defined terms. Attributes in ``retained`` (kept by the profile's options) are not looked
    for. One pass over the data set."""
    found, patient = _Collector(), _Collector()
    _collect(ds, found, depth=0, person_context=False, keep_institution=keep_institution,
             patient=patient, retained=retained)
    for v in values_of(_text_value(ds, BaseTag(0x00100030), "DA")):
        found.birth_date(v)
        patient.birth_date(v)
    return _identity(found), _identity(patient)


def identity_of(ds: Dataset, keep_institution: bool = False) -> Identity:
    """The identifying values of ``ds``: the patient and everyone and everything named."""
    return identities_of(ds, keep_institution)[0]


def patient_identity_of(ds: Dataset) -> Identity:
    """The patient's own identifiers only."""
    return identities_of(ds)[1]


def _text_value(ds: Dataset, tag: BaseTag, vr: str) -> Any:
    """An element's value; plain ASCII text is taken from the stored bytes as it is (no
    conversion by pydicom)."""
    if tag not in ds:
        return None
    raw = ds.get_item(tag).value
    if isinstance(raw, bytes) and raw.isascii() and b"\x1b" not in raw and vr != "PN":
        text = raw.decode("ascii").strip(" \0")
        return text.split("\\") if "\\" in text else text
    return ds[tag].value


def _collect(ds: Dataset, found: _Collector, depth: int, person_context: bool,
             keep_institution: bool, patient: _Collector | None = None,
             retained: frozenset[int] = frozenset()) -> None:
    if depth > 12:
        return
    for tag in list(ds.keys()):
        tag = BaseTag(tag)
        if tag.is_private or tag == PIXEL_DATA or tag.group in (0x0002,):
            continue
        raw = ds.get_item(tag)
        vr = raw.VR if raw.VR not in (None, "UN") else _dictionary_vr(tag)
        if vr not in _COLLECTED_VRS or tag in retained:
            continue
        keyword = keyword_for_tag(tag)
        if vr == "SQ":
            if keep_institution and keyword in _INSTITUTION_CODES:
                continue
            inner = person_context or any(w in keyword for w in PERSON_CONTEXT_WORDS)
            for item in ds[tag].value or []:
                _collect(item, found, depth + 1, inner, keep_institution,
                         patient if keyword == "OtherPatientIDsSequence" else None, retained)
            continue
        if keyword in _DEVICE or (keep_institution and keyword in _INSTITUTION_TEXT):
            continue
        if vr not in ("PN", "LO", "SH", "ST", "LT", "UT", "UC", "DA"):
            continue
        if vr == "PN":
            for v in values_of(ds[tag].value):
                found.name(v)
                if patient is not None and keyword in _PATIENT_NAMES:
                    patient.name(v)
        elif vr == "DA":
            continue  # the birth date is added once, from the top level
        elif keyword in _IDENTIFYING_TEXT or keyword in _INSTITUTION_TEXT or (
                vr in ("LO", "SH") and keyword.endswith(_ID_SUFFIXES)
                and keyword not in _NOT_IDENTIFYING):
            for v in values_of(_text_value(ds, tag, vr)):
                found.text(v)
                if patient is not None and keyword in _PATIENT_TEXT:
                    patient.text(v)
        elif person_context and keyword in ("CodeValue", "CodeMeaning", "LongCodeValue"):
            for v in values_of(_text_value(ds, tag, vr)):
                found.text(v)
