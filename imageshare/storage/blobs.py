"""The blob store port: durable bytes under opaque keys, and how to open one by URL.

The core interface (:class:`BlobStore`) knows nothing of local files. A store on this
machine's disk also offers :class:`LocalBlobs` (a path per key, moving a file in); callers
that need a path use :func:`local_copy`, which gives the store's own file when there is one
and a temporary copy otherwise.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable
from urllib.parse import urlparse

from imageshare.domain.errors import ConfigurationError, StorageError

# ``\Z``, not ``$``: ``$`` also matches before a final newline, so ``"deadbeef\n"`` passed.
BLOB_KEY = re.compile(r"\A[0-9a-f]{8,64}\Z")
CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredBlob:
    """What the store holds under a key once a put returned: byte count and SHA-256 (hex)."""

    size: int
    sha256: str


class BlobStore(Protocol):
    """Stores instance bytes under keys made by :func:`new_blob_key`.

    A put is durable when it returns (fsynced on disk, or confirmed by the object store);
    opened streams are seekable, and reading after a seek fetches only what is read.
    """

    def put(self, key: str, stream: BinaryIO, size: int) -> StoredBlob:
        """Store exactly ``size`` bytes read from ``stream`` under ``key``, computing their
        SHA-256 on the way. Raises :class:`StorageError` (storing nothing) when the stream
        holds fewer or more bytes, or the store did not confirm the write."""
        ...

    def open(self, key: str) -> BinaryIO:
        """The bytes under ``key`` as a seekable stream; raises KeyError if absent."""
        ...

    def open_range(self, key: str, start: int, length: int) -> BinaryIO:
        """``length`` bytes from offset ``start`` (fewer at the end); KeyError if absent."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; absent keys are ignored."""
        ...

    def keys(self, since: str = "") -> Iterator[str]:
        """Every stored key sorting at or after ``since`` (to find blobs the index lost)."""
        ...


@runtime_checkable
class LocalBlobs(Protocol):
    """The optional capability of a store whose blobs are files on this machine."""

    def local_path(self, key: str) -> Path:
        """The file holding ``key`` (it may not exist)."""
        ...

    def put_file(self, key: str, path: Path, sync_folder: bool = True) -> StoredBlob:
        """Move the local file ``path`` into the store under ``key``; durable on return. With
        ``sync_folder=False`` the bytes are durable on return but the file's name only after
        :meth:`sync_folders` (one fsync per folder for many files)."""
        ...

    def sync_folders(self, keys: Iterable[str]) -> None:
        """Make the names of files moved in with ``sync_folder=False`` durable: each folder
        holding one of ``keys`` is fsynced once."""
        ...


def key_prefix_for(seconds: float) -> str:
    """The smallest key :func:`new_blob_key` can make at or after the time ``seconds``."""
    return f"{int(seconds // 60) & 0xFFFFFFFF:08x}"


