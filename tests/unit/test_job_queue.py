"""The job queue shared by instances (imageshare/jobs): on SQLite and on PostgreSQL, two
queues on one index stand for two instances."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import Engine, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError

from imageshare.domain.errors import ImageShareError, NotFound
from imageshare.jobs import DatabaseJobQueue, Job, JobInterrupted
from imageshare.jobs.periodic import PeriodicTask, PeriodicTasks
from imageshare.storage.index.database import make_engine, migrate
from imageshare.storage.index.schema import background_jobs
from imageshare.storage.secret_box import SecretBox


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    url = (request.getfixturevalue("postgres").new_database()
           if request.param == "postgresql" else f"sqlite:///{tmp_path / 'index.sqlite'}")
    built = make_engine(url)
    migrate(built)
    yield built
    built.dispose()


def _queue(engine: Engine, notes: list | None = None, **options: object) -> DatabaseJobQueue:
    queue = DatabaseJobQueue(engine, lease_seconds=options.pop("lease_seconds", 60.0),
                             retry_delays=options.pop("retry_delays", (0.1, 0.1)),
                             poll_seconds=0.1, **options)  # type: ignore[arg-type]
    if notes is not None:
        queue.set_notify(lambda *note: notes.append(note))
    return queue


def _wait(queue: DatabaseJobQueue, job: Job, timeout: float = 20.0) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = queue.get(job.id, job.owner)
        if current.state in ("done", "failed", "cancelled"):
            return current
        time.sleep(0.05)
    raise AssertionError(f"job still {current.state}")


def test_a_job_that_fails_once_is_retried_and_its_owner_is_told_it_is_done(engine):
    notes: list = []
    queue = _queue(engine, notes)
    calls = []

    def flaky(job: Job, params: dict) -> None:
        calls.append(params["n"])
        if len(calls) == 1:
            raise OSError("the disk hiccuped")
        job.done, job.total, job.summary = 3, 3, "3 file(s) exported"

    queue.register("export", flaky)
    try:
        job = queue.submit("clinician1", "export", "Export of 3 instance(s)", {"n": 7})
        finished = _wait(queue, job)
    finally:
        queue.close()
    assert finished.state == "done" and finished.attempts == 2 and calls == [7, 7]
    assert finished.percent == 100 and finished.summary == "3 file(s) exported"
    assert notes == [("clinician1", "job.done",
                      "Export of 3 instance(s): done (3 file(s) exported)", f"/jobs/{job.id}")]


def test_a_job_failing_every_time_ends_failed_with_the_reason_after_its_last_retry(engine):
    notes: list = []
    queue = _queue(engine, notes)
    attempts = []

    def broken(job: Job, params: dict) -> None:
        attempts.append(time.monotonic())
        raise ConnectionError("site unreachable")

    queue.register("retrieve", broken)
    try:
        finished = _wait(queue, queue.submit("radiographer1", "retrieve", "Retrieve", {}))
    finally:
        queue.close()
    assert finished.state == "failed" and finished.attempts == 3 == len(attempts)
    assert finished.error == "stopped on an error (ConnectionError)"
    assert attempts[1] - attempts[0] >= 0.1  # the pause before a retry
    assert notes[0][:2] == ("radiographer1", "job.failed") and "failed" in notes[0][2]


def test_a_refusal_is_not_retried(engine):
    queue = _queue(engine)
    attempts = []

    def refuses(job: Job, params: dict) -> None:
        attempts.append(1)
        raise ImageShareError("the export's file names carry identifying data")

    queue.register("export", refuses)
    try:
        finished = _wait(queue, queue.submit("u", "export", "Export", {}))
    finally:
        queue.close()
    assert finished.state == "failed" and len(attempts) == 1
    assert finished.error == "the export's file names carry identifying data"


def test_a_job_whose_instance_died_is_finished_by_another_once_its_lease_runs_out(engine):
    # Long leases, so a slow machine cannot run one out early; the end of the lease is
    # reached by moving its expiry into the past, as the clock would.
    dying = _queue(engine, lease_seconds=60.0)
    job = dying.submit_once("one-export", "export", "Export", {"n": 1}, owner="u")
    dying.close()  # its workers stop; it takes the job below, then dies without a word
    dying._stop.clear()
    dying.register("export", lambda job, params: None)
    claimed = dying._claim()
    assert claimed is not None and claimed[1].state == "running"
    dying._stop.set()

    survivor = _queue(engine, lease_seconds=60.0)
    ran = []
    survivor.register("export", lambda job, params: ran.append(params["n"]))
    assert survivor.run_pending() == 0  # leased: nobody else runs it yet
    with engine.begin() as conn:
        conn.execute(background_jobs.update().values(
            lease_expires=datetime.now(UTC) - timedelta(seconds=1)))
    assert survivor.run_pending() == 1 and ran == [1]
    with engine.connect() as conn:
        row = conn.execute(select(background_jobs)).mappings().one()
    assert job and row["state"] == "done" and row["attempts"] == 2
    assert row["lease_owner"] is None


def test_a_running_job_keeps_its_lease_while_its_instance_lives(engine):
    first = _queue(engine, lease_seconds=2.0)
    release = threading.Event()
    first.register("export", lambda job, params: release.wait(10))
    second = _queue(engine, lease_seconds=2.0)
    second.register("export", lambda job, params: pytest.fail("ran twice"))
    try:
        job = first.submit("u", "export", "Export", {})
        time.sleep(5.0)  # two and a half leases: the heartbeat renewed it
        assert second.run_pending() == 0
        release.set()
        assert _wait(first, job).state == "done"
    finally:
        release.set()
        first.close()


def test_a_job_interrupted_by_a_shutdown_goes_back_to_the_queue_without_counting(engine):
    stopping = _queue(engine)
    assert stopping.submit_once("push:1", "push", "Send", {}, owner="u")
    stopping.close()  # its workers stop; the job is run once below
    stopping._stop.clear()

    def interrupted(job: Job, params: dict) -> None:
        raise JobInterrupted

    stopping.register("push", interrupted)
    claimed = stopping._claim()
    assert claimed is not None
    stopping._execute(*claimed)
    with engine.connect() as conn:
        row = conn.execute(select(background_jobs)).mappings().one()
    assert row["state"] == "queued" and row["attempts"] == 0


def test_only_a_job_that_has_not_started_can_be_cancelled_and_only_by_its_owner(engine):
    queue = _queue(engine)  # no handler registered: nothing runs
    job = queue.submit("alice", "export", "Export", {})
    queue.close()
    with pytest.raises(NotFound):
        queue.cancel(job.id, "mallory")
    assert queue.cancel(job.id, "alice").state == "cancelled"
    with pytest.raises(ImageShareError):
        queue.cancel(job.id, "alice")


def test_secret_parameters_are_sealed_in_the_index_and_open_for_the_handler(engine):
    box = SecretBox(Fernet.generate_key())
    queue = _queue(engine, box=box)
    seen = []
    queue.register("export", lambda job, params: seen.append(params))
    try:
        _wait(queue, queue.submit("u", "export", "Export", {"format": "zip"},
                                  secret_params={"password": "correct horse"}))
    finally:
        queue.close()
    assert seen == [{"format": "zip", "password": "correct horse"}]
    with engine.connect() as conn:
        row = conn.execute(select(background_jobs)).mappings().one()
    assert "correct horse" not in str(dict(row))


def test_a_periodic_task_is_queued_once_per_period_across_instances(engine):
    now = [3600 * 1000 + 10.0]
    queues = [_queue(engine), _queue(engine)]
    schedules = [PeriodicTasks(q, [PeriodicTask("retention", 3600, "Retention")],
                               clock=lambda: now[0]) for q in queues]
    try:
        assert [s.queue_due() for s in schedules] == [["retention"], []]
        now[0] += 1800  # same period
        assert [s.queue_due() for s in schedules] == [[], []]
        now[0] += 1800  # the next one
        assert [s.queue_due() for s in reversed(schedules)] == [["retention"], []]
    finally:
        for q in queues:
            q.close()
    with engine.connect() as conn:
        assert len(conn.execute(select(background_jobs.c.pk)).all()) == 2


# -- leases: one instance at a time runs a job, whatever the database and the clocks do ---------


class _Outage:
    """The index as one instance reaches it: away (every connection refused) while ``down``
    is set, as in a network or database outage that the other instances do not have."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.down = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def _reach(self) -> None:
        if self.down.is_set():
            raise OperationalError("connect", None, ConnectionRefusedError("index away"))

    def begin(self) -> Any:
        self._reach()
        return self.engine.begin()

    def connect(self) -> Any:
        self._reach()
        return self.engine.connect()


