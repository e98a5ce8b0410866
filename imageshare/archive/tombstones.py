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
from collections.abc import Collection
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import Connection, delete, select

from imageshare.storage.blobs import BlobStore
from imageshare.storage.index.schema import blob_tombstones

if TYPE_CHECKING:  # the writer runs indexing, which writes tombstones
    from imageshare.archive.index_writer import IndexWriter

log = logging.getLogger(__name__)
_BATCH = 500


def tombstone(conn: Connection, keys: Collection[str]) -> None:
    """Mark ``keys`` as let go of, in the caller's transaction (the one that let go of them)."""
    now = datetime.now(UTC)
    rows = [{"blob_key": key, "deleted_at": now} for key in sorted(set(keys))]
    if rows:
        conn.execute(blob_tombstones.insert(), rows)


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
    between the commit and their removal); returns how many were settled."""
    with writer.engine.connect() as conn:
        keys = sorted(tombstoned_keys(conn))
    left = remove_blobs(blobs, writer, keys)
    if len(left) < len(keys):
        log.warning("removed %d blob(s) the index had let go of before an interruption",
                    len(keys) - len(left))
    return len(keys) - len(left)
