"""Exchange with another hospital: Orthanc (Debian) as the other site, over DIMSE and DICOMweb:
federated search, retrieval with identical pixels, unreachable and silent sites."""

from __future__ import annotations

import socket
import time

import httpx
import numpy as np
import pytest
from pydicom import dcmread

from tests.factory import ct_series
from tests.peers import ADMIN_PASSWORD, RunningServer, free_port

pytestmark = pytest.mark.interop
NHS = "9434765919"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
CLINICIAN = ("clin", "clinician-password")


@pytest.fixture
def hospitals(tmp_path, orthanc_factory):
    """ImageShare here, Orthanc (holding the patient's CT) at the other hospital."""
    server = RunningServer(tmp_path / "here", extra_env={
        "IMAGESHARE_EXCHANGE_TIMEOUT": "3"}).start()
    orthanc = orthanc_factory({"IMAGESHARE": ["IMAGESHARE", "127.0.0.1", server.dicom_port]},
                              plugins=[DICOMWEB_PLUGIN])
    files = ct_series(tmp_path / "ct", 5, patient_id=NHS, patient_name="Curie^Marie")
    with orthanc.http() as client:
        for path in files:
            client.post("/instances", content=path.read_bytes()).raise_for_status()
    server.cli("user", "add", *CLINICIAN[:1], "--role", "clinician", "--password",
               CLINICIAN[1])
    yield server, orthanc, files
    server.stop()


def search(server, **params):
    with httpx.Client(base_url=server.url, auth=CLINICIAN, timeout=60) as client:
        response = client.get("/api/exchange/search", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def retrieve(server, site, study_uid):
    with httpx.Client(base_url=server.url, auth=CLINICIAN, timeout=60) as client:
        job = client.post("/api/exchange/retrieve",
                          json={"site": site, "study_uid": study_uid}).json()
        for _ in range(300):
            job = client.get(f"/api/jobs/{job['id']}").json()
            if job["state"] in ("done", "failed"):
                return job
            time.sleep(0.1)
    raise AssertionError("retrieval did not finish")


def pixels_here(server, study_uid):
    with httpx.Client(base_url=server.url, auth=("admin", ADMIN_PASSWORD), timeout=60) as c:
        listed = c.get(f"/dicomweb/studies/{study_uid}/instances").json()
    return {item["00080018"]["Value"][0] for item in listed}


@pytest.mark.parametrize("protocol", ["dimse", "dicomweb"])
def test_federated_search_and_retrieve_from_orthanc(hospitals, protocol):
    server, orthanc, files = hospitals
    extra = (["--dicomweb", f"{orthanc.url}/dicom-web"] if protocol == "dicomweb" else [])
    server.cli("node", "add", "ORTHANC", "--host", "127.0.0.1", "--port",
               str(orthanc.dicom_port), "--name", "Other Hospital", *extra)
    result = search(server, nhs=NHS, name="Curie^Marie", dob="19700101")
    [site] = result["sites"]
    assert site["status"] == "answered" and site["label"] == "Other Hospital"
    assert protocol in site["detail"]
    [study] = site["studies"]
    original = dcmread(files[0], stop_before_pixels=True)
    assert study["study_uid"] == original.StudyInstanceUID
    assert study["link"] == "linked" and study["here"] is False
    assert result["local"] == []
    job = retrieve(server, "ORTHANC", study["study_uid"])
    assert job["state"] == "done" and job["done"] == 5, job
    assert len(pixels_here(server, study["study_uid"])) == 5
    with httpx.Client(base_url=server.url, auth=("admin", ADMIN_PASSWORD), timeout=60) as c:
        sop = dcmread(files[2]).SOPInstanceUID
        frame = c.get(f"/dicomweb/studies/{original.StudyInstanceUID}/series/"
                      f"{original.SeriesInstanceUID}/instances/{sop}/frames/1",
                      headers={"Accept": "multipart/related; type=application/octet-stream"})
    body = frame.content
    start = body.index(b"\r\n\r\n") + 4
    pixels = np.frombuffer(body[start:start + 64 * 64 * 2], dtype=np.uint16)
    assert np.array_equal(pixels.reshape(64, 64), dcmread(files[2]).pixel_array)
    again = search(server, nhs=NHS)
    assert again["sites"][0]["studies"][0]["here"] is True
    assert len(again["local"]) == 1


def test_a_mismatched_name_is_flagged_not_hidden(hospitals):
    server, orthanc, _files = hospitals
    server.cli("node", "add", "ORTHANC", "--host", "127.0.0.1", "--port",
               str(orthanc.dicom_port))
    result = search(server, nhs=NHS, name="Someone^Else", dob="19700101")
    assert result["sites"][0]["studies"][0]["link"] == "mismatch"
    by_id = search(server, hospital_number=NHS)
    assert by_id["linking"].startswith("cannot link")


def test_unreachable_and_silent_sites_are_named_and_do_not_hold_up_the_answer(hospitals):
    server, orthanc, _files = hospitals
    server.cli("node", "add", "ORTHANC", "--host", "127.0.0.1", "--port",
               str(orthanc.dicom_port))
    server.cli("node", "add", "CLOSED", "--host", "127.0.0.1", "--port", str(free_port()),
               "--name", "Closed Hospital")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts connections, never speaks
    server.cli("node", "add", "SILENT", "--host", "127.0.0.1", "--port",
               str(silent.getsockname()[1]), "--name", "Silent Hospital")
    started = time.monotonic()
    result = search(server, nhs=NHS)
    elapsed = time.monotonic() - started
    silent.close()
    by_site = {s["site"]: s for s in result["sites"]}
    assert by_site["ORTHANC"]["status"] == "answered"
    assert by_site["CLOSED"]["status"] == "unreachable"
    assert "Closed Hospital" in by_site["CLOSED"]["detail"]
    assert by_site["SILENT"]["status"] in ("timeout", "unreachable")
    assert elapsed < 3 + 3  # the timeout (3 s) plus the request's own time
