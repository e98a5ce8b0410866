"""IHE Invoke Image Display (IID) at /iid: an EHR opens the study list of a patient or the
viewer of a study, for a signed-in user or through a signed launch URL
(:mod:`imageshare.ehr.launch`). Every launch is audited (``ehr.launch``) with the launching
system's name; refusals too, with the reason.

IID parameters: ``requestType=PATIENT`` with ``patientID`` (HL7 CX, e.g.
``9434765919^^^&2.16.840.1.113883.2.1.4.1&ISO`` or ``9434765919^^^NHS`` for an NHS number,
``H123456`` (or with this hospital's FHIR identifier system as its assigning authority) for a
hospital number, ``H123456^^^OTHER`` for the number another issuer gave, matched with the
DICOM Issuer of Patient ID); ``requestType=STUDY`` with ``studyUID`` or ``accessionNumber``
(one value, or several separated by commas). Values are matched exactly: DICOM wildcards
(``*``, ``?``) and value lists (``\\``) are refused, and a hospital number or accession number
that matches more than one patient here is refused as ambiguous (the EHR's context is one
patient) rather than shown. The study list is shown in the answer itself and a single study
opens the viewer at ``/viewer/{StudyInstanceUID}``: no patient detail goes into an address
ImageShare makes.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

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
# The most studies a hospital-number launch lists (newest first).
MAX_LISTED = 200
# DICOM matching characters and control characters: an IID value is matched exactly, so a
# value holding one would match other patients (``H*``) or several values (``H1\\H2``).
_NOT_EXACT = frozenset("*?\\") | frozenset(chr(c) for c in (*range(32), 127))


@dataclass(frozen=True)
class LaunchContext:
    """What the EHR asked to open. ``issuer`` is the assigning authority of a hospital number
    given by another issuer (the DICOM Issuer of Patient ID to match); empty for this
    hospital's own numbers."""

    request_type: str
    nhs_number: str = ""
    hospital_number: str = ""
    issuer: str = ""
    study_uids: tuple[str, ...] = ()
    accessions: tuple[str, ...] = ()


def _exact(value: str, name: str) -> str:
    """``value`` when it can only be matched exactly; InvalidQuery otherwise."""
    if _NOT_EXACT & set(value):
        raise InvalidQuery(f"{name} is matched exactly: it cannot hold *, ?, \\ or control "
                           "characters")
    return value


