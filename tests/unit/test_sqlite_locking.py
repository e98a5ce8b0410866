"""On SQLite, reads wait for no writer, writers take the lock before they read, and writers in
several threads and processes take turns without losing time or updates."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from imageshare.storage.index import database
from imageshare.storage.index.database import make_engine, run_read, take_write_lock
from imageshare.storage.index.writer_gate import ENTERED, NESTED, TIMED_OUT, WriterGate, gate_for


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


def _counter(path):
    engine = make_engine(f"sqlite:///{path}", for_writer=True)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS c (n INTEGER)"))
        if conn.execute(text("SELECT count(*) FROM c")).scalar() == 0:
            conn.execute(text("INSERT INTO c VALUES (0)"))
    return engine


def _add_ones(path: str, threads: int, times: int) -> None:
    """Read the count and write it back one higher, ``times`` in each of ``threads``."""
    engine = make_engine(f"sqlite:///{path}")

    def work() -> None:
        for _ in range(times):
            with engine.begin() as conn:
                take_write_lock(conn)
                n = conn.execute(text("SELECT n FROM c")).scalar()
                conn.execute(text("UPDATE c SET n = :n"), {"n": n + 1})

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    engine.dispose()


def test_writers_in_several_processes_and_threads_take_turns_and_lose_nothing(tmp_path):
    path = tmp_path / "index.sqlite"
    engine = _counter(path)
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_add_ones, args=(str(path), 3, 40)) for _ in range(3)]
    for p in procs:
        p.start()
    _add_ones(str(path), 3, 40)
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with engine.connect() as conn:
        assert conn.execute(text("SELECT n FROM c")).scalar() == 4 * 3 * 40
    engine.dispose()


_HOLD = """
import sys, time
from sqlalchemy import text
from imageshare.storage.index.database import make_engine
engine = make_engine(f"sqlite:///{sys.argv[1]}", for_writer=True)
with engine.begin() as conn:
    conn.execute(text("UPDATE c SET n = n + 100"))
    print("writing", flush=True)
    time.sleep(600)
"""


@contextlib.contextmanager
def _writing_elsewhere(path: Path) -> Iterator[subprocess.Popen]:
    """Another process in the middle of a write transaction on ``path`` (killed at the end)."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "writing\n"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_writer_killed_in_the_middle_holds_up_no_other_writer(tmp_path):
    path = tmp_path / "index.sqlite"
    engine = _counter(path)
    with _writing_elsewhere(path) as holder:
        holder.kill()
        holder.wait()
        began = time.monotonic()
        with engine.begin() as conn:
            conn.execute(text("UPDATE c SET n = n + 1"))
        assert time.monotonic() - began < 5  # not the busy timeout: the turn died with it
    with engine.connect() as conn:
        assert conn.execute(text("SELECT n FROM c")).scalar() == 1  # its write never landed
    engine.dispose()


def test_a_dropped_connection_gives_its_turn_to_the_next_writer(tmp_path):
    path = tmp_path / "index.sqlite"
    engine = _counter(path)
    conn = engine.connect()
    conn.begin()
    conn.execute(text("UPDATE c SET n = 5"))
    conn.invalidate()  # the database connection is gone, with its transaction
    conn.close()
    done = threading.Event()

    def write() -> None:
        with engine.begin() as other:
            other.execute(text("UPDATE c SET n = n + 1"))
        done.set()

    threading.Thread(target=write, daemon=True).start()
    assert done.wait(5)
    with engine.connect() as check:
        assert check.execute(text("SELECT n FROM c")).scalar() == 1
    engine.dispose()


class _Holder:
    """What holds a turn (a connection, in the engine)."""


def test_a_turn_is_the_process_s_own_a_forked_child_waits_for_it(tmp_path):
    holders = {name: _Holder() for name in ("parent", "again", "child")}
    gate = gate_for(tmp_path / "index.sqlite", timeout=10)
    assert gate.enter(holders["parent"]) == ENTERED
    assert gate.enter(holders["again"]) == NESTED  # this thread has the turn: no waiting on itself
    pid = os.fork()
    if pid == 0:  # the child: the parent's turn is not its own
        child = gate_for(tmp_path / "index.sqlite", timeout=10)
        child.timeout = 0.3
        had = child.enter(holders["child"])
        child.timeout = 10
        got = child.enter(holders["child"]) if had == TIMED_OUT else ""
        os._exit(0 if got == ENTERED else 1)
    time.sleep(1)  # the child's first try has given up by now
    gate.leave(holders["parent"])
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_connection_dropped_unclosed_in_a_transaction_holds_up_no_writer(tmp_path):
    engine = _counter(tmp_path / "index.sqlite")

    def forgetful() -> None:  # a bug elsewhere: the connection is never closed
        conn = engine.connect()
        conn.begin()
        conn.execute(text("UPDATE c SET n = n + 100"))

    forgetful()
    gc.collect()
    began = time.monotonic()
    with engine.begin() as conn:
        conn.execute(text("UPDATE c SET n = n + 1"))
    assert time.monotonic() - began < 5
    with engine.connect() as conn:
        assert conn.execute(text("SELECT n FROM c")).scalar() == 1  # rolled back, not kept
    engine.dispose()


def test_a_writer_interrupted_while_waiting_for_its_turn_leaves_nothing_taken(tmp_path):
    holders = {name: _Holder() for name in ("other", "me")}
    path = tmp_path / "index.sqlite"
    other = WriterGate(path, timeout=5)  # its own open file: as another process
    assert other.enter(holders["other"]) == ENTERED
    gate = gate_for(path, timeout=5)

    def interrupt(_signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    try:
        with pytest.raises(KeyboardInterrupt):
            gate.enter(holders["me"])  # waits for the other's turn: Ctrl-C
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    other.leave(holders["other"])
    began = time.monotonic()
    assert gate.enter(holders["me"]) == ENTERED  # at once: nothing of the interrupted wait stayed
    assert time.monotonic() - began < 1
    gate.leave(holders["me"])


def test_a_writer_held_up_is_refused_after_one_busy_timeout_not_two(tmp_path, monkeypatch):
    monkeypatch.setattr(database, "BUSY_TIMEOUT", 1)
    path = tmp_path / "index.sqlite"
    engine = _counter(path)
    with _writing_elsewhere(path):
        began = time.monotonic()
        with pytest.raises(OperationalError, match="locked"), engine.begin() as conn:
            conn.execute(text("UPDATE c SET n = n + 1"))
        assert time.monotonic() - began < 1.8  # the gate's wait and SQLite's are one
    with engine.begin() as conn:  # and the turn given up leaves the gate usable
        conn.execute(text("UPDATE c SET n = n + 1"))
    engine.dispose()
