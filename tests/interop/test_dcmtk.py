"""DCMTK's real tools against a running ImageShare: echo, store, find, move, get."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from tests.conftest import require_tool
from tests.factory import ct_series, us_cine
from tests.multipart_helpers import parse_multipart
from tests.peers import free_port, wait_for_port

pytestmark = pytest.mark.interop

REAL_FILES = [
    "CT_small.dcm", "MR_small.dcm", "US1_UNCR.dcm", "US1_J2KR.dcm", "OBXXXX1A.dcm",
    "color3d_jpeg_baseline.dcm", "SC_rgb_rle.dcm", "emri_small.dcm",
    "test-SR.dcm", "JPEG-LL.dcm", "rtplan.dcm", "waveform_ecg.dcm",
]


def assert_same_instance(received, original, label: str) -> None:
    """Same attributes and pixels; compressed pixel data kept in its syntax, byte for byte.

    Uncompressed data may arrive in another uncompressed encoding (the sender chooses): then
    DCMTK drops trailing padding and private attributes lose their VR (implicit VR), so those
    are compared only when the encoding is the same.
    """
    syntax = original.file_meta.TransferSyntaxUID
    if syntax.is_compressed:
        assert received.file_meta.TransferSyntaxUID == syntax, label
        assert received.PixelData == original.PixelData, label
    elif "PixelData" in original:
        assert (received.pixel_array == original.pixel_array).all(), label
    same_encoding = received.file_meta.TransferSyntaxUID == syntax
    for ds in (received, original):
        ds.pop(0xFFFCFFFC, None)
        ds.pop(0x7FE00010, None)
        if not same_encoding:
            ds.remove_private_tags()
    assert received == original, label


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=180, cwd=cwd)


def dcm_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def registered(server):
    """The server with the DCMTK tools' AE titles registered as nodes (while it runs)."""
    for ae in ("FINDSCU", "GETSCU", "MOVESCU"):
        server.cli("node", "add", ae, "--host", "127.0.0.1", "--port", "104")
    return server


def test_echoscu_verifies_the_listener(server):
    tool = require_tool("echoscu")
    result = run(tool, "-aec", server.ae_title, "127.0.0.1", str(server.dicom_port))
    assert result.returncode == 0, result.stderr


def test_storescu_and_dcmsend_store_real_files_as_received(server, tmp_path):
    require_tool("storescu")
    dcmsend = require_tool("dcmsend")
    files = [Path(get_testdata_file(name)) for name in REAL_FILES]
    result = run(dcmsend, "-dn", "-aec", server.ae_title, "127.0.0.1", str(server.dicom_port),
                 *map(str, files))
    assert result.returncode == 0, result.stderr + result.stdout
    with server.http() as http:
        for path in files:
            ds = dcmread(path, stop_before_pixels=True)
            response = http.get(
                f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                f"/instances/{ds.SOPInstanceUID}",
                headers={"Accept": 'multipart/related; type="application/dicom"; '
                                   "transfer-syntax=*"},
            )
            assert response.status_code == 200, path.name
            ((_headers, body),) = parse_multipart(response)
            received, original = dcmread(io.BytesIO(body)), dcmread(path)
            assert_same_instance(received, original, path.name)


def test_storescu_generated_ct_series_and_us_cine(server, tmp_path):
    storescu = require_tool("storescu")
    ct = ct_series(tmp_path / "ct", count=20, size=128, patient_id="DCMTK1")
    cine = us_cine(tmp_path / "us", frames=60, patient_id="DCMTK1",
                   patient_name="Doe^Jane", study_uid=dcmread(ct[0]).StudyInstanceUID)
    result = run(storescu, "-aec", server.ae_title, "127.0.0.1", str(server.dicom_port),
                 *map(str, [*ct, cine]))
    assert result.returncode == 0, result.stderr
    with server.http() as http:
        (study,) = http.get("/dicomweb/studies", params={"PatientID": "DCMTK1"}).json()
    assert study["00201208"]["Value"] == [21]
    assert study["00080061"]["Value"] == ["CT", "US"]


