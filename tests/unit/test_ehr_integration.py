"""EHR integration: FHIR R4 ImagingStudy (searched and read like an EHR's FHIR client would,
every answer validated with fhir.resources' R4 models) and IHE IID launch URLs (signed,
short-lived, single-use; refusals audited with the launching system's name)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome
from pydicom import Dataset, dcmread
from sqlalchemy import select

from imageshare.domain.actors import Actor
from imageshare.ehr.launch import sign_launch
from imageshare.fhir.imaging_study import resource_id, study_uid_of
from imageshare.storage.index.schema import ehr_systems
from imageshare.web.server import create_app
from tests.conftest import make_archive
from tests.factory import ct_series
from tests.unit.test_web_pages import browser_sign_in

PASSWORD = "ehr-test-password"
NHS = "9434765919"
OTHER_NHS = "9434765870"
NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
PUBLIC = "https://images.example-trust.nhs.uk"
SYSTEM = Actor("system", "tests", "admin", "tests")
HTML = {"Accept": "text/html"}


def _nhs(number: str) -> list[Dataset]:
    item = Dataset()
    item.PatientID = number
    item.IssuerOfPatientID = "NHS"
    return [item]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    """Patient H100 (NHS 9434765919) with a CT (2024) and an ultrasound (2025), a study of
    that patient waiting in the inbox, and another patient's CT; accounts and an EHR."""
    tmp_path = tmp_path_factory.mktemp("ehr")
    archive = make_archive(tmp_path, public_url=PUBLIC)
    archive.users.ensure_admin(PASSWORD)
    ct = ct_series(tmp_path / "ct", 3, patient_id="H100", patient_name="Jones^Alice",
                   OtherPatientIDsSequence=_nhs(NHS), StudyDate="20240301",
                   AccessionNumber="ACC-CT", BodyPartExamined="CHEST",
                   TimezoneOffsetFromUTC="+0000")
    us = ct_series(tmp_path / "us", 1, patient_id="H100", patient_name="Jones^Alice",
                   OtherPatientIDsSequence=_nhs(NHS), StudyDate="20250610",
                   AccessionNumber="ACC-US", Modality="US")
    other = ct_series(tmp_path / "other", 1, patient_id="H200", patient_name="Brown^Bob",
                      OtherPatientIDsSequence=_nhs(OTHER_NHS), StudyDate="20250101",
                      AccessionNumber="ACC-OTHER")
    inbox = ct_series(tmp_path / "inbox", 1, patient_id="H100", patient_name="Jones^Alice",
                      OtherPatientIDsSequence=_nhs(NHS), StudyDate="20251001",
                      AccessionNumber="ACC-INBOX")
    for path in ct + other + us:
        archive.ingest.store_copy(path, SYSTEM)
    archive.ingest.store_copy(inbox[0], Actor("user", "othersite", "site", "10.0.0.9"))
    for name, role in (("clin", "clinician"), ("pat", "patient"), ("rev", "reviewer")):
        archive.users.add(name, PASSWORD, role)
    app = create_app(archive)
    uid = {name: dcmread(path[0], stop_before_pixels=True).StudyInstanceUID
           for name, path in (("ct", ct), ("us", us), ("other", other), ("inbox", inbox))}
    secret = archive.ehr_launches.add("epr")
    yield {"archive": archive, "app": app, "uid": uid, "secret": secret}
    archive.close()


def fhir_client(world, username: str = "clin") -> TestClient:
    """An EHR's FHIR client holding an API token of ``username``."""
    token = world["archive"].users.create_token(username, "ehr")
    return TestClient(world["app"], headers={"Authorization": f"Bearer {token}",
                                             "Accept": "application/fhir+json"})


def search(client: TestClient, **params: str) -> Bundle:
    answer = client.get("/fhir/ImagingStudy", params=params)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/fhir+json")
    return Bundle.model_validate(answer.json())


