"""One error shape for HTTP: RFC 9457 problem details; a 500 carries only a request id."""

from __future__ import annotations

import logging
import uuid
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from imageshare.access.policy import AWAITING_CODE, CHANGING_PASSWORD, ENROLLING
from imageshare.domain.errors import ImageShareError, NotAuthenticated
from imageshare.web.auth import BEARER
from imageshare.web.fhir import outcome_response
from imageshare.web.pages.templating import page, redirect

log = logging.getLogger("imageshare.web")
PROBLEM = "application/problem+json"
TUS_VERSION = "1.0.0"  # the tus protocol the upload routes speak


# Pydantic's messages for the common refusals, in the words a person filling a form uses.
_PLAIN_WORDS = {"int_parsing": "must be a whole number", "int_type": "must be a whole number",
                "float_parsing": "must be a number", "bool_parsing": "must be yes or no",
                "string_too_long": "is too long", "string_too_short": "is too short",
                "greater_than": "is too small", "less_than": "is too large"}
_ACRONYMS = {"ae": "AE", "nhs": "NHS", "url": "URL", "tls": "TLS", "id": "ID",
             "dicomweb": "DICOMweb", "csrf": "CSRF"}


def _form_problems(exc: RequestValidationError) -> str:
    """What a person must correct in a page form, field by field in words ("Port: must be a
    whole number", "Host is required"), never echoing what was typed (it may be patient
    data)."""
    said = []
    for error in exc.errors()[:10]:
        location = [str(p) for p in error.get("loc", ()) if p not in ("body", "query")]
        words = (location[-1] if location else "form").replace("_", " ").split()
        name = " ".join(_ACRONYMS.get(w.lower(), w.lower()) for w in words)
        name = name[:1].upper() + name[1:]
        kind = str(error.get("type", ""))
        if kind == "missing":
            said.append(f"{name} is required")
            continue
        message = _PLAIN_WORDS.get(kind) or str(error.get("msg", "is not valid"))
        said.append(f"{name}: {message}")
    return "; ".join(dict.fromkeys(said)) + "."


def problem(status: int, title: str, detail: str = "", challenge: bool = True,
            **extra: object) -> JSONResponse:
    """A problem-details response; a 401 carries a Basic challenge unless ``challenge`` is
    false (share links: a browser would answer one with a sign-in prompt)."""
    body = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    # An error can name what was asked for (an NHS number refused, a share that is gone): no
    # cache keeps it (404 and 410 are otherwise cacheable by default, RFC 9111 4.2.2).
    headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
    if status == 401 and challenge:
        headers["WWW-Authenticate"] = 'Basic realm="ImageShare", charset="UTF-8"'
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def is_fhir(request: Request) -> bool:
    """True for the FHIR API, whose errors are OperationOutcome resources."""
    return request.url.path == "/fhir" or request.url.path.startswith("/fhir/")


def wants_page(request: Request) -> bool:
    """True for a browser asking for a page (not an API or DICOMweb client)."""
    path = request.url.path
    if path.startswith(("/api/", "/dicomweb", "/static/", "/healthz", "/fhir/")):
        return False
    return "text/html" in request.headers.get("accept", "")


def _is_json(content_type: str) -> bool:
    """Is ``content_type`` JSON (``application/json`` or ``application/...+json``)?"""
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/")
                                           and media.endswith("+json"))


def _body_problem(request: Request, errors: list[dict[str, Any]]) -> JSONResponse | None:
    """For the JSON API (``/api/``): a body that is not JSON at all is 415 (it was sent as
    another media type, or as none), one that does not parse is 400 saying where; else None
    (the fields are checked one by one: 422)."""
    if not request.url.path.startswith("/api/"):
        return None
    on_body = [e for e in errors if tuple(e.get("loc", ()))[:1] == ("body",)]
    if not on_body:
        return None
    sent = request.headers.get("content-type", "")
    has_body = request.headers.get("content-length", "0") != "0" or (
        "transfer-encoding" in request.headers)
    if has_body and not _is_json(sent):
        return problem(415, "Unsupported media type",
                       "send the body as JSON, with Content-Type: application/json")
    for error in on_body:
        if error.get("type") == "json_invalid":
            where = tuple(error.get("loc", ()))[1:2]
            reason = str((error.get("ctx") or {}).get("error", "")).split(":")[0][:100]
            detail = "the body is not valid JSON" + (f": {reason}" if reason else "") + (
                f" (at character {where[0]})" if where else "")
            return problem(400, "Bad request", detail)
    return None