def _find(server, tmp_path: Path, *keys: str, root: str = "-S") -> list:
    findscu = require_tool("findscu")
    out = tmp_path / f"find-{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    args = [findscu, "-aet", "FINDSCU", "-aec", server.ae_title, root, "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    result = run(*args, "127.0.0.1", str(server.dicom_port))
    assert result.returncode == 0, result.stderr
    return [dcmread(p) for p in dcm_files(out)]


def test_findscu_at_every_level(registered, tmp_path):
    server = registered
    ct = ct_series(tmp_path / "ct", count=3, patient_id="FIND1", patient_name="Ångström^Åsa",
                   StudyDate="20230315")
    run(require_tool("storescu"), "-aec", server.ae_title, "127.0.0.1",
        str(server.dicom_port), *map(str, ct))
    ds = dcmread(ct[0])
    patients = _find(server, tmp_path, "QueryRetrieveLevel=PATIENT", "PatientName=angstrom*",
                     "PatientID", "NumberOfPatientRelatedInstances", root="-P")
    assert [(p.PatientID, p.NumberOfPatientRelatedInstances) for p in patients] == [
        ("FIND1", 3)]
    # A request in the default repertoire gets the name in UTF-8 (it needs more than ASCII);
    # one in Latin-1 gets its own set back, which the name fits.
    assert (patients[0].SpecificCharacterSet, str(patients[0].PatientName)) == (
        "ISO_IR 192", "Ångström^Åsa")
    latin1 = _find(server, tmp_path, "QueryRetrieveLevel=PATIENT", "PatientID=FIND1",
                   "PatientName", "SpecificCharacterSet=ISO_IR 100", root="-P")
    assert [(p.SpecificCharacterSet, str(p.PatientName)) for p in latin1] == [
        ("ISO_IR 100", "Ångström^Åsa")]
    studies = _find(server, tmp_path, "QueryRetrieveLevel=STUDY", "StudyDate=20230301-20230331",
                    "PatientID=FIND1", "StudyInstanceUID", "ModalitiesInStudy",
                    "NumberOfStudyRelatedInstances")
    assert [(s.StudyInstanceUID, s.ModalitiesInStudy, s.NumberOfStudyRelatedInstances)
            for s in studies] == [(ds.StudyInstanceUID, "CT", 3)]
    series = _find(server, tmp_path, "QueryRetrieveLevel=SERIES",
                   f"StudyInstanceUID={ds.StudyInstanceUID}", "SeriesInstanceUID", "Modality")
    assert [s.SeriesInstanceUID for s in series] == [ds.SeriesInstanceUID]
    images = _find(server, tmp_path, "QueryRetrieveLevel=IMAGE",
                   f"StudyInstanceUID={ds.StudyInstanceUID}",
                   f"SeriesInstanceUID={ds.SeriesInstanceUID}", "SOPInstanceUID",
                   "InstanceNumber")
    assert sorted(int(i.InstanceNumber) for i in images) == [1, 2, 3]
    assert not any("SpecificCharacterSet" in i for i in images)  # ASCII only: none named


def test_unregistered_ae_may_not_query(server, tmp_path):
    findscu = require_tool("findscu")
    out = tmp_path / "out"
    out.mkdir()
    result = run(findscu, "-v", "-aet", "STRANGER", "-aec", server.ae_title, "-S", "-X",
                 "-od", str(out), "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID",
                 "127.0.0.1", str(server.dicom_port))
    # A C-FIND status DCMTK knows (Cxxx), with the reason in the Error Comment.
    assert "Failed: UnableToProcess" in result.stderr, result.stderr
    assert dcm_files(out) == []


