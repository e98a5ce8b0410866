"""What the retention rule (:mod:`imageshare.domain.retention`) needs about instances about to
be deleted, read inside the deleting transaction: legal holds in force, the patient's latest
study and birth date, and whether a case still holds the study."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import Connection, func, select

from imageshare.archive.corrections import _LABELS as CHANGE_LABELS
from imageshare.archive.indexing import issuers_standing_for
from imageshare.domain.retention import InstanceFacts
from imageshare.storage.index.schema import (
    case_items,
    legal_holds,
    patient_changes,
    patients,
    studies,
)

# How the patient-details history names a change of hospital number and of its issuer.
_ID_CHANGE = CHANGE_LABELS["patient_id"]
_ISSUER_CHANGE = CHANGE_LABELS["issuer"]


def parse_da(value: str) -> date | None:
    """A DICOM DA value (YYYYMMDD) as a date; None when empty or not a real date."""
    text = (value or "").strip()
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def holds_in_force(conn: Connection, study_uids: Iterable[str] = ()
                   ) -> tuple[set[tuple[str, str]], set[str]]:
    """(patients as (Patient ID, issuer), Study Instance UIDs) under a legal hold now; a
    patient's hold covers the issuers under which arrivals for its record wait (held, for
    review) too, and those of ``study_uids`` that were its patient's when it was placed and
    were re-filed under another patient since (a correction or a merge does not take a
    study out of a hold)."""
    rows = conn.execute(select(legal_holds.c.patient_id, legal_holds.c.issuer,
                               legal_holds.c.study_uid, legal_holds.c.placed_at)
                        .where(legal_holds.c.lifted_at.is_(None))).all()
    on_patients = {(r.patient_id, issuer) for r in rows if r.patient_id
                   for issuer in issuers_standing_for(r.issuer)}
    on_studies = {r.study_uid for r in rows if r.study_uid}
    if any(r.patient_id for r in rows):
        on_studies |= set(held_away(rows, former_patients(conn, study_uids)))
    return on_patients, on_studies


def study_on_hold(conn: Connection, study_uid: str) -> bool:
    """True when a legal hold in force covers the study (on it, on its patient now, or on a
    patient it was re-filed away from after the hold was placed): its content is evidence."""
    on_patients, on_studies = holds_in_force(conn, [study_uid])
    if study_uid in on_studies:
        return True
    if not on_patients:
        return False
    patient = conn.execute(select(patients.c.patient_id, patients.c.issuer).join(
        studies, studies.c.patient_pk == patients.c.pk).where(
        studies.c.study_uid == study_uid)).first()
    return patient is not None and (patient.patient_id, patient.issuer) in on_patients


def _as_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def former_patients(conn: Connection, study_uids: Iterable[str]
                    ) -> dict[str, list[tuple[str, str, datetime]]]:
    """Per study re-filed by a correction or a merge: each (Patient ID, issuer) it was filed
    under before, with the moment it left that patient (from the patient-details history,
    walked back from the study's patient now)."""
    uids = sorted(set(study_uids))
    found: dict[str, list[tuple[str, str, datetime]]] = {}
    for start in range(0, len(uids), 500):
        chunk = uids[start:start + 500]
        changes = conn.execute(
            select(patient_changes.c.study_uid, patient_changes.c.change_id,
                   patient_changes.c.attribute, patient_changes.c.old_value,
                   patient_changes.c.at)
            .where(patient_changes.c.study_uid.in_(chunk),
                   patient_changes.c.attribute.in_([_ID_CHANGE, _ISSUER_CHANGE]))
            .order_by(patient_changes.c.pk.desc())).all()
        if not changes:
            continue
        now_under = {r.study_uid: (r.patient_id, r.issuer) for r in conn.execute(
            select(studies.c.study_uid, patients.c.patient_id, patients.c.issuer)
            .join(patients, patients.c.pk == studies.c.patient_pk)
            .where(studies.c.study_uid.in_(sorted({c.study_uid for c in changes}))))}
        # Newest change first: each one's old values give the record before it.
        by_change: dict[tuple[str, str], dict[str, Any]] = {}
        for c in changes:
            entry = by_change.setdefault((c.study_uid, c.change_id), {"at": _as_utc(c.at)})
            entry[c.attribute] = c.old_value
        for (uid, _change), entry in by_change.items():
            current = now_under.get(uid)
            if current is None:
                continue
            before = (entry.get(_ID_CHANGE, current[0]), entry.get(_ISSUER_CHANGE, current[1]))
            found.setdefault(uid, []).append((before[0], before[1], entry["at"]))
            now_under[uid] = before
    return found


def held_away(holds: Sequence[Any], former: dict[str, list[tuple[str, str, datetime]]]
              ) -> dict[str, list[Any]]:
    """Per study: the patient holds (rows with ``patient_id``, ``issuer``, ``placed_at``)
    placed while the study was still filed under their patient, which follow it when a
    correction or a merge re-files it under another one."""
    covered: dict[str, list[Any]] = {}
    for uid, records in former.items():
        for hold in holds:
            if not hold.patient_id:
                continue
            issuers = issuers_standing_for(hold.issuer)
            placed = _as_utc(hold.placed_at)
            if any(pid == hold.patient_id and issuer in issuers and left >= placed
                   for pid, issuer, left in records):
                covered.setdefault(uid, []).append(hold)
    return covered


def latest_studies(conn: Connection, patient_pks: Iterable[int]) -> dict[int, date]:
    """Per patient: the later of the latest Study Date and the latest arrival of a study."""
    keys = sorted(set(patient_pks))
    latest: dict[int, date] = {}
    for start in range(0, len(keys), 500):
        chunk = keys[start:start + 500]
        for pk, study_date, updated in conn.execute(
                select(studies.c.patient_pk, studies.c.study_date, studies.c.updated_at)
                .where(studies.c.patient_pk.in_(chunk))):
            days = [d for d in (parse_da(study_date), _as_utc(updated).date()) if d]
            if days:
                latest[pk] = max([*days, *([latest[pk]] if pk in latest else [])])
    return latest


def studies_in_cases(conn: Connection, study_uids: Iterable[str]) -> set[str]:
    """The studies (of ``study_uids``) a case refers to, wholly or in part."""
    uids = sorted(set(study_uids))
    found: set[str] = set()
    for start in range(0, len(uids), 500):
        found.update(conn.execute(select(func.distinct(case_items.c.study_uid))
                                  .where(case_items.c.study_uid.in_(uids[start:start + 500])))
                     .scalars())
    return found


def lock_against_holds(conn: Connection, study_uids: Iterable[str]) -> None:
    """Lock the studies' rows until ``conn``'s transaction ends (on PostgreSQL; SQLite has
    one writer at a time already; the order of the archive's own locks: the study first).
    :meth:`RetentionService.place_hold` locks the rows of what it covers (the study, or the
    patient's studies) before it looks for them, so a hold and a deletion of what it covers
    are never both carried out: the hold waits and then finds the study gone (and says so),
    or the deletion waits and then sees the hold (and refuses)."""
    uids = sorted(set(study_uids))
    for start in range(0, len(uids), 500):
        conn.execute(select(studies.c.pk).where(studies.c.study_uid.in_(uids[start:start + 500]))
                     .order_by(studies.c.pk).with_for_update()).all()


def instance_facts(conn: Connection, rows: Sequence[Any], lock: bool = True
                   ) -> list[InstanceFacts]:
    """Facts for each row; a row has ``retention_class``, ``received_at``, ``class_since``,
    ``study_uid``, ``patient_pk``, ``patient_id``, ``issuer`` and ``birth_date``. For a
    deletion (``lock``) the rows' studies are locked first (:func:`lock_against_holds`): a
    hold placed at the same moment is either seen here or refused for want of the study."""
    if lock:
        lock_against_holds(conn, [r.study_uid for r in rows])
    on_patients, on_studies = holds_in_force(conn, [r.study_uid for r in rows])
    latest = latest_studies(conn, [r.patient_pk for r in rows
                                   if r.retention_class == "clinical"])
    in_cases = studies_in_cases(conn, [r.study_uid for r in rows
                                       if r.retention_class in ("teaching", "research")])
    return [InstanceFacts(
        retention_class=r.retention_class, received_at=_as_utc(r.received_at),
        class_since=_as_utc(r.class_since) if r.class_since is not None else None,
        last_study=latest.get(r.patient_pk), birth_date=parse_da(r.birth_date),
        in_case=r.study_uid in in_cases,
        on_hold=((r.patient_id, r.issuer) in on_patients
                 or r.study_uid in on_studies),
    ) for r in rows]