def _lease_expires(engine: Engine) -> datetime:
    with engine.connect() as conn:
        return conn.execute(select(background_jobs.c.lease_expires)).scalar_one()


def _until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


def test_a_lease_not_renewed_in_an_outage_is_renewed_within_a_second_of_its_end(engine):
    # A 12 s lease is renewed at 4 s and given up at 9 s; the index is away from 3 s to
    # 5.3 s, so the renewal at 4 s fails and a try a second or so later succeeds by 7.3 s
    # (not only a third of the lease later, at 8 s: two failed tries in a row then let the
    # lease run out while the job still ran).
    index = _Outage(engine)
    first = _queue(index, lease_seconds=12.0, workers=1)  # type: ignore[arg-type]
    started, release, stopped = threading.Event(), threading.Event(), []

    def export(job: Job, params: dict) -> None:
        started.set()
        try:
            while not release.wait(0.1):
                job.done = 0  # a progress point, with nothing new to save
        except JobInterrupted:
            stopped.append(job.interrupted)
            raise

    first.register("export", export)
    second = _queue(engine, lease_seconds=12.0)
    ran = []
    second.register("export", lambda job, params: ran.append(job.id))
    try:
        job = first.submit("u", "export", "Export", {})
        assert started.wait(10)
        began, claimed_until = time.monotonic(), _lease_expires(engine)
        _until(began + 3.0)
        index.down.set()
        _until(began + 5.3)
        index.down.clear()
        renewed = False
        while not renewed and time.monotonic() < began + 7.3:
            assert second.run_pending() == 0  # the first still holds it
            renewed = _lease_expires(engine) > claimed_until
            time.sleep(0.1)
        assert renewed, "the lease was not renewed within a second or so of the outage"
        release.set()
        assert _wait(first, job).state == "done"
    finally:
        release.set()
        first.close()
    assert ran == [] and stopped == []


