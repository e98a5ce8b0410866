"""What a source file says about who it is: every identifying value the verifier looks for in
the outputs, with its kind (never its value) for the findings.

The verifier's own list, kept apart from the de-identification engine's on purpose: names of
the patient and of everyone else named (in every order and case), patient and other IDs, NHS
and hospital numbers, accession numbers, the birth date in its usual written forms, addresses,
phone numbers, institution and staff names and codes, the original UIDs, and the dates and
times of the source (which must not come out unchanged unless the profile keeps them).

Names are looked for by every part, every piece of a compound part (``Smith-Jones``) and
consecutive pieces run together (``MariaDelCarmen``); a part that is also a common word (WARD,
LANE) counts where it is written as a name (capitalised, or after a title: ``Mr Ward``), not as
the word (``ward 5``); names in CJK characters (two or more, also a one-character surname run
into a one-character given name: ``王伟``) count anywhere in text. Names written in other letters
also count in their ASCII spellings (``Müller``: ``Muller``, ``Mueller``; ``Sørensen``:
``Sorensen``; ``Иванов``: ``Ivanov``; Cyrillic also in the French, German and Polish systems:
``Chevtchouk``, ``Schewtschuk``, ``Szewczuk``), names stored as UTF-8 in files read as Latin-1
(``MÃ¼ller``) as what they spell, and everyone's surname of four letters or more with an
initial run into it as a login (``jsmith``, ``SMITHJ``), as a whole word. Titles and suffixes
in a name's prefix and suffix components (Mr, Dr, Jr) are no part of the name. The source's
dates (birth date, and the dates of the study and its parts unless the profile keeps dates) are
read out of text however they are written (``15.03.2024``, ``20240315``, ``4th March 1981``,
``Mar 15, 2021``; the birth date's month and year too, and these dates written with a
two-digit year as a whole token: ``4/3/81``, ``3.4.81``, ``81/03/04``, ``11/06/24``). A phone
number counts by its national significant number too (``113 496 0123`` of ``0113 496 0123``
or of ``+44 113 496 0123``). A login or ID of several words from a report (``Fetus A``) counts
as whole words only (not in ``Fetus Anatomy``). Text is also read with its markup escapes
undone (HTML entities, RTF ``\\'fc`` and ``\\u252?``, quoted-printable ``=FC``).
"""

from __future__ import annotations

import html
import itertools
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import UID_dictionary

from imageshare.verify.codes import MODALITIES

# What a profile may legitimately leave in an output (PS3.15 options that keep values).
KEEP_INSTITUTION = "institution"
KEEP_UIDS = "uids"
KEEP_DATES = "dates"
KEEP_TIMES = "times"
KEEP_DEVICE = "device"
_DEVICE = {"DeviceSerialNumber", "StationName", "DeviceID", "DetectorID", "CassetteID",
           "PlateID", "GantryID", "DeviceLabel", "DeviceDescription", "GeneratorID",
           "SourceSerialNumber", "TransducerIdentificationSequence", "DeviceUID",
           "SourceManufacturer", "SourceManufacturerModelName", "DeviceSettingDescription",
           "LensSpecification", "LensMake", "LensModel", "LensSerialNumber"}
# UIDs of a kind of object or of an encoding (a vendor's private SOP class), not of an instance:
# no original UID of the patient's data when they come out unchanged.
_CLASS_UIDS = {"SOPClassUID", "ReferencedSOPClassUID", "MediaStorageSOPClassUID",
               "AffectedSOPClassUID", "RequestedSOPClassUID", "ReferencedSOPClassUIDInFile",
               "SOPClassesInStudy", "RelatedGeneralSOPClassUID",
               "OriginalSpecializedSOPClassUID", "TransferSyntaxUID",
               "ReferencedTransferSyntaxUIDInFile"}
# What Retain Institution Identity keeps.
_INSTITUTION_KEPT = {"InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
                     "InstitutionCodeSequence", "InstitutionalDepartmentTypeCodeSequence",
                     "ClinicalTrialSiteID", "ClinicalTrialSiteName",
                     "ClinicalTrialCoordinatingCenterName",
                     "ClinicalTrialProtocolEthicsCommitteeName"}
# Kinds of identifier that coded strings (CS) are checked for: other people's names can be
# words such as TEXT or NAME that are also defined terms.
_CS_KINDS = {"patient name", "patient ID", "NHS number", "birth date"}

_PATIENT_NAMES = {"PatientName", "OtherPatientNames", "PatientBirthName",
                  "PatientMotherBirthName", "ResponsiblePerson"}
_PATIENT_IDS = {"PatientID", "OtherPatientIDs", "MedicalRecordLocator", "AdmissionID",
                "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
                "IssuerOfPatientID", "PatientAccountNumber"}
_ACCESSION = {"AccessionNumber", "FillerOrderNumberImagingServiceRequest",
              "PlacerOrderNumberImagingServiceRequest", "RequestedProcedureID",
              "PerformedProcedureStepID", "ScheduledProcedureStepID", "StudyID"}
_ADDRESSES = {"PatientAddress", "PersonAddress", "InstitutionAddress",
              "ReferringPhysicianAddress", "RegionOfResidence"}
_INSTITUTIONS = {"InstitutionName", "InstitutionalDepartmentName", "VerifyingOrganization",
                 "ClinicalTrialSiteName", "ClinicalTrialCoordinatingCenterName"}
_NOT_IDENTIFIERS = {"SeriesNumber", "InstanceNumber", "AcquisitionNumber", "StackID",
                    "ReferencedFrameNumber", "ReferencedSegmentNumber", "ImageID",
                    "StudyID", "TemporalPositionIdentifier", "ContentItemIdentifier",
                    "ObservationUID", "DimensionIndexPointer", "RTPlanLabel"}
_CONTEXT_WORDS = ("Person", "Operator", "Physician", "Observer", "Institution",
                  "Organization", "Performer", "Participant", "Author", "Custodial",
                  "Verifying", "Requesting", "Referring", "ContentCreator", "Responsible")
_COMMON_WORDS = {
    "HOSPITAL", "HOSPITALS", "CLINIC", "CENTRE", "CENTER", "MEDICAL", "UNIVERSITY", "TRUST",
    "FOUNDATION", "HEALTH", "HEALTHCARE", "GENERAL", "ROYAL", "INFIRMARY", "DEPARTMENT",
    "RADIOLOGY", "IMAGING", "SAINT", "NATIONAL", "SERVICE", "SERVICES", "STREET", "ROAD",
    "LANE", "AVENUE", "UNITED", "KINGDOM", "COUNTY", "DISTRICT", "REGIONAL", "COMMUNITY",
    "ANONYMOUS", "UNKNOWN", "NONE", "OTHER", "PATIENT", "WARD", "UNIT", "ENGLAND", "LONDON",
}
# Placeholders written where a name is not known: never a name part.
_PLACEHOLDER_NAMES = {"ANONYMOUS", "ANON", "UNKNOWN", "NONE", "OTHER", "PATIENT"}
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_MONTH_WORDS = {
    **{m: i for i, m in enumerate(_MONTHS, start=1)},
    **{m: i for i, m in enumerate(("JANUARY", "FEBRUARY", "MARCH", "APRIL", "MAY", "JUNE",
                                   "JULY", "AUGUST", "SEPTEMBER", "OCTOBER", "NOVEMBER",
                                   "DECEMBER"), start=1)},
    "SEPT": 9,
}
_ORDINALS = {"ST", "ND", "RD", "TH"}
# Titles after which a common word is a name ("Mr Ward").
_TITLES = {"MR", "MRS", "MS", "MISS", "MX", "DR", "PROF", "PROFESSOR", "MASTER", "SIR",
           "DAME", "LADY", "LORD", "REV"}
# Name prefixes and suffixes that are no part of who someone is (in those components only).
_AFFIXES = _TITLES | {"MSTR", "REVD", "FR", "HERR", "FRAU", "MME", "MLLE", "SR", "JR", "SNR",
                      "JNR", "II", "III", "IV", "MD", "PHD", "DO", "RN", "DDS", "BSC", "MSC",
                      "MBBS", "FRCR", "FRCS", "MRCP"}
