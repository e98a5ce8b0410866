"""Sending studies to other sites with delivery receipts: queued -> sending -> delivered (with
counts) or failed (with the reason), retried, the sender and named recipients notified."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, insert, select, update

from imageshare.archive.retrieve import RetrieveService, StoredInstance
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError, NotFound, StorageError
from imageshare.exchange.nodes import NodeRegistry
from imageshare.exchange.sites import RetrieveProgress, SiteClient, SiteUnreachable
from imageshare.jobs import JobRunner
from imageshare.sharing.notify import Notifier
from imageshare.storage.index.database import from_row
from imageshare.storage.index.schema import transfers

PRIORITIES = ("urgent", "routine")
RETRY_DELAYS = (2.0, 10.0, 30.0)


@dataclass(frozen=True)
class Transfer:
    """A study sent (or being sent) to a site."""

    public_id: str
    study_uid: str
    site: str
    priority: str
    note: str
    state: str
    sent: int
    total: int
    failed: int
    attempts: int
    reason: str
    created_by: str
    created_at: datetime
    updated_at: datetime


class Transfers:
    """Pushes studies to sites in the background and keeps their receipts."""

    def __init__(self, engine: Engine, nodes: NodeRegistry, clients: dict[str, SiteClient],
                 retrieve: RetrieveService, jobs: JobRunner, notifier: Notifier,
                 audit: AuditTrail, retry_delays: tuple[float, ...] = RETRY_DELAYS) -> None:
        self._engine = engine
        self._nodes = nodes
        self._clients = clients
        self._retrieve = retrieve
        self._jobs = jobs
        self._notifier = notifier
        self._audit = audit
        self._delays = retry_delays

    def send(self, study_uid: str, site: str, actor: Actor, priority: str = "routine",
             note: str = "", notify: tuple[str, ...] = (),
             allowed_studies: frozenset[str] | None = None) -> Transfer:
        """Queue the study for the site; returns the transfer (follow it by its id)."""
        if priority not in PRIORITIES:
            raise ImageShareError("priority is urgent or routine")
        node = self._nodes.get(site)
        if not node.send_to:
            raise ImageShareError(f"sending to {node.label} is not allowed")
        found = self._retrieve.select(actor, "exchange.push", study_uids=[study_uid],
                                      allowed_studies=allowed_studies)
        public_id = secrets.token_hex(8)
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            conn.execute(insert(transfers).values(
                public_id=public_id, study_uid=study_uid, site=node.ae_title,
                priority=priority, note=note[:2000], state="queued", sent=0,
                total=len(found), failed=0, attempts=0, reason="", created_by=actor.name,
                created_at=now, updated_at=now))
        self._jobs.submit(actor.name, "push", f"Send to {node.label} ({priority})",
                          lambda job: self._run(public_id, found, actor, notify))  # type: ignore
        return self.get(public_id)

    def _update(self, public_id: str, **values: Any) -> None:
        with self._engine.begin() as conn:
            conn.execute(update(transfers).where(transfers.c.public_id == public_id)
                         .values(updated_at=datetime.now(UTC), **values))

    def _run(self, public_id: str, found: list[StoredInstance], actor: Actor,
             notify: tuple[str, ...]) -> None:
        """Send from local files (temporary copies when the blob store is not local)."""
        try:
            with self._retrieve.local_files(found) as paths:
                self._send(public_id, paths, actor, notify)
        except StorageError:
            self._update(public_id, state="failed", reason="the stored images could not be read")
            raise

    def _send(self, public_id: str, paths: list[Path], actor: Actor,
              notify: tuple[str, ...]) -> None:
        transfer = self.get(public_id)
        node = self._nodes.get(transfer.site)
        client = self._clients["dicomweb" if node.dicomweb_url else "dimse"]
        result = RetrieveProgress(0, len(paths))
        reason = ""
        for attempt, delay in enumerate((0.0, *self._delays), start=1):
            if delay:
                time.sleep(delay)
            self._update(public_id, state="sending", attempts=attempt)
            try:
                result = client.send(node, paths, lambda p: self._update(
                    public_id, sent=p.received, failed=p.failed))
            except SiteUnreachable as exc:
                reason = str(exc)
                continue
            if not result.failed:
                break
            reason = f"{result.failed} instance(s) were refused by {node.label}"
        delivered = result.received == len(paths) and not result.failed
        self._update(public_id, state="delivered" if delivered else "failed",
                     sent=result.received, failed=len(paths) - result.received,
                     reason="" if delivered else reason or "not delivered")
        self._audit.record(AuditEvent(
            actor=actor, action="exchange.push", outcome="success" if delivered else "failure",
            study_uid=transfer.study_uid, instance_count=result.received,
            detail={"site": node.ae_title, "transfer": public_id,
                    "priority": transfer.priority}))
        text = (f"A study was delivered to {node.label}" if delivered
                else f"Sending a study to {node.label} failed")
        for username in {actor.name, *notify}:
            self._notifier.notify(username, "exchange.push", text, f"/transfers/{public_id}")

    def get(self, public_id: str) -> Transfer:
        """One transfer; NotFound otherwise."""
        with self._engine.connect() as conn:
            row = conn.execute(select(transfers).where(transfers.c.public_id == public_id)
                               ).mappings().first()
        if row is None:
            raise NotFound("no such transfer")
        return from_row(Transfer, row)

    def recent(self, limit: int = 100) -> list[Transfer]:
        """The latest transfers, newest first."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(transfers).order_by(transfers.c.pk.desc())
                                .limit(limit)).mappings().all()
        return [from_row(Transfer, r) for r in rows]
