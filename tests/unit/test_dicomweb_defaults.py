"""DICOMweb defaults and refusals as PS3.18 sets them: the default transfer syntax of WADO-RS
and WADO-URI, WADO-URI's anonymize parameter, STOW-RS parts that are not application/dicom,
the rendering parameters, HEAD, and bulk data as one application/octet-stream body."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from imageshare.domain.actors import cli_actor
from tests.factory import ct_series
from tests.multipart_helpers import encode_multipart, parse_multipart

ACTOR = cli_actor()
RLE = str(RLELossless)
EXPLICIT_LE = str(ExplicitVRLittleEndian)
MULTIPART_DICOM = 'multipart/related; type="application/dicom"'


def _uids(path: Path) -> tuple[str, str, str]:
    ds = dcmread(path, stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def _as_rle(path: Path) -> Path:
    """The instance at ``path`` re-encoded as RLE Lossless (same UIDs), beside it."""
    ds = dcmread(path)
    ds.compress(RLELossless, generate_instance_uid=False)
    target = path.with_suffix(".rle.dcm")
    ds.save_as(target, enforce_file_format=True)
    return target


@pytest.fixture
def rle(archive, tmp_path) -> dict[str, list[Path]]:
    """Two CT slices of one series stored as RLE Lossless, and their uncompressed originals."""
    originals = ct_series(tmp_path / "ct", count=2, patient_id="RLE1")
    compressed = [_as_rle(p) for p in originals]
    for path in compressed:
        archive.ingest.store_copy(path, ACTOR)
    return {"originals": originals, "stored": compressed}


def _instance_url(path: Path) -> str:
    study, series, sop = _uids(path)
    return f"/dicomweb/studies/{study}/series/{series}/instances/{sop}"


def _get_without_accept(client, url: str, **params: str):
    """GET with no Accept header at all (httpx would otherwise send ``*/*``)."""
    request = client.build_request("GET", url, params=params)
    del request.headers["accept"]
    return client.send(request)


def _assert_explicit_le_copy_of(body: bytes, original: Path) -> None:
    received = dcmread(io.BytesIO(body))
    expected = dcmread(original)
    assert received.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert received.SOPInstanceUID == expected.SOPInstanceUID
    assert np.array_equal(received.pixel_array, expected.pixel_array)


# -- 1. the default transfer syntax ----------------------------------------------------------


def test_wado_rs_instance_without_accept_is_decompressed_to_explicit_vr_little_endian(
        client, rle):
    response = _get_without_accept(client, _instance_url(rle["stored"][0]))
    ((headers, body),) = parse_multipart(response)
    assert response.headers["content-type"].startswith(MULTIPART_DICOM)
    assert headers["content-type"] == f"application/dicom; transfer-syntax={EXPLICIT_LE}"
    _assert_explicit_le_copy_of(body, rle["originals"][0])


@pytest.mark.parametrize("accept", ["*/*", MULTIPART_DICOM, "multipart/related",
                                    'multipart/related; type="*/*"', "multipart/*"])
def test_wado_rs_series_and_study_without_a_transfer_syntax_are_explicit_vr_little_endian(
        client, rle, accept):
    study, series, _ = _uids(rle["stored"][0])
    for url in (f"/dicomweb/studies/{study}", f"/dicomweb/studies/{study}/series/{series}"):
        parts = parse_multipart(client.get(url, headers={"Accept": accept}))
        assert len(parts) == 2, (accept, url)
        by_sop = {dcmread(io.BytesIO(body)).SOPInstanceUID: (headers, body)
                  for headers, body in parts}
        for original in rle["originals"]:
            headers, body = by_sop[_uids(original)[2]]
            assert headers["content-type"].endswith(f"transfer-syntax={EXPLICIT_LE}"), accept
            _assert_explicit_le_copy_of(body, original)


def test_wado_rs_single_application_dicom_defaults_to_explicit_vr_little_endian(client, rle):
    response = client.get(_instance_url(rle["stored"][0]),
                          headers={"Accept": "application/dicom"})
    assert response.status_code == 200
    assert response.headers["content-type"] == (
        f"application/dicom; transfer-syntax={EXPLICIT_LE}")
    _assert_explicit_le_copy_of(response.content, rle["originals"][0])


