"""Signing in and out of the web app: password, then a TOTP code or two-factor set-up."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import Response

from imageshare.access.policy import ACCOUNT_SELF, CHANGING_PASSWORD, PUBLIC, SESSION_CODE
from imageshare.access.sign_in import SignedIn
from imageshare.audit.trail import AuditEvent
from imageshare.domain.actors import Actor
from imageshare.domain.errors import Forbidden, NotAuthenticated
from imageshare.web.auth import (
    allowed,
    client_address,
    from_another_site,
    resolve_actor,
    session_cookie_name,
    session_secret,
)
from imageshare.web.deps import ArchiveDep
from imageshare.web.pages.templating import page, redirect

router = APIRouter(include_in_schema=False)
WRONG = "Wrong username or password, or the account is locked or disabled."
MACHINE = ("This account is for a program (a service or another hospital's ImageShare), not "
           "a person, so it cannot sign in here. Programs use an API token or HTTP Basic "
           "with the JSON API, DICOMweb and FHIR; sign in with your own account.")


def safe_next(target: str | None) -> str:
    """Where to go after signing in: only a path on this site."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def set_session_cookie(request: Request, response: Response, secret: str) -> None:
    """The session cookie: HttpOnly, SameSite=Strict, for path / of this host only; over
    HTTPS also Secure and named with the ``__Host-`` prefix
    (:data:`imageshare.web.auth.SECURE_COOKIE`)."""
    response.set_cookie(session_cookie_name(request), secret, httponly=True,
                        samesite="strict", path="/", secure=request.url.scheme == "https")


def end_session_cookie(request: Request, response: Response) -> None:
    """Tell the browser to drop the session cookie (a ``__Host-`` one only goes when the
    deletion is Secure too)."""
    response.delete_cookie(session_cookie_name(request), path="/", httponly=True,
                           samesite="strict", secure=request.url.scheme == "https")


def _to_next_stage(request: Request, signed_in: SignedIn, next_url: str) -> Response:
    """Send the browser on to the page its session's stage needs, with the cookie."""
    target = {"code": f"/login/code?next={quote(next_url)}",
              "enrol": "/account#two-factor"}.get(signed_in.stage, next_url)
    if signed_in.stage == "full" and signed_in.actor.role == CHANGING_PASSWORD:
        target = "/account#password"  # a temporary password: the person's own comes first
    response = redirect(target)
    set_session_cookie(request, response, signed_in.secret)
    return response


@router.get("/login")
def login_form(request: Request, archive: ArchiveDep,
               _anyone: allowed(PUBLIC), next: str = "/") -> Response:
    """The sign-in page."""
    actor = resolve_actor(request)
    if actor.kind == "user" and archive.policy.allows(actor, ACCOUNT_SELF):
        return redirect(safe_next(next))
    return page(request, "login.html", next=safe_next(next), username="")


@router.post("/login")
def login(
    request: Request, archive: ArchiveDep,
    _anyone: allowed(PUBLIC), username: Annotated[str, Form()],
    password: Annotated[str, Form()], next: Annotated[str, Form()] = "/",
) -> Response:
    """Check the password; a wrong one, a locked or disabled account all get one answer. A
    machine's account (a service, another site) with its right password is told it gets no
    browser session.

    A sign-in posted by another site's page is refused (login CSRF: it would sign the
    browser into someone else's account, where what its user then uploads would land)."""
    source = client_address(request)
    if from_another_site(request, archive.settings.public_url):
        archive.audit.record(AuditEvent(
            actor=Actor("anonymous", username[:64], source=source, registered=False),
            action="session.start", outcome="refused"))  # posted by another site's page
        return page(request, "login.html", status_code=403, next="/", username="",
                    error="This sign-in was sent from another web site. Open ImageShare's "
                          "own sign-in page and sign in there.")
    try:
        signed_in = archive.sign_in.start(username, password, source)
    except NotAuthenticated:
        return page(request, "login.html", status_code=401, error=WRONG,
                    next=safe_next(next), username=username[:128])
    except Forbidden:  # a machine's account, with its right password (audited)
        return page(request, "login.html", status_code=403, error=MACHINE,
                    next=safe_next(next), username="")
    return _to_next_stage(request, signed_in, safe_next(next))


@router.get("/login/code")
def code_form(request: Request, _actor: allowed(SESSION_CODE), next: str = "/") -> Response:
    """The second step for accounts with two-factor sign-in."""
    return page(request, "code.html", next=safe_next(next))


@router.post("/login/code")
def code(
    request: Request, archive: ArchiveDep,
    actor: allowed(SESSION_CODE), code: Annotated[str, Form()],
    next: Annotated[str, Form()] = "/",
) -> Response:
    """Check the TOTP code; the session then gets full access (and a new secret)."""
    try:
        secret, _csrf = archive.sign_in.confirm_code(actor, session_secret(request), code,
                                              client_address(request))
    except NotAuthenticated:
        return page(request, "code.html", status_code=401, next=safe_next(next),
                    error="That code is not right. Codes change every 30 seconds.")
    response = redirect(safe_next(next))
    set_session_cookie(request, response, secret)
    return response


@router.post("/login/code/cancel")
def cancel_code(request: Request, archive: ArchiveDep,
                actor: allowed(SESSION_CODE)) -> Response:
    """Sign out at the code prompt (no phone at hand, the wrong account): the half-session
    ends on the server, as a sign-out does."""
    archive.sign_in.end(actor, session_secret(request))
    response = redirect("/login?notice=signed-out")
    end_session_cookie(request, response)
    return response


@router.post("/logout")
def logout(request: Request, archive: ArchiveDep, actor: allowed(ACCOUNT_SELF)) -> Response:
    """End the session."""
    archive.sign_in.end(actor, session_secret(request))
    response = redirect("/login?notice=signed-out")
    end_session_cookie(request, response)
    return response
