"""Red team of session 35 against encryption at rest, as an operator and failing hardware
would meet it: an installation started with the wrong secret key (or with its key file lost,
which made a new one), plaintext planted in an encrypting store, the operator's migration that
seals the blobs written before encryption (so that the store can refuse plaintext), and a key
rotation; and the job queue after the clock was set back, or given parameters it cannot
read.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from imageshare.domain.actors import cli_actor
from imageshare.domain.errors import ConfigurationError, StorageError
from imageshare.storage.backup import backup
from imageshare.storage.blobs import new_blob_key
from imageshare.storage.encrypted import (
    MAGIC,
    EncryptedBlobStore,
    blob_master_key,
    seal_plaintext_blobs,
)
from imageshare.storage.files import FileBlobStore
from imageshare.storage.index.database import make_engine
from imageshare.storage.index.schema import background_jobs
from tests.conftest import make_archive
from tests.factory import ct_series
from tests.unit.test_job_queue import _queue, _wait, engine  # noqa: F401 - the fixture

OLD = blob_master_key(b"o" * 40)
NEW = blob_master_key(b"n" * 40)


def _read(store: EncryptedBlobStore, key: str) -> bytes:
    with store.open(key) as fh:
        return fh.read()


def _put(store: FileBlobStore | EncryptedBlobStore, data: bytes) -> str:
    key = new_blob_key()
    store.put(key, io.BytesIO(data), len(data))
    return key


# -- the wrong key ------------------------------------------------------------------------------


def test_an_archive_started_with_another_secret_key_is_refused_at_start(tmp_path):
    """It started, and every image then failed as "altered, truncated or reordered on disk":
    the operator was sent looking for a damaged disk, and new images were sealed under the
    wrong key beside the old ones."""
    first = make_archive(tmp_path, encrypt_blobs=True, secret_key="a" * 40)
    first.ingest.store_copy(ct_series(tmp_path / "ct", 1)[0], cli_actor())
    first.close()
    with pytest.raises(ConfigurationError, match="do not open with this secret key"):
        make_archive(tmp_path, encrypt_blobs=True, secret_key="b" * 40)
    again = make_archive(tmp_path, encrypt_blobs=True, secret_key="a" * 40)
    again.close()


def test_an_archive_whose_key_file_was_lost_is_refused_at_start(tmp_path):
    """A key file that is not found is made anew: the images sealed under the old one were
    then served as damaged, one by one, instead of the start saying the key is wrong."""
    first = make_archive(tmp_path, encrypt_blobs=True)
    first.ingest.store_copy(ct_series(tmp_path / "ct", 1)[0], cli_actor())
    first.close()
    key_file = tmp_path / "data" / "secret-key"
    kept = key_file.read_bytes()
    key_file.unlink()
    with pytest.raises(ConfigurationError, match="do not open with this secret key"):
        make_archive(tmp_path, encrypt_blobs=True)
    key_file.write_bytes(kept)  # the operator puts the right key back
    make_archive(tmp_path, encrypt_blobs=True).close()


def test_a_store_with_only_plaintext_blobs_starts_with_any_key(tmp_path):
    """Switching encryption on over an unencrypted store is not a wrong key."""
    inner = FileBlobStore(tmp_path / "b")
    key = _put(inner, b"written before encryption")
    store = EncryptedBlobStore(inner, NEW)
    assert _read(store, key) == b"written before encryption"


# -- plaintext planted in an encrypting store ---------------------------------------------------


def test_a_store_serving_encrypted_blobs_only_refuses_planted_plaintext(tmp_path):
    """Someone who can write the store replaced a sealed image by a plaintext file of their
    own: the encrypting store served it as an image from before encryption."""
    inner = FileBlobStore(tmp_path / "b")
    store = EncryptedBlobStore(inner, NEW, plaintext=False)
    key = _put(store, b"the real image" * 1000)
    inner.local_path(key).write_bytes(b"DICM planted by an attacker")
    with pytest.raises(StorageError, match="not encrypted"):
        _read(store, key)
    with pytest.raises(StorageError, match="not encrypted"):
        store.open_range(key, 0, 4)
    # A backup does not copy it as if it were the image.
    engine = make_engine(f"sqlite:///{tmp_path / 'index.sqlite'}")
    lenient = EncryptedBlobStore(inner, NEW)
    assert _read(lenient, key) == b"DICM planted by an attacker"  # what it did before
    with inner.open(key) as fh, pytest.raises(StorageError, match="not encrypted"):
        store.digest_of_stored(key, fh)
    engine.dispose()


def test_a_backup_of_a_store_serving_encrypted_blobs_only_reports_planted_plaintext_corrupt(
        tmp_path):
    archive = make_archive(tmp_path, encrypt_blobs=True, secret_key="a" * 40)
    try:
        archive.ingest.store_copy(ct_series(tmp_path / "ct", 1)[0], cli_actor())
        inner = archive.blobs.inner  # type: ignore[attr-defined]
        [key] = list(inner.keys())
        inner.local_path(key).write_bytes(b"planted")
        strict = EncryptedBlobStore(inner, blob_master_key(_installation_key("a" * 40)),
                                    plaintext=False)
        report = backup(archive.engine, strict, tmp_path / "backup")
        assert report.corrupt == [key]
        assert not report.complete
    finally:
        archive.close()


def _installation_key(text: str) -> bytes:
    from imageshare.storage.secret_box import load_secret_key

    return load_secret_key(text, Path("/nonexistent"))


# -- the operator's migration -------------------------------------------------------------------


def test_sealing_the_plaintext_blobs_lets_the_store_serve_encrypted_blobs_only(tmp_path):
    inner = FileBlobStore(tmp_path / "b")
    old = {_put(inner, os.urandom(size)): size for size in (0, 10, 200_000)}
    originals = {key: inner.local_path(key).read_bytes() for key in old}
    store = EncryptedBlobStore(inner, NEW)
    sealed_already = _put(store, b"sealed since")
    altered = _put(inner, b"recorded at ingest")
    recorded = {key: hashlib.sha256(data).hexdigest() for key, data in originals.items()}
    recorded[altered] = hashlib.sha256(b"something else").hexdigest()
    steps: list[int] = []

    report = seal_plaintext_blobs(store, recorded.get, steps.append)

    assert sorted(report.sealed) == sorted(old)
    assert report.already == 1 and report.checked == 5 and len(steps) == 5
    assert [key for key, _why in report.refused] == [altered]
    assert not report.complete
    for key in old:
        assert inner.local_path(key).read_bytes().startswith(MAGIC)
    # The altered blob is left as it was, for a person to look at.
    assert inner.local_path(altered).read_bytes() == b"recorded at ingest"
    strict = EncryptedBlobStore(inner, NEW, plaintext=False)
    for key, data in originals.items():
        assert _read(strict, key) == data
    assert _read(strict, sealed_already) == b"sealed since"
    with pytest.raises(StorageError, match="not encrypted"):
        _read(strict, altered)
    # Run again once the altered blob is dealt with: nothing left, nothing sealed twice.
    inner.delete(altered)
    again = seal_plaintext_blobs(store, recorded.get)
    assert again.complete and again.already == 4 and not again.sealed


def test_resealing_a_blob_deleted_meanwhile_does_not_bring_it_back(tmp_path, monkeypatch):
    inner = FileBlobStore(tmp_path / "b")
    key = _put(inner, b"deleted by retention while the migration runs")
    store = EncryptedBlobStore(inner, NEW)
    real_put = inner.put

    def deleted_first(k, stream, size):
        raise AssertionError("stored again")

    monkeypatch.setattr(store, "exists", lambda k: (inner.delete(k), False)[1])
    monkeypatch.setattr(inner, "put", deleted_first)
    report = seal_plaintext_blobs(store)
    assert not report.sealed and report.complete
    assert not inner.local_path(key).exists()
    monkeypatch.setattr(inner, "put", real_put)


# -- key rotation -------------------------------------------------------------------------------


def test_a_rotated_key_reads_old_blobs_and_the_migration_moves_them_to_the_new_key(tmp_path):
    inner = FileBlobStore(tmp_path / "b")
    before = EncryptedBlobStore(inner, OLD)
    old_key = _put(before, b"sealed under the old key" * 5000)
    with pytest.raises(ConfigurationError):
        EncryptedBlobStore(inner, NEW)  # the old key forgotten: refused, not served broken
    rotated = EncryptedBlobStore(inner, NEW, retired_keys=[OLD], plaintext=False)
    new_key = _put(rotated, b"sealed under the new key")
    assert _read(rotated, old_key) == b"sealed under the old key" * 5000
    with rotated.open_range(old_key, 24 * 3000, 24) as fh:
        assert fh.read() == b"sealed under the old key"
    assert rotated.sealed_under(old_key) == "retired"
    report = seal_plaintext_blobs(rotated)
    assert report.rekeyed == [old_key] and report.complete
    only_new = EncryptedBlobStore(inner, NEW, plaintext=False)
    assert _read(only_new, old_key) == b"sealed under the old key" * 5000
    assert _read(only_new, new_key) == b"sealed under the new key"


# -- the job queue ------------------------------------------------------------------------------


def test_a_job_queued_before_the_clock_was_set_back_runs_now_not_hours_later(engine):
    """A job (or a retry) queued while the clock was two hours ahead waited two hours once the
    clock was put right (SQLite keeps this host's times); a job delayed on purpose still
    waits."""
    queue = _queue(engine)
    try:
        early = queue.submit("alice", "export", "Export", {})
        delayed = queue.submit("alice", "export", "Export", {})
        now = datetime.now(UTC)
        with engine.begin() as conn:
            conn.execute(update(background_jobs).where(background_jobs.c.public_id == early.id)
                         .values(run_after=now + timedelta(hours=2, minutes=1),
                                 updated_at=now + timedelta(hours=2)))
            conn.execute(update(background_jobs).where(
                background_jobs.c.public_id == delayed.id)
                .values(run_after=now + timedelta(minutes=5), updated_at=now))
        ran: list[str] = []
        queue.register("export", lambda job, params: ran.append(job.id))
        queue.run_pending()  # a worker started by submit may have claimed it meanwhile
        assert _wait(queue, early).state == "done"
        assert ran == [early.id]
        assert queue.get(delayed.id, "alice").state == "queued"
    finally:
        queue.close()


def test_a_job_whose_parameters_no_longer_parse_fails_at_once_with_the_reason(engine):
    """Parameters that are not an object (an older version's form, a hand edit) were taken
    for secret ones sealed with another key: retried for minutes, then failed telling the
    owner to check IMAGESHARE_SECRET_KEY."""
    notes: list = []
    queue = _queue(engine, notes)
    try:
        job = queue.submit("alice", "export", "Export", {})
        with engine.begin() as conn:
            conn.execute(update(background_jobs).where(background_jobs.c.public_id == job.id)
                         .values(params=["dicomweb", 3]))
        ran: list[str] = []
        queue.register("export", lambda job, params: ran.append(job.id))
        queue.run_pending()  # a worker started by submit may have claimed it meanwhile
        failed = _wait(queue, job)
        deadline = time.monotonic() + 10
        while not notes and time.monotonic() < deadline:  # told just after the state is saved
            time.sleep(0.02)
    finally:
        queue.close()
    assert not ran
    assert failed.state == "failed" and failed.attempts == 1
    assert "parameters could not be read" in failed.error and "secret key" not in failed.error
    assert notes and notes[0][:2] == ("alice", "job.failed")


def test_a_blob_the_index_let_go_while_it_was_sealed_again_is_not_left_on_disk(tmp_path):
    """A deletion between reseal's last check and its put: the index no longer names the
    blob once sealed, so the sealed copy is removed (patient data deleted stays deleted)."""
    inner = FileBlobStore(tmp_path / "b")
    data = b"deleted by an approved deletion while the migration runs"
    key = _put(inner, data)
    store = EncryptedBlobStore(inner, NEW)
    digest = hashlib.sha256(data).hexdigest()
    asked: list[str] = []

    def recorded(k: str) -> str | None:
        asked.append(k)
        return digest if len(asked) == 1 else None  # deleted from the index meanwhile

    report = seal_plaintext_blobs(store, recorded)
    assert not report.sealed and report.complete
    assert not inner.local_path(key).exists()