def test_wado_rs_transfer_syntax_star_still_sends_the_stored_bytes(client, rle):
    response = client.get(_instance_url(rle["stored"][0]),
                          headers={"Accept": f"{MULTIPART_DICOM}; transfer-syntax=*"})
    ((headers, body),) = parse_multipart(response)
    assert headers["content-type"] == f"application/dicom; transfer-syntax={RLE}"
    assert body == rle["stored"][0].read_bytes()


def test_wado_uri_without_transfer_syntax_is_explicit_vr_little_endian(client, rle):
    study, series, sop = _uids(rle["stored"][0])
    params = {"requestType": "WADO", "studyUID": study, "seriesUID": series,
              "objectUID": sop, "contentType": "application/dicom"}
    response = _get_without_accept(client, "/dicomweb/wado", **params)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/dicom")
    _assert_explicit_le_copy_of(response.content, rle["originals"][0])
    as_stored = client.get("/dicomweb/wado", params={**params, "transferSyntax": RLE})
    assert as_stored.content == rle["stored"][0].read_bytes()


# -- 2. WADO-URI anonymize -------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["application/dicom", "image/jpeg"])
def test_wado_uri_anonymize_is_refused_and_nothing_identifiable_leaves(
        client, archive, rle, content_type):
    study, series, sop = _uids(rle["stored"][0])
    response = client.get("/dicomweb/wado", params={
        "requestType": "WADO", "studyUID": study, "seriesUID": series, "objectUID": sop,
        "contentType": content_type, "anonymize": "yes"})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    detail = response.json()["detail"]
    assert "anonymize" in detail and "export" in detail
    assert b"RLE1" not in response.content
    # Refused before anything was selected: no retrieval is recorded, the refusal is.
    assert list(archive.audit.events(action="study.retrieve", study_uid=study)) == []
    (denied,) = list(archive.audit.events(action="access.denied", study_uid=study))
    assert denied["outcome"] == "refused"
    assert "anonymize" in denied["detail"]["reason"]


# -- 3. STOW-RS parts that are not application/dicom ------------------------------------------


def _multipart(parts: list[tuple[str, bytes]], boundary: str = "defaults-boundary-42"
               ) -> tuple[bytes, str]:
    body = b"".join(f"--{boundary}\r\nContent-Type: {kind}\r\n\r\n".encode() + data + b"\r\n"
                    for kind, data in parts) + f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


