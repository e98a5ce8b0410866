"""Who an instance is about, as the de-identification engine looks for it in free text and in
burned-in text: every identifying value of the data set (names of anyone named, IDs, birth
date in the usual written forms, addresses, phone numbers, institution and staff names), and
a matcher that finds them in text or in a line of words read by OCR, ignoring case,
punctuation and the order of name parts. Names are also found by each part of a compound
(``Smith-Jones``: ``Smith``, ``Jones``, ``Smith Jones``, ``SmithJones``), with their parts
run together (``MariaDelCarmen``), and, for names written in Chinese, Japanese or Korean
characters (two or more, also a one-character surname with a one-character given name),
anywhere in running text, since those scripts put no space between words. Names written in
other letters are also looked for in their usual ASCII spellings (``Müller``: ``Muller``,
``Mueller``; ``Sørensen``: ``Sorensen``; ``Иванов``: ``Ivanov``), and everyone's surname (four
letters or more) with an initial run into it as logins are written (``jsmith``, ``SMITHJ``).
The birth date, and the dates of the study and its parts unless the profile keeps them, are
also found written with a two-digit year (``4/3/81``, ``3.4.81``, ``81/03/04``; ``11/06/24``)
as a whole token. A phone number is found whole however it is written: with its trunk 0 or
without it after a country code (``0113 496 0123``, ``+44 113 496 0123``,
``+44 (0)113 496 0123``, ``0044 113 496 0123``). A login or ID of several words (a Subject ID
``Fetus A``) is found on word boundaries only (not in ``Fetus Anatomy``). Text
with markup escapes (HTML entities, RTF ``\\'fc`` and ``\\u252?``, quoted-printable ``=FC``)
is also read unescaped.

No regular expression is ever built from these values: matching is plain string search on
normalised text.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import date
from typing import Any

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

from imageshare.deid.codes import (
    FETAL_SECTIONS,
    FETUS_CONTEXT,
    IDENTIFYING_CONCEPTS,
    REPORT_IDENTIFIER,
    REPORT_ISSUER,
    REPORT_ORGANISATION,
    SUBJECT_ID,
)

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
# Runs of letters and digits, and how many of them an identifier written in pieces is looked
# for in (see :meth:`Identity._joined_spans`).
_ALNUM_RUN = re.compile(r"[^\W_]+")
_MAX_PIECES = 4
# Attributes that hold an address, and what separates its lines (HL7 v2 writes ``^``).
_ADDRESSES = frozenset({"PatientAddress", "PersonAddress", "InstitutionAddress",
                        "ReferringPhysicianAddress"})
_ADDRESS_LINES = re.compile(r"[,;^\r\n]+")
_DIGIT_RUN = re.compile(r"\d+")
# What may stand between the pieces of an identifier written in pieces.
_PIECE_GAPS = " -/_"
# Chinese, Japanese and Korean characters (Han, kana, half-width kana, Hangul).
_CJK_RANGES = ((0x1100, 0x11FF), (0x3040, 0x30FF), (0x3130, 0x318F), (0x31F0, 0x31FF),
               (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF),
               (0xFF66, 0xFF9F), (0x20000, 0x2FFFF))


# The birth date written short (``4/3/81``, ``04-03-81``, ``3.4.81``): a whole token, the
# same separator twice, not part of a longer number or version (``1.4.3.81``, ``4/3/812``).
_SHORT_DATE = re.compile(r"(?<!\w)(?<!\w[./-])\d{1,2}([./-])\d{1,2}\1\d{2}(?!\w)(?![./-]\w)")
# A phone number as written: an optional ``+``, then digits with spaces, brackets, dots or
# hyphens between them (``+44 (0)113 496-0123``). Bounded, so a scan is linear in the text.
_PHONE_LIKE = re.compile(r"\+?[\d(][\d ().\-]{4,40}")
# The attributes (at any depth) whose values are phone numbers.
_PHONE_WORDS = ("Telephone", "Telecom")
# Attributes whose date is an event of the patient's (the study, a series, an acquisition,
# the content), besides the birth date: looked for written short (``11/06/24``) unless the
# profile keeps them. DT values by their date part.
_EVENT_DATES = (BaseTag(0x00080020), BaseTag(0x00080021), BaseTag(0x00080022),
                BaseTag(0x00080023), BaseTag(0x0008002A))
# Letters written another way in ASCII besides dropping their accents (German, Scandinavian,
# Polish and other Latin letters), and a simple romanisation of Cyrillic and Greek (ISO 9 /
# BGN-like, with the common alternatives). The first spelling is the usual one.
_SPELLINGS: dict[str, tuple[str, ...]] = {
    "ä": ("a", "ae"), "ö": ("o", "oe"), "ü": ("u", "ue"), "ß": ("ss", "s"), "ø": ("o", "oe"),
    "å": ("a", "aa"), "æ": ("ae", "e"), "œ": ("oe",), "ł": ("l",), "đ": ("d", "dj"), "ð": ("d",),
    "þ": ("th",), "ı": ("i",), "ħ": ("h",),
    # Cyrillic (Russian, Ukrainian, Belarusian, Bulgarian, Serbian, Macedonian)
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
    # Greek (accents are dropped first)
    "α": ("a",), "β": ("v", "b"), "γ": ("g",), "δ": ("d",), "ε": ("e",), "ζ": ("z",),
    "η": ("i", "e"), "θ": ("th",), "ι": ("i",), "κ": ("k",), "λ": ("l",), "μ": ("m",),
    "ν": ("n",), "ξ": ("x", "ks"), "ο": ("o",), "π": ("p",), "ρ": ("r",), "σ": ("s",),
    "ς": ("s",), "τ": ("t",), "υ": ("y", "i", "u"), "φ": ("f", "ph"),
    "χ": ("ch", "kh", "h"), "ψ": ("ps",), "ω": ("o",),
}
# Whole transliteration systems of Cyrillic besides the English-like one above (French,
# German, Polish): a name written in text follows one of them throughout (Шевчук: Chevtchouk,
# Schewtschuk, Szewczuk), which choosing letter by letter among a few spellings misses.
# Letters a system does not name are spelt their usual way.
_CYRILLIC_SYSTEMS: tuple[dict[str, str], ...] = (
    dict(zip("вгеёжзийухцчшщъьыэюя", ("v", "g", "e", "io", "j", "z", "i", "i", "ou", "kh",
                                      "ts", "tch", "ch", "chtch", "", "", "y", "e", "iou",
                                      "ia"), strict=True)),
    dict(zip("вгеёжзийухцчшщъьыэюя", ("w", "g", "e", "jo", "sch", "s", "i", "j", "u", "ch",
                                      "z", "tsch", "sch", "schtsch", "", "", "y", "e", "ju",
                                      "ja"), strict=True)),
    dict(zip("вгеёжзийухцчшщъьыэюя", ("w", "g", "e", "io", "z", "z", "i", "j", "u", "ch", "c",
                                      "cz", "sz", "szcz", "", "", "y", "e", "ju", "ja"),
             strict=True)),
)
# Spellings of one name piece looked for, at most (beyond that, one per choice of spelling).
_MAX_SPELLINGS = 64
# What starts a markup escape: an HTML entity, an RTF escape, a quoted-printable byte.
_ESCAPE_MARKS = ("&", "\\", "=")
_HEX = frozenset("0123456789abcdefABCDEF")
_ENTITY_CHARACTERS = frozenset("#abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")

_ASCII_NOT_ALNUM = {c: None for c in range(128) if not chr(c).isalnum()}
# Name prefixes and suffixes (PS3.5 6.2: the fourth and fifth components of a person name)
# that say nothing of who someone is: titles, honorifics, generations and degrees. As name
# words they would take "MR" out of an MR image's Modality and descriptions.
_TITLES = frozenset({
    "MR", "MRS", "MS", "MISS", "MX", "MSTR", "MASTER", "DR", "PROF", "SIR", "DAME", "LADY",
    "LORD", "REV", "REVD", "FR", "HERR", "FRAU", "MME", "MLLE", "SR", "JR", "SNR", "JNR", "II",
    "III", "IV", "MD", "PHD", "DO", "RN", "DDS", "BSC", "MSC", "MBBS", "FRCR", "FRCS", "MRCP",
})


def utf8_misread(text: str) -> str:
    """``text`` as it was written when its UTF-8 bytes were read as Latin-1 (files that hold
    UTF-8 without declaring it: ``MÃ¼ller`` is ``Müller``); "" when it is not that."""
    if text.isascii():
        return ""
    try:
        written = text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return ""
    return written if written != text else ""


def _without_titles(name: str) -> str:
    """A person name without the prefixes and suffixes of :data:`_TITLES` (every other
    value of those components stays: it may be anything)."""
    groups = []
    for group in name.split("="):
        components = group.split("^")
        for i in range(3, len(components)):
            components[i] = " ".join(p for p in components[i].split()
                                     if normalise(p) not in _TITLES)
        groups.append("^".join(components))
    return "=".join(groups)


def normalise(text: str) -> str:
    """Upper case letters and digits only (accents dropped): what is compared."""
    if text.isascii():
        return text.upper().translate(_ASCII_NOT_ALNUM)
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed.upper() if c.isalnum() and not unicodedata.combining(c))


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in _CJK_RANGES)


# Katakana (ァ-ヶ) as the hiragana of the same sound: a reading stored in one is written in
# the other (PN phonetic groups in hiragana, free text in katakana, or the other way).
_KATAKANA_AS_HIRAGANA = {code: code - 0x60 for code in range(0x30A1, 0x30F7)}


def cjk_form(text: str) -> str:
    """``text`` as CJK names are compared: compatibility forms folded (half-width kana become
    full-width, voiced marks stay on their kana), katakana as hiragana, letters and digits
    only, case folded."""
    return "".join(c for c in unicodedata.normalize("NFKC", text).casefold().translate(
        _KATAKANA_AS_HIRAGANA) if c.isalnum())


def _cjk_name(text: str) -> str:
    """The CJK form of a name piece of two or more CJK characters; "" for any other."""
    if text.isascii():
        return ""
    form = cjk_form(text)
    return form if sum(1 for c in form if _is_cjk(c)) >= 2 else ""


def _letter_spellings(char: str) -> tuple[str, ...]:
    """How one (lower case) letter is written in ASCII: its usual spellings, or itself
    without its accents."""
    found = _SPELLINGS.get(char)
    if found is not None:
        return found
    base = "".join(c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c))
    return _SPELLINGS.get(base, (base,))


def spellings(text: str) -> set[str]:
    """The ASCII spellings of ``text`` (lower case): accents dropped, German ``ue`` for
    ``ü``, Scandinavian ``oe`` for ``ø`` and ``aa`` for ``å``, Polish ``l`` for ``ł``,
    Cyrillic and Greek romanised (every choice of spelling, or one spelling per choice when
    there are too many). Empty for ASCII text and for text with letters that have no ASCII
    spelling (CJK, Arabic, ...)."""
    if text.isascii():
        return set()
    letters = unicodedata.normalize("NFC", text.lower())
    options = [_letter_spellings(c) for c in letters]
    if not all(spelling.isascii() for choice in options for spelling in choice):
        return set()
    return _systems(letters, options) | _every_spelling(options)


def _systems(letters: str, options: list[tuple[str, ...]]) -> set[str]:
    """``letters`` spelt in each of :data:`_CYRILLIC_SYSTEMS` (when it has Cyrillic ones)."""
    if not any("\u0400" <= c <= "\u04ff" for c in letters):
        return set()
    return {"".join(system.get(c, choice[0]) for c, choice in zip(letters, options,
                                                                   strict=True))
            for system in _CYRILLIC_SYSTEMS}


def _every_spelling(options: list[tuple[str, ...]]) -> set[str]:
    """Every choice of every letter's spelling (or one per choice, when too many)."""
    count = 1
    for choice in options:
        count *= len(choice)
        if count > _MAX_SPELLINGS:
            return _one_per_choice(options)
    forms = [""]
    for choice in options:
        forms = [form + spelling for form in forms for spelling in choice]
    return set(forms)


