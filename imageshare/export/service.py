"""Exports from the archive: a study or some of its series, identifiable or de-identified, as
ZIP, DICOMDIR media (zipped), MP4 of cine loops or PNG/JPEG stills; a background job with
progress; every export audited. Every de-identified file (DICOM, video or still) is checked by
the verifier before it is added, and the export's names and DICOMDIR once it is complete."""

from __future__ import annotations

import io
import shutil
import tempfile
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import Dataset, dcmread

from imageshare.archive.retrieve import RetrieveService
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.deid.service import Deidentifier, seekable
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError, NotFound
from imageshare.export.media import cine_to_mp4, still_image
from imageshare.export.writers import DicomdirWriter, Numbering, ZipWriter
from imageshare.jobs import Job, JobQueue, actor_from, actor_params
from imageshare.storage.blobs import BlobStore, copy_to_file, new_blob_key, store_file
from imageshare.verify import SourceIdentity

FORMATS = ("zip", "dicomdir", "mp4", "png", "jpeg")


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
        return self


class ExportService:
    """Starts export jobs (on the shared job queue) and keeps their files in the results
    store, so that any instance can finish an export and any instance can hand it out."""

    def __init__(self, retrieve: RetrieveService, audit: AuditTrail, jobs: JobQueue,
                 folder: Path, deidentifier: Callable[[str], Deidentifier],
                 results: BlobStore) -> None:
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
             "allowed": None if allowed_studies is None else sorted(allowed_studies)},
            secret_params={"password": request.password} if request.password else None,
            total=len(instances))

    def _handle(self, job: Job, params: dict[str, Any]) -> None:
        """Run a queued export (on whichever instance leased it)."""
        request = ExportRequest(**{**params["request"],
                                   "series_uids": tuple(params["request"]["series_uids"]),
                                   "password": params.get("password", "")})
        actor = actor_from(params["actor"])
        allowed = params.get("allowed")
        instances = self._retrieve.select(
            actor, "study.export", study_uids=[request.study_uid],
            series_uids=list(request.series_uids),
            allowed_studies=None if allowed is None else frozenset(allowed), audit=False)
        deidentifier = self._deidentifier(request.profile) if request.deidentify else None
        job.total, job.done = len(instances), 0
        self._run(job, request, instances, deidentifier, actor)

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
                    if deidentifier is None:
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
        job = self._jobs.get(job_id, actor.name)
        if job.kind != "export":
            raise NotFound("no such export")
        request = self._jobs.params(job_id, actor.name).get("request") or {}
        return not request.get("deidentify", False)

    def result(self, job_id: str, actor: Actor) -> tuple[Job, Path, bool]:
        """The finished job's file, for its owner, and whether it is a temporary copy the
        caller removes once sent; audited as a download."""
        job = self._jobs.get(job_id, actor.name)
        if job.kind != "export":
            raise NotFound("no such export")
        if job.state != "done" or not job.result:
            raise ImageShareError("the export is not ready")
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
        self._audit.record(AuditEvent(actor=actor, action="study.export.download",
                                      outcome="success", detail={"job": job.id}))
        return job, path, temporary

    def forget(self, key: str) -> None:
        """Remove a result file (its job was forgotten)."""
        self._results.delete(key)


def _zip_folder(folder: Path, target: Path, password: str) -> None:
    writer = ZipWriter(target, password)
    try:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                writer.add_file(path.relative_to(folder).as_posix(), path.read_bytes())
    finally:
        writer.close()

