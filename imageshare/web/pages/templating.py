"""Rendering pages: one Jinja environment, the filters pages share, and the page context."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from imageshare.access.policy import EXCHANGE
from imageshare.domain.actors import ANONYMOUS, Actor
from imageshare.storage.submissions import new_form_key
from imageshare.web.deps import archive_of

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
# Messages shown after a redirect, chosen by a code in the URL: the URL never carries text.
NOTICES = {
    "attached": ("success", "The document was attached to the study."),
    "commented": ("success", "Your comment was added."),
    "corrected": ("success", "The patient details were corrected in the index and in every "
                             "stored image."),
    "merged": ("success", "The records were merged."),
    "two-factor-on": ("success", "Two-factor sign-in is on."),
    "password-changed": ("success", "Your password was changed and every other session of "
                                    "your account was signed out. API tokens keep working "
                                    "until you revoke them: check the list below."),
    "user-added": ("success", "The user was added."),
    "user-changed": ("success", "The account was changed."),
    "user-disabled": ("success", "The account was disabled: its sessions ended and its "
                                 "password and API tokens no longer work."),
    "user-enabled": ("success", "The account was enabled again."),
    "user-email": ("success", "The account's e-mail address was saved (confirmed, as an "
                              "administrator set it)."),
    "signed-out": ("info", "You are signed out."),
    "token-revoked": ("success", "The token was revoked."),
    "invited": ("success", "The recipient was invited by e-mail to create an account."),
    "account-created": ("success", "Your account is ready: sign in."),
    "email-saved": ("success", "Your e-mail address was saved."),
    "feedback-sent": ("success", "Thank you: your feedback was sent to the person who shared "
                                 "this case."),
    "signed-off": ("success", "You signed off this case; the trainee's logbook shows it."),
    "share-made-once": ("info", "This form was sent twice: the share link was made, and "
                                "e-mailed, once. Its passcode was shown on the first answer "
                                "only."),
    "invitation-made-once": ("info", "This form was sent twice: the invitation was made, and "
                                     "e-mailed, once. Its passcode was shown on the first "
                                     "answer; if you did not see it, revoke the invitation "
                                     "and make a new one."),
    "revoked": ("success", "The share was revoked: the link no longer opens, also for anyone "
                           "who has it open now."),
    "teaching-created": ("success", "The teaching case was made from a de-identified, "
                                    "verified copy of the images."),
    "file-attached": ("success", "The file was attached to the case."),
    "hold-placed": ("success", "The legal hold is in force: nothing it covers is deleted."),
    "hold-lifted": ("success", "The legal hold was lifted."),
    "deletion-requested": ("success", "The deletion was requested: another administrator "
                                      "must approve it."),
    "deletion-approved": ("success", "The study was deleted."),
    "deletion-refused": ("info", "The deletion request was closed; nothing was deleted."),
    "deletion-allow-again": ("success", "The deleted study's images may be stored again: "
                             "sent again, they are taken."),
    "rule-set": ("success", "The retention rule was saved."),
    "rule-removed": ("success", "The retention rule was removed."),
    "consent-recorded": ("success", "The consent decision was recorded."),
    # For routes that still redirect without saying what happened (each needs its code added
    # to the redirect: ?notice=...).
    "site-added": ("success", "The site was saved."),
    "site-removed": ("success", "The site was removed."),
    "site-registered": ("success", "The refused caller was registered as a site."),
    "inbox-accepted": ("success", "The study was accepted into the patient's record."),
    "inbox-rejected": ("info", "The study was rejected."),
    "request-sent": ("success", "The request for images was sent."),
    "request-fulfilled": ("success", "The request was fulfilled."),
    "request-declined": ("info", "The request was declined."),
    "case-added": ("success", "The images were added to the case."),
    "case-saved": ("success", "The case was saved."),
    "case-deleted": ("success", "The case was deleted."),
    "teaching-saved": ("success", "The teaching case was saved."),
    "teaching-deleted": ("success", "The teaching case was deleted."),
}


def person(value: str | None) -> str:
    """A DICOM person name as people write it: ``FAMILY^Given`` -> ``FAMILY, Given``."""
    if not value:
        return ""
    parts = [p.strip() for p in str(value).split("=")[0].split("^")]
    family, given = (parts + ["", ""])[:2]
    rest = " ".join(p for p in parts[2:] if p)
    text = f"{family}, {given}" if given else family
    return f"{text} {rest}".strip()


def dicom_date(value: str | None) -> str:
    """``YYYYMMDD`` as ``DD Mon YYYY`` (unchanged when it is not a full date)."""
    try:
        return datetime.strptime(str(value or "")[:8], "%Y%m%d").strftime("%d %b %Y")
    except ValueError:
        return str(value or "")


def iso_date(value: str | None) -> str:
    """``YYYYMMDD`` as ``YYYY-MM-DD`` for date inputs."""
    text = str(value or "").replace("-", "")
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 and text.isdigit() else ""


def dicom_time(value: str | None) -> str:
    """``HHMMSS`` as ``HH:MM``."""
    text = str(value or "")
    return f"{text[:2]}:{text[2:4]}" if len(text) >= 4 and text[:4].isdigit() else ""


def nhs(value: str | None) -> str:
    """An NHS number in its 3-3-4 groups."""
    text = str(value or "")
    return f"{text[:3]} {text[3:6]} {text[6:]}" if len(text) == 10 and text.isdigit() else text


SEXES = {"F": "female", "M": "male", "O": "other"}


def sex(value: str | None) -> str:
    """DICOM Patient's Sex (``F``, ``M``, ``O``) in words; a dash when not known."""
    text = str(value or "").strip().upper()
    return SEXES.get(text, text or "—")


