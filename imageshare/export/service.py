"""Exports from the archive: a study or some of its series, identifiable or de-identified, as
ZIP, DICOMDIR media (zipped), MP4 of cine loops or PNG/JPEG stills; a background job with
progress; every export audited. Every de-identified file (DICOM, video or still) is checked by
the verifier before it is added, and the export's names and DICOMDIR once it is complete.

An export is a copy of the instances as they were when it was asked for: it is made only if
they are all still there unchanged when the job runs, and handed out only while they still
are (an instance corrected to another patient, or deleted, makes the export stale: the
download is refused and the export can be asked for again)."""

from __future__ import annotations

import hashlib
import io
import shutil
import tempfile
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import Dataset, dcmread

from imageshare.access.scope import Grant, Scope, narrows
from imageshare.archive.retrieve import RetrieveService, StoredInstance
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.deid.service import Deidentifier, seekable
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError, NotFound, OutOfResources
from imageshare.export.media import cine_to_mp4, still_image
from imageshare.export.writers import DicomdirWriter, Numbering, ZipWriter
from imageshare.jobs import Job, JobInterrupted, JobQueue, actor_from, actor_params
from imageshare.jobs.queue import KEEP, failure_reason
from imageshare.storage.blobs import BlobStore, copy_to_file, new_blob_key, store_file
from imageshare.verify import SourceIdentity

FORMATS = ("zip", "dicomdir", "mp4", "png", "jpeg")
# Room kept free besides an export's own estimated size (bytes): staging copies, the zip's
# directory, the index's own writes.
HEADROOM = 64 << 20
EXPIRED = (f"the export has expired (exports are handed out for {KEEP.total_seconds() / 3600:g} "
           "hours after they are ready): make it again")
STALE = ("the study changed after this export was made (images corrected or deleted); nothing "
         "was handed out: make the export again")


@dataclass(frozen=True)
class ExportRequest:
    """What to export and how."""

    study_uid: str
    series_uids: tuple[str, ...] = ()
    format: str = "zip"
    deidentify: bool = True
    profile: str = "teaching"
    password: str = ""

    def checked(self) -> ExportRequest:
        """Raise ImageShareError for a request that cannot be served."""
        if self.format not in FORMATS:
            raise ImageShareError(f"format must be one of {', '.join(FORMATS)}")
        if self.password and self.format not in ("zip", "dicomdir"):
            raise ImageShareError("only DICOM exports (zip, dicomdir) can be encrypted")
        if self.password and len(self.password) < 8:
            raise ImageShareError("an export password needs at least 8 characters")
        return self