def test_a_handler_whose_lease_runs_out_in_an_outage_stops_before_another_instance_runs_it(
        engine):
    # A 6 s lease is renewed at 2 s and given up at 4.5 s: the index stays away from the
    # first instance, whose handler must have stopped before the lease runs out at 6 s and
    # the second instance takes the job; what the first would have made is not recorded.
    index = _Outage(engine)
    first = _queue(index, lease_seconds=6.0, workers=1)  # type: ignore[arg-type]
    second = _queue(engine, lease_seconds=6.0)
    events: list[str] = []
    started = threading.Event()

    def export_first(job: Job, params: dict) -> None:
        events.append("first started")
        started.set()
        try:
            deadline = time.monotonic() + 15.0
            while time.monotonic() < deadline:
                job.done += 1  # a progress point
                time.sleep(0.05)
            job.summary, job.result = "made by the first", "first-result"
        except JobInterrupted:
            events.append("first stopped")
            raise

    def export_second(job: Job, params: dict) -> None:
        events.append("second started")
        job.summary, job.result = "made by the second", "second-result"

    first.register("export", export_first)
    second.register("export", export_second)
    try:
        job = first.submit("u", "export", "Export", {})
        assert started.wait(10)
        began = time.monotonic()
        index.down.set()
        # The lease as the first instance last renewed it (it renews no more).
        with engine.connect() as conn:
            lease_end = conn.execute(select(background_jobs.c.lease_expires)).scalar()
        while not second.run_pending():
            assert time.monotonic() < began + 15.0, "the second instance never took it"
            time.sleep(0.05)
        taken_at = datetime.now(UTC)
        index.down.clear()
        finished = _wait(second, job)
    finally:
        index.down.clear()
        first.close()
    assert events == ["first started", "first stopped", "second started"]
    # not before the lease ran out in the database (times there are UTC)
    assert lease_end is not None
    assert taken_at >= (lease_end.astimezone(UTC) if lease_end.tzinfo
                        else lease_end.replace(tzinfo=UTC))
    assert finished.state == "done" and finished.summary == "made by the second"
    assert finished.result == "second-result" and finished.attempts == 2


