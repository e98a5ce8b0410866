"""One contract for every blob store: the file store, the file store encrypted at rest, and
S3 on two real servers (SeaweedFS, which checks and echoes SHA-256 checksums, and ``rclone
serve s3``, which confirms by an MD5 ETag).

Each test runs on each; S3-only tests at the end check what only an object store can get
wrong (credentials, an unreachable endpoint, a write the store did not confirm).
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from imageshare.domain.errors import ConfigurationError, StorageError
from imageshare.storage.blobs import (
    LocalBlobs,
    StoredBlob,
    key_prefix_for,
    local_copy,
    new_blob_key,
    open_blob_store,
    store_file,
)
from imageshare.storage.encrypted import EncryptedBlobStore, blob_master_key
from imageshare.storage.files import FileBlobStore
from imageshare.storage.s3 import MiB, S3BlobStore
from tests.peers import free_port
from tests.s3_server import BUCKET

pytestmark = pytest.mark.interop


@pytest.fixture(params=["seaweedfs", "rclone"])
def object_server(request):
    """Each real S3 server (started once per session)."""
    return request.getfixturevalue("s3_server" if request.param == "seaweedfs"
                                   else "rclone_s3_server")


@pytest.fixture(params=["file", "encrypted", "s3-seaweedfs", "s3-rclone"])
def store(request, tmp_path):
    """An empty store of each kind; S3 stores go to parts above 5 MiB, to test them cheaply."""
    if request.param == "file":
        return FileBlobStore(tmp_path / "blobs")
    if request.param == "encrypted":
        return EncryptedBlobStore(FileBlobStore(tmp_path / "blobs"),
                                  blob_master_key(os.urandom(32)))
    server = request.getfixturevalue("s3_server" if request.param == "s3-seaweedfs"
                                     else "rclone_s3_server")
    return S3BlobStore(server.client(), BUCKET, server.new_prefix(), where=server.endpoint,
                       part_size=5 * MiB, multipart_threshold=5 * MiB)


def put_bytes(store, data: bytes, key: str | None = None) -> tuple[str, StoredBlob]:
    key = key or new_blob_key()
    return key, store.put(key, io.BytesIO(data), len(data))


def test_a_put_blob_reads_back_identical_with_its_size_and_sha256(store):
    data = os.urandom(3 * MiB + 17)
    key, stored = put_bytes(store, data)
    assert stored == StoredBlob(len(data), hashlib.sha256(data).hexdigest())
    with store.open(key) as fh:
        assert fh.read() == data


def test_a_large_blob_streams_in_parts_and_reads_back_identical(store):
    data = os.urandom(12 * MiB + 5)  # three parts on S3 (5 + 5 + 2 MiB)
    key, stored = put_bytes(store, data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    with store.open(key) as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == stored.sha256


def test_an_empty_blob_is_a_blob(store):
    key, stored = put_bytes(store, b"")
    assert stored == StoredBlob(0, hashlib.sha256(b"").hexdigest())
    with store.open(key) as fh:
        assert fh.read() == b""
    with store.open_range(key, 0, 10) as fh:
        assert fh.read() == b""


@pytest.mark.parametrize("actual", [999, 1001, 6 * MiB - 1, 6 * MiB + 1])
def test_a_stream_shorter_or_longer_than_announced_stores_nothing(store, actual):
    announced = 1000 if actual < 2000 else 6 * MiB
    with pytest.raises(StorageError, match="bytes than the"):
        store.put(new_blob_key(), io.BytesIO(os.urandom(actual)), announced)
    assert list(store.keys()) == []


def test_byte_ranges_and_seeks_read_only_what_is_asked(store):
    data = os.urandom(2 * MiB)
    key, _ = put_bytes(store, data)
    with store.open_range(key, 1000, 5000) as fh:
        assert fh.read() == data[1000:6000]
    with store.open_range(key, len(data) - 10, 100) as fh:
        assert fh.read() == data[-10:]  # fewer at the end
    with store.open_range(key, len(data) + 5, 100) as fh:
        assert fh.read() == b""
    with store.open(key) as fh:
        assert fh.seekable()
        assert fh.seek(0, io.SEEK_END) == len(data)
        fh.seek(1_500_000)
        assert fh.read(10) == data[1_500_000:1_500_010]
        assert fh.tell() == 1_500_010
        fh.seek(-20, io.SEEK_CUR)
        assert fh.read(20) == data[1_499_990:1_500_010]
        fh.seek(10)
        assert fh.read(100) == data[10:110]
        assert fh.read() == data[110:]


def test_absent_keys_are_key_errors_and_deleting_twice_is_fine(store):
    key, _ = put_bytes(store, b"data")
    store.delete(key)
    store.delete(key)
    with pytest.raises(KeyError):
        store.open(key)
    with pytest.raises(KeyError):
        store.open_range(key, 0, 4)
    assert list(store.keys()) == []


def test_keys_lists_what_was_made_since_a_moment(store):
    old = key_prefix_for(1_700_000_000) + "a" * 24
    new = [new_blob_key() for _ in range(3)]
    for key in [old, *new]:
        put_bytes(store, b"x", key)
    assert set(store.keys()) == {old, *new}
    assert set(store.keys(new[0][:8])) == set(new)


def test_keys_that_could_leave_the_store_are_refused(store):
    for bad in ("../../etc/passwd", "ABCDEF0123", "a/b" * 5, ""):
        with pytest.raises(ValueError):
            store.open(bad)
        with pytest.raises(ValueError):
            store.put(bad, io.BytesIO(b"x"), 1)


def test_concurrent_puts_all_land(store):
    blobs = {new_blob_key(): os.urandom(100_000) for _ in range(24)}
    errors: list[BaseException] = []

    def put(key: str, data: bytes) -> None:
        try:
            put_bytes(store, data, key)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=put, args=item) for item in blobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for key, data in blobs.items():
        with store.open(key) as fh:
            assert fh.read() == data


def test_clearing_partial_writes_leaves_stored_blobs_alone(store):
    key, _ = put_bytes(store, b"kept")
    assert store.clear_partial_writes() == 0  # what start-up runs before recovery
    with store.open(key) as fh:
        assert fh.read() == b"kept"


def test_local_paths_are_an_optional_capability_with_one_fallback(store, tmp_path):
    data = os.urandom(70_000)
    key, _ = put_bytes(store, data)
    scratch = tmp_path / "scratch"
    with local_copy(store, key, scratch) as path:
        assert path.read_bytes() == data
    assert isinstance(store, LocalBlobs) == isinstance(store, FileBlobStore)
    assert not scratch.exists() or list(scratch.iterdir()) == []  # temporary copies go


def test_storing_a_local_file_moves_it_in(store, tmp_path):
    source = tmp_path / "incoming.dcm"
    data = os.urandom(50_000)
    source.write_bytes(data)
    key = new_blob_key()
    assert store_file(store, key, source) == StoredBlob(len(data),
                                                        hashlib.sha256(data).hexdigest())
    assert not source.exists()
    with store.open(key) as fh:
        assert fh.read() == data


# -- what only an object store can get wrong -----------------------------------------------


def _url(server) -> str:
    return server.storage_url()


def test_s3_store_is_chosen_by_url_and_checked_at_start(object_server, monkeypatch):
    for name, value in object_server.env().items():
        monkeypatch.setenv(name, value)
    store = open_blob_store(_url(object_server), object_server.endpoint)
    assert isinstance(store, S3BlobStore)
    key, stored = put_bytes(store, b"hello")
    with store.open(key) as fh:
        assert fh.read() == b"hello"


def test_a_wrong_secret_is_refused_at_start_with_the_reason(object_server, monkeypatch):
    for name, value in object_server.env(secret="not-the-secret").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match="refused access.*AWS_SECRET_ACCESS_KEY"):
        open_blob_store(_url(object_server), object_server.endpoint)


def test_a_missing_bucket_is_named_at_start(object_server, monkeypatch):
    for name, value in object_server.env().items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match="'no-such-bucket' does not exist"):
        open_blob_store("s3://no-such-bucket/x", object_server.endpoint)


def test_an_unreachable_endpoint_is_named_at_start(object_server, monkeypatch):
    for name, value in object_server.env().items():
        monkeypatch.setenv(name, value)
    nobody = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigurationError, match="cannot be reached.*S3_ENDPOINT_URL"):
        open_blob_store(f"s3://{BUCKET}/x", nobody)


class _CorruptingClient:
    """The real client, but the bytes of every upload are changed on the way (after their
    checksums were computed), as a broken network or proxy would."""

    def __init__(self, client) -> None:
        self._client = client

    def __getattr__(self, name):
        return getattr(self._client, name)

    def _flip(self, body: bytes) -> bytes:
        return bytes([body[0] ^ 1]) + body[1:]

    def put_object(self, **params):
        return self._client.put_object(**{**params, "Body": self._flip(params["Body"])})

    def upload_part(self, **params):
        return self._client.upload_part(**{**params, "Body": self._flip(params["Body"])})


@pytest.mark.parametrize("size", [100_000, 6 * MiB])
def test_bytes_changed_in_transit_are_refused_by_the_store_and_never_acknowledged(
        object_server, size):
    store = S3BlobStore(_CorruptingClient(object_server.client()), BUCKET,
                        object_server.new_prefix(), part_size=5 * MiB,
                        multipart_threshold=5 * MiB)
    # SeaweedFS checks the SHA-256; rclone ignores that header but checks the Content-MD5 sent
    # with it: both refuse the body, so nothing is kept that start-up recovery could index.
    with pytest.raises(StorageError, match="BadDigest"):
        put_bytes(store, os.urandom(size))
    assert list(store.keys()) == []
    assert open_uploads(object_server, store.prefix) == []  # an abandoned upload is aborted


def open_uploads(server, prefix: str) -> list:
    """The multipart uploads in progress under ``prefix`` (rclone says NoSuchUpload for none)."""
    try:
        return server.client().list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get(
            "Uploads") or []
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "NoSuchUpload":
            return []
        raise


def test_file_store_blobs_are_files_under_its_root(tmp_path):
    store = FileBlobStore(tmp_path / "blobs")
    key, _ = put_bytes(store, b"abc")
    path = store.local_path(key)
    assert Path(path).read_bytes() == b"abc" and tmp_path in path.parents
