"""Upload pages and the tus 1.0 endpoints (core, creation, termination).

Invited people: ``/u/{token}`` asks for the passcode, then ``/u/{token}/upload`` takes files
and folders (tus under ``/u/{token}/files``) and ``/u/{token}/send`` hands them to the
hospital. They see only their own upload. Staff: ``/uploads`` (invite, the QC queue),
``/uploads/import`` (a USB stick or CD from the study list, the same page and pipeline), and
``/uploads/{id}`` (checks, files, accept, reject). Patients: ``/my`` (their own studies,
download, share with a doctor).
"""

from __future__ import annotations

import base64
import binascii
import errno
import fcntl
import os
import tempfile
import zipfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect

from imageshare.access.policy import PATIENT_SELF, PUBLIC, UPLOAD_MANAGE, UPLOAD_SEND
from imageshare.access.scope import DOWNLOAD
from imageshare.archive.ingest import no_room, out_of_room
from imageshare.audit.trail import AuditEvent
from imageshare.domain.actors import Actor
from imageshare.domain.errors import (
    Forbidden,
    ImageShareError,
    LinkGone,
    NotFound,
    TooManyRequests,
    UnsupportedMediaType,
    UploadOffsetMismatch,
)
from imageshare.domain.identifiers import typed_person_name
from imageshare.sharing.links import NewShare
from imageshare.storage.files import owned_prefix
from imageshare.uploads.invitations import Invitation, UploadRequest
from imageshare.uploads.receiving import UploadFile
from imageshare.web.auth import (
    UPLOAD_COOKIE,
    allowed,
    client_address,
    from_another_site,
    refuse,
    resolve_actor,
)
from imageshare.web.deps import Archive, ArchiveDep
from imageshare.web.pages.shares import made_once
from imageshare.web.pages.templating import page, redirect
from imageshare.web.params import RowId
from imageshare.web.problems import TUS_VERSION

router = APIRouter(include_in_schema=False)
# The tus file transfer (a CD is a thousand requests or more): a router of its own, matched
# before every other (routes are tried one by one).
tus = APIRouter(include_in_schema=False)
_TUS = {"Tus-Resumable": TUS_VERSION}


# -- the invited person's side --------------------------------------------------------------


def _gone(request: Request, exc: ImageShareError) -> Response:
    status = 410 if isinstance(exc, LinkGone) else 404
    title = "This link no longer works" if status == 410 else "No such link"
    detail = (str(exc).capitalize() + ". Ask the hospital for a new one." if status == 410
              else "Check the address, or ask the hospital for a new link.")
    return page(request, "error.html", status_code=status, title=title, detail=detail)


@router.get("/u/{token}")
def invitation_landing(request: Request, archive: ArchiveDep, token: str,
                       _anyone: allowed(PUBLIC)) -> Response:
    """The invitation's first page: the passcode form (or the upload page once opened)."""
    try:
        archive.uploads.invitations.by_token(token)
    except ImageShareError as exc:
        return _gone(request, exc)
    if resolve_actor(request).kind == "upload":
        return redirect(f"/u/{token}/upload")
    return page(request, "upload_passcode.html", token=token)


@router.post("/u/{token}")
def invitation_open(request: Request, archive: ArchiveDep, token: str,
                    _anyone: allowed(PUBLIC), passcode: Annotated[str, Form()]) -> Response:
    """Check the passcode (ten wrong ones lock the invitation) and start this browser's
    session (ending any other: one person at a time). A passcode posted by another site's
    page is refused before it is checked (it would open that site's invitation in this
    browser, and end the session of the person uploading with it)."""
    source = client_address(request)
    invitations = archive.uploads.invitations
    try:
        invitation = invitations.by_token(token)
        archive.throttle.check(source)
    except ImageShareError as exc:
        if isinstance(exc, TooManyRequests):
            return page(request, "upload_passcode.html", status_code=429, token=token,
                        error=str(exc))
        return _gone(request, exc)
    if from_another_site(request, archive.settings.public_url):
        archive.audit.record(AuditEvent(
            actor=invitation.actor(source), action="upload.passcode", outcome="failure",
            detail={"upload": invitation.public_id, "reason": "sent from another site"}))
        return page(request, "upload_passcode.html", status_code=403, token=token,
                    error="This passcode was sent from another web site. Type it here, on "
                          "ImageShare's own page.")
    if not invitations.check_passcode(invitation, passcode[:64], source):
        archive.throttle.failed(source)
        try:
            invitations.by_token(token)
        except ImageShareError as exc:
            return _gone(request, exc)
        return page(request, "upload_passcode.html", status_code=401, token=token,
                    error="That passcode is not right.")
    secret, _csrf = invitations.start_session(invitation)
    response = redirect(f"/u/{token}/upload")
    response.set_cookie(UPLOAD_COOKIE, secret, httponly=True, samesite="strict",
                        path=f"/u/{token}", secure=request.url.scheme == "https")
    return response


