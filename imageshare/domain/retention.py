"""Retention classes and the one rule that says when stored images may be deleted.

Every stored instance carries a retention class. Whether it may be deleted at a moment depends
on its class, on facts about it (when it arrived, when its upload was reviewed, whether a case
still holds it, the patient's birth date and latest study) and on the way it would be deleted:
by the retention job when its time has passed (``expiry``), by a person rejecting it from the
inbox (``rejection``), or by two administrators (``approved``). A legal hold refuses every way.

Plain Python: the clock is passed in (``Clock``), so that the rules can be checked over decades
of simulated time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from typing import Literal

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    """The present moment (UTC)."""
    return datetime.now(UTC)


class RetentionClass(StrEnum):
    """Why an instance is kept, and so for how long."""

    # Part of the patient record: kept at least ``clinical_years`` after the patient's latest
    # study, and at least until their ``clinical_until_age`` birthday; deleted only by two
    # administrators.
    CLINICAL = "clinical"
    # A copy retrieved from another site: ``temporary_days`` after it arrived.
    TEMPORARY = "temporary"
    # Sent to us by another site, waiting in the inbox: ``temporary_days`` unless accepted
    # (then clinical); deleted at once when rejected.
    INBOX = "inbox"
    # Arrived for a patient whose record differs, waiting for reconciliation: kept until a
    # person decides (rejected: deleted; accepted: clinical).
    HELD = "held"
    # Copies made for teaching or research: as long as a case holds them.
    TEACHING = "teaching"
    RESEARCH = "research"
    # Uploaded by a patient or partner, waiting for its quality review (not yet part of the
    # record): accepted it becomes clinical, rejected it is deleted; one marked reviewed but
    # left in this class goes ``upload_days`` after the review; never by time before it.
    UPLOAD = "upload"



# Classes a person decides about by accepting or rejecting (rejection deletes them).
REJECTABLE = frozenset({RetentionClass.INBOX, RetentionClass.HELD, RetentionClass.UPLOAD})
# Classes the retention job may delete once their time has passed.
EXPIRING = frozenset({RetentionClass.TEMPORARY, RetentionClass.INBOX, RetentionClass.UPLOAD,
                      RetentionClass.TEACHING, RetentionClass.RESEARCH})
# A teaching or research copy no case holds any more goes this long after it arrived at the
# earliest (a case may be being built from it right now).
CASE_GRACE = timedelta(days=1)

_KNOWN = frozenset(c.value for c in RetentionClass)

DeletionPath = Literal["expiry", "rejection", "approved"]


@dataclass(frozen=True)
class RetentionPeriods:
    """How long each class keeps what it holds (configurable per installation)."""

    clinical_years: int = 8
    clinical_until_age: int = 25
    temporary_days: int = 30
    upload_days: int = 30


def class_help(periods: RetentionPeriods) -> dict[RetentionClass, str]:
    """What each class means for how long its images are kept, with this installation's
    periods."""
    days = periods.temporary_days
    return {
        RetentionClass.CLINICAL: (
            f"part of the record: at least {periods.clinical_years} years after the patient's "
            f"latest study and until their {periods.clinical_until_age}th birthday; deleted "
            "only by two administrators"),
        RetentionClass.TEMPORARY: f"copy retrieved from another site: expires after {days} days",
        RetentionClass.INBOX: (f"received from another site: expires after {days} days unless "
                               "accepted"),
        RetentionClass.HELD: "held for reconciliation: kept until a person decides",
        RetentionClass.TEACHING: "teaching copy: kept while a case holds it",
        RetentionClass.RESEARCH: "research copy: kept while a case holds it",
        RetentionClass.UPLOAD: (
            "patient or partner upload waiting for review: accepted it becomes clinical, "
            f"rejected it is deleted; never expires before its review, {periods.upload_days} "
            "days after it"),
    }


@dataclass(frozen=True)
class InstanceFacts:
    """What the rule needs to know about one stored instance."""

    retention_class: str
    received_at: datetime
    # When the class's own period began: the quality review of an upload; None: not yet.
    class_since: datetime | None = None
    # The patient's latest study (the later of its date and its arrival), across all studies.
    last_study: date | None = None
    # The patient's birth date; None when unknown.
    birth_date: date | None = None
    # A teaching or research case still holds the instance (or its study).
    in_case: bool = False
    # A legal hold covers the patient or the study.
    on_hold: bool = False


@dataclass(frozen=True)
class Verdict:
    """Whether a deletion may go ahead, and if not, why (fit to show to an administrator)."""

    allowed: bool
    reason: str
    earliest: datetime | None = None


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


def add_years(day: date, years: int) -> date:
    """``day`` moved ``years`` on (29 February becomes 1 March in other years); a day past
    the calendar's end (a birth or study date written as 9999, say) is its last day: kept
    for ever, never a failure of the page or job asking."""
    if day.year + years > date.max.year:
        return date.max
    try:
        return day.replace(year=day.year + years)
    except ValueError:  # 29 February
        return date(day.year + years, 3, 1)


def clinical_until(facts: InstanceFacts, periods: RetentionPeriods) -> datetime:
    """The end of a clinical instance's minimum retention: ``clinical_years`` after the
    patient's latest study and the patient's ``clinical_until_age`` birthday, whichever is
    later. With the birth date unknown, the patient is taken to have been born on the day of
    their latest study (the longest it could be)."""
    last = facts.last_study or facts.received_at.astimezone(UTC).date()
    after_study = add_years(last, periods.clinical_years)
    born = facts.birth_date or last
    return _midnight(max(after_study, add_years(born, periods.clinical_until_age)))


def earliest_deletion(facts: InstanceFacts, periods: RetentionPeriods) -> datetime | None:
    """When the instance's class lets it go at the earliest; None while nothing in time will
    (a teaching copy in a case, an upload not yet reviewed, an arrival held for review)."""
    cls = facts.retention_class
    if cls == RetentionClass.CLINICAL:
        return clinical_until(facts, periods)
    if cls in (RetentionClass.TEMPORARY, RetentionClass.INBOX):
        return facts.received_at + timedelta(days=periods.temporary_days)
    if cls == RetentionClass.UPLOAD:
        if facts.class_since is None:
            return None
        return facts.class_since + timedelta(days=periods.upload_days)
    if cls in (RetentionClass.TEACHING, RetentionClass.RESEARCH):
        return None if facts.in_case else facts.received_at + CASE_GRACE
    return None  # held for reconciliation, or a class this version does not know: kept


def deletion_verdict(facts: InstanceFacts, periods: RetentionPeriods, now: datetime,
                     path: DeletionPath) -> Verdict:
    """May the instance be deleted at ``now`` in this way? The one rule every deletion asks."""
    if facts.on_hold:
        return Verdict(False, "a legal hold is in force")
    cls = facts.retention_class
    if path == "rejection":
        if cls in REJECTABLE:
            return Verdict(True, "rejected")
        return Verdict(False, f"{cls} images are not deleted by rejection")
    earliest = earliest_deletion(facts, periods)
    if path == "expiry" and cls not in EXPIRING:
        return Verdict(False, f"{cls} images never expire by themselves", earliest)
    if earliest is None:
        why = class_help(periods)[RetentionClass(cls)] if cls in _KNOWN else "unknown class"
        return Verdict(False, f"{cls} images are kept for now ({why})")
    if now < earliest:
        return Verdict(False, f"{cls} images must be kept until {earliest:%Y-%m-%d}", earliest)
    return Verdict(True, "retention period over", earliest)