def move_study_to_storescp(server, study_uid: str, received: Path, ae: str) -> None:
    """Run DCMTK's storescp (registered as ``ae``) and movescu a study to it into ``received``.

    storescp accepts only uncompressed transfer syntaxes, as it does by default.
    """
    storescp, movescu = require_tool("storescp"), require_tool("movescu")
    port = free_port()
    received.mkdir()
    scp = subprocess.Popen([storescp, "-aet", ae, "-od", str(received), str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        server.cli("node", "add", ae, "--host", "127.0.0.1", "--port", str(port))
        result = run(movescu, "-aet", "MOVESCU", "-aem", ae, "-aec", server.ae_title,
                     "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                     "127.0.0.1", str(server.dicom_port))
        assert result.returncode == 0, result.stderr
    finally:
        scp.terminate()
        scp.wait(10)


def test_movescu_sends_a_study_to_a_registered_storescp(registered, tmp_path):
    server = registered
    ct = ct_series(tmp_path / "ct", count=5, patient_id="MOVE1")
    run(require_tool("storescu"), "-aec", server.ae_title, "127.0.0.1",
        str(server.dicom_port), *map(str, ct))
    received = tmp_path / "received"
    move_study_to_storescp(server, dcmread(ct[0]).StudyInstanceUID, received, "STORESCP")
    got = {dcmread(p).SOPInstanceUID: dcmread(p).PixelData for p in dcm_files(received)}
    assert got == {dcmread(p).SOPInstanceUID: dcmread(p).PixelData for p in ct}


def test_move_to_unknown_destination_is_refused(registered, tmp_path):
    movescu = require_tool("movescu")
    result = run(movescu, "-aet", "MOVESCU", "-aem", "NOWHERE", "-aec", registered.ae_title,
                 "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.3",
                 "127.0.0.1", str(registered.dicom_port))
    assert "MoveDestinationUnknown" in result.stderr, result.stderr


def test_getscu_retrieves_over_the_same_association(registered, tmp_path):
    server = registered
    getscu = require_tool("getscu")
    ct = ct_series(tmp_path / "ct", count=4, patient_id="GET1")
    run(require_tool("storescu"), "-aec", server.ae_title, "127.0.0.1",
        str(server.dicom_port), *map(str, ct))
    out = tmp_path / "got"
    out.mkdir()
    study = dcmread(ct[0]).StudyInstanceUID
    result = run(getscu, "-aet", "GETSCU", "-aec", server.ae_title, "-S", "-od", str(out),
                 "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                 "127.0.0.1", str(server.dicom_port))
    assert result.returncode == 0, result.stderr
    got = {dcmread(p).SOPInstanceUID: dcmread(p).PixelData for p in dcm_files(out)}
    assert got == {dcmread(p).SOPInstanceUID: dcmread(p).PixelData for p in ct}


def test_getscu_gets_compressed_instances_decompressed_when_it_takes_only_uncompressed(
    registered, tmp_path
):
    server = registered
    getscu = require_tool("getscu")
    original = Path(get_testdata_file("US1_J2KR.dcm"))
    run(require_tool("dcmsend"), "-dn", "-aec", server.ae_title, "127.0.0.1",
        str(server.dicom_port), str(original))
    out = tmp_path / "got"
    out.mkdir()
    ds = dcmread(original)
    result = run(getscu, "-aet", "GETSCU", "-aec", server.ae_title, "-S", "-od", str(out),
                 "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}",
                 "-k", f"SeriesInstanceUID={ds.SeriesInstanceUID}",
                 "-k", f"SOPInstanceUID={ds.SOPInstanceUID}",
                 "127.0.0.1", str(server.dicom_port))
    assert result.returncode == 0, result.stderr
    (got,) = [dcmread(p) for p in dcm_files(out)]
    assert not got.file_meta.TransferSyntaxUID.is_compressed
    assert (got.pixel_array == ds.pixel_array).all()


def test_movescu_to_a_storescp_taking_only_uncompressed_gets_decompressed_pixels(
    registered, tmp_path
):
    server = registered
    original = Path(get_testdata_file("US1_J2KR.dcm"))
    run(require_tool("dcmsend"), "-dn", "-aec", server.ae_title, "127.0.0.1",
        str(server.dicom_port), str(original))
    ds = dcmread(original)
    received = tmp_path / "received"
    move_study_to_storescp(server, ds.StudyInstanceUID, received, "PLAINSCP")
    (got,) = [dcmread(p) for p in dcm_files(received)]
    assert not got.file_meta.TransferSyntaxUID.is_compressed
    assert (got.pixel_array == ds.pixel_array).all()
