"""DICOMweb as demanding clients use it (red team, session 32): frames' default transfer
syntax and lossless compression on request, byte ranges of bulk data, WADO-URI region and
the WADO-RS viewport's source rectangle, STOW bodies with a preamble, media type
parameters in any case, and the ``accept`` query parameter."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import UID, generate_uid

from imageshare.domain.actors import cli_actor
from tests.factory import ct_series, us_cine
from tests.multipart_helpers import encode_multipart, parse_multipart

ACTOR = cli_actor()
OCTET = 'multipart/related; type="application/octet-stream"'


@pytest.fixture
def stored(archive, tmp_path):
    """A 64x64 CT image, a 6-frame native cine, a JPEG 2000 lossless and a JPEG baseline
    (lossy) instance, stored."""
    ct = ct_series(tmp_path / "ct", count=1, size=64, patient_id="R1", patient_name="Red^Team")
    cine = us_cine(tmp_path / "us", frames=6, patient_id="R2")
    j2k = Path(str(get_testdata_file("US1_J2KR.dcm")))
    jpeg = Path(str(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")))
    for path in (*ct, cine, j2k, jpeg):
        archive.ingest.store_copy(path, ACTOR)
    return {"ct": ct[0], "cine": cine, "j2k": j2k, "jpeg": jpeg}


def _url(path: Path) -> str:
    ds = dcmread(path, stop_before_pixels=True)
    return (f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/"
            f"instances/{ds.SOPInstanceUID}")


def _png(response) -> Image.Image:
    assert response.status_code == 200, response.text[:300]
    return Image.open(io.BytesIO(response.content))


# -- WADO-RS frames ------------------------------------------------------------------------


@pytest.mark.parametrize("accept", [None, "*/*", 'multipart/related; type="*/*"',
                                    "multipart/*"])
def test_frames_without_a_transfer_syntax_come_uncompressed_unless_stored_lossy(
        client, stored, accept):
    """PS3.18 8.7.3.3: no transfer-syntax parameter means Explicit VR Little Endian unless
    the pixels exist only lossy compressed (a lossless JPEG 2000 frame came as stored)."""
    headers = {"Accept": accept} if accept else {"Accept": ""}
    ((head, body),) = parse_multipart(client.get(f"{_url(stored['j2k'])}/frames/1",
                                                 headers=headers))
    ds = dcmread(stored["j2k"])
    assert head["content-type"] == ("application/octet-stream; "
                                    "transfer-syntax=1.2.840.10008.1.2.1")
    assert body == ds.pixel_array.tobytes()
    ((head, body),) = parse_multipart(client.get(f"{_url(stored['jpeg'])}/frames/1",
                                                 headers=headers))
    assert head["content-type"] == "image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50"
    assert body[:3] == b"\xff\xd8\xff"


def test_frames_as_stored_with_transfer_syntax_star(client, stored):
    for accept in ('multipart/related; type="*/*"; transfer-syntax=*',
                   f"{OCTET}; transfer-syntax=*"):
        ((head, body),) = parse_multipart(client.get(f"{_url(stored['j2k'])}/frames/1",
                                                     headers={"Accept": accept}))
        assert head["content-type"] == "image/jp2; transfer-syntax=1.2.840.10008.1.2.4.90"
        assert body[:4] == b"\xff\x4f\xff\x51"


@pytest.mark.parametrize(("media", "syntax"), [("image/jls", "1.2.840.10008.1.2.4.80"),
                                               ("image/jp2", "1.2.840.10008.1.2.4.90"),
                                               ("image/dicom-rle", "1.2.840.10008.1.2.5")])
def test_frames_of_an_uncompressed_instance_compressed_losslessly_on_request(
        client, stored, media, syntax):
    """A client asking for compressed frames of an uncompressed instance (as Orthanc
    answers) gets them in the media type's default lossless syntax, decoding to the very
    pixels stored; it was refused 406."""
    for path, numbers in ((stored["ct"], "1"), (stored["cine"], "2,5")):
        response = client.get(f"{_url(path)}/frames/{numbers}",
                              headers={"Accept": f'multipart/related; type="{media}"'})
        assert response.headers["content-type"].startswith(
            f'multipart/related; type="{media}"')
        ds = dcmread(path)
        pixels = ds.pixel_array if "," in numbers else ds.pixel_array[None]
        wanted = [pixels[int(n) - 1] for n in numbers.split(",")]
        parts = parse_multipart(response)
        assert [h["content-type"] for h, _ in parts] == [
            f"{media}; transfer-syntax={syntax}"] * len(wanted)
        for (_, body), expected in zip(parts, wanted, strict=True):
            # The frame as the client's decoder sees it: one frame in that syntax.
            ds.NumberOfFrames = 1
            ds.file_meta.TransferSyntaxUID = UID(syntax)
            ds.PixelData = encapsulate([body])
            ds["PixelData"].VR = "OB"
            assert np.array_equal(ds.pixel_array.reshape(expected.shape), expected)


def test_frames_in_a_syntax_not_produced_are_refused_with_what_is_offered(client, stored):
    """image/jpeg means JPEG Lossless (its PS3.18 default), which nothing here writes; lossy
    JPEG-LS is not made either: 406 naming what can be had."""
    for accept in ('multipart/related; type="image/jpeg"',
                   'multipart/related; type="image/jpeg"; transfer-syntax=1.2.840.10008.1.2.4.50',
                   'multipart/related; type="image/jls"; transfer-syntax=1.2.840.10008.1.2.4.81'):
        response = client.get(f"{_url(stored['ct'])}/frames/1", headers={"Accept": accept})
        assert response.status_code == 406, accept
        assert "image/jls" in response.json()["detail"]
    missing = client.get(f"{_url(stored['ct'])}/frames/2",
                         headers={"Accept": 'multipart/related; type="image/jls"'})
    assert missing.status_code == 404


# -- bulk data -----------------------------------------------------------------------------


def _pixel_bulk_url(client, path: Path) -> str:
    (meta,) = client.get(f"{_url(path)}/metadata").json()
    return meta["7FE00010"]["BulkDataURI"].removeprefix("http://testserver")


def test_uncompressed_multi_frame_pixel_bulk_data_is_one_value(client, stored):
    """The BulkDataURI of native pixel data names one value: one part holding every frame
    (it came as one part per frame, which a client rebuilding the instance cannot use)."""
    response = client.get(_pixel_bulk_url(client, stored["cine"]), headers={"Accept": OCTET})
    ((head, body),) = parse_multipart(response)
    assert head["content-type"].startswith("application/octet-stream")
    assert body == dcmread(stored["cine"]).PixelData


@pytest.mark.parametrize("accept", [OCTET, "application/octet-stream"])
def test_bulk_data_byte_ranges(client, stored, accept):
    """PS3.18: with a Range header only the bytes asked for come back (206, Content-Range);
    a range past the end is 416; several ranges or another unit get the whole value."""
    url = _pixel_bulk_url(client, stored["cine"])
    value = dcmread(stored["cine"]).PixelData

    def body_of(response) -> bytes:
        if accept == OCTET:
            response.status_code, status = 200, response.status_code  # parse_multipart's check
            ((_h, body),) = parse_multipart(response)
            response.status_code = status
            return body
        return response.content

    for asked, first, last in (("bytes=0-9", 0, 9), ("bytes=100-", 100, len(value) - 1),
                               ("bytes=-4", len(value) - 4, len(value) - 1),
                               (f"bytes=10-{len(value) + 50}", 10, len(value) - 1)):
        response = client.get(url, headers={"Accept": accept, "Range": asked})
        assert response.status_code == 206, asked
        assert response.headers["content-range"] == f"bytes {first}-{last}/{len(value)}"
        assert body_of(response) == value[first:last + 1], asked
    outside = client.get(url, headers={"Accept": accept, "Range": f"bytes={len(value)}-"})
    assert outside.status_code == 416
    assert outside.headers["content-range"] == f"bytes */{len(value)}"
    for ignored in ("bytes=0-1,5-6", "frames=1-2", "bytes=9-2"):
        response = client.get(url, headers={"Accept": accept, "Range": ignored})
        assert response.status_code == 200, ignored
        assert body_of(response) == value


def test_byte_range_of_a_compressed_single_frame_and_of_another_attribute(archive, client,
                                                                          stored, tmp_path):
    url = _pixel_bulk_url(client, stored["j2k"])
    response = client.get(url, headers={"Accept": 'multipart/related; type="image/jp2"',
                                        "Range": "bytes=0-3"})
    assert response.status_code == 206
    response.status_code = 200
    ((head, body),) = parse_multipart(response)
    assert head["content-type"].startswith("image/jp2") and body == b"\xff\x4f\xff\x51"

    ds = dcmread(stored["ct"])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.add_new(0x00091010, "OB", bytes(range(256)) * 300)  # bulk in the metadata (> 64 KiB)
    ds.add_new(0x00090010, "LO", "REDTEAM")
    path = tmp_path / "private.dcm"
    ds.save_as(path, enforce_file_format=True)
    archive.ingest.store_copy(path, ACTOR)
    (meta,) = client.get(f"{_url(path)}/metadata").json()
    uri = meta["00091010"]["BulkDataURI"].removeprefix("http://testserver")
    response = client.get(uri, headers={"Accept": "application/octet-stream",
                                        "Range": "bytes=256-259"})
    assert (response.status_code, response.content) == (206, bytes([0, 1, 2, 3]))


# -- rendering: WADO-URI region, WADO-RS viewport source ------------------------------------


def _wado(stored_path: Path, **extra: str) -> dict[str, str]:
    ds = dcmread(stored_path, stop_before_pixels=True)
    return {"requestType": "WADO", "studyUID": ds.StudyInstanceUID,
            "seriesUID": ds.SeriesInstanceUID, "objectUID": ds.SOPInstanceUID,
            "contentType": "image/png", **extra}


def test_wado_uri_region_is_cut_out_before_scaling(client, stored):
    """WADO-URI ``region`` (fractions left,top,right,bottom) was ignored: the whole image
    came back as if it were the part asked for."""
    whole = _png(client.get("/dicomweb/wado", params=_wado(stored["ct"])))
    assert whole.size == (64, 64)
    part = _png(client.get("/dicomweb/wado", params=_wado(stored["ct"],
                                                          region="0,0,0.5,0.25")))
    assert part.size == (32, 16)
    assert np.array_equal(np.asarray(part), np.asarray(whole)[:16, :32])
    scaled = _png(client.get("/dicomweb/wado", params=_wado(
        stored["ct"], region="0.5,0.5,1,1", rows="16")))
    assert scaled.size == (16, 16)
    for bad in ("0,0,1", "0.5,0,0.2,1", "0,0,1.5,1", "a,b,c,d", ""):
        response = client.get("/dicomweb/wado", params=_wado(stored["ct"], region=bad))
        assert response.status_code == 400, bad
        assert "region" in response.json()["detail"]


def test_wado_rs_viewport_source_rectangle(client, stored):
    """``viewport=vw,vh,sx,sy,sw,sh`` renders only the source rectangle (negative sizes
    flip); it rendered the whole image."""
    url = f"{_url(stored['ct'])}/rendered"
    png = {"Accept": "image/png"}
    whole = np.asarray(_png(client.get(url, headers=png)))
    part = _png(client.get(url, headers=png, params={"viewport": "64,64,8,4,16,8"}))
    assert np.array_equal(np.asarray(part), whole[4:12, 8:24])
    flipped = _png(client.get(url, headers=png, params={"viewport": "64,64,8,4,-16,-8"}))
    assert np.array_equal(np.asarray(flipped), whole[4:12, 8:24][::-1, ::-1])
    edge = _png(client.get(url, headers=png, params={"viewport": "64,64,60,,,"}))
    assert np.array_equal(np.asarray(edge), whole[:, 60:])
    for bad in ("64,64,100,100,5,5", "64,64,0,0,0,5", "64,64,a,0,5,5", "64,64,1,2,3,4,5"):
        assert client.get(url, headers=png, params={"viewport": bad}).status_code == 400, bad


# -- STOW-RS and negotiation ----------------------------------------------------------------


def test_stow_body_with_a_preamble_is_stored(client, tmp_path):
    """RFC 2046 5.1.1: text before the first boundary is a preamble, to be ignored (the
    request was refused as malformed)."""
    new = ct_series(tmp_path / "new", count=2, patient_id="R3")
    body, content_type = encode_multipart([p.read_bytes() for p in new])
    response = client.post("/dicomweb/studies", headers={"Content-Type": content_type},
                           content=b"This is a multipart message in MIME format.\r\n" + body)
    assert response.status_code == 200, response.text
    assert len(response.json()["00081199"]["Value"]) == 2
    # A preamble is not read without end: past 64 KiB without a boundary is malformed.
    response = client.post("/dicomweb/studies", content=b"x" * 70000 + b"\r\n" + body,
                           headers={"Content-Type": content_type})
    assert response.status_code == 400
    assert "boundary" in response.json()["detail"]

    def chunks():  # the boundary split across chunks, after a preamble
        data = b"preamble" + b"\r\n" + body
        yield data[:12]
        yield data[12:]

    response = client.post("/dicomweb/studies", content=chunks(),
                           headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text


def test_media_type_parameter_values_are_compared_without_case(client, stored, tmp_path):
    """``type="Application/DICOM"`` is application/dicom (RFC 2045): it was refused 415/406."""
    new = ct_series(tmp_path / "new", count=1, patient_id="R4")
    body, _ = encode_multipart([new[0].read_bytes()])
    response = client.post("/dicomweb/studies", content=body, headers={
        "Content-Type": 'Multipart/Related; Type="Application/DICOM"; '
                        "Boundary=test-boundary-1234"})
    assert response.status_code == 200, response.text
    response = client.get(_url(stored["ct"]), headers={
        "Accept": 'multipart/related; type="Application/Dicom"'})
    assert response.status_code == 200
    frames = client.get(f"{_url(stored['ct'])}/frames/1", headers={
        "Accept": 'multipart/related; type="Application/Octet-Stream"'})
    assert frames.status_code == 200


def test_accept_query_parameter(client, stored):
    """PS3.18 8.3.3.1: ``accept`` may be a query parameter (user agents that cannot set
    headers); QIDO refused it as an unknown attribute (400)."""
    response = client.get("/dicomweb/studies", params={"accept": "application/dicom+json",
                                                       "PatientID": "R1"})
    assert response.status_code == 200 and len(response.json()) == 1
    response = client.get("/dicomweb/studies", params={
        "accept": 'multipart/related; type="application/dicom+xml"', "charset": "utf-8"})
    assert response.headers["content-type"].startswith("multipart/related")
    rendered = client.get(f"{_url(stored['ct'])}/rendered", params={"accept": "image/png"},
                          headers={"Accept": "image/jpeg"})
    assert rendered.headers["content-type"] == "image/png"


def test_wado_uri_content_type_list_and_frame_number(client, stored):
    """WADO-URI ``contentType`` is a list with q values (the first entry, with its q value,
    was taken as the type and refused 406); ``frameNumber=0`` was served as frame 1."""
    png = client.get("/dicomweb/wado", params=_wado(
        stored["cine"], contentType="image/jpeg;q=0.5,image/png"))
    assert (png.status_code, png.headers["content-type"]) == (200, "image/png")
    dicom = client.get("/dicomweb/wado", params=_wado(
        stored["cine"], contentType="application/dicom, image/jpeg;q=0.2"))
    assert dicom.headers["content-type"] == "application/dicom"
    assert client.get("/dicomweb/wado", params=_wado(stored["cine"], contentType="text/html")
                      ).status_code == 406
    third = client.get("/dicomweb/wado", params=_wado(stored["cine"], frameNumber="3"))
    assert third.status_code == 200
    zero = client.get("/dicomweb/wado", params=_wado(stored["cine"], frameNumber="0"))
    assert zero.status_code == 400 and "frameNumber" in zero.json()["detail"]


def test_stow_part_in_an_unknown_transfer_syntax_fails_with_c122(client, stored, tmp_path):
    """PS3.18 STOW-RS failure reason C122 (Referenced Transfer Syntax not supported); it
    answered C000 ('cannot be parsed')."""
    ds = dcmread(ct_series(tmp_path / "new", count=1, patient_id="R5")[0])
    ds.file_meta.TransferSyntaxUID = UID("1.2.3.4.5.6")
    data = io.BytesIO()
    ds.save_as(data, enforce_file_format=False)
    body, content_type = encode_multipart([data.getvalue()])
    response = client.post("/dicomweb/studies", content=body,
                           headers={"Content-Type": content_type})
    assert response.status_code == 409
    (failed,) = response.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xC122]


def test_each_instance_goes_in_the_first_acceptable_syntax_it_can_be_sent_in(
        archive, client, stored, tmp_path):
    """Accept JPEG baseline, else JPEG 2000 lossless: the JPEG image comes as stored, the
    CT image (not convertible to JPEG baseline here) as JPEG 2000; it came as stored
    (Explicit VR Little Endian), which the client did not accept."""
    ct = dcmread(stored["ct"])
    jpeg = dcmread(stored["jpeg"])
    jpeg.StudyInstanceUID, jpeg.PatientID, jpeg.PatientName = (
        ct.StudyInstanceUID, ct.PatientID, ct.PatientName)
    jpeg.PatientBirthDate, jpeg.PatientSex = ct.get("PatientBirthDate", ""), ct.get(
        "PatientSex", "")
    jpeg.SOPInstanceUID = jpeg.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    jpeg.SeriesInstanceUID = generate_uid()
    path = tmp_path / "jpeg-in-ct-study.dcm"
    jpeg.save_as(path, enforce_file_format=True)
    archive.ingest.store_copy(path, ACTOR)
    response = client.get(f"/dicomweb/studies/{ct.StudyInstanceUID}", headers={"Accept": (
        'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50, '
        'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.90;'
        " q=0.9")})
    got = {dcmread(io.BytesIO(body)).SOPInstanceUID: head["content-type"]
           for head, body in parse_multipart(response)}
    assert got == {
        jpeg.SOPInstanceUID: "application/dicom; transfer-syntax=1.2.840.10008.1.2.4.50",
        ct.SOPInstanceUID: "application/dicom; transfer-syntax=1.2.840.10008.1.2.4.90"}


def test_stow_of_an_instance_held_for_reconciliation_names_no_retrieve_url(tmp_path):
    """With patient_mismatch=hold, an instance whose patient ID is on record with another
    name is stored but held in the inbox, where no retrieval finds it: its Retrieve URL
    (and the study's) led to 404."""
    from fastapi.testclient import TestClient

    from imageshare.web.server import create_app
    from tests.conftest import ADMIN_PASSWORD, act_as_admin, make_archive

    archive = make_archive(tmp_path, patient_mismatch="hold")
    archive.users.ensure_admin(ADMIN_PASSWORD)
    try:
        archive.ingest.store_copy(ct_series(tmp_path / "a", count=1, patient_id="R6",
                                            patient_name="Known^Name")[0], ACTOR)
        other = ct_series(tmp_path / "b", count=1, patient_id="R6", patient_name="Other^Name")
        body, content_type = encode_multipart([other[0].read_bytes()])
        with TestClient(create_app(archive)) as client:
            act_as_admin(client, archive)
            response = client.post("/dicomweb/studies", content=body,
                                   headers={"Content-Type": content_type})
            assert response.status_code == 200, response.text
            answer = response.json()
            (item,) = answer["00081199"]["Value"]
            assert "00081190" not in item
            assert not answer["00081190"].get("Value")
            ds = dcmread(other[0], stop_before_pixels=True)
            assert client.get(f"/dicomweb/studies/{ds.StudyInstanceUID}").status_code == 404
    finally:
        archive.close()


def test_a_frame_list_cannot_repeat_frames_without_end(client, stored):
    """frames/1,1,1,... made the server read (or decode) and hold the same frame once per
    repeat: a few kilobytes of URL for gigabytes of memory. A list longer than the
    instance's frames is refused; the list's order is kept."""
    url = _url(stored["cine"])
    pixels = dcmread(stored["cine"]).pixel_array
    in_order = parse_multipart(client.get(f"{url}/frames/5,2", headers={"Accept": OCTET}))
    assert [body for _, body in in_order] == [pixels[4].tobytes(), pixels[1].tobytes()]
    repeated = ",".join(["1"] * 7)  # the loop has 6 frames
    for path in (f"{url}/frames/{repeated}", f"{url}/frames/{repeated}/rendered"):
        response = client.get(path, headers={
            "Accept": OCTET if path.endswith(repeated) else
            'multipart/related; type="image/jpeg"'})
        assert response.status_code == 400, path
        assert "more frame numbers" in response.json()["detail"]


def test_wado_uri_shows_a_video_by_its_first_picture(archive, client, stored, tmp_path):
    """WADO-RS renders a video instance as its first picture; WADO-URI answered 406 (it
    tried to decode the MPEG-4 stream as image frames)."""
    from pydicom.encaps import encapsulate

    from tests.upload_media import mp4

    clip = mp4(tmp_path / "clip.mp4", frames=12, width=320, height=240)
    ds = dcmread(stored["cine"])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.102")  # MPEG-4 AVC/H.264
    ds.Rows, ds.Columns, ds.NumberOfFrames = 240, 320, 12
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = (
        3, "YBR_PARTIAL_420", 0)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([clip.read_bytes()], has_bot=False)
    ds["PixelData"].VR = "OB"
    path = tmp_path / "video.dcm"
    ds.save_as(path, enforce_file_format=True)
    archive.ingest.store_copy(path, ACTOR)
    still = _png(client.get("/dicomweb/wado", params=_wado(path)))
    assert still.size == (320, 240)
    part = _png(client.get("/dicomweb/wado", params=_wado(path, region="0,0,0.5,0.5")))
    assert part.size == (160, 120)
    second = client.get("/dicomweb/wado", params=_wado(path, frameNumber="2"))
    assert second.status_code == 406


def test_a_search_too_broad_to_answer_is_refused_413_naming_how_to_narrow_it(tmp_path):
    """QIDO-RS on a key with no index column across the archive would read every stored
    header: refused before the work with 413 (PS3.18: the query is too broad), not 507
    (the disk is not full)."""
    from fastapi.testclient import TestClient

    from imageshare.web.server import create_app
    from tests.conftest import ADMIN_PASSWORD, act_as_admin, make_archive

    archive = make_archive(tmp_path, qido_max_limit=2)
    archive.users.ensure_admin(ADMIN_PASSWORD)
    try:
        for path in ct_series(tmp_path / "many", count=24, size=16, patient_id="MANY",
                              ImageType=["DERIVED", "SECONDARY"]):
            archive.ingest.store_copy(path, cli_actor())
        with TestClient(create_app(archive)) as client:
            act_as_admin(client, archive)
            answer = client.get("/dicomweb/instances", params={"ImageType": "DERIVED*"})
            assert answer.status_code == 413, answer.text
            assert "narrow by patient/study/series" in answer.json()["detail"]
    finally:
        archive.close()
