"""Instances an approved study deletion took away (IHE IOCM "rejected" objects): what is sent
again is refused, so a wrong-patient image deleted by two administrators does not come back
by a modality's retry; an administrator can let a study's instances in again.

Deletions by the retention policy (temporary copies, expired uploads) are not rejections:
a study retrieved again, or an upload sent again, is taken as new.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, bindparam, delete, func, select

from imageshare.storage.index.schema import rejected_instances

_BATCH = 500
# Built once: it runs for every new instance the archive receives.
_REJECTED = (select(rejected_instances.c.request, rejected_instances.c.rejected_at)
             .where(rejected_instances.c.sop_uid == bindparam("sop_uid")))


@dataclass(frozen=True)
class Rejection:
    """Why an instance is not taken again: the deletion request and its moment."""

    request: str
    rejected_at: datetime

    def reason(self, sop_uid: str) -> str:
        """The refusal as a sending system is told it (no patient data)."""
        # The first words fit a C-STORE's Error Comment (64 characters).
        request = f", request {self.request}" if self.request else ""
        return (f"deleted here by an approved deletion: not taken again (instance "
                f"{sop_uid}, deleted on {self.rejected_at:%Y-%m-%d}{request}; an "
                f"administrator can allow it again)")


def reject(conn: Connection, sop_uids: Collection[str], study_uid: str, request: str,
           now: datetime) -> None:
    """Record ``sop_uids`` of ``study_uid`` as taken away by ``request``, in the caller's
    (the deleting) transaction."""
    wanted = sorted(set(sop_uids))
    known: set[str] = set()
    for start in range(0, len(wanted), _BATCH):
        known.update(conn.execute(select(rejected_instances.c.sop_uid).where(
            rejected_instances.c.sop_uid.in_(wanted[start:start + _BATCH]))).scalars())
    rows = [{"sop_uid": uid, "study_uid": study_uid, "request": request[:32],
             "rejected_at": now} for uid in wanted if uid not in known]
    for start in range(0, len(rows), _BATCH):
        conn.execute(rejected_instances.insert(), rows[start:start + _BATCH])


def rejection_of(conn: Connection, sop_uid: str) -> Rejection | None:
    """Why ``sop_uid`` is refused when sent again, or None when it may be stored."""
    row = conn.execute(_REJECTED, {"sop_uid": sop_uid}).first()
    return Rejection(row.request, row.rejected_at) if row else None


def rejected_in(conn: Connection, study_uid: str) -> int:
    """How many instances of ``study_uid`` are refused when sent again."""
    return int(conn.execute(select(func.count()).select_from(rejected_instances).where(
        rejected_instances.c.study_uid == study_uid)).scalar() or 0)


def allow_again(conn: Connection, study_uid: str) -> int:
    """Let the instances of ``study_uid`` be stored again; returns how many were refused."""
    return conn.execute(delete(rejected_instances).where(
        rejected_instances.c.study_uid == study_uid)).rowcount or 0
