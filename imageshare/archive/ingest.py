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
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Literal

from pydicom import Dataset
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from imageshare.archive.file_meta import copy_with_dataset_meta, meta_disagrees
from imageshare.archive.header import InstanceHeader, read_header
from imageshare.archive.index_writer import IndexWriter, Prerequisite
from imageshare.archive.indexing import (
    ExistingInstance,
    IndexOutcome,
    KnownParents,
    RacedAnotherWriter,
    find_instance,
    index_instance,
    note_inbox_arrival,
    parents_changed_in,
    patient_differs,
    replace_instance_blob,
)
from imageshare.archive.ingest_compare import same_instance
from imageshare.archive.rejections import rejection_of
from imageshare.archive.tombstones import remove_blobs
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import SYSTEM, Actor
from imageshare.domain.errors import (
    ConflictingInstance,
    InvalidInstance,
    OutOfResources,
    StorageError,
    WrongStudy,
)
from imageshare.storage.blobs import (
    BlobStore,
    StoredBlob,
    digest_of,
    new_blob_key,
    store_file,
    sync_folders,
)
from imageshare.storage.files import owned_prefix

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


class SopClassMismatch(InvalidInstance):
    """The data set's SOP Class UID is not the one its C-STORE request named (PS3.4 B.2.3:
    Error: Data Set does not match SOP Class)."""

    dicom_status = 0xA900


def check_announced(header: InstanceHeader, announced: tuple[str, str]) -> None:
    """Refuse a data set whose SOP Class or SOP Instance UID is not the (class, instance)
    ``announced`` for it (a C-STORE request's Affected SOP Class and Instance UIDs): it
    would be stored with a File Meta Information saying one thing and a data set another."""
    sop_class, sop_instance = (uid.strip().rstrip("\x00") for uid in announced)
    if header.sop_class_uid != sop_class:
        raise SopClassMismatch("SOP Class UID differs from Affected SOP Class UID",
                               header.sop_class_uid, header.sop_instance_uid)
    if header.sop_instance_uid != sop_instance:
        raise InvalidInstance("SOP Instance UID differs from Affected SOP Instance UID",
                              header.sop_class_uid, header.sop_instance_uid)


@dataclass(frozen=True)
class StoreResult:
    """The answer to one stored instance. ``warning`` is set when stored data was kept;
    ``dataset`` is the instance's header as it was read (no pixel data)."""

    outcome: Outcome
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    warning: str = ""
    dataset: Dataset | None = field(default=None, repr=False, compare=False)


def _same_content(blobs: BlobStore, existing: ExistingInstance, new: StoredBlob,
                  new_key: str) -> bool:
    """Whether the stored instance is the one newly stored under ``new_key``: the same bytes
    (by digest), or else an equal data set whatever the File Meta Information says
    (:func:`imageshare.archive.ingest_compare.same_instance`)."""
    if existing.size == new.size:
        if existing.sha256:
            if existing.sha256 == new.sha256:
                return True
        else:
            with blobs.open(existing.blob_key) as fh:  # stored before digests were recorded
                if digest_of(fh).sha256 == new.sha256:
                    return True
    return same_instance(blobs, existing.blob_key, new_key)


def check_study(header: InstanceHeader, expected_study: str | None,
                requested: Collection[str] | None = None) -> None:
    """Raise :class:`WrongStudy` for an instance of another study than ``expected_study``
    (STOW-RS to a study URL) or of none of the ``requested`` ones (C-MOVE sub-operations)."""
    if expected_study and header.study_uid != expected_study:
        raise WrongStudy("the instance belongs to another study than the one in the request URL",
                         header.sop_class_uid, header.sop_instance_uid)
    if requested is not None and header.study_uid not in requested:
        raise WrongStudy("the instance belongs to none of the studies this archive asked the "
                         "caller to send", header.sop_class_uid, header.sop_instance_uid)


