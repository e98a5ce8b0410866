"""Queries over the index for QIDO-RS and C-FIND: one matching engine for both.

A query is a level and an identifier in DICOM JSON (tag -> element); elements with values are
matched, every element names a key to return. Attributes the index has columns for are
matched in SQL; others are matched on the stored level attributes (and, at instance level,
the instance header), before pagination.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Literal

from pydicom.datadict import keyword_for_tag
from pydicom.tag import Tag
from sqlalchemy import (
    Connection,
    Engine,
    Select,
    and_,
    exists,
    func,
    select,
)

from imageshare.access.scope import Scope, narrows
from imageshare.archive.header import PATIENT_KEYWORDS, SERIES_KEYWORDS, STUDY_KEYWORDS
from imageshare.archive.matching import (
    check_key,
    is_universal,
    json_matches,
    name_condition,
    pn_needs_groups,
    pn_text,
    range_condition,
    text_condition,
    uid_list_condition,
)
from imageshare.archive.record import (
    instance_in_record,
    patient_in_record,
    series_in_record,
    study_in_record,
)
from imageshare.audit.trail import AuditEvent, AuditTrail, Outcome
from imageshare.domain.actors import Actor
from imageshare.domain.errors import InvalidQuery, QueryTooBroad
from imageshare.storage.index.database import run_transaction
from imageshare.storage.index.schema import (
    instances,
    patient_identifiers,
    patients,
    series,
    studies,
)

log = logging.getLogger("imageshare.query")

Level = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]
LEVELS: tuple[Level, ...] = ("PATIENT", "STUDY", "SERIES", "IMAGE")

# Tags (as 8-hex-digit DICOM JSON keys) the index matches in SQL.
PATIENT_ID, ISSUER, PATIENT_NAME, BIRTH_DATE, SEX = (
    "00100020", "00100021", "00100010", "00100030", "00100040",
)
OTHER_IDS_SEQ = "00101002"
STUDY_UID, STUDY_DATE, STUDY_TIME, ACCESSION, STUDY_ID, STUDY_DESC, REFERRING = (
    "0020000D", "00080020", "00080030", "00080050", "00200010", "00081030", "00080090",
)
MODALITIES_IN_STUDY = "00080061"
SERIES_UID, MODALITY, SERIES_NUMBER, SERIES_DESC, BODY_PART = (
    "0020000E", "00080060", "00200011", "0008103E", "00180015",
)
SOP_UID, SOP_CLASS, INSTANCE_NUMBER, ROWS, COLUMNS, FRAMES, BITS_ALLOCATED = (
    "00080018", "00080016", "00200013", "00280010", "00280011", "00280008", "00280100",
)
AVAILABLE_TS = "00083002"
QR_LEVEL, RETRIEVE_AE, AVAILABILITY, CHARSET = "00080052", "00080054", "00080056", "00080005"
TIMEZONE = "00080201"
N_PAT_STUDIES, N_PAT_SERIES, N_PAT_INSTANCES = "00201200", "00201202", "00201204"
N_STUDY_SERIES, N_STUDY_INSTANCES, N_SERIES_INSTANCES = "00201206", "00201208", "00201209"
SOP_CLASSES_IN_STUDY = "00080062"

_LEVEL_OF_TAG: dict[str, Level] = {
    PATIENT_ID: "PATIENT", ISSUER: "PATIENT", PATIENT_NAME: "PATIENT", BIRTH_DATE: "PATIENT",
    SEX: "PATIENT", OTHER_IDS_SEQ: "PATIENT", N_PAT_STUDIES: "PATIENT",
    N_PAT_SERIES: "PATIENT", N_PAT_INSTANCES: "PATIENT",
    STUDY_UID: "STUDY", STUDY_DATE: "STUDY", STUDY_TIME: "STUDY", ACCESSION: "STUDY",
    STUDY_ID: "STUDY", STUDY_DESC: "STUDY", REFERRING: "STUDY", MODALITIES_IN_STUDY: "STUDY",
    N_STUDY_SERIES: "STUDY", N_STUDY_INSTANCES: "STUDY", SOP_CLASSES_IN_STUDY: "STUDY",
    SERIES_UID: "SERIES", MODALITY: "SERIES", SERIES_NUMBER: "SERIES", SERIES_DESC: "SERIES",
    BODY_PART: "SERIES", N_SERIES_INSTANCES: "SERIES",
    SOP_UID: "IMAGE", SOP_CLASS: "IMAGE", INSTANCE_NUMBER: "IMAGE", ROWS: "IMAGE",
    COLUMNS: "IMAGE", FRAMES: "IMAGE", AVAILABLE_TS: "IMAGE", BITS_ALLOCATED: "IMAGE",
}


def _int_condition(column: Any, value: str) -> Any:
    try:
        numbers = [int(v) for v in value.split("\\") if v.strip()]
    except ValueError as exc:
        raise InvalidQuery(f"{value!r} is not a number") from exc
    if any(not -(2**31) <= n < 2**31 for n in numbers):  # PS3.5 IS; and what SQL can hold
        raise InvalidQuery(f"{value!r} is outside the range of an integer string")
    return column.in_(numbers)


def _modalities_condition(value: str, scope: Scope | None = None) -> Any:
    condition = text_condition(series.c.modality, value, "CS")
    within = [scope.condition(studies.c.study_uid, series.c.series_uid)] if scope else []
    return exists().where(and_(series.c.study_pk == studies.c.pk, condition,
                               series_in_record(), *within))


def _sop_classes_condition(value: str, scope: Scope | None = None) -> Any:
    """Studies holding an instance of any SOP class of the UID list ``value`` (within
    ``scope``, when it narrows to series or instances): SOP Classes in Study is counted from
    the instances, so it is matched there too."""
    condition = uid_list_condition(instances.c.sop_class_uid, value)
    within = ([scope.condition(studies.c.study_uid, series.c.series_uid, instances.c.sop_uid)]
              if scope else [])
    return exists().where(and_(
        series.c.study_pk == studies.c.pk, instances.c.series_pk == series.c.pk, condition,
        series_in_record(), instance_in_record(), *within))


def _scope_condition(allowed: Collection[str], depth: int) -> Any:
    """Only what ``allowed`` reaches: studies, or (a Scope) series and instances too."""
    if isinstance(allowed, Scope):
        if depth == 0:
            return exists().where(and_(studies.c.patient_pk == patients.c.pk,
                                       allowed.condition(studies.c.study_uid)))
        return allowed.condition(studies.c.study_uid,
                                 series.c.series_uid if depth >= 2 else None,
                                 instances.c.sop_uid if depth >= 3 else None)
    uids = list(allowed)
    if depth == 0:
        return exists().where(and_(studies.c.patient_pk == patients.c.pk,
                                   studies.c.study_uid.in_(uids)))
    return studies.c.study_uid.in_(uids)


def _other_ids_condition(element: dict[str, Any]) -> Any:
    items = element.get("Value") or [{}]
    item = items[0] or {}
    conditions = [patient_identifiers.c.patient_pk == patients.c.pk]
    value = _first_text(item.get(PATIENT_ID))
    if value:
        conditions.append(text_condition(patient_identifiers.c.value, value, "LO"))
    issuer = _first_text(item.get(ISSUER))
    if issuer:
        conditions.append(text_condition(patient_identifiers.c.issuer, issuer, "LO"))
    return exists().where(and_(*conditions))


def _check(tag: str, element: dict[str, Any]) -> None:
    """Refuse a key whose value cannot be matched (an impossible date or time), naming its
    attribute: the reason reaches the C-FIND Error Comment and the QIDO-RS problem detail."""
    try:
        check_key(element)
    except InvalidQuery as exc:
        try:
            name = keyword_for_tag(int(tag, 16)) or tag
        except ValueError:
            name = tag
        raise InvalidQuery(f"{name}: {exc}") from exc


def _first_text(element: dict[str, Any] | None) -> str:
    if not element:
        return ""
    values = element.get("Value") or []
    texts = []
    for v in values:
        texts.append(pn_text(v) if isinstance(v, dict) else str(v))
    return "\\".join(texts)


# tag -> function(value text, fuzzy) -> SQL condition
_SQL: dict[str, Callable[[str, bool], Any]] = {
    PATIENT_ID: lambda v, f: text_condition(patients.c.patient_id, v, "LO"),
    ISSUER: lambda v, f: text_condition(patients.c.issuer, v, "LO"),
    PATIENT_NAME: lambda v, f: name_condition(patients.c.name_norm, v, f),
    BIRTH_DATE: lambda v, f: range_condition(patients.c.birth_date, v, "DA"),
    SEX: lambda v, f: text_condition(patients.c.sex, v, "CS"),
    STUDY_UID: lambda v, f: uid_list_condition(studies.c.study_uid, v),
    STUDY_DATE: lambda v, f: range_condition(studies.c.study_date, v, "DA"),
    STUDY_TIME: lambda v, f: range_condition(studies.c.study_time, v, "TM"),
    ACCESSION: lambda v, f: text_condition(studies.c.accession_number, v, "SH"),
    STUDY_ID: lambda v, f: text_condition(studies.c.study_id, v, "SH"),
    STUDY_DESC: lambda v, f: name_condition(studies.c.description_norm, v, f,
                                            person_name=False),
    REFERRING: lambda v, f: name_condition(studies.c.referring_norm, v, f),
    MODALITIES_IN_STUDY: lambda v, f: _modalities_condition(v),
    SOP_CLASSES_IN_STUDY: lambda v, f: _sop_classes_condition(v),
    SERIES_UID: lambda v, f: uid_list_condition(series.c.series_uid, v),
    MODALITY: lambda v, f: text_condition(series.c.modality, v, "CS"),
    SERIES_NUMBER: lambda v, f: _int_condition(series.c.series_number, v),
    SERIES_DESC: lambda v, f: text_condition(series.c.description, v, "LO"),
    BODY_PART: lambda v, f: text_condition(series.c.body_part, v, "CS"),
    SOP_UID: lambda v, f: uid_list_condition(instances.c.sop_uid, v),
    SOP_CLASS: lambda v, f: uid_list_condition(instances.c.sop_class_uid, v),
    INSTANCE_NUMBER: lambda v, f: _int_condition(instances.c.instance_number, v),
    ROWS: lambda v, f: _int_condition(instances.c.rows, v),
    COLUMNS: lambda v, f: _int_condition(instances.c.columns, v),
    FRAMES: lambda v, f: _int_condition(instances.c.number_of_frames, v),
    BITS_ALLOCATED: lambda v, f: _int_condition(instances.c.bits_allocated, v),
}
# (level, tag) of every key matched in the index (the others are matched on stored values).
INDEXED_KEYS: tuple[tuple[Level, str], ...] = tuple(
    sorted(((_LEVEL_OF_TAG[tag], tag) for tag in _SQL),
           key=lambda key: (LEVELS.index(key[0]), key[1]))
)
# Never matched: they qualify the request or name where to retrieve. Timezone Offset From UTC
# in a query gives the requester's time zone (PS3.4 C.2.2.2.5), not a value to match: matched,
# it found only studies stored with that very offset, and most have none.
_SKIP_MATCH = {QR_LEVEL, CHARSET, RETRIEVE_AE, AVAILABILITY, TIMEZONE, "00081190"}
# Attributes ingest keeps with the patient, study and series records: they are answered from
# there, so an instance-level search never opens stored files for them (QIDO-RS asks for
# TimezoneOffsetFromUTC by default, and most instances have none).
_KEPT_AT_LEVELS = frozenset(
    f"{Tag(keyword):08X}" for keyword in (*PATIENT_KEYWORDS, *STUDY_KEYWORDS, *SERIES_KEYWORDS)
)


# A search matching keys on stored instance headers reads at most this many headers per match
# one answer may hold (IMAGESHARE_QIDO_MAX_LIMIT): one that would read more is refused before
# any is read, instead of reading every instance of the archive for one C-FIND or QIDO-RS.
HEADER_READS_PER_RESULT = 10


@dataclass(frozen=True)
class Query:
    """A search at one level. ``identifier`` is DICOM JSON; ``allowed_studies`` limits scope."""

    level: Level
    identifier: dict[str, Any]
    limit: int | None = None
    offset: int = 0
    fuzzy: bool = False
    allowed_studies: Collection[str] | None = None
    return_all: bool = False
    newest_first: bool = False
    # One match more than the limit is fetched, so that the caller can tell that the answer
    # was cut (C-FIND refuses with Out of Resources after the limit instead of ending well).
    one_more: bool = False


@dataclass
class Match:
    """One result: its DICOM JSON attributes and where its bytes are (instance level)."""

    attributes: dict[str, Any]
    study_uid: str
    patient_id: str
    blob_key: str | None = None


def _element(vr: str, *values: Any) -> dict[str, Any]:
    element: dict[str, Any] = {"vr": vr}
    cleaned = [v for v in values if v not in (None, "")]
    if cleaned:
        element["Value"] = cleaned
    return element


class QueryService:
    """Answers queries against the index; every call is read-only."""

    def __init__(
        self,
        engine: Engine,
        ae_title: str,
        instance_header: Callable[[str], dict[str, Any]],
        audit: AuditTrail,
        max_results: int = 1000,
    ) -> None:
        self._engine = engine
        self._audit = audit
        self._ae_title = ae_title
        self._instance_header = instance_header
        self._max_results = max_results
        self._selects: dict[tuple[int, bool], Select[Any]] = {}

    @property
    def max_results(self) -> int:
        """The most matches one answer holds (``one_more`` fetches one past it)."""
        return self._max_results

    def _limit(self, query: Query) -> int:
        """The most matches ``query`` answers: its limit, never more than the maximum."""
        return min(query.limit or self._max_results, self._max_results)

    def find(self, query: Query, actor: Actor) -> list[Match]:
        """Every match of ``query`` (after ``offset``, at most ``limit``), in index order.

        The search is audited with its keys and the number of matches: the event is written
        in the same transaction as the reads and committed before the matches are returned
        (one connection and one commit per search). A search that fails is audited as a
        failure in a transaction of its own.
        """
        def search_and_audit(conn: Connection) -> list[Match]:
            found = self._find(query, conn)
            self._audit_query(query, actor, "success", min(len(found), self._limit(query)),
                              conn=conn)
            return found

        try:
            return run_transaction(self._engine, search_and_audit)
        except Exception as exc:
            self._audit_query(query, actor, "failure", 0, type(exc).__name__)
            raise

    def _audit_query(
        self, query: Query, actor: Actor, outcome: Outcome, count: int, error: str = "",
        conn: Connection | None = None,
    ) -> None:
        keys = {
            tag: _first_text(element)
            for tag, element in query.identifier.items()
            if not is_universal(element)
        }
        self._audit.record(
            AuditEvent(
                actor=actor, action="study.query", outcome=outcome,
                instance_count=count,
                detail={"level": query.level, "keys": keys, **({"error": error} if error else {})},
            ),
            conn,
        )

    def _find(self, query: Query, conn: Connection) -> list[Match]:
        if query.level not in LEVELS:
            raise InvalidQuery(f"unknown query level {query.level!r}")
        depth = LEVELS.index(query.level)
        if not self._answers_constants(query):
            return []
        stmt = self._select(depth, query.newest_first)
        python_filters: list[tuple[str, dict[str, Any]]] = []
        for tag, element in query.identifier.items():
            if tag in _SKIP_MATCH or is_universal(element):
                continue
            level = _LEVEL_OF_TAG.get(tag)
            if level is not None and LEVELS.index(level) > depth:
                raise InvalidQuery(
                    f"attribute {tag} is below the {query.level} query level"
                )
            _check(tag, element)
            if tag == OTHER_IDS_SEQ:
                stmt = stmt.where(_other_ids_condition(element))
            elif tag == MODALITIES_IN_STUDY and narrows(query.allowed_studies):
                stmt = stmt.where(_modalities_condition(
                    _first_text(element), query.allowed_studies))  # type: ignore[arg-type]  # a Scope here
            elif tag == SOP_CLASSES_IN_STUDY and narrows(query.allowed_studies):
                stmt = stmt.where(_sop_classes_condition(
                    _first_text(element), query.allowed_studies))  # type: ignore[arg-type]  # a Scope here
            elif tag in _SQL:
                stmt = stmt.where(_SQL[tag](_first_text(element), query.fuzzy))
                if (element.get("vr") == "PN" and not query.fuzzy
                        and pn_needs_groups(_first_text(element))):
                    # The index narrows; the component groups are matched on stored values.
                    python_filters.append((tag, element))
            else:
                python_filters.append((tag, element))
        if query.allowed_studies is not None:
            stmt = stmt.where(_scope_condition(query.allowed_studies, depth))
        limit = self._limit(query) + (1 if query.one_more else 0)
        if not python_filters:
            stmt = stmt.offset(query.offset).limit(limit)
        elif depth == 3 and _reads_headers(query):
            # Every candidate's stored header would be read to match it: count them first.
            most = self._max_results * HEADER_READS_PER_RESULT
            candidates = conn.execute(select(func.count()).select_from(
                stmt.order_by(None).limit(most + 1).subquery())).scalar_one()
            if candidates > most:
                # (Short: the C-FIND Error Comment holds 64 characters.)
                raise QueryTooBroad(
                    f"too broad: over {most} instances; narrow by patient/study/series")
        rows = conn.execute(stmt).mappings().all()
        matches = [self._build(row, depth, query) for row in rows]
        if isinstance(query.allowed_studies, Scope):
            _count_within(conn, matches, depth, query.allowed_studies)
        if python_filters:
            matches = [
                m for m in matches
                if all(json_matches(m.attributes.get(t), e) for t, e in python_filters)
            ]
            matches = matches[query.offset: query.offset + limit]
        self._add_counts(conn, matches, depth, query)
        return [self._select_keys(m, query) for m in matches]

    def _answers_constants(self, query: Query) -> bool:
        """False when the query asks for a Retrieve AE Title or an Instance Availability
        other than the ones every match of this archive carries (its own AE title, ONLINE):
        then nothing matches (an OFFLINE or NEARLINE search finds no instance here)."""
        constants = {RETRIEVE_AE: ("AE", self._ae_title), AVAILABILITY: ("CS", "ONLINE")}
        for tag, (vr, value) in constants.items():
            element = query.identifier.get(tag)
            if element is None or is_universal(element):
                continue
            if not json_matches(_element(vr, value), {**element, "vr": vr}):
                return False
        return True

    # -- SQL --------------------------------------------------------------------------------

    def _select(self, depth: int, newest_first: bool = False) -> Select[Any]:
        """The statement every search at ``depth`` starts from (built once: statements are
        immutable, each search adds its conditions to a copy)."""
        stmt = self._selects.get((depth, newest_first))
        if stmt is None:
            stmt = self._selects[(depth, newest_first)] = self._base_select(depth, newest_first)
        return stmt

    def _base_select(self, depth: int, newest_first: bool) -> Select[Any]:
        cols: list[Any] = [
            patients.c.pk.label("patient_pk"), patients.c.patient_id, patients.c.attrs.label(
                "patient_attrs"),
        ]
        if depth == 0:
            return (
                select(*cols)
                .where(patient_in_record(patients.c.pk))
                .order_by(patients.c.pk)
            )
        cols += [
            studies.c.pk.label("study_pk"), studies.c.study_uid, studies.c.modalities,
            studies.c.num_series, studies.c.num_instances.label("study_instances"),
            studies.c.attrs.label("study_attrs"),
        ]
        stmt_from: Any = studies.join(patients, patients.c.pk == studies.c.patient_pk)
        order = studies.c.pk
        if depth >= 2:
            cols += [
                series.c.pk.label("series_pk"), series.c.series_uid,
                series.c.num_instances.label("series_instances"),
                series.c.attrs.label("series_attrs"),
            ]
            stmt_from = series.join(stmt_from, studies.c.pk == series.c.study_pk)
            order = series.c.pk
        if depth >= 3:
            cols += [
                instances.c.sop_uid, instances.c.sop_class_uid, instances.c.instance_number,
                instances.c.rows, instances.c.columns, instances.c.number_of_frames,
                instances.c.bits_allocated,
                instances.c.transfer_syntax, instances.c.blob_key,
            ]
            stmt_from = instances.join(stmt_from, series.c.pk == instances.c.series_pk)
            order = instances.c.pk
        # Only what is part of the record: nothing waiting in the inbox or held.
        in_record = (study_in_record(), series_in_record(), instance_in_record())[depth - 1]
        if newest_first:
            return select(*cols).select_from(stmt_from).where(in_record).order_by(
                studies.c.study_date.desc(), studies.c.study_time.desc(), order.desc())
        return select(*cols).select_from(stmt_from).where(in_record).order_by(order)

    # -- results --------------------------------------------------------------------------

    def _build(self, row: Any, depth: int, query: Query) -> Match:
        attrs: dict[str, Any] = dict(row["patient_attrs"] or {})
        if depth >= 1:
            attrs.update(row["study_attrs"] or {})
            attrs[MODALITIES_IN_STUDY] = _element(
                "CS", *[m for m in (row["modalities"] or "").split("\\") if m]
            )
            attrs[N_STUDY_SERIES] = _element("IS", row["num_series"])
            attrs[N_STUDY_INSTANCES] = _element("IS", row["study_instances"])
        if depth >= 2:
            attrs.update(row["series_attrs"] or {})
            attrs[N_SERIES_INSTANCES] = _element("IS", row["series_instances"])
        blob_key = None
        if depth >= 3:
            if query.return_all or any(t not in attrs for t in _header_keys(query)):
                header = self._stored_header(row["blob_key"], row["sop_uid"])
                attrs.update({k: v for k, v in header.items() if k not in attrs})
            attrs[SOP_UID] = _element("UI", row["sop_uid"])
            attrs[SOP_CLASS] = _element("UI", row["sop_class_uid"])
            attrs[INSTANCE_NUMBER] = _element("IS", row["instance_number"])
            attrs[ROWS] = _element("US", row["rows"])
            attrs[COLUMNS] = _element("US", row["columns"])
            # Number of Frames as stored (PS3.4 C.4.1.1.3.2, PS3.18): the index keeps 1 for an
            # instance without one, so a 1 there is answered from the stored header when it
            # was read for another key, else with zero length; never an invented 1.
            frames = row["number_of_frames"]
            attrs.setdefault(FRAMES, _element("IS", frames if (frames or 0) > 1 else None))
            attrs[BITS_ALLOCATED] = _element("US", row["bits_allocated"])
            attrs[AVAILABLE_TS] = _element("UI", row["transfer_syntax"])
            blob_key = row["blob_key"]
        attrs[RETRIEVE_AE] = _element("AE", self._ae_title)
        attrs[AVAILABILITY] = _element("CS", "ONLINE")
        attrs[QR_LEVEL] = _element("CS", LEVELS[depth])
        attrs["_pk"] = row["patient_pk"] if depth == 0 else None
        return Match(
            attributes=attrs,
            study_uid=row["study_uid"] if depth >= 1 else "",
            patient_id=row["patient_id"],
            blob_key=blob_key,
        )

    def _stored_header(self, blob_key: str, sop_uid: str) -> dict[str, Any]:
        """The instance's header as DICOM JSON; an unreadable one answers without it."""
        try:
            return self._instance_header(blob_key)
        except Exception as exc:  # noqa: BLE001 - one unreadable file must not fail a query
            log.warning("instance %s: stored header unreadable (%s); answered without it",
                        sop_uid, type(exc).__name__)
            return {}

    def _add_counts(self, conn: Any, matches: list[Match], depth: int, query: Query) -> None:
        wanted = set(query.identifier)
        if depth == 0 and matches and not isinstance(query.allowed_studies, Scope) and (
            query.return_all or wanted & {N_PAT_STUDIES, N_PAT_SERIES, N_PAT_INSTANCES}
        ):
            pks = [m.attributes["_pk"] for m in matches]
            counts = conn.execute(
                select(
                    studies.c.patient_pk, func.count(studies.c.pk),
                    func.sum(studies.c.num_series), func.sum(studies.c.num_instances),
                )
                .where(studies.c.patient_pk.in_(pks), studies.c.num_instances > 0)
                .group_by(studies.c.patient_pk)
            ).all()
            by_pk = {r[0]: r[1:] for r in counts}
            for m in matches:
                n_studies, n_series, n_instances = by_pk.get(m.attributes["_pk"], (0, 0, 0))
                m.attributes[N_PAT_STUDIES] = _element("IS", n_studies)
                m.attributes[N_PAT_SERIES] = _element("IS", n_series)
                m.attributes[N_PAT_INSTANCES] = _element("IS", n_instances)
        if depth == 1 and matches and SOP_CLASSES_IN_STUDY in wanted:
            scope = query.allowed_studies
            within = ([scope.condition(studies.c.study_uid, series.c.series_uid,
                                       instances.c.sop_uid)]
                      if isinstance(scope, Scope) else [])
            for m in matches:
                classes = conn.execute(
                    select(instances.c.sop_class_uid.distinct())
                    .join(series, series.c.pk == instances.c.series_pk)
                    .join(studies, studies.c.pk == series.c.study_pk)
                    .where(studies.c.study_uid == m.study_uid, instance_in_record(), *within)
                ).scalars().all()
                m.attributes[SOP_CLASSES_IN_STUDY] = _element("UI", *sorted(classes))

    def _select_keys(self, match: Match, query: Query) -> Match:
        attrs = match.attributes
        attrs.pop("_pk", None)
        if query.return_all:
            keys = set(attrs)
        else:
            keys = set(query.identifier) | {QR_LEVEL, RETRIEVE_AE}
            keys.add({0: PATIENT_ID, 1: STUDY_UID, 2: SERIES_UID, 3: SOP_UID}[
                LEVELS.index(query.level)])
            if LEVELS.index(query.level) >= 1:
                keys.add(STUDY_UID)
            if LEVELS.index(query.level) >= 2:
                keys.add(SERIES_UID)
        out: dict[str, Any] = {}
        for tag in sorted(keys):
            if tag in attrs:
                out[tag] = _requested_items(attrs[tag], query.identifier.get(tag))
            elif tag in query.identifier:
                out[tag] = {"vr": query.identifier[tag].get("vr", "UN")}
        match.attributes = out
        return match


