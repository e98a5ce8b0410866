"""The teaching library's pages: make a teaching case from a study (a de-identified copy),
describe it, attach files, find cases, view and present them, share one. No page here shows a
patient's name, identifier, birth date or accession number: they show the case's own words and
the de-identified copy's images."""

from __future__ import annotations

import tempfile
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse

from imageshare.access.policy import CASE_MANAGE, SHARE_CREATE
from imageshare.archive.viewing import viewer_manifest
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError
from imageshare.sharing.links import NewShare
from imageshare.storage.submissions import KEY_FIELD
from imageshare.teaching.library import DIFFICULTIES, CaseFields, TeachingCase
from imageshare.web.auth import allowed
from imageshare.web.deps import Archive, ArchiveDep
from imageshare.web.pages.cases import profile_names
from imageshare.web.pages.shares import made_once, shown_link
from imageshare.web.pages.templating import page, redirect

router = APIRouter(include_in_schema=False)
_CHUNK = 1 << 20


def _fields(form: Any) -> CaseFields:
    def text(name: str, limit: int = 10_000) -> str:
        # One character over the limit is kept, so that CaseFields refuses an over-long
        # text with the reason instead of it being cut short unseen.
        value = form.get(name)
        return value[:limit + 1] if isinstance(value, str) else ""

    return CaseFields(
        title=text("title", 128), history=text("history"), findings=text("findings"),
        diagnosis=text("diagnosis"), differential=text("differential"),
        keywords=text("keywords"), modality=text("modality", 16),
        body_part=text("body_part", 64), difficulty=text("difficulty", 16),
        folder=text("folder", 128), collection=text("collection", 128),
        description=text("description"))


def _images(archive: Archive, case: TeachingCase) -> list[dict[str, Any]]:
    """The copy's image series, for thumbnails (no patient data)."""
    shown = []
    for study_uid in archive.teaching.studies(case):
        try:
            record = archive.catalogue.record(study_uid)
        except ImageShareError:
            continue
        for series in record.series:
            if series.modality in ("PR", "SR") or series.is_documents:
                continue
            frames = sum(max(1, i.frames or 1) for i in series.instances)
            shown.append({"study": study_uid, "series": series.series_uid,
                          "modality": series.modality, "description": series.description,
                          "frames": frames})
    return shown


def _shown(archive: Archive, actor: Actor, found: list[TeachingCase]) -> list[TeachingCase]:
    """``found`` without the cases whose patient withdrew teaching consent (their authors
    still see theirs, to delete them)."""
    return [c for c in found if c.owner == actor.name or not archive.teaching.withdrawn(c)]


# Teaching cases listed on one page of the library.
PAGE_SIZE = 100
# The most pages a search goes (10,000 cases).
MAX_PAGES = 100


def _listing(request: Request, archive: Archive, actor: Actor, query: dict[str, str],
             number: int) -> Response:
    """One page of the library for ``query`` (page ``number``, from 1)."""
    if not 1 <= number <= MAX_PAGES:
        raise ImageShareError(f"the page is a number from 1 to {MAX_PAGES}")
    found = archive.teaching.search(
        query.get("q", ""), query.get("modality", ""), query.get("body_part", ""),
        query.get("diagnosis", ""), query.get("collection", ""), limit=PAGE_SIZE + 1,
        offset=(number - 1) * PAGE_SIZE)
    more = len(found) > PAGE_SIZE and number < MAX_PAGES
    return page(request, "teaching.html", cases=_shown(archive, actor, found[:PAGE_SIZE]),
                query=query, collections=archive.teaching.collections(),
                difficulties=DIFFICULTIES, page_number=number, more=more)


@router.get("/teaching")
def library(request: Request, archive: ArchiveDep, actor: allowed(CASE_MANAGE),
            page_number: Annotated[int, Query(alias="page")] = 1) -> Response:
    """The teaching library: every teaching case, by collection and folder, a page at a
    time."""
    return _listing(request, archive, actor, {}, page_number)