def studies(bundle: Bundle) -> list[ImagingStudy]:
    return [ImagingStudy.model_validate(e.resource.model_dump()) for e in bundle.entry or []]


def uid_of(study: ImagingStudy) -> str:
    [dicom] = [i.value for i in study.identifier if i.system == "urn:dicom:uid"]
    return dicom.removeprefix("urn:oid:")


# -- FHIR --------------------------------------------------------------------------------------


def test_an_ehr_finds_a_patients_studies_by_nhs_number_as_valid_r4_imaging_studies(world):
    with fhir_client(world) as client:
        bundle = search(client, **{"patient.identifier": f"{NHS_SYSTEM}|{NHS}"})
    assert bundle.type == "searchset"
    found = studies(bundle)
    # Newest first; the other patient's study and the one waiting in the inbox never appear.
    assert [uid_of(s) for s in found] == [world["uid"]["us"], world["uid"]["ct"]]
    us, ct = found
    assert ct.subject.identifier.system == NHS_SYSTEM and ct.subject.identifier.value == NHS
    assert ct.started.isoformat().startswith("2024-03-01T10:15:00")
    assert us.modality[0].code == "US" and ct.modality[0].code == "CT"
    assert (ct.numberOfSeries, ct.numberOfInstances) == (1, 3)
    [series] = ct.series
    assert (series.modality.code, series.numberOfInstances, series.bodySite.display) == (
        "CT", 3, "CHEST")
    assert any(i.type and i.type.coding[0].code == "ACSN" and i.value == "ACC-CT"
               for i in ct.identifier)
    endpoints = {e.connectionType.code: e.address for e in ct.contained}
    assert endpoints["dicom-wado-rs"] == f"{PUBLIC}/dicomweb"
    assert endpoints["ihe-iid"].startswith(f"{PUBLIC}/iid?requestType=STUDY&studyUID=")
    assert {r.reference for r in ct.endpoint} == {"#dicomweb", "#viewer"}
    assert all(e.fullUrl == f"{PUBLIC}/fhir/ImagingStudy/{e.resource.id}" for e in bundle.entry)


