"""Red team of session 33 against the blob stores, encryption at rest and backup / restore.

Each test was written to fail against the code before its fix: a blob key with a trailing
newline, byte ranges that start before the blob, an object store that ignores Range, abandoned
multipart uploads past the first page, a manifest that names another index than the one
restored, an unsigned manifest, plaintext restored into an encrypting store, a restore that
stops half-way, and backups that run out of disk.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import sqlite3
from collections import namedtuple
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from imageshare.domain.actors import cli_actor
from imageshare.domain.errors import ImageShareError, OutOfResources, StorageError
from imageshare.storage import backup as backup_module
from imageshare.storage.backup import backup, restore
from imageshare.storage.blobs import StoredBlob, check_key, new_blob_key
from imageshare.storage.encrypted import MAGIC, EncryptedBlobStore, blob_master_key
from imageshare.storage.files import FileBlobStore
from imageshare.storage.index.database import make_engine
from imageshare.storage.s3 import S3BlobStore
from tests.conftest import make_archive
from tests.factory import ct_series

ACTOR = cli_actor()
KEY = b"k" * 40


# -- keys and ranges ---------------------------------------------------------------------------


def test_a_blob_key_with_a_trailing_newline_is_refused(tmp_path):
    """``$`` matches before a final newline: ``"deadbeef\\n"`` passed as a blob key, named a
    file with a newline in the store and an object key no other store would list alike."""
    with pytest.raises(ValueError):
        check_key("deadbeef\n")
    store = FileBlobStore(tmp_path / "blobs")
    with pytest.raises(ValueError):
        store.put("deadbeef01\n", io.BytesIO(b"x"), 1)
    assert list(store.keys()) == []


def _stores(tmp_path: Path) -> Iterator[tuple[str, Any, str]]:
    data = bytes(range(256)) * 1000
    plain = FileBlobStore(tmp_path / "plain")
    sealed = EncryptedBlobStore(FileBlobStore(tmp_path / "sealed"), blob_master_key(KEY))
    for name, store in (("file", plain), ("encrypted", sealed)):
        key = new_blob_key()
        store.put(key, io.BytesIO(data), len(data))
        yield name, store, key
    # The range is refused before the object store is asked anything.
    yield "s3", S3BlobStore(None, "bucket"), new_blob_key()


@pytest.mark.parametrize(("start", "length"), [(-10, 5), (0, -1)])
def test_a_byte_range_before_the_blob_is_refused_alike_by_every_store(tmp_path, start, length):
    """A negative start read from offset 0 on the encrypted store (the wrong bytes, silently),
    failed in the operating system on the file store (leaving the file open) and went to an
    object store as a malformed Range header."""
    for name, store, key in _stores(tmp_path):
        with pytest.raises(ValueError):
            store.open_range(key, start, length)
        assert name  # every kind was tried


class _Body:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def read(self) -> bytes:
        return self._data

    def close(self) -> None:
        return None


class _RangeIgnoringClient:
    """An S3-compatible store that answers every GET with the whole object (200, no
    Content-Range), as a store without Range support does."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def get_object(self, Bucket: str, Key: str, Range: str = "") -> dict[str, Any]:  # noqa: N803
        data = self.objects[Key]
        return {"Body": _Body(data), "ContentLength": len(data)}


def test_an_object_store_that_ignores_range_still_serves_the_bytes_asked_for():
    data = bytes(range(256)) * 4096  # 1 MiB: longer than the first window
    key = new_blob_key()
    store = S3BlobStore(_RangeIgnoringClient({f"p/{key}": data}), "bucket", "p")
    with store.open_range(key, 1000, 300) as fh:
        assert fh.read() == data[1000:1300]
    with store.open(key) as fh:
        fh.seek(600_000)
        assert fh.read(10) == data[600_000:600_010]
        fh.seek(0)
        assert hashlib.sha256(fh.read()).hexdigest() == hashlib.sha256(data).hexdigest()