def _invitation(request: Request) -> Invitation:
    found: Invitation = request.state.invitation
    return found


def _upload_page(request: Request, archive: Archive, invitation: Invitation, base: str,
                 staff: bool, status_code: int = 200, error: str = "") -> Response:
    """The upload page as it stands: the files that arrived and wait to be sent, the room
    left, what was sent before; with ``error`` (a refused send), the same page saying why."""
    receiver = archive.uploads.receiver
    round_ = receiver.current_round(invitation)
    waiting = [f for f in receiver.files(invitation, round_) if f.status == "received"]
    return page(request, "upload.html", status_code=status_code, invitation=invitation,
                base=base, staff=staff, waiting=waiting,
                chunk=min(8 << 20, archive.settings.upload_chunk_bytes),
                left=max(0, invitation.max_bytes - receiver.used_bytes(invitation)),
                results=_own_results(archive, invitation, staff), error=error)


def _own_results(archive: Archive, invitation: Invitation,
                 staff: bool) -> list[dict[str, Any]]:
    """What each file sent became, in words for who asks: staff read what the archive said;
    the uploader (an invitation's holder) only what depends on their file, nothing of what
    the archive holds (a duplicate, another patient's study)."""
    from imageshare.uploads.intake import results, staff_says, uploader_says

    says = staff_says if staff else uploader_says
    return [{"label": r["label"], "says": says(str(r["outcome"]), str(r["detail"]))}
            for r in results(archive.engine, invitation)]


@router.get("/u/{token}/upload")
def invitee_upload_page(request: Request, archive: ArchiveDep, token: str,
                        _uploader: allowed(UPLOAD_SEND)) -> Response:
    """The upload page: drop files and folders, watch them arrive, send them."""
    return _upload_page(request, archive, _invitation(request), f"/u/{token}", staff=False)


@tus.options("/u/{token}/files")
def invitee_tus_options(_uploader: allowed(UPLOAD_SEND)) -> Response:
    """tus: what this server offers."""
    return _tus_options()


@tus.post("/u/{token}/files")
async def invitee_tus_create(request: Request, archive: ArchiveDep, token: str,
                             uploader: allowed(UPLOAD_SEND)) -> Response:
    """tus creation: announce a file (Upload-Length, Upload-Metadata), perhaps with its
    first bytes (creation-with-upload)."""
    invitation = _invitation(request)
    return await _audited_tus_step(archive, "upload.announce", uploader, invitation.public_id, "",
                          lambda: _tus_create(request, archive, lambda: invitation,
                                              f"/u/{token}/files", uploader))


@tus.head("/u/{token}/files/{upload_id}")
async def invitee_tus_head(request: Request, archive: ArchiveDep, upload_id: str,
                           _uploader: allowed(UPLOAD_SEND)) -> Response:
    """tus: how many bytes of the file arrived."""
    invitation = _invitation(request)
    return await _audited_tus_step(archive, "upload.offset", _uploader, invitation.public_id,
                          upload_id, lambda: run_in_threadpool(
                              _tus_head, archive, invitation, upload_id, _uploader))


@tus.patch("/u/{token}/files/{upload_id}")
async def invitee_tus_patch(request: Request, archive: ArchiveDep, upload_id: str,
                            uploader: allowed(UPLOAD_SEND)) -> Response:
    """tus: the next chunk of the file, at the offset received so far."""
    invitation = _invitation(request)
    return await _audited_tus_step(archive, "upload.chunk", uploader, invitation.public_id,
                          upload_id, lambda: _tus_patch(request, archive, invitation,
                                                        upload_id, uploader))


@tus.delete("/u/{token}/files/{upload_id}")
async def invitee_tus_delete(request: Request, archive: ArchiveDep, upload_id: str,
                             uploader: allowed(UPLOAD_SEND)) -> Response:
    """tus termination: forget a file not yet sent."""
    invitation = _invitation(request)
    return await _audited_tus_step(archive, "upload.withdraw", uploader, invitation.public_id,
                          upload_id, lambda: run_in_threadpool(
                              _tus_delete, archive, invitation, upload_id, uploader))


@router.post("/u/{token}/send")
async def invitee_send(request: Request, archive: ArchiveDep, token: str,
                       uploader: allowed(UPLOAD_SEND)) -> Response:
    """Hand the received files to the hospital (they become DICOM waiting for review)."""
    invitation = _invitation(request)
    return await _send(request, archive, invitation, uploader, "the invited person",
                       f"/u/{token}", staff=False)


async def _send(request: Request, archive: Archive, invitation: Invitation, actor: Actor,
                uploader: str, base: str, staff: bool) -> Response:
    try:
        job = await run_in_threadpool(archive.uploads.submit, invitation, actor, uploader)
    except ImageShareError as exc:
        # Refused: the same page as before the click, with the files that did arrive (the
        # person sends them again, or adds what is missing) and the room really left.
        status = 400 if not isinstance(exc, Forbidden) else 403
        return await run_in_threadpool(
            _upload_page, request, archive, archive.uploads.invitations.by_public_id(
                invitation.public_id), base, staff, status, str(exc))
    return redirect(f"{base}/sent/{job.id}")


