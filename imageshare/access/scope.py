"""What a caller outside the archive's staff may reach: grants of single studies, series or
instances, each with its rights (view, comment, download), as identifiable shares give them.

A :class:`Scope` is handed to queries and retrievals, which apply it inside their SQL; it
also behaves as the collection of the studies it touches, so a study-level check (``uid in
scope``) keeps working while the finer filter narrows what is inside each study.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import false, or_

VIEW, COMMENT, DOWNLOAD = "view", "comment", "download"
RIGHTS = (VIEW, COMMENT, DOWNLOAD)


@dataclass(frozen=True)
class Grant:
    """Access to one study, one series or one instance ("" widens to all of the level above)
    with a set of rights."""

    study_uid: str
    series_uid: str = ""
    sop_uid: str = ""
    rights: frozenset[str] = frozenset({VIEW})

    def covers(self, study_uid: str, series_uid: str = "", sop_uid: str = "") -> bool:
        """True when the grant reaches this study (and series, and instance, when given)."""
        if study_uid != self.study_uid:
            return False
        if series_uid and self.series_uid and series_uid != self.series_uid:
            return False
        return not (sop_uid and self.sop_uid and sop_uid != self.sop_uid)


class Scope:
    """The instances reachable through a set of grants (all of them carrying one right).

    Iterating, ``len`` and ``in`` see the Study Instance UIDs touched by a grant; use
    :meth:`covers` or :meth:`condition` for the series and instances inside them.
    """

    def __init__(self, grants: Iterable[Grant]) -> None:
        self.grants = tuple(grants)
        self.studies = frozenset(g.study_uid for g in self.grants)
        self.whole_studies = frozenset(g.study_uid for g in self.grants if not g.series_uid)
        self.whole_series = frozenset(g.series_uid for g in self.grants
                                      if g.series_uid and not g.sop_uid)
        self.series = frozenset(g.series_uid for g in self.grants if g.series_uid)
        self.instances = frozenset(g.sop_uid for g in self.grants if g.sop_uid)

    def __contains__(self, study_uid: object) -> bool:
        return study_uid in self.studies

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.studies))

    def __len__(self) -> int:
        return len(self.studies)

    def __repr__(self) -> str:
        return (f"Scope({len(self.studies)} studies, {len(self.series)} series, "
                f"{len(self.instances)} instances)")

    def covers(self, study_uid: str, series_uid: str = "", sop_uid: str = "") -> bool:
        """True when some grant reaches this study, series or instance (a series is reached
        when any of its instances is)."""
        if study_uid not in self.studies:
            return False
        if study_uid in self.whole_studies or not series_uid:
            return True
        if series_uid not in self.series:
            return False
        return (series_uid in self.whole_series or not sop_uid
                or sop_uid in self.instances)

    def condition(self, study_column: Any, series_column: Any = None,
                  sop_column: Any = None) -> Any:
        """An SQL condition keeping only what the grants reach, at the deepest level whose
        column is given (study, series or instance)."""
        if not self.grants:
            return false()
        if sop_column is not None:
            parts = [study_column.in_(sorted(self.whole_studies))] if self.whole_studies else []
            if self.whole_series:
                parts.append(series_column.in_(sorted(self.whole_series)))
            if self.instances:
                parts.append(sop_column.in_(sorted(self.instances)))
            return or_(*parts) if parts else false()
        if series_column is not None:
            parts = [study_column.in_(sorted(self.whole_studies))] if self.whole_studies else []
            if self.series:
                parts.append(series_column.in_(sorted(self.series)))
            return or_(*parts) if parts else false()
        return study_column.in_(sorted(self.studies))


def narrows(allowed: object) -> bool:
    """True when ``allowed`` (a study scope as callers pass it) limits series or instances
    inside its studies, so that counts and lists must be made within it."""
    return isinstance(allowed, Scope)
