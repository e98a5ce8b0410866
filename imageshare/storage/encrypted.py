"""Encryption at rest for a blob store: AES-256-GCM in a streaming, chunked format.

A stored blob is a header and a run of sealed chunks::

    header   = MAGIC (8 bytes) || salt (32 random bytes)
    chunk i  = AES-256-GCM(file key, nonce_i, plaintext[i*64 KiB : (i+1)*64 KiB], aad)
    nonce_i  = i as 11 bytes big-endian || final flag (1 byte: 1 for the last chunk, else 0)
    aad      = header || blob key
    file key = HKDF-SHA256(blob key of the installation, salt, "imageshare blob v1")

Every blob has a key of its own (the random salt), so chunk nonces never repeat under one
key; the chunk index and the final flag are in the nonce, so reordered, dropped or appended
chunks and a blob cut at a chunk boundary fail authentication; the header and the blob's key
are authenticated with every chunk, so a blob moved under another key fails too. The last
chunk is always present (empty when the length is a multiple of 64 KiB). Reads seek: a range
read decrypts only the chunks it touches, so frames of a multi-frame instance are read
without decrypting the file.

The installation key comes from the secret key (``IMAGESHARE_SECRET_KEY`` or the key file,
kept apart from the data) through HKDF with its own label. Blobs written before encryption
was enabled (no MAGIC) are read as they are unless the store is told to serve encrypted blobs
only (``plaintext=False``): a key cannot tell a blob from before encryption from plaintext
planted by someone who can write the store, so once :func:`seal_plaintext_blobs` (the
operator's migration) has sealed the old ones, a blob without MAGIC is refused. Digests
recorded at ingest are of the plaintext, so ``imageshare verify`` checks what the archive
serves; a blob whose chunk fails authentication raises :class:`StorageError`.

A store opened with the wrong key (a lost key file silently made anew, another installation's
``IMAGESHARE_SECRET_KEY``) is refused when it is opened (:class:`ConfigurationError`), not
served blob by blob as "altered on disk". Keys retired by a rotation (``retired_keys``) still
open the blobs sealed under them, and :func:`seal_plaintext_blobs` seals those again under
the current key.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from imageshare.domain.errors import ConfigurationError, StorageError
from imageshare.storage.blobs import (
    BlobStore,
    BoundedReader,
    StoredBlob,
    check_range,
    digest_of,
    read_up_to,
    size_mismatch,
)

MAGIC = b"ISBLOB\x01\x00"
SALT = 32
HEADER = len(MAGIC) + SALT
PLAIN_CHUNK = 64 * 1024
TAG = 16
SEALED_CHUNK = PLAIN_CHUNK + TAG
_INFO = b"imageshare blob v1"


def blob_master_key(installation_key: bytes) -> bytes:
    """The key blobs are encrypted under, derived from the installation's secret key (a
    label of its own, so that it is never the key secrets in the index are sealed with)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"imageshare blob encryption key").derive(installation_key)


