"""One error shape for HTTP: RFC 9457 problem details; a 500 carries only a request id."""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from imageshare.domain.errors import ImageShareError, NotAuthenticated

log = logging.getLogger("imageshare.web")
PROBLEM = "application/problem+json"


def problem(status: int, title: str, detail: str = "", **extra: object) -> JSONResponse:
    """A problem-details response."""
    body = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="ImageShare", charset="UTF-8"'
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def install(app: FastAPI) -> None:
    """Map every error to the problem shape."""

    @app.exception_handler(ImageShareError)
    async def _known(_request: Request, exc: ImageShareError) -> JSONResponse:
        status = 401 if isinstance(exc, NotAuthenticated) else exc.http_status
        return problem(status, exc.title, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(exc.status_code, str(exc.detail) or "Error")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [".".join(str(p) for p in e.get("loc", ())) for e in exc.errors()]
        return problem(422, "Invalid request", "check these fields: " + ", ".join(fields))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        request_id = uuid.uuid4().hex[:12]
        # The exception text may quote patient data: the log gets its type, DEBUG the trace.
        log.error("request %s failed: %s", request_id, type(exc).__name__)
        log.debug("request %s trace", request_id, exc_info=exc)
        return problem(500, "Internal error", f"request id {request_id}")
