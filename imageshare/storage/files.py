"""Blob store on the local file system: temporary file, fsync, rename, fsync of the folder.

Everything is private to the service's user: folders 0700, files 0600 (patient data).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from imageshare.storage.blobs import (
    BLOB_KEY,
    CHUNK,
    BoundedReader,
    StoredBlob,
    check_key,
    check_range,
    size_mismatch,
)

log = logging.getLogger("imageshare.storage")
PRIVATE_UMASK = 0o077
_PRIVATE_MARK = ".private-v1"
# A temporary file or folder nothing has written to for this long was left by a stopped
# process: every live writer (a receive, an import, a ZIP being built) keeps its own fresher.
LEFTOVER_AFTER_SECONDS = 3600.0


def make_private(folder: Path, skip_after_first: tuple[str, ...] = ()) -> int:
    """Make ``folder`` and everything in it private to this user (folders 0700, files 0600;
    symbolic links are not followed); returns how many modes were changed.

    The sub-folders named in ``skip_after_first`` (the blob store, which can hold millions of
    files) are walked only the first time; their files are made private when written.
    """
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    first = not (folder / _PRIVATE_MARK).exists()
    changed = _private(folder, 0o700)
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            entries = os.scandir(current)
        except FileNotFoundError:
            continue  # removed meanwhile by another process (a finished download's folder)
        with entries:
            for entry in entries:
                if entry.is_symlink():
                    continue
                path = Path(entry.path)
                if entry.is_dir():
                    changed += _private(path, 0o700)
                    if first or not (current == folder and entry.name in skip_after_first):
                        stack.append(path)
                elif entry.is_file():
                    changed += _private(path, 0o600)
    if first:
        fd = os.open(folder / _PRIVATE_MARK, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
    return changed


def owned_prefix(kind: str = "") -> str:
    """The start of the name of a temporary file or folder this process makes in a shared
    folder (staging): it names the process, so that what a stopped process left can be told
    from what a running one is writing."""
    return f"{os.getpid()}-{kind}"


def remove_leftovers(folder: Path, starting: bool = False) -> int:
    """Remove what stopped processes left directly in ``folder``: files and folders named by
    a process that is no longer running (``starting``: or by this one, whose namesake before
    a restart is gone), and anything nothing changed for :data:`LEFTOVER_AFTER_SECONDS` (a
    folder counts as changed when anything in it changed). What a running process (an import beside
    a starting server) is writing is left alone; what cannot be removed is logged and left.
    Returns how many entries were removed."""
    cutoff = time.time() - LEFTOVER_AFTER_SECONDS
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    removed = 0
    for entry in entries:
        try:
            if not _writer_gone(entry.name, starting) and _last_change(entry) > cutoff:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed += 1
        except FileNotFoundError:
            continue  # its own process finished with it meanwhile
        except OSError as exc:
            log.warning("cannot remove the leftover %s: %s", entry.path,
                        exc.strerror or type(exc).__name__)
    return removed


def _writer_gone(name: str, starting: bool) -> bool:
    """True when ``name`` (made with :func:`owned_prefix`) names a process that has ended."""
    number, dash, _rest = name.partition("-")
    if not dash or not number.isdigit() or int(number) <= 0:
        return False  # not named by a process: judged by its age alone
    pid = int(number)
    if pid == os.getpid():
        return starting
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # running, as another user
    return False


def _last_change(entry: os.DirEntry[str]) -> float:
    """When ``entry`` (or, for a folder, anything in it) last changed."""
    info = entry.stat(follow_symlinks=False)
    newest = max(info.st_mtime, info.st_ctime)
    if entry.is_dir(follow_symlinks=False):
        for root, dirs, files in os.walk(entry.path):
            for name in (*dirs, *files):
                try:
                    inner = os.lstat(os.path.join(root, name))
                except FileNotFoundError:
                    continue
                newest = max(newest, inner.st_mtime, inner.st_ctime)
    return newest


def _private(path: Path, mode: int) -> int:
    try:
        current = path.lstat().st_mode & 0o777
        if current & 0o077 or current & mode != mode:
            path.chmod(current & ~0o077 | mode)
            return 1
    except OSError as exc:  # not ours, or gone meanwhile: said, not fatal
        log.warning("cannot make %s private: %s", path, exc.strerror or type(exc).__name__)
    return 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest_and_fsync(path: Path) -> StoredBlob:
    """Size and SHA-256 of a file, read once, then its data flushed to disk."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(fh.fileno())
    return StoredBlob(size, digest.hexdigest())