def test_a_handler_whose_job_was_taken_over_is_interrupted_and_changes_nothing(engine):
    first = _queue(engine, lease_seconds=3.0, workers=1)  # renewed every second
    started, outcome = threading.Event(), []

    def export(job: Job, params: dict) -> None:
        started.set()
        try:
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline:
                job.done += 1
                time.sleep(0.05)
            job.summary, job.result = "made by the first", "first-result"
            outcome.append("finished")
        except JobInterrupted as exc:
            outcome.append(str(exc))
            raise

    first.register("export", export)
    try:
        job = first.submit("u", "export", "Export", {})
        assert started.wait(10)
        with engine.begin() as conn:  # as another instance does once the lease ran out
            conn.execute(background_jobs.update().values(
                lease_owner="elsewhere:1:cafe/1", summary="made elsewhere", done=0,
                lease_expires=datetime.now(UTC) + timedelta(minutes=1)))
        deadline = time.monotonic() + 5.0
        while not outcome and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # what the first might still write
    finally:
        first.close()
    assert outcome == ["its lease went to another instance"]
    with engine.connect() as conn:
        row = conn.execute(select(background_jobs)).mappings().one()
    assert row["state"] == "running" and row["lease_owner"] == "elsewhere:1:cafe/1"
    assert row["summary"] == "made elsewhere" and row["done"] == 0
    assert job.id == row["public_id"] and row["result"] is None


@pytest.fixture
def postgresql_engine(postgres) -> Iterator[Engine]:
    """An index on PostgreSQL only (SQLite is a file on one host: its instances share one
    clock)."""
    built = make_engine(postgres.new_database())
    migrate(built)
    yield built
    built.dispose()


def test_a_host_whose_clock_is_behind_cannot_shorten_its_lease_on_postgresql(
        postgresql_engine):
    engine = postgresql_engine
    behind = _queue(engine, lease_seconds=60.0, workers=1)
    behind.now = lambda: datetime.now(UTC) - timedelta(minutes=5)  # type: ignore[method-assign]
    release = threading.Event()
    behind.register("export", lambda job, params: release.wait(10))
    second = _queue(engine, lease_seconds=60.0)
    ran = []
    second.register("export", lambda job, params: ran.append(job.id))
    try:
        job = behind.submit("u", "export", "Export", {})
        deadline = time.monotonic() + 10.0
        while behind.get(job.id, "u").state != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert second.run_pending() == 0 and ran == []
        release.set()
        assert _wait(behind, job).state == "done"
    finally:
        release.set()
        behind.close()


