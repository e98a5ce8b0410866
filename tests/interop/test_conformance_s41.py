"""Conformance defects found in session 41, checked with the clients that hit them (each test
failed before its fix):

- A C-MOVE destination that takes a study only compressed losslessly (a PACS whose storage
  profile accepts CT in JPEG-LS Lossless alone) got nothing: ImageShare proposed only the
  stored syntax and the uncompressed ones, the destination accepted none of them, and the
  move ended A801, Move Destination unknown, though ImageShare encodes JPEG-LS, JPEG 2000
  Lossless and RLE for WADO-RS and C-GET. PS3.4 C.4.2.3.1 lets the SCP choose the encoding by
  what the C-STORE association accepted: the C-MOVE now also proposes, per SOP class, every
  syntax the instances can be converted to, and sends them converted.
- A destination that answered the association but accepted none of the contexts proposed
  (a storescp taking CT in lossy JPEG Baseline only) made the C-MOVE end A801 "Move
  Destination unknown", with no sub-operation counted and no Failed SOP Instance UID List:
  movescu and PACS logs blamed the AE title configuration. The destination is known and
  answered: the C-MOVE now ends A702 (unable to perform sub-operations) with every instance
  counted failed and listed, and an Error Comment saying why.

One ImageShare server serves the module; DCMTK's storescp (with an association profile, as a
PACS is configured) is the destination, movescu and pynetdicom the requesters.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelMove

from tests.conftest import require_tool
from tests.factory import ct_series
from tests.peers import RunningServer, free_port, wait_for_port

pytestmark = pytest.mark.interop

JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"

# A storescp association profile (DCMTK's asconfig format): CT Image Storage in one transfer
# syntax only, as a PACS configured for compressed storage accepts it.
PROFILES = """\
[[TransferSyntaxes]]
[JLSOnly]
TransferSyntax1 = 1.2.840.10008.1.2.4.80
[BaselineOnly]
TransferSyntax1 = 1.2.840.10008.1.2.4.50

[[PresentationContexts]]
[CTJLS]
PresentationContext1 = CTImageStorage\\JLSOnly
[CTBaseline]
PresentationContext1 = CTImageStorage\\BaselineOnly

[[Profiles]]
[OnlyJLS]
PresentationContexts = CTJLS
[OnlyBaseline]
PresentationContexts = CTBaseline
"""


@dataclass
class Site:
    server: RunningServer
    folder: Path
    ct: Sequence[Dataset]  # one CT series of two images, stored Explicit VR Little Endian
    study_uid: str


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[Site]:
    require_tool("storescp")
    folder = tmp_path_factory.mktemp("conformance41")
    server = RunningServer(folder / "server-data").start()
    try:
        server.cli("node", "add", "MOVESCU", "--host", "127.0.0.1", "--port", "104")
        ct = [dcmread(p) for p in ct_series(folder / "ct", count=2, size=64,
                                            patient_id="S41CT")]
        ae = AE("PYNETDICOM")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
        assert assoc.is_established
        for ds in ct:
            assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        (folder / "profiles.cfg").write_text(PROFILES)
        yield Site(server, folder, ct, ct[0].StudyInstanceUID)
    finally:
        server.stop()


@dataclass
class Destination:
    ae_title: str
    received: Path


@pytest.fixture
def destination(site: Site, request) -> Iterator[Destination]:
    """DCMTK's storescp with the association profile ``request.param``, registered."""
    profile = request.param
    ae_title = {"OnlyJLS": "JLSPACS", "OnlyBaseline": "LOSSYPACS"}[profile]
    received = site.folder / profile
    received.mkdir()
    port = free_port()
    scp = subprocess.Popen(
        [require_tool("storescp"), "-aet", ae_title, "-xf", str(site.folder / "profiles.cfg"),
         profile, "-od", str(received), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        site.server.cli("node", "add", ae_title, "--host", "127.0.0.1", "--port", str(port))
        yield Destination(ae_title, received)
    finally:
        scp.terminate()
        scp.wait(10)


def _movescu(site: Site, destination: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("movescu"), "-v", "-S", "-aet", "MOVESCU", "-aem", destination,
         "-aec", site.server.ae_title, "-k", "QueryRetrieveLevel=STUDY",
         "-k", f"StudyInstanceUID={site.study_uid}", "127.0.0.1",
         str(site.server.dicom_port)],
        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("destination", ["OnlyJLS"], indirect=True)
def test_movescu_to_a_pacs_taking_only_jpeg_ls_gets_the_study_converted(site, destination):
    """movescu moves a study stored uncompressed to a storescp whose profile takes CT in
    JPEG-LS Lossless only: both images arrive in JPEG-LS with the stored pixels, and the move
    ends Success (before: no context accepted, A801 Move Destination unknown)."""
    result = _movescu(site, destination.ae_title)
    assert "Received Final Move Response (Success)" in result.stderr, result.stderr
    files = sorted(p for p in destination.received.iterdir() if p.is_file())
    assert len(files) == 2
    originals = {ds.SOPInstanceUID: ds for ds in site.ct}
    for path in files:
        received = dcmread(path)
        assert received.file_meta.TransferSyntaxUID == JPEG_LS_LOSSLESS
        original = originals.pop(received.SOPInstanceUID)
        assert (received.pixel_array == original.pixel_array).all()
        assert received.PatientID == "S41CT"
    assert not originals


@pytest.mark.parametrize("destination", ["OnlyBaseline"], indirect=True)
def test_a_destination_accepting_nothing_offered_fails_the_move_not_the_ae_title(
        site, destination):
    """A storescp taking CT in lossy JPEG Baseline only (which ImageShare does not write)
    answers the association and accepts none of its contexts: the C-MOVE ends A702 with both
    images counted failed and listed in the Failed SOP Instance UID List, and an Error
    Comment saying so; movescu reports the sub-operations refused, never an unknown
    destination (before: A801, nothing counted or listed)."""
    result = _movescu(site, destination.ae_title)
    assert "OutOfResourcesSubOperations" in result.stderr, result.stderr
    assert "MoveDestinationUnknown" not in result.stderr

    ae = AE("MOVESCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", site.server.dicom_port, ae_title=site.server.ae_title)
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = site.study_uid
    try:
        answers = list(assoc.send_c_move(identifier, destination.ae_title,
                                         StudyRootQueryRetrieveInformationModelMove))
    finally:
        assoc.release()
    ((status, failed),) = answers
    assert status.Status == 0xA702
    assert status.NumberOfFailedSuboperations == 2
    assert status.NumberOfCompletedSuboperations == 0
    assert status.NumberOfWarningSuboperations == 0
    assert "NumberOfRemainingSuboperations" not in status
    assert status.ErrorComment == "destination accepted none of the SOP classes/syntaxes offered"
    assert failed is not None
    listed = failed.FailedSOPInstanceUIDList
    assert set([listed] if isinstance(listed, str) else listed) == {
        ds.SOPInstanceUID for ds in site.ct}
    assert not any(destination.received.iterdir())