def _spelling_choices(text: str) -> set[str]:
    """The ASCII spellings of ``text``, one per choice of spelling (every letter spelt its
    first way, every letter its second way, ...): for a whole name, where every choice of
    every letter would be too many."""
    if text.isascii():
        return set()
    letters = unicodedata.normalize("NFC", text.lower())
    options = [_letter_spellings(c) for c in letters]
    if not all(spelling.isascii() for choice in options for spelling in choice):
        return set()
    return _systems(letters, options) | _one_per_choice(options)


def _one_per_choice(options: list[tuple[str, ...]]) -> set[str]:
    """One spelling per choice: every letter spelt its k-th way, where it has one; where it
    has fewer, its last way and (again) its usual way."""
    width = max((len(c) for c in options), default=0)
    return {"".join(c[min(k, len(c) - 1)] if last else (c[k] if k < len(c) else c[0])
                    for c in options) for k in range(width) for last in (True, False)}


def _single_bytes(data: bytes) -> str:
    """Escaped bytes as text: UTF-8 when they are, else Windows-1252 (Latin-1 where it has
    no character)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(bytes([b]).decode("cp1252", "ignore") or chr(b) for b in data)


def _hex_run(text: str, start: int, mark: str) -> tuple[bytes, int]:
    """The bytes of consecutive ``mark`` + two hex digits escapes from ``start`` and where
    they end."""
    data = bytearray()
    end, size = start, len(mark) + 2
    while text.startswith(mark, end) and end + size <= len(text) and \
            text[end + size - 2] in _HEX and text[end + size - 1] in _HEX:
        data.append(int(text[end + size - 2:end + size], 16))
        end += size
    return bytes(data), end


def _entity(text: str, start: int) -> tuple[str, int]:
    """An HTML entity at ``start`` (``&uuml;``, ``&#252;``, ``&#xfc;``, ``&uuml``): what it
    stands for and where it ends; ("", start) when there is none."""
    end = start + 1
    while end < len(text) and end - start <= 32 and text[end] in _ENTITY_CHARACTERS:
        end += 1
    if end < len(text) and text[end] == ";":
        end += 1
    piece = text[start:end]
    decoded = html.unescape(piece)
    return (decoded, end) if decoded != piece else ("", start)


def _rtf_escape(text: str, start: int) -> tuple[str, int]:
    """An RTF escape at ``start`` (``\\'fc``, ``\\u252?``, with its fallback character):
    what it stands for and where it ends; ("", start) when there is none."""
    if text.startswith("\\'", start):
        data, end = _hex_run(text, start, "\\'")
        return (_single_bytes(data), end) if data else ("", start)
    if not text.startswith("\\u", start):
        return "", start
    end = start + 2
    if end < len(text) and text[end] == "-":
        end += 1
    digits = end
    while end < len(text) and end - digits < 6 and text[end].isdigit() and text[end].isascii():
        end += 1
    if end == digits:
        return "", start
    code = int(text[start + 2:end])
    code = code + 65536 if code < 0 else code
    if not 0 < code <= 0x10FFFF:
        return "", start
    if end < len(text) and text[end] == " ":
        end += 1  # the control word's delimiter
    if text.startswith("\\'", end) and end + 4 <= len(text):
        end += 4  # its fallback, escaped
    elif end < len(text) and text[end] not in "\\{}":
        end += 1  # its fallback (one character: \\uc1)
    return chr(code), end


def _quoted_printable(text: str, start: int) -> tuple[str, int]:
    """Quoted-printable bytes at ``start`` (``=FC``, ``=C3=BC``) or a soft line break
    (``=`` at the end of a line): what they stand for and where they end; ("", start) when
    there are none."""
    for soft in ("=\r\n", "=\n"):
        if text.startswith(soft, start):
            return "", start + len(soft)
    data, end = _hex_run(text, start, "=")
    return (_single_bytes(data), end) if data else ("", start)


_UNESCAPE = {"&": _entity, "\\": _rtf_escape, "=": _quoted_printable}


def unescaped(text: str) -> tuple[str, list[tuple[int, int]]]:
    """``text`` with its markup escapes read (HTML entities, RTF ``\\'hh`` and ``\\uN?``,
    quoted-printable ``=HH`` and soft line breaks), and for each of its characters the span
    of ``text`` it was read from. One pass over the text."""
    out: list[str] = []
    where: list[tuple[int, int]] = []
    at = 0
    while at < len(text):
        read = _UNESCAPE.get(text[at])
        decoded, end = read(text, at) if read else ("", at)
        if end > at:
            out.append(decoded)
            where.extend([(at, end)] * len(decoded))
            at = end
        else:
            out.append(text[at])
            where.append((at, at + 1))
            at += 1
    return "".join(out), where


def _unescaped_text(text: str) -> str:
    """``text`` with its markup escapes read (itself when it has none)."""
    if not any(mark in text for mark in _ESCAPE_MARKS):
        return text
    return unescaped(text)[0]


def _replaced(text: str, spans: Iterable[tuple[int, int]]) -> str:
    """``text`` with every span replaced by ``*`` (overlapping spans as one)."""
    out, last = [], 0
    for start, end in sorted(spans):
        if start < last:
            last = max(last, end)
            continue
        out.append(text[last:start])
        out.append("*")
        last = end
    out.append(text[last:])
    return "".join(out)


def values_of(value: Any) -> list[Any]:
    """An element value as a list (multi-valued or not)."""
    return list(value) if isinstance(value, MultiValue | list) else [value]


def date_forms(value: str) -> set[str]:
    """A DA value (``YYYYMMDD``) in the ways people write it: ISO, UK (dd/mm/yyyy, also with
    dashes, dots, spaces and two-digit years), US, compact, with month names, and short:
    day and month with or without a leading zero, in either order, with a two- or four-digit
    year (``4/3/81``, ``3.4.81``, ``4-03-1981``)."""
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
    for sep in ("/", "-", "."):
        for first, second in ((day.day, day.month), (day.month, day.day)):
            for a in {str(first), f"{first:02d}"}:
                for b in {str(second), f"{second:02d}"}:
                    forms |= {f"{a}{sep}{b}{sep}{y[2:]}", f"{a}{sep}{b}{sep}{y}"}
    month = _MONTHS[day.month - 1]
    nth = f"{day.day}{_ordinal_suffix(day.day)}"
    for name in {month, month[:3], month[:4]}:
        forms |= {f"{d} {name} {y}", f"{day.day} {name} {y}", f"{name} {day.day} {y}",
                  f"{d}-{name}-{y}", f"{d}{name}{y}", f"{name} {day.day}, {y}",
                  f"{name} {d}, {y}", f"{nth} {name} {y}", f"{nth} of {name} {y}",
                  f"{name} {nth} {y}", f"{name} {nth}, {y}"}
    return forms


def short_date_forms(value: str) -> set[str]:
    """A DA value (``YYYYMMDD``, or a DT's date part) written with a two-digit year as people
    write it: day, month, year (``11/06/24``, ``11.6.24``), month, day, year (``6-11-24``)
    and year, month, day (``24/06/11``, ``24/6/11``); one separator (``/``, ``.``, ``-``)
    used twice, day and month with or without a leading zero (the day last always two
    digits). Empty when it is no date."""
    text = str(value or "").strip()[:8]
    try:
        day = date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return set()
    year = f"{day.year % 100:02d}"
    days, months = {str(day.day), f"{day.day:02d}"}, {str(day.month), f"{day.month:02d}"}
    forms = set()
    for sep in ("/", ".", "-"):
        for d in days:
            for m in months:
                forms |= {f"{d}{sep}{m}{sep}{year}", f"{m}{sep}{d}{sep}{year}"}
        forms |= {f"{year}{sep}{m}{sep}{day.day:02d}" for m in months}
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
    dates: frozenset[str] = frozenset()  # the birth date written short, as whole tokens
    # the institution's and department's names as device labels write them (see
    # :meth:`_Collector.place`): significant words and runs of words, normalised
    places: frozenset[str] = frozenset()
    acronyms: frozenset[str] = frozenset()  # their initials (``SMH``), as a whole piece
    # their single words of four or five letters (``CARE``): found in a label only as a whole
    # piece, also numbered (``CARE2``), never inside a longer one (``CARESTREAM1``)
    short_places: frozenset[str] = frozenset()
    # phone numbers: their national significant numbers (digits, no trunk 0, no country
    # code), found with whatever trunk 0 or country code is written before them
    phones: frozenset[str] = frozenset()
    # logins and IDs of several words (``Fetus A``): their normalised words joined by one
    # space, found only as whole words in that order (not in ``Fetus Anatomy``)
    bounded: frozenset[str] = frozenset()
    # the event dates' six digits (``110624``), found as whole words
    compact: frozenset[str] = frozenset()

    def is_empty(self) -> bool:
        """True when nothing identifying was found."""
        return not self.words and not self.phrases and not self.cjk and not self.dates \
            and not self.bounded

    def names_place(self, label: str) -> bool:
        """True when a device label (an AE title, a station name: ``STMARYS_CT1``,
        ``CARDIO-CT``, ``SMH_MR2``) names the institution or department: it holds one of
        their words of six letters or more or words run together (anywhere: labels run words
        together), a shorter word or their initials as a whole piece, also numbered
        (``SMH2``, ``CARE_1``), or a piece of five letters or more (numbered or not) that
        starts such a word (an abbreviation: ``CARDIO2``). A piece that is a modality or a
        common imaging word (``MRI1``, ``PET_CT``, ``PACS``) names no place."""
        if not self.places and not self.acronyms:
            return False
        norm = normalise(label)
        if any(place in norm for place in self.places if place not in self.short_places):
            return True
        for piece in (normalise(p) for p in _WORDS.split(label) if p):
            base = piece.rstrip(_DIGIT_CHARACTERS)
            if not base or base in NOT_PLACE_WORDS:
                continue
            if base in self.acronyms or base in self.short_places or (
                    len(base) >= 5 and base.isalpha() and any(
                        place.startswith(base) for place in self.places
                        if len(place) > len(base))):
                return True
        return False

    def _short_dates(self, text: str) -> list[tuple[int, int]]:
        """Where ``text`` has the birth date or an event date written with a two-digit year
        (``4/3/81``, ``24/06/11``), as a whole token."""
        if not self.dates or not any(c.isdigit() for c in text):
            return []
        return [m.span() for m in _SHORT_DATE.finditer(text) if m.group() in self.dates]

    def _cjk_in(self, text: str) -> bool:
        """True when ``text`` carries a CJK name, wherever it is (no word boundaries)."""
        if not self.cjk or text.isascii():
            return False
        form = cjk_form(text)
        return any(name in form for name in self.cjk)

    def found_in(self, text: str) -> bool:
        """True when ``text`` carries any of the identifiers (any case, any punctuation), as
        written or once its markup escapes are read (``M&uuml;ller``, ``M\\'fcller``)."""
        if not text:
            return False
        if self._found_as_written(text):
            return True
        decoded = _unescaped_text(text)
        return decoded != text and self._found_as_written(decoded)

    def _found_as_written(self, text: str) -> bool:
        """True when ``text`` as it is (no escapes read) carries any of the identifiers."""
        norm = normalise(text)
        if not norm:
            return False
        if any(p in norm for p in self.phrases):
            return True
        if any(normalise(w) in self.words for w in _WORDS.split(text) if w):
            return True
        if self._short_dates(text):
            return True
        if self.bounded and self._bounded_in(text):
            return True
        return self._cjk_in(text)

    def holds_date(self, text: str) -> bool:
        """True when ``text`` has the birth date or an event date written with a two-digit
        year, as a whole token or word (``11/06/24``, ``SP_110624``)."""
        if not any(c.isdigit() for c in text):
            return False
        return bool(self._short_dates(text)) or any(
            w in self.compact for w in _WORDS.split(text) if len(w) == 6)

    def _bounded_in(self, text: str) -> bool:
        """True when ``text`` has one of the :attr:`bounded` identifiers, as whole words."""
        spaced = f" {' '.join(normalise(w) for w in _WORDS.split(text) if w)} "
        return any(f" {phrase} " in spaced for phrase in self.bounded)

    def without_phones(self, text: str) -> str:
        """``text`` with each of the phone numbers in it replaced by ``*`` as a whole (see
        :meth:`_phone_spans`)."""
        if not self.phones or not _DIGIT_RUN.search(text):
            return text
        spans = self._phone_spans(text)
        return _replaced(text, spans) if spans else text

    def _phone_spans(self, text: str) -> list[tuple[int, int]]:
        """Where ``text`` has one of the phone numbers, however spaced, with the trunk 0
        written before it (``0113 496 0123``, ``(0)113``) and, written in international form
        (``+44 113 496 0123``, ``0044 113 ...``, ``+441134960123``), its country code."""
        spans = []
        for match in _PHONE_LIKE.finditer(text):
            piece = match.group()
            at = [match.start() + i for i, c in enumerate(piece) if c.isdigit()]
            digits = "".join(c for c in piece if c.isdigit())
            international = piece.startswith(("+", "00"))
            for number in self.phones:
                found = digits.find(number)
                while found >= 0:
                    first = found - 1 if found and digits[found - 1] == "0" else found
                    if first and international and first <= 6:
                        spans.append((match.start(), at[found + len(number) - 1] + 1))
                    else:
                        spans.append((at[first], at[found + len(number) - 1] + 1))
                    found = digits.find(number, found + 1)
        return spans

    def clean(self, text: str) -> str:
        """``text`` with every identifier (as a whole word, any case; a CJK name wherever it
        is) replaced by ``*``; an identifier written with markup escapes (``M&uuml;ller``,
        ``M=FCller``) too, escapes and all. ``*`` alone when what is left of ``text`` would
        still carry one."""
        if not text:
            return text
        text = self.without_phones(text)
        if _DIGIT_RUN.search(text) and self._holds_phrase(normalise(text)):
            # an identifier written in pieces (``LS6 2AB``, ``496 0123``) goes as a whole
            # before its pieces are looked at one by one (``496`` would stay)
            pieces = self._joined_spans(text)
            if pieces:
                text = _replaced(text, pieces)
        cleaned = self._clean_as_written(text)
        if self._found_as_written(cleaned):
            # an identifier written in pieces (``acc-77312``, ``ACC 77312``): the pieces go.
            # What still carries one (``773.12`` for accession 77312: a measurement, perhaps)
            # is left as it is, for the verifier to hold the file back for a person's review:
            # nothing is rewritten on a guess.
            cleaned = _replaced(cleaned, self._joined_spans(cleaned))
        if not any(mark in cleaned for mark in _ESCAPE_MARKS):
            return cleaned
        decoded, where = unescaped(cleaned)
        if decoded == cleaned or not self._found_as_written(decoded):
            return cleaned
        spans = self._spans(decoded)
        if not spans:
            return "*"
        out = _replaced(cleaned, [(where[start][0], where[end - 1][1])
                                  for start, end in spans if end > start])
        return "*" if self.found_in(out) else out

    def _holds_phrase(self, norm: str) -> bool:
        """True when normalised text ``norm`` holds one of the longer identifiers."""
        return any(p in norm for p in self.phrases)

    def _joined_spans(self, text: str) -> list[tuple[int, int]]:
        """Where ``text`` has an identifier of six characters or more written in two to
        four pieces of letters and digits with only spaces, hyphens, slashes or underscores
        between them (``acc-77312``, ``MRN 552 8194``); never across a decimal point or a
        comma (``773.12 mGy``, ``55,28`` are numbers, not pieces)."""
        targets = set(self.phrases) | {w for w in self.words if len(w) >= 6}
        runs = [(m.start(), m.end(), normalise(m.group())) for m in _ALNUM_RUN.finditer(text)]
        spans = []
        for i in range(len(runs)):
            joined = runs[i][2]
            for j in range(i + 1, min(i + _MAX_PIECES, len(runs))):
                if text[runs[j - 1][1]:runs[j][0]].strip(_PIECE_GAPS):
                    break  # another character between the pieces
                joined += runs[j][2]
                if joined in targets:
                    spans.append((runs[i][0], runs[j][1]))
        return spans

    def _spans(self, text: str) -> list[tuple[int, int]] | None:
        """Where ``text`` has an identifier written out (a name, ID, ... as a whole word, a
        CJK name anywhere, the birth date written short); None when case folding changes its
        length (the places would not be its own)."""
        lowered = text.casefold()
        if len(lowered) != len(text):
            return None
        spans: list[tuple[int, int]] = self._short_dates(text)
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
        return spans

    def _clean_as_written(self, text: str) -> str:
        """``text`` (no escapes read) with every identifier replaced by ``*``."""
        spans = self._spans(text)
        if spans is None:
            return "*" if self._found_as_written(text) else text
        if not spans:
            # a CJK name written in another form (half-width kana, spaced out)
            return "*" if self._cjk_in(text) else text
        cleaned = _replaced(text, spans)
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
        # the birth date written short ("4/3/81"), as whole tokens of the line
        if self.dates:
            spaced = " ".join(words)
            at = [i for i, w in enumerate(words) for _ in range(len(w) + 1)]
            for start, end in self._short_dates(spaced):
                hits.update(at[start:end])
        # logins and IDs of several words ("Fetus A"), as whole words in that order
        for phrase in self.bounded:
            parts = phrase.split()
            for i in range(len(norms) - len(parts) + 1):
                if norms[i:i + len(parts)] == parts:
                    hits.update(range(i, i + len(parts)))
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
        self.dates: set[str] = set()
        self.places: set[str] = set()
        self.acronyms: set[str] = set()
        self.short_places: set[str] = set()
        self.phones: set[str] = set()
        self.bounded: set[str] = set()
        self.compact: set[str] = set()

    def identifier(self, value: Any) -> None:
        """A login or an ID (a report's Subject ID, Person ID, accession number): the whole
        of it, as one phrase (its words, ``Fetus`` of ``Fetus A``, are no identifier), and
        its digits; nothing when it has two letters or digits or fewer (a label, ``F1``).
        One of several words with a word of letters (``Fetus A``, ``Twin B``, ``STF-88213``)
        counts as whole words only (not in ``Fetus Anatomy``): written with one space,
        hyphen, underscore or none between them."""
        text = str(value or "").strip()
        if sum(c.isalnum() for c in text) <= 2:
            return
        norm = normalise(text)
        self.raw.add(text)
        pieces = [normalise(p) for p in _ALNUM_RUN.findall(text)]
        if len(pieces) > 1 and any(p.isalpha() for p in pieces):
            self.bounded.add(" ".join(pieces))
            self.words.add(norm)
            self.raw.update(joiner.join(_ALNUM_RUN.findall(text)) for joiner in " -_")
        else:
            (self.phrases if len(norm) >= 4 else self.words).add(norm)
        self._digits(text)

    def phone(self, value: Any) -> None:
        """A phone number (or several, in one value): the national significant number of
        each (seven digits or more, without its trunk 0; of one written with a country code,
        ``+44 113 ...``, ``0044 113 ...``, the number after a country code of one to three
        digits), besides what :meth:`text` takes of it."""
        for match in _PHONE_LIKE.finditer(str(value or "")):
            piece = match.group()
            digits = "".join(c for c in piece if c.isdigit())
            numbers = {digits.lstrip("0")}
            if piece.startswith(("+", "00")):
                numbers |= {digits.lstrip("0")[size:].lstrip("0") for size in (1, 2, 3)}
            numbers = {n for n in numbers if len(n) >= 7}
            self.phones |= numbers
            self.phrases |= numbers  # found in any text, whatever is written before them

    def event_date(self, value: Any) -> None:
        """A date of the patient's study or its parts (DA, or a DT's date part): written with
        a two-digit year, as a whole token (``11/06/24``, ``24/06/11``), and its six digits
        (day, month, year; month, day, year; year, month, day) as a whole word of a label
        (``SP_110624``)."""
        text = str(value or "").strip()
        forms = short_date_forms(text)
        self.dates |= forms
        if forms:
            yy, mm, dd = text[2:4], text[4:6], text[6:8]
            compact = {dd + mm + yy, mm + dd + yy, yy + mm + dd}
            self.words |= compact
            self.raw |= compact
            self.compact |= compact

    def place(self, value: Any, initials: bool = True) -> None:
        """An institution's or department's name, as labels and descriptions write it: each
        word of four letters or more that is not a generic one (``HOSPITAL``), consecutive
        words run together (``St Mary's``: ``STMARYS``) unless all generic, also looked for
        as words of any text; and the initials of all its words (three or more: ``SMH``),
        looked for in device labels only (three letters are too often something else), unless
        ``initials`` is False (a department: "Magnetic Resonance Imaging" is MRI). A modality
        or common imaging word (``MRI``, ``PET``, ``PACS``) is never taken for the place."""
        words = [normalise(w) for w in _PLACE_WORDS.split(str(value or ""))]
        words = [w for w in words if w]
        initial_letters = "".join(w[0] for w in words if w not in _LINKING_WORDS)
        for size in range(1, min(len(words), _MAX_RUN) + 1):
            for start in range(len(words) - size + 1):
                run = words[start:start + size]
                joined = "".join(run)
                if len(joined) >= (4 if size == 1 else 5) and joined not in NOT_PLACE_WORDS \
                        and not all(w in _GENERIC_WORDS or len(w) <= 2 for w in run):
                    self.places.add(joined)
                    self.words.add(joined)
                    self.raw.add(joined)
                    if size == 1 and len(joined) < 6:
                        self.short_places.add(joined)
        if initials and len(initial_letters) >= 3 and initial_letters.isalpha() \
                and initial_letters not in NOT_PLACE_WORDS:
            self.acronyms.add(initial_letters)

    def name(self, value: Any) -> None:
        """A person name (PN): every part as written, every piece of a compound part
        (``Smith-Jones``), consecutive pieces run together or joined by a space or hyphen
        (in the order written and in the order spoken: given, middle, family), CJK names to
        be found anywhere in text (also a one-character surname with a one-character given
        name), the surname with an initial run into it as logins are written (``jsmith``,
        ``smithj``), and all of these in the ASCII spellings of names written in other
        letters (``Müller``: ``Muller``, ``Mueller``; ``Иванов``: ``Ivanov``)."""
        text = str(value or "")
        for written in filter(None, (text, utf8_misread(text))):
            self._name(written)
            for group in written.split("="):
                for spelt in _spelling_choices(group):
                    self._name(spelt)

    def _name(self, text: str) -> None:
        """A person name as it is written (see :meth:`name`)."""
        text = _without_titles(text)
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
            self._logins(components)

    def _logins(self, components: list[list[str]]) -> None:
        """The surname (each piece of four letters or more, and a compound one run
        together) with the initials of the given and middle names run into it, before and
        after (``jsmith``, ``jqsmith``, ``smithj``): whole words only. A name written
        without ``^`` (``John Smith``) is taken either way round."""
        components = [c for c in components if c]
        if not components:
            return
        if len(components) == 1:
            if len(components[0]) < 2:
                return
            pieces = components[0]
            ways = [([pieces[-1]], pieces[:-1]), ([pieces[0]], pieces[1:])]
        else:
            ways = [(components[0], [p for c in components[1:3] for p in c])]
        for family, given in ways:
            surnames = {p for p in family if sum(c.isalpha() for c in p) >= 4}
            if len(family) > 1:
                surnames.add("".join(family))
            initials = {p[0] for p in given if p[0].isalnum()}
            if len(given) > 1 and all(p[0].isalnum() for p in given):
                initials.add("".join(p[0] for p in given))
            for surname in surnames:
                for initial in initials:
                    for login in (initial + surname, surname + initial):
                        self.words.add(normalise(login))
                        self.raw.add(login)

    def _pieces(self, pieces: list[str]) -> None:
        for piece in pieces:
            norm = normalise(piece)
            if len(norm) >= 2 and norm not in ("ANONYMOUS", "UNKNOWN"):
                self.words.add(norm)
                self.raw.add(piece)
                for spelt in spellings(piece):
                    if len(normalise(spelt)) >= 2:
                        self.words.add(normalise(spelt))
                        self.raw.add(spelt)
            cjk = _cjk_name(piece)
            if cjk:
                self.cjk.add(cjk)
        for size in range(2, min(len(pieces), _MAX_RUN) + 1):
            for start in range(len(pieces) - size + 1):
                run = pieces[start:start + size]
                cjk = _cjk_name("".join(run))
                if cjk:  # 王伟: a one-character surname and given name, run together
                    self.cjk.add(cjk)
                    self.raw.add("".join(run))
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
            if 6 <= len(norm) <= 16 and _DIGIT_RUN.search(norm):
                self.raw.add(norm)  # an ID written without its punctuation: A-5520917
        for part in _SPLIT.split(text):
            part = part.strip(".-")
            pnorm = normalise(part)
            if len(pnorm) >= 4 and pnorm not in _GENERIC_WORDS:
                self.raw.add(part)
                (self.phrases if any(c.isdigit() for c in pnorm) else self.words).add(pnorm)
        self._digits(text)
        self._joined(text)

    def _digits(self, text: str) -> None:
        """The digits of an identifying value (five or more), as one phrase and as a whole
        word of its own, and each run of five digits or more in it, also without its leading
        zeros: an ID is written without its prefix (``MRN5520917``: ``see 5520917``), its
        check digit (``5520917-8``: ``5520917``) or the zeros that pad it to a fixed width
        (``0005520917``: ``5520917``); a run is looked for alone only when it holds two thirds
        of the ID's digits."""
        digits = "".join(c for c in text if c.isdigit())
        if len(digits) < 5:
            return
        self.phrases.add(digits)
        self.raw.add(digits)
        # a run counts alone when it is most of the ID (two thirds of its digits): one piece
        # of an ID built from several numbers (``11-05-25-142825``: a time) is not the ID
        runs = {r for r in {digits, *_DIGIT_RUN.findall(text)} if 3 * len(r) >= 2 * len(digits)}
        for run in (runs | {r.lstrip("0") for r in runs}) - {digits}:
            if len(run) >= 5:
                (self.phrases if len(run) >= 6 else self.words).add(run)
                self.raw.add(run)

    def _joined(self, text: str) -> None:
        """Two to four consecutive short pieces (four characters or fewer: each too short to
        be looked for alone) of an identifying value run together, when they hold a digit
        and six characters or more: a postcode or phone number written without its spaces
        (``LS6 2AB``: ``LS62AB``; ``0113 496 0123``: ``4960123``), and, as phrases, the
        pieces written apart in other text (``LS6 2AB`` alone, ``496 0123``)."""
        runs = [normalise(m.group()) for m in _ALNUM_RUN.finditer(text)]
        for size in range(2, min(len(runs), _MAX_PIECES) + 1):
            for start in range(len(runs) - size + 1):
                pieces = runs[start:start + size]
                joined = "".join(pieces)
                if len(joined) >= 6 and all(len(p) <= 4 for p in pieces) and any(
                        c.isdigit() for c in joined):
                    self.phrases.add(joined)
                    self.raw.add(joined)

    def address(self, value: Any) -> None:
        """An address, besides what :meth:`text` takes of it: each of its lines (between
        commas, semicolons, carets or line breaks) that holds a house number, as written
        (``14 Elm Grove``), and the house number with the word after it, as whole words
        (``14 Elm``: the street's name without its kind, a word too short to be looked for
        alone), unless that word is a linking one (``1 The Close``)."""
        for line in _ADDRESS_LINES.split(str(value or "")):
            runs = _ALNUM_RUN.findall(line)
            if not any(r.isdigit() for r in runs):
                continue
            line = " ".join(line.split())
            if len(runs) > 1 and len(normalise(line)) >= 6:
                self.raw.add(line)
                self.phrases.add(normalise(line))
            for number, word in zip(runs, runs[1:], strict=False):
                if number.isdigit() and len(number) <= 4 and word.isalpha() and len(word) >= 3 \
                        and normalise(word) not in _LINKING_WORDS:
                    self.raw.add(f"{number} {word}")
                    self.bounded.add(f"{normalise(number)} {normalise(word)}")

    def birth_date(self, value: Any) -> None:
        text = str(value or "").strip()
        forms = _DATE_FORMS.get(text)
        if forms is None:
            forms = _DATE_FORMS[text] = frozenset(date_forms(text))
            if len(_DATE_FORMS) > 10_000:
                _DATE_FORMS.clear()
        for form in forms:
            norm = normalise(form)
            if _SHORT_DATE.fullmatch(form):
                self.dates.add(form)
            if len(norm) >= 6:  # short ones (4381) only as whole tokens, never inside others
                self.raw.add(form)
                self.phrases.add(norm)
        self.dates |= short_date_forms(text)  # also year first: 81/03/04


_DIGIT_CHARACTERS = "0123456789"
# Modalities (PS3.3 C.7.3.1.1.1 defined terms, the common ones, and how people say them) and
# the imaging department's systems: a label or a department's initials made of one of these
# (``MRI1``, ``PET_CT``, ``PACS2``; "Positron Emission Tomography") name no place.
NOT_PLACE_WORDS = frozenset(
    "CT MR MRI PET PT US NM CR DX MG XA RF SPECT OT SC SR KO PR IO PX OP OCT ES XC ECG EPS "
    "HD IVUS BMD DOC RG RTIMAGE SEG SM TG VL CD DD DG DM EC FA FS LP LS MA MS ST VF AU "
    "ANGIO MAMMO MAMMOGRAPHY ULTRASOUND FLUORO NUCMED DEXA XRAY CTMR PETCT PETMR "
    "PACS RIS HIS VNA LIS EPR EHR EMR SCP SCU WORKLIST MWL MPPS QR ARCHIVE ROUTER GATEWAY "
    "DICOM CONSOLE WORKSTATION STORE MODALITY VIEWER NODE".split())
# What separates the words of an institution's name (an apostrophe does not: "Mary's").
_PLACE_WORDS = re.compile(r"[\s,;:/\\()\[\]{}<>\"`|&+_.\-]+")
# Words an institution's initials leave out ("Guy's and St Thomas'": GST).
_LINKING_WORDS = frozenset({"AND", "OF", "THE", "FOR", "DE", "LA", "DER", "DI", "DU"})
# Attributes (at any depth) that name an institution or a department, and report concepts
# (TID 1003, 1020) whose text is an organisation: looked for in device labels.
_PLACE_TEXT = frozenset({"InstitutionName", "InstitutionalDepartmentName",
                         "VerifyingOrganization"})
_PATIENT_NAMES = ("PatientName", "OtherPatientNames", "PatientBirthName",
                  "PatientMotherBirthName")
_PATIENT_TEXT = ("PatientID", "OtherPatientIDs", "PatientAddress", "PatientTelephoneNumbers",
                 "MedicalRecordLocator", "AdmissionID")
_DATE_FORMS: dict[str, frozenset[str]] = {}
_COLLECTED_VRS = {"SQ", "PN", "LO", "SH", "ST", "LT", "UT", "UC"}
# Concepts of report content items whose text is someone's login or ID (or an order's,
# a specimen's), an assigning authority, or an organisation's name (derived from the
# de-identifier's one list, :data:`imageshare.deid.codes.IDENTIFYING_CONCEPTS`): collected
# like the header's IDs and institution names, so that the report's other text and the
# descriptions are cleaned of them too. IDs and issuers as a whole value only.
_PERSON_CONCEPTS = frozenset(code for code, (kind, _) in IDENTIFYING_CONCEPTS.items()
                             if kind == REPORT_IDENTIFIER)
_ISSUER_CONCEPTS = frozenset(code for code, (kind, _) in IDENTIFYING_CONCEPTS.items()
                             if kind == REPORT_ISSUER)
_ORGANISATION_CONCEPTS = frozenset(code for code, (kind, _) in IDENTIFYING_CONCEPTS.items()
                                   if kind == REPORT_ORGANISATION)
_TEXT_VALUE = BaseTag(0x0040A160)
_MISFILED_VRS = {"PN", "LO", "SH", "ST", "LT", "UT", "UC"}


def _names_in_report(item: Dataset, keep_institution: bool, fetal: bool = False) -> str:
    """What the text of the report content item ``item`` is: a login or an ID
    (``identifier``; not a fetus's Subject ID, ``fetal``), an assigning authority
    (``issuer``) or an organisation (``organisation``; neither when the institution's
    identity is kept), or "" (see :data:`_PERSON_CONCEPTS`)."""
    try:
        concepts = item.get("ConceptNameCodeSequence") or []
        codes = [(str(c.get("CodingSchemeDesignator", "") or "").strip(),
                  str(c.get("CodeValue", "") or "").strip()) for c in concepts]
    except (AttributeError, TypeError, ValueError, NotImplementedError):
        return ""
    for code in codes:
        if code in _PERSON_CONCEPTS and not (fetal and code == SUBJECT_ID):
            return REPORT_IDENTIFIER
        if not keep_institution and code in _ISSUER_CONCEPTS:
            return REPORT_ISSUER
        if not keep_institution and code in _ORGANISATION_CONCEPTS:
            return REPORT_ORGANISATION
    return ""


def _fetus_context(items: Any) -> bool:
    """True when the content items ``items`` are a fetus's subject context (TID 1008)."""
    for item in items or []:
        try:
            concepts = list(item.get("ConceptNameCodeSequence") or []) + list(
                item.get("ConceptCodeSequence") or [])
            if any((str(c.get("CodingSchemeDesignator", "") or "").strip(),
                    str(c.get("CodeValue", "") or "").strip()) in FETUS_CONTEXT
                   for c in concepts):
                return True
        except (AttributeError, TypeError, ValueError, NotImplementedError):
            continue
    return False


def _fetal_section(item: Dataset) -> bool:
    """True when the report content item ``item`` is a section about one fetus (TID 5000):
    a Subject ID in its content is that fetus's label."""
    try:
        return any((str(c.get("CodingSchemeDesignator", "") or "").strip(),
                    str(c.get("CodeValue", "") or "").strip()) in FETAL_SECTIONS
                   for c in item.get("ConceptNameCodeSequence") or [])
    except (AttributeError, TypeError, ValueError, NotImplementedError):
        return False


def _misfiled_text(value: Any) -> Any:
    """The value of a text attribute stored with another VR, as text: bytes (OB, UN) read as
    UTF-8 or else Latin-1, split at backslashes; text as it is."""
    if not isinstance(value, bytes | bytearray):
        return value
    data = bytes(value)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    text = text.strip(" \0")
    return text.split("\\") if "\\" in text else text


def _identity(found: _Collector) -> Identity:
    raw = tuple(sorted((r for r in found.raw if len(r.strip()) >= 2), key=len, reverse=True))
    phrases = tuple(sorted(found.phrases, key=len, reverse=True))
    return Identity(frozenset(found.words), phrases, raw, frozenset(found.cjk),
                    frozenset(found.dates), frozenset(found.places), frozenset(found.acronyms),
                    frozenset(found.short_places), frozenset(found.phones),
                    frozenset(found.bounded), frozenset(found.compact))


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
    for tag in _EVENT_DATES:
        if tag not in retained:
            for v in values_of(_text_value(ds, tag, "DA")):
                found.event_date(v)
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
             retained: frozenset[int] = frozenset(), fetal: bool = False) -> None:
    if depth > 12:
        return
    for tag in list(ds.keys()):
        tag = BaseTag(tag)
        if tag.is_private or tag == PIXEL_DATA or tag.group in (0x0002,):
            continue
        raw = ds.get_item(tag)
        known = _dictionary_vr(tag)
        vr = raw.VR if raw.VR not in (None, "UN") else known
        # a standard text attribute written with another VR (a name as LO or OB): read as the
        # dictionary says, or whoever it names is not looked for elsewhere
        misfiled = vr != known and known in _MISFILED_VRS and vr != "SQ"
        if misfiled:
            vr = known
        if vr not in _COLLECTED_VRS or tag in retained:
            continue
        keyword = keyword_for_tag(tag)
        if vr == "SQ":
            if keep_institution and keyword in _INSTITUTION_CODES:
                continue
            inner = person_context or any(w in keyword for w in PERSON_CONTEXT_WORDS)
            items = ds[tag].value or []
            inner_fetal = _fetus_context(items) or (
                keyword == "ContentSequence" and _fetal_section(ds))
            for item in items:
                _collect(item, found, depth + 1, inner, keep_institution,
                         patient if keyword == "OtherPatientIDsSequence" else None, retained,
                         inner_fetal)
            continue
        if keyword in _DEVICE or (keep_institution and keyword in _INSTITUTION_TEXT):
            continue
        if vr not in ("PN", "LO", "SH", "ST", "LT", "UT", "UC", "DA"):
            continue
        if vr == "PN":
            names = _misfiled_text(ds[tag].value) if misfiled else ds[tag].value
            for v in values_of(names):
                found.name(v)
                if patient is not None and keyword in _PATIENT_NAMES:
                    patient.name(v)
        elif vr == "DA":
            continue  # the birth date is added once, from the top level
        elif keyword in _IDENTIFYING_TEXT or keyword in _INSTITUTION_TEXT or (
                vr in ("LO", "SH") and keyword.endswith(_ID_SUFFIXES)
                and keyword not in _NOT_IDENTIFYING):
            texts = _text_value(ds, tag, vr)
            for v in values_of(_misfiled_text(texts) if misfiled else texts):
                found.text(v)
                if keyword in _ADDRESSES:
                    found.address(v)
                if keyword in _PLACE_TEXT and not keep_institution:
                    found.place(v, initials=keyword != "InstitutionalDepartmentName")
                if patient is not None and keyword in _PATIENT_TEXT:
                    patient.text(v)
                if any(word in keyword for word in _PHONE_WORDS):
                    found.phone(v)
                    if patient is not None and keyword in _PATIENT_TEXT:
                        patient.phone(v)
        elif tag == _TEXT_VALUE and depth and (
                kind := _names_in_report(ds, keep_institution, fetal)):
            for v in values_of(_text_value(ds, tag, vr)):
                if kind == REPORT_ORGANISATION:
                    found.text(v)
                    found.place(v)
                else:
                    found.identifier(v)
        elif person_context and keyword in ("CodeValue", "CodeMeaning", "LongCodeValue"):
            for v in values_of(_text_value(ds, tag, vr)):
                found.text(v)


# Titles that, written before a family name alone ("Mrs Lovelace"), make it name the patient
# ("Dr Smith" is more likely a colleague of the same name).
_NAME_TITLES = frozenset({"MR", "MRS", "MS", "MISS", "MX", "MASTER"})
_TEXT_WORDS = re.compile(r"[^\W\d_]+")


def _long_enough(identifier: str) -> bool:
    """Whether an identifier (normalised) is long enough to look for in typed text."""
    return len(identifier) >= (6 if identifier.isdigit() else 4)


def names_the_patient(header: Dataset, text: str) -> bool:
    """True when ``text`` (words a person typed for a de-identified audience) names the patient
    of ``header``: an identifier of theirs or their birth date (any common form), a family and
    a given name of theirs together, or the family name after a title ("Mrs Lovelace"). A
    name word alone does not count (a patient called Long must not stop "long axis")."""
    if not text.strip():
        return False
    identity = patient_identity_of(header)
    components = str(header.get("PatientName", "") or "").split("=")[0].split("^")
    family = {normalise(p) for p in components[0].split() if len(normalise(p)) >= 2}
    given = {normalise(p) for c in components[1:3] for p in c.split()
             if len(normalise(p)) >= 2}
    # Very short identifiers (a Patient ID "12") would refuse every text with a number.
    without_single_names = replace(
        identity, words=frozenset(w for w in identity.words
                                  if w not in family | given and _long_enough(w)),
        phrases=tuple(p for p in identity.phrases if _long_enough(p)))
    if without_single_names.found_in(text):
        return True
    words = [normalise(w) for w in _TEXT_WORDS.findall(text)]
    if family & set(words) and given & set(words):
        return True
    return any(word in family and words[n - 1] in _NAME_TITLES
               for n, word in enumerate(words) if n)


def field_naming_the_patient(headers: Iterable[Dataset], texts: dict[str, str]) -> str:
    """The name of the first of ``texts`` (field name -> what a person typed) that names the
    patient of one of ``headers`` (:func:`names_the_patient`); "" when none does."""
    for header in headers:
        for name, text in texts.items():
            if names_the_patient(header, text):
                return name
    return ""
