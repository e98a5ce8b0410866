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
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, insert, select, update

from imageshare.access.policy import site_origin
from imageshare.access.users import linked_site
from imageshare.archive.search import normalise_nhs_number
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError, NotFound, SiteUnreachable, TooManyRequests
from imageshare.exchange.nodes import Node, NodeRegistry
from imageshare.exchange.site_api import SiteApi, post_json
from imageshare.exchange.transfers import Transfer, Transfers
from imageshare.notify import Notifier
from imageshare.storage.index.database import from_row
from imageshare.storage.index.schema import imaging_requests

_ID_CHARACTERS = frozenset(string.ascii_letters + string.digits + "-_")

PRIORITIES = ("urgent", "routine")
# Characters that make a DICOM match key match more than one value (wildcards, a value list):
# a request names one patient, never a pattern.
_PATTERN_CHARACTERS = frozenset("*?\\")
# Requests one site may have waiting for our staff, and send in an hour: more is flooding
# (refused, audited, the site told to use its usual route).
MAX_OPEN_PER_SITE = 100
MAX_PER_SITE_HOUR = 60


@dataclass(frozen=True)
class PatientNamed:
    """The patient a request names, checked: a valid NHS number, a hospital number, or a
    name with a real date of birth (YYYYMMDD); never a pattern."""

    nhs_number: str = ""
    hospital_number: str = ""
    patient_name: str = ""
    birth_date: str = ""


