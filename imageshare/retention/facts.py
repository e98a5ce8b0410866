"""What the retention rule (:mod:`imageshare.domain.retention`) needs about instances about to
be deleted, read inside the deleting transaction: legal holds in force, the patient's latest
study and birth date, and whether a case still holds the study."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import Connection, func, select

from imageshare.archive.indexing import issuers_standing_for
from imageshare.domain.retention import InstanceFacts
from imageshare.storage.index.schema import case_items, legal_holds, studies


def parse_da(value: str) -> date | None:
    """A DICOM DA value (YYYYMMDD) as a date; None when empty or not a real date."""
    text = (value or "").strip()
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def holds_in_force(conn: Connection) -> tuple[set[tuple[str, str]], set[str]]:
    """(patients as (Patient ID, issuer), Study Instance UIDs) under a legal hold now; a
    patient's hold covers the issuers under which arrivals for its record wait (held, for
    review) too."""
    rows = conn.execute(select(legal_holds.c.patient_id, legal_holds.c.issuer,
                               legal_holds.c.study_uid)
                        .where(legal_holds.c.lifted_at.is_(None))).all()
    on_patients = {(r.patient_id, issuer) for r in rows if r.patient_id
                   for issuer in issuers_standing_for(r.issuer)}
    on_studies = {r.study_uid for r in rows if r.study_uid}
    return on_patients, on_studies


def _as_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


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


def instance_facts(conn: Connection, rows: Sequence[Any]) -> list[InstanceFacts]:
    """Facts for each row; a row has ``retention_class``, ``received_at``, ``class_since``,
    ``study_uid``, ``patient_pk``, ``patient_id``, ``issuer`` and ``birth_date``."""
    on_patients, on_studies = holds_in_force(conn)
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
