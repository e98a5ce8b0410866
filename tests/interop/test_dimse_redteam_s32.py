"""DIMSE defects a demanding real client hits, found by red-teaming the listener with DCMTK's
tools and pynetdicom (each test failed before its fix):

- a C-GET requester preferring lossy JPEG (``getscu +xy``) proposes JPEG Baseline first and
  the uncompressed syntaxes after it: the listener took JPEG Baseline for every SOP class and
  then failed every instance stored uncompressed, which it cannot encode in that syntax;
- two C-MOVEs to the same destination at once: each chose the syntax to send in from the
  contexts of whichever association to that destination it found first, so an instance that
  had to be decompressed for the destination was sent compressed and failed;
- a person name stored with its empty trailing components (``CARET^ANNA^^^``, as worklist-fed
  modalities write it) was not found by ``Caret^Anna`` or ``*^ANNA``, nor ``Doe^Jane`` by
  ``DOE^JANE^^^`` (PS3.5 6.2.1: both spell the same name);
- one instance whose stored file could not be read ended a C-MOVE or C-GET at once (C511 /
  C411, its UID not listed as failed, the instances after it never sent); now its
  sub-operation fails alone;
- a C-MOVE / C-GET at SERIES or IMAGE level without the level's unique key (Series or SOP
  Instance UID) answered Success with nothing sent; now A900 naming the missing key, as at
  STUDY level;
- one study in a remote PACS's C-FIND answer holding a value that does not fit its VR (an
  IS of ``abc``) made ImageShare's federated search (scu.find_studies) raise, losing that
  site's whole answer; now only the bad value is left out;
- a C-MOVE / C-GET at PATIENT level naming an Issuer of Patient ID moved the patients of every
  issuer with that Patient ID (another patient's images to the destination), where a C-FIND
  with the same keys finds only the one patient.

One ImageShare server (and one DCMTK storescp as the C-MOVE destination) serves the module.
"""

from __future__ import annotations

import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
)

from imageshare.dicom.scu import DimseSites
from imageshare.exchange.nodes import Node
from tests.conftest import require_tool
from tests.factory import ct_series
from tests.peers import RunningServer, free_port, wait_for_port

pytestmark = pytest.mark.interop


@dataclass
class Site:
    server: RunningServer
    folder: Path
    destination: Path  # where the storescp registered as STORESCP writes what it receives
    ct_study: str  # a CT study of three instances stored Explicit VR Little Endian
    long_study: str  # a CT study of eight instances
    jpeg_study: str  # one secondary capture instance stored JPEG Baseline
    damaged: list[Path]  # a study of three instances, the second's stored file to be hidden


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=cwd)


