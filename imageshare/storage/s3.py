"""Blob store on an S3-compatible object store (boto3).

A put is acknowledged only after the object store confirmed it: small blobs go in one PUT
whose SHA-256 the store checks (``x-amz-checksum-sha256``) and echoes, or, on a store that
does not know that header, with a Content-MD5 the store checks and an ETag that must equal
the MD5 of what was sent (until a store has echoed a checksum, both go: a store that ignores
the newer header must still refuse a body damaged on the way, rather than keep it where
start-up recovery would find it); large blobs go in
parts of ``part_size`` (each with its Content-MD5 checked by the store and its ETag checked
here, and the multipart ETag checked at the end), so memory stays bounded by one part. Reads
are ranged GETs: a seek costs nothing until the next read, which fetches only a stretch from
there, growing while reads stay sequential.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO

from imageshare.domain.errors import ConfigurationError, StorageError
from imageshare.storage.blobs import (
    BLOB_KEY,
    StoredBlob,
    check_key,
    check_range,
    read_up_to,
    size_mismatch,
)

MiB = 1024 * 1024
_FIRST_WINDOW = 256 * 1024  # the first GET after opening or seeking
_MAX_WINDOW = 8 * MiB  # the longest GET while reading sequentially
_ABANDONED_AFTER = timedelta(days=1)  # multipart uploads older than this were left by a crash
_ACCESS_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
                 "InvalidToken", "ExpiredToken"}


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _etag(response: dict[str, Any]) -> str:
    return str(response.get("ETag", "")).strip('"').lower()


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _send_at_once(request: Any, **_kwargs: Any) -> None:
    """Send a whole-object PUT without ``Expect: 100-continue`` (botocore asks for it on every
    body): waiting for the store's interim answer costs a round trip per instance, on the
    path that acknowledges a C-STORE. Parts of multipart uploads keep it."""
    request.headers.pop("Expect", None)


class S3BlobStore:
    """Blobs as objects ``PREFIX/<key>`` in one bucket."""

    def __init__(self, client: Any, bucket: str, prefix: str = "", where: str = "AWS S3",
                 part_size: int = 8 * MiB, multipart_threshold: int = 16 * MiB) -> None:
        if part_size < 5 * MiB:
            raise ConfigurationError("S3 multipart parts must be at least 5 MiB")
        self._client = client
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self._where = where
        self.part_size = part_size
        self.multipart_threshold = max(multipart_threshold, part_size)
        # Set once the store has echoed a SHA-256 checksum it checked: from then on single
        # PUTs go without a Content-MD5 (an MD5 costs twice a SHA-256 here).
        self._checks_sha256 = False

    @classmethod
    def connect(cls, bucket: str, prefix: str, endpoint_url: str = "", **options: Any
                ) -> S3BlobStore:
        """A store on ``endpoint_url`` (empty: AWS), credentials and region from the standard
        ``AWS_*`` environment variables (or boto3's other usual sources)."""
        import boto3
        from botocore.config import Config

        config = Config(
            signature_version="s3v4",
            # The body is not hashed again for the signature: its SHA-256 (or for parts its
            # MD5) travels in a signed header and the store checks the body against it.
            s3={"addressing_style": "path" if endpoint_url else "auto",
                "payload_signing_enabled": False},
            retries={"mode": "standard", "max_attempts": 4},
            max_pool_connections=32, connect_timeout=5, read_timeout=60,
            # We send our own checksums; stores without the newer checksum headers still work.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url or None, config=config)
        client.meta.events.register("before-send.s3.PutObject", _send_at_once)
        return cls(client, bucket, prefix, where=endpoint_url or "AWS S3", **options)

    # -- errors ---------------------------------------------------------------------------

    def _call(self, operation: str, **params: Any) -> Any:
        """One client call; absent keys become KeyError, anything else StorageError."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._client, operation)(**params)
        except ClientError as exc:
            code = _code(exc)
            if code in ("NoSuchKey", "404", "NotFound") and "Key" in params:
                raise KeyError(params["Key"]) from exc
            if code == "InvalidRange":
                raise _InvalidRange() from exc
            raise StorageError(f"the object store refused {operation} ({code or 'error'})"
                               ) from exc
        except BotoCoreError as exc:
            raise StorageError(f"the object store at {self._where} cannot be reached "
                               f"({type(exc).__name__})") from exc

    def check(self) -> None:
        """Prove the bucket is reachable with these credentials (it lists one key); raises
        :class:`ConfigurationError` saying what is wrong."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            self._client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except NoCredentialsError as exc:
            raise ConfigurationError(
                "no credentials for the object store: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY") from exc
        except ClientError as exc:
            code = _code(exc)
            if code == "NoSuchBucket":
                raise ConfigurationError(
                    f"bucket {self.bucket!r} does not exist at {self._where}") from exc
            if code in _ACCESS_CODES:
                raise ConfigurationError(
                    f"the object store at {self._where} refused access to bucket "
                    f"{self.bucket!r} ({code}): check AWS_ACCESS_KEY_ID, "
                    "AWS_SECRET_ACCESS_KEY and the bucket's permissions") from exc
            raise ConfigurationError(
                f"the object store at {self._where} answered {code or 'an error'} for bucket "
                f"{self.bucket!r}") from exc
        except BotoCoreError as exc:
            raise ConfigurationError(
                f"the object store at {self._where} cannot be reached "
                f"({type(exc).__name__}): check IMAGESHARE_S3_ENDPOINT_URL") from exc

    # -- the BlobStore interface --------------------------------------------------------------

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def put(self, key: str, stream: BinaryIO, size: int) -> StoredBlob:
        """Store exactly ``size`` bytes read from ``stream`` under ``key``; returns once the
        object store confirmed them, with their SHA-256. Otherwise nothing is stored."""
        name = self._name(key)
        if size <= self.multipart_threshold:
            data = read_up_to(stream, size + 1)
            if len(data) != size:
                raise size_mismatch(key, size, len(data))
            digest = hashlib.sha256(data)
            self._put_whole(name, data, digest.digest())
            return StoredBlob(size, digest.hexdigest())
        return StoredBlob(size, self._put_in_parts(name, key, stream, size))

    def _put_whole(self, name: str, data: bytes, sha256: bytes) -> None:
        checksum = _b64(sha256)
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": name, "Body": data,
                                  "ContentLength": len(data), "ChecksumSHA256": checksum}
        md5 = None
        if not self._checks_sha256:
            md5 = hashlib.md5(data)
            params["ContentMD5"] = _b64(md5.digest())
        response = self._call("put_object", **params)
        echoed = response.get("ChecksumSHA256")
        if echoed is not None:
            confirmed = echoed == checksum
            self._checks_sha256 = self._checks_sha256 or confirmed
        else:
            confirmed = _etag(response) == (md5 or hashlib.md5(data)).hexdigest()
        if not confirmed:
            self._forget(name)
            raise StorageError("the object store did not confirm the bytes it was sent")

    def _put_in_parts(self, name: str, key: str, stream: BinaryIO, size: int) -> str:
        """Multipart upload; returns the SHA-256 (hex) of what was stored."""
        upload = self._call("create_multipart_upload", Bucket=self.bucket, Key=name)
        upload_id = upload["UploadId"]
        digest = hashlib.sha256()
        parts: list[dict[str, Any]] = []
        md5s: list[bytes] = []
        written = 0
        try:
            while written < size:
                data = read_up_to(stream, min(self.part_size, size - written))
                if not data:
                    raise size_mismatch(key, size, written)
                digest.update(data)
                md5 = hashlib.md5(data)
                number = len(parts) + 1
                response = self._call(
                    "upload_part", Bucket=self.bucket, Key=name, UploadId=upload_id,
                    PartNumber=number, Body=data, ContentLength=len(data),
                    ContentMD5=_b64(md5.digest()))
                if _etag(response) != md5.hexdigest():
                    raise StorageError("the object store did not confirm a part it was sent")
                parts.append({"PartNumber": number, "ETag": response["ETag"]})
                md5s.append(md5.digest())
                written += len(data)
            if stream.read(1):
                raise size_mismatch(key, size, size + 1)
            response = self._call("complete_multipart_upload", Bucket=self.bucket, Key=name,
                                  UploadId=upload_id, MultipartUpload={"Parts": parts})
        except BaseException:
            try:
                self._call("abort_multipart_upload", Bucket=self.bucket, Key=name,
                           UploadId=upload_id)
            except (StorageError, KeyError):
                pass  # left for clear_partial_writes
            raise
        expected = f"{hashlib.md5(b''.join(md5s)).hexdigest()}-{len(parts)}"
        if _etag(response) != expected:
            self._forget(name)
            raise StorageError("the object store did not confirm the bytes it was sent")
        return digest.hexdigest()

    def _forget(self, name: str) -> None:
        try:
            self._call("delete_object", Bucket=self.bucket, Key=name)
        except StorageError:
            pass

    def open(self, key: str) -> BinaryIO:
        """The bytes under ``key`` as a seekable stream of ranged GETs; KeyError if absent."""
        return _ObjectReader(self, self._name(key), 0, None)  # type: ignore[return-value]  # file-like

    def open_range(self, key: str, start: int, length: int) -> BinaryIO:
        """``length`` bytes from offset ``start`` (fewer at the end), in one GET; ValueError
        for a negative start or length."""
        check_range(start, length)
        if length == 0:  # nothing to fetch, but an absent key is still a KeyError
            self._call("head_object", Bucket=self.bucket, Key=self._name(key))
        return _ObjectReader(self, self._name(key), start,  # type: ignore[return-value]  # file-like
                             start + length)

    def delete(self, key: str) -> None:
        """Remove ``key``; absent keys are ignored."""
        try:
            self._call("delete_object", Bucket=self.bucket, Key=self._name(key))
        except KeyError:
            return

    def keys(self, since: str = "") -> Iterator[str]:
        """Every stored key sorting at or after ``since`` (keys sort by creation minute)."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix}
        if since:
            params["StartAfter"] = self.prefix + since[:-1]
        while True:
            page = self._call("list_objects_v2", **params)
            for item in page.get("Contents", []):
                key = item["Key"][len(self.prefix):]
                if BLOB_KEY.match(key) and key >= since:
                    yield key
            if not page.get("IsTruncated"):
                return
            params["ContinuationToken"] = page["NextContinuationToken"]

    def clear_partial_writes(self) -> int:
        """Abort multipart uploads under the prefix that a crash left more than a day ago
        (younger ones may belong to another instance still writing); returns how many."""
        cutoff = datetime.now(UTC) - _ABANDONED_AFTER
        aborted = 0
        for upload in self._uploads():
            if upload["Initiated"] < cutoff:
                self._call("abort_multipart_upload", Bucket=self.bucket, Key=upload["Key"],
                           UploadId=upload["UploadId"])
                aborted += 1
        return aborted

    def _uploads(self) -> Iterator[dict[str, Any]]:
        """Every multipart upload in progress under the prefix, page after page (a page
        holds at most 1,000: those past the first were never cleared)."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix}
        while True:
            try:
                page = self._call("list_multipart_uploads", **params)
            except StorageError as exc:
                if isinstance(exc.__cause__, Exception) and _code(exc.__cause__) == (
                        "NoSuchUpload"):
                    return  # rclone serve s3's way of saying there are none
                raise
            yield from page.get("Uploads", []) or []
            key_marker = page.get("NextKeyMarker")
            upload_marker = page.get("NextUploadIdMarker")
            if not page.get("IsTruncated") or not (key_marker or upload_marker):
                return
            params["KeyMarker"] = key_marker or ""
            params["UploadIdMarker"] = upload_marker or ""


class _InvalidRange(Exception):
    """A range starting at or after the end of the object."""


class _ObjectReader(io.BufferedIOBase):
    """A seekable view of bytes ``[start, end)`` of one object (``end`` None: to its end).

    Positions are relative to ``start``. Each stretch read is one ranged GET held in memory
    (at most ``_MAX_WINDOW``, or what one read asks for); stretches grow while reads stay
    sequential. The first one is fetched at once, so that opening an absent object raises
    KeyError. (Not an ``io.BufferedReader``: pydicom would take that for a named file.)
    """

    def __init__(self, store: S3BlobStore, name: str, start: int, end: int | None) -> None:
        super().__init__()
        self._store = store
        self._name = name
        self._start = start
        self._length: int | None = None if end is None else max(0, end - start)
        self._pos = 0
        self._buf = b""
        self._buf_pos = 0  # the view position of the buffer's first byte
        self._window = _FIRST_WINDOW if self._length is None else max(1, self._length)
        self._fill(0, self._window)

    def _fill(self, pos: int, length: int) -> None:
        """Fetch ``length`` bytes at ``pos`` (clipped to the view) into the buffer."""
        from botocore.exceptions import BotoCoreError

        self._buf, self._buf_pos = b"", pos
        if self._length is not None:
            length = min(length, self._length - pos)
        if length <= 0:
            return
        first = self._start + pos
        try:
            response = self._store._call(
                "get_object", Bucket=self._store.bucket, Key=self._name,
                Range=f"bytes={first}-{first + length - 1}")
        except _InvalidRange:
            # Starting at or past the end: the object exists (else NoSuchKey); learn its size.
            self._clip(self._head_size())
            return
        content_range = str(response.get("ContentRange", ""))
        if "/" in content_range and content_range.rsplit("/", 1)[1].isdigit():
            self._clip(int(content_range.rsplit("/", 1)[1]))
        body = response["Body"]
        try:
            data = body.read()
        except BotoCoreError as exc:
            raise StorageError("the object store broke off a read") from exc
        finally:
            body.close()
        if len(data) != int(response["ContentLength"]):
            raise StorageError("the object store ended a read early")
        if not content_range:
            # A store that ignores Range answers 200 with the whole object: its bytes from 0,
            # not from ``first`` (taking them for the range served the wrong bytes).
            self._clip(len(data))
            data = data[first:first + length]
        self._buf = data

    def _head_size(self) -> int:
        head = self._store._call("head_object", Bucket=self._store.bucket, Key=self._name)
        return int(head["ContentLength"])

    def _clip(self, total: int) -> None:
        """Now that the object's size is known, bound the view by it."""
        available = max(0, total - self._start)
        self._length = available if self._length is None else min(self._length, available)

    def readable(self) -> bool:
        """Always true."""
        return True

    def seekable(self) -> bool:
        """Always true."""
        return True

    def tell(self) -> int:
        """The position within the view."""
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move within the view; nothing is fetched until the next read."""
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self._pos + offset
        else:
            if self._length is None:
                self._clip(self._head_size())
            target = (self._length or 0) + offset
        if target < 0:
            raise ValueError("negative seek position")
        self._pos = target
        return target

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes from the position (all the rest when negative)."""
        if self.closed:
            raise ValueError("read of a closed blob")
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(_MAX_WINDOW), b""))
        chunks = []
        while size > 0 and (self._length is None or self._pos < self._length):
            offset = self._pos - self._buf_pos
            if not 0 <= offset < len(self._buf):
                sequential = offset == len(self._buf) and bool(self._buf)
                self._window = min(self._window * 4, _MAX_WINDOW) if sequential else (
                    _FIRST_WINDOW)
                self._fill(self._pos, max(self._window, size))
                if not self._buf:
                    break
                offset = 0
            chunk = self._buf[offset:offset + size]
            chunks.append(chunk)
            self._pos += len(chunk)
            size -= len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def read1(self, size: int = -1) -> bytes:
        """As :meth:`read`."""
        return self.read(size)

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` from the position; returns the count (0 at the end)."""
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        """Let go of the buffer."""
        self._buf = b""
        super().close()