class _ManyUploadsClient:
    """A store with 1,500 abandoned multipart uploads, listed 1,000 a page."""

    def __init__(self) -> None:
        old = datetime.now(UTC) - timedelta(days=3)
        self.uploads = [{"Key": f"p/{n:08x}", "UploadId": f"u{n}", "Initiated": old}
                        for n in range(1500)]
        self.aborted: list[str] = []

    def list_multipart_uploads(self, Bucket: str, Prefix: str, KeyMarker: str = "",  # noqa: N803
                               UploadIdMarker: str = "") -> dict[str, Any]:  # noqa: N803
        start = 0
        if UploadIdMarker:
            start = next(i for i, u in enumerate(self.uploads)
                         if u["UploadId"] == UploadIdMarker) + 1
        page = self.uploads[start:start + 1000]
        more = start + 1000 < len(self.uploads)
        return {"Uploads": page, "IsTruncated": more,
                **({"NextKeyMarker": page[-1]["Key"],
                    "NextUploadIdMarker": page[-1]["UploadId"]} if more else {})}

    def abort_multipart_upload(self, Bucket: str, Key: str, UploadId: str) -> dict[str, Any]:  # noqa: N803
        self.aborted.append(UploadId)
        return {}


def test_abandoned_multipart_uploads_past_the_first_page_are_cleared():
    client = _ManyUploadsClient()
    assert S3BlobStore(client, "bucket", "p").clear_partial_writes() == 1500
    assert len(set(client.aborted)) == 1500


# -- backup and restore ------------------------------------------------------------------------


def _source(tmp_path: Path, count: int = 3) -> Any:
    archive = make_archive(tmp_path / "src")
    for path in ct_series(tmp_path / "series", count, patient_id="RT33"):
        archive.ingest.store_copy(path, ACTOR)
    return archive


def _backed_up(tmp_path: Path, manifest_key: bytes | None = None) -> Path:
    source = _source(tmp_path)
    try:
        signing: dict[str, Any] = {} if manifest_key is None else {"manifest_key": manifest_key}
        assert backup(source.engine, source.blobs, tmp_path / "backup", **signing).complete
    finally:
        source.close()
    return tmp_path / "backup"


def _snapshot(folder: Path) -> Path:
    return folder / "snapshots" / (folder / "LATEST").read_text().strip()


def _target(tmp_path: Path, name: str = "new") -> str:
    return f"sqlite:///{tmp_path / name / 'index.sqlite'}"


def test_a_manifest_naming_another_index_file_than_the_one_restored_is_refused(tmp_path):
    """The digest and the audit trail were checked on the file the manifest names, and the
    restore then copied ``index.sqlite`` whatever it held: an intact decoy named in the
    manifest let an edited index through unchecked."""
    from imageshare.audit.chain import chain_problems

    folder = _backed_up(tmp_path)
    snapshot = _snapshot(folder)
    shutil.copyfile(snapshot / "index.sqlite", snapshot / "decoy.sqlite")
    with sqlite3.connect(snapshot / "index.sqlite") as db:
        db.execute("DELETE FROM audit_events WHERE seq = (SELECT max(seq) FROM audit_events)")
    db.close()
    manifest = json.loads((snapshot / "manifest.json").read_text())
    manifest["index"]["file"] = "decoy.sqlite"  # its digest is the genuine one
    (snapshot / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ImageShareError):
        restore(folder, _target(tmp_path), FileBlobStore(tmp_path / "new" / "blobs"),
                trail_problems=chain_problems)
    assert not (tmp_path / "new" / "index.sqlite").exists()


