"""Sending studies to other sites with delivery receipts: queued -> sending -> delivered (with
counts) or failed (with the reason), retried, the sender and named recipients notified."""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, insert, select, update

from imageshare.access.policy import site_origin
from imageshare.access.users import linked_site
from imageshare.archive.retrieve import RetrieveService
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import SYSTEM, Actor
from imageshare.domain.errors import ImageShareError, NotFound, SiteUnreachable, StorageError
from imageshare.exchange.nodes import Node, NodeRegistry
from imageshare.exchange.site_api import SiteApi
from imageshare.exchange.sites import RetrieveProgress, SiteClient
from imageshare.jobs import Job, JobInterrupted, JobQueue, actor_from, actor_params
from imageshare.notify import Notifier
from imageshare.storage.index.database import from_row
from imageshare.storage.index.schema import background_jobs, transfer_deliveries, transfers

log = logging.getLogger("imageshare.exchange")
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
    contact: str = ""
    request_id: str = ""  # the other site's request for prior imaging it answers
    announced: str = ""  # whether the receiving ImageShare took what travels with the study
    receipt_outcome: str = ""  # accepted or rejected, by the receiving site
    receipt_by: str = ""
    receipt_at: datetime | None = None
    receipt_note: str = ""


class TransferInterrupted(Exception):
    """The server is stopping: the transfer stops between instances and resumes on start."""


class TransferCancelled(Exception):
    """Someone cancelled the transfer: it stops between instances and is not resumed."""


CANCELLABLE = ("queued", "sending")


