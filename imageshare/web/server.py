"""The ASGI application: routers, error shape, CORS, request limits and the health check; and
the HTTP server's protocol with limits on the request head."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade
from sqlalchemy import text
from starlette.requests import ClientDisconnect
from starlette.routing import Match, compile_path
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


class HeadAsGet:
    """HEAD asks for the headers GET would give, and must do nothing GET does: link
    checkers, mail scanners, download managers and monitors send it unseen, before or
    instead of GET (RFC 9110 9.3.2). Routes with their own HEAD (WADO-RS, tus) keep it.

    A GET-only route is answered for HEAD as for GET without the body only when it is
    listed in :data:`HEAD_AS_GET`: its GET shows a page or a document, builds no file and
    changes nothing. Every other GET route answers HEAD with 405 and ``Allow`` without its
    handler running, so a route added later is safe by default: a GET that builds a
    download or an export (a ZIP, a PDF, a rendered image), asks other sites, signs a user
    in (an EHR launch link) or marks notifications read does none of it for a HEAD. The
    body of a HEAD answered as GET is not sent (the server drops it) and a streamed one
    stops once the headers are out."""

    # Routes whose GET only reads and shows: monitors and caches, the addresses in e-mails
    # and bookmarks that link checkers ask with HEAD (each shows a form or a list), and the
    # lists and searches. Opt in here only after checking that the GET builds no file and
    # changes nothing (an audit event of what was shown is not a change).
    HEAD_AS_GET = frozenset({
        "/healthz", "/fhir/metadata", "/static/{name}",
        "/", "/login", "/s/{token}", "/u/{token}", "/invite/{secret}",
        "/account/email/confirm/{secret}",
        "/search", "/shares", "/shared-with-me", "/admin/users", "/api/me",
        "/dicomweb/studies", "/dicomweb/series", "/dicomweb/instances",
    })

    def __init__(self, app: Any, routes: list[Any]) -> None:
        self.app = app
        self.routes = routes
        self._paths: list[tuple[Any, str, frozenset[str]]] | None = None

    def _own_head(self, scope: dict[str, Any]) -> bool:
        probe = dict(scope)  # matching may note things in the scope: not in the request's
        return any(route.matches(probe)[0] == Match.FULL for route in self.routes)

    def _route_paths(self) -> list[tuple[Any, str, frozenset[str]]]:
        """(path regex, path template, methods) of every route, in matching order; made
        at the first request (routes are added after the middleware)."""
        if self._paths is None:
            self._paths = [(compile_path(path)[0], path, frozenset(methods))
                           for path, methods in _flat_routes(self.routes)]
        return self._paths

    def _not_for_head(self, path: str) -> list[str] | None:
        """The methods the resource at ``path`` allows when its GET route is not answered
        for HEAD; None when it is (or when no GET route has the path: answered as GET,
        with GET's 404 or 405)."""
        matching = [(template, methods) for regex, template, methods in self._route_paths()
                    if regex.match(path)]
        get = next((template for template, methods in matching if "GET" in methods), None)
        if get is None or get in self.HEAD_AS_GET:
            return None
        return sorted({m for _, methods in matching for m in methods} - {"HEAD"})

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The ASGI entry point."""
        if (scope["type"] != "http" or scope["method"] != "HEAD"
                or self._own_head(scope)):
            await self.app(scope, receive, send)
            return
        allow = self._not_for_head(scope["path"])
        if allow is not None:
            await send({"type": "http.response.start", "status": 405, "headers": [
                (b"allow", ", ".join(allow).encode()), (b"content-length", b"0"),
                (b"cache-control", b"no-store")]})
            await send({"type": "http.response.body", "body": b""})
            return
        done = False

        async def headers_only(message: dict[str, Any]) -> None:
            nonlocal done
            if done:
                return  # the rest of the body: nobody reads it
            await send(message)
            if message["type"] == "http.response.start":
                # The answer ends with its headers; the server's receive() then says the
                # client left, which stops a streamed body.
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                done = True

        await self.app({**scope, "method": "GET"}, receive, headers_only)


def _flat_routes(routes: list[Any], prefix: str = "") -> list[tuple[str, set[str]]]:
    """(full path template, methods) of every route, routers included, in matching order."""
    found: list[tuple[str, set[str]]] = []
    for route in routes:
        if hasattr(route, "original_router"):  # an included router (FastAPI >= 0.16x)
            extra = getattr(getattr(route, "include_context", None), "prefix", "") or ""
            found += _flat_routes(route.original_router.routes, prefix + extra)
        elif isinstance(getattr(route, "path", None), str):
            found.append((prefix + route.path, set(getattr(route, "methods", None) or ())))
    return found


HSTS = b"max-age=31536000"  # a year (RFC 6797); no includeSubDomains: other hosts are not ours


class TransportSecurity:
    """Every answer over HTTPS (TLS here, or at a trusted proxy that says so) tells the
    browser to use nothing but HTTPS for this host for a year (HSTS, RFC 6797), so that a
    later visit typed or linked as http:// cannot be stripped of TLS on a hostile network."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The ASGI entry point."""
        if scope["type"] != "http" or scope.get("scheme") != "https":
            await self.app(scope, receive, send)
            return

        async def with_hsts(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"strict-transport-security"
                           for name, _ in headers):
                    headers.append((b"strict-transport-security", HSTS))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_hsts)


