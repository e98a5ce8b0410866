"""Who is calling over HTTP, and the one dependency that asks the policy for every route."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn
from urllib.parse import urlsplit

from fastapi import Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute

from imageshare.access.policy import PUBLIC
from imageshare.access.sessions import COOKIE
from imageshare.audit.trail import AuditEvent
from imageshare.domain.actors import ANONYMOUS, Actor
from imageshare.domain.errors import (
    Forbidden,
    ImageShareError,
    NotAuthenticated,
    NotFound,
    TooManyRequests,
)
from imageshare.web.deps import archive_of

SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


# Over HTTPS the session cookie is named with the __Host- prefix (RFC 6265bis 4.1.3.2): a
# browser keeps such a cookie only when it is Secure, for path / and for this host alone, so
# a page of a sibling host (another application under the hospital's domain) or a plain-HTTP
# answer cannot plant one; a plainly named session cookie is then not read at all (a planted
# one would fix the browser in the planter's session: what it uploads would go there).
SECURE_COOKIE = "__Host-" + COOKIE


def session_cookie_name(request: Request) -> str:
    """The session cookie's name for this request: ``__Host-`` prefixed over HTTPS."""
    return SECURE_COOKIE if request.url.scheme == "https" else COOKIE


def session_secret(request: Request) -> str:
    """The session cookie this request carries under the name for its scheme ("" if none)."""
    return request.cookies.get(session_cookie_name(request), "")


def _host(url: str) -> str | None:
    """The host name of an absolute http(s) URL (lower case); None when ``url`` is not one.
    Scheme and port are not compared: behind a TLS-terminating proxy the server sees http
    and another port than the browser does."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    return parts.hostname.lower()


def from_another_site(request: Request, public_url: str = "") -> bool:
    """True when the browser says the request was sent by a page of another site (Fetch
    Metadata ``Sec-Fetch-Site``, or an ``Origin`` whose host is neither the one asked for
    nor that of ``public_url``). A request saying neither (older browsers, programs) is not
    refused."""
    fetched_from = request.headers.get("sec-fetch-site", "").strip().lower()
    if fetched_from and fetched_from not in ("same-origin", "none"):
        return True
    origin = request.headers.get("origin")
    if origin is None:
        return False
    sent = _host(origin)
    ours = {request.url.hostname.lower() if request.url.hostname else None}
    if public_url:
        ours.add(_host(public_url))
    return sent is None or sent not in ours


def client_address(request: Request) -> str:
    """The caller's IP address, for the audit trail."""
    return request.client.host if request.client else ""


BASIC, BEARER, SESSION = "basic", "bearer", "session"


def resolve_actor(request: Request) -> Actor:
    """The Actor presenting HTTP Basic credentials, a bearer API token or a session cookie
    (or an opened share link), else anonymous; ``request.state.channel`` says which.

    HTTP Basic failures count towards the per-address throttle like sign-ins (an address over
    its limit gets 429 before any password is checked) and are audited. An account that must
    have a second factor and has none acts as ENROLLING on every channel (the user directory
    and session store give it that role; :func:`imageshare.access.policy.effective_role`).
    """
    cached = getattr(request.state, "actor", None)
    if cached is not None:
        return cached
    archive = archive_of(request)
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    source = client_address(request)
    actor: Actor | None = None
    request.state.channel = None
    if scheme.lower() == "basic" and credentials:
        request.state.channel = BASIC
        try:
            username, _, password = base64.b64decode(credentials).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            username, password = "", ""
        archive.throttle.check(source)
        if username:
            actor = archive.users.authenticate(username[:128], password[:1024], source)
        if actor is None:
            archive.throttle.failed(source)
            archive.audit.record(AuditEvent(
                actor=Actor("anonymous", username[:64], source=source, registered=False),
                action="session.basic", outcome="failure",
                detail={"route": _route_template(request)}))
    elif scheme.lower() == "bearer" and credentials:
        request.state.channel = BEARER
        actor = archive.users.authenticate_token(credentials.strip()[:256], source)
        if actor is None:
            # Checked only once a token was refused: a valid token costs no extra query.
            archive.throttle.check(source)
            archive.throttle.failed(source)
            archive.audit.record(AuditEvent(
                actor=Actor("anonymous", "", source=source, registered=False),
                action="session.token", outcome="failure",
                detail={"route": _route_template(request)}))
    elif not header and (secret := session_secret(request)):
        session = archive.sessions.find(secret, source)
        if session is not None:
            request.state.channel = SESSION
            request.state.session = session
            actor = session.actor
    token = request.path_params.get("token")
    if token and request.url.path.startswith("/s/"):
        actor = _share_actor(request, archive, token, actor, source) or actor
    elif token and request.url.path.startswith("/u/"):
        actor = _upload_actor(request, archive, token, source) or actor
    result = actor or ANONYMOUS
    request.state.actor = result
    return result