def sealed_size(plain: int) -> int:
    """Bytes a blob of ``plain`` bytes takes when sealed."""
    return HEADER + plain + TAG * (plain // PLAIN_CHUNK + 1)


def plain_size(sealed: int) -> int:
    """Bytes of plaintext in a sealed blob of ``sealed`` bytes; StorageError if impossible."""
    body = sealed - HEADER
    chunks, rest = divmod(body, SEALED_CHUNK)
    if body < TAG or rest < TAG:
        raise StorageError("an encrypted blob is truncated")
    return chunks * PLAIN_CHUNK + rest - TAG


def _nonce(index: int, final: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


class _Sealer:
    """Seals one blob's chunks in order."""

    def __init__(self, master: bytes, key: str) -> None:
        salt = os.urandom(SALT)
        self.header = MAGIC + salt
        self._aad = self.header + key.encode("ascii")
        self._aes = AESGCM(_file_key(master, salt))
        self._index = 0

    def seal(self, chunk: bytes, final: bool) -> bytes:
        sealed = self._aes.encrypt(_nonce(self._index, final), chunk, self._aad)
        self._index += 1
        return sealed


def _file_key(master: bytes, salt: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_INFO).derive(master)


class _SealingStream(io.RawIOBase):
    """The sealed form of ``size`` plaintext bytes read from ``source``, as a stream (for the
    inner store's put), hashing the plaintext on the way."""

    def __init__(self, source: BinaryIO, size: int, sealer: _Sealer, key: str) -> None:
        super().__init__()
        self._source = source
        self._size = size
        self._sealer = sealer
        self._key = key
        self._read = 0
        self._pending = bytearray(sealer.header)
        self._done = False
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        """Always true."""
        return True

    def _fill(self) -> None:
        want = min(PLAIN_CHUNK, self._size - self._read)
        chunk = read_up_to(self._source, want)
        if len(chunk) < want:
            raise size_mismatch(self._key, self._size, self._read + len(chunk))
        self._read += len(chunk)
        self.digest.update(chunk)
        # The first short chunk is the last (empty when the length is a multiple of 64 KiB).
        final = len(chunk) < PLAIN_CHUNK
        if final and self._source.read(1):
            raise size_mismatch(self._key, self._size, self._size + 1)
        self._pending += self._sealer.seal(chunk, final)
        self._done = final

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        """Fill ``buffer`` with the next sealed bytes."""
        while not self._pending and not self._done:
            self._fill()
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        del self._pending[:n]
        return n


class _OpeningReader(io.BufferedIOBase):
    """A seekable plaintext view of a sealed blob; decrypts the chunks that reads touch."""

    def __init__(self, inner: BinaryIO, key: str, header: bytes, sealed: int,
                 master: bytes) -> None:
        super().__init__()
        self._inner = inner
        self._key = key
        self._size = plain_size(sealed)
        self._chunks = self._size // PLAIN_CHUNK + 1
        self._aad = header + key.encode("ascii")
        self._aes = AESGCM(_file_key(master, header[len(MAGIC):]))
        self._pos = 0
        self._cached: tuple[int, bytes] | None = None

    def readable(self) -> bool:
        """Always true."""
        return True

    def seekable(self) -> bool:
        """Always true."""
        return True

    def tell(self) -> int:
        """The plaintext position."""
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move in the plaintext; ValueError before its start (it moved to 0, so a reader
        stepping back too far read the blob's first bytes as if they were the ones asked)."""
        bases = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}
        if whence not in bases:
            raise ValueError(f"invalid whence ({whence})")
        target = bases[whence] + offset
        if target < 0:
            raise ValueError("negative seek position")
        self._pos = target
        return self._pos

    def _chunk(self, index: int) -> bytes:
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        final = index == self._chunks - 1
        want = (self._size - index * PLAIN_CHUNK if final else PLAIN_CHUNK) + TAG
        self._inner.seek(HEADER + index * SEALED_CHUNK)
        sealed = read_up_to(self._inner, want)
        try:
            plain = self._aes.decrypt(_nonce(index, final), sealed, self._aad)
        except InvalidTag as exc:
            raise StorageError(f"blob {self._key}: chunk {index} fails authentication "
                               "(altered, truncated or reordered on disk)") from exc
        self._cached = (index, plain)
        return plain

    def read(self, size: int | None = -1) -> bytes:
        """``size`` bytes from the current position (fewer only at the end; all of the rest
        when negative)."""
        end = self._size if size is None or size < 0 else min(self._size, self._pos + size)
        parts = []
        while self._pos < end:
            index, offset = divmod(self._pos, PLAIN_CHUNK)
            data = self._chunk(index)[offset:offset + end - self._pos]
            parts.append(data)
            self._pos += len(data)
        return b"".join(parts)

    def read1(self, size: int = -1) -> bytes:
        """As :meth:`read`."""
        return self.read(size)

    def close(self) -> None:
        """Close the sealed blob too."""
        if not self.closed:
            self._inner.close()
        super().close()

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        """Fill ``buffer`` from the current position."""
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def _first_chunk_opens(inner: BinaryIO, key: str, header: bytes, sealed: int,
                       master: bytes) -> bool:
    """True when the first chunk of the sealed blob open in ``inner`` (``sealed`` bytes long)
    authenticates under ``master``: the blob was sealed with that key. (No reader is made:
    one dropped would close ``inner``.)"""
    try:
        size = plain_size(sealed)
    except StorageError:
        return False
    final = size < PLAIN_CHUNK
    inner.seek(HEADER)
    chunk = read_up_to(inner, (size if final else PLAIN_CHUNK) + TAG)
    aes = AESGCM(_file_key(master, header[len(MAGIC):]))
    try:
        aes.decrypt(_nonce(0, final), chunk, header + key.encode("ascii"))
    except InvalidTag:
        return False
    return True


def _sealed_header(key: str, header: bytes) -> bool:
    """True when ``header`` (the first :data:`HEADER` bytes of a stored blob) starts a sealed
    blob, False for a blob stored before encryption; StorageError for a sealed blob cut
    inside its header (it was served as plaintext: the magic and part of the salt)."""
    if not header.startswith(MAGIC):
        return False
    if len(header) < HEADER:
        raise StorageError(f"blob {key}: an encrypted blob is truncated")
    return True


class EncryptedBlobStore:
    """A blob store whose blobs are sealed (AES-256-GCM, chunked) in an inner store.

    ``plaintext=False`` serves encrypted blobs only (a blob without the header is refused:
    it was planted, or is from before encryption and :func:`seal_plaintext_blobs` was not
    run). ``retired_keys`` are blob master keys of earlier secret keys: blobs sealed under
    them are still read, and sealed again under ``master_key`` by :func:`seal_plaintext_blobs`.
    With ``check_key`` (the default) a few sealed blobs are opened at once and the store is
    refused (:class:`ConfigurationError`) when none opens with any of the keys.

    It offers no local file paths (callers that need a file get a temporary plaintext copy
    in the staging folder, removed after use)."""

    def __init__(self, inner: BlobStore, master_key: bytes, *, plaintext: bool = True,
                 retired_keys: Sequence[bytes] = (), check_key: bool = True) -> None:
        self.inner = inner
        self._master = master_key
        self._retired = tuple(k for k in retired_keys if k != master_key)
        self.plaintext = plaintext
        if check_key:
            self.check_key()

    # -- which key a sealed blob is under ----------------------------------------------------

    def _opening(self, fh: BinaryIO, key: str, header: bytes, sealed: int) -> _OpeningReader:
        """A reader of the sealed blob open in ``fh`` under the key it was sealed with: the
        current one, else the first retired one whose first chunk authenticates (the current
        one when none does: reads then fail authentication)."""
        if self._retired:
            for master in (self._master, *self._retired):
                if _first_chunk_opens(fh, key, header, sealed, master):
                    return _OpeningReader(fh, key, header, sealed, master)
        return _OpeningReader(fh, key, header, sealed, self._master)

    def sealed_under(self, key: str) -> str:
        """What the stored blob ``key`` is: ``"current"`` (sealed under the current key),
        ``"retired"`` (under a retired one), ``"plaintext"`` (no header), ``"unknown"``
        (sealed, and no key opens its first chunk); KeyError if absent."""
        with self.inner.open(key) as fh:
            header = read_up_to(fh, HEADER)
            try:
                if not _sealed_header(key, header):
                    return "plaintext"
                sealed = fh.seek(0, io.SEEK_END)
                for name, master in (("current", self._master),
                                     *(("retired", m) for m in self._retired)):
                    if _first_chunk_opens(fh, key, header, sealed, master):
                        return name
            except StorageError:
                pass
            return "unknown"

    def check_key(self, sample: int = 3, look_at: int = 64) -> None:
        """Refuse (:class:`ConfigurationError`) a key that opens none of the first ``sample``
        sealed blobs among the first ``look_at`` stored ones: the secret key is not the one
        the blobs were sealed with (a key file made anew because it was lost or not found,
        or another installation's key), and every image would be refused as altered."""
        tried: list[str] = []
        for number, key in enumerate(self.inner.keys()):
            if number >= look_at or len(tried) >= sample:
                break
            try:
                state = self.sealed_under(key)
            except KeyError:
                continue  # deleted meanwhile
            if state in ("current", "retired"):
                return
            if state == "unknown":
                tried.append(key)
        if tried:
            raise ConfigurationError(
                f"the blob store's encrypted blobs ({', '.join(tried)}) do not open with this "
                "secret key: set IMAGESHARE_SECRET_KEY / the secret key file of the "
                "installation that wrote them (a key file that was lost is not made again "
                "from nothing; during a key rotation, name the old key in "
                "IMAGESHARE_RETIRED_SECRET_KEYS_FILE); if the key is right, those blobs are "
                "damaged")

    def _refuse_plaintext(self, key: str) -> StorageError:
        return StorageError(f"blob {key} is not encrypted, and this store serves encrypted "
                            "blobs only (it was written outside ImageShare, or before "
                            "encryption and never sealed since)")

    # -- the store -----------------------------------------------------------------------------

    def put(self, key: str, stream: BinaryIO, size: int) -> StoredBlob:
        """Seal and store exactly ``size`` bytes; the digest is of the plaintext."""
        sealing = _SealingStream(stream, size, _Sealer(self._master, key), key)
        self.inner.put(key, io.BufferedReader(sealing, PLAIN_CHUNK), sealed_size(size))
        return StoredBlob(size, sealing.digest.hexdigest())

    def open(self, key: str) -> BinaryIO:
        """The plaintext under ``key`` as a seekable stream; KeyError if absent. A chunk that
        fails authentication raises StorageError when read. A blob stored in plaintext
        (before encryption was enabled) is opened as it is, or refused (StorageError) by a
        store that serves encrypted blobs only."""
        fh = self.inner.open(key)
        try:
            header = read_up_to(fh, HEADER)
            if not _sealed_header(key, header):
                if not self.plaintext:
                    raise self._refuse_plaintext(key)
                fh.seek(0)
                return fh
            sealed = fh.seek(0, io.SEEK_END)
            return self._opening(fh, key, header, sealed)  # type: ignore[return-value]
        except BaseException:
            fh.close()
            raise

    def open_range(self, key: str, start: int, length: int) -> BinaryIO:
        """``length`` plaintext bytes from ``start``: only the chunks they lie in are read
        (ValueError for a negative start or length, which used to read from offset 0)."""
        check_range(start, length)
        fh = self.open(key)
        fh.seek(start)
        return BoundedReader(fh, length)  # type: ignore[return-value]

    # -- backups keep blobs sealed ----------------------------------------------------------

    def open_sealed(self, key: str) -> BinaryIO:
        """The bytes under ``key`` as stored (sealed, or plaintext from before encryption was
        enabled): what a backup copies, so that backup media hold no readable image."""
        return self.inner.open(key)

    def digest_of_stored(self, key: str, stream: BinaryIO) -> StoredBlob:
        """Plaintext size and SHA-256 of bytes as :meth:`open_sealed` gives them (each chunk
        authenticated); StorageError when they fail authentication, or are plaintext and
        this store serves encrypted blobs only."""
        header = read_up_to(stream, HEADER)
        digest = hashlib.sha256()
        if not _sealed_header(key, header):
            if not self.plaintext:
                raise self._refuse_plaintext(key)
            size = len(header)
            digest.update(header)
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
            return StoredBlob(size, digest.hexdigest())
        sealed = stream.seek(0, io.SEEK_END)
        reader = self._opening(stream, key, header, sealed)
        size = 0
        while chunk := reader.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        return StoredBlob(size, digest.hexdigest())

    def put_stored(self, key: str, stream: BinaryIO, size: int) -> StoredBlob:
        """Store bytes as :meth:`open_sealed` gave them (a restore); returns the plaintext's
        size and SHA-256, checked by reading them back. Nothing stays stored when they fail
        authentication."""
        self.inner.put(key, stream, size)
        try:
            with self.inner.open(key) as fh:
                return self.digest_of_stored(key, fh)
        except StorageError:
            self.inner.delete(key)
            raise

    def delete(self, key: str) -> None:
        """Remove ``key``."""
        self.inner.delete(key)

    def exists(self, key: str) -> bool:
        """True when ``key`` is stored (asked of the inner store, or found by reading its
        first byte: an object store has no other way)."""
        probe = getattr(self.inner, "exists", None)
        if probe is not None:
            return bool(probe(key))
        try:
            with self.inner.open(key) as fh:
                fh.read(1)
        except KeyError:
            return False
        return True

    def keys(self, since: str = "") -> Iterator[str]:
        """Every stored key at or after ``since``."""
        return self.inner.keys(since)

    def clear_partial_writes(self) -> int:
        """Remove what a crash left half-written in the inner store."""
        clear = getattr(self.inner, "clear_partial_writes", None)
        return int(clear()) if clear is not None else 0

    # -- sealing again -------------------------------------------------------------------------

    def reseal(self, key: str, expected_sha256: str | None = None) -> StoredBlob:
        """Seal the stored blob ``key`` (plaintext, or sealed under a retired key) again under
        the current key, in place, and return its plaintext's size and SHA-256. The new form
        is made aside (sealed, in a temporary file), checked to open under the current key
        and to hold the same plaintext (and, when given, the digest ``expected_sha256`` the
        index recorded), and only then stored over the old one in one atomic put.
        StorageError when a check fails, KeyError when the blob is absent (or was deleted
        meanwhile): the stored blob is left as it was."""
        with tempfile.TemporaryFile() as spool:
            with self.inner.open(key) as fh:
                header = read_up_to(fh, HEADER)
                source: BinaryIO = fh
                if _sealed_header(key, header):
                    source = self._opening(  # type: ignore[assignment]
                        fh, key, header, fh.seek(0, io.SEEK_END))
                size = source.seek(0, io.SEEK_END)
                source.seek(0)
                sealing = _SealingStream(source, size, _Sealer(self._master, key), key)
                while chunk := sealing.read(1 << 20):
                    spool.write(chunk)
            plain = StoredBlob(size, sealing.digest.hexdigest())
            if expected_sha256 is not None and plain.sha256 != expected_sha256:
                raise StorageError(f"blob {key} does not match the digest the index recorded "
                                   "for it: left as it is (it may have been altered)")
            total = spool.tell()
            spool.seek(0)
            header = read_up_to(spool, HEADER)
            check = _OpeningReader(spool, key, header, total,
                                   self._master)
            if digest_of(check) != plain:  # type: ignore[arg-type]
                raise StorageError(f"blob {key} could not be sealed again (the sealed copy "
                                   "does not read back): left as it is")
            if not self.exists(key):
                raise KeyError(key)  # deleted meanwhile: not brought back
            spool.seek(0)
            self.inner.put(key, spool, total)
        return plain


@dataclass
class SealReport:
    """What :func:`seal_plaintext_blobs` did, blob by blob (for the operator and the audit
    trail)."""

    checked: int = 0
    already: int = 0
    sealed: list[str] = field(default_factory=list)  # were plaintext, sealed now
    rekeyed: list[str] = field(default_factory=list)  # were under a retired key
    refused: list[tuple[str, str]] = field(default_factory=list)  # (key, why left)

    @property
    def complete(self) -> bool:
        """True when every blob of the store is now sealed under the current key: the store
        can serve encrypted blobs only."""
        return not self.refused


def seal_plaintext_blobs(store: EncryptedBlobStore,
                         recorded: Callable[[str], str | None] | None = None,
                         progress: Callable[[int], None] | None = None) -> SealReport:
    """The operator's migration to a store that serves encrypted blobs only (and the end of a
    key rotation): every stored blob that is plaintext or sealed under a retired key is
    sealed again under the current key (:meth:`EncryptedBlobStore.reseal`). ``recorded(key)``
    gives the digest the index recorded for a blob (None when it records none): a blob that
    no longer matches it is left and reported, not sealed as if it were the archive's own.
    Safe to run while the server runs and to run again; a blob deleted meanwhile is not
    brought back."""
    report = SealReport()
    for key in store.keys():
        report.checked += 1
        try:
            state = store.sealed_under(key)
            if state == "current":
                report.already += 1
            elif state == "unknown":
                report.refused.append((key, "sealed, and no key opens it (damaged?)"))
            else:
                expected = recorded(key) if recorded is not None else None
                store.reseal(key, expected)
                if expected is not None and recorded is not None and recorded(key) is None:
                    # the index let it go while it was sealed again (a deletion between the
                    # check and the put): what was deleted is not left on disk
                    store.delete(key)
                    raise KeyError(key)
                (report.sealed if state == "plaintext" else report.rekeyed).append(key)
        except KeyError:
            report.checked -= 1  # deleted meanwhile
        except StorageError as exc:
            report.refused.append((key, str(exc)))
        if progress is not None:
            progress(1)
    return report