# What else the verifier reads source dates from (besides the birth date): every top-level
# DA, and the date part of these DT attributes (Acquisition DateTime).
_EVENT_DATETIMES = {0x0008002A}
_BIRTH_DATE_TAG = 0x00100030
_A_DIGIT = re.compile(r"\d")
# Digits and non-digits apart: "15MAR2021" -> 15, MAR, 2021; "4TH" -> 4, TH.
_DIGIT_RUNS = re.compile(r"\d+|\D+")
# Chinese, Japanese and Korean characters (Han, kana, half-width kana, Hangul).
_CJK = ((0x1100, 0x11FF), (0x3040, 0x30FF), (0x3130, 0x318F), (0x31F0, 0x31FF),
        (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF),
        (0xFF66, 0xFF9F), (0x20000, 0x2FFFF))
_SEPARATORS = set("^=,;:/\\()[]{}<>\"'`| \t\r\n.-_+*#@&")
# What separates the words of an institution's name (not an apostrophe: "Mary's"), and words
# its initials leave out.
_ALNUM_PIECES = re.compile(r"[^\W_]+")
_DIGIT_PIECES = re.compile(r"\d+")
# A phone number as written: an optional ``+``, digits with spaces, brackets, dots or hyphens
# between them (``+44 (0)113 496-0123``); bounded.
_PHONE_RUN = re.compile(r"\+?[\d(][\d ().\-]{4,40}")
_PLACE_SPLIT = re.compile(r"[\s,;:/\\()\[\]{}<>\"`|&+_.\-^=]+")
_LINKING = {"AND", "OF", "THE", "FOR", "DE", "LA", "DER", "DI", "DU"}
# Single-byte code pages text is typed in at modalities and RIS terminals, whatever the file
# declares (Windows, DOS, KOI8, ISO 8859 parts, Mac).
SINGLE_BYTE_ENCODINGS = ("cp1251", "koi8_r", "koi8_u", "cp866", "iso8859_5", "cp1250",
                         "iso8859_2", "cp852", "cp1253", "iso8859_7", "cp1254", "iso8859_9",
                         "cp1257", "iso8859_13", "cp1255", "iso8859_8", "cp1256", "iso8859_6",
                         "cp874", "cp1252", "cp850", "mac_roman")
DUMMY_TEMPORAL = {"19000101", "000000", "19000101000000", "", "00000000"}
# ASCII spellings of letters beyond dropping their accents: German, Scandinavian, Polish and
# other Latin letters; Cyrillic and Greek romanised (ISO 9 / BGN-like, common alternatives).
_ROMAN: dict[str, tuple[str, ...]] = {
    "ä": ("a", "ae"), "ö": ("o", "oe"), "ü": ("u", "ue"), "ß": ("ss", "s"), "ø": ("o", "oe"),
    "å": ("a", "aa"), "æ": ("ae", "e"), "œ": ("oe",), "ł": ("l",), "đ": ("d", "dj"),
    "ð": ("d",), "þ": ("th",), "ı": ("i",), "ħ": ("h",),
    "а": ("a",), "б": ("b",), "в": ("v", "w"), "г": ("g", "h"), "ґ": ("g",), "д": ("d",),
    "е": ("e", "ye"), "ё": ("e", "yo", "jo"), "є": ("ye", "ie", "je"), "ж": ("zh", "j", "z"),
    "з": ("z",), "и": ("i", "y"), "і": ("i",), "ї": ("yi", "i", "ji"), "й": ("y", "i", "j"),
    "к": ("k",), "л": ("l",), "м": ("m",), "н": ("n",), "о": ("o",), "п": ("p",),
    "р": ("r",), "с": ("s",), "т": ("t",), "у": ("u",), "ў": ("u", "w"), "ф": ("f",),
    "х": ("kh", "h", "ch"), "ц": ("ts", "c", "tz"), "ч": ("ch", "tch"), "ш": ("sh", "ch"),
    "щ": ("shch", "sch", "sht"), "ъ": ("",), "ы": ("y",), "ь": ("",), "э": ("e",),
    "ю": ("yu", "iu", "ju"), "я": ("ya", "ia", "ja"), "ђ": ("dj",), "ј": ("j",),
    "љ": ("lj",), "њ": ("nj",), "ћ": ("c",), "џ": ("dz",), "ѓ": ("gj",), "ќ": ("kj",),
    "ѕ": ("dz",),
    "α": ("a",), "β": ("v", "b"), "γ": ("g",), "δ": ("d",), "ε": ("e",), "ζ": ("z",),
    "η": ("i", "e"), "θ": ("th",), "ι": ("i",), "κ": ("k",), "λ": ("l",), "μ": ("m",),
    "ν": ("n",), "ξ": ("x", "ks"), "ο": ("o",), "π": ("p",), "ρ": ("r",), "σ": ("s",),
    "ς": ("s",), "τ": ("t",), "υ": ("y", "i", "u"), "φ": ("f", "ph"),
    "χ": ("ch", "kh", "h"), "ψ": ("ps",), "ω": ("o",),
}
# Cyrillic names in text are often spelt in one other language's system throughout: French
# (Chevtchouk), German (Schewtschuk), Polish (Szewczuk). Each is given here as the letters it
# spells its own way; others keep their first spelling in :data:`_ROMAN`.
_SYSTEMS: tuple[dict[str, str], ...] = (
    {"в": "v", "ё": "io", "ж": "j", "й": "i", "у": "ou", "х": "kh", "ц": "ts", "ч": "tch",
     "ш": "ch", "щ": "chtch", "ю": "iou", "я": "ia", "е": "e"},
    {"в": "w", "ё": "jo", "ж": "sch", "з": "s", "й": "j", "х": "ch", "ц": "z", "ч": "tsch",
     "ш": "sch", "щ": "schtsch", "ю": "ju", "я": "ja", "е": "e"},
    {"в": "w", "ё": "io", "ж": "z", "й": "j", "х": "ch", "ц": "c", "ч": "cz", "ш": "sz",
     "щ": "szcz", "ю": "ju", "я": "ja", "е": "e"},
)
# Spellings of one name part counted, at most (beyond that, one per choice of spelling).
_MOST_SPELLINGS = 64
# Markup escapes (fixed patterns, each a few characters): RTF \'hh (runs of them, one
# character set), RTF \uN with its fallback character, quoted-printable =HH (runs), and a
# quoted-printable soft line break.
_RTF_BYTES = re.compile(r"(?:\\'[0-9a-fA-F]{2})+")
_RTF_UNICODE = re.compile(r"\\u(-?[0-9]{1,6}) ?(?:\\'[0-9a-fA-F]{2}|[^\\{}])?")
_QP_BYTES = re.compile(r"(?:=[0-9A-Fa-f]{2})+")
_QP_SOFT_BREAK = re.compile(r"=\r?\n")


_ASCII_NOT_ALNUM = {c: None for c in range(128) if not chr(c).isalnum()}
_ASCII_SEPARATORS = {c: " " for c in range(128) if not chr(c).isalnum()}


def normalised(text: str) -> str:
    """Letters and digits only, upper case, accents dropped."""
    if text.isascii():
        return text.upper().translate(_ASCII_NOT_ALNUM)
    return "".join(c for c in unicodedata.normalize("NFKD", text).upper()
                   if c.isalnum() and not unicodedata.combining(c))


def words_of(text: str) -> list[str]:
    """The normalised words of ``text``."""
    if text.isascii():
        return text.upper().translate(_ASCII_SEPARATORS).split()
    return [w for w in (normalised(w) for w in _split(text)) if w]


def _split(text: str) -> list[str]:
    """The pieces of ``text`` between separators and spaces, as written."""
    out: list[str] = []
    current: list[str] = []
    for c in text:
        if c in _SEPARATORS or c.isspace():
            if current:
                out.append("".join(current))
                current = []
        else:
            current.append(c)
    if current:
        out.append("".join(current))
    return out


def _as_utf8(text: str) -> str:
    """The name a value read as Latin-1 (or the default repertoire) spells when its bytes
    were UTF-8, as many systems write without saying so (``JÃ¼rgen``: ``Jürgen``); ""
    when they were not."""
    if text.isascii():
        return ""
    try:
        data = text.encode("latin-1")
    except UnicodeEncodeError:
        return ""
    try:
        reading = data.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    return "" if reading == text else reading


def _values(value: Any) -> list[Any]:
    return list(value) if isinstance(value, MultiValue | list) else [value]


# Katakana (ァ-ヶ) as the hiragana of the same sound: a reading stored in one is written in
# the other (PN phonetic groups in hiragana, free text in katakana, or the other way).
_KATAKANA_AS_HIRAGANA = {code: code - 0x60 for code in range(0x30A1, 0x30F7)}


