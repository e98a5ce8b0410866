"""The recipient's side of a share link: passcode, the shared case, viewer, comments, feedback,
download. Everything under /s/{token} sees only the share's own instances."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response
from pydicom import dcmread
from starlette.background import BackgroundTask

from imageshare.access.passcodes import MAX_PASSCODE_FAILURES
from imageshare.access.policy import PUBLIC, SHARE_COMMENT, SHARE_DOWNLOAD, SHARE_VIEW
from imageshare.archive.annotations import share_author
from imageshare.archive.rendering import render_frame, render_video_still
from imageshare.archive.studies import ENCAPSULATED_PDF
from imageshare.archive.transcode import playable_video
from imageshare.audit.trail import AuditEvent
from imageshare.deid.identity import field_naming_the_patient
from imageshare.domain.actors import Actor
from imageshare.domain.errors import (
    ImageShareError,
    LinkGone,
    NotAcceptable,
    NotFound,
    TooManyRequests,
)
from imageshare.export.share_download import build_share_download
from imageshare.sharing.links import Share
from imageshare.sharing.viewer import is_video_instance, share_manifest, shown_file
from imageshare.web.auth import (
    LINK_COOKIE,
    allowed,
    client_address,
    from_another_site,
    resolve_actor,
)
from imageshare.web.deps import Archive, ArchiveDep, archive_of
from imageshare.web.dicomweb import MAX_PLAYED_BYTES, render_options
from imageshare.web.exports import MarksIn
from imageshare.web.negotiation import parse_accept
from imageshare.web.pages.templating import page, redirect

router = APIRouter(include_in_schema=False)
# How the link's viewer names its own recipient's marks (no e-mail address in the page).
YOU = "you"


def _share(request: Request) -> Share:
    return request.state.share


def _gone(request: Request, exc: ImageShareError) -> Response:
    """An ended or unknown link says so and shows nothing else."""
    status = 410 if isinstance(exc, LinkGone) else 404
    title = "This link no longer works" if status == 410 else "No such link"
    detail = (str(exc).capitalize() + ". Ask the sender for a new one." if status == 410
              else "Check the address, or ask the sender for a new link.")
    return page(request, "error.html", status_code=status, title=title, detail=detail)


@router.get("/s/{token}")
def landing(request: Request, archive: ArchiveDep,
            token: str, _anyone: allowed(PUBLIC)) -> Response:
    """The link's first page: the passcode form (or the shared case once opened)."""
    try:
        share = archive.shares.by_token(token)
    except ImageShareError as exc:
        return _gone(request, exc)
    actor = resolve_actor(request)
    if actor.kind == "share":
        return redirect(f"/s/{token}/case")
    return page(request, "link_passcode.html", token=token,
                needs_login=not share.opens_for(actor))


def wrong_passcode(tries_left: int) -> str:
    """What a wrong passcode is told: how many tries are left before the link locks (nothing
    about the share or its patient; the page says where the passcode comes from)."""
    tries = "1 more try" if tries_left == 1 else f"{tries_left} more tries"
    return (f"That passcode is not right. You have {tries} before this link locks; once "
            "locked, it opens for nobody and the sender has to share the images again.")


_FROM_ELSEWHERE = ("This passcode was sent from another web site. Type it here, on "
                   "ImageShare's own page.")


@router.post("/s/{token}")
def open_link(request: Request, archive: ArchiveDep, token: str, _anyone: allowed(PUBLIC),
              passcode: Annotated[str, Form()]) -> Response:
    """Check the passcode; ten wrong ones lock the link. A passcode posted by another
    site's page is refused before it is checked (it would open that site's link in this
    browser: what its user then writes goes to the sender's share)."""
    source = client_address(request)
    try:
        share = archive.shares.by_token(token)
        archive.throttle.check(source)
    except ImageShareError as exc:
        if isinstance(exc, TooManyRequests):
            return page(request, "link_passcode.html", status_code=429, token=token,
                        error=str(exc), needs_login=False)
        return _gone(request, exc)
    if from_another_site(request, archive.settings.public_url):
        archive.audit.record(AuditEvent(
            actor=share.actor(source), action="share.passcode", outcome="failure",
            detail={"share": share.public_id, "reason": "sent from another site"}))
        return page(request, "link_passcode.html", status_code=403, token=token,
                    needs_login=False, error=_FROM_ELSEWHERE)
    user = resolve_actor(request)
    if user.kind == "share":  # this browser has the link open already
        return redirect(f"/s/{token}/case")
    if not share.opens_for(user):
        # Only the named recipient, fully signed in (their second factor given when their
        # account has one), may try the passcode of an identifiable share (giving it opens
        # the share's items to their account).
        archive.audit.record(AuditEvent(
            actor=user if user.kind != "anonymous" else share.actor(source),
            action="share.passcode", outcome="failure",
            detail={"share": share.public_id, "reason": "not the named recipient"}))
        return page(request, "link_passcode.html", status_code=403, token=token,
                    needs_login=True,
                    error="Sign in as the person these images were shared with first.")
    if not archive.shares.check_passcode(share, passcode[:64], source):
        archive.throttle.failed(source)
        try:
            now = archive.shares.by_token(token)
        except ImageShareError as exc:  # that was the last try: the link locked
            return _gone(request, exc)
        left = max(MAX_PASSCODE_FAILURES - now.failed_attempts, 0)
        return page(request, "link_passcode.html", status_code=401, token=token,
                    error=wrong_passcode(left), tries_left=left, needs_login=False)
    secret, _csrf = archive.shares.start_session(share)
    response = redirect(f"/s/{token}/case")
    response.set_cookie(LINK_COOKIE, secret, httponly=True, samesite="strict",
                        path=f"/s/{token}", secure=request.url.scheme == "https")
    return response


