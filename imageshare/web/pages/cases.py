"""Cases and folders ("my archive"): group items, describe them, attach files, share a case."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from imageshare.access.policy import CASE_MANAGE, SHARE_CREATE
from imageshare.archive.attachments import MAX_ATTACHMENT
from imageshare.archive.studies import StudyRecord
from imageshare.deid.profiles import load_profiles
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError, NotFound
from imageshare.sharing.cases import Case, CaseItem
from imageshare.sharing.links import NewShare
from imageshare.web.auth import allowed, authorise_also, refuse
from imageshare.web.deps import Archive, ArchiveDep
from imageshare.web.pages.shares import made_once, shown_link
from imageshare.web.pages.templating import page, redirect

router = APIRouter(include_in_schema=False)


def profile_names(archive: Archive) -> list[str]:
    """The de-identification profiles a share can be made under."""
    configured = archive.settings.deid_profiles_file
    return sorted(load_profiles(Path(configured) if configured else None))


def _mine(request: Request, archive: Archive, public_id: str, actor: Actor) -> Case:
    """One of the caller's cases; another's, or none, is the same 404 ("no such case"),
    audited as a refusal like every other (as for shares)."""
    try:
        return archive.cases.get(public_id, actor.name)
    except NotFound as exc:
        refuse(request, actor, CASE_MANAGE, exc)


@router.get("/cases")
def my_cases(request: Request, archive: ArchiveDep, actor: allowed(CASE_MANAGE)) -> Response:
    """The user's cases, filed by folder."""
    cases = archive.cases.of(actor.name)
    folders: dict[str, list] = {}
    for case in cases:
        folders.setdefault(case.folder or "Unfiled", []).append(case)
    return page(request, "cases.html", folders=folders)


@router.post("/studies/{study_uid}/case")
async def add_to_case(request: Request, archive: ArchiveDep, study_uid: str,
                      actor: allowed(CASE_MANAGE, "study_uid"),
                      case: Annotated[str, Form()] = "", title: Annotated[str, Form()] = "",
                      folder: Annotated[str, Form()] = "") -> Response:
    """Put the study (or the ticked series) into an existing or a new case."""
    form = await request.form()
    series = [str(v) for v in form.getlist("series")][:500] or [""]
    target = (_mine(request, archive, case, actor) if case
              else archive.cases.create(actor, title or "New case", folder=folder))
    scope = archive.policy.study_scope(actor)
    for series_uid in series:
        await run_in_threadpool(archive.cases.add, target, actor,
                                CaseItem(study_uid, series_uid), scope)
    return redirect(f"/cases/{target.public_id}?notice=case-added")


@router.get("/cases/{public_id}")
def case_page(request: Request, archive: ArchiveDep,
              public_id: str, actor: allowed(CASE_MANAGE)) -> Response:
    """A case: its items, description, folder, files, and sharing it."""
    case = _mine(request, archive, public_id, actor)
    items = archive.cases.items(case)
    records: dict[str, StudyRecord | None] = {}
    for item in items:
        if item.study_uid not in records:
            try:
                records[item.study_uid] = archive.catalogue.view(
                    item.study_uid, actor, archive.policy.study_scope(actor))
            except ImageShareError:
                records[item.study_uid] = None
    return page(request, "case.html", case=case, items=items, records=records,
                profiles=profile_names(archive),
                share_default_days=archive.settings.share_default_days,
                share_max_days=archive.settings.share_max_days)


@router.post("/cases/{public_id}")
def update_case(request: Request, archive: ArchiveDep, public_id: str,
                actor: allowed(CASE_MANAGE),
                title: Annotated[str, Form()], description: Annotated[str, Form()] = "",
                folder: Annotated[str, Form()] = "") -> Response:
    """Rename, describe or refile the case."""
    archive.cases.update(_mine(request, archive, public_id, actor), title, description, folder,
                         actor)
    return redirect(f"/cases/{public_id}?notice=case-saved")


@router.post("/cases/{public_id}/files")
async def attach_file(request: Request, archive: ArchiveDep,
                      public_id: str, actor: allowed(CASE_MANAGE),
                      file: Annotated[UploadFile, File()],
                      title: Annotated[str, Form()] = "") -> Response:
    """Attach a scanned report or photo: stored as DICOM in the case's first study (so it
    can be viewed, exported and shared like the images) and added to the case."""
    case = _mine(request, archive, public_id, actor)
    items = archive.cases.items(case)
    if not items:
        raise ImageShareError("add a study to the case before attaching files")
    study_uid = items[0].study_uid
    authorise_also(request, actor, "study.store", study_uid)
    content = await file.read(MAX_ATTACHMENT + 1)
    stored = await run_in_threadpool(archive.attachments.attach, study_uid,
                                     file.filename or "", content, title[:64], actor)
    await run_in_threadpool(archive.cases.add, case, actor,
                            CaseItem(study_uid, stored.series_uid, stored.sop_instance_uid),
                            archive.policy.study_scope(actor))
    return redirect(f"/cases/{public_id}")


@router.post("/cases/{public_id}/delete")
def delete_case(request: Request, archive: ArchiveDep, public_id: str,
                actor: allowed(CASE_MANAGE)) -> Response:
    """Delete the case; its images stay in the archive."""
    archive.cases.delete(_mine(request, archive, public_id, actor), actor)
    return redirect("/cases?notice=case-deleted")


@router.post("/cases/{public_id}/share")
async def share_case(
    request: Request, archive: ArchiveDep, public_id: str, actor: allowed(SHARE_CREATE),
    recipient_email: Annotated[str, Form()] = "", days: Annotated[int, Form()] = 0,
    download: Annotated[str, Form()] = "",
    profile: Annotated[str, Form()] = "accreditation",
    message: Annotated[str, Form()] = "", interpretation: Annotated[str, Form()] = "",
) -> Response:
    """Share the whole case as one de-identified link, under the de-identification profile
    chosen (accreditation by default: cases go to mentors for review); the reviewer sees the
    case's description and the sender's interpretation."""
    case = _mine(request, archive, public_id, actor)
    items = archive.cases.items(case)
    if not items:
        raise ImageShareError("the case is empty")
    request_ = NewShare(
        "", selection=tuple((i.study_uid, i.series_uid, i.sop_uid) for i in items),
        recipient_email=recipient_email, days=days or archive.shares.default_days,
        allow_download=bool(download), deidentified=True, profile=profile, message=message,
        title=case.title, description=case.description, interpretation=interpretation)
    created = await made_once(
        request, actor, await request.form(), "share",
        lambda: archive.shares.create_and_send(request_, actor,
                                               archive.policy.study_scope(actor)))
    if isinstance(created, Response):
        return created
    url = shown_link(request, created.path)
    return page(request, "share_created.html", url=url, passcode=created.passcode,
                created=created, emailed=bool(recipient_email.strip()))
