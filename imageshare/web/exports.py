"""Exports from the archive over HTTP: start a job, follow its progress, download the file."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import Field
from starlette.background import BackgroundTask

from imageshare.access.policy import (
    ACCOUNT_SELF,
    EXPORT_DEIDENTIFIED,
    EXPORT_IDENTIFIABLE,
    STUDY_COMMENT,
)
from imageshare.access.scope import COMMENT, DOWNLOAD
from imageshare.domain.actors import Actor
from imageshare.export.service import FORMATS, ExportRequest
from imageshare.jobs import Job
from imageshare.web.auth import PrivateRoute, allowed, authorise_also
from imageshare.web.deps import ArchiveDep, archive_of
from imageshare.web.params import Strict

router = APIRouter(prefix="/api", tags=["API"], route_class=PrivateRoute)


class ExportIn(Strict):
    """An export of a study (or some of its series). A field it does not define is refused: a
    misspelt ``password`` would otherwise make an unencrypted zip, a misspelt ``series_uids``
    an export of the whole study."""

    series_uids: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=1000, description="Series Instance UIDs (UI, at most "
        "64 characters each); none: the whole study")
    format: str = Field(default="zip", description="one of " + ", ".join(FORMATS))
    deidentify: bool = True
    profile: str = Field(default="teaching", max_length=64)
    password: str = Field(default="", max_length=256,
                          description="AES-encrypt the zip (at least 8 characters)")


def job_view(job: Job) -> dict[str, Any]:
    """What a client may know of a job."""
    return {"id": job.id, "kind": job.kind, "description": job.description, "state": job.state,
            "done": job.done, "total": job.total, "percent": job.percent,
            "summary": job.summary, "error": job.error,
            "download": f"/api/jobs/{job.id}/file" if job.state == "done" else None}


async def start_export(request: Request, actor: Actor, study_uid: str, body: ExportIn) -> Job:
    """Check the caller may make this kind of export, then queue it."""
    archive = archive_of(request)
    if not body.deidentify:
        authorise_also(request, actor, EXPORT_IDENTIFIABLE, study_uid)
    export = ExportRequest(study_uid, tuple(body.series_uids), body.format, body.deidentify,
                           body.profile, body.password)
    # an export takes the images away: within what the caller may download, not only view
    return await run_in_threadpool(archive.exports.start, export, actor,
                                   archive.policy.study_scope(actor, DOWNLOAD))


@router.post("/studies/{study_uid}/exports", status_code=202, summary="Start an export")
async def create_export(request: Request, study_uid: str, body: ExportIn,
                        actor: allowed(EXPORT_DEIDENTIFIED, "study_uid")) -> dict[str, Any]:
    """Export a study as ZIP, DICOMDIR media (zipped), MP4 of its cine loops or PNG/JPEG
    stills; de-identified with a profile unless identifiable export is allowed and asked for.
    Answers with the job to follow."""
    return job_view(await start_export(request, actor, study_uid, body))


@router.get("/jobs/{job_id}", summary="A background job's progress")
def job_status(archive: ArchiveDep, job_id: str, actor: allowed(ACCOUNT_SELF)) -> dict[str, Any]:
    """State and progress of one of the caller's jobs."""
    return job_view(archive.jobs.get(job_id, actor.name))


@router.post("/jobs/{job_id}/cancel", summary="Cancel a job that has not started")
def job_cancel(archive: ArchiveDep, job_id: str, actor: allowed(ACCOUNT_SELF)) -> dict[str, Any]:
    """Cancel one of the caller's jobs while it is still queued (a running job goes on)."""
    return job_view(archive.jobs.cancel(job_id, actor.name))


@router.get("/jobs/{job_id}/file", summary="Download a finished export")
def job_file(request: Request, archive: ArchiveDep, job_id: str,
             actor: allowed(EXPORT_DEIDENTIFIED)) -> FileResponse:
    """The export's file (a zip whose names carry no patient data), for the one who asked
    for it while they may still export that study: the right is checked again, on the study,
    when the bytes leave (a role taken away, an administrator's second factor reset, the
    study taken out of the record, meanwhile), as for an identifiable export when it was
    asked for; and only while the images it was made of are still in the record unchanged."""
    study_uid, identifiable = archive.exports.export_of(job_id, actor)
    authorise_also(request, actor, EXPORT_IDENTIFIABLE if identifiable else EXPORT_DEIDENTIFIED,
                   study_uid)
    job, path, temporary = archive.exports.result(job_id, actor)
    return FileResponse(path, media_type="application/zip",
                        filename=f"imageshare-export-{job.id[:8]}.zip",
                        headers={"Cache-Control": "no-store"},
                        background=BackgroundTask(path.unlink, missing_ok=True)
                        if temporary else None)


class MarksIn(Strict):
    """Arrows and length measurements on one frame (replacing the caller's earlier ones)."""

    sop_uid: str = Field(min_length=1, max_length=64)
    frame: int = Field(default=1, ge=1)
    marks: list[dict[str, Any]] = Field(default_factory=list, max_length=50)


@router.post("/studies/{study_uid}/annotations", summary="Save marks drawn on an image")
async def save_marks(archive: ArchiveDep, study_uid: str, body: MarksIn,
                     actor: allowed(STUDY_COMMENT, "study_uid")) -> dict[str, int]:
    """Keeps the marks for the viewer and stores them as a presentation state in the study:
    only on an image the caller may comment on (someone a study was shared with, on the
    images shared with that right; not on those shared to view only)."""
    kept = await run_in_threadpool(
        archive.annotations.save, study_uid, body.sop_uid, body.frame, body.marks, actor,
        actor.name, archive.policy.study_scope(actor, COMMENT))
    return {"marks": kept}
