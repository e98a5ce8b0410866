"""The receiving side of a transfer: what travels with a study pushed by another ImageShare
(the sending site, priority, note, contact, the transfer and request it belongs to) is kept on
its inbox item; urgent arrivals are announced to the receiving team by e-mail (the team
address setting) and on every staff page; accepting or rejecting the item sends a receipt
back to the sending ImageShare (who, when, outcome, note) through the durable job queue."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, select, update

from imageshare.access.policy import site_origin
from imageshare.access.users import linked_site, one_line
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import Actor
from imageshare.domain.errors import InvalidQuery, NotFound
from imageshare.exchange.inbox import UPLOAD_SITE_PREFIX, InboxItem
from imageshare.exchange.nodes import NodeRegistry
from imageshare.exchange.site_api import SiteApi
from imageshare.notify import Mailer
from imageshare.storage.index.schema import imaging_requests, inbox_items

PRIORITIES = ("urgent", "routine")


def _text(body: dict[str, Any], key: str, limit: int) -> str:
    value = body.get(key, "")
    if not isinstance(value, str):
        raise InvalidQuery(f"{key} must be text")
    return value.strip()[:limit]


class Arrivals:
    """Announcements of received transfers, alerts to the team, receipts back."""

    def __init__(self, engine: Engine, nodes: NodeRegistry, site_api: SiteApi, mailer: Mailer,
                 audit: AuditTrail, own_ae_title: str, team_email: str = "",
                 public_url: str = "") -> None:
        self._engine = engine
        self._nodes = nodes
        self._site_api = site_api
        self._mailer = mailer
        self._audit = audit
        self._own = own_ae_title
        self._team = team_email
        self._public_url = public_url.rstrip("/")
        site_api.on_outcome("receipt", self._receipt_outcome)

    def sender(self, item: InboxItem) -> str:
        """How people name the site that sent ``item``: the name this site registered for
        the sender (the AE title only when it registered none)."""
        if item.sender_name:
            return item.sender_name
        node = self._nodes.find(item.origin or item.site)
        if node is not None:
            return node.label
        if item.site.startswith(UPLOAD_SITE_PREFIX):
            return "a patient's upload"
        return f"site account {item.site}"

    def announce(self, actor: Actor, body: dict[str, Any]) -> InboxItem:
        """Another ImageShare (``actor``, its site account here) says what it sent: kept on
        the inbox item its instances made; an urgent one alerts the team. The sending site is
        the one the account is linked to (Forbidden when unlinked or when ``origin`` in the
        body names another site)."""
        study_uid = _text(body, "study_uid", 64)
        origin = site_origin(actor, linked_site(self._engine, actor.name),
                             _text(body, "origin", 16))
        priority = _text(body, "priority", 16) or "routine"
        if not study_uid:
            raise InvalidQuery("an announcement names its study")
        if priority not in PRIORITIES:
            raise InvalidQuery("priority is urgent or routine")
        node = self._nodes.find(origin)
        name = node.label if node is not None else f"{origin} (not registered here)"
        with self._engine.begin() as conn:
            # Only a study this account stored (a push to another ImageShare goes by STOW-RS
            # with its site account): nobody can dress up another sender's study.
            row = conn.execute(select(inbox_items).where(
                inbox_items.c.study_uid == study_uid, inbox_items.c.site == actor.name)
                .order_by(inbox_items.c.last_received.desc()).limit(1)).mappings().first()
            if row is None:
                raise NotFound("no study with this UID was received from you")
            first = row["announced_at"] is None
            # "Answers our request" only for a request we sent to this very site: another
            # site cannot dress its images up as the answer a team is waiting for.
            answers = _text(body, "request", 32)
            if answers and conn.execute(select(imaging_requests.c.pk).where(
                    imaging_requests.c.public_id == answers,
                    imaging_requests.c.direction == "outgoing",
                    imaging_requests.c.site == origin)).first() is None:
                answers = ""
            conn.execute(update(inbox_items).where(inbox_items.c.pk == row["pk"]).values(
                origin=origin, sender_name=name[:128], priority=priority,
                message=_text(body, "note", 2000), contact=_text(body, "contact", 256),
                transfer_id=_text(body, "transfer", 32),
                request_id=answers,
                announced_at=row["announced_at"] or datetime.now(UTC)))
            self._audit.record(AuditEvent(
                actor=actor, action="exchange.arrival", outcome="success",
                study_uid=study_uid, instance_count=row["instances"],
                detail={"origin": origin, "priority": priority,
                        "transfer": _text(body, "transfer", 32)}), conn=conn)
        item = InboxItem(**dict(_row(self._engine, row["pk"])))
        if first and priority == "urgent" and item.status == "pending":
            self._alert(item)
        return item

    def urgent_from_dicom(self, actor: Actor, study_uid: str) -> None:
        """A DICOM sender stored an instance with C-STORE Priority HIGH: its pending inbox
        item of the study becomes urgent, named by the registered site's name, and the team
        is alerted once (DICOM carries no note or contact)."""
        node = self._nodes.find(actor.name)
        with self._engine.begin() as conn:
            row = conn.execute(select(inbox_items).where(
                inbox_items.c.study_uid == study_uid, inbox_items.c.site == actor.name,
                inbox_items.c.status == "pending")).mappings().first()
            if row is None or row["priority"] == "urgent":
                return
            conn.execute(update(inbox_items).where(inbox_items.c.pk == row["pk"]).values(
                priority="urgent", origin=actor.name[:16],
                sender_name=(node.label if node is not None else actor.name)[:128]))
            self._audit.record(AuditEvent(
                actor=actor, action="exchange.arrival", outcome="success",
                study_uid=study_uid, instance_count=row["instances"],
                detail={"origin": actor.name, "priority": "urgent", "by": "C-STORE priority"}),
                conn=conn)
        self._alert(InboxItem(**dict(_row(self._engine, row["pk"]))))

    def _alert(self, item: InboxItem) -> None:
        """E-mail the team about an urgent arrival (no patient details: the sender, the
        priority, how many images, who to call, and where to look)."""
        if not self._team:
            return
        where = (f"Open the inbox: {self._public_url}/inbox" if self._public_url
                 else "Sign in to ImageShare and open the inbox.")
        # The contact is the sending site's words: one line of them, never lines of its own.
        contact = (f"\nContact at the sender: {one_line(item.contact, 256)}" if item.contact
                   else "")
        self._mailer.send(
            self._team, f"ImageShare: URGENT study from {one_line(self.sender(item))}"[:200],
            f"An URGENT study from {one_line(self.sender(item))} arrived in the ImageShare inbox "
            f"({item.instances} image(s), "
            f"{item.last_received.astimezone(UTC).strftime('%d %b %Y %H:%M UTC')}).{contact}\n"
            f"The sender's note is shown with the study in the inbox.\n\n{where}\n\n"
            "This message contains no patient information.\n")

    def send_receipt(self, item: InboxItem, outcome: str, actor: Actor, note: str) -> None:
        """Queue the receipt of a decided item for the ImageShare that sent it (items from
        other senders have no way back: nothing is sent)."""
        if not (item.transfer_id and item.origin):
            return
        now = datetime.now(UTC)
        self._site_api.queue(
            item.origin, "/api/exchange/receipts",
            {"origin": self._own, "transfer": item.transfer_id, "study_uid": item.study_uid,
             "outcome": outcome, "by": actor.name, "at": now.isoformat(),
             "note": note[:2000]},
            "receipt", str(item.pk), actor.name, f"Receipt to {self.sender(item)} ({outcome})")
        self._receipt_outcome(str(item.pk), "queued", f"{outcome}; receipt queued for "
                              f"{self.sender(item)}")

    def _receipt_outcome(self, ref: str, state: str, detail: str) -> None:
        with self._engine.begin() as conn:
            conn.execute(update(inbox_items).where(inbox_items.c.pk == int(ref)).values(
                receipt_state=state[:16], receipt_detail=detail[:512]))


def _row(engine: Engine, pk: int) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(inbox_items).where(inbox_items.c.pk == pk)
                            ).mappings().one()
