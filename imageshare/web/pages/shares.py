"""The owner's side of sharing: create a share from a study, list, follow and revoke shares;
notifications."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from imageshare.access.policy import ACCOUNT_SELF, EXPORT_IDENTIFIABLE, PUBLIC, SHARE_CREATE
from imageshare.archive.studies import ENCAPSULATED_PDF
from imageshare.audit.trail import AuditEvent
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError, NotFound
from imageshare.sharing.links import CreatedShare, NewShare, Share
from imageshare.sharing.logbook import as_csv as logbook_csv
from imageshare.sharing.logbook import as_pdf as logbook_pdf
from imageshare.sharing.logbook import logbook
from imageshare.storage.submissions import KEY_FIELD
from imageshare.uploads.invitations import CreatedInvitation
from imageshare.web.auth import allowed, authorise_also, client_address, refuse
from imageshare.web.deps import Archive, ArchiveDep, archive_of
from imageshare.web.pages.templating import page, redirect
from imageshare.web.urls import public_root

router = APIRouter(include_in_schema=False)


def shown_link(request: Request, path: str) -> str:
    """A link to show the person who made it, on the page they asked for (e-mails use only
    IMAGESHARE_PUBLIC_URL: ShareService.link_base)."""
    return public_root(request) + path


Made = TypeVar("Made", CreatedShare, CreatedInvitation)


def documents_left_out(archive: Archive, share: Share) -> list[str]:
    """The titles of the documents (PDF reports) in a de-identified share, which its
    recipient never sees: a document's text cannot be checked for the patient's details, so
    de-identification holds every one back. Known when the share is made (before its copies
    are prepared), for telling the sharer; [] for an identifiable share. Not audited: part
    of making or following the share, which is."""
    if not share.deidentified:
        return []
    items = archive.shares.items(share)
    sops = {i.sop_uid for i in items}
    titles = []
    for study_uid in sorted({i.study_uid for i in items}):
        try:
            study = archive.catalogue.record(study_uid)
        except NotFound:  # deleted since: nothing of it is shown either
            continue
        for series in study.series:
            for inst in series.instances:
                if inst.sop_uid in sops and inst.sop_class_uid == ENCAPSULATED_PDF:
                    title, _date = archive.retrieve.document_title(inst.sop_uid)
                    titles.append(title or series.description or "a PDF document")
    return titles


async def made_once(request: Request, actor: Actor, form: Mapping[str, Any], kind: str,
                    make: Callable[[], Made], shown_at: str = "") -> Made | Response:
    """What ``make`` creates (a share link, an upload invitation: mailed, its passcode
    shown once), made once per rendering of its form (``storage.submissions``): for the same
    form sent again (a double click, a resend) a redirect to where the first one is listed
    (``shown_at``, else the share's page), made and mailed once."""
    made: list[Made] = []

    def create() -> str:
        made.append(make())
        return made[0].public_id

    public_id, first = await run_in_threadpool(
        archive_of(request).submissions.once, actor.name, kind,
        str(form.get(KEY_FIELD, "")), create)
    if not first:
        return redirect(f"{shown_at or f'/shares/{public_id}'}?notice={kind}-made-once")
    return made[0]


@router.post("/studies/{study_uid}/share")
async def create_share(
    request: Request, archive: ArchiveDep,
    study_uid: str, actor: allowed(SHARE_CREATE, "study_uid"),
    recipient_email: Annotated[str, Form()] = "", recipient_user: Annotated[str, Form()] = "",
    days: Annotated[int, Form()] = 0, download: Annotated[str, Form()] = "",
    comment: Annotated[str, Form()] = "1",
    identifiable: Annotated[str, Form()] = "", profile: Annotated[str, Form()] = "teaching",
    message: Annotated[str, Form()] = "", title: Annotated[str, Form()] = "",
    purpose: Annotated[str, Form()] = "care",
) -> Response:
    """Share the study (or the series ticked) and show the link and passcode once."""
    form = await request.form()
    series = tuple(str(v) for v in form.getlist("series"))[:500]
    if identifiable:
        authorise_also(request, actor, EXPORT_IDENTIFIABLE, study_uid)
    share_request = NewShare(
        study_uid, series_uids=series, recipient_email=recipient_email,
        recipient_user=recipient_user.strip(), days=days or archive.shares.default_days,
        allow_download=bool(download), allow_comment=bool(comment),
        deidentified=not identifiable, profile=profile, message=message, title=title,
        purpose=purpose)
    created = await made_once(
        request, actor, form, "share",
        lambda: archive.shares.create_and_send(share_request, actor,
                                               archive.policy.study_scope(actor)))
    if isinstance(created, Response):
        return created
    url = shown_link(request, created.path)
    share = archive.shares.by_public_id(created.public_id, actor.name)
    # Said only when it was: without a mail server nothing goes out, and the sharer must
    # pass the link on themselves.
    addressed = bool(recipient_email.strip())
    return page(request, "share_created.html", url=url, passcode=created.passcode,
                created=created, emailed=addressed and archive.shares.mailer.settings.enabled,
                unmailed=addressed and not archive.shares.mailer.settings.enabled,
                left_out=documents_left_out(archive, share))


@router.get("/shares")
def my_shares(request: Request, archive: ArchiveDep, actor: allowed(SHARE_CREATE)) -> Response:
    """Every share the user made, with its state."""
    return page(request, "shares.html", shares=archive.shares.owned(
        actor.name))


def _mine(request: Request, public_id: str, actor: Actor) -> Share:
    """One of the caller's shares; another's, or none, is the same 404 ("no such share"),
    audited as a refusal like every other (as over the API)."""
    try:
        return archive_of(request).shares.by_public_id(public_id, actor.name)
    except NotFound as exc:
        refuse(request, actor, SHARE_CREATE, exc)


@router.get("/shares/{public_id}")
def share_detail(request: Request, archive: ArchiveDep,
                 public_id: str, actor: allowed(SHARE_CREATE)) -> Response:
    """One share: its items, every access, comments and feedback; revoke."""
    service = archive.shares
    share = _mine(request, public_id, actor)
    items = service.items(share)
    left_out = documents_left_out(archive, share)
    return page(request, "share_detail.html", share=share, items=items,
                visits=[_in_words(v, share) for v in service.visits(share)],
                comments=service.comments(share), left_out=left_out,
                held_back_images=max(sum(1 for i in items if i.held_back) - len(left_out), 0),
                feedback=service.feedback(share), clips=service.clip_names(share))


# What the owner did to the share, in words (the audit trail keeps the action's code).
_OWNER_ACTIONS = {"share.create": "made the share", "share.revoke": "revoked the share",
                  "share.bind": "the invited account was made",
                  "share.locked": "locked after wrong passcodes",
                  "share.expiring": "told the share is about to end",
                  "share.comment.sr": "a comment was filed as a report"}


def _counted(number: int, noun: str, plural: str = "") -> str:
    return f"{number} {noun if number == 1 else (plural or noun + 's')}"


def _in_words(visit: dict[str, Any], share: Share) -> dict[str, Any]:
    """One visit as the share's page shows it: who by name (the owner as "you"), and what
    they did in words, never an audit code ("user:doc", "share.create") nor "image(s)"."""
    who = str(visit.get("who") or "")
    name = who.split(":", 1)[1] if who.startswith("user:") else who
    done = [text for key, text in (("opens", "opened with the passcode"),
                                   ("views", "viewed the case")) if visit.get(key)]
    for key, noun, plural in (("images", "image shown", "images shown"),
                              ("downloads", "download", ""), ("comments", "comment", ""),
                              ("feedback", "feedback given", "feedback given"),
                              ("wrong_passcodes", "wrong passcode", "")):
        if visit.get(key):
            done.append(_counted(int(visit[key]), noun, plural))
    done += [text for key, text in (("marks", "saved marks"), ("signoffs", "signed off"))
             if visit.get(key)]
    done += [_OWNER_ACTIONS.get(str(a), str(a).removeprefix("share.").replace(".", " "))
             for a in visit.get("other", ())]
    same_minute = (isinstance(visit.get("first"), datetime) and isinstance(
        visit.get("last"), datetime) and visit["first"].replace(second=0, microsecond=0)
        == visit["last"].replace(second=0, microsecond=0))
    return {**visit, "who": "you" if name == share.owner else name,
            "summary": ", ".join(done), "last": visit["first"] if same_minute
            else visit["last"]}


@router.get("/shares/{public_id}/revoke")
def confirm_revoke(request: Request, archive: ArchiveDep, public_id: str,
                   actor: allowed(SHARE_CREATE)) -> Response:
    """Ask before ending the share for good."""
    share = _mine(request, public_id, actor)
    return page(request, "share_revoke.html", share=share)


@router.post("/shares/{public_id}/revoke")
def revoke(request: Request, archive: ArchiveDep, public_id: str,
           actor: allowed(SHARE_CREATE), confirm: Annotated[str, Form()] = "") -> Response:
    """End the share for good, once the owner confirmed it (else ask first)."""
    share = _mine(request, public_id, actor)
    if confirm != "yes":
        return redirect(f"/shares/{share.public_id}/revoke")
    archive.shares.revoke(share.public_id, actor)
    return redirect(f"/shares/{share.public_id}?notice=revoked")


@router.get("/logbook")
def logbook_page(request: Request, archive: ArchiveDep, actor: allowed(SHARE_CREATE)
                 ) -> Response:
    """The trainee's review logbook: cases shared for review, feedback and sign-offs."""
    return page(request, "logbook.html", entries=logbook(archive.shares, actor.name))


@router.get("/logbook.{format}")
def logbook_export(archive: ArchiveDep, format: str, actor: allowed(SHARE_CREATE)
                   ) -> Response:
    """The logbook as PDF or CSV (no patient data in it)."""
    if format not in ("pdf", "csv"):
        raise NotFound("the logbook is exported as pdf or csv")
    entries = logbook(archive.shares, actor.name)
    archive.audit.record(AuditEvent(actor=actor, action="logbook.export", outcome="success",
                                    detail={"format": format, "cases": len(entries)}))
    # Reviewers' names and words: no browser or proxy keeps a copy, nothing sniffs it.
    private = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
    if format == "csv":
        return Response(logbook_csv(entries), media_type="text/csv; charset=utf-8", headers={
            **private, "Content-Disposition": 'attachment; filename="logbook.csv"'})
    return Response(logbook_pdf(entries, actor.name), media_type="application/pdf", headers={
        **private, "Content-Disposition": 'attachment; filename="logbook.pdf"'})


@router.get("/notifications")
def notifications(request: Request, archive: ArchiveDep, actor: allowed(ACCOUNT_SELF)) -> Response:
    """The user's notifications (no patient data in them)."""
    items = archive.notifier.recent(actor.name)
    return page(request, "notifications.html", items=items)


@router.get("/shared-with-me")
def shared_with_me(request: Request, archive: ArchiveDep, actor: allowed(ACCOUNT_SELF)) -> Response:
    """Everything shared with this account (by name, or by its e-mail address once that is
    confirmed) in one place; an unconfirmed address is named, with a button that mails the
    link confirming it again."""
    received = archive.shares.received(actor.name)
    email = archive.users.email_of(actor.name)
    unconfirmed = email if email and not archive.users.verified_email_of(actor.name) else ""
    entries = []
    for share in received:
        # An identifiable share's studies open here once its passcode was given (signed in).
        opened = (not share.deidentified and share.recipient_user == actor.name
                  and share.opened_at is not None)
        studies = sorted({i.study_uid for i in archive.shares.items(share)}) if opened else []
        entries.append({"share": share, "studies": studies})
    return page(request, "shared_with_me.html", entries=entries, unconfirmed=unconfirmed,
                link_sent_at=archive.users.confirmation_pending(actor.name)
                if unconfirmed else None)


@router.post("/shares/{public_id}/invite")
def invite_reviewer(request: Request, archive: ArchiveDep, public_id: str,
                    actor: allowed(SHARE_CREATE)) -> Response:
    """Invite the share's recipient to create a reviewer account (link by e-mail)."""
    share = _mine(request, public_id, actor)
    archive.shares.invite_account(share, actor)
    return redirect(f"/shares/{public_id}?notice=invited")


@router.get("/invite/{secret}")
def invitation_form(request: Request, archive: ArchiveDep,
                    secret: str, _anyone: allowed(PUBLIC)) -> Response:
    """The form to create an invited account."""
    if archive.users.invitation(secret) is None:
        return page(request, "error.html", status_code=410, title="Invitation not valid",
                    detail="This invitation has expired or was used already.")
    return page(request, "invitation.html", secret=secret)


@router.post("/invite/{secret}")
def accept_invitation(request: Request, archive: ArchiveDep, secret: str, _anyone: allowed(PUBLIC),
                      username: Annotated[str, Form()], password: Annotated[str, Form()]
                      ) -> Response:
    """Create the invited account, then sign in (two-factor sign-in can be set up there)."""
    try:
        archive.shares.accept_invitation(secret, username[:128], password[:1024],
                                         client_address(request))
    except ImageShareError as exc:
        return page(request, "invitation.html", status_code=400, secret=secret,
                    error=str(exc))
    return redirect("/login?notice=account-created")
