"""DICOMweb (PS3.18) under /dicomweb: QIDO-RS, WADO-RS and STOW-RS over the archive services."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, BinaryIO

import numpy as np
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from imageshare.access.policy import (
    EXPORT_DEIDENTIFIED,
    STUDY_DOWNLOAD,
    STUDY_READ,
    STUDY_STORE,
)
from imageshare.access.scope import DOWNLOAD, VIEW
from imageshare.archive.dicom_json import error_comment, json_bytes, native_dicom_xml, safe_json
from imageshare.archive.pixel_budget import decode_frame
from imageshare.archive.query import Level, Query
from imageshare.archive.rendering import (
    MEDIA_TYPES as RENDERED_MEDIA_TYPES,
)
from imageshare.archive.rendering import (
    Region,
    RenderOptions,
    Window,
    parse_region,
    parse_viewport,
    parse_viewport_source,
    parse_window,
    render_animation,
    render_frame,
    render_frames,
    render_video_still,
    window_of,
)
from imageshare.archive.retrieve import StoredInstance
from imageshare.archive.transcode import (
    COMPRESSED_MEDIA_TYPES,
    CONVERSION_TARGETS,
    FRAME_ENCODINGS,
    JPEG_BASELINE,
    can_decode,
    can_encode_frames,
    can_produce,
    encode_frame,
    encoding_header,
    is_known_syntax,
    is_lossy,
    is_video,
    mp4_span,
    playable_video,
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
    UnsupportedMediaType,
    UnsupportedParameter,
)
from imageshare.web.auth import PrivateRoute, allowed, authorise_also, refuse
from imageshare.web.deps import ArchiveDep, archive_of
from imageshare.web.multipart import (
    Part,
    PartBody,
    PartSink,
    ReceivedPart,
    file_chunks,
    new_boundary,
    part_stream,
)
from imageshare.web.negotiation import MediaRange, matches, parse_accept, parse_media_type
from imageshare.web.urls import public_root

log = logging.getLogger("imageshare.dicomweb")
router = APIRouter(prefix="/dicomweb", tags=["DICOMweb"], route_class=PrivateRoute)
# The services' own queries keep to the record (a search under a study nobody may see finds
# nothing, a retrieval of it is not found), so the permission does not look for the study.
Reader = allowed(STUDY_READ, "study", in_record=False)
# Instances as DICOM files leave with download rights (shares may grant only viewing).
Downloader = allowed(STUDY_DOWNLOAD, "study", in_record=False)
Writer = allowed(STUDY_STORE)
DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"
DICOM = "application/dicom"
OCTET_STREAM = "application/octet-stream"

# Media types each kind of resource answers in (PS3.18 8.7); the conformance statement lists
# them. Anything else in Accept answers 406 Not Acceptable.
RESOURCE_MEDIA_TYPES: dict[str, tuple[str, ...]] = {
    "QIDO-RS search": (f"{DICOM_JSON} (default)", f'multipart/related; type="{DICOM_XML}"'),
    "WADO-RS study, series, instance": (
        f'multipart/related; type="{DICOM}" (the default, also for no Accept header or '
        f"`*/*`; without a transfer-syntax parameter {ExplicitVRLittleEndian}, decompressed "
        "as needed; `*` as stored)", f"{DICOM} (one instance; the same default)"),
    "WADO-RS metadata": (f"{DICOM_JSON} (default)", f'multipart/related; type="{DICOM_XML}"'),
    "WADO-RS frames, bulk data": (
        f'multipart/related; type="{OCTET_STREAM}" (decoded, little endian)',
        'multipart/related; type="image/jpeg" (or image/jls, image/jp2, image/jpx, '
        "image/dicom-rle, video/*: as stored when stored so)",
        'multipart/related; type="image/jls" (or image/jp2, image/dicom-rle: frames stored '
        "uncompressed, or compressed in another syntax and decoded here, compressed "
        "losslessly, JPEG-LS, JPEG 2000 or RLE)",
        'multipart/related; type="image/jpeg"; transfer-syntax=1.2.840.10008.1.2.4.50 '
        "(frames of 8-bit greyscale or colour pixels stored otherwise compressed as JPEG "
        "baseline, lossy, only when this transfer syntax is named; image/jpeg alone means "
        "JPEG Lossless, which is sent only as stored)",
        "*/* (without a transfer-syntax parameter uncompressed little endian, as stored when "
        "stored lossy (PS3.18 8.7.3.3); transfer-syntax=* as stored)",
        f"{OCTET_STREAM} (bulk data, or one frame: one single-part body, uncompressed "
        "little endian)",
        "image/jpeg, image/jls, image/jp2, image/dicom-rle... without multipart/related (one "
        "frame only: that frame as one single-part body, in the representation the "
        "multipart form of the type gives; a frame list of several answers 406 when only "
        "single-part types are acceptable, PS3.18 10.4.4; image/jpeg alone is JPEG Lossless, "
        "refused 406 unless the frames are stored as JPEG, and the answer names the baseline "
        "transfer syntax and the frame's /rendered resource)",
        "Range: bytes=first-last (bulk data answered as one value: only those bytes, 206)"),
    "WADO-RS rendered": (
        "image/jpeg (default), image/png, image/gif (animated for a multi-frame instance)",
        "video/mp4 for a video instance (MPEG-4 AVC or HEVC as stored, in an MP4 file; "
        "`*/*` asks for it too; as an image: its first picture)",
        'multipart/related; type="image/jpeg" (or image/png, image/gif): every frame of an '
        "instance, or the first frame of every image of a study or series"),
    "STOW-RS request": (f'multipart/related; type="{DICOM}" (every part {DICOM}; a part '
                        "without a Content-Type is taken as such, any other type fails "
                        "with C000)",),
    "STOW-RS response": (f"{DICOM_JSON} (default)", DICOM_XML),
    "WADO-URI": (f"contentType={DICOM} (transferSyntax; {ExplicitVRLittleEndian} when "
                 "absent)", "contentType=image/jpeg (default), image/png (region, rows, "
                 "columns, windowCenter, windowWidth, frameNumber, imageQuality; a video: "
                 "its first picture); a list with q values takes its most preferred type "
                 "offered"),
}

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
# Query parameters that are not attributes to match (PS3.18 8.3.3 and 8.3.4): ``accept``
# and ``charset`` may come with any request.
_RESERVED = {"limit", "offset", "includefield", "fuzzymatching", "accept", "charset"}


def _accept(request: Request) -> str | None:
    """The media types acceptable for the answer: those of the ``accept`` query parameter
    (PS3.18 8.3.3.1, for user agents that cannot set headers) before those of the Accept
    header; None when neither is given."""
    asked = [v for v in request.query_params.getlist("accept") if v.strip()]
    header = request.headers.get("accept")
    return ", ".join([*asked, *([header] if header else [])]) or None


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
    nested: list[list[str]] = []  # includefield paths into a sequence (PS3.18 8.3.4.3)
    for name in _DEFAULTS.get(level, ()):
        tag = _tag(name)
        identifier[tag] = _element(tag, "")
    for key, value in request.query_params.multi_items():
        if key == "includefield":
            for field in value.split(","):
                if field.strip() == "all":
                    return_all = True
                elif field.strip():
                    path = _path(field)
                    if len(path) > 1:
                        nested.append(path)
                    else:
                        identifier.setdefault(path[0], _element(path[0], ""))
            continue
        if key in _RESERVED:
            continue
        path = _path(key)
        if len(path) == 1:
            identifier[path[0]] = _element(path[0], value)
        else:
            _item_at(identifier, path[:-1], whole=False)[path[-1]] = _element(path[-1], value)
    for tag, value in fixed.items():
        identifier[tag] = _element(tag, value)
    for path in nested:
        _item_at(identifier, path[:-1], whole=True).setdefault(path[-1],
                                                               _element(path[-1], ""))
    return identifier, return_all


def _path(name: str) -> list[str]:
    """The tags of an attribute path (``Keyword``, ``Sequence.Keyword``,
    ``Sequence.Sequence.Keyword``, keywords or tags); InvalidQuery when a component before the
    last is not a sequence."""
    path = [_tag(p) for p in name.split(".")]
    for tag in path[:-1]:
        if _vr(tag) != "SQ":
            raise InvalidQuery(f"{name.strip()!r}: {tag} is not a sequence")
    return path


def _item_at(identifier: dict[str, Any], sequences: list[str], whole: bool
             ) -> dict[str, Any]:
    """The query item that the sequence path ``sequences`` leads to in ``identifier``, made
    where missing. With ``whole`` (an includefield), a sequence already asked for with an
    empty item (whole items: it holds every attribute) is left as it is, and the item
    returned is a scratch one."""
    container = identifier
    for tag in sequences:
        sequence = container.get(tag)
        if sequence is None or sequence.get("vr") != "SQ":
            sequence = container[tag] = {"vr": "SQ", "Value": [{}]}
        elif whole and not (sequence.get("Value") or [{}])[0]:
            return {}
        if not sequence.get("Value"):
            sequence["Value"] = [{}]
        container = sequence["Value"][0]
    return container


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
    """The DICOMweb root for the absolute URLs in answers (Retrieve URL, BulkDataURI,
    Content-Location): :func:`imageshare.web.urls.public_root`, never a forged Host."""
    return public_root(request) + "/dicomweb"


def _retrieve_url(request: Request, attrs: dict[str, Any], level: Level) -> str:
    def uid(tag: str) -> str:
        return (attrs.get(tag, {}).get("Value") or [""])[0]

    url = f"{_base(request)}/studies/{uid('0020000D')}"
    if level in ("SERIES", "IMAGE"):
        url += f"/series/{uid('0020000E')}"
    if level == "IMAGE":
        url += f"/instances/{uid('00080018')}"
    return url


def _wants_xml(request: Request, what: str) -> bool:
    """True when the client asks for DICOM XML, False for DICOM JSON; 406 otherwise."""
    for media_range in parse_accept(_accept(request)):
        media = media_range.media
        if media in (DICOM_JSON, "application/json") or media in ("*/*", "application/*"):
            return False
        if media == DICOM_XML:
            return True
        if media in ("multipart/related", "multipart/*") and media_range.param(
            "type", DICOM_XML
        ) in (DICOM_XML, "*/*"):
            return True
    raise NotAcceptable(
        f"{what} is available as {DICOM_JSON} or multipart/related; type=\"{DICOM_XML}\""
    )


def _dicom_answer(request: Request, datasets: list[dict[str, Any]], xml: bool,
                  headers: dict[str, str] | None = None) -> Response:
    """A list of data sets as DICOM JSON, or as multipart/related DICOM XML (one part each);
    built in full before anything is sent. No match is 200 with an empty list (JSON) or an
    empty payload (XML).

    JSON is rendered in one pass; only when that finds a value JSON cannot carry are the
    data sets checked element by element, leaving such elements out (with a warning)."""
    if not xml:
        try:
            body = json_bytes(datasets)
        except ValueError:
            body = json_bytes([safe_json(attrs, _first_value(attrs, "00080018"))
                               for attrs in datasets])
        return Response(body, media_type=DICOM_JSON, headers=headers)
    boundary = new_boundary()
    if not datasets:
        # A multipart body has at least one part (RFC 2046 5.1.1): no match is 200 with an
        # empty payload (PS3.18 CP-2473), as a JSON answer's empty list.
        return Response(b"", headers=headers, media_type=(
            f'multipart/related; type="{DICOM_XML}"; boundary={boundary}'))
    body = b"".join(
        f"--{boundary}\r\nContent-Type: {DICOM_XML}\r\n\r\n".encode()
        + native_dicom_xml(attrs, _first_value(attrs, "00080018")) + b"\r\n"
        for attrs in datasets
    ) + f"--{boundary}--\r\n".encode()
    return Response(body, headers=headers, media_type=(
        f'multipart/related; type="{DICOM_XML}"; boundary={boundary}'))


def _first_value(attrs: dict[str, Any], tag: str) -> str:
    values = (attrs.get(tag) or {}).get("Value") or [""]
    return str(values[0])


def _qido(request: Request, actor: Actor, level: Level, **fixed: str) -> Response:
    archive = archive_of(request)
    xml = _wants_xml(request, "a search result")
    identifier, return_all = _identifier(request, level, fixed)
    query = Query(
        level=level,
        identifier=identifier,
        limit=_int_param(request, "limit", None),
        offset=_int_param(request, "offset", 0) or 0,
        fuzzy=request.query_params.get("fuzzymatching", "").lower() == "true",
        allowed_studies=archive.policy.study_scope(actor),
        return_all=return_all,
        one_more=True,  # to tell an answer cut at the maximum from one that is complete
    )
    most = archive.settings.qido_max_limit
    found = archive.query.find(query, actor)
    matches = found[:min(query.limit or most, most)]
    body = []
    for match in matches:
        # The values are checked while the answer is rendered (see _dicom_answer) for JSON.
        attrs = safe_json(dict(match.attributes), _first_value(match.attributes, "00080018"),
                          check_values=xml)
        attrs.pop("00080052", None)
        attrs["00081190"] = {"vr": "UR", "Value": [_retrieve_url(request, attrs, level)]}
        body.append(dict(sorted(attrs.items())))
    headers = {}
    # More matches than one answer holds (not merely as many): a Warning says so (PS3.18).
    if len(found) > most and (query.limit is None or query.limit > most):
        headers["Warning"] = (
            f'299 imageshare "There are more than {most} results; page with limit and '
            'offset, or narrow the search."'
        )
    return _dicom_answer(request, body, xml, headers)


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
    instance: str | None = None, right: str = VIEW, part: bool = False,
) -> list[StoredInstance]:
    """The instances named, audited as ``action``; ``part``: a part of a viewing (frames,
    renderings, thumbnails) that a viewer fetches by the hundred, audited once per viewing."""
    archive = archive_of(request)
    return archive.retrieve.select(
        actor, action, study_uids=[study], series_uids=[series] if series else (),
        sop_uids=[instance] if instance else (),
        allowed_studies=archive.policy.study_scope(actor, right), repeatable=part,
    )


def _producible(syntax: str, found: list[StoredInstance] | None) -> bool:
    """Can ``syntax`` be answered for this selection: ImageShare converts to it, or some
    selected instance is stored in it (the others then come as stored)? Without a selection
    (checked before one is made): is it a transfer syntax at all?"""
    if not is_known_syntax(syntax):
        return False
    if found is None:
        return True
    return syntax in CONVERSION_TARGETS or any(i.transfer_syntax == syntax for i in found)


def _dicom_ranges(request: Request) -> Iterator[tuple[str, str]]:
    """('multipart'|'single', transfer syntax or ``*``) of each Accept range that asks for
    DICOM instances, most preferred first (Explicit VR Little Endian where a range names
    no transfer syntax)."""
    for media_range in parse_accept(_accept(request)):
        media, kind = media_range.media, media_range.param("type", DICOM)
        if media == "multipart/related" and kind in (DICOM, "*/*"):
            shape = "multipart"
        elif media == DICOM:
            shape = "single"
        elif media in ("*/*", "multipart/*", "application/*"):
            shape = "multipart"
        else:
            continue
        yield shape, media_range.param("transfer-syntax", ExplicitVRLittleEndian)


def _accepted_dicom_syntax(request: Request, found: list[StoredInstance] | None) -> tuple[
    str, str | None
]:
    """('multipart'|'single', transfer syntax or None for as-stored) from the Accept header:
    the most preferred range that can be answered; 406 when none can. A range without a
    transfer-syntax parameter (no Accept header, ``*/*`` and ``type="*/*"`` included) asks for
    the default, Explicit VR Little Endian (PS3.18 8.7.3.4); ``transfer-syntax=*`` for the
    instances as stored. Called once before the selection (so that a request nothing can
    answer is refused before it is audited as a retrieval) and once with it."""
    refused = ""
    for shape, syntax in _dicom_ranges(request):
        if syntax == "*":
            return shape, None
        if _producible(syntax, found):
            return shape, syntax
        refused = syntax
    if refused:
        raise NotAcceptable(f"transfer syntax {refused} is not offered: ask for "
                            f"{ExplicitVRLittleEndian}, one of {', '.join(CONVERSION_TARGETS[1:])}"
                            ", or * (as stored)")
    raise NotAcceptable('ask for multipart/related; type="application/dicom"')


def _planned_syntax(inst: StoredInstance, syntax: str | None,
                    acceptable: list[str] | None = None) -> str:
    """The syntax an instance will be sent in, decided before anything is sent: the one
    asked for when it can be produced, else the first of the other ``acceptable`` syntaxes
    (``*``: as stored) that can, else the stored one (labelled as such)."""
    for wanted in [syntax or "*", *(acceptable or [])]:
        if wanted in ("*", inst.transfer_syntax):
            return inst.transfer_syntax
        if can_produce(inst.transfer_syntax, wanted):
            return wanted
    return inst.transfer_syntax


def _instance_body(request: Request, inst: StoredInstance, syntax: str) -> tuple[
    str, PartBody
]:
    """(transfer syntax, bytes or open file) of an instance in the planned syntax; one that
    cannot be converted after all is sent as stored, labelled with its real syntax."""
    retrieve = archive_of(request).retrieve
    if syntax == inst.transfer_syntax:
        return inst.transfer_syntax, retrieve.open(inst)
    try:
        with retrieve.open(inst) as stream:
            return syntax, transcode(stream, syntax)
    except NotAcceptable:
        log.info("instance %s: not convertible to %s; sent as stored", inst.sop_uid, syntax)
        return inst.transfer_syntax, retrieve.open(inst)


def _dicom_response(request: Request, found: list[StoredInstance]) -> Response:
    """The instances as the Accept header asks: multipart/related, or one application/dicom
    body. For HEAD, the headers GET would send (the syntax each instance is planned in)
    and nothing is read or converted."""
    shape, syntax = _accepted_dicom_syntax(request, found)
    # Every part's syntax is settled before the first byte is sent: an instance that cannot
    # be converted to the syntax chosen goes in the next acceptable one it can be (a study
    # of JPEG and CT images asked as JPEG baseline or else JPEG 2000), else as stored, so
    # that the body is never cut.
    acceptable = [ts for kind, ts in _dicom_ranges(request) if kind == shape]
    plan = [(inst, _planned_syntax(inst, syntax, acceptable)) for inst in found]
    if shape == "single":
        if len(found) != 1:
            raise NotAcceptable("application/dicom holds one instance; use multipart/related")
        if request.method == "HEAD":
            return _head_only(Response(media_type=f"{DICOM}; transfer-syntax={plan[0][1]}"),
                              request)
        actual, body = _instance_body(request, *plan[0])
        data = body if isinstance(body, bytes) else file_chunks(body)
        return StreamingResponse(iter([data]) if isinstance(data, bytes) else data,
                                 media_type=f"{DICOM}; transfer-syntax={actual}")
    boundary = new_boundary()

    def parts() -> Iterator[Part]:
        for inst, planned in plan:
            actual, body = _instance_body(request, inst, planned)
            yield f"{DICOM}; transfer-syntax={actual}", body, _instance_url(request, inst)

    # For HEAD the parts are never produced: the generator is dropped unstarted.
    return _head_only(StreamingResponse(
        part_stream(boundary, parts()),
        media_type=f'multipart/related; type="{DICOM}"; boundary={boundary}',
    ), request)


def _head_only(response: Response, request: Request) -> Response:
    """For a HEAD request: ``response``'s status and headers without its body (Content-Length
    kept only when the response had one); for any other, ``response`` itself."""
    if request.method != "HEAD":
        return response
    head = Response(status_code=response.status_code, headers=dict(response.headers))
    if "content-length" not in response.headers:
        del head.headers["content-length"]
    return head


# HEAD routes share their GET route's function (and so its one permission); they stay out of
# the OpenAPI document, whose operations each need an id of their own.
@router.head("/studies/{study}", summary="WADO-RS: retrieve a study", include_in_schema=False)
@router.get("/studies/{study}", summary="WADO-RS: retrieve a study")
def retrieve_study(request: Request, study: str, actor: Downloader) -> Response:
    """Every instance of the study as multipart/related application/dicom; HEAD: the same
    status and headers without the body, audited as a metadata read."""
    _accepted_dicom_syntax(request, None)
    # A HEAD sends no instance (only the index is consulted): a metadata read, no retrieval.
    action = "study.metadata" if request.method == "HEAD" else "study.retrieve"
    return _dicom_response(request, _select(request, actor, action, study, right=DOWNLOAD))


@router.head("/studies/{study}/series/{series}", summary="WADO-RS: retrieve a series",
             include_in_schema=False)
@router.get("/studies/{study}/series/{series}", summary="WADO-RS: retrieve a series")
def retrieve_series(request: Request, study: str, series: str, actor: Downloader) -> Response:
    """Every instance of the series; HEAD: the same status and headers without the body,
    audited as a metadata read."""
    _accepted_dicom_syntax(request, None)
    action = "study.metadata" if request.method == "HEAD" else "study.retrieve"
    return _dicom_response(request, _select(request, actor, action, study, series,
                                            right=DOWNLOAD))


INSTANCE = "/studies/{study}/series/{series}/instances/{instance}"


@router.head(INSTANCE, summary="WADO-RS: retrieve an instance", include_in_schema=False)
@router.get(INSTANCE, summary="WADO-RS: retrieve an instance")
def retrieve_instance(
    request: Request, study: str, series: str, instance: str, actor: Downloader
) -> Response:
    """One instance. HEAD answers GET's headers without the body; nothing is sent, so it is
    audited as a metadata read."""
    _accepted_dicom_syntax(request, None)
    action = "study.metadata" if request.method == "HEAD" else "study.retrieve"
    found = _select(request, actor, action, study, series, instance, DOWNLOAD)
    return _dicom_response(request, found)


def _metadata(request: Request, found: list[StoredInstance], xml: bool) -> Response:
    retrieve = archive_of(request).retrieve
    base = _base(request)
    body = []
    for inst in found:
        url = _instance_url(request, inst, base)
        try:
            header = retrieve.header_json(
                inst.blob_key, partial(_bulkdata_url, url)
            )
        except Exception as exc:  # noqa: BLE001 - an unreadable file still has its UIDs
            log.warning("instance %s: stored header unreadable (%s); metadata holds its "
                        "identifiers only", inst.sop_uid, type(exc).__name__)
            header = {
                "00080016": {"vr": "UI", "Value": [inst.sop_class_uid]},
                "00080018": {"vr": "UI", "Value": [inst.sop_uid]},
                "0020000D": {"vr": "UI", "Value": [inst.study_uid]},
                "0020000E": {"vr": "UI", "Value": [inst.series_uid]},
            }
        header["00083002"] = {"vr": "UI", "Value": [inst.transfer_syntax]}
        body.append(dict(sorted(header.items())))
    return _dicom_answer(request, body, xml)


@router.head("/studies/{study}/metadata", summary="WADO-RS: metadata of a study",
             include_in_schema=False)
@router.get("/studies/{study}/metadata", summary="WADO-RS: metadata of a study")
def study_metadata(request: Request, study: str, actor: Reader) -> Response:
    """DICOM JSON (or XML) headers of every instance of the study (bulk data as
    BulkDataURIs); HEAD: the same headers without the body."""
    xml = _wants_xml(request, "metadata")
    found = _select(request, actor, "study.metadata", study)
    return _head_only(_metadata(request, found, xml), request)


@router.head("/studies/{study}/series/{series}/metadata", summary="WADO-RS: series metadata",
             include_in_schema=False)
@router.get("/studies/{study}/series/{series}/metadata", summary="WADO-RS: series metadata")
def series_metadata(request: Request, study: str, series: str, actor: Reader) -> Response:
    """DICOM JSON (or XML) headers of every instance of the series; HEAD: the same headers
    without the body."""
    xml = _wants_xml(request, "metadata")
    found = _select(request, actor, "study.metadata", study, series)
    return _head_only(_metadata(request, found, xml), request)


@router.head(f"{INSTANCE}/metadata", summary="WADO-RS: instance metadata",
             include_in_schema=False)
@router.get(f"{INSTANCE}/metadata", summary="WADO-RS: instance metadata")
def instance_metadata(
    request: Request, study: str, series: str, instance: str, actor: Reader
) -> Response:
    """DICOM JSON (or XML) header of one instance; HEAD: the same headers without the
    body."""
    xml = _wants_xml(request, "metadata")
    found = _select(request, actor, "study.metadata", study, series, instance)
    return _head_only(_metadata(request, found, xml), request)


def _frame_numbers(frames: str) -> list[int]:
    try:
        numbers = [int(f) for f in frames.split(",") if f.strip()]
    except ValueError as exc:
        raise InvalidQuery("frames are given as a comma-separated list of numbers") from exc
    if not numbers or any(n < 1 for n in numbers):
        raise InvalidQuery("frame numbers start at 1")
    return numbers


def _check_frame_count(numbers: list[int], inst: StoredInstance) -> None:
    """Refuse a frame list longer than the instance has frames (it can only repeat them:
    each repeat would be read, decoded and held again, a cheap way to exhaust memory)."""
    if len(numbers) > max(1, inst.number_of_frames):
        raise InvalidQuery(f"more frame numbers ({len(numbers)}) than the instance has "
                           f"frames ({inst.number_of_frames})")


def _pixel_representation(request: Request, inst: StoredInstance, single: bool | None = None
                          ) -> tuple[str, bool]:
    """How pixel data goes out, from the Accept header: ``stored`` (the compressed bitstream,
    or native little-endian pixels), ``decoded`` (application/octet-stream, little endian),
    or the transfer syntax frames are to be compressed in (image/jls, image/jp2,
    image/dicom-rle: lossless, the media type's default syntax when the range names none;
    frames stored compressed otherwise are decoded first; image/jpeg with
    transfer-syntax=1.2.840.10008.1.2.4.50 named: JPEG baseline, lossy, for 8-bit pixels);
    and whether it goes out as one single-part body.

    A single-part range (``application/octet-stream``, ``image/jpeg``... without
    ``multipart/related``) is answered single part when ``single`` is True (one frame: a
    single response item, PS3.18 10.4.4), ignored when it is False (several frames), and
    answered as its multipart/related form when it is None (bulk data, as before).
    406 when no acceptable range can be answered."""
    stored_media = COMPRESSED_MEDIA_TYPES.get(inst.transfer_syntax)
    native = inst.transfer_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    as_stored = "stored" if (stored_media or native) else "decoded"
    # Without a transfer-syntax parameter, uncompressed (Explicit VR Little Endian) unless
    # the pixels exist only lossy compressed (PS3.18 8.7.3.3), or cannot be decoded here.
    default = as_stored if (native or is_lossy(inst.transfer_syntax)
                            or not can_decode(inst.transfer_syntax)) else "decoded"
    headers: list[Dataset] = []

    def header() -> Dataset:
        """The pixel description frames are encoded from (read once, only when needed)."""
        if not headers:
            with archive_of(request).retrieve.open(inst) as stream:
                stored = dcmread(stream, stop_before_pixels=True)
            headers.append(stored if native else encoding_header(stored))
        return headers[0]

    skipped = False  # a single-part range passed over: several frames were asked for
    for media_range in parse_accept(_accept(request)):
        media = media_range.media
        kind = media_range.param("type", OCTET_STREAM) if media == "multipart/related" else media
        syntax = media_range.param("transfer-syntax", "")
        bare = media not in ("*/*", "multipart/*", "multipart/related")
        if bare and single is False:
            skipped = True
            continue
        one = bare and single is True
        if media in ("*/*", "multipart/*") or kind == "*/*":
            if syntax == "*" or syntax == inst.transfer_syntax:
                return as_stored, one
            if syntax in ("", ExplicitVRLittleEndian):
                return (default if syntax == "" else ("stored" if native else "decoded")), one
            continue
        if kind == OCTET_STREAM:
            if syntax == "*":
                return as_stored, one
            if syntax in ("", ExplicitVRLittleEndian):
                return ("stored" if native else "decoded"), one
            continue
        if stored_media and matches(MediaRange(kind), stored_media) and syntax in (
                "", "*", inst.transfer_syntax):
            return "stored", one
        target = FRAME_ENCODINGS.get(kind, "") if syntax in ("", "*") else syntax
        if COMPRESSED_MEDIA_TYPES.get(target) == kind and can_encode_frames(
                inst.transfer_syntax, target,
                header() if target == JPEG_BASELINE and can_decode(inst.transfer_syntax)
                else None):
            return target, one
    encoded = (", ".join(m for m, t in FRAME_ENCODINGS.items()
                         if can_encode_frames(inst.transfer_syntax, t)))
    lossy = can_decode(inst.transfer_syntax) and not is_video(inst.transfer_syntax) and \
        can_encode_frames(inst.transfer_syntax, JPEG_BASELINE, header())
    raise NotAcceptable(
        ("several frames come in multipart/related only (a single-part media type is for "
         "one frame); " if skipped else "")
        + "pixel data is available as multipart/related; type=\"application/octet-stream\""
        + (f" or as stored ({stored_media})" if stored_media else "")
        + (f" or losslessly compressed ({encoded})" if encoded else "")
        + (f" or, lossy, as image/jpeg; transfer-syntax={JPEG_BASELINE}" if lossy else "")
        + ("; one frame also single part in these media types (application/octet-stream, "
           "...), and as a rendered image (image/jpeg, image/png) at "
           ".../frames/{n}/rendered" if single else "")
    )


def _decoded_frames(request: Request, inst: StoredInstance, numbers: list[int]) -> list[bytes]:
    if not can_decode(inst.transfer_syntax):
        raise NotAcceptable("the frames cannot be decoded here; ask with transfer-syntax=*")
    total = max(1, inst.number_of_frames)
    for number in numbers:  # as the stored frames say it (not a decoder's failure)
        if not 1 <= number <= total:
            raise NotFound(f"frame {number} does not exist (the instance has {total})")
    retrieve = archive_of(request).retrieve
    frames = []
    for number in numbers:
        with retrieve.open(inst) as stream:
            try:
                header = dcmread(stream, stop_before_pixels=True)
                # YBR_FULL_422 has no uncompressed layout of whole pixels: its frames go out
                # as RGB (as the instance does when converted); other colour spaces as
                # decoded, which is what the instance's metadata says they are.
                as_rgb = header.get("PhotometricInterpretation") == "YBR_FULL_422"
                array = decode_frame(stream, number - 1, raw=not as_rgb, header=header)
            except ImageShareError:  # over the pixel budget, busy: said as it is
                raise
            except Exception as exc:  # noqa: BLE001 - no decoder, or damaged pixel data
                raise NotAcceptable(
                    "the frames cannot be decoded; ask with transfer-syntax=*"
                ) from exc
        frames.append(
            np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes())
    return frames


def _pixel_parts(request: Request, inst: StoredInstance, numbers: list[int]) -> Response:
    """The given frames as a multipart/related answer, fully read before it is sent; one
    frame asked for in a single-part media type as that body alone (PS3.18 10.4.4)."""
    kind, content_type, data, single = _pixel_data(request, inst, numbers,
                                                   single=len(numbers) == 1)
    if single:
        return Response(data[0], media_type=content_type)
    boundary = new_boundary()
    # Each part names the frame it is (PS3.18 8.6: a payload's Content-Location).
    frames = _frame_urls(request, inst, numbers)
    return StreamingResponse(
        part_stream(boundary, ((content_type, d, url) for d, url in zip(data, frames,
                                                                         strict=True))),
        media_type=f'multipart/related; type="{kind}"; boundary={boundary}',
    )


def _pixel_data(request: Request, inst: StoredInstance, numbers: list[int],
                single: bool | None = None) -> tuple[str, str, list[bytes], bool]:
    """(media type, part Content-Type, each frame's bytes, single part?) of the given frames
    in the representation the Accept header asks for (406 when none can be answered;
    ``single`` as :func:`_pixel_representation` takes it)."""
    representation, one = _pixel_representation(request, inst, single)
    retrieve = archive_of(request).retrieve
    stored_media = COMPRESSED_MEDIA_TYPES.get(inst.transfer_syntax)
    if representation not in ("stored", "decoded"):  # uncompressed frames compressed
        kind = COMPRESSED_MEDIA_TYPES[representation]
        with retrieve.open(inst) as stream:
            header: Dataset = dcmread(stream, stop_before_pixels=True)
        if inst.transfer_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            frames = list(retrieve.frames(inst, numbers))  # frame numbers checked first
        else:  # stored compressed in another syntax: decoded here, then compressed again
            frames = _decoded_frames(request, inst, numbers)
            header = encoding_header(header)
        return kind, f"{kind}; transfer-syntax={representation}", [
            encode_frame(header, frame, representation) for frame in frames], one
    if representation == "stored" and stored_media:
        kind = stored_media
        content_type = f"{kind}; transfer-syntax={inst.transfer_syntax}"
        data = list(retrieve.frames(inst, numbers))
    else:
        kind = OCTET_STREAM
        content_type = f"{OCTET_STREAM}; transfer-syntax={ExplicitVRLittleEndian}"
        data = (list(retrieve.frames(inst, numbers)) if representation == "stored"
                else _decoded_frames(request, inst, numbers))
    return kind, content_type, data, one


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
    summary="WADO-RS: retrieve frames",
)
def retrieve_frames(
    request: Request, study: str, series: str, instance: str, frames: str, actor: Downloader
) -> Response:
    """Frames as stored (compressed bitstreams) or as uncompressed pixel bytes: the stored
    pixels, which with the metadata make the instance again, so for those who may download
    it (viewing alone gets rendered frames)."""
    numbers = _frame_numbers(frames)
    inst = _select(request, actor, "study.retrieve", study, series, instance,
                   right=DOWNLOAD, part=True)[0]
    if is_video(inst.transfer_syntax):
        raise NotAcceptable("frames of a video are not separable; retrieve the instance")
    _check_frame_count(numbers, inst)
    return _pixel_parts(request, inst, numbers)


def _wants_octet_stream(request: Request) -> None:
    for media_range in parse_accept(_accept(request)):
        media = media_range.media
        kind = media_range.param("type", OCTET_STREAM) if media == "multipart/related" else media
        if kind in (OCTET_STREAM, "*/*") or media in ("*/*", "multipart/*", "application/*"):
            if media_range.param("transfer-syntax", "") in ("", "*", ExplicitVRLittleEndian):
                return
    raise NotAcceptable('bulk data is available as multipart/related; '
                        'type="application/octet-stream"')


def _wants_single_part(request: Request) -> bool:
    """True when the most preferred Accept range is a bare application/octet-stream (with no
    transfer syntax, Explicit VR Little Endian or ``*``): bulk data then comes as one
    single-part body, uncompressed little endian (PS3.18 lets bulk data be single part)."""
    ranges = parse_accept(_accept(request))
    return bool(ranges) and ranges[0].media == OCTET_STREAM and ranges[0].param(
        "transfer-syntax", "") in ("", "*", ExplicitVRLittleEndian)


def _pixel_body(request: Request, inst: StoredInstance) -> Response:
    """Every frame's pixels in one application/octet-stream body, uncompressed little endian
    (native pixels as stored, others decoded), fully read before it is sent; the one byte
    range asked for (206), as for any bulk data."""
    numbers = list(range(1, inst.number_of_frames + 1))
    if inst.transfer_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        frames = list(archive_of(request).retrieve.frames(inst, numbers))
    else:
        frames = _decoded_frames(request, inst, numbers)
    return _bulk_answer(request, b"".join(frames),
                        f"{OCTET_STREAM}; transfer-syntax={ExplicitVRLittleEndian}", None)


def _byte_range(request: Request, length: int) -> tuple[int, int] | None | Response:
    """The one byte range (first, last) of a ``length``-byte value a Range header asks for
    (RFC 9110 14.1.2: ``bytes=a-b``, ``a-`` or ``-n``); None for the whole value (no Range,
    another unit, several ranges or a header this server does not read, which RFC 9110
    lets it ignore); a 416 answer when the range lies outside the value."""
    asked = request.headers.get("range", "").strip()
    if not asked.lower().startswith("bytes=") or "," in asked:
        return None
    low, dash, high = asked[6:].strip().partition("-")
    low, high = low.strip(), high.strip()
    if not dash or not (low.isdigit() or high.isdigit()) or (low and not low.isdigit()) or (
            high and not high.isdigit()) or len(low) > 18 or len(high) > 18:
        return None
    if low:
        first = int(low)
        last = min(int(high), length - 1) if high else length - 1
        if high and int(high) < first:
            return None  # an invalid range: ignored (RFC 9110 14.1.1)
    else:  # the last n bytes
        first, last = max(0, length - int(high)), length - 1
        if int(high) == 0:
            first = length
    if first >= length or first > last:
        return Response(status_code=416, headers={"Content-Range": f"bytes */{length}"})
    return first, last


def _bulk_answer(request: Request, value: bytes, content_type: str, boundary: str | None,
                 location: str | None = None) -> Response:
    """One bulk data value as a single-part body (``boundary`` None) or as the one part of
    multipart/related (its Content-Location ``location``, the BulkDataURI, when given), whole
    (200) or the byte range a Range header asks for (206, with Content-Range; 416 when it
    lies outside the value): PS3.18 retrieves only the bytes asked for."""
    wanted = _byte_range(request, len(value))
    if isinstance(wanted, Response):
        return wanted
    status, headers = 200, {"Accept-Ranges": "bytes"}
    if wanted is not None:
        first, last = wanted
        headers["Content-Range"] = f"bytes {first}-{last}/{len(value)}"
        value, status = value[first:last + 1], 206
    if boundary is None:
        return Response(value, status_code=status, media_type=content_type, headers=headers)
    kind = parse_media_type(content_type)[0]
    part: Part = (content_type, value) if location is None else (content_type, value, location)
    return StreamingResponse(
        part_stream(boundary, [part]), status_code=status, headers=headers,
        media_type=f'multipart/related; type="{kind}"; boundary={boundary}',
    )


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/bulkdata/{path:path}",
    summary="WADO-RS: retrieve bulk data",
)
def retrieve_bulkdata(
    request: Request, archive: ArchiveDep,
    study: str, series: str, instance: str, path: str, actor: Downloader
) -> Response:
    """A large attribute's value, named by the BulkDataURI the metadata gave (at any depth of
    sequences); pixel data as all frames, as stored (one part per compressed frame) or
    uncompressed (one part; video as its bitstream). In multipart/related, or as one
    application/octet-stream body when that is asked for first (uncompressed little
    endian); a Range header gets only the bytes it names (206) where the answer is one
    value. For those who may download the instance (with the metadata it makes the
    instance again; viewing alone gets rendered frames)."""
    path = path.upper().strip("/")
    if not path:  # .../bulkdata/ : the Instance Bulkdata resource
        return _all_bulk_data(request, actor, study, series, instance)
    inst = _select(request, actor, "study.retrieve", study, series, instance,
                   right=DOWNLOAD)[0]
    retrieve = archive.retrieve
    boundary = new_boundary()
    single = _wants_single_part(request)
    # Bulk data in multipart/related names the BulkDataURI the metadata gave for it
    # (PS3.18 10.4.3.3.5), so that a client can tell which value a part is.
    location = _bulkdata_url(_instance_url(request, inst), path)
    if path == "7FE00010":
        if not is_video(inst.transfer_syntax):
            if single:
                return _pixel_body(request, inst)
            kind, content_type, frames, _single = _pixel_data(
                request, inst, list(range(1, inst.number_of_frames + 1)))
            if kind == OCTET_STREAM or len(frames) == 1:
                # Uncompressed pixel data is one value (PS3.18: the bulk data element in
                # one part, as the metadata's BulkDataURI names it), of which a byte range
                # may be asked for; compressed frames come one part each.
                return _bulk_answer(request, b"".join(frames), content_type, boundary,
                                    location)
            # One part per compressed frame, each named by its frame's resource.
            urls = _frame_urls(request, inst, list(range(1, len(frames) + 1)))
            return StreamingResponse(
                part_stream(boundary, ((content_type, f, url)
                                       for f, url in zip(frames, urls, strict=True))),
                media_type=f'multipart/related; type="{kind}"; boundary={boundary}')
        kind = COMPRESSED_MEDIA_TYPES[inst.transfer_syntax]
        if not any(media_range.media in ("*/*", kind, "video/*") or (
                media_range.media == "multipart/related"
                and media_range.param("type", "") in ("*/*", kind, "video/*"))
                for media_range in parse_accept(_accept(request))):
            raise NotAcceptable(f"a video's pixel data is available as stored ({kind})")
        with retrieve.open(inst) as stream:
            ds = dcmread(stream)
        data = b"".join(generate_fragments(ds.PixelData))
        return _bulk_answer(request, data, f"{kind}; transfer-syntax={inst.transfer_syntax}",
                            boundary, location)
    _wants_octet_stream(request)
    _vr, value = retrieve.bulk_data(inst, path)
    return _bulk_answer(request, value, OCTET_STREAM, None if single else boundary, location)


# The Study, Series and Instance Bulkdata resources (PS3.18 10.4.1 and 10.4.3.3.5): every bulk
# data value of the instances, each part named (Content-Location) by the BulkDataURI their
# metadata gives it. Without the trailing slash too: a redirect to it would be one more
# request for every client, and some drop their credentials on the way.
@router.get("/studies/{study}/bulkdata", summary="WADO-RS: bulk data of a study")
@router.get("/studies/{study}/bulkdata/", include_in_schema=False)
def study_bulkdata(request: Request, study: str, actor: Downloader) -> Response:
    """Every bulk data value (pixel data included) of every instance of the study."""
    return _all_bulk_data(request, actor, study)


@router.get("/studies/{study}/series/{series}/bulkdata",
            summary="WADO-RS: bulk data of a series")
@router.get("/studies/{study}/series/{series}/bulkdata/", include_in_schema=False)
def series_bulkdata(request: Request, study: str, series: str, actor: Downloader) -> Response:
    """Every bulk data value (pixel data included) of every instance of the series."""
    return _all_bulk_data(request, actor, study, series)


@router.get(f"{INSTANCE}/bulkdata", summary="WADO-RS: bulk data of an instance")
def instance_bulkdata(request: Request, study: str, series: str, instance: str,
                      actor: Downloader) -> Response:
    """Every bulk data value (pixel data included) of the instance."""
    return _all_bulk_data(request, actor, study, series, instance)


PIXEL_DATA = "7FE00010"


def _check_bulk_parts(request: Request) -> None:
    """Refuse (406), before anything is selected, an Accept header that allows no
    multipart/related answer of application/octet-stream parts: several values come in
    several parts."""
    for media_range in parse_accept(_accept(request)):
        media = media_range.media
        multipart = media in ("*/*", "multipart/*") or (
            media == "multipart/related"
            and media_range.param("type", OCTET_STREAM) in (OCTET_STREAM, "*/*"))
        if multipart and media_range.param("transfer-syntax", "") in (
                "", "*", ExplicitVRLittleEndian):
            return
    raise NotAcceptable("the bulk data of a study, series or instance is available as "
                        'multipart/related; type="application/octet-stream" (one part per '
                        "value); one value alone at the BulkDataURI the metadata gives")


def _bulk_paths(request: Request, inst: StoredInstance, url: str) -> list[str]:
    """The paths of the instance's bulk data values, as its metadata names them."""
    paths: list[str] = []

    def named(path: str) -> str:
        paths.append(path)
        return _bulkdata_url(url, path)

    try:
        archive_of(request).retrieve.header_json(inst.blob_key, named)
    except Exception as exc:  # noqa: BLE001 - as the metadata: an unreadable file has none
        log.warning("instance %s: stored header unreadable (%s); no bulk data sent",
                    inst.sop_uid, type(exc).__name__)
        return []
    return paths


