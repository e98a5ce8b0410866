"""The ASGI application: routers, error shape, CORS, request limits and the health check; and
the HTTP server's protocol with limits on the request head."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade
from sqlalchemy import text
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from imageshare import __version__
from imageshare.access.policy import ACCOUNT_SELF, PUBLIC
from imageshare.domain.errors import PayloadTooLarge
from imageshare.settings import Settings
from imageshare.tls import https_enabled, server_context
from imageshare.web import (
    api,
    dicomweb,
    exchange_api,
    exports,
    fhir,
    iid,
    problems,
    share_api,
)
from imageshare.web.auth import allowed
from imageshare.web.balance import ConnectionShares
from imageshare.web.deps import Archive, ArchiveDep
from imageshare.web.pages import (
    account,
    admin,
    assets,
    cases,
    consent,
    exchange,
    governance,
    imaging_requests,
    patients,
    reports,
    shared,
    shares,
    sign_in,
    studies,
    teaching,
    uploads,
    viewer,
)


class DicomwebCors:
    """Cross-origin access for the viewer origins of ``cors_origins``, to /dicomweb only and
    without credentials: the viewer sends its own API token (a script on the viewer's host
    must not read the app's pages, or call it, with the user's session cookie)."""

    def __init__(self, app: Any, origins: list[str]) -> None:
        self.app = app
        self.cors = CORSMiddleware(
            app, allow_origins=origins, allow_credentials=False,
            allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"],
            expose_headers=["Content-Type", "Content-Length"],
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == "/dicomweb" or path.startswith("/dicomweb/"):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def create_app(archive: Archive) -> FastAPI:
    """The web application serving ``archive``."""
    app = FastAPI(
        title="ImageShare", version=__version__, openapi_url=None, docs_url=None,
        redoc_url=None,
    )
    app.state.archive = archive
    problems.install(app)
    # Routes are matched in order, one by one: those of the busiest paths (a CD's slices sent
    # to the upload page, DICOMweb) come first. No two routers share a path.
    app.include_router(uploads.tus)
    app.include_router(dicomweb.router)
    app.include_router(api.router)
    app.include_router(exports.router)
    app.include_router(share_api.router)
    app.include_router(exchange_api.router)
    app.include_router(fhir.router)
    app.include_router(iid.router)
    app.include_router(consent.api)
    for pages in (sign_in, studies, viewer, patients, account, admin, reports, shares, shared,
                  cases, teaching, exchange, imaging_requests, governance, consent, assets,
                  uploads):
        app.include_router(pages.router)
    app.add_middleware(RequestLimits, settings=archive.settings)
    origins = [o.strip() for o in archive.settings.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(DicomwebCors, origins=origins)

    @app.get("/healthz", tags=["health"], summary="Liveness and readiness")
    def healthz(archive: ArchiveDep, _actor: allowed(PUBLIC)) -> JSONResponse:
        """``ok`` when the index answers; no patient data."""
        try:
            with archive.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception:  # noqa: BLE001 - reported as not ready
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok", "version": __version__})

    @app.get("/api/openapi.json", tags=["API"], summary="OpenAPI document")
    def openapi(request: Request, _actor: allowed(ACCOUNT_SELF)) -> JSONResponse:
        """The OpenAPI description of /api, /dicomweb and /healthz."""
        return JSONResponse(request.app.openapi())

    return app


def http_server_config(app: FastAPI, settings: Settings,
                       shares: ConnectionShares | None = None) -> Any:
    """The uvicorn configuration: the limited protocol, and HTTPS (BCP 195) when the server
    has a certificate and ``http_tls`` is on; ``shares``: this process's part in evening out
    the connections of several processes serving the port."""
    import uvicorn

    https = https_enabled(settings)
    protocol = LimitedHttpProtocol if shares is None else type(
        "BalancedHttpProtocol", (LimitedHttpProtocol,), {"shares": shares})
    config = uvicorn.Config(
        app, host=settings.http_host, port=settings.http_port, log_level="warning",
        access_log=False, http=protocol, ws="none",  # no WebSocket routes
        proxy_headers=True, forwarded_allow_ips=settings.trusted_proxies,
        # On SIGTERM/SIGINT requests in flight get the grace, then are ended.
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_seconds)),
        ssl_certfile=settings.tls_certificate if https else None,
        ssl_keyfile=settings.tls_private_key if https else None,
    )
    config.load()
    if https:  # uvicorn's own context allows TLS 1.0 and any cipher; ours is BCP 195
        config.ssl = server_context(settings, require_client_certificate=False)
    return config


# -- limits on requests -------------------------------------------------------------------------

MAX_URL_BYTES = 8192  # path and query string
MAX_HEADERS = 100  # header fields of one request
MAX_HEAD_BYTES = 65536  # request line and header fields together


def _amount(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:g} {unit}"
    return f"{size} bytes"


def _problem_bytes(status: int, title: str, detail: str) -> bytes:
    return json.dumps({"type": "about:blank", "title": title, "status": status,
                       "detail": detail}).encode()


class RequestLimits:
    """Refuses requests over the limits before their body is read: addresses longer than
    8 KiB (414), more than 100 header fields (431), and bodies over the limit of their kind
    (413): STOW-RS ``stow_max_bytes``, uploads (multipart/form-data) ``max_upload_bytes``,
    anything else ``max_body_bytes``. A body without a length is counted as it arrives and
    stopped at the limit."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def _limit(self, scope: dict[str, Any], content_type: str) -> tuple[int, str]:
        if scope["path"].startswith("/dicomweb/studies") and scope["method"] == "POST":
            return self.settings.stow_max_bytes, "stow_max_bytes"
        if content_type.startswith("application/offset+octet-stream"):
            return self.settings.upload_chunk_bytes, "upload_chunk_bytes"  # tus PATCH
        if content_type.startswith("multipart/form-data"):
            return self.settings.max_upload_bytes, "max_upload_bytes"
        return self.settings.max_body_bytes, "max_body_bytes"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The ASGI entry point."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        url = len(scope.get("raw_path") or scope["path"].encode()) + len(
            scope.get("query_string", b""))
        if url > MAX_URL_BYTES:
            await _answer(send, 414, "URI too long",
                          f"the address is longer than {_amount(MAX_URL_BYTES)}")
            return
        headers = scope["headers"]
        if len(headers) > MAX_HEADERS:
            await _answer(send, 431, "Request header fields too large",
                          f"the request has more than {MAX_HEADERS} header fields")
            return
        content_type, length = "", None
        for name, value in headers:
            if name == b"content-type":
                content_type = value.decode("latin-1").lower()
            elif name == b"content-length":
                length = value
        limit, setting = self._limit(scope, content_type)
        too_large = (f"the request body is larger than {_amount(limit)} (setting {setting})")
        if length is not None:
            if not length.isdigit():
                await _answer(send, 400, "Bad request", "Content-Length is not a number")
                return
            if int(length) > limit:
                await _answer(send, 413, "Request too large", too_large)
                return
        received = 0

        async def counted() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(too_large)
            return message

        await self.app(scope, counted, send)