@router.post("/teaching")
def search(request: Request, archive: ArchiveDep, actor: allowed(CASE_MANAGE),
           q: Annotated[str, Form()] = "", modality: Annotated[str, Form()] = "",
           body_part: Annotated[str, Form()] = "", diagnosis: Annotated[str, Form()] = "",
           collection: Annotated[str, Form()] = "",
           page_number: Annotated[int, Form(alias="page")] = 1) -> Response:
    """Teaching cases by keyword, diagnosis, modality, body part or collection, a page at
    a time (the search is posted: it never goes into an address)."""
    query = {"q": q[:256], "modality": modality[:16], "body_part": body_part[:64],
             "diagnosis": diagnosis[:128], "collection": collection[:128]}
    return _listing(request, archive, actor, query, page_number)


@router.post("/studies/{study_uid}/teaching")
async def create(request: Request, archive: ArchiveDep, study_uid: str,
                 actor: allowed(CASE_MANAGE, "study_uid")) -> Response:
    """Make a teaching case from the study (or the ticked series): a de-identified, verified
    copy under the ``teaching`` profile; the patient's record is not referenced."""
    form = await request.form()
    series = [str(v) for v in form.getlist("series")][:500]
    fields = _fields(form)

    def make() -> str:
        return archive.teaching.create(actor, fields, study_uid, series,
                                       archive.policy.study_scope(actor)).path

    # The same form sent twice (a double click) makes one case: the second finds it.
    path, _first = await run_in_threadpool(
        archive.submissions.once, actor.name, "teaching", str(form.get(KEY_FIELD, "")), make)
    return redirect(f"{path}?notice=teaching-created")


@router.get("/teaching/{public_id}")
def case_page(request: Request, archive: ArchiveDep, public_id: str,
              actor: allowed(CASE_MANAGE)) -> Response:
    """A teaching case: what it says, its images, its files; edit, present, share."""
    case = archive.teaching.get(public_id)
    mine = actor.kind == "user" and actor.name == case.owner
    withdrawn = archive.teaching.withdrawn(case) if mine else ""
    if withdrawn:  # its author sees only that, to delete it: no image, no file, no text
        return page(request, "teaching_case.html", case=case, withdrawn=withdrawn, mine=mine,
                    images=[], attachments=[], difficulties=DIFFICULTIES, profiles=[],
                    share_default_days=0, share_max_days=0)
    archive.teaching.record_view(case, actor)
    return page(request, "teaching_case.html", case=case, images=_images(archive, case),
                attachments=archive.teaching.attachments(case),
                mine=mine, withdrawn="", difficulties=DIFFICULTIES,
                held_back=archive.teaching.held_back(case) if mine else 0,
                profiles=profile_names(archive),
                share_default_days=archive.settings.share_default_days,
                share_max_days=archive.settings.share_max_days)


@router.post("/teaching/{public_id}")
async def update(request: Request, archive: ArchiveDep, public_id: str,
                 actor: allowed(CASE_MANAGE)) -> Response:
    """Change what the case says (its author only); the form says when the case was last
    changed as it was shown, so that an edit made meanwhile (another tab) is not lost."""
    form = await request.form()
    sent = form.get("version")
    version = None
    if isinstance(sent, str) and sent:
        try:
            version = datetime.fromisoformat(sent[:64])
        except ValueError as exc:
            raise ImageShareError("the form's version is not a time: open the case again"
                                  ) from exc
    archive.teaching.update(archive.teaching.get(public_id), actor, _fields(form), version)
    return redirect(f"/teaching/{public_id}?notice=teaching-saved")


