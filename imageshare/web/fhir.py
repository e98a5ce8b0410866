"""FHIR R4 under /fhir: ImagingStudy search and read, and the CapabilityStatement.

Thin adapter over :mod:`imageshare.fhir.imaging_study`; callers authenticate as for DICOMweb
(bearer API tokens, HTTP Basic) and are authorised by the same policy; searches are audited as
``study.query`` like QIDO-RS. Errors are OperationOutcome resources (see
:func:`imageshare.web.problems.install`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from imageshare import __version__
from imageshare.access.policy import PUBLIC, STUDY_READ
from imageshare.audit.trail import AuditEvent
from imageshare.domain.actors import Actor
from imageshare.domain.errors import (
    InvalidQuery,
    NotAcceptable,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from imageshare.fhir.imaging_study import (
    FHIR_JSON,
    Endpoints,
    bundle,
    capability_statement,
    operation_outcome,
    parse_search,
    study_uid_of,
)
from imageshare.web.auth import PRIVATE_HEADERS, PrivateRoute, allowed
from imageshare.web.deps import ArchiveDep, archive_of
from imageshare.web.negotiation import parse_accept, parse_media_type

router = APIRouter(prefix="/fhir", tags=["FHIR"], route_class=PrivateRoute)
Reader = allowed(STUDY_READ)


def public_base(request: Request) -> str:
    """ImageShare's public root: ``public_url`` when set, else from the request."""
    configured = archive_of(request).settings.public_url.rstrip("/")
    return configured or str(request.base_url).rstrip("/")


def _endpoints(request: Request) -> Endpoints:
    base = public_base(request)
    return Endpoints(dicomweb=f"{base}/dicomweb", viewer=f"{base}/iid")


JSON_MEDIA = ("application/fhir+json", "application/json", "application/json+fhir", "*/*",
              "application/*")


def _check_format(request: Request) -> str:
    """The media type to answer with (``application/json`` to a client that asked for that,
    else ``application/fhir+json``); 406 unless the client takes FHIR R4 JSON (FHIR XML is
    not offered, nor another FHIR version). ``_format`` overrides the Accept header (FHIR R4
    http, content types)."""
    wanted = request.query_params.get("_format", "").strip()
    if wanted:
        # A MIME type may carry its parameters (``application/fhir+json; fhirVersion=4.0``).
        taken = parse_media_type(wanted) if wanted.lower() != "json" else ("json", {})
        if taken[0] not in ("json", *JSON_MEDIA) or not _is_r4(taken[1]):
            raise NotAcceptable("only FHIR R4 JSON (application/fhir+json) is offered")
        return "application/json" if taken[0] == "application/json" else FHIR_JSON
    for media_range in parse_accept(request.headers.get("accept")):
        if media_range.media in JSON_MEDIA and _is_r4(media_range.params):
            return ("application/json" if media_range.media == "application/json"
                    else FHIR_JSON)
    raise NotAcceptable("only FHIR R4 JSON (application/fhir+json; fhirVersion=4.0) is "
                        "offered")


def _is_r4(params: dict[str, str]) -> bool:
    """True unless a media type's ``fhirVersion`` parameter names another version than 4.0."""
    return params.get("fhirversion", "4.0").split(".")[:2] == ["4", "0"]


def fhir_response(body: dict[str, Any], status_code: int = 200,
                  media_type: str = FHIR_JSON) -> JSONResponse:
    """A FHIR JSON answer."""
    return JSONResponse(body, status_code=status_code, media_type=media_type)


def outcome_response(status: int, message: str, token_refused: bool = False) -> JSONResponse:
    """An OperationOutcome answer (401 also says how to authenticate, and, when a bearer token
    was presented and refused, that it was invalid: RFC 6750 3.1)."""
    response = fhir_response(operation_outcome(status, message), status)
    # An error can name what was asked for (a hospital number, a study): no cache keeps it,
    # as for every other answer of the FHIR API (404 is cacheable by default, RFC 9111).
    for name, value in PRIVATE_HEADERS.items():
        response.headers.setdefault(name, value)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="ImageShare FHIR"' + (
            ', error="invalid_token", error_description="the token is unknown, revoked or '
            'expired"' if token_refused else "")
    return response