_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class RelativeRedirects:
    """A redirect the framework makes itself (``/dicomweb/studies/`` to the path without its
    slash) names this server by the request's Host header: a forged Host (``evil.example``)
    went into its Location, and a shared cache could send other users there. Such a Location
    (absolute, at the request's own Host) is sent as a path instead (RFC 9110 10.2.2 allows a
    relative reference); one naming another address is left as it is."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The ASGI entry point."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = next((v for k, v in scope.get("headers", ()) if k == b"host"), b"")

        async def relative(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and message["status"] in _REDIRECTS:
                message = {**message, "headers": [
                    (k, _own_location(v, host) if k.lower() == b"location" else v)
                    for k, v in message.get("headers", [])]}
            await send(message)

        await self.app(scope, receive, relative)


def _own_location(location: bytes, host: bytes) -> bytes:
    """``location`` as a path (with its query) when it names ``host`` (the request's own
    Host, however it was written), else unchanged."""
    parts = urlsplit(location.decode("latin-1"))
    if not parts.scheme or parts.netloc.lower() != host.decode("latin-1").lower():
        return location
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if path.startswith("//"):  # would read as another host
        path = "/" + path.lstrip("/")
    return path.encode("latin-1")


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
    app.add_middleware(HeadAsGet, routes=app.router.routes)
    origins = [o.strip() for o in archive.settings.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(DicomwebCors, origins=origins)
    app.add_middleware(RelativeRedirects)
    app.add_middleware(TransportSecurity)  # outermost: CORS preflights get HSTS too

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
# A connection that sends no request, or whose request line and headers have not all arrived
# this long after it opened or after their first byte, is closed (slowloris: a few hundred
# connections trickling a header line every few seconds were otherwise held for ever).
HEAD_SECONDS = 20.0
# A request body must arrive at BODY_MIN_RATE bytes a second on average after a first
# BODY_SECONDS (each 500 bytes earn a second more); time the server itself is not reading
# (the application is busy, the client waits for 100 Continue) is not counted. An upload over
# the slowest mobile link sends far more; a client trickling a byte at a time is cut off.
BODY_SECONDS = 20.0
BODY_MIN_RATE = 500
# An answer the client stops reading (its window stays full: the transport's buffer stays
# over its high-water mark) for this long is abandoned and the connection dropped: a client
# that asks for a large download and never reads it otherwise holds the connection, the
# handler and its open files for ever. A client reading a kilobyte a second still takes
# what the buffer holds over its low-water mark (48 KiB) well within it.
WRITE_SECONDS = 60.0


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
    stopped at the limit. A request whose client left while its body was read ends quietly."""

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

        try:
            await self.app(scope, counted, send)
        except ClientDisconnect:
            # The client left, or was cut off for sending too slowly, while its body was
            # read: nobody to answer, and no server error (logged, it would let each slow
            # client write a traceback to the log).
            return


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
        self._deadline: Any = None  # the TimerHandle of the head or body time limit
        self._head_begun = False
        self._body_bytes, self._body_window = 0, (0.0, 0)
        self._write_deadline: Any = None  # the TimerHandle of the write time limit
        if self.shares is not None:
            self.shares.opened()
        super().connection_made(transport)
        self._time_limit(HEAD_SECONDS, self._head_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        self._time_limit(None)
        self._stop_write_limit()
        if self.shares is not None and self._counted:
            self._counted = False
            self.shares.closed()
        super().connection_lost(exc)

    def _time_limit(self, seconds: float | None, then: Any = None) -> None:
        """Replace the time limit running (if any) by ``then`` in ``seconds`` (None: none)."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if seconds is not None:
            self._deadline = self.loop.call_later(seconds, then)

    def on_message_begin(self) -> None:  # noqa: D102 - parser callback: a request's 1st byte
        super().on_message_begin()
        self._head_started()

    def _head_started(self) -> None:
        """A byte of a request head (or of the blank lines a parser skips before one) has
        arrived: the rest of the head must follow within HEAD_SECONDS."""
        if not self._head_begun:
            self._head_begun = True
            self._time_limit(HEAD_SECONDS, self._head_too_slow)

    def _head_too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if self.flow.read_paused or (cycle is not None and not cycle.response_complete):
            # An earlier request is still being answered (this head was sent ahead of its
            # answer, and the server may not even be reading it): not the client's time, and
            # an answer written now would cut into that one.
            self._time_limit(HEAD_SECONDS, self._head_too_slow)
            return
        if not self._head_begun:  # nothing asked: closed quietly, as an idle keep-alive one
            self.transport.close()
            return
        self.logger.debug("HTTP request head not complete in %g s: closed", HEAD_SECONDS)
        self._answer_and_close(408, "Request timeout",
                               f"the request line and headers did not arrive within "
                               f"{HEAD_SECONDS:g} seconds")

    def _body_too_slow(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None or not cycle.more_body:
            return
        now = self.loop.time()
        if self.flow.read_paused or cycle.waiting_for_100_continue:
            # The server is not reading (or the client rightly waits for it): not the
            # client's time; the rate is measured afresh from here.
            self._body_window = (now, self._body_bytes)
            self._time_limit(BODY_SECONDS, self._body_too_slow)
            return
        since, had = self._body_window
        deadline = since + BODY_SECONDS + (self._body_bytes - had) / BODY_MIN_RATE
        if now < deadline:
            self._time_limit(deadline - now, self._body_too_slow)
            return
        self.logger.debug("HTTP request body slower than %d bytes/s: closed", BODY_MIN_RATE)
        if cycle.response_started:
            self.transport.close()  # answered already: nothing more can be said
            return
        self._answer_and_close(408, "Request timeout",
                               f"the request body arrived slower than {BODY_MIN_RATE} bytes "
                               "a second")

    def pause_writing(self) -> None:  # noqa: D102 - asyncio protocol: the buffer is full
        super().pause_writing()
        if self._write_deadline is None:
            self._write_deadline = self.loop.call_later(WRITE_SECONDS, self._write_too_slow)

    def resume_writing(self) -> None:  # noqa: D102 - asyncio protocol: the client read
        self._stop_write_limit()
        super().resume_writing()

    def _stop_write_limit(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    def _write_too_slow(self) -> None:
        self._write_deadline = None
        if self.transport.is_closing() or not self.flow.write_paused:
            return
        self.logger.debug("HTTP answer not read for %g s: connection dropped", WRITE_SECONDS)
        # Nothing more can be said to a client that does not read; close() would wait for it
        # to read the buffer first. The handler sees the client gone (uvicorn's
        # connection_lost lets its waiting write go on and marks the request disconnected).
        self.transport.abort()

    def _unsupported_upgrade_warning(self) -> None:
        # An Upgrade header (WebSocket, h2c) is ignored and the request answered as HTTP/1.1;
        # anyone can send one, so it is not worth a warning (uvicorn's also gives bad advice).
        self.logger.debug("Upgrade header ignored")

    def on_headers_complete(self) -> None:  # noqa: D102 - parser callback
        self._in_head, self._head_begun = False, False
        self._body_bytes, self._body_window = 0, (self.loop.time(), 0)
        self._time_limit(BODY_SECONDS, self._body_too_slow)
        super().on_headers_complete()
        self._requests += 1

    def on_message_complete(self) -> None:  # noqa: D102 - parser callback
        self._in_head, self._head_bytes = True, 0
        self._time_limit(None)  # until the next request's first byte (or keep-alive's end)
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
                self._head_started()
                room = MAX_HEAD_BYTES - self._head_bytes
                if room <= 0:
                    self._refuse_head()
                    return
                piece, data = data[:room], data[room:]
                self._head_bytes += len(piece)
            else:
                piece, data = data, b""
                self._body_bytes += len(piece)
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
        reason = {400: b"Bad Request", 408: b"Request Timeout",
                  431: b"Request Header Fields Too Large"}[status]
        # Over TLS these answers too say HSTS, as every answer of the application does
        # (TransportSecurity): a browser's first answer from the host may be one of them.
        hsts = b"strict-transport-security: %s\r\n" % HSTS if self.scheme == "https" else b""
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/problem+json\r\n"
            b"content-length: %d\r\n%sconnection: close\r\n\r\n"
            % (status, reason, len(body), hsts) + body)
        self.transport.close()