def test_a_search_by_post_keeps_the_patient_out_of_the_url_and_answers_the_same(world):
    """FHIR R4 search by POST to ImagingStudy/_search with a form body: the same Bundle as
    the GET search; any other body type, an oversized body or no credentials are refused."""
    wanted = {"patient.identifier": f"{NHS_SYSTEM}|{NHS}"}
    with fhir_client(world) as client:
        by_get = search(client, **wanted)
        answer = client.post("/fhir/ImagingStudy/_search", data=wanted)
        assert answer.status_code == 200, answer.text
        by_post = Bundle.model_validate(answer.json())
        assert [uid_of(s) for s in studies(by_post)] == [uid_of(s) for s in studies(by_get)]
        assert NHS not in str(answer.url)
        as_json = client.post("/fhir/ImagingStudy/_search", json=wanted)
        assert as_json.status_code == 415
        assert as_json.json()["resourceType"] == "OperationOutcome"
        huge = client.post("/fhir/ImagingStudy/_search", content=b"a=" + b"x" * 70000,
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert huge.status_code == 413
    with TestClient(world["app"]) as stranger:
        assert stranger.post("/fhir/ImagingStudy/_search", data=wanted,
                             headers={"Accept": "application/fhir+json"}).status_code == 401


def test_a_study_read_by_its_id_matches_the_search_and_the_id_carries_no_patient_data(world):
    with fhir_client(world) as client:
        [entry] = search(client, identifier="|ACC-CT").entry
        answer = client.get(f"/fhir/ImagingStudy/{entry.resource.id}")
        unknown = client.get(f"/fhir/ImagingStudy/{resource_id('1.2.3.4')}")
        inbox = client.get(f"/fhir/ImagingStudy/{resource_id(world['uid']['inbox'])}")
    assert answer.status_code == 200
    read = ImagingStudy.model_validate(answer.json())
    assert read.id == entry.resource.id == resource_id(world["uid"]["ct"])
    assert study_uid_of(read.id) == world["uid"]["ct"]
    assert NHS not in read.id and "H100" not in read.id and world["uid"]["ct"] not in read.id
    # The read lists each series' instances (a search does not: its pages stay small).
    [series] = read.series
    assert [i.number for i in series.instance] == [1, 2, 3]
    assert {i.sopClass.code for i in series.instance} == {"urn:oid:1.2.840.10008.5.1.4.1.1.2"}
    assert all(i.sopClass.system == "urn:ietf:rfc:3986" for i in series.instance)
    assert not entry.resource.series[0].instance
    searched = answer.json()
    for item in searched["series"]:
        item.pop("instance")
    assert ImagingStudy.model_validate(searched).model_dump() == ImagingStudy.model_validate(
        entry.resource.model_dump()).model_dump()
    for missing in (unknown, inbox):
        assert missing.status_code == 404
        assert OperationOutcome.model_validate(missing.json()).issue[0].code == "not-found"


def test_searches_by_accession_date_and_modality_page_with_next_links(world):
    nhs = {"patient.identifier": f"{NHS_SYSTEM}|{NHS}"}
    with fhir_client(world) as client:
        assert [uid_of(s) for s in studies(search(client, identifier="|ACC-US"))] == [
            world["uid"]["us"]]
        assert [uid_of(s) for s in studies(search(client, **nhs, started="ge2025-01-01"))] == [
            world["uid"]["us"]]
        assert [uid_of(s) for s in studies(search(client, **nhs, started="lt2025-06-10"))] == [
            world["uid"]["ct"]]
        assert [uid_of(s) for s in studies(search(client, **nhs, started="eq2024-03-01"))] == [
            world["uid"]["ct"]]
        assert [uid_of(s) for s in studies(search(
            client, **nhs, modality="http://dicom.nema.org/resources/ontology/DCM|US"))] == [
            world["uid"]["us"]]
        hospital = studies(search(client, **{
            "patient.identifier": "urn:imageshare:hospital-number|H200"}))
        assert [uid_of(s) for s in hospital] == [world["uid"]["other"]]
        first = search(client, **nhs, _count="1")
        [following] = [link.url for link in first.link if link.relation == "next"]
        second = Bundle.model_validate(client.get(following).json())
    assert following.startswith(f"{PUBLIC}/fhir/ImagingStudy?")
    assert [uid_of(s) for s in studies(first) + studies(second)] == [
        world["uid"]["us"], world["uid"]["ct"]]
    assert not [link for link in second.link if link.relation == "next"]


def test_fhir_searches_are_audited_like_qido_rs(world):
    with fhir_client(world) as client:
        search(client, **{"patient.identifier": f"{NHS_SYSTEM}|{NHS}"})
    queries = [e for e in world["archive"].audit.events("study.query")
               if e["actor"] == "user:clin"]
    assert queries and NHS in json.dumps(queries, default=str)


def test_fhir_errors_are_operation_outcomes_with_their_http_status(world):
    app = world["app"]
    with TestClient(app) as nobody, fhir_client(world, "pat") as patient, \
            fhir_client(world) as client:
        cases = [
            (nobody.get("/fhir/ImagingStudy"), 401, "login"),
            (patient.get("/fhir/ImagingStudy"), 403, "forbidden"),
            (client.get("/fhir/ImagingStudy/not-an-id!"), 404, "not-found"),
            (client.get("/fhir/ImagingStudy", params={"patient.identifier":
                                                      f"{NHS_SYSTEM}|9434765918"}), 400,
             "invalid"),
            (client.get("/fhir/ImagingStudy", params={"name": "Jones"}), 400, "invalid"),
            (client.get("/fhir/ImagingStudy", params={"started": "sa2024-01-01"}), 400,
             "invalid"),
            (client.get("/fhir/Patient"), 404, "not-found"),
            (client.get("/fhir/ImagingStudy", headers={"Accept": "application/fhir+xml"}),
             406, "not-supported"),
        ]
    for answer, status, code in cases:
        assert answer.status_code == status, answer.text
        assert answer.headers["content-type"].startswith("application/fhir+json")
        outcome = OperationOutcome.model_validate(answer.json())
        assert outcome.issue[0].code == code and outcome.issue[0].diagnostics
    assert cases[0][0].headers["www-authenticate"].startswith("Bearer")
    assert "9434765918" not in cases[2][0].text or cases[3][0].status_code == 400


def test_the_capability_statement_lists_imaging_study_search_and_read(world):
    """Read before any credentials, as FHIR clients discover a server."""
    with TestClient(world["app"], headers={"Accept": "application/fhir+json"}) as client:
        answer = client.get("/fhir/metadata")
    assert answer.status_code == 200
    statement = CapabilityStatement.model_validate(answer.json())
    [resource] = statement.rest[0].resource
    assert resource.type == "ImagingStudy"
    assert {i.code for i in resource.interaction} == {"read", "search-type"}
    assert {"patient.identifier", "identifier", "started", "modality"} <= {
        p.name for p in resource.searchParam}
    assert statement.fhirVersion == "4.0.1"


# -- IID launch --------------------------------------------------------------------------------


def launch_url(secret: str, expires_in: int = 120, nonce: str = "", user: str = "clin",
               ehr: str = "epr", **context: str) -> str:
    params = {**context, "ehr": ehr, "user": user,
              "expires": str(int(time.time()) + expires_in),
              "nonce": nonce or f"n-{time.monotonic_ns()}-launch"}
    items = list(params.items())
    return "/iid?" + urlencode([*items, ("signature", sign_launch(items, secret))])


def launches(archive, after: int = 0) -> list[dict]:
    """``ehr.launch`` events, oldest first, after the first ``after``."""
    return list(reversed(list(archive.audit.events("ehr.launch", limit=100_000))))[after:]


def test_a_signed_launch_signs_the_user_in_and_opens_the_viewer_audited_with_the_ehr(world):
    url = launch_url(world["secret"], requestType="STUDY", studyUID=world["uid"]["ct"])
    before = len(launches(world["archive"]))
    with TestClient(world["app"]) as browser:
        opened = browser.get(url, headers=HTML, follow_redirects=False)
        assert opened.status_code == 200
        target = f"/viewer/{world['uid']['ct']}"
        assert f'content="0; url={target}"' in opened.text
        assert browser.get(target, headers=HTML).status_code == 200
    [event] = launches(world["archive"], before)
    assert event["actor"] == "user:clin" and event["outcome"] == "success"
    assert event["study_uid"] == world["uid"]["ct"]
    assert event["detail"]["ehr"] == "epr"


def test_a_signed_patient_launch_lists_the_patients_studies_in_the_answer_itself(world):
    url = launch_url(world["secret"], requestType="PATIENT",
                     patientID=f"{NHS}^^^&2.16.840.1.113883.2.1.4.1&ISO")
    before = len(launches(world["archive"]))
    with TestClient(world["app"]) as browser:
        listed = browser.get(url, headers=HTML, follow_redirects=False)
    assert listed.status_code == 200 and "location" not in listed.headers
    assert "ACC-CT" in listed.text and "ACC-US" in listed.text
    assert "ACC-OTHER" not in listed.text
    assert launches(world["archive"], before)[0]["detail"]["opened"] == "study list"


def test_tampered_expired_replayed_and_unknown_launch_urls_are_refused_and_audited(world):
    secret, ct = world["secret"], world["uid"]["ct"]
    good = launch_url(secret, requestType="STUDY", studyUID=ct)
    before = len(launches(world["archive"]))
    cases = {
        "bad-signature": good.replace(ct, world["uid"]["other"]),
        "expired": launch_url(secret, expires_in=-5, requestType="STUDY", studyUID=ct),
        "too-long": launch_url(secret, expires_in=86400, requestType="STUDY", studyUID=ct),
        "unknown-ehr": launch_url(secret, ehr="elsewhere", requestType="STUDY", studyUID=ct),
        "admin": launch_url(secret, user="admin", requestType="STUDY", studyUID=ct),
        "unknown-user": launch_url(secret, user="nobody", requestType="STUDY", studyUID=ct),
    }
    with TestClient(world["app"]) as browser:
        assert browser.get(good, headers=HTML).status_code == 200  # spends its nonce
        browser.cookies.clear()
        cases["replayed"] = good
        for reason, url in cases.items():
            answer = browser.get(url, headers=HTML, follow_redirects=False)
            assert answer.status_code == 403, reason
            assert "The launch link was refused" in answer.text, reason
            assert "set-cookie" not in answer.headers, reason
            assert world["uid"]["other"] not in answer.text
    refused = [e["detail"] for e in launches(world["archive"], before)
               if e["outcome"] == "refused"]
    assert sorted(r["reason"] for r in refused) == sorted(cases)
    assert all(r["ehr"] in ("epr", "elsewhere") for r in refused)


def test_refused_launch_links_count_as_failed_sign_ins_from_their_address(world):
    """A stream of forged or replayed links from one address is held back like password
    guessing (429), and a good link from there waits for the window too."""
    secret, ct = world["secret"], world["uid"]["ct"]
    forged = launch_url(secret, requestType="STUDY", studyUID=ct).replace(
        "signature=", "signature=0")
    with TestClient(world["app"], client=("10.66.0.1", 50000)) as browser:
        answers = [browser.get(forged, headers=HTML).status_code for _ in range(21)]
        assert answers[:20] == [403] * 20 and answers[20] == 429
        good = browser.get(launch_url(secret, requestType="STUDY", studyUID=ct), headers=HTML)
        assert good.status_code == 429 and "set-cookie" not in good.headers


def test_a_refused_bearer_token_is_told_invalid_audited_and_throttled(world):
    """RFC 6750: a presented token that is not (or no longer) valid gets 401 with
    error="invalid_token"; each refusal is audited, and a stream of them from one address is
    held back like password guessing."""
    archive = world["archive"]
    before = len(list(archive.audit.events(action="session.token")))
    with TestClient(world["app"], client=("10.66.0.2", 50000), headers={
            "Authorization": "Bearer not-a-token", "Accept": "application/fhir+json"}) as ehr:
        answer = ehr.get("/fhir/ImagingStudy", params={"patient.identifier": "H100"})
        assert answer.status_code == 401
        assert 'error="invalid_token"' in answer.headers["www-authenticate"]
        assert answer.json()["resourceType"] == "OperationOutcome"
        statuses = [ehr.get("/fhir/ImagingStudy").status_code for _ in range(20)]
        assert statuses[-1] == 429 and set(statuses[:19]) == {401}
    refused = list(archive.audit.events(action="session.token"))[before:]
    assert refused and all(e["outcome"] == "failure" for e in refused)
    assert all(e["source"] == "10.66.0.2" for e in refused)


def test_patient_details_alone_open_nothing(world):
    """Without a valid signature the caller must be signed in; a patient account is refused
    by the policy like everywhere else."""
    unsigned = "/iid?" + urlencode({"requestType": "PATIENT", "patientID": f"{NHS}^^^NHS"})
    with TestClient(world["app"]) as nobody:
        answer = nobody.get(unsigned, headers=HTML, follow_redirects=False)
        assert answer.status_code == 303 and answer.headers["location"].startswith("/login")
        assert nobody.get(unsigned).status_code == 401
    with TestClient(world["app"]) as browser:
        browser_sign_in(browser, "clin", PASSWORD)
        listed = browser.get(unsigned, headers=HTML)
        assert listed.status_code == 200 and "ACC-US" in listed.text
    patient_launch = launch_url(world["secret"], user="pat", requestType="STUDY",
                                studyUID=world["uid"]["ct"])
    with TestClient(world["app"]) as browser:
        assert browser.get(patient_launch, headers=HTML).status_code == 403
    assert [e for e in world["archive"].audit.events("access.denied")
            if e["actor"] == "user:pat"]


def test_a_launch_by_accession_number_opens_that_study_and_several_studies_are_listed(world):
    url = launch_url(world["secret"], requestType="STUDY", accessionNumber="ACC-US")
    several = launch_url(world["secret"], requestType="STUDY",
                         studyUID=f"{world['uid']['ct']},{world['uid']['other']},1.2.3.999")
    with TestClient(world["app"]) as browser:
        opened = browser.get(url, headers=HTML)
        listed = browser.get(several, headers=HTML)
    assert f"/viewer/{world['uid']['us']}" in opened.text
    assert listed.status_code == 200 and "http-equiv" not in listed.text
    assert "ACC-CT" in listed.text and "ACC-OTHER" in listed.text


def test_ehr_secrets_are_stored_sealed(world):
    with world["archive"].engine.connect() as conn:
        [stored] = conn.execute(select(ehr_systems.c.secret)).scalars().all()
    assert stored.startswith("fernet1:") and world["secret"] not in stored
    assert [s.name for s in world["archive"].ehr_launches.systems()] == ["epr"]


def test_the_readme_example_builds_a_launch_url_imageshare_accepts(world):
    """The EHR-side example in the README is the specification of the signature."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = readme.split("```python\nimport hashlib")[1].split("```")[0]
    namespace: dict = {}
    exec("import hashlib" + code.split("launch_url(SECRET")[0], namespace)  # noqa: S102
    url = namespace["launch_url"](world["secret"], "clin", requestType="STUDY",
                                  accessionNumber="ACC-CT")
    with TestClient(world["app"]) as browser:
        opened = browser.get(url.removeprefix("https://images.example-trust.nhs.uk"),
                             headers=HTML)
    assert opened.status_code == 200 and f"/viewer/{world['uid']['ct']}" in opened.text


def test_ehrs_are_added_listed_and_removed_on_the_command_line(tmp_path, capsys):
    from imageshare.cli import main

    data = ["--data-dir", str(tmp_path / "data")]
    assert main(["ehr", "add", "ward-epr", *data]) == 0
    secret = capsys.readouterr().out.strip().splitlines()[-1]
    assert len(secret) >= 40
    assert main(["ehr", "add", "ward-epr", *data]) == 2
    assert "already registered" in capsys.readouterr().err
    assert main(["ehr", "list", *data]) == 0
    assert capsys.readouterr().out.startswith("ward-epr\t")
    assert main(["ehr", "remove", "ward-epr", *data]) == 0
    assert main(["ehr", "list", *data]) == 0
    assert "ward-epr" not in capsys.readouterr().out.split("removed")[-1]


def test_a_refused_launch_does_not_tell_a_stranger_which_ehr_names_are_registered(world):
    """Before the signature is checked, every refusal reads the same: an unknown EHR name
    and a registered one with a wrong signature give the same page (the audit trail keeps
    the reason), so nobody maps the connected systems by trying names."""
    ct = world["uid"]["ct"]
    with TestClient(world["app"]) as browser:
        unknown = browser.get(launch_url("x" * 43, ehr="elsewhere", requestType="STUDY",
                                         studyUID=ct), headers=HTML)
        forged = browser.get(launch_url("x" * 43, requestType="STUDY", studyUID=ct),
                             headers=HTML)
    assert unknown.status_code == forged.status_code == 403
    assert unknown.text == forged.text