LINK_COOKIE = "imageshare_link"


@dataclass(frozen=True)
class LinkSession:
    """An opened share link in a browser: its CSRF token."""

    csrf_token: str


def _share_actor(request: Request, archive: Any, token: str, user: Actor | None,
                 source: str) -> Actor | None:
    """The share's actor when this browser opened the link with its passcode (and, for an
    identifiable share, is signed in as the named recipient); else None."""
    from imageshare.domain.errors import ImageShareError

    try:
        share = archive.shares.by_token(token)
    except ImageShareError:
        return None
    csrf = archive.shares.session(share, request.cookies.get(LINK_COOKIE, ""))
    if csrf is None:
        return None
    if not share.opens_for(user):
        return None
    request.state.share = share
    request.state.session = LinkSession(csrf)
    return share.actor(source)


UPLOAD_COOKIE = "imageshare_upload"


def _upload_actor(request: Request, archive: Any, token: str, source: str) -> Actor | None:
    """The uploader's actor when this browser opened the invitation to upload with its
    passcode (its live session); else None."""
    from imageshare.domain.errors import ImageShareError

    try:
        invitation = archive.uploads.invitations.by_token(token)
    except ImageShareError:
        return None
    csrf = archive.uploads.invitations.session(invitation,
                                               request.cookies.get(UPLOAD_COOKIE, ""))
    if csrf is None:
        return None
    request.state.invitation = invitation
    request.state.session = LinkSession(csrf)
    actor: Actor = invitation.actor(source)
    return actor


FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


async def _sent_csrf_token(request: Request) -> str:
    """The CSRF token sent with a request: the X-CSRF-Token header, or a form's field."""
    sent = request.headers.get("x-csrf-token", "")
    if not sent and request.headers.get("content-type", "").startswith(FORM_TYPES):
        form = await request.form()  # Starlette keeps it for the route
        value = form.get("csrf_token")
        sent = value if isinstance(value, str) else ""
    return sent


class Permission:
    """Route dependency: the caller must be allowed ``action``; returns the caller's Actor.

    Every route declares one (``Permission(PUBLIC)`` for the few open ones); a test walks the
    routes and checks that none lacks it. ``study_param`` names the path parameter holding the
    Study Instance UID when access depends on the study (shares grant single studies); such a
    study must be part of the record unless ``in_record`` is false. Refusals are audited.
    """

    def __init__(self, action: str, study_param: str | None = None,
                 in_record: bool = True) -> None:
        self.action = action
        self.study_param = study_param
        self.in_record = in_record

    async def __call__(self, request: Request) -> Actor:
        """Authorise the request, raising NotAuthenticated, Forbidden, NotFound (a study not
        part of the record) or TooManyRequests.

        A browser session (cookie) must also send its CSRF token with every request that
        changes something; HTTP Basic and bearer tokens never reach a page (HTML form) route
        that changes something: those are for browsers with a session and its CSRF token.
        """
        study_uid = request.path_params.get(self.study_param, "") if self.study_param else ""
        try:
            # Password checks (argon2) and session look-ups block: keep them off the loop.
            actor = await run_in_threadpool(resolve_actor, request)
        except TooManyRequests as exc:
            await run_in_threadpool(_record_denial, request, ANONYMOUS, self.action, study_uid,
                                    exc)
            raise
        archive = archive_of(request)
        try:
            if (getattr(request.state, "channel", None) in (BASIC, BEARER)
                    and request.method not in SAFE_METHODS and self.action != PUBLIC
                    and _is_page_route(request)):
                raise Forbidden("pages that change something are for signed-in browsers; "
                                "programs use the JSON API under /api")
            if (getattr(request.state, "channel", None) == BASIC
                    and request.method not in SAFE_METHODS and self.action != PUBLIC
                    and from_another_site(request, archive.settings.public_url)):
                # A browser that once answered a Basic prompt sends the credentials with a
                # form another site's page posts: that page would act as its user.
                raise Forbidden("a request sent by another site's page is not acted on with "
                                "this browser's stored credentials")
            session = getattr(request.state, "session", None)
            if (session is not None and request.method not in SAFE_METHODS
                    and self.action != PUBLIC):
                sent = await _sent_csrf_token(request)
                if not hmac.compare_digest(sent.encode(), session.csrf_token.encode()):
                    raise Forbidden("the request lacks this session's CSRF token")
            archive.policy.authorise(actor, self.action, study_uid or None)
            if study_uid and self.in_record and not await run_in_threadpool(
                    archive.catalogue.in_record, study_uid):
                # Unknown, or still waiting for a person's decision (inbox, uploads): the
                # same answer, so that nobody learns what waits there.
                raise NotFound("no such study")
        except (Forbidden, NotAuthenticated, NotFound) as exc:
            await run_in_threadpool(_record_denial, request, actor, self.action, study_uid, exc)
            raise
        return actor

    def __repr__(self) -> str:
        return f"Permission({self.action!r})"


