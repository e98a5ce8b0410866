"""The ONE ingest pipeline, shared by C-STORE, STOW-RS and ``imageshare import``.

parse and check the header -> make the bytes durable in the blob store -> index (with
de-duplication and conflict checks) and audit in one committed transaction -> acknowledge.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Literal

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from imageshare.archive.header import InstanceHeader, read_header
from imageshare.archive.index_writer import IndexWriter, Prerequisite
from imageshare.archive.indexing import (
    ExistingInstance,
    IndexOutcome,
    KnownParents,
    find_instance,
    index_instance,
    note_inbox_arrival,
    parents_changed_in,
    replace_instance_blob,
)
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import Actor
from imageshare.domain.errors import (
    ConflictingInstance,
    InvalidInstance,
    OutOfResources,
    WrongStudy,
)
from imageshare.storage.blobs import BlobStore, StoredBlob, digest_of, new_blob_key, store_file

log = logging.getLogger("imageshare.ingest")
_CHUNK = 1 << 20
# Write errors that mean "no room": the store is refused as out of resources.
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def no_room(error: BaseException) -> bool:
    """True when ``error`` (or what caused it) is a write that failed for lack of space."""
    exc: BaseException | None = error
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in NO_ROOM:
            return True
        if isinstance(exc, DBAPIError) and "full" in str(exc.orig).lower():
            return True  # SQLite: "database or disk is full"; PostgreSQL: "No space left"
        if isinstance(exc, DBAPIError) and "no space left" in str(exc.orig).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def out_of_room(floor_mb: int = 0) -> OutOfResources:
    """The refusal given when the disk is full (or below the floor of ``floor_mb``)."""
    if floor_mb:
        return OutOfResources(
            f"out of resources: the archive's disk has less than {floor_mb} MB free; "
            "nothing was stored")
    return OutOfResources("out of resources: the archive's disk is full; nothing was stored")

Outcome = Literal["stored", "duplicate", "replaced", "kept_first", "held"]


@dataclass(frozen=True)
class StoreResult:
    """The answer to one stored instance. ``warning`` is set when stored data was kept."""

    outcome: Outcome
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    warning: str = ""


def _same_content(blobs: BlobStore, existing: ExistingInstance, new: StoredBlob) -> bool:
    """Whether the stored instance holds exactly the newly stored bytes (by digest)."""
    if existing.size != new.size:
        return False
    if existing.sha256:
        return existing.sha256 == new.sha256
    with blobs.open(existing.blob_key) as fh:  # stored before digests were recorded
        return digest_of(fh).sha256 == new.sha256


class IngestService:
    """Stores instances durably, indexes and audits them. Thread-safe."""

    def __init__(
        self,
        blobs: BlobStore,
        writer: IndexWriter,
        audit: AuditTrail,
        staging_dir: Path,
        overwrite: bool = False,
        min_free_mb: int = 0,
        quarantine_dir: Path | None = None,
        patient_mismatch: str = "refuse",
        arrival_class: Callable[[Actor], str] = lambda _actor: "clinical",
        classify: Callable[[Actor, str], str] = lambda _actor, _modality: "clinical",
    ) -> None:
        # Where a new instance lands ("inbox" or "clinical") for the actor storing it: the
        # policy of the installation (imageshare.access.policy.arrival_class).
        self.arrival_class = arrival_class
        # The retention class of an arrival that is the archive's own, by the retention
        # policy's rules (source, modality): imageshare.retention.service.
        self.classify = classify
        self.blobs = blobs
        self.writer = writer
        self.audit = audit
        self.staging_dir = staging_dir
        self.overwrite = overwrite
        self.min_free_mb = min_free_mb
        self.patient_mismatch = patient_mismatch
        self.quarantine_dir = quarantine_dir or staging_dir.parent / "quarantine"
        self._blob_io = ThreadPoolExecutor(max_workers=16, thread_name_prefix="blob-io")
        self._known = KnownParents()
        writer.on_failure(self._known.clear)
        staging_dir.mkdir(parents=True, exist_ok=True)

    # -- room ------------------------------------------------------------------------------

    def check_room(self) -> None:
        """Raise :class:`OutOfResources` when the staging or blob disk has less free space than
        the floor (``min_free_disk_mb``): stores are refused cleanly before the disk is full."""
        if self.min_free_mb <= 0:
            return
        floor = self.min_free_mb << 20
        for folder in {self.staging_dir, getattr(self.blobs, "root", self.staging_dir)}:
            try:
                stat = os.statvfs(folder)
            except OSError:
                continue
            if stat.f_bavail * stat.f_frsize < floor:
                raise out_of_room(self.min_free_mb)

    # -- ways in -------------------------------------------------------------------------

    def staging_file(self) -> tuple[BinaryIO, Path]:
        """A new writable file in the staging area (same disk as the blobs when local)."""
        fd, name = tempfile.mkstemp(dir=self.staging_dir, suffix=".dcm")
        return os.fdopen(fd, "wb"), Path(name)

    def store_stream(
        self, stream: BinaryIO, actor: Actor, expected_study: str | None = None,
        review_site: str = "",
    ) -> StoreResult:
        """Store a Part 10 file read from ``stream`` (STOW-RS parts, uploads). With
        ``review_site`` (uploads) the instance waits for review in the ``upload`` class, listed
        under that name, and a patient mismatch is held rather than refused."""
        self.ensure_room(actor)
        out, path = self.staging_file()
        try:
            try:
                with out:
                    while chunk := stream.read(_CHUNK):
                        out.write(chunk)
            except OSError as exc:
                if no_room(exc):
                    self._audit_quietly(actor, "out of resources")
                    raise out_of_room() from exc
                raise
            return self.store_staged(path, actor, expected_study, review_site)
        finally:
            path.unlink(missing_ok=True)

    def store_copy(self, source: Path, actor: Actor) -> StoreResult:
        """Store a copy of the Part 10 file at ``source`` (import); ``source`` is untouched."""
        with open(source, "rb") as stream:
            return self.store_stream(stream, actor)

    def store_staged(
        self, path: Path, actor: Actor, expected_study: str | None = None,
        review_site: str = "",
    ) -> StoreResult:
        """Store the Part 10 file at ``path``, which the pipeline may move or delete.

        Returns only when the bytes are fsynced and the index commit containing them is done.
        Raises :class:`InvalidInstance`, :class:`ConflictingInstance` or (no room on the disk)
        :class:`OutOfResources`, changing nothing. ``expected_study`` refuses instances of
        any other study (STOW-RS to a study URL).
        """
        self.ensure_room(actor)
        try:
            return self._store_staged(path, actor, expected_study, review_site)
        except Exception as exc:
            if no_room(exc):
                self._audit_quietly(actor, "out of resources")
                raise out_of_room() from exc
            raise

    def ensure_room(self, actor: Actor) -> None:
        """:meth:`check_room`, auditing a refusal as a failed store by ``actor``."""
        try:
            self.check_room()
        except OutOfResources:
            self._audit_quietly(actor, "out of resources")
            raise

    def _audit_quietly(
        self, actor: Actor, reason: str, header: InstanceHeader | None = None
    ) -> None:
        """Audit a store that failed; the audit may fail for the same reason (a full disk, a
        database gone), which must not hide the first error."""
        try:
            self._audit_refusal(actor, "instance.store", reason, header, outcome="failure")
        except Exception as exc:  # noqa: BLE001 - the refusal itself is what counts
            log.warning("refusal could not be audited: %s", type(exc).__name__)

    def _store_staged(
        self, path: Path, actor: Actor, expected_study: str | None, review_site: str = "",
    ) -> StoreResult:
        key = new_blob_key()
        on_disk = Prerequisite()
        # Opened by descriptor: it stays readable while the file is moved into the store, and
        # pydicom (which stats the file object's name) sees a descriptor, not a stale path.
        with open(os.open(path, os.O_RDONLY), "rb") as fp:
            # Making the bytes durable (I/O, no GIL) runs beside parsing and the index SQL;
            # nothing is committed, and nothing acknowledged, before all of it is done.
            moving = self._blob_io.submit(store_file, self.blobs, key, path)

            def settled(done: Future[StoredBlob]) -> None:
                error = done.exception()
                if error is not None:
                    on_disk.failed(error)
                else:
                    on_disk.succeeded()

            moving.add_done_callback(settled)
            try:
                _ds, header = read_header(path, fp)
                if expected_study and header.study_uid != expected_study:
                    raise WrongStudy(
                        "the instance belongs to another study than the one in the request URL",
                        header.sop_class_uid, header.sop_instance_uid,
                    )
            except InvalidInstance as exc:
                self._discard(moving, key)
                self._audit_refusal(actor, "instance.store", str(exc), None)
                raise
            except BaseException:
                self._discard(moving, key)  # nothing was acknowledged: nothing may stay
                raise
        pending = self.writer.submit_async(
            lambda conn: self._index(conn, header, key, moving, actor, review_site), on_disk
        )
        try:
            moving.result()
        except BaseException:
            try:
                pending.result()
            except Exception:  # noqa: BLE001 - the storage error below is the one to report
                pass
            self._discard(moving, key)
            self._audit_quietly(actor, "the bytes could not be stored", header)
            raise
        try:
            outcome = pending.result()
        except BaseException as exc:
            self.blobs.delete(key)
            self._audit_quietly(actor, f"the index could not record it ({type(exc).__name__})",
                                header)
            raise
        if outcome.status in ("duplicate", "kept_first", "conflict"):
            self.blobs.delete(key)
        if outcome.obsolete_blob:
            self.blobs.delete(outcome.obsolete_blob)
        if outcome.status == "conflict":
            raise ConflictingInstance(
                outcome.reason, header.sop_class_uid, header.sop_instance_uid
            )
        return StoreResult(
            outcome=outcome.status,
            sop_class_uid=header.sop_class_uid,
            sop_instance_uid=header.sop_instance_uid,
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            warning=outcome.reason,
        )

    def _discard(self, moving: Future[StoredBlob], key: str) -> None:
        """Undo a move into the blob store (after it finished, whatever its outcome)."""
        try:
            moving.result()
        except Exception:  # noqa: BLE001 - nothing to undo if the move failed
            return
        self.blobs.delete(key)

    def parents_changed(self, conn: Connection | None = None) -> None:
        """Patients or studies were changed by something else (a correction, a merge): forget
        what is remembered about them, here and (counted in ``conn``'s transaction) in every
        other instance. Call it from the index writer's thread."""
        if conn is not None:
            parents_changed_in(conn)
        self._known.clear()

    def close(self) -> None:
        """Stop the blob I/O threads."""
        self._blob_io.shutdown(wait=True)

    # -- inside the index transaction ------------------------------------------------------

    def _index(
        self, conn: Connection, h: InstanceHeader, key: str, moving: Future[StoredBlob],
        actor: Actor, review_site: str = "",
    ) -> IndexOutcome:
        now = datetime.now(UTC)
        existing = find_instance(conn, h.sop_instance_uid)
        if existing is None:
            stored = moving.result()  # its digest goes into the row (the SQL above overlapped)
            # The caller's policy says whether another site sent it (then it waits in the
            # inbox for review) or it is the archive's own.
            # An upload waits for review (QC) in its own class, listed under its name.
            from_site = not review_site and self.arrival_class(actor) == "inbox"
            # Otherwise the retention policy's rules (source, modality) give its class.
            arrival = "upload" if review_site else (
                "inbox" if from_site else self.classify(actor, h.series["modality"]))
            outcome = index_instance(conn, h, key, stored.size, actor.source, now, self._known,
                                     retention_class=arrival,
                                     patient_mismatch=("hold" if review_site
                                                       else self.patient_mismatch),
                                     sha256=stored.sha256)
            site = review_site or actor.name
            if (from_site or review_site) and outcome.status == "stored":
                note_inbox_arrival(conn, h.study_uid, site, now)
            elif outcome.status == "held":
                note_inbox_arrival(conn, h.study_uid, site, now, outcome.reason)
        elif (existing.study_uid, existing.series_uid) != (h.study_uid, h.series_uid):
            outcome = IndexOutcome(
                "conflict",
                f"instance {h.sop_instance_uid} is already stored in another series or study",
            )
        else:
            stored = moving.result()  # compare with the new bytes once they are in the store
            if _same_content(self.blobs, existing, stored):
                outcome = IndexOutcome("duplicate")
            elif self.overwrite:
                outcome = replace_instance_blob(conn, existing, h, key, stored.size,
                                                actor.source, now, sha256=stored.sha256)
            else:
                outcome = IndexOutcome(
                    "kept_first",
                    "an instance with this SOP Instance UID but different content is already "
                    "stored; the stored one was kept",
                )
        self.audit.record(
            AuditEvent(
                actor=actor,
                action="instance.store",
                outcome="refused" if outcome.status == "conflict" else (
                    "success" if outcome.status in ("stored", "duplicate") else "warning"
                ),  # held: stored, with a warning
                patient_id=h.patient_id,
                study_uid=h.study_uid,
                instance_count=1,
                detail={
                    "sop_instance_uid": h.sop_instance_uid,
                    "result": outcome.status,
                    **({"reason": outcome.reason} if outcome.reason else {}),
                    **({"conflict": outcome.audit_reason} if outcome.audit_reason else {}),
                },
            ),
            conn,
        )
        return outcome

    def _audit_refusal(
        self, actor: Actor, action: str, reason: str, header: InstanceHeader | None,
        outcome: Literal["refused", "failure"] = "refused",
    ) -> None:
        self.audit.record(
            AuditEvent(
                actor=actor, action=action, outcome=outcome,
                patient_id=header.patient_id if header else "",
                study_uid=header.study_uid if header else "",
                detail={"reason": reason},
            )
        )

    # -- recovery ------------------------------------------------------------------------------

    def recover_unindexed(self, known_keys: set[str], actor: Actor, since: str = "",
                          until: str = "") -> int:
        """Index blobs (keys from ``since`` on, and before ``until`` if given) that are in the
        store but missing from the index, e.g. after a power loss took the last index commits.

        A blob that cannot be stored again (damaged, refused, or failing in any other way than
        the index being unreachable) is moved to the quarantine folder with a note of the
        reason, logged without patient data, and recovery goes on: one bad blob never stops
        the start."""
        recovered = 0
        for key in self.blobs.keys(since):
            if key in known_keys or (until and key >= until):
                continue
            out, path = self.staging_file()
            try:
                with out, self.blobs.open(key) as src:
                    while chunk := src.read(_CHUNK):
                        out.write(chunk)
            except (OSError, KeyError) as exc:
                path.unlink(missing_ok=True)
                log.error("start-up recovery: blob %s cannot be read (%s); left in place",
                          key, type(exc).__name__)
                continue
            try:
                self.store_staged(path, actor)
                recovered += 1
            except DBAPIError:
                path.unlink(missing_ok=True)
                raise  # the index is unreachable: the start fails and says so
            except Exception as exc:  # noqa: BLE001 - anything else about this one blob
                path.unlink(missing_ok=True)
                try:
                    self._quarantine(key, exc)
                except OSError as failed:
                    log.error("start-up recovery: blob %s could not be quarantined (%s); "
                              "left in place", key, type(failed).__name__)
                    continue
            path.unlink(missing_ok=True)
            self.blobs.delete(key)
        return recovered

    def _quarantine(self, key: str, exc: BaseException) -> None:
        """Keep a blob that recovery could not store in ``quarantine_dir`` for a person."""
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        target = self.quarantine_dir / f"{key}.dcm"
        with self.blobs.open(key) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, _CHUNK)
            out.flush()
            os.fsync(out.fileno())
        reason = str(exc) if isinstance(exc, InvalidInstance) else type(exc).__name__
        (self.quarantine_dir / f"{key}.txt").write_text(
            f"{datetime.now(UTC).isoformat()} not recovered: {reason}\n")
        log.warning("start-up recovery: blob %s could not be stored (%s); moved to %s",
                    key, type(exc).__name__, target)
