"""The signed-in user's own account: two-factor sign-in, e-mail address (and the link that
confirms it), password, API tokens."""

from __future__ import annotations

from typing import Annotated, TypedDict

import segno
from fastapi import APIRouter, Form, Request
from fastapi.responses import Response

from imageshare.access.policy import ACCOUNT_SELF, CHANGING_PASSWORD, ENROLLING, TOKEN_SELF
from imageshare.access.users import two_factor_key
from imageshare.audit.trail import AuditEvent
from imageshare.domain.errors import ImageShareError
from imageshare.web.auth import allowed, client_address, session_secret
from imageshare.web.deps import ArchiveDep, archive_of
from imageshare.web.pages.sign_in import set_session_cookie
from imageshare.web.pages.templating import page, redirect
from imageshare.web.params import RowId

router = APIRouter(include_in_schema=False)


def _account_page(request: Request, status_code: int = 200, **extra: object) -> Response:
    archive = archive_of(request)
    actor = request.state.actor
    user = archive.users.account(actor.name)
    if actor.role == CHANGING_PASSWORD and "error" not in extra:
        extra["error"] = ("Your password is a temporary one an administrator gave you: choose "
                          "your own below before you go on.")
    return page(
        request, "account.html", status_code=status_code, role=user.role, email=user.email,
        email_verified=user.email_verified,
        link_sent_at=(archive.users.confirmation_pending(actor.name)
                      if user.email and not user.email_verified else None),
        two_factor=user.two_factor, enrolling=actor.role == ENROLLING,
        tokens=(archive.users.tokens(actor.name)
                if actor.role not in (ENROLLING, CHANGING_PASSWORD) else []),
        **extra,
    )


def _first(role: str) -> str:
    """What an account at a stage of signing in must do before anything else."""
    return ("choose your own password first" if role == CHANGING_PASSWORD
            else "set up two-factor sign-in first")


@router.get("/account")
def account(request: Request, _actor: allowed(ACCOUNT_SELF)) -> Response:
    """The account page."""
    return _account_page(request)


@router.post("/account/two-factor")
def begin_two_factor(request: Request, archive: ArchiveDep,
                     actor: allowed(ACCOUNT_SELF),
                     current: Annotated[str, Form()] = "") -> Response:
    """Make a TOTP secret and show it as a QR code until it is confirmed. A signed-in person
    gives the current password first (a session alone must not bind the account to another
    phone); an administrator enrolling has just given it to sign in."""
    try:
        if actor.role != ENROLLING:
            archive.users.check_current_password(actor.name, current[:1024],
                                                 client_address(request))
        uri = archive.users.begin_two_factor(actor.name)
    except ImageShareError as exc:
        return _account_page(request, 400, error=str(exc))
    return _account_page(request, **_enrolment(uri))


class Enrolment(TypedDict, total=False):
    """What the account page shows of a pending two-factor set-up."""

    enrol_uri: str
    enrol_secret: str
    enrol_qr: str
    enrol_key: str


def _enrolment(uri: str) -> Enrolment:
    """What the set-up form shows of a pending TOTP key: its URI, the key to type, its QR
    code, and the digest that names it in the form (:func:`two_factor_key`)."""
    secret = uri.split("secret=", 1)[1].split("&", 1)[0]
    qr = segno.make(uri, error="m").svg_inline(scale=4, omitsize=True)
    return Enrolment(enrol_uri=uri, enrol_secret=secret, enrol_qr=qr,
                     enrol_key=two_factor_key(uri))


@router.post("/account/two-factor/confirm")
def confirm_two_factor(request: Request, archive: ArchiveDep, actor: allowed(ACCOUNT_SELF),
                       code: Annotated[str, Form()],
                       key: Annotated[str, Form()] = "") -> Response:
    """Turn two-factor sign-in on once a code proves the app has the secret. ``key`` names
    the set-up the page showed: a wrong code shows that same key again (the app holds it
    already), and a set-up started again elsewhere meanwhile is neither turned on nor
    shown."""
    try:
        archive.users.confirm_two_factor(actor.name, code[:16], key[:64] or None)
    except ImageShareError as exc:
        archive.audit.record(AuditEvent(actor=actor, action="account.two-factor",
                                        outcome="failure"))
        pending = archive.users.pending_two_factor(actor.name, key[:64])
        shown = _enrolment(pending) if pending else Enrolment()
        return _account_page(request, 400, error=str(exc), **shown)
    archive.audit.record(AuditEvent(actor=actor, action="account.two-factor",
                                    outcome="success"))
    response = redirect("/account?notice=two-factor-on")
    if actor.role == ENROLLING:
        secret, _csrf = archive.sessions.advance(session_secret(request), "full")
        set_session_cookie(request, response, secret)
        response.headers["location"] = "/?notice=two-factor-on"
    return response


