"""Exchange between hospitals over the JSON API: federated search and retrieval."""

from __future__ import annotations

from dataclasses import asdict
from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from imageshare.access.policy import EXCHANGE, EXCHANGE_RECEIVE
from imageshare.archive.search import normalise_nhs_number
from imageshare.audit.trail import AuditEvent
from imageshare.domain.errors import ImageShareError, InvalidQuery
from imageshare.exchange.federated import PatientQuery
from imageshare.web.auth import allowed
from imageshare.web.deps import ArchiveDep
from imageshare.web.exports import job_view
from imageshare.web.pages.imaging_requests import candidate_uids
from imageshare.web.params import TOTAL, JsonApiRoute, Limit, Offset, RowId, Strict, Uid

router = APIRouter(prefix="/api/exchange", tags=["API"], route_class=JsonApiRoute)


# Characters that make a DICOM search key match many patients (PS3.4 C.2.2.2: ``*`` and
# ``?`` wildcards, ``\\`` a list of values): a federated search looks for one patient by who
# they are, never lists the patients of this or another hospital.
_MATCH_MANY = ("*", "?", "\\")


def _birth_date(dob: str) -> str:
    """YYYY-MM-DD or YYYYMMDD as a real date's YYYYMMDD ("" when not given); InvalidQuery
    otherwise (a range or a mistyped date is never sent to a site)."""
    value = dob.strip()
    if not value:
        return ""
    digits = value.replace("-", "") if len(value) == 10 and value[4] == value[7] == "-" else value
    try:
        if len(digits) != 8 or not digits.isdigit():
            raise ValueError(value)
        date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        raise InvalidQuery("the date of birth must be a date like 1970-01-31") from None
    return digits


def patient_query(nhs: str, hospital_number: str, name: str, dob: str) -> PatientQuery:
    """The query from request parameters: the NHS number checked, the date of birth a real
    date, and no wildcard or list of values in the hospital number or name (InvalidQuery,
    without quoting what was sent)."""
    for label, value in (("hospital number", hospital_number), ("name", name)):
        if any(char in value for char in _MATCH_MANY):
            raise InvalidQuery(f"the {label} must be given in full: wildcards (* ?) and lists "
                               "of values (\\) would match other patients")
    return PatientQuery(normalise_nhs_number(nhs) if nhs.strip() else "",
                        hospital_number.strip()[:64], name.strip()[:200], _birth_date(dob))


class PatientSearchIn(Strict):
    """Who to look for (in the body: patient details never go in a URL)."""

    nhs: str = Field(default="", max_length=32)
    hospital_number: str = Field(default="", max_length=64)
    name: str = Field(default="", max_length=200)
    dob: str = Field(default="", max_length=10, description="YYYY-MM-DD or YYYYMMDD")


@router.post("/search", summary="Federated search for a patient's studies")
async def federated_search(archive: ArchiveDep, body: PatientSearchIn, actor: allowed(EXCHANGE)
                           ) -> dict[str, Any]:
    """Local studies and those of every searchable site, each site within its timeout."""
    query = patient_query(body.nhs, body.hospital_number, body.name, body.dob)
    result = await run_in_threadpool(archive.exchange.search, query, actor,
                                     archive.policy.study_scope(actor))
    return {"linking": result.linking,
            "local": [asdict(s) for s in result.local],
            "sites": [{**{k: v for k, v in asdict(a).items() if k != "studies"},
                       "studies": [asdict(s) for s in a.studies]} for a in result.sites]}


class RetrieveIn(Strict):
    """A remote study to bring here."""

    site: str = Field(min_length=1, max_length=16)
    study_uid: str = Field(min_length=1, max_length=64)


@router.post("/retrieve", status_code=202, summary="Retrieve a study from a site")
def retrieve(archive: ArchiveDep, body: RetrieveIn, actor: allowed(EXCHANGE)) -> dict[str, Any]:
    """Starts the retrieval (a temporary copy); follow it at /api/jobs/{id}."""
    job = archive.exchange.retrieve(body.site, body.study_uid, actor)
    return job_view(job)


