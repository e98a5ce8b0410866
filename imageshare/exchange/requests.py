"""Requests for a patient's prior imaging. To a site running ImageShare the request is
delivered to its staff's request list (over its API, with the site's credentials); for any
other site it records the request and says to use the site's own contact route. Fulfilling a
request is a push (see :mod:`imageshare.exchange.transfers`)."""

from __future__ import annotations

import secrets
import ssl
import string
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, insert, select, update

from imageshare.access.policy import site_origin
from imageshare.access.users import linked_site
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError, NotFound, SiteUnreachable
from imageshare.exchange.nodes import Node, NodeRegistry
from imageshare.exchange.site_api import SiteApi, post_json
from imageshare.exchange.transfers import Transfer, Transfers
from imageshare.notify import Notifier
from imageshare.storage.index.database import from_row
from imageshare.storage.index.schema import imaging_requests

_ID_CHARACTERS = frozenset(string.ascii_letters + string.digits + "-_")

PRIORITIES = ("urgent", "routine")


@dataclass(frozen=True)
class ImagingRequest:
    """A request for prior imaging."""

    public_id: str
    direction: str
    site: str
    nhs_number: str
    hospital_number: str
    patient_name: str
    birth_date: str
    reason: str
    priority: str
    state: str
    detail: str
    created_by: str
    created_at: datetime
    updated_at: datetime
    remote_id: str = ""  # the other site's id of the same request
    answered_by: str = ""
    answered_at: datetime | None = None


def _request(row: Any) -> ImagingRequest:
    return from_row(ImagingRequest, row)


