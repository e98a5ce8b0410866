"""Removing instances from the archive (retention, rejected inbox items): index rows, counts
and emptied parents in one transaction, audited; blobs deleted after the commit."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Connection, and_, delete, exists, func, or_, select

from imageshare.archive.index_writer import IndexWriter
from imageshare.archive.indexing import summarise_studies
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import Actor
from imageshare.domain.errors import DeletionRefused
from imageshare.domain.retention import (
    CASE_GRACE,
    EXPIRING,
    Clock,
    DeletionPath,
    RetentionPeriods,
    deletion_verdict,
    system_clock,
)
from imageshare.retention.facts import instance_facts
from imageshare.storage.blobs import BlobStore
from imageshare.storage.index.schema import (
    annotations as annotation_rows,
)
from imageshare.storage.index.schema import (
    case_items,
    inbox_items,
    instances,
    patient_identifiers,
    patients,
    series,
    share_items,
    studies,
    study_comments,
)


@dataclass(frozen=True)
class Removed:
    """What a deletion took out (and, for the retention job, what it had to keep)."""

    instances: int
    studies: list[str]
    kept: int = 0


class ArchiveDeletion:
    """Deletes instances chosen by study or by retention class, each only when the one
    retention rule (:func:`imageshare.domain.retention.deletion_verdict`) allows it: legal
    holds and retention classes are checked here, inside the deleting transaction, for every
    way a deletion comes (the retention job, inbox rejection, two administrators)."""

    def __init__(self, writer: IndexWriter, blobs: BlobStore, audit: AuditTrail,
                 parents_changed: Callable[[Connection | None], None],
                 periods: RetentionPeriods | None = None,
                 clock: Clock = system_clock) -> None:
        self._writer = writer
        self._blobs = blobs
        self._audit = audit
        self._parents_changed = parents_changed
        self.periods = periods or RetentionPeriods()
        self.clock = clock

    def study(self, study_uid: str, actor: Actor, reason: str,
              only_classes: Collection[str] | None = None) -> Removed:
        """Reject a study's instances of ``only_classes`` (inbox, held): all of them are
        deleted, or none (:class:`DeletionRefused`, e.g. under a legal hold)."""
        condition = studies.c.study_uid == study_uid
        return self._delete(condition, only_classes, actor, reason, "rejection", self.clock())

    def instances(self, sop_uids: Collection[str], actor: Actor, reason: str,
                  only_classes: Collection[str]) -> Removed:
        """Remove the instances of ``only_classes`` with these SOP Instance UIDs (files of an
        upload withdrawn before they were sent): all of them, or none."""
        if not sop_uids:
            return Removed(0, [])
        condition = instances.c.sop_uid.in_(sorted(sop_uids))
        return self._delete(condition, only_classes, actor, reason, "rejection", self.clock())

    def approved_study(self, study_uid: str, actor: Actor, reason: str) -> Removed:
        """Delete a whole study two administrators agreed on: all of it, or nothing
        (:class:`DeletionRefused` naming why: a legal hold, a class still keeping it)."""
        condition = studies.c.study_uid == study_uid
        return self._delete(condition, None, actor, reason, "approved", self.clock())

    def expired(self, actor: Actor, now: datetime | None = None) -> Removed:
        """Delete every instance whose class lets it go at ``now`` (the retention job); the
        rest is kept and counted."""
        moment = now or self.clock()
        p = self.periods
        cls, received, since = (instances.c.retention_class, instances.c.received_at,
                                instances.c.class_since)
        # What could have expired (the rule itself decides, row by row, below).
        candidates = or_(
            and_(cls.in_(["temporary", "inbox"]),
                 received <= moment - timedelta(days=p.temporary_days)),
            and_(cls == "upload", since.is_not(None),
                 since <= moment - timedelta(days=p.upload_days)),
            and_(cls.in_(["teaching", "research"]), received <= moment - CASE_GRACE))
        return self._delete(candidates, sorted(EXPIRING), actor, "retention period over",
                            "expiry", moment)

    def _delete(self, condition: ColumnElement[bool] | None, classes: Collection[str] | None,
                actor: Actor, reason: str, path: DeletionPath, now: datetime) -> Removed:
        def change(conn: Connection) -> tuple[list[str], dict[str, int], int]:
            stmt = (select(instances.c.pk, instances.c.blob_key, instances.c.retention_class,
                           instances.c.received_at, instances.c.class_since,
                           studies.c.study_uid, patients.c.pk.label("patient_pk"),
                           patients.c.patient_id, patients.c.issuer, patients.c.birth_date)
                    .join(series, series.c.pk == instances.c.series_pk)
                    .join(studies, studies.c.pk == series.c.study_pk)
                    .join(patients, patients.c.pk == studies.c.patient_pk))
            if condition is not None:
                stmt = stmt.where(condition)
            if classes is not None:
                stmt = stmt.where(instances.c.retention_class.in_(list(classes)))
            found = conn.execute(stmt).all()
            verdicts = [deletion_verdict(f, self.periods, now, path)
                        for f in instance_facts(conn, found)]
            refused = [v for v in verdicts if not v.allowed]
            if refused and path != "expiry":
                raise DeletionRefused(f"nothing was deleted: {refused[0].reason}")
            rows = [r for r, v in zip(found, verdicts, strict=True) if v.allowed]
            keys = [r.blob_key for r in rows]
            counts: dict[str, int] = {}
            patients_of: dict[str, str] = {}
            for row in rows:
                counts[row.study_uid] = counts.get(row.study_uid, 0) + 1
                patients_of[row.study_uid] = row.patient_id
            pks = [r.pk for r in rows]
            for start in range(0, len(pks), 500):
                conn.execute(delete(instances).where(instances.c.pk.in_(pks[start:start + 500])))
            _recount(conn, list(counts))
            if path == "approved":
                _forget_study_notes(conn, list(counts))
            self._parents_changed(conn)
            self._audit.record([AuditEvent(
                actor=actor, action="instance.delete", outcome="success",
                patient_id=patients_of[uid], study_uid=uid, instance_count=n,
                detail={"reason": reason, "way": path}) for uid, n in counts.items()],
                conn=conn)
            return keys, counts, len(refused)

        keys, counts, kept = self._writer.submit(change)
        for key in keys:
            self._blobs.delete(key)
        return Removed(sum(counts.values()), sorted(counts), kept)


def _forget_study_notes(conn: Connection, study_uids: list[str]) -> None:
    """A study deleted by two administrators takes its comments, annotations, places in cases
    and in share links with it (the audit trail keeps that it existed and who deleted it)."""
    for uid in study_uids:
        if conn.execute(select(studies.c.pk).where(studies.c.study_uid == uid)).first():
            continue  # not all of it went
        for table in (study_comments, annotation_rows, case_items, share_items):
            conn.execute(delete(table).where(table.c.study_uid == uid))


def _recount(conn: Connection, study_uids: list[str]) -> None:
    """Drop emptied series and studies, and patients left with no study; summarise what
    remains."""
    remaining = []
    for uid in study_uids:
        study_pk = conn.execute(select(studies.c.pk).where(studies.c.study_uid == uid)
                                .with_for_update()).scalar()  # the study before its series
        if study_pk is None:
            continue
        emptied = select(series.c.pk).where(series.c.study_pk == study_pk, ~exists().where(
            instances.c.series_pk == series.c.pk))
        conn.execute(delete(series).where(series.c.pk.in_(emptied.scalar_subquery())))
        if conn.execute(select(series.c.pk).where(series.c.study_pk == study_pk)).first():
            remaining.append(study_pk)
            continue
        patient_pk = conn.execute(select(studies.c.patient_pk)
                                  .where(studies.c.pk == study_pk)).scalar()
        conn.execute(delete(studies).where(studies.c.pk == study_pk))
        conn.execute(delete(inbox_items).where(and_(inbox_items.c.study_uid == uid,
                                                    inbox_items.c.status == "pending")))
        if not conn.execute(select(func.count()).select_from(studies)
                            .where(studies.c.patient_pk == patient_pk)).scalar():
            conn.execute(delete(patient_identifiers)
                         .where(patient_identifiers.c.patient_pk == patient_pk))
            conn.execute(delete(patients).where(patients.c.pk == patient_pk))
    summarise_studies(conn, remaining)