def count(value: object, noun: str, plural: str = "") -> str:
    """``3 | count("instance")`` as "3 instances", 1 as "1 instance" (``plural`` when the
    noun does not just take an s)."""
    number = len(value) if isinstance(value, (list, tuple, set, dict)) else value
    return f"{number} {noun if number == 1 else (plural or noun + 's')}"


def series_size(frames: list[dict[str, object]]) -> str:
    """What a viewer's series holds, in words a clinician counts by: single-frame instances
    are images ("12 images" for a CT series), a multi-frame instance is a loop of frames
    ("a 40-frame loop", "3 loops, 120 frames"), a video is a video (it plays in the
    browser's own player): "1 video, 2 images"."""
    videos = sum(1 for f in frames if f.get("video"))
    images = sum(1 for f in frames if not f.get("video") and not f.get("multi"))
    loops: dict[object, int] = {}
    for f in frames:
        if f.get("multi") and not f.get("video"):
            loops[f.get("sop")] = loops.get(f.get("sop"), 0) + 1
    parts = []
    if videos:
        parts.append(count(videos, "video"))
    if len(loops) == 1:
        parts.append(f"a {sum(loops.values())}-frame loop")
    elif loops:
        parts.append(f"{count(len(loops), 'loop')}, {count(sum(loops.values()), 'frame')}")
    if images or not parts:
        parts.append(count(images, "image"))
    return ", ".join(parts)


def sentence(value: object) -> str:
    """A message as a sentence for a page: its first letter capitalised and a full stop at
    its end when it has none. The services' messages ("the current password is wrong") are
    written to be embedded in others; shown on their own they read as sentences."""
    text = str(value or "").strip()
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?…" else text + "."


def when(value: datetime | None) -> str:
    """A moment in UTC, to the minute."""
    if value is None:
        return ""
    moment = value if value.tzinfo else value.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%d %b %Y %H:%M UTC")


environment = Environment(
    loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]),
    trim_blocks=True, lstrip_blocks=True,
)
environment.filters.update(person=person, dicom_date=dicom_date, iso_date=iso_date,
                           dicom_time=dicom_time, nhs=nhs, when=when, sex=sex,
                           count=count, series_size=series_size,
                           sentence=sentence)
# A fresh key in each rendering of a form that creates something (storage.submissions).
environment.globals["form_key"] = new_form_key


def page(request: Request, template: str, status_code: int = 200, **context: Any
         ) -> HTMLResponse:
    """Render ``template`` with the caller, their CSRF token and permissions in the context."""
    actor: Actor = getattr(request.state, "actor", None) or ANONYMOUS
    session = getattr(request.state, "session", None)
    policy = archive_of(request).policy
    notice = NOTICES.get(request.query_params.get("notice", ""))
    messages = [{"kind": notice[0], "text": notice[1]}] if notice else []
    archive = archive_of(request)
    unread = archive.notifier.unread(actor.name) if actor.kind == "user" else 0
    waiting, urgent = 0, []
    if actor.kind == "user" and policy.allows(actor, EXCHANGE):
        # The receiving team sees urgent arrivals on every page, and the inbox count.
        waiting, items = archive.inbox.counts()
        urgent = [{"item": i, "sender": archive.arrivals.sender(i)} for i in items]
    html = environment.get_template(template).render(
        unread=unread, inbox_waiting=waiting, inbox_urgent=urgent,
        request=request, actor=actor, csrf_token=session.csrf_token if session else "",
        can=lambda action, resource=None: policy.allows(actor, action, resource),
        messages=messages, **context,
    )
    return HTMLResponse(html, status_code=status_code, headers=_SECURITY_HEADERS)


def redirect(url: str) -> RedirectResponse:
    """See other: after a form was handled."""
    return RedirectResponse(url, status_code=303, headers=_SECURITY_HEADERS)


_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
        "script-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'self'; "
        "form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