@router.post("/account/email")
def change_email(request: Request, archive: ArchiveDep, actor: allowed(ACCOUNT_SELF),
                 email: Annotated[str, Form()] = "",
                 current: Annotated[str, Form()] = "") -> Response:
    """Set the address the user's notifications (comments, feedback, sign-offs) go to; the
    current password must be given (a session alone does not change it). A new address is
    unconfirmed until the link mailed to it is followed: only then are shares sent to it
    listed under "Shared with me". It decides nothing else: not which patient's images an
    account sees."""
    if actor.role in (ENROLLING, CHANGING_PASSWORD):
        return _account_page(request, 403, error=_first(actor.role))
    try:
        archive.users.change_own_email(actor.name, current[:1024], email[:254],
                                       client_address(request),
                                       mailer=archive.notifier.mailer,
                                       link_base=archive.settings.public_url, actor=actor)
    except ImageShareError as exc:
        archive.audit.record(AuditEvent(actor=actor, action="user.email", outcome="failure",
                                        detail={"user": actor.name}))
        return _account_page(request, 400, error=str(exc))
    archive.audit.record(AuditEvent(actor=actor, action="user.email", outcome="success",
                                    detail={"user": actor.name}))
    return redirect("/account?notice=email-saved#email")


@router.post("/account/email/confirmation")
def send_confirmation(request: Request, archive: ArchiveDep,
                      actor: allowed(ACCOUNT_SELF)) -> Response:
    """Mail the link that confirms the user's address again (at most one a minute, five a
    day); the earlier link stops working."""
    if actor.role in (ENROLLING, CHANGING_PASSWORD):
        return _account_page(request, 403, error=_first(actor.role))
    try:
        sent_to = archive.users.send_confirmation(actor.name, mailer=archive.notifier.mailer,
                                                  link_base=archive.settings.public_url,
                                                  actor=actor)
    except ImageShareError as exc:
        return _account_page(request, exc.http_status, error=str(exc))
    return _account_page(request, email_message=f"A new confirmation link was mailed to "
                                                f"{sent_to}; it works for 24 hours.")


@router.get("/account/email/confirm/{secret}")
def confirmation_form(request: Request, archive: ArchiveDep, secret: str,
                      actor: allowed(ACCOUNT_SELF)) -> Response:
    """The page a mailed confirmation link opens: which address it confirms, and a button
    (following the link alone changes nothing, so a mail scanner cannot use it up)."""
    try:
        address = archive.users.confirmation_for(secret[:128], actor.name)
    except ImageShareError as exc:
        return page(request, "email_confirm.html", status_code=exc.http_status,
                    refused=str(exc))
    return page(request, "email_confirm.html", secret=secret, address=address)


@router.post("/account/email/confirm/{secret}")
def confirm_email(request: Request, archive: ArchiveDep, secret: str,
                  actor: allowed(ACCOUNT_SELF)) -> Response:
    """Confirm the address: shares sent to it are listed under "Shared with me" from now."""
    if actor.role in (ENROLLING, CHANGING_PASSWORD):
        return _account_page(request, 403, error=_first(actor.role))
    try:
        address = archive.users.confirm_email(secret[:128], actor)
    except ImageShareError as exc:
        return page(request, "email_confirm.html", status_code=exc.http_status,
                    refused=str(exc))
    return page(request, "email_confirm.html", confirmed=address)


@router.post("/account/password")
def change_password(request: Request, archive: ArchiveDep, actor: allowed(ACCOUNT_SELF),
                    current: Annotated[str, Form()], new: Annotated[str, Form()]) -> Response:
    """Change the user's own password."""
    if actor.role == ENROLLING:
        return _account_page(request, 403, error="set up two-factor sign-in first")
    try:
        archive.users.change_own_password(actor.name, current[:1024], new[:1024],
                                          client_address(request))
    except ImageShareError as exc:
        archive.audit.record(AuditEvent(actor=actor, action="account.password",
                                        outcome="failure"))
        return _account_page(request, 400, error=str(exc))
    # Every other session of the account ends (someone who knew the old password may hold
    # one); API tokens are listed on the account page for the user to revoke.
    ended = archive.sessions.end_all(actor.name, keep=session_secret(request))
    archive.audit.record(AuditEvent(actor=actor, action="account.password", outcome="success",
                                    detail={"sessions_ended": ended}))
    return redirect("/account?notice=password-changed#tokens")


@router.post("/account/tokens")
def create_token(request: Request, archive: ArchiveDep, actor: allowed(TOKEN_SELF),
                 name: Annotated[str, Form()],
                 current: Annotated[str, Form()] = "") -> Response:
    """A new personal API token, shown once. A token outlives the session and a password
    change, so the current password must be given (a session alone does not make one); an
    account holds at most :data:`~imageshare.access.users.MAX_LIVE_TOKENS` live tokens."""
    try:
        archive.users.check_current_password(actor.name, current[:1024],
                                             client_address(request))
        token = archive.users.create_token(actor.name, " ".join(name.split())[:128] or "token",
                                           actor=actor)
    except ImageShareError as exc:
        return _account_page(request, 400, error=str(exc))
    return _account_page(request, new_token=token)


@router.post("/account/tokens/{token_pk}/revoke")
def revoke_token(archive: ArchiveDep, token_pk: RowId, actor: allowed(TOKEN_SELF)) -> Response:
    """Revoke one of the user's tokens."""
    archive.users.revoke_token(actor.name, token_pk, actor)
    return redirect("/account?notice=token-revoked#tokens")
