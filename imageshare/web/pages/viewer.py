"""The image viewer page."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from imageshare.access.policy import STUDY_COMMENT, STUDY_READ
from imageshare.access.scope import COMMENT, Scope
from imageshare.archive.viewing import viewer_manifest
from imageshare.web.auth import allowed
from imageshare.web.deps import ArchiveDep
from imageshare.web.pages.templating import dicom_date, page, person

router = APIRouter(include_in_schema=False)


def mark_rights(manifest: dict[str, Any], study_uid: str, may_comment: bool,
                scope: Scope | None) -> bool:
    """Say on each series of ``manifest`` where the caller's marks would be kept, as the
    marks route decides it (the comment right on the study, and the image inside what the
    caller may comment on): ``annotate`` True for every image of the series, else
    ``annotateSops``, the images that may be marked (empty: none, the tools are not
    offered). ``scope`` is the caller's comment scope (None: everything). True when some
    image may be marked."""
    anywhere = False
    for series in manifest["series"]:
        study = series.get("study") or study_uid
        sops = sorted({f["sop"] for f in series["frames"]})
        markable = [s for s in sops if may_comment and (
            scope is None or scope.covers(study, series["uid"], s))]
        series["annotate"] = bool(sops) and len(markable) == len(sops)
        series["annotateSops"] = [] if series["annotate"] else markable
        anywhere = anywhere or bool(markable)
    return anywhere


@router.get("/viewer/{study_uid}")
async def viewer(request: Request, archive: ArchiveDep,
                 study_uid: str, actor: allowed(STUDY_READ, "study_uid"),
                 series: str = "") -> Response:
    """The viewer for a study, opening ``series`` (or the first image series). Drawing tools
    are offered only on the images where the marks route would keep the caller's marks."""
    scope = archive.policy.study_scope(actor)
    study = await run_in_threadpool(archive.catalogue.view, study_uid, actor, scope)
    manifest = await run_in_threadpool(viewer_manifest, study, archive.retrieve.header, series)
    # Staff see everyone's marks; someone a study was shared with sees only their own.
    marks = archive.annotations.for_study(study_uid, scope, actor.name)
    can_mark = mark_rights(manifest, study_uid,
                           archive.policy.allows(actor, STUDY_COMMENT, study_uid),
                           archive.policy.study_scope(actor, COMMENT))
    manifest.update(base="/dicomweb", annotations=marks, me=actor.name,
                    annotationsUrl=f"/api/studies/{study_uid}/annotations" if can_mark else "")
    return page(request, "viewer.html", manifest=manifest,
                banner_name=person(study.patient.name), banner_id=study.patient.patient_id,
                banner_date=dicom_date(study.study_date), back_link=f"/studies/{study_uid}",
                back_label="Study page", comment_action="",
                copy=archive.site_status.copies([study_uid]).get(study_uid))
