"""The job queue: jobs are rows of the index, run by whichever instance leases them first.

A job is queued with its kind and parameters (JSON; secrets sealed with the installation's
key). Each instance's workers claim a due job with one conditional UPDATE (on PostgreSQL the
candidate is picked with ``FOR UPDATE SKIP LOCKED``; SQLite has one writer at a time), hold a
lease on it that a heartbeat renews while the handler runs, and write progress with the
heartbeat. A handler that raises is retried after a pause (``retry_delays``) unless the error
is a refusal that a retry cannot change; a worker that dies stops renewing its lease and
another instance takes the job again once the lease has run out. Every job ends ``done`` or
``failed`` with the reason (or ``cancelled`` before it ran), and the person who started it
is told.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from sqlalchemy import Engine, and_, delete, insert, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from imageshare.domain.actors import Actor
from imageshare.domain.errors import (
    AuditUnavailable,
    ImageShareError,
    NotFound,
    OutOfResources,
    ServiceBusy,
    StorageError,
)
from imageshare.storage.index.schema import background_jobs as jobs_table
from imageshare.storage.secret_box import SecretBox

log = logging.getLogger("imageshare.jobs")

State = Literal["queued", "running", "done", "failed", "cancelled"]
FINISHED = ("done", "failed", "cancelled")
KEEP = timedelta(hours=24)  # finished jobs (and their result files) are kept this long
KEEP_PERIODIC = timedelta(days=8)  # the record that a periodic task ran in its period


@dataclass
class Job:
    """One piece of background work and how far it got (a handler updates ``done``,
    ``total``, ``summary`` and ``result`` as it goes)."""

    id: str
    owner: str
    kind: str
    description: str
    state: State = "queued"
    total: int = 0
    done: int = 0
    error: str = ""
    result: str | None = None
    summary: str = ""
    attempts: int = 0
    created: float = field(default_factory=time.time)

    @property
    def percent(self) -> int:
        """Progress in percent."""
        if self.state == "done":
            return 100
        return min(100, int(100 * self.done / self.total)) if self.total else 0


Handler = Callable[[Job, dict[str, Any]], None]
Notify = Callable[[str, str, str, str], None]  # username, kind, text, link


class JobInterrupted(Exception):
    """Raised by a handler when its instance is stopping: the job goes back to the queue at
    once (the attempt is not counted) and another instance, or this one's next start, runs
    it."""


class JobElsewhere(Exception):
    """Raised by a handler whose job needs what only another instance keeps (files in its
    data dir): the job goes back to the queue for a moment (the attempt is not counted) so
    that another instance takes it. The message says why."""


ELSEWHERE_DELAY = 2.0  # seconds before a job that belongs elsewhere may be taken again


class JobQueue(Protocol):
    """The port: background work kept as records, handlers registered by kind."""

    def register(self, kind: str, handler: Handler) -> None:
        """Run ``handler(job, params)`` for every job of ``kind``."""

    def submit(self, owner: str, kind: str, description: str, params: dict[str, Any], *,
               secret_params: dict[str, Any] | None = None, total: int = 0,
               notify: bool = True) -> Job:
        """Queue a job started by ``owner``; returns it at once."""

    def submit_once(self, key: str, kind: str, description: str, params: dict[str, Any],
                    owner: str = "system", delay: float = 0.0) -> bool:
        """Queue the job named ``key`` unless a job of that name was ever queued; True when
        this call queued it."""

    def get(self, job_id: str, owner: str) -> Job:
        """The job with this id started by ``owner``; NotFound otherwise."""

    def cancel(self, job_id: str, owner: str) -> Job:
        """Cancel a job of ``owner``'s that has not started yet."""

    def close(self, grace: float = 0.0) -> None:
        """Stop taking work; jobs still running after ``grace`` seconds go back to the
        queue."""


def actor_params(actor: Actor) -> dict[str, Any]:
    """An actor as job parameters."""
    return {"kind": actor.kind, "name": actor.name, "role": actor.role,
            "source": actor.source, "registered": actor.registered,
            "grants": sorted(actor.grants)}


def actor_from(params: dict[str, Any]) -> Actor:
    """The actor that :func:`actor_params` wrote."""
    return Actor(params["kind"], params["name"], params.get("role", ""),
                 params.get("source", ""), params.get("registered", True),
                 frozenset(params.get("grants", ())))


def failure_reason(exc: BaseException) -> str:
    """What a person may read about a failure (an ImageShareError's own words; otherwise only
    the kind of error, which carries no patient data)."""
    if isinstance(exc, ImageShareError):
        return str(exc)[:500]
    return f"stopped on an error ({type(exc).__name__})"


def is_lasting(exc: BaseException) -> bool:
    """True for a refusal that trying again cannot change (bad request, not found, ...)."""
    return isinstance(exc, ImageShareError) and not isinstance(
        exc, StorageError | ServiceBusy | OutOfResources | AuditUnavailable)


