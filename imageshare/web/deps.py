"""Typed access to the composition root: routes declare ``archive: ArchiveDep`` and get the
installation's services (:class:`imageshare.app.Archive`) with their types."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from imageshare.app import Archive


def archive_of(request: Request) -> Archive:
    """The services of the installation this web application serves."""
    archive: Archive = request.app.state.archive
    return archive


ArchiveDep = Annotated[Archive, Depends(archive_of)]
