"""Retrieval of stored instances: which ones, their bytes, header metadata and frames."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import Dataset, dcmread
from pydicom.encaps import get_frame
from pydicom.uid import UID, ExplicitVRBigEndian
from sqlalchemy import Engine, select

from imageshare.access.scope import Scope
from imageshare.archive.dicom_json import BULK_DATA_THRESHOLD, dataset_json
from imageshare.archive.header import locate_pixel_data
from imageshare.archive.matching import is_universal_text, text_condition
from imageshare.archive.record import instance_in_record
from imageshare.archive.transcode import little_endian_value
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import Actor
from imageshare.domain.errors import InvalidQuery, NotFound, QueryTooBroad
from imageshare.storage.blobs import BlobStore, LocalBlobs, copy_to_file, local_copy
from imageshare.storage.index.schema import instances, patients, series, studies

BulkUri = Callable[["StoredInstance", str], str]


@dataclass(frozen=True)
class StoredInstance:
    """One stored instance and where it sits in the hierarchy."""

    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    blob_key: str
    size: int
    number_of_frames: int
    series_uid: str
    study_uid: str
    patient_id: str
    # SHA-256 (hex) of the blob as recorded at ingest (None for instances stored before 0013).
    sha256: str | None = None

    @property
    def copy_name(self) -> str:
        """The file name of a local copy made from this instance's stored bytes: its blob
        key (a correction writes a new one) and recorded digest, so that a copy is never
        taken for the bytes of another version of the instance."""
        digest = f"-{self.sha256[:16]}" if self.sha256 else ""
        return f"{self.blob_key}{digest}.dcm"


class RetrieveService:
    """Finds and reads stored instances; every selection is audited by the caller's purpose."""

    def __init__(self, engine: Engine, blobs: BlobStore, audit: AuditTrail,
                 scratch_dir: Path) -> None:
        self._engine = engine
        self.blobs = blobs
        self._audit = audit
        self._scratch = scratch_dir

    def select(
        self,
        actor: Actor,
        action: str,
        study_uids: Collection[str] = (),
        series_uids: Collection[str] = (),
        sop_uids: Collection[str] = (),
        patient_ids: Collection[str] = (),
        allowed_studies: Collection[str] | None = None,
        audit: bool = True,
        include_review: bool = False,
        issuer: str = "",
        detail: dict[str, str] | None = None,
        most: int | None = None,
        repeatable: bool = False,
    ) -> list[StoredInstance]:
        """Instances matching every given list of UIDs, audited as ``action`` (unless the
        caller audits the use itself and says ``audit=False``). Only instances of the record
        unless ``include_review`` (the inbox's own viewer): nothing waiting in the inbox.

        ``allowed_studies`` limits the selection to those studies; a :class:`Scope` limits it
        to the series and instances it grants. ``issuer`` (an Issuer of Patient ID key, matched
        as C-FIND matches it; empty or ``*``: any) limits ``patient_ids`` to patients of that
        issuer: a retrieve takes what a query with the same keys finds, never the patient of
        another issuer who has the same Patient ID. Raises :class:`NotFound` when nothing
        matches (also for UIDs outside the scope). ``detail`` goes into every audit event
        (a C-MOVE's destination). More matches than ``most`` (what a DIMSE retrieve can
        count) raise :class:`QueryTooBroad`, audited as a failure: nothing is sent.
        ``repeatable``: a part of a viewing (a frame, a rendering), recorded once per viewing
        (:meth:`AuditTrail.record`).
        """
        if not (study_uids or series_uids or sop_uids or patient_ids):
            raise InvalidQuery("a retrieve must name a patient, study, series or instance")
        stmt = (
            select(
                instances.c.sop_uid, instances.c.sop_class_uid, instances.c.transfer_syntax,
                instances.c.blob_key, instances.c.size, instances.c.number_of_frames,
                series.c.series_uid, studies.c.study_uid, patients.c.patient_id,
                instances.c.sha256,
            )
            .join(series, series.c.pk == instances.c.series_pk)
            .join(studies, studies.c.pk == series.c.study_pk)
            .join(patients, patients.c.pk == studies.c.patient_pk)
            .order_by(series.c.series_number, series.c.pk, instances.c.instance_number,
                      instances.c.pk)
        )
        if not include_review:
            stmt = stmt.where(instance_in_record())
        if study_uids:
            stmt = stmt.where(studies.c.study_uid.in_(list(study_uids)))
        if series_uids:
            stmt = stmt.where(series.c.series_uid.in_(list(series_uids)))
        if sop_uids:
            stmt = stmt.where(instances.c.sop_uid.in_(list(sop_uids)))
        if patient_ids:
            stmt = stmt.where(patients.c.patient_id.in_(list(patient_ids)))
        if issuer and not is_universal_text(issuer, "LO"):
            stmt = stmt.where(text_condition(patients.c.issuer, issuer, "LO"))
        if isinstance(allowed_studies, Scope):
            stmt = stmt.where(allowed_studies.condition(
                studies.c.study_uid, series.c.series_uid, instances.c.sop_uid))
        elif allowed_studies is not None:
            stmt = stmt.where(studies.c.study_uid.in_(list(allowed_studies)))
        with self._engine.connect() as conn:
            found = [StoredInstance(**row._asdict()) for row in conn.execute(stmt)]
        if most is not None and len(found) > most:
            # Short enough for a DIMSE Error Comment (64 characters) as it stands.
            reason = f"{len(found)} instances match: retrieve by study or series"
            if audit:
                self._audit.record([AuditEvent(
                    actor=actor, action=action, outcome="failure", study_uid=uid,
                    detail={**(detail or {}), "reason": reason})
                    for uid in sorted({i.study_uid for i in found})[:100]])
            raise QueryTooBroad(reason)
        by_study: dict[str, list[StoredInstance]] = {}
        for inst in found:
            by_study.setdefault(inst.study_uid, []).append(inst)
        events = [
            AuditEvent(
                actor=actor, action=action, outcome="success", patient_id=items[0].patient_id,
                study_uid=study_uid, instance_count=len(items), detail=dict(detail or {}),
            )
            for study_uid, items in by_study.items()
        ] or [
            AuditEvent(
                actor=actor, action=action, outcome="failure",
                study_uid=next(iter(study_uids), ""),
                detail={**(detail or {}), "reason": "not found"},
            )
        ]
        if audit:
            self._audit.record(events, repeatable=repeatable)
        if not found:
            raise NotFound("no such study, series or instance")
        return found

    def document_title(self, sop_uid: str) -> tuple[str, str]:
        """(Document Title, Content Date) of a stored document, for listing it; not audited
        (the caller shows it as part of an audited view)."""
        ds = self.header(sop_uid)
        if ds is None:
            return "", ""
        return str(ds.get("DocumentTitle", "") or ""), str(ds.get("ContentDate", "") or "")

    def patients_headers(self, found: Iterable[StoredInstance]) -> list[Dataset]:
        """One stored header per patient of ``found`` (not audited, as :meth:`header`)."""
        first: dict[str, str] = {}
        for inst in found:
            first.setdefault(inst.patient_id, inst.sop_uid)
        return [h for h in (self.header(uid) for uid in first.values()) if h is not None]

    def header(self, sop_uid: str) -> Dataset | None:
        """The stored header of an instance (large values not loaded), or None; not audited:
        for services that audit the view they are part of."""
        with self._engine.connect() as conn:
            blob_key = conn.execute(select(instances.c.blob_key)
                                    .where(instances.c.sop_uid == sop_uid)).scalar()
        if blob_key is None:
            return None
        with self.blobs.open(blob_key) as fp:
            ds = dcmread(fp, stop_before_pixels=True, defer_size="64 KB")
            for element in ds.iterall():  # load small values before the file closes
                _ = element.value if element.VR not in ("OB", "OW", "UN") else None
        return ds

    def open(self, inst: StoredInstance) -> BinaryIO:
        """The stored Part 10 bytes of ``inst`` as received."""
        return self.blobs.open(inst.blob_key)

    def local_file(self, inst: StoredInstance, folder: Path) -> Path:
        """A lasting local file with the instance's bytes: the store's own file when it is
        local, else a copy in ``folder`` named by what it was made from
        (:attr:`StoredInstance.copy_name`: the blob key and its digest), made once and
        written whole under a temporary name before it appears. A changed instance has a new
        blob key, so a copy of its old bytes is never returned; the caller removes copies it
        no longer needs."""
        if isinstance(self.blobs, LocalBlobs):
            return self.blobs.local_path(inst.blob_key)
        target = folder / inst.copy_name
        if not target.exists():
            copy_to_file(self.blobs, inst.blob_key, target)  # temporary file, then rename
        return target

    @contextmanager
    def local_files(self, found: list[StoredInstance]) -> Iterator[list[Path]]:
        """Local files with the instances' bytes while the block runs, for libraries that
        want paths: the store's own files, or temporary copies when it is not local."""
        with ExitStack() as stack:
            yield [stack.enter_context(local_copy(self.blobs, inst.blob_key, self._scratch))
                   for inst in found]

    def header_json(self, blob_key: str, bulk_uri: Callable[[str], str] | None = None) -> dict:
        """DICOM JSON of the header (pixel data and other large binary values, at any depth,
        as BulkDataURIs named by ``bulk_uri(path)``, or left out without ``bulk_uri``).

        Never fails on a stored value: see :func:`dataset_json`.
        """
        with self.blobs.open(blob_key) as fp:
            ds = dcmread(fp, stop_before_pixels=True, defer_size=BULK_DATA_THRESHOLD)
            pixel_tag = _next_tag(fp, str(ds.file_meta.get("TransferSyntaxUID", "")))
            result = dataset_json(ds, bulk_uri, BULK_DATA_THRESHOLD, _uid_of(ds))
        if pixel_tag is not None and bulk_uri:
            syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
            vr = {0x7FE00008: "OF", 0x7FE00009: "OD"}.get(pixel_tag, "OB")
            if pixel_tag == 0x7FE00010 and not syntax.is_compressed:
                vr = "OW" if _bits_allocated(ds) > 8 else "OB"
            result[f"{pixel_tag:08X}"] = {"vr": vr, "BulkDataURI": bulk_uri(f"{pixel_tag:08X}")}
        return result

    def bulk_data(self, inst: StoredInstance, path: str) -> tuple[str, bytes]:
        """(VR, value) of the attribute a BulkDataURI path names (``tag`` or
        ``tag/item/tag...``, items numbered from 1); binary values little endian.

        Raises :class:`NotFound` when the path names nothing.
        """
        parts = [p for p in path.strip("/").split("/") if p]
        tags, items = parts[0::2], parts[1::2]
        try:
            numbers = [int(t, 16) for t in tags]
            indexes = [int(i) for i in items]
        except ValueError as exc:
            raise NotFound("no such bulk data") from exc
        if not numbers or len(indexes) != len(numbers) - 1 or any(i < 1 for i in indexes):
            raise NotFound("no such bulk data")
        with self.blobs.open(inst.blob_key) as fp:
            ds = dcmread(fp, stop_before_pixels=numbers[0] < 0x7FE00008)
        current: Any = ds
        try:
            for depth, tag in enumerate(numbers):
                element = current[tag]
                if depth < len(indexes):
                    current = element.value[indexes[depth] - 1]
        except (KeyError, IndexError, TypeError) as exc:
            raise NotFound("no such bulk data") from exc
        value = element.value
        vr = str(element.VR)
        if isinstance(value, bytes | bytearray):
            return vr, little_endian_value(vr, bytes(value), inst.transfer_syntax)
        if value is None:
            return vr, b""
        return vr, str(value).encode("utf-8")

    def frames(self, inst: StoredInstance, numbers: list[int]) -> Iterator[bytes]:
        """The stored bytes of the given frames (1-based): raw pixels or compressed fragments."""
        with self.blobs.open(inst.blob_key) as fp:
            size = _size(fp)
            ds = dcmread(fp, stop_before_pixels=True)
            location = locate_pixel_data(fp, size, inst.transfer_syntax)
            if location is None:
                raise NotFound("the instance has no pixel data")
            total = int(ds.get("NumberOfFrames", 1) or 1)
            for number in numbers:
                if not 1 <= number <= total:
                    raise NotFound(f"frame {number} does not exist (the instance has {total})")
            if location.length is not None:
                frame_size = _native_frame_size(ds)
                for number in numbers:
                    start = location.value_offset + (number - 1) * frame_size
                    with self.blobs.open_range(inst.blob_key, start, frame_size) as frame:
                        yield frame.read()
                return
            for number in numbers:
                fp.seek(location.value_offset)
                yield get_frame(fp, number - 1, number_of_frames=total)


def _next_tag(fp: BinaryIO, transfer_syntax: str) -> int | None:
    """The tag of the element at ``fp``'s position (where pixel data starts), if any."""
    head = fp.read(4)
    if len(head) < 4:
        return None
    endian = ">" if transfer_syntax == ExplicitVRBigEndian else "<"
    group, element = struct.unpack(endian + "HH", head)
    tag = group << 16 | element
    return tag if tag in (0x7FE00008, 0x7FE00009, 0x7FE00010) else None


def _uid_of(ds: Dataset) -> str:
    try:
        return str(ds.get("SOPInstanceUID", "") or "")
    except Exception:  # noqa: BLE001 - an undecodable UID names nothing
        return ""


def _bits_allocated(ds: Dataset) -> int:
    try:
        return int(ds.get("BitsAllocated", 8) or 8)
    except (TypeError, ValueError):
        return 8


def _size(fp: BinaryIO) -> int:
    here = fp.tell()
    end = fp.seek(0, os.SEEK_END)
    fp.seek(here)
    return end


def _native_frame_size(ds: Any) -> int:
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.BitsAllocated)
    if bits == 1:
        return (rows * cols * samples + 7) // 8
    return rows * cols * samples * (bits // 8)

