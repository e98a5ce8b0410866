"""Exchange pages: search other hospitals, retrieve, send with receipts, the inbox, sites."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from imageshare.access.policy import EXCHANGE, NODE_MANAGE
from imageshare.archive.retrieve import StoredInstance
from imageshare.archive.viewing import viewer_manifest
from imageshare.audit.trail import AuditEvent
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError, NotFound
from imageshare.domain.identifiers import typed_person_name
from imageshare.exchange.nodes import Node
from imageshare.web.auth import PRIVATE_HEADERS, allowed
from imageshare.web.deps import Archive, ArchiveDep
from imageshare.web.dicomweb import render_stored
from imageshare.web.exchange_api import patient_query
from imageshare.web.pages.templating import dicom_date, page, person, redirect
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
                   family_name: Annotated[str, Form()] = "",
                   given_name: Annotated[str, Form()] = "") -> Response:
    """Search this archive and every connected site for a patient's studies (the name as
    typed in its two fields, or as a DICOM ``name``)."""
    if family_name.strip() or given_name.strip():
        name = typed_person_name(family_name, given_name, 200)
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
    uids = [st.study_uid for site in result.sites for st in site.studies]
    return page(request, "exchange.html", form=form, result=result,
                copies=archive.site_status.copies(uids))


@router.post("/exchange/retrieve")
def retrieve(archive: ArchiveDep, actor: allowed(EXCHANGE), site: Annotated[str, Form()],
             study_uid: Annotated[str, Form()], back: Annotated[str, Form()] = "") -> Response:
    """Bring a remote study here (a temporary copy) and follow it: on the study page it came
    from (``back``, a study page of ours) or on the job's page."""
    job = archive.exchange.retrieve(site, study_uid, actor)
    if back.startswith("/studies/") and "//" not in back and len(back) < 100:
        return redirect(f"{back.split('#')[0]}#other-sites")
    return redirect(f"/jobs/{job.id}")


@router.post("/studies/{study_uid}/send")
async def send(archive: ArchiveDep, study_uid: str, actor: allowed(EXCHANGE, "study_uid"),
               site: Annotated[str, Form()], priority: Annotated[str, Form()] = "routine",
               note: Annotated[str, Form()] = "", contact: Annotated[str, Form()] = ""
               ) -> Response:
    """Send the study to a connected site; follow its receipt."""
    transfer = await run_in_threadpool(archive.transfers.send, study_uid, site, actor,
                                       priority, note, (), archive.policy.study_scope(actor),
                                       contact[:256])
    return redirect(f"/transfers/{transfer.public_id}")


@router.get("/transfers")
def transfers(request: Request, archive: ArchiveDep, actor: allowed(EXCHANGE)) -> Response:
    """Recent transfers to other sites with their state."""
    return page(request, "transfers.html", transfers=archive.transfers.recent(),
                labels=_labels(archive))


@router.get("/transfers/{transfer_id}")
def transfer(request: Request, archive: ArchiveDep,
             transfer_id: str, actor: allowed(EXCHANGE)) -> Response:
    """One transfer's receipt (refreshes while it runs)."""
    item = archive.transfers.get(transfer_id)
    return page(request, "transfers.html", transfers=[item], single=True,
                labels=_labels(archive))


@router.post("/transfers/{transfer_id}/cancel")
async def cancel_transfer(archive: ArchiveDep, transfer_id: str, actor: allowed(EXCHANGE)
                          ) -> Response:
    """Stop a transfer that is queued or sending; back to its page."""
    transfer = await run_in_threadpool(archive.transfers.cancel, transfer_id[:32], actor)
    return redirect(f"/transfers/{transfer.public_id}")  # its page says it was cancelled


def _labels(archive: Archive) -> dict[str, str]:
    """Site names by AE title (people read names, not AE titles)."""
    return {n.ae_title: n.label for n in archive.nodes.all()}


@router.get("/inbox")
def inbox(request: Request, archive: ArchiveDep, actor: allowed(EXCHANGE)) -> Response:
    """Studies received from other sites, waiting for a decision."""
    items = sorted(archive.inbox.items(), key=lambda i: i.priority != "urgent")
    rows = [{"item": i, "study": archive.catalogue.record(i.study_uid),
             "match": archive.inbox.local_match(i), "sender": archive.arrivals.sender(i)}
            for i in items]
    decided = sorted(archive.inbox.items("accepted") + archive.inbox.items("rejected"),
                     key=lambda i: i.decided_at or i.last_received, reverse=True)[:20]
    archive.audit.record(AuditEvent(actor=actor, action="inbox.read", outcome="success",
                                    instance_count=len(rows)))
    return page(request, "inbox.html", rows=rows,
                urgent_count=sum(i.priority == "urgent" for i in items),
                decided=[{"item": i, "sender": archive.arrivals.sender(i)} for i in decided],
                forward_sites=[n for n in archive.nodes.all() if n.send_to and not n.inbox])


@router.get("/inbox/{item}/viewer")
async def inbox_viewer(request: Request, archive: ArchiveDep, item: RowId,
                       actor: allowed(EXCHANGE), series: str = "") -> Response:
    """The inbox's own viewer: a received study before anyone accepted it (it is in no
    search, query or retrieval until then)."""
    received = archive.inbox.item(item)
    study = await run_in_threadpool(archive.catalogue.view, received.study_uid, actor, None,
                                    True)
    manifest = await run_in_threadpool(viewer_manifest, study, archive.retrieve.header, series)
    manifest.update(base=f"/inbox/{item}/dicomweb", annotations=[], me=actor.name,
                    annotationsUrl="")
    return page(request, "viewer.html", manifest=manifest,
                banner_name=person(study.patient.name), banner_id=study.patient.patient_id,
                banner_date=dicom_date(study.study_date), back_link="/inbox",
                back_label="Inbox", comment_action="")


