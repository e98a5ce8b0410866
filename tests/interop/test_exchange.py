"""Exchange with another hospital: Orthanc (Debian) as the other site, over DIMSE and DICOMweb:
federated search, retrieval with identical pixels, unreachable and silent sites."""

from __future__ import annotations

import socket
import time

import httpx
import numpy as np
import pytest
from pydicom import Dataset, dcmread

from tests.factory import ct_series
from tests.peers import RunningServer, free_port

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
        response = client.post("/api/exchange/search", json=params)
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
    with server.http() as c:
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
    with server.http() as c:
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


def api(server, method, path, **kwargs):
    with httpx.Client(base_url=server.url, auth=CLINICIAN, timeout=60) as client:
        response = client.request(method, path, **kwargs)
    assert response.status_code < 300, response.text
    return response.json()


def wait_for_transfer(server, transfer_id):
    for _ in range(300):
        state = api(server, "GET", f"/api/exchange/transfers/{transfer_id}")
        if state["state"] in ("delivered", "failed"):
            return state
        time.sleep(0.1)
    raise AssertionError("transfer did not finish")


@pytest.mark.parametrize("protocol", ["dimse", "dicomweb"])
def test_a_push_to_orthanc_arrives_and_is_reported_delivered(hospitals, tmp_path, protocol):
    server, orthanc, _files = hospitals
    local = ct_series(tmp_path / "local", 3, patient_id="H7001", patient_name="Local^Pat")
    server.cli("import", "--quiet", str(tmp_path / "local"))
    extra = (["--dicomweb", f"{orthanc.url}/dicom-web"] if protocol == "dicomweb" else [])
    server.cli("node", "add", "ORTHANC", "--host", "127.0.0.1", "--port",
               str(orthanc.dicom_port), "--name", "Tertiary Centre", *extra)
    study_uid = dcmread(local[0], stop_before_pixels=True).StudyInstanceUID
    queued = api(server, "POST", "/api/exchange/push", json={
        "site": "ORTHANC", "study_uid": study_uid, "priority": "urgent", "note": "transfer"})
    assert queued["state"] in ("queued", "sending", "delivered")
    done = wait_for_transfer(server, queued["public_id"])
    assert done["state"] == "delivered" and done["sent"] == 3 and done["failed"] == 0
    with orthanc.http() as client:
        found = client.post("/tools/find", json={"Level": "Instance", "Query": {
            "StudyInstanceUID": study_uid}}).json()
    assert len(found) == 3


def test_a_push_to_an_unreachable_site_fails_with_the_reason(tmp_path):
    server = RunningServer(tmp_path / "here", extra_env={
        "IMAGESHARE_PUSH_RETRY_SECONDS": "0.2,0.2"}).start()
    try:
        server.cli("user", "add", *CLINICIAN[:1], "--role", "clinician", "--password",
                   CLINICIAN[1])
        local = ct_series(tmp_path / "local", 1)
        server.cli("import", "--quiet", str(tmp_path / "local"))
        server.cli("node", "add", "GONE", "--host", "127.0.0.1", "--port", str(free_port()),
                   "--name", "Gone Hospital")
        study_uid = dcmread(local[0], stop_before_pixels=True).StudyInstanceUID
        queued = api(server, "POST", "/api/exchange/push",
                     json={"site": "GONE", "study_uid": study_uid})
        for _ in range(900):
            state = api(server, "GET", f"/api/exchange/transfers/{queued['public_id']}")
            if state["state"] == "failed":
                break
            time.sleep(0.1)
        assert state["state"] == "failed" and "Gone Hospital" in state["reason"]
        assert state["attempts"] >= 2
    finally:
        server.stop()


