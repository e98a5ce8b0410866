"""Exports from the archive: a study or some of its series, identifiable or de-identified, as
ZIP, DICOMDIR media (zipped), MP4 of cine loops or PNG/JPEG stills; a background job with
progress; every export audited."""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread

from imageshare.archive.retrieve import RetrieveService
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.deid.service import Deidentifier
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError
from imageshare.export.media import cine_to_mp4, still_image
from imageshare.export.writers import DicomdirWriter, Numbering, ZipWriter
from imageshare.jobs import Job, JobRunner

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
    """Starts export jobs and writes their files into the exports folder."""

    def __init__(self, retrieve: RetrieveService, audit: AuditTrail, jobs: JobRunner,
                 folder: Path, deidentifier: Callable[[str], Deidentifier]) -> None:
        self._retrieve = retrieve
        self._audit = audit
        self._jobs = jobs
        self._folder = folder
        self._deidentifier = deidentifier

    def start(self, request: ExportRequest, actor: Actor,
              allowed_studies: frozenset[str] | None) -> Job:
        """Check and queue an export; the selection is audited now, the export when done."""
        request = request.checked()
        deidentifier = self._deidentifier(request.profile) if request.deidentify else None
        instances = self._retrieve.select(
            actor, "study.export", study_uids=[request.study_uid],
            series_uids=list(request.series_uids), allowed_studies=allowed_studies)
        kind = f"{'de-identified' if request.deidentify else 'identifiable'} {request.format}"
        job = self._jobs.submit(actor.name, "export", f"Export ({kind}) of "
                                f"{len(instances)} instance(s)",
                                lambda job: self._run(job, request, instances, deidentifier,
                                                      actor))
        job.total = len(instances)
        return job

    def _run(self, job: Job, request: ExportRequest, instances: list, deidentifier:
             Deidentifier | None, actor: Actor) -> None:
        self._folder.mkdir(parents=True, exist_ok=True)
        target = self._folder / f"{job.id}.zip"
        held_back = written = 0
        media_dir = None
        if request.format == "dicomdir":
            media_dir = tempfile.TemporaryDirectory(prefix="media-", dir=self._folder)
            writer: object = DicomdirWriter(Path(media_dir.name))
        else:
            writer = ZipWriter(target, request.password)
        names = Numbering()
        try:
            for inst in instances:
                with self._retrieve.open(inst) as fp:
                    ds = dcmread(fp)
                if deidentifier is not None:
                    outcome = deidentifier.instance(ds)
                    if outcome.held_back:
                        held_back += 1
                        job.done += 1
                        continue
                    ds = outcome.dataset
                written += self._write(writer, names, ds, request.format)
                job.done += 1
            writer.close()  # type: ignore[attr-defined]
            if media_dir is not None:
                _zip_folder(Path(media_dir.name), target, request.password)
        finally:
            if media_dir is not None:
                media_dir.cleanup()
        job.result = target
        job.summary = (f"{written} file(s) exported"
                       + (f", {held_back} held back (burned-in text could not be verified "
                          "as removed)" if held_back else ""))
        self._audit.record(AuditEvent(
            actor=actor, action="study.export", outcome="success" if written else "failure",
            study_uid=request.study_uid, instance_count=written,
            detail={"format": request.format, "deidentified": request.deidentify,
                    "profile": request.profile if request.deidentify else "",
                    "held_back": held_back, "encrypted": bool(request.password)}))

    @staticmethod
    def _write(writer: object, names: Numbering, ds: object, fmt: str) -> int:
        if fmt in ("zip", "dicomdir"):
            writer.add(ds)  # type: ignore[attr-defined]
            return 1
        stem = names.name(ds)[:-4]  # type: ignore[arg-type]
        frames = int(ds.get("NumberOfFrames", 1) or 1)  # type: ignore[attr-defined]
        if fmt == "mp4":
            if frames < 2:
                return 0
            writer.add_file(stem + ".mp4", cine_to_mp4(ds))  # type: ignore[attr-defined]
            return 1
        if "PixelData" not in ds:  # type: ignore[operator]
            return 0
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)  # type: ignore[attr-defined]
        buffer.seek(0)
        media = "image/png" if fmt == "png" else "image/jpeg"
        image = still_image(buffer, media, frames // 2)
        writer.add_file(f"{stem}.{fmt if fmt == 'png' else 'jpg'}", image)  # type: ignore
        return 1

    def result(self, job_id: str, actor: Actor) -> tuple[Job, Path]:
        """The finished job's file, for its owner; audited as a download."""
        job = self._jobs.get(job_id, actor.name)
        if job.state != "done" or job.result is None or not job.result.exists():
            raise ImageShareError("the export is not ready")
        self._audit.record(AuditEvent(actor=actor, action="study.export.download",
                                      outcome="success", detail={"job": job.id}))
        return job, job.result


def _zip_folder(folder: Path, target: Path, password: str) -> None:
    writer = ZipWriter(target, password)
    try:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                writer.add_file(path.relative_to(folder).as_posix(), path.read_bytes())
    finally:
        writer.close()