@pytest.mark.parametrize("part_type", ["application/octet-stream", "image/jpeg", "text/plain"])
def test_stow_part_that_is_not_application_dicom_fails_while_the_others_are_stored(
        client, archive, tmp_path, part_type):
    good, other = ct_series(tmp_path / "stow", count=2, patient_id="STOW-TYPE")
    body, content_type = _multipart([("application/dicom", good.read_bytes()),
                                     (part_type, other.read_bytes())])
    response = client.post("/dicomweb/studies", content=body,
                           headers={"Content-Type": content_type})
    assert response.status_code == 202
    answer = response.json()
    (stored,) = answer["00081199"]["Value"]
    assert stored["00081155"]["Value"] == [_uids(good)[2]]
    (failed,) = answer["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xC000]
    assert failed["00081155"]["Value"] == [_uids(other)[2]]
    assert part_type in failed["00000902"]["Value"][0]
    assert client.get(_instance_url(other)).status_code == 404
    assert client.get(_instance_url(good), headers={
        "Accept": f"{MULTIPART_DICOM}; transfer-syntax=*"}).status_code == 200


def test_stow_part_without_content_type_is_taken_as_the_requests_type(client, tmp_path):
    (path,) = ct_series(tmp_path / "bare", count=1, patient_id="STOW-BARE")
    boundary = "bare-boundary-7"
    body = (f"--{boundary}\r\n\r\n".encode() + path.read_bytes()
            + f"\r\n--{boundary}--\r\n".encode())
    response = client.post("/dicomweb/studies", content=body, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    assert response.status_code == 200


def test_stow_of_application_dicom_parts_is_unchanged(client, tmp_path):
    files = ct_series(tmp_path / "ok", count=2, patient_id="STOW-OK")
    body, content_type = encode_multipart([p.read_bytes() for p in files])
    response = client.post("/dicomweb/studies", content=body,
                           headers={"Content-Type": content_type})
    assert response.status_code == 200
    assert len(response.json()["00081199"]["Value"]) == 2


# -- 4. rendering parameters ------------------------------------------------------------------


def _rendered_urls(path: Path) -> list[str]:
    study, series, _ = _uids(path)
    instance = _instance_url(path)
    return [f"{instance}/rendered", f"{instance}/frames/1/rendered",
            f"/dicomweb/studies/{study}/series/{series}/rendered",
            f"/dicomweb/studies/{study}/rendered", f"{instance}/thumbnail"]


@pytest.mark.parametrize("window", [
    "abc", "", "40", "40,", ",400", "40,400,linear,extra", "40,0", "40,-400", "40,nan",
    "inf,400", "40,1e999", "40,400,cubic", "40,0.5", "40,0,sigmoid", "40,-1,linear-exact",
])
def test_rendered_refuses_an_invalid_window_with_a_reason(client, archive, rle, window):
    for url in _rendered_urls(rle["stored"][0]):
        response = client.get(url, params={"window": window})
        assert response.status_code == 400, (url, window, response.status_code)
        assert response.headers["content-type"] == "application/problem+json"
        assert "window" in response.json()["detail"], (url, window)
    study = _uids(rle["stored"][0])[0]
    assert list(archive.audit.events(action="study.view", study_uid=study)) == []


@pytest.mark.parametrize("quality", ["0", "101", "-5", "abc", "50.5", ""])
def test_rendered_refuses_a_quality_outside_1_to_100(client, rle, quality):
    for url in _rendered_urls(rle["stored"][0]):
        response = client.get(url, params={"quality": quality})
        assert response.status_code == 400, (url, quality, response.status_code)
        assert "quality" in response.json()["detail"], (url, quality)


@pytest.mark.parametrize("params", [
    {"window": "40,400"}, {"window": "40,400,linear"}, {"window": "-600.5,1500.25,LINEAR"},
    {"window": "40,0.5,linear-exact"}, {"window": "40,400,sigmoid"},
    {"quality": "1"}, {"quality": "100"}, {"quality": "75", "window": "40,1"},
])
def test_rendered_accepts_valid_window_and_quality(client, rle, params):
    for url in _rendered_urls(rle["stored"][0]):
        response = client.get(url, params=params)
        assert response.status_code == 200, (url, params, response.text[:200])
        assert response.headers["content-type"] == "image/jpeg"


def test_rendered_applies_the_window_function_asked_for(client, rle):
    from PIL import Image

    url = _instance_url(rle["stored"][0]) + "/rendered"
    images = {}
    for function in ("linear", "linear-exact", "sigmoid"):
        response = client.get(url, params={"window": f"1000,2000,{function}"},
                              headers={"Accept": "image/png"})
        assert response.status_code == 200, function
        images[function] = np.asarray(Image.open(io.BytesIO(response.content)))
    assert not np.array_equal(images["linear"], images["sigmoid"])
    # A sigmoid never reaches its ends: the darkest pixels stay above black.
    assert images["sigmoid"].min() > images["linear"].min()


@pytest.mark.parametrize("params", [
    {"windowCenter": "40"}, {"windowWidth": "400"}, {"windowCenter": "abc", "windowWidth": "4"},
    {"windowCenter": "40", "windowWidth": "0"}, {"windowCenter": "40", "windowWidth": "-1"},
    {"imageQuality": "0"}, {"imageQuality": "101"}, {"imageQuality": "high"},
])
def test_wado_uri_rendered_refuses_invalid_window_or_quality(client, archive, rle, params):
    study, series, sop = _uids(rle["stored"][0])
    response = client.get("/dicomweb/wado", params={
        "requestType": "WADO", "studyUID": study, "seriesUID": series, "objectUID": sop,
        "contentType": "image/jpeg", **params})
    assert response.status_code == 400, (params, response.status_code)
    detail = response.json()["detail"]
    assert "window" in detail.lower() or "quality" in detail.lower(), detail
    assert list(archive.audit.events(action="study.retrieve", study_uid=study)) == []


def test_wado_uri_rendered_with_valid_window_and_quality(client, rle):
    study, series, sop = _uids(rle["stored"][0])
    response = client.get("/dicomweb/wado", params={
        "requestType": "WADO", "studyUID": study, "seriesUID": series, "objectUID": sop,
        "contentType": "image/jpeg", "windowCenter": "40", "windowWidth": "400",
        "imageQuality": "100"})
    assert response.status_code == 200
    assert response.content[:3] == b"\xff\xd8\xff"


# -- 5. HEAD, and bulk data in one application/octet-stream body -------------------------------


def test_head_of_an_instance_answers_like_get_without_a_body(client, rle):
    url = _instance_url(rle["stored"][0])
    for accept in (MULTIPART_DICOM, "application/dicom"):
        got = client.get(url, headers={"Accept": accept})
        head = client.head(url, headers={"Accept": accept})
        assert (head.status_code, head.content) == (200, b""), accept
        own, theirs = (r.headers["content-type"].split("boundary=")[0] for r in (head, got))
        assert own == theirs, accept
    assert client.head(url.replace(_uids(rle["stored"][0])[2], "1.2.3.4")).status_code == 404
    assert client.head(url, headers={"Accept": "text/html"}).status_code == 406


def test_head_of_an_instance_is_audited_as_a_metadata_read_not_a_retrieval(
        client, archive, rle):
    study = _uids(rle["stored"][0])[0]
    assert client.head(_instance_url(rle["stored"][0])).status_code == 200
    assert list(archive.audit.events(action="study.retrieve", study_uid=study)) == []
    (read,) = list(archive.audit.events(action="study.metadata", study_uid=study))
    assert read["outcome"] == "success"


def test_head_of_metadata_answers_like_get_without_a_body(client, rle):
    url = _instance_url(rle["stored"][0]) + "/metadata"
    got, head = client.get(url), client.head(url)
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-type"] == got.headers["content-type"] == "application/dicom+json"
    assert head.headers["content-length"] == got.headers["content-length"]


def test_head_needs_credentials_like_get(anonymous, rle):
    url = _instance_url(rle["stored"][0])
    for resource in (url, url + "/metadata"):
        assert anonymous.head(resource).status_code == 401


def test_bulk_data_asked_for_as_application_octet_stream_comes_as_one_body(client, rle):
    url = _instance_url(rle["stored"][0]) + "/bulkdata/7FE00010"
    single = client.get(url, headers={"Accept": "application/octet-stream"})
    assert single.status_code == 200
    assert single.headers["content-type"] == (
        f"application/octet-stream; transfer-syntax={EXPLICIT_LE}")
    assert single.content == dcmread(rle["originals"][0]).PixelData
    multipart = client.get(url, headers={
        "Accept": 'multipart/related; type="application/octet-stream"'})
    ((_headers, body),) = parse_multipart(multipart)
    assert body == single.content


def test_other_bulk_data_asked_for_as_application_octet_stream_comes_as_one_body(
        client, archive, tmp_path):
    (path,) = ct_series(tmp_path / "doc", count=1, patient_id="BULK1")
    ds = dcmread(path)
    document = bytes(range(256)) * 300  # over the inline limit: a BulkDataURI
    ds.add_new(0x00420011, "OB", document)  # Encapsulated Document
    ds.save_as(path, enforce_file_format=True)
    archive.ingest.store_copy(path, ACTOR)
    (meta,) = client.get(_instance_url(path) + "/metadata").json()
    assert meta["00420011"]["BulkDataURI"].endswith("/bulkdata/00420011")
    url = _instance_url(path) + "/bulkdata/00420011"
    single = client.get(url, headers={"Accept": "application/octet-stream"})
    assert single.status_code == 200
    assert single.headers["content-type"] == "application/octet-stream"
    assert single.content == document
    ((headers, body),) = parse_multipart(client.get(url))
    assert (headers["content-type"], body) == ("application/octet-stream", document)