def test_orthanc_sending_to_us_lands_in_the_inbox_and_is_reconciled(hospitals, tmp_path):
    server, orthanc, files = hospitals
    # our own record of the patient: hospital number H555 with the NHS number
    from pydicom import Dataset

    nhs_item = Dataset()
    nhs_item.PatientID = NHS
    nhs_item.IssuerOfPatientID = "NHS"
    ct_series(tmp_path / "ours", 1, patient_id="H555", patient_name="Curie^Marie",
              OtherPatientIDsSequence=[nhs_item])
    server.cli("import", "--quiet", str(tmp_path / "ours"))
    server.cli("node", "add", "ORTHANC", "--host", "127.0.0.1", "--port",
               str(orthanc.dicom_port), "--name", "District General", "--inbox")
    with orthanc.http() as client:
        [study] = client.get("/studies").json()
        sent = client.post("/modalities/IMAGESHARE/store", json=[study])
        assert sent.status_code == 200, sent.text
    [item] = api(server, "GET", "/api/exchange/inbox")
    assert item["site"] == "ORTHANC" and item["instances"] == 5
    assert item["local_patient_id"] == "H555"
    server.cli("node", "add", "PACS", "--host", "127.0.0.1", "--port",
               str(orthanc.dicom_port), "--name", "Local PACS")
    done = api(server, "POST", f"/api/exchange/inbox/{item['pk']}/accept",
               json={"reconcile": True, "forward_to": "PACS"})
    assert "H555" in done["done"] and "forwarded" in done["done"]
    study_uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    with server.http() as c:
        listed = c.get(f"/dicomweb/studies/{study_uid}/instances").json()
        sop = listed[0]["00080018"]["Value"][0]
        series_uid = listed[0]["0020000E"]["Value"][0]
        part = c.get(f"/dicomweb/studies/{study_uid}/series/{series_uid}/instances/{sop}",
                     headers={"Accept": "multipart/related; type=application/dicom"}).content
    header = dcmread(__import__("io").BytesIO(part[part.index(b"\r\n\r\n") + 4:]),
                     force=True, stop_before_pixels=True)
    assert header.PatientID == "H555"
    others = {str(i.PatientID): str(i.get("IssuerOfPatientID", ""))
              for i in header.OtherPatientIDsSequence}
    assert NHS in others  # the sender's ID (here the NHS number itself) is kept
    assert api(server, "GET", "/api/exchange/inbox") == []


def test_retention_removes_expired_temporary_copies_and_inbox_items_only(hospitals, tmp_path):
    server, orthanc, files = hospitals
    kept = ct_series(tmp_path / "kept", 2, patient_id="H1", patient_name="Kept^Study")
    server.cli("import", "--quiet", str(tmp_path / "kept"))
    server.cli("node", "add", "ORTHANC", "--host", "127.0.0.1", "--port",
               str(orthanc.dicom_port), "--inbox")
    study = search(server, nhs=NHS)["sites"][0]["studies"][0]
    retrieve(server, "ORTHANC", study["study_uid"])
    other = ct_series(tmp_path / "inbox", 2, patient_id="H2", patient_name="Inbox^Only")
    with orthanc.http() as client:
        for path in other:
            client.post("/instances", content=path.read_bytes()).raise_for_status()
        inbox_study = dcmread(other[0], stop_before_pixels=True).StudyInstanceUID
        orthanc_id = client.post("/tools/find", json={"Level": "Study", "Query": {
            "StudyInstanceUID": inbox_study}}).json()[0]
        client.post("/modalities/IMAGESHARE/store", json=[orthanc_id]).raise_for_status()
    # Two months pass (the arrivals are made older: a retention run never acts in the future).
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import create_engine, update

    from imageshare.storage.index.schema import instances

    index = create_engine(f"sqlite:///{server.data_dir / 'index.sqlite'}")
    try:
        with index.begin() as conn:
            conn.execute(update(instances).values(
                received_at=datetime.now(UTC) - timedelta(days=60)))
    finally:
        index.dispose()
    refused = server.cli("retention", "run", "--at", "2099-01-01T00:00:00", check=False)
    assert refused.returncode == 2 and "cannot be in the future" in refused.stderr
    soon = server.cli("retention", "run").stdout
    assert "7 instance(s) of 2 study(ies) removed" in soon, soon
    with server.http() as c:
        remaining = {s["0020000D"]["Value"][0] for s in c.get("/dicomweb/studies").json()}
    assert remaining == {dcmread(kept[0], stop_before_pixels=True).StudyInstanceUID}
    nothing = server.cli("retention", "run").stdout
    assert nothing.startswith("0 instance(s)")


