"""Conformance defects found in session 38 by sending the same requests to ImageShare and to
Orthanc with the same data (each test failed before its fix):

- a storage context proposing a private transfer syntax first (GE's Implicit VR Big Endian
  ``1.2.840.113619.5.2``, say) and Implicit VR Little Endian after it was accepted in the
  private syntax, so every image the sender then sent was refused C000 (cannot be parsed);
  one proposing only syntaxes nobody knows was accepted too. PS3.5 10 and PS3.8 9.3.3.2: only
  a syntax both sides know may be agreed, else result 4 (transfer syntaxes not supported).
  Orthanc takes Implicit VR Little Endian and stores the image;
- the retired and trial storage SOP classes (Ultrasound Image Storage (Retired)
  ``1.2.840.10008.5.1.4.1.1.6``, which older ultrasound scanners still send, Ultrasound
  Multi-frame (Retired), Nuclear Medicine (Retired), VL Image Storage - Trial) were rejected
  as abstract syntaxes not supported, so storescu could not store such a scanner's images;
  Orthanc stores them;
- a C-FIND (or QIDO-RS) sequence key matching one item of a stored sequence (Request
  Attributes Sequence, Requested Procedure ID RP2) was answered with every stored item, the
  ones that did not match too (RP1); PS3.4 C.2.2.2.6: "a sequence of matching Items" is
  returned. (Orthanc returns every item too, but also matches across items.)
- a QIDO-RS includefield naming an attribute inside a sequence (includefield=
  RequestAttributesSequence.ScheduledProcedureStepID, PS3.18 8.3.4.3) was dropped when the
  sequence was also a matching key: dicomweb-client got the matching item without it;
- the frame thumbnail resource of PS3.18 10.4.1 (.../instances/{i}/frames/{list}/thumbnail)
  answered 404 (the study, series and instance thumbnails were served).

One ImageShare server serves the module; DCMTK's storescu and findscu, pynetdicom and
dicomweb-client are the peers.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import (
    CTImageStorage,
    UltrasoundMultiFrameImageStorage,
    Verification,
)

from tests.conftest import require_tool
from tests.factory import ct_series, us_cine
from tests.peers import RunningServer

pytestmark = pytest.mark.interop

GE_IMPLICIT_BIG_ENDIAN = "1.2.840.113619.5.2"  # a private transfer syntax real scanners propose
TRANSFER_SYNTAXES_NOT_SUPPORTED = 0x04
RETIRED_US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6"
OLDER_STORAGE_CLASSES = (
    RETIRED_US_IMAGE_STORAGE,
    "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.5",  # Nuclear Medicine Image Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.77.1",  # VL Image Storage - Trial
)


REQUESTS = (("RP1", "SPS1"), ("RP2", "SPS2"))  # the stored Request Attributes Sequence
CINE_FRAMES = 4


def _request_item(requested_procedure: str, step: str) -> Dataset:
    item = Dataset()
    item.RequestedProcedureID = requested_procedure
    item.ScheduledProcedureStepID = step
    return item


@dataclass
class Site:
    server: RunningServer
    folder: Path
    cine: str  # studies/{study}/series/{series}/instances/{instance} of the US cine


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[Site]:
    for tool in ("storescu", "findscu"):
        require_tool(tool)
    folder = tmp_path_factory.mktemp("conformance38")
    server = RunningServer(folder / "server-data",
                           extra_env={"IMAGESHARE_DICOM_PROCESSES": "1"}).start()
    try:
        server.cli("node", "add", "S38SCU", "--host", "127.0.0.1", "--port", "104")
        (requested,) = ct_series(folder / "requested", count=1, size=8, patient_id="S38SEQ")
        ds = dcmread(requested)
        ds.RequestAttributesSequence = [_request_item(rp, sps) for rp, sps in REQUESTS]
        ds.save_as(requested)
        cine = dcmread(us_cine(folder / "cine", frames=CINE_FRAMES, rows=64, cols=96,
                               patient_id="S38CINE"))
        ae = AE("PYNETDICOM")
        ae.add_requested_context(CTImageStorage)
        ae.add_requested_context(UltrasoundMultiFrameImageStorage)
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
        assert assoc.is_established
        assert assoc.send_c_store(ds).Status == 0x0000
        assert assoc.send_c_store(cine).Status == 0x0000
        assoc.release()
        yield Site(server, folder, "/".join(
            ("studies", cine.StudyInstanceUID, "series", cine.SeriesInstanceUID, "instances",
             cine.SOPInstanceUID)))
    finally:
        server.stop()


def _instances_of(site: Site, patient_id: str, out: Path) -> dict[str, str]:
    """SOP Instance UID -> SOP Class UID of what findscu finds of ``patient_id``."""
    out.mkdir()
    result = subprocess.run(
        ["findscu", "-aet", "S38SCU", "-aec", site.server.ae_title, "-S", "-X", "-od",
         str(out), "-k", "QueryRetrieveLevel=IMAGE", "-k", f"PatientID={patient_id}",
         "-k", "StudyInstanceUID", "-k", "SeriesInstanceUID", "-k", "SOPInstanceUID",
         "-k", "SOPClassUID", "127.0.0.1", str(site.server.dicom_port)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    found = [dcmread(p) for p in out.iterdir()]
    return {str(ds.SOPInstanceUID): str(ds.SOPClassUID) for ds in found}


def test_a_private_transfer_syntax_proposed_first_is_passed_over_for_a_standard_one(
        site, tmp_path):
    """A sender proposing CT Image Storage in GE's private syntax first and Implicit VR
    Little Endian second gets the latter, and its image is stored (before: the private
    syntax was accepted and the image refused C000, cannot be parsed)."""
    image = dcmread(ct_series(tmp_path / "ct", count=1, size=8, patient_id="S38GE")[0])
    ae = AE("PYNETDICOM")
    ae.add_requested_context(CTImageStorage, [GE_IMPLICIT_BIG_ENDIAN, ImplicitVRLittleEndian,
                                              ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", site.server.dicom_port, ae_title=site.server.ae_title)
    assert assoc.is_established
    try:
        assert [cx.transfer_syntax for cx in assoc.accepted_contexts] == [
            [ImplicitVRLittleEndian]]
        assert assoc.send_c_store(image).Status == 0x0000
    finally:
        assoc.release()
    assert _instances_of(site, "S38GE", tmp_path / "found") == {
        str(image.SOPInstanceUID): CTImageStorage}


def test_a_storage_context_of_unknown_transfer_syntaxes_only_is_rejected_with_result_4(site):
    """Proposed beside Verification, CT Image Storage in syntaxes nobody knows is rejected as
    transfer syntaxes not supported (before: accepted in the first of them); the association
    still verifies."""
    ae = AE("PYNETDICOM")
    ae.add_requested_context(CTImageStorage, [GE_IMPLICIT_BIG_ENDIAN, "1.2.3.4.5.6"])
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", site.server.dicom_port, ae_title=site.server.ae_title)
    assert assoc.is_established
    try:
        assert [(cx.abstract_syntax, cx.result) for cx in assoc.rejected_contexts] == [
            (CTImageStorage, TRANSFER_SYNTAXES_NOT_SUPPORTED)]
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [Verification]
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_storescu_stores_images_of_retired_and_trial_storage_sop_classes(site, tmp_path):
    """storescu (proposing only the files' own SOP classes, -R) stores an image of each
    retired or trial storage class an older scanner sends; findscu then finds each under its
    own class (before: every one rejected, abstract syntax not supported)."""
    files = ct_series(tmp_path / "old", count=len(OLDER_STORAGE_CLASSES), size=8,
                      patient_id="S38OLD")
    expected = {}
    for path, sop_class in zip(files, OLDER_STORAGE_CLASSES, strict=True):
        ds = dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.save_as(path)
        expected[str(ds.SOPInstanceUID)] = sop_class
    result = subprocess.run(
        ["storescu", "-R", "-aet", "STORESCU", "-aec", site.server.ae_title, "127.0.0.1",
         str(site.server.dicom_port), *map(str, files)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Failed" not in result.stderr and "No presentation context" not in result.stderr
    assert _instances_of(site, "S38OLD", tmp_path / "found") == expected


def _findscu_series(site: Site, out: Path, *keys: str) -> list[Dataset]:
    out.mkdir()
    result = subprocess.run(
        ["findscu", "-aet", "S38SCU", "-aec", site.server.ae_title, "-S", "-X", "-od",
         str(out), "-k", "QueryRetrieveLevel=SERIES", "-k", "PatientID=S38SEQ",
         "-k", "SeriesInstanceUID", *[a for key in keys for a in ("-k", key)],
         "127.0.0.1", str(site.server.dicom_port)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [dcmread(p) for p in sorted(out.iterdir())]


def test_a_sequence_key_is_answered_with_the_matching_items_only(site, tmp_path):
    """findscu asking for the series whose Request Attributes Sequence has an item with
    Requested Procedure ID RP2 gets that item (with its Scheduled Procedure Step ID), not
    the RP1 item beside it; a universal item still gets every item."""
    (found,) = _findscu_series(
        site, tmp_path / "rp2", "RequestAttributesSequence[0].RequestedProcedureID=RP2",
        "RequestAttributesSequence[0].ScheduledProcedureStepID")
    assert [(i.RequestedProcedureID, i.ScheduledProcedureStepID)
            for i in found.RequestAttributesSequence] == [("RP2", "SPS2")]
    (every,) = _findscu_series(
        site, tmp_path / "all", "RequestAttributesSequence[0].RequestedProcedureID",
        "RequestAttributesSequence[0].ScheduledProcedureStepID")
    assert [(i.RequestedProcedureID, i.ScheduledProcedureStepID)
            for i in every.RequestAttributesSequence] == list(REQUESTS)
    assert _findscu_series(
        site, tmp_path / "none", "RequestAttributesSequence[0].RequestedProcedureID=RP2",
        "RequestAttributesSequence[0].ScheduledProcedureStepID=SPS1") == []


def test_qido_includefield_inside_a_matched_sequence_is_answered(site):
    """dicomweb-client searching series by Request Attributes Sequence > Requested Procedure
    ID RP2 and asking for the Scheduled Procedure Step ID of that item gets both, in the
    matching item only."""
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {site.server.admin_token()}"
    client = DICOMwebClient(url=site.server.dicomweb, session=session)
    (found,) = client.search_for_series(
        search_filters={"PatientID": "S38SEQ",
                        "RequestAttributesSequence.RequestedProcedureID": "RP2"},
        fields=["RequestAttributesSequence.ScheduledProcedureStepID"])
    assert found["00400275"]["Value"] == [{"00400009": {"vr": "SH", "Value": ["SPS2"]},
                                           "00401001": {"vr": "SH", "Value": ["RP2"]}}]


def test_curl_gets_a_thumbnail_of_frames_of_a_cine(site, tmp_path):
    """curl asking for the thumbnail of frame 2 (and of frames 2,3) of a four-frame cine
    gets one small PNG; a frame the cine lacks is 404, as for rendered frames."""
    token = site.server.admin_token()
    for frames in ("2", "2,3", str(CINE_FRAMES + 1)):
        out = tmp_path / f"thumb-{frames}.png"
        result = subprocess.run(
            [require_tool("curl"), "-s", "-o", str(out), "-w", "%{http_code} %{content_type}",
             "-H", f"Authorization: Bearer {token}", "-H", "Accept: image/png",
             f"{site.server.dicomweb}/{site.cine}/frames/{frames}/thumbnail"],
            capture_output=True, text=True, timeout=60)
        if frames == str(CINE_FRAMES + 1):
            assert result.stdout.split()[0] == "404"
            continue
        assert result.stdout == "200 image/png", frames
        with Image.open(out) as image:
            assert image.format == "PNG" and max(image.size) <= 96
