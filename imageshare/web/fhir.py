"""FHIR R4 under /fhir: ImagingStudy search and read, and the CapabilityStatement.

Thin adapter over :mod:`imageshare.fhir.imaging_study`; callers authenticate as for DICOMweb
(bearer API tokens, HTTP Basic) and are authorised by the same policy; searches are audited as
``study.query`` like QIDO-RS. Errors are OperationOutcome resources (see
:func:`imageshare.web.problems.install`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlsplit

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
    IGNORED_PARAMETERS,
    Endpoints,
    bundle,
    capability_statement,
    operation_outcome,
    parse_search,
    study_uid_of,
)
from imageshare.fhir.page_seal import MAX_SEARCH_FIELDS, PageSeal, check_followable
from imageshare.web.auth import PRIVATE_HEADERS, PrivateRoute, allowed
from imageshare.web.deps import ArchiveDep, archive_of
from imageshare.web.negotiation import parse_accept, parse_media_type
from imageshare.web.urls import listening_base

router = APIRouter(prefix="/fhir", tags=["FHIR"], route_class=PrivateRoute)
Reader = allowed(STUDY_READ)


def public_base(request: Request) -> str:
    """ImageShare's public root for the addresses in FHIR answers (Bundle links, fullUrl,
    endpoints): ``public_url`` when set, else the address the server listens on. Never the
    request's Host header: anyone can send one, and a Bundle whose links name another host
    sends the client's next request, with its token, there."""
    settings = archive_of(request).settings
    configured = settings.public_url.rstrip("/")
    return configured or listening_base(request, settings)


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
    ``total`` when it is known. ``Prefer: handling=lenient`` ignores unknown parameters.
    ``_page`` follows a page link of a search made by POST (its parameters sealed in it)."""
    params = list(request.query_params.multi_items())
    _check_field_count(len(params))
    page_token = [value for name, value in params if name == "_page"]
    if not page_token:
        return await _search(request, params, actor, archive)
    if len(page_token) > 1 or any(name not in ("_page", *IGNORED_PARAMETERS)
                                  for name, _ in params):
        raise InvalidQuery("a page link (_page) is followed as it is, without other search "
                           "parameters")
    opened = page_seal(request).open(page_token[0], actor)
    return await _search(request, opened, actor, archive, sealed=True)


# A search's parameters in a POST body: far more than any search needs.
MAX_SEARCH_BODY = 64 * 1024
FORM = "application/x-www-form-urlencoded"


def _too_many_fields() -> InvalidQuery:
    return InvalidQuery(f"a search takes at most {MAX_SEARCH_FIELDS} parameters (the URL's "
                        "and the form's together)")


def _check_field_count(count: int) -> None:
    if count > MAX_SEARCH_FIELDS:
        raise _too_many_fields()


def page_seal(request: Request) -> PageSeal:
    """The archive's :class:`PageSeal`."""
    return archive_of(request).fhir_pages


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
        form = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidQuery("the search parameters are not a form in UTF-8") from exc
    in_url = list(request.query_params.multi_items())
    _check_field_count(len(in_url))
    try:
        sent = parse_qsl(form, keep_blank_values=True,
                         max_num_fields=MAX_SEARCH_FIELDS - len(in_url))
    except ValueError as exc:  # more fields than that
        raise _too_many_fields() from exc
    return await _search(request, [*in_url, *sent], actor, archive, sealed=True)


async def _search(request: Request, params: list[tuple[str, str]], actor: Actor,
                  archive: ArchiveDep, sealed: bool = False) -> JSONResponse:
    """The searchset Bundle; ``sealed``: a search made by POST, whose page links carry its
    parameters sealed (:class:`PageSeal`), never in plain."""
    media = _check_format(request)
    service = archive.imaging_studies
    wanted = parse_search(params, service.hospital_system, lenient=prefers_lenient(request))
    # Refused before it runs when its page links could not be followed: they add _count and
    # _offset to the search's own parameters.
    check_followable(urlsplit(wanted.link("", wanted.offset)).query)
    found = await run_in_threadpool(
        service.search, wanted, actor, archive.policy.study_scope(actor), _endpoints(request))
    base = f"{public_base(request)}/fhir/ImagingStudy"
    answer = bundle(found.resources, wanted, base, found.more, found.total)
    if sealed:
        page_seal(request).relink(answer, base, actor)
    return fhir_response(answer, media_type=media)


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
