"""``imageshare storage seal`` and the settings that make encryption at rest usable end to end
(session 36): an archive written before encryption is sealed and then served encrypted-only; a
secret key is rotated (the old one retired, the new one current) and the old images are moved
to the new key, after which the retired key can go; plaintext planted in an encrypted-only
store is refused; a blob altered on disk is reported, not sealed as if it were the archive's.
Everything through the real command line, as an operator would run it.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from sqlalchemy import select

from imageshare.access.users import two_factor_key
from imageshare.app import ORIGINALS, blob_store
from imageshare.domain.actors import cli_actor
from imageshare.domain.errors import ConfigurationError, StorageError
from imageshare.settings import load_settings
from imageshare.storage.blobs import new_blob_key
from imageshare.storage.encrypted import MAGIC
from imageshare.storage.index.schema import instances
from imageshare.web.server import create_app
from tests.conftest import act_as_admin, make_archive
from tests.factory import ct_series
from tests.multipart_helpers import parse_multipart

OLD_KEY = "old-secret-key-of-the-installation-0123456789"
NEW_KEY = "new-secret-key-after-the-rotation-9876543210"
ON = {"IMAGESHARE_ENCRYPT_BLOBS": "true"}


def _ingest(tmp_path: Path, count: int, **settings: object) -> tuple[list[Path], list[str]]:
    """Store ``count`` CT slices in the archive of ``tmp_path``; their files and blob keys."""
    archive = make_archive(tmp_path, **settings)
    try:
        files = ct_series(tmp_path / f"ct{count}", count)
        for path in files:
            archive.ingest.store_copy(path, cli_actor())
        with archive.engine.connect() as conn:
            keys = list(conn.execute(select(instances.c.blob_key).order_by(instances.c.pk))
                        .scalars())
    finally:
        archive.close()
    return files, keys


def _blob_file(tmp_path: Path, key: str) -> Path:
    [path] = (tmp_path / "data" / "blobs").rglob(key)
    return path


def _served(tmp_path: Path, files: list[Path], **settings: object) -> list[bytes]:
    """Each of ``files`` as a WADO-RS retrieve of its instance serves it, from an archive
    started with ``settings``."""
    archive = make_archive(tmp_path, **settings)
    try:
        archive.users.ensure_admin("admin-password-long")
        served = []
        with TestClient(create_app(archive), raise_server_exceptions=False) as client:
            act_as_admin(client, archive)
            for path in files:
                ds = dcmread(path, stop_before_pixels=True)
                answer = client.get(
                    f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/"
                    f"instances/{ds.SOPInstanceUID}",
                    headers={"Accept": 'multipart/related; type="application/dicom"'})
                assert answer.status_code == 200, answer.text
                served += [body for _, body in parse_multipart(answer)]
        return served
    finally:
        archive.close()


def test_an_archive_written_before_encryption_is_sealed_and_then_served_encrypted_only(
        tmp_path, imageshare):
    files, keys = _ingest(tmp_path, 3)
    data = tmp_path / "data"
    for key in keys:
        assert not _blob_file(tmp_path, key).read_bytes().startswith(MAGIC)
    # A kept upload original beside the blob store, written before encryption too.
    plain = load_settings({"data_dir": data}, environ={})
    original = new_blob_key()
    blob_store(plain, beside=ORIGINALS).put(original, io.BytesIO(b"a photo as it came"), 18)

    # Encrypted-only before sealing: every old image is refused.
    strict = {**ON, "IMAGESHARE_ENCRYPTED_BLOBS_ONLY": "true"}
    before = imageshare(data, "verify", **strict)
    assert before.returncode == 3 and before.stdout.count("corrupt: blob") == 3

    sealed = imageshare(data, "storage", "seal", "--quiet", IMAGESHARE_ENCRYPTED_BLOBS_ONLY="false",
                        **ON)
    assert sealed.returncode == 0, sealed.stdout + sealed.stderr
    assert "blobs: 3 blob(s) checked, 0 already sealed under the current key, 3 sealed" \
        in sealed.stdout
    assert f"{ORIGINALS}: 1 blob(s) checked, 0 already sealed under the current key, 1 sealed" \
        in sealed.stdout
    assert f"sealed without a recorded digest to check: {ORIGINALS} blob {original}" \
        in sealed.stdout
    for key in keys:
        raw = _blob_file(tmp_path, key).read_bytes()
        assert raw.startswith(MAGIC) and b"Doe^Jane" not in raw

    after = imageshare(data, "verify", **strict)
    assert after.returncode == 0, after.stdout + after.stderr
    assert _served(tmp_path, files, encrypt_blobs=True, encrypted_blobs_only=True) == [
        p.read_bytes() for p in files]
    with blob_store(load_settings({"data_dir": data, "encrypt_blobs": True,
                                   "encrypted_blobs_only": True}, environ={}),
                    beside=ORIGINALS).open(original) as fh:
        assert fh.read() == b"a photo as it came"

    # Run again: nothing left to do.
    again = imageshare(data, "storage", "seal", "--quiet", **strict)
    assert again.returncode == 0
    assert "blobs: 3 blob(s) checked, 3 already sealed under the current key, 0 sealed" \
        in again.stdout

    archive = make_archive(tmp_path, encrypt_blobs=True)
    try:
        [latest, first] = list(archive.audit.events(action="storage.seal"))
    finally:
        archive.close()
    assert first["outcome"] == "success" and first["source"] == "cli"
    assert first["detail"] == {"checked": 4, "already": 0, "sealed": 4, "rekeyed": 0,
                               "refused": 0, "unchecked": 1, "secrets_rekeyed": 0,
                               "secrets_refused": 0, "encrypted_only": False}
    assert latest["detail"]["already"] == 4 and latest["detail"]["encrypted_only"] is True


def test_a_rotated_secret_key_reads_old_images_seal_moves_them_and_the_old_key_can_go(
        tmp_path, imageshare):
    files, keys = _ingest(tmp_path, 2, encrypt_blobs=True, secret_key=OLD_KEY)
    data = tmp_path / "data"
    rotated = {**ON, "IMAGESHARE_SECRET_KEY": NEW_KEY}
    archive = make_archive(tmp_path, encrypt_blobs=True, secret_key=OLD_KEY)
    try:
        archive.users.ensure_admin("admin-password-long")
        setup = archive.users.begin_two_factor("admin")  # a secret sealed in the index
    finally:
        archive.close()

    head = imageshare(data, "audit", "head", **{**ON, "IMAGESHARE_SECRET_KEY": OLD_KEY})
    assert head.returncode == 0, head.stderr
    # The new key alone is refused at once (not every image served as "altered").
    refused = imageshare(data, "verify", **rotated)
    assert refused.returncode == 2 and "do not open with this secret key" in refused.stderr

    # The old key retired (in a file readable by its owner only): old images are read.
    retired = tmp_path / "retired-keys"
    retired.write_text(f"# retired on rotation day\n{OLD_KEY}\n")
    retired.chmod(0o644)
    loose = imageshare(data, "verify", IMAGESHARE_RETIRED_SECRET_KEYS_FILE=str(retired),
                       **rotated)
    assert loose.returncode == 2 and "readable by others" in loose.stderr
    retired.chmod(0o600)
    with_retired = imageshare(data, "verify", **rotated)
    assert with_retired.returncode == 0, with_retired.stdout + with_retired.stderr
    assert _served(tmp_path, files[:1], encrypt_blobs=True, secret_key=NEW_KEY,
                   retired_secret_keys_file=str(retired)) == [files[0].read_bytes()]

    sealed = imageshare(data, "storage", "seal", "--quiet", **rotated)
    assert sealed.returncode == 0, sealed.stdout + sealed.stderr
    assert ("blobs: 2 blob(s) checked, 0 already sealed under the current key, 0 sealed, "
            "2 sealed again from a retired key, 0 refused") in sealed.stdout
    assert ("index secrets: 1 secret(s) checked, 0 already sealed under the current key, "
            "0 sealed, 1 sealed again from a retired key, 0 refused") in sealed.stdout
    # The index's secrets sealed under the old key still open while it is retired.
    archive = make_archive(tmp_path, encrypt_blobs=True, secret_key=NEW_KEY,
                           retired_secret_keys_file=str(retired))
    try:
        assert archive.users.pending_two_factor("admin", two_factor_key(setup)) == setup
    finally:
        archive.close()
    for ran in (refused, loose, with_retired, sealed):  # keys are never shown
        assert OLD_KEY not in ran.stdout + ran.stderr and NEW_KEY not in ran.stdout + ran.stderr

    # The retired key removed: the images open under the new key alone, encrypted-only.
    without = imageshare(data, "verify", IMAGESHARE_RETIRED_SECRET_KEYS_FILE="",
                         IMAGESHARE_ENCRYPTED_BLOBS_ONLY="true", **rotated)
    assert without.returncode == 0, without.stdout + without.stderr
    assert _served(tmp_path, files, encrypt_blobs=True, encrypted_blobs_only=True,
                   secret_key=NEW_KEY) == [p.read_bytes() for p in files]
    archive = make_archive(tmp_path, encrypt_blobs=True, secret_key=NEW_KEY)
    try:  # the second factor's set-up too
        assert archive.users.pending_two_factor("admin", two_factor_key(setup)) == setup
        [event] = list(archive.audit.events(action="storage.seal"))
        assert event["detail"]["secrets_rekeyed"] == 1 and event["detail"]["rekeyed"] == 2
    finally:
        archive.close()
    # The audit chain heads signed before the rotation are checked with the retired key.
    assert imageshare(data, "audit", "head", **rotated).returncode == 0
    trail = imageshare(data, "audit", "verify", IMAGESHARE_RETIRED_SECRET_KEYS_FILE=str(retired),
                       **rotated)
    assert trail.returncode == 0 and "2 signed head(s) checked" in trail.stdout, trail.stdout
    heads = data / "audit-heads.jsonl"
    forged = heads.read_text().splitlines()[0].replace('"hmac": "', '"hmac": "0')
    heads.write_text(heads.read_text() + forged + "\n")
    tampered = imageshare(data, "audit", "verify", **rotated)
    assert tampered.returncode == 1 and tampered.stdout.count("wrong signature") == 1
    # ... and no longer under the old one.
    with pytest.raises(ConfigurationError, match="do not open with this secret key"):
        make_archive(tmp_path, encrypt_blobs=True, secret_key=OLD_KEY)


def test_retired_keys_listed_in_the_setting_work_and_a_wrong_one_is_named_not_shown(
        tmp_path, imageshare):
    _files, keys = _ingest(tmp_path, 1, encrypt_blobs=True, secret_key=OLD_KEY)
    data = tmp_path / "data"
    bad = imageshare(data, "storage", "seal", IMAGESHARE_SECRET_KEY=NEW_KEY,
                     IMAGESHARE_RETIRED_SECRET_KEYS="too-short-to-be-a-key", **ON)
    assert bad.returncode == 2
    assert "retired_secret_keys entry 1" in bad.stderr
    assert "too-short-to-be-a-key" not in bad.stderr
    listed = imageshare(data, "storage", "seal", "--quiet", IMAGESHARE_SECRET_KEY=NEW_KEY,
                        IMAGESHARE_RETIRED_SECRET_KEYS=f"{'x' * 40}, {OLD_KEY}", **ON)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "1 sealed again from a retired key" in listed.stdout


def test_plaintext_planted_in_an_encrypted_only_store_is_refused(tmp_path, imageshare):
    files, keys = _ingest(tmp_path, 2, encrypt_blobs=True, secret_key=NEW_KEY)
    data = tmp_path / "data"
    # Someone who can write the store puts a plaintext file in place of an image (here the
    # very bytes of the other image: a plausible DICOM file).
    _blob_file(tmp_path, keys[0]).write_bytes(files[1].read_bytes())
    strict = {**ON, "IMAGESHARE_SECRET_KEY": NEW_KEY, "IMAGESHARE_ENCRYPTED_BLOBS_ONLY": "true"}
    checked = imageshare(data, "verify", **strict)
    assert checked.returncode == 3 and f"corrupt: blob {keys[0]}" in checked.stdout
    archive = make_archive(tmp_path, encrypt_blobs=True, encrypted_blobs_only=True,
                           secret_key=NEW_KEY)
    try:
        with pytest.raises(StorageError, match="not encrypted"), archive.blobs.open(keys[0]):
            pass
        with archive.blobs.open(keys[1]) as fh:
            assert fh.read() == files[1].read_bytes()
    finally:
        archive.close()
    # Seal does not take it for the archive's own: it is not what the index recorded.
    sealed = imageshare(data, "storage", "seal", "--quiet", **strict)
    assert sealed.returncode == 3
    assert f"refused: blobs blob {keys[0]}: " in sealed.stdout
    assert _blob_file(tmp_path, keys[0]).read_bytes() == files[1].read_bytes()


def test_a_blob_altered_on_disk_is_reported_refused_by_seal_and_left_as_it_is(
        tmp_path, imageshare):
    files, keys = _ingest(tmp_path, 2)
    data = tmp_path / "data"
    altered = _blob_file(tmp_path, keys[0])
    raw = bytearray(altered.read_bytes())
    raw[-1] ^= 0x01
    altered.write_bytes(bytes(raw))

    sealed = imageshare(data, "storage", "seal", "--quiet", **ON)
    assert sealed.returncode == 3
    assert (f"refused: blobs blob {keys[0]}: blob {keys[0]} does not match the digest the "
            "index recorded") in sealed.stdout
    assert "2 blob(s) checked, 0 already sealed under the current key, 1 sealed" \
        in sealed.stdout and "1 refused" in sealed.stdout
    assert altered.read_bytes() == bytes(raw)  # left for a person to look at
    assert _blob_file(tmp_path, keys[1]).read_bytes().startswith(MAGIC)
    archive = make_archive(tmp_path, encrypt_blobs=True)
    try:
        [event] = list(archive.audit.events(action="storage.seal"))
    finally:
        archive.close()
    assert event["outcome"] == "warning"
    assert (event["detail"]["refused"], event["detail"]["sealed"]) == (1, 1)
    assert "Doe^Jane" not in str(event) and "PAT001" not in str(event)


def test_a_key_rotation_without_blob_encryption_moves_the_index_secrets_to_the_new_key(
        tmp_path, imageshare):
    """On an installation that does not encrypt its blobs (make run's default) seal moved
    nothing: once the retired key went, every second factor sealed before the rotation was
    unreadable and administrators could not sign in. It now seals the index's secrets (and
    leaves the plain blobs as they are)."""
    _files, keys = _ingest(tmp_path, 1, secret_key=OLD_KEY)
    data = tmp_path / "data"
    before = _blob_file(tmp_path, keys[0]).read_bytes()
    archive = make_archive(tmp_path, secret_key=OLD_KEY)
    try:
        archive.users.ensure_admin("admin-password-long")
        setup = archive.users.begin_two_factor("admin")  # a secret sealed in the index
    finally:
        archive.close()
    retired = tmp_path / "retired-keys"
    retired.write_text(f"{OLD_KEY}\n")
    retired.chmod(0o600)
    rotated = {"IMAGESHARE_ENCRYPT_BLOBS": "false", "IMAGESHARE_SECRET_KEY": NEW_KEY}
    ran = imageshare(data, "storage", "seal", "--quiet",
                     IMAGESHARE_RETIRED_SECRET_KEYS_FILE=str(retired), **rotated)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "blobs are not encrypted here" in ran.stdout
    assert ("index secrets: 1 secret(s) checked, 0 already sealed under the current key, "
            "0 sealed, 1 sealed again from a retired key, 0 refused") in ran.stdout
    assert "retired secret keys may be removed" in ran.stdout
    assert _blob_file(tmp_path, keys[0]).read_bytes() == before  # plain blobs left plain
    archive = make_archive(tmp_path, secret_key=NEW_KEY)  # the retired key gone
    try:
        assert archive.users.pending_two_factor("admin", two_factor_key(setup)) == setup
        [event] = list(archive.audit.events(action="storage.seal"))
        assert event["outcome"] == "success" and event["detail"]["secrets_rekeyed"] == 1
    finally:
        archive.close()
    only = imageshare(data, "verify", IMAGESHARE_ENCRYPTED_BLOBS_ONLY="true", **rotated)
    assert only.returncode == 2 and "encrypted_blobs_only needs encrypt_blobs" in only.stderr


def test_a_secret_key_that_opens_none_of_the_index_secrets_is_named_at_start(tmp_path,
                                                                              caplog):
    """The server started with another key (the old one removed before seal ran) and only
    the administrators' code prompt said something was wrong; every start now logs why and
    which settings help, and still starts (a lost key must not stop the archive: images are
    received, served and restored, and an administrator clears the second factors)."""
    archive = make_archive(tmp_path, secret_key=OLD_KEY)
    try:
        archive.users.ensure_admin("admin-password-long")
        archive.users.begin_two_factor("admin")
    finally:
        archive.close()
    with caplog.at_level(logging.ERROR, logger="imageshare"):
        make_archive(tmp_path, secret_key=NEW_KEY).close()
    [said] = [r.getMessage() for r in caplog.records if "secret key" in r.getMessage()]
    assert "do not open with this secret key" in said
    assert "IMAGESHARE_RETIRED_SECRET_KEYS_FILE" in said
    assert OLD_KEY not in said and NEW_KEY not in said
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="imageshare"):
        make_archive(tmp_path, secret_key=NEW_KEY, retired_secret_keys=OLD_KEY).close()
    assert not [r for r in caplog.records if "secret key" in r.getMessage()]


def test_the_retired_keys_file_must_exist(tmp_path):
    with pytest.raises(ConfigurationError, match="cannot read the retired secret keys file"):
        make_archive(tmp_path, encrypt_blobs=True,
                     retired_secret_keys_file=str(tmp_path / "absent"))
    assert not os.path.exists(tmp_path / "absent")
