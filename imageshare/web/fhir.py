"""FHIR R4 under /fhir: ImagingStudy search and read, and the CapabilityStatement.

Thin adapter over :mod:`imageshare.fhir.imaging_study`; callers authenticate as for DICOMweb
(bearer API tokens, HTTP Basic) and are authorised by the same policy; searches are audited as
``study.query`` like QIDO-RS. Errors are OperationOutcome resources (see
:func:`imageshare.web.problems.install`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from imageshare import __version__
from imageshare.access.policy import ACCOUNT_SELF, STUDY_READ
from imageshare.domain.errors import NotAcceptable
from imageshare.fhir.imaging_study import (
    FHIR_JSON,
    Endpoints,
    bundle,
    capability_statement,
    operation_outcome,
    parse_search,
)
from imageshare.web.auth import allowed
from imageshare.web.deps import ArchiveDep, archive_of
from imageshare.web.negotiation import parse_accept

router = APIRouter(prefix="/fhir", tags=["FHIR"])
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


def _check_format(request: Request) -> None:
    """406 unless the client takes JSON (FHIR XML is not offered); ``_format`` as well."""
    wanted = request.query_params.get("_format", "")
    if wanted and wanted not in ("json", *JSON_MEDIA):
        raise NotAcceptable("only FHIR JSON (application/fhir+json) is offered")
    accept = request.headers.get("accept")
    if accept and not any(r.media in JSON_MEDIA for r in parse_accept(accept)):
        raise NotAcceptable("only FHIR JSON (application/fhir+json) is offered")


def fhir_response(body: dict[str, Any], status_code: int = 200) -> JSONResponse:
    """A FHIR JSON answer."""
    return JSONResponse(body, status_code=status_code, media_type=FHIR_JSON)


def outcome_response(status: int, message: str) -> JSONResponse:
    """An OperationOutcome answer (401 also says how to authenticate)."""
    response = fhir_response(operation_outcome(status, message), status)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="ImageShare FHIR"'
    return response


@router.get("/metadata", summary="FHIR CapabilityStatement")
def metadata(request: Request, _actor: allowed(ACCOUNT_SELF)) -> JSONResponse:
    """What this FHIR server offers."""
    _check_format(request)
    return fhir_response(capability_statement(f"{public_base(request)}/fhir", __version__))


@router.get("/ImagingStudy", summary="FHIR ImagingStudy search")
async def search(request: Request, actor: Reader, archive: ArchiveDep) -> JSONResponse:
    """A searchset Bundle of the studies matching the search parameters that the caller may
    see, newest first, ``_count`` at a time with a ``next`` link."""
    _check_format(request)
    service = archive.imaging_studies
    wanted = parse_search(list(request.query_params.multi_items()), service.hospital_system)
    resources, more = await run_in_threadpool(
        service.search, wanted, actor, archive.policy.study_scope(actor), _endpoints(request))
    base = f"{public_base(request)}/fhir/ImagingStudy"
    return fhir_response(bundle(resources, wanted, base, more))


@router.get("/ImagingStudy/{resource_id}", summary="FHIR ImagingStudy read")
async def read(request: Request, resource_id: str, actor: Reader, archive: ArchiveDep
               ) -> JSONResponse:
    """One ImagingStudy by id (404 OperationOutcome when the caller may not see it)."""
    _check_format(request)
    resource = await run_in_threadpool(
        archive.imaging_studies.read, resource_id, actor, archive.policy.study_scope(actor),
        _endpoints(request))
    return fhir_response(resource)