def new_blob_key() -> str:
    """A fresh opaque key: the minute it was made, then random bits (no patient data).

    Keys made in the same minute share a folder in the file store, so storing does not create
    (and fsync) a new folder for nearly every instance; keys sort by the minute they were made.
    """
    minute = int(time.time() // 60) & 0xFFFFFFFF
    return f"{minute:08x}{uuid.uuid4().hex[:24]}"


def check_key(key: str) -> str:
    """``key`` if it is a well-formed blob key; ValueError otherwise."""
    if not isinstance(key, str) or not BLOB_KEY.match(key):
        raise ValueError("invalid blob key")
    return key


def check_range(start: int, length: int) -> None:
    """Refuse (ValueError) a byte range that starts before the blob or has a negative length:
    every store answers the same instead of one reading from offset 0, one failing in the
    operating system and one sending a malformed Range header."""
    if start < 0 or length < 0:
        raise ValueError("a byte range must start at 0 or later and not be negative")


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_up_to(stream: BinaryIO, count: int) -> bytes:
    """``count`` bytes from ``stream``, fewer only at its end."""
    chunks = []
    left = count
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def size_mismatch(key: str, expected: int, got: int) -> StorageError:
    """The error for a stream that did not hold the announced number of bytes."""
    more = "more" if got > expected else "fewer"
    return StorageError(f"blob {key}: the stream held {more} bytes than the {expected} announced")


# -- shared helpers for callers -------------------------------------------------------------


def store_file(blobs: BlobStore, key: str, path: Path, sync_folder: bool = True) -> StoredBlob:
    """Put the local file ``path`` under ``key`` and remove the file: moved into a local
    store, streamed into any other. With ``sync_folder=False`` the move is durable only after
    :func:`sync_folders` for its key (a batch of files costs one fsync per folder)."""
    if isinstance(blobs, LocalBlobs):
        return blobs.put_file(key, path, sync_folder=sync_folder)
    with open(path, "rb") as src:
        stored = blobs.put(key, src, os.fstat(src.fileno()).st_size)
    path.unlink(missing_ok=True)
    return stored


def sync_folders(blobs: BlobStore, keys: Iterable[str]) -> None:
    """Finish the durability of blobs stored with ``store_file(..., sync_folder=False)``
    (nothing to do for a store that is not local: its puts are confirmed when they return)."""
    if isinstance(blobs, LocalBlobs):
        blobs.sync_folders(keys)


def copy_to_file(blobs: BlobStore, key: str, target: Path, durable: bool = True) -> None:
    """Stream the blob into the local file ``target``, which appears complete or not at all,
    also after a power loss (its bytes are fsynced before it takes its name: copies kept
    for later, such as the local copies of instances, were otherwise found empty or cut
    short after one and served as they were). ``durable=False`` for a copy removed after use
    (nothing can find it after a restart)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, blobs.open(key) as src:
            while chunk := src.read(CHUNK):
                out.write(chunk)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(name, target)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


@contextmanager
def local_copy(blobs: BlobStore, key: str, folder: Path) -> Iterator[Path]:
    """A local file with the blob's bytes while the block runs (for libraries that want a
    path): the store's own file when it is local, else a temporary copy in ``folder``."""
    if isinstance(blobs, LocalBlobs):
        yield blobs.local_path(key)
        return
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"copy-{uuid.uuid4().hex}.dcm"
    try:
        copy_to_file(blobs, key, target, durable=False)  # removed after use
        yield target
    finally:
        target.unlink(missing_ok=True)


def digest_of(stream: BinaryIO) -> StoredBlob:
    """Size and SHA-256 of everything read from ``stream``."""
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return StoredBlob(size, digest.hexdigest())


class BoundedReader(io.BufferedIOBase):
    """At most ``length`` bytes of an open stream, from its current position."""

    def __init__(self, inner: BinaryIO, length: int) -> None:
        super().__init__()
        self._inner = inner
        self._left = max(0, length)

    def readable(self) -> bool:
        """Always true."""
        return True

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes of the range (the rest of it when negative)."""
        wanted = self._left if size is None or size < 0 else min(size, self._left)
        data = self._inner.read(wanted) if wanted else b""
        self._left -= len(data)
        return data

    def read1(self, size: int = -1) -> bytes:
        """As :meth:`read`."""
        return self.read(size)

    def close(self) -> None:
        """Close the underlying stream too."""
        if not self.closed:
            self._inner.close()
        super().close()


# -- choosing a store by URL ------------------------------------------------------------------


def sibling_store_url(url: str, name: str) -> str:
    """A store kept beside the blob store at ``url``: the folder ``name`` next to a store
    folder, the prefix ``PREFIX/name`` in a bucket (whose keys the blob store's listing
    skips), so that every instance sharing the store shares it too."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        return f"s3://{parsed.netloc}/{(parsed.path.strip('/') + '/' + name).lstrip('/')}"
    folder = Path(parsed.path if parsed.scheme else url)
    return (folder.parent / name).as_uri()


def results_store_url(url: str) -> str:
    """Where job results (export files) are kept beside the blob store at ``url``."""
    return sibling_store_url(url, "job-results")


def open_blob_store(url: str, s3_endpoint_url: str = "") -> BlobStore:
    """The blob store named by ``url``: ``file:///path`` (or a plain path), or
    ``s3://BUCKET/PREFIX`` (endpoint ``s3_endpoint_url``, else AWS; credentials and region
    from ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``).

    An object store is checked at once: raises :class:`ConfigurationError` saying why when
    the bucket cannot be reached or the credentials are refused.
    """
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        from imageshare.storage.files import FileBlobStore

        return FileBlobStore(Path(parsed.path if parsed.scheme else url))
    if parsed.scheme == "s3":
        from imageshare.storage.s3 import S3BlobStore

        if not parsed.netloc:
            raise ConfigurationError("the storage URL must name a bucket: s3://BUCKET/PREFIX")
        store = S3BlobStore.connect(parsed.netloc, parsed.path.strip("/"), s3_endpoint_url)
        store.check()
        return store
    raise ConfigurationError(
        f"storage URL scheme {parsed.scheme!r} is not supported (use file:// or s3://)"
    )
