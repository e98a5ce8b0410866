"""Orthanc from Debian's packages as the peer: it sends to us, queries us and moves from us."""

from __future__ import annotations

import io

import pytest
from pydicom import dcmread

from tests.factory import ct_series, us_cine

pytestmark = pytest.mark.interop


@pytest.fixture
def pair(server, orthanc_factory):
    orthanc = orthanc_factory(
        {"imageshare": [server.ae_title, "127.0.0.1", server.dicom_port]}
    )
    server.cli("node", "add", orthanc.ae_title, "--host", "127.0.0.1", "--port",
               str(orthanc.dicom_port))
    return server, orthanc


def _upload(orthanc, paths) -> list[str]:
    ids = []
    with orthanc.http() as http:
        for path in paths:
            response = http.post("/instances", content=path.read_bytes())
            assert response.status_code == 200, response.text
            ids.append(response.json()["ParentStudy"])
    return sorted(set(ids))


def test_orthanc_stores_a_study_to_imageshare(pair, tmp_path):
    server, orthanc = pair
    ct = ct_series(tmp_path / "ct", count=6, size=96, patient_id="ORTH1")
    cine = us_cine(tmp_path / "us", frames=30, patient_id="ORTH1",
                   patient_name="Doe^Jane", study_uid=dcmread(ct[0]).StudyInstanceUID)
    (study_id,) = _upload(orthanc, [*ct, cine])
    with orthanc.http() as http:
        response = http.post("/modalities/imageshare/store", json={"Resources": [study_id]})
        assert response.status_code == 200, response.text
    with server.http() as http:
        (study,) = http.get("/dicomweb/studies", params={"PatientID": "ORTH1"}).json()
        assert study["00201208"]["Value"] == [7]
        frames = http.get(
            f"/dicomweb/studies/{dcmread(cine).StudyInstanceUID}/series/"
            f"{dcmread(cine).SeriesInstanceUID}/instances/{dcmread(cine).SOPInstanceUID}"
            "/frames/30", headers={"Accept": 'multipart/related; type="application/octet-stream"'})
        assert dcmread(cine).pixel_array[29].tobytes() in frames.content


def test_orthanc_finds_studies_on_imageshare(pair, tmp_path):
    server, orthanc = pair
    ct = ct_series(tmp_path / "ct", count=2, patient_id="ORTH2", patient_name="Brontë^Emily")
    server.cli("import", "--quiet", str(tmp_path / "ct"))
    with orthanc.http() as http:
        response = http.post("/modalities/imageshare/query", json={
            "Level": "Study", "Query": {"PatientName": "BRONTE*", "PatientID": "",
                                        "StudyInstanceUID": ""}})
        assert response.status_code == 200, response.text
        answers = http.get(response.json()["Path"] + "/answers?expand").json()
    assert [a["0020,000d"]["Value"] for a in answers] == [dcmread(ct[0]).StudyInstanceUID]


def test_imageshare_moves_a_study_to_orthanc(pair, tmp_path):
    server, orthanc = pair
    ct = ct_series(tmp_path / "ct", count=8, size=96, patient_id="ORTH3")
    server.cli("import", "--quiet", str(tmp_path / "ct"))
    study = dcmread(ct[0]).StudyInstanceUID
    with orthanc.http() as http:
        response = http.post("/modalities/imageshare/move", json={
            "Level": "Study", "Resources": [{"StudyInstanceUID": study}],
            "TargetAet": orthanc.ae_title})
        assert response.status_code == 200, response.text
        found = http.post("/tools/find", json={"Level": "Instance",
                                               "Query": {"StudyInstanceUID": study},
                                               "Expand": True}).json()
        assert len(found) == 8
        for item in found:
            body = http.get(f"/instances/{item['ID']}/file").content
            received = dcmread(io.BytesIO(body))
            original = next(dcmread(p) for p in ct
                            if dcmread(p).SOPInstanceUID == received.SOPInstanceUID)
            assert received.PixelData == original.PixelData
