"""The JSON API under /api: nodes, audit trail, the caller's account and API tokens."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from imageshare.access.policy import (
    ACCOUNT_SELF,
    AUDIT_READ,
    NODE_MANAGE,
    PUBLIC,
    TOKEN_SELF,
)
from imageshare.access.sessions import COOKIE
from imageshare.audit.trail import AuditEvent
from imageshare.domain.actors import Actor
from imageshare.domain.errors import NotAuthenticated
from imageshare.exchange.nodes import Node
from imageshare.web.auth import allowed, client_address
from imageshare.web.pages.sign_in import set_session_cookie

router = APIRouter(prefix="/api", tags=["API"])


class NodeIn(BaseModel):
    """A remote DICOM node to register."""

    ae_title: str = Field(min_length=1, max_length=16)
    host: str = Field(min_length=1, max_length=255)
    port: int = Field(gt=0, lt=65536)
    dicomweb_url: str = ""
    display_name: str = ""
    may_query: bool = True
    may_retrieve: bool = True
    may_store: bool = True
    searchable: bool = True
    retrieve_from: bool = True
    send_to: bool = True
    dicomweb_auth: str = Field(default="", max_length=512)
    inbox: bool = False
    tls: bool = Field(default=False, description="reach the node's DICOM AE over TLS")


class RefusedIn(BaseModel):
    """A refused DICOM caller to register as a node (store only unless ``may_query``)."""

    ae_title: str = Field(min_length=1, max_length=16)
    host: str = Field(min_length=1, max_length=255)
    port: int = Field(default=104, gt=0, lt=65536)
    may_query: bool = False


class TokenIn(BaseModel):
    """A name for a new personal API token."""

    name: str = Field(min_length=1, max_length=128)


class LoginIn(BaseModel):
    """Credentials for a browser session."""

    username: str = Field(min_length=1, max_length=128)
    password: str = Field(min_length=1, max_length=1024)
    code: str = Field(default="", max_length=16, description="TOTP code, if two-factor is on")


@router.post("/session", summary="Sign in (browser session)")
def sign_in(
    request: Request, body: LoginIn, response: Response, _anyone: allowed(PUBLIC)
) -> dict[str, str]:
    """Check the password (and TOTP code, for accounts with two-factor sign-in) and start a
    session: an HttpOnly, SameSite=Strict cookie, and the CSRF token that every
    state-changing request of the session must send as X-CSRF-Token. Five failures lock the
    account for 15 minutes; every failure answers the same. ``stage`` is ``enrol`` for an
    administrator who must set up two-factor sign-in before anything else."""
    archive = request.app.state.archive
    source = client_address(request)
    archive.throttle.check(source)
    result = archive.users.sign_in(body.username, body.password, source)
    if result is not None and result[1] == "code":
        if not archive.users.check_code(body.username, body.code, source):
            result = None
        else:
            result = (result[0], "full")
    if result is None:
        archive.throttle.failed(source)
        archive.audit.record(AuditEvent(
            actor=Actor("anonymous", body.username[:64], source=source, registered=False),
            action="session.start", outcome="failure"))
        raise NotAuthenticated("wrong username, password or code, or the account is locked")
    actor, stage = result
    secret, csrf = archive.sessions.start(actor.name, source, stage)
    set_session_cookie(request, response, secret)
    archive.audit.record(AuditEvent(actor=actor, action="session.start", outcome="success",
                                    detail={"stage": stage}))
    return {"username": actor.name, "role": actor.role, "csrf_token": csrf, "stage": stage}


@router.delete("/session", status_code=204, summary="Sign out")
def sign_out(request: Request, response: Response, actor: allowed(ACCOUNT_SELF)) -> None:
    """End this browser session."""
    archive = request.app.state.archive
    secret = request.cookies.get(COOKIE)
    if secret:
        archive.sessions.end(secret)
    response.delete_cookie(COOKIE, path="/")
    archive.audit.record(AuditEvent(actor=actor, action="session.end", outcome="success"))


@router.get("/me", summary="The signed-in account")
def me(actor: allowed(ACCOUNT_SELF)) -> dict[str, str]:
    """Who the caller is and their role."""
    return {"username": actor.name, "role": actor.role}


@router.post("/tokens", status_code=201, summary="Create a personal API token")
def create_token(request: Request, body: TokenIn, actor: allowed(TOKEN_SELF)) -> dict[str, str]:
    """A new bearer token for DICOMweb clients; it is shown only in this answer."""
    archive = request.app.state.archive
    token = archive.users.create_token(actor.name, body.name)
    archive.audit.record(
        AuditEvent(actor=actor, action="token.create", outcome="success",
                   detail={"name": body.name})
    )
    return {"name": body.name, "token": token}


@router.get("/nodes", summary="List registered DICOM nodes")
def list_nodes(request: Request, actor: allowed(NODE_MANAGE)) -> list[dict[str, Any]]:
    """Every registered node (credentials are not shown)."""
    return [{**n.__dict__, "dicomweb_auth": "***" if n.dicomweb_auth else ""}
            for n in request.app.state.archive.nodes.all()]


@router.post("/nodes", status_code=201, summary="Register a DICOM node")
def add_node(request: Request, body: NodeIn, actor: allowed(NODE_MANAGE)) -> dict[str, Any]:
    """Register a node; usable at once by the running server."""
    archive = request.app.state.archive
    node = Node(**body.model_dump())
    archive.nodes.add(node)
    archive.audit.record(
        AuditEvent(actor=actor, action="node.add", outcome="success",
                   detail={"ae_title": node.ae_title, "host": node.host, "port": node.port})
    )
    return {**node.__dict__, "dicomweb_auth": "***" if node.dicomweb_auth else ""}


@router.get("/nodes/refused", summary="DICOM callers that were refused")
def refused_callers(request: Request, actor: allowed(NODE_MANAGE)) -> list[dict[str, Any]]:
    """Calling AE titles and hosts the DICOM listener refused (unregistered, wrong host, or a
    service not granted), with how often, the last service and reason, first and last seen."""
    archive = request.app.state.archive
    callers = archive.refused_callers.all()
    archive.audit.record(AuditEvent(actor=actor, action="node.refused.read", outcome="success",
                                    instance_count=len(callers)))
    return [{"ae_title": c.ae_title, "host": c.host, "count": c.count, "service": c.service,
             "reason": c.reason, "first_seen": c.first_seen.isoformat(),
             "last_seen": c.last_seen.isoformat(), "registered_host": c.registered_host}
            for c in callers]


@router.post("/nodes/refused/register", status_code=201,
             summary="Register a refused DICOM caller in one step")
def register_refused(request: Request, body: RefusedIn, actor: allowed(NODE_MANAGE)
                     ) -> dict[str, Any]:
    """Register the caller at the host it called from; it may store at once (audited)."""
    node = request.app.state.archive.refused_callers.register(
        body.ae_title, body.host, actor, body.port, body.may_query)
    return {**node.__dict__, "dicomweb_auth": ""}


@router.post("/nodes/{ae_title}/test", summary="Test the connection to a node or site")
def test_node(request: Request, ae_title: str, actor: allowed(NODE_MANAGE)
              ) -> list[dict[str, Any]]:
    """C-ECHO its DICOM port and, for a DICOMweb site, an authenticated QIDO-RS: whether each
    works and what the site said (audited)."""
    checks = request.app.state.archive.exchange.test_connection(ae_title, actor)
    return [{"protocol": c.protocol, "ok": c.ok, "detail": c.detail} for c in checks]


@router.delete("/nodes/{ae_title}", status_code=204, summary="Remove a DICOM node")
def remove_node(request: Request, ae_title: str, actor: allowed(NODE_MANAGE)) -> None:
    """Forget a node."""
    archive = request.app.state.archive
    archive.nodes.remove(ae_title)
    archive.audit.record(
        AuditEvent(actor=actor, action="node.remove", outcome="success",
                   detail={"ae_title": ae_title})
    )


@router.get("/audit", summary="Audit trail")
def audit_events(
    request: Request, actor: allowed(AUDIT_READ), action: str | None = None,
    study_uid: str | None = None, limit: int = 100,
) -> list[dict[str, Any]]:
    """Recorded events, newest first."""
    archive = request.app.state.archive
    events = list(archive.audit.events(action, study_uid, max(1, min(limit, 1000))))
    archive.audit.record(
        AuditEvent(actor=actor, action="audit.read", outcome="success",
                   instance_count=len(events))
    )
    for event in events:
        event["at"] = event["at"].isoformat()
    return events
