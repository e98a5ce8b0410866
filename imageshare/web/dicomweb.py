"""DICOMweb (PS3.18) under /dicomweb: QIDO-RS, WADO-RS and STOW-RS over the archive services."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.uid import ExplicitVRLittleEndian

from imageshare.access.policy import STUDY_DOWNLOAD, STUDY_READ, STUDY_STORE
from imageshare.access.scope import DOWNLOAD, VIEW
from imageshare.archive.pixel_budget import decode_frame
from imageshare.archive.query import Level, Query
from imageshare.archive.rendering import (
    RenderOptions,
    parse_viewport,
    parse_window,
    render_frame,
)
from imageshare.archive.retrieve import StoredInstance
from imageshare.archive.transcode import (
    COMPRESSED_MEDIA_TYPES,
    UNCOMPRESSED,
    is_video,
    transcode,
)
from imageshare.domain.actors import Actor
from imageshare.domain.errors import (
    ConflictingInstance,
    ImageShareError,
    InvalidInstance,
    InvalidQuery,
    NotAcceptable,
    NotFound,
    WrongStudy,
)
from imageshare.web.auth import allowed, authorise_also
from imageshare.web.multipart import (
    PartBody,
    PartSink,
    file_chunks,
    media_type_params,
    new_boundary,
    part_stream,
)

router = APIRouter(prefix="/dicomweb", tags=["DICOMweb"])
Reader = allowed(STUDY_READ, "study")
# Instances as DICOM files leave with download rights (shares may grant only viewing).
Downloader = allowed(STUDY_DOWNLOAD, "study")
Writer = allowed(STUDY_STORE)
DICOM_JSON = "application/dicom+json"

# -- QIDO-RS ---------------------------------------------------------------------------------

_DEFAULTS: dict[Level, tuple[str, ...]] = {
    "STUDY": (
        "StudyDate", "StudyTime", "AccessionNumber", "InstanceAvailability", "ModalitiesInStudy",
        "ReferringPhysicianName", "TimezoneOffsetFromUTC", "PatientName", "PatientID",
        "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID", "StudyDescription",
        "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
    ),
    "SERIES": (
        "Modality", "TimezoneOffsetFromUTC", "SeriesDescription", "SeriesInstanceUID",
        "SeriesNumber", "NumberOfSeriesRelatedInstances", "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime", "RequestAttributesSequence", "StudyInstanceUID",
    ),
    "IMAGE": (
        "SOPClassUID", "SOPInstanceUID", "InstanceAvailability", "TimezoneOffsetFromUTC",
        "InstanceNumber", "Rows", "Columns", "BitsAllocated", "NumberOfFrames",
        "StudyInstanceUID", "SeriesInstanceUID",
    ),
}
_RESERVED = {"limit", "offset", "includefield", "fuzzymatching"}


def _tag(name: str) -> str:
    """An attribute keyword or 8-hex-digit tag as a DICOM JSON key."""
    text = name.strip()
    if len(text) == 8 and all(c in "0123456789abcdefABCDEF" for c in text):
        return text.upper()
    tag = tag_for_keyword(text)
    if tag is None:
        raise InvalidQuery(f"unknown attribute {name!r}")
    return f"{tag:08X}"


def _vr(tag: str) -> str:
    try:
        return dictionary_VR(int(tag, 16))
    except KeyError:
        return "UN"


def _element(tag: str, value: str) -> dict[str, Any]:
    vr = _vr(tag)
    if vr == "SQ":
        return {"vr": "SQ", "Value": [{}]}
    if value == "":
        return {"vr": vr}
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": value}]}
    if vr in ("UI", "CS"):
        # PS3.18 8.3.4.1: a list of UIDs (or codes) may be separated by commas.
        value = value.replace(",", "\\")
    return {"vr": vr, "Value": [value]}


def _identifier(request: Request, level: Level, fixed: dict[str, str]) -> tuple[dict, bool]:
    identifier: dict[str, Any] = {}
    return_all = False
    for name in _DEFAULTS.get(level, ()):
        tag = _tag(name)
        identifier[tag] = _element(tag, "")
    for key, value in request.query_params.multi_items():
        if key == "includefield":
            for field in value.split(","):
                if field.strip() == "all":
                    return_all = True
                elif field.strip():
                    path = [_tag(p) for p in field.split(".")]
                    identifier.setdefault(path[0], _element(path[0], ""))
            continue
        if key in _RESERVED:
            continue
        path = [_tag(p) for p in key.split(".")]
        if len(path) == 1:
            identifier[path[0]] = _element(path[0], value)
        else:
            seq = identifier.setdefault(path[0], {"vr": "SQ", "Value": [{}]})
            if not seq.get("Value"):
                seq["Value"] = [{}]
            seq["Value"][0][path[-1]] = _element(path[-1], value)
    for tag, value in fixed.items():
        identifier[tag] = _element(tag, value)
    return identifier, return_all


def _int_param(request: Request, name: str, default: int | None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise InvalidQuery(f"{name} must be a whole number") from exc
    if value < 0:
        raise InvalidQuery(f"{name} must not be negative")
    if value >= 2**31:  # nothing counts that far, and SQL integers end at 2**63
        raise InvalidQuery(f"{name} is too large")
    return value


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/dicomweb"


def _retrieve_url(request: Request, attrs: dict[str, Any], level: Level) -> str:
    def uid(tag: str) -> str:
        return (attrs.get(tag, {}).get("Value") or [""])[0]

    url = f"{_base(request)}/studies/{uid('0020000D')}"
    if level in ("SERIES", "IMAGE"):
        url += f"/series/{uid('0020000E')}"
    if level == "IMAGE":
        url += f"/instances/{uid('00080018')}"
    return url


def _qido(request: Request, actor: Actor, level: Level, **fixed: str) -> Response:
    archive = request.app.state.archive
    identifier, return_all = _identifier(request, level, fixed)
    query = Query(
        level=level,
        identifier=identifier,
        limit=_int_param(request, "limit", None),
        offset=_int_param(request, "offset", 0) or 0,
        fuzzy=request.query_params.get("fuzzymatching", "").lower() == "true",
        allowed_studies=archive.policy.study_scope(actor),
        return_all=return_all,
    )
    matches = archive.query.find(query, actor)
    body = []
    for match in matches:
        attrs = dict(match.attributes)
        attrs.pop("00080052", None)
        attrs["00081190"] = {"vr": "UR", "Value": [_retrieve_url(request, attrs, level)]}
        body.append(dict(sorted(attrs.items())))
    if not body:
        return Response(status_code=204)
    headers = {}
    most = archive.settings.qido_max_limit
    if len(body) == most and (query.limit is None or query.limit > most):
        headers["Warning"] = (
            f'299 imageshare "There are more than {most} results; page with limit and '
            'offset, or narrow the search."'
        )
    return JSONResponse(body, media_type=DICOM_JSON, headers=headers)


@router.get("/studies", summary="QIDO-RS: search for studies")
def search_studies(request: Request, actor: Reader) -> Response:
    """Studies matching the query parameters."""
    return _qido(request, actor, "STUDY")


@router.get("/series", summary="QIDO-RS: search for series")
def search_series(request: Request, actor: Reader) -> Response:
    """Series of any study matching the query parameters."""
    return _qido(request, actor, "SERIES")


@router.get("/instances", summary="QIDO-RS: search for instances")
def search_instances(request: Request, actor: Reader) -> Response:
    """Instances of any study matching the query parameters."""
    return _qido(request, actor, "IMAGE")


@router.get("/studies/{study}/series", summary="QIDO-RS: series of a study")
def search_study_series(request: Request, study: str, actor: Reader) -> Response:
    """Series of one study matching the query parameters."""
    return _qido(request, actor, "SERIES", **{"0020000D": study})


@router.get("/studies/{study}/instances", summary="QIDO-RS: instances of a study")
def search_study_instances(request: Request, study: str, actor: Reader) -> Response:
    """Instances of one study matching the query parameters."""
    return _qido(request, actor, "IMAGE", **{"0020000D": study})


@router.get(
    "/studies/{study}/series/{series}/instances", summary="QIDO-RS: instances of a series"
)
def search_series_instances(
    request: Request, study: str, series: str, actor: Reader
) -> Response:
    """Instances of one series matching the query parameters."""
    return _qido(request, actor, "IMAGE", **{"0020000D": study, "0020000E": series})


# -- WADO-RS ---------------------------------------------------------------------------------


def _select(
    request: Request, actor: Actor, action: str, study: str, series: str | None = None,
    instance: str | None = None, right: str = VIEW,
) -> list[StoredInstance]:
    archive = request.app.state.archive
    return archive.retrieve.select(
        actor, action, study_uids=[study], series_uids=[series] if series else (),
        sop_uids=[instance] if instance else (),
        allowed_studies=archive.policy.study_scope(actor, right),
    )


def _accepted_dicom_syntax(request: Request) -> tuple[str, str | None]:
    """('multipart'|'single', transfer syntax or None for as-stored) from the Accept header."""
    accept = request.headers.get("accept", "") or "*/*"
    for media_range in accept.split(","):
        media, params = media_type_params(media_range)
        syntax = params.get("transfer-syntax", ExplicitVRLittleEndian)
        chosen = None if syntax == "*" else syntax
        if media == "multipart/related" and params.get("type", "application/dicom") in (
            "application/dicom", "*/*"
        ):
            return "multipart", chosen
        if media == "application/dicom":
            return "single", chosen
        if media in ("*/*", "multipart/*"):
            return "multipart", None
    raise NotAcceptable('ask for multipart/related; type="application/dicom"')


def _instance_body(request: Request, inst: StoredInstance, syntax: str | None) -> tuple[
    str, PartBody
]:
    """(transfer syntax, bytes or open file) of an instance in the syntax asked for."""
    retrieve = request.app.state.archive.retrieve
    if syntax is None or syntax == inst.transfer_syntax:
        return inst.transfer_syntax, retrieve.open(inst)
    try:
        with retrieve.open(inst) as stream:
            return syntax, transcode(stream, syntax)
    except NotAcceptable:
        # A part we cannot convert is sent as stored, labelled with its real syntax.
        return inst.transfer_syntax, retrieve.open(inst)


def _dicom_response(request: Request, found: list[StoredInstance]) -> Response:
    shape, syntax = _accepted_dicom_syntax(request)
    if shape == "single":
        if len(found) != 1:
            raise NotAcceptable("application/dicom holds one instance; use multipart/related")
        _actual, body = _instance_body(request, found[0], syntax)
        data = body if isinstance(body, bytes) else file_chunks(body)
        return StreamingResponse(iter([data]) if isinstance(data, bytes) else data,
                                 media_type="application/dicom")
    boundary = new_boundary()

    def parts() -> Iterator[tuple[str, PartBody]]:
        for inst in found:
            actual, body = _instance_body(request, inst, syntax)
            yield f"application/dicom; transfer-syntax={actual}", body

    return StreamingResponse(
        part_stream(boundary, parts()),
        media_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
    )


@router.get("/studies/{study}", summary="WADO-RS: retrieve a study")
def retrieve_study(request: Request, study: str, actor: Downloader) -> Response:
    """Every instance of the study as multipart/related application/dicom."""
    return _dicom_response(request, _select(request, actor, "study.retrieve", study,
                                            right=DOWNLOAD))


@router.get("/studies/{study}/series/{series}", summary="WADO-RS: retrieve a series")
def retrieve_series(request: Request, study: str, series: str, actor: Downloader) -> Response:
    """Every instance of the series."""
    return _dicom_response(request, _select(request, actor, "study.retrieve", study, series,
                                            right=DOWNLOAD))


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}",
    summary="WADO-RS: retrieve an instance",
)
def retrieve_instance(
    request: Request, study: str, series: str, instance: str, actor: Downloader
) -> Response:
    """One instance."""
    found = _select(request, actor, "study.retrieve", study, series, instance, DOWNLOAD)
    return _dicom_response(request, found)


def _metadata(request: Request, found: list[StoredInstance]) -> Response:
    retrieve = request.app.state.archive.retrieve
    base = _base(request)
    body = []
    for inst in found:
        url = f"{base}/studies/{inst.study_uid}/series/{inst.series_uid}/instances/{inst.sop_uid}"
        header = retrieve.header_json(
            inst.blob_key, lambda tag, url=url: f"{url}/bulkdata/{tag}"
        )
        header["00083002"] = {"vr": "UI", "Value": [inst.transfer_syntax]}
        body.append(header)
    return JSONResponse(body, media_type=DICOM_JSON)


@router.get("/studies/{study}/metadata", summary="WADO-RS: metadata of a study")
def study_metadata(request: Request, study: str, actor: Reader) -> Response:
    """DICOM JSON headers of every instance of the study (pixel data as BulkDataURI)."""
    return _metadata(request, _select(request, actor, "study.metadata", study))


@router.get("/studies/{study}/series/{series}/metadata", summary="WADO-RS: series metadata")
def series_metadata(request: Request, study: str, series: str, actor: Reader) -> Response:
    """DICOM JSON headers of every instance of the series."""
    return _metadata(request, _select(request, actor, "study.metadata", study, series))


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/metadata",
    summary="WADO-RS: instance metadata",
)
def instance_metadata(
    request: Request, study: str, series: str, instance: str, actor: Reader
) -> Response:
    """DICOM JSON header of one instance."""
    found = _select(request, actor, "study.metadata", study, series, instance)
    return _metadata(request, found)


def _frame_numbers(frames: str) -> list[int]:
    try:
        numbers = [int(f) for f in frames.split(",") if f.strip()]
    except ValueError as exc:
        raise InvalidQuery("frames are given as a comma-separated list of numbers") from exc
    if not numbers or any(n < 1 for n in numbers):
        raise InvalidQuery("frame numbers start at 1")
    return numbers


def _wants_as_stored(request: Request, transfer_syntax: str) -> bool:
    wanted = COMPRESSED_MEDIA_TYPES.get(transfer_syntax)
    for media_range in (request.headers.get("accept", "") or "*/*").split(","):
        media, params = media_type_params(media_range)
        kind = params.get("type", "")
        syntax = params.get("transfer-syntax", "")
        if syntax in ("*", transfer_syntax):
            return True
        if media in (wanted, "*/*") or kind == wanted or (
            media == "multipart/related" and kind == "*/*"
        ):
            return True
    return False


def _decoded_frames(request: Request, inst: StoredInstance, numbers: list[int]) -> Iterator[
    bytes
]:
    retrieve = request.app.state.archive.retrieve
    for number in numbers:
        with retrieve.open(inst) as stream:
            try:
                array = decode_frame(stream, number - 1, raw=True)
            except ImageShareError:  # over the pixel budget, busy: said as it is
                raise
            except Exception as exc:  # noqa: BLE001 - no decoder for this syntax
                raise NotAcceptable(
                    "the frames cannot be decoded; ask with transfer-syntax=*"
                ) from exc
        yield np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
    summary="WADO-RS: retrieve frames",
)
def retrieve_frames(
    request: Request, study: str, series: str, instance: str, frames: str, actor: Reader
) -> Response:
    """Frames as stored (compressed bitstreams) or as uncompressed pixel bytes."""
    numbers = _frame_numbers(frames)
    inst = _select(request, actor, "study.retrieve", study, series, instance)[0]
    retrieve = request.app.state.archive.retrieve
    boundary = new_boundary()
    if is_video(inst.transfer_syntax):
        raise NotAcceptable("frames of a video are not separable; retrieve the instance")
    if inst.transfer_syntax in UNCOMPRESSED - {"1.2.840.10008.1.2.2"}:
        content_type = f"application/octet-stream; transfer-syntax={ExplicitVRLittleEndian}"
        data = list(retrieve.frames(inst, numbers))
        kind = "application/octet-stream"
    elif inst.transfer_syntax in COMPRESSED_MEDIA_TYPES and _wants_as_stored(
        request, inst.transfer_syntax
    ):
        kind = COMPRESSED_MEDIA_TYPES[inst.transfer_syntax]
        content_type = f"{kind}; transfer-syntax={inst.transfer_syntax}"
        data = list(retrieve.frames(inst, numbers))
    else:
        kind = "application/octet-stream"
        content_type = f"application/octet-stream; transfer-syntax={ExplicitVRLittleEndian}"
        data = list(_decoded_frames(request, inst, numbers))
    return StreamingResponse(
        part_stream(boundary, ((content_type, d) for d in data)),
        media_type=f'multipart/related; type="{kind}"; boundary={boundary}',
    )


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/bulkdata/{tag}",
    summary="WADO-RS: retrieve bulk data",
)
def retrieve_bulkdata(
    request: Request, study: str, series: str, instance: str, tag: str, actor: Reader
) -> Response:
    """A large attribute's value; pixel data as all frames (video as its bitstream)."""
    inst = _select(request, actor, "study.retrieve", study, series, instance)[0]
    retrieve = request.app.state.archive.retrieve
    boundary = new_boundary()
    tag = tag.upper()
    if tag == "7FE00010":
        if is_video(inst.transfer_syntax):
            with retrieve.open(inst) as stream:
                ds = dcmread(stream)
            data = b"".join(generate_fragments(ds.PixelData))
            kind = COMPRESSED_MEDIA_TYPES[inst.transfer_syntax]
            parts = [(f"{kind}; transfer-syntax={inst.transfer_syntax}", data)]
        else:
            numbers = list(range(1, inst.number_of_frames + 1))
            if inst.transfer_syntax in COMPRESSED_MEDIA_TYPES:
                kind = COMPRESSED_MEDIA_TYPES[inst.transfer_syntax]
                content_type = f"{kind}; transfer-syntax={inst.transfer_syntax}"
            else:
                kind = "application/octet-stream"
                content_type = kind
            parts = [(content_type, f) for f in retrieve.frames(inst, numbers)]
        return StreamingResponse(
            part_stream(boundary, parts),
            media_type=f'multipart/related; type="{kind}"; boundary={boundary}',
        )
    with retrieve.open(inst) as stream:
        ds = dcmread(stream, stop_before_pixels=True)
    try:
        element = ds[int(tag, 16)]
    except (KeyError, ValueError) as exc:
        raise NotFound("no such bulk data") from exc
    value = element.value if isinstance(element.value, bytes) else bytes(str(element.value),
                                                                         "utf-8")
    return StreamingResponse(
        part_stream(boundary, [("application/octet-stream", value)]),
        media_type=f'multipart/related; type="application/octet-stream"; boundary={boundary}',
    )


