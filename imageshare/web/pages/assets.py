"""The web app's own stylesheet and scripts (no patient data; served to everyone)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from imageshare.access.policy import PUBLIC
from imageshare.domain.errors import NotFound
from imageshare.web.auth import allowed

router = APIRouter(include_in_schema=False)
STATIC = Path(__file__).resolve().parent.parent / "static"
_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}


@router.get("/static/{name}")
def asset(request: Request, name: str, _anyone: allowed(PUBLIC)) -> FileResponse:
    """One file of the web app's static folder."""
    path = STATIC / name
    if "/" in name or name.startswith(".") or path.suffix not in _TYPES or not path.is_file():
        raise NotFound("no such file")
    return FileResponse(path, media_type=_TYPES[path.suffix],
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})