def _check_pixel_parts(request: Request, inst: StoredInstance) -> None:
    """406 (before the answer starts) when the instance's pixel data cannot be sent in any
    representation the Accept header allows."""
    if is_video(inst.transfer_syntax):
        kind = COMPRESSED_MEDIA_TYPES[inst.transfer_syntax]
        if not any(m.media in ("*/*", "multipart/*") or (
                m.media == "multipart/related" and m.param("type", "") in ("*/*", kind))
                for m in parse_accept(_accept(request))):
            raise NotAcceptable(f"a video's pixel data is available as stored ({kind})")
        return
    _pixel_representation(request, inst, single=False)


def _pixel_bulk_parts(request: Request, inst: StoredInstance, location: str
                      ) -> Iterator[Part]:
    """The instance's pixel data as parts of a bulk data answer: one value (uncompressed, or
    a video's bitstream, or a single compressed frame) named by its BulkDataURI, or one part
    per compressed frame named by the frame's resource (as at the BulkDataURI itself)."""
    if is_video(inst.transfer_syntax):
        kind = COMPRESSED_MEDIA_TYPES[inst.transfer_syntax]
        with archive_of(request).retrieve.open(inst) as stream:
            ds = dcmread(stream)
        yield (f"{kind}; transfer-syntax={inst.transfer_syntax}",
               b"".join(generate_fragments(ds.PixelData)), location)
        return
    numbers = list(range(1, inst.number_of_frames + 1))
    kind, content_type, frames, _single = _pixel_data(request, inst, numbers, single=False)
    if kind == OCTET_STREAM or len(frames) == 1:
        yield content_type, b"".join(frames), location
        return
    urls = _frame_urls(request, inst, numbers)
    yield from ((content_type, f, u) for f, u in zip(frames, urls, strict=True))