class ExportService:
    """Starts export jobs (on the shared job queue) and keeps their files in the results
    store, so that any instance can finish an export and any instance can hand it out."""

    def __init__(self, retrieve: RetrieveService, audit: AuditTrail, jobs: JobQueue,
                 folder: Path, deidentifier: Callable[[str], Deidentifier],
                 results: BlobStore, min_free_mb: int = 0) -> None:
        self._min_free = max(0, min_free_mb) << 20
        self._retrieve = retrieve
        self._audit = audit
        self._jobs = jobs
        self._folder = folder
        self._deidentifier = deidentifier
        self._results = results
        jobs.register("export", self._handle)

    def start(self, request: ExportRequest, actor: Actor,
              allowed_studies: Collection[str] | None) -> Job:
        """Check and queue an export; the selection is audited now, the export when done."""
        request = request.checked()
        if request.deidentify:
            self._deidentifier(request.profile)  # an unknown profile is refused now
        instances = self._retrieve.select(
            actor, "study.export", study_uids=[request.study_uid],
            series_uids=list(request.series_uids), allowed_studies=allowed_studies)
        kind = f"{'de-identified' if request.deidentify else 'identifiable'} {request.format}"
        described = {**asdict(request), "series_uids": list(request.series_uids)}
        described.pop("password")
        return self._jobs.submit(
            actor.name, "export", f"Export ({kind}) of {len(instances)} instance(s)",
            {"request": described, "actor": actor_params(actor),
             "allowed": None if allowed_studies is None else sorted(allowed_studies),
             # a scope naming single series or instances is kept whole (its studies alone
             # would widen the export to everything else in them)
             "grants": [[g.study_uid, g.series_uid, g.sop_uid] for g in allowed_studies.grants]
             if isinstance(allowed_studies, Scope) and narrows(allowed_studies) else None,
             "instances": _fingerprints(instances)},
            secret_params={"password": request.password} if request.password else None,
            total=len(instances))

    def _handle(self, job: Job, params: dict[str, Any]) -> None:
        """Run a queued export (on whichever instance leased it)."""
        request = ExportRequest(**{**params["request"],
                                   "series_uids": tuple(params["request"]["series_uids"]),
                                   "password": params.get("password", "")})
        actor = actor_from(params["actor"])
        try:
            instances = self._selected(actor, request, params)
            wanted = params.get("instances")
            if wanted is not None:
                # exactly what was asked for: nothing added since, nothing changed or gone
                keep = frozenset(wanted)
                instances = [i for i in instances if _fingerprint(i) in keep]
                if len(instances) < len(keep):
                    raise ImageShareError(
                        "images of this study were corrected or deleted after the export was "
                        "asked for; nothing was exported: ask for the export again")
            self._check_room(request, instances)
            deidentifier = self._deidentifier(request.profile) if request.deidentify else None
            job.total, job.done = len(instances), 0
            self._run(job, request, instances, deidentifier, actor)
        except JobInterrupted:
            raise
        except Exception as exc:
            self._audit.record(AuditEvent(
                actor=actor, action="study.export", outcome="failure",
                study_uid=request.study_uid,
                detail={"format": request.format, "deidentified": request.deidentify,
                        "reason": failure_reason(exc)}))
            raise

    def _selected(self, actor: Actor, request: ExportRequest, params: dict[str, Any]
                  ) -> list[StoredInstance]:
        """The instances of the export's study and series within the scope it was asked
        with (not audited: the caller audits the use)."""
        allowed = params.get("allowed")
        grants = params.get("grants")
        scope: Collection[str] | None
        if grants is not None:
            scope = Scope(Grant(study, series, sop) for study, series, sop in grants)
        else:
            scope = None if allowed is None else frozenset(allowed)
        return self._retrieve.select(
            actor, "study.export", study_uids=[request.study_uid],
            series_uids=list(request.series_uids), allowed_studies=scope, audit=False)

    def _check_room(self, request: ExportRequest, instances: list[StoredInstance]) -> None:
        """Refuse (OutOfResources) before anything is written when the export folder's disk
        cannot hold the export: its instances' stored size (twice for DICOMDIR media, which
        is written as a folder and then zipped), headroom and the configured floor."""
        self._folder.mkdir(parents=True, exist_ok=True)
        size = sum(max(0, i.size or 0) for i in instances)
        needed = size * (2 if request.format == "dicomdir" else 1) + HEADROOM + self._min_free
        free = shutil.disk_usage(self._folder).free
        if free < needed:
            raise OutOfResources(
                f"out of resources: the export needs about {needed >> 20} MB and the disk "
                f"has {free >> 20} MB free; nothing was exported")

    def _run(self, job: Job, request: ExportRequest, instances: list, deidentifier:
             Deidentifier | None, actor: Actor) -> None:
        self._folder.mkdir(parents=True, exist_ok=True)
        target = self._folder / f"{new_blob_key()}.zip"
        held_back = written = 0
        media_dir = None
        staging = Path(tempfile.mkdtemp(prefix="staging-", dir=self._folder))
        if request.format == "dicomdir":
            media_dir = tempfile.TemporaryDirectory(prefix="media-", dir=self._folder)
            writer: Any = DicomdirWriter(Path(media_dir.name))
        else:
            writer = ZipWriter(target, request.password)
        names = Numbering()
        everyone = SourceIdentity()
        try:
            for index, inst in enumerate(instances):
                with self._retrieve.open(inst) as fp, seekable(fp) as source:
                    if deidentifier is None and request.format == "zip":
                        # the archive's own bytes, streamed: never whole in memory, and the
                        # file's digest is the one the archive recorded
                        header = dcmread(source, stop_before_pixels=True)
                        source.seek(0)
                        writer.add_stream(header, source)
                        written += 1
                    elif deidentifier is None:
                        written += self._write(writer, names, dcmread(source), request.format)
                    else:
                        done = self._deidentified(deidentifier, source, writer, names,
                                                  request.format, staging / f"{index}.dcm")
                        if done is None:
                            held_back += 1
                        else:
                            written += done[0]
                            everyone.merge(done[1])
                job.done += 1
            writer.close()
            if media_dir is not None:
                if deidentifier is not None and deidentifier.verifier is not None and \
                        deidentifier.verifier.check_container(Path(media_dir.name), everyone):
                    raise ImageShareError("the export's DICOMDIR carries identifying data; "
                                          "nothing was exported")
                _zip_folder(Path(media_dir.name), target, request.password)
            if deidentifier is not None and deidentifier.verifier is not None and \
                    deidentifier.verifier.check_container(target, everyone):
                target.unlink(missing_ok=True)
                raise ImageShareError("the export's file names carry identifying data; "
                                      "nothing was exported")
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if media_dir is not None:
                media_dir.cleanup()
        key = new_blob_key()
        store_file(self._results, key, target)
        job.result = key
        job.summary = (f"{written} file(s) exported"
                       + (f", {held_back} held back for review (identifying data could not be "
                          "shown to be removed)" if held_back else ""))
        self._audit.record(AuditEvent(
            actor=actor, action="study.export", outcome="success" if written else "failure",
            patient_id=instances[0].patient_id if instances else "",
            study_uid=request.study_uid, instance_count=written,
            detail={"format": request.format, "deidentified": request.deidentify,
                    "profile": request.profile if request.deidentify else "",
                    "held_back": held_back, "encrypted": bool(request.password)}))

    def _deidentified(self, deidentifier: Deidentifier, source: BinaryIO, writer: Any,
                      names: Numbering, fmt: str, staged: Path
                      ) -> tuple[int, SourceIdentity] | None:
        """One instance de-identified and verified into the export (DICOM streamed through a
        staging file; videos and stills rendered from the de-identified copy and checked
        too); None when it is held back."""
        if fmt in ("zip", "dicomdir"):
            with open(staged, "w+b") as out:
                outcome = deidentifier.write(source, out, writer.prepare)
            if outcome.held_back:
                staged.unlink(missing_ok=True)
                return None
            writer.add_staged(staged, outcome.dataset)
            staged.unlink(missing_ok=True)
            return 1, outcome.identity or SourceIdentity()
        outcome = deidentifier.instance(dcmread(source))
        if outcome.held_back:
            return None
        media = self._media(names, outcome.dataset, fmt)
        if media is None:
            return 0, outcome.identity or SourceIdentity()
        name, data = media
        if deidentifier.verifier is not None and outcome.identity is not None and \
                deidentifier.verifier.check_data(data, outcome.identity, name,
                                                 outcome.text_prone):
            return None
        writer.add_file(name, data)
        return 1, outcome.identity or SourceIdentity()

    @classmethod
    def _write(cls, writer: Any, names: Numbering, ds: Dataset, fmt: str) -> int:
        """An identifiable instance into the export."""
        if fmt in ("zip", "dicomdir"):
            writer.add(ds)
            return 1
        media = cls._media(names, ds, fmt)
        if media is None:
            return 0
        writer.add_file(*media)
        return 1

    @staticmethod
    def _media(names: Numbering, ds: Any, fmt: str) -> tuple[str, bytes] | None:
        """The video or still of an instance, with its name (None: nothing to show)."""
        stem = names.name(ds)[:-4]
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if fmt == "mp4":
            if frames < 2:
                return None
            return stem + ".mp4", cine_to_mp4(ds)
        if "PixelData" not in ds:
            return None
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        buffer.seek(0)
        media = "image/png" if fmt == "png" else "image/jpeg"
        return f"{stem}.{fmt if fmt == 'png' else 'jpg'}", still_image(buffer, media,
                                                                       frames // 2)

    def is_identifiable(self, job_id: str, actor: Actor) -> bool:
        """True when ``actor``'s export job writes identifiable images (its file needs the
        right to export them); NotFound when it is not one of their exports."""
        return self.export_of(job_id, actor)[1]

    def export_of(self, job_id: str, actor: Actor) -> tuple[str, bool]:
        """The study ``actor``'s export job exports and whether it writes identifiable images
        (what downloading its file needs the right to); NotFound when it is not one of their
        exports."""
        job = self._jobs.get(job_id, actor.name)
        if job.kind != "export":
            raise NotFound("no such export")
        request = self._jobs.params(job_id, actor.name).get("request") or {}
        return str(request.get("study_uid", "")), not request.get("deidentify", False)

    def result(self, job_id: str, actor: Actor) -> tuple[Job, Path, bool]:
        """The finished job's file, for its owner, and whether it is a temporary copy the
        caller removes once sent; audited as a download."""
        job = self._jobs.get(job_id, actor.name)
        if job.kind != "export":
            raise NotFound("no such export")
        if job.state != "done" or not job.result:
            raise ImageShareError("the export is not ready")
        params = self._jobs.params(job_id, actor.name)
        if time.time() - (job.finished or job.created) > KEEP.total_seconds():
            # whether or not the housekeeping that removes old jobs has run (it may be off)
            self._refuse_download(job, actor, params, EXPIRED)
            raise ImageShareError(EXPIRED)
        patient_id, count = self._still_current(job, actor, params)
        local = getattr(self._results, "local_path", None)
        path = local(job.result) if local is not None else None
        temporary = path is None
        if path is None:
            self._folder.mkdir(parents=True, exist_ok=True)
            path = self._folder / f"{new_blob_key()}.zip"
            try:
                copy_to_file(self._results, job.result, path)
            except (KeyError, OSError) as exc:
                path.unlink(missing_ok=True)
                raise ImageShareError("the export is no longer available") from exc
        elif not path.exists():
            raise ImageShareError("the export is no longer available")
        self._audit.record(AuditEvent(
            actor=actor, action="study.export.download", outcome="success",
            patient_id=patient_id, study_uid=str(params["request"].get("study_uid", "")),
            instance_count=count, detail={"job": job.id}))
        return job, path, temporary

    def _still_current(self, job: Job, actor: Actor, params: dict[str, Any]
                       ) -> tuple[str, int]:
        """(Patient ID, instance count) of the export's study when the instances it was made
        of are all still in the record unchanged; else the download is refused (audited as a
        failed download)."""
        request = ExportRequest(**{**params["request"],
                                   "series_uids": tuple(params["request"]["series_uids"])})
        wanted = params.get("instances")
        try:
            current = self._selected(actor, request, params)
        except NotFound:
            current = []
        have = {_fingerprint(i) for i in current}
        if current and (wanted is None or have.issuperset(wanted)):
            return current[0].patient_id, len(wanted) if wanted is not None else len(current)
        self._refuse_download(job, actor, params, STALE)
        raise ImageShareError(STALE)

    def _refuse_download(self, job: Job, actor: Actor, params: dict[str, Any],
                         reason: str) -> None:
        """Audit a download of the export that is refused (stale or expired)."""
        self._audit.record(AuditEvent(
            actor=actor, action="study.export.download", outcome="failure",
            study_uid=str((params.get("request") or {}).get("study_uid", "")),
            detail={"job": job.id, "reason": reason}))

    def forget(self, key: str) -> None:
        """Remove a result file (its job was forgotten)."""
        self._results.delete(key)


def _fingerprint(inst: StoredInstance) -> str:
    """A short digest naming one version of one instance (its UID and the blob it is stored
    in: a correction or a replacement writes a new blob), no patient data."""
    return hashlib.sha256(f"{inst.sop_uid}\0{inst.blob_key}".encode()).hexdigest()[:24]


def _fingerprints(instances: list[StoredInstance]) -> list[str]:
    return sorted({_fingerprint(i) for i in instances})


def _zip_folder(folder: Path, target: Path, password: str) -> None:
    """The files under ``folder`` into the zip ``target``, each streamed."""
    writer = ZipWriter(target, password)
    try:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                writer.add_path(path.relative_to(folder).as_posix(), path)
    finally:
        writer.close()

