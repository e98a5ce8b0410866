"""DICOMweb as real clients use it (red team, session 35): frames stored compressed asked
for in another lossless syntax, frames as JPEG baseline when a client names it, frame
numbers past the last, and stored values that do not fit their VR in DICOM JSON."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.encaps import encapsulate
from pydicom.tag import Tag
from pydicom.uid import UID

from imageshare.domain.actors import cli_actor
from tests.factory import ct_series, us_cine
from tests.multipart_helpers import parse_multipart

ACTOR = cli_actor()
JLS, J2K, RLE = "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"


def _url(path: Path) -> str:
    ds = dcmread(path, stop_before_pixels=True)
    return (f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/"
            f"instances/{ds.SOPInstanceUID}")


def _decoded(path: Path, body: bytes, syntax: str) -> np.ndarray:
    """One frame's bytes as the client's decoder sees them: one frame in ``syntax``, with
    the instance's pixel description (colour that was YBR decoded as RGB)."""
    ds = dcmread(path)
    ds.NumberOfFrames = 1
    if ds.get("PhotometricInterpretation") in ("YBR_RCT", "YBR_ICT", "YBR_FULL_422"):
        ds.PhotometricInterpretation = "RGB"
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.PixelData = encapsulate([body])
    ds["PixelData"].VR = "OB"
    return ds.pixel_array


# -- WADO-RS frames: compressed to compressed -------------------------------------------------


@pytest.mark.parametrize("stored", ["US1_J2KR.dcm", "MR_small_RLE.dcm",
                                    "JPGLosslessP14SV1_1s_1f_8b.dcm", "emri_small_RLE.dcm"])
@pytest.mark.parametrize(("media", "syntax"), [("image/jls", JLS), ("image/jp2", J2K),
                                               ("image/dicom-rle", RLE)])
def test_frames_stored_compressed_come_in_another_lossless_syntax_on_request(
        archive, client, stored, media, syntax):
    """A viewer whose decoder knows only JPEG-LS (or JPEG 2000, or RLE) asks for frames of a
    JPEG 2000, RLE or JPEG Lossless instance in that syntax; it was refused 406 unless the
    instance was stored uncompressed. The frames decode to the very pixels stored."""
    path = Path(str(get_testdata_file(stored)))
    archive.ingest.store_copy(path, ACTOR)
    original = dcmread(path)
    frames = int(original.get("NumberOfFrames") or 1)
    numbers = [1] if frames == 1 else [2, frames]
    response = client.get(f"{_url(path)}/frames/{','.join(map(str, numbers))}",
                          headers={"Accept": f'multipart/related; type="{media}"'})
    parts = parse_multipart(response)
    if original.file_meta.TransferSyntaxUID == syntax:
        assert [h["content-type"] for h, _ in parts] == [f"{media}; transfer-syntax={syntax}"
                                                         ] * len(numbers)
        return  # as stored: the s32 tests cover it
    assert [h["content-type"] for h, _ in parts] == [f"{media}; transfer-syntax={syntax}"
                                                     ] * len(numbers)
    pixels = original.pixel_array if frames > 1 else original.pixel_array[None]
    for (_, body), number in zip(parts, numbers, strict=True):
        assert np.array_equal(_decoded(path, body, syntax), pixels[number - 1])


@pytest.mark.parametrize("accept", ['multipart/related; type="image/jls"',
                                    'multipart/related; type="application/octet-stream"'])
def test_a_frame_past_the_last_of_a_compressed_instance_is_not_found(archive, client, accept):
    """Frame 2 of a one-frame RLE instance, asked for decoded or recompressed, was "406 the
    frames cannot be decoded; ask with transfer-syntax=*": a client retried as stored and
    got 404. It is 404 at once, naming how many frames there are."""
    path = Path(str(get_testdata_file("MR_small_RLE.dcm")))
    archive.ingest.store_copy(path, ACTOR)
    response = client.get(f"{_url(path)}/frames/2", headers={"Accept": accept})
    assert response.status_code == 404
    assert "has 1" in response.json()["detail"]


# -- DICOM JSON of values that do not fit their VR --------------------------------------------


def _with_raw(path: Path, values: dict[int, tuple[str, bytes]]) -> Path:
    """``path`` rewritten with the given raw (unchecked) values, as a device might write."""
    ds = dcmread(path)
    for tag, (vr, value) in values.items():
        value += b" " * (len(value) % 2)
        ds._dict[Tag(tag)] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    out = path.with_name("raw-" + path.name)
    ds.save_as(out, enforce_file_format=True)
    return out


def test_an_integer_string_that_is_not_whole_is_sent_as_stored(archive, client, tmp_path):
    """A stored Instance Number "1.5" (invalid IS) was sent as 1 in the metadata, in DICOM
    JSON and XML alike: a viewer sorted and labelled the image by a number the file does not
    hold. It goes out as the string stored (DICOM JSON allows strings for IS)."""
    path = _with_raw(ct_series(tmp_path, count=1, size=16, patient_id="IS1")[0], {
        0x00200013: ("IS", b"1.5"), 0x00280034: ("IS", b"1\\2.5"), 0x00200012: ("IS", b" 7")})
    archive.ingest.store_copy(path, ACTOR)
    (meta,) = client.get(f"{_url(path)}/metadata").json()
    assert meta["00200013"] == {"vr": "IS", "Value": ["1.5"]}
    assert meta["00280034"] == {"vr": "IS", "Value": ["1", "2.5"]}
    assert meta["00200012"] == {"vr": "IS", "Value": [7]}  # a valid one stays a number
    xml = client.get(f"{_url(path)}/metadata",
                     headers={"Accept": 'multipart/related; type="application/dicom+xml"'})
    assert '<DicomAttribute tag="00200013" vr="IS" keyword="InstanceNumber"><Value ' \
           'number="1">1.5</Value>' in xml.text


BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_BASELINE = f'multipart/related; type="image/jpeg"; transfer-syntax={BASELINE}'


@pytest.mark.parametrize("stored", ["cine", "US1_J2KR.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm"])
def test_frames_as_jpeg_baseline_when_a_client_names_it(archive, client, tmp_path, stored):
    """A viewer configured for lossy JPEG frames (image/jpeg with the baseline transfer
    syntax, as OHIF deployments set it) got 406 for every instance not stored as JPEG
    baseline. 8-bit frames (uncompressed RGB cine, JPEG 2000 colour, JPEG Lossless grey)
    come as JPEG baseline, labelled so, close to the stored pixels."""
    path = (us_cine(tmp_path, frames=3, patient_id="JB1") if stored == "cine"
            else Path(str(get_testdata_file(stored))))
    archive.ingest.store_copy(path, ACTOR)
    original = dcmread(path)
    frames = int(original.get("NumberOfFrames") or 1)
    numbers = [1] if frames == 1 else [1, frames]
    response = client.get(f"{_url(path)}/frames/{','.join(map(str, numbers))}",
                          headers={"Accept": JPEG_BASELINE})
    parts = parse_multipart(response)
    assert [h["content-type"] for h, _ in parts] == [f"image/jpeg; transfer-syntax={BASELINE}"
                                                     ] * len(numbers)
    pixels = original.pixel_array if frames > 1 else original.pixel_array[None]
    for (_, body), number in zip(parts, numbers, strict=True):
        assert body[:3] == b"\xff\xd8\xff"
        seen = np.asarray(Image.open(io.BytesIO(body)).convert(
            "RGB" if pixels.ndim == 4 else "L")).astype(int)
        assert seen.shape == pixels[number - 1].shape
        assert np.abs(seen - pixels[number - 1].astype(int)).mean() < 3


def test_jpeg_baseline_frames_of_16_bit_pixels_are_refused_and_the_next_range_answers(
        archive, client, tmp_path):
    """16-bit CT does not fit JPEG baseline: alone, 406 naming what is offered; before
    application/octet-stream in the Accept header, the decoded frame comes instead."""
    path = ct_series(tmp_path, count=1, size=16, patient_id="JB2")[0]
    archive.ingest.store_copy(path, ACTOR)
    refused = client.get(f"{_url(path)}/frames/1", headers={"Accept": JPEG_BASELINE})
    assert refused.status_code == 406
    assert "image/jls" in refused.json()["detail"]
    assert BASELINE not in refused.json()["detail"]
    ((head, body),) = parse_multipart(client.get(f"{_url(path)}/frames/1", headers={
        "Accept": f'{JPEG_BASELINE}, multipart/related; type="application/octet-stream"'}))
    assert head["content-type"].startswith("application/octet-stream")
    assert body == dcmread(path).pixel_array.tobytes()


def test_a_refusal_of_image_jpeg_names_the_baseline_syntax_for_8_bit_pixels(
        archive, client, tmp_path):
    """image/jpeg alone means JPEG Lossless (its PS3.18 default), which nothing here
    writes: 406, but the answer says which image/jpeg can be had."""
    path = us_cine(tmp_path, frames=2, patient_id="JB3")
    archive.ingest.store_copy(path, ACTOR)
    refused = client.get(f"{_url(path)}/frames/1",
                         headers={"Accept": 'multipart/related; type="image/jpeg"'})
    assert refused.status_code == 406
    assert f"image/jpeg; transfer-syntax={BASELINE}" in refused.json()["detail"]


def test_an_empty_value_among_several_is_null_and_the_others_are_kept(
        archive, client, tmp_path):
    """Other Patient Names "A^B\\\\C^D" (an empty value between two names) vanished from the
    metadata, and Window Center "\\40" came as strings ["", "40"]: PS3.18 F.2.5 sends each
    empty value as null and the others as they are (numbers as numbers)."""
    path = _with_raw(ct_series(tmp_path, count=1, size=16, patient_id="NU1")[0], {
        0x00101001: ("PN", b"Doe^A\\\\Roe^B"), 0x00281050: ("DS", b"\\40"),
        0x00280034: ("IS", b"1\\\\3")})
    archive.ingest.store_copy(path, ACTOR)
    (meta,) = client.get(f"{_url(path)}/metadata").json()
    assert meta["00101001"] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^A"}, None,
                                                      {"Alphabetic": "Roe^B"}]}
    assert meta["00281050"] == {"vr": "DS", "Value": [None, 40.0]}
    assert meta["00280034"] == {"vr": "IS", "Value": [1, None, 3]}
    xml = client.get(f"{_url(path)}/metadata",
                     headers={"Accept": 'multipart/related; type="application/dicom+xml"'}).text
    assert ('<PersonName number="1"><Alphabetic><FamilyName>Doe</FamilyName><GivenName>A'
            '</GivenName></Alphabetic></PersonName><PersonName number="2" /><PersonName '
            'number="3"><Alphabetic><FamilyName>Roe</FamilyName>') in xml
