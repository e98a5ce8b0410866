"""Administration pages: user accounts and the audit trail."""

from __future__ import annotations

import secrets
from typing import Annotated, TypedDict

from fastapi import APIRouter, Form, Request
from fastapi.responses import Response

from imageshare.access.policy import AUDIT_READ, PERSON_ROLES, USER_MANAGE
from imageshare.access.users import one_line
from imageshare.audit.events import CATALOGUE
from imageshare.audit.trail import AuditEvent, Outcome
from imageshare.domain.actors import Actor
from imageshare.domain.errors import Forbidden, ImageShareError
from imageshare.web.auth import allowed
from imageshare.web.deps import ArchiveDep, archive_of
from imageshare.web.pages.templating import page, redirect

router = APIRouter(include_in_schema=False)


def _users_page(request: Request, status_code: int = 200, **extra: object) -> Response:
    archive = archive_of(request)
    return page(request, "users.html", status_code=status_code,
                accounts=archive.users.accounts(), roles=PERSON_ROLES, **extra)


def _record(request: Request, actor: Actor, action: str, username: str,
            outcome: Outcome = "success") -> None:
    archive_of(request).audit.record(AuditEvent(
        actor=actor, action=action, outcome=outcome, detail={"user": username}))


class Asked(TypedDict):
    """What a confirmation page says: its heading, what will happen, its button."""

    heading: str
    consequence: str
    button: str


def _ask_disable(username: str, _two_factor: bool) -> Asked:
    return Asked(heading=f"Disable {username}?",
                 consequence=f"{username} is signed out everywhere at once, and their "
                             "password and API tokens stop working until the account is "
                             "enabled again.",
                 button=f"Disable {username}")


def _ask_reset(username: str, two_factor: bool) -> Asked:
    also = (" Their two-factor sign-in is removed too: they set it up again at their next "
            "sign-in.") if two_factor else ""
    return Asked(heading=f"Reset the password of {username}?",
                 consequence=f"{username}'s password and API tokens stop working and they "
                             "are signed out everywhere; you get a temporary password to "
                             "give them in person, which they must replace with their own "
                             f"when they sign in.{also}",
                 button="Reset password" + (" and two-factor" if two_factor else ""))


# What the confirmation page of each change that locks a person out says.
_ASK = {"disable": _ask_disable, "reset": _ask_reset}


@router.get("/admin/users")
def users(request: Request, _actor: allowed(USER_MANAGE)) -> Response:
    """Every account with its role, state and second factor."""
    return _users_page(request)


@router.post("/admin/users")
def add_user(request: Request, archive: ArchiveDep,
             actor: allowed(USER_MANAGE), username: Annotated[str, Form()],
             role: Annotated[str, Form()], password: Annotated[str, Form()] = "") -> Response:
    """Add an account; without a password a temporary one is generated and shown once."""
    generated = "" if password else secrets.token_urlsafe(12)
    try:
        if role not in PERSON_ROLES:
            raise ImageShareError(f"choose one of the roles: {', '.join(PERSON_ROLES)}")
        # A generated password is the administrator's to hand over: temporary.
        archive.users.add(username.strip(), password or generated, role,
                          temporary=bool(generated))
    except ImageShareError as exc:
        _record(request, actor, "user.add", username[:128], "failure")
        return _users_page(request, 400, error=str(exc))
    _record(request, actor, "user.add", username)
    if generated:
        return _users_page(request, temporary_password=generated, temporary_for=username)
    return redirect("/admin/users?notice=user-added")


@router.post("/admin/users/{username}/{change}")
def change_user(request: Request, archive: ArchiveDep,
                username: str, change: str, actor: allowed(USER_MANAGE),
                reset_two_factor: Annotated[str, Form()] = "",
                email: Annotated[str, Form()] = "",
                confirm: Annotated[str, Form()] = "") -> Response:
    """Disable, enable, reset (new temporary password, lockout lifted) an account, or set its
    e-mail address (where its notifications go). Disabling and resetting end the person's
    sessions and lock them out: the first press shows what will happen, and only a second
    one with ``confirm=yes`` does it."""
    if change in ("disable", "enable") and username == actor.name:
        raise Forbidden("you cannot disable your own account")
    if change in ("disable", "reset") and confirm != "yes":
        archive.users.account(username)  # NotFound for no such account
        return page(request, "user_confirm.html", username=username, change=change,
                    reset_two_factor=bool(reset_two_factor), **_ASK[change](
                        username, bool(reset_two_factor)))
    if change == "disable":
        archive.users.set_disabled(username, True)
        archive.sessions.end_all(username)
    elif change == "enable":
        archive.users.set_disabled(username, False)
    elif change == "email":
        try:
            archive.users.set_email(username, email[:254])
        except ImageShareError as exc:
            _record(request, actor, "user.email", username[:128], "failure")
            return _users_page(request, 400, error=str(exc))
    elif change == "reset":
        temporary = secrets.token_urlsafe(12)
        archive.users.set_password(username, temporary, reset_two_factor=bool(reset_two_factor),
                                   revoke_tokens=True, actor=actor, temporary=True)
        archive.sessions.end_all(username)
        _record(request, actor, "user.reset", username)
        return _users_page(request, temporary_password=temporary, temporary_for=username)
    else:
        raise ImageShareError("unknown change")
    _record(request, actor, f"user.{change}", username)
    notice = {"disable": "user-disabled", "enable": "user-enabled", "email": "user-email"}
    return redirect(f"/admin/users?notice={notice.get(change, 'user-changed')}")


@router.get("/admin/audit")
def audit(request: Request, archive: ArchiveDep,
          actor: allowed(AUDIT_READ), action: str = "", study: str = "", text: str = ""
          ) -> Response:
    """The latest audit events, optionally for one action, one study, and those naming a
    text (kept for links; the page's own form sends it in the body: see :func:`audit_filter`);
    the read is audited with what it asked for."""
    return _audit_page(request, archive, actor, action, study, text)


@router.post("/admin/audit")
def audit_filter(request: Request, archive: ArchiveDep, actor: allowed(AUDIT_READ),
                 action: Annotated[str, Form()] = "", study: Annotated[str, Form()] = "",
                 text: Annotated[str, Form()] = "") -> Response:
    """The audit page filtered by what the officer typed (a user name, part of a patient
    ID, an address, a UID), sent in the body: a patient ID typed there is never in the
    address, the browser's history or a proxy's log."""
    return _audit_page(request, archive, actor, action, study, text)


def _audit_page(request: Request, archive: ArchiveDep, actor: Actor, action: str, study: str,
                text: str) -> Response:
    """The audit page for one filter (see :func:`audit`), its read audited."""
    action, study = action.strip()[:64], study.strip()[:64]
    text = one_line(text, MAX_FILTER_TEXT)
    events = list(archive.audit.events(action or None, study or None, AUDIT_PAGE_ROWS,
                                       text=text))
    archive.audit.record(AuditEvent(
        actor=actor, action="audit.read", outcome="success", study_uid=study,
        instance_count=len(events),
        detail={k: v for k, v in (("action", action), ("text", text)) if v}))
    return page(request, "audit.html", events=events, action=action, study_uid=study,
                text=text, actions={a: CATALOGUE[a].description for a in sorted(CATALOGUE)},
                limit=AUDIT_PAGE_ROWS)


AUDIT_PAGE_ROWS = 500
MAX_FILTER_TEXT = 64
