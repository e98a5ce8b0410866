"""The JSON API under /api: nodes, audit trail, the caller's account and API tokens."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import Field, field_validator

from imageshare.access import users
from imageshare.access.policy import (
    ACCOUNT_SELF,
    AUDIT_READ,
    NODE_MANAGE,
    PUBLIC,
    SESSION_CODE,
    TOKEN_SELF,
)
from imageshare.audit.trail import AuditEvent
from imageshare.domain.errors import Forbidden, ImageShareError
from imageshare.exchange.nodes import Node, check_dicomweb_url
from imageshare.web.auth import (
    BASIC,
    BEARER,
    allowed,
    client_address,
    refuse,
    session_secret,
)
from imageshare.web.deps import ArchiveDep
from imageshare.web.pages.sign_in import end_session_cookie, set_session_cookie
from imageshare.web.params import JsonApiRoute, Strict

router = APIRouter(prefix="/api", tags=["API"], route_class=JsonApiRoute)

# A person's live (unrevoked) API tokens: a stolen session cannot mint tokens without end.
# Counted where tokens are made, in the same transaction (imageshare.access.users).
MAX_LIVE_TOKENS = users.MAX_LIVE_TOKENS
# Text fields that are shown and logged on one line: no control characters.
ONE_LINE = r"^[^\x00-\x1f\x7f]*$"


class NodeIn(Strict):
    """A remote DICOM node to register (within the sizes the index keeps)."""

    ae_title: str = Field(min_length=1, max_length=16)
    host: str = Field(min_length=1, max_length=255, pattern=ONE_LINE)
    port: int = Field(gt=0, lt=65536)
    dicomweb_url: str = Field(default="", max_length=1024,
                              description="the site's DICOMweb base URL (http or https)")
    display_name: str = Field(default="", max_length=128, pattern=ONE_LINE)
    may_query: bool = True
    may_retrieve: bool = True
    may_store: bool = True
    searchable: bool = True
    retrieve_from: bool = True
    send_to: bool = True
    dicomweb_auth: str = Field(default="", max_length=512)
    inbox: bool = False
    tls: bool = Field(default=False, description="reach the node's DICOM AE over TLS")
    tls_certificate: str = Field(default="", max_length=128, description=(
        "with tls: SHA-256 fingerprint of the only certificate this AE title is accepted with "
        "over DICOM TLS (empty: any the trusted authorities signed)"))

    @field_validator("dicomweb_url")
    @classmethod
    def _web_address(cls, value: str) -> str:
        """An absolute http(s) URL with a host that no site may not have, or nothing (the
        registry's one check: never ``file:``, a metadata address or a password in it)."""
        try:
            check_dicomweb_url(value)
        except ImageShareError as exc:
            raise ValueError(str(exc)) from None
        return value


class RefusedIn(Strict):
    """A refused DICOM caller to register as a node (store only unless ``may_query``)."""

    ae_title: str = Field(min_length=1, max_length=16)
    host: str = Field(min_length=1, max_length=255)
    port: int = Field(default=104, gt=0, lt=65536)
    may_query: bool = False


class TokenIn(Strict):
    """A name for a new personal API token (one line)."""

    name: str = Field(min_length=1, max_length=128, pattern=ONE_LINE)
    password: str = Field(default="", max_length=1024, description=(
        "the account's current password: required from a browser session (a token outlives "
        "the session), not with HTTP Basic, which carries it"))


class LoginIn(Strict):
    """Credentials for a browser session."""

    username: str = Field(min_length=1, max_length=128)
    password: str = Field(min_length=1, max_length=1024)
    code: str = Field(default="", max_length=16, description="TOTP code, if two-factor is on")


@router.post("/session", summary="Sign in (browser session)")
def sign_in(
    request: Request, archive: ArchiveDep,
    body: LoginIn, response: Response, _anyone: allowed(PUBLIC)
) -> dict[str, str]:
    """Check the password (and TOTP code, for accounts with two-factor sign-in) and start a
    session: an HttpOnly, SameSite=Strict cookie, and the CSRF token that every
    state-changing request of the session must send as X-CSRF-Token. Five failures lock the
    account for 15 minutes; every failure answers the same. ``stage`` is ``enrol`` for an
    administrator who must set up two-factor sign-in before anything else, and ``code``
    for an account with two-factor sign-in that sent no code: the session can do nothing
    but send it to ``POST /api/session/code``."""
    signed_in = archive.sign_in.start(body.username, body.password, client_address(request),
                                      code=body.code or None)
    set_session_cookie(request, response, signed_in.secret)
    actor = signed_in.actor
    return {"username": actor.name, "role": actor.role, "csrf_token": signed_in.csrf,
            "stage": signed_in.stage}


class CodeIn(Strict):
    """The TOTP code of a session started without one."""

    code: str = Field(min_length=1, max_length=16)


@router.post("/session/code", summary="Send the second factor of a session")
def confirm_session_code(
    request: Request, archive: ArchiveDep, body: CodeIn, response: Response,
    actor: allowed(SESSION_CODE),
) -> dict[str, str]:
    """Check the TOTP code of a session that ``POST /api/session`` started at the ``code``
    stage: it then gets full access under a new cookie and a new CSRF token. A wrong code
    counts as a failed sign-in."""
    secret, csrf = archive.sign_in.confirm_code(actor, session_secret(request), body.code,
                                                client_address(request))
    set_session_cookie(request, response, secret)
    return {"username": actor.name, "role": actor.role, "csrf_token": csrf, "stage": "full"}


@router.delete("/session", status_code=204, summary="Sign out")
def sign_out(request: Request, archive: ArchiveDep,
             response: Response, actor: allowed(ACCOUNT_SELF)) -> None:
    """End this browser session."""
    archive.sign_in.end(actor, session_secret(request))
    end_session_cookie(request, response)


@router.get("/me", summary="The signed-in account")
def me(actor: allowed(ACCOUNT_SELF)) -> dict[str, str]:
    """Who the caller is and their role."""
    return {"username": actor.name, "role": actor.role}


@router.post("/tokens", status_code=201, summary="Create a personal API token")
def create_token(request: Request, archive: ArchiveDep, body: TokenIn,
                 actor: allowed(TOKEN_SELF)) -> dict[str, str]:
    """A new bearer token for DICOMweb clients; it is shown only in this answer. An account
    holds at most MAX_LIVE_TOKENS live tokens (revoke one on the account page first). Made
    by the person (HTTP Basic or a signed-in browser), never by another token: a stolen
    token could otherwise make itself a successor that outlives its revocation."""
    if getattr(request.state, "channel", None) == BEARER:
        refuse(request, actor, TOKEN_SELF, Forbidden(
            "an API token cannot make another: sign in (or use HTTP Basic) to make one"))
    if getattr(request.state, "channel", None) != BASIC:
        # A session alone (a stolen cookie) does not mint a token that would outlive it.
        archive.users.check_current_password(actor.name, body.password,
                                             client_address(request))
    # The limit is counted in the transaction that makes the token (ImageShareError, 400).
    token = archive.users.create_token(actor.name, body.name, actor=actor)
    return {"name": body.name, "token": token}


@router.get("/nodes", summary="List registered DICOM nodes")
def list_nodes(archive: ArchiveDep, actor: allowed(NODE_MANAGE)) -> list[dict[str, Any]]:
    """Every registered node (credentials are not shown)."""
    return [_shown(n) for n in archive.nodes.all()]


@router.post("/nodes", status_code=201, summary="Register a DICOM node")
def add_node(archive: ArchiveDep, body: NodeIn, actor: allowed(NODE_MANAGE)) -> dict[str, Any]:
    """Register a node; usable at once by the running server."""
    node = Node(**body.model_dump())
    archive.nodes.add(node, actor=actor)
    return _shown(node)


def _shown(node: Node) -> dict[str, Any]:
    """A node as the API shows it: no credentials (its site password masked, and any left in
    an older address)."""
    return {**node.__dict__, "dicomweb_url": node.shown_url,
            "dicomweb_auth": "***" if node.dicomweb_auth else ""}


@router.get("/nodes/refused", summary="DICOM callers that were refused")
def refused_callers(archive: ArchiveDep, actor: allowed(NODE_MANAGE)) -> list[dict[str, Any]]:
    """Calling AE titles and hosts the DICOM listener refused (unregistered, wrong host, or a
    service not granted), with how often, the last service and reason, first and last seen."""
    callers = archive.refused_callers.all()
    archive.audit.record(AuditEvent(actor=actor, action="node.refused.read", outcome="success",
                                    instance_count=len(callers)))
    return [{"ae_title": c.ae_title, "host": c.host, "count": c.count, "service": c.service,
             "reason": c.reason, "first_seen": c.first_seen.isoformat(),
             "last_seen": c.last_seen.isoformat(), "registered_host": c.registered_host}
            for c in callers]


@router.post("/nodes/refused/register", status_code=201,
             summary="Register a refused DICOM caller in one step")
def register_refused(archive: ArchiveDep, body: RefusedIn, actor: allowed(NODE_MANAGE)
                     ) -> dict[str, Any]:
    """Register the caller at the host it called from; it may store at once (audited)."""
    node = archive.refused_callers.register(
        body.ae_title, body.host, actor, body.port, body.may_query)
    return {**node.__dict__, "dicomweb_auth": ""}


@router.post("/nodes/{ae_title}/test", summary="Test the connection to a node or site")
def test_node(archive: ArchiveDep, ae_title: str, actor: allowed(NODE_MANAGE)
              ) -> list[dict[str, Any]]:
    """C-ECHO its DICOM port and, for a DICOMweb site, an authenticated QIDO-RS: whether each
    works and what the site said (audited)."""
    checks = archive.exchange.test_connection(ae_title, actor)
    return [{"protocol": c.protocol, "ok": c.ok, "detail": c.detail} for c in checks]


@router.delete("/nodes/{ae_title}", status_code=204, summary="Remove a DICOM node")
def remove_node(archive: ArchiveDep, ae_title: str, actor: allowed(NODE_MANAGE)) -> None:
    """Forget a node."""
    archive.nodes.remove(ae_title, actor)


@router.get("/audit", summary="Audit trail")
def audit_events(
    archive: ArchiveDep, actor: allowed(AUDIT_READ), action: str | None = None,
    study_uid: str | None = None, limit: int = 100,
) -> list[dict[str, Any]]:
    """Recorded events, newest first."""
    events = list(archive.audit.events(action, study_uid, max(1, min(limit, 1000))))
    archive.audit.record(
        AuditEvent(actor=actor, action="audit.read", outcome="success",
                   instance_count=len(events))
    )
    for event in events:
        event["at"] = event["at"].isoformat()
    return events
