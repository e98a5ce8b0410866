"""Typed route parameters and body values shared by the HTTP adapters, and the JSON API's
route class (JSON bodies checked)."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from imageshare.domain.errors import ImageShareError
from imageshare.web.auth import SAFE_METHODS, PrivateRoute

# A row number in a path (inbox item, token): positive and within what SQL integers hold, so
# an absurd number is a 422 with the reason, never a database error.
RowId = Annotated[int, Path(ge=1, le=2**63 - 1, description="a row number")]

# A DICOM UID in a JSON body (PS3.5 9.1: at most 64 characters): a longer one is refused,
# never cut short (a UID cut at 64 characters names another study, or none).
Uid = Annotated[str, Field(min_length=1, max_length=64,
                           description="a DICOM UID (at most 64 characters)")]

# A page of a list (newest first): at most 1000 rows an answer; ``offset`` rows skipped. The
# answer's ``X-Total-Count`` says how many there are in all.
Limit = Annotated[int, Query(ge=1, le=1000, description="at most this many (1 to 1000)")]
Offset = Annotated[int, Query(ge=0, le=2**31 - 1, description="skip this many first")]
TOTAL = "X-Total-Count"


class Strict(BaseModel):
    """A request body a person's client sends: a field it does not define is refused (422
    naming it), so that a misspelt right, expiry or setting never silently falls back to its
    default. (Site-to-site messages stay tolerant: a newer peer may send more.)"""

    model_config = ConfigDict(extra="forbid")


class _Refused(ValueError):
    """What a JSON body may not hold although Python's parser takes it."""


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise _Refused(f"the body names {twice[:64]!r} twice (RFC 8259 4: member names "
                       "are unique); send each field once")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise _Refused(f"the body holds {name}, which is not JSON (RFC 8259 6)")


class JsonApiRoute(PrivateRoute):
    """A route of the JSON API (with :class:`PrivateRoute`'s headers) whose JSON body names
    each member once and holds no NaN or Infinity: Python's parser takes both (the last of
    two values silently winning, so a proxy or log that reads the first sees another
    request), so they are refused (400, saying which) before the route runs."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """The route's handler, checking a JSON body first."""
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            content_type = request.headers.get("content-type", "").partition(";")[0]
            media = content_type.strip().lower()
            if request.method not in SAFE_METHODS and (
                    media == "application/json" or media.endswith("+json")):
                body = await request.body()  # Starlette keeps it for the route
                try:
                    json.loads(body, object_pairs_hook=_unique_members,
                               parse_constant=_no_constant)
                except _Refused as exc:
                    raise ImageShareError(str(exc)) from None
                except (ValueError, RecursionError):
                    pass  # not JSON at all: the route's own parsing says so
            return await handler(request)

        return checked