class PushIn(Strict):
    """A study to send to a site."""

    site: str = Field(min_length=1, max_length=16)
    study_uid: str = Field(min_length=1, max_length=64)
    priority: str = Field(default="routine", pattern="^(urgent|routine)$")
    note: str = Field(default="", max_length=2000)
    contact: str = Field(default="", max_length=256,
                         description="who the receiving team should call about it")
    notify: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=list, max_length=20, description="user names to tell as it goes")


def _transfer(transfer: Any) -> dict[str, Any]:
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v)
            for k, v in asdict(transfer).items()}


@router.post("/push", status_code=202, summary="Send a study to a site")
async def push(archive: ArchiveDep, body: PushIn, actor: allowed(EXCHANGE)) -> dict[str, Any]:
    """Queued -> sending -> delivered or failed (with the reason); retried; the sender and the
    named users are notified."""
    transfer = await run_in_threadpool(
        archive.transfers.send, body.study_uid, body.site, actor, body.priority, body.note,
        tuple(body.notify), archive.policy.study_scope(actor), body.contact)
    return _transfer(transfer)


class ArrivalIn(BaseModel):
    """What travels with a study another ImageShare pushed to us (site to site)."""

    origin: str = Field(default="", max_length=16,
                        description="the sending site's AE title: taken from the site account's "
                        "linked site; when given it must be that site (else 403)")
    study_uid: str = Field(min_length=1, max_length=64)
    transfer: str = Field(default="", max_length=32,
                          description="the sender's transfer id (receipts answer it)")
    priority: str = Field(default="routine", pattern="^(urgent|routine)$")
    note: str = Field(default="", max_length=2000)
    contact: str = Field(default="", max_length=256)
    request: str = Field(default="", max_length=32,
                         description="our request for prior imaging that this answers")
    instances: int = Field(default=0, ge=0)
    sent_by: str = Field(default="", max_length=128)


@router.post("/arrivals", summary="What travels with a pushed study (site to site)")
def arrival(archive: ArchiveDep, body: ArrivalIn, actor: allowed(EXCHANGE_RECEIVE)
            ) -> dict[str, Any]:
    """Another ImageShare says who sent the study it pushed, how urgent it is, its note and
    contact: kept on the inbox item; an urgent arrival alerts the receiving team."""
    item = archive.arrivals.announce(actor, body.model_dump())
    return {"inbox_item": item.pk, "status": item.status}


class ReceiptIn(BaseModel):
    """A receiving site's receipt for a study we sent (site to site)."""

    origin: str = Field(default="", max_length=16,
                        description="the sending site's AE title: taken from the site account's "
                        "linked site; when given it must be that site (else 403)")
    transfer: str = Field(min_length=1, max_length=32)
    study_uid: str = Field(default="", max_length=64)
    outcome: str = Field(pattern="^(accepted|rejected)$")
    by: str = Field(default="", max_length=128)
    at: str = Field(default="", max_length=64, description="ISO 8601")
    note: str = Field(default="", max_length=2000)


@router.post("/receipts", summary="A receipt for a study we sent (site to site)")
def receipt(archive: ArchiveDep, body: ReceiptIn, actor: allowed(EXCHANGE_RECEIVE)
            ) -> dict[str, Any]:
    """Shown on the transfer's page; the person who sent the study is told."""
    return _transfer(archive.transfers.record_receipt(actor, body.model_dump()))


@router.get("/transfers/{transfer_id}", summary="A transfer's receipt")
def transfer(archive: ArchiveDep, transfer_id: str, actor: allowed(EXCHANGE)) -> dict[str, Any]:
    """State and counts of one transfer."""
    return _transfer(archive.transfers.get(transfer_id))


