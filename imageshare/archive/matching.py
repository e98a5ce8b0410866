"""DICOM attribute matching (PS3.4 C.2.2.2): single value, wildcard, list of UID, range,
universal and sequence matching, as SQL conditions or as checks on stored DICOM JSON."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, true

from imageshare.domain.errors import InvalidQuery
from imageshare.domain.identifiers import normalise_name

_RANGE_VRS = {"DA", "TM", "DT"}


def has_wildcard(value: str) -> bool:
    """True when the match value uses ``*`` or ``?``."""
    return "*" in value or "?" in value


def like_pattern(value: str) -> str:
    """A SQL LIKE pattern (escape character ``\\``) for a DICOM wildcard value."""
    out = []
    for char in value:
        if char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        elif char in "%_\\":
            out.append("\\" + char)
        else:
            out.append(char)
    return "".join(out)


def text_condition(column: Any, value: str) -> ColumnElement[bool]:
    """Single-value or wildcard matching of ``column`` against ``value`` (case as given)."""
    if value in ("*", ""):
        return true()
    if has_wildcard(value):
        return column.like(like_pattern(value), escape="\\")
    return column == value


def name_condition(column: Any, value: str, fuzzy: bool = False) -> ColumnElement[bool]:
    """Case- and accent-insensitive matching of a normalised name column."""
    folded = normalise_name(value)
    if fuzzy and not has_wildcard(folded):
        words = [w for w in re.split(r"[\s^=]+", folded) if w]
        return and_(*(column.like("%" + like_pattern(w) + "%", escape="\\") for w in words))
    return text_condition(column, folded)


def uid_list_condition(column: Any, value: str) -> ColumnElement[bool]:
    """List-of-UID matching: ``value`` holds UIDs separated by backslashes."""
    uids = [u.strip() for u in value.split("\\") if u.strip()]
    if not uids:
        return true()
    return column.in_(uids)


def _parse_range(value: str, vr: str) -> tuple[str | None, str | None]:
    if "-" not in value:
        return value, value
    low, _, high = value.partition("-")
    return (low.strip() or None, high.strip() or None)


def _normalise_bound(value: str, vr: str, upper: bool) -> str:
    value = value.replace(":", "") if vr == "TM" else value
    if vr == "DA":
        if not re.fullmatch(r"\d{8}", value):
            raise InvalidQuery(f"{value!r} is not a DICOM date (YYYYMMDD)")
        return value
    if vr == "TM":
        if not re.fullmatch(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?", value):
            raise InvalidQuery(f"{value!r} is not a DICOM time (HHMMSS.FFFFFF)")
        template = "235959.999999" if upper else "000000.000000"
        if "." not in value and len(value) == 6:
            value += "."
        return value + template[len(value):]
    return value


def range_condition(column: Any, value: str, vr: str) -> ColumnElement[bool]:
    """Single value or range matching of dates/times stored as DICOM strings."""
    conditions = []
    for part in value.split("\\"):
        part = part.strip()
        if not part:
            continue
        low, high = _parse_range(part, vr)
        if vr == "DA" and low is not None and low == high:
            conditions.append(column == _normalise_bound(low, vr, False))
            continue
        bounds = []
        if low is not None:
            bounds.append(column >= _normalise_bound(low, vr, False))
        if high is not None:
            bounds.append(column <= _normalise_bound(high, vr, True))
        bounds.append(column != "")
        conditions.append(and_(*bounds))
    return or_(*conditions) if conditions else true()


# -- matching against stored DICOM JSON (attributes the index has no column for) ----------


def _values(element: dict[str, Any] | None) -> list[Any]:
    if not element:
        return []
    return list(element.get("Value", []) or [])


def _as_text(value: Any) -> str:
    if isinstance(value, dict):  # PN in DICOM JSON
        return str(value.get("Alphabetic", ""))
    return str(value)


def _wildcard_regex(value: str) -> re.Pattern[str]:
    pattern = "".join(
        ".*" if c == "*" else "." if c == "?" else re.escape(c) for c in value
    )
    return re.compile(pattern + r"\Z", re.DOTALL)


def _match_one(stored: str, query: str, vr: str) -> bool:
    if vr == "PN":
        stored, query = normalise_name(stored), normalise_name(query)
    if vr in _RANGE_VRS:
        for part in query.split("\\"):
            low, high = _parse_range(part, vr)
            if not stored:
                continue
            try:
                lo = _normalise_bound(low, vr, False) if low else None
                hi = _normalise_bound(high, vr, True) if high else None
            except InvalidQuery:
                return False
            if (lo is None or stored >= lo) and (hi is None or stored <= hi):
                return True
        return False
    if vr == "UI":
        return stored in [q for q in query.split("\\") if q]
    if has_wildcard(query):
        return bool(_wildcard_regex(query).match(stored))
    return stored == query


def json_matches(stored: dict[str, Any] | None, query: dict[str, Any]) -> bool:
    """Does the stored DICOM JSON element match the query element (PS3.4 C.2.2.2)?"""
    vr = query.get("vr", "")
    if vr == "SQ":
        items = query.get("Value") or []
        if not items or not items[0]:
            return True
        wanted = items[0]
        for stored_item in _values(stored):
            if all(json_matches(stored_item.get(tag), q) for tag, q in wanted.items()):
                return True
        return False
    query_values = [_as_text(v) for v in _values(query)]
    if not query_values or all(q == "" for q in query_values):
        return True
    query_text = "\\".join(query_values)
    return any(_match_one(_as_text(s), query_text, vr) for s in _values(stored))


def is_universal(element: dict[str, Any]) -> bool:
    """True when the query element asks only for the value (no matching)."""
    if element.get("vr") == "SQ":
        items = element.get("Value") or []
        return not items or all(is_universal(v) for v in items[0].values())
    values = element.get("Value") or []
    return all(_as_text(v) in ("", "*") for v in values)
