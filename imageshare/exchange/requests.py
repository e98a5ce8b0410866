"""Requests for a patient's prior imaging. To a site running ImageShare the request is
delivered to its staff's request list (over its API, with the site's credentials); for any
other site it records the request and says to use the site's own contact route. Fulfilling a
request is a push (see :mod:`imageshare.exchange.transfers`)."""

from __future__ import annotations

import secrets
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import Engine, insert, select, update

from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError, NotFound
from imageshare.exchange.nodes import Node, NodeRegistry
from imageshare.notify import Notifier
from imageshare.storage.index.database import from_row
from imageshare.storage.index.schema import imaging_requests

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


def _request(row: Any) -> ImagingRequest:
    return from_row(ImagingRequest, row)


class ImagingRequests:
    """Sends, receives and lists requests for prior imaging."""

    def __init__(self, engine: Engine, nodes: NodeRegistry, notifier: Notifier,
                 audit: AuditTrail, own_ae_title: str,
                 tls: ssl.SSLContext | None = None) -> None:
        self._engine = engine
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
        state, detail = self._deliver(node, {
            "origin": self._own, "nhs_number": nhs_number, "hospital_number": hospital_number,
            "patient_name": patient_name, "birth_date": birth_date, "reason": reason,
            "priority": priority})
        request = self._insert(
            direction="outgoing", site=node.ae_title, nhs_number=nhs_number[:16],
            hospital_number=hospital_number[:64], patient_name=patient_name[:324],
            birth_date=birth_date[:8], reason=reason[:4000], priority=priority, state=state,
            detail=detail, created_by=actor.name)
        self._audit.record(AuditEvent(actor=actor, action="exchange.request", outcome="success",
                                      patient_id=nhs_number or hospital_number,
                                      detail={"site": node.ae_title, "state": state}))
        return request

    def _deliver(self, node: Node, body: dict[str, str]) -> tuple[str, str]:
        """(state, what to tell the user)."""
        if not node.dicomweb_url:
            return "contact", (f"{node.label} does not run ImageShare: ask them by their usual "
                               "route (phone or e-mail); the request is recorded here")
        base = node.dicomweb_url.rstrip("/").removesuffix("/dicomweb")
        headers = {}
        auth = None
        if node.dicomweb_auth.lower().startswith("bearer "):
            headers["Authorization"] = node.dicomweb_auth
        elif ":" in node.dicomweb_auth:
            user, _, password = node.dicomweb_auth.partition(":")
            auth = (user, password)
        try:
            answer = httpx.post(f"{base}/api/exchange/requests/incoming", json=body,
                                headers=headers, auth=auth, timeout=15,
                                verify=self._tls if self._tls is not None else True)
        except httpx.HTTPError:
            return "contact", f"{node.label} could not be reached: ask them by their usual route"
        if answer.status_code in (200, 201):
            return "sent", f"delivered to {node.label}'s staff"
        return "contact", (f"{node.label} did not take the request (HTTP {answer.status_code}):"
                           " ask them by their usual route")

    def receive(self, actor: Actor, body: dict[str, str]) -> ImagingRequest:
        """A request from another ImageShare site, for our staff."""
        origin = str(body.get("origin", ""))[:64] or actor.name
        priority = body.get("priority", "routine")
        request = self._insert(
            direction="incoming", site=origin, nhs_number=str(body.get("nhs_number", ""))[:16],
            hospital_number=str(body.get("hospital_number", ""))[:64],
            patient_name=str(body.get("patient_name", ""))[:324],
            birth_date=str(body.get("birth_date", ""))[:8],
            reason=str(body.get("reason", ""))[:4000],
            priority=priority if priority in PRIORITIES else "routine", state="open",
            detail="", created_by=actor.name)
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

    def listed(self, direction: str) -> list[ImagingRequest]:
        """Requests in one direction, newest first."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(imaging_requests).where(
                imaging_requests.c.direction == direction)
                .order_by(imaging_requests.c.pk.desc())).mappings().all()
        return [_request(r) for r in rows]

    def mark(self, public_id: str, state: str, detail: str, actor: Actor) -> None:
        """Record that a request was fulfilled (or declined)."""
        with self._engine.begin() as conn:
            conn.execute(update(imaging_requests).where(
                imaging_requests.c.public_id == public_id).values(
                state=state, detail=detail[:2000], updated_at=datetime.now(UTC)))
            self._audit.record(AuditEvent(actor=actor, action=f"exchange.request.{state}",
                                          outcome="success",
                                          detail={"request": public_id}), conn=conn)