def patient_named(nhs_number: str = "", hospital_number: str = "", patient_name: str = "",
                  birth_date: str = "") -> PatientNamed:
    """The patient a request names, or ImageShareError saying what is wrong: wildcards or
    value lists, control characters, an NHS number with a wrong check digit, a date of birth
    that is not a real past day, or nothing that names one patient."""
    nhs, number, name, born = (str(v or "").strip() for v in
                               (nhs_number, hospital_number, patient_name, birth_date))
    for value in (nhs, number, name, born):
        if set(value) & _PATTERN_CHARACTERS or any(ord(c) < 32 or c == "\x7f" for c in value):
            raise ImageShareError("a request names one patient: no wildcards (* ?), value "
                                  "lists (\\) or control characters")
    if len(nhs) > 16 or len(number) > 64 or len(name) > 324 or len(born) > 10:
        raise ImageShareError("a patient identifier in the request is too long")
    if nhs:
        nhs = normalise_nhs_number(nhs)
    if born:
        digits = born.replace("-", "") if len(born) == 10 and born[4] == born[7] == "-" else born
        try:
            if len(digits) != 8 or not digits.isdigit():
                raise ValueError(born)
            day = date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
        except ValueError:
            raise ImageShareError("the date of birth must be a real day, YYYY-MM-DD") from None
        if day > (datetime.now(UTC) + timedelta(hours=14)).date():
            raise ImageShareError("the date of birth cannot be in the future")
        born = digits
    if name and sum(c.isalpha() for c in name) < 2:
        raise ImageShareError("a patient's name needs at least two letters")
    if not (nhs or number or (name and born)):
        raise ImageShareError("name the patient: NHS number, hospital number, or name and "
                              "date of birth")
    return PatientNamed(nhs, number, name, born)


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
        named = patient_named(nhs_number, hospital_number, patient_name, birth_date)
        nhs_number, hospital_number = named.nhs_number, named.hospital_number
        patient_name, birth_date = named.patient_name, named.birth_date
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
        account is linked to (Forbidden when unlinked or when ``origin`` names another).
        Refused with the reason when it does not name one patient (:func:`patient_named`) or
        gives no reason; TooManyRequests (audited) when the site has too many waiting or sent
        too many this hour. The same request sent again (its ``request_id``) is the one
        already received. Nothing in the answer says whether we know the patient."""
        origin = site_origin(actor, linked_site(self._engine, actor.name),
                             str(body.get("origin", ""))[:16])
        named = patient_named(*(str(body.get(k, "") or "") for k in (
            "nhs_number", "hospital_number", "patient_name", "birth_date")))
        reason = str(body.get("reason", "") or "").strip()
        if not reason:
            raise ImageShareError("say why the imaging is needed")
        priority = body.get("priority", "routine")
        remote_id = str(body.get("request_id", "") or "")[:32]
        now = datetime.now(UTC)
        with self._engine.connect() as conn:
            mine = imaging_requests.c.direction == "incoming", imaging_requests.c.site == origin
            if remote_id:
                again = conn.execute(select(imaging_requests.c.public_id).where(
                    *mine, imaging_requests.c.remote_id == remote_id)).scalar()
                if again is not None:
                    return self.get(again)
            waiting = conn.execute(select(func.count()).select_from(imaging_requests).where(
                *mine, imaging_requests.c.state == "open")).scalar() or 0
            recent = conn.execute(select(func.count()).select_from(imaging_requests).where(
                *mine, imaging_requests.c.created_at >= now - timedelta(hours=1))).scalar() or 0
        if waiting >= MAX_OPEN_PER_SITE or recent >= MAX_PER_SITE_HOUR:
            self._audit.record(AuditEvent(
                actor=actor, action="exchange.request.receive", outcome="failure",
                detail={"origin": origin, "reason": "too many requests", "open": waiting,
                        "last_hour": recent}))
            raise TooManyRequests(
                f"too many requests from {origin} are waiting here or were sent this hour: "
                "ask by the usual route (phone or e-mail)")
        request = self._insert(
            direction="incoming", site=origin, nhs_number=named.nhs_number,
            hospital_number=named.hospital_number, patient_name=named.patient_name,
            birth_date=named.birth_date, reason=reason[:4000],
            priority=priority if priority in PRIORITIES else "routine", state="open",
            detail="", created_by=str(body.get("requested_by", "") or actor.name)[:128],
            remote_id=remote_id)
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

    def read(self, public_id: str, actor: Actor, direction: str = "incoming") -> ImagingRequest:
        """One request of ``direction`` as ``actor`` reads it (audited: it names its patient);
        NotFound otherwise."""
        wanted = self.get(public_id)
        if wanted.direction != direction:
            raise NotFound("no such request")
        self._audit.record(AuditEvent(actor=actor, action="exchange.request.read",
                                      outcome="success",
                                      patient_id=wanted.nhs_number or wanted.hospital_number,
                                      detail={"direction": direction, "request": public_id}))
        return wanted

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
        """Record that a request ``actor`` claimed (:meth:`_claim`) was fulfilled (or
        declined), with what was done."""
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            conn.execute(update(imaging_requests).where(
                imaging_requests.c.public_id == public_id,
                imaging_requests.c.state == state).values(
                detail=detail[:2000], updated_at=now))
            self._audit.record(AuditEvent(actor=actor, action=f"exchange.request.{state}",
                                          outcome="success",
                                          detail={"request": public_id}), conn=conn)

    def _claim(self, public_id: str, state: str, actor: Actor) -> None:
        """Move an open request to ``state`` as ``actor``'s answer, in one statement: two
        people answering at once (one declining, one sending) cannot both; the second is
        refused before anything is sent or told to the site that asked."""
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            if not conn.execute(update(imaging_requests).where(
                    imaging_requests.c.public_id == public_id,
                    imaging_requests.c.direction == "incoming",
                    imaging_requests.c.state == "open").values(
                    state=state, detail="", updated_at=now, answered_by=actor.name[:128],
                    answered_at=now)).rowcount:
                raise ImageShareError("this request was answered already (by someone else "
                                      "just now): see the list")

    def _unclaim(self, public_id: str, state: str, actor: Actor) -> None:
        """Open again a request whose answer failed before anything was sent."""
        with self._engine.begin() as conn:
            conn.execute(update(imaging_requests).where(
                imaging_requests.c.public_id == public_id,
                imaging_requests.c.state == state,
                imaging_requests.c.answered_by == actor.name[:128]).values(
                state="open", detail="", answered_by="", answered_at=None,
                updated_at=datetime.now(UTC)))

    def fulfil(self, public_id: str, study_uids: list[str], actor: Actor,
               allowed_studies: Collection[str] | None = None, contact: str = "",
               of_patient: Collection[str] | None = None) -> list[Transfer]:
        """Answer an incoming request by pushing the chosen studies to the site that asked;
        the request is marked fulfilled and the answer goes back to the requester.
        ``of_patient``: the studies of the patient the request names (as the caller found
        them); a chosen study outside them is refused, nothing sent (another patient's
        images never answer a request)."""
        wanted = self._incoming(public_id)
        if not study_uids:
            raise ImageShareError("choose the studies to send")
        if of_patient is not None and not set(study_uids) <= set(of_patient):
            raise ImageShareError("only studies of the patient the request names can be sent "
                                  "in answer to it")
        if self._transfers is None:
            raise ImageShareError("sending is not available")
        self._claim(public_id, "fulfilled", actor)
        sent: list[Transfer] = []
        try:
            for uid in study_uids:
                sent.append(self._transfers.send(
                    uid, wanted.site, actor, wanted.priority,
                    f"answer to your request: {wanted.reason}"[:2000], (), allowed_studies,
                    contact, wanted.remote_id))
        except BaseException:
            if not sent:
                self._unclaim(public_id, "fulfilled", actor)
                raise
            self._fulfilled(wanted, sent, actor)  # what did go is the answer
            raise
        self._fulfilled(wanted, sent, actor)
        return sent

    def _fulfilled(self, wanted: ImagingRequest, sent: list[Transfer], actor: Actor) -> None:
        detail = (f"{len(sent)} study(ies) sent: transfer(s) "
                  + ", ".join(t.public_id for t in sent))
        self.mark(wanted.public_id, "fulfilled", detail, actor)
        self._answer(wanted, "fulfilled", f"{len(sent)} study(ies) sent", actor)

    def decline(self, public_id: str, reason: str, actor: Actor) -> None:
        """Decline an incoming request, saying why; the answer goes back to the requester."""
        wanted = self._incoming(public_id)
        if not reason.strip():
            raise ImageShareError("say why the request is declined")
        self._claim(public_id, "declined", actor)
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
        if wanted.state in ("fulfilled", "declined"):
            if wanted.state == state:
                return wanted  # the same answer sent again (a retry): already recorded
            raise ImageShareError(f"this request was {wanted.state} already")
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