@pytest.mark.parametrize("protocol", ["dimse", "dicomweb"])
def test_an_nhs_number_kept_in_other_patient_ids_is_found_or_the_site_says_it_was_not_searched(
        hospitals, tmp_path, protocol):
    server, orthanc, _files = hospitals
    uk = dcmread(ct_series(tmp_path / "uk", 1, patient_id="H77001",
                           patient_name="Lovelace^Ada")[0])
    other = Dataset()
    other.PatientID = "9449304424"
    other.IssuerOfPatientID = "NHS"
    uk.OtherPatientIDsSequence = [other]
    body = tmp_path / "uk.dcm"
    uk.save_as(body)
    with orthanc.http() as client:
        client.post("/instances", content=body.read_bytes()).raise_for_status()
    extra = (["--dicomweb", f"{orthanc.url}/dicom-web"] if protocol == "dicomweb" else [])
    server.cli("node", "add", "ORTHANC", "--host", "127.0.0.1", "--port",
               str(orthanc.dicom_port), "--name", "Other Hospital", *extra)

    blind = search(server, nhs="9449304424")
    [site] = blind["sites"]
    if protocol == "dimse":  # Orthanc matches inside the sequence over C-FIND
        assert site["status"] == "answered", site
        [study] = site["studies"]
        assert (study["patient_id"], study["link"]) == ("H77001", "linked")
        assert study["study_uid"] == uk.StudyInstanceUID
        assert "Other Patient IDs" in site["detail"]
    else:  # its QIDO-RS cannot: the answer says so rather than "0 studies"
        assert site["status"] == "incomplete" and site["studies"] == [], site
        assert "does not match inside Other Patient IDs" in site["detail"]
        assert "add the name and date of birth" in site["detail"]
        named = search(server, nhs="9449304424", name="Lovelace^Ada", dob="19700101")
        assert named["sites"][0]["status"] == "incomplete"


def test_test_connection_says_which_way_works_and_why_not(hospitals):
    server, orthanc, _files = hospitals
    server.cli("node", "add", "ORTHANC", "--host", "127.0.0.1", "--port",
               str(orthanc.dicom_port), "--name", "Other Hospital", "--dicomweb",
               f"{orthanc.url}/dicom-web")
    server.cli("node", "add", "CLOSED", "--host", "127.0.0.1", "--port", str(free_port()),
               "--name", "Closed Hospital")
    server.cli("node", "add", "LOCKED", "--host", "127.0.0.1", "--port", str(free_port()),
               "--name", "Locked Hospital", "--dicomweb", server.dicomweb,
               "--dicomweb-auth", "Bearer not-a-token")
    with server.http() as http:
        works = http.post("/api/nodes/ORTHANC/test").json()
        closed = http.post("/api/nodes/CLOSED/test").json()
        locked = http.post("/api/nodes/LOCKED/test").json()
        audit = http.get("/api/audit", params={"action": "node.test"})
    assert [(c["protocol"], c["ok"]) for c in works] == [("DICOM", True), ("DICOMweb", True)]
    assert "C-ECHO answered" in works[0]["detail"] and "QIDO-RS answered" in works[1]["detail"]
    assert closed == [{"protocol": "DICOM", "ok": False,
                       "detail": "Closed Hospital cannot be reached"}]
    assert locked[1] == {"protocol": "DICOMweb", "ok": False,
                         "detail": "Locked Hospital refused our credentials"}
    assert [e["outcome"] for e in audit.json()] == ["failure", "failure", "success"]