@router.post("/transfers/{transfer_id}/cancel", summary="Cancel a transfer still running")
async def cancel_transfer(archive: ArchiveDep, transfer_id: str, actor: allowed(EXCHANGE)
                          ) -> dict[str, Any]:
    """Stop a queued or sending transfer between two instances (what the site acknowledged
    stays counted as sent); audited, its sender told. 400 once it has ended."""
    return _transfer(await run_in_threadpool(archive.transfers.cancel, transfer_id[:32],
                                             actor))


@router.get("/inbox", summary="Studies received from other sites")
def inbox(archive: ArchiveDep, response: Response, actor: allowed(EXCHANGE),
          status: str = Query(default="pending", max_length=16), limit: Limit = 1000,
          offset: Offset = 0) -> list[dict[str, Any]]:
    """Each item with the local patient it would be reconciled to (by NHS number), newest
    first, a page at a time (``X-Total-Count``: all of them)."""
    out = []
    items = archive.inbox.items(status)
    response.headers[TOTAL] = str(len(items))
    for item in items[offset:offset + limit]:
        match = archive.inbox.local_match(item) if status == "pending" else None
        out.append({**{k: (v.isoformat() if hasattr(v, "isoformat") else v)
                       for k, v in asdict(item).items()},
                    "local_patient_id": match.patient_id if match else None})
    archive.audit.record(AuditEvent(actor=actor, action="inbox.read", outcome="success",
                                    instance_count=len(out)))
    return out


class DecisionIn(Strict):
    """Accept (reconciling to the local patient) or reject an inbox item."""

    reconcile: bool = True
    note: str = Field(default="", max_length=2000)
    forward_to: str = Field(default="", max_length=16,
                            description="also send the accepted study to this site (the PACS)")


@router.post("/inbox/{item}/accept", summary="Accept an inbox item into the archive")
async def accept(archive: ArchiveDep, item: RowId, body: DecisionIn, actor: allowed(EXCHANGE)
                 ) -> dict[str, str]:
    """Reconcile to the local patient (by NHS number), keep the study, and optionally forward
    it to the local PACS. A site it may not be forwarded to is refused before anything is
    accepted (never an accepted study with an error answer)."""
    if body.forward_to:
        try:  # UnknownNode: 404, nothing accepted
            archive.transfers.destination(body.forward_to)
        except ImageShareError as exc:
            raise type(exc)(f"{exc}; nothing was accepted") from None
    done = await run_in_threadpool(archive.inbox.accept, item, actor, body.reconcile,
                                   body.note)
    if body.forward_to:
        study_uid = archive.inbox.item(item).study_uid
        transfer = await run_in_threadpool(archive.transfers.send, study_uid, body.forward_to,
                                           actor, "routine", "forwarded from the inbox")
        done += f"; forwarded (transfer {transfer.public_id})"
    return {"done": done}


@router.post("/inbox/{item}/reject", summary="Reject an inbox item")
async def reject(archive: ArchiveDep, item: RowId, body: DecisionIn, actor: allowed(EXCHANGE)
                 ) -> dict[str, int]:
    """Delete the received instances (audited)."""
    removed = await run_in_threadpool(archive.inbox.reject, item, actor,
                                      body.note)
    return {"deleted": removed.instances}


class RequestIn(Strict):
    """A request for a patient's prior imaging from a site."""

    site: str = Field(min_length=1, max_length=16)
    reason: str = Field(min_length=1, max_length=4000)
    priority: str = Field(default="routine", pattern="^(urgent|routine)$")
    nhs_number: str = Field(default="", max_length=16)
    hospital_number: str = Field(default="", max_length=64)
    patient_name: str = Field(default="", max_length=324)
    birth_date: str = Field(default="", max_length=10, description="YYYY-MM-DD or YYYYMMDD")


@router.post("/requests", status_code=201, summary="Request prior imaging from a site")
async def request_imaging(archive: ArchiveDep, body: RequestIn, actor: allowed(EXCHANGE)
                          ) -> dict[str, Any]:
    """Delivered to the site's staff when it runs ImageShare; otherwise says to use its usual
    contact route."""
    sent = await run_in_threadpool(
        archive.requests.send, body.site, actor, body.reason, body.priority,
        normalise_nhs_number(body.nhs_number) if body.nhs_number else "",
        body.hospital_number, body.patient_name, _birth_date(body.birth_date))
    return _transfer(sent)