class FileBlobStore:
    """Blobs as files under ``root/<key[0:4]>/<key[4:8]>/<key>``; writes are atomic and durable.

    With :func:`new_blob_key` the second level changes every minute: one folder per minute of
    activity, the first level every 45 days.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        _private(self.root, 0o700)
        self._tmp = self.root / ".tmp"
        self._tmp.mkdir(exist_ok=True, mode=0o700)
        self._dirs_known: set[Path] = set()
        self._lock = threading.Lock()

    def _path(self, key: str) -> Path:
        check_key(key)
        return self.root / key[:4] / key[4:8] / key

    def _ensure_dir(self, folder: Path) -> None:
        """Make the folder (and its parent) durable before the first file goes in.

        Other processes may be making the same folders at the same moment: creating is
        idempotent, and each process fsyncs once, so nothing is acknowledged in a folder whose
        own entry might not yet be on disk.
        """
        if folder in self._dirs_known:
            return
        with self._lock:
            folder.parent.mkdir(exist_ok=True, mode=0o700)
            _fsync_dir(self.root)
            folder.mkdir(exist_ok=True, mode=0o700)
            _fsync_dir(folder.parent)
            self._dirs_known.add(folder)

    def put(self, key: str, stream: BinaryIO, size: int) -> StoredBlob:
        """Store exactly ``size`` bytes read from ``stream`` under ``key``; durable on
        return, with their SHA-256. A stream of another length stores nothing."""
        tmp = self._tmp / f"{owned_prefix()}{check_key(key)}.part"
        digest = hashlib.sha256()
        written = 0
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(min(CHUNK, size + 1 - written)):
                    out.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    if written > size:
                        break
                if written != size:
                    raise size_mismatch(key, size, written)
                out.flush()
                os.fsync(out.fileno())
            self._install(key, tmp)
        finally:
            tmp.unlink(missing_ok=True)
        return StoredBlob(size, digest.hexdigest())

    def put_file(self, key: str, path: Path, sync_folder: bool = True) -> StoredBlob:
        """Move the local file ``path`` into the store under ``key``; durable on return (with
        ``sync_folder=False``: once :meth:`sync_folders` has run for ``key``).

        The file is renamed first and then read once (for its SHA-256) and fsynced with its
        folder: on journalling file systems the file's fsync commits the rename too, so the
        folder's fsync finds little to do.
        """
        try:
            final = self._path(key)
            self._ensure_dir(final.parent)
            os.replace(path, final)
            stored = _digest_and_fsync(final)
            if sync_folder:
                _fsync_dir(final.parent)
            return stored
        except OSError as exc:
            if exc.errno != errno.EXDEV:  # another file system: copy instead
                raise
            with open(path, "rb") as src:
                stored = self.put(key, src, os.fstat(src.fileno()).st_size)
            path.unlink(missing_ok=True)
            return stored

    def sync_folders(self, keys: Iterable[str]) -> None:
        """fsync each folder holding one of ``keys`` once (after moves without the folder's
        fsync): their names are durable on return."""
        for folder in sorted({self._path(key).parent for key in keys}):
            _fsync_dir(folder)

    def _install(self, key: str, source: Path) -> None:
        final = self._path(key)
        self._ensure_dir(final.parent)
        os.replace(source, final)
        _fsync_dir(final.parent)

    def open(self, key: str) -> BinaryIO:
        """Open the bytes under ``key`` for streaming reads; raises KeyError if absent."""
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError as exc:
            raise KeyError(key) from exc

    def open_range(self, key: str, start: int, length: int) -> BinaryIO:
        """``length`` bytes from offset ``start`` (fewer at the end); KeyError if absent,
        ValueError for a negative start or length."""
        check_range(start, length)
        fh = self.open(key)
        fh.seek(start)
        return BoundedReader(fh, length)  # type: ignore[return-value]  # a file-like

    def delete(self, key: str) -> None:
        """Remove ``key``; absent keys are ignored."""
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        _fsync_dir(path.parent)

    def exists(self, key: str) -> bool:
        """True when ``key`` is stored."""
        return self._path(key).is_file()

    def keys(self, since: str = "") -> Iterator[str]:
        """Every stored key that sorts at or after ``since`` (keys sort by creation minute)."""
        for first in sorted(os.scandir(self.root), key=lambda e: e.name):
            if not first.is_dir() or first.name.startswith(".") or first.name < since[:4]:
                continue
            for second in os.scandir(first.path):
                if not second.is_dir() or first.name + second.name < since[:8]:
                    continue
                for entry in os.scandir(second.path):
                    if BLOB_KEY.match(entry.name) and entry.name >= since:
                        yield entry.name

    def local_path(self, key: str) -> Path | None:
        """The file holding ``key``."""
        return self._path(key)

    def clear_partial_writes(self) -> int:
        """Remove temporary files that processes no longer running left (at start-up: a
        running import's are its writes in progress); returns how many were removed."""
        return remove_leftovers(self._tmp, starting=True)