def test_a_signed_manifest_restores_and_refuses_edits_another_key_and_no_signature(tmp_path):
    """The manifest's digests are not secret, so someone who can write the backup can swap
    a blob and rewrite the digests. Signed with a key derived from the installation key,
    the manifest binds index, blob lists and heads to the installation that wrote them."""
    folder = _backed_up(tmp_path, manifest_key=KEY)
    snapshot = _snapshot(folder)
    manifest_file = snapshot / "manifest.json"
    genuine = manifest_file.read_text()
    assert "signature" in json.loads(genuine)

    # Swap a blob for another of the same size and rewrite every digest to match.
    listing = [json.loads(line) for line in (snapshot / "blobs.jsonl").read_text().splitlines()]
    victim = listing[0]
    path = folder / "blobs" / victim["key"][:4] / victim["key"][4:8] / victim["key"]
    forged = b"\0" * path.stat().st_size
    path.write_bytes(forged)
    victim["sha256"] = hashlib.sha256(forged).hexdigest()
    text = "".join(json.dumps(item) + "\n" for item in listing)
    (snapshot / "blobs.jsonl").write_text(text)
    edited = json.loads(genuine)
    edited["blobs"]["sha256"] = hashlib.sha256(text.encode()).hexdigest()
    manifest_file.write_text(json.dumps(edited))
    with pytest.raises(ImageShareError, match="signature"):
        restore(folder, _target(tmp_path, "a"), FileBlobStore(tmp_path / "a" / "blobs"),
                manifest_key=KEY)
    assert not (tmp_path / "a" / "index.sqlite").exists()

    del edited["signature"]
    manifest_file.write_text(json.dumps(edited))
    with pytest.raises(ImageShareError, match="not signed"):
        restore(folder, _target(tmp_path, "b"), FileBlobStore(tmp_path / "b" / "blobs"),
                manifest_key=KEY)

    # The genuine backup: refused under another key, restored under its own.
    shutil.rmtree(folder)
    folder = _backed_up(tmp_path / "again", manifest_key=KEY)
    with pytest.raises(ImageShareError, match="signature"):
        restore(folder, _target(tmp_path, "c"), FileBlobStore(tmp_path / "c" / "blobs"),
                manifest_key=b"another key" * 4)
    report = restore(folder, _target(tmp_path, "d"), FileBlobStore(tmp_path / "d" / "blobs"),
                     manifest_key=KEY)
    assert report.blobs == 3


def test_a_plain_backup_restored_into_an_encrypting_store_is_sealed(tmp_path):
    """Blobs of a backup taken before encryption was enabled went into an encrypting store
    as they were: readable images on the disk of an installation that encrypts at rest."""
    folder = _backed_up(tmp_path)
    inner = FileBlobStore(tmp_path / "new" / "blobs")
    target = EncryptedBlobStore(inner, blob_master_key(KEY))
    restore(folder, _target(tmp_path), target)
    keys = list(inner.keys())
    assert len(keys) == 3
    for key in keys:
        raw = (tmp_path / "new" / "blobs" / key[:4] / key[4:8] / key).read_bytes()
        assert raw.startswith(MAGIC), "a restored blob is plaintext on disk"
        backed = (folder / "blobs" / key[:4] / key[4:8] / key).read_bytes()
        with target.open(key) as fh:
            assert fh.read() == backed


class _StopsAfter:
    """A blob store that fails (an object store gone, a full disk) after ``count`` puts."""

    def __init__(self, inner: FileBlobStore, count: int) -> None:
        self.inner = inner
        self.left = count

    def put(self, key: str, stream: BinaryIO, size: int) -> StoredBlob:
        if self.left <= 0:
            raise StorageError("the object store cannot be reached")
        self.left -= 1
        return self.inner.put(key, stream, size)

    def open(self, key: str) -> BinaryIO:
        return self.inner.open(key)

    def open_range(self, key: str, start: int, length: int) -> BinaryIO:
        return self.inner.open_range(key, start, length)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def keys(self, since: str = "") -> Iterator[str]:
        return self.inner.keys(since)


def test_a_restore_that_stops_half_way_leaves_no_index_and_can_run_again(tmp_path):
    """The index was put in place before the blobs: a restore that stopped after it left an
    installation whose index names blobs that are not there, and refused to run again
    ("already holds an index")."""
    folder = _backed_up(tmp_path)
    blobs = FileBlobStore(tmp_path / "new" / "blobs")
    with pytest.raises(StorageError):
        restore(folder, _target(tmp_path), _StopsAfter(blobs, 1))
    assert not (tmp_path / "new" / "index.sqlite").exists()
    report = restore(folder, _target(tmp_path), blobs)
    assert report.blobs == 3
    engine = make_engine(_target(tmp_path))
    try:
        from sqlalchemy import select

        from imageshare.storage.index.schema import instances

        with engine.connect() as conn:
            keys = set(conn.execute(select(instances.c.blob_key)).scalars())
    finally:
        engine.dispose()
    assert keys == set(blobs.keys())


Usage = namedtuple("Usage", "total used free")