@router.post("/teaching/{public_id}/files")
async def attach(archive: ArchiveDep, public_id: str, actor: allowed(CASE_MANAGE),
                 file: Annotated[UploadFile, File()],
                 title: Annotated[str, Form()] = "") -> Response:
    """Attach a PDF, photo, video or office document (type told by its content). It is
    titled by what the educator typed, never by the file's name (a name often carries the
    patient's)."""
    case = archive.teaching.get(public_id)
    limit = archive.teaching.max_attachment_bytes
    with tempfile.TemporaryFile(dir=archive.settings.staging_dir) as spool:
        size = 0
        while chunk := await file.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise ImageShareError(f"an attachment may be at most {limit // (1 << 20)} MB")
            spool.write(chunk)
        await run_in_threadpool(archive.teaching.attach, case, actor, spool, size,
                                title[:128],
                                archive.settings.staging_dir)
    return redirect(f"/teaching/{public_id}?notice=file-attached#files")


@router.get("/teaching/{public_id}/files/{file_id}")
def open_file(archive: ArchiveDep, public_id: str, file_id: str,
              actor: allowed(CASE_MANAGE), download: str = "") -> Response:
    """An attached file: a photo or video shown in the browser (sandboxed), anything else
    (PDFs, office documents) or on request downloaded. Audited."""
    case = archive.teaching.get(public_id)
    found = archive.teaching.attachment(case, file_id)
    stream = archive.teaching.open_attachment(case, found, actor)
    # A PDF is saved, never opened in ImageShare's origin (it can carry scripts and forms; a
    # sandboxed page would not show it in Chromium anyway), as a study's documents are;
    # photos and videos are shown, sandboxed, as uploads' originals are.
    inline = found.kind in ("image", "video") and not download
    extension = found.media_type.rsplit("/", 1)[-1].split(".")[-1][:8]
    name = f"attachment-{found.public_id}.{extension}"

    def chunks() -> Any:
        with stream:
            while block := stream.read(_CHUNK):
                yield block

    return StreamingResponse(chunks(), media_type=found.media_type, headers={
        "Content-Length": str(found.size), "Cache-Control": "private, no-store",
        "X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox",
        "Content-Disposition": f'{"inline" if inline else "attachment"}; filename="{name}"'})


@router.post("/teaching/{public_id}/delete")
def delete(archive: ArchiveDep, public_id: str, actor: allowed(CASE_MANAGE)) -> Response:
    """Delete the case and its files (its de-identified images stay in the archive)."""
    archive.teaching.delete(archive.teaching.get(public_id), actor)
    return redirect("/teaching?notice=teaching-deleted")


@router.get("/teaching/{public_id}/viewer")
async def viewer(request: Request, archive: ArchiveDep, public_id: str,
                 actor: allowed(CASE_MANAGE), series: str = "") -> Response:
    """The case's images in the viewer, titled by the case (no patient banner)."""
    case = archive.teaching.get(public_id)
    studies = archive.teaching.studies(case)
    if not studies:
        raise ImageShareError("the case has no images")
    archive.teaching.record_view(case, actor, "viewer")
    study_uid = next((s for s in studies if series and any(
        i["series"] == series for i in _images(archive, case) if i["study"] == s)), studies[0])
    study = await run_in_threadpool(archive.catalogue.view, study_uid, actor, None)
    manifest = await run_in_threadpool(viewer_manifest, study, archive.retrieve.header, series)
    can_mark = archive.policy.allows(actor, "study.comment", study_uid)
    manifest.update(base="/dicomweb", me=actor.name,
                    annotations=archive.teaching.marks(case, study_uid, actor.name),
                    annotationsUrl=f"/api/studies/{study_uid}/annotations" if can_mark else "")
    return page(request, "viewer.html", manifest=manifest, banner_name=case.title,
                banner_id="", banner_date="", back_link=case.path,
                back_label="Back to the case", comment_action="")


