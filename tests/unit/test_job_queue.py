"""The job queue shared by instances (imageshare/jobs): on SQLite and on PostgreSQL, two
queues on one index stand for two instances."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import Engine, select

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
