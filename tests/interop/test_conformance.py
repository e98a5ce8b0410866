"""Standards conformance as real clients find it (issue 15), and wildcard searches that cannot
block the server (issue 10, item 5): DCMTK (getscu, movescu, findscu, storescp, dcm2xml),
dicomweb-client, Orthanc as a DIMSE peer and as a DICOMweb client, and curl.

One ImageShare server and one Orthanc serve every test of this module.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_auth
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian, generate_uid

from tests.conftest import require, require_tool
from tests.factory import ct_series, us_cine
from tests.multipart_helpers import encode_multipart, parse_multipart
from tests.peers import ADMIN_PASSWORD, OrthancServer, RunningServer, free_port, wait_for_port

pytestmark = pytest.mark.interop

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
NATIVE = "{http://dicom.nema.org/PS3.19/models/NativeDICOM}"
# Study Time and Series Time of five patients, all at full HHMMSS precision but T2 and T3.
TIMES = {"T1": "143000", "T2": "1430", "T3": "143000.5", "T4": "090000", "T5": "235959"}
MODALITY = {"T1": "MR", "T2": "CT", "T3": "US", "T4": "US", "T5": "US"}
# What PS3.4 C.2.2.2 says each key finds.
TIME_KEYS = {
    "143000": {"T1", "T2", "T3"}, "1430": {"T1", "T2", "T3"}, "1430-": {"T1", "T2", "T3", "T5"},
    "143000-": {"T1", "T2", "T3", "T5"}, "143000-150000": {"T1", "T2", "T3"},
    "-1430": {"T1", "T2", "T3", "T4"}, "-143000": {"T1", "T2", "T3", "T4"},
    "143000.5-143000.9": {"T3"}, "09\\2359": {"T4", "T5"}, "14": {"T1", "T2", "T3"},
}
# Keys whose answer Orthanc 1.10 gives exactly so (it compares times as text, which agrees
# with PS3.4 for values stored at the key's own precision).
ORTHANC_AGREES = {"1430-", "143000.5-143000.9"}
LONG_COMMENT = "a" * 10_000
# The DICOMweb clients' account (HTTP Basic): staff, since an administrator without a second
# factor can do nothing but enrol over HTTP Basic.
CLIENT = ("dwclient", "dicomweb-client-password")


@dataclass
class Site:
    server: RunningServer
    orthanc: OrthancServer
    folder: Path
    big_endian_study: str
    big_endian: Path
    companion: Path
    waveform: Path
    cine: Path
    j2k: Path
    receiver_port: int

    def web_client(self) -> DICOMwebClient:
        session = create_session_from_auth(
            requests.auth.HTTPBasicAuth(*CLIENT))
        return DICOMwebClient(url=self.server.dicomweb, session=session)

    def curl(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [require_tool("curl"), "-s", "-u", ":".join(CLIENT), *args],
            capture_output=True, timeout=60)


def _big_endian_study(folder: Path) -> tuple[str, Path, Path]:
    """A study holding an Explicit VR Big Endian MR image beside a little-endian CT slice."""
    ds = dcmread(get_testdata_file("MR_small_bigendian.dcm"))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    study = generate_uid()
    ds.StudyInstanceUID = study
    ds.PatientID = "BIGEND"
    folder.mkdir(parents=True)
    big = folder / "big-endian.dcm"
    ds.save_as(big)
    (companion,) = ct_series(folder / "ct", count=1, patient_id="BIGEND",
                             patient_name=str(ds.PatientName), study_uid=study)
    return study, big, companion


def _prepare(data_dir: Path, files: list[Path], nodes: dict[str, int]) -> None:
    """Register nodes and store files in the server's archive before it starts (quicker
    than a command per node)."""
    from imageshare.app import build_archive
    from imageshare.domain.actors import cli_actor
    from imageshare.exchange.nodes import Node
    from imageshare.settings import load_settings

    archive = build_archive(load_settings({"data_dir": data_dir}, environ={}))
    try:
        archive.users.ensure_admin(ADMIN_PASSWORD)
        archive.users.add(*CLIENT, "radiographer")
        for ae, port in nodes.items():
            archive.nodes.add(Node(ae, "127.0.0.1", port))
        for path in files:
            archive.ingest.store_copy(path, cli_actor())
    finally:
        archive.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Site:
    for tool in ("getscu", "movescu", "findscu", "storescp", "curl", "dcm2xml"):
        require_tool(tool)
    require(shutil.which("Orthanc") is not None, "Orthanc (Debian package orthanc)")
    require(Path(DICOMWEB_PLUGIN).exists(), "Orthanc's DICOMweb plugin (orthanc-dicomweb)")
    folder = tmp_path_factory.mktemp("conformance")
    timed = []
    for patient, value in TIMES.items():
        timed += ct_series(folder / "timed" / patient, count=1, patient_id=patient,
                           StudyTime=value, SeriesTime=value, Modality=MODALITY[patient])
    study, big, companion = _big_endian_study(folder / "big-endian")
    waveform = Path(get_testdata_file("waveform_ecg.dcm"))
    cine = us_cine(folder / "cine", frames=6, patient_id="CINE")
    j2k = Path(get_testdata_file("US1_J2KR.dcm"))
    long_comments = ct_series(folder / "long", count=3, patient_id="REDOS",
                              ImageComments=LONG_COMMENT)
    server = RunningServer(folder / "server-data", extra_env={"IMAGESHARE_DICOM_PROCESSES": "1"})
    # dicomweb-client sends its Host header without the port: URLs come from the public URL.
    server.extra_env["IMAGESHARE_PUBLIC_URL"] = server.url
    receiver_port = free_port()
    _prepare(server.data_dir,
             [*timed, big, companion, waveform, cine, j2k, *long_comments],
             {"FINDSCU": 104, "GETSCU": 104, "MOVESCU": 104, "IMPLICITONLY": receiver_port})
    server.start()
    orthanc = OrthancServer(folder / "orthanc")
    try:
        orthanc.start(
            {"findscu": ["FINDSCU", "127.0.0.1", 104]}, [DICOMWEB_PLUGIN],
            {"DicomWeb": {"Enable": True, "Servers": {
                "imageshare": [server.dicomweb + "/", *CLIENT]}}},
        )
        with orthanc.http() as http:
            for path in timed:
                assert http.post("/instances", content=path.read_bytes()).status_code == 200
        yield Site(server, orthanc, folder, study, big, companion, waveform, cine, j2k,
                   receiver_port)
    finally:
        orthanc.stop()
        server.stop()


def _uids(path: Path) -> tuple[str, str, str]:
    ds = dcmread(path, stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


# -- 1. big endian --------------------------------------------------------------------------


def test_getscu_and_movescu_get_big_endian_instances_converted_for_an_implicit_only_receiver(
    site, tmp_path
):
    originals = {dcmread(p).SOPInstanceUID: dcmread(p) for p in (site.big_endian,
                                                                 site.companion)}
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={site.big_endian_study}"]
    got_dir = tmp_path / "get"
    got_dir.mkdir()
    result = _run("getscu", "+xi", "-aet", "GETSCU", "-aec", site.server.ae_title, "-S",
                  "-od", str(got_dir), *keys, "127.0.0.1", str(site.server.dicom_port))
    assert result.returncode == 0, result.stderr

    moved = tmp_path / "moved"
    moved.mkdir()
    port = site.receiver_port
    scp = subprocess.Popen(["storescp", "+xi", "-aet", "IMPLICITONLY", "-od", str(moved),
                            str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        result = _run("movescu", "-aet", "MOVESCU", "-aem", "IMPLICITONLY", "-aec",
                      site.server.ae_title, "-S", *keys, "127.0.0.1",
                      str(site.server.dicom_port))
        assert result.returncode == 0, result.stderr
        assert "Failed" not in result.stderr, result.stderr
    finally:
        scp.terminate()
        scp.wait(10)
    for received_dir in (got_dir, moved):
        received = {dcmread(p).SOPInstanceUID: dcmread(p) for p in received_dir.iterdir()}
        assert received.keys() == originals.keys(), received_dir.name
        for uid, ds in received.items():
            assert np.array_equal(ds.pixel_array, originals[uid].pixel_array), uid
    assert all(dcmread(p).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
               for p in moved.iterdir())


def test_dicomweb_client_retrieves_a_study_holding_a_big_endian_instance(site):
    client = site.web_client()
    retrieved = {ds.SOPInstanceUID: ds for ds in client.retrieve_study(site.big_endian_study)}
    big = dcmread(site.big_endian)
    assert len(retrieved) == 2
    got = retrieved[big.SOPInstanceUID]
    assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert np.array_equal(got.pixel_array, big.pixel_array)
    as_stored = client.retrieve_instance(*_uids(site.big_endian),
                                         media_types=(("application/dicom", "*"),))
    assert as_stored.file_meta.TransferSyntaxUID == ExplicitVRBigEndian


# -- 2, 3. time and list matching against Orthanc ------------------------------------------


def _findscu(port: int, called: str, level: str, key: str, value: str, out: Path) -> set[str]:
    out.mkdir()
    result = _run("findscu", "-aet", "FINDSCU", "-aec", called, "-S", "-X", "-od", str(out),
                  "-k", f"QueryRetrieveLevel={level}", "-k", f"{key}={value}", "-k",
                  "PatientID", "127.0.0.1", str(port))
    assert result.returncode == 0, result.stderr
    return {dcmread(p).PatientID for p in out.iterdir()} & set(TIMES)


def test_findscu_and_qido_match_times_as_ps34_says_and_find_all_orthanc_finds(site, tmp_path):
    client = site.web_client()
    for number, (key, expected) in enumerate(TIME_KEYS.items()):
        for level, attribute in (("STUDY", "StudyTime"), ("SERIES", "SeriesTime")):
            ours = _findscu(site.server.dicom_port, site.server.ae_title, level, attribute,
                            key, tmp_path / f"is-{number}-{level}")
            theirs = _findscu(site.orthanc.dicom_port, site.orthanc.ae_title, level,
                              attribute, key, tmp_path / f"or-{number}-{level}")
            assert ours == expected, (attribute, key)
            assert theirs <= ours, (attribute, key, theirs)
            if key in ORTHANC_AGREES:
                assert theirs == expected, (attribute, key)
        found = client.search_for_studies(search_filters={"StudyTime": key})
        assert {s["00100020"]["Value"][0] for s in found} & set(TIMES) == expected, key


def test_findscu_and_qido_match_any_of_a_list_of_modalities_as_orthanc_does(site, tmp_path):
    ours = _findscu(site.server.dicom_port, site.server.ae_title, "SERIES", "Modality",
                    "MR\\CT", tmp_path / "ours")
    theirs = _findscu(site.orthanc.dicom_port, site.orthanc.ae_title, "SERIES", "Modality",
                      "MR\\CT", tmp_path / "theirs")
    assert ours == theirs == {"T1", "T2"}
    found = site.web_client().search_for_series(search_filters={"Modality": "MR,CT"})
    assert {s["00080060"]["Value"][0] for s in found} == {"MR", "CT"}


# -- 4. bulk data inside sequences ------------------------------------------------------------


def test_bulk_data_uris_inside_sequences_resolve_through_dicomweb_client(site):
    client = site.web_client()
    original = dcmread(site.waveform)
    meta = client.retrieve_instance_metadata(*_uids(site.waveform))
    item = meta["54000100"]["Value"][0]
    uri = item["54001010"]["BulkDataURI"]
    (data,) = client.retrieve_bulkdata(uri)
    assert data == original.WaveformSequence[0].WaveformData


# -- 5. empty searches -------------------------------------------------------------------------


def test_orthanc_dicomweb_client_reads_empty_searches_as_empty_lists(site):
    with site.orthanc.http() as http:
        for uri, arguments in (("/studies", {"PatientID": "NOBODY"}),
                               (f"/studies/{generate_uid()}/series", {}),
                               (f"/studies/{generate_uid()}/instances", {})):
            response = http.post("/dicom-web/servers/imageshare/qido",
                                 json={"Uri": uri, "Arguments": arguments})
            assert response.status_code == 200, (uri, response.text)
            assert response.json() == []
        response = http.post("/dicom-web/servers/imageshare/qido",
                             json={"Uri": "/studies", "Arguments": {"PatientID": "T1"}})
        assert response.status_code == 200 and len(response.json()) == 1


# -- 6. negotiation -----------------------------------------------------------------------------


def _status(site: Site, accept: str, url: str) -> int:
    result = site.curl("-o", "/dev/null", "-w", "%{http_code}", "-H", f"Accept: {accept}", url)
    return int(result.stdout)


def test_curl_gets_dicom_xml_where_asked_and_406_for_what_cannot_be_served(site, tmp_path):
    base = site.server.dicomweb
    study, series, sop = _uids(site.j2k)
    instance = f"{base}/studies/{study}/series/{series}/instances/{sop}"
    for accept, url in (("text/html", f"{base}/studies"), ("image/jpeg", f"{base}/studies"),
                        ("text/html", f"{instance}/metadata"),
                        ('multipart/related; type="application/dicom"; transfer-syntax=1.2.3.4',
                         instance),
                        ("image/jpeg", instance),
                        ("text/plain", f"{instance}/bulkdata/7FE00010")):
        assert _status(site, accept, url) == 406, (accept, url)

    # QIDO and metadata in DICOM XML (PS3.19), as DCMTK's dcm2xml writes it.
    for accept in ("application/dicom+xml", 'multipart/related; type="application/dicom+xml"'):
        result = site.curl("-i", "-H", f"Accept: {accept}", f"{instance}/metadata")
        head, _, _ = result.stdout.partition(b"\r\n\r\n")
        assert b'type="application/dicom+xml"' in head
    response = httpx.get(f"{instance}/metadata", auth=CLIENT,
                         headers={"Accept": "application/dicom+xml"})
    ((_headers, body),) = parse_multipart(response)
    ours = ET.fromstring(body)
    dcmtk = ET.fromstring(_run_bytes("dcm2xml", "-nat", "+Xn", str(site.j2k)))
    for tag in ("00100010", "00100020", "00080060", "00280010", "0020000D"):
        mine = ours.find(f"{NATIVE}DicomAttribute[@tag='{tag}']")
        theirs = dcmtk.find(f"{NATIVE}DicomAttribute[@tag='{tag}']")
        assert mine is not None and theirs is not None, tag
        assert mine.get("vr") == theirs.get("vr"), tag
        assert ([e.text for e in mine.iter() if e.text and e.text.strip()]
                == [e.text for e in theirs.iter() if e.text and e.text.strip()]), tag
    searched = httpx.get(f"{base}/studies", params={"PatientID": "T1"},
                         auth=CLIENT,
                         headers={"Accept": 'multipart/related; type="application/dicom+xml"'})
    ((_, study_xml),) = parse_multipart(searched)
    assert ET.fromstring(study_xml).find(f"{NATIVE}DicomAttribute[@tag='00100020']")[0].text \
        == "T1"

    # Bulk data as octet-stream comes decompressed; the stored bitstream when asked.
    pixels = dcmread(site.j2k).pixel_array
    decoded = httpx.get(f"{instance}/bulkdata/7FE00010", auth=CLIENT,
                        headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    ((headers, data),) = parse_multipart(decoded)
    assert headers["content-type"].startswith("application/octet-stream")
    assert data == pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    stored = httpx.get(f"{instance}/bulkdata/7FE00010", auth=CLIENT,
                       headers={"Accept": 'multipart/related; type="image/jp2"'})
    assert parse_multipart(stored)[0][0]["content-type"].startswith("image/jp2")

    # STOW refuses an answer it cannot give before storing anything.
    new = ct_series(tmp_path / "stow", count=1, patient_id="NEGOTIATE")[0]
    body, content_type = encode_multipart([new.read_bytes()])
    (tmp_path / "body").write_bytes(body)
    result = site.curl("-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "-H",
                       f"Content-Type: {content_type}", "-H", "Accept: text/html",
                       "--data-binary", f"@{tmp_path / 'body'}", f"{base}/studies")
    assert result.stdout == b"406"
    assert httpx.get(f"{base}/studies", params={"PatientID": "NEGOTIATE"},
                     auth=CLIENT).json() == []


def _run_bytes(*args: str) -> bytes:
    return subprocess.run(args, capture_output=True, check=True, timeout=60).stdout


# -- 7. rendered resources ---------------------------------------------------------------------


def test_rendered_study_series_and_multi_frame_instance_through_dicomweb_client(site):
    client = site.web_client()
    study, series, sop = _uids(site.cine)
    jpeg = b"\xff\xd8\xff"
    study_image = httpx.get(f"{site.server.dicomweb}/studies/{study}/rendered",
                            auth=CLIENT)
    assert study_image.headers["content-type"] == "image/jpeg"
    assert study_image.content[:3] == jpeg
    assert client.retrieve_series_rendered(study, series)[:3] == jpeg
    assert client.retrieve_series_rendered(study, series, media_types=("image/png",))[:4] == \
        b"\x89PNG"
    assert client.retrieve_instance_rendered(study, series, sop)[:3] == jpeg
    assert client.retrieve_instance_frames_rendered(study, series, sop, [4])[:3] == jpeg
    animated = client.retrieve_instance_rendered(study, series, sop, media_types=("image/gif",))
    from PIL import Image

    assert Image.open(io.BytesIO(animated)).n_frames == 6
    every = httpx.get(f"{site.server.dicomweb}/studies/{study}/series/{series}/instances/{sop}"
                      "/rendered", auth=CLIENT,
                      headers={"Accept": 'multipart/related; type="image/png"'})
    assert [h["content-type"] for h, _ in parse_multipart(every)] == ["image/png"] * 6


# -- 8. DIMSE refusals ---------------------------------------------------------------------------


def test_dcmtk_tools_get_each_services_refusal_status_with_its_reason(site, tmp_path):
    port = str(site.server.dicom_port)
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.3"]
    find = _run("findscu", "-d", "-aet", "STRANGER", "-aec", site.server.ae_title, "-S",
                *keys, "127.0.0.1", port)
    assert "0xc001: Failed: Unable to process" in find.stderr, find.stderr
    assert "not allowed to query: AE title not registered" in find.stderr
    get = _run("getscu", "-d", "-aet", "STRANGER", "-aec", site.server.ae_title, "-S",
               "-od", str(tmp_path), *keys, "127.0.0.1", port)
    assert "0xc001: Failed: Unable to process" in get.stderr, get.stderr
    assert "not allowed to retrieve: AE title not registered" in get.stderr
    move = _run("movescu", "-d", "-aet", "STRANGER", "-aem", "MOVESCU", "-aec",
                site.server.ae_title, "-S", *keys, "127.0.0.1", port)
    assert "0xc514: Failed: Unable to process" in move.stderr, move.stderr
    bad = _run("findscu", "-d", "-aet", "FINDSCU", "-aec", site.server.ae_title, "-S",
               "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyDate=yesterday", "127.0.0.1",
               port)
    assert "0xa900" in bad.stderr and "not a DICOM date" in bad.stderr, bad.stderr


# -- 9. STOW-RS reasons ---------------------------------------------------------------------------


def test_stow_fails_a_changed_duplicate_as_stored_copy_kept_and_names_no_study_unstored(
    site, tmp_path
):
    client = site.web_client()
    (first,) = ct_series(tmp_path / "a", count=1, patient_id="STOW9")
    changed = dcmread(first)
    changed.StudyDescription = "changed afterwards"
    new = dcmread(ct_series(tmp_path / "b", count=1, patient_id="STOW9",
                            study_uid=changed.StudyInstanceUID)[0])
    client.store_instances([dcmread(first)])
    answer = client.store_instances([changed, new])  # 202: one stored, one failed
    (failed,) = answer.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == changed.SOPInstanceUID
    assert failed.FailureReason == 0x0111
    assert [i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence] == [
        new.SOPInstanceUID]
    body, content_type = encode_multipart([first.read_bytes()])
    mismatch = httpx.post(f"{site.server.dicomweb}/studies/{generate_uid()}", content=body,
                          headers={"Content-Type": content_type},
                          auth=CLIENT)
    assert mismatch.status_code == 409
    answer = mismatch.json()
    assert "Value" not in answer.get("00081190", {}), answer
    assert answer["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]


# -- issue 10, item 5: wildcards cannot block the server --------------------------------------


def test_a_hostile_wildcard_search_answers_quickly_and_the_server_keeps_answering(
    site, tmp_path
):
    pattern = "*a*a*a*a*a*a*a*a*b"
    result: dict[str, object] = {}

    def search() -> None:
        started = time.monotonic()
        response = httpx.get(f"{site.server.dicomweb}/instances",
                             params={"ImageComments": pattern, "PatientID": "REDOS"},
                             auth=CLIENT, timeout=60)
        result["status"], result["body"] = response.status_code, response.json()
        result["seconds"] = time.monotonic() - started

    worker = threading.Thread(target=search)
    worker.start()
    latencies = []
    while worker.is_alive() and len(latencies) < 50:
        started = time.monotonic()
        assert httpx.get(site.server.url + "/healthz", timeout=30).status_code == 200
        latencies.append(time.monotonic() - started)
    worker.join(60)
    assert result.get("status") == 200 and result["body"] == []
    assert result["seconds"] < 10, result["seconds"]
    assert max(latencies, default=0) < 2, latencies
    found = httpx.get(f"{site.server.dicomweb}/instances",
                      params={"ImageComments": "*a*a*a*a", "PatientID": "REDOS"},
                      auth=CLIENT, timeout=60).json()
    assert len(found) == 3
    # The same key over C-FIND (same matching engine) answers as quickly.
    out = tmp_path / "find"
    out.mkdir()
    started = time.monotonic()
    find = _run("findscu", "-aet", "FINDSCU", "-aec", site.server.ae_title, "-S", "-X", "-od",
                str(out), "-k", "QueryRetrieveLevel=IMAGE", "-k", "PatientID=REDOS",
                "-k", f"ImageComments={pattern}", "127.0.0.1", str(site.server.dicom_port))
    assert find.returncode == 0, find.stderr
    assert time.monotonic() - started < 10
    assert list(out.iterdir()) == []
