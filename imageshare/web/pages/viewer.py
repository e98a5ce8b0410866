"""The image viewer page."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from imageshare.access.policy import STUDY_COMMENT, STUDY_READ
from imageshare.archive.viewing import viewer_manifest
from imageshare.web.auth import allowed
from imageshare.web.deps import ArchiveDep
from imageshare.web.pages.templating import dicom_date, page, person

router = APIRouter(include_in_schema=False)


@router.get("/viewer/{study_uid}")
async def viewer(request: Request, archive: ArchiveDep,
                 study_uid: str, actor: allowed(STUDY_READ, "study_uid"),
                 series: str = "") -> Response:
    """The viewer for a study, opening ``series`` (or the first image series)."""
    scope = archive.policy.study_scope(actor)
    study = await run_in_threadpool(archive.catalogue.view, study_uid, actor, scope)
    manifest = await run_in_threadpool(viewer_manifest, study, archive.retrieve.header, series)
    # Staff see everyone's marks; someone a study was shared with sees only their own.
    marks = archive.annotations.for_study(study_uid, scope, actor.name)
    can_mark = archive.policy.allows(actor, STUDY_COMMENT, study_uid)
    manifest.update(base="/dicomweb", annotations=marks, me=actor.name,
                    annotationsUrl=f"/api/studies/{study_uid}/annotations" if can_mark else "")
    return page(request, "viewer.html", manifest=manifest,
                banner_name=person(study.patient.name), banner_id=study.patient.patient_id,
                banner_date=dicom_date(study.study_date), back_link=f"/studies/{study_uid}",
                back_label="Study page", comment_action="",
                copy=archive.site_status.copies([study_uid]).get(study_uid))