def _all_bulk_data(request: Request, actor: Actor, study: str, series: str | None = None,
                   instance: str | None = None) -> Response:
    """The Study, Series or Instance Bulkdata resource: multipart/related, a part for each
    bulk data value of each instance, in the order of the instances and of their metadata.
    For those who may download the instances (with the metadata they make them again).
    Every representation is settled, and the first value made, before the first byte is
    sent (what cannot be answered is refused with its status); a later value that cannot be
    made (damaged pixel data) is left out rather than cutting the body off. No value at all
    is 200 with an empty payload (as a search with no match)."""
    _check_bulk_parts(request)
    found = _select(request, actor, "study.retrieve", study, series, instance, right=DOWNLOAD)
    base = _base(request)
    plan = []
    for inst in found:
        url = _instance_url(request, inst, base)
        paths = _bulk_paths(request, inst, url)
        if PIXEL_DATA in paths:
            _check_pixel_parts(request, inst)
        plan.append((inst, url, paths))
    retrieve = archive_of(request).retrieve
    boundary = new_boundary()
    media_type = f'multipart/related; type="{OCTET_STREAM}"; boundary={boundary}'
    if not any(paths for _inst, _url, paths in plan):
        return Response(b"", media_type=media_type)

    def value(inst: StoredInstance, url: str, path: str) -> list[Part]:
        """The parts of one value, made whole before any of it is sent."""
        location = _bulkdata_url(url, path)
        if path == PIXEL_DATA:
            return list(_pixel_bulk_parts(request, inst, location))
        return [(OCTET_STREAM, retrieve.bulk_data(inst, path)[1], location)]

    wanted = [(inst, url, path) for inst, url, paths in plan for path in paths]
    # The first value is made before the answer starts: one that cannot be sent (pixels that
    # do not decode, a decoder busy, a file gone) is still answered with its status.
    first = value(*wanted[0])

    def parts() -> Iterator[Part]:
        yield from first
        for inst, url, path in wanted[1:]:
            try:
                made = value(inst, url, path)
            except Exception as exc:  # noqa: BLE001 - the body has started: left out, not cut
                # Once the answer has started it can only go on or be cut off: the value is
                # left out (as the metadata of an unreadable file leaves it out) and the
                # body stays whole; its BulkDataURI is then the one without a part.
                log.warning("instance %s: bulk data value %s left out of the answer (%s)",
                            inst.sop_uid, path, type(exc).__name__)
                continue
            yield from made

    return StreamingResponse(part_stream(boundary, parts()), media_type=media_type)