def render_options(request: Request, thumbnail: bool) -> RenderOptions:
    """How to render, from the request's Accept header and window/viewport/quality."""
    accept = request.headers.get("accept", "") or "image/jpeg"
    media = "image/jpeg"
    for media_range in accept.split(","):
        candidate, _ = media_type_params(media_range)
        if candidate in ("image/jpeg", "image/png"):
            media = candidate
            break
        if candidate in ("*/*", "image/*"):
            break
    else:
        raise NotAcceptable("rendered images are available as image/jpeg or image/png")
    quality = _int_param(request, "quality", 90) or 90
    viewport = parse_viewport(request.query_params.get("viewport"))
    if thumbnail and viewport is None:
        viewport = (128, 128)
    return RenderOptions(
        media_type=media, window=parse_window(request.query_params.get("window")),
        viewport=viewport, quality=max(1, min(quality, 100)),
    )


def _render(
    request: Request, inst: StoredInstance, frame: int, thumbnail: bool = False
) -> Response:
    options = render_options(request, thumbnail)
    with request.app.state.archive.retrieve.open(inst) as stream:
        data = render_frame(stream, frame - 1, options)
    return Response(data, media_type=options.media_type)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/rendered",
    summary="WADO-RS: rendered instance",
)
def rendered_instance(
    request: Request, study: str, series: str, instance: str, actor: Reader
) -> Response:
    """The first frame as JPEG/PNG, windowed by ``window=center,width``."""
    inst = _select(request, actor, "study.view", study, series, instance)[0]
    return _render(request, inst, 1)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/rendered",
    summary="WADO-RS: rendered frame",
)
def rendered_frame(
    request: Request, study: str, series: str, instance: str, frame: str, actor: Reader
) -> Response:
    """One frame as JPEG/PNG."""
    numbers = _frame_numbers(frame)
    if len(numbers) != 1:
        raise NotAcceptable("render one frame at a time")
    inst = _select(request, actor, "study.view", study, series, instance)[0]
    return _render(request, inst, numbers[0])


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/thumbnail",
    summary="WADO-RS: instance thumbnail",
)
def instance_thumbnail(
    request: Request, study: str, series: str, instance: str, actor: Reader
) -> Response:
    """A small rendering of the instance's first (or middle, for cine) frame."""
    inst = _select(request, actor, "study.view", study, series, instance)[0]
    return _render(request, inst, max(1, (inst.number_of_frames + 1) // 2), thumbnail=True)


@router.get("/studies/{study}/series/{series}/thumbnail", summary="WADO-RS: series thumbnail")
def series_thumbnail(request: Request, study: str, series: str, actor: Reader) -> Response:
    """A small rendering of the series' middle image."""
    found = _select(request, actor, "study.view", study, series)
    return _render(request, _renderable(found), 1, thumbnail=True)


@router.get("/studies/{study}/thumbnail", summary="WADO-RS: study thumbnail")
def study_thumbnail(request: Request, study: str, actor: Reader) -> Response:
    """A small rendering of an image of the study."""
    found = _select(request, actor, "study.view", study)
    return _render(request, _renderable(found), 1, thumbnail=True)


def _renderable(found: list[StoredInstance]) -> StoredInstance:
    images = [i for i in found if not is_video(i.transfer_syntax)]
    if not images:
        raise NotFound("nothing in this selection can be rendered")
    return images[len(images) // 2]


# -- STOW-RS ---------------------------------------------------------------------------------

_STOW_PARALLEL = 4
FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_CONFLICT = 0xA910
FAILURE_PROCESSING = 0x0110
FAILURE_STUDY_MISMATCH = 0xA900


async def _receive(request: Request, sink: PartSink) -> None:
    try:
        async for chunk in request.stream():
            sink.feed(chunk)
    finally:
        sink.close()


def _store_part(
    archive: Any, base: str, part: Any, actor: Actor, study: str | None
) -> tuple[bool, Dataset]:
    """Store one STOW-RS part: (stored?, its ReferencedSOPSequence or FailedSOPSequence item)."""
    media, _ = media_type_params(part.content_type or "application/dicom")
    item = Dataset()
    try:
        if media not in ("application/dicom", "application/octet-stream"):
            raise InvalidInstance(f"parts must be application/dicom, not {media}",
                                  *_uids_of(part.path))
        result = archive.ingest.store_staged(part.path, actor, expected_study=study)
    except (InvalidInstance, ConflictingInstance) as exc:
        item.ReferencedSOPClassUID = exc.sop_class_uid
        item.ReferencedSOPInstanceUID = exc.sop_instance_uid
        item.FailureReason = (
            FAILURE_CONFLICT if isinstance(exc, ConflictingInstance)
            else FAILURE_STUDY_MISMATCH if isinstance(exc, WrongStudy)
            else FAILURE_CANNOT_UNDERSTAND
        )
        item.ErrorComment = str(exc)[:64]
        return False, item
    except Exception:  # noqa: BLE001 - reported as a processing failure, nothing stored
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = "", ""
        item.FailureReason = FAILURE_PROCESSING
        return False, item
    finally:
        part.path.unlink(missing_ok=True)
    item.ReferencedSOPClassUID = result.sop_class_uid
    item.ReferencedSOPInstanceUID = result.sop_instance_uid
    item.RetrieveURL = (
        f"{base}/studies/{result.study_uid}/series/{result.series_uid}/instances/"
        f"{result.sop_instance_uid}"
    )
    if result.warning:
        item.WarningReason = 0xB000
    return True, item


def _store_parts(request: Request, sink: PartSink, actor: Actor, study: str | None) -> Response:
    archive = request.app.state.archive
    base = _base(request)
    # Parts are stored side by side: their index writes then share commits.
    with ThreadPoolExecutor(max_workers=_STOW_PARALLEL) as pool:
        outcomes = list(pool.map(
            lambda part: _store_part(archive, base, part, actor, study), sink.parts
        ))
    stored = [item for ok, item in outcomes if ok]
    failed = [item for ok, item in outcomes if not ok]
    answer = Dataset()
    if study:
        answer.RetrieveURL = f"{base}/studies/{study}"
    elif stored:
        studies = {str(i.RetrieveURL).split("/series/")[0] for i in stored}
        if len(studies) == 1:
            answer.RetrieveURL = studies.pop()
    answer.ReferencedSOPSequence = stored
    if failed:
        answer.FailedSOPSequence = failed
    if not sink.parts:
        raise ImageShareError("the request holds no DICOM parts")
    status = 200 if not failed else (202 if stored else 409)
    return JSONResponse(answer.to_json_dict(), status_code=status, media_type=DICOM_JSON)


def _uids_of(path: Any) -> tuple[str, str]:
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID",
                                                                  "SOPInstanceUID"])
        return str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", ""))
    except Exception:  # noqa: BLE001 - unreadable parts have no UIDs to report
        return "", ""


async def _stow(request: Request, actor: Actor, study: str | None) -> Response:
    media, params = media_type_params(request.headers.get("content-type", ""))
    if media != "multipart/related" or "boundary" not in params:
        return JSONResponse(
            {"type": "about:blank", "title": "Unsupported media type", "status": 415,
             "detail": 'send multipart/related; type="application/dicom" with a boundary'},
            status_code=415, media_type="application/problem+json",
        )
    if params.get("type", "application/dicom") not in ("application/dicom",):
        return JSONResponse(
            {"type": "about:blank", "title": "Unsupported media type", "status": 415,
             "detail": "only application/dicom parts are accepted"},
            status_code=415, media_type="application/problem+json",
        )
    archive = request.app.state.archive
    sink = PartSink(params["boundary"], archive.ingest.staging_file,
                    max_parts=archive.settings.stow_max_parts)
    try:
        await _receive(request, sink)
        return await run_in_threadpool(_store_parts, request, sink, actor, study)
    finally:
        for part in sink.parts:
            part.path.unlink(missing_ok=True)


@router.post("/studies", summary="STOW-RS: store instances")
async def store_instances(request: Request, actor: Writer) -> Response:
    """Store the multipart/related application/dicom parts; per-instance results."""
    return await _stow(request, actor, None)


@router.post("/studies/{study}", summary="STOW-RS: store instances of one study")
async def store_study_instances(request: Request, study: str, actor: Writer) -> Response:
    """Store parts that belong to ``study``; others fail with a reason."""
    return await _stow(request, actor, study)



# -- WADO-URI (PS3.18 chapter 9), for viewers that predate WADO-RS ----------------------------


@router.get("/wado", summary="WADO-URI: retrieve one object")
def wado_uri(request: Request, actor: Reader) -> Response:
    """``requestType=WADO&studyUID=&seriesUID=&objectUID=``; contentType application/dicom
    (optionally ``transferSyntax``) or image/jpeg, image/png (``frameNumber``, ``windowCenter``,
    ``windowWidth``, ``rows``, ``columns``)."""
    params = request.query_params
    if params.get("requestType") != "WADO":
        raise InvalidQuery("requestType must be WADO")
    uids = [params.get(name, "") for name in ("studyUID", "seriesUID", "objectUID")]
    if not all(uids):
        raise InvalidQuery("studyUID, seriesUID and objectUID are required")
    content_type = params.get("contentType", "image/jpeg").split(",")[0].strip()
    as_file = content_type == "application/dicom"
    if as_file:
        authorise_also(request, actor, STUDY_DOWNLOAD, uids[0])
    inst = _select(request, actor, "study.retrieve", *uids, right=DOWNLOAD if as_file else VIEW)[0]
    if as_file:
        _actual, body = _instance_body(request, inst, params.get("transferSyntax"))
        data = body if isinstance(body, bytes) else file_chunks(body)
        return StreamingResponse(iter([data]) if isinstance(data, bytes) else data,
                                 media_type="application/dicom")
    if content_type not in ("image/jpeg", "image/png"):
        raise NotAcceptable("contentType must be application/dicom, image/jpeg or image/png")
    window = None
    if params.get("windowCenter") and params.get("windowWidth"):
        window = parse_window(f"{params['windowCenter']},{params['windowWidth']}")
    rows, columns = _int_param(request, "rows", None), _int_param(request, "columns", None)
    # Only rows or only columns given: the other follows the image's aspect ratio.
    viewport = (columns or 8192, rows or 8192) if (rows or columns) else None
    options = RenderOptions(
        media_type=content_type, window=window, viewport=viewport,
        quality=max(1, min(_int_param(request, "imageQuality", 90) or 90, 100)),
    )
    with request.app.state.archive.retrieve.open(inst) as stream:
        data = render_frame(stream, (_int_param(request, "frameNumber", 1) or 1) - 1, options)
    return Response(data, media_type=content_type)
