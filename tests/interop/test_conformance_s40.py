"""Conformance defects found in session 40, checked with the clients that hit them (each test
failed before its fix):

- WADO-RS multipart/related answers carried no Content-Location in their parts. PS3.18
  10.4.3.3.5 says bulk data in a multipart response *shall* have a Content-Location that is
  the BulkDataURI its element has in the metadata (the example of B.10 shows it), and 8.6
  asks every payload to name what it is: a client fetching bulk data, frames or the
  instances of a study could not tell which value, frame or instance a part was without
  parsing it. Now each part of bulk data names its BulkDataURI (one part per compressed
  frame: that frame's resource), each part of a frames answer names its frame's URL, and
  each instance of a study, series or instance answer names the instance's WADO-RS URL.

One ImageShare server serves the module; pynetdicom stores the instances and curl is the
DICOMweb client (its output is the wire's bytes, nothing parsed on the way).
"""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests.conftest import require_tool
from tests.factory import ct_series
from tests.peers import RunningServer

pytestmark = pytest.mark.interop

RLE = "1.2.840.10008.1.2.5"


@dataclass
class Site:
    server: RunningServer
    token: str
    ct: Sequence[Dataset]  # one CT series of three images
    rle: Dataset  # a ten-frame MR stored as RLE Lossless


@dataclass
class Part:
    headers: dict[str, str]  # lower-case names
    body: bytes


def _path(ds: Dataset) -> str:
    return "/".join(("studies", ds.StudyInstanceUID, "series", ds.SeriesInstanceUID,
                     "instances", ds.SOPInstanceUID))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[Site]:
    require_tool("curl")
    folder = tmp_path_factory.mktemp("conformance40")
    server = RunningServer(folder / "server-data").start()
    try:
        ct = [dcmread(p) for p in ct_series(folder / "ct", count=3, size=8,
                                            patient_id="S40CT")]
        rle = dcmread(str(get_testdata_file("emri_small_RLE.dcm")))
        ae = AE("PYNETDICOM")
        ae.add_requested_context(CTImageStorage)
        ae.add_requested_context(rle.SOPClassUID, [RLE])
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
        assert assoc.is_established
        for ds in (*ct, rle):
            assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        yield Site(server, server.admin_token(), ct, rle)
    finally:
        server.stop()


def _curl(site: Site, path: str, accept: str) -> tuple[str, bytes]:
    """(Content-Type, body) of a GET of ``path`` under /dicomweb, as curl receives them."""
    result = subprocess.run(
        ["curl", "-s", "-f", "-D", "-", "-H", f"Authorization: Bearer {site.token}",
         "-H", f"Accept: {accept}", f"{site.server.dicomweb}/{path}"],
        capture_output=True, timeout=60, check=True)
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    content_type = next(line.split(b":", 1)[1].strip().decode()
                        for line in head.split(b"\r\n") if line.lower().startswith(
                            b"content-type:"))
    return content_type, body


def _parts(content_type: str, body: bytes) -> list[Part]:
    """The parts of a multipart/related body, read with the standard library's MIME parser."""
    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    assert message.is_multipart(), content_type
    parts = []
    for part in message.iter_parts():
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        parts.append(Part({k.lower(): str(v) for k, v in part.items()}, payload))
    return parts


def test_bulk_data_parts_name_the_bulkdata_uri_the_metadata_gave(site):
    """The pixel data of a CT image fetched at the BulkDataURI its metadata gives comes in
    one part whose Content-Location is that BulkDataURI (PS3.18 10.4.3.3.5; before: none)."""
    path = _path(site.ct[0])
    _type, body = _curl(site, f"{path}/metadata", "application/dicom+json")
    uri = json.loads(body)[0]["7FE00010"]["BulkDataURI"]
    assert uri.startswith(site.server.dicomweb)
    content_type, body = _curl(site, uri.removeprefix(site.server.dicomweb + "/"),
                               'multipart/related; type="application/octet-stream"')
    (part,) = _parts(content_type, body)
    assert part.headers.get("content-location") == uri
    assert part.body == site.ct[0].PixelData


def test_compressed_frames_of_bulk_data_each_name_their_frame(site):
    """A ten-frame RLE image's pixel data asked for as stored (image/dicom-rle) comes one part
    per frame; each part's Content-Location is its frame's resource, and that resource gives
    the same bytes (before: no part said which frame it was)."""
    path = _path(site.rle)
    content_type, body = _curl(site, f"{path}/bulkdata/7FE00010",
                               'multipart/related; type="image/dicom-rle"')
    parts = _parts(content_type, body)
    assert len(parts) == 10
    frames = [f"{site.server.dicomweb}/{path}/frames/{n}" for n in range(1, 11)]
    assert [p.headers.get("content-location") for p in parts] == frames
    content_type, again = _curl(site, f"{path}/frames/7", "image/dicom-rle")
    assert again == parts[6].body


def test_frame_parts_name_their_frame(site):
    """Frames 3 and 1 (in that order) of the RLE image, uncompressed: each part names the frame
    it holds, and its bytes are that frame's pixels (before: no Content-Location)."""
    path = _path(site.rle)
    content_type, body = _curl(site, f"{path}/frames/3,1",
                               'multipart/related; type="application/octet-stream"')
    parts = _parts(content_type, body)
    assert [p.headers.get("content-location") for p in parts] == [
        f"{site.server.dicomweb}/{path}/frames/{n}" for n in (3, 1)]
    pixels = site.rle.pixel_array
    assert parts[0].body == pixels[2].astype("<u2").tobytes()
    assert parts[1].body == pixels[0].astype("<u2").tobytes()


def test_instances_of_a_study_name_their_instance(site):
    """The three CT images of a study retrieved in multipart/related: each part's
    Content-Location is the WADO-RS URL of the instance the part holds (before: none)."""
    ct = site.ct[0]
    content_type, body = _curl(site, f"studies/{ct.StudyInstanceUID}",
                               'multipart/related; type="application/dicom"')
    parts = _parts(content_type, body)
    assert len(parts) == 3
    for part in parts:
        ds = dcmread(io.BytesIO(part.body))
        assert part.headers.get("content-location") == f"{site.server.dicomweb}/{_path(ds)}"
    assert {dcmread(io.BytesIO(p.body)).SOPInstanceUID for p in parts} == {
        d.SOPInstanceUID for d in site.ct}


def test_a_part_location_cannot_split_its_headers():
    """A Content-Location is written as visible ASCII only: a URL with a space, a line break
    or a non-ASCII character (a public URL set so) is percent-encoded, never a second header
    line."""
    from imageshare.web.multipart import part_stream

    body = b"".join(part_stream("b", [("application/octet-stream", b"x",
                                       "http://h/dicom web\r\nX-Evil: 1/é")]))
    head = body.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert head == [b"--b", b"Content-Type: application/octet-stream",
                    b"Content-Location: http://h/dicom%20web%0D%0AX-Evil:%201/%C3%A9"]