def _held_back(archive: Archive, share: Share) -> dict[str, int]:
    """How many shared images, and how many documents (PDF reports), de-identification held
    back: the case page says which (a report left out is not "an image")."""
    held = [i for i in archive.shares.items(share) if i.held_back]
    documents = 0
    for item in held:
        try:
            documents += archive.shares.stored(share, item).sop_class_uid == ENCAPSULATED_PDF
        except ImageShareError:  # deleted since: not shown either way
            continue
    return {"held_back": len(held) - documents, "documents_held_back": documents}


@router.get("/s/{token}/case")
def case(request: Request, archive: ArchiveDep, token: str, actor: allowed(SHARE_VIEW)) -> Response:
    """What was shared: message, series, comments, feedback form, downloads."""
    share = _share(request)
    manifest = share_manifest(archive.shares, share, f"/s/{token}/dicomweb")
    archive.shares.record(share, actor, "share.view", count=sum(
        len({f["sop"] for f in s["frames"]}) for s in manifest["series"]))
    clips = archive.shares.clip_names(share)
    return page(request, "link_case.html", token=token, share=share, manifest=manifest,
                comments=archive.shares.comments(share), clips=clips,
                feedback=archive.shares.feedback(share),
                **_held_back(archive, share),
                can_download=archive.policy.allows(actor, SHARE_DOWNLOAD),
                can_comment=archive.policy.allows(actor, SHARE_COMMENT))


@router.get("/s/{token}/present")
def present(request: Request, archive: ArchiveDep, token: str,
            actor: allowed(SHARE_VIEW)) -> Response:
    """Presentation mode over the link (a teaching case shown at an MDT or a course): the
    question first, the shared images (cine plays, the sender's marks drawn), the sender's
    findings and diagnosis revealed on demand."""
    share = _share(request)
    manifest = share_manifest(archive.shares, share, f"/s/{token}/dicomweb")
    archive.shares.record(share, actor, "share.view", format="presentation")
    marks = _senders_marks(archive, share)
    slides = {"base": manifest["base"], "linkHome": f"/s/{token}", "slides": [
        {"kind": "question", "title": share.title, "history": share.description,
         "number": 1, "count": 1},
        *({"kind": "series", **s, "marks": marks} for s in manifest["series"]),
        {"kind": "answer", "answers": [("Findings and diagnosis",
                                        share.interpretation or "—")]}]}
    return page(request, "present.html", title=share.title, leave=f"/s/{token}/case",
                slides=slides)


@router.get("/s/{token}/viewer")
def viewer(request: Request, archive: ArchiveDep,
           token: str, actor: allowed(SHARE_VIEW)) -> Response:
    """The same viewer as the web app, over the share's instances only."""
    share = _share(request)
    manifest = share_manifest(archive.shares, share, f"/s/{token}/dicomweb")
    can_mark = archive.policy.allows(actor, SHARE_COMMENT)
    manifest.update(annotations=archive.annotations.for_share(
                        share.public_id, archive.shares.items(share)),
                    annotationsUrl=f"/s/{token}/annotations" if can_mark else "",
                    me=YOU, linkHome=f"/s/{token}")
    return page(request, "viewer.html", manifest=manifest, banner_name=share.title,
                banner_id="", banner_date="", back_link=f"/s/{token}/case",
                back_label="Back to the case",
                comment_action=f"/s/{token}/comments" if can_mark else "")


