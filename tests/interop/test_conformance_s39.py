"""Conformance defects found in session 39, checked with the clients that hit them (each test
failed before its fix):

- a C-FIND, C-MOVE or C-GET at SERIES or IMAGE level (or at STUDY level of the Patient Root
  model) without the unique key of every level above was answered as if relational queries
  had been negotiated, though nobody had proposed them, with no way to be strict about it:
  PS3.4 C.4.1.2.1, C.4.2.2.1 and C.4.3.2.1 ask a hierarchical request to name each level
  above by one value of its unique key. With ``IMAGESHARE_DICOM_STRICT_HIERARCHY`` (the
  server here; by default such requests are answered, as Orthanc does, which
  tests/interop/test_conformance.py relies on) it is refused with A900 (Identifier does not
  match SOP Class), the missing key named in the Error Comment and the Offending Element,
  as dcm4che's dcmqrscp answers; the relational option, when a requestor proposes it (SOP
  Class Extended Negotiation), is accepted, and such a request is then answered. A viewer's
  usual sequence (STUDY, then SERIES with the study, then IMAGE with study and series) still
  finds every level;
- WADO-RS frames: one frame asked for in a single-part media type (a bare
  ``Accept: application/octet-stream``, ``image/jpeg; transfer-syntax=...50``) came as a
  multipart/related body the client could not read; PS3.18 10.4.4 permits single part for a
  single response item, so one frame comes as one body, and several frames asked for in
  single-part types only are refused 406 saying so. ``image/jpeg`` alone (JPEG Lossless,
  which is not written here) stays 406, and the answer now names the lossy baseline syntax
  and the frame's rendered resource.

One ImageShare server serves the module; DCMTK's findscu, getscu, movescu, storescp and curl,
and pynetdicom (for the extended negotiation, which the DCMTK tools do not propose) are the
peers.
"""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
from pynetdicom.sop_class import (
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    UltrasoundMultiFrameImageStorage,
)

from tests.conftest import require_tool
from tests.factory import ct_series, us_cine
from tests.peers import RunningServer, free_port, wait_for_port

pytestmark = pytest.mark.interop

CALLER = "S39SCU"
IDENTIFIER_DOES_NOT_MATCH = 0xA900
CINE_FRAMES = 3
BASELINE = "1.2.840.10008.1.2.4.50"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@dataclass
class Site:
    server: RunningServer
    ct: list[Dataset]  # one CT series of three images (patient S39CT)
    cine: str  # studies/{study}/series/{series}/instances/{instance} of an RGB US cine
    cine_pixels: np.ndarray
    jpeg: str  # the same path of an instance stored as JPEG baseline


def _path(ds: Dataset) -> str:
    return "/".join(("studies", ds.StudyInstanceUID, "series", ds.SeriesInstanceUID,
                     "instances", ds.SOPInstanceUID))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[Site]:
    for tool in ("findscu", "getscu", "movescu", "storescp", "curl"):
        require_tool(tool)
    folder = tmp_path_factory.mktemp("conformance39")
    server = RunningServer(folder / "server-data",
                           extra_env={"IMAGESHARE_DICOM_PROCESSES": "1",
                                      "IMAGESHARE_DICOM_STRICT_HIERARCHY": "1"}).start()
    try:
        server.cli("node", "add", CALLER, "--host", "127.0.0.1", "--port", "104")
        ct = [dcmread(p) for p in ct_series(folder / "ct", count=3, size=8,
                                            patient_id="S39CT")]
        cine = dcmread(us_cine(folder / "cine", frames=CINE_FRAMES, rows=16, cols=24,
                               patient_id="S39CINE"))
        jpeg = dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
        ae = AE("PYNETDICOM")
        ae.add_requested_context(CTImageStorage)
        ae.add_requested_context(UltrasoundMultiFrameImageStorage)
        ae.add_requested_context(jpeg.SOPClassUID, [jpeg.file_meta.TransferSyntaxUID])
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
        assert assoc.is_established
        for ds in (*ct, cine, jpeg):
            assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        yield Site(server, ct, _path(cine), cine.pixel_array, _path(jpeg))
    finally:
        server.stop()