def _requested_items(stored: Any, key: dict[str, Any] | None) -> Any:
    """The stored element ``stored`` as a sequence key ``key`` asks for it (PS3.4 C.2.2.2.6):
    the items that match the key's item ("a sequence of matching Items"; every item when the
    key's item matches universally), each with the attributes of the key's item only (those
    not stored with zero length), nested sequences alike. A key with no item, or an empty
    one, asks for whole items."""
    if not key or key.get("vr") != "SQ" or not isinstance(stored, dict) \
            or stored.get("vr") != "SQ":
        return stored
    wanted = (key.get("Value") or [None])[0]
    if not wanted or not isinstance(wanted, dict):
        return stored
    items = []
    for item in stored.get("Value") or []:
        if not isinstance(item, dict) or not all(
                json_matches(item.get(tag), inner) for tag, inner in wanted.items()):
            continue  # an item that does not match is not one the key found
        items.append({
            tag: (_requested_items(item[tag], inner) if tag in item
                  else {"vr": inner.get("vr", "UN")})
            for tag, inner in sorted(wanted.items())
        })
    element = {k: v for k, v in stored.items() if k != "Value"}
    if items:
        element["Value"] = items
    return element


def _header_keys(query: Query) -> set[str]:
    """The keys of an instance-level ``query`` that only the stored headers hold."""
    return set(query.identifier) - set(_LEVEL_OF_TAG) - _SKIP_MATCH - _KEPT_AT_LEVELS


