"""Two ImageShare sites on one machine: a push over STOW-RS lands in the other's inbox; a
request for prior imaging reaches the other's staff, who answer it with a push over DIMSE."""

from __future__ import annotations

import time

import httpx
import pytest
from pydicom import Dataset, dcmread

from tests.factory import ct_series
from tests.peers import RunningServer

pytestmark = pytest.mark.interop
STAFF = ("staff", "staff-password-1")


def api(server, method, path, **kwargs):
    with httpx.Client(base_url=server.url, auth=STAFF, timeout=60) as client:
        response = client.request(method, path, **kwargs)
    assert response.status_code < 300, response.text
    return response.json()


def wait(server, path, field, values, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = api(server, "GET", path)
        if state[field] in values:
            return state
        time.sleep(0.1)
    raise AssertionError(f"{path} stayed at {state[field]}")


@pytest.fixture
def sites(tmp_path):
    a = RunningServer(tmp_path / "a", ae_title="SITEA").start()
    b = RunningServer(tmp_path / "b", ae_title="SITEB").start()
    try:
        for server in (a, b):
            server.cli("user", "add", STAFF[0], "--role", "clinician", "--password", STAFF[1])
        # B knows A: a service account for A's STOW-RS and requests, and A's DICOM address
        b.cli("node", "add", "SITEA", "--host", "127.0.0.1", "--port", str(a.dicom_port),
              "--name", "Hospital A", "--inbox")
        b.cli("user", "add", "site-a", "--role", "site", "--password", "service-password",
              "--site", "SITEA")
        token = b.cli("user", "token", "site-a", "--name", "site A").stdout.strip()
        # A knows B over DICOMweb (with the token) and DIMSE
        a.cli("node", "add", "SITEB", "--host", "127.0.0.1", "--port", str(b.dicom_port),
              "--name", "Hospital B", "--inbox", "--dicomweb", b.dicomweb,
              "--dicomweb-auth", f"Bearer {token}")
        yield a, b
    finally:
        a.stop()
        b.stop()


def test_push_request_and_answer_between_two_imageshare_sites(sites, tmp_path):
    a, b = sites
    sent = ct_series(tmp_path / "a-study", 3, patient_id="9434765919",
                     patient_name="Franklin^Rosalind")
    a.cli("import", "--quiet", str(tmp_path / "a-study"))
    study_uid = dcmread(sent[0], stop_before_pixels=True).StudyInstanceUID
    queued = api(a, "POST", "/api/exchange/push",
                 json={"site": "SITEB", "study_uid": study_uid, "priority": "urgent"})
    done = wait(a, f"/api/exchange/transfers/{queued['public_id']}", "state",
                ("delivered", "failed"))
    assert done["state"] == "delivered" and done["sent"] == 3
    [item] = api(b, "GET", "/api/exchange/inbox")
    assert item["study_uid"] == study_uid and item["site"] == "site-a"

    prior = ct_series(tmp_path / "b-prior", 2, patient_id="9434765919",
                      patient_name="Franklin^Rosalind")
    b.cli("import", "--quiet", str(tmp_path / "b-prior"))
    asked = api(a, "POST", "/api/exchange/requests", json={
        "site": "SITEB", "reason": "prior CT for comparison", "priority": "urgent",
        "nhs_number": "943 476 5919"})
    assert asked["state"] == "sent", asked
    [incoming] = api(b, "GET", "/api/exchange/requests", params={"direction": "incoming"})
    assert incoming["site"] == "SITEA" and incoming["nhs_number"] == "9434765919"
    assert incoming["reason"] == "prior CT for comparison"
    prior_uid = dcmread(prior[0], stop_before_pixels=True).StudyInstanceUID
    answer = api(b, "POST", f"/api/exchange/requests/{incoming['public_id']}/fulfil",
                 json={"study_uid": prior_uid})
    wait(b, f"/api/exchange/transfers/{answer['public_id']}", "state", ("delivered",))
    arrived = api(a, "GET", "/api/exchange/inbox")
    assert [i["study_uid"] for i in arrived] == [prior_uid] and arrived[0]["site"] == "SITEB"
    assert api(b, "GET", "/api/exchange/requests",
               params={"direction": "incoming"})[0]["state"] == "fulfilled"


def test_another_imageshare_finds_a_patient_filed_under_a_hospital_number(sites, tmp_path):
    a, b = sites
    (path,) = ct_series(tmp_path / "b-study", 1, patient_id="B-55012",
                        patient_name="Hopper^Grace")
    ds = dcmread(path)
    other = Dataset()
    other.PatientID = "9449304424"
    other.IssuerOfPatientID = "NHS"
    ds.OtherPatientIDsSequence = [other]
    ds.save_as(path)
    b.cli("import", str(path))
    # A searches B over DICOMweb with a reading account of B's, then over DIMSE (C-FIND).
    b.cli("user", "add", "a-search", "--role", "service", "--password", "service-password")
    token = b.cli("user", "token", "a-search", "--name", "A searches").stdout.strip()
    for how in (["--dicomweb", b.dicomweb, "--dicomweb-auth", f"Bearer {token}"], []):
        a.cli("node", "add", "SITEB", "--host", "127.0.0.1", "--port", str(b.dicom_port),
              "--name", "Hospital B", "--inbox", "--replace", *how)
        result = api(a, "POST", "/api/exchange/search", json={"nhs": "943 476 5919"})
        assert [s["status"] for s in result["sites"]] == ["answered"]  # nobody: nothing
        assert result["sites"][0]["studies"] == []
        result = api(a, "POST", "/api/exchange/search", json={"nhs": "9449304424"})
        [site] = result["sites"]
        assert site["status"] == "answered", site
        assert ("dicomweb" if how else "dimse") in site["detail"]
        [study] = site["studies"]
        assert (study["patient_id"], study["link"]) == ("B-55012", "linked")
        assert study["study_uid"] == ds.StudyInstanceUID
