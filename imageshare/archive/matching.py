"""DICOM attribute matching (PS3.4 C.2.2.2): single value, wildcard, list of UID, range,
multiple value, universal and sequence matching, as SQL conditions or as checks on stored
DICOM JSON.

Every comparison here takes time linear in the stored value for a given key: wildcards are
matched by a glob matcher that never backtracks (no regular expression is ever built from
requested or stored text), and SQL wildcards go through ``GLOB`` (SQLite) or ``LIKE`` with an
escape character (PostgreSQL), both case-sensitive as PS3.4 asks.
"""

from __future__ import annotations

import calendar
import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, String, and_, func, literal, or_, true
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.types import Boolean

from imageshare.domain.errors import InvalidQuery
from imageshare.domain.identifiers import normalise_name

RANGE_VRS = frozenset({"DA", "TM", "DT"})
# Values of these VRs may contain a backslash as a character (their VM is always 1): a key of
# such a VR is never split into a list of values.
SINGLE_VALUED_TEXT = frozenset({"LT", "ST", "UT", "UR"})
MAX_WILDCARD_PATTERN = 1024


@dataclass(frozen=True)
class MatchingRule:
    """One kind of matching and where it applies (for the conformance statement)."""

    kind: str
    applies_to: str
    rule: str


MATCHING_RULES: tuple[MatchingRule, ...] = (
    MatchingRule("Universal", "every attribute",
                 "an empty key, or `*` alone, matches everything and asks for the value"),
    MatchingRule("Single value", "every VR but SQ",
                 "exact, case-sensitive; person names and descriptions ignore case and "
                 "accents (PN, Study Description)"),
    MatchingRule("Wild card", "AE, CS, LO, LT, PN, SH, ST, UC, UR, UT",
                 "`*` (any run) and `?` (one character), case-sensitive except person names; "
                 "linear time, patterns up to "
                 f"{MAX_WILDCARD_PATTERN} characters"),
    MatchingRule("Person name component groups", "PN",
                 "a key with several component groups (`=`: alphabetic, ideographic, "
                 "phonetic) matches when each non-empty group matches the stored value's group "
                 "in the same place (wild cards within a group); `=山田^太郎` matches on the "
                 "ideographic group alone, never everything; a key of one group "
                 "(`Yamada^Tarou`) matches the alphabetic group of a name stored with more; "
                 "empty trailing components are insignificant (`DOE^JANE` and "
                 "`DOE^JANE^^^` match each other)"),
    MatchingRule("List of UID", "UI", "`\\`-separated UIDs (commas in QIDO-RS): any of them"),
    MatchingRule("Multiple value", "every VR but LT, ST, UT, UR and SQ",
                 "`\\`-separated values (commas for UI and CS in QIDO-RS): an entity matches "
                 "when any value matches (PS3.4 C.2.2.2.8)"),
    MatchingRule("Range", "DA, TM, DT",
                 "`a-b`, `a-`, `-b`, inclusive; values are compared normalised, partial "
                 "values stand for their whole span (`1430` is 14:30:00 to 14:30:59.999999), "
                 "fractions to microseconds, `HH:MM:SS` accepted; DT offsets are applied"),
    MatchingRule("Single value on DA, TM, DT", "DA, TM, DT",
                 "a date matches that day; a (partial) time or date-time matches its span"),
    MatchingRule("Invalid date or time", "DA, TM, DT",
                 "refused before anything is searched: a malformed value, a reversed range, "
                 "or a date or time that does not exist (month 13, 30 February, hour 24, "
                 "minute 60), alone, in a range or in a list; C-FIND answers A900 and QIDO-RS "
                 "400, naming the attribute and the reason. Legal: `YYYYMMDD` (and the old "
                 "`YYYY.MM.DD`), `HH`, `HHMM`, `HHMMSS`, `HHMMSS.FFFFFF`, partial date-times, "
                 "second 60 (a leap second)"),
    MatchingRule("Sequence", "SQ", "the attributes of the one query item must all match "
                 "within one stored item; the answer holds the matching items only, each "
                 "with the attributes the query item names"),
    MatchingRule("Combined date-time", "DA with TM",
                 "not offered: Study Date and Study Time are matched independently"),
)


# -- text -----------------------------------------------------------------------------------


def has_wildcard(value: str) -> bool:
    """True when the match value uses ``*`` or ``?``."""
    return "*" in value or "?" in value


