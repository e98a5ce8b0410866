"""Background work with progress, kept in the index so that every instance shares it.

``JobQueue`` is the port; :class:`imageshare.jobs.queue.DatabaseJobQueue` the one
implementation (SQLAlchemy, on SQLite and PostgreSQL); :mod:`imageshare.jobs.periodic` starts
the periodic tasks exactly once per period across instances.
"""

from imageshare.jobs.queue import (
    DatabaseJobQueue,
    Handler,
    Job,
    JobInterrupted,
    JobQueue,
    State,
    actor_from,
    actor_params,
)

__all__ = ["DatabaseJobQueue", "Handler", "Job", "JobInterrupted", "JobQueue", "State",
           "actor_from", "actor_params"]
