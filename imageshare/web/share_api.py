"""Sharing over the JSON API: create (including a selection of images or clips), list, follow
and revoke shares."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import Field

from imageshare.access.policy import EXPORT_IDENTIFIABLE, SHARE_CREATE
from imageshare.domain.actors import Actor
from imageshare.domain.errors import NotFound
from imageshare.sharing.links import NewShare, Share, ShareService
from imageshare.web.auth import allowed, authorise_also, refuse
from imageshare.web.deps import ArchiveDep
from imageshare.web.pages.shares import shown_link
from imageshare.web.params import TOTAL, JsonApiRoute, Limit, Offset, Strict, Uid

router = APIRouter(prefix="/api", tags=["API"], route_class=JsonApiRoute)


class ShareIn(Strict):
    """A share of a study, some of its series or a selection of its instances (a field it
    does not define is refused: :class:`Strict`)."""

    series_uids: list[Uid] = Field(default_factory=list, max_length=1000)
    sop_uids: list[Uid] = Field(default_factory=list, max_length=10000)
    recipient_email: str = Field(default="", max_length=254)
    recipient_user: str = Field(default="", max_length=128)
    days: int = Field(default=0, ge=0, le=3650)
    allow_download: bool = False
    allow_comment: bool = True
    deidentified: bool = True
    profile: str = Field(default="teaching", max_length=64)
    message: str = Field(default="", max_length=4000)
    title: str = Field(default="", max_length=128)
    # Why the images are shared: identifiable teaching or research shares need the patient's
    # recorded consent.
    purpose: Literal["care", "teaching", "research"] = "care"


def _view(share: Share) -> dict[str, Any]:
    return {"id": share.public_id, "title": share.title, "state": share.state,
            "recipient_email": share.recipient_email, "recipient_user": share.recipient_user,
            "deidentified": share.deidentified, "allow_download": share.allow_download,
            "allow_comment": share.allow_comment,
            "created_at": share.created_at.isoformat(),
            "expires_at": share.expires_at.isoformat(),
            "reviewed_at": share.reviewed_at.isoformat() if share.reviewed_at else None}


@router.post("/studies/{study_uid}/shares", status_code=201, summary="Create a share link")
async def create_share(request: Request, archive: ArchiveDep, study_uid: str, body: ShareIn,
                       actor: allowed(SHARE_CREATE, "study_uid")) -> dict[str, Any]:
    """Answers with the link and its passcode, shown only here."""
    if not body.deidentified:
        authorise_also(request, actor, EXPORT_IDENTIFIABLE, study_uid)
    share_request = NewShare(
        study_uid, tuple(body.series_uids), tuple(body.sop_uids), body.recipient_email,
        body.recipient_user, body.days or archive.shares.default_days, body.allow_download,
        body.allow_comment, body.deidentified, body.profile, body.message, body.title,
        purpose=body.purpose)
    created = await run_in_threadpool(archive.shares.create_and_send, share_request, actor,
                                      archive.policy.study_scope(actor))
    url = shown_link(request, created.path)
    return {"id": created.public_id, "url": url, "passcode": created.passcode,
            "expires_at": created.expires_at.isoformat()}


@router.get("/shares", summary="My shares")
def list_shares(archive: ArchiveDep, response: Response, actor: allowed(SHARE_CREATE),
                limit: Limit = 1000, offset: Offset = 0) -> list[dict[str, Any]]:
    """The caller's shares, newest first, a page at a time (``X-Total-Count``: all of
    them)."""
    owned = archive.shares.owned(actor.name)
    response.headers[TOTAL] = str(len(owned))
    return [_view(s) for s in owned[offset:offset + limit]]


def _owned(request: Request, service: ShareService, share_id: str, actor: Actor) -> Share:
    """One of the caller's shares; another's, or none, is the same 404 ("no such share"),
    audited as a refusal like every other."""
    try:
        return service.by_public_id(share_id, actor.name)
    except NotFound as exc:
        refuse(request, actor, SHARE_CREATE, exc)


@router.get("/shares/{share_id}", summary="One share with its accesses and feedback")
def get_share(request: Request, archive: ArchiveDep, share_id: str,
              actor: allowed(SHARE_CREATE)) -> dict[str, Any]:
    """State, every use of the link, comments and feedback."""
    service = archive.shares
    share = _owned(request, service, share_id, actor)
    return {**_view(share),
            "accesses": [{"at": a["at"].isoformat(), "action": a["action"],
                          "outcome": a["outcome"], "source": a["source"]}
                         for a in service.accesses(share)],
            "comments": [{"body": c["body"], "image": c["public_sop_uid"],
                          "at": c["created_at"].isoformat()} for c in service.comments(share)],
            "feedback": [{k: (v.isoformat() if hasattr(v, "isoformat") else v)
                          for k, v in f.items() if k not in ("pk", "share_pk")}
                         for f in service.feedback(share)]}


@router.delete("/shares/{share_id}", status_code=204, summary="Revoke a share")
def revoke_share(request: Request, archive: ArchiveDep, share_id: str,
                 actor: allowed(SHARE_CREATE)) -> None:
    """End the share for good (another's, or none: 404, audited)."""
    share = _owned(request, archive.shares, share_id, actor)
    archive.shares.revoke(share.public_id, actor)