def split_values(value: str, vr: str = "") -> list[str]:
    """The values of a key: ``\\``-separated (except for VRs whose values may hold one)."""
    if vr in SINGLE_VALUED_TEXT:
        return [value]
    return [v for v in value.split("\\")]


def is_universal_text(value: str, vr: str = "") -> bool:
    """True when the key asks for the value only (empty, ``*``, or a list holding ``*``)."""
    values = [v for v in split_values(value, vr) if v.strip() != ""]
    return not values or any(v.strip() == "*" for v in values)


def _segment_at(text: str, segment: str, start: int) -> bool:
    """Does ``segment`` (which may hold ``?``) match ``text`` at ``start``?"""
    if start + len(segment) > len(text):
        return False
    for offset, char in enumerate(segment):
        if char != "?" and text[start + offset] != char:
            return False
    return True


def _find_segment(text: str, segment: str, start: int) -> int:
    """The first position >= ``start`` where ``segment`` matches, or -1."""
    if "?" not in segment:
        return text.find(segment, start)
    runs = segment.split("?")
    offsets, position = [], 0
    for run in runs:
        offsets.append(position)
        position += len(run) + 1
    longest = max(range(len(runs)), key=lambda i: len(runs[i]))
    anchor, anchor_offset = runs[longest], offsets[longest]
    if not anchor:  # only question marks: any place with room will do
        return start if start + len(segment) <= len(text) else -1
    # str.find scans for the longest literal run; each hit is checked once.
    position = start + anchor_offset
    while True:
        found = text.find(anchor, position)
        if found < 0:
            return -1
        if _segment_at(text, segment, found - anchor_offset):
            return found - anchor_offset
        position = found + 1


def wildcard_match(text: str, pattern: str) -> bool:
    """Does ``text`` match the DICOM wildcard ``pattern`` as a whole?

    The pattern is cut at ``*`` into segments; the first is anchored at the start, the last
    at the end, and each middle one is found at its leftmost place after the previous (which
    is optimal for glob patterns), so the work is bounded by the lengths of text and pattern
    times the number of segments: nothing is ever retried.
    """
    segments = pattern.split("*")
    if len(segments) == 1:
        return len(text) == len(pattern) and _segment_at(text, pattern, 0)
    head, *middle, tail = segments
    if len(head) + len(tail) > len(text):
        return False
    if not _segment_at(text, head, 0) or not _segment_at(text, tail, len(text) - len(tail)):
        return False
    position, end = len(head), len(text) - len(tail)
    for segment in middle:
        if not segment:
            continue
        found = _find_segment(text[:end], segment, position)
        if found < 0:
            return False
        position = found + len(segment)
    return position <= end


def check_wildcard_pattern(value: str) -> None:
    """Refuse wildcard patterns long enough to make matching costly."""
    if has_wildcard(value) and len(value) > MAX_WILDCARD_PATTERN:
        raise InvalidQuery(
            f"wildcard patterns are limited to {MAX_WILDCARD_PATTERN} characters"
        )


class _Glob(ColumnElement[bool]):
    """``column`` matches the DICOM wildcard ``pattern`` (case-sensitive on every database)."""

    type = Boolean()
    inherit_cache = True

    def __init__(self, column: Any, pattern: str) -> None:
        self.column = column
        self.pattern = pattern


@compiles(_Glob)
def _glob_like(element: _Glob, compiler: Any, **kw: Any) -> str:
    pattern = literal(like_pattern(element.pattern), String())
    return compiler.process(element.column.like(pattern, escape="\\"), **kw)


@compiles(_Glob, "sqlite")
def _glob_sqlite(element: _Glob, compiler: Any, **kw: Any) -> str:
    # SQLite's LIKE ignores ASCII case; GLOB does not.
    pattern = literal(glob_pattern(element.pattern), String())
    return compiler.process(element.column.op("GLOB", is_comparison=True)(pattern), **kw)


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


def glob_pattern(value: str) -> str:
    """A SQLite GLOB pattern for a DICOM wildcard value (``[`` escaped as ``[[]``)."""
    return "".join("[[]" if char == "[" else char for char in value)


def _one_text_condition(column: Any, value: str) -> ColumnElement[bool]:
    if value == "*":
        return true()
    if has_wildcard(value):
        check_wildcard_pattern(value)
        return _Glob(column, value)
    return column == value


