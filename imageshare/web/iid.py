"""IHE Invoke Image Display (IID) at /iid: an EHR opens the study list of a patient or the
viewer of a study, for a signed-in user or through a signed launch URL
(:mod:`imageshare.ehr.launch`). Every launch is audited (``ehr.launch``) with the launching
system's name; refusals too, with the reason.

IID parameters: ``requestType=PATIENT`` with ``patientID`` (HL7 CX, e.g.
``9434765919^^^&2.16.840.1.113883.2.1.4.1&ISO`` or ``9434765919^^^NHS`` for an NHS number,
``H123456`` for a hospital number); ``requestType=STUDY`` with ``studyUID`` or
``accessionNumber`` (one value, or several separated by commas). The study list is shown in
the answer itself and a single study opens the viewer at ``/viewer/{StudyInstanceUID}``: no
patient detail goes into an address ImageShare makes.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from imageshare.access.policy import PUBLIC, STUDY_READ
from imageshare.archive.dicom_json import nhs_number_of, text_of
from imageshare.archive.query import Match, Query
from imageshare.archive.search import SearchPage, StudySearch, StudySummary
from imageshare.audit.trail import AuditEvent
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError, InvalidQuery, TooManyRequests
from imageshare.domain.identifiers import is_valid_nhs_number
from imageshare.ehr.launch import SIGNATURE, LaunchRefused
from imageshare.web.auth import LinkSession, allowed, authorise_also, client_address, resolve_actor
from imageshare.web.deps import ArchiveDep, archive_of
from imageshare.web.pages.sign_in import set_session_cookie
from imageshare.web.pages.templating import page

router = APIRouter(include_in_schema=False)
# Assigning authorities that mean "NHS number" in an IID patientID.
NHS_AUTHORITIES = frozenset({"NHS", "2.16.840.1.113883.2.1.4.1",
                             "https://fhir.nhs.uk/Id/nhs-number"})
MAX_VALUES = 20


@dataclass(frozen=True)
class LaunchContext:
    """What the EHR asked to open."""

    request_type: str
    nhs_number: str = ""
    hospital_number: str = ""
    study_uids: tuple[str, ...] = ()
    accessions: tuple[str, ...] = ()


def _values(text: str, name: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values or len(values) > MAX_VALUES or any(len(v) > 64 for v in values):
        raise InvalidQuery(f"{name} takes 1-{MAX_VALUES} values of at most 64 characters")
    return values


def launch_context(params: dict[str, str]) -> LaunchContext:
    """The IID request in ``params``; InvalidQuery when it is not one."""
    request_type = params.get("requestType", "").upper()
    if request_type == "PATIENT":
        cx = params.get("patientID", "").strip()
        if not cx or len(cx) > 200:
            raise InvalidQuery("requestType=PATIENT needs patientID")
        parts = cx.split("^")
        number = parts[0].strip()
        authority = parts[3] if len(parts) > 3 else params.get("issuer", "")
        names = {a.strip() for a in authority.split("&") if a.strip()}
        if not number:
            raise InvalidQuery("patientID has no identifier")
        if names & NHS_AUTHORITIES:
            digits = number.replace(" ", "")
            if not is_valid_nhs_number(digits):
                raise InvalidQuery("patientID is not a valid NHS number")
            return LaunchContext("PATIENT", nhs_number=digits)
        return LaunchContext("PATIENT", hospital_number=number)
    if request_type == "STUDY":
        if params.get("studyUID"):
            uids = _values(params["studyUID"], "studyUID")
            if any(not set(u) <= set("0123456789.") for u in uids):
                raise InvalidQuery("studyUID takes DICOM UIDs")
            return LaunchContext("STUDY", study_uids=uids)
        if params.get("accessionNumber"):
            return LaunchContext("STUDY",
                                 accessions=_values(params["accessionNumber"], "accessionNumber"))
        raise InvalidQuery("requestType=STUDY needs studyUID or accessionNumber")
    raise InvalidQuery("requestType must be PATIENT or STUDY")


def _refused(request: Request, status: int, title: str, detail: str) -> Response:
    return page(request, "error.html", status_code=status, title=title, detail=detail)


@router.get("/iid")
async def launch(request: Request, _anyone: allowed(PUBLIC), archive: ArchiveDep) -> Response:
    """Open what the EHR asks for (the route is open so that a signed launch URL can sign
    the user in; without a valid signature the caller must already be signed in, and the
    policy then decides as everywhere)."""
    params = list(request.query_params.multi_items())
    values = dict(params)
    try:
        context = launch_context(values)
    except InvalidQuery as exc:
        return _refused(request, 400, "Cannot open this from the record", str(exc))
    source = client_address(request)
    signed = any(name == SIGNATURE for name, _ in params)
    if signed:
        # Refused launch links count as failed sign-ins from their address (they sign in).
        try:
            await run_in_threadpool(archive.throttle.check, source)
        except TooManyRequests as exc:
            return _refused(request, 429, "Too many refused launches", str(exc))
        try:
            actor = await run_in_threadpool(archive.ehr_launches.verify, params, source)
        except LaunchRefused as exc:
            await run_in_threadpool(archive.throttle.failed, source)
            return _refused(request, 403, "The launch link was refused", str(exc))
    else:  # anonymous callers get 401 (browsers: the sign-in page) from the policy
        actor = await run_in_threadpool(resolve_actor, request)
    ehr = values.get("ehr", "")[:64]
    await run_in_threadpool(authorise_also, request, actor, STUDY_READ)
    if signed:
        secret, csrf = await run_in_threadpool(archive.sessions.start, actor.name, source)
        request.state.actor, request.state.session = actor, LinkSession(csrf)
        await run_in_threadpool(archive.audit.record, AuditEvent(
            actor=actor, action="session.start", outcome="success",
            detail={"stage": "full"}))
    response = await run_in_threadpool(_open, request, actor, context, ehr, signed)
    if signed:
        set_session_cookie(request, response, secret)
    return response


def _open(request: Request, actor: Actor, context: LaunchContext, ehr: str,
          signed: bool) -> Response:
    archive = archive_of(request)
    scope = archive.policy.study_scope(actor)
    audit = {"ehr": ehr, "signed": signed, "request_type": context.request_type}
    if context.study_uids:
        query = Query("STUDY", {**_LIST_KEYS, "0020000D": {"vr": "UI", "Value": [
            "\\".join(context.study_uids)]}}, allowed_studies=scope, limit=MAX_VALUES)
        matches = {m.study_uid: m for m in archive.query.find(query, actor)}
        uids = [uid for uid in context.study_uids if uid in matches]  # in the EHR's order
        if len(uids) > 1:  # the viewer shows one study: list them
            archive.audit.record(AuditEvent(actor=actor, action="ehr.launch",
                                            outcome="success", instance_count=len(uids),
                                            detail={**audit, "opened": "study list"}))
            listed = [_summary(matches[uid]) for uid in uids]
            return page(request, "home.html", search=StudySearch(), searched=True, error="",
                        page=SearchPage(listed, 1, False), search_fields={})
    else:
        searches = [StudySearch(accession=a) for a in context.accessions] or [
            StudySearch(nhs_number=context.nhs_number,
                        hospital_number=context.hospital_number)]
        try:
            pages = [archive.search.search(s, actor, scope) for s in searches]
        except ImageShareError as exc:
            return _refused(request, 400, "Cannot open this from the record", str(exc))
        found = [study for result in pages for study in result.studies]
        uids = [study.study_uid for study in found]
        if context.request_type == "PATIENT" or len(uids) != 1:
            archive.audit.record(AuditEvent(actor=actor, action="ehr.launch",
                                            outcome="success", instance_count=len(uids),
                                            detail={**audit, "opened": "study list"}))
            search = searches[0] if len(searches) == 1 else StudySearch()
            fields = {"nhs": search.nhs_number, "hospital_number": search.hospital_number,
                      "accession": search.accession}
            return page(request, "home.html", search=search, searched=True, error="",
                        page=pages[0] if len(pages) == 1 else SearchPage(found, 1, False),
                        search_fields={k: v for k, v in fields.items() if v})
    if not uids:
        archive.audit.record(AuditEvent(actor=actor, action="ehr.launch", outcome="failure",
                                        detail={**audit, "reason": "not-found"}))
        return _refused(request, 404, "No such study",
                        "No study of the record is here, or you may not see it.")
    archive.audit.record(AuditEvent(actor=actor, action="ehr.launch", outcome="success",
                                    study_uid=uids[0], detail={**audit, "opened": "viewer"}))
    return page(request, "iid_open.html", target=f"/viewer/{uids[0]}")



_LIST_KEYS = {tag: {"vr": vr} for tag, vr in (
    ("00100010", "PN"), ("00100020", "LO"), ("00100021", "LO"), ("00100030", "DA"),
    ("00100040", "CS"), ("00101002", "SQ"), ("00080020", "DA"), ("00081030", "LO"),
    ("00080061", "CS"), ("00080050", "SH"), ("00201206", "IS"), ("00201208", "IS"))}


def _summary(match: Match) -> StudySummary:
    """A line of the study list from a STUDY-level match."""
    attrs = match.attributes
    return StudySummary(
        study_uid=match.study_uid, patient_name=text_of(attrs.get("00100010")),
        patient_id=text_of(attrs.get("00100020")), birth_date=text_of(attrs.get("00100030")),
        sex=text_of(attrs.get("00100040")), nhs_number=nhs_number_of(attrs),
        study_date=text_of(attrs.get("00080020")), description=text_of(attrs.get("00081030")),
        modalities="/".join((attrs.get("00080061") or {}).get("Value") or []),
        accession=text_of(attrs.get("00080050")),
        series_count=int(text_of(attrs.get("00201206")) or 0),
        instance_count=int(text_of(attrs.get("00201208")) or 0))
