"""Home, search, the study page, its comments and its reports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from imageshare.access.policy import (
    ACCOUNT_SELF,
    AUDIT_READ,
    CASE_MANAGE,
    CONSENT_RECORD,
    DOCUMENT_ATTACH,
    EXCHANGE,
    EXPORT_DEIDENTIFIED,
    EXPORT_IDENTIFIABLE,
    PATIENT_CORRECT,
    RETENTION_MANAGE,
    SHARE_CREATE,
    STUDY_COMMENT,
    STUDY_READ,
)
from imageshare.archive.attachments import MAX_ATTACHMENT
from imageshare.archive.rendering import RenderOptions, render_frame
from imageshare.archive.search import StudySearch, StudySummary
from imageshare.archive.studies import ENCAPSULATED_PDF, StudyRecord
from imageshare.deid.profiles import load_profiles
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError, NotFound, PayloadTooLarge
from imageshare.domain.identifiers import is_valid_nhs_number
from imageshare.exchange.federated import PatientQuery
from imageshare.web.auth import allowed
from imageshare.web.deps import Archive, ArchiveDep, archive_of
from imageshare.web.exports import ExportIn, start_export
from imageshare.web.pages.templating import page, redirect

router = APIRouter(include_in_schema=False)
_SEARCH_PARAMS = {"q": "text", "nhs": "nhs_number", "hospital_number": "hospital_number",
                  "name": "name", "dob": "birth_date", "from": "date_from", "to": "date_to",
                  "modality": "modality", "accession": "accession"}


async def _search_from(request: Request) -> StudySearch:
    """The search asked for in a posted form (never in the URL: it may name a patient)."""
    form = await request.form()

    def field(name: str) -> str:
        value = form.get(name, "")
        return value[:200] if isinstance(value, str) else ""

    values = {name: field(param) for param, name in _SEARCH_PARAMS.items()}
    try:
        page_number = max(1, min(int(field("page") or "1"), 10_000))
    except ValueError:
        page_number = 1
    return StudySearch(**values, page=page_number)


def _results_page(request: Request, search: StudySearch, searched: bool) -> Response:
    archive = archive_of(request)
    actor = request.state.actor
    scope = archive.policy.study_scope(actor)
    error = ""
    results = None
    try:
        results = (archive.search.search(search, actor, scope) if searched
                   else archive.search.recent(actor, scope))
    except ImageShareError as exc:
        error = str(exc)
    # The pager posts the search again (hidden fields): no patient detail goes in a URL.
    fields = {param: getattr(search, name) for param, name in _SEARCH_PARAMS.items()}
    copies = archive.site_status.copies(s.study_uid for s in results.studies) if results \
        else {}
    return page(request, "home.html", status_code=400 if error else 200, search=search,
                page=results, searched=searched, error=error, copies=copies,
                search_fields={k: v for k, v in fields.items() if v})


@router.get("/")
def home(request: Request, archive: ArchiveDep, _actor: allowed(ACCOUNT_SELF)) -> Response:
    """The start page: the search form and the most recent studies."""
    if not archive.policy.allows(request.state.actor, STUDY_READ):
        return page(request, "home.html", search=StudySearch(), page=None, searched=False)
    return _results_page(request, StudySearch(), searched=False)


@router.get("/search")
def search_form(request: Request, _actor: allowed(STUDY_READ)) -> Response:
    """The search form with the most recent studies. Searches are posted, so that names,
    NHS numbers and birth dates never travel in a URL; parameters given here are ignored."""
    return _results_page(request, StudySearch(), searched=False)


@router.post("/search")
async def search(request: Request, _actor: allowed(STUDY_READ)) -> Response:
    """Studies matching the search box and filters, newest first, 25 a page."""
    criteria = await _search_from(request)
    return await run_in_threadpool(_results_page, request, criteria, not criteria.is_empty)


def _documents(study: StudyRecord) -> list[dict[str, object]]:
    docs: list[dict[str, object]] = []
    for series in study.series:
        if not series.is_documents:
            continue
        for inst in series.instances:
            kind = "PDF" if inst.sop_class_uid == ENCAPSULATED_PDF else "Image"
            title = series.description if series.description else "Document"
            docs.append({"sop_uid": inst.sop_uid, "kind": kind, "title": title,
                         "date": ""})
    return docs


@router.get("/studies/{study_uid}")
def study_page(request: Request, archive: ArchiveDep, study_uid: str,
               actor: allowed(STUDY_READ, "study_uid")) -> Response:
    """Patient banner, series with thumbnails and devices, reports, comments, history; for
    administrators also who viewed the study."""
    scope = archive.policy.study_scope(actor)
    study = archive.catalogue.view(study_uid, actor, scope)
    documents = _document_titles(request, study)
    allows = archive.policy.allows
    # Someone the study was shared with sees its shared items and their own comments only:
    # not the staff's discussion, nor earlier identities from the correction history.
    comments = archive.comments.for_study(study_uid)
    if scope is not None:
        comments = [c for c in comments if c.author == actor.name]
    return page(
        request, "study.html", study=study,
        image_series=[s for s in study.series if not s.is_documents],
        documents=documents,
        comments=comments,
        history=archive.corrections.history(study_uid) if scope is None else [],
        viewers=archive.catalogue.viewers(study_uid, actor) if allows(actor, AUDIT_READ)
        else None,
        retention=(archive.retention.study_retention(study_uid, record_only=True)
                   if scope is None else None),
        can_govern=allows(actor, RETENTION_MANAGE),
        consent=archive.consents.in_force(study_uid)
        if scope is None and allows(actor, CONSENT_RECORD) else None,
        can_correct=allows(actor, PATIENT_CORRECT),
        can_attach=allows(actor, DOCUMENT_ATTACH),
        can_comment=allows(actor, STUDY_COMMENT, study_uid),
        can_export=allows(actor, EXPORT_DEIDENTIFIED, study_uid),
        can_share=allows(actor, SHARE_CREATE, study_uid),
        my_cases=archive.cases.of(actor.name) if allows(actor, CASE_MANAGE) else None,
        exchange=_exchange_panel(archive, study) if allows(actor, EXCHANGE) else None,
        others=_other_studies(archive, study, actor) if scope is None else None,
        copy=archive.site_status.copies([study_uid]).get(study_uid),
        share_default_days=archive.settings.share_default_days,
        share_max_days=archive.settings.share_max_days,
        can_export_identifiable=allows(actor, EXPORT_IDENTIFIABLE, study_uid),
        profiles=sorted(load_profiles(Path(archive.settings.deid_profiles_file)
                                      if archive.settings.deid_profiles_file else None)),
    )


def _other_studies(archive: Archive, study: StudyRecord, actor: Actor) -> list[StudySummary]:
    """The patient's other studies here, newest first, to compare this one with: by NHS
    number when the patient has one, else by hospital number and its issuer (exactly);
    none for a study without a patient ID. Found by the archive's (audited) search; []
    when it refuses."""
    nhs = _nhs_number(study)
    patient_id, issuer = study.patient.patient_id.strip(), study.patient.issuer.strip()
    if not nhs and not patient_id:
        return []  # nobody to look for: studies without an ID are not one patient's
    wanted = StudySearch(nhs_number=nhs) if nhs else StudySearch(hospital_number=patient_id)
    try:
        found = archive.search.search(wanted, actor, None).studies
    except ImageShareError:
        return []
    # A hospital number is the patient's only with its issuer (another trust's H100 is
    # someone else); an NHS number's search checks whose number it is already.
    return [s for s in found if s.study_uid != study.study_uid
            and (nhs or (s.patient_id.strip() == patient_id and s.issuer.strip() == issuer))]


def _nhs_number(study: StudyRecord) -> str:
    """The patient's NHS number: recorded as such, or the Patient ID when it is one (no
    other issuer)."""
    patient = study.patient
    if patient.nhs_number:
        return patient.nhs_number
    if patient.issuer in ("", "NHS") and is_valid_nhs_number(patient.patient_id):
        return patient.patient_id
    return ""


def _patient_key(study: StudyRecord) -> str:
    nhs = _nhs_number(study)
    return f"nhs:{nhs}" if nhs else f"id:{study.patient.patient_id}"


def _exchange_panel(archive: Archive, study: StudyRecord) -> dict[str, object]:
    """What other sites last said about this patient (live), and where the study can be
    sent."""
    statuses = archive.site_status.sites(_patient_key(study))
    return {"statuses": statuses, "busy": any(s.busy for s in statuses),
            "nhs": _nhs_number(study),
            "sites": [n for n in archive.nodes.all() if n.send_to]}


@router.get("/studies/{study_uid}/sites")
def site_status(request: Request, archive: ArchiveDep, study_uid: str,
                actor: allowed(EXCHANGE, "study_uid")) -> Response:
    """The live status per site of this study's patient (the study page follows it while a
    site is being checked or a study downloaded)."""
    study = archive.catalogue.record(study_uid)
    return page(request, "_site_status.html", study=study,
                exchange=_exchange_panel(archive, study))


@router.post("/studies/{study_uid}/check")
async def check_sites(archive: ArchiveDep, study_uid: str,
                      actor: allowed(EXCHANGE, "study_uid")) -> Response:
    """Ask every connected site about this study's patient in the background; the study
    page shows each site checking, then its answer."""
    study = archive.catalogue.record(study_uid)
    patient, nhs = study.patient, _nhs_number(study)
    query = PatientQuery(nhs_number=nhs, hospital_number="" if nhs else patient.patient_id,
                         name=patient.name if nhs else "",
                         birth_date=patient.birth_date if nhs else "")
    await run_in_threadpool(archive.exchange.check, query, actor)
    return redirect(f"/studies/{study_uid}#other-sites")


def _document_titles(request: Request, study: StudyRecord) -> list[dict[str, object]]:
    """Documents with their own titles (read from the stored headers)."""
    archive = archive_of(request)
    docs = _documents(study)
    for doc in docs:
        title, date = archive.retrieve.document_title(str(doc["sop_uid"]))
        doc["title"] = title or doc["title"]
        doc["date"] = date
    return docs


@router.post("/studies/{study_uid}/comments")
def add_comment(archive: ArchiveDep, study_uid: str, body: Annotated[str, Form()],
                actor: allowed(STUDY_COMMENT, "study_uid")) -> Response:
    """Add a comment to the study."""
    study = archive.catalogue.record(study_uid)
    archive.comments.add(study_uid, study.patient.patient_id, body, actor)
    return redirect(f"/studies/{study_uid}?notice=commented#comments")


@router.post("/studies/{study_uid}/documents")
async def attach_document(
    archive: ArchiveDep, study_uid: str, file: Annotated[UploadFile, File()],
    actor: allowed(DOCUMENT_ATTACH, "study_uid"), title: Annotated[str, Form()] = "",
) -> Response:
    """Attach a PDF report or a photo of a paper report; it is stored as DICOM in the study.
    Its size is checked before it is read."""
    if file.size is not None and file.size > MAX_ATTACHMENT:
        raise PayloadTooLarge("attachments are limited to 100 MB")
    content = await file.read(MAX_ATTACHMENT + 1)
    await run_in_threadpool(archive.attachments.attach, study_uid, file.filename or "",
                            content, title[:64], actor)
    return redirect(f"/studies/{study_uid}?notice=attached#reports")


@router.post("/studies/{study_uid}/export")
async def export_study(
    request: Request, study_uid: str, actor: allowed(EXPORT_DEIDENTIFIED, "study_uid"),
    format: Annotated[str, Form()] = "zip", profile: Annotated[str, Form()] = "teaching",
    identifiable: Annotated[str, Form()] = "",
) -> Response:
    """Start an export job and follow it on its page."""
    body = ExportIn(format=format, profile=profile, deidentify=not identifiable)
    job = await start_export(request, actor, study_uid, body)
    return redirect(f"/jobs/{job.id}")


@router.get("/jobs/{job_id}")
def job_page(request: Request, archive: ArchiveDep,
             job_id: str, actor: allowed(ACCOUNT_SELF)) -> Response:
    """A job's progress; the page refreshes itself until the job ends."""
    job = archive.jobs.get(job_id, actor.name)
    retrieved = archive.site_status.retrieved_by_job(job.id) if job.kind == "retrieve" \
        else None
    return page(request, "job.html", job=job, retrieved=retrieved)


@router.get("/studies/{study_uid}/documents/{sop_uid}")
def document(archive: ArchiveDep, study_uid: str, sop_uid: str,
             actor: allowed(STUDY_READ, "study_uid")) -> Response:
    """An attached document: the PDF itself, or the photo rendered as JPEG. Audited."""
    found = archive.retrieve.select(actor, "study.download", study_uids=[study_uid],
                                    sop_uids=[sop_uid],
                                    allowed_studies=archive.policy.study_scope(actor))
    inst = found[0]
    headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
               "Content-Security-Policy": "sandbox"}
    if inst.sop_class_uid == ENCAPSULATED_PDF:
        with archive.retrieve.open(inst) as fp:
            doc = archive.attachments.document(fp)
        # Saved, not opened in the archive's origin: a PDF can carry scripts and forms.
        headers["Content-Disposition"] = 'attachment; filename="document.pdf"'
        return Response(doc.content, media_type=doc.media_type, headers=headers)
    with archive.retrieve.open(inst) as fp:
        try:
            data = render_frame(fp, 0, RenderOptions(quality=92))
        except ImageShareError as exc:
            raise NotFound("the document cannot be shown") from exc
    return Response(data, media_type="image/jpeg", headers=headers)
