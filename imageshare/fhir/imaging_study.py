"""FHIR R4 ImagingStudy from the index: search parameters, resource ids, resources and Bundles.

Searches run through the archive's one query engine (:class:`QueryService`), so they are
audited like QIDO-RS (``study.query``) and limited to what the caller may see inside the SQL;
studies waiting in the inbox or held for reconciliation are not part of the record and never
appear (:mod:`imageshare.archive.record`).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from typing import Any
from urllib.parse import urlencode

from imageshare.archive.dicom_json import NHS_ISSUER, nhs_number_of, text_of
from imageshare.archive.query import Match, Query, QueryService
from imageshare.archive.search import NHS_SYSTEM, holds_nhs_number
from imageshare.domain.actors import Actor
from imageshare.domain.errors import InvalidQuery, NotFound
from imageshare.domain.identifiers import is_valid_nhs_number

DICOM_UID_SYSTEM = "urn:dicom:uid"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
CONNECTION_TYPE = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
FHIR_JSON = "application/fhir+json"
DEFAULT_COUNT, MAX_COUNT = 20, 100
# The most matches a search merges or counts (a patient's studies, a count-only answer).
MAX_MATCHES = 10_000
# Every name ImageShare takes for the patient of a study: ImagingStudy.subject is a logical
# reference (an identifier; there are no Patient resources here), searched with R4's
# ``:identifier`` modifier or the ``.identifier`` chain.
PATIENT_PARAMETERS = ("patient.identifier", "patient:identifier", "subject.identifier",
                      "subject:identifier", "subject:Patient.identifier",
                      "patient:Patient.identifier")
SEARCH_PARAMETERS = (*PATIENT_PARAMETERS, "identifier", "started", "modality", "status", "_id",
                     "_count", "_offset", "_summary", "_sort")
# Parameters (with any modifier or chain) that say whose or which studies are wanted: one
# not understood is refused even with ``handling=lenient`` (ignoring ``patient=Patient/1`` or
# ``subject.name=...`` would answer every patient's studies to a search for one).
NEVER_IGNORED = ("patient", "subject", "identifier", "_id")
# Parameters a client may send that change nothing here (left out of the self link).
IGNORED_PARAMETERS = ("_format", "_pretty", "_total")
SUMMARY_VALUES = ("true", "false", "text", "data", "count")
STATUS_CODES = ("registered", "available", "cancelled", "entered-in-error", "unknown")
# DICOM matching characters: a FHIR token is matched exactly, so they are refused.
_DICOM_MATCHING = frozenset("*?\\")

# The time of a search's dateTime after its day: hours and minutes, optional seconds (with a
# fraction), an optional zone (FHIR R4 search: without one, the server's zone is meant).
_TIME = re.compile(r"T([01]\d|2[0-3]):[0-5]\d(:([0-5]\d|60)(\.\d{1,9})?)?"
                   r"(Z|[+-](0\d|1[0-4]):[0-5]\d)?", re.ASCII)
_UID_ALPHABET = "0123456789."
_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuv"  # base 32, lower case


def resource_id(study_uid: str) -> str:
    """The ImagingStudy id of a study: its Study Instance UID packed into base 32 (stable,
    at most 45 characters, no patient data, and turned back by :func:`study_uid_of`)."""
    number = 1  # a leading 1 keeps leading zeros
    for char in study_uid:
        number = number * 11 + _UID_ALPHABET.index(char)
    digits = []
    while number:
        number, rest = divmod(number, 32)
        digits.append(_ID_ALPHABET[rest])
    return "".join(reversed(digits))


def study_uid_of(resource: str) -> str | None:
    """The Study Instance UID behind an ImagingStudy id, or None for an id not made here."""
    if not 1 <= len(resource) <= 64 or any(c not in _ID_ALPHABET for c in resource):
        return None
    number = 0
    for char in resource:
        number = number * 32 + _ID_ALPHABET.index(char)
    chars = []
    while number > 1:
        number, rest = divmod(number, 11)
        chars.append(_UID_ALPHABET[rest])
    if number != 1 or not chars:
        return None
    uid = "".join(reversed(chars))
    # One id per study: "0" + an id decodes to the same number, but is not the study's id.
    return uid if len(uid) <= 64 and resource_id(uid) == resource else None


@dataclass(frozen=True)
class Endpoints:
    """Where a study can be fetched (DICOMweb) and viewed (the IID launch), public URLs."""

    dicomweb: str
    viewer: str  # the /iid address; the study's UID is added


@dataclass(frozen=True)
class ImagingStudySearch:
    """An ImagingStudy search, as DICOM identifier alternatives (any may match) + paging.

    ``params`` are the parameters applied (what the self and paging links repeat);
    ``empty`` says that the conditions cannot all hold (nothing matches, nothing is asked);
    ``count_only`` answers the number of matches without resources (``_summary=count``)."""

    alternatives: tuple[dict[str, Any], ...]
    count: int = DEFAULT_COUNT
    offset: int = 0
    params: tuple[tuple[str, str], ...] = field(default=())
    empty: bool = False
    count_only: bool = False
    ignored: tuple[str, ...] = field(default=())
    nhs_number: str = ""  # the patient's NHS number, when the search names one
    hospital_number: str = ""  # the patient's hospital number, when the search names one

    def link(self, base: str, offset: int) -> str:
        """The address of the page starting at ``offset``."""
        kept = [(k, v) for k, v in self.params if k not in ("_count", "_offset")]
        kept += [("_count", str(self.count)), ("_offset", str(offset))]
        return f"{base}?{urlencode(kept)}"


def _token(value: str) -> tuple[str | None, str]:
    """``system|code`` (or ``|code``, or ``code``) as (system or None for any, code)."""
    if "|" in value:
        system, _, code = value.partition("|")
        return system, code
    return None, value


def _exact(name: str, code: str) -> str:
    """``code`` when it can be matched exactly; InvalidQuery when DICOM matching would read
    it as a wildcard (``*``, ``?``) or a list (``\\``), which FHIR token search never is."""
    if not code or _DICOM_MATCHING & set(code):
        raise InvalidQuery(f"{name} takes an exact value without *, ? or \\")
    return code


def _date_range(value: str) -> tuple[str, str]:
    """A ``started`` value with its FHIR prefix as an inclusive (low, high) DICOM date range
    (either may be empty: open). The value's own precision (year, month or day; a time is
    matched by its day) gives the range it stands for."""
    prefix = value[:2] if value[:2] in ("eq", "ge", "le", "gt", "lt", "sa", "eb", "ne", "ap") \
        else "eq"
    text = value[2:] if value[:2] == prefix else value
    if prefix in ("sa", "eb", "ne", "ap"):
        raise InvalidQuery(f"the prefix {prefix!r} is not supported for started (use eq, ge, "
                           "le, gt or lt)")
    if len(text) > 10:
        _check_time(text[10:])
    first, last = _period(text[:10] if len(text) > 10 else text)
    if prefix == "gt":
        if last == date.max:
            return "99991231", "00010101"  # nothing is after the last day
        return (last + timedelta(days=1)).strftime("%Y%m%d"), ""
    if prefix == "lt":
        if first == date.min:
            return "99991231", "00010101"  # nothing is before the first day
        return "", (first - timedelta(days=1)).strftime("%Y%m%d")
    low, high = first.strftime("%Y%m%d"), last.strftime("%Y%m%d")
    return {"eq": (low, high), "ge": (low, ""), "le": ("", high)}[prefix]


def _check_time(text: str) -> None:
    """Refuse the part of a ``started`` value after its day unless it is a time
    (``T10:15``, ``T10:15:30``, ``T10:15:30.5``, optionally then ``Z`` or ``+01:00``): it is
    matched by day, but a value that does not parse is refused, never read as another."""
    if not _TIME.fullmatch(text):
        raise InvalidQuery("started takes a time as T10:15:30, optionally with its zone (Z or "
                           "+01:00); times are matched by day")


def _period(text: str) -> tuple[date, date]:
    """The first and last day of ``YYYY``, ``YYYY-MM`` or ``YYYY-MM-DD``."""
    try:
        if len(text) == 4 and text.isdigit():
            return date(int(text), 1, 1), date(int(text), 12, 31)
        if len(text) == 7 and text[4] == "-" and text[:4].isdigit() and text[5:].isdigit():
            first = date(int(text[:4]), int(text[5:]), 1)
            following = date(first.year + first.month // 12, first.month % 12 + 1, 1)
            return first, following - timedelta(days=1)
        if len(text) == 10:
            day = date.fromisoformat(text)
            return day, day
    except ValueError:
        pass
    raise InvalidQuery("started must be a date like 2024, 2024-03 or 2024-03-31 (times are "
                       "matched by day), with an optional prefix eq, ge, le, gt or lt")


def _narrow(current: set[str] | None, values: set[str]) -> set[str]:
    """Repeated parameters mean AND: what both allow."""
    return values if current is None else current & values


def parse_search(params: Sequence[tuple[str, str]], hospital_system: str,
                 lenient: bool = False) -> ImagingStudySearch:
    """The search asked for by FHIR search parameters; InvalidQuery for anything not
    understood. An unknown parameter is refused rather than ignored (ignoring a misspelt
    filter would return other patients' studies) unless the client asked for ``lenient``
    handling (``Prefer: handling=lenient``); then it is left out of the self link, which
    shows the client what was applied, except one naming the patient or the study
    (:data:`NEVER_IGNORED`), which is refused all the same. A repeated parameter means AND, a
    comma list OR."""
    patient_alternatives: list[dict[str, Any]] = [{}]
    uids: set[str] | None = None
    accessions: set[str] | None = None
    modalities: list[str] = []
    low, high = "", ""
    count, offset = DEFAULT_COUNT, 0
    empty = count_only = False
    applied: list[tuple[str, str]] = []
    ignored: list[str] = []
    for name, value in params:
        value = value.strip()
        if name in IGNORED_PARAMETERS:
            continue
        if name not in SEARCH_PARAMETERS:
            if lenient and name.split(":")[0].split(".")[0] not in NEVER_IGNORED:
                ignored.append(name[:64])
                continue
            raise InvalidQuery(f"unknown search parameter {name[:64]!r}; supported: "
                               + ", ".join(SEARCH_PARAMETERS))
        if not value or len(value) > 1000:
            raise InvalidQuery(f"{name} needs a value of at most 1000 characters")
        items = [item.strip() for item in value.split(",")]
        applied.append((name, value))
        if name in PATIENT_PARAMETERS:
            if patient_alternatives != [{}]:
                raise InvalidQuery("give the patient (patient:identifier) once")
            patient_alternatives = _patient_alternatives(value, hospital_system)
        elif name == "identifier":
            found_uids, found_accessions = _identifiers(items)
            if found_uids:
                uids = _narrow(uids, found_uids)
            else:
                accessions = _narrow(accessions, found_accessions)
        elif name == "_id":
            uids = _narrow(uids, {u for u in map(study_uid_of, items) if u})
        elif name == "status":
            if any(code not in STATUS_CODES for code in items):
                raise InvalidQuery("status takes " + ", ".join(STATUS_CODES))
            empty = empty or "available" not in items  # every study here is available
        elif name == "started":
            start, end = _date_range(value)
            low, high = max(low, start), (min(high, end) if high and end else high or end)
        elif name == "modality":
            if modalities:
                raise InvalidQuery("give modality once (a comma list means any of them)")
            for item in items:
                system, code = _token(item)
                if system not in (None, "", DCM) or not code.isalnum() or len(code) > 16:
                    raise InvalidQuery(f"modality takes DICOM codes such as {DCM}|US")
                modalities.append(code.upper())
        elif name == "_sort":
            if value != "-started":
                raise InvalidQuery("_sort takes -started (newest first, the order anyway)")
        elif name == "_summary":
            if value not in SUMMARY_VALUES:
                raise InvalidQuery("_summary takes " + ", ".join(SUMMARY_VALUES))
            count_only = value == "count"
        elif name in ("_count", "_offset"):
            try:
                number = int(value)
            except ValueError as exc:
                raise InvalidQuery(f"{name} must be a whole number") from exc
            if number < 0 or number >= 2**31:
                raise InvalidQuery(f"{name} is out of range")
            if name == "_count":
                count = min(number, MAX_COUNT)
            else:
                offset = number
    ident: dict[str, Any] = {}
    if uids is not None:
        empty = empty or not uids
        ident["0020000D"] = {"vr": "UI", "Value": ["\\".join(sorted(uids))]}
    if accessions is not None:
        empty = empty or not accessions
        ident["00080050"] = {"vr": "SH", "Value": ["\\".join(sorted(accessions))]}
    if modalities:
        ident["00080061"] = {"vr": "CS", "Value": ["\\".join(modalities)]}
    if low or high:
        empty = empty or bool(low and high and low > high)
        ident["00080020"] = {"vr": "DA", "Value": [f"{low}-{high}" if low != high else low]}
    alternatives = tuple({**ident, **patient} for patient in patient_alternatives)
    nhs = hospital = ""
    if len(patient_alternatives) > 1:  # an NHS number: as the Patient ID or as another ID
        nhs = text_of(patient_alternatives[0]["00100020"])
    elif patient_alternatives[0]:
        hospital = text_of(patient_alternatives[0]["00100020"])
    return ImagingStudySearch(alternatives, 0 if count_only else count, offset, tuple(applied),
                              empty, count_only or count == 0, tuple(ignored), nhs, hospital)


def _identifiers(items: list[str]) -> tuple[set[str], set[str]]:
    """An ``identifier`` comma list as (Study Instance UIDs, accession numbers): one kind."""
    uids, accessions = set(), set()
    for item in items:
        system, code = _token(item)
        if system in (None, "", DICOM_UID_SYSTEM) and code.startswith("urn:oid:"):
            uid = code.removeprefix("urn:oid:")
            if not uid or len(uid) > 64 or not set(uid) <= set(_UID_ALPHABET):
                raise InvalidQuery("a Study Instance UID is urn:oid: and digits and dots")
            uids.add(uid)
        elif system in (None, ""):
            accessions.add(_exact("identifier", code))
        else:
            raise InvalidQuery("identifier takes an accession number (|NUMBER) or the "
                               "Study Instance UID (urn:dicom:uid|urn:oid:UID)")
    if uids and accessions:
        raise InvalidQuery("give Study Instance UIDs and accession numbers in separate "
                           "identifier parameters")
    return uids, accessions


def _patient_alternatives(value: str, hospital_system: str) -> list[dict[str, Any]]:
    if "," in value:
        raise InvalidQuery("give one patient identifier")
    system, code = _token(value)
    code = code.replace(" ", "")
    if not code:
        raise InvalidQuery("the patient identifier needs a value")
    if system == NHS_SYSTEM:
        if not is_valid_nhs_number(code):
            raise InvalidQuery("that is not a valid NHS number (ten digits, right check digit)")
        return [{"00100020": {"vr": "LO", "Value": [code]}},
                # the issuer asked back too: whose number it is decides
                {"00101002": {"vr": "SQ", "Value": [{"00100020": {"vr": "LO",
                                                                  "Value": [code]},
                                                     "00100021": {"vr": "LO"}}]}}]
    if system in (None, "", hospital_system):
        return [{"00100020": {"vr": "LO", "Value": [_exact("the patient identifier", code)]}}]
    raise InvalidQuery(f"patient identifier systems known here: {NHS_SYSTEM} and "
                       f"{hospital_system} (hospital number)")


# Attributes the resources are built from (returned by every query).
_STUDY_KEYS = {tag: {"vr": vr} for tag, vr in (
    ("00100010", "PN"), ("00100020", "LO"), ("00100021", "LO"), ("00101002", "SQ"),
    ("00080020", "DA"), ("00080030", "TM"), ("00080201", "SH"), ("00081030", "LO"),
    ("00080061", "CS"), ("00080050", "SH"), ("00201206", "IS"), ("00201208", "IS"),
    ("0020000D", "UI"))}
_PATIENT_KEYS = {tag: {"vr": vr} for tag, vr in (
    ("00100020", "LO"), ("00100021", "LO"), ("00101002", "SQ"), ("00080020", "DA"),
    ("00080030", "TM"))}
# The most patient records a hospital number is checked against (patients of one number).
MAX_ISSUERS = 50
# A study read by its id lists its instances when it has at most this many (a search never
# does: a page of studies would be too large).
MAX_LISTED_INSTANCES = 5000
_INSTANCE_KEYS = {tag: {"vr": vr} for tag, vr in (
    ("0020000E", "UI"), ("00080018", "UI"), ("00080016", "UI"), ("00200013", "IS"))}
_SERIES_KEYS = {tag: {"vr": vr} for tag, vr in (
    ("0020000E", "UI"), ("00080060", "CS"), ("00200011", "IS"), ("0008103E", "LO"),
    ("00180015", "CS"), ("00201209", "IS"), ("0020000D", "UI"))}


@dataclass(frozen=True)
class SearchResult:
    """One page of an ImagingStudy search."""

    resources: list[dict[str, Any]]
    more: bool  # another page follows
    total: int | None  # the number of matches, when known


class ImagingStudies:
    """Searches and reads ImagingStudy resources through the audited query engine."""

    def __init__(self, query: QueryService, hospital_system: str) -> None:
        self._query = query
        self.hospital_system = hospital_system

    def _find(self, query: Query, actor: Actor, wanted: int) -> list[Match]:
        """Up to ``wanted`` matches of ``query`` from its offset on, asked of the query engine
        a page at a time (it caps each answer at its maximum: a FHIR page or a patient's
        studies must not stop silently there)."""
        step = max(1, self._query.max_results)
        found: list[Match] = []
        while len(found) < wanted:
            take = min(step, wanted - len(found))
            page = self._query.find(replace(query, limit=take, offset=query.offset
                                            + len(found)), actor)
            found += page
            if len(page) < take:
                break
        return found

    def search(self, search: ImagingStudySearch, actor: Actor,
               allowed: Collection[str] | None, endpoints: Endpoints
               ) -> SearchResult:
        """One page of matching resources (newest first), whether another page follows and
        the number of matches when it is known (always for a patient's studies and for
        ``count_only``; else on the last page)."""
        if search.empty:
            return SearchResult([], False, 0)
        if search.hospital_number:
            self._check_one_issuer(search.hospital_number, actor, allowed)
        if len(search.alternatives) == 1 and not search.count_only:
            # One query: the index pages it (newest first), one match more than the page.
            query = Query("STUDY", {**_STUDY_KEYS, **search.alternatives[0]},
                          offset=search.offset, allowed_studies=allowed, newest_first=True)
            matches = self._find(query, actor, search.count + 1)
            page, more = matches[:search.count], len(matches) > search.count
            total = None if more or (not page and search.offset) else search.offset + len(page)
            return SearchResult(self._resources(page, actor, allowed, endpoints), more, total)
        # Several alternatives (an NHS number held as the patient ID or as another ID), or a
        # count: every match (only the keys that identify, date and order it), merged without
        # duplicates, at most MAX_MATCHES; the page's studies are then read whole.
        found: dict[str, Match] = {}
        for ident in search.alternatives:
            query = Query("STUDY", {**_PATIENT_KEYS, **ident}, allowed_studies=allowed,
                          newest_first=True)
            for match in self._find(query, actor, MAX_MATCHES + 1):
                if not search.nhs_number or holds_nhs_number(match.attributes,
                                                              search.nhs_number):
                    found.setdefault(match.study_uid, match)
        if len(found) > MAX_MATCHES:
            raise InvalidQuery(f"the search matches more than {MAX_MATCHES} studies: narrow "
                               "it (patient, started, modality)")
        ordered = sorted(found.values(), key=lambda m: (
            text_of(m.attributes.get("00080020")), text_of(m.attributes.get("00080030")),
            m.study_uid), reverse=True)
        wanted = [m.study_uid for m in ordered[search.offset:search.offset + search.count]]
        more = len(ordered) > search.offset + search.count
        whole: list[Match] = []
        if wanted:
            query = Query("STUDY", {**_STUDY_KEYS, "0020000D": {
                "vr": "UI", "Value": ["\\".join(wanted)]}}, allowed_studies=allowed)
            read = {m.study_uid: m for m in self._find(query, actor, len(wanted))}
            whole = [read[uid] for uid in wanted if uid in read]
        return SearchResult(self._resources(whole, actor, allowed, endpoints), more,
                            len(ordered))

    def _check_one_issuer(self, hospital_number: str, actor: Actor,
                          allowed: Collection[str] | None) -> None:
        """Refuse a search by hospital number when the number belongs here to patients of
        more than one issuer (ours and another hospital's, from a study brought from there):
        their studies answered together would be one patient's to the EHR."""
        query = Query("PATIENT", {"00100020": {"vr": "LO", "Value": [hospital_number]},
                                  "00100021": {"vr": "LO"}},
                      allowed_studies=allowed, limit=MAX_ISSUERS)
        issuers = {text_of(m.attributes.get("00100021")) for m in self._query.find(query, actor)}
        if len(issuers) > 1:
            raise InvalidQuery("this hospital number belongs to patients of more than one "
                               "issuer here (studies brought from other sites): search by NHS "
                               "number, or open the study by its identifier")

    def read(self, resource: str, actor: Actor, allowed: Collection[str] | None,
             endpoints: Endpoints) -> dict[str, Any]:
        """One ImagingStudy by id; NotFound when there is none the caller may see."""
        return self.read_study(resource, actor, allowed, endpoints)[0]

    def read_study(self, resource: str, actor: Actor, allowed: Collection[str] | None,
                   endpoints: Endpoints) -> tuple[dict[str, Any], str]:
        """One ImagingStudy by id and the DICOM Patient ID of its study (for the audit
        trail); NotFound when there is none the caller may see."""
        uid = study_uid_of(resource)
        if uid is None:
            raise NotFound("no such ImagingStudy")
        query = Query("STUDY", {**_STUDY_KEYS, "0020000D": {"vr": "UI", "Value": [uid]}},
                      limit=1, allowed_studies=allowed)
        matches = self._query.find(query, actor)
        if not matches:
            raise NotFound("no such ImagingStudy")
        study = self._resources(matches, actor, allowed, endpoints)[0]
        if 0 < study.get("numberOfInstances", 0) <= MAX_LISTED_INSTANCES:
            self._list_instances(study, uid, actor, allowed)
        return study, matches[0].patient_id

    def _list_instances(self, study: dict[str, Any], uid: str, actor: Actor,
                        allowed: Collection[str] | None) -> None:
        """Each series' instances (SOP Instance UID, SOP Class, number), in number order."""
        query = Query("IMAGE", {"0020000D": {"vr": "UI", "Value": [uid]}, **_INSTANCE_KEYS},
                      allowed_studies=allowed)
        by_series: dict[str, list[dict[str, Any]]] = {}
        for match in self._find(query, actor, MAX_LISTED_INSTANCES + 1):
            attrs = match.attributes
            sop_uid, sop_class = text_of(attrs.get("00080018")), text_of(attrs.get("00080016"))
            if not sop_uid or not sop_class:
                continue
            instance: dict[str, Any] = {"uid": sop_uid, "sopClass": {
                "system": "urn:ietf:rfc:3986", "code": f"urn:oid:{sop_class}"}}
            number = text_of(attrs.get("00200013")).strip()
            if number.isdigit():  # an unsignedInt
                instance["number"] = int(number)
            by_series.setdefault(text_of(attrs.get("0020000E")), []).append(instance)
        for series in study.get("series", []):
            listed = by_series.get(series["uid"], [])
            if listed:
                series["instance"] = sorted(listed, key=lambda i: (i.get("number", 0), i["uid"]))

    def _resources(self, matches: list[Match], actor: Actor,
                   allowed: Collection[str] | None, endpoints: Endpoints) -> list[dict[str, Any]]:
        if not matches:
            return []
        query = Query("SERIES", {**_SERIES_KEYS, "0020000D": {
            "vr": "UI", "Value": ["\\".join(m.study_uid for m in matches)]}},
            allowed_studies=allowed)
        by_study: dict[str, list[dict[str, Any]]] = {}
        for match in self._find(query, actor, 2**31 - 1):
            by_study.setdefault(match.study_uid, []).append(match.attributes)
        return [self.resource(m.attributes, by_study.get(m.study_uid, []), endpoints)
                for m in matches]

    def resource(self, attrs: dict[str, Any], series_attrs: list[dict[str, Any]],
                 endpoints: Endpoints) -> dict[str, Any]:
        """The ImagingStudy of a study's DICOM JSON attributes and its series'."""
        uid = text_of(attrs.get("0020000D"))
        study: dict[str, Any] = {
            "resourceType": "ImagingStudy", "id": resource_id(uid),
            "contained": _endpoint_resources(uid, endpoints),
            "identifier": [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}],
            "status": "available",
            "subject": self._subject(attrs),
            "endpoint": [{"reference": "#dicomweb"}, {"reference": "#viewer"}],
        }
        accession = text_of(attrs.get("00080050"))
        if accession:
            study["identifier"].append({
                "type": {"coding": [{"system": V2_0203, "code": "ACSN"}]},
                "value": accession})
        modalities = [m for m in (attrs.get("00080061") or {}).get("Value") or [] if m]
        if modalities:
            study["modality"] = [{"system": DCM, "code": m} for m in modalities]
        started = _started(attrs)
        if started:
            study["started"] = started
        study["numberOfSeries"] = len(series_attrs)
        study["numberOfInstances"] = sum(_int(s.get("00201209")) for s in series_attrs)
        description = text_of(attrs.get("00081030"))
        if description:
            study["description"] = description
        series = [self._series(s) for s in sorted(
            series_attrs, key=lambda s: (_int(s.get("00200011")), text_of(s.get("0020000E"))))]
        if series:
            study["series"] = series
        return study

    def _subject(self, attrs: dict[str, Any]) -> dict[str, Any]:
        nhs = nhs_number_of(attrs)
        patient_id = text_of(attrs.get("00100020"))
        identifier: dict[str, Any]
        if nhs:
            identifier = {"system": NHS_SYSTEM, "value": nhs}
        else:
            identifier = {"system": self.hospital_system, "value": patient_id}
            issuer = text_of(attrs.get("00100021")).strip()
            if issuer.upper() == NHS_ISSUER:
                identifier["system"] = NHS_SYSTEM
            elif issuer:  # a number some issuer gave (another hospital's, for one): say so
                identifier["assigner"] = {"display": issuer}
        subject: dict[str, Any] = {"type": "Patient"}
        if identifier["value"].strip():  # an empty string is not a FHIR value
            subject["identifier"] = identifier
        # The first component group (alphabetic) only: "Yamada^Tarou=..." shows "Tarou Yamada".
        name = text_of(attrs.get("00100010")).split("=")[0]
        display = " ".join(p.strip() for p in name.split("^")[1:2] + name.split("^")[:1]
                           if p.strip())
        if display:
            subject["display"] = display
        elif "identifier" not in subject:  # a reference needs something
            subject["display"] = "unknown patient"
        return subject

    def _series(self, attrs: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"uid": text_of(attrs.get("0020000E"))}
        number = text_of(attrs.get("00200011"))
        if number.strip().isdigit():  # an unsignedInt: a negative DICOM number is left out
            out["number"] = int(number)
        out["modality"] = {"system": DCM, "code": text_of(attrs.get("00080060")) or "OT"}
        description = text_of(attrs.get("0008103E"))
        if description:
            out["description"] = description
        out["numberOfInstances"] = _int(attrs.get("00201209"))
        body_part = text_of(attrs.get("00180015"))
        if body_part:
            out["bodySite"] = {"display": body_part}
        return out


def _endpoint_resources(uid: str, endpoints: Endpoints) -> list[dict[str, Any]]:
    viewer = f"{endpoints.viewer}?{urlencode({'requestType': 'STUDY', 'studyUID': uid})}"
    return [
        {"resourceType": "Endpoint", "id": "dicomweb", "status": "active",
         "connectionType": {"system": CONNECTION_TYPE, "code": "dicom-wado-rs"},
         "name": "ImageShare DICOMweb (WADO-RS, QIDO-RS)",
         "payloadType": [{"text": "DICOM"}], "payloadMimeType": ["application/dicom"],
         "address": endpoints.dicomweb},
        {"resourceType": "Endpoint", "id": "viewer", "status": "active",
         "connectionType": {"system": CONNECTION_TYPE, "code": "ihe-iid"},
         "name": "ImageShare viewer (IHE Invoke Image Display)",
         "payloadType": [{"text": "web page"}], "payloadMimeType": ["text/html"],
         "address": viewer},
    ]


def _int(element: dict[str, Any] | None) -> int:
    text = text_of(element).strip()
    return int(text) if text.isdigit() else 0


def _started(attrs: dict[str, Any]) -> str:
    """Study date (and time, when the time zone is recorded) as a FHIR dateTime."""
    day = text_of(attrs.get("00080020"))
    if len(day) != 8 or not day.isdigit():
        return ""
    text = f"{day[:4]}-{day[4:6]}-{day[6:]}"
    clock = text_of(attrs.get("00080030")).split(".")[0]
    offset = text_of(attrs.get("00080201"))
    if len(clock) >= 4 and clock[:6].isdigit() and len(offset) == 5 and offset[0] in "+-" \
            and offset[1:].isdigit():
        seconds = clock[4:6] if len(clock) >= 6 else "00"
        text += f"T{clock[:2]}:{clock[2:4]}:{seconds}{offset[:3]}:{offset[3:]}"
    return text


def bundle(resources: list[dict[str, Any]], search: ImagingStudySearch, base: str,
           has_next: bool, total: int | None = None) -> dict[str, Any]:
    """A searchset Bundle of ``resources`` with self, next and previous links (``base``: the
    search's public address) and ``total`` when it is known. A count-only search
    (``_summary=count``, ``_count=0``) has no entries and no paging links."""
    links = [{"relation": "self", "url": search.link(base, search.offset)}]
    if search.count_only:
        return {"resourceType": "Bundle", "type": "searchset", "total": total or 0,
                "link": links}
    if has_next:
        links.append({"relation": "next", "url": search.link(base, search.offset
                                                             + search.count)})
    if search.offset:
        links.append({"relation": "previous",
                      "url": search.link(base, max(0, search.offset - search.count))})
    answer: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if total is not None:
        answer["total"] = total
    answer["link"] = links
    answer["entry"] = [{"fullUrl": f"{base}/{r['id']}", "resource": r,
                        "search": {"mode": "match"}} for r in resources]
    if search.ignored:
        answer["entry"].append({"resource": {
            "resourceType": "OperationOutcome", "issue": [{
                "severity": "warning", "code": "not-supported",
                "diagnostics": "ignored search parameters: " + ", ".join(search.ignored)}]},
            "search": {"mode": "outcome"}})
    if not answer["entry"]:
        del answer["entry"]
    return answer


def operation_outcome(status: int, message: str) -> dict[str, Any]:
    """An OperationOutcome for an HTTP error ``status`` with a message fit for the caller."""
    code = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found",
            405: "not-supported", 406: "not-supported", 413: "too-costly", 415: "not-supported",
            422: "invalid", 429: "throttled", 503: "transient"}.get(status, "exception")
    return {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": code, "diagnostics": message}]}


def capability_statement(base: str, version: str) -> dict[str, Any]:
    """The server's CapabilityStatement: ImagingStudy read and search, JSON, bearer tokens."""
    return {
        "resourceType": "CapabilityStatement", "status": "active", "date": "2026-11-30",
        "kind": "instance", "fhirVersion": "4.0.1",
        "format": ["json", FHIR_JSON],
        "software": {"name": "ImageShare", "version": version},
        "implementation": {"description": "ImageShare FHIR R4 API", "url": base},
        "rest": [{
            "mode": "server",
            "security": {"description": "HTTP bearer API tokens (Authorization: Bearer ...) or "
                                        "HTTP Basic, with the same roles as DICOMweb",
                         "service": [{"text": "ImageShare API token"}]},
            "resource": [{
                "type": "ImagingStudy",
                "interaction": [{"code": "read"}, {"code": "search-type"}],
                "searchParam": [
                    {"name": "patient", "type": "reference",
                     "documentation": "with the :identifier modifier (or the .identifier "
                                      f"chain): {NHS_SYSTEM}|NHS number, or the hospital "
                                      "number system|number; matched exactly; a hospital "
                                      "number that patients of several issuers hold here "
                                      "is refused; never ignored"},
                    {"name": "subject", "type": "reference",
                     "documentation": "as patient (subject:identifier, subject.identifier)"},
                    {"name": "patient.identifier", "type": "token",
                     "documentation": "as patient:identifier"},
                    {"name": "identifier", "type": "token",
                     "documentation": "accession number (|NUMBER), or "
                                      "urn:dicom:uid|urn:oid:STUDY_UID; a comma list means "
                                      "any of them; matched exactly"},
                    {"name": "started", "type": "date",
                     "documentation": "a year, month or day (times are matched by day), "
                                      "prefixes eq, ge, le, gt, lt"},
                    {"name": "modality", "type": "token",
                     "documentation": f"DICOM modality code ({DCM}|CT); a comma list means "
                                      "any of them; give it once"},
                    {"name": "status", "type": "token",
                     "documentation": "every study here is available"},
                    {"name": "_id", "type": "token"},
                    {"name": "_count", "type": "number",
                     "documentation": f"page size, at most {MAX_COUNT}; 0 answers the total "
                                      "only"},
                    {"name": "_sort", "type": "token",
                     "documentation": "-started (newest first), the order anyway"},
                    {"name": "_summary", "type": "token",
                     "documentation": "count answers the total only; other values return "
                                      "whole resources"},
                ],
            }],
        }],
    }