def _private(response: Response) -> Response:
    """A received study's image: kept by no browser or proxy cache (it is another hospital's
    patient, and a rejected study must not live on in a cache) and never sniffed into
    another type, as the archive's own DICOMweb answers are (PrivateRoute)."""
    for name, value in PRIVATE_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def _received(archive: Archive, actor: Actor, item: int, study: str, series: str,
              sop: str = "") -> StoredInstance:
    received = archive.inbox.item(item)
    if study != received.study_uid:
        raise NotFound("no such study, series or instance")
    found = archive.retrieve.select(actor, "inbox.view", study_uids=[study],
                                    series_uids=[series], sop_uids=[sop] if sop else (),
                                    include_review=True)
    return found[len(found) // 2] if not sop else found[0]


@router.get("/inbox/{item}/dicomweb/studies/{study}/series/{series}/thumbnail")
def inbox_thumbnail(request: Request, archive: ArchiveDep, item: RowId, study: str,
                    series: str, actor: allowed(EXCHANGE)) -> Response:
    """A received series' thumbnail, for the inbox viewer."""
    inst = _received(archive, actor, item, study, series)
    return _private(render_stored(request, inst, max(1, (inst.number_of_frames + 1) // 2),
                                  thumbnail=True))


@router.get("/inbox/{item}/dicomweb/studies/{study}/series/{series}/instances/{sop}/rendered")
def inbox_rendered(request: Request, archive: ArchiveDep, item: RowId, study: str,
                   series: str, sop: str, actor: allowed(EXCHANGE)) -> Response:
    """A received image, rendered for the inbox viewer."""
    return _private(render_stored(request, _received(archive, actor, item, study, series, sop),
                                  1))


@router.get("/inbox/{item}/dicomweb/studies/{study}/series/{series}/instances/{sop}"
            "/frames/{frame}/rendered")
def inbox_rendered_frame(request: Request, archive: ArchiveDep, item: RowId, study: str,
                         series: str, sop: str, frame: int, actor: allowed(EXCHANGE)
                         ) -> Response:
    """One frame of a received clip, rendered for the inbox viewer."""
    return _private(render_stored(request, _received(archive, actor, item, study, series, sop),
                                  max(frame, 1)))


@router.post("/inbox/{item}/{decision}")
async def decide(archive: ArchiveDep, item: RowId, decision: str, actor: allowed(EXCHANGE),
                 note: Annotated[str, Form()] = "", forward_to: Annotated[str, Form()] = ""
                 ) -> Response:
    """Accept (reconciled to the local patient, optionally forwarded to the PACS) or reject an
    inbox item."""
    if decision == "accept":
        if forward_to:  # refused before anything is accepted, as the API does
            try:
                archive.transfers.destination(forward_to)
            except ImageShareError as exc:
                raise type(exc)(f"{exc}; nothing was accepted") from None
        await run_in_threadpool(archive.inbox.accept, item, actor, True, note)
        if forward_to:
            await run_in_threadpool(archive.transfers.send, archive.inbox.item(item).study_uid,
                                    forward_to, actor, "routine", "forwarded from the inbox")
    elif decision == "reject":
        await run_in_threadpool(archive.inbox.reject, item, actor, note)
    else:
        raise ImageShareError("decide accept or reject")
    return redirect(f"/inbox?notice=inbox-{decision}ed")


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
    return redirect("/admin/sites?notice=site-registered")


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
    tls_certificate: Annotated[str, Form()] = "",
) -> Response:
    """Register (or update) a site."""
    node = Node(ae_title=ae_title.strip(), host=host.strip(), port=port,
                dicomweb_url=dicomweb_url.strip(), display_name=display_name.strip(),
                may_query=bool(may_query), may_retrieve=bool(may_query),
                may_store=bool(may_store), searchable=bool(searchable),
                retrieve_from=bool(retrieve_from), send_to=bool(send_to),
                dicomweb_auth=dicomweb_auth.strip(), inbox=bool(inbox), tls=bool(tls),
                tls_certificate=tls_certificate[:128])
    try:
        archive.nodes.add(node, replace=True, actor=actor)
    except ImageShareError as exc:
        return page(request, "sites.html", status_code=400, nodes=archive.nodes.all(),
                    refused=archive.refused_callers.all(), error=str(exc))
    return redirect("/admin/sites?notice=site-added")


@router.post("/admin/sites/{ae_title}/test")
async def test_site(request: Request, archive: ArchiveDep, ae_title: str,
                    actor: allowed(NODE_MANAGE)) -> Response:
    """Test the connection to a site (C-ECHO; an authenticated QIDO-RS over DICOMweb) and
    show the result."""
    checks = await run_in_threadpool(archive.exchange.test_connection, ae_title, actor)
    return page(request, "sites.html", nodes=archive.nodes.all(),
                refused=archive.refused_callers.all(), tested=archive.nodes.get(ae_title),
                checks=checks)


@router.post("/admin/sites/{ae_title}/remove")
def remove_site(archive: ArchiveDep, ae_title: str, actor: allowed(NODE_MANAGE)) -> Response:
    """Forget a site."""
    archive.nodes.remove(ae_title, actor)
    return redirect("/admin/sites?notice=site-removed")