def _rendered_media(request: Request) -> tuple[str, str]:
    """('single'|'multipart', image media type) from the Accept header; 406 when none of
    image/jpeg, image/png, image/gif (alone or in multipart/related) is acceptable."""
    for media_range in parse_accept(_accept(request), default="image/jpeg"):
        media = media_range.media
        if media == "multipart/related":
            kind = media_range.param("type", "image/jpeg")
            for candidate in RENDERED_MEDIA_TYPES:
                if matches(MediaRange(kind), candidate):
                    return "multipart", candidate
            continue
        for candidate in RENDERED_MEDIA_TYPES:
            if matches(media_range, candidate):
                return "single", candidate
    raise NotAcceptable("rendered images are available as image/jpeg, image/png or image/gif, "
                        "alone or in multipart/related")


def _quality(request: Request, name: str) -> int | None:
    """The JPEG quality a rendering parameter gives: a whole number from 1 to 100, None when
    absent (the default); anything else is refused with the reason (never quietly
    clamped)."""
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        value = 0
    if not 1 <= value <= 100:
        raise InvalidQuery(f"{name} must be a whole number from 1 to 100")
    return value


def _render_parameters(request: Request, thumbnail: bool
                       ) -> tuple[Window | None, tuple[int, int] | None, int | None,
                                  Region | None]:
    """(window, viewport, quality, source region) of a WADO-RS rendered or thumbnail
    request; InvalidQuery with the reason for a value that cannot be used (PS3.18 rendered
    query parameters: ``viewport=vw,vh[,sx,sy,sw,sh]`` shows the source rectangle only)."""
    window = parse_window(request.query_params.get("window"))
    viewport = parse_viewport(request.query_params.get("viewport"))
    source = parse_viewport_source(request.query_params.get("viewport"))
    quality = _quality(request, "quality")
    if thumbnail and viewport is None:
        viewport = (128, 128)
    return window, viewport, quality, source