def _senders_marks(archive: Archive, share: Share) -> dict[str, list[dict[str, Any]]]:
    """The marks the sender drew on the shared images, for presentation mode. Through a
    de-identified share, a frame's marks whose typed words (a label, a text mark) name the
    patient of the image are left out, as they are when a teaching case is made: the sender
    wrote them in the archive, for colleagues, not for the link's reviewer."""
    items = archive.shares.items(share)
    marks = archive.annotations.senders_for_share(share.owner, items)
    if not share.deidentified:
        return marks
    real = {i.public_sop_uid: i.sop_uid for i in items if not i.held_back}
    kept: dict[str, list[dict[str, Any]]] = {}
    for key, frame_marks in marks.items():
        header = archive.retrieve.header(real.get(key.split("|", 1)[0], ""))
        labels = [str(m.get("label") or "") for m in frame_marks]
        # Each mark's words, and all of them together (a name split over two text marks).
        words = {**{f"mark {n}": label for n, label in enumerate(labels)},
                 "marks": " ".join(labels)}
        if header is not None and not field_naming_the_patient([header], words):
            kept[key] = frame_marks
    return kept


def _wants_video(request: Request) -> bool:
    """True when video/mp4 is preferred to a still image (a browser's video element asks
    for */*; an image element prefers image/*)."""
    for media_range in parse_accept(request.headers.get("accept"), default="*/*"):
        if media_range.media in ("video/mp4", "video/*", "*/*"):
            return True
        if media_range.media.startswith("image/"):
            return False
    return False


# What every answer carrying a shared image says: no browser or proxy keeps it (a revoked or
# expired link shows nothing more at once), and it is never sniffed into another type.
_IMAGE_HEADERS = {"Cache-Control": "private, no-store", "X-Content-Type-Options": "nosniff",
                  "Referrer-Policy": "same-origin"}


