"""Exchange pages: search other hospitals, retrieve, send with receipts, the inbox, sites."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from imageshare.access.policy import EXCHANGE, NODE_MANAGE
from imageshare.audit.trail import AuditEvent
from imageshare.domain.errors import ImageShareError
from imageshare.exchange.nodes import Node
from imageshare.web.auth import allowed
from imageshare.web.deps import ArchiveDep
from imageshare.web.exchange_api import patient_query
from imageshare.web.pages.templating import page, redirect
from imageshare.web.params import RowId

router = APIRouter(include_in_schema=False)


_EMPTY_FORM = {"nhs": "", "hospital_number": "", "name": "", "dob": ""}


@router.get("/exchange")
def exchange_form(request: Request, actor: allowed(EXCHANGE)) -> Response:
    """The form to search other hospitals (searches are posted: no patient detail goes in a
    URL; parameters given here are ignored)."""
    return page(request, "exchange.html", form=_EMPTY_FORM, result=None)


@router.post("/exchange")
async def exchange(request: Request, archive: ArchiveDep, actor: allowed(EXCHANGE),
                   nhs: Annotated[str, Form()] = "", hospital_number: Annotated[str, Form()] = "",
                   name: Annotated[str, Form()] = "", dob: Annotated[str, Form()] = "",
                   ) -> Response:
    """Search this archive and every connected site for a patient's studies."""
    form = {"nhs": nhs[:32], "hospital_number": hospital_number[:64], "name": name[:200],
            "dob": dob[:10]}
    if not any(form.values()):
        return page(request, "exchange.html", form=form, result=None)
    try:
        query = patient_query(form["nhs"], form["hospital_number"], form["name"], form["dob"])
        result = await run_in_threadpool(archive.exchange.search, query, actor,
                                         archive.policy.study_scope(actor))
    except ImageShareError as exc:
        return page(request, "exchange.html", status_code=400, form=form, result=None,
                    error=str(exc))
    return page(request, "exchange.html", form=form, result=result)


@router.post("/exchange/retrieve")
def retrieve(archive: ArchiveDep, actor: allowed(EXCHANGE), site: Annotated[str, Form()],
             study_uid: Annotated[str, Form()]) -> Response:
    """Bring a remote study here (a temporary copy) and follow the job."""
    job = archive.exchange.retrieve(site, study_uid, actor)
    return redirect(f"/jobs/{job.id}")


@router.post("/studies/{study_uid}/send")
async def send(archive: ArchiveDep, study_uid: str, actor: allowed(EXCHANGE, "study_uid"),
               site: Annotated[str, Form()], priority: Annotated[str, Form()] = "routine",
               note: Annotated[str, Form()] = "") -> Response:
    """Send the study to a connected site; follow its receipt."""
    transfer = await run_in_threadpool(archive.transfers.send, study_uid, site, actor,
                                       priority, note, (), archive.policy.study_scope(actor))
    return redirect(f"/transfers/{transfer.public_id}")


@router.get("/transfers")
def transfers(request: Request, archive: ArchiveDep, actor: allowed(EXCHANGE)) -> Response:
    """Recent transfers to other sites with their state."""
    return page(request, "transfers.html", transfers=archive.transfers
                .recent())


@router.get("/transfers/{transfer_id}")
def transfer(request: Request, archive: ArchiveDep,
             transfer_id: str, actor: allowed(EXCHANGE)) -> Response:
    """One transfer's receipt (refreshes while it runs)."""
    item = archive.transfers.get(transfer_id)
    return page(request, "transfers.html", transfers=[item], single=True)


@router.get("/inbox")
def inbox(request: Request, archive: ArchiveDep, actor: allowed(EXCHANGE)) -> Response:
    """Studies received from other sites, waiting for a decision."""
    items = archive.inbox.items()
    rows = [{"item": i, "study": archive.catalogue.record(i.study_uid),
             "match": archive.inbox.local_match(i)} for i in items]
    archive.audit.record(AuditEvent(actor=actor, action="inbox.read", outcome="success",
                                    instance_count=len(rows)))
    return page(request, "inbox.html", rows=rows,
                forward_sites=[n for n in archive.nodes.all() if n.send_to and not n.inbox])


