"""FHIR R4 ImagingStudy from the index: search parameters, resource ids, resources and Bundles.

Searches run through the archive's one query engine (:class:`QueryService`), so they are
audited like QIDO-RS (``study.query``) and limited to what the caller may see inside the SQL;
studies waiting in the inbox or held for reconciliation are not part of the record and never
appear (:mod:`imageshare.archive.record`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any
from urllib.parse import urlencode

from imageshare.archive.dicom_json import NHS_ISSUER, nhs_number_of, text_of
from imageshare.archive.query import Match, Query, QueryService
from imageshare.domain.actors import Actor
from imageshare.domain.errors import InvalidQuery, NotFound
from imageshare.domain.identifiers import is_valid_nhs_number

NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
DICOM_UID_SYSTEM = "urn:dicom:uid"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
CONNECTION_TYPE = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
FHIR_JSON = "application/fhir+json"
DEFAULT_COUNT, MAX_COUNT = 20, 100
SEARCH_PARAMETERS = ("patient.identifier", "identifier", "started", "modality", "_id",
                     "_count", "_offset")
# Parameters a client may send that change nothing here.
IGNORED_PARAMETERS = ("_format", "_pretty", "_summary", "_total")

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
    return uid if len(uid) <= 64 else None


@dataclass(frozen=True)
class Endpoints:
    """Where a study can be fetched (DICOMweb) and viewed (the IID launch), public URLs."""

    dicomweb: str
    viewer: str  # the /iid address; the study's UID is added


@dataclass(frozen=True)
class ImagingStudySearch:
    """An ImagingStudy search, as DICOM identifier alternatives (any may match) + paging."""

    alternatives: tuple[dict[str, Any], ...]
    count: int = DEFAULT_COUNT
    offset: int = 0
    params: tuple[tuple[str, str], ...] = field(default=())

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


def _date_condition(value: str) -> tuple[str, str]:
    """A ``started`` value with its FHIR prefix as an inclusive (low, high) DICOM date range."""
    prefix = value[:2] if value[:2] in ("eq", "ge", "le", "gt", "lt", "sa", "eb", "ne", "ap") \
        else "eq"
    text = value[2:] if value[:2] == prefix else value
    if prefix in ("sa", "eb", "ne", "ap"):
        raise InvalidQuery(f"the prefix {prefix!r} is not supported for started (use eq, ge, "
                           "le, gt or lt)")
    day_text = text[:10]
    try:
        day = date.fromisoformat(day_text) if len(day_text) == 10 else None
    except ValueError:
        day = None
    if day is None:
        raise InvalidQuery("started must be a date like 2024-03-31 (times are matched by day), "
                           "with an optional prefix eq, ge, le, gt or lt")
    if prefix == "gt":
        day, prefix = day + timedelta(days=1), "ge"
    elif prefix == "lt":
        day, prefix = day - timedelta(days=1), "le"
    dicom = day.strftime("%Y%m%d")
    return {"eq": (dicom, dicom), "ge": (dicom, ""), "le": ("", dicom)}[prefix]


def parse_search(params: Sequence[tuple[str, str]], hospital_system: str
                 ) -> ImagingStudySearch:
    """The search asked for by FHIR search parameters; InvalidQuery for anything not
    understood (an unknown parameter is refused rather than ignored: ignoring a misspelt
    filter would return other patients' studies)."""
    ident: dict[str, Any] = {}
    patient_alternatives: list[dict[str, Any]] = [{}]
    low, high = "", ""
    count, offset = DEFAULT_COUNT, 0
    for name, value in params:
        value = value.strip()
        if name in IGNORED_PARAMETERS:
            continue
        if name not in SEARCH_PARAMETERS:
            raise InvalidQuery(f"unknown search parameter {name!r}; supported: "
                               + ", ".join(SEARCH_PARAMETERS))
        if not value or len(value) > 200:
            raise InvalidQuery(f"{name} needs a value of at most 200 characters")
        if name == "patient.identifier":
            if patient_alternatives != [{}]:
                raise InvalidQuery("give patient.identifier once")
            patient_alternatives = _patient_alternatives(value, hospital_system)
        elif name == "identifier":
            system, code = _token(value)
            if system in (None, "", DICOM_UID_SYSTEM) and code.startswith("urn:oid:"):
                ident["0020000D"] = {"vr": "UI", "Value": [code.removeprefix("urn:oid:")]}
            elif system in (None, ""):
                ident["00080050"] = {"vr": "SH", "Value": [code]}
            else:
                raise InvalidQuery("identifier takes an accession number (|NUMBER) or the "
                                   "Study Instance UID (urn:dicom:uid|urn:oid:UID)")
        elif name == "_id":
            uids = [study_uid_of(v) for v in value.split(",")]
            ident["0020000D"] = {"vr": "UI", "Value": ["\\".join(u or "0" for u in uids)]}
        elif name == "started":
            start, end = _date_condition(value)
            low, high = max(low, start), (min(high, end) if high and end else high or end)
        elif name == "modality":
            codes = []
            for item in value.split(","):
                system, code = _token(item)
                if system not in (None, "", DCM) or not code.isalnum() or len(code) > 16:
                    raise InvalidQuery(f"modality takes DICOM codes such as {DCM}|US")
                codes.append(code.upper())
            ident["00080061"] = {"vr": "CS", "Value": ["\\".join(codes)]}
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
    if low or high:
        if low and high and low > high:
            raise InvalidQuery("the started range ends before it starts")
        ident["00080020"] = {"vr": "DA", "Value": [f"{low}-{high}" if low != high else low]}
    alternatives = tuple({**ident, **patient} for patient in patient_alternatives)
    return ImagingStudySearch(alternatives, count, offset, tuple(params))


def _patient_alternatives(value: str, hospital_system: str) -> list[dict[str, Any]]:
    system, code = _token(value)
    code = code.replace(" ", "")
    if not code:
        raise InvalidQuery("patient.identifier needs a value")
    if system == NHS_SYSTEM:
        if not is_valid_nhs_number(code):
            raise InvalidQuery("that is not a valid NHS number (ten digits, right check digit)")
        return [{"00100020": {"vr": "LO", "Value": [code]}},
                {"00101002": {"vr": "SQ", "Value": [{"00100020": {"vr": "LO",
                                                                  "Value": [code]}}]}}]
    if system in (None, "", hospital_system):
        return [{"00100020": {"vr": "LO", "Value": [code]}}]
    raise InvalidQuery(f"patient.identifier systems known here: {NHS_SYSTEM} and "
                       f"{hospital_system} (hospital number)")


# Attributes the resources are built from (returned by every query).
_STUDY_KEYS = {tag: {"vr": vr} for tag, vr in (
    ("00100010", "PN"), ("00100020", "LO"), ("00100021", "LO"), ("00101002", "SQ"),
    ("00080020", "DA"), ("00080030", "TM"), ("00080201", "SH"), ("00081030", "LO"),
    ("00080061", "CS"), ("00080050", "SH"), ("00201206", "IS"), ("00201208", "IS"),
    ("0020000D", "UI"))}
_SERIES_KEYS = {tag: {"vr": vr} for tag, vr in (
    ("0020000E", "UI"), ("00080060", "CS"), ("00200011", "IS"), ("0008103E", "LO"),
    ("00180015", "CS"), ("00201209", "IS"), ("0020000D", "UI"))}


class ImagingStudies:
    """Searches and reads ImagingStudy resources through the audited query engine."""

    def __init__(self, query: QueryService, hospital_system: str) -> None:
        self._query = query
        self.hospital_system = hospital_system

    def search(self, search: ImagingStudySearch, actor: Actor,
               allowed: Collection[str] | None, endpoints: Endpoints
               ) -> tuple[list[dict[str, Any]], bool]:
        """One page of matching resources (newest first) and whether another page follows."""
        wanted = search.offset + search.count + 1
        found: dict[str, Match] = {}
        for ident in search.alternatives:
            query = Query("STUDY", {**_STUDY_KEYS, **ident}, limit=wanted,
                          allowed_studies=allowed, newest_first=True)
            for match in self._query.find(query, actor):
                found.setdefault(match.study_uid, match)
        ordered = sorted(found.values(), key=lambda m: (
            text_of(m.attributes.get("00080020")), text_of(m.attributes.get("00080030")),
            m.study_uid), reverse=True)
        page = ordered[search.offset:search.offset + search.count]
        more = len(ordered) > search.offset + search.count
        return self._resources(page, actor, allowed, endpoints), more

    def read(self, resource: str, actor: Actor, allowed: Collection[str] | None,
             endpoints: Endpoints) -> dict[str, Any]:
        """One ImagingStudy by id; NotFound when there is none the caller may see."""
        uid = study_uid_of(resource)
        if uid is None:
            raise NotFound("no such ImagingStudy")
        query = Query("STUDY", {**_STUDY_KEYS, "0020000D": {"vr": "UI", "Value": [uid]}},
                      limit=1, allowed_studies=allowed)
        matches = self._query.find(query, actor)
        if not matches:
            raise NotFound("no such ImagingStudy")
        return self._resources(matches, actor, allowed, endpoints)[0]

    def _resources(self, matches: list[Match], actor: Actor,
                   allowed: Collection[str] | None, endpoints: Endpoints) -> list[dict[str, Any]]:
        if not matches:
            return []
        query = Query("SERIES", {**_SERIES_KEYS, "0020000D": {
            "vr": "UI", "Value": ["\\".join(m.study_uid for m in matches)]}},
            allowed_studies=allowed)
        by_study: dict[str, list[dict[str, Any]]] = {}
        for match in self._query.find(query, actor):
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
        if nhs:
            identifier = {"system": NHS_SYSTEM, "value": nhs}
        else:
            identifier = {"system": self.hospital_system, "value": patient_id}
            if text_of(attrs.get("00100021")).upper() == NHS_ISSUER:
                identifier["system"] = NHS_SYSTEM
        subject: dict[str, Any] = {"type": "Patient", "identifier": identifier}
        name = text_of(attrs.get("00100010"))
        if name:
            subject["display"] = " ".join(p for p in name.split("^")[1:2] + name.split("^")[:1]
                                          if p)
        return subject

    def _series(self, attrs: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"uid": text_of(attrs.get("0020000E"))}
        number = text_of(attrs.get("00200011"))
        if number.strip().lstrip("-").isdigit():
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
           has_next: bool) -> dict[str, Any]:
    """A searchset Bundle of ``resources`` with self and next links (``base``: the search's
    public address)."""
    links = [{"relation": "self", "url": search.link(base, search.offset)}]
    if has_next:
        links.append({"relation": "next", "url": search.link(base, search.offset
                                                             + search.count)})
    if search.offset:
        links.append({"relation": "previous",
                      "url": search.link(base, max(0, search.offset - search.count))})
    return {
        "resourceType": "Bundle", "type": "searchset", "link": links,
        "entry": [{"fullUrl": f"{base}/{r['id']}", "resource": r,
                   "search": {"mode": "match"}} for r in resources],
    }