def _findscu(site: Site, out: Path, *keys: str, root: str = "-S"
             ) -> tuple[list[Dataset], str]:
    """What findscu finds (its -X files) and its debug log (which shows the final status,
    Error Comment and Offending Element)."""
    out.mkdir()
    result = subprocess.run(
        ["findscu", "-d", "-aet", CALLER, "-aec", site.server.ae_title, root, "-X", "-od",
         str(out), *[a for key in keys for a in ("-k", key)],
         "127.0.0.1", str(site.server.dicom_port)],
        capture_output=True, text=True, timeout=60)
    return [dcmread(p) for p in sorted(out.iterdir())], result.stdout + result.stderr


def test_findscu_is_answered_level_by_level_and_refused_without_the_levels_above(
        site, tmp_path):
    """A viewer's sequence (STUDY by patient, SERIES with the Study Instance UID, IMAGE with
    Study and Series Instance UIDs; and on the Patient Root model with the Patient ID) finds
    every level. A SERIES or IMAGE query leaving out a level above, or giving it with a
    wildcard, and a Patient Root STUDY query without the Patient ID, are refused A900 with
    the missing key named (before: each was answered, as a relational query)."""
    ct = site.ct[0]
    (study,), _ = _findscu(site, tmp_path / "study", "QueryRetrieveLevel=STUDY",
                           "PatientID=S39CT", "StudyInstanceUID")
    assert study.StudyInstanceUID == ct.StudyInstanceUID
    (series,), _ = _findscu(site, tmp_path / "series", "QueryRetrieveLevel=SERIES",
                            f"StudyInstanceUID={ct.StudyInstanceUID}", "SeriesInstanceUID")
    assert series.SeriesInstanceUID == ct.SeriesInstanceUID
    images, _ = _findscu(site, tmp_path / "image", "QueryRetrieveLevel=IMAGE",
                         f"StudyInstanceUID={ct.StudyInstanceUID}",
                         f"SeriesInstanceUID={ct.SeriesInstanceUID}", "SOPInstanceUID")
    assert sorted(i.SOPInstanceUID for i in images) == sorted(d.SOPInstanceUID
                                                              for d in site.ct)
    patient_root, _ = _findscu(site, tmp_path / "patient-root", "QueryRetrieveLevel=IMAGE",
                               "PatientID=S39CT", f"StudyInstanceUID={ct.StudyInstanceUID}",
                               f"SeriesInstanceUID={ct.SeriesInstanceUID}", "SOPInstanceUID",
                               root="-P")
    assert len(patient_root) == 3

    refused = {
        "series-by-patient": (("QueryRetrieveLevel=SERIES", "PatientID=S39CT",
                               "SeriesInstanceUID"), "-S",
                              "Missing StudyInstanceUID (0020,000D) for a SERIES level query"),
        "image-without-series": (("QueryRetrieveLevel=IMAGE",
                                  f"StudyInstanceUID={ct.StudyInstanceUID}",
                                  "SOPInstanceUID"), "-S",
                                 "Missing SeriesInstanceUID (0020,000E) for an IMAGE level "
                                 "query"),
        "study-wildcard": (("QueryRetrieveLevel=SERIES", "StudyInstanceUID=1.2.*",
                            "SeriesInstanceUID"), "-S",
                           "StudyInstanceUID (0020,000D): give one value, no wildcards"),
        "patient-root-study": (("QueryRetrieveLevel=STUDY", "StudyDate=",
                                "StudyInstanceUID"), "-P",
                               "Missing PatientID (0010,0020) for a STUDY level query"),
    }
    for name, (keys, root, comment) in refused.items():
        found, log = _findscu(site, tmp_path / name, *keys, root=root)
        assert found == [], name
        assert "Identifier Does Not Match SOP Class" in log or "a900" in log.lower(), (
            name, log[-2000:])
        assert comment in log, (name, log[-2000:])


def _relational(model: str) -> SOPClassExtendedNegotiation:
    item = SOPClassExtendedNegotiation()
    item.sop_class_uid = model
    item.service_class_application_information = b"\x01\x01"  # relational, date-time
    return item


def _find(assoc, model: str, **keys: str) -> list[tuple[int, Dataset | None]]:
    query = Dataset()
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    return [(int(status.Status), identifier)
            for status, identifier in assoc.send_c_find(query, model)]