def test_a_backup_without_the_free_space_it_needs_is_refused_before_copying(tmp_path,
                                                                            monkeypatch):
    source = _source(tmp_path)
    dest = tmp_path / "backup"
    try:
        monkeypatch.setattr(backup_module.shutil, "disk_usage", lambda _p: Usage(1, 1, 0))
        with pytest.raises(OutOfResources, match="free"):
            backup(source.engine, source.blobs, dest)
        assert not (dest / "LATEST").exists()
        assert not (dest / "snapshots").exists()

        # Room for the index (counted as nothing here) but not for the blobs: refused after
        # the copy of the index, and that copy is not left behind.
        monkeypatch.setattr(backup_module, "_index_bytes", lambda _engine: 0)
        room = backup_module.SPARE_BYTES + 1
        monkeypatch.setattr(backup_module.shutil, "disk_usage",
                            lambda _p: Usage(room, 0, room))
        with pytest.raises(OutOfResources, match="blob"):
            backup(source.engine, source.blobs, dest)
        assert not (dest / "LATEST").exists()
        assert list((dest / "snapshots").iterdir()) == []
        assert not (dest / "blobs").exists()
    finally:
        source.close()


class _DiskFillsUp:
    """A store whose third blob cannot be read to the end (the backup disk filled up)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.opened = 0

    def open(self, key: str) -> BinaryIO:
        self.opened += 1
        fh = self.inner.open(key)
        if self.opened < 3:
            return fh
        fh.close()

        class Full(io.RawIOBase):
            def readable(self) -> bool:
                return True

            def readinto(self, _buffer: Any) -> int:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return io.BufferedReader(Full())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_backup_that_fails_half_way_leaves_no_snapshot_and_no_partial_file(tmp_path):
    """A disk that filled up mid-copy left a snapshot folder without a manifest and a
    ``.part`` file of a blob in the backup, and came out of the command as a traceback."""
    source = _source(tmp_path)
    dest = tmp_path / "backup"
    try:
        with pytest.raises(StorageError, match="No space left"):
            backup(source.engine, _DiskFillsUp(source.blobs), dest)
    finally:
        source.close()
    assert list((dest / "snapshots").iterdir()) == []
    assert [p for p in dest.rglob("*.part")] == []
    assert not (dest / "LATEST").exists()


def test_a_snapshot_name_that_leaves_the_backup_is_refused(tmp_path):
    """``LATEST`` (or ``--snapshot``) naming ``../elsewhere`` read a manifest, an index and
    blob lists from outside the backup's snapshots."""
    folder = _backed_up(tmp_path)
    outside = tmp_path / "elsewhere"
    shutil.copytree(_snapshot(folder), outside)
    (folder / "LATEST").write_text("../../elsewhere\n")
    with pytest.raises(ImageShareError, match="not the name of a snapshot"):
        restore(folder, _target(tmp_path), FileBlobStore(tmp_path / "new" / "blobs"))
    assert not (tmp_path / "new" / "index.sqlite").exists()


class _EmptyBucket:
    """An object store holding nothing."""

    def head_object(self, Bucket: str, Key: str) -> dict[str, Any]:  # noqa: N803
        from botocore.exceptions import ClientError

        raise ClientError({"Error": {"Code": "404"}}, "HeadObject")

    def get_object(self, Bucket: str, Key: str, Range: str = "") -> dict[str, Any]:  # noqa: N803
        from botocore.exceptions import ClientError

        raise ClientError({"Error": {"Code": "NoSuchKey"}}, "GetObject")


def test_an_empty_range_of_an_absent_object_is_a_key_error_as_in_the_file_store(tmp_path):
    with pytest.raises(KeyError):
        FileBlobStore(tmp_path / "blobs").open_range(new_blob_key(), 0, 0)
    with pytest.raises(KeyError):
        S3BlobStore(_EmptyBucket(), "bucket").open_range(new_blob_key(), 0, 0)


# -- the installation key --------------------------------------------------------------------


def test_a_second_process_starting_while_the_key_file_is_made_reads_a_whole_key(
        tmp_path, monkeypatch):
    """The key file was created empty and then written: a second process starting at that
    moment (two instances, or `serve` beside a CLI command) read an empty key file and
    failed, and a crash there left an empty key file that stopped every later start."""
    from cryptography.fernet import Fernet

    from imageshare.storage import secret_box

    key_file = tmp_path / "data" / "secret-key"
    other: list[bytes] = []
    calls: list[int] = []
    real = Fernet.generate_key

    def generate() -> bytes:
        calls.append(1)
        if len(calls) == 1:  # the other process starts at this very moment
            other.append(secret_box.load_secret_key("", key_file))
        return real()

    monkeypatch.setattr(secret_box.Fernet, "generate_key", staticmethod(generate))
    mine = secret_box.load_secret_key("", key_file)
    assert other == [mine]
    assert [p.name for p in key_file.parent.iterdir()] == ["secret-key"]