class Transfers:
    """Pushes studies to sites in the background and keeps their receipts.

    Every error of a transfer is caught: it is retried after each pause of ``retry_delays``
    and ends ``delivered`` or ``failed`` with the reason, the sender (and named users)
    notified either way. What the site acknowledged is recorded per instance, so a retry, or a
    transfer resumed after a restart, sends only the rest.
    """

    def __init__(self, engine: Engine, nodes: NodeRegistry, clients: dict[str, SiteClient],
                 retrieve: RetrieveService, jobs: JobQueue, notifier: Notifier,
                 audit: AuditTrail, retry_delays: tuple[float, ...] = RETRY_DELAYS,
                 site_api: SiteApi | None = None, own_ae_title: str = "") -> None:
        self._engine = engine
        self._site_api = site_api
        self._own = own_ae_title
        if site_api is not None:
            site_api.on_outcome("announce", lambda ref, state, detail: self._update(
                ref, announced=state[:16]))
        self._nodes = nodes
        self._clients = clients
        self._retrieve = retrieve
        self._jobs = jobs
        self._notifier = notifier
        self._audit = audit
        self._delays = retry_delays
        self._stopping = threading.Event()
        jobs.register("push", self._handle)

    def send(self, study_uid: str, site: str, actor: Actor, priority: str = "routine",
             note: str = "", notify: tuple[str, ...] = (),
             allowed_studies: Collection[str] | None = None, contact: str = "",
             request_id: str = "") -> Transfer:
        """Queue the study for the site; returns the transfer (follow it by its id)."""
        if priority not in PRIORITIES:
            raise ImageShareError("priority is urgent or routine")
        node = self.destination(site)
        found = self._retrieve.select(actor, "exchange.push", study_uids=[study_uid],
                                      allowed_studies=allowed_studies)
        public_id = secrets.token_hex(8)
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            conn.execute(insert(transfers).values(
                public_id=public_id, study_uid=study_uid, site=node.ae_title,
                priority=priority, note=note[:2000], state="queued", sent=0,
                total=len(found), failed=0, attempts=0, reason="", created_by=actor.name,
                created_at=now, updated_at=now, contact=contact[:256],
                request_id=request_id[:32]))
        self._start(public_id, actor, notify, node.label, priority)
        return self.get(public_id)

    def _start(self, public_id: str, actor: Actor, notify: tuple[str, ...], label: str,
               priority: str, resumed_after: int | None = None) -> None:
        params = {"transfer": public_id, "actor": actor_params(actor), "notify": list(notify)}
        description = f"Send to {label} ({priority})"
        if resumed_after is None:
            self._jobs.submit(actor.name, "push", description, params, notify=False)
        else:  # instances starting together queue it once
            self._jobs.submit_once(f"push:{public_id}:{resumed_after}", "push", description,
                                   params, owner=actor.name)

    def _handle(self, job: Job, params: dict[str, Any]) -> None:
        """Run a queued transfer (on whichever instance leased it)."""
        self._run(params["transfer"], actor_from(params["actor"]),
                  tuple(params.get("notify", ())), job.check)

    def resume_interrupted(self) -> int:
        """On start: transfers left queued or sending with no job to run them (queued by an
        older version, or whose job gave up after its instance died again and again) go on,
        sending only what the site has not acknowledged. Returns how many were resumed."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(transfers).where(
                transfers.c.state.in_(("queued", "sending")))).mappings().all()
            active = {
                (params or {}).get("transfer") for params in conn.execute(
                    select(background_jobs.c.params).where(
                        background_jobs.c.kind == "push",
                        background_jobs.c.state.in_(("queued", "running")))).scalars()}
        resumed = 0
        for row in rows:
            transfer = from_row(Transfer, row)
            if transfer.public_id in active:
                continue
            label = transfer.site
            try:
                label = self._nodes.get(transfer.site).label
            except ImageShareError:
                pass  # the site was removed: the run below fails with the reason
            if not self._unless_cancelled(transfer.public_id, state="queued",
                                          reason="interrupted by a restart; resumed"):
                continue
            owner = Actor(kind="user", name=transfer.created_by, role="", source="resume")
            self._start(transfer.public_id, owner, (), label, transfer.priority,
                        resumed_after=transfer.attempts)
            resumed += 1
        if resumed:
            log.warning("resumed %d interrupted transfer(s)", resumed)
        return resumed

    def close(self) -> None:
        """Stop running transfers between instances (they are resumed on the next start)."""
        self._stopping.set()

    def _update(self, public_id: str, **values: Any) -> None:
        with self._engine.begin() as conn:
            conn.execute(update(transfers).where(transfers.c.public_id == public_id)
                         .values(updated_at=datetime.now(UTC), **values))

    def _unless_cancelled(self, public_id: str, **values: Any) -> bool:
        """Update the transfer unless someone cancelled it meanwhile (a cancel is final);
        whether it was updated."""
        with self._engine.begin() as conn:
            return conn.execute(update(transfers).where(
                transfers.c.public_id == public_id, transfers.c.state != "cancelled")
                .values(updated_at=datetime.now(UTC), **values)).rowcount == 1

    def _delivered(self, transfer_pk: int) -> set[str]:
        with self._engine.connect() as conn:
            return set(conn.execute(select(transfer_deliveries.c.sop_uid).where(
                transfer_deliveries.c.transfer_pk == transfer_pk)).scalars())

    def _record_delivery(self, transfer_pk: int, public_id: str, sop_uid: str,
                         delivered: set[str]) -> None:
        if sop_uid in delivered:
            return
        with self._engine.begin() as conn:
            conn.execute(insert(transfer_deliveries).values(
                transfer_pk=transfer_pk, sop_uid=sop_uid, delivered_at=datetime.now(UTC)))
            delivered.add(sop_uid)
            conn.execute(update(transfers).where(transfers.c.public_id == public_id).values(
                sent=len(delivered), updated_at=datetime.now(UTC)))

    def _run(self, public_id: str, actor: Actor, notify: tuple[str, ...],
             check: Callable[[], None] = lambda: None) -> None:
        """Run one transfer to its end; nothing it raises is left uncaught but
        :class:`JobInterrupted` from ``check`` (its job's lease was lost: another instance
        runs the transfer now, and this one leaves its state alone)."""
        try:
            self._attempts(public_id, actor, notify, check)
        except JobInterrupted:
            raise
        except TransferInterrupted:
            self._quietly(self._unless_cancelled, public_id, state="queued",
                          reason="interrupted by a shutdown; resumed by a running instance")
            raise JobInterrupted from None
        except TransferCancelled:  # what was acknowledged meanwhile counts as sent
            ended = self.get(public_id)
            self._quietly(self._update, public_id, failed=max(ended.total - ended.sent, 0))
        except Exception as exc:  # noqa: BLE001 - the transfer ends failed, with the reason
            log.error("transfer %s failed: %s", public_id, type(exc).__name__)
            reason = str(exc) if isinstance(exc, ImageShareError) else (
                f"the transfer stopped on an error ({type(exc).__name__})")
            self._quietly(self._finish, public_id, actor, notify, False, reason)

    @staticmethod
    def _quietly(call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            call(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the index is gone: the next start resumes it
            log.error("transfer state could not be saved: %s", type(exc).__name__)

    def _attempts(self, public_id: str, actor: Actor, notify: tuple[str, ...],
                  check: Callable[[], None]) -> None:
        transfer = self.get(public_id)
        if transfer.state == "cancelled":  # before its job started
            return
        node, client = self._destination(transfer.site)
        with self._engine.connect() as conn:
            transfer_pk = conn.execute(select(transfers.c.pk).where(
                transfers.c.public_id == public_id)).scalar_one()
        found = self._retrieve.select(SYSTEM, "exchange.push", study_uids=[transfer.study_uid],
                                      audit=False)
        try:
            # Local files (temporary copies when the blob store is not local).
            with self._retrieve.local_files(found) as paths:
                self._send(public_id, transfer, node, client, transfer_pk,
                           dict(zip(paths, (i.sop_uid for i in found), strict=True)),
                           actor, notify, check)
        except StorageError as exc:
            raise ImageShareError("the stored images could not be read") from exc

    def destination(self, site: str) -> Node:
        """The registered site ``site`` when studies may be sent to it (checked before an
        accepted inbox item is forwarded, so that a refusal comes before the decision);
        :class:`UnknownNode` or :class:`ImageShareError` otherwise."""
        node = self._nodes.get(site)
        if not node.send_to:
            raise ImageShareError(f"sending to {node.label} is not allowed")
        return node

    def _destination(self, site: str) -> tuple[Node, SiteClient]:
        """The registered site to send to now, and how; :class:`ImageShareError` when it is
        gone or may not be sent to any more (a transfer queued before that sends nothing)."""
        node = self.destination(site)
        return node, self._clients["dicomweb" if node.dicomweb_url else "dimse"]

    def _send(self, public_id: str, transfer: Transfer, node: Node, client: SiteClient,
              transfer_pk: int, by_path: dict[Path, str], actor: Actor,
              notify: tuple[str, ...], check: Callable[[], None]) -> None:
        delivered = self._delivered(transfer_pk)
        self._update(public_id, total=len(by_path), sent=len(delivered & set(by_path.values())))
        reason = ""
        cancelled = self._cancel_watch(public_id)
        for attempt, delay in enumerate((0.0, *self._delays), start=1):
            if delay and self._stopping.wait(delay):
                raise TransferInterrupted
            check()
            cancelled()
            remaining = [p for p, uid in by_path.items() if uid not in delivered]
            if not remaining:
                break
            # Read again before each attempt: a site that may no longer be sent to (changed
            # while the transfer waited, retried or was resumed) receives nothing more.
            node, client = self._destination(transfer.site)
            if not self._unless_cancelled(public_id, state="sending",
                                          attempts=transfer.attempts + attempt):
                raise TransferCancelled

            def progress(_p: RetrieveProgress) -> None:
                if self._stopping.is_set():
                    raise TransferInterrupted
                check()
                cancelled()

            def acknowledged(path: Path) -> None:
                self._record_delivery(transfer_pk, public_id, by_path[path], delivered)

            try:
                result = client.send(node, remaining, progress, acknowledged)
            except (TransferInterrupted, TransferCancelled, JobInterrupted):
                raise
            except SiteUnreachable as exc:
                reason = str(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - any failure of an attempt is retried
                log.warning("push attempt %d to %s failed: %s", attempt, node.ae_title,
                            type(exc).__name__)
                reason = str(exc) if isinstance(exc, ImageShareError) else (
                    f"sending to {node.label} failed ({type(exc).__name__})")
                continue
            if result.failed:
                reason = f"{result.failed} instance(s) were refused by {node.label}"
        cancelled()
        done = set(by_path.values()) <= delivered
        self._finish(public_id, actor, notify, done, "" if done else reason or "not delivered")

    def _cancel_watch(self, public_id: str) -> Callable[[], None]:
        """A check, made between two instances, that raises :class:`TransferCancelled` once
        the transfer was cancelled (through any instance: the index says)."""

        def cancelled() -> None:
            with self._engine.connect() as conn:
                state = conn.execute(select(transfers.c.state).where(
                    transfers.c.public_id == public_id)).scalar()
            if state == "cancelled":
                raise TransferCancelled

        return cancelled

    def cancel(self, public_id: str, actor: Actor) -> Transfer:
        """Stop a transfer that is queued or sending (between two instances; what the site
        acknowledged before stays delivered and counted). Audited; the sender is told."""
        transfer = self.get(public_id)
        with self._engine.begin() as conn:
            stopped = conn.execute(update(transfers).where(
                transfers.c.public_id == public_id, transfers.c.state.in_(CANCELLABLE))
                .values(state="cancelled", reason=f"cancelled by {actor.name}"[:256],
                        updated_at=datetime.now(UTC))).rowcount
            if stopped != 1:
                raise ImageShareError("only a transfer that is queued or sending can be "
                                      "cancelled")
            self._audit.record(AuditEvent(
                actor=actor, action="exchange.push", outcome="failure",
                study_uid=transfer.study_uid, instance_count=transfer.sent,
                detail={"site": transfer.site, "transfer": public_id,
                        "priority": transfer.priority, "reason": "cancelled"}), conn)
        ended = self.get(public_id)
        self._update(public_id, failed=max(ended.total - ended.sent, 0))
        try:
            label = self._nodes.get(transfer.site).label
        except ImageShareError:
            label = transfer.site
        for username in {transfer.created_by} - {actor.name}:
            self._notifier.notify(username, "exchange.push",
                                  f"Sending a study to {label} was cancelled by {actor.name}",
                                  f"/transfers/{public_id}")
        return self.get(public_id)

    def _finish(self, public_id: str, actor: Actor, notify: tuple[str, ...], delivered: bool,
                reason: str) -> None:
        """End a transfer delivered or failed, audit it and tell the people concerned."""
        transfer = self.get(public_id)
        try:
            label = self._nodes.get(transfer.site).label
        except ImageShareError:
            label = transfer.site
        self._audit.record(AuditEvent(
            actor=actor, action="exchange.push", outcome="success" if delivered else "failure",
            study_uid=transfer.study_uid, instance_count=transfer.sent,
            detail={"site": transfer.site, "transfer": public_id,
                    "priority": transfer.priority,
                    **({"reason": reason} if reason else {})}))
        text = (f"A study was delivered to {label}" if delivered
                else f"Sending a study to {label} failed: {reason}")
        for username in {actor.name, transfer.created_by, *notify}:
            self._notifier.notify(username, "exchange.push", text, f"/transfers/{public_id}")
        announced = ""
        if delivered:
            announced = self._announce(transfer, actor)
        # Last: whoever sees the transfer ended finds it audited and its people told.
        with self._engine.begin() as conn:
            conn.execute(update(transfers).where(
                transfers.c.public_id == public_id, transfers.c.state != "cancelled").values(
                updated_at=datetime.now(UTC), state="delivered" if delivered else "failed",
                failed=0 if delivered else max(transfer.total - transfer.sent, 0),
                reason=reason, **({"announced": announced} if announced else {})))

    def _announce(self, transfer: Transfer, actor: Actor) -> str:
        """Tell a receiving ImageShare what travels with the study it now has (sender,
        priority, note, contact; the transfer its receipt answers): queued, delivered by the
        job queue. Sites without an ImageShare address get the images only."""
        if self._site_api is None:
            return ""
        node = self._nodes.find(transfer.site)
        if node is None or not node.dicomweb_url:
            return "dicom-only"
        self._site_api.queue(
            node.ae_title, "/api/exchange/arrivals",
            {"origin": self._own, "transfer": transfer.public_id,
             "study_uid": transfer.study_uid, "priority": transfer.priority,
             "note": transfer.note, "contact": transfer.contact,
             "request": transfer.request_id, "instances": transfer.sent,
             "sent_by": actor.name},
            "announce", transfer.public_id, actor.name,
            f"Transfer details to {node.label} ({transfer.priority})")
        return "queued"

    def record_receipt(self, actor: Actor, body: dict[str, Any]) -> Transfer:
        """The receiving ImageShare's receipt (accepted or rejected, by whom, when, its
        note) for a transfer of ours; the person who sent it is told."""
        transfer_id = str(body.get("transfer", ""))[:32]
        # Only the site the caller's account is linked to answers, for our transfers to it.
        origin = site_origin(actor, linked_site(self._engine, actor.name),
                             str(body.get("origin", ""))[:16])
        outcome = str(body.get("outcome", ""))
        if outcome not in ("accepted", "rejected"):
            raise ImageShareError("a receipt says accepted or rejected")
        transfer = self.get(transfer_id)
        if transfer.site.upper() != origin.upper():
            raise NotFound("no such transfer")
        try:
            at = datetime.fromisoformat(str(body.get("at", "")))
            at = at if at.tzinfo else at.replace(tzinfo=UTC)
        except ValueError:
            at = datetime.now(UTC)
        # A receipt is given once (site messages are sent again when an answer was lost):
        # the same one again changes nothing and tells nobody twice; another outcome
        # afterwards (replayed, forged or mistaken) does not overturn what the sender was told.
        with self._engine.begin() as conn:
            taken = conn.execute(update(transfers).where(
                transfers.c.public_id == transfer_id, transfers.c.receipt_outcome == "")
                .values(updated_at=datetime.now(UTC), receipt_outcome=outcome,
                        receipt_by=str(body.get("by", ""))[:128], receipt_at=at,
                        receipt_note=str(body.get("note", ""))[:2000])).rowcount == 1
        if not taken:
            given = self.get(transfer_id).receipt_outcome
            if given == outcome:
                return self.get(transfer_id)
            self._audit.record(AuditEvent(
                actor=actor, action="exchange.receipt", outcome="refused",
                study_uid=transfer.study_uid,
                detail={"site": origin, "transfer": transfer_id, "receipt": outcome}))
            raise ImageShareError(f"this transfer's receipt was given already: {given}")
        self._audit.record(AuditEvent(
            actor=actor, action="exchange.receipt", outcome="success",
            study_uid=transfer.study_uid,
            detail={"site": origin, "transfer": transfer_id, "receipt": outcome}))
        label = self._nodes.find(origin)
        text = f"{label.label if label else origin} {outcome} a study you sent"
        self._notifier.notify(transfer.created_by, "exchange.receipt", text,
                              f"/transfers/{transfer_id}")
        return self.get(transfer_id)

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
