"""On SQLite, reads wait for no writer and writers take the lock before they read."""

from __future__ import annotations

import time

from sqlalchemy import text

from imageshare.storage.index.database import make_engine, run_read


def test_a_read_is_not_held_up_by_a_writer_in_another_process_or_thread(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'index.sqlite'}", for_writer=True)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (a INTEGER)"))
        conn.execute(text("INSERT INTO t VALUES (1)"))
    other = make_engine(f"sqlite:///{tmp_path / 'index.sqlite'}", for_writer=True)
    with other.begin() as writing:  # holds the write lock while the reads below run
        writing.execute(text("INSERT INTO t VALUES (2)"))
        began = time.monotonic()
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 1  # committed only
        assert run_read(engine, lambda c: c.execute(text("SELECT count(*) FROM t")).scalar()) == 1
        assert time.monotonic() - began < 1  # not the 30 s busy timeout
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 2
    engine.dispose()
    other.dispose()


def test_a_transaction_begun_explicitly_takes_the_write_lock_first(tmp_path):
    statements: list[str] = []
    engine = make_engine(f"sqlite:///{tmp_path / 'index.sqlite'}", for_writer=True)
    with engine.connect() as conn:
        conn.connection.dbapi_connection.set_trace_callback(statements.append)
        with conn.begin():
            conn.execute(text("SELECT 1"))
        conn.execute(text("SELECT 2"))
        conn.rollback()
    assert statements[:2] == ["BEGIN IMMEDIATE", "SELECT 1"]
    assert "BEGIN" in statements and statements[statements.index("SELECT 2") - 1] == "BEGIN"
    engine.dispose()