@router.post("/inbox/{item}/{decision}")
async def decide(archive: ArchiveDep, item: RowId, decision: str, actor: allowed(EXCHANGE),
                 note: Annotated[str, Form()] = "", forward_to: Annotated[str, Form()] = ""
                 ) -> Response:
    """Accept (reconciled to the local patient, optionally forwarded to the PACS) or reject an
    inbox item."""
    if decision == "accept":
        await run_in_threadpool(archive.inbox.accept, item, actor, True, note)
        if forward_to:
            await run_in_threadpool(archive.transfers.send, archive.inbox.item(item).study_uid,
                                    forward_to, actor, "routine", "forwarded from the inbox")
    elif decision == "reject":
        await run_in_threadpool(archive.inbox.reject, item, actor, note)
    else:
        raise ImageShareError("decide accept or reject")
    return redirect("/inbox")


@router.get("/admin/sites")
def sites(request: Request, archive: ArchiveDep, actor: allowed(NODE_MANAGE)) -> Response:
    """Connected sites and DICOM nodes, and the DICOM callers that were refused."""
    return page(request, "sites.html", nodes=archive.nodes.all(),
                refused=archive.refused_callers.all())


@router.post("/admin/sites/refused")
def register_refused(
    request: Request, archive: ArchiveDep,
    actor: allowed(NODE_MANAGE), ae_title: Annotated[str, Form()],
    host: Annotated[str, Form()], port: Annotated[int, Form()] = 104,
    may_query: Annotated[str, Form()] = "",
) -> Response:
    """Register a refused caller at the host it called from, in one step (audited)."""
    try:
        archive.refused_callers.register(ae_title, host, actor, port, bool(may_query))
    except ImageShareError as exc:
        return page(request, "sites.html", status_code=400, nodes=archive.nodes.all(),
                    refused=archive.refused_callers.all(), error=str(exc))
    return redirect("/admin/sites")


@router.post("/admin/sites")
def add_site(
    request: Request, archive: ArchiveDep,
    actor: allowed(NODE_MANAGE), ae_title: Annotated[str, Form()],
    host: Annotated[str, Form()], port: Annotated[int, Form()],
    display_name: Annotated[str, Form()] = "", dicomweb_url: Annotated[str, Form()] = "",
    dicomweb_auth: Annotated[str, Form()] = "", searchable: Annotated[str, Form()] = "",
    retrieve_from: Annotated[str, Form()] = "", send_to: Annotated[str, Form()] = "",
    may_store: Annotated[str, Form()] = "", may_query: Annotated[str, Form()] = "",
    inbox: Annotated[str, Form()] = "", tls: Annotated[str, Form()] = "",
) -> Response:
    """Register (or update) a site."""
    node = Node(ae_title=ae_title.strip(), host=host.strip(), port=port,
                dicomweb_url=dicomweb_url.strip(), display_name=display_name.strip(),
                may_query=bool(may_query), may_retrieve=bool(may_query),
                may_store=bool(may_store), searchable=bool(searchable),
                retrieve_from=bool(retrieve_from), send_to=bool(send_to),
                dicomweb_auth=dicomweb_auth.strip(), inbox=bool(inbox), tls=bool(tls))
    try:
        archive.nodes.add(node, replace=True, actor=actor)
    except ImageShareError as exc:
        return page(request, "sites.html", status_code=400, nodes=archive.nodes.all(),
                    refused=archive.refused_callers.all(), error=str(exc))
    return redirect("/admin/sites")


@router.post("/admin/sites/{ae_title}/remove")
def remove_site(archive: ArchiveDep, ae_title: str, actor: allowed(NODE_MANAGE)) -> Response:
    """Forget a site."""
    archive.nodes.remove(ae_title, actor)
    return redirect("/admin/sites")