def received_from(actor: Actor) -> str:
    """Who an instance came from, as the index records it: ``NAME@ADDRESS`` (a DICOM node's
    actor carries it already; an account's is its name at its address), so that what one
    sender sent can be told from another's in the same study."""
    if actor.kind == "user" and "@" not in actor.source:
        return f"{actor.name}@{actor.source}"
    return actor.source


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
        # Whether a legal hold covers a study (imageshare.retention.facts.study_on_hold): its
        # stored content is evidence, never replaced.
        self.on_hold: Callable[[Connection, str], bool] = lambda _conn, _uid: False
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
        fd, name = tempfile.mkstemp(dir=self.staging_dir, prefix=owned_prefix(), suffix=".dcm")
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
        review_site: str = "", announced: tuple[str, str] | None = None,
        requested: Collection[str] | None = None,
    ) -> StoreResult:
        """Store the Part 10 file at ``path``, which the pipeline may move or delete.

        Returns only when the bytes are fsynced and the index commit containing them is done.
        Raises :class:`InvalidInstance`, :class:`ConflictingInstance` or (no room on the disk)
        :class:`OutOfResources`, changing nothing. ``expected_study`` refuses instances of
        any other study (STOW-RS to a study URL); ``announced`` (SOP Class UID, SOP Instance
        UID), those of any other class or instance (:func:`check_announced`: C-STORE);
        ``requested`` (the studies this archive asked the caller to send: C-MOVE), those of
        any other study.
        """
        self.ensure_room(actor)
        try:
            return self._store_staged(path, actor, expected_study, review_site, announced,
                                      requested)
        except Exception as exc:
            if no_room(exc):
                self._audit_quietly(actor, "out of resources")
                raise out_of_room() from exc
            raise

    def store_staged_many(
        self, paths: list[Path], actor: Actor, expected_study: str | None = None,
    ) -> list[StoreResult | Exception]:
        """Store the Part 10 files at ``paths`` (the parts of one STOW-RS request), which the
        pipeline may move or delete, as one :class:`StoreBatch`: for each file, in order,
        what :meth:`store_staged` would return for it, or the error it would raise."""
        batch = self.begin_batch(actor, expected_study)
        for path in paths:
            batch.add(path)
        return batch.finish()

    def begin_batch(self, actor: Actor, expected_study: str | None = None) -> StoreBatch:
        """A :class:`StoreBatch` for files stored by ``actor`` (of ``expected_study`` only,
        when given)."""
        return StoreBatch(self, actor, expected_study)

    def _parse_staged(self, path: Path, reader: BinaryIO, expected_study: str | None
                      ) -> tuple[InstanceHeader, Dataset | None]:
        """The checked header of the file open as ``reader`` (closed on return), and its
        data set when the file meta information must be rewritten (:func:`meta_disagrees`).
        """
        with reader:
            ds, header = read_header(path, reader)
        check_study(header, expected_study)
        return header, (ds if meta_disagrees(ds) else None)

    def _with_dataset_meta(self, moving: Future[StoredBlob], key: str, ds: Dataset) -> Path:
        """A staged copy of the blob being stored under ``key`` whose file meta information
        names the data set ``ds``; the blob itself is discarded."""
        moving.result()
        try:
            return copy_with_dataset_meta(self.blobs, key, ds, self.staging_dir)
        finally:
            self._discard(moving, key)

    def _index_many(
        self, conn: Connection,
        batch: list[tuple[int, InstanceHeader, str, Future[StoredBlob]]], actor: Actor,
        refusals: list[AuditEvent],
    ) -> dict[int, IndexOutcome | Exception]:
        """Index a batch inside ``conn``'s transaction and audit every file with one write. A
        file that fails, or whose bytes could not be stored, leaves no row: the files are
        indexed together in one savepoint and, if any of them fails, again each in its own."""
        results: dict[int, IndexOutcome | Exception] = {}
        events = list(refusals)
        ready = []
        for i, h, key, moving in batch:
            try:
                moving.result()
            except Exception as exc:  # noqa: BLE001 - reported for this file alone
                results[i] = exc
                events.append(self._refusal_event(
                    actor, "instance.store",
                    "out of resources" if no_room(exc) else "the bytes could not be stored",
                    h, outcome="failure"))
                continue
            ready.append((i, h, key, moving))
        together: list[tuple[int, InstanceHeader, IndexOutcome]] | None = None
        if len(ready) > 1:
            try:
                with conn.begin_nested():  # the common case: one savepoint for all
                    together = [(i, h, self._index_only(conn, h, key, moving, actor))
                                for i, h, key, moving in ready]
            except Exception:  # noqa: BLE001 - rolled back; each file again on its own below
                self._known.clear()  # what it remembered may name rolled-back rows
        if together is not None:
            for i, h, outcome in together:
                results[i] = outcome
                events.append(self._stored_event(actor, h, outcome))
            self.audit.record(events, conn)
            return results
        for i, h, key, moving in ready:
            for attempt in (1, 2):
                try:
                    with conn.begin_nested():
                        outcome = self._index_only(conn, h, key, moving, actor)
                except Exception as exc:  # noqa: BLE001 - this file's rows were rolled back
                    self._known.clear()  # what it remembered may name rolled-back rows
                    raced = isinstance(exc, IntegrityError | OperationalError
                                       | RacedAnotherWriter)
                    if raced and attempt == 1:
                        continue  # another process took a row meanwhile: once more, fresh
                    results[i] = exc
                    events.append(self._refusal_event(
                        actor, "instance.store",
                        f"the index could not record it ({type(exc).__name__})", h,
                        outcome="failure"))
                    break
                results[i] = outcome
                events.append(self._stored_event(actor, h, outcome))
                break
        self.audit.record(events, conn)
        return results

    def _audit_quietly_many(self, events: list[AuditEvent]) -> None:
        """Audit failed stores in one write; like :meth:`_audit_quietly`, a failing audit
        does not hide the first error."""
        try:
            self.audit.record(events)
        except Exception as exc:  # noqa: BLE001 - the refusal itself is what counts
            log.warning("refusals could not be audited: %s", type(exc).__name__)

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
        announced: tuple[str, str] | None = None, requested: Collection[str] | None = None,
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
                ds, header = read_header(path, fp)
                if announced is not None:
                    check_announced(header, announced)
                check_study(header, expected_study, requested)
                fixed = self._with_dataset_meta(moving, key, ds) if meta_disagrees(ds) else None
            except InvalidInstance as exc:
                self._discard(moving, key)
                self._audit_refusal(actor, "instance.store", str(exc), None)
                raise
            except BaseException:
                self._discard(moving, key)  # nothing was acknowledged: nothing may stay
                raise
        if fixed is not None:
            try:
                return self._store_staged(fixed, actor, expected_study, review_site, announced,
                                          requested)
            finally:
                fixed.unlink(missing_ok=True)
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
        return self._settle(header, key, outcome)

    def _settle(self, header: InstanceHeader, key: str, outcome: IndexOutcome) -> StoreResult:
        """After the commit: drop the blobs the index did not keep; the answer (or raise
        :class:`ConflictingInstance`)."""
        if outcome.status in ("duplicate", "kept_first", "conflict"):
            self.blobs.delete(key)
        if outcome.obsolete_blob:
            remove_blobs(self.blobs, self.writer, [outcome.obsolete_blob])
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
            dataset=header.dataset,
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
        outcome = self._index_only(conn, h, key, moving, actor, review_site)
        self.audit.record(self._stored_event(actor, h, outcome), conn)
        return outcome

    def _index_only(
        self, conn: Connection, h: InstanceHeader, key: str, moving: Future[StoredBlob],
        actor: Actor, review_site: str = "",
    ) -> IndexOutcome:
        """Index one instance whose bytes are (being) stored under ``key``; not audited."""
        now = datetime.now(UTC)
        existing = find_instance(conn, h.sop_instance_uid)
        rejection = rejection_of(conn, h.sop_instance_uid) if existing is None else None
        if rejection is not None:
            outcome = IndexOutcome("conflict", rejection.reason(h.sop_instance_uid),
                                   audit_reason="deleted by an approved deletion")
        elif existing is None:
            stored = moving.result()  # its digest goes into the row (the SQL above overlapped)
            # The caller's policy says whether another site sent it (then it waits in the
            # inbox for review) or it is the archive's own.
            # An upload waits for review (QC) in its own class, listed under its name.
            from_site = not review_site and self.arrival_class(actor) == "inbox"
            # Otherwise the retention policy's rules (source, modality) give its class.
            arrival = "upload" if review_site else (
                "inbox" if from_site else self.classify(actor, h.series["modality"]))
            outcome = index_instance(conn, h, key, stored.size, received_from(actor), now,
                                     self._known,
                                     retention_class=arrival,
                                     # Another hospital's patient under one of our
                                     # numbers waits for a person, never refused: their
                                     # push may be urgent, and nothing of it is filed.
                                     patient_mismatch=("hold" if review_site or from_site
                                                       else self.patient_mismatch),
                                     sha256=stored.sha256,
                                     under_review=bool(review_site) or from_site,
                                     # found again by start-up recovery: origin unknown
                                     joins_waiting=actor == SYSTEM)
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
            if _same_content(self.blobs, existing, stored, key):
                outcome = IndexOutcome("duplicate")
            elif (self.overwrite and self._may_replace(conn, h, actor, review_site)
                  and self.on_hold(conn, h.study_uid)):
                outcome = IndexOutcome(
                    "kept_first", "the study is under a legal hold: the stored version of "
                    "this instance was kept and the new one not stored")
            elif self.overwrite and self._may_replace(conn, h, actor, review_site):
                outcome = replace_instance_blob(conn, existing, h, key, stored.size,
                                                received_from(actor), now,
                                                sha256=stored.sha256)
            else:
                outcome = IndexOutcome(
                    "kept_first",
                    "an instance with this SOP Instance UID but different content is already "
                    "stored; the stored one was kept",
                )
        return outcome

    def _may_replace(self, conn: Connection, h: InstanceHeader, actor: Actor,
                     review_site: str) -> bool:
        """With ``overwrite`` on: a new version of a stored instance replaces it only when it
        is the archive's own arrival (not another site's, nor an upload, which wait for a
        person, nor what the archive's own processes store: a retrieval from another site,
        start-up recovery) and names the same patient as the study it is in."""
        if review_site or actor.role == "system" or self.arrival_class(actor) != "clinical":
            return False
        study = self._known.study(conn, h.study_uid)
        return study is not None and (study.patient_id, study.issuer) == (
            h.patient_id, h.issuer) and not patient_differs(h, study.name_norm,
                                                             study.birth_date)

    @staticmethod
    def _stored_event(actor: Actor, h: InstanceHeader, outcome: IndexOutcome) -> AuditEvent:
        """The audit event of one instance the index took (or refused as a conflict)."""
        return AuditEvent(
            actor=actor,
            action="instance.store",
            outcome="refused" if outcome.status == "conflict" else (
                "success" if outcome.status in ("stored", "duplicate") else "warning"
            ),  # held: stored, with a warning
            patient_id=h.patient_id,
            issuer=h.issuer,  # known: the trail need not look it up (ingest's hot path)
            study_uid=h.study_uid,
            instance_count=1,
            detail={
                "sop_instance_uid": h.sop_instance_uid,
                "result": outcome.status,
                **({"reason": outcome.reason} if outcome.reason else {}),
                **({"conflict": outcome.audit_reason} if outcome.audit_reason else {}),
            },
        )

    def _audit_refusal(
        self, actor: Actor, action: str, reason: str, header: InstanceHeader | None,
        outcome: Literal["refused", "failure"] = "refused",
    ) -> None:
        self.audit.record(self._refusal_event(actor, action, reason, header, outcome))

    @staticmethod
    def _refusal_event(
        actor: Actor, action: str, reason: str, header: InstanceHeader | None,
        outcome: Literal["refused", "failure"] = "refused",
    ) -> AuditEvent:
        return AuditEvent(
            actor=actor, action=action, outcome=outcome,
            patient_id=header.patient_id if header else "",
            issuer=header.issuer if header else "",
            study_uid=header.study_uid if header else "",
            detail={"reason": reason},
        )

    # -- recovery ------------------------------------------------------------------------------

    def recover_unindexed(self, known_keys: set[str], actor: Actor, since: str = "",
                          until: str = "",
                          referenced: Callable[[str], bool] = lambda _key: False) -> int:
        """Index blobs (keys from ``since`` on, and before ``until`` if given) that are in the
        store but missing from the index, e.g. after a power loss took the last index commits.

        ``known_keys`` (read before the listing) skips the keys indexed already; ``referenced``
        asks the index again, for each other key, at the moment it is handled and once more
        before the blob is removed: a blob another instance indexed meanwhile is left alone,
        never removed from under its row.

        A blob that cannot be stored again (damaged, refused, or failing in any other way than
        the index being unreachable) is moved to the quarantine folder with a note of the
        reason, logged without patient data, and recovery goes on: one bad blob never stops
        the start."""
        recovered = 0
        for key in self.blobs.keys(since):
            if key in known_keys or (until and key >= until) or referenced(key):
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
                if self.store_staged(path, actor).outcome == "stored":
                    recovered += 1
            except DBAPIError:
                path.unlink(missing_ok=True)
                raise  # the index is unreachable: the start fails and says so
            except Exception as exc:  # noqa: BLE001 - anything else about this one blob
                path.unlink(missing_ok=True)
                if referenced(key):
                    continue  # indexed by its writer meanwhile: nothing to quarantine
                try:
                    self._quarantine(key, exc)
                except OSError as failed:
                    log.error("start-up recovery: blob %s could not be quarantined (%s); "
                              "left in place", key, type(failed).__name__)
                    continue
            path.unlink(missing_ok=True)
            # The instance is in the index now (stored again under a new key, or by the
            # instance that wrote this blob, which may have used this very key): this copy
            # goes only if no row refers to it. No later commit can refer to it: its instance
            # is indexed, so a writer still on its way finds it a duplicate.
            if not referenced(key):
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