async def _answer(send: Any, status: int, title: str, detail: str) -> None:
    body = _problem_bytes(status, title, detail)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bound on the request head: httptools itself
    accumulates a header of any length (a 200 MB header took a minute and 200 MB), so at
    most 64 KiB of request line and headers are fed to it; beyond that the answer is 431.

    With ``shares`` (several processes serving the port), a process holding more than its
    share of connections closes one after answering its next request (:mod:`balance`)."""

    shares: ConnectionShares | None = None

    def connection_made(self, transport: Any) -> None:  # noqa: D102 - asyncio protocol
        self._in_head, self._head_bytes = True, 0
        self._requests, self._counted = 0, self.shares is not None
        if self.shares is not None:
            self.shares.opened()
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        if self.shares is not None and self._counted:
            self._counted = False
            self.shares.closed()
        super().connection_lost(exc)

    def _unsupported_upgrade_warning(self) -> None:
        # An Upgrade header (WebSocket, h2c) is ignored and the request answered as HTTP/1.1;
        # anyone can send one, so it is not worth a warning (uvicorn's also gives bad advice).
        self.logger.debug("Upgrade header ignored")

    def on_headers_complete(self) -> None:  # noqa: D102 - parser callback
        self._in_head = False
        super().on_headers_complete()
        self._requests += 1

    def on_message_complete(self) -> None:  # noqa: D102 - parser callback
        self._in_head, self._head_bytes = True, 0
        super().on_message_complete()
        # A connection is let go once its request has arrived whole (closing while a body
        # still arrives would reset it, losing an early answer such as 423) and before its
        # answer begins (so that the answer says Connection: close).
        cycle = self.cycle
        if (self.shares is not None and self._counted and self._requests > 1
                and cycle is not None and cycle.keep_alive and not cycle.response_started
                and self.shares.over_share()):
            cycle.keep_alive = False  # answered with Connection: close
            self._counted = False  # no longer this process's: others see the room at once
            self.shares.closed()

    def data_received(self, data: bytes) -> None:  # noqa: D102 - asyncio protocol
        while data and not self.transport.is_closing():
            if self._in_head:
                room = MAX_HEAD_BYTES - self._head_bytes
                if room <= 0:
                    self._refuse_head()
                    return
                piece, data = data[:room], data[room:]
                self._head_bytes += len(piece)
            else:
                piece, data = data, b""
            self._feed(piece)

    def _feed(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except (HttpParserCallbackError, HttpParserError):
            self.logger.warning("Invalid HTTP request received.")
            self._answer_and_close(400, "Bad request", "the request is not valid HTTP/1.1")

    def _refuse_head(self) -> None:
        self.logger.warning("HTTP request head over %d bytes refused", MAX_HEAD_BYTES)
        self._answer_and_close(431, "Request header fields too large",
                               f"the request line and headers are longer than "
                               f"{_amount(MAX_HEAD_BYTES)}")

    def _answer_and_close(self, status: int, title: str, detail: str) -> None:
        body = _problem_bytes(status, title, detail)
        reason = {400: b"Bad Request", 431: b"Request Header Fields Too Large"}[status]
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/problem+json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % (status, reason, len(body))
            + body)
        self.transport.close()
