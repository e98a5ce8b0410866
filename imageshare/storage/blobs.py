"""The blob store interface: durable bytes under opaque keys, and how to open one by URL."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

from imageshare.domain.errors import ConfigurationError


class BlobStore(Protocol):
    """Stores instance bytes. Every write is durable (fsynced) when the call returns."""

    def put(self, key: str, stream: BinaryIO) -> int:
        """Store everything read from ``stream`` under ``key``; returns the byte count."""
        ...

    def put_file(self, key: str, path: Path) -> None:
        """Move the local file ``path`` into the store under ``key``; durable on return."""
        ...

    def open(self, key: str) -> BinaryIO:
        """Open the bytes under ``key`` for streaming reads; raises KeyError if absent."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; absent keys are ignored."""
        ...

    def exists(self, key: str) -> bool:
        """True when ``key`` is stored."""
        ...

    def keys(self, since: str = "") -> Iterator[str]:
        """Every stored key sorting at or after ``since`` (to find blobs the index lost)."""
        ...

    def local_path(self, key: str) -> Path | None:
        """A local file holding ``key`` when the store is on this machine's disk, else None."""
        ...


def key_prefix_for(seconds: float) -> str:
    """The smallest key :func:`new_blob_key` can make at or after the time ``seconds``."""
    return f"{int(seconds // 60) & 0xFFFFFFFF:08x}"


def new_blob_key() -> str:
    """A fresh opaque key: the minute it was made, then random bits (no patient data).

    Keys made in the same minute share a folder in the file store, so storing does not create
    (and fsync) a new folder for nearly every instance.
    """
    minute = int(time.time() // 60) & 0xFFFFFFFF
    return f"{minute:08x}{uuid.uuid4().hex[:24]}"


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_blob_store(url: str) -> BlobStore:
    """The blob store named by ``url`` (``file:///path`` or a plain path)."""
    from imageshare.storage.files import FileBlobStore

    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        return FileBlobStore(Path(parsed.path if parsed.scheme else url))
    raise ConfigurationError(
        f"storage URL scheme {parsed.scheme!r} is not supported yet (use a file:// URL)"
    )
