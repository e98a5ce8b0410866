"""Background work with progress: in-process worker threads (a real queue at scale)."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from imageshare.domain.errors import ImageShareError, NotFound

State = Literal["queued", "running", "done", "failed"]
KEEP_SECONDS = 24 * 3600


@dataclass
class Job:
    """One piece of background work and how far it got."""

    id: str
    owner: str
    kind: str
    description: str
    state: State = "queued"
    total: int = 0
    done: int = 0
    error: str = ""
    result: Path | None = None
    summary: str = ""
    created: float = field(default_factory=time.time)

    @property
    def percent(self) -> int:
        """Progress in percent."""
        if self.state == "done":
            return 100
        return int(100 * self.done / self.total) if self.total else 0


Work = Callable[[Job], None]


class JobRunner:
    """Runs jobs on a few threads; a job reports progress by updating ``done``/``total``."""

    def __init__(self, workers: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="job")
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def submit(self, owner: str, kind: str, description: str, work: Work) -> Job:
        """Queue ``work``; returns its job at once."""
        job = Job(secrets.token_urlsafe(16), owner, kind, description)
        with self._lock:
            self._forget_old()
            self._jobs[job.id] = job
        self._pool.submit(self._run, job, work)
        return job

    def _run(self, job: Job, work: Work) -> None:
        job.state = "running"
        try:
            work(job)
        except Exception as exc:  # noqa: BLE001 - the job reports it; no patient data
            job.state = "failed"
            job.error = str(exc) if isinstance(exc, ImageShareError) else type(exc).__name__
            return
        job.state = "done"

    def get(self, job_id: str, owner: str) -> Job:
        """The job with this id started by ``owner``; NotFound otherwise."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or job.owner != owner:
            raise NotFound("no such job")
        return job

    def _forget_old(self) -> None:
        cutoff = time.time() - KEEP_SECONDS
        for job_id in [j.id for j in self._jobs.values() if j.created < cutoff]:
            job = self._jobs.pop(job_id)
            if job.result is not None:
                job.result.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop taking work; running jobs finish."""
        self._pool.shutdown(wait=False, cancel_futures=True)