class ImagingRequests:
    """Sends, receives and lists requests for prior imaging."""

    def __init__(self, engine: Engine, nodes: NodeRegistry, notifier: Notifier,
                 audit: AuditTrail, own_ae_title: str,
                 tls: ssl.SSLContext | None = None, site_api: SiteApi | None = None,
                 transfers: Transfers | None = None) -> None:
        self._engine = engine
        self._site_api = site_api
        self._transfers = transfers
        self._tls = tls  # trusted authorities for sites over https (imageshare/tls.py)
        self._nodes = nodes
        self._notifier = notifier
        self._audit = audit
        self._own = own_ae_title

    def _insert(self, **values: Any) -> ImagingRequest:
        now = datetime.now(UTC)
        values.setdefault("public_id", secrets.token_hex(8))
        with self._engine.begin() as conn:
            conn.execute(insert(imaging_requests).values(created_at=now, updated_at=now,
                                                         **values))
        return self.get(values["public_id"])

    def send(self, site: str, actor: Actor, reason: str, priority: str = "routine",
             nhs_number: str = "", hospital_number: str = "", patient_name: str = "",
             birth_date: str = "") -> ImagingRequest:
        """Ask ``site`` for a patient's prior imaging."""
        if priority not in PRIORITIES:
            raise ImageShareError("priority is urgent or routine")
        if not (nhs_number or hospital_number or (patient_name and birth_date)):
            raise ImageShareError("name the patient: NHS number, hospital number, or name "
                                  "and date of birth")
        if not reason.strip():
            raise ImageShareError("say why the imaging is needed")
        node = self._nodes.get(site)
        public_id = secrets.token_hex(8)
        state, detail, remote_id = self._deliver(node, {
            "origin": self._own, "nhs_number": nhs_number, "hospital_number": hospital_number,
            "patient_name": patient_name, "birth_date": birth_date, "reason": reason,
            "priority": priority, "request_id": public_id, "requested_by": actor.name})
        request = self._insert(
            public_id=public_id,
            direction="outgoing", site=node.ae_title, nhs_number=nhs_number[:16],
            hospital_number=hospital_number[:64], patient_name=patient_name[:324],
            birth_date=birth_date[:8], reason=reason[:4000], priority=priority, state=state,
            detail=detail, created_by=actor.name, remote_id=remote_id[:32])
        self._audit.record(AuditEvent(actor=actor, action="exchange.request", outcome="success",
                                      patient_id=nhs_number or hospital_number,
                                      detail={"site": node.ae_title, "state": state}))
        return request

    def _deliver(self, node: Node, body: dict[str, str]) -> tuple[str, str, str]:
        """(state, what to tell the user, the site's id of the request)."""
        import httpx  # loaded by the processes that talk to other sites

        if not node.dicomweb_url:
            return "contact", (f"{node.label} does not run ImageShare: ask them by their usual "
                               "route (phone or e-mail); the request is recorded here"), ""
        base = node.dicomweb_url.rstrip("/").removesuffix("/dicomweb")
        headers, auth = node.credentials()
        try:
            answer = post_json(f"{base}/api/exchange/requests/incoming", body, headers, auth,
                               15, self._tls if self._tls is not None else True)
        except (httpx.HTTPError, SiteUnreachable):
            return ("contact", f"{node.label} could not be reached: ask them by their usual "
                    "route", "")
        if answer.status_code in (200, 201):
            try:
                said = answer.json()
            except ValueError:
                said = {}
            remote = said.get("id", "") if isinstance(said, dict) else ""
            # The site's id of the request: a short token, or nothing (never its words).
            remote = remote if isinstance(remote, str) and 0 < len(remote) <= 32 and set(
                remote) <= _ID_CHARACTERS else ""
            return "sent", f"delivered to {node.label}'s staff", remote
        return "contact", (f"{node.label} did not take the request (HTTP {answer.status_code}):"
                           " ask them by their usual route"), ""

    def receive(self, actor: Actor, body: dict[str, str]) -> ImagingRequest:
        """A request from another ImageShare site, for our staff: from the site the caller's
        account is linked to (Forbidden when unlinked or when ``origin`` names another)."""
        origin = site_origin(actor, linked_site(self._engine, actor.name),
                             str(body.get("origin", ""))[:16])
        priority = body.get("priority", "routine")
        request = self._insert(
            direction="incoming", site=origin, nhs_number=str(body.get("nhs_number", ""))[:16],
            hospital_number=str(body.get("hospital_number", ""))[:64],
            patient_name=str(body.get("patient_name", ""))[:324],
            birth_date=str(body.get("birth_date", ""))[:8],
            reason=str(body.get("reason", ""))[:4000],
            priority=priority if priority in PRIORITIES else "routine", state="open",
            detail="", created_by=str(body.get("requested_by", "") or actor.name)[:128],
            remote_id=str(body.get("request_id", ""))[:32])
        self._audit.record(AuditEvent(actor=actor, action="exchange.request.receive",
                                      outcome="success",
                                      detail={"origin": origin, "request": request.public_id}))
        return request

    def get(self, public_id: str) -> ImagingRequest:
        """One request; NotFound otherwise."""
        with self._engine.connect() as conn:
            row = conn.execute(select(imaging_requests).where(
                imaging_requests.c.public_id == public_id)).mappings().first()
        if row is None:
            raise NotFound("no such request")
        return _request(row)

    def listed(self, direction: str, actor: Actor) -> list[ImagingRequest]:
        """Requests in one direction, newest first, as ``actor`` reads them (audited: they
        name their patients)."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(imaging_requests).where(
                imaging_requests.c.direction == direction)
                .order_by(imaging_requests.c.pk.desc())).mappings().all()
        self._audit.record(AuditEvent(actor=actor, action="exchange.request.read",
                                      outcome="success",
                                      detail={"direction": direction, "requests": len(rows)}))
        return [_request(r) for r in rows]

    def mark(self, public_id: str, state: str, detail: str, actor: Actor) -> None:
        """Record that a request was fulfilled (or declined)."""
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            conn.execute(update(imaging_requests).where(
                imaging_requests.c.public_id == public_id).values(
                state=state, detail=detail[:2000], updated_at=now,
                answered_by=actor.name[:128], answered_at=now))
            self._audit.record(AuditEvent(actor=actor, action=f"exchange.request.{state}",
                                          outcome="success",
                                          detail={"request": public_id}), conn=conn)

    def fulfil(self, public_id: str, study_uids: list[str], actor: Actor,
               allowed_studies: Collection[str] | None = None, contact: str = ""
               ) -> list[Transfer]:
        """Answer an incoming request by pushing the chosen studies to the site that asked;
        the request is marked fulfilled and the answer goes back to the requester."""
        wanted = self._incoming(public_id)
        if not study_uids:
            raise ImageShareError("choose the studies to send")
        if self._transfers is None:
            raise ImageShareError("sending is not available")
        sent = [self._transfers.send(
            uid, wanted.site, actor, wanted.priority, f"answer to your request: {wanted.reason}"
            [:2000], (), allowed_studies, contact, wanted.remote_id) for uid in study_uids]
        detail = (f"{len(sent)} study(ies) sent: transfer(s) "
                  + ", ".join(t.public_id for t in sent))
        self.mark(public_id, "fulfilled", detail, actor)
        self._answer(wanted, "fulfilled", f"{len(sent)} study(ies) sent", actor)
        return sent

    def decline(self, public_id: str, reason: str, actor: Actor) -> None:
        """Decline an incoming request, saying why; the answer goes back to the requester."""
        wanted = self._incoming(public_id)
        if not reason.strip():
            raise ImageShareError("say why the request is declined")
        self.mark(public_id, "declined", reason.strip(), actor)
        self._answer(wanted, "declined", reason.strip(), actor)

    def _incoming(self, public_id: str) -> ImagingRequest:
        wanted = self.get(public_id)
        if wanted.direction != "incoming":
            raise NotFound("no such request")
        if wanted.state not in ("open",):
            raise ImageShareError(f"this request was {wanted.state} already")
        return wanted

    def _answer(self, wanted: ImagingRequest, state: str, detail: str, actor: Actor) -> None:
        """Send the answer to the ImageShare that asked (through the job queue)."""
        if self._site_api is None or not wanted.remote_id:
            return
        self._site_api.queue(
            wanted.site, "/api/exchange/requests/answers",
            {"origin": self._own, "request": wanted.remote_id, "state": state,
             "detail": detail[:2000], "by": actor.name,
             "at": datetime.now(UTC).isoformat()},
            "request-answer", wanted.public_id, actor.name,
            f"Answer to a request from {wanted.site} ({state})")

    def record_answer(self, actor: Actor, body: dict[str, Any]) -> ImagingRequest:
        """The other site answered one of our requests: its state shows in our list and the
        person who asked is told."""
        public_id = str(body.get("request", ""))[:32]
        origin = site_origin(actor, linked_site(self._engine, actor.name),
                             str(body.get("origin", ""))[:16])
        state = str(body.get("state", ""))
        if state not in ("fulfilled", "declined"):
            raise ImageShareError("an answer says fulfilled or declined")
        wanted = self.get(public_id)
        if wanted.direction != "outgoing" or wanted.site.upper() != origin.upper():
            raise NotFound("no such request")
        try:
            at = datetime.fromisoformat(str(body.get("at", "")))
            at = at if at.tzinfo else at.replace(tzinfo=UTC)
        except ValueError:
            at = datetime.now(UTC)
        with self._engine.begin() as conn:
            conn.execute(update(imaging_requests).where(
                imaging_requests.c.public_id == public_id).values(
                state=state, detail=str(body.get("detail", ""))[:2000],
                answered_by=str(body.get("by", ""))[:128], answered_at=at,
                updated_at=datetime.now(UTC)))
            self._audit.record(AuditEvent(actor=actor, action="exchange.request.answer",
                                          outcome="success",
                                          detail={"request": public_id, "state": state,
                                                  "site": origin}), conn=conn)
        node = self._nodes.find(origin)
        self._notifier.notify(wanted.created_by, "exchange.request",
                              f"{node.label if node else origin} {state} your request for "
                              "prior imaging", "/requests")
        return self.get(public_id)