def _check_rendering(request: Request, thumbnail: bool = False, video: bool = False) -> None:
    """Refuse, before anything is selected (and audited as viewed), a rendering whose
    parameters or Accept header cannot be answered (a video instance's own answer, video/mp4,
    may be acceptable where ``video`` says so)."""
    _render_parameters(request, thumbnail)
    if not (video and _wants_video(request)):
        _rendered_media(request)


def render_options(request: Request, thumbnail: bool, media: str | None = None
                   ) -> RenderOptions:
    """How to render, from the request's Accept header and window/viewport/quality."""
    media = media or _rendered_media(request)[1]
    window, viewport, quality, source = _render_parameters(request, thumbnail)
    return RenderOptions(media_type=media, window=window, viewport=viewport, quality=quality,
                         region=source)


def _image_parts(media: str, images: list[bytes]) -> Response:
    boundary = new_boundary()
    body = b"".join(f"--{boundary}\r\nContent-Type: {media}\r\n\r\n".encode() + image
                    + b"\r\n" for image in images) + f"--{boundary}--\r\n".encode()
    return Response(body, media_type=f'multipart/related; type="{media}"; boundary={boundary}')


def _render(
    request: Request, inst: StoredInstance, frame: int, thumbnail: bool = False
) -> Response:
    """One frame of one instance as a single image (every frame when an animated GIF or a
    multipart answer is asked for and ``frame`` is 0)."""
    shape, media = _rendered_media(request)
    options = render_options(request, thumbnail, media)
    retrieve = archive_of(request).retrieve
    with retrieve.open(inst) as stream:
        if is_video(inst.transfer_syntax) and shape == "single":  # its first picture
            _check_playable(inst)
            return Response(render_video_still(stream, options), media_type=media)
        if shape == "multipart":
            images = render_frames(stream, None if frame == 0 else [frame - 1], options)
            return _image_parts(media, images)
        if frame == 0 and media == "image/gif":
            return Response(render_animation(stream, options), media_type=media)
        data = render_frame(stream, max(frame, 1) - 1, options)
    return Response(data, media_type=media)