@router.post("/requests/incoming", status_code=201, summary="Receive a request (site to site)")
def receive_request(archive: ArchiveDep, body: dict[str, str],
                    actor: allowed(EXCHANGE_RECEIVE)) -> dict[str, str]:
    """Another ImageShare site asks our staff for a patient's prior imaging."""
    received = archive.requests.receive(actor, body)
    return {"id": received.public_id}


class AnswerIn(BaseModel):
    """The other site's answer to a request for prior imaging we sent (site to site)."""

    origin: str = Field(default="", max_length=16,
                        description="the sending site's AE title: taken from the site account's "
                        "linked site; when given it must be that site (else 403)")
    request: str = Field(min_length=1, max_length=32)
    state: str = Field(pattern="^(fulfilled|declined)$")
    detail: str = Field(default="", max_length=2000)
    by: str = Field(default="", max_length=128)
    at: str = Field(default="", max_length=64)


@router.post("/requests/answers", summary="An answer to a request we sent (site to site)")
def request_answer(archive: ArchiveDep, body: AnswerIn, actor: allowed(EXCHANGE_RECEIVE)
                   ) -> dict[str, Any]:
    """The requester's list shows the new state; the person who asked is told."""
    return _transfer(archive.requests.record_answer(actor, body.model_dump()))


@router.get("/requests", summary="Requests for prior imaging")
def list_requests(archive: ArchiveDep, response: Response, actor: allowed(EXCHANGE),
                  direction: str = "incoming", limit: Limit = 1000, offset: Offset = 0
                  ) -> list[dict[str, Any]]:
    """Incoming (for our staff to fulfil) or outgoing requests, newest first, a page at a
    time (``X-Total-Count``: all of them)."""
    if direction not in ("incoming", "outgoing"):
        raise InvalidQuery("direction is incoming or outgoing")
    listed = archive.requests.listed(direction, actor)
    response.headers[TOTAL] = str(len(listed))
    return [_transfer(r) for r in listed[offset:offset + limit]]


class FulfilIn(Strict):
    """The studies that answer an incoming request."""

    study_uid: str = Field(default="", max_length=64)
    study_uids: list[Uid] = Field(default_factory=list, max_length=50)
    contact: str = Field(default="", max_length=256)


@router.post("/requests/{request_id}/fulfil", status_code=202,
             summary="Answer a request by sending studies")
async def fulfil(archive: ArchiveDep, request_id: str, body: FulfilIn,
                 actor: allowed(EXCHANGE)) -> dict[str, Any]:
    """Push the studies to the requesting site, mark the request fulfilled and tell the
    requester (through the job queue). Answers the first transfer (and all of them)."""
    uids = list(body.study_uids) or ([body.study_uid] if body.study_uid else [])
    wanted = archive.requests.get(request_id[:32])
    named = (await run_in_threadpool(candidate_uids, archive, wanted, actor)
             if wanted.direction == "incoming" else [])
    sent = await run_in_threadpool(archive.requests.fulfil, request_id, uids, actor,
                                   archive.policy.study_scope(actor), body.contact, named)
    return {**_transfer(sent[0]), "transfers": [_transfer(t) for t in sent]}


class DeclineIn(Strict):
    """Why an incoming request is declined."""

    reason: str = Field(min_length=1, max_length=2000)


@router.post("/requests/{request_id}/decline", summary="Decline a request, saying why")
def decline(archive: ArchiveDep, request_id: str, body: DeclineIn, actor: allowed(EXCHANGE)
            ) -> dict[str, Any]:
    """Mark the request declined and tell the requester why (through the job queue)."""
    archive.requests.decline(request_id, body.reason, actor)
    return _transfer(archive.requests.get(request_id))
