"""Tamper evidence: the audit trail is a SHA-256 hash chain with signed heads, and
`imageshare audit verify` names every row that was edited, deleted, inserted or moved.
"""

from __future__ import annotations

import json
import multiprocessing
from datetime import UTC, datetime

import pytest
from sqlalchemy import create_engine, delete, insert, select, text, update

from imageshare.audit.chain import verify_chain
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import cli_actor
from imageshare.storage.index.database import make_engine, migrate
from imageshare.storage.index.schema import audit_chain_head, audit_events
from tests.conftest import upgrade_index

ACTOR = cli_actor()




def _trail_of(archive, count: int = 10) -> list[int]:
    archive.audit.record([AuditEvent(ACTOR, "audit.read", "success", study_uid=f"1.2.{i}",
                                     detail={"n": i}) for i in range(count)])
    with archive.engine.connect() as conn:
        return conn.execute(select(audit_events.c.seq).order_by(audit_events.c.seq)
                            ).scalars().all()


def _pk_of(archive, seq: int) -> int:
    with archive.engine.connect() as conn:
        return conn.execute(select(audit_events.c.pk).where(audit_events.c.seq == seq)).scalar()


def test_an_untouched_trail_verifies_intact_also_against_its_signed_heads(archive, imageshare):
    _trail_of(archive)
    data = archive.settings.data_dir
    first = imageshare(data, "audit", "head")
    assert first.returncode == 0, first.stderr
    _trail_of(archive, 3)
    result = imageshare(data, "audit", "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "audit trail intact" in result.stdout and "1 signed head(s)" in result.stdout
    heads = [json.loads(line) for line in
             (data / "audit-heads.jsonl").read_text().splitlines()]
    assert heads[0]["hmac"] and heads[0]["seq"] >= 10


def test_an_edited_row_is_named_by_its_place_in_the_chain(archive, imageshare):
    seqs = _trail_of(archive)
    with archive.engine.begin() as conn:
        conn.execute(update(audit_events).where(audit_events.c.seq == seqs[4])
                     .values(actor="user:someone-else"))
    result = imageshare(archive.settings.data_dir, "audit", "verify")
    assert result.returncode == 1
    assert f"edited: row seq={seqs[4]} (pk {_pk_of(archive, seqs[4])})" in result.stdout
    assert result.stdout.count("edited:") == 1


def test_a_deleted_row_is_named_and_the_rows_after_it_still_verify(archive):
    seqs = _trail_of(archive)
    with archive.engine.begin() as conn:
        conn.execute(delete(audit_events).where(audit_events.c.seq == seqs[3]))
    report = verify_chain(archive.engine)
    assert [(p.kind, p.seq) for p in report.problems] == [("deleted", seqs[3])]


def test_rows_inserted_outside_the_chain_or_with_a_forged_place_are_found(archive):
    seqs = _trail_of(archive)
    row = {"at": "2026-01-01 00:00:00", "actor": "user:x", "actor_kind": "user", "source": "",
           "action": "study.view", "outcome": "success", "patient_id": "", "study_uid": "",
           "instance_count": 0, "detail": "{}"}
    with archive.engine.begin() as conn:
        conn.execute(text("INSERT INTO audit_events (at, actor, actor_kind, source, action, "
                          "outcome, patient_id, study_uid, instance_count, detail) VALUES "
                          "(:at, :actor, :actor_kind, :source, :action, :outcome, "
                          ":patient_id, :study_uid, :instance_count, :detail)"), row)
    kinds = [(p.kind, p.seq) for p in verify_chain(archive.engine).problems]
    assert kinds == [("inserted", None)]
    # A forged row squeezed in by renumbering the rows after it.
    with archive.engine.begin() as conn:
        conn.execute(delete(audit_events).where(audit_events.c.seq.is_(None)))
        for seq in reversed(seqs[5:]):
            conn.execute(update(audit_events).where(audit_events.c.seq == seq)
                         .values(seq=seq + 1))
        conn.execute(insert(audit_events).values(
            **{**row, "at": datetime(2026, 1, 1, tzinfo=UTC)}, seq=seqs[5],
            prev_hash="0" * 64, row_hash="f" * 64))
    problems = verify_chain(archive.engine).problems
    assert ("edited", seqs[5]) in [(p.kind, p.seq) for p in problems]
    assert all(p.seq is not None and p.seq >= seqs[5] for p in problems)


def test_two_rows_swapped_are_both_reported(archive):
    seqs = _trail_of(archive)
    columns = ("at", "study_uid", "detail")
    with archive.engine.begin() as conn:
        a, b = (conn.execute(select(*(audit_events.c[c] for c in columns))
                             .where(audit_events.c.seq == s)).one() for s in (seqs[2], seqs[6]))
        for seq, values in ((seqs[2], b), (seqs[6], a)):
            conn.execute(update(audit_events).where(audit_events.c.seq == seq)
                         .values(dict(zip(columns, values, strict=True))))
    flagged = {p.seq for p in verify_chain(archive.engine).problems}
    assert flagged == {seqs[2], seqs[6]}


def test_newest_rows_deleted_with_the_head_rewritten_are_caught_by_the_signed_head(
        archive, imageshare):
    seqs = _trail_of(archive)
    data = archive.settings.data_dir
    assert imageshare(data, "audit", "head").returncode == 0
    with archive.engine.begin() as conn:
        conn.execute(delete(audit_events).where(audit_events.c.seq > seqs[6]))
        kept = conn.execute(select(audit_events.c.row_hash)
                            .where(audit_events.c.seq == seqs[6])).scalar()
        conn.execute(update(audit_chain_head).values(seq=seqs[6], hash=kept))
    assert verify_chain(archive.engine).intact  # the database alone looks consistent
    result = imageshare(data, "audit", "verify")
    assert result.returncode == 1
    assert f"deleted: row seq={seqs[6] + 1}" in result.stdout
    assert "rows were deleted" in result.stdout


def test_a_forged_signed_head_is_reported(archive, imageshare):
    _trail_of(archive)
    data = archive.settings.data_dir
    assert imageshare(data, "audit", "head").returncode == 0
    heads = data / "audit-heads.jsonl"
    entry = json.loads(heads.read_text())
    entry["seq"] -= 1
    heads.write_text(json.dumps(entry) + "\n")
    result = imageshare(data, "audit", "verify")
    assert result.returncode == 1 and "wrong signature" in result.stdout


def test_the_migration_chains_the_rows_already_in_the_trail(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    engine = make_engine(url)
    upgrade_index(engine, "0015")
    old = create_engine(url)
    with old.begin() as conn:
        for i in range(5):
            conn.execute(text(
                "INSERT INTO audit_events (at, actor, actor_kind, source, action, outcome, "
                "patient_id, study_uid, instance_count, detail) VALUES "
                f"('2025-0{i + 1}-01 10:00:00.000000', 'user:a', 'user', '', 'study.view', "
                f"'success', 'P{i}', '', 1, '{{}}')"))
    migrate(engine, upgrade=True)
    report = verify_chain(engine)
    assert report.intact and report.rows == 5 and report.head_seq == 5
    with engine.connect() as conn:
        order = conn.execute(select(audit_events.c.patient_id).order_by(audit_events.c.seq)
                             ).scalars().all()
    assert order == [f"P{i}" for i in range(5)]
    AuditTrail(engine).record(AuditEvent(ACTOR, "audit.read", "success"))
    assert verify_chain(engine).rows == 6 and verify_chain(engine).intact


def _write_events(url: str, worker: int, count: int) -> None:
    engine = make_engine(url)
    trail = AuditTrail(engine)
    for i in range(count):
        trail.record([AuditEvent(ACTOR, "audit.read", "success", detail={"w": worker, "i": i}),
                      AuditEvent(ACTOR, "study.view", "success", study_uid=f"{worker}.{i}")])
    engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_chain_stays_whole_with_writers_in_several_processes(backend, tmp_path, request):
    if backend == "postgresql":
        url = request.getfixturevalue("postgres").new_database()
    else:
        url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    engine = make_engine(url)
    migrate(engine, upgrade=True)
    spawn = multiprocessing.get_context("spawn")
    workers = [spawn.Process(target=_write_events, args=(url, w, 25)) for w in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    report = verify_chain(engine)
    assert report.intact, [str(p) for p in report.problems]
    assert report.rows == report.head_seq == 3 * 25 * 2


def test_a_signed_head_is_written_only_once_the_rows_it_names_are_on_disk(archive,
                                                                          monkeypatch):
    """With synchronous=NORMAL a commit waits in SQLite's write-ahead log until a checkpoint:
    a head exported before the log reached the disk would name rows that power loss can take,
    and `audit verify` would then call the lost rows tampering."""
    import os

    from imageshare.app import export_audit_head

    _trail_of(archive)
    wal = f"{archive.engine.url.database}-wal"
    heads = str(archive.settings.resolved_audit_head_file)
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    export_audit_head(archive)
    assert wal in synced and heads in synced
    assert synced.index(wal) < synced.index(heads)
