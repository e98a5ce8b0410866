"""Study search for people: one search box plus filters, turned into archive queries.

The box matches a valid NHS number, a hospital number, an accession number or part of a
patient's name; filters narrow further. Results are newest first, a page at a time.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any

from imageshare.archive.dicom_json import NHS_ISSUER, nhs_number_of, text_of
from imageshare.archive.query import Query, QueryService
from imageshare.domain.actors import Actor
from imageshare.domain.errors import InvalidQuery
from imageshare.domain.identifiers import is_valid_nhs_number

PAGE_SIZE = 25
_DATE = re.compile(r"^\d{4}-?\d{2}-?\d{2}$")
_MODALITY = re.compile(r"^[A-Z]{1,16}$")


@dataclass(frozen=True)
class StudySearch:
    """What a person asked for; every field is optional. Dates are YYYY-MM-DD or YYYYMMDD."""

    text: str = ""
    nhs_number: str = ""
    hospital_number: str = ""
    name: str = ""
    birth_date: str = ""
    date_from: str = ""
    date_to: str = ""
    modality: str = ""
    accession: str = ""
    page: int = 1

    @property
    def is_empty(self) -> bool:
        """True when nothing was asked (the home page then lists recent studies)."""
        return not any((self.text, self.nhs_number, self.hospital_number, self.name,
                        self.birth_date, self.date_from, self.date_to, self.modality,
                        self.accession))


@dataclass(frozen=True)
class StudySummary:
    """One line of a result list."""

    study_uid: str
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    nhs_number: str
    study_date: str
    description: str
    modalities: str
    accession: str
    series_count: int
    instance_count: int
    issuer: str = ""  # Issuer of Patient ID: whose hospital number patient_id is


@dataclass(frozen=True)
class SearchPage:
    """A page of results and whether more follow."""

    studies: list[StudySummary]
    page: int
    has_next: bool


NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
# Issuers of Patient ID that mean the NHS (the index's, the OID, the FHIR system).
NHS_ISSUERS = frozenset({NHS_ISSUER, "2.16.840.1.113883.2.1.4.1", NHS_SYSTEM.upper()})


def holds_nhs_number(attrs: dict[str, Any], nhs: str) -> bool:
    """True when the study's patient has ``nhs`` as an NHS number: as the Patient ID or an
    Other Patient ID issued by the NHS or by nobody. The same ten digits issued by another
    authority (a hospital number that happens to pass the check digit) are someone else."""
    ids = [(text_of(attrs.get("00100020")), text_of(attrs.get("00100021")))]
    ids += [(text_of(item.get("00100020")), text_of(item.get("00100021")))
            for item in (attrs.get("00101002") or {}).get("Value") or []]
    return any(value.strip() == nhs and (not issuer.strip()
                                         or issuer.strip().upper() in NHS_ISSUERS)
               for value, issuer in ids)


def normalise_nhs_number(value: str) -> str:
    """The ten digits of an NHS number; raises InvalidQuery when its check digit is wrong."""
    digits = re.sub(r"[\s-]", "", value)
    if not is_valid_nhs_number(digits):
        raise InvalidQuery(f"{value.strip()!r} is not a valid NHS number (ten digits with a "
                           "correct check digit)")
    return digits


def _dicom_date(value: str, label: str) -> str:
    value = value.strip()
    if not _DATE.match(value):
        raise InvalidQuery(f"{label} must be a date like 2024-03-31")
    return value.replace("-", "")


def _summary(attrs: dict[str, Any], study_uid: str) -> StudySummary:
    return StudySummary(
        study_uid=study_uid,
        patient_name=text_of(attrs.get("00100010")),
        patient_id=text_of(attrs.get("00100020")),
        birth_date=text_of(attrs.get("00100030")),
        sex=text_of(attrs.get("00100040")),
        nhs_number=nhs_number_of(attrs),
        study_date=text_of(attrs.get("00080020")),
        description=text_of(attrs.get("00081030")),
        modalities="/".join((attrs.get("00080061") or {}).get("Value") or []),
        accession=text_of(attrs.get("00080050")),
        series_count=int(text_of(attrs.get("00201206")) or 0),
        instance_count=int(text_of(attrs.get("00201208")) or 0),
        issuer=text_of(attrs.get("00100021")),
    )


class StudySearchService:
    """Runs StudySearch requests through the archive's (audited) query service."""

    def __init__(self, query: QueryService) -> None:
        self._query = query

    def _filters(self, search: StudySearch) -> dict[str, dict[str, Any]]:
        """The identifier shared by every alternative of the search box."""
        ident: dict[str, dict[str, Any]] = {}
        if search.hospital_number.strip():
            ident["00100020"] = {"vr": "LO", "Value": [search.hospital_number.strip()]}
        if search.name.strip():
            ident["00100010"] = {"vr": "PN", "Value": [{"Alphabetic": search.name.strip()}]}
        if search.birth_date.strip():
            ident["00100030"] = {"vr": "DA", "Value": [
                _dicom_date(search.birth_date, "Date of birth")]}
        if search.date_from.strip() or search.date_to.strip():
            low = _dicom_date(search.date_from, "From") if search.date_from.strip() else ""
            high = _dicom_date(search.date_to, "To") if search.date_to.strip() else ""
            if low and high and low > high:
                raise InvalidQuery("the study date range ends before it starts")
            ident["00080020"] = {"vr": "DA", "Value": [f"{low}-{high}"]}
        if search.modality.strip():
            modality = search.modality.strip().upper()
            if not _MODALITY.match(modality):
                raise InvalidQuery("modality must be a DICOM modality code such as CT or US")
            ident["00080061"] = {"vr": "CS", "Value": [modality]}
        if search.accession.strip():
            ident["00080050"] = {"vr": "SH", "Value": [search.accession.strip()]}
        return ident

    def _alternatives(self, search: StudySearch) -> list[tuple[dict[str, dict[str, Any]], str]]:
        """One identifier per way the search box (and NHS number field) may match, each with
        the NHS number its matches must hold (issued by the NHS or by nobody), if any.

        Ten digits typed in the box also find a hospital number that happens to have them
        (as the Patient ID, whoever issued it); the NHS number field finds NHS numbers only.
        """
        base = self._filters(search)
        field = normalise_nhs_number(search.nhs_number) if search.nhs_number.strip() else ""
        text = search.text.strip()
        typed = ""
        if not text:
            options = [base]
        elif re.fullmatch(r"[\d\s-]{10,13}", text) and len(re.sub(r"\D", "", text)) == 10:
            typed = normalise_nhs_number(text)
            options = [base]
        else:
            options = [
                {**base, "00100010": {"vr": "PN", "Value": [{"Alphabetic": text}]}},
                {**base, "00100020": {"vr": "LO", "Value": [text]}},
                {**base, "00080050": {"vr": "SH", "Value": [text]}},
            ]
        if field and typed and field != typed:
            raise InvalidQuery("two different NHS numbers were given")
        nhs = field or typed
        if not nhs:
            return [(option, "") for option in options]
        return [
            alt
            for option in options
            for alt in (
                ({**option, "00100020": {"vr": "LO", "Value": [nhs]}}, field),
                # the issuer asked back too: whose number it is decides (holds_nhs_number)
                ({**option, "00101002": {"vr": "SQ", "Value": [
                    {"00100020": {"vr": "LO", "Value": [nhs]},
                     "00100021": {"vr": "LO"}}]}}, nhs),
            )
        ]

    def search(
        self, search: StudySearch, actor: Actor, allowed_studies: Collection[str] | None
    ) -> SearchPage:
        """A page of studies matching ``search`` that ``actor`` may see, newest first.

        Names match in part, ignoring case and accents. Raises InvalidQuery for a bad NHS
        number, date or modality.
        """
        page = max(1, search.page)
        wanted = PAGE_SIZE * page + 1
        found: dict[str, tuple[tuple[str, int], StudySummary]] = {}
        returned = {tag: {"vr": vr} for tag, vr in (
            ("00100010", "PN"), ("00100020", "LO"), ("00100021", "LO"), ("00100030", "DA"),
            ("00100040", "CS"), ("00101002", "SQ"), ("00080020", "DA"), ("00080030", "TM"),
            ("00081030", "LO"), ("00080061", "CS"), ("00080050", "SH"), ("00201206", "IS"),
            ("00201208", "IS"))}
        for order, (ident, nhs) in enumerate(self._alternatives(search)):
            query = Query("STUDY", {**returned, **ident}, limit=wanted, fuzzy=True,
                          allowed_studies=allowed_studies, newest_first=True)
            for rank, match in enumerate(self._query.find(query, actor)):
                if nhs and not holds_nhs_number(match.attributes, nhs):
                    continue
                if match.study_uid not in found:
                    summary = _summary(match.attributes, match.study_uid)
                    key = (summary.study_date, -(order * 100000 + rank))
                    found[match.study_uid] = (key, summary)
        ordered = [s for _, s in sorted(found.values(), key=lambda item: item[0], reverse=True)]
        start = PAGE_SIZE * (page - 1)
        return SearchPage(ordered[start:start + PAGE_SIZE], page, len(ordered) > start + PAGE_SIZE)

    def recent(self, actor: Actor, allowed_studies: Collection[str] | None) -> SearchPage:
        """The most recent studies (by study date) ``actor`` may see."""
        return self.search(replace(StudySearch(), page=1), actor, allowed_studies)