def test_a_job_still_running_when_its_instance_stops_is_handed_back_at_its_progress_point(
        engine):
    stopping = _queue(engine, workers=1)
    started, outcome = threading.Event(), []

    def export(job: Job, params: dict) -> None:
        started.set()
        try:
            for _ in range(200):
                job.done += 1
                time.sleep(0.05)
        except JobInterrupted as exc:
            outcome.append(str(exc))
            raise

    stopping.register("export", export)
    stopping.submit("u", "export", "Export", {})
    assert started.wait(10)
    stopping.close()
    assert outcome == ["its instance stopped"]
    with engine.connect() as conn:
        row = conn.execute(select(background_jobs)).mappings().one()
    assert row["state"] == "queued" and row["attempts"] == 0 and row["lease_owner"] is None
    assert row["error"] == "its instance stopped; queued again"


def test_a_handler_with_no_progress_point_keeps_its_lease_once_the_index_is_back(engine):
    """The index is away for most of a lease, then back before it runs out: the handler
    (which had no progress point meanwhile) goes on, its lease renewed again, and no other
    instance runs the job while it does."""
    index = _Outage(engine)
    first = _queue(index, lease_seconds=4.0, workers=1)
    second = _queue(engine, lease_seconds=4.0)
    events, started = [], threading.Event()

    def slow(job: Job, params: dict) -> None:
        events.append("first started")
        started.set()
        time.sleep(6.0)
        events.append("first ended")
        job.summary = "made here"

    first.register("export", slow)
    second.register("export", lambda job, params: events.append("second started"))
    first.start()
    try:
        job = first.submit("u", "export", "Export", {})
        assert started.wait(10)
        begun = time.monotonic()
        _until(begun + 0.2)
        index.down.set()
        _until(begun + 3.3)  # given up here at 3 s; the lease in the index lasts to 4 s
        index.down.clear()
        while time.monotonic() < begun + 8.0:
            second.run_pending()
            time.sleep(0.1)
        assert events == ["first started", "first ended"], events
        done = _wait(first, job)
        assert done.state == "done" and done.summary == "made here"
    finally:
        first.close()


def test_a_lease_heartbeat_error_of_any_kind_is_tried_again_not_fatal(engine, monkeypatch):
    """One renewal fails with an error that is not the database's (a pool timed out): the
    heartbeat lives on, and the job ends done once, not stopped and run again and again."""
    queue = _queue(engine, lease_seconds=2.0, workers=1)
    renew = queue._renew
    failed: list = []

    def once_a_pool_timeout(item: Any) -> None:
        if not failed:
            failed.append(item)
            raise SQLAlchemyTimeoutError("QueuePool limit reached")
        renew(item)

    monkeypatch.setattr(queue, "_renew", once_a_pool_timeout)
    runs = []

    def work(job: Job, params: dict) -> None:
        runs.append(job.id)
        for _ in range(30):
            job.done += 1
            time.sleep(0.1)

    queue.register("export", work)
    queue.start()
    try:
        job = _wait(queue, queue.submit("u", "export", "Export", {}))
        assert job.state == "done" and failed and len(runs) == 1
    finally:
        queue.close()


def test_a_job_still_running_when_its_instance_stops_is_not_run_elsewhere_meanwhile(engine):
    """An instance stops while a handler with no progress point runs: the job is not handed
    to another instance at once (both would run it); the handler, finishing, ends it done
    (had this process ended first, its lease would run out and another instance take it)."""
    first, second = _queue(engine, lease_seconds=3.0, workers=1), _queue(engine)
    events, started = [], threading.Event()

    def slow(job: Job, params: dict) -> None:
        events.append("first started")
        started.set()
        time.sleep(1.5)
        events.append("first ended")

    first.register("export", slow)
    second.register("export", lambda job, params: events.append("second started"))
    first.start()
    job = first.submit("u", "export", "Export", {})
    assert started.wait(10)
    first.close()
    assert second.run_pending() == 0 and events == ["first started"]
    deadline = time.monotonic() + 10
    while first.get(job.id, "u").state != "done":
        assert time.monotonic() < deadline, events
        time.sleep(0.1)
    assert second.run_pending() == 0
    assert events == ["first started", "first ended"]
