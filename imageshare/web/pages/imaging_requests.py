"""Requests for prior imaging, both sides: asking another site (patient, reason, urgency), the
requester's list (its state updated as the other site answers), and the incoming requests our
staff fulfil (the chosen studies pushed back) or decline with a reason."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from imageshare.access.policy import EXCHANGE
from imageshare.archive.search import StudySearch, StudySummary, normalise_nhs_number
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError, NotFound
from imageshare.exchange.requests import ImagingRequest, patient_named
from imageshare.web.auth import allowed
from imageshare.web.deps import Archive, ArchiveDep
from imageshare.web.pages.templating import page, redirect

router = APIRouter(include_in_schema=False)


def _lists(request: Request, archive: Archive, actor: Actor, status_code: int = 200,
           **context: object) -> Response:
    return page(request, "requests.html", status_code=status_code,
                incoming=archive.requests.listed("incoming", actor),
                outgoing=archive.requests.listed("outgoing", actor),
                sites=[n for n in archive.nodes.all() if n.send_to or n.dicomweb_url],
                labels={n.ae_title: n.label for n in archive.nodes.all()}, **context)


@router.get("/requests")
def requests_page(request: Request, archive: ArchiveDep, actor: allowed(EXCHANGE)
                  ) -> Response:
    """Requests for prior imaging: the form to ask another site, ours with their answers,
    and those other sites sent us."""
    return _lists(request, archive, actor, form={})


@router.post("/requests")
async def new_request(request: Request, archive: ArchiveDep, actor: allowed(EXCHANGE),
                      site: Annotated[str, Form()], reason: Annotated[str, Form()] = "",
                      priority: Annotated[str, Form()] = "routine",
                      nhs_number: Annotated[str, Form()] = "",
                      hospital_number: Annotated[str, Form()] = "",
                      patient_name: Annotated[str, Form()] = "",
                      birth_date: Annotated[str, Form()] = "") -> Response:
    """Ask a site for a patient's prior imaging."""
    form = {"site": site[:16], "reason": reason[:4000], "priority": priority[:16],
            "nhs_number": nhs_number[:32], "hospital_number": hospital_number[:64],
            "patient_name": patient_name[:324], "birth_date": birth_date[:10]}
    try:
        await run_in_threadpool(
            archive.requests.send, form["site"], actor, form["reason"], form["priority"],
            normalise_nhs_number(form["nhs_number"]) if form["nhs_number"].strip() else "",
            form["hospital_number"].strip(), form["patient_name"].strip(),
            form["birth_date"].replace("-", ""))
    except ImageShareError as exc:
        return _lists(request, archive, actor, 400, form=form, error=str(exc))
    return redirect("/requests?notice=request-sent")


def _candidates(archive: Archive, wanted: ImagingRequest, actor: Actor
                ) -> list[StudySummary]:
    """Our studies of the patient asked for (by NHS number, hospital number, or name and
    date of birth), to choose from; none for a request that does not name one patient (a
    wildcard or a value list kept from before requests were checked would list others)."""
    try:
        patient_named(wanted.nhs_number, wanted.hospital_number, wanted.patient_name,
                      wanted.birth_date)
    except ImageShareError:
        return []
    if wanted.nhs_number:
        search = StudySearch(nhs_number=wanted.nhs_number)
    elif wanted.hospital_number:
        search = StudySearch(hospital_number=wanted.hospital_number)
    elif wanted.patient_name and wanted.birth_date:
        search = StudySearch(name=wanted.patient_name.replace("^", " ").strip(),
                             birth_date=wanted.birth_date)
    else:
        return []
    try:
        return archive.search.search(search, actor, archive.policy.study_scope(actor)).studies
    except ImageShareError:
        return []


def candidate_uids(archive: Archive, wanted: ImagingRequest, actor: Actor) -> list[str]:
    """The study UIDs an answer to ``wanted`` may send: our studies of the patient it names
    that ``actor`` may see (the ones its page offers)."""
    return [s.study_uid for s in _candidates(archive, wanted, actor)]


def _incoming(archive: Archive, request_id: str) -> ImagingRequest:
    wanted = archive.requests.get(request_id)
    if wanted.direction != "incoming":
        raise NotFound("no such request")
    return wanted


@router.get("/requests/{request_id}")
async def incoming_request(request: Request, archive: ArchiveDep, request_id: str,
                           actor: allowed(EXCHANGE)) -> Response:
    """An incoming request with our studies of that patient: fulfil (send the chosen ones)
    or decline with a reason (the reading audited: it names the patient)."""
    wanted = await run_in_threadpool(archive.requests.read, request_id, actor)
    studies = await run_in_threadpool(_candidates, archive, wanted, actor)
    return page(request, "request.html", wanted=wanted, studies=studies,
                label=_label(archive, wanted.site))


def _label(archive: Archive, site: str) -> str:
    node = archive.nodes.find(site)
    return node.label if node is not None else site


@router.post("/requests/{request_id}/fulfil")
async def fulfil(request: Request, archive: ArchiveDep, request_id: str,
                 actor: allowed(EXCHANGE),
                 study_uid: Annotated[list[str] | None, Form()] = None,
                 contact: Annotated[str, Form()] = "") -> Response:
    """Send the chosen studies to the site that asked; it is told the request is fulfilled."""
    wanted = _incoming(archive, request_id)
    try:
        named = await run_in_threadpool(candidate_uids, archive, wanted, actor)
        await run_in_threadpool(archive.requests.fulfil, wanted.public_id,
                                [u[:64] for u in (study_uid or [])][:50], actor,
                                archive.policy.study_scope(actor), contact[:256], named)
    except ImageShareError as exc:
        studies = await run_in_threadpool(_candidates, archive, wanted, actor)
        return page(request, "request.html", status_code=400, wanted=wanted,
                    studies=studies, label=_label(archive, wanted.site), error=str(exc))
    return redirect("/requests?notice=request-fulfilled")


@router.post("/requests/{request_id}/decline")
async def decline(request: Request, archive: ArchiveDep, request_id: str,
                  actor: allowed(EXCHANGE), reason: Annotated[str, Form()] = "") -> Response:
    """Decline, saying why; the site that asked is told."""
    wanted = _incoming(archive, request_id)
    try:
        await run_in_threadpool(archive.requests.decline, wanted.public_id, reason[:2000],
                                actor)
    except ImageShareError as exc:
        studies = await run_in_threadpool(_candidates, archive, wanted, actor)
        return page(request, "request.html", status_code=400, wanted=wanted,
                    studies=studies, label=_label(archive, wanted.site), error=str(exc))
    return redirect("/requests?notice=request-declined")
