"""Removing instances from the archive (retention, rejected inbox items): index rows, counts
and emptied parents in one transaction, audited; blobs deleted after the commit.

Every attempt leaves a trace in the audit trail: the deletion itself (``instance.delete``,
success, per study, in the deleting transaction), a deletion refused by a legal hold or a
retention class (outcome ``refused``), one that failed and so deleted nothing (``failure``:
the transaction was rolled back), and blobs that could not be removed after the commit
(``warning``, naming the blob keys for a person to remove).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

from sqlalchemy import ColumnElement, Connection, and_, delete, exists, func, or_, select

from imageshare.archive.index_writer import IndexWriter
from imageshare.archive.indexing import summarise_studies
from imageshare.archive.rejections import allow_again, reject
from imageshare.archive.tombstones import remove_blobs, remove_tombstoned, tombstone
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

log = logging.getLogger("imageshare.deletion")


def as_utc(moment: datetime) -> datetime:
    """``moment`` in UTC; a moment without a zone is taken to be UTC already (the index and the
    clocks ImageShare is given keep UTC)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@dataclass(frozen=True)
class Removed:
    """What a deletion took out (and, for the retention job, what it had to keep);
    ``blobs_left``: blobs of deleted instances that could not be removed (audited)."""

    instances: int
    studies: list[str]
    kept: int = 0
    blobs_left: list[str] = field(default_factory=list)


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
        return self._delete(condition, only_classes, actor, reason, "rejection", self._now())

    def instances(self, sop_uids: Collection[str], actor: Actor, reason: str,
                  only_classes: Collection[str]) -> Removed:
        """Remove the instances of ``only_classes`` with these SOP Instance UIDs (files of an
        upload withdrawn before they were sent): all of them, or none."""
        if not sop_uids:
            return Removed(0, [])
        condition = instances.c.sop_uid.in_(sorted(sop_uids))
        return self._delete(condition, only_classes, actor, reason, "rejection", self._now())

    def approved_study(self, study_uid: str, actor: Actor, reason: str,
                       request: str = "") -> Removed:
        """Delete a whole study two administrators agreed on (deletion ``request``): all of
        it, or nothing (:class:`DeletionRefused` naming why: a legal hold, a class still
        keeping it). Its instances are refused if they are sent again (IHE IOCM)."""
        condition = studies.c.study_uid == study_uid
        return self._delete(condition, None, actor, reason, "approved", self._now(),
                            request=request)

    def allow_again(self, study_uid: str, actor: Actor, reason: str,
                    patient_id: str = "", issuer: str = "") -> int:
        """Let the instances of ``study_uid`` (of ``patient_id`` with ``issuer``, when known:
        the study is gone) an approved deletion took away be stored again (audited); returns
        how many were refused until now."""
        def change(conn: Connection) -> int:
            count = allow_again(conn, study_uid)
            self._audit.record(AuditEvent(
                actor=actor, action="deletion.allow_again",
                outcome="success" if count else "failure", study_uid=study_uid,
                patient_id=patient_id, issuer=issuer,
                instance_count=count, detail={"reason": reason.strip()[:200]}), conn=conn)
            return count
        return self._writer.submit(change)

    def expired(self, actor: Actor, now: datetime | None = None) -> Removed:
        """Delete every instance whose class lets it go at ``now`` (the retention job); the
        rest is kept and counted."""
        # In UTC: on SQLite the stored times have no zone, and a moment with another offset
        # would be compared by its wall time.
        moment = as_utc(now) if now is not None else self._now()
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

    def _now(self) -> datetime:
        return as_utc(self.clock())

    def _delete(self, condition: ColumnElement[bool] | None, classes: Collection[str] | None,
                actor: Actor, reason: str, path: DeletionPath, now: datetime,
                request: str = "") -> Removed:
        # The studies (and their patients) the deletion found, kept for the audit of an
        # attempt that did not go through.
        seen: dict[str, str] = {}

        def change(conn: Connection
                   ) -> tuple[list[tuple[str, str]], dict[str, int], dict[str, str], int]:
            stmt = (select(instances.c.pk, instances.c.sop_uid, instances.c.blob_key,
                           instances.c.retention_class,
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
            seen.update((r.study_uid, r.patient_id) for r in found)
            verdicts = [deletion_verdict(f, self.periods, now, path)
                        for f in instance_facts(conn, found)]
            refused = [v for v in verdicts if not v.allowed]
            if refused and path != "expiry":
                raise DeletionRefused(f"nothing was deleted: {refused[0].reason}")
            rows = [r for r, v in zip(found, verdicts, strict=True) if v.allowed]
            keys = [(r.blob_key, r.study_uid) for r in rows]
            counts: dict[str, int] = {}
            patients_of: dict[str, str] = {}
            for row in rows:
                counts[row.study_uid] = counts.get(row.study_uid, 0) + 1
                patients_of[row.study_uid] = row.patient_id
            pks = [r.pk for r in rows]
            for start in range(0, len(pks), 500):
                conn.execute(delete(instances).where(instances.c.pk.in_(pks[start:start + 500])))
            tombstone(conn, [r.blob_key for r in rows])
            whole = _recount(conn, list(counts))
            if path == "approved":
                _forget_study_notes(conn, list(counts))
                for uid in counts:
                    reject(conn, [r.sop_uid for r in rows if r.study_uid == uid], uid,
                           request, now)
            self._parents_changed(conn)
            # A study gone as a whole is a Study Deleted (PS3.15 A.5.3.8); some of its
            # instances, with the study staying, are Instances Accessed with action D.
            self._audit.record([AuditEvent(
                actor=actor, action="study.delete" if uid in whole else "instance.delete",
                outcome="success",
                patient_id=patients_of[uid], study_uid=uid, instance_count=n,
                detail={"reason": reason, "way": path}) for uid, n in counts.items()],
                conn=conn)
            return keys, counts, patients_of, len(refused)

        try:
            keys, counts, patients_of, kept = self._writer.submit(change)
        except DeletionRefused as exc:
            self._audit_attempt(actor, "refused", seen, str(exc), path)
            raise
        except Exception as exc:
            self._audit_attempt(actor, "failure", seen, f"nothing was deleted: {reason} "
                                f"failed ({type(exc).__name__})", path)
            raise
        # After the commit: every blob is tried, whatever happens to the others; one that
        # cannot be removed is named in the audit trail and keeps its tombstone (its instance
        # is gone from the index, its bytes are not: the next start removes them).
        left: dict[str, list[str]] = {}
        failed = set(remove_blobs(self._blobs, self._writer, [key for key, _uid in keys]))
        for key, uid in keys:
            if key in failed:
                left.setdefault(uid, []).append(key)
        if left:
            self._audit_blobs_left(actor, left, patients_of, path)
        return Removed(sum(counts.values()), sorted(counts), kept,
                       sorted(k for ks in left.values() for k in ks))

    def remove_released(self) -> int:
        """Remove the blobs the index let go of that nothing keeps any more (a legal hold that
        kept a study's old content was lifted); returns how many."""
        return remove_tombstoned(self._blobs, self._writer)

    def _audit_attempt(self, actor: Actor, outcome: Literal["refused", "failure"],
                       seen: dict[str, str], reason: str, path: DeletionPath) -> None:
        """Record a deletion that did not happen (refused, or failed and rolled back)."""
        uids = sorted(seen) or [""]
        try:
            self._audit.record([AuditEvent(
                actor=actor, action="instance.delete", outcome=outcome,
                patient_id=seen.get(uid, ""), study_uid=uid,
                detail={"reason": reason[:500], "way": path}) for uid in uids])
        except Exception as exc:  # noqa: BLE001 - the deletion's own error is the one raised
            log.error("a %s deletion could not be audited (%s)", outcome, type(exc).__name__)

    def _audit_blobs_left(self, actor: Actor, left: dict[str, list[str]],
                          patients_of: dict[str, str], path: DeletionPath) -> None:
        try:
            self._audit.record([AuditEvent(
                actor=actor, action="instance.delete", outcome="warning",
                patient_id=patients_of.get(uid, ""), study_uid=uid, instance_count=len(keys),
                detail={"reason": "deleted from the index, but these blobs could not be "
                                  "removed yet (the next start removes them): "
                                  + ", ".join(sorted(keys)), "way": path})
                for uid, keys in sorted(left.items())])
        except Exception as exc:  # noqa: BLE001 - logged; the keys are in the log too
            log.error("blobs left after a deletion could not be audited (%s)",
                      type(exc).__name__)


def _forget_study_notes(conn: Connection, study_uids: list[str]) -> None:
    """A study deleted by two administrators takes its comments, annotations, places in cases
    and in share links with it (the audit trail keeps that it existed and who deleted it)."""
    for uid in study_uids:
        if conn.execute(select(studies.c.pk).where(studies.c.study_uid == uid)).first():
            continue  # not all of it went
        for table in (study_comments, annotation_rows, case_items, share_items):
            conn.execute(delete(table).where(table.c.study_uid == uid))


def _recount(conn: Connection, study_uids: list[str]) -> set[str]:
    """Drop emptied series and studies, and patients left with no study; summarise what
    remains. Returns the studies that are gone as a whole."""
    remaining = []
    gone: set[str] = set()
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
        gone.add(uid)
        conn.execute(delete(inbox_items).where(and_(inbox_items.c.study_uid == uid,
                                                    inbox_items.c.status == "pending")))
        if not conn.execute(select(func.count()).select_from(studies)
                            .where(studies.c.patient_pk == patient_pk)).scalar():
            conn.execute(delete(patient_identifiers)
                         .where(patient_identifiers.c.patient_pk == patient_pk))
            conn.execute(delete(patients).where(patients.c.pk == patient_pk))
    summarise_studies(conn, remaining)
    return gone