def _sent_page(request: Request, archive: Archive, invitation: Invitation, job_id: str,
               actor: Actor, staff: bool) -> Response:
    job = archive.jobs.get(job_id, actor.name)
    return page(request, "upload_sent.html", job=job, staff=staff,
                results=_own_results(archive, invitation, staff) if job.state == "done"
                else [],
                invitation=archive.uploads.invitations.by_public_id(invitation.public_id))


@router.get("/u/{token}/sent/{job_id}")
def invitee_sent(request: Request, archive: ArchiveDep, token: str, job_id: str,
                 uploader: allowed(UPLOAD_SEND)) -> Response:
    """After sending: how far the hospital's checks of the files got, then what each became
    (the page refreshes itself until the checks end)."""
    return _sent_page(request, archive, _invitation(request), job_id, uploader, staff=False)


# -- tus 1.0 (core, creation, termination) ----------------------------------------------


async def _audited_tus_step(archive: Archive, action: str, actor: Actor, public_id: str,
                   upload_id: str, step: Callable[[], Awaitable[Response]]) -> Response:
    """Run one tus step on a file of the upload ``public_id`` and audit it (``action``):
    how far the file got, or the step's refusal or failure with its reason, then raised
    again. A withdrawal that succeeds is audited by the service that made it."""
    try:
        response = await step()
    except Exception as exc:
        await run_in_threadpool(archive.uploads.record_step, action, actor, public_id,
                                upload_id, error=exc)
        raise
    if action != "upload.withdraw":
        made = response.headers.get("location", "").rsplit("/", 1)[-1]
        offset, length = (response.headers.get(h, "") for h in ("upload-offset",
                                                                  "upload-length"))
        await run_in_threadpool(
            archive.uploads.record_step, action, actor, public_id, upload_id or made,
            int(offset) if offset.isdigit() else None,
            int(length) if length.isdigit() else None)
    return response


def _tus_options() -> Response:
    return Response(status_code=204, headers={
        **_TUS, "Tus-Version": TUS_VERSION,
        "Tus-Extension": "creation,creation-with-upload,termination"})


def _metadata(header: str) -> dict[str, str]:
    """tus Upload-Metadata: comma-separated ``key base64value`` pairs."""
    found = {}
    for pair in header.split(","):
        key, _, value = pair.strip().partition(" ")
        if not key:
            continue
        try:
            found[key] = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise ImageShareError("Upload-Metadata is not valid (base64 of UTF-8)") from exc
    return found


_MAX_DIGITS = 19  # a byte count or offset fits a signed 64-bit integer


def _whole_number(text: str, header: str, missing: str) -> int:
    """A tus header's byte count: ASCII digits only (``str.isdigit`` takes "²" too, which
    ``int`` refuses), at most 19; else a 400 saying so (``missing`` when it is absent)."""
    if not text:
        raise ImageShareError(missing)
    if not (text.isascii() and text.isdigit()) or len(text) > _MAX_DIGITS:
        raise ImageShareError(f"{header} must be a whole number of bytes written with the "
                              f"digits 0-9 (at most {_MAX_DIGITS} of them)")
    return int(text)


def _check_version(request: Request) -> None:
    if request.headers.get("tus-resumable") != TUS_VERSION:
        raise _TusVersion()


class _TusVersion(ImageShareError):
    http_status = 412
    title = "Precondition failed"

    def __init__(self) -> None:
        super().__init__(f"this server speaks tus {TUS_VERSION} (Tus-Resumable header)")


async def _tus_create(request: Request, archive: Archive, invitation_of: Callable[[], Invitation],
                      base: str, actor: Actor) -> Response:
    """tus creation for the invitation ``invitation_of()`` gives (looked up, when it must
    be, in the same thread hop as the file's announcement)."""
    _check_version(request)
    length = _whole_number(request.headers.get("upload-length", ""), "Upload-Length",
                           "Upload-Length is required (deferred lengths are not taken)")
    with_bytes = request.headers.get("content-type", "") == "application/offset+octet-stream"
    if not with_bytes and request.headers.get("content-length", "0") not in ("", "0"):
        raise UnsupportedMediaType("bytes sent with a tus creation are "
                                   "application/offset+octet-stream")
    meta = _metadata(request.headers.get("upload-metadata", "")[:4096])
    path = meta.get("relativePath") or meta.get("filename") or "file"

    def announce() -> tuple[Invitation, UploadFile]:
        invitation = invitation_of()
        archive.uploads.invitations.require_open(invitation)
        archive.uploads.ensure_room(length, actor)  # the whole file must fit: a 507 now
        return invitation, archive.uploads.receiver.create(invitation, length, path)

    invitation, created = await run_in_threadpool(announce)
    offset = created.offset
    if with_bytes:  # tus creation-with-upload: the first bytes (often all) come along
        offset = await _receive(request, archive, invitation, created.upload_id, 0, actor,
                                created)
    return Response(status_code=201, headers={**_TUS, "Location": f"{base}/{created.upload_id}",
                                              "Upload-Offset": str(offset)})