def _reads_headers(query: Query) -> bool:
    """Does an instance-level ``query`` read the stored header of every candidate?"""
    return query.return_all or bool(_header_keys(query))


def _count_within(conn: Any, matches: list[Match], depth: int, scope: Scope) -> None:
    """Recount what each match holds within ``scope`` (studies, series, instances and
    modalities outside it are not revealed by the counts either)."""
    if not matches:
        return
    key = studies.c.patient_pk if depth == 0 else studies.c.study_uid
    keys = ([m.attributes["_pk"] for m in matches] if depth == 0
            else list({m.study_uid for m in matches}))
    rows = conn.execute(
        select(key.label("key"), studies.c.study_uid, series.c.series_uid, series.c.modality,
               func.count(instances.c.pk).label("n"))
        .select_from(instances.join(series, series.c.pk == instances.c.series_pk)
                     .join(studies, studies.c.pk == series.c.study_pk))
        .where(key.in_(keys), instance_in_record(),
               scope.condition(studies.c.study_uid, series.c.series_uid, instances.c.sop_uid))
        .group_by(key, studies.c.study_uid, series.c.series_uid, series.c.modality)
    ).all()
    per_key: dict[Any, list[Any]] = {}
    for row in rows:
        per_key.setdefault(row.key, []).append(row)
    for m in matches:
        attrs = m.attributes
        if depth == 0:
            found = per_key.get(attrs["_pk"], [])
            attrs[N_PAT_STUDIES] = _element("IS", len({r.study_uid for r in found}))
            attrs[N_PAT_SERIES] = _element("IS", len(found))
            attrs[N_PAT_INSTANCES] = _element("IS", sum(r.n for r in found))
            continue
        found = per_key.get(m.study_uid, [])
        attrs[N_STUDY_SERIES] = _element("IS", len(found))
        attrs[N_STUDY_INSTANCES] = _element("IS", sum(r.n for r in found))
        attrs[MODALITIES_IN_STUDY] = _element(
            "CS", *sorted({r.modality for r in found if r.modality}))
        if depth >= 2:
            series_uid = (attrs.get(SERIES_UID, {}).get("Value") or [""])[0]
            attrs[N_SERIES_INSTANCES] = _element(
                "IS", sum(r.n for r in found if r.series_uid == series_uid))
