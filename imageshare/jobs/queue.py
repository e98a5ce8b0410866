"""The job queue: jobs are rows of the index, run by whichever instance leases them first.

A job is queued with its kind and parameters (JSON; secrets sealed with the installation's
key). Each instance's workers claim a due job with one conditional UPDATE (on PostgreSQL the
candidate is picked with ``FOR UPDATE SKIP LOCKED``; SQLite has one writer at a time), hold a
lease on it that a heartbeat renews while the handler runs, and write progress with the
heartbeat. A handler that raises is retried after a pause (``retry_delays``) unless the error
is a refusal that a retry cannot change; a worker that dies stops renewing its lease and
another instance takes the job again once the lease has run out. A handler still running
after ``max_run_seconds`` is stopped at its next progress point and its lease is no longer
renewed; secret parameters this instance cannot open count as a failed attempt; a job of a
kind that no instance runs (dropped by an upgrade) fails a day after its time. Every job
ends ``done`` or ``failed`` with the reason (or ``cancelled`` before it ran), and the person
who started it is told. Parameters are plain JSON of at most ``MAX_PARAMS`` characters;
secret ones are refused without a key to seal them.

A job runs on one instance at a time. Lease times are the database's (``now()`` on
PostgreSQL, so hosts whose clocks differ agree; this host's clock on SQLite, a file on this
host). The heartbeat renews a lease a third of the way through it and, when that fails,
tries again every second; an instance that could not renew a lease for three quarters of it
gives the job up before the lease runs out in the database: the handler is interrupted at its
next progress point (:class:`JobInterrupted`) and hands the job back. Each claim is its own
lease (``lease_owner``), and every write of a job's state or outcome is conditional on still
holding it, so a handler that goes on after losing its lease changes nothing.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from sqlalchemy import Engine, and_, delete, func, insert, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError

from imageshare.domain.actors import Actor
from imageshare.domain.errors import (
    AuditUnavailable,
    ConfigurationError,
    ImageShareError,
    NotFound,
    OutOfResources,
    PayloadTooLarge,
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
RENEW_AT = 1 / 3  # a lease is renewed this far through it ...
GIVE_UP_AT = 3 / 4  # ... and given up here, unrenewed, before it runs out in the database
RENEW_RETRY = 1.0  # seconds between tries to renew a lease that could not be renewed
PROGRESS = frozenset({"done", "total", "summary", "result"})  # a handler's progress points
LAPSED = "its lease could not be renewed in time"
OVERRUN = "it ran longer than a job may run"
MAX_PARAMS = 1 << 20  # characters of a job's parameters as JSON (secret ones included)
UNRUNNABLE_AFTER = timedelta(days=1)  # a job of a kind no instance runs fails this late
UNRUNNABLE = ("no ImageShare instance runs this kind of job (was it dropped by an upgrade?); "
              "start it again")
UNOPENED = ("its secret parameters could not be opened here (sealed with another secret key: "
            "every instance needs the same IMAGESHARE_SECRET_KEY)")
UNREADABLE = ("its parameters could not be read (not the form this version keeps them in: "
              "was it queued by another version?); start it again")
# A queued job last written this far after the present was written before the clock was set
# back: it is due now (else it waited as long as the clock went back, hours perhaps).
CLOCK_SLACK = timedelta(seconds=5)


@dataclass
class Job:
    """One piece of background work and how far it got (a handler updates ``done``,
    ``total``, ``summary`` and ``result`` as it goes).

    Each of those updates is a progress point: once this instance may no longer run the job
    (its lease was lost, or the instance is stopping), the update raises
    :class:`JobInterrupted` instead, and the job goes back to the queue. A handler that waits
    long between updates can look at :attr:`interrupted` or call :meth:`check`.
    """

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
    finished: float | None = None  # when it ended (epoch seconds), once done or failed
    # While a handler runs: the moment (time.monotonic) to stop by unless the lease is
    # renewed, and why the job was stopped here.
    _until: float = field(default=math.inf, init=False, repr=False, compare=False)
    _stopped: str = field(default="", init=False, repr=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in PROGRESS:
            self.check()
        super().__setattr__(name, value)

    @property
    def interrupted(self) -> str:
        """Why this instance must stop running the job ("" while it may go on). A stop for a
        lease not renewed in time ends when the lease is renewed after all; the others
        stay."""
        if not self._stopped and time.monotonic() >= self._until:
            self._stopped = LAPSED
        return self._stopped

    def check(self) -> None:
        """A progress point: raises :class:`JobInterrupted` once the job must stop here."""
        if reason := self.interrupted:
            raise JobInterrupted(reason)

    def _interrupt(self, reason: str) -> None:
        if not self._stopped:
            self._stopped = reason

    def _hold(self, until: float) -> None:
        self._until = until
        if self._stopped == LAPSED:  # renewed after all (the database came back)
            self._stopped = ""

    @property
    def percent(self) -> int:
        """Progress in percent."""
        if self.state == "done":
            return 100
        return min(100, int(100 * self.done / self.total)) if self.total else 0


Handler = Callable[[Job, dict[str, Any]], None]
Notify = Callable[[str, str, str, str], None]  # username, kind, text, link


class JobInterrupted(Exception):
    """Raised by a handler when its instance is stopping, and at a handler's progress point
    once its instance may no longer run the job (see :class:`Job`): the job goes back to the
    queue at once if this instance still holds it (the attempt is not counted) and another
    instance, or this one's next start, runs it."""