MAX_PLAYED_BYTES = 256 << 20  # a video is read whole to be played or shown; larger: download


def _check_playable(inst: StoredInstance) -> None:
    """Refuse, before reading it, a video too large to be played here."""
    if inst.size > MAX_PLAYED_BYTES:
        raise NotAcceptable(f"this video is larger than {MAX_PLAYED_BYTES >> 20} MB and is not "
                            "played here; retrieve the instance to watch it")


def render_stored(
    request: Request, inst: StoredInstance, frame: int, thumbnail: bool = False
) -> Response:
    """One frame of a stored instance rendered as the request asks (for pages that chose
    the instance themselves, such as the inbox viewer); a video, when video/mp4 is
    acceptable, as an MP4 file a browser plays."""
    if not thumbnail and is_video(inst.transfer_syntax) and _wants_video(request):
        stream = archive_of(request).retrieve.open(inst)
        try:
            span = mp4_span(stream) if stream.seekable() else None
        except Exception:  # noqa: BLE001 - an odd layout is played the other way below
            span = None
        if span is not None:  # streamed from the store as it lies, in ranges on request
            return _ranged_video(request, stream, *span)
        stream.close()
        _check_playable(inst)
        with archive_of(request).retrieve.open(inst) as stream:
            data = playable_video(stream, inst.transfer_syntax)
        return Response(data, media_type="video/mp4", headers={"Accept-Ranges": "none"})
    return _render(request, inst, frame, thumbnail)


def _ranged_video(request: Request, stream: BinaryIO, start: int, length: int) -> Response:
    """The MP4 file lying at ``start`` of ``stream``: whole, or the one byte range asked for
    (206; 416 when it lies outside; several ranges are answered whole). Its extent is known
    before the first byte goes out."""
    first, last, status = 0, length - 1, 200
    asked = request.headers.get("range", "")
    if asked.startswith("bytes=") and "," not in asked:
        low, _, high = asked[6:].strip().partition("-")
        if low.isdigit() and (high.isdigit() or not high):
            first, last = int(low), min(int(high) if high else length - 1, length - 1)
        elif not low and high.isdigit() and int(high) > 0:
            first, last = max(0, length - int(high)), length - 1
        else:
            first = length  # not a range this server understands: refused below
        if first > last or first >= length:
            stream.close()
            return Response(status_code=416, headers={"Content-Range": f"bytes */{length}"})
        status = 206
    headers = {"Accept-Ranges": "bytes", "Content-Length": str(last - first + 1)}
    if status == 206:
        headers["Content-Range"] = f"bytes {first}-{last}/{length}"

    def chunks() -> Iterator[bytes]:
        try:
            stream.seek(start + first)
            left = last - first + 1
            while left > 0:
                chunk = stream.read(min(1 << 20, left))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk
        finally:
            stream.close()

    return StreamingResponse(chunks(), status_code=status, media_type="video/mp4",
                             headers=headers)


def _render_selection(request: Request, found: list[StoredInstance]) -> Response:
    """A study or series rendered: its representative image (the middle one, at its middle
    frame for a cine), or in multipart/related the first frame of every image."""
    shape, media = _rendered_media(request)
    options = render_options(request, False, media)
    retrieve = archive_of(request).retrieve
    if shape == "single":
        chosen = _renderable(found)
        with retrieve.open(chosen) as stream:
            data = render_frame(stream, (chosen.number_of_frames - 1) // 2, options)
        return Response(data, media_type=media)
    images = []
    for inst in [i for i in found if not is_video(i.transfer_syntax)]:
        try:
            with retrieve.open(inst) as stream:
                images.append(render_frame(stream, 0, options))
        except (NotFound, NotAcceptable) as exc:  # not an image, or not decodable here
            log.info("instance %s left out of a rendered selection: %s", inst.sop_uid, exc)
    if not images:
        raise NotFound("nothing in this selection can be rendered")
    return _image_parts(media, images)


@router.get("/studies/{study}/rendered", summary="WADO-RS: rendered study")
def rendered_study(request: Request, study: str, actor: Reader) -> Response:
    """The study as an image (its representative image), or every image's first frame in
    multipart/related."""
    _check_rendering(request)
    return _render_selection(request, _select(request, actor, "study.view", study))


@router.get("/studies/{study}/series/{series}/rendered", summary="WADO-RS: rendered series")
def rendered_series(request: Request, study: str, series: str, actor: Reader) -> Response:
    """The series as an image (its middle image), or every image's first frame in
    multipart/related."""
    _check_rendering(request)
    return _render_selection(request, _select(request, actor, "study.view", study, series))


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/rendered",
    summary="WADO-RS: rendered instance",
)
def rendered_instance(
    request: Request, study: str, series: str, instance: str, actor: Reader
) -> Response:
    """The first frame as JPEG/PNG, windowed by ``window=center,width``; every frame as an
    animated GIF (image/gif) or in multipart/related; a video as video/mp4 (MPEG-4 AVC or
    HEVC, as stored, in an MP4 file a browser plays)."""
    _check_rendering(request, video=True)
    inst = _select(request, actor, "study.view", study, series, instance, part=True)[0]
    return render_stored(request, inst, 0)


