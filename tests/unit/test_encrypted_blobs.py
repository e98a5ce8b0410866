"""Encryption at rest of the blob store: nothing readable on disk, frames still served by range,
and any change to a stored file (a flipped byte, a cut, chunks swapped, a file moved under
another key) refused on read and named by ``imageshare verify``."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread

from imageshare.domain.actors import cli_actor
from imageshare.domain.errors import StorageError
from imageshare.storage.blobs import new_blob_key
from imageshare.storage.encrypted import (
    HEADER,
    PLAIN_CHUNK,
    SEALED_CHUNK,
    EncryptedBlobStore,
    blob_master_key,
    sealed_size,
)
from imageshare.storage.files import FileBlobStore
from imageshare.web.server import create_app
from tests.conftest import act_as_admin, make_archive
from tests.factory import ct_series, us_cine
from tests.multipart_helpers import parse_multipart


@pytest.fixture
def sealed(tmp_path) -> tuple[EncryptedBlobStore, FileBlobStore, str, bytes]:
    inner = FileBlobStore(tmp_path / "blobs")
    store = EncryptedBlobStore(inner, blob_master_key(os.urandom(32)))
    data = os.urandom(3 * PLAIN_CHUNK + 1000)
    key = new_blob_key()
    store.put(key, io.BytesIO(data), len(data))
    return store, inner, key, data


def _file(inner: FileBlobStore, key: str) -> Path:
    return inner.local_path(key)


def _read(store, key) -> bytes:
    with store.open(key) as fh:
        return fh.read()


def test_a_byte_flipped_on_disk_is_detected_on_read(sealed):
    store, inner, key, data = sealed
    path = _file(inner, key)
    assert path.stat().st_size == sealed_size(len(data))
    raw = bytearray(path.read_bytes())
    raw[HEADER + SEALED_CHUNK + 77] ^= 0x01  # in the second chunk
    path.write_bytes(bytes(raw))
    with store.open_range(key, 0, 100) as fh:  # the first chunk is untouched
        assert fh.read() == data[:100]
    with pytest.raises(StorageError, match="chunk 1 fails authentication"):
        _read(store, key)


@pytest.mark.parametrize("change", ["cut at a chunk boundary", "cut inside a chunk",
                                    "chunks swapped",
                                    "header salt changed", "moved under another key"])
def test_truncated_reordered_or_moved_blobs_are_refused(sealed, change):
    store, inner, key, data = sealed
    path = _file(inner, key)
    raw = path.read_bytes()
    first, second = (raw[HEADER:HEADER + SEALED_CHUNK],
                     raw[HEADER + SEALED_CHUNK:HEADER + 2 * SEALED_CHUNK])
    if change == "cut at a chunk boundary":  # what is left is two whole chunks
        path.write_bytes(raw[:HEADER + 2 * SEALED_CHUNK])
    elif change == "cut inside a chunk":  # the rest looks like a short final chunk
        path.write_bytes(raw[:HEADER + 2 * SEALED_CHUNK + 500])
    elif change == "chunks swapped":
        path.write_bytes(raw[:HEADER] + second + first + raw[HEADER + 2 * SEALED_CHUNK:])
    elif change == "header salt changed":
        path.write_bytes(raw[:10] + bytes([raw[10] ^ 1]) + raw[11:])
    else:
        other = new_blob_key()
        store.put(other, io.BytesIO(b"x"), 1)
        _file(inner, other).write_bytes(raw)
        key = other
    with pytest.raises(StorageError, match="fails authentication|is truncated"):
        _read(store, key)


def test_lengths_at_chunk_boundaries_read_back_exactly(tmp_path):
    store = EncryptedBlobStore(FileBlobStore(tmp_path / "b"), blob_master_key(os.urandom(32)))
    for size in (0, 1, PLAIN_CHUNK - 1, PLAIN_CHUNK, PLAIN_CHUNK + 1, 2 * PLAIN_CHUNK):
        data = os.urandom(size)
        key = new_blob_key()
        stored = store.put(key, io.BytesIO(data), size)
        assert stored.sha256 == hashlib.sha256(data).hexdigest()
        assert _read(store, key) == data
        with store.open_range(key, max(0, size - 3), 10) as fh:
            assert fh.read() == data[max(0, size - 3):]


def test_an_encrypted_archive_keeps_no_patient_data_readable_and_serves_frames(
        tmp_path, imageshare):
    plain_blobs = FileBlobStore(tmp_path / "data" / "blobs")
    old_key = new_blob_key()
    plain_blobs.put(old_key, io.BytesIO(b"written before encryption"), 25)
    archive = make_archive(tmp_path, encrypt_blobs=True)
    archive.users.ensure_admin("admin-password-long")
    try:
        cine = us_cine(tmp_path / "us", frames=12, patient_name="Confidential^Carol")
        stored = archive.ingest.store_copy(cine, cli_actor())
        ct = archive.ingest.store_copy(ct_series(tmp_path / "ct", 1)[0], cli_actor())
        files = [p for p in (tmp_path / "data" / "blobs").rglob("*")
                 if p.is_file() and p.parent.name != ".tmp"]
        assert len(files) == 3
        for path in files:
            assert b"Confidential" not in path.read_bytes()
            assert b"DICM" not in path.read_bytes()[:200] or path.name == old_key
        with archive.blobs.open(old_key) as fh:
            assert fh.read() == b"written before encryption"
        ds = dcmread(cine)
        with TestClient(create_app(archive)) as client:
            act_as_admin(client, archive)
            frames = parse_multipart(client.get(
                f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/"
                f"instances/{ds.SOPInstanceUID}/frames/3,12",
                headers={"Accept": 'multipart/related; type="application/octet-stream"'}))
            whole = client.get(f"/dicomweb/studies/{stored.study_uid}",
                               headers={"Accept": 'multipart/related; '
                                                  'type="application/dicom"'})
        assert [body for _, body in frames] == [ds.pixel_array[2].tobytes(),
                                                ds.pixel_array[11].tobytes()]
        assert [body for _, body in parse_multipart(whole)] == [cine.read_bytes()]
        data_dir = archive.settings.data_dir
        ok = imageshare(data_dir, "verify", IMAGESHARE_ENCRYPT_BLOBS="true")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "0 corrupt" in ok.stdout
        [ct_file] = [p for p in files if p.name == _blob_key(archive, ct.study_uid)]
        raw = bytearray(ct_file.read_bytes())
        raw[len(raw) // 2] ^= 0x80
        ct_file.write_bytes(bytes(raw))
        bad = imageshare(data_dir, "verify", IMAGESHARE_ENCRYPT_BLOBS="true")
        assert bad.returncode != 0
        assert f"corrupt: blob {ct_file.name}" in bad.stdout
    finally:
        archive.close()


def _blob_key(archive, study_uid: str) -> str:
    from sqlalchemy import select

    from imageshare.storage.index.schema import instances, series, studies

    with archive.engine.connect() as conn:
        return conn.execute(select(instances.c.blob_key)
                            .join(series, series.c.pk == instances.c.series_pk)
                            .join(studies, studies.c.pk == series.c.study_pk)
                            .where(studies.c.study_uid == study_uid)).scalar_one()


def test_a_backup_of_an_encrypted_store_holds_no_readable_image_and_restores_identical(
        tmp_path, imageshare):
    key_env = {"IMAGESHARE_SECRET_KEY": "s" * 40, "IMAGESHARE_ENCRYPT_BLOBS": "true"}
    source = make_archive(tmp_path / "src", encrypt_blobs=True, secret_key="s" * 40)
    cine = us_cine(tmp_path / "us", frames=6, patient_name="Confidential^Carol")
    stored = source.ingest.store_copy(cine, cli_actor())
    blob = _blob_key(source, stored.study_uid)
    source.close()
    backup_dir = tmp_path / "backup"
    made = imageshare(tmp_path / "src" / "data", "backup", "--quiet", str(backup_dir),
                      **key_env)
    assert made.returncode == 0, made.stdout + made.stderr
    copies = [p for p in (backup_dir / "blobs").rglob("*") if p.is_file()]
    assert len(copies) == 1 and b"Confidential" not in copies[0].read_bytes()
    plain = imageshare(tmp_path / "plain", "restore", "--quiet", str(backup_dir),
                       IMAGESHARE_SECRET_KEY="s" * 40, IMAGESHARE_ENCRYPT_BLOBS="false")
    assert plain.returncode == 1 and "blobs are encrypted" in plain.stderr
    restored = imageshare(tmp_path / "new", "restore", "--quiet", str(backup_dir), **key_env)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    again = make_archive(tmp_path / "new-check", data_dir=tmp_path / "new",
                         encrypt_blobs=True, secret_key="s" * 40)
    try:
        with again.blobs.open(blob) as fh:
            assert fh.read() == cine.read_bytes()
    finally:
        again.close()