def _unparsed_body(exc: StarletteHTTPException) -> str:
    """Why FastAPI could not read a JSON body (its 400 says only that it could not)."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return "the body is not valid UTF-8 JSON (RFC 8259)"
    if isinstance(cause, RecursionError):
        return "the body's JSON is nested too deeply"
    return "the body is not valid JSON (a number in it may be too long)"


def _error_page(request: Request, status: int, title: str, detail: str) -> Response:
    return page(request, "error.html", status_code=status, title=title, detail=detail)


def _page_for(request: Request, status: int, title: str, detail: str) -> Response:
    """What a browser gets instead of a problem document."""
    actor = getattr(request.state, "actor", None)
    role = getattr(actor, "role", "")
    if status == 401 and request.url.path.startswith("/s/"):
        # Someone using a share link whose session ended (revoked, expired, locked): the
        # link's own page says what happened (never the staff sign-in page).
        token = request.path_params.get("token") or request.url.path.split("/")[2]
        return redirect(f"/s/{quote(token, safe='')}")
    if status == 401:
        target = request.url.path
        if request.url.query:
            target += "?" + request.url.query
        return redirect("/login?" + urlencode({"next": target}))
    if status == 403 and role == ENROLLING:
        return redirect("/account#two-factor")
    if status == 403 and role == CHANGING_PASSWORD:
        return redirect("/account#password")
    if status == 403 and role == AWAITING_CODE:
        return redirect("/login/code")
    return _error_page(request, status, title, detail)


def _http_answer(request: Request, exc: StarletteHTTPException) -> Response:
    """The answer to an HTTP error the framework raised, in the form the caller reads."""
    if is_fhir(request):
        return outcome_response(exc.status_code, str(exc.detail) or "Error")
    if wants_page(request):
        return _error_page(request, exc.status_code, str(exc.detail) or "Error",
                           "The page does not exist." if exc.status_code == 404 else "")
    if exc.status_code == 400 and exc.__cause__ is not None and (
            request.url.path.startswith("/api/")):
        return problem(400, "Bad request", _unparsed_body(exc))
    return problem(exc.status_code, str(exc.detail) or "Error")


def install(app: FastAPI) -> None:
    """Map every error to the problem shape (or, for browsers, an error page)."""

    @app.exception_handler(ImageShareError)
    async def _known(request: Request, exc: ImageShareError) -> Response:
        status = 401 if isinstance(exc, NotAuthenticated) else exc.http_status
        if is_fhir(request):
            return outcome_response(status, str(exc), token_refused=getattr(
                request.state, "channel", None) == BEARER and isinstance(exc, NotAuthenticated))
        if wants_page(request):
            return _page_for(request, status, exc.title, str(exc))
        # Under a share link nobody signs in with a password: no Basic challenge (a browser
        # would prompt for one mid-session when the link ends; the viewer goes to the link's
        # own page instead).
        answer = problem(status, exc.title, str(exc),
                         challenge=not request.url.path.startswith("/s/"))
        if "tus-resumable" in request.headers:
            # tus 1.0: every answer to a tus request says the version; a refused version
            # (412) lists the ones the server speaks.
            answer.headers["Tus-Resumable"] = TUS_VERSION
            if status == 412:
                answer.headers["Tus-Version"] = TUS_VERSION
        return answer

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        answer = _http_answer(request, exc)
        allow = (exc.headers or {}).get("Allow")
        if exc.status_code == 405 and allow:
            answer.headers["Allow"] = allow  # RFC 9110 15.5.6: a 405 names the methods
        return answer

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        fields = [".".join(str(p) for p in e.get("loc", ())) for e in exc.errors()]
        detail = "check these fields: " + ", ".join(fields)
        if is_fhir(request):
            return outcome_response(400, detail)
        if wants_page(request):
            return _error_page(request, 422, "Invalid request", _form_problems(exc))
        return _body_problem(request, list(exc.errors())) or problem(
            422, "Invalid request", detail)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _index_down(request: Request, exc: DBAPIError) -> Response:
        # The database went away (stopped, unreachable, disk full): nothing was done.
        log.error("request failed, index database unavailable: %s", type(exc).__name__)
        detail = "the index database is unavailable; nothing was done, try again later"
        if is_fhir(request):
            return outcome_response(503, detail)
        if wants_page(request):
            return _error_page(request, 503, "Service unavailable", detail)
        return problem(503, "Service unavailable", detail)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        request_id = uuid.uuid4().hex[:12]
        # The exception text may quote patient data: the log gets its type, DEBUG the trace.
        log.error("request %s failed: %s", request_id, type(exc).__name__)
        log.debug("request %s trace", request_id, exc_info=exc)
        if is_fhir(request):
            return outcome_response(500, f"request id {request_id}")
        if wants_page(request):
            return _error_page(request, 500, "Something went wrong",
                               f"Please try again. Request id {request_id}.")
        return problem(500, "Internal error", f"request id {request_id}")