def text_condition(column: Any, value: str, vr: str = "LO") -> ColumnElement[bool]:
    """Single-value, wildcard or multiple-value matching of ``column`` against ``value``."""
    if is_universal_text(value, vr):
        return true()
    values = list(dict.fromkeys(v for v in split_values(value, vr) if v != ""))
    plain = [v for v in values if not has_wildcard(v)]
    conditions = [_one_text_condition(column, v) for v in values if has_wildcard(v)]
    if len(plain) == 1:
        conditions.append(column == plain[0])
    elif plain:
        conditions.append(column.in_(plain))
    return or_(*conditions) if len(conditions) > 1 else conditions[0]


# A person name has at most five components (four ``^``) in each component group.
_PN_MOST_CARETS = 4


def _with_trailing_carets(group: str) -> list[str]:
    """``group`` (trimmed) and the same followed by the empty components a stored name may
    carry: ``DOE^JANE``, ``DOE^JANE^``, ``DOE^JANE^^`` and ``DOE^JANE^^^``."""
    return [group + "^" * n for n in range(max(1, _PN_MOST_CARETS + 1 - group.count("^")))]


def _pn_groups_condition(column: Any, folded: str) -> ColumnElement[bool]:
    """A condition every stored name whose component groups match the folded query value
    ``folded`` (which holds ``=``) meets: the query's first group at the start of the column,
    each later non-empty group after some ``=``. It may let through names whose groups match
    in other places: the query engine checks those group by group on the stored value.
    Empty trailing components do not count, in the query or in the stored name."""
    conditions: list[ColumnElement[bool]] = []
    for index, group in enumerate(g.strip().rstrip("^ ") for g in folded.split("=")):
        if group == "":
            continue
        check_wildcard_pattern(group)
        if index == 0:
            conditions.append(or_(*(
                condition for spelled in _with_trailing_carets(group)
                for condition in (_one_text_condition(column, spelled),
                                  _Glob(column, f"{spelled}=*")))))
        else:
            conditions.append(_Glob(column, f"*={group}*"))
    return and_(*conditions) if conditions else true()


def name_condition(column: Any, value: str, fuzzy: bool = False,
                   person_name: bool = True) -> ColumnElement[bool]:
    """Case- and accent-insensitive matching of a normalised name column (any of a list).

    A person name (``person_name``) with several component groups (``=``) is matched group
    by group: this condition narrows the search, and :func:`pn_needs_groups` tells the query
    engine to check the groups on the stored value (:func:`json_matches`)."""
    if is_universal_text(value, "PN"):
        return true()
    conditions = []
    for one in split_values(value, "PN"):
        folded = normalise_name(one)
        if not folded:
            continue
        if fuzzy and not has_wildcard(folded):
            words = [w for w in folded.replace("^", " ").replace("=", " ").split() if w]
            conditions.append(and_(*(_Glob(column, f"*{w}*") for w in words)))
        elif person_name:  # also one group: a stored name may carry more
            conditions.append(_pn_groups_condition(column, folded))
        else:
            conditions.append(_one_text_condition(column, folded))
    if not conditions:
        return true()
    return or_(*conditions) if len(conditions) > 1 else conditions[0]


def uid_list_condition(column: Any, value: str) -> ColumnElement[bool]:
    """List-of-UID matching: ``value`` holds UIDs separated by backslashes."""
    uids = [u.strip() for u in value.split("\\") if u.strip()]
    if not uids:
        return true()
    return column.in_(uids)


# -- dates and times ---------------------------------------------------------------------------

_TIME_LOW, _TIME_HIGH = "000000.000000", "235959.999999"
_DATETIME_LOW, _DATETIME_HIGH = "00000101000000.000000", "99991231235959.999999"


def _digits(value: str, allowed: str = "") -> bool:
    return value != "" and all(c.isdigit() or c in allowed for c in value) and value.isascii()


def _date_problem(digits: str) -> str:
    """Why the date digits ``YYYY``, ``YYYYMM`` or ``YYYYMMDD`` name no day of the calendar,
    or ``""`` when they do."""
    if len(digits) < 6:
        return ""
    month = int(digits[4:6])
    if not 1 <= month <= 12:
        return f"there is no month {digits[4:6]}"
    if len(digits) < 8:
        return ""
    days = calendar.monthrange(2000 if calendar.isleap(int(digits[:4])) else 2001, month)[1]
    if not 1 <= int(digits[6:8]) <= days:
        return f"month {digits[4:6]} has no day {digits[6:8]}"
    return ""