def test_relational_queries_are_answered_where_pynetdicom_negotiated_them(site):
    """A requestor proposing relational-queries (SOP Class Extended Negotiation) gets it
    accepted (and date-time matching answered 0, not supported), and its SERIES query by
    Patient ID alone is answered; on an association without it, the same query is refused
    A900 with the Offending Element naming Study Instance UID (before: no answer to the
    negotiation, and both queries answered)."""
    ct = site.ct[0]
    keys = {"QueryRetrieveLevel": "SERIES", "PatientID": "S39CT", "SeriesInstanceUID": ""}
    ae = AE(CALLER)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", site.server.dicom_port, ae_title=site.server.ae_title,
                         ext_neg=[_relational(StudyRootQueryRetrieveInformationModelFind),
                                  _relational(PatientRootQueryRetrieveInformationModelFind)])
    assert assoc.is_established
    try:
        assert assoc.acceptor.sop_class_extended == {
            StudyRootQueryRetrieveInformationModelFind: b"\x01\x00",
            PatientRootQueryRetrieveInformationModelFind: b"\x01\x00"}
        answered = _find(assoc, StudyRootQueryRetrieveInformationModelFind, **keys)
        assert [(s, i.SeriesInstanceUID if i else None) for s, i in answered] == [
            (0xFF00, ct.SeriesInstanceUID), (0x0000, None)]
        by_name = _find(assoc, PatientRootQueryRetrieveInformationModelFind,
                        QueryRetrieveLevel="STUDY", PatientName="", StudyDate="",
                        StudyInstanceUID=ct.StudyInstanceUID)
        assert [s for s, _ in by_name] == [0xFF00, 0x0000]
    finally:
        assoc.release()

    ae = AE(CALLER)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", site.server.dicom_port, ae_title=site.server.ae_title)
    assert assoc.is_established
    try:
        assert assoc.acceptor.sop_class_extended == {}
        query = Dataset()
        for keyword, value in keys.items():
            setattr(query, keyword, value)
        ((status, identifier),) = list(assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind))
        assert status.Status == IDENTIFIER_DOES_NOT_MATCH and identifier is None
        assert status.ErrorComment == (
            "Missing StudyInstanceUID (0020,000D) for a SERIES level query")
        assert status.OffendingElement == 0x0020000D
    finally:
        assoc.release()


