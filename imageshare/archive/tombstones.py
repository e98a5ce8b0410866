"""Tombstones of blobs the index no longer refers to (a deleted instance, the old content of
an overwritten or corrected one), written in the transaction that let go of them and settled
once the blob is removed from the store.

Start-up recovery indexes the blobs the index does not know; without a tombstone, a crash
between that commit and the removal of the blob would bring a deleted image back, or put the
old content of a corrected instance in place of the new one. Recovery skips tombstoned blobs
and removes them for good.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import Connection, delete, func, select, update

from imageshare.storage.blobs import BlobStore
from imageshare.storage.index.schema import blob_tombstones

if TYPE_CHECKING:  # the writer runs indexing, which writes tombstones
    from imageshare.archive.index_writer import IndexWriter

log = logging.getLogger(__name__)
_BATCH = 500


def tombstone(conn: Connection, keys: Collection[str], study_uid: str = "",
              kept: bool = False) -> None:
    """Mark ``keys`` (of ``study_uid``) as let go of, in the caller's transaction (the one that
    let go of them); ``kept``: they stay in the store while a legal hold covers the study."""
    now = datetime.now(UTC)
    rows = [{"blob_key": key, "deleted_at": now, "study_uid": study_uid, "kept": kept}
            for key in sorted(set(keys))]
    if rows:
        conn.execute(blob_tombstones.insert(), rows)


def release_kept(conn: Connection, still_held: Callable[[Connection, str], bool]) -> int:
    """Let the old content kept for legal holds go where no hold covers its study any more
    (it is then removed like any other tombstoned blob); returns how many blobs."""
    uids = set(conn.execute(select(blob_tombstones.c.study_uid)
                            .where(blob_tombstones.c.kept)).scalars())
    released = sorted(uid for uid in uids if not still_held(conn, uid))
    count = 0
    for start in range(0, len(released), _BATCH):
        count += conn.execute(update(blob_tombstones).where(
            blob_tombstones.c.kept, blob_tombstones.c.study_uid.in_(
                released[start:start + _BATCH])).values(kept=False)).rowcount
    return count


def kept_for_holds(conn: Connection, study_uid: str) -> int:
    """How many blobs of old content the study's legal holds keep."""
    return int(conn.execute(select(func.count()).select_from(blob_tombstones).where(
        blob_tombstones.c.kept, blob_tombstones.c.study_uid == study_uid)).scalar() or 0)


def is_tombstoned(conn: Connection, key: str) -> bool:
    """True when ``key`` was let go of by the index and may still be in the store."""
    return conn.execute(select(blob_tombstones.c.blob_key)
                        .where(blob_tombstones.c.blob_key == key)).first() is not None


def tombstoned_keys(conn: Connection) -> set[str]:
    """Every key let go of by the index whose blob may still be in the store."""
    return set(conn.execute(select(blob_tombstones.c.blob_key)).scalars())


def remove_blobs(blobs: BlobStore, writer: IndexWriter, keys: Collection[str]) -> list[str]:
    """Remove tombstoned blobs from the store (each tried, whatever happens to the others) and
    settle their tombstones; returns the keys that could not be removed (they keep their
    tombstones, for the next start). Logs keys and error types only."""
    gone: list[str] = []
    left: list[str] = []
    for key in keys:
        try:
            blobs.delete(key)
            gone.append(key)
        except Exception as exc:  # noqa: BLE001 - kept for the next start
            log.error("blob %s let go of by the index could not be removed (%s)", key,
                      type(exc).__name__)
            left.append(key)
    if gone:
        def settle(conn: Connection) -> None:
            for start in range(0, len(gone), _BATCH):
                conn.execute(delete(blob_tombstones).where(
                    blob_tombstones.c.blob_key.in_(gone[start:start + _BATCH])))
        try:
            writer.submit(settle)
        except Exception as exc:  # noqa: BLE001 - the blobs are gone; only bookkeeping left
            log.warning("tombstones of %d removed blob(s) kept until the next start (%s)",
                        len(gone), type(exc).__name__)
    return left


def remove_tombstoned(blobs: BlobStore, writer: IndexWriter) -> int:
    """Remove the tombstoned blobs still in the store (a crash or a store failure came
    between the commit and their removal, or a legal hold that kept them was lifted), but
    not those a hold keeps; returns how many were settled."""
    with writer.engine.connect() as conn:
        keys = sorted(conn.execute(select(blob_tombstones.c.blob_key)
                                   .where(~blob_tombstones.c.kept)).scalars())
    left = remove_blobs(blobs, writer, keys)
    if len(left) < len(keys):
        log.warning("removed %d blob(s) the index had let go of before an interruption",
                    len(keys) - len(left))
    return len(keys) - len(left)
