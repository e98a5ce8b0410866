"""Blob store on an S3-compatible object store (boto3).

A put is acknowledged only after the object store confirmed it: small blobs go in one PUT
whose SHA-256 the store checks (``x-amz-checksum-sha256``) and echoes, or, on a store that
does not know that header, whose ETag must equal the MD5 of what was sent; large blobs go in
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
from imageshare.storage.blobs import BLOB_KEY, StoredBlob, check_key, size_mismatch

MiB = 1024 * 1024
_FIRST_WINDOW = 256 * 1024  # the first GET after opening or seeking
_MAX_WINDOW = 8 * MiB  # the longest GET while reading sequentially
_DRAIN = 256 * 1024  # unread bytes worth reading rather than dropping the connection
_ABANDONED_AFTER = timedelta(days=1)  # multipart uploads older than this were left by a crash
_ACCESS_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
                 "InvalidToken", "ExpiredToken"}


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _etag(response: dict[str, Any]) -> str:
    return str(response.get("ETag", "")).strip('"').lower()


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


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

    @classmethod
    def connect(cls, bucket: str, prefix: str, endpoint_url: str = "", **options: Any
                ) -> S3BlobStore:
        """A store on ``endpoint_url`` (empty: AWS), credentials and region from the standard
        ``AWS_*`` environment variables (or boto3's other usual sources)."""
        import boto3
        from botocore.config import Config

        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            retries={"mode": "standard", "max_attempts": 4},
            max_pool_connections=32, connect_timeout=5, read_timeout=60,
            # We send our own checksums; stores without the newer checksum headers still work.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url or None, config=config)
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
            data = _read_up_to(stream, size + 1)
            if len(data) != size:
                raise size_mismatch(key, size, len(data))
            digest = hashlib.sha256(data)
            self._put_whole(name, data, digest.digest())
            return StoredBlob(size, digest.hexdigest())
        return StoredBlob(size, self._put_in_parts(name, key, stream, size))

    def _put_whole(self, name: str, data: bytes, sha256: bytes) -> None:
        checksum = _b64(sha256)
        response = self._call("put_object", Bucket=self.bucket, Key=name, Body=data,
                              ContentLength=len(data), ChecksumSHA256=checksum)
        echoed = response.get("ChecksumSHA256")
        confirmed = (echoed == checksum if echoed is not None
                     else _etag(response) == hashlib.md5(data).hexdigest())
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
                data = _read_up_to(stream, min(self.part_size, size - written))
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
        return io.BufferedReader(_ObjectReader(self, self._name(key), 0, None),
                                 buffer_size=64 * 1024)  # type: ignore[return-value]

    def open_range(self, key: str, start: int, length: int) -> BinaryIO:
        """``length`` bytes from offset ``start`` (fewer at the end), in one GET."""
        return io.BufferedReader(_ObjectReader(self, self._name(key), start, start + length),
                                 buffer_size=64 * 1024)  # type: ignore[return-value]

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
        page = self._call("list_multipart_uploads", Bucket=self.bucket, Prefix=self.prefix)
        aborted = 0
        for upload in page.get("Uploads", []) or []:
            if upload["Initiated"] < cutoff:
                self._call("abort_multipart_upload", Bucket=self.bucket, Key=upload["Key"],
                           UploadId=upload["UploadId"])
                aborted += 1
        return aborted


class _InvalidRange(Exception):
    """A range starting at or after the end of the object."""


def _read_up_to(stream: BinaryIO, count: int) -> bytes:
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


class _ObjectReader(io.RawIOBase):
    """A seekable view of bytes ``[start, end)`` of one object (``end`` None: to its end).

    Positions are relative to ``start``. The first stretch is fetched at once, so that an
    absent object raises KeyError when it is opened.
    """

    def __init__(self, store: S3BlobStore, name: str, start: int, end: int | None) -> None:
        self._store = store
        self._name = name
        self._start = start
        self._end = end
        self._pos = 0
        self._body: Any = None
        self._body_pos = 0  # the position the body's next byte belongs to
        self._body_end = 0
        self._window = _FIRST_WINDOW if end is None else max(1, end - start)
        self._length: int | None = None if end is None else max(0, end - start)
        self._fetch(0, self._window)

    def _fetch(self, pos: int, length: int) -> None:
        """Start a ranged GET of ``length`` bytes at ``pos`` (clipped to the view)."""
        if self._length is not None:
            length = min(length, self._length - pos)
        if length <= 0:
            self._body = None
            return
        first = self._start + pos
        try:
            response = self._store._call(
                "get_object", Bucket=self._store.bucket, Key=self._name,
                Range=f"bytes={first}-{first + length - 1}")
        except _InvalidRange:
            # Starting at or past the end: the object exists (else NoSuchKey); learn its size.
            head = self._store._call("head_object", Bucket=self._store.bucket, Key=self._name)
            total = int(head["ContentLength"])
            self._clip(total)
            self._body = None
            return
        content_range = str(response.get("ContentRange", ""))
        if "/" in content_range and content_range.rsplit("/", 1)[1].isdigit():
            self._clip(int(content_range.rsplit("/", 1)[1]))
        self._body = response["Body"]
        self._body_pos = pos
        self._body_end = pos + int(response["ContentLength"])

    def _clip(self, total: int) -> None:
        """Now that the object's size is known, bound the view by it."""
        available = max(0, total - self._start)
        self._length = available if self._length is None else min(self._length, available)

    def _drop(self) -> None:
        if self._body is None:
            return
        from botocore.exceptions import BotoCoreError

        body, self._body = self._body, None
        try:
            if 0 < self._body_end - self._body_pos <= _DRAIN:
                body.read()  # cheaper than a new connection
        except BotoCoreError:
            pass  # the connection is dropped below
        finally:
            body.close()

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
                head = self._store._call("head_object", Bucket=self._store.bucket,
                                         Key=self._name)
                self._clip(int(head["ContentLength"]))
            target = (self._length or 0) + offset
        if target < 0:
            raise ValueError("negative seek position")
        self._pos = target
        return target

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        """Fill ``buffer`` from the current position; 0 at the end of the view."""
        if self._length is not None and self._pos >= self._length:
            return 0
        if self._body is None or self._body_pos != self._pos or self._body_pos >= self._body_end:
            sequential = self._body is not None and self._body_pos == self._pos
            self._drop()
            self._window = min(self._window * 4, _MAX_WINDOW) if sequential else _FIRST_WINDOW
            self._fetch(self._pos, max(self._window, len(buffer)))
            if self._body is None:
                return 0
        from botocore.exceptions import BotoCoreError

        try:
            data = self._body.read(min(len(buffer), self._body_end - self._body_pos))
        except BotoCoreError as exc:
            raise StorageError("the object store broke off a read") from exc
        if not data:
            raise StorageError("the object store ended a read early")
        buffer[: len(data)] = data
        self._pos += len(data)
        self._body_pos += len(data)
        return len(data)

    def readall(self) -> bytes:
        """Everything from the position to the end of the view, in large reads."""
        chunks = []
        while chunk := self.read(MiB):
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        """Release the connection."""
        if not self.closed:
            self._drop()
        super().close()
