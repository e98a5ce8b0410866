"""Several processes filing one study at once: a study and series filed by another process
between two look-ups is a race to run again, never a refusal of a valid instance."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

from imageshare.archive.header import header_from_dataset
from imageshare.archive.index_writer import IndexWriter
from imageshare.archive.indexing import KnownParents, RacedAnotherWriter
from tests.factory import ct_series


def test_a_change_that_raced_another_writer_is_run_again_on_fresh_data(archive):
    writer = IndexWriter(archive.engine)
    calls = []

    def change(_conn):
        calls.append(1)
        if len(calls) == 1:
            raise RacedAnotherWriter("filed meanwhile")
        return "stored"

    future: Future = writer.submit_async(change)
    assert future.result(timeout=30) == "stored" and len(calls) == 2
    writer.close()


def test_a_series_seen_before_its_study_is_reported_as_a_race(archive, tmp_path):
    from pydicom import dcmread

    first, second = ct_series(tmp_path / "s", 2, patient_id="RACE1")
    archive.ingest.store_copy(first, _system())
    ds = dcmread(second, stop_before_pixels=True)
    header = header_from_dataset(ds, ds.file_meta.TransferSyntaxUID)

    class LateStudy(KnownParents):
        """The other process's study is not yet visible at the first look-up."""

        def __init__(self) -> None:
            super().__init__()
            self.looked = 0

        def study(self, conn, study_uid):
            self.looked += 1
            return None if self.looked == 1 else super().study(conn, study_uid)

    from datetime import UTC, datetime

    from imageshare.archive.indexing import index_instance

    with archive.engine.begin() as conn, pytest.raises(RacedAnotherWriter):
        index_instance(conn, header, "k" * 16, 1, "tests", datetime.now(UTC), LateStudy())


def _system():
    from imageshare.domain.actors import cli_actor

    return cli_actor()


def test_on_sqlite_the_write_lock_is_not_held_while_a_store_finishes_its_blob(tmp_path):
    """A store's index change waits for its blob (hashed, fsynced) before it commits. On
    SQLite the database's one write lock is taken only after that: meanwhile another writer
    (an audit event, a session, in any process) commits at once instead of waiting for the
    blob's I/O too."""
    from sqlalchemy import text

    from imageshare.archive.index_writer import Prerequisite
    from imageshare.storage.index.database import make_engine

    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    writer_engine, other = make_engine(url, for_writer=True), make_engine(url)
    with other.begin() as conn:
        conn.execute(text("CREATE TABLE t (v INTEGER)"))
    writer = IndexWriter(writer_engine)
    blob_on_disk, ran = Prerequisite(), threading.Event()

    def change(conn):
        inserted = conn.execute(text("INSERT INTO t VALUES (1)")).rowcount
        ran.set()
        return inserted

    future: Future = writer.submit_async(change, blob_on_disk)
    ran.wait(1.0)  # the writer's SQL, had it begun before the blob was done
    with other.connect() as conn:
        conn.execute(text("PRAGMA busy_timeout = 500"))  # would fail, not wait 30 s
        conn.execute(text("INSERT INTO t VALUES (2)"))
        conn.commit()
    assert not future.done()
    blob_on_disk.succeeded()
    assert future.result(timeout=30) == 1
    writer.close()
    with other.connect() as conn:
        assert sorted(conn.execute(text("SELECT v FROM t")).scalars()) == [1, 2]