def _tus_head(archive: Archive, invitation: Invitation, upload_id: str,
              actor: Actor) -> Response:
    receiver = archive.uploads.receiver
    found = receiver.file(invitation, upload_id)
    offset = found.offset
    if found.status == "receiving":
        offset = min(receiver.received_bytes(invitation, upload_id), found.length)
        if offset == found.length:
            # Every byte is here, but the file was never completed (the process writing its
            # last bytes ended before): completed now, or the client, told it has all, would
            # send nothing more and the file would never be sent.
            _complete(archive, invitation, found, actor)
    return Response(status_code=200, headers={
        **_TUS, "Upload-Offset": str(offset), "Upload-Length": str(found.length),
        "Cache-Control": "no-store"})


async def _tus_patch(request: Request, archive: Archive, invitation: Invitation,
                     upload_id: str, actor: Actor) -> Response:
    _check_version(request)
    if request.headers.get("content-type", "") != "application/offset+octet-stream":
        raise UnsupportedMediaType("a tus PATCH carries application/offset+octet-stream")
    start = _whole_number(request.headers.get("upload-offset", ""), "Upload-Offset",
                          "Upload-Offset is required")
    given = request.headers.get("upload-length")  # tus: set once, at creation, for good
    length = None if given is None else _whole_number(given, "Upload-Length", "")
    archive.uploads.invitations.require_open(invitation)
    await run_in_threadpool(archive.uploads.ensure_room, _content_length(request), actor)
    offset = await _receive(request, archive, invitation, upload_id, start, actor,
                            length=length)
    return Response(status_code=204, headers={**_TUS, "Upload-Offset": str(offset)})


def _content_length(request: Request) -> int:
    """The bytes a request says it carries (0 when it does not say, or says nonsense)."""
    text = request.headers.get("content-length", "")
    return int(text) if text.isascii() and text.isdigit() and len(text) <= _MAX_DIGITS else 0


def _written(fd: int, data: bytes | bytearray, position: int) -> None:
    """All of ``data`` written at ``position`` of the part file (a short write is carried
    on, never counted as whole); a full disk is a 507 (the sender resumes later from what
    was kept), not a 500."""
    view = memoryview(data)
    try:
        while view:
            done = os.pwrite(fd, view, position)
            if done <= 0:
                raise OSError(errno.ENOSPC, "nothing written")
            view, position = view[done:], position + done
    except OSError as exc:
        if no_room(exc):
            raise out_of_room() from exc
        raise