def _wants_video(request: Request) -> bool:
    """True when video/mp4 is preferred to a still image (a browser's video element asks
    for */*; an image element prefers image/*)."""
    for media_range in parse_accept(_accept(request), default="*/*"):
        if media_range.media in ("video/mp4", "video/*", "*/*"):
            return True
        if media_range.media == "image/*" or media_range.media in RENDERED_MEDIA_TYPES:
            return False
    return False


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/rendered",
    summary="WADO-RS: rendered frames",
)
def rendered_frame(
    request: Request, archive: ArchiveDep,
    study: str, series: str, instance: str, frame: str, actor: Reader
) -> Response:
    """One frame as JPEG/PNG/GIF; several (a comma-separated list) in multipart/related."""
    numbers = _frame_numbers(frame)
    _check_rendering(request)
    shape, media = _rendered_media(request)
    if len(numbers) != 1 and shape != "multipart":
        raise NotAcceptable("several frames are rendered in multipart/related only")
    inst = _select(request, actor, "study.view", study, series, instance, part=True)[0]
    _check_frame_count(numbers, inst)
    if len(numbers) == 1:
        return _render(request, inst, numbers[0])
    options = render_options(request, False, media)
    with archive.retrieve.open(inst) as stream:
        images = render_frames(stream, [n - 1 for n in numbers], options)
    return _image_parts(media, images)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/thumbnail",
    summary="WADO-RS: instance thumbnail",
)
def instance_thumbnail(
    request: Request, study: str, series: str, instance: str, actor: Reader
) -> Response:
    """A small rendering of the instance's first (or middle, for cine) frame."""
    _check_rendering(request, thumbnail=True)
    inst = _select(request, actor, "study.view", study, series, instance, part=True)[0]
    return _render(request, inst, max(1, (inst.number_of_frames + 1) // 2), thumbnail=True)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/thumbnail",
    summary="WADO-RS: frame thumbnail",
)
def frame_thumbnail(
    request: Request, study: str, series: str, instance: str, frame: str, actor: Reader
) -> Response:
    """A small rendering of the first frame of the list (PS3.18 10.4.1: the frames'
    thumbnail is one image)."""
    numbers = _frame_numbers(frame)
    _check_rendering(request, thumbnail=True)
    inst = _select(request, actor, "study.view", study, series, instance, part=True)[0]
    _check_frame_count(numbers, inst)
    return _render(request, inst, numbers[0], thumbnail=True)


@router.get("/studies/{study}/series/{series}/thumbnail", summary="WADO-RS: series thumbnail")
def series_thumbnail(request: Request, study: str, series: str, actor: Reader) -> Response:
    """A small rendering of the series' middle image."""
    _check_rendering(request, thumbnail=True)
    found = _select(request, actor, "study.view", study, series, part=True)
    return _render(request, _renderable(found), 1, thumbnail=True)


@router.get("/studies/{study}/thumbnail", summary="WADO-RS: study thumbnail")
def study_thumbnail(request: Request, study: str, actor: Reader) -> Response:
    """A small rendering of an image of the study."""
    _check_rendering(request, thumbnail=True)
    found = _select(request, actor, "study.view", study, part=True)
    return _render(request, _renderable(found), 1, thumbnail=True)


def _renderable(found: list[StoredInstance]) -> StoredInstance:
    """The middle image of a selection (else its middle video, shown by its first picture)."""
    images = [i for i in found if not is_video(i.transfer_syntax)] or found
    if not images:
        raise NotFound("nothing in this selection can be rendered")
    return images[len(images) // 2]


# -- STOW-RS ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class StowReason:
    """A Failure Reason (0008,1197) or Warning Reason (0008,1196) of a STOW-RS answer
    (PS3.18 I.2), with what it means here."""

    code: int
    kind: str
    meaning: str
    when: str


FAILURE_CANNOT_UNDERSTAND = StowReason(
    0xC000, "failure", "Error: Cannot understand",
    "the part is not a DICOM Part 10 file, a required UID is missing or invalid, the data "
    "set or its pixel data is damaged, or the part's Content-Type is not application/dicom "
    "(application/octet-stream included; nothing of such a part is stored)")
FAILURE_STUDY_MISMATCH = StowReason(
    0xA900, "failure", "Error: Data Set does not match",
    "the instance belongs to another study than the one in the request URL")
FAILURE_CONFLICT = StowReason(
    0xA910, "failure", "Error: conflicts with stored data",
    "the study belongs to another patient, or the instance is stored in another series or "
    "study")
FAILURE_DUPLICATE = StowReason(
    0x0111, "failure", "Duplicate SOP Instance",
    "an instance with this SOP Instance UID but different content is stored: the stored copy "
    "was kept (ErrorComment 'stored copy kept'); nothing of the part was stored")
FAILURE_PROCESSING = StowReason(
    0x0110, "failure", "Processing failure",
    "the archive could not store the part (storage or index unavailable); nothing was stored")
FAILURE_OUT_OF_RESOURCES = StowReason(
    0xA700, "failure", "Refused: Out of resources",
    "the archive's disk is full or below its free-space floor; nothing was stored (the "
    "answer is 507 when no part was stored)")
FAILURE_TRANSFER_SYNTAX = StowReason(
    0xC122, "failure", "Referenced Transfer Syntax not supported",
    "the part's File Meta Information names a transfer syntax that is not one of the "
    "standard's (nothing of the part is stored)")
STOW_REASONS: tuple[StowReason, ...] = (
    FAILURE_CANNOT_UNDERSTAND, FAILURE_TRANSFER_SYNTAX, FAILURE_STUDY_MISMATCH,
    FAILURE_CONFLICT, FAILURE_DUPLICATE, FAILURE_PROCESSING, FAILURE_OUT_OF_RESOURCES,
)


async def _receive(request: Request, sink: PartSink) -> None:
    try:
        async for chunk in request.stream():
            sink.feed(chunk)
    finally:
        sink.close()


def _bulkdata_url(instance_url: str, path: str) -> str:
    return f"{instance_url}/bulkdata/{path}"


def _instance_url(request: Request, inst: StoredInstance, base: str | None = None) -> str:
    """The WADO-RS URL of a stored instance (under ``base``, else this server's root)."""
    return (f"{base or _base(request)}/studies/{inst.study_uid}/series/{inst.series_uid}"
            f"/instances/{inst.sop_uid}")


def _frame_urls(request: Request, inst: StoredInstance, numbers: list[int]) -> list[str]:
    """The URL of each of the instance's frames ``numbers`` (1-based)."""
    url = _instance_url(request, inst)
    return [f"{url}/frames/{n}" for n in numbers]


def _part_answer(base: str, part: Any, result: Any, unknown_syntax: bool = False
                 ) -> tuple[bool, Dataset]:
    """One STOW-RS part's outcome: (stored?, its ReferencedSOPSequence or FailedSOPSequence
    item), from what the ingest gave for it (a result or an error); ``unknown_syntax``: its
    File Meta Information names a transfer syntax the standard does not have."""
    item = Dataset()
    if isinstance(result, Exception):
        # A typed error answers its own DICOM status (imageshare.domain.errors), which is
        # one of STOW_REASONS; anything else is a processing failure.
        if isinstance(result, ImageShareError) and result.dicom_status is not None:
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = (
                (result.sop_class_uid, result.sop_instance_uid)
                if isinstance(result, (InvalidInstance, ConflictingInstance))
                else _uids_of(part.path))
            item.FailureReason = result.dicom_status
            item.ErrorComment = error_comment(str(result))
            if unknown_syntax and result.dicom_status == FAILURE_CANNOT_UNDERSTAND.code:
                # not understood because its transfer syntax is not one of the standard's
                item.FailureReason = FAILURE_TRANSFER_SYNTAX.code
                item.ErrorComment = "unknown transfer syntax"
            return False, item
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = "", ""
        item.FailureReason = FAILURE_PROCESSING.code
        item.ErrorComment = "the archive could not store the instance"
        return False, item
    item.ReferencedSOPClassUID = result.sop_class_uid
    item.ReferencedSOPInstanceUID = result.sop_instance_uid
    if result.outcome == "kept_first":
        # The part's content was not stored: a failure, whose reason names the kept copy.
        item.FailureReason = FAILURE_DUPLICATE.code
        item.ErrorComment = "stored copy kept: this UID is stored with other content"
        return False, item
    if result.outcome == "held":
        # Stored, but held in the inbox for reconciliation: no retrieval finds it until it
        # is accepted, so no Retrieve URL points at it (the study's neither).
        return True, item
    item.RetrieveURL = (
        f"{base}/studies/{result.study_uid}/series/{result.series_uid}/instances/"
        f"{result.sop_instance_uid}"
    )
    return True, item


def _stow_wants_xml(request: Request) -> bool:
    """The answer's form: DICOM JSON (default) or DICOM XML; 406 otherwise (asked before
    anything is stored)."""
    for media_range in parse_accept(_accept(request)):
        if media_range.media in (DICOM_JSON, "application/json", "*/*", "application/*"):
            return False
        if media_range.media == DICOM_XML:
            return True
    raise NotAcceptable(f"the answer to a store is available as {DICOM_JSON} or {DICOM_XML}")


def _is_dicom(part: ReceivedPart) -> bool:
    """Is the part application/dicom? One without a Content-Type is taken as the request's
    type (application/dicom); any other type, application/octet-stream included, fails with
    0xC000 (FAILURE_CANNOT_UNDERSTAND) and is not stored."""
    media, _ = parse_media_type(part.content_type or DICOM)
    return media == DICOM


def _answers(
    base: str, parts: list[ReceivedPart], handed: list[int], stored: list[Any],
    unknown_syntax: set[int] | frozenset[int] = frozenset(),
) -> list[tuple[bool, Dataset]]:
    """Per part (stored?, its ReferencedSOPSequence or FailedSOPSequence item), from what the
    batch gave for the parts numbered ``handed``; the others were not application/dicom.
    ``unknown_syntax``: the numbers of parts in a transfer syntax the standard lacks."""
    results: list[Any] = [None] * len(parts)
    for number, result in zip(handed, stored, strict=True):
        results[number] = result
    for number, part in enumerate(parts):
        if results[number] is None:
            media, _ = parse_media_type(part.content_type)
            results[number] = InvalidInstance(f"parts must be application/dicom, not {media}",
                                              *_uids_of(part.path))
    return [_part_answer(base, part, result, number in unknown_syntax)
            for number, (part, result) in enumerate(zip(parts, results, strict=True))]


def _store_part_batch(
    archive: Any, base: str, parts: list[ReceivedPart], actor: Actor, study: str | None
) -> list[tuple[bool, Dataset]]:
    """Store parts already received as one batch (``StoreBatch``); per part (stored?, its
    ReferencedSOPSequence or FailedSOPSequence item)."""
    batch = archive.ingest.begin_batch(actor, expected_study=study)
    handed = [number for number, part in enumerate(parts) if _is_dicom(part)]
    unknown = {number for number in handed if _unknown_syntax(parts[number].path)}
    for number in handed:
        batch.add(parts[number].path)
    return _answers(base, parts, handed, batch.finish(), unknown)


def _store_parts(
    request: Request, sink: PartSink, batch: Any, handed: list[int], xml: bool = False,
    unknown_syntax: set[int] | frozenset[int] = frozenset(),
) -> Response:
    if not sink.parts:
        raise ImageShareError("the request holds no DICOM parts")
    outcomes = _answers(_base(request), sink.parts, handed, batch.finish(), unknown_syntax)
    stored = [item for ok, item in outcomes if ok]
    failed = [item for ok, item in outcomes if not ok]
    answer = Dataset()
    # Retrieve URL (type 2) names the study only when something of it was stored.
    studies = {str(i.RetrieveURL).split("/series/")[0] for i in stored if "RetrieveURL" in i}
    answer.RetrieveURL = studies.pop() if len(studies) == 1 else ""
    if stored:
        answer.ReferencedSOPSequence = stored
    if failed:
        answer.FailedSOPSequence = failed
    status = 200 if not failed else (202 if stored else 409)
    if not stored and any(i.FailureReason == FAILURE_OUT_OF_RESOURCES.code for i in failed):
        status = 507  # nothing stored for lack of room: the reason is in each ErrorComment
    body = answer.to_json_dict()
    if xml:
        return Response(native_dicom_xml(body), status_code=status, media_type=DICOM_XML)
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON)


def _unknown_syntax(path: Any) -> str | None:
    """The transfer syntax a received part's File Meta Information names when it is not one
    of the standard's (the reason the part could not be read); else None."""
    try:
        syntax = str(read_file_meta_info(path).get("TransferSyntaxUID", "") or "").strip()
    except Exception:  # noqa: BLE001 - no readable File Meta Information: another reason
        return None
    return syntax if syntax and not is_known_syntax(syntax) else None


def _uids_of(path: Any) -> tuple[str, str]:
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID",
                                                                  "SOPInstanceUID"])
        return str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", ""))
    except Exception:  # noqa: BLE001 - unreadable parts have no UIDs to report
        return "", ""


