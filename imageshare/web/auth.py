"""Who is calling over HTTP, and the one dependency that asks the policy for every route."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from fastapi import Depends, Request

from imageshare.domain.actors import ANONYMOUS, Actor


def client_address(request: Request) -> str:
    """The caller's IP address, for the audit trail."""
    return request.client.host if request.client else ""


def resolve_actor(request: Request) -> Actor:
    """The Actor presenting HTTP Basic credentials or a bearer API token, else anonymous."""
    cached = getattr(request.state, "actor", None)
    if cached is not None:
        return cached
    archive = request.app.state.archive
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    source = client_address(request)
    actor: Actor | None = None
    if scheme.lower() == "basic" and credentials:
        try:
            username, _, password = base64.b64decode(credentials).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            username, password = "", ""
        if username:
            actor = archive.users.authenticate(username, password, source)
    elif scheme.lower() == "bearer" and credentials:
        actor = archive.users.authenticate_token(credentials.strip(), source)
    result = actor or ANONYMOUS
    request.state.actor = result
    return result


class Permission:
    """Route dependency: the caller must be allowed ``action``; returns the caller's Actor.

    Every route declares one (``Permission(PUBLIC)`` for the few open ones); a test walks the
    routes and checks that none lacks it.
    """

    def __init__(self, action: str) -> None:
        self.action = action

    def __call__(self, request: Request) -> Actor:
        """Authorise the request, raising NotAuthenticated or Forbidden."""
        actor = resolve_actor(request)
        request.app.state.archive.policy.authorise(actor, self.action)
        return actor

    def __repr__(self) -> str:
        return f"Permission({self.action!r})"


def allowed(action: str) -> Any:
    """``Annotated[Actor, Depends(Permission(action))]`` for a route parameter."""
    return Annotated[Actor, Depends(Permission(action))]