class _Unreadable(ValueError):
    """A job's (plain) parameters are not the JSON object every version keeps them as."""


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

    def params(self, job_id: str, owner: str) -> dict[str, Any]:
        """The parameters (not the secret ones) ``owner``'s job was queued with; NotFound
        otherwise."""

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


def _as_json(params: dict[str, Any]) -> str:
    """``params`` as the JSON they are kept as; refused (ImageShareError) when JSON cannot
    keep them as they are (NaN or infinity, which PostgreSQL refuses and SQLite keeps, or an
    object that is not plain data)."""
    try:
        return json.dumps(params, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ImageShareError("a job's parameters must be plain JSON data "
                              f"({type(exc).__name__})") from exc


def _text(value: str, limit: int) -> str:
    """``value`` as a job's text column keeps it: at most ``limit`` characters, without NUL
    (which PostgreSQL refuses in text: the job's end could not be saved there, and it would
    run again)."""
    return str(value).replace("\x00", "")[:limit]


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
    lease: str  # this claim's lease_owner
    written: tuple[int, int, str]
    renew_at: float = 0.0  # time.monotonic() when the lease is renewed next
    failing: bool = False  # the last try to renew it failed
    stopped: bool = False  # its handler was told to stop
    deadline: float = math.inf  # time.monotonic() by which its handler is to have ended


class DatabaseJobQueue:
    """The job queue in the index (SQLite or PostgreSQL) shared by every instance."""

    def __init__(self, engine: Engine, *, notify: Notify | None = None,
                 box: SecretBox | None = None, workers: int = 2, lease_seconds: float = 60.0,
                 retry_delays: Iterable[float] = (10.0, 60.0, 300.0),
                 poll_seconds: float = 1.0,
                 on_forget: Callable[[str], None] | None = None,
                 max_run_seconds: float = 86400.0) -> None:
        self._engine = engine
        # A handler still running after this long (hung on a peer that never answers, say)
        # is stopped at its next progress point and its lease no longer renewed: a failed
        # attempt, retried as any, so that its owner is told in the end.
        self._max_run = max(max_run_seconds, 0.0)
        self._notify = notify
        self._box = box
        self._workers = max(1, workers)
        self._lease = timedelta(seconds=max(lease_seconds, 1.0))
        seconds = self._lease.total_seconds()
        self._renew_every = seconds * RENEW_AT
        self._give_up_after = seconds * GIVE_UP_AT
        self._retry = min(RENEW_RETRY, seconds / 12)
        self._delays = tuple(retry_delays)
        self._poll = poll_seconds
        self._on_forget = on_forget
        self._handlers: dict[str, Handler] = {}
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ended = threading.Event()  # the heartbeat stops (after the last handler)
        self._threads: list[threading.Thread] = []
        self.instance = f"{socket.gethostname()[:48]}:{os.getpid()}:{secrets.token_hex(4)}"
        self._claims = itertools.count(1)

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

    def _clock(self) -> Any:
        """The present for the jobs' times, as a value for a statement: the database server's
        ``now()`` on PostgreSQL (so that hosts whose clocks differ agree on when a lease runs
        out), this host's clock on SQLite (the database is a file on this host)."""
        if self._engine.dialect.name == "postgresql":
            return func.now()
        return self.now()

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
        secret = _as_json(secret_params) if secret_params else ""
        if len(_as_json(params)) + len(secret) > MAX_PARAMS:
            raise PayloadTooLarge(f"a job's parameters are limited to {MAX_PARAMS} characters")
        if secret:
            if self._box is None:  # never written in clear
                raise ConfigurationError("secret job parameters need the installation's "
                                         "secret key, and the job queue was given none")
            sealed = self._box.seal(secret)
        now = self._clock()
        with self._engine.begin() as conn:
            conn.execute(insert(jobs_table).values(
                public_id=job.id, kind=job.kind, description=_text(job.description, 256),
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

    def params(self, job_id: str, owner: str) -> dict[str, Any]:
        """The parameters (not the secret ones) ``owner``'s job was queued with; NotFound
        otherwise."""
        with self._engine.connect() as conn:
            row = conn.execute(select(jobs_table.c.started_by, jobs_table.c.params).where(
                jobs_table.c.public_id == job_id[:32])).first()
        if row is None or row.started_by != owner:
            raise NotFound("no such job")
        return dict(row.params or {})

    def cancel(self, job_id: str, owner: str) -> Job:
        """Cancel a job of ``owner``'s that is still waiting; a running job goes on."""
        job = self.get(job_id, owner)
        now = self._clock()
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
        finished = _utc(row["finished_at"])
        return Job(id=row["public_id"], owner=row["started_by"], kind=row["kind"],
                   description=row["description"], state=row["state"], total=row["total"],
                   done=row["done"], error=row["error"], result=row["result"],
                   summary=row["summary"], attempts=row["attempts"],
                   created=(_utc(row["created_at"]) or datetime.now(UTC)).timestamp(),
                   finished=finished.timestamp() if finished is not None else None)

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
        """Stop taking work; jobs still running here after ``grace`` seconds (their leases
        renewed meanwhile) are interrupted at their next progress point and handed back to
        the queue so that another instance (or the next start) runs them at once."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + grace
        while self._running and time.monotonic() < deadline:
            time.sleep(0.1)
        with self._lock:
            left = list(self._running.values())
        for running in left:  # each hands its job back at its next progress point
            running.job._interrupt("its instance stopped")
        self._ended.set()  # the heartbeat renews leases until here
        deadline = time.monotonic() + 0.5
        for thread in self._threads:  # idle workers end at once; busy ones are handed back
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            left = list(self._running.values())
        for running in left:
            # Its handler runs still (until its next progress point, or this process ends):
            # not handed back, so that no other instance runs it meanwhile; its lease, no
            # longer renewed, runs out, and another instance takes it then.
            log.warning("job %s (%s) still running as its instance stops; another instance "
                        "takes it when its lease runs out", running.job.id[:8],
                        running.job.kind)

    def run_pending(self) -> int:
        """Run every job that is due now in the calling thread; returns how many ran."""
        ran = 0
        while (claimed := self._claim()) is not None:
            self._execute(*claimed)
            ran += 1
        return ran

    def _work(self) -> None:
        """One worker thread: claims and runs jobs until the queue closes, whatever one job
        or one claim raised (a thread that ended would leave the instance without it)."""
        while not self._stop.is_set():
            try:
                claimed = self._claim()
            except DBAPIError as exc:
                log.warning("job queue unreachable (%s); trying again", type(exc).__name__)
                claimed = None
                self._stop.wait(max(self._poll, 1.0))
            except Exception as exc:  # noqa: BLE001 - e.g. no pooled connection in time
                log.error("no job claimed (%s); trying again", type(exc).__name__)
                claimed = None
                self._stop.wait(max(self._poll, 1.0))
            if claimed is None:
                self._wake.wait(self._poll)
                self._wake.clear()
                continue
            try:
                self._execute(*claimed)
            except Exception as exc:  # noqa: BLE001 - its state could not be saved; its
                # lease runs out and the job runs again
                log.error("job %s: its end could not be saved (%s)", claimed[1].id[:8],
                          type(exc).__name__)

    def _claimable(self, now: Any) -> Any:
        """Due jobs: queued ones whose time came (or that were written after ``now``: the
        clock was set back since, and their time is measured from a present that has not
        come again), and running ones whose lease ran out."""
        t = jobs_table.c
        written_later = t.updated_at > now + CLOCK_SLACK
        return or_(and_(t.state == "queued", or_(t.run_after <= now, written_later)),
                   and_(t.state == "running", t.lease_expires < now))

    def _claim(self) -> tuple[int, Job, dict[str, Any], bool] | None:
        """Lease one due job (or one whose lease ran out): (pk, job, params, notify)."""
        if self._stop.is_set() or not self._handlers:
            return None
        for _ in range(3):
            started, now = time.monotonic(), self._clock()
            lease = f"{self.instance}/{next(self._claims)}"
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
                    state="running", lease_owner=lease,
                    lease_expires=now + self._lease, attempts=jobs_table.c.attempts + 1,
                    updated_at=now)).rowcount
                if taken != 1:
                    continue  # another instance took it between the two statements
                row = conn.execute(select(jobs_table).where(jobs_table.c.pk == pk)
                                   ).mappings().one()
            job = self._job(row)
            # The lease runs out no sooner than a lease after ``started`` in the database.
            job._hold(started + self._give_up_after)
            running = _Running(pk, job, lease, (job.done, job.total, job.summary),
                               renew_at=started + self._renew_every,
                               deadline=started + self._max_run)
            if row["attempts"] > row["max_attempts"]:
                self._finish(running, "failed", "its instance stopped while running it "
                             f"{row['max_attempts']} times", row["notify"])
                continue
            try:
                params = self._params_of(row)
            except _Unreadable:
                # Not a key another instance may hold: no retry can read them.
                log.warning("job %s (%s): its parameters are not an object", job.id[:8],
                            job.kind)
                self._finish(running, "failed", UNREADABLE, bool(row["notify"]))
                continue
            except (ImageShareError, ValueError, TypeError) as exc:
                # Not this worker's end: an attempt that failed (another instance may hold
                # the key), retried as any, and in the end failed with the reason.
                log.warning("job %s (%s): parameters not opened here (%s)", job.id[:8],
                            job.kind, type(exc).__name__)
                if job.attempts > len(self._delays):
                    self._finish(running, "failed", UNOPENED, bool(row["notify"]))
                else:
                    self._requeue(running, count_attempt=True,
                                  delay=self._delays[job.attempts - 1], error=UNOPENED)
                continue
            with self._lock:
                closed = self._stop.is_set()
                if not closed:
                    self._running[lease] = running
            if closed:  # the queue closed meanwhile: not started here, handed back at once
                self._requeue(running, count_attempt=False, delay=0.0,
                              error="interrupted by a shutdown; queued again")
                return None
            return pk, job, params, bool(row["notify"])
        return None

    def _params_of(self, row: Any) -> dict[str, Any]:
        """A claimed job's parameters with its secret ones opened (ConfigurationError when
        they were sealed with another key, ValueError when they are not JSON)."""
        if not isinstance(row["params"] or {}, dict):
            raise _Unreadable("a job's parameters are not an object")
        params = dict(row["params"] or {})
        if row["sealed_params"]:
            if self._box is None:
                raise ConfigurationError("no secret key to open a job's secret parameters")
            opened = json.loads(self._box.open(row["sealed_params"]))
            if not isinstance(opened, dict):
                raise ValueError("a job's secret parameters are not an object")
            params.update(opened)
        return params

    def _execute(self, pk: int, job: Job, params: dict[str, Any], notify: bool) -> None:
        with self._lock:
            running = next((r for r in self._running.values() if r.job is job),
                           None) or _Running(pk, job, "", (0, 0, ""))  # not leased here
        handler = self._handlers.get(job.kind)
        try:
            if handler is None:
                raise ImageShareError("no handler for this kind of job")
            handler(job, params)
        except BaseException as exc:  # noqa: BLE001 - the job ends failed or is retried, with why
            if (isinstance(exc, KeyboardInterrupt | SystemExit)
                    and threading.current_thread() is threading.main_thread()):
                # A signal's stop in the thread that runs jobs itself (run_pending): the job
                # goes back to the queue, uncounted, and the stop goes on. Elsewhere (a worker
                # thread, which no signal reaches) it is the handler's own failure, below.
                log.warning("job %s (%s) stopped here: %s", job.id[:8], job.kind,
                            type(exc).__name__)
                self._quietly(self._requeue, running, count_attempt=False, delay=0.0,
                              error="interrupted by a shutdown; queued again")
                raise
            stopped = job.interrupted or (
                "interrupted by a shutdown" if isinstance(exc, JobInterrupted) else "")
            if stopped in (LAPSED, OVERRUN):
                # Its lease could not be kept (the index unreachable for most of a lease), or
                # it ran too long: an attempt that failed, retried later and in the end
                # failed for good.
                log.warning("job %s (%s) stopped here: %s", job.id[:8], job.kind, stopped)
                if job.attempts > len(self._delays):
                    self._quietly(self._finish, running, "failed", stopped, notify)
                else:
                    self._quietly(self._requeue, running, count_attempt=True,
                                  delay=self._delays[job.attempts - 1],
                                  error=f"{stopped}; queued again")
            elif stopped:
                # Stopped here (whatever a stopped handler raised on its way out): back to
                # the queue if this instance still holds it, the attempt not counted.
                log.warning("job %s (%s) stopped here: %s", job.id[:8], job.kind, stopped)
                # At once when this queue stops or lost the job; a moment later when only
                # the handler's service stops (the queue here would take it straight back).
                soon = self._stop.is_set() or bool(job.interrupted)
                self._quietly(self._requeue, running, count_attempt=False,
                              delay=0.0 if soon else ELSEWHERE_DELAY,
                              error=f"{stopped}; queued again")
            elif isinstance(exc, JobElsewhere):
                self._quietly(self._requeue, running, count_attempt=False,
                              delay=ELSEWHERE_DELAY, error=str(exc))
            else:
                reason = failure_reason(exc)
                log.warning("job %s (%s) attempt %d failed: %s", job.id[:8], job.kind,
                            job.attempts, type(exc).__name__)
                # The trace may quote patient data: only at IMAGESHARE_LOG_LEVEL=DEBUG, for
                # an operator chasing a failure (a module missing from an installation, say).
                log.debug("job %s trace", job.id[:8], exc_info=exc)
                if is_lasting(exc) or job.attempts > len(self._delays):
                    self._quietly(self._finish, running, "failed", reason, notify)
                else:
                    self._quietly(self._requeue, running, count_attempt=True,
                                  delay=self._delays[job.attempts - 1], error=reason)
        else:
            self._quietly(self._finish, running, "done", "", notify)
        finally:
            with self._lock:
                self._running.pop(running.lease, None)

    @staticmethod
    def _quietly(call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            call(*args, **kwargs)
        except (DBAPIError, SQLAlchemyTimeoutError) as exc:  # the index is gone (or no
            # connection came in time): the lease runs out, the job runs again
            log.error("job state could not be saved (%s)", type(exc).__name__)

    @staticmethod
    def _mine(running: _Running) -> Any:
        """The job's row while this claim still holds its lease (nobody took it since)."""
        return and_(jobs_table.c.pk == running.pk, jobs_table.c.state == "running",
                    jobs_table.c.lease_owner == running.lease)

    def _finish(self, running: _Running, state: State, error: str, notify: bool) -> None:
        job = running.job
        now = self._clock()
        error = _text(error, 512)
        with self._engine.begin() as conn:
            ended = conn.execute(update(jobs_table).where(self._mine(running)).values(
                state=state, error=error, summary=_text(job.summary, 512), result=job.result,
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
        now = self._clock()
        values: dict[str, Any] = {
            "state": "queued", "run_after": now + timedelta(seconds=delay),
            "error": _text(error, 512), "lease_owner": None, "lease_expires": None,
            "done": running.job.done, "total": running.job.total, "updated_at": now}
        if not count_attempt:
            values["attempts"] = jobs_table.c.attempts - 1
        with self._engine.begin() as conn:
            conn.execute(update(jobs_table).where(self._mine(running)).values(**values))
        self._wake.set()

    def _heartbeat(self) -> None:
        """Renew the leases of the jobs running here and save their progress (until the
        last handler has stopped, when the queue closes)."""
        while not self._ended.wait(self._retry):
            with self._lock:
                running = list(self._running.values())
            for item in running:
                try:
                    self._renew(item)
                except Exception:  # noqa: BLE001 - the thread lives on; tried again soon
                    item.renew_at = time.monotonic() + self._retry
                    log.exception("job %s: lease renewal failed", item.job.id[:8])

    def _renew(self, item: _Running) -> None:
        """Renew one lease when due (a third of the way through it, or a second after a try
        that failed) or when the job's progress changed, saving the progress with it."""
        job = item.job
        if time.monotonic() >= item.deadline:
            job._interrupt(OVERRUN)  # and its lease is not renewed any more
        stopped = job.interrupted
        if stopped and not item.stopped:
            item.stopped = True
            log.warning("job %s: stopping it here: %s", job.id[:8], stopped)
        if stopped and stopped != LAPSED:
            return  # taken over, too long, or the instance stops: its handler hands it back
        # Not renewed in time, perhaps: renewed still while this claim holds it (a handler
        # with no progress point since runs on, and the stop ends once renewed).
        started = time.monotonic()
        progress = (job.done, job.total, job.summary)
        if started < item.renew_at and progress == item.written:
            return
        now = self._clock()
        try:
            with self._engine.begin() as conn:
                kept = conn.execute(update(jobs_table).where(self._mine(item)).values(
                    lease_expires=now + self._lease, done=progress[0], total=progress[1],
                    summary=_text(progress[2], 512), updated_at=now)).rowcount
        except (DBAPIError, SQLAlchemyTimeoutError) as exc:
            item.renew_at = time.monotonic() + self._retry
            if not item.failing:
                item.failing = True
                log.warning("job %s: lease not renewed (%s); trying again every %g s, "
                            "stopping the job here in %.0f s unless renewed", job.id[:8],
                            type(exc).__name__, self._retry,
                            max(0.0, job._until - time.monotonic()))
            return
        if not kept:
            with self._lock:
                still_here = item.lease in self._running
            if still_here:
                job._interrupt("its lease went to another instance")
            return  # told on the next turn
        if item.failing:
            item.failing = False
            item.stopped = False
            log.warning("job %s: lease renewed again", job.id[:8])
        item.written = progress
        item.renew_at = started + self._renew_every
        # The database's clock read ``now`` after ``started``: the lease lasts at least a
        # lease from ``started``; the job stops here a quarter of a lease before that.
        job._hold(started + self._give_up_after)

    # -- housekeeping ----------------------------------------------------------------------

    def forget_finished(self, now: datetime | None = None) -> int:
        """Remove jobs finished more than a day ago (a periodic task's record after eight
        days, and not before its period is over) and their result files; fail, telling
        their owners, the jobs of a kind that no handler here runs which waited a day past
        their time (no instance ran them: see :meth:`fail_unrunnable`); returns how many
        were removed."""
        moment = now or self.now()
        self.fail_unrunnable(moment)
        t = jobs_table.c
        old = or_(and_(t.dedupe_key.is_(None), t.finished_at < moment - KEEP),
                  t.finished_at < moment - KEEP_PERIODIC)
        with self._engine.connect() as conn:
            rows = [row for row in conn.execute(select(t.pk, t.result, t.dedupe_key).where(
                t.state.in_(FINISHED), old)).all()
                # The record that a period's job was queued stays while the period lasts,
                # or it would be queued again within it.
                if period_end(row.dedupe_key) <= moment.timestamp()]
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

    def fail_unrunnable(self, now: datetime | None = None) -> int:
        """Fail, with the reason and a notice to their owners, the jobs of a kind that no
        handler here runs and that waited a day past their time (or past the end of their
        last lease): a kind an upgrade dropped, which no instance runs and which would
        otherwise wait for ever. Nothing when this queue runs no kind at all (a command that
        only tidies up). Returns how many failed."""
        if not self._handlers:
            return 0
        moment = now or self.now()
        t = jobs_table.c
        late = moment - UNRUNNABLE_AFTER
        stale = or_(and_(t.state == "queued", t.run_after < late),
                    and_(t.state == "running", t.lease_expires < late))
        unrunnable = and_(stale, t.kind.not_in(list(self._handlers)))
        with self._engine.connect() as conn:
            rows = conn.execute(select(t.pk, t.public_id, t.started_by, t.description,
                                       t.notify).where(unrunnable)).all()
        failed = 0
        for row in rows:
            at = self._clock()
            with self._engine.begin() as conn:  # unless an instance took it meanwhile
                if not conn.execute(update(jobs_table).where(
                        t.pk == row.pk, unrunnable).values(
                        state="failed", error=UNRUNNABLE, lease_owner=None,
                        lease_expires=None, finished_at=at, updated_at=at)).rowcount:
                    continue
            failed += 1
            log.warning("job %s failed: no instance runs its kind", row.public_id[:8])
            if row.notify and self._notify is not None:
                try:
                    self._notify(row.started_by, "job.failed",
                                 f"{row.description}: failed ({UNRUNNABLE})",
                                 f"/jobs/{row.public_id}")
                except Exception as exc:  # noqa: BLE001 - the job's state stands; logged
                    log.warning("job %s: the notice could not be sent (%s)",
                                row.public_id[:8], type(exc).__name__)
        return failed


def periodic_key(kind: str, every: float, period: int) -> str:
    """The name of the job that runs periodic task ``kind`` (every ``every`` seconds) in
    ``period`` (the Unix time divided by ``every``)."""
    return f"{kind}@{int(every)}:{period}"


def period_end(key: str | None) -> float:
    """The Unix time at which the period of the periodic task's job named ``key`` ends
    (see :func:`periodic_key`); 0 for any other name."""
    kind, at, timing = (key or "").partition("@")
    every, colon, period = timing.partition(":")
    if not kind or ":" in kind or not at or not colon:
        return 0.0
    if not (every.isdigit() and period.isdigit() and every.isascii() and period.isascii()):
        return 0.0
    return (int(period) + 1) * float(every)