def test_the_key_files_name_is_durable_before_the_key_is_used(tmp_path, monkeypatch):
    """Only the file's data was fsynced, not its folder: after a power loss the key file
    could be gone while blobs sealed with its key were on disk."""
    import stat

    from imageshare.storage import secret_box

    synced: list[tuple[int, int]] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            synced.append((info.st_dev, info.st_ino))
        real(fd)

    monkeypatch.setattr(secret_box.os, "fsync", fsync)
    key_file = tmp_path / "data" / "secret-key"
    secret_box.load_secret_key("", key_file)
    folder = os.stat(key_file.parent)
    assert (folder.st_dev, folder.st_ino) in synced
    assert key_file.stat().st_mode & 0o777 == 0o600


# -- encryption at rest ------------------------------------------------------------------------


def test_a_sealed_blob_cut_inside_its_header_is_refused_not_served_as_plaintext(tmp_path):
    """A sealed blob shorter than its header was taken for one stored before encryption and
    served as it was: the magic bytes and part of the salt, as if they were the image."""
    inner = FileBlobStore(tmp_path / "blobs")
    store = EncryptedBlobStore(inner, blob_master_key(KEY))
    key = new_blob_key()
    data = os.urandom(5000)
    store.put(key, io.BytesIO(data), len(data))
    path = tmp_path / "blobs" / key[:4] / key[4:8] / key
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(StorageError, match="truncated"):
        store.open(key)
    with pytest.raises(StorageError), open(path, "rb") as fh:
        store.digest_of_stored(key, fh)


def test_a_local_copy_kept_for_later_is_on_disk_before_it_takes_its_name(tmp_path,
                                                                        monkeypatch):
    """``copy_to_file`` renamed its temporary file without an fsync: after a power loss a
    lasting copy (the local copy of an instance of a store that is not local) could be
    there under its name, empty or cut short, and was served as it was from then on."""
    from imageshare.storage import blobs as blobs_module

    store = EncryptedBlobStore(FileBlobStore(tmp_path / "blobs"), blob_master_key(KEY))
    key = new_blob_key()
    data = os.urandom(3000)
    store.put(key, io.BytesIO(data), len(data))
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(blobs_module.os, "fsync", fsync)
    monkeypatch.setattr(blobs_module.os, "replace", replace)
    target = tmp_path / "copies" / "instance.dcm"
    blobs_module.copy_to_file(store, key, target)
    assert target.read_bytes() == data
    assert events[-2:] == ["fsync", "replace"]


def test_a_postgresql_restore_refused_for_its_audit_trail_takes_its_blobs_out_again(
        tmp_path, postgres):
    """On PostgreSQL the dump's trail can be checked only once restored, now after the blobs
    (written first, so that no index names a blob that is not there): a refused index must
    not leave its blobs in the target store."""
    source = make_archive(tmp_path / "src", postgres.new_database())
    try:
        for path in ct_series(tmp_path / "series", 2, patient_id="PG33"):
            source.ingest.store_copy(path, ACTOR)
        assert backup(source.engine, source.blobs, tmp_path / "backup").complete
    finally:
        source.close()
    target = FileBlobStore(tmp_path / "new" / "blobs")
    with pytest.raises(ImageShareError, match="audit trail"):
        restore(tmp_path / "backup", postgres.new_database(), target,
                trail_problems=lambda _engine: ["row 3 was edited"])
    assert list(target.keys()) == []


def test_seeking_before_the_start_of_a_sealed_blob_is_an_error_as_in_the_other_stores(
        tmp_path):
    store = EncryptedBlobStore(FileBlobStore(tmp_path / "blobs"), blob_master_key(KEY))
    key = new_blob_key()
    data = os.urandom(3000)
    store.put(key, io.BytesIO(data), len(data))
    with store.open(key) as fh:
        fh.seek(100)
        with pytest.raises(ValueError):
            fh.seek(-200, io.SEEK_CUR)
        assert fh.tell() == 100
        assert fh.read(10) == data[100:110]
