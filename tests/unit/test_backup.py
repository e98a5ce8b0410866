"""Backup, restore and scrub: `imageshare backup` taken while stores run restores an
installation whose index rows and blobs are byte-identical (SQLite's online backup API, and
PostgreSQL's real pg_dump/pg_restore), backups are incremental, damaged backups and non-empty
targets are refused, and `imageshare verify` finds a flipped bit and a missing blob.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from imageshare.audit.chain import verify_chain
from imageshare.domain.actors import cli_actor
from imageshare.storage.index.database import make_engine
from imageshare.storage.index.schema import audit_events, instances, metadata
from tests.conftest import make_archive
from tests.factory import ct_series

ACTOR = cli_actor()
# The chain head and the ATNA cursor move with the audit events each command records itself.
MOVING = {"audit_events", "audit_chain_head", "atna_cursor"}


@pytest.fixture
def imageshare(imageshare):
    """The command line in this process, with a fixed secret key; backup and restore quiet."""
    def run(data: Path, *args: str, database_url: str = ""):
        quiet = ["--quiet"] if args[0] in ("backup", "restore") else []
        return imageshare(data, *args, *quiet, database_url=database_url,
                          IMAGESHARE_SECRET_KEY="k" * 40)
    return run


def _rows(engine, table) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(select(table).order_by(*table.primary_key))]


def _blob_bytes(archive, keys) -> dict[str, bytes]:
    out = {}
    for key in keys:
        with archive.blobs.open(key) as fh:
            out[key] = fh.read()
    return out


def _keys(engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(select(instances.c.blob_key)).scalars())


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_backup_taken_while_stores_run_restores_byte_identical(backend, tmp_path, request,
                                                                 imageshare):
    urls = {"src": "", "first": "", "second": ""}
    if backend == "postgresql":
        postgres = request.getfixturevalue("postgres")
        urls = {name: postgres.new_database() for name in urls}
    source = make_archive(tmp_path / "src", urls["src"], secret_key="k" * 40)
    data = source.settings.data_dir
    for n in range(3):
        for path in ct_series(tmp_path / f"before{n}", 3, patient_id=f"B{n}"):
            source.ingest.store_copy(path, ACTOR)
    stop = threading.Event()
    stored = []

    def keep_storing() -> None:
        n = 0
        while not stop.is_set():
            for path in ct_series(tmp_path / f"during{n}", 2, patient_id=f"D{n}"):
                stored.append(source.ingest.store_copy(path, ACTOR).sop_instance_uid)
            n += 1

    storing = threading.Thread(target=keep_storing)
    storing.start()
    try:
        first = imageshare(data, "backup", str(tmp_path / "backup"), database_url=urls["src"])
    finally:
        stop.set()
        storing.join(60)
    assert first.returncode == 0, first.stdout + first.stderr
    assert stored, "no store ran during the backup"

    # The snapshot taken mid-stream restores into a consistent installation: its instances
    # are source rows unchanged, and every blob is byte for byte the source's.
    restored = imageshare(tmp_path / "first" / "data", "restore", str(tmp_path / "backup"),
                          database_url=urls["first"])
    assert restored.returncode == 0, restored.stdout + restored.stderr
    first_copy = make_archive(tmp_path / "first", urls["first"], secret_key="k" * 40)
    try:
        mid = _rows(first_copy.engine, instances)
        assert len(mid) >= 9
        assert set(mid) <= set(_rows(source.engine, instances))
        keys = _keys(first_copy.engine)
        assert _blob_bytes(first_copy, keys) == _blob_bytes(source, keys)
        assert verify_chain(first_copy.engine).intact
    finally:
        first_copy.close()
    verified = imageshare(tmp_path / "first" / "data", "verify", database_url=urls["first"])
    assert verified.returncode == 0, verified.stdout

    # Once the stores stop, the next backup (incremental) restores every row and blob.
    second = imageshare(data, "backup", str(tmp_path / "backup"), database_url=urls["src"])
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"{len(mid)} already in the backup" in second.stdout
    assert imageshare(tmp_path / "second" / "data", "restore", str(tmp_path / "backup"),
                      database_url=urls["second"]).returncode == 0
    copy = make_archive(tmp_path / "second", urls["second"], secret_key="k" * 40)
    try:
        for table in metadata.sorted_tables:
            if table.name not in MOVING:
                assert _rows(copy.engine, table) == _rows(source.engine, table), table.name
        copied_audit = _rows(copy.engine, audit_events)
        # Everything the source had at the snapshot, then the restore's own event.
        assert copied_audit[:-1] == _rows(source.engine, audit_events)[:len(copied_audit) - 1]
        assert verify_chain(copy.engine).intact
        keys = _keys(source.engine)
        assert keys == _keys(copy.engine) and len(keys) == 9 + len(stored)
        assert _blob_bytes(copy, keys) == _blob_bytes(source, keys)
    finally:
        copy.close()
        source.close()


def test_a_restore_refuses_a_damaged_backup_and_a_target_that_is_not_empty(tmp_path,
                                                                           imageshare):
    source = make_archive(tmp_path / "src", secret_key="k" * 40)
    for path in ct_series(tmp_path / "s", 2):
        source.ingest.store_copy(path, ACTOR)
    source.close()
    data = tmp_path / "src" / "data"
    assert imageshare(data, "backup", str(tmp_path / "backup")).returncode == 0
    # The installation being backed up is not empty: restoring over it is refused.
    over = imageshare(data, "restore", str(tmp_path / "backup"))
    assert over.returncode == 1 and "already holds an index" in over.stderr
    blob = next(p for p in (tmp_path / "backup" / "blobs").rglob("*") if p.is_file())
    blob.write_bytes(blob.read_bytes()[:-1])
    damaged = imageshare(tmp_path / "new", "restore", str(tmp_path / "backup"))
    assert damaged.returncode == 1 and "damaged" in damaged.stderr
    assert not (tmp_path / "new" / "index.sqlite").exists()


def test_the_signed_audit_heads_up_to_the_snapshot_travel_with_it(tmp_path, imageshare):
    """A restored installation keeps its trail's tamper evidence: the signed chain heads up
    to the snapshot's are restored with it (a later head would make the restored trail look
    cut short), `audit verify` checks them, and a target that has heads of its own is
    refused before anything is written."""
    from imageshare.app import export_audit_head

    source = make_archive(tmp_path / "src", secret_key="k" * 40)
    data = source.settings.data_dir
    try:
        for path in ct_series(tmp_path / "s", 2):
            source.ingest.store_copy(path, ACTOR)
        before = export_audit_head(source)
        assert imageshare(data, "backup", str(tmp_path / "backup")).returncode == 0
        for path in ct_series(tmp_path / "t", 2, patient_id="LATER"):
            source.ingest.store_copy(path, ACTOR)
        after = export_audit_head(source)
        assert after.seq > before.seq
    finally:
        source.close()
    target = tmp_path / "copy" / "data"
    restored = imageshare(target, "restore", str(tmp_path / "backup"))
    assert restored.returncode == 0, restored.stderr
    heads = (target / "audit-heads.jsonl").read_text().splitlines()
    assert heads == [before.line()]
    verified = imageshare(target, "audit", "verify")
    assert verified.returncode == 0 and "1 signed head(s) checked" in verified.stdout, \
        verified.stdout

    other = tmp_path / "other" / "data"
    other.mkdir(parents=True)
    (other / "audit-heads.jsonl").write_text(after.line() + "\n")
    refused = imageshare(other, "restore", str(tmp_path / "backup"))
    assert refused.returncode == 1 and "already holds signed audit heads" in refused.stderr
    assert not (other / "index.sqlite").exists()


def test_the_files_uploads_kept_as_they_came_are_backed_up_and_restored(tmp_path, imageshare):
    """A patient's photo kept beside the DICOM made of it (the originals store) is part of
    the backup: restored byte for byte, and checked like every blob before anything is
    written."""
    import io
    from datetime import UTC, datetime

    from imageshare.app import ORIGINALS, blob_store
    from imageshare.storage.blobs import new_blob_key
    from imageshare.storage.index.schema import upload_results
    from imageshare.uploads.invitations import UploadRequest

    source = make_archive(tmp_path / "src", secret_key="k" * 40,
                          public_url="https://images.example")
    data = source.settings.data_dir
    photo = b"\xff\xd8\xff\xe0 the photo as the patient sent it" * 50
    key = new_blob_key()
    try:
        created = source.uploads.invitations.invite(UploadRequest(
            patient_name="Lovelace^Ada", hospital_number="H100", birth_date="19151210",
            nhs_number="9434765919", email="ada@home.example", reference="knee"), ACTOR)
        invitation = source.uploads.invitations.by_public_id(created.public_id)
        stored = blob_store(source.settings, beside=ORIGINALS).put(
            key, io.BytesIO(photo), len(photo))
        with source.engine.begin() as conn:
            conn.execute(upload_results.insert().values(
                invitation_pk=invitation.pk, round=1, label="IMG_0001.jpg", kind="photo",
                outcome="stored", original_key=key, original_sha256=stored.sha256,
                created_at=datetime.now(UTC)))
    finally:
        source.close()
    made = imageshare(data, "backup", str(tmp_path / "backup"))
    assert made.returncode == 0, made.stdout + made.stderr
    assert (tmp_path / "backup" / "originals.jsonl").read_text().count(key) == 1

    target = tmp_path / "copy" / "data"
    restored = imageshare(target, "restore", str(tmp_path / "backup"))
    assert restored.returncode == 0, restored.stderr
    copy = make_archive(tmp_path / "copy", secret_key="k" * 40)
    try:
        with blob_store(copy.settings, beside=ORIGINALS).open(key) as fh:
            assert fh.read() == photo
    finally:
        copy.close()

    kept = next(p for p in (tmp_path / "backup" / "originals").rglob("*") if p.is_file())
    kept.write_bytes(kept.read_bytes()[:-1])
    damaged = imageshare(tmp_path / "other" / "data", "restore", str(tmp_path / "backup"))
    assert damaged.returncode == 1 and key in damaged.stderr
    assert not (tmp_path / "other" / "data" / "index.sqlite").exists()


def test_the_scrub_names_a_flipped_bit_and_a_missing_blob(tmp_path, imageshare):
    archive = make_archive(tmp_path, secret_key="k" * 40)
    results = [archive.ingest.store_copy(p, ACTOR) for p in ct_series(tmp_path / "s", 3)]
    data = archive.settings.data_dir
    clean = imageshare(data, "verify")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "3 blob(s) checked" in clean.stdout and "0 corrupt, 0 missing" in clean.stdout
    with make_engine(archive.settings.resolved_database_url).connect() as conn:
        keys = dict(conn.execute(select(instances.c.sop_uid, instances.c.blob_key)).all())
    flipped = archive.blobs.local_path(keys[results[0].sop_instance_uid])
    damaged = bytearray(flipped.read_bytes())
    damaged[len(damaged) // 2] ^= 0x04
    flipped.write_bytes(bytes(damaged))
    archive.blobs.local_path(keys[results[1].sop_instance_uid]).unlink()
    archive.close()
    found = imageshare(data, "verify")
    assert found.returncode == 3
    assert (f"corrupt: blob {keys[results[0].sop_instance_uid]} "
            f"(instance {results[0].sop_instance_uid})") in found.stdout
    assert f"missing: blob {keys[results[1].sop_instance_uid]}" in found.stdout
    assert "1 corrupt, 1 missing" in found.stdout