def _clock_problem(digits: str) -> str:
    """Why the time digits ``HH``, ``HHMM`` or ``HHMMSS`` name no time of day, or ``""`` when
    they do (a second of 60 is a leap second, which PS3.5 allows)."""
    for name, start, most in (("hour", 0, 23), ("minute", 2, 59), ("second", 4, 60)):
        if len(digits) > start and int(digits[start:start + 2]) > most:
            return f"{name} {digits[start:start + 2]} is past {most:02d}"
    return ""


def normalise_date(value: str, check: bool = True) -> str:
    """A DA key as YYYYMMDD (the old ``YYYY.MM.DD`` form accepted). With ``check`` (keys), a
    date that is not in the calendar (month 13, 30 February) is refused too; without it
    (stored values) only the form is."""
    text = value.strip().replace(".", "") if len(value.strip()) == 10 else value.strip()
    if len(text) != 8 or not _digits(text):
        raise InvalidQuery(f"{value!r} is not a DICOM date (YYYYMMDD)")
    problem = _date_problem(text) if check else ""
    if problem:
        raise InvalidQuery(f"{value!r} is not a date: {problem}")
    return text


def normalise_time(value: str, upper: bool, check: bool = True) -> str:
    """A TM key or bound as ``HHMMSS.FFFFFF``: a partial value becomes the start of its span
    (``upper=False``) or its end (``upper=True``). ``HH:MM:SS`` is accepted. With ``check``
    (keys), an hour past 23, a minute past 59 or a second past 60 is refused too."""
    text = value.strip().replace(":", "")
    whole, dot, fraction = text.partition(".")
    if (len(whole) not in (2, 4, 6) or not _digits(whole)
            or (dot and (len(whole) != 6 or not 1 <= len(fraction) <= 6
                         or not _digits(fraction)))):
        raise InvalidQuery(f"{value!r} is not a DICOM time (HHMMSS.FFFFFF)")
    problem = _clock_problem(whole) if check else ""
    if problem:
        raise InvalidQuery(f"{value!r} is not a time: {problem}")
    template = _TIME_HIGH if upper else _TIME_LOW
    if not dot:
        return whole + template[len(whole):]
    return whole + "." + fraction + template[7 + len(fraction):]


def stored_time(value: str) -> str | None:
    """A stored TM value normalised for comparison (None when it is not a time)."""
    try:
        return normalise_time(value, upper=False, check=False)
    except InvalidQuery:
        return None