async def _stow(request: Request, actor: Actor, study: str | None) -> Response:
    xml = _stow_wants_xml(request)
    media, params = parse_media_type(request.headers.get("content-type", ""))
    if media != "multipart/related" or "boundary" not in params:
        raise UnsupportedMediaType(
            'send multipart/related; type="application/dicom" with a boundary')
    if params.get("type", "application/dicom") not in ("application/dicom",):
        raise UnsupportedMediaType("only application/dicom parts are accepted")
    archive = archive_of(request)
    archive.ingest.ensure_room(actor)  # below the free-space floor: 507 before reading the body
    # The parts are stored as one batch (imageshare.archive.ingest.StoreBatch): each is moved
    # into the blob store, fsynced and parsed as soon as it has arrived, while the next ones
    # arrive; then all are indexed in one transaction (a failing part alone rolled back) and
    # audited in one write. A bad part is refused with its reason and changes nothing else.
    batch = archive.ingest.begin_batch(actor, expected_study=study)
    handed: list[int] = []  # the numbers of the parts given to the batch
    unknown: set[int] = set()  # of those, the ones in a transfer syntax nobody knows

    def arrived(part: ReceivedPart) -> None:
        if _is_dicom(part):
            handed.append(len(sink.parts) - 1)
            if _unknown_syntax(part.path):  # read before the batch takes the file
                unknown.add(handed[-1])
            batch.add(part.path)

    sink = PartSink(params["boundary"], archive.ingest.staging_file,
                    max_parts=archive.settings.stow_max_parts, on_part=arrived)
    try:
        await _receive(request, sink)
        return await run_in_threadpool(_store_parts, request, sink, batch, handed, xml,
                                       unknown)
    finally:
        if not batch.finishing:  # a body that was cut, malformed or too large leaves nothing
            await run_in_threadpool(batch.abandon)
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


ANONYMIZE_REFUSED = (
    "anonymize is not carried out here: WADO-URI serves the stored, identifiable object. "
    "De-identified copies are made through an export (POST /api/studies/{study}/exports, "
    "de-identified with a profile by default), which is audited as such")


def _wado_uri_render_options(request: Request, content_type: str) -> RenderOptions:
    """How WADO-URI renders: ``windowCenter`` and ``windowWidth`` (both or neither, linear),
    ``region`` (left,top,right,bottom as fractions of the image, cut out before scaling),
    ``rows``/``columns`` and ``imageQuality`` (1 to 100); InvalidQuery with the reason for
    a value that cannot be used (PS3.18 WADO-URI)."""
    params = request.query_params
    center, width = params.get("windowCenter"), params.get("windowWidth")
    if (center is None) != (width is None):
        raise InvalidQuery("windowCenter and windowWidth are given together or not at all")
    window = window_of(center, width) if center is not None and width is not None else None
    rows, columns = _int_param(request, "rows", None), _int_param(request, "columns", None)
    # Only rows or only columns given: the other follows the image's aspect ratio.
    viewport = (columns or 8192, rows or 8192) if (rows or columns) else None
    return RenderOptions(media_type=content_type, window=window, viewport=viewport,
                         quality=_quality(request, "imageQuality"),
                         region=parse_region(params.get("region")))


_WADO_URI_TYPES = ("application/dicom", "image/jpeg", "image/png")


def _wado_uri_content_type(value: str | None) -> str:
    """The media type a WADO-URI ``contentType`` asks for: its most preferred entry that
    is offered (PS3.18 WADO-URI: a list of media types, with q values, wildcards
    matching the images); image/jpeg when absent, 406 when none is offered."""
    for media_range in parse_accept(value, default="image/jpeg"):
        if media_range.media == "application/dicom":
            return "application/dicom"
        for candidate in _WADO_URI_TYPES[1:]:
            if matches(media_range, candidate):
                return candidate
    raise NotAcceptable("contentType must be application/dicom, image/jpeg or image/png")


@router.get("/wado", summary="WADO-URI: retrieve one object")
def wado_uri(request: Request, archive: ArchiveDep, actor: Reader) -> Response:
    """``requestType=WADO&studyUID=&seriesUID=&objectUID=``; contentType (a list, with q
    values) application/dicom (``transferSyntax``, Explicit VR Little Endian when absent)
    or image/jpeg, image/png (``frameNumber`` from 1, ``windowCenter``, ``windowWidth``,
    ``region``, ``rows``, ``columns``, ``imageQuality``). ``anonymize`` is refused (400,
    audited): nothing is de-identified here.
    Every parameter is checked before anything is selected (and audited as retrieved)."""
    params = request.query_params
    if params.get("requestType") != "WADO":
        raise InvalidQuery("requestType must be WADO")
    uids = [params.get(name, "") for name in ("studyUID", "seriesUID", "objectUID")]
    if not all(uids):
        raise InvalidQuery("studyUID, seriesUID and objectUID are required")
    if "anonymize" in params:
        # Ignoring it would hand identifiable data to a caller who believes it is not.
        refuse(request, actor, EXPORT_DEIDENTIFIED, UnsupportedParameter(ANONYMIZE_REFUSED),
               uids[0])
    content_type = _wado_uri_content_type(params.get("contentType"))
    if content_type == "application/dicom":
        # PS3.18 WADO-URI: without transferSyntax, Explicit VR Little Endian.
        wanted = params.get("transferSyntax") or ExplicitVRLittleEndian
        if not _producible(wanted, None):
            raise NotAcceptable(f"transfer syntax {wanted} is not offered")
        authorise_also(request, actor, STUDY_DOWNLOAD, uids[0])
        inst = _select(request, actor, "study.retrieve", uids[0], uids[1], uids[2],
                       right=DOWNLOAD)[0]
        if not _producible(wanted, [inst]):
            raise NotAcceptable(f"transfer syntax {wanted} is not offered")
        _actual, body = _instance_body(request, inst, _planned_syntax(inst, wanted))
        data = body if isinstance(body, bytes) else file_chunks(body)
        return StreamingResponse(iter([data]) if isinstance(data, bytes) else data,
                                 media_type="application/dicom")
    options = _wado_uri_render_options(request, content_type)
    number = _int_param(request, "frameNumber", 1)
    if not number:
        raise InvalidQuery("frameNumber starts at 1")
    frame = number - 1
    inst = _select(request, actor, "study.retrieve", uids[0], uids[1], uids[2], right=VIEW)[0]
    if is_video(inst.transfer_syntax):  # its first picture, as WADO-RS renders it
        if frame:
            raise NotAcceptable("the frames of a video are not separable: ask for frame 1, "
                                "its first picture, or retrieve the instance")
        _check_playable(inst)
        with archive.retrieve.open(inst) as stream:
            return Response(render_video_still(stream, options), media_type=content_type)
    with archive.retrieve.open(inst) as stream:
        data = render_frame(stream, frame, options)
    return Response(data, media_type=content_type)