def test_getscu_and_movescu_of_a_series_without_its_study_are_refused_naming_it(
        site, tmp_path):
    """getscu and movescu asking for a series by its Series Instance UID alone are refused
    A900 naming the Study Instance UID, and nothing is sent (before: the series was sent,
    as a relational retrieval nobody negotiated); with the study named, the series comes."""
    ct = site.ct[0]
    series_only = ["-k", "QueryRetrieveLevel=SERIES",
                   "-k", f"SeriesInstanceUID={ct.SeriesInstanceUID}"]
    hierarchical = [*series_only, "-k", f"StudyInstanceUID={ct.StudyInstanceUID}"]
    comment = "Missing StudyInstanceUID (0020,000D) for a SERIES level retrieve"

    def get(name: str, keys: list[str]) -> tuple[list[str], str]:
        out = tmp_path / name
        out.mkdir()
        result = subprocess.run(
            ["getscu", "-d", "-aet", CALLER, "-aec", site.server.ae_title, "-S", "-od",
             str(out), *keys, "127.0.0.1", str(site.server.dicom_port)],
            capture_output=True, text=True, timeout=120)
        return ([dcmread(p).SOPInstanceUID for p in sorted(out.iterdir())],
                result.stdout + result.stderr)

    got, log = get("get-refused", series_only)
    assert got == [] and comment in log, log[-2000:]
    got, log = get("get", hierarchical)
    assert sorted(got) == sorted(d.SOPInstanceUID for d in site.ct), log[-2000:]

    port = free_port()
    received = tmp_path / "moved"
    received.mkdir()
    storescp = subprocess.Popen(["storescp", "-aet", "S39SCP", "-od", str(received), str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        site.server.cli("node", "add", "S39SCP", "--host", "127.0.0.1", "--port", str(port))

        def move(keys: list[str]) -> str:
            result = subprocess.run(
                ["movescu", "-d", "-aet", CALLER, "-aem", "S39SCP",
                 "-aec", site.server.ae_title, "-S", *keys,
                 "127.0.0.1", str(site.server.dicom_port)],
                capture_output=True, text=True, timeout=120)
            return result.stdout + result.stderr

        log = move(series_only)
        assert comment in log, log[-2000:]
        assert list(received.iterdir()) == []
        log = move(hierarchical)
        assert sorted(dcmread(p).SOPInstanceUID for p in received.iterdir()) == sorted(
            d.SOPInstanceUID for d in site.ct), log[-2000:]
    finally:
        storescp.terminate()
        storescp.wait(10)


def _curl(site: Site, url: str, accept: str, out: Path) -> tuple[int, str]:
    result = subprocess.run(
        ["curl", "-s", "-o", str(out), "-w", "%{http_code} %{content_type}",
         "-H", f"Authorization: Bearer {site.server.admin_token()}", "-H", f"Accept: {accept}",
         f"{site.server.dicomweb}/{url}"],
        capture_output=True, text=True, timeout=60)
    code, _, content_type = result.stdout.partition(" ")
    return int(code), content_type


def test_curl_gets_one_frame_as_a_single_part_body(site, tmp_path):
    """One frame asked for as a bare application/octet-stream comes as that frame's raw
    pixels, one body; as image/jpeg with the baseline syntax named, one JPEG; a frame of an
    instance stored as JPEG, asked for as image/jpeg, comes as stored (before: each came
    wrapped in multipart/related, which curl saves as a MIME document, not a frame)."""
    out = tmp_path / "frame"
    code, kind = _curl(site, f"{site.cine}/frames/2", "application/octet-stream", out)
    assert (code, kind) == (200, f"application/octet-stream; transfer-syntax={EXPLICIT_LE}")
    assert out.read_bytes() == site.cine_pixels[1].tobytes()

    code, kind = _curl(site, f"{site.cine}/frames/3",
                       f"image/jpeg; transfer-syntax={BASELINE}", out)
    assert (code, kind) == (200, f"image/jpeg; transfer-syntax={BASELINE}")
    with Image.open(io.BytesIO(out.read_bytes())) as image:
        assert image.format == "JPEG"
        seen = np.asarray(image.convert("RGB")).astype(int)
    assert np.abs(seen - site.cine_pixels[2].astype(int)).mean() < 3

    code, kind = _curl(site, f"{site.jpeg}/frames/1", "image/jpeg", out)
    assert (code, kind) == (200, f"image/jpeg; transfer-syntax={BASELINE}")
    assert out.read_bytes()[:3] == b"\xff\xd8\xff"
    assert out.read_bytes().rstrip(b"\x00") == b"".join(
        _stored_frames(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))).rstrip(b"\x00")


def _stored_frames(path: str) -> list[bytes]:
    from pydicom.encaps import generate_frames

    ds = dcmread(path)
    return list(generate_frames(ds.PixelData, number_of_frames=1))


def test_curl_is_told_what_to_ask_for_when_frames_cannot_come_single_part(site, tmp_path):
    """Several frames asked for in single-part types only are 406, saying they come in
    multipart/related only (before: a multipart answer to a client that asked for none);
    image/jpeg alone for a frame stored uncompressed is 406 naming the baseline syntax and
    the frame's /rendered resource (before: neither single part nor the rendered resource
    was named)."""
    out = tmp_path / "answer"
    code, kind = _curl(site, f"{site.cine}/frames/1,2", "application/octet-stream", out)
    assert (code, kind) == (406, "application/problem+json")
    assert "several frames come in multipart/related only" in json.loads(
        out.read_text())["detail"]
    code, _kind = _curl(site, f"{site.cine}/frames/1,2",
                        'application/octet-stream, multipart/related; '
                        'type="application/octet-stream";q=0.5', out)
    assert code == 200  # the multipart range further down the list answers

    code, kind = _curl(site, f"{site.cine}/frames/1", "image/jpeg", out)
    assert (code, kind) == (406, "application/problem+json")
    detail = json.loads(out.read_text())["detail"]
    assert f"image/jpeg; transfer-syntax={BASELINE}" in detail
    assert "/frames/{n}/rendered" in detail