@dataclass
class _BatchFile:
    """One file of a :class:`StoreBatch` and the work started for it."""

    key: str
    move: Future[StoredBlob] | None = None
    parse: Future[tuple[InstanceHeader, Dataset | None]] | None = None
    answer: StoreResult | Exception | None = None


class StoreBatch:
    """The files of one STOW-RS request, stored as one unit of work.

    Each file added is moved into the blob store, fsynced and parsed at once, in the
    background, while the next ones arrive; :meth:`finish` then fsyncs each blob folder once,
    indexes every file in one transaction (in one savepoint; each file in its own when one of
    them fails, so that it alone is refused), and writes their audit events (one per file,
    refusals included) in that transaction. A file that is refused, or whose bytes or index
    rows cannot be stored, changes nothing else. When :meth:`finish`
    returns every stored file is fsynced and its index commit done; if that commit fails,
    every file fails and nothing of the batch stays. A batch that is not finished (the body
    was malformed, too large, or cut) is :meth:`abandon`-ed: nothing of it stays.
    """

    def __init__(self, service: IngestService, actor: Actor,
                 expected_study: str | None = None) -> None:
        self._service = service
        self._actor = actor
        self._expected_study = expected_study
        self._files: list[_BatchFile] = []
        self._refusals: list[AuditEvent] = []
        self._finishing = False

    def add(self, path: Path) -> None:
        """Start storing the Part 10 file at ``path`` (the batch moves or deletes it)."""
        service = self._service
        entry = _BatchFile(new_blob_key())
        self._files.append(entry)
        try:
            # Opened by descriptor: readable while the file is moved into the store.
            reader = open(os.open(path, os.O_RDONLY), "rb")  # noqa: SIM115 - closed by the parse
        except OSError as exc:
            entry.answer = exc
            self._refusals.append(service._refusal_event(
                self._actor, "instance.store", "the bytes could not be stored", None,
                outcome="failure"))
            return
        # Making the bytes durable (I/O, no GIL) and parsing run beside the next arrivals;
        # the folders are fsynced once in finish(), before anything is committed.
        entry.move = service._blob_io.submit(store_file, service.blobs, entry.key, path, False)
        entry.parse = service._blob_io.submit(service._parse_staged, path, reader,
                                              self._expected_study)

    def _restage(self, entry: _BatchFile, ds: Dataset) -> InstanceHeader:
        """Store ``entry`` again with file meta information naming its data set ``ds``
        (:func:`meta_disagrees`); the header of the new file."""
        service = self._service
        assert entry.move is not None
        fixed = service._with_dataset_meta(entry.move, entry.key, ds)
        entry.key = new_blob_key()
        reader = open(os.open(fixed, os.O_RDONLY), "rb")  # noqa: SIM115 - closed by the parse
        # The move removes the file; the parse reads it through the descriptor.
        entry.move = service._blob_io.submit(store_file, service.blobs, entry.key, fixed, False)
        try:
            header, _again = service._parse_staged(fixed, reader, self._expected_study)
        except BaseException:
            wait([entry.move])
            fixed.unlink(missing_ok=True)
            raise
        return header

    @property
    def finishing(self) -> bool:
        """True once :meth:`finish` was called (then :meth:`abandon` does nothing)."""
        return self._finishing

    def abandon(self) -> None:
        """Undo the work started unless the batch was finished: no blob of it stays."""
        if self._finishing:
            return
        self._undo()

    def _undo(self) -> None:
        for entry in self._files:
            if entry.parse is not None:
                wait([entry.parse])  # its reader is closed
            if entry.move is not None:
                self._service._discard(entry.move, entry.key)

    def finish(self) -> list[StoreResult | Exception]:
        """Store the files added, as one unit; per file, in order, its result or the error
        :meth:`IngestService.store_staged` would raise for it."""
        service, actor = self._service, self._actor
        files = self._files
        self._finishing = True
        if not files:
            return []
        try:
            service.ensure_room(actor)
        except OutOfResources as exc:
            self._undo()
            return [exc] * len(files)
        refusals = list(self._refusals)
        batch: list[tuple[int, InstanceHeader, str, Future[StoredBlob]]] = []
        for i, entry in enumerate(files):
            if entry.parse is None or entry.move is None:
                continue
            try:
                header, ds = entry.parse.result()
                if ds is not None:
                    header = self._restage(entry, ds)
                batch.append((i, header, entry.key, entry.move))
            except InvalidInstance as exc:
                entry.answer = exc
                refusals.append(service._refusal_event(actor, "instance.store", str(exc), None))
            except Exception as exc:  # noqa: BLE001 - this file fails, the others go on
                entry.answer = exc
        on_disk = Prerequisite()
        pending = service.writer.submit_async(
            lambda conn: service._index_many(conn, batch, actor, refusals), on_disk)
        try:
            wait([moving for _i, _h, _k, moving in batch])
            sync_folders(service.blobs, [key for _i, _h, key, moving in batch
                                         if moving.exception() is None])
        except BaseException as exc:
            on_disk.failed(exc)  # the index change fails with it: nothing is committed
        else:
            on_disk.succeeded()
        try:
            indexed = pending.result()
        except Exception as exc:
            # Nothing of the batch was committed: no blob of it may stay.
            for entry in files:
                if entry.move is not None:
                    service._discard(entry.move, entry.key)
            service._audit_quietly_many(refusals + [
                service._refusal_event(actor, "instance.store",
                                       f"the index could not record it ({type(exc).__name__})",
                                       h, outcome="failure") for _i, h, _k, _m in batch])
            failure = out_of_room() if no_room(exc) else exc
            return [e.answer if e.answer is not None else failure for e in files]
        headers = {i: h for i, h, _k, _m in batch}
        for i, entry in enumerate(files):
            if entry.move is None:
                continue
            result = indexed.get(i)
            if i not in headers or not isinstance(result, IndexOutcome):
                service._discard(entry.move, entry.key)  # refused, or not indexed: not kept
                if isinstance(result, Exception):
                    entry.answer = out_of_room() if no_room(result) else result
                continue
            try:
                entry.answer = service._settle(headers[i], entry.key, result)
            except ConflictingInstance as exc:
                entry.answer = exc
        return [e.answer if e.answer is not None else StorageError("the file was not stored")
                for e in files]