@router.get("/metadata", summary="FHIR CapabilityStatement")
def metadata(request: Request, _anyone: allowed(PUBLIC)) -> JSONResponse:
    """What this FHIR server offers (open, as FHIR clients discover a server before they
    authenticate; it holds no patient data)."""
    media = _check_format(request)
    return fhir_response(capability_statement(f"{public_base(request)}/fhir", __version__),
                         media_type=media)


@router.get("/ImagingStudy", summary="FHIR ImagingStudy search")
async def search(request: Request, actor: Reader, archive: ArchiveDep) -> JSONResponse:
    """A searchset Bundle of the studies matching the search parameters that the caller may
    see, newest first, ``_count`` at a time with ``next`` and ``previous`` links, and
    ``total`` when it is known. ``Prefer: handling=lenient`` ignores unknown parameters."""
    return await _search(request, list(request.query_params.multi_items()), actor, archive)


# A search's parameters in a POST body: far more than any search needs.
MAX_SEARCH_BODY = 64 * 1024
FORM = "application/x-www-form-urlencoded"


@router.post("/ImagingStudy/_search", summary="FHIR ImagingStudy search (POST)")
async def search_by_post(request: Request, actor: Reader, archive: ArchiveDep) -> JSONResponse:
    """The same search with its parameters in an ``application/x-www-form-urlencoded`` body
    (and any in the URL too), as FHIR R4 allows for searches too long or too private for a
    URL; the answer is the same searchset Bundle (its page links are GET searches)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != FORM:
        raise UnsupportedMediaType(f"a search by POST sends its parameters as {FORM}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_SEARCH_BODY:
        raise PayloadTooLarge(f"search parameters of at most {MAX_SEARCH_BODY} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_SEARCH_BODY:
            raise PayloadTooLarge(f"search parameters of at most {MAX_SEARCH_BODY} bytes")
    try:
        sent = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=200)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidQuery("the search parameters are not a form in UTF-8") from exc
    return await _search(request, [*request.query_params.multi_items(), *sent], actor, archive)


async def _search(request: Request, params: list[tuple[str, str]], actor: Actor,
                  archive: ArchiveDep) -> JSONResponse:
    media = _check_format(request)
    service = archive.imaging_studies
    wanted = parse_search(params, service.hospital_system, lenient=prefers_lenient(request))
    found = await run_in_threadpool(
        service.search, wanted, actor, archive.policy.study_scope(actor), _endpoints(request))
    base = f"{public_base(request)}/fhir/ImagingStudy"
    return fhir_response(bundle(found.resources, wanted, base, found.more, found.total),
                         media_type=media)


def prefers_lenient(request: Request) -> bool:
    """True when the client asked to have unknown search parameters ignored
    (``Prefer: handling=lenient``, FHIR R4 search, handling errors); strict is the default."""
    preferences = request.headers.get("prefer", "").replace(";", ",").split(",")
    return any(p.strip().replace(" ", "").lower() == "handling=lenient" for p in preferences)


@router.get("/ImagingStudy/{resource_id}", summary="FHIR ImagingStudy read")
async def read(request: Request, resource_id: str, actor: Reader, archive: ArchiveDep
               ) -> JSONResponse:
    """One ImagingStudy by id (404 OperationOutcome when the caller may not see it)."""
    media = _check_format(request)
    uid = study_uid_of(resource_id) or ""
    try:
        resource, patient_id = await run_in_threadpool(
            archive.imaging_studies.read_study, resource_id, actor,
            archive.policy.study_scope(actor), _endpoints(request))
    except NotFound:
        if uid:  # a study id made here that the caller may not see: audited as WADO-RS is
            await run_in_threadpool(archive.audit.record, AuditEvent(
                actor=actor, action="study.metadata", outcome="failure", study_uid=uid,
                detail={"reason": "not found"}))
        raise
    # A read shows the study's details: it belongs in the study's own access report, as a
    # WADO-RS metadata read does (the query engine audits only the search behind it).
    await run_in_threadpool(archive.audit.record, AuditEvent(
        actor=actor, action="study.metadata", outcome="success", patient_id=patient_id,
        study_uid=uid, instance_count=int(resource.get("numberOfInstances", 0))))
    return fhir_response(resource, media_type=media)