def _utc(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass
class _Running:
    pk: int
    job: Job
    written: tuple[int, int, str]
    lost: bool = False


class DatabaseJobQueue:
    """The job queue in the index (SQLite or PostgreSQL) shared by every instance."""

    def __init__(self, engine: Engine, *, notify: Notify | None = None,
                 box: SecretBox | None = None, workers: int = 2, lease_seconds: float = 60.0,
                 retry_delays: Iterable[float] = (10.0, 60.0, 300.0),
                 poll_seconds: float = 1.0,
                 on_forget: Callable[[str], None] | None = None) -> None:
        self._engine = engine
        self._notify = notify
        self._box = box
        self._workers = max(1, workers)
        self._lease = timedelta(seconds=max(lease_seconds, 1.0))
        self._delays = tuple(retry_delays)
        self._poll = poll_seconds
        self._on_forget = on_forget
        self._handlers: dict[str, Handler] = {}
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.instance = f"{socket.gethostname()[:48]}:{os.getpid()}:{secrets.token_hex(4)}"

    def set_notify(self, notify: Notify) -> None:
        """Tell people about their finished jobs with ``notify(username, kind, text, link)``."""
        self._notify = notify

    def set_on_forget(self, on_forget: Callable[[str], None]) -> None:
        """Remove a forgotten job's result file with ``on_forget(key)``."""
        self._on_forget = on_forget

    @staticmethod
    def now() -> datetime:
        """The present, in UTC."""
        return datetime.now(UTC)

    # -- the port --------------------------------------------------------------------------

    def register(self, kind: str, handler: Handler) -> None:
        """Run ``handler(job, params)`` for every job of ``kind`` (register before start)."""
        self._handlers[kind] = handler

    def submit(self, owner: str, kind: str, description: str, params: dict[str, Any], *,
               secret_params: dict[str, Any] | None = None, total: int = 0,
               notify: bool = True) -> Job:
        """Queue a job started by ``owner``; returns it at once (workers start if needed)."""
        job = Job(secrets.token_urlsafe(16), owner, kind, description, total=total)
        self._insert(job, params, secret_params, notify, None)
        self.start()
        self._wake.set()
        return job

    def submit_once(self, key: str, kind: str, description: str, params: dict[str, Any],
                    owner: str = "system", delay: float = 0.0) -> bool:
        """Queue the job named ``key`` (to run ``delay`` seconds from now) unless one of that
        name exists; True when queued."""
        with self._engine.connect() as conn:
            if conn.execute(select(jobs_table.c.pk).where(
                    jobs_table.c.dedupe_key == key[:128])).first() is not None:
                return False
        try:
            self._insert(Job(secrets.token_urlsafe(16), owner, kind, description), params,
                         None, False, key[:128], delay)
        except IntegrityError:
            return False  # another instance queued it first
        self.start()
        self._wake.set()
        return True

    def _insert(self, job: Job, params: dict[str, Any], secret_params: dict[str, Any] | None,
                notify: bool, dedupe_key: str | None, delay: float = 0.0) -> None:
        sealed = None
        if secret_params:
            text = json.dumps(secret_params)
            sealed = self._box.seal(text) if self._box is not None else text
        now = self.now()
        with self._engine.begin() as conn:
            conn.execute(insert(jobs_table).values(
                public_id=job.id, kind=job.kind, description=job.description[:256],
                params=params, sealed_params=sealed, state="queued", attempts=0,
                max_attempts=len(self._delays) + 1, run_after=now + timedelta(seconds=delay),
                done=0, total=job.total,
                summary="", error="", result=None, started_by=job.owner[:128], notify=notify,
                dedupe_key=dedupe_key, created_at=now, updated_at=now))

    def get(self, job_id: str, owner: str) -> Job:
        """The job with this id started by ``owner``; NotFound otherwise."""
        with self._engine.connect() as conn:
            row = conn.execute(select(jobs_table).where(
                jobs_table.c.public_id == job_id[:32])).mappings().first()
        if row is None or row["started_by"] != owner:
            raise NotFound("no such job")
        return self._job(row)

    def cancel(self, job_id: str, owner: str) -> Job:
        """Cancel a job of ``owner``'s that is still waiting; a running job goes on."""
        job = self.get(job_id, owner)
        now = self.now()
        with self._engine.begin() as conn:
            cancelled = conn.execute(update(jobs_table).where(
                jobs_table.c.public_id == job.id, jobs_table.c.state == "queued").values(
                state="cancelled", error="cancelled by the person who started it",
                finished_at=now, updated_at=now)).rowcount
        if not cancelled:
            raise ImageShareError("only a job that has not started can be cancelled")
        return self.get(job_id, owner)

    @staticmethod
    def _job(row: Any) -> Job:
        return Job(id=row["public_id"], owner=row["started_by"], kind=row["kind"],
                   description=row["description"], state=row["state"], total=row["total"],
                   done=row["done"], error=row["error"], result=row["result"],
                   summary=row["summary"], attempts=row["attempts"],
                   created=(_utc(row["created_at"]) or datetime.now(UTC)).timestamp())

    # -- workers ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start this instance's workers and lease heartbeat (once)."""
        with self._lock:
            if self._threads or self._stop.is_set():
                return
            for number in range(self._workers):
                self._threads.append(threading.Thread(
                    target=self._work, name=f"job-{number}", daemon=True))
            self._threads.append(threading.Thread(target=self._heartbeat, name="job-lease",
                                                  daemon=True))
            for thread in self._threads:
                thread.start()

    def close(self, grace: float = 0.0) -> None:
        """Stop taking work; jobs still running here after ``grace`` seconds are handed back
        to the queue so that another instance (or the next start) runs them at once."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + grace
        while self._running and time.monotonic() < deadline:
            time.sleep(0.1)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(0.5)  # idle workers end at once; busy ones are handed back below
        with self._lock:
            left = list(self._running.values())
        for running in left:
            try:
                self._requeue(running, count_attempt=False, delay=0.0,
                              error="its instance stopped; queued again")
            except DBAPIError:
                log.warning("job %s could not be handed back; its lease runs out instead",
                            running.job.id[:8])

    def run_pending(self) -> int:
        """Run every job that is due now in the calling thread; returns how many ran."""
        ran = 0
        while (claimed := self._claim()) is not None:
            self._execute(*claimed)
            ran += 1
        return ran

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                claimed = self._claim()
            except DBAPIError as exc:
                log.warning("job queue unreachable (%s); trying again", type(exc).__name__)
                claimed = None
                self._stop.wait(max(self._poll, 1.0))
            if claimed is None:
                self._wake.wait(self._poll)
                self._wake.clear()
                continue
            self._execute(*claimed)

    def _claimable(self, now: datetime) -> Any:
        t = jobs_table.c
        return or_(and_(t.state == "queued", t.run_after <= now),
                   and_(t.state == "running", t.lease_expires < now))

    def _claim(self) -> tuple[int, Job, dict[str, Any], bool] | None:
        """Lease one due job (or one whose lease ran out): (pk, job, params, notify)."""
        if self._stop.is_set() or not self._handlers:
            return None
        for _ in range(3):
            now = self.now()
            claimable = self._claimable(now)
            query = (select(jobs_table.c.pk)
                     .where(claimable, jobs_table.c.kind.in_(list(self._handlers)))
                     .order_by(jobs_table.c.run_after, jobs_table.c.pk).limit(1))
            if self._engine.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            with self._engine.begin() as conn:
                pk = conn.execute(query).scalar()
                if pk is None:
                    return None
                taken = conn.execute(update(jobs_table).where(
                    jobs_table.c.pk == pk, claimable).values(
                    state="running", lease_owner=self.instance,
                    lease_expires=now + self._lease, attempts=jobs_table.c.attempts + 1,
                    updated_at=now)).rowcount
                if taken != 1:
                    continue  # another instance took it between the two statements
                row = conn.execute(select(jobs_table).where(jobs_table.c.pk == pk)
                                   ).mappings().one()
            params = dict(row["params"] or {})
            if row["sealed_params"]:
                text = (self._box.open(row["sealed_params"]) if self._box is not None
                        else row["sealed_params"])
                params.update(json.loads(text))
            job = self._job(row)
            running = _Running(pk, job, (job.done, job.total, job.summary))
            if row["attempts"] > row["max_attempts"]:
                self._finish(running, "failed", "its instance stopped while running it "
                             f"{row['max_attempts']} times", row["notify"])
                continue
            with self._lock:
                self._running[job.id] = running
            return pk, job, params, bool(row["notify"])
        return None

    def _execute(self, pk: int, job: Job, params: dict[str, Any], notify: bool) -> None:
        running = self._running.get(job.id) or _Running(pk, job, (0, 0, ""))
        handler = self._handlers.get(job.kind)
        try:
            if handler is None:
                raise ImageShareError("no handler for this kind of job")
            handler(job, params)
        except JobInterrupted:
            self._quietly(self._requeue, running, count_attempt=False, delay=0.0,
                          error="interrupted by a shutdown; queued again")
        except JobElsewhere as exc:
            self._quietly(self._requeue, running, count_attempt=False,
                          delay=ELSEWHERE_DELAY, error=str(exc))
        except Exception as exc:  # noqa: BLE001 - the job ends failed or is retried, with why
            reason = failure_reason(exc)
            log.warning("job %s (%s) attempt %d failed: %s", job.id[:8], job.kind,
                        job.attempts, type(exc).__name__)
            if is_lasting(exc) or job.attempts > len(self._delays):
                self._quietly(self._finish, running, "failed", reason, notify)
            else:
                self._quietly(self._requeue, running, count_attempt=True,
                              delay=self._delays[job.attempts - 1], error=reason)
        else:
            self._quietly(self._finish, running, "done", "", notify)
        finally:
            with self._lock:
                self._running.pop(job.id, None)

    @staticmethod
    def _quietly(call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            call(*args, **kwargs)
        except DBAPIError as exc:  # the index is gone: the lease runs out, the job runs again
            log.error("job state could not be saved (%s)", type(exc).__name__)

    def _mine(self, running: _Running) -> Any:
        return and_(jobs_table.c.pk == running.pk, jobs_table.c.state == "running",
                    jobs_table.c.lease_owner == self.instance)

    def _finish(self, running: _Running, state: State, error: str, notify: bool) -> None:
        job = running.job
        now = self.now()
        with self._engine.begin() as conn:
            ended = conn.execute(update(jobs_table).where(self._mine(running)).values(
                state=state, error=error[:512], summary=job.summary[:512], result=job.result,
                done=job.done, total=job.total, lease_owner=None, lease_expires=None,
                finished_at=now, updated_at=now)).rowcount
        job.state, job.error = state, error
        if not ended:
            log.warning("job %s was taken over by another instance; its result here is "
                        "dropped", job.id[:8])
            return
        if notify and self._notify is not None:
            text = (f"{job.description}: done" + (f" ({job.summary})" if job.summary else "")
                    if state == "done" else f"{job.description}: failed ({error})")
            try:
                self._notify(job.owner, f"job.{state}", text, f"/jobs/{job.id}")
            except Exception as exc:  # noqa: BLE001 - the job's state stands; logged
                log.warning("job %s: the notice could not be sent (%s)", job.id[:8],
                            type(exc).__name__)

    def _requeue(self, running: _Running, *, count_attempt: bool, delay: float,
                 error: str) -> None:
        now = self.now()
        values: dict[str, Any] = {
            "state": "queued", "run_after": now + timedelta(seconds=delay),
            "error": error[:512], "lease_owner": None, "lease_expires": None,
            "done": running.job.done, "total": running.job.total, "updated_at": now}
        if not count_attempt:
            values["attempts"] = jobs_table.c.attempts - 1
        with self._engine.begin() as conn:
            conn.execute(update(jobs_table).where(self._mine(running)).values(**values))
        self._wake.set()

    def _heartbeat(self) -> None:
        """Renew the leases of the jobs running here and save their progress."""
        every = min(1.0, self._lease.total_seconds() / 3)
        renewed = time.monotonic()
        while not self._stop.wait(every):
            with self._lock:
                running = list(self._running.values())
            due = time.monotonic() - renewed >= self._lease.total_seconds() / 3
            for item in running:
                progress = (item.job.done, item.job.total, item.job.summary)
                if not due and progress == item.written:
                    continue
                now = self.now()
                try:
                    with self._engine.begin() as conn:
                        kept = conn.execute(update(jobs_table).where(self._mine(item)).values(
                            lease_expires=now + self._lease, done=progress[0],
                            total=progress[1], summary=progress[2][:512], updated_at=now)
                        ).rowcount
                except DBAPIError as exc:
                    log.warning("job lease not renewed (%s)", type(exc).__name__)
                    continue
                item.written = progress
                with self._lock:
                    still_here = item.job.id in self._running
                if not kept and still_here and not item.lost:
                    item.lost = True
                    log.warning("job %s: lease lost to another instance", item.job.id[:8])
            if due:
                renewed = time.monotonic()

    # -- housekeeping ----------------------------------------------------------------------

    def forget_finished(self, now: datetime | None = None) -> int:
        """Remove jobs finished more than a day ago (a periodic task's record after eight
        days) and their result files; returns how many."""
        moment = now or self.now()
        t = jobs_table.c
        old = or_(and_(t.dedupe_key.is_(None), t.finished_at < moment - KEEP),
                  t.finished_at < moment - KEEP_PERIODIC)
        with self._engine.connect() as conn:
            rows = conn.execute(select(t.pk, t.result).where(
                t.state.in_(FINISHED), old)).all()
        for row in rows:
            if row.result and self._on_forget is not None:
                try:
                    self._on_forget(row.result)
                except Exception as exc:  # noqa: BLE001 - an orphan file is not a failure
                    log.warning("a job's result could not be removed (%s)",
                                type(exc).__name__)
        if rows:
            with self._engine.begin() as conn:
                conn.execute(delete(jobs_table).where(t.pk.in_([r.pk for r in rows])))
        return len(rows)