def operation_outcome(status: int, message: str) -> dict[str, Any]:
    """An OperationOutcome for an HTTP error ``status`` with a message fit for the caller."""
    code = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found",
            406: "not-supported", 413: "too-costly", 422: "invalid",
            429: "throttled"}.get(status, "exception")
    return {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": code, "diagnostics": message}]}


def capability_statement(base: str, version: str) -> dict[str, Any]:
    """The server's CapabilityStatement: ImagingStudy read and search, JSON, bearer tokens."""
    return {
        "resourceType": "CapabilityStatement", "status": "active", "date": "2026-11-30",
        "kind": "instance", "fhirVersion": "4.0.1", "format": ["json"],
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
                    {"name": "patient.identifier", "type": "token",
                     "documentation": f"{NHS_SYSTEM}|NHS number, or the hospital number "
                                      "system|number"},
                    {"name": "identifier", "type": "token",
                     "documentation": "accession number (|NUMBER), or "
                                      "urn:dicom:uid|urn:oid:STUDY_UID"},
                    {"name": "started", "type": "date",
                     "documentation": "by day, prefixes eq, ge, le, gt, lt"},
                    {"name": "modality", "type": "token",
                     "documentation": f"DICOM modality code ({DCM}|CT)"},
                    {"name": "_id", "type": "token"},
                    {"name": "_count", "type": "number",
                     "documentation": f"page size, at most {MAX_COUNT}"},
                ],
            }],
        }],
    }
