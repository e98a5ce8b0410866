"""The ASGI application: routers, error shape, CORS and the health check."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from sqlalchemy import text

from imageshare import __version__
from imageshare.access.policy import ACCOUNT_SELF, PUBLIC
from imageshare.web import api, dicomweb, exchange_api, exports, problems, share_api
from imageshare.web.auth import allowed
from imageshare.web.pages import (
    account,
    admin,
    assets,
    cases,
    exchange,
    patients,
    shared,
    shares,
    sign_in,
    studies,
    viewer,
)


def create_app(archive: Any) -> FastAPI:
    """The web application serving ``archive``."""
    app = FastAPI(
        title="ImageShare", version=__version__, openapi_url=None, docs_url=None,
        redoc_url=None,
    )
    app.state.archive = archive
    problems.install(app)
    app.include_router(dicomweb.router)
    app.include_router(api.router)
    app.include_router(exports.router)
    app.include_router(share_api.router)
    app.include_router(exchange_api.router)
    for pages in (sign_in, studies, viewer, patients, account, admin, shares, shared, cases,
                  exchange, assets):
        app.include_router(pages.router)
    origins = [o.strip() for o in archive.settings.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=origins, allow_credentials=True,
            allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"],
            expose_headers=["Content-Type", "Content-Length"],
        )

    @app.get("/healthz", tags=["health"], summary="Liveness and readiness")
    def healthz(request: Request, _actor: allowed(PUBLIC)) -> JSONResponse:
        """``ok`` when the index answers; no patient data."""
        try:
            with request.app.state.archive.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception:  # noqa: BLE001 - reported as not ready
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok", "version": __version__})

    @app.get("/api/openapi.json", tags=["API"], summary="OpenAPI document")
    def openapi(request: Request, _actor: allowed(ACCOUNT_SELF)) -> JSONResponse:
        """The OpenAPI description of /api, /dicomweb and /healthz."""
        return JSONResponse(request.app.openapi())

    return app