def folded(text: str) -> str:
    """``text`` as CJK names are compared: NFKC (half-width kana made full-width, voiced
    marks kept), katakana as hiragana, case folded, letters and digits only."""
    return "".join(c for c in unicodedata.normalize("NFKC", text).casefold().translate(
        _KATAKANA_AS_HIRAGANA) if c.isalnum())


def _cjk_characters(text: str) -> int:
    """How many Chinese, Japanese or Korean characters ``text`` has."""
    return sum(1 for c in text if any(low <= ord(c) <= high for low, high in _CJK))


def _letter_romanised(letter: str) -> tuple[str, ...]:
    """The ASCII spellings of one lower-case letter (itself, accents dropped, when it has
    no other)."""
    if letter in _ROMAN:
        return _ROMAN[letter]
    plain = "".join(c for c in unicodedata.normalize("NFKD", letter)
                    if not unicodedata.combining(c))
    return _ROMAN.get(plain, (plain,))


def romanised(text: str, every: bool = True) -> set[str]:
    """How ``text`` written in other letters is written in ASCII (lower case): accents
    dropped, ``ue`` for ``ü``, ``oe`` for ``ø``, ``aa`` for ``å``, ``l`` for ``ł``, Cyrillic
    and Greek romanised. ``every``: every combination of the letters' spellings (up to
    :data:`_MOST_SPELLINGS`), else one spelling per choice (all first spellings, all second,
    ...). Empty for ASCII text and for letters with no ASCII spelling (CJK, Arabic, ...)."""
    if text.isascii():
        return set()
    lower = unicodedata.normalize("NFC", text).lower()
    letters = [_letter_romanised(c) for c in lower]
    if any(not way.isascii() for ways in letters for way in ways):
        return set()
    systems: set[str] = set()
    if any(0x400 <= ord(c) <= 0x4FF for c in lower):
        systems = {"".join(system.get(c, ways[0]) for c, ways in zip(lower, letters,
                                                                      strict=True))
                   for system in _SYSTEMS}
    combinations = 1
    for ways in letters:
        combinations *= len(ways)
    if every and combinations <= _MOST_SPELLINGS:
        return systems | {"".join(choice) for choice in itertools.product(*letters)}
    most = max((len(ways) for ways in letters), default=0)
    return systems | {"".join(ways[k] if k < len(ways) else ways[0] for ways in letters)
                      for k in range(most)}