@router.get("/teaching/{public_id}/present")
async def present(request: Request, archive: ArchiveDep, public_id: str,
                  actor: allowed(CASE_MANAGE), collection: str = "") -> Response:
    """Presentation mode: full screen, question first, images (cine plays, marks shown),
    findings and diagnosis revealed on demand; keyboard and clicker navigation. With
    ``collection=1``, every case of this case's collection (conference, course) in order, by
    folder then title."""
    case = archive.teaching.get(public_id)
    cases = ([c for c in archive.teaching.search(collection=case.collection)
              if not archive.teaching.withdrawn(c)]
             if collection and case.collection else [case])
    if not cases:
        archive.teaching.require_usable(case, actor)
    slides: list[dict[str, Any]] = []
    for number, shown in enumerate(cases, start=1):
        archive.teaching.record_view(shown, actor, "presentation")
        series = await run_in_threadpool(presentation_slides, archive, shown)
        slides.append({"kind": "question", "title": shown.title, "history": shown.history,
                       "number": number, "count": len(cases)})
        slides += series["slides"]
        slides.append({"kind": "answer", "answers": answers_of(shown)})
    title = case.collection if len(cases) > 1 else case.title
    return page(request, "present.html", title=title, leave=case.path,
                slides={"base": "/dicomweb", "slides": slides})


def answers_of(case: TeachingCase) -> list[tuple[str, str]]:
    """What presentation mode reveals on demand, in order."""
    return [("Findings", case.findings), ("Differential", case.differential),
            ("Diagnosis", case.diagnosis or "—")]


def presentation_slides(archive: Archive, case: TeachingCase) -> dict[str, Any]:
    """What presentation mode shows, in order: the question, every image series (frames,
    frame rate, marks), the attachments, then findings, differential and diagnosis."""
    series_slides = []
    for study_uid in archive.teaching.studies(case):
        try:
            study = archive.catalogue.record(study_uid)
        except ImageShareError:
            continue
        manifest = viewer_manifest(study, archive.retrieve.header, "")
        marks = archive.teaching.marks(case, study_uid)
        for s in manifest["series"]:
            series_slides.append({"kind": "series", "study": study_uid, **s,
                                  "marks": {k: v for k, v in marks.items()
                                            if k.split("|")[0] in {f["sop"] for f in
                                                                   s["frames"]}}})
    attachments = [{"kind": "attachment", "title": a.title, "type": a.kind,
                    "url": f"{case.path}/files/{a.public_id}"}
                   for a in archive.teaching.attachments(case) if a.kind in ("image", "video")]
    return {"base": "/dicomweb", "slides": series_slides + attachments}


@router.post("/teaching/{public_id}/share")
async def share(request: Request, archive: ArchiveDep, public_id: str,
                actor: allowed(SHARE_CREATE),
                recipient_email: Annotated[str, Form()] = "", days: Annotated[int, Form()] = 0,
                download: Annotated[str, Form()] = "",
                profile: Annotated[str, Form()] = "teaching",
                message: Annotated[str, Form()] = "") -> Response:
    """Share the teaching case as one link (its de-identified images, its history)."""
    case = archive.teaching.get(public_id)
    archive.teaching.require_usable(case, actor)
    studies = archive.teaching.studies(case)
    if not studies:
        raise ImageShareError("the case has no images")
    request_ = NewShare(
        "", selection=tuple((s, "", "") for s in studies), recipient_email=recipient_email,
        days=days or archive.shares.default_days, allow_download=bool(download),
        deidentified=True, profile=profile, message=message, title=case.title,
        purpose="teaching",
        description=case.history, interpretation="\n".join(
            f"{label}: {text}" for label, text in answers_of(case) if text and text != "—"))
    created = await made_once(
        request, actor, await request.form(), "share",
        lambda: archive.shares.create_and_send(request_, actor, None))
    if isinstance(created, Response):
        return created
    return page(request, "share_created.html", url=shown_link(request, created.path),
                passcode=created.passcode, created=created,
                emailed=bool(recipient_email.strip()))