def _is_page_route(request: Request) -> bool:
    """True for web-app pages (HTML forms), which the OpenAPI document leaves out."""
    route = request.scope.get("route")
    return route is not None and not getattr(route, "include_in_schema", True)


def _record_denial(request: Request, actor: Actor, action: str, study_uid: str,
                   exc: Exception) -> None:
    archive_of(request).audit.record(AuditEvent(
        actor=actor, action="access.denied", outcome="refused", study_uid=study_uid,
        detail={"wanted": action, "method": request.method,
                "route": _route_template(request), "reason": str(exc)}))


def authorise_also(request: Request, actor: Actor, action: str, study_uid: str = "") -> None:
    """A second, narrower check inside a route (e.g. identifiable export), through the same
    policy and audited the same way when refused."""
    try:
        archive_of(request).policy.authorise(actor, action, study_uid or None)
    except (Forbidden, NotAuthenticated) as exc:
        _record_denial(request, actor, action, study_uid, exc)
        raise


def refuse(request: Request, actor: Actor, action: str, error: ImageShareError,
           study_uid: str = "") -> NoReturn:
    """Refuse a request a route never carries out, whoever asks (e.g. WADO-URI
    ``anonymize=yes``): audited as every refusal (``access.denied``, ``wanted`` the action
    asked for in effect), then ``error`` is raised."""
    _record_denial(request, actor, action, study_uid, error)
    raise error


def _route_template(request: Request) -> str:
    """The route's path template (no values: they could identify a patient)."""
    route = request.scope.get("route")
    return getattr(route, "path", "") or ""


def allowed(action: str, study_param: str | None = None, in_record: bool = True) -> Any:
    """``Annotated[Actor, Depends(Permission(action))]`` for a route parameter. With a
    ``study_param``, a study that is not part of the record (unknown, or waiting in the inbox
    or for review) is not found, unless ``in_record`` is false: for routes whose own answers
    keep to the record (DICOMweb's searches answer an empty list, as for any study without
    matches)."""
    return Annotated[Actor, Depends(Permission(action, study_param, in_record))]


# What every answer of a route carrying patient data (JSON API, DICOMweb, FHIR) says about
# caches and type sniffing, unless the route says otherwise itself.
PRIVATE_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


class PrivateRoute(APIRoute):
    """A route whose answers no browser or shared cache keeps (``Cache-Control: no-store``)
    and no browser sniffs into another type (``nosniff``): answers name patients, studies,
    reviewers and their addresses, and a revoked right must not live on in a cache. A route
    that sets its own Cache-Control keeps it. Routers of such routes say
    ``APIRouter(route_class=PrivateRoute)``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """The route's handler, adding :data:`PRIVATE_HEADERS` to its answer."""
        handler = super().get_route_handler()

        async def private(request: Request) -> Response:
            response = await handler(request)
            for name, value in PRIVATE_HEADERS.items():
                response.headers.setdefault(name, value)
            return response

        return private