def normalise_datetime(value: str, upper: bool, check: bool = True) -> str:
    """A DT key or bound as ``YYYYMMDDHHMMSS.FFFFFF``, partial values widened to their span
    and a UTC offset (``&ZZXX``) applied, so that moments compare in UTC. With ``check``
    (keys), a date or time of day that does not exist is refused too."""
    text = value.strip()
    offset = None
    for sign in "+-":
        if sign in text[4:]:
            position = text.index(sign, 4)
            text, zone = text[:position], text[position:]
            if (len(zone) != 5 or not _digits(zone[1:]) or int(zone[1:3]) > 14
                    or int(zone[3:5]) > 59):
                raise InvalidQuery(f"{value!r} has an invalid UTC offset (&ZZXX)")
            minutes = int(zone[1:3]) * 60 + int(zone[3:5])
            offset = dt.timedelta(minutes=minutes if sign == "+" else -minutes)
            break
    whole, dot, fraction = text.partition(".")
    if (len(whole) not in (4, 6, 8, 10, 12, 14) or not _digits(whole)
            or (dot and (len(whole) != 14 or not 1 <= len(fraction) <= 6
                         or not _digits(fraction)))):
        raise InvalidQuery(f"{value!r} is not a DICOM date-time (YYYYMMDDHHMMSS.FFFFFF&ZZXX)")
    problem = (_date_problem(whole[:8]) or _clock_problem(whole[8:])) if check else ""
    if problem:
        raise InvalidQuery(f"{value!r} is not a date-time: {problem}")
    if upper:
        template = "99991231235959.999999"
        padded = whole + template[len(whole):14]
        if len(whole) == 6:  # a month: its last day
            year, month = int(whole[:4]), int(whole[4:6])
            last = (dt.date(year + month // 12, month % 12 + 1, 1) - dt.timedelta(days=1)).day \
                if 1 <= month <= 12 else 31
            padded = whole + f"{last:02d}" + template[8:14]
        result = padded + "." + (fraction + "999999"[len(fraction):] if dot else "999999")
    else:
        template = "00000101000000"
        result = whole + template[len(whole):] + "." + (
            fraction + "000000"[len(fraction):] if dot else "000000")
    if offset is None:
        return result
    # A leap second (60) is taken as the last moment of its minute for the offset's sake.
    leap = result[12:14] == "60"
    try:
        moment = dt.datetime.strptime(
            result[:12] + "59.999999" if leap else result, "%Y%m%d%H%M%S.%f") - offset
    except ValueError as exc:
        raise InvalidQuery(f"{value!r} is not a valid date-time") from exc
    return moment.strftime("%Y%m%d%H%M%S.%f")


def stored_datetime(value: str) -> str | None:
    """A stored DT value normalised for comparison (None when it is not a date-time)."""
    try:
        return normalise_datetime(value, upper=False, check=False)
    except InvalidQuery:
        return None


def _normalise(value: str, vr: str, upper: bool, check: bool = True) -> str:
    if vr == "DA":
        return normalise_date(value, check)
    if vr == "TM":
        return normalise_time(value, upper, check)
    return normalise_datetime(value, upper, check)


def _bounds(value: str, vr: str) -> tuple[str | None, str | None]:
    """The normalised (low, high) of one DA/TM/DT key value: a range ``a-b``, ``a-``, ``-b``
    or a single value, which stands for its whole span. The range is found by the form of its
    bounds; then each bound must be a real date or time (month 13 and hour 25 are refused
    with the reason)."""
    text = value.strip()
    for position, char in enumerate(text):
        if char != "-":
            continue
        low, high = text[:position].strip(), text[position + 1:].strip()
        try:
            bounds = (_normalise(low, vr, False, check=False) if low else None,
                      _normalise(high, vr, True, check=False) if high else None)
        except InvalidQuery:
            continue
        if bounds[0] is None or bounds[1] is None or bounds[0] <= bounds[1]:
            return (_normalise(low, vr, False) if low else None,
                    _normalise(high, vr, True) if high else None)
    if "-" in text and vr != "DT":  # a DT value may end in a negative UTC offset
        raise InvalidQuery(f"{value!r} is not a valid {vr} range (a-b, a- or -b)")
    return _normalise(text, vr, False), _normalise(text, vr, True)


def check_range_key(value: str, vr: str) -> None:
    """Refuse a DA, TM or DT key (single values, ranges, or a ``\\``-separated list of
    either) that cannot be matched: a malformed value, a reversed range, or a date or time
    that does not exist (``20241315``, ``256099``), with the reason."""
    for part in value.split("\\"):
        part = part.strip()
        if part and part != "*":
            _bounds(part, vr)


def _sql_time(column: Any) -> Any:
    """A stored TM column normalised in SQL: colons dropped, padded to HHMMSS.FFFFFF."""
    bare = func.replace(column, ":", "", type_=String())
    return bare.concat(func.substr(literal(_TIME_LOW, String()), func.length(bare) + 1,
                                   type_=String()))


def range_condition(column: Any, value: str, vr: str) -> ColumnElement[bool]:
    """Single value, range or multiple-value matching of DA/TM values stored as DICOM
    strings (an empty stored value matches no range)."""
    conditions = []
    for part in value.split("\\"):
        if not part.strip() or part.strip() == "*":
            if part.strip() == "*":
                return true()
            continue
        low, high = _bounds(part.strip(), vr)
        if low is None and high is None:
            return true()
        if vr == "DA" and low == high:
            conditions.append(column == low)
            continue
        compared = _sql_time(column) if vr == "TM" else column
        bounds = [column != ""]
        if low is not None:
            bounds.append(compared >= low)
        if high is not None:
            bounds.append(compared <= high)
        conditions.append(and_(*bounds))
    if not conditions:
        return true()
    return or_(*conditions) if len(conditions) > 1 else conditions[0]


def _stored_normalised(stored: str, vr: str) -> str | None:
    if vr == "DA":
        try:
            return normalise_date(stored, check=False)
        except InvalidQuery:
            return None
    if vr == "TM":
        return stored_time(stored)
    return stored_datetime(stored)


def range_matches(stored: str, query: str, vr: str) -> bool:
    """Does the stored DA/TM/DT value match the key (single, range or list of either)?"""
    value = _stored_normalised(stored, vr) if stored.strip() else None
    for part in query.split("\\"):
        part = part.strip()
        if not part:
            continue
        if part == "*":
            return True
        low, high = _bounds(part, vr)
        if low is None and high is None:
            return True
        if value is None:
            continue
        if (low is None or value >= low) and (high is None or value <= high):
            return True
    return False


# -- matching against stored DICOM JSON (attributes the index has no column for) ----------


def _values(element: dict[str, Any] | None) -> list[Any]:
    if not element:
        return []
    return list(element.get("Value", []) or [])


PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def pn_text(value: dict[str, Any]) -> str:
    """A person name in DICOM JSON (``{"Alphabetic": ..., "Ideographic": ...}``) as its DICOM
    string: the component groups joined by ``=``, trailing empty groups left off
    (``=山田^太郎`` when only the ideographic group is given)."""
    return "=".join(str(value.get(group) or "") for group in PN_GROUPS).rstrip("=")


def _as_text(value: Any) -> str:
    if isinstance(value, dict):  # PN in DICOM JSON: every component group
        return pn_text(value)
    return "" if value is None else str(value)  # an empty value among several is null


def _pn_group_matches(stored: str, wanted: str) -> bool:
    """Does the folded stored name match one folded query value, group by group? Each
    non-empty component group of the query (alphabetic, ideographic, phonetic, separated by
    ``=``) must match the stored value's group in the same place (PS3.4 C.2.2.2.1); empty
    query groups match anything. Empty trailing components are left off both (``DOE^JANE^^^``
    is ``DOE^JANE``)."""
    stored_groups = [group.strip().rstrip("^ ") for group in stored.split("=")]
    for index, group in enumerate(group.strip().rstrip("^ ") for group in wanted.split("=")):
        if group == "":
            continue
        have = stored_groups[index] if index < len(stored_groups) else ""
        if has_wildcard(group):
            check_wildcard_pattern(group)
            if not wildcard_match(have, group):
                return False
        elif have != group:
            return False
    return True


def pn_needs_groups(value: str) -> bool:
    """True when a PN key value (``\\``-separated) names more than one component group, so
    that it is matched group by group on the stored value."""
    return any("=" in one for one in split_values(value, "PN"))


def _match_one(stored: str, query: str, vr: str) -> bool:
    if vr in RANGE_VRS:
        return range_matches(stored, query, vr)
    if vr == "UI":
        return stored in [q for q in query.split("\\") if q]
    for one in split_values(query, vr):
        if one == "":
            continue
        if vr == "PN":
            if _pn_group_matches(normalise_name(stored), normalise_name(one)):
                return True
            continue
        stored_text, wanted = stored, one
        if has_wildcard(wanted):
            check_wildcard_pattern(wanted)
            if wildcard_match(stored_text, wanted):
                return True
        elif stored_text == wanted:
            return True
    return False


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
    if vr not in RANGE_VRS and vr != "UI" and is_universal_text(query_text, vr):
        return True
    return any(_match_one(_as_text(s), query_text, vr) for s in _values(stored))


def is_universal(element: dict[str, Any]) -> bool:
    """True when the query element asks only for the value (no matching)."""
    if element.get("vr") == "SQ":
        items = element.get("Value") or []
        return not items or all(is_universal(v) for v in items[0].values())
    values = element.get("Value") or []
    return all(_as_text(v) in ("", "*") for v in values)


def check_key(element: dict[str, Any]) -> None:
    """Refuse a query element (DICOM JSON) whose DA, TM or DT value cannot be matched, in the
    one item of a sequence key too, before anything is searched: an impossible date is
    refused even where nothing is stored to compare it with."""
    vr = element.get("vr", "")
    if vr == "SQ":
        items = element.get("Value") or []
        for item in items[:1]:
            for inner in (item or {}).values():
                check_key(inner)
        return
    if vr in RANGE_VRS:
        check_range_key("\\".join(_as_text(v) for v in _values(element)), vr)