def _received(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[Site]:
    for tool in ("findscu", "getscu", "movescu", "storescu", "storescp", "dcmsend"):
        require_tool(tool)
    folder = tmp_path_factory.mktemp("redteam")
    server = RunningServer(folder / "server-data",
                           extra_env={"IMAGESHARE_DICOM_PROCESSES": "1"}).start()
    destination = folder / "received"
    destination.mkdir()
    scp_port = free_port()
    storescp = subprocess.Popen(
        ["storescp", "-aet", "STORESCP", "-od", str(destination), str(scp_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(scp_port)
        for ae in ("FINDSCU", "GETSCU", "MOVESCU"):
            server.cli("node", "add", ae, "--host", "127.0.0.1", "--port", "104")
        server.cli("node", "add", "STORESCP", "--host", "127.0.0.1", "--port", str(scp_port))
        ct = ct_series(folder / "ct", count=3, patient_id="PLAIN")
        long = ct_series(folder / "long", count=8, patient_id="LONG")
        damaged = ct_series(folder / "damaged", count=3, patient_id="DAMAGED")
        caret = ct_series(folder / "caret", count=1, patient_id="CARET",
                          patient_name="CARET^ANNA^^^", OperatorsName="OPER^OLGA^^^")
        jpeg = Path(str(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")))
        sent = _run("dcmsend", "-aet", "DCMSEND", "-aec", server.ae_title, "127.0.0.1",
                    str(server.dicom_port), str(jpeg))
        assert sent.returncode == 0, sent.stderr
        same_id_a = ct_series(folder / "issuer-a", count=1, patient_id="SAMEID",
                              patient_name="Alpha^Ann", IssuerOfPatientID="HOSPA")
        same_id_b = ct_series(folder / "issuer-b", count=2, patient_id="SAMEID",
                              patient_name="Beta^Bob", IssuerOfPatientID="HOSPB")
        stored = [*ct, *long, *damaged, *caret, *same_id_a, *same_id_b]
        result = _run("storescu", "-aet", "STORESCU", "-aec", server.ae_title, "127.0.0.1",
                      str(server.dicom_port), *map(str, stored))
        assert result.returncode == 0, result.stderr
        yield Site(server, folder, destination, str(dcmread(ct[0]).StudyInstanceUID),
                   str(dcmread(long[0]).StudyInstanceUID), str(dcmread(jpeg).StudyInstanceUID),
                   damaged)
    finally:
        storescp.terminate()
        storescp.wait(10)
        server.stop()


def _clear(folder: Path) -> None:
    for path in _received(folder):
        path.unlink()


def test_getscu_preferring_lossy_jpeg_still_gets_instances_stored_uncompressed(site, tmp_path):
    """``getscu +xy`` proposes JPEG Baseline, then Explicit and Implicit VR Little Endian, for
    each storage SOP class (SCP role): the listener must accept a syntax it can send every
    stored instance in, not the first one, which it cannot produce from uncompressed pixels."""
    out = tmp_path / "got"
    out.mkdir()
    result = _run("getscu", "-v", "+xy", "-od", str(out), "-aet", "GETSCU", "-aec",
                  site.server.ae_title, "-S", "-k", "QueryRetrieveLevel=STUDY",
                  "-k", f"StudyInstanceUID={site.ct_study}", "127.0.0.1",
                  str(site.server.dicom_port))
    assert "Number of Failed Suboperations    : 0" in result.stderr, result.stderr
    assert "Number of Completed Suboperations : 3" in result.stderr, result.stderr
    files = _received(out)
    assert len(files) == 3
    for path in files:
        ds = dcmread(path)
        assert ds.StudyInstanceUID == site.ct_study
        assert not ds.file_meta.TransferSyntaxUID.is_compressed
        assert ds.pixel_array.shape == (64, 64)


@pytest.mark.parametrize("tool", ["movescu", "getscu"])
def test_a_patient_level_retrieve_naming_an_issuer_takes_only_that_issuers_patient(
        site, tmp_path, tool):
    """PatientID SAMEID is held by two patients of two issuers: a retrieve naming HOSPA takes
    the one instance of Alpha^Ann (what findscu with the same keys finds), never Beta^Bob's."""
    found = _run("findscu", "-aet", "FINDSCU", "-aec", site.server.ae_title, "-P",
                 "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID=SAMEID",
                 "-k", "IssuerOfPatientID=HOSPA", "-k", "PatientName", "127.0.0.1",
                 str(site.server.dicom_port))
    assert "Alpha^Ann" in found.stderr and "Beta^Bob" not in found.stderr, found.stderr
    keys = ["-P", "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID=SAMEID",
            "-k", "IssuerOfPatientID=HOSPA"]
    if tool == "movescu":
        _clear(site.destination)
        result = _run("movescu", "-aet", "MOVESCU", "-aec", site.server.ae_title,
                      "-aem", "STORESCP", *keys, "127.0.0.1", str(site.server.dicom_port))
        assert result.returncode == 0, result.stderr
        files = _received(site.destination)
    else:
        out = tmp_path / "got"
        out.mkdir()
        result = _run("getscu", "-aet", "GETSCU", "-aec", site.server.ae_title, "-od",
                      str(out), *keys, "127.0.0.1", str(site.server.dicom_port))
        assert result.returncode == 0, result.stderr
        files = _received(out)
    names = sorted(str(dcmread(p).PatientName) for p in files)
    assert names == ["Alpha^Ann"]
    # Without an issuer, the Patient ID alone names both patients, as C-FIND finds both.
    if tool == "getscu":
        every = tmp_path / "every"
        every.mkdir()
        result = _run("getscu", "-aet", "GETSCU", "-aec", site.server.ae_title, "-od",
                      str(every), "-P", "-k", "QueryRetrieveLevel=PATIENT",
                      "-k", "PatientID=SAMEID", "127.0.0.1", str(site.server.dicom_port))
        assert result.returncode == 0, result.stderr
        assert len(_received(every)) == 3


def test_two_moves_to_one_destination_at_once_each_send_in_what_their_own_association_took(
        site):
    """A destination taking CT and secondary capture uncompressed only (a slow one: each CT
    takes a while) receives a long CT move; while it runs, a move of a JPEG Baseline secondary
    capture to the same destination must decompress it for its own association (which took
    only uncompressed secondary capture), not send it as stored because the other move's
    association took nothing of secondary capture."""
    received: list[tuple[str, str]] = []
    first_ct = threading.Event()

    def on_store(event):
        received.append((str(event.request.AffectedSOPClassUID),
                         str(event.context.transfer_syntax)))
        if event.request.AffectedSOPClassUID == CTImageStorage:
            first_ct.set()
            threading.Event().wait(0.4)
        return 0x0000

    peer = AE(ae_title="SLOWPEER")
    peer.add_supported_context(CTImageStorage)
    peer.add_supported_context(SecondaryCaptureImageStorage)
    port = free_port()
    server = peer.start_server(("127.0.0.1", port), block=False,
                               evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        site.server.cli("node", "add", "SLOWPEER", "--host", "127.0.0.1", "--port", str(port))

        def move(study: str) -> subprocess.CompletedProcess[str]:
            return _run("movescu", "-v", "-aet", "MOVESCU", "-aec", site.server.ae_title,
                        "-aem", "SLOWPEER", "-S", "-k", "QueryRetrieveLevel=STUDY",
                        "-k", f"StudyInstanceUID={study}", "127.0.0.1",
                        str(site.server.dicom_port))

        results: dict[str, subprocess.CompletedProcess[str]] = {}
        long_move = threading.Thread(
            target=lambda: results.setdefault("long", move(site.long_study)))
        long_move.start()
        assert first_ct.wait(60), "the long move never reached the destination"
        results["jpeg"] = move(site.jpeg_study)
        long_move.join(120)
    finally:
        assert server is not None
        server.shutdown()
    assert "Final Move Response (Success)" in results["jpeg"].stderr, results["jpeg"].stderr
    assert "Final Move Response (Success)" in results["long"].stderr, results["long"].stderr
    assert (SecondaryCaptureImageStorage, "1.2.840.10008.1.2.1") in received \
        or (SecondaryCaptureImageStorage, "1.2.840.10008.1.2") in received
    assert sum(1 for cls, _ in received if cls == CTImageStorage) == 8


def _found_patient_ids(site: Site, level: str, *keys: str) -> list[str]:
    result = _run("findscu", "-aet", "FINDSCU", "-aec", site.server.ae_title, "-S",
                  "-k", f"QueryRetrieveLevel={level}", "-k", "PatientID", *keys,
                  "127.0.0.1", str(site.server.dicom_port))
    assert result.returncode == 0, result.stderr
    return sorted(line.split("[", 1)[1].split("]", 1)[0].strip()
                  for line in result.stderr.splitlines() if "(0010,0020) LO [" in line)


@pytest.mark.parametrize(("level", "key", "expected"), [
    ("STUDY", "PatientName=Caret^Anna", ["CARET"]),
    ("STUDY", "PatientName=CARET^ANNA^^^", ["CARET"]),
    ("STUDY", "PatientName=*^ANNA", ["CARET"]),
    ("STUDY", "PatientName=C?RET^ANNA^", ["CARET"]),
    ("SERIES", "OperatorsName=Oper^Olga", ["CARET"]),
    ("SERIES", "OperatorsName=*^OLGA", ["CARET"]),
    ("STUDY", "PatientName=DOE^JANE^^^", ["PLAIN"]),
    ("STUDY", "PatientName=CARET^ANN", []),
    ("STUDY", "PatientName=CARET^ANNA^X", []),
])
def test_empty_trailing_name_components_are_insignificant_in_c_find(
        site, level, key, expected):
    """PS3.5 6.2.1: ``CARET^ANNA^^^`` and ``CARET^ANNA`` are the same name; the key matches
    it either way, and still nothing that differs in a component."""
    found = _found_patient_ids(site, level, "-k", key)
    assert [pid for pid in found if pid in ("CARET", "PLAIN")] == expected


def test_an_image_level_query_matching_on_stored_headers_is_bounded_before_reading(
        tmp_path):
    """An IMAGE-level key no index column holds (Image Type) is matched on each candidate's
    stored header: over the whole archive that read every instance file for one C-FIND. A
    query with more candidates than ten times the answer's maximum is refused A700 at once,
    naming how to narrow it; the same key within one study is still answered."""
    require_tool("findscu")
    require_tool("storescu")
    server = RunningServer(tmp_path / "server-data", extra_env={
        "IMAGESHARE_DICOM_PROCESSES": "1", "IMAGESHARE_QIDO_MAX_LIMIT": "2"}).start()
    try:
        server.cli("node", "add", "FINDSCU", "--host", "127.0.0.1", "--port", "104")
        many = ct_series(tmp_path / "many", count=12, size=16, patient_id="MANY",
                         ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])
        more = ct_series(tmp_path / "more", count=12, size=16, patient_id="MORE",
                         ImageType=["DERIVED", "SECONDARY"])
        result = _run("storescu", "-aet", "STORESCU", "-aec", server.ae_title, "127.0.0.1",
                      str(server.dicom_port), *map(str, [*many, *more]))
        assert result.returncode == 0, result.stderr

        def image_query(*keys: str) -> str:
            found = _run("findscu", "-d", "-aet", "FINDSCU", "-aec", server.ae_title, "-S",
                         "-k", "QueryRetrieveLevel=IMAGE", "-k", "SOPInstanceUID", *keys,
                         "127.0.0.1", str(server.dicom_port))
            return found.stderr

        broad = image_query("-k", "ImageType=DERIVED*")
        assert "0xa700" in broad, broad
        assert "too broad: over 20 instances; narrow by patient/study/series" in broad, broad
        assert "Find Response 1" not in broad, broad  # refused before any match was sent
        study = str(dcmread(more[0]).StudyInstanceUID)
        narrow = image_query("-k", "ImageType=DERIVED*", "-k", f"StudyInstanceUID={study}",
                             "-k", "InstanceNumber=1")
        assert "0x0000: Success" in narrow, narrow
        assert "Find Response 1\n" in narrow and "Find Response 2" not in narrow, narrow
    finally:
        server.stop()


@pytest.mark.parametrize("tool", ["movescu", "getscu"])
def test_a_patient_level_retrieve_on_the_study_root_model_is_refused(site, tmp_path, tool):
    """The Study Root models have no PATIENT level (PS3.4 C.6.2): C-FIND refused such a query
    A900, but C-MOVE and C-GET took it and sent every study of the patient."""
    keys = ["-S", "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID=PLAIN"]
    if tool == "movescu":
        _clear(site.destination)
        result = _run("movescu", "-d", "-aet", "MOVESCU", "-aec", site.server.ae_title,
                      "-aem", "STORESCP", *keys, "127.0.0.1", str(site.server.dicom_port))
        files = _received(site.destination)
    else:
        out = tmp_path / "got"
        out.mkdir()
        result = _run("getscu", "-d", "-aet", "GETSCU", "-aec", site.server.ae_title, "-od",
                      str(out), *keys, "127.0.0.1", str(site.server.dicom_port))
        files = _received(out)
    assert "0xa900" in result.stderr, result.stderr
    assert "the Study Root model has no PATIENT level" in result.stderr, result.stderr
    assert files == []


@pytest.mark.parametrize("tool", ["movescu", "getscu"])
def test_an_instance_whose_stored_file_cannot_be_read_fails_alone(site, tmp_path, tool):
    """The second of three instances has lost its stored file: the retrieve sends the other
    two and ends B000 (Warning) with the lost one in the Failed SOP Instance UID List."""
    first, lost, last = (dcmread(p) for p in site.damaged)
    index = sqlite3.connect(site.server.data_dir / "index.sqlite")
    try:
        (blob_key,) = index.execute("SELECT blob_key FROM instances WHERE sop_uid = ?",
                                    (str(lost.SOPInstanceUID),)).fetchone()
    finally:
        index.close()
    (blob,) = [p for p in site.server.data_dir.rglob(blob_key) if p.is_file()]
    hidden = blob.with_name(blob.name + ".hidden")
    blob.rename(hidden)
    keys = ["-S", "-k", "QueryRetrieveLevel=STUDY",
            "-k", f"StudyInstanceUID={first.StudyInstanceUID}"]
    try:
        if tool == "movescu":
            _clear(site.destination)
            result = _run("movescu", "-d", "-aet", "MOVESCU", "-aec", site.server.ae_title,
                          "-aem", "STORESCP", *keys, "127.0.0.1", str(site.server.dicom_port))
            files = _received(site.destination)
        else:
            out = tmp_path / "got"
            out.mkdir()
            result = _run("getscu", "-d", "-aet", "GETSCU", "-aec", site.server.ae_title,
                          "-od", str(out), *keys, "127.0.0.1", str(site.server.dicom_port))
            files = _received(out)
    finally:
        hidden.rename(blob)
    assert "0xb000" in result.stderr, result.stderr
    if tool == "movescu":  # (getscu does not show the final response's identifier)
        failed = [line for line in result.stderr.splitlines()
                  if "FailedSOPInstanceUIDList" in line]
        assert failed and str(lost.SOPInstanceUID) in failed[-1], result.stderr
    else:
        assert "Number of Failed Suboperations    : 1" in result.stderr, result.stderr
    assert sorted(str(dcmread(p).SOPInstanceUID) for p in files) == sorted(
        [str(first.SOPInstanceUID), str(last.SOPInstanceUID)])


@pytest.mark.parametrize("tool", ["movescu", "getscu"])
@pytest.mark.parametrize(("level", "missing"), [
    ("SERIES", "SeriesInstanceUID"), ("IMAGE", "SOPInstanceUID"),
    ("STUDY", "StudyInstanceUID")])
def test_a_retrieve_without_the_unique_key_of_its_level_is_refused_naming_it(
        site, tmp_path, tool, level, missing):
    """PS3.4 C.4.2.2.1: a retrieve names the unique key of its level. Without it the listener
    answered Success with no sub-operation, which a requester takes for "all sent"."""
    keys = ["-S", "-k", f"QueryRetrieveLevel={level}"]
    if level != "STUDY":
        keys += ["-k", f"StudyInstanceUID={site.ct_study}"]
    if tool == "movescu":
        result = _run("movescu", "-d", "-aet", "MOVESCU", "-aec", site.server.ae_title,
                      "-aem", "STORESCP", *keys, "127.0.0.1", str(site.server.dicom_port))
    else:
        out = tmp_path / "got"
        out.mkdir()
        result = _run("getscu", "-d", "-aet", "GETSCU", "-aec", site.server.ae_title, "-od",
                      str(out), *keys, "127.0.0.1", str(site.server.dicom_port))
        assert _received(out) == []
    assert "0xa900" in result.stderr, result.stderr
    assert f"a {level} level retrieve names its {missing}" in result.stderr, result.stderr


def test_a_remote_study_with_a_malformed_value_does_not_lose_the_sites_whole_answer():
    """A remote PACS (pynetdicom) answers two studies, the first with Number of Study Related
    Instances "abc": both studies come back, the bad value left out."""

    def on_find(event):
        for uid, count in (("1.2.3.4.1", b"abc "), ("1.2.3.4.2", b"7 ")):
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.PatientID = "REMOTE1"
            ds.StudyInstanceUID = uid
            ds[0x00201208] = RawDataElement(Tag(0x00201208), "IS", len(count), count, 0,
                                            False, True)
            yield 0xFF00, ds
        yield 0x0000, None

    peer = AE(ae_title="FAKEPACS")
    peer.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = peer.start_server(("127.0.0.1", port), block=False,
                               evt_handlers=[(evt.EVT_C_FIND, on_find)])
    try:
        found = DimseSites("IMAGESHARE").find_studies(
            Node("FAKEPACS", "127.0.0.1", port), {"PatientID": "REMOTE1"}, 10)
    finally:
        assert server is not None
        server.shutdown()
    assert [item["0020000D"]["Value"] for item in found] == [["1.2.3.4.1"], ["1.2.3.4.2"]]
    assert "00201208" not in found[0]
    assert found[1]["00201208"]["Value"] == [7]