def _locked_part(path: Path) -> int:
    """The part file of an upload at ``path``, open for writing and locked: one writer per
    file, whichever process of this server (or instance on this data folder) a request
    reached. Raises BlockingIOError when another writer holds it, OSError when there is
    none such."""
    fd = os.open(path, os.O_WRONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _complete(archive: Archive, invitation: Invitation, found: UploadFile,
              actor: Actor) -> None:
    """Complete a file all of whose bytes arrived, unless a writer holds it (and is doing
    just that)."""
    receiver = archive.uploads.receiver
    try:
        fd = _locked_part(receiver.part_path(invitation, found.upload_id))
    except OSError:
        return  # a writer is at it, or it was completed (or withdrawn) a moment ago
    try:
        whole = receiver.begin_append(invitation, found.upload_id, found.length)
        archive.uploads.received(invitation, whole, found.length, actor)
    except UploadOffsetMismatch:
        pass  # complete already
    finally:
        os.close(fd)


async def _receive(request: Request, archive: Archive, invitation: Invitation,
                   upload_id: str, offset: int, actor: Actor,
                   created: UploadFile | None = None, length: int | None = None) -> int:
    """Write the request's bytes at ``offset`` of the file (one writer at a time; ``created``:
    the file just announced; ``length``: an Upload-Length sent again, which must be the one
    announced); a file complete is stored (:meth:`UploadService.received`). Returns the
    offset reached."""
    receiver = archive.uploads.receiver
    try:
        fd = _locked_part(receiver.part_path(invitation, upload_id))
    except BlockingIOError:
        raise UploadBusy() from None
    except OSError:  # none such (or no file name), withdrawn, or kept by another instance
        await run_in_threadpool(receiver.begin_append, invitation, upload_id, offset)
        raise NotFound("no such upload") from None
    return await _write(request, archive, invitation, upload_id, offset, actor, created, fd,
                        length)


async def _write(request: Request, archive: Archive, invitation: Invitation, upload_id: str,
                 offset: int, actor: Actor, created: UploadFile | None, fd: int,
                 length: int | None = None) -> int:
    """The body of :func:`_receive`, holding the file open as ``fd`` (locked; closed here)."""
    receiver = archive.uploads.receiver
    buffer = bytearray()
    closed = False
    try:
        found = (receiver.begin_append(invitation, upload_id, offset, created) if created
                 else await run_in_threadpool(receiver.begin_append, invitation, upload_id,
                                              offset))
        if length is not None and length != found.length:
            raise ImageShareError(f"Upload-Length cannot change: this file was announced as "
                                  f"{found.length} bytes")
        position = found.offset
        try:
            async for chunk in request.stream():
                if position + len(buffer) + len(chunk) > found.length:
                    raise ImageShareError("more bytes than Upload-Length announced")
                buffer += chunk
                if len(buffer) >= 1 << 20:
                    await run_in_threadpool(_written, fd, bytes(buffer), position)
                    position += len(buffer)
                    buffer.clear()
        except ClientDisconnect:
            pass  # keep what arrived: the client resumes from there

        def finish() -> UploadFile:
            """The last bytes written, then the file's state recorded (one thread hop); the
            lock is given up only then."""
            nonlocal closed
            try:
                end = position
                if buffer:
                    _written(fd, buffer, position)
                    end += len(buffer)
                return archive.uploads.received(invitation, found, end, actor)
            finally:
                closed = True
                os.close(fd)

        done = await run_in_threadpool(finish)
    finally:
        if not closed:
            os.close(fd)
    return done.offset


class UploadBusy(ImageShareError):
    """Another request is writing this file now."""

    http_status = 423
    title = "Locked"

    def __init__(self) -> None:
        super().__init__("another request is sending this file now; try again shortly")


def _tus_delete(archive: Archive, invitation: Invitation, upload_id: str,
                actor: Actor) -> Response:
    archive.uploads.withdraw(invitation, upload_id, actor)
    return Response(status_code=204, headers=_TUS)


# -- staff: invitations, browser import, the QC queue -------------------------------------


def _staff_batch(archive: Archive, public_id: str, actor: Actor) -> Invitation:
    """A staff import batch of this member of staff (nobody else's)."""
    invitation = archive.uploads.invitations.by_public_id(public_id)
    if invitation.kind != "staff" or invitation.created_by != actor.name:
        raise NotFound("no such upload")
    return invitation


@router.get("/uploads")
def uploads_queue(request: Request, archive: ArchiveDep,
                  actor: allowed(UPLOAD_MANAGE)) -> Response:
    """Invitations and imports with what waits for review, the invite form, patient
    accounts invited."""
    rows = []
    for invitation in archive.uploads.invitations.all():
        rows.append({"invitation": invitation,
                     "pending": archive.uploads.review.pending_count(invitation)})
    archive.audit.record(AuditEvent(actor=actor, action="upload.read", outcome="success",
                                    instance_count=len(rows)))
    return page(request, "uploads.html", rows=rows,
                patients=archive.uploads.patients.invited(),
                max_days=archive.settings.upload_max_days)


def _request_from(form: dict[str, str]) -> UploadRequest:
    days = form.get("days", "") or "14"
    max_mb = form.get("max_mb", "") or "0"
    if not days.isdigit() or not max_mb.isdigit():
        raise ImageShareError("days and size limit are whole numbers")
    return UploadRequest(
        patient_name=form.get("patient_name", ""), hospital_number=form.get(
            "hospital_number", ""), birth_date=form.get("birth_date", ""),
        nhs_number=form.get("nhs_number", ""), issuer=form.get("issuer", ""),
        email=form.get("email", ""), reference=form.get("reference", ""),
        expected_modality=form.get("expected_modality", ""),
        expected_body_part=form.get("expected_body_part", ""), days=int(days),
        max_mb=int(max_mb))


_FIELDS = ("patient_name", "hospital_number", "birth_date", "nhs_number", "issuer", "email",
           "reference", "expected_modality", "expected_body_part", "days", "max_mb")


async def _form(request: Request) -> dict[str, str]:
    """The invitation or import form: the patient's name as typed in its two fields
    (``family_name``, ``given_name``), or, from programs, as a DICOM ``patient_name``."""
    form = await request.form()
    values = {k: str(form.get(k, ""))[:400] for k in _FIELDS}
    family, given = (str(form.get(k, "")) for k in ("family_name", "given_name"))
    if family.strip() or given.strip():
        values["patient_name"] = typed_person_name(family, given)
    return values


@router.post("/uploads/invite")
async def uploads_invite(request: Request, archive: ArchiveDep,
                         actor: allowed(UPLOAD_MANAGE)) -> Response:
    """Invite someone by e-mail to upload for a patient; shows the passcode once."""
    form = await _form(request)
    try:
        created = await made_once(
            request, actor, await request.form(), "invitation",
            lambda: archive.uploads.invitations.invite(_request_from(form), actor),
            shown_at="/uploads")
    except ImageShareError as exc:
        rows = [{"invitation": i, "pending": archive.uploads.review.pending_count(i)}
                for i in archive.uploads.invitations.all()]
        return page(request, "uploads.html", status_code=400, rows=rows, form=form,
                    patients=archive.uploads.patients.invited(),
                    max_days=archive.settings.upload_max_days, error=str(exc))
    if isinstance(created, Response):
        return created
    return page(request, "upload_invited.html", created=created,
                link=archive.uploads.invitations.public_url + created.path,
                emailed=archive.uploads.invitations.mailer.settings.enabled)


@router.get("/uploads/import")
def staff_import_form(request: Request, archive: ArchiveDep, actor: allowed(UPLOAD_MANAGE),
                      study: str = "") -> Response:
    """Import a USB stick or CD in the browser, for a patient (filled in from a study)."""
    form = {k: "" for k in _FIELDS}
    if study:
        record = archive.catalogue.view(study, actor, archive.policy.study_scope(actor))
        p = record.patient
        form.update(patient_name=p.name, hospital_number=p.patient_id, issuer=p.issuer,
                    birth_date=p.birth_date, nhs_number=p.nhs_number)
    return page(request, "upload_import.html", form=form)


@router.post("/uploads/import")
async def staff_import_start(request: Request, archive: ArchiveDep,
                             actor: allowed(UPLOAD_MANAGE)) -> Response:
    """Start an import batch for the patient as the hospital knows them."""
    form = await _form(request)
    try:
        batch = await run_in_threadpool(archive.uploads.invitations.staff_import,
                                        _request_from(form), actor)
    except ImageShareError as exc:
        return page(request, "upload_import.html", status_code=400, form=form, error=str(exc))
    return redirect(f"/uploads/{batch.public_id}/upload")


@router.get("/uploads/{public_id}/upload")
def staff_upload_page(request: Request, archive: ArchiveDep, public_id: str,
                      actor: allowed(UPLOAD_MANAGE)) -> Response:
    """The same upload page, for a member of staff's own import."""
    batch = _staff_batch(archive, public_id, actor)
    archive.audit.record(AuditEvent(actor=actor, action="upload.read", outcome="success",
                                    patient_id=batch.hospital_number, issuer=batch.issuer,
                                    detail={"upload": public_id}))
    return _upload_page(request, archive, batch, f"/uploads/{public_id}", staff=True)


@tus.options("/uploads/{public_id}/files")
def staff_tus_options(_actor: allowed(UPLOAD_MANAGE)) -> Response:
    """tus: what this server offers."""
    return _tus_options()


@tus.post("/uploads/{public_id}/files")
async def staff_tus_create(request: Request, archive: ArchiveDep, public_id: str,
                           actor: allowed(UPLOAD_MANAGE)) -> Response:
    """tus creation for a staff import (creation-with-upload too)."""
    return await _audited_tus_step(
        archive, "upload.announce", actor, public_id, "", lambda: _tus_create(
            request, archive, lambda: _staff_batch(archive, public_id, actor),
            f"/uploads/{public_id}/files", actor))


@tus.head("/uploads/{public_id}/files/{upload_id}")
async def staff_tus_head(archive: ArchiveDep, public_id: str, upload_id: str,
                         actor: allowed(UPLOAD_MANAGE)) -> Response:
    """tus: how many bytes arrived."""
    return await _audited_tus_step(archive, "upload.offset", actor, public_id, upload_id,
                          lambda: run_in_threadpool(lambda: _tus_head(
                              archive, _staff_batch(archive, public_id, actor), upload_id,
                              actor)))


@tus.patch("/uploads/{public_id}/files/{upload_id}")
async def staff_tus_patch(request: Request, archive: ArchiveDep, public_id: str,
                          upload_id: str, actor: allowed(UPLOAD_MANAGE)) -> Response:
    """tus: the next chunk."""

    async def step() -> Response:
        batch = await run_in_threadpool(_staff_batch, archive, public_id, actor)
        return await _tus_patch(request, archive, batch, upload_id, actor)

    return await _audited_tus_step(archive, "upload.chunk", actor, public_id, upload_id, step)


@tus.delete("/uploads/{public_id}/files/{upload_id}")
async def staff_tus_delete(archive: ArchiveDep, public_id: str, upload_id: str,
                           actor: allowed(UPLOAD_MANAGE)) -> Response:
    """tus termination."""
    return await _audited_tus_step(archive, "upload.withdraw", actor, public_id, upload_id,
                          lambda: run_in_threadpool(lambda: _tus_delete(
                              archive, _staff_batch(archive, public_id, actor), upload_id,
                              actor)))


@router.post("/uploads/{public_id}/send")
async def staff_send(request: Request, archive: ArchiveDep, public_id: str,
                     actor: allowed(UPLOAD_MANAGE)) -> Response:
    """Send the imported files for review (then their progress, then the QC page)."""
    batch = await run_in_threadpool(_staff_batch, archive, public_id, actor)
    return await _send(request, archive, batch, actor, actor.name,
                       f"/uploads/{public_id}", staff=True)


@router.get("/uploads/{public_id}/sent/{job_id}")
def staff_sent(request: Request, archive: ArchiveDep, public_id: str, job_id: str,
               actor: allowed(UPLOAD_MANAGE)) -> Response:
    """How far the intake of imported files got; a link to the QC page when it is done."""
    return _sent_page(request, archive, _staff_batch(archive, public_id, actor), job_id,
                      actor, staff=True)


@router.get("/uploads/{public_id}")
def upload_detail(request: Request, archive: ArchiveDep, public_id: str,
                  actor: allowed(UPLOAD_MANAGE)) -> Response:
    """One upload: its studies with checks, files, viewer links, accept and reject."""
    invitation = archive.uploads.invitations.by_public_id(public_id)
    studies = archive.uploads.review.studies(invitation)
    archive.audit.record(AuditEvent(actor=actor, action="upload.read", outcome="success",
                                    patient_id=invitation.hospital_number,
                                    issuer=invitation.issuer,
                                    detail={"upload": public_id}))
    return page(request, "upload_review.html", invitation=invitation, studies=studies,
                unused=archive.uploads.review.unused(invitation))


@router.post("/uploads/{public_id}/studies/{item}/{decision}")
async def upload_decide(request: Request, archive: ArchiveDep, public_id: str, item: RowId,
                        decision: str, actor: allowed(UPLOAD_MANAGE)) -> Response:
    """Accept a study into the record, or reject it with a message to the uploader."""
    form = await request.form()
    invitation = archive.uploads.invitations.by_public_id(public_id)
    message = str(form.get("message", ""))[:4000]
    try:
        if decision == "accept":
            await run_in_threadpool(archive.uploads.review.accept, invitation, item, actor,
                                    bool(form.get("file_anyway")), message)
        elif decision == "reject":
            await run_in_threadpool(archive.uploads.review.reject, invitation, item, actor,
                                    message)
        else:
            raise NotFound("decide accept or reject")
    except ImageShareError as exc:
        return page(request, "upload_review.html", status_code=400, invitation=invitation,
                    studies=archive.uploads.review.studies(invitation),
                    unused=archive.uploads.review.unused(invitation), error=str(exc))
    return redirect(f"/uploads/{public_id}")


@router.get("/uploads/{public_id}/originals/{result}")
def upload_original(archive: ArchiveDep, public_id: str, result: RowId,
                    actor: allowed(UPLOAD_MANAGE)) -> Response:
    """An uploaded file as it was sent (videos play, PDFs open), audited."""
    invitation = archive.uploads.invitations.by_public_id(public_id)
    row, store = archive.uploads.review.original(invitation, result)
    archive.audit.record(AuditEvent(actor=actor, action="upload.original", outcome="success",
                                    patient_id=invitation.hospital_number,
                                    issuer=invitation.issuer,
                                    study_uid=str(row["study_uid"]),
                                    detail={"upload": public_id}))
    media = {"photo": "image/jpeg", "video": "video/mp4", "pdf": "application/pdf"}.get(
        str(row["kind"]), "application/octet-stream")
    stream = store.open(str(row["original_key"]))

    def chunks() -> Any:
        with stream:
            while chunk := stream.read(1 << 20):
                yield chunk

    # The bytes are the uploader's, as sent: never sniffed into another type, and shown
    # sandboxed (no script, no same-origin access), as studies' documents are.
    return StreamingResponse(chunks(), media_type=media, headers={
        "Content-Disposition": "inline", "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"})


@router.post("/uploads/{public_id}/revoke")
def upload_revoke(archive: ArchiveDep, public_id: str,
                  actor: allowed(UPLOAD_MANAGE)) -> Response:
    """End an invitation for good."""
    invitation = archive.uploads.invitations.by_public_id(public_id)
    archive.uploads.revoke(invitation, actor)
    return redirect("/uploads")


@router.post("/uploads/patients")
async def patient_invite(request: Request, archive: ArchiveDep,
                         actor: allowed(UPLOAD_MANAGE)) -> Response:
    """Invite a patient to an account for their own images."""
    form = await request.form()
    try:
        await run_in_threadpool(archive.uploads.patients.invite, str(form.get("email", "")),
                                str(form.get("hospital_number", "")),
                                str(form.get("issuer", "")), actor)
    except ImageShareError as exc:
        rows = [{"invitation": i, "pending": archive.uploads.review.pending_count(i)}
                for i in archive.uploads.invitations.all()]
        return page(request, "uploads.html", status_code=400, rows=rows,
                    patients=archive.uploads.patients.invited(),
                    max_days=archive.settings.upload_max_days, error=str(exc))
    return redirect("/uploads")


# -- patients: their own studies ------------------------------------------------------------


def _own_studies(archive: Archive, actor: Actor) -> list[Any]:
    grants = archive.uploads.patients.grants_for(actor)
    return [archive.catalogue.record(g.study_uid, include_review=False) for g in grants]


@router.get("/my")
def my_images(request: Request, archive: ArchiveDep, actor: allowed(PATIENT_SELF)) -> Response:
    """A patient's own studies, with view, download and share, and the links they made."""
    studies = _own_studies(archive, actor)
    # One event per record the list showed (its patient, with the issuer), so that the
    # patient's access report lists it; one naming nobody when the list was empty.
    shown: dict[tuple[str, str], int] = {}
    for study in studies:
        key = (study.patient.patient_id, study.patient.issuer)
        shown[key] = shown.get(key, 0) + 1
    archive.audit.record([AuditEvent(actor=actor, action="patient.studies", outcome="success",
                                     patient_id=patient_id, issuer=issuer,
                                     instance_count=count)
                          for (patient_id, issuer), count in shown.items()]
                         or [AuditEvent(actor=actor, action="patient.studies",
                                        outcome="success")])
    return page(request, "my_images.html", studies=studies,
                shares=archive.shares.owned(actor.name))


def _own_study(request: Request, archive: Archive, actor: Actor, study_uid: str,
               action: str = "") -> None:
    """Return when ``study_uid`` is of the patient's own record; else NotFound (the same as
    for no study at all), audited (a patient trying the UIDs of other studies leaves a
    trace): as a refused ``action`` when given (as a member of staff reaching for another's
    import is), else as a refusal of the access policy."""
    if any(g.study_uid == study_uid and DOWNLOAD in g.rights
           for g in archive.uploads.patients.grants_for(actor)):
        return
    if not action:
        refuse(request, actor, PATIENT_SELF, NotFound("no such study"), study_uid[:64])
    archive.audit.record(AuditEvent(actor=actor, action=action, outcome="refused",
                                    study_uid=study_uid[:64],
                                    detail={"reason": "not a study of their own record"}))
    raise NotFound("no such study")


@router.get("/my/studies/{study_uid}/download")
def my_download(request: Request, archive: ArchiveDep, study_uid: str,
                actor: allowed(PATIENT_SELF)) -> Response:
    """The patient's own study as a zip of its DICOM files."""
    _own_study(request, archive, actor, study_uid, "patient.download")
    found = archive.retrieve.select(actor, "patient.download", study_uids=[study_uid],
                                    audit=False)
    fd, name = tempfile.mkstemp(suffix=".zip", prefix=owned_prefix(),
                               dir=archive.settings.staging_dir)
    os.close(fd)
    with zipfile.ZipFile(name, "w", zipfile.ZIP_STORED) as archive_zip:
        for number, inst in enumerate(found, 1):
            with archive.retrieve.open(inst) as src, archive_zip.open(
                    f"IMAGES/IM{number:05d}.dcm", "w", force_zip64=True) as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
    archive.audit.record(AuditEvent(actor=actor, action="patient.download", outcome="success",
                                    patient_id=found[0].patient_id, study_uid=study_uid,
                                    instance_count=len(found), detail={"format": "zip"}))
    # The patient's own images: no browser or proxy keeps a copy (a shared or library
    # computer), as for every other download of images.
    return FileResponse(name, media_type="application/zip", filename="my-images.zip",
                        headers={"Cache-Control": "no-store",
                                 "X-Content-Type-Options": "nosniff"},
                        background=BackgroundTask(Path(name).unlink, missing_ok=True))


@router.post("/my/studies/{study_uid}/share")
async def my_share(request: Request, archive: ArchiveDep, study_uid: str,
                   actor: allowed(PATIENT_SELF)) -> Response:
    """Share one's own study with a named doctor (a link with a passcode and an expiry)."""
    form = await request.form()
    try:
        _own_study(request, archive, actor, study_uid)
        days = str(form.get("days", "") or "14")
        share_request = NewShare(
            study_uid, recipient_email=str(form.get("email", ""))[:254],
            days=int(days) if days.isascii() and days.isdigit() and len(days) < 6 else 0,
            allow_download=True, deidentified=False, title="Images shared by the patient",
            message=str(form.get("message", ""))[:2000])
        created = await made_once(
            request, actor, form, "share",
            lambda: archive.shares.create_and_send(share_request, actor,
                                                   archive.policy.study_scope(actor)),
            shown_at="/my")
    except ImageShareError as exc:  # another's study: not found, as for its download
        return page(request, "my_images.html",
                    status_code=404 if isinstance(exc, NotFound) else 400,
                    studies=_own_studies(archive, actor),
                    shares=archive.shares.owned(actor.name), error=str(exc))
    if isinstance(created, Response):
        return created
    return page(request, "share_created.html", created=created, passcode=created.passcode,
                url=archive.shares.link_base() + created.path, emailed=True)