async def _render(request: Request, actor: Actor, study: str, series: str | None,
                  sop: str | None, frame: int, thumbnail: bool = False) -> Response:
    """One frame of a shared instance as an image; a shared video as its first picture, or
    as an MP4 file for the viewer's player (the video as it lies, never re-encoded)."""
    archive = archive_of(request)
    share = _share(request)
    items = archive.shares.item(share, study, series, sop)
    item = items[len(items) // 2] if sop is None else items[0]
    path = await run_in_threadpool(shown_file, archive.shares, share, item)
    if path is None:
        raise NotFound("no such study, series or instance")
    header = await run_in_threadpool(dcmread, path, stop_before_pixels=True)
    video = is_video_instance(header)
    syntax = str(header.file_meta.get("TransferSyntaxUID", ""))
    if video and path.stat().st_size > MAX_PLAYED_BYTES:  # read whole to be played or shown
        raise NotAcceptable(f"this video is larger than {MAX_PLAYED_BYTES >> 20} MB and is "
                            "not played here")
    if video and not thumbnail and sop is not None and frame == 1 and _wants_video(request):
        def play() -> bytes:
            with open(path, "rb") as stream:
                return playable_video(stream, syntax)

        movie = await run_in_threadpool(play)
        await run_in_threadpool(archive.shares.record, share, actor, "share.render", item)
        return Response(movie, media_type="video/mp4",
                        headers={**_IMAGE_HEADERS, "Accept-Ranges": "none"})
    options = render_options(request, thumbnail)
    if video and frame != 1:
        raise NotFound("a video's frames are not separable; ask for the video")

    def render() -> bytes:
        with open(path, "rb") as stream:
            if video:
                return render_video_still(stream, options)
            return render_frame(stream, frame - 1, options)

    data = await run_in_threadpool(render)
    await run_in_threadpool(archive.shares.record, share, actor, "share.render", item)
    return Response(data, media_type=options.media_type,
                    headers=_IMAGE_HEADERS)  # revocation works at once


@router.get("/s/{token}/dicomweb/studies/{study}/series/{series}/thumbnail")
async def series_thumbnail(request: Request, token: str, study: str, series: str,
                           actor: allowed(SHARE_VIEW)) -> Response:
    """A shared series' thumbnail."""
    return await _render(request, actor, study, series, None, 1, thumbnail=True)


@router.get("/s/{token}/dicomweb/studies/{study}/series/{series}/instances/{sop}/rendered")
async def rendered(request: Request, token: str, study: str, series: str, sop: str,
                   actor: allowed(SHARE_VIEW)) -> Response:
    """A shared single-frame image, rendered."""
    return await _render(request, actor, study, series, sop, 1)


@router.get(
    "/s/{token}/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/{frame}/rendered")
async def rendered_frame(request: Request, token: str, study: str, series: str, sop: str,
                         frame: int, actor: allowed(SHARE_VIEW)) -> Response:
    """One frame of a shared clip, rendered."""
    return await _render(request, actor, study, series, sop, frame)


@router.get("/s/{token}/documents/{sop}")
def document(request: Request, archive: ArchiveDep, token: str, sop: str,
             actor: allowed(SHARE_VIEW)) -> Response:
    """A shared PDF document (a report), read in the browser with the view right (it is part
    of what was shared, as its images are): kept by no cache, sandboxed, audited."""
    share = _share(request)
    item = next((i for i in archive.shares.items(share)
                 if i.public_sop_uid == sop and not i.held_back), None)
    path = shown_file(archive.shares, share, item) if item is not None else None
    if item is None or path is None:
        raise NotFound("no such document in this share")
    with open(path, "rb") as stream:
        doc = archive.attachments.document(stream)
    archive.shares.record(share, actor, "share.view", item, format="document")
    return Response(doc.content, media_type=doc.media_type, headers={
        **_IMAGE_HEADERS, "Content-Security-Policy": "sandbox",
        # Saved, not opened in the archive's origin (a PDF can carry scripts and forms; a
        # sandboxed page would not show it in Chromium anyway), as on the study page.
        "Content-Disposition": 'attachment; filename="document.pdf"'})


@router.post("/s/{token}/comments")
def comment(request: Request, archive: ArchiveDep, token: str, actor: allowed(SHARE_COMMENT),
            body: Annotated[str, Form()], sop: Annotated[str, Form()] = "") -> Response:
    """A comment on the case, or on the image or clip on screen."""
    archive.shares.comment(_share(request), actor, body, sop[:64])
    return redirect(f"/s/{token}/case#comments")


@router.post("/s/{token}/annotations")
async def save_marks(request: Request, archive: ArchiveDep,
                     token: str, body: MarksIn, actor: allowed(SHARE_COMMENT)
                     ) -> dict[str, int]:
    """The reviewer's arrows and measurements on one shared image or clip frame (a body that
    is not such JSON is refused saying which field, as on the archive's own route)."""
    share = _share(request)
    item = next((i for i in archive.shares.items(share)
                 if i.public_sop_uid == body.sop_uid and not i.held_back), None)
    if item is None:
        raise NotFound("no such image in this share")
    kept = await run_in_threadpool(
        archive.annotations.save, item.study_uid, item.sop_uid, body.frame, body.marks, actor,
        share.recipient_email or "reviewer", frozenset({item.study_uid}),
        share_author(share.public_id))
    archive.shares.record(share, actor, "share.annotate", item, count=kept)
    return {"marks": kept}


@router.post("/s/{token}/feedback")
def feedback(request: Request, archive: ArchiveDep, token: str, actor: allowed(SHARE_COMMENT),
             view_obtained: Annotated[str, Form()] = "",
             image_quality: Annotated[str, Form()] = "",
             agreement: Annotated[str, Form()] = "", findings: Annotated[str, Form()] = "",
             comments: Annotated[str, Form()] = "", sop: Annotated[str, Form()] = ""
             ) -> Response:
    """Structured feedback on the case or on one clip (every choice made by the reviewer:
    nothing is preset); the sender is told, the reviewer sees a confirmation."""
    archive.shares.give_feedback(
        _share(request), actor, view_obtained[:16], image_quality[:4], findings, agreement[:16],
        comments, sop[:64])
    return redirect(f"/s/{token}/case?notice=feedback-sent#feedback")


@router.post("/s/{token}/signoff")
def sign_off(request: Request, archive: ArchiveDep, token: str, actor: allowed(SHARE_COMMENT),
             note: Annotated[str, Form()] = "") -> Response:
    """The mentor's final sign-off of the case (after their feedback)."""
    archive.shares.sign_off(_share(request), actor, note)
    return redirect(f"/s/{token}/case?notice=signed-off#signoff")


@router.get("/s/{token}/download")
async def download(request: Request, archive: ArchiveDep,
                   token: str, actor: allowed(SHARE_DOWNLOAD),
                   format: str = "zip") -> Response:
    """The shared instances as a ZIP of DICOM files, or of MP4 videos of the clips."""
    share = _share(request)
    target = await run_in_threadpool(build_share_download, archive.shares, share, actor, format,
                                     archive.settings.staging_dir)
    return FileResponse(target, media_type="application/zip",
                        filename=f"shared-{share.public_id[:8]}.zip",
                        headers={"Cache-Control": "no-store"},
                        background=_cleanup(target.parent))


def _cleanup(folder: Path) -> BackgroundTask:
    def remove() -> None:
        for path in folder.iterdir():
            path.unlink(missing_ok=True)
        folder.rmdir()

    return BackgroundTask(remove)

