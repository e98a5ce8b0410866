"""Removing instances from the archive (retention, rejected inbox items): index rows, counts
and emptied parents in one transaction, audited; blobs deleted after the commit."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, Connection, and_, delete, func, select, update

from imageshare.archive.index_writer import IndexWriter
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import Actor
from imageshare.storage.blobs import BlobStore
from imageshare.storage.index.schema import (
    inbox_items,
    instances,
    patient_identifiers,
    patients,
    series,
    studies,
)


@dataclass(frozen=True)
class Removed:
    """What a deletion took out."""

    instances: int
    studies: list[str]


class ArchiveDeletion:
    """Deletes instances chosen by study or by retention class and age."""

    def __init__(self, writer: IndexWriter, blobs: BlobStore, audit: AuditTrail,
                 parents_changed: Callable[[Connection | None], None]) -> None:
        self._writer = writer
        self._blobs = blobs
        self._audit = audit
        self._parents_changed = parents_changed

    def study(self, study_uid: str, actor: Actor, reason: str,
              only_classes: Collection[str] | None = None) -> Removed:
        """Delete a study's instances (of the given retention classes only, if given)."""
        condition = studies.c.study_uid == study_uid
        return self._delete(condition, only_classes, None, actor, reason)

    def expired(self, classes: Collection[str], before: datetime, actor: Actor) -> Removed:
        """Delete instances of ``classes`` received before ``before`` (retention)."""
        return self._delete(None, classes, before, actor, "retention period over")

    def _delete(self, condition: ColumnElement[bool] | None, classes: Collection[str] | None,
                before: datetime | None, actor: Actor, reason: str) -> Removed:
        def change(conn: Connection) -> tuple[list[str], dict[str, int], dict[str, str]]:
            stmt = (select(instances.c.pk, instances.c.blob_key, studies.c.study_uid,
                           patients.c.patient_id)
                    .join(series, series.c.pk == instances.c.series_pk)
                    .join(studies, studies.c.pk == series.c.study_pk)
                    .join(patients, patients.c.pk == studies.c.patient_pk))
            if condition is not None:
                stmt = stmt.where(condition)
            if classes is not None:
                stmt = stmt.where(instances.c.retention_class.in_(list(classes)))
            if before is not None:
                stmt = stmt.where(instances.c.received_at < before)
            rows = conn.execute(stmt).all()
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
            self._parents_changed(conn)
            self._audit.record([AuditEvent(
                actor=actor, action="instance.delete", outcome="success",
                patient_id=patients_of[uid], study_uid=uid, instance_count=n,
                detail={"reason": reason}) for uid, n in counts.items()], conn=conn)
            return keys, counts, patients_of

        keys, counts, _patients = self._writer.submit(change)
        for key in keys:
            self._blobs.delete(key)
        return Removed(sum(counts.values()), sorted(counts))


def _recount(conn: Connection, study_uids: list[str]) -> None:
    """Fix counts, drop emptied series and studies, and patients left with no study."""
    for uid in study_uids:
        study_pk = conn.execute(select(studies.c.pk).where(studies.c.study_uid == uid)).scalar()
        if study_pk is None:
            continue
        for series_pk, count in conn.execute(
                select(series.c.pk, select(func.count(instances.c.pk))
                       .where(instances.c.series_pk == series.c.pk).scalar_subquery())
                .where(series.c.study_pk == study_pk)).all():
            if count:
                conn.execute(update(series).where(series.c.pk == series_pk)
                             .values(num_instances=count))
            else:
                conn.execute(delete(series).where(series.c.pk == series_pk))
        remaining = conn.execute(select(func.count(series.c.pk), func.sum(series.c.num_instances))
                                 .where(series.c.study_pk == study_pk)).one()
        if not remaining[0]:
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
        else:
            modalities = sorted({m for (m,) in conn.execute(
                select(series.c.modality).where(series.c.study_pk == study_pk)) if m})
            conn.execute(update(studies).where(studies.c.pk == study_pk).values(
                num_series=remaining[0], num_instances=remaining[1] or 0,
                modalities="\\".join(modalities)[:128]))