def _escaped_bytes(data: bytes) -> str:
    """Bytes written as escapes, as text: UTF-8 when they are that, else Windows-1252
    (Latin-1 for its gaps)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(bytes([b]).decode("cp1252", "ignore") or chr(b) for b in data)


def _hex_bytes(escaped: str) -> bytes:
    """``\\'fc\\'e9`` or ``=FC=E9``: the bytes."""
    digits = [c for c in escaped if c in "0123456789abcdefABCDEF"]
    return bytes.fromhex("".join(digits))


def _rtf_unicode(match: re.Match[str]) -> str:
    code = int(match.group(1))
    code += 65536 if code < 0 else 0
    return chr(code) if 0 < code <= 0x10FFFF else match.group()


def unescape(text: str) -> str:
    """``text`` with markup escapes undone: HTML entities (``&uuml;``, ``&#252;``), RTF
    ``\\'fc`` and ``\\u252?``, quoted-printable ``=FC`` and soft line breaks."""
    if "&" in text:
        text = html.unescape(text)
    if "\\" in text:
        text = _RTF_BYTES.sub(lambda m: _escaped_bytes(_hex_bytes(m.group())), text)
        text = _RTF_UNICODE.sub(_rtf_unicode, text)
    if "=" in text:
        text = _QP_SOFT_BREAK.sub("", text)
        text = _QP_BYTES.sub(lambda m: _escaped_bytes(_hex_bytes(m.group())), text)
    return text


def short_dates(text: str) -> Iterator[tuple[int, int, int]]:
    """Every (year, month, day) written short as a whole token in ``text``: day and month of
    one or two digits and a two-digit year, one separator (``/``, ``.`` or ``-``) used twice
    (``4/3/81``: both readings, 4 March and 3 April, of 1981 and of 2081; ``81/03/04``, two
    digits first: also 4 March 1981); not part of a longer number or version
    (``1.4.3.81``). One pass over the text."""
    size = len(text)
    at = 0
    while at < size:
        if not (text[at].isdigit() and text[at].isascii()):
            at += 1
            continue
        end = at
        while end < size and (text[end] in "./-" or (text[end].isdigit() and text[end].isascii())):
            end += 1
        token = text[at:end].rstrip("./-")  # "4/3/81." at the end of a sentence
        boxed_in = (at > 0 and (text[at - 1].isalnum() or text[at - 1] == "_")) or (
            end < size and (text[end].isalnum() or text[end] == "_"))
        if not boxed_in and not token.startswith(("/", ".", "-")):
            yield from _short_date(token)
        at = max(end, at + 1)


def compact_dates(word: str) -> Iterator[tuple[int, int, int]]:
    """The (year, month, day) six digits (``110624``) may be: day, month, year; month, day,
    year; year, month, day (two-digit years of 1900 and of 2000)."""
    a, b, c = int(word[:2]), int(word[2:4]), int(word[4:6])
    for century in (1900, 2000):
        for year, month, day in ((c, b, a), (c, a, b), (a, b, c)):
            found = _day(century + year, month, day)
            if found:
                yield found


def _short_date(token: str) -> Iterator[tuple[int, int, int]]:
    """The dates ``4/3/81`` (one token, one separator) may be."""
    separators = {c for c in token if not c.isdigit()}
    if len(separators) != 1:
        return
    parts = token.split(separators.pop())
    if len(parts) != 3 or not (0 < len(parts[0]) <= 2 and 0 < len(parts[1]) <= 2
                               and len(parts[2]) == 2):
        return
    first, second, year = int(parts[0]), int(parts[1]), int(parts[2])
    for century in (1900, 2000):
        for month, day in ((second, first), (first, second)):
            found = _day(century + year, month, day)
            if found:
                yield found
        if len(parts[0]) == 2:  # year, month, day
            found = _day(century + first, second, year)
            if found:
                yield found


def _day(year: int, month: int, day: int) -> tuple[int, int, int] | None:
    """(year, month, day) when it is a real day, else None."""
    try:
        date(year, month, day)
    except ValueError:
        return None
    return year, month, day


def _date_value(text: str) -> tuple[int, int, int] | None:
    """A DA value (or the date part of a DT) as (year, month, day)."""
    text = text.strip()
    if len(text) < 8 or not text[:8].isdigit():
        return None
    return _day(int(text[:4]), int(text[4:6]), int(text[6:8]))


def _date_tokens(words: list[str]) -> list[str]:
    """Normalised words, with a day, month and year written together taken apart
    (``15MAR2021``: 15, MAR, 2021; ``4TH``: 4, TH); other words of letters and digits stay
    whole (``2021X`` is no year)."""
    out: list[str] = []
    for word in words:
        if word.isdigit() or word.isalpha():
            out.append(word)
            continue
        runs = _DIGIT_RUNS.findall(word)
        if all(r.isdigit() or r in _MONTH_WORDS or r in _ORDINALS for r in runs):
            out += runs
        else:
            out.append(word)
    return out


def written_dates(words: list[str]) -> Iterator[tuple[int, int, int]]:
    """Every (year, month, day) written in a text's normalised words: numbers with a
    four-digit year in any order (``15 03 2024``, ``2024-03-15``, ``03/15/2024``: both
    readings), ``20240315`` (also with a time after it) and ``15032024``, and month names
    with a day and a year in any usual order (``4TH OF MARCH 1981``, ``MAR 15 2021``,
    ``2021 MAR 15``, ``04 MAR 81``); a month with a year only gives day 0. Each date is read
    from a few words, so the reading is linear in the text."""
    tokens = _date_tokens(words)
    count = len(tokens)
    for i, token in enumerate(tokens):
        if token.isdigit():
            yield from _numeric_dates(tokens, i)
            continue
        month = _MONTH_WORDS.get(token)
        if month is None:
            continue
        # a day before the month: "4 MARCH", "4 TH OF MARCH"
        before: int | None = None
        j = i - 1
        if j >= 0 and tokens[j] == "OF":
            j -= 1
        if j >= 0 and tokens[j] in _ORDINALS:
            j -= 1
        if j >= 0 and tokens[j].isdigit() and len(tokens[j]) <= 2:
            before = int(tokens[j])
        # what follows: a day, a year, or both
        k = i + 1
        after: int | None = None
        if k < count and tokens[k].isdigit() and len(tokens[k]) <= 2:
            after = int(tokens[k])
            k += 1
            if k < count and tokens[k] in _ORDINALS:
                k += 1
        year: int | None = None
        if k < count and tokens[k].isdigit() and len(tokens[k]) in (2, 4):
            year = int(tokens[k])
        elif after is not None and len(tokens[i + 1]) == 2 and before is not None:
            year = after  # "04 MAR 81"
            after = None
        if year is None and i >= 1 and tokens[i - 1].isdigit() and len(tokens[i - 1]) == 4:
            year, before = int(tokens[i - 1]), None  # "2021 MAR 15"
        if year is None:
            continue
        for day in (before, after):
            if day is not None:
                for full in ((year,) if year >= 100 else (1900 + year, 2000 + year)):
                    found = _day(full, month, day)
                    if found:
                        yield found
        if year >= 1000:
            yield year, month, 0


def _numeric_dates(tokens: list[str], i: int) -> Iterator[tuple[int, int, int]]:
    """The dates a number at ``tokens[i]`` starts: ``20240315`` (a time may follow),
    ``15032024`` and ``03152024``, or three numbers with a four-digit year first or last."""
    token = tokens[i]
    if 8 <= len(token) <= 14:
        found = _day(int(token[:4]), int(token[4:6]), int(token[6:8]))
        if found:
            yield found
        if len(token) == 8:
            for month, day in ((token[2:4], token[:2]), (token[:2], token[2:4])):
                found = _day(int(token[4:]), int(month), int(day))
                if found:
                    yield found
        return
    if i + 2 >= len(tokens) or not (tokens[i + 1].isdigit() and tokens[i + 2].isdigit()):
        return
    middle, last = tokens[i + 1], tokens[i + 2]
    if len(middle) > 2:
        return
    if len(token) == 4 and len(last) <= 2:
        found = _day(int(token), int(middle), int(last))
        if found:
            yield found
    elif len(token) <= 2 and len(last) == 4:
        for month, day in ((middle, token), (token, middle)):
            found = _day(int(last), int(month), int(day))
            if found:
                yield found


@dataclass(frozen=True)
class Token:
    """One identifying value to look for: its kind, normalised form, and whether it only
    counts as a whole word (short name parts)."""

    kind: str
    norm: str
    whole_word: bool


_ASCII_SPACE = {c: " " for c in range(128) if not chr(c).isalnum()}


def _cased_words(text: str) -> list[str]:
    """The words of ``text`` as written (case kept), split where :func:`words_of` splits."""
    if text.isascii():
        return text.translate(_ASCII_SPACE).split()
    return _split(text)


@dataclass
class SourceIdentity:
    """Everything identifying in one or more source files."""

    tokens: dict[str, Token] = field(default_factory=dict)
    raw_forms: dict[bytes, str] = field(default_factory=dict)  # exact bytes -> kind
    uids: dict[str, str] = field(default_factory=dict)  # original UID -> kind
    temporal: dict[tuple[int, ...], tuple[str, str]] = field(default_factory=dict)
    charsets: set[str] = field(default_factory=set)
    keep: frozenset[str] = frozenset()
    dates: dict[tuple[int, int, int], str] = field(default_factory=dict)  # (y, m, d) -> kind
    cjk: dict[str, str] = field(default_factory=dict)  # CJK name (folded) -> kind
    # CJK names in their multi-byte encodings (Shift-JIS, EUC, GB18030, Big5, UTF-16, ISO
    # 2022 after its escape): found anywhere in raw bytes (their neighbours may be any bytes)
    cjk_bytes: dict[bytes, str] = field(default_factory=dict)
    common: dict[str, str] = field(default_factory=dict)  # name parts that are common words
    # the institution's and department's names as device labels (AE titles, station names,
    # local codes) write them: words and words run together, and their initials
    places: dict[str, str] = field(default_factory=dict)
    initials: dict[str, str] = field(default_factory=dict)
    # single words of four or five letters (``CARE``): a whole piece of a label only
    place_words: dict[str, str] = field(default_factory=dict)
    # logins and IDs of several words from a report (``Fetus A``): their normalised words
    # joined by one space, found as whole words only
    bounded: dict[str, str] = field(default_factory=dict)
    _software: set[str] = field(default_factory=set)  # implementation UIDs: not identifying
    _indexes: dict[tuple[int, bool], tuple[dict[str, str], list[tuple[str, str]]]] = field(
        default_factory=dict)

    @classmethod
    def of(cls, datasets: Iterable[Dataset], keep: frozenset[str] = frozenset()
           ) -> SourceIdentity:
        """The identity of every data set in ``datasets`` (their union)."""
        identity = cls(keep=keep)
        for ds in datasets:
            identity.add(ds)
        return identity

    def merge(self, other: SourceIdentity) -> None:
        """Add everything ``other`` looks for (the union of several sources)."""
        for norm, token in other.tokens.items():
            mine = self.tokens.get(norm)
            if mine is None or (mine.whole_word and not token.whole_word):
                self.tokens[norm] = token
        for form, kind in other.raw_forms.items():
            self.raw_forms.setdefault(form, kind)
        self.uids.update(other.uids)
        self.charsets |= other.charsets
        for day, kind in other.dates.items():
            self.dates.setdefault(day, kind)
        for name, kind in other.cjk.items():
            self.cjk.setdefault(name, kind)
        for form, kind in other.cjk_bytes.items():
            self.cjk_bytes.setdefault(form, kind)
        for word, kind in other.common.items():
            self.common.setdefault(word, kind)
        for place, kind in other.places.items():
            self.places.setdefault(place, kind)
        for letters, kind in other.initials.items():
            self.initials.setdefault(letters, kind)
        for word, kind in other.place_words.items():
            self.place_words.setdefault(word, kind)
        for phrase, kind in other.bounded.items():
            self.bounded.setdefault(phrase, kind)

    def add(self, ds: Dataset) -> None:
        """Add what ``ds`` says about who and where it is."""
        meta = getattr(ds, "file_meta", None)
        if meta is not None and meta.get("ImplementationClassUID"):
            self._software.add(str(meta.ImplementationClassUID))
        charset = ds.get("SpecificCharacterSet")
        for c in _values(charset):
            if c:
                self.charsets.add(str(c))
        self._walk(ds, (), 0, context=False)
        for value in _values(ds.get("PatientBirthDate")):
            self._birth_date(str(value or ""))
        if KEEP_DATES not in self.keep:
            self._event_dates()

    def _event_dates(self) -> None:
        """The dates of the study and its parts (every top-level DA but the birth date, the
        date of the acquisition date-time), as the walk found them, to be read out of text
        wherever they are written."""
        for path, (vr, value) in self.temporal.items():
            if len(path) != 1 or path[0] == _BIRTH_DATE_TAG or not (
                    vr == "DA" or path[0] in _EVENT_DATETIMES):
                continue
            for text in value.split("\\"):
                if text.strip() not in DUMMY_TEMPORAL:
                    day = _date_value(text)
                    if day:
                        self.dates.setdefault(day, "original date")

    # -- building ----------------------------------------------------------------------------

    def _token(self, kind: str, text: str, whole_word: bool = False) -> None:
        norm = normalised(text)
        if len(norm) < 2 or norm in _COMMON_WORDS:
            return
        if len(norm) < 6:
            whole_word = True
        existing = self.tokens.get(norm)
        if existing is None or (existing.whole_word and not whole_word):
            self.tokens[norm] = Token(kind, norm, whole_word)
        stripped = text.strip()
        if len(stripped) >= 5:
            for form in {stripped, stripped.upper()}:
                for encoding in ("utf-8", "latin-1"):
                    try:
                        self.raw_forms.setdefault(form.encode(encoding), kind)
                    except UnicodeEncodeError:
                        continue
            if not stripped.isascii():
                self._single_byte_forms(kind, stripped)

    def _single_byte_forms(self, kind: str, text: str) -> None:
        """``text`` (beyond ASCII) as written, in upper, lower and title case, in each of the
        single-byte code pages text is typed in whatever a file declares (a Cyrillic name in
        Windows-1251 or KOI8-R in a file declaring ISO 8859-5 or UTF-8), to be found in raw
        bytes."""
        for form in {text, text.upper(), text.lower(), text.title()}:
            for encoding in SINGLE_BYTE_ENCODINGS:
                try:
                    self.raw_forms.setdefault(form.encode(encoding), kind)
                except UnicodeEncodeError:
                    continue

    def _name(self, kind: str, value: Any) -> None:
        """A person name: every part and piece, as written and in the ASCII spellings of
        names written in other letters (``Müller``: ``Mueller``; ``Иванов``: ``Ivanov``), and
        the surname with initials run into it as logins are written (``jsmith``)."""
        text = str(value or "")
        for reading in (text, _as_utf8(text)):
            for group in reading.split("=") if reading else ():
                self._name_group(kind, group)
                for spelt in romanised(group, every=False):
                    self._name_group(kind, spelt)

    def _name_group(self, kind: str, group: str) -> None:
        """One component group of a person name (see :meth:`_name`); titles and suffixes in
        its prefix and suffix components (Mr, Dr, Jr, III) are not the person's name."""
        components_written = group.split("^")
        if len(components_written) > 3:
            group = "^".join(components_written[:3] + [
                " ".join(w for w in c.split() if normalised(w) not in _AFFIXES)
                for c in components_written[3:]])
        parts = [p for p in group.replace("^", " ").replace(",", " ").split() if p]
        for part in parts:
            self._name_part(kind, part)
        if len(parts) > 1:
            self._token(kind, " ".join(parts))
            self._token(kind, " ".join(reversed(parts)))
        components = [[w for w in _cased_words(c)
                       if normalised(w) not in _PLACEHOLDER_NAMES]
                      for c in group.split("^")]
        written = [w for component in components for w in component]
        spoken = [w for i in (1, 2, 0) if i < len(components) for w in components[i]]
        for pieces in (written, spoken):
            self._name_pieces(kind, pieces)
        self._logins(kind, components)

    def _logins(self, kind: str, components: list[list[str]]) -> None:
        """Logins made of a surname of four letters or more (each piece of it, and a
        compound one run together) and the initials of the given and middle names, run
        into it before or after (``jsmith``, ``jqsmith``, ``smithj``), as whole words. A name
        with no ``^`` (``John Smith``) counts either way round."""
        components = [c for c in components if c]
        if len(components) >= 2:
            readings = [(components[0], components[1] + (components[2]
                                                         if len(components) > 2 else []))]
        elif components and len(components[0]) >= 2:
            words = components[0]
            readings = [(words[-1:], words[:-1]), (words[:1], words[1:])]
        else:
            return
        for family, given in readings:
            family = [normalised(w) for w in family]
            given = [normalised(w) for w in given]
            surnames = {w for w in family if sum(c.isalpha() for c in w) >= 4}
            if len(family) > 1:
                surnames.add("".join(family))
            initials = {w[:1] for w in given if w}
            if len(given) > 1 and all(given):
                initials.add("".join(w[:1] for w in given))
            for surname in surnames:
                for initial in initials:
                    self._token(kind, initial + surname, whole_word=True)
                    self._token(kind, surname + initial, whole_word=True)

    def _name_part(self, kind: str, part: str) -> None:
        """One part of a name, as a whole word, also in its ASCII spellings when written in
        other letters; a common word only where written as a name (see :meth:`in_text`)."""
        norm = normalised(part)
        if norm in _PLACEHOLDER_NAMES:
            return
        if norm in _COMMON_WORDS:
            self.common.setdefault(norm, kind)
        else:
            self._token(kind, part, whole_word=True)
        for spelt in romanised(part):
            spelt_norm = normalised(spelt)
            if spelt_norm in _COMMON_WORDS:
                self.common.setdefault(spelt_norm, kind)
            elif spelt_norm not in _PLACEHOLDER_NAMES:
                self._token(kind, spelt, whole_word=True)

    def _name_pieces(self, kind: str, pieces: list[str]) -> None:
        """The pieces of a name (``Smith-Jones``: Smith, Jones; ``Del Carmen``), each as a
        whole word, up to four consecutive ones run together (``SmithJones``,
        ``MariaDelCarmen``), and CJK pieces, or CJK pieces run together (``王伟``), of two or
        more characters."""
        for piece in pieces:
            self._name_part(kind, piece)
            self._cjk_name(kind, piece)
        for size in range(2, min(len(pieces), 4) + 1):
            for start in range(len(pieces) - size + 1):
                run = "".join(pieces[start:start + size])
                self._cjk_name(kind, run)
                if len(normalised(run)) >= 4:
                    self._token(kind, run, whole_word=True)

    def _cjk_name(self, kind: str, name: str) -> None:
        """``name`` to be found anywhere in text when it has two or more CJK characters."""
        form = folded(name)
        if not name.isascii() and _cjk_characters(form) >= 2:
            self.cjk.setdefault(form, kind)
            self.raw_forms.setdefault(unicodedata.normalize("NFC", name).encode(), kind)
            for written in {unicodedata.normalize("NFC", name),
                            unicodedata.normalize("NFKC", name)}:
                for encoding in _CJK_ENCODINGS:
                    try:
                        encoded = written.encode(encoding)
                    except UnicodeEncodeError:
                        continue
                    self.cjk_bytes.setdefault(encoded.removesuffix(b"\x1b(B"), kind)

    def _text(self, kind: str, value: Any, words: bool = True) -> None:
        text = str(value or "").strip()
        if not text:
            return
        self._token(kind, text)
        if words:
            for word in text.replace(",", " ").split():
                if len(normalised(word)) >= 4:
                    self._token(kind, word, whole_word=not any(c.isdigit() for c in word))
            self._runs(kind, text)
        digits = "".join(c for c in text if c.isdigit())
        if len(digits) >= 6:
            self._token(kind, digits)
        if words and len(digits) >= 5:
            # each run of digits, also without the zeros that pad it to a fixed width: an ID
            # written without its check digit (``5520917-8``) or its padding (``0005520917``);
            # only a run that is most of the ID (two thirds of its digits), not one number of
            # several (``11-05-25-142825``, whose last piece is a time of day)
            runs = {r for r in _DIGIT_PIECES.findall(text) if 3 * len(r) >= 2 * len(digits)}
            for run in runs | {r.lstrip("0") for r in runs}:
                if len(run) >= 5:
                    self._token(kind, run)

    def _address_lines(self, address: str) -> None:
        """Each line of an address that holds a house number, as a whole (``14 Elm
        Grove``), and the house number with the word after it as whole words (``14 Elm``),
        unless that word is a linking one (``1 The Close``)."""
        for line in re.split(r"[,;^\r\n]+", address):
            pieces = words_of(line)
            if not any(p.isdigit() for p in pieces):
                continue
            if len(pieces) > 1 and len("".join(pieces)) >= 6:
                self._token("address", line)
            for number, word in zip(pieces, pieces[1:], strict=False):
                if number.isdigit() and len(number) <= 4 and word.isalpha() and len(word) >= 3 \
                        and word not in _LINKING:
                    self.bounded.setdefault(f"{number} {word}", "address")

    def _report_identifier(self, kind: str, value: Any) -> None:
        """A login or ID from a report, as a whole value (``Fetus A``: not ``Fetus`` alone).
        One of several words, one of them of letters (``Fetus A``, ``Twin B``), counts as
        those words in that order, whole (not in ``Fetus Anatomy``), or run together."""
        text = str(value or "").strip()
        pieces = words_of(text)
        if len(pieces) > 1 and any(p.isalpha() for p in pieces):
            self.bounded.setdefault(" ".join(pieces), kind)
            self._token(kind, "".join(pieces), whole_word=True)
            digits = "".join(c for c in text if c.isdigit())
            if len(digits) >= 6:
                self._token(kind, digits)
            return
        self._text(kind, text, words=False)

    def _phone(self, kind: str, value: Any) -> None:
        """A phone number: besides what :meth:`_text` takes, its national significant number
        (seven digits or more) without the trunk 0 or, written with a country code
        (``+44 113 ...``, ``0044 113 ...``), without a country code of one to three digits,
        and with the trunk 0 before it."""
        text = str(value or "")
        self._text(kind, text)
        for piece in _PHONE_RUN.findall(text):
            digits = "".join(c for c in piece if c.isdigit()).lstrip("0")
            numbers = {digits}
            if piece.startswith(("+", "00")):
                numbers |= {digits[size:].lstrip("0") for size in (1, 2, 3)}
            for number in numbers:
                if len(number) >= 7:
                    self._token(kind, number)
                    self._token(kind, "0" + number)

    def _runs(self, kind: str, text: str) -> None:
        """Two to four consecutive short pieces of ``text`` (four characters or fewer, each
        too short to count alone) run together, when they hold a digit and six characters or
        more: a postcode or phone number however it is spaced (``LS6 2AB``, ``LS62AB``;
        ``496 0123``, ``4960123`` of ``0113 496 0123``)."""
        pieces = [normalised(p) for p in _ALNUM_PIECES.findall(text)]
        for size in range(2, min(len(pieces), 4) + 1):
            for start in range(len(pieces) - size + 1):
                run = pieces[start:start + size]
                joined = "".join(run)
                if len(joined) >= 6 and all(len(p) <= 4 for p in run) and any(
                        c.isdigit() for c in joined):
                    self._token(kind, joined)

    def _place(self, kind: str, value: Any, initials: bool = True) -> None:
        """An institution's or department's name as a label would hold it: each word of four
        letters or more that is not a common one (of four or five letters: looked for as a
        whole piece of a label only), two to four consecutive words run together (``St
        Mary's``: ``STMARYS``; five letters or more, not all common or short; these are
        looked for in any text too), and, unless ``initials`` is False (a department), the
        initials of its words (three or more, linking words left out: ``SMH``). Modalities
        and the department's systems (``MRI``, ``PET``, ``PACS``) are no place."""
        words = [normalised(w) for w in _PLACE_SPLIT.split(str(value or ""))]
        words = [w for w in words if w]
        for size in range(1, min(len(words), 4) + 1):
            for start in range(len(words) - size + 1):
                run = words[start:start + size]
                joined = "".join(run)
                if joined in _NOT_PLACES:
                    continue
                if len(joined) >= (4 if size == 1 else 5) and any(
                        len(w) > 2 and w not in _COMMON_WORDS for w in run):
                    if size == 1 and len(joined) < 6:
                        self.place_words.setdefault(joined, kind)
                        continue
                    self.places.setdefault(joined, kind)
                    if size > 1:  # in any text too: "STMARYS protocol"
                        self._token(kind, joined)
        letters = "".join(w[0] for w in words if w not in _LINKING)
        if initials and len(letters) >= 3 and letters.isalpha() and letters not in _NOT_PLACES:
            self.initials.setdefault(letters, kind)

    def _birth_date(self, value: str) -> None:
        try:
            day = date(int(value[:4]), int(value[4:6]), int(value[6:8]))
        except ValueError:
            return
        self.dates[(day.year, day.month, day.day)] = "birth date"
        self.dates[(day.year, day.month, 0)] = "birth date"  # its month and year
        d, m, y = f"{day.day:02d}", f"{day.month:02d}", f"{day.year:04d}"
        kind = "birth date"
        for form in (f"{y}{m}{d}", f"{d}{m}{y}", f"{m}{d}{y}", f"{d}/{m}/{y}", f"{y}-{m}-{d}",
                     f"{d}.{m}.{y}", f"{d}-{m}-{y}", f"{d} {_MONTHS[day.month - 1]} {y}",
                     f"{_MONTHS[day.month - 1]} {d} {y}"):
            self._token(kind, form)
        for form in (f"{d}/{m}/{y[2:]}", f"{d}.{m}.{y[2:]}", f"{d}-{m}-{y[2:]}",
                     f"{day.day}/{day.month}/{y}"):
            for encoding in ("utf-8",):
                self.raw_forms.setdefault(form.encode(encoding), kind)
        for sep in "/.-":  # short: 4/3/81, 3/4/81
            for form in (f"{day.day}{sep}{day.month}{sep}{y[2:]}",
                         f"{day.month}{sep}{day.day}{sep}{y[2:]}"):
                self.raw_forms.setdefault(form.encode(), kind)

    def _walk(self, ds: Dataset, path: tuple[int, ...], depth: int, context: bool,
              fetal: bool = False) -> None:
        if depth > 16:
            return
        for tag in list(ds.keys()):
            tag = BaseTag(tag)
            if tag.is_private and ds.get_item(tag).VR == "UI" and KEEP_UIDS not in self.keep:
                # a private UID (explicit VR) of the source: no more to be left than others
                self._attribute("", "UI", _as_text(ds.get_item(tag).value), (*path, int(tag)),
                                context)
                continue
            if tag.group == 0x0002 or tag.is_private or tag.group == 0x7FE0:
                continue
            stored = ds.get_item(tag).VR
            try:
                listed: str | None = dictionary_VR(tag)
            except KeyError:
                listed = None
            if stored in (None, "UN"):
                if listed is None:
                    continue
                stored = listed
            vr: str = stored
            # text of the dictionary written with another VR (a name stored as LO or OB) is
            # read as what the dictionary says it is
            written_otherwise = listed is not None and listed in _TEXT_KINDS \
                and vr != listed and vr != "SQ"
            if written_otherwise and listed is not None:
                vr = listed
            keyword = keyword_for_tag(tag)
            if tag == _TEXT_VALUE and depth:
                kind = _report_identifier(ds, KEEP_INSTITUTION in self.keep, fetal)
                for v in _values(_as_text(ds[tag].value)) if kind else []:
                    if kind == "institution":
                        self._text(kind, v)
                        self._place(kind, v)
                    elif sum(c.isalnum() for c in str(v or "")) > 2:  # not a label ("F1")
                        self._report_identifier(kind, v)
                continue
            if not _worth_reading(vr, keyword, context):
                continue
            if vr == "SQ":
                if KEEP_INSTITUTION in self.keep and keyword in _INSTITUTION_KEPT:
                    continue
                inner = context or any(w in keyword for w in _CONTEXT_WORDS)
                items = ds[tag].value or []
                inner_fetal = _fetal(items) or (
                    keyword == "ContentSequence" and _fetal_section(ds))
                for index, item in enumerate(items):
                    self._walk(item, (*path, int(tag), index), depth + 1, inner, inner_fetal)
                continue
            raw = ds.get_item(tag).value
            value: Any
            if written_otherwise:
                value = _as_text(ds[tag].value)
                if value not in (None, "", b""):
                    self._attribute(keyword, vr, value, (*path, int(tag)), context)
                continue
            if isinstance(raw, bytes) and raw.isascii() and b"\x1b" not in raw and vr != "PN":
                # plain ASCII (UIDs, dates, IDs): no need for pydicom to convert it
                text = raw.decode("ascii").strip(" \0")
                value = text.split("\\") if "\\" in text else text
            else:
                value = ds[tag].value
            if value in (None, "", b""):
                continue
            self._attribute(keyword, vr, value, (*path, int(tag)), context)

    def _attribute(self, keyword: str, vr: str, value: Any, path: tuple[int, ...],
                   context: bool) -> None:
        if keyword in _DEVICE and KEEP_DEVICE in self.keep:
            return
        if KEEP_INSTITUTION in self.keep and keyword in _INSTITUTION_KEPT:
            return
        if vr == "PN":
            kind = "patient name" if keyword in _PATIENT_NAMES else "person name"
            for v in _values(value):
                self._name(kind, v)
        elif vr == "UI":
            if KEEP_UIDS not in self.keep and keyword not in _CLASS_UIDS:
                for v in _values(value):
                    text = str(v or "").strip()
                    if text and text not in UID_dictionary and len(text) >= 8 \
                            and text not in self._software:
                        self.uids[text] = f"original UID ({keyword or 'private'})"
        elif vr in ("DA", "DT", "TM"):
            self.temporal[path] = (vr, "\\".join(str(v).strip() for v in _values(value)))
        elif keyword in _PATIENT_IDS:
            for v in _values(value):
                text = str(v or "")
                digits = "".join(c for c in text if c.isdigit())
                self._text("NHS number" if len(digits) == 10 else "patient ID", text)
        elif keyword in _ACCESSION:
            if keyword == "StudyID" and len(normalised(str(value))) < 4:
                return
            for v in _values(value):
                self._text("accession or order number", v, words=False)
        elif keyword in _ADDRESSES:
            for v in _values(value):
                self._text("address", v)
                self._address_lines(str(v or ""))
        elif "Telephone" in keyword or "Telecom" in keyword:
            for v in _values(value):
                self._phone("phone number", v)
        elif keyword in _INSTITUTIONS:
            if KEEP_INSTITUTION not in self.keep:
                for v in _values(value):
                    self._text("institution", v)
                    self._place("institution", v,
                                initials=keyword != "InstitutionalDepartmentName")
        elif context and keyword in ("CodeValue", "CodeMeaning", "LongCodeValue"):
            for v in _values(value):
                self._text("staff or institution code", v)
        elif vr in ("LO", "SH") and keyword.endswith(("ID", "IDs", "Number", "Identifier")) \
                and keyword not in _NOT_IDENTIFIERS:
            for v in _values(value):
                self._text("identifier", v, words=False)

    # -- looking -----------------------------------------------------------------------------

    def in_text(self, text: str, coded: bool = False, dates: bool = True) -> list[str]:
        """The kinds of identifier ``text`` carries (whole words for name parts and short
        identifiers, anywhere for longer ones and for CJK names, punctuation and case
        ignored; the source's dates however written), as written and with its markup
        escapes undone (``M&uuml;ller``, ``M\\'fcller``, ``M=FCller``). ``coded``: a coded
        string (CS), checked for the patient's own identifiers only. ``dates``: False for
        values that are dates, times, UIDs or numbers themselves (checked apart, by
        place)."""
        if not text:
            return []
        found = self._in_text(text, coded, dates)
        if "&" in text or "\\" in text or "=" in text:
            plain = unescape(text)
            if plain != text:
                found += self._in_text(plain, coded, dates)
        return found

    def _in_text(self, text: str, coded: bool, dates: bool) -> list[str]:
        """:meth:`in_text` for ``text`` as it is (no escapes undone)."""
        words, phrases = self._index(coded)
        written = words_of(text)
        present = set(written)
        found = [words[w] for w in words.keys() & present]
        if phrases:
            norm = normalised(text)
            found += [kind for phrase, kind in phrases if phrase in norm]
        for candidate in _uid_like(text):
            kind = self.uids.get(candidate)
            if kind:
                found.append(kind)
        if self.common and not present.isdisjoint(self.common):
            found += self._common_names(text, coded)
        if self.cjk and not text.isascii():
            form = folded(text)
            found += [kind for name, kind in self.cjk.items()
                      if name in form and (not coded or kind in _CS_KINDS)]
        if dates and self.dates and _A_DIGIT.search(text):
            for day in written_dates(written):
                kind = self.dates.get(day)
                if kind and (not coded or kind in _CS_KINDS):
                    found.append(kind)
            found += self._short_dates(text)
            found += [kind for word in written if len(word) == 6 and word.isdigit()
                      for day in compact_dates(word) if (kind := self.dates.get(day))]
        if self.bounded:
            spaced = f" {' '.join(written)} "
            found += [kind for phrase, kind in self.bounded.items()
                      if f" {phrase} " in spaced and (not coded or kind in _CS_KINDS)]
        return found

    def in_label(self, text: str) -> list[str]:
        """The kinds of identifier a label (an AE title, a station name, a local code's value
        or meaning) holds beyond :meth:`in_text`: the institution or department named in it
        as labels write names: a word of six letters or more or words run together, anywhere
        (``STMARYS_CT1``); a shorter word or their initials as a whole piece, also numbered
        (``SMH_MR2``, ``SMH2``, ``CARE_1``, never inside ``CARESTREAM1``); a piece of five
        letters or more, also numbered, that starts a word (``CARDIO-CT`` for Cardiology).
        A piece that is a modality or the department's system (``MRI_3T``, ``PACS``) is
        none."""
        if not text or not (self.places or self.initials or self.place_words):
            return []
        norm = normalised(text)
        found = [kind for place, kind in self.places.items() if place in norm]
        for word in words_of(text):
            base = word.rstrip("0123456789")
            if not base or base in _NOT_PLACES:
                continue
            kind = self.initials.get(base) or self.place_words.get(base)
            if kind:
                found.append(kind)
            elif len(base) >= 5 and base.isalpha():
                found += [kind for place, kind in self.places.items()
                          if len(place) > len(base) and place.startswith(base)]
                found += [kind for place, kind in self.place_words.items()
                          if len(place) > len(base) and place.startswith(base)]
        return found

    def in_uid(self, text: str) -> list[str]:
        """The source's dates (``YYYYMMDD``) written in a UID's components, unless the
        profile keeps UIDs: many devices make UIDs from the date and time
        (``...3124.20240502095054``). UIDs under ``2.25`` (a number made from a UUID or a
        hash, with no date in it) are not read: any date there is chance."""
        if KEEP_UIDS in self.keep or not self.dates or text.startswith("2.25."):
            return []
        found = []
        for component in text.split("."):
            if len(component) >= 8:
                found += [kind for (year, month, day), kind in self.dates.items()
                          if day and f"{year:04d}{month:02d}{day:02d}" in component]
        return found

    def _short_birth_dates(self, text: str) -> list[str]:
        """The birth date written short as a whole token (``4/3/81``, ``3.4.81``)."""
        return ["birth date" for day in short_dates(text)
                if self.dates.get(day) == "birth date"]

    def _short_dates(self, text: str) -> list[str]:
        """The source's dates (the birth date, and the event dates unless kept) written with
        a two-digit year as a whole token (``4/3/81``, ``11.06.24``, ``24/06/11``)."""
        return [kind for day in short_dates(text) if (kind := self.dates.get(day))]

    def _common_names(self, text: str, coded: bool) -> list[str]:
        """Name parts that are common words (WARD, LANE), where written as a name:
        capitalised (``Ward``, ``WARD``) or after a title (``mr ward``)."""
        found = []
        previous = ""
        for word in _cased_words(text):
            norm = normalised(word)
            kind = self.common.get(norm)
            if kind and (not coded or kind in _CS_KINDS) and (
                    word[:1].isupper() or previous in _TITLES):
                found.append(kind)
            previous = norm
        return found

    def _index(self, coded: bool) -> tuple[dict[str, str], list[tuple[str, str]]]:
        """Whole-word tokens by their normalised form, and the other tokens (built once for
        the tokens as they are)."""
        key = (len(self.tokens), coded)
        cached = self._indexes.get(key)
        if cached is None:
            tokens = [t for t in self.tokens.values() if not coded or t.kind in _CS_KINDS]
            cached = ({t.norm: t.kind for t in tokens if t.whole_word},
                      [(t.norm, t.kind) for t in tokens if not t.whole_word])
            self._indexes = {key: cached, **{k: v for k, v in self._indexes.items()
                                             if k[0] == key[0]}}
        return cached

    def in_pieces(self, values: list[str]) -> list[str]:
        """Identifiers split across two values (in either order): one value ends with the
        first part (three characters or more), another starts with the rest. ``values`` are
        normalised."""
        endings: set[str] = set()
        beginnings: set[str] = set()
        for value in values:
            for length in range(3, min(len(value), 24) + 1):
                endings.add(value[-length:])
                beginnings.add(value[:length])
        found = []
        for token in self.tokens.values():
            norm = token.norm
            if len(norm) < 6:
                continue
            if any(norm[:k] in endings and norm[k:] in beginnings
                   for k in range(3, len(norm) - 2)):
                found.append(token.kind)
        return found

    def in_bytes(self, data: bytes) -> list[str]:
        """Identifiers found verbatim in raw bytes (as written, or in upper case)."""
        if not data:
            return []
        upper = data.upper()
        found = [kind for form, kind in self.raw_forms.items()
                 if _bounded(data, form, _ALNUM) or (form.isascii() and _bounded(
                     upper, form.upper(), _ALNUM))]
        found += [kind for uid, kind in self.uids.items()
                  if _bounded(data, uid.encode(), _UID_CHARACTERS)]
        found += [kind for form, kind in self.cjk_bytes.items() if form in data]
        return found

    def in_line(self, words: list[str]) -> list[str]:
        """Identifiers in one line read by OCR, also partly read (five or more characters of
        a longer identifier) or spread over several words."""
        norms = [normalised(w) for w in words]
        found = []
        present = set(norms)
        line = "".join(norms)
        if self.common and not present.isdisjoint(self.common):
            found += self._common_names(" ".join(words), coded=False)
        if self.cjk:
            form = folded("".join(words))
            found += [kind for name, kind in self.cjk.items() if name in form]
        if self.dates:
            found += self._short_birth_dates(" ".join(words))
        if self.bounded:
            spaced = f" {' '.join(norms)} "
            found += [kind for phrase, kind in self.bounded.items() if f" {phrase} " in spaced]
        for token in self.tokens.values():
            if len(token.norm) < 5:
                if token.norm in present:
                    found.append(token.kind)
            elif token.norm in line:
                found.append(token.kind)
            elif not token.whole_word and len(token.norm) >= 6 and any(
                    token.norm[i:i + 5] in line for i in range(len(token.norm) - 4)):
                found.append(f"part of {token.kind}")
        return found


# Encodings vendors write CJK text in (in private and binary values whatever the data set
# declares). ISO 2022 JP names are looked for as they start a run after its escape; ISO 2022
# IR 149 (Korean) writes EUC-KR bytes after its escape.
_CJK_ENCODINGS = ("shift_jis", "cp932", "euc_jp", "iso2022_jp", "gb18030", "big5", "euc_kr",
                  "utf-16-le", "utf-16-be")
_ALNUM = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_UID_CHARACTERS = frozenset(b"0123456789.")


def _bounded(data: bytes, form: bytes, inner: frozenset[int]) -> bool:
    """True when ``form`` occurs in ``data`` not run into by more of the same characters."""
    start = data.find(form)
    while start >= 0:
        end = start + len(form)
        if (start == 0 or data[start - 1] not in inner) and (
                end >= len(data) or data[end] not in inner):
            return True
        start = data.find(form, start + 1)
    return False


_UID_PATTERN = re.compile(r"[0-9]+(?:\.[0-9]+)+")


def _uid_like(text: str) -> Iterator[str]:
    if "." in text:
        for match in _UID_PATTERN.finditer(text):
            if len(match.group()) >= 8:
                yield match.group()


_ALWAYS_READ = {"SQ", "PN", "UI", "DA", "DT", "TM"}
# Report content items (DCM concepts) whose text is a login or an ID (PS3.16 TID 1003 Person
# Observer's Login Name and Identifier within Person Observer's Role, TID 1005 Placer, Filler
# and Accession Number, TID 1007 Subject ID, TID 1009/8001/8002 specimen and container
# identifiers, TID 1020 Person ID), an assigning authority (TID 1005 Issuer of Identifier,
# TID 1020 Person ID Issuer, TID 8001/8002 Issuer of (Parent) Specimen Identifier) or an
# organisation (TID 1003, TID 1020): looked for in the output like the header's IDs and
# institutions, IDs and issuers as a whole value. The verifier's own list, kept apart from
# the de-identifier's on purpose.
_LOGIN_OR_ID = "login or ID in a report"
_ISSUER = "institution (issuer of an identifier in a report)"
_REPORT_IDENTIFIERS = {
    "128774": _LOGIN_OR_ID, "128775": _LOGIN_OR_ID, "121030": _LOGIN_OR_ID,
    "113871": _LOGIN_OR_ID, "121020": _LOGIN_OR_ID, "121021": _LOGIN_OR_ID,
    "121022": _LOGIN_OR_ID, "121041": _LOGIN_OR_ID, "121040": _LOGIN_OR_ID,
    "111700": _LOGIN_OR_ID, "111705": _LOGIN_OR_ID,
    "113872": _ISSUER, "110190": _ISSUER, "111724": _ISSUER, "111706": _ISSUER,
    "121009": "institution", "113873": "institution",
}
_TEXT_VALUE = 0x0040A160
# TID 1008: a Subject ID among a Fetus Number, the Subject Class Fetus, Mother of fetus or
# Number of Fetuses (DCM, or LOINC's Number of Fetuses by US) is a fetus's label; so is one
# in the content of a section about one fetus (TID 5000, 5220: Fetal Biometry, Fetal Long
# Bones, ..., Fetus Summary, Fetal Measurements).
_SUBJECT_ID = "121030"
_FETUS_CONCEPTS = frozenset({("DCM", "121037"), ("DCM", "121026"), ("DCM", "121036"),
                             ("DCM", "121038"), ("LN", "11878-6")})
_FETAL_SECTIONS = frozenset(("DCM", c) for c in (
    "125001", "125002", "125003", "125004", "125006", "125008", "125009", "125015", "125016"))
# Pieces of a label that say what kind of machine, not where it is: Modality defined terms,
# how people write them, and the department's systems (never taken for the institution's
# initials or words: a department "Magnetic Resonance Imaging", a station "MRI_3T").
_NOT_PLACES = MODALITIES | frozenset(
    "MRI PET SPECT ANGIO MAMMO MAMMOGRAPHY ULTRASOUND FLUORO NUCMED DEXA XRAY PETCT PETMR "
    "PACS RIS HIS VNA LIS EPR EHR EMR SCP SCU WORKLIST MWL MPPS QR ARCHIVE ROUTER GATEWAY "
    "DICOM CONSOLE WORKSTATION STORE MODALITY VIEWER NODE".split())


def _report_identifier(item: Dataset, institution_kept: bool, fetal: bool = False) -> str:
    """The kind of identifier the text of the report content item ``item`` is (see
    :data:`_REPORT_IDENTIFIERS`; institutions not when ``institution_kept``, a Subject ID
    not in a fetus's subject context, ``fetal``), or ""."""
    try:
        concepts = item.get("ConceptNameCodeSequence") or []
        for concept in concepts:
            if str(concept.get("CodingSchemeDesignator", "") or "").strip() != "DCM":
                continue
            value = str(concept.get("CodeValue", "") or "").strip()
            kind = _REPORT_IDENTIFIERS.get(value, "")
            if fetal and value == _SUBJECT_ID:
                continue
            if kind and not (institution_kept and kind.startswith("institution")):
                return kind
    except (AttributeError, TypeError, ValueError, NotImplementedError):
        return ""
    return ""


def _fetal(items: Any) -> bool:
    """True when the content items ``items`` are a fetus's subject context (TID 1008)."""
    for item in items or []:
        try:
            for concept in list(item.get("ConceptNameCodeSequence") or []) + list(
                    item.get("ConceptCodeSequence") or []):
                if _code_of(concept) in _FETUS_CONCEPTS:
                    return True
        except (AttributeError, TypeError, ValueError, NotImplementedError):
            continue
    return False


def _fetal_section(item: Dataset) -> bool:
    """True when the content item ``item`` is a section about one fetus."""
    try:
        return any(_code_of(c) in _FETAL_SECTIONS
                   for c in item.get("ConceptNameCodeSequence") or [])
    except (AttributeError, TypeError, ValueError, NotImplementedError):
        return False


def _code_of(concept: Dataset) -> tuple[str, str]:
    """The (scheme, value) of a code item."""
    return (str(concept.get("CodingSchemeDesignator", "") or "").strip(),
            str(concept.get("CodeValue", "") or "").strip())


# VRs of text: a value the dictionary gives one of these is read as text whatever VR it was
# written with.
_TEXT_KINDS = {"PN", "LO", "SH", "ST", "LT", "UT", "UC"}


def _as_text(value: Any) -> Any:
    """A value written with a VR other than its own, as text: bytes read as UTF-8 (else
    Latin-1), split at backslashes; anything else as it is."""
    if not isinstance(value, bytes | bytearray):
        return value
    data = bytes(value)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    text = text.strip(" \0")
    return text.split("\\") if "\\" in text else text
_ID_ENDINGS = ("ID", "IDs", "Number", "Identifier")


def _worth_reading(vr: str, keyword: str, context: bool) -> bool:
    """Whether an attribute can hold something the identity collects (others are not
    decoded)."""
    return (vr in _ALWAYS_READ or keyword in _PATIENT_IDS or keyword in _ACCESSION
            or keyword in _ADDRESSES or keyword in _INSTITUTIONS or "Telephone" in keyword
            or "Telecom" in keyword or (context and keyword.startswith(("Code", "LongCode")))
            or (vr in ("LO", "SH") and keyword.endswith(_ID_ENDINGS)))


def keep_for_options(options: Iterable[str]) -> frozenset[str]:
    """What a profile with these PS3.15 options may leave in its outputs."""
    options = set(options)
    keep = set()
    if "retain_institution_identity" in options:
        keep.add(KEEP_INSTITUTION)
    if "retain_uids" in options:
        keep.add(KEEP_UIDS)
    if "retain_full_dates" in options:
        keep |= {KEEP_DATES, KEEP_TIMES}
    if "retain_modified_dates" in options:
        keep.add(KEEP_TIMES)
    if "retain_device_identity" in options:
        keep.add(KEEP_DEVICE)
    return frozenset(keep)