def _values(text: str, name: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values or len(values) > MAX_VALUES or any(len(v) > 64 for v in values):
        raise InvalidQuery(f"{name} takes 1-{MAX_VALUES} values of at most 64 characters")
    return tuple(_exact(v, name) for v in values)


def launch_context(params: dict[str, str], local_systems: Collection[str] = ()
                   ) -> LaunchContext:
    """The IID request in ``params``; InvalidQuery when it is not one. ``local_systems``
    name this hospital's own patient numbers as an assigning authority may (besides none)."""
    request_type = params.get("requestType", "").upper()
    if request_type == "PATIENT":
        cx = params.get("patientID", "").strip()
        if not cx or len(cx) > 200:
            raise InvalidQuery("requestType=PATIENT needs patientID")
        parts = cx.split("^")
        number = _exact(parts[0].strip(), "patientID")
        authority = parts[3] if len(parts) > 3 else params.get("issuer", "")
        components = [a.strip() for a in authority.split("&")]
        names = {a for a in components if a}
        if not number or len(number) > 64:
            raise InvalidQuery("patientID needs an identifier of at most 64 characters")
        if names & NHS_AUTHORITIES:
            digits = number.replace(" ", "")
            if not is_valid_nhs_number(digits):
                raise InvalidQuery("patientID is not a valid NHS number")
            return LaunchContext("PATIENT", nhs_number=digits)
        if not names or names & set(local_systems):
            return LaunchContext("PATIENT", hospital_number=number)
        # Another issuer's number: only that issuer's patient (the namespace, else the
        # universal id, as DICOM keeps it in Issuer of Patient ID), never ours of that number.
        issuer = _exact(next(a for a in components if a), "the assigning authority")
        if len(issuer) > 64:
            raise InvalidQuery("patientID's assigning authority is at most 64 characters")
        return LaunchContext("PATIENT", hospital_number=number, issuer=issuer)
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
        context = launch_context(values, (archive.imaging_studies.hospital_system,))
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
    # The launching system is named in the audit trail only when its signature proved it.
    ehr = values.get("ehr", "")[:64] if signed else ""
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
        patients = {matches[uid].patient_id for uid in uids}
    elif context.hospital_number:
        return _patient_list(request, actor, context, scope, audit)
    elif context.accessions:
        query = Query("STUDY", {**_LIST_KEYS, "00080050": {"vr": "SH", "Value": [
            "\\".join(context.accessions)]}}, allowed_studies=scope, limit=MAX_LISTED,
            newest_first=True)
        try:
            found = archive.query.find(query, actor)
        except ImageShareError as exc:
            return _refused(request, 400, "Cannot open this from the record", str(exc))
        uids = [m.study_uid for m in found]
        if len({_patient_of(m) for m in found}) > 1:
            # Accession numbers are not unique between departments and sites: studies of
            # several patients are not the one patient the EHR has open.
            return _ambiguous(request, actor, audit, len(uids), "accession number")
        patients = {m.patient_id for m in found}
        if len(uids) > 1:
            archive.audit.record(AuditEvent(
                actor=actor, action="ehr.launch", outcome="success", patient_id=_one(patients),
                instance_count=len(uids), detail={**audit, "opened": "study list"}))
            search = StudySearch(accession=context.accessions[0]
                                 if len(context.accessions) == 1 else "")
            return page(request, "home.html", search=search, searched=True, error="",
                        page=SearchPage([_summary(m) for m in found], 1, False),
                        search_fields={})
    else:
        search = StudySearch(nhs_number=context.nhs_number)
        try:
            result = archive.search.search(search, actor, scope)
        except ImageShareError as exc:
            return _refused(request, 400, "Cannot open this from the record", str(exc))
        archive.audit.record(AuditEvent(
            actor=actor, action="ehr.launch", outcome="success", patient_id=context.nhs_number,
            instance_count=len(result.studies), detail={**audit, "opened": "study list"}))
        return page(request, "home.html", search=search, searched=True, error="",
                    page=result, search_fields={"nhs": search.nhs_number})
    if not uids:
        archive.audit.record(AuditEvent(actor=actor, action="ehr.launch", outcome="failure",
                                        detail={**audit, "reason": "not-found"}))
        return _refused(request, 404, "No such study",
                        "No study of the record is here, or you may not see it.")
    archive.audit.record(AuditEvent(actor=actor, action="ehr.launch", outcome="success",
                                    patient_id=_one(patients), study_uid=uids[0],
                                    detail={**audit, "opened": "viewer"}))
    return page(request, "iid_open.html", target=f"/viewer/{uids[0]}")


def _patient_of(match: Match) -> tuple[str, str]:
    """The patient of a study as the index keeps patients apart: Patient ID and issuer."""
    return match.patient_id, text_of(match.attributes.get("00100021"))


def _one(patients: set[str]) -> str:
    """The Patient ID when the studies are of one patient, else ""."""
    return next(iter(patients)) if len(patients) == 1 else ""


def _ambiguous(request: Request, actor: Actor, audit: dict[str, object], count: int,
               what: str) -> Response:
    """Refuse (409, audited) a launch whose value matches more than one patient here."""
    archive_of(request).audit.record(AuditEvent(
        actor=actor, action="ehr.launch", outcome="failure", instance_count=count,
        detail={**audit, "reason": "ambiguous"}))
    return _refused(request, 409, "More than one patient matches",
                    f"The {what} from the record matches studies of more than one patient "
                    "here, so nothing was opened: open the study by its UID, or search for "
                    "the patient.")


def _patient_list(request: Request, actor: Actor, context: LaunchContext,
                  scope: Collection[str] | None, audit: dict[str, object]) -> Response:
    """The studies of a hospital number (of ``context.issuer`` when given), newest first;
    refused when the number belongs to patients of more than one issuer here."""
    archive = archive_of(request)
    ident: dict[str, Any] = {"00100020": {"vr": "LO", "Value": [context.hospital_number]}}
    if context.issuer:
        ident["00100021"] = {"vr": "LO", "Value": [context.issuer]}
    query = Query("STUDY", {**_LIST_KEYS, **ident}, allowed_studies=scope,
                  limit=MAX_LISTED, newest_first=True)
    try:
        matches = archive.query.find(query, actor)
    except ImageShareError as exc:
        return _refused(request, 400, "Cannot open this from the record", str(exc))
    if len({text_of(m.attributes.get("00100021")) for m in matches}) > 1:
        return _ambiguous(request, actor, audit, len(matches), "hospital number")
    archive.audit.record(AuditEvent(
        actor=actor, action="ehr.launch", outcome="success",
        patient_id=context.hospital_number, instance_count=len(matches),
        detail={**audit, "opened": "study list",
                **({"issuer": context.issuer} if context.issuer else {})}))
    search = StudySearch(hospital_number=context.hospital_number)
    return page(request, "home.html", search=search, searched=True, error="",
                page=SearchPage([_summary(m) for m in matches[:MAX_LISTED]], 1, False),
                search_fields={})


_LIST_KEYS = {tag: {"vr": vr} for tag, vr in (
    ("00100010", "PN"), ("00100020", "LO"), ("00100021", "LO"), ("00100030", "DA"),
    ("00100040", "CS"), ("00101002", "SQ"), ("00080020", "DA"), ("00080030", "TM"),
    ("00081030", "LO"),
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
