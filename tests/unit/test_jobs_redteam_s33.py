"""Red team of the job queue and the periodic tasks (session 33): what a worker does with a
job it cannot open or a handler that leaves by ``sys.exit``, errors that must not end a
worker for good, periodic records kept for their whole period, jobs of a kind no instance
runs any more, secret and oversized parameters. On SQLite and on PostgreSQL; two queues on
one index stand for two instances."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import Engine, select, update
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError

from imageshare.domain.errors import ConfigurationError, ImageShareError, PayloadTooLarge
from imageshare.jobs import DatabaseJobQueue, Job, JobInterrupted
from imageshare.jobs.periodic import PeriodicTask, PeriodicTasks
from imageshare.storage.index.schema import background_jobs
from imageshare.storage.secret_box import SecretBox
from tests.unit.test_job_queue import _queue, engine  # noqa: F401 - the fixture


def _wait(queue: DatabaseJobQueue, job: Job, timeout: float = 10.0) -> Job:
    deadline = time.monotonic() + timeout
    current = queue.get(job.id, job.owner)
    while time.monotonic() < deadline:
        current = queue.get(job.id, job.owner)
        if current.state in ("done", "failed", "cancelled"):
            return current
        time.sleep(0.05)
    raise AssertionError(f"job still {current.state} after {timeout} s")


def _row(engine: Engine, job_id: str) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.execute(select(background_jobs).where(
            background_jobs.c.public_id == job_id)).mappings().one())


# -- a worker goes on, whatever one job does -------------------------------------------------


def test_a_job_sealed_with_another_key_fails_with_the_reason_and_the_worker_goes_on(engine):
    # Two instances whose secret keys differ (a warning at start, not a refusal): the one
    # that cannot open a job's secret parameters once lost a worker thread for good on it.
    submitting = _queue(engine, box=SecretBox(Fernet.generate_key()))
    notes: list = []
    running = _queue(engine, notes, box=SecretBox(Fernet.generate_key()), workers=1)
    ran: list[str] = []
    running.register("export", lambda job, params: ran.append(job.id))
    try:
        sealed = submitting.submit("alice", "export", "Export", {},
                                   secret_params={"password": "correct horse"})
        submitting.close()
        running.start()
        failed = _wait(running, sealed)
        plain = running.submit("alice", "export", "Export", {})
        assert _wait(running, plain).state == "done"
    finally:
        running.close()
    assert failed.state == "failed" and "secret key" in failed.error
    assert failed.attempts == 3  # retried (another instance may hold the key), then told
    assert ran == [plain.id]
    assert notes[0][:2] == ("alice", "job.failed") and "correct horse" not in str(notes)


def test_a_handler_that_calls_sys_exit_fails_its_job_and_the_worker_runs_the_next(engine):
    notes: list = []
    queue = _queue(engine, notes, workers=1, retry_delays=())

    def exits(job: Job, params: dict) -> None:
        raise SystemExit(3)  # what a library's command-line code does on an error

    queue.register("broken", exits)
    queue.register("export", lambda job, params: None)
    try:
        broken = queue.submit("alice", "broken", "Broken", {})
        assert _wait(queue, broken).state == "failed"
        assert _wait(queue, queue.submit("alice", "export", "Export", {})).state == "done"
    finally:
        queue.close()
    assert queue.get(broken.id, "alice").error == "stopped on an error (SystemExit)"
    assert notes[0][:2] == ("alice", "job.failed")


def test_a_keyboard_interrupt_while_running_jobs_here_hands_the_job_back_uncounted(engine):
    queue = _queue(engine)
    assert queue.submit_once("export:1", "export", "Export", {}, owner="alice")
    queue.close()  # its workers stop: the job runs in this (the main) thread below
    queue._stop.clear()

    def interrupted(job: Job, params: dict) -> None:
        raise KeyboardInterrupt

    queue.register("export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        queue.run_pending()
    with engine.connect() as conn:
        row = conn.execute(select(background_jobs)).mappings().one()
    assert row["state"] == "queued" and row["attempts"] == 0 and row["lease_owner"] is None


def test_a_worker_lives_on_after_an_unexpected_error_while_claiming(engine, monkeypatch):
    queue = _queue(engine, workers=1)
    queue.register("export", lambda job, params: None)
    claim = queue._claim
    failures: list[int] = []

    def pool_exhausted() -> Any:
        if not failures:
            failures.append(1)
            raise SQLAlchemyTimeoutError("QueuePool limit reached")  # not a DBAPIError
        return claim()

    monkeypatch.setattr(queue, "_claim", pool_exhausted)
    try:
        job = queue.submit("alice", "export", "Export", {})
        assert _wait(queue, job).state == "done"
    finally:
        queue.close()
    assert failures == [1]


def test_the_periodic_tasks_live_on_after_an_unexpected_error():
    class Queue:
        def __init__(self) -> None:
            self.calls = 0
            self.queued = threading.Event()

        def submit_once(self, *args: Any, **kwargs: Any) -> bool:
            self.calls += 1
            if self.calls == 1:
                raise SQLAlchemyTimeoutError("QueuePool limit reached")  # not a DBAPIError
            self.queued.set()
            return True

    queue = Queue()
    tasks = PeriodicTasks(queue, [PeriodicTask("retention", 1.0, "Retention")])  # type: ignore[arg-type]
    tasks.start()
    try:
        assert queue.queued.wait(5), "the periodic thread ended on the first error"
    finally:
        tasks.stop()


def test_a_job_whose_instances_died_on_every_attempt_fails_and_its_owner_is_told(engine):
    notes: list = []
    queue = _queue(engine, notes)
    job = queue.submit("alice", "export", "Export", {})
    queue.close()
    queue._stop.clear()
    queue.register("export", lambda job, params: pytest.fail("run a fourth time"))
    with engine.begin() as conn:  # its third attempt's instance was killed mid-job
        conn.execute(update(background_jobs).values(
            state="running", attempts=3, lease_owner="gone:1:ab/1",
            lease_expires=datetime.now(UTC) - timedelta(seconds=1)))
    assert queue.run_pending() == 0
    failed = queue.get(job.id, "alice")
    assert failed.state == "failed" and failed.attempts == 4
    assert failed.error == "its instance stopped while running it 3 times"
    assert notes == [("alice", "job.failed", f"Export: failed ({failed.error})",
                      f"/jobs/{job.id}")]


def test_a_job_claimed_as_its_instance_closes_is_handed_back_not_run_unwatched(
        engine, monkeypatch):
    queue = _queue(engine)
    assert queue.submit_once("export:1", "export", "Export", {}, owner="alice")
    queue.close()  # its workers stop: the claim below is made in this thread
    queue._stop.clear()
    queue.register("export", lambda job, params: pytest.fail("ran after the close"))
    read = queue._job

    def closing_meanwhile(row: Any) -> Job:  # close() runs between the claim and its start
        queue._stop.set()
        return read(row)

    monkeypatch.setattr(queue, "_job", closing_meanwhile)
    assert queue._claim() is None
    with engine.connect() as conn:
        row = conn.execute(select(background_jobs)).mappings().one()
    assert row["state"] == "queued" and row["attempts"] == 0 and row["lease_owner"] is None


def test_a_job_its_service_interrupts_while_the_queue_runs_on_is_not_taken_back_at_once(
        engine):
    # A push whose transfer service is stopping (it closes just before the queue) raises
    # JobInterrupted: handed back uncounted, but not claimed again here in a tight loop.
    queue = _queue(engine, workers=1)
    calls: list[float] = []

    def stopping_service(job: Job, params: dict) -> None:
        calls.append(time.monotonic())
        raise JobInterrupted

    queue.register("push", stopping_service)
    try:
        job = queue.submit("alice", "push", "Send", {})
        time.sleep(1.0)
    finally:
        queue.close()
    assert 1 <= len(calls) <= 2
    row = _row(engine, job.id)
    assert row["state"] == "queued" and row["attempts"] == 0


def test_a_job_running_longer_than_a_job_may_is_stopped_retried_and_then_failed(engine):
    notes: list = []
    queue = _queue(engine, notes, workers=1, retry_delays=(0.1,), max_run_seconds=0.5)
    runs: list[str] = []

    def never_ends(job: Job, params: dict) -> None:  # e.g. a peer that never answers
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            job.done = 0  # a progress point
            time.sleep(0.05)
        runs.append("ran to its end")

    queue.register("retrieve", never_ends)
    try:
        failed = _wait(queue, queue.submit("alice", "retrieve", "Retrieve", {}), timeout=9)
    finally:
        queue.close()
    assert failed.state == "failed" and failed.attempts == 2 and runs == []
    assert failed.error == "it ran longer than a job may run"
    assert notes == [("alice", "job.failed", "Retrieve: failed (it ran longer than a job may "
                      "run)", f"/jobs/{failed.id}")]


def test_a_hung_handler_with_no_progress_point_lets_its_lease_run_out(engine):
    queue = _queue(engine, workers=1, lease_seconds=3.0, max_run_seconds=0.2)
    started, release = threading.Event(), threading.Event()

    def hung(job: Job, params: dict) -> None:
        started.set()
        release.wait(20)

    queue.register("retrieve", hung)
    try:
        job = queue.submit("alice", "retrieve", "Retrieve", {})
        assert started.wait(10)
        claimed_until = _row(engine, job.id)["lease_expires"]
        time.sleep(2.5)  # renewed by now at a third of the lease, were it not too long
        assert _row(engine, job.id)["lease_expires"] == claimed_until
    finally:
        release.set()
        queue.close()


def test_a_refusal_whose_words_hold_a_nul_ends_failed_at_once_on_both_databases(engine):
    # PostgreSQL refuses NUL in text: the end of the job was not saved there, and the job
    # ran again (a refusal retried) until its instance had "stopped" running it 3 times.
    notes: list = []
    queue = _queue(engine, notes, workers=1)
    runs: list[int] = []

    def refuses(job: Job, params: dict) -> None:
        runs.append(1)
        job.summary = "read 1 file\x00"
        raise ImageShareError("the file's patient name 'DOE^J\x00' is not valid")

    queue.register("export", refuses)
    try:
        failed = _wait(queue, queue.submit("alice", "export", "Export", {}))
    finally:
        queue.close()
    assert failed.state == "failed" and runs == [1]
    assert failed.error == "the file's patient name 'DOE^J' is not valid"
    assert "\x00" not in str(notes)


# -- periodic tasks: once per period, however long the period -------------------------------


def test_a_periodic_task_with_a_month_long_period_is_not_run_again_within_it(engine):
    month = 30 * 86400.0
    start = 1000 * month + 10.0
    now = [start]
    queue = _queue(engine)
    ran: list[int] = []
    tasks = PeriodicTasks(queue, [PeriodicTask("retention", month, "Retention")],
                          clock=lambda: now[0])
    try:
        assert tasks.queue_due() == ["retention"]
        queue.close()  # its workers stop: the job runs in this thread below
        queue._stop.clear()
        queue.register("retention", lambda job, params: ran.append(params["period"]))
        with engine.begin() as conn:  # due now, not in a minute
            conn.execute(update(background_jobs).values(run_after=datetime.now(UTC)))
        assert queue.run_pending() == 1
        with engine.begin() as conn:  # finished a minute into the period, in its clock
            conn.execute(update(background_jobs).values(
                finished_at=datetime.fromtimestamp(start + 60, UTC)))
        now[0] = start + 9 * 86400  # nine days later: the housekeeping has run meanwhile
        queue.forget_finished(datetime.fromtimestamp(now[0], UTC))
        assert tasks.queue_due() == []
        now[0] = start + 25 * 86400
        queue.forget_finished(datetime.fromtimestamp(now[0], UTC))
        assert tasks.queue_due() == []
        now[0] = start + month + 9 * 86400  # the next period: its own job; the old record goes
        assert tasks.queue_due() == ["retention"]
        assert queue.forget_finished(datetime.fromtimestamp(now[0], UTC)) == 1
    finally:
        queue.close()
    assert ran == [1000]


def test_records_of_other_named_jobs_are_forgotten_after_eight_days_as_before(engine):
    queue = _queue(engine)
    assert queue.submit_once("push:abc@7:12", "push", "Send", {}, owner="alice")
    queue.close()  # its workers stop: the job runs in this thread below
    queue._stop.clear()
    queue.register("push", lambda job, params: None)
    assert queue.run_pending() == 1
    later = datetime.now(UTC) + timedelta(days=9)
    assert queue.forget_finished(later) == 1


# -- a job no instance runs any more ----------------------------------------------------------


def test_a_job_of_a_kind_no_instance_runs_fails_with_the_reason_after_a_day(engine):
    notes: list = []
    queue = _queue(engine, notes)
    queue.register("export", lambda job, params: None)
    queue.close()  # only the housekeeping below
    old = queue.submit("alice", "dicomdir-v1", "CD image", {})  # a kind an upgrade dropped
    young = queue.submit("alice", "dicomdir-v1", "CD image", {})
    with engine.begin() as conn:
        conn.execute(update(background_jobs).where(background_jobs.c.public_id == old.id)
                     .values(run_after=datetime.now(UTC) - timedelta(days=2)))
    queue.forget_finished()
    failed = queue.get(old.id, "alice")
    assert failed.state == "failed" and "no ImageShare instance" in failed.error
    assert queue.get(young.id, "alice").state == "queued"  # perhaps an instance not yet up
    assert notes == [("alice", "job.failed", f"CD image: failed ({failed.error})",
                      f"/jobs/{old.id}")]


def test_a_queue_without_handlers_fails_no_job(engine):
    queue = _queue(engine)  # e.g. a command that only tidies up
    queue.close()
    job = queue.submit("alice", "export", "Export", {})
    with engine.begin() as conn:
        conn.execute(update(background_jobs).values(
            run_after=datetime.now(UTC) - timedelta(days=2)))
    queue.forget_finished()
    assert queue.get(job.id, "alice").state == "queued"


# -- parameters ------------------------------------------------------------------------------


def test_secret_parameters_are_refused_when_there_is_no_key_to_seal_them(engine):
    queue = _queue(engine)  # no SecretBox
    queue.close()
    with pytest.raises(ConfigurationError):
        queue.submit("alice", "export", "Export", {}, secret_params={"password": "hunter2"})
    with engine.connect() as conn:
        assert conn.execute(select(background_jobs.c.pk)).first() is None


def test_oversized_parameters_are_refused_before_anything_is_stored(engine):
    queue = _queue(engine)
    queue.close()
    with pytest.raises(PayloadTooLarge):
        queue.submit("alice", "export", "Export", {"uids": ["1.2.3." + "9" * 58] * 40000})
    with engine.connect() as conn:
        assert conn.execute(select(background_jobs.c.pk)).first() is None


def test_parameters_json_cannot_keep_are_refused_alike_on_both_databases(engine):
    queue = _queue(engine)
    queue.close()
    for params in ({"ratio": float("nan")}, {"when": datetime.now(UTC)}):
        with pytest.raises(ImageShareError):
            queue.submit("alice", "export", "Export", params)
    with engine.connect() as conn:
        assert conn.execute(select(background_jobs.c.pk)).first() is None


# -- two instances, many workers: each job exactly once ---------------------------------------


def test_two_instances_with_several_workers_run_each_job_exactly_once(engine):
    ran: list[int] = []
    lock = threading.Lock()

    def export(job: Job, params: dict) -> None:
        with lock:
            ran.append(params["n"])
        time.sleep(0.01)

    queues = [_queue(engine, workers=3), _queue(engine, workers=3)]
    for queue in queues:
        queue.register("export", export)
    try:
        jobs = [queues[n % 2].submit("alice", "export", "Export", {"n": n}) for n in range(30)]
        for job in jobs:
            assert _wait(queues[0], job, timeout=30).state == "done"
    finally:
        for queue in queues:
            queue.close()
    assert sorted(ran) == list(range(30))
    with engine.connect() as conn:
        assert set(conn.execute(select(background_jobs.c.attempts)).scalars()) == {1}


def test_the_longest_a_job_may_run_is_a_setting(tmp_path):
    """A large backup may need more than a day, a small installation may want hung jobs
    failed sooner: ``job_max_run_seconds`` reaches the queue; less than a minute is refused."""
    from imageshare.domain.errors import ConfigurationError
    from tests.conftest import make_archive

    built = make_archive(tmp_path / "a", job_max_run_seconds=7200)
    try:
        assert built.jobs._max_run == 7200
    finally:
        built.close()
    with pytest.raises(ConfigurationError, match="job_max_run_seconds is a number of 60"):
        make_archive(tmp_path / "b", job_max_run_seconds=5)
