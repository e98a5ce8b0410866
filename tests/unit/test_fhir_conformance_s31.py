"""FHIR R4 ImagingStudy conformance, checked against the specification rather than our own
habits: token searches match exactly (never as DICOM wildcards), ``patient:identifier`` and
``subject:identifier`` find a patient's studies, paging cannot loop or silently stop,
``_summary=count`` and ``Prefer: handling=lenient`` are honoured, repeated parameters are
never silently dropped, every resource is valid R4, and a read is audited against its study.
Every answer is validated with fhir.resources' R4 models."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome
from pydicom import Dataset, dcmread
from sqlalchemy import insert, update

from imageshare.domain.actors import Actor
from imageshare.fhir.imaging_study import resource_id
from imageshare.web.server import create_app
from tests.conftest import make_archive
from tests.factory import ct_series

PASSWORD = "fhir-s31-password"
NHS = "9434765919"
OTHER_NHS = "9434765870"
NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
HOSPITAL = "urn:imageshare:hospital-number"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
PUBLIC = "https://images.example-trust.nhs.uk"
SYSTEM = Actor("system", "tests", "admin", "tests")


def _nhs(number: str) -> list[Dataset]:
    item = Dataset()
    item.PatientID = number
    item.IssuerOfPatientID = "NHS"
    return [item]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    """H100 (NHS 9434765919): a CT (2024-03-01) and an ultrasound (2025-06-10); H101 and
    H200 (NHS 9434765870): one CT each; a study of H300 whose series number is negative; a
    clinician account; another person whose hospital number at trust RXX happens to be the
    same ten digits as H100's NHS number. QIDO-RS/C-FIND answers are capped at 3 matches."""
    tmp_path = tmp_path_factory.mktemp("fhir-s31")
    archive = make_archive(tmp_path, public_url=PUBLIC, qido_max_limit=3)
    archive.users.ensure_admin(PASSWORD)
    made = {
        "ct": ct_series(tmp_path / "ct", 2, patient_id="H100", patient_name="Jones^Alice",
                        OtherPatientIDsSequence=_nhs(NHS), StudyDate="20240301",
                        AccessionNumber="ACC-CT"),
        "us": ct_series(tmp_path / "us", 1, patient_id="H100", patient_name="Jones^Alice",
                        OtherPatientIDsSequence=_nhs(NHS), StudyDate="20250610",
                        AccessionNumber="ACC-US", Modality="US"),
        "h101": ct_series(tmp_path / "h101", 1, patient_id="H101", patient_name="Smith^Carl",
                          StudyDate="20230505", AccessionNumber="ACC-101"),
        "other": ct_series(tmp_path / "other", 1, patient_id="H200",
                           patient_name="Brown^Bob", OtherPatientIDsSequence=_nhs(OTHER_NHS),
                           StudyDate="20250101", AccessionNumber="ACC-OTHER"),
        "negative": ct_series(tmp_path / "neg", 1, patient_id="H300",
                              patient_name="Green^Dora", StudyDate="20220202",
                              AccessionNumber="ACC-NEG", SeriesNumber=-1),
        "collision": ct_series(tmp_path / "collision", 1, patient_id=NHS,
                               patient_name="Other^Person", IssuerOfPatientID="RXX",
                               StudyDate="20230707", AccessionNumber="ACC-RXX"),
    }
    for paths in made.values():
        for path in paths:
            archive.ingest.store_copy(path, SYSTEM)
    archive.users.add("clin", PASSWORD, "clinician")
    uid = {name: dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
           for name, paths in made.items()}
    yield {"archive": archive, "app": create_app(archive), "uid": uid}
    archive.close()


def fhir_client(world, username: str = "clin") -> TestClient:
    """An EHR's FHIR client holding an API token of ``username``."""
    token = world["archive"].users.create_token(username, "ehr")
    return TestClient(world["app"], headers={"Authorization": f"Bearer {token}",
                                             "Accept": "application/fhir+json"})


def get_bundle(client: TestClient, url: str = "/fhir/ImagingStudy",
               headers: dict[str, str] | None = None, **params: str) -> Bundle:
    answer = client.get(url, params=params or None, headers=headers)
    assert answer.status_code == 200, answer.text
    bundle = Bundle.model_validate(answer.json())
    for entry in bundle.entry or []:
        if entry.resource.get_resource_type() == "ImagingStudy":
            ImagingStudy.model_validate(entry.resource.model_dump())
    return bundle


def uids(bundle: Bundle) -> list[str]:
    found = []
    for entry in bundle.entry or []:
        if entry.resource.get_resource_type() != "ImagingStudy":
            continue
        [dicom] = [i.value for i in entry.resource.identifier if i.system == "urn:dicom:uid"]
        found.append(dicom.removeprefix("urn:oid:"))
    return found


def refused(answer, status: int = 400, code: str = "invalid") -> OperationOutcome:
    assert answer.status_code == status, answer.text
    outcome = OperationOutcome.model_validate(answer.json())
    assert outcome.issue[0].code == code
    return outcome


# -- token searches are exact --------------------------------------------------------------


@pytest.mark.parametrize("value", [f"{HOSPITAL}|H10*", f"{HOSPITAL}|H1?0", "|*",
                                   f"{HOSPITAL}|H999\\H200"])
def test_a_patient_identifier_is_matched_exactly_never_as_a_dicom_wildcard(world, value):
    """FHIR token search is exact: ``H10*`` is not every hospital number starting H10, and a
    backslash does not make a DICOM list of patients."""
    with fhir_client(world) as client:
        answer = client.get("/fhir/ImagingStudy", params={"patient.identifier": value})
    if answer.status_code == 200:
        assert uids(Bundle.model_validate(answer.json())) == []
    else:
        refused(answer)


@pytest.mark.parametrize("value", ["|*", "|ACC-*", "|ACC-C?", "|ACC-CT\\ACC-OTHER",
                                   "urn:dicom:uid|urn:oid:1.2*"])
def test_an_identifier_is_matched_exactly_never_as_a_dicom_wildcard(world, value):
    with fhir_client(world) as client:
        answer = client.get("/fhir/ImagingStudy", params={"identifier": value})
    if answer.status_code == 200:
        assert uids(Bundle.model_validate(answer.json())) == []
    else:
        refused(answer)


def test_repeated_parameters_are_and_never_the_last_one_wins(world):
    """Repeating a parameter means AND (FHIR search 3.1.1.5.?): two different accession
    numbers find nothing, never just the second one's study."""
    with fhir_client(world) as client:
        answer = client.get("/fhir/ImagingStudy?identifier=|ACC-CT&identifier=|ACC-OTHER")
        by_id = client.get(f"/fhir/ImagingStudy?_id={resource_id(world['uid']['ct'])}"
                           f"&identifier=urn:dicom:uid|urn:oid:{world['uid']['other']}")
        modality = client.get(f"/fhir/ImagingStudy?patient.identifier={HOSPITAL}|H100"
                              "&modality=CT&modality=US")
    for each in (answer, by_id, modality):
        if each.status_code == 200:
            assert uids(Bundle.model_validate(each.json())) == []
        else:
            refused(each)


def test_identifier_takes_a_comma_list_meaning_or(world):
    with fhir_client(world) as client:
        bundle = get_bundle(client, identifier="|ACC-CT,|ACC-US")
        by_uid = get_bundle(client, identifier=f"urn:dicom:uid|urn:oid:{world['uid']['ct']},"
                                              f"urn:dicom:uid|urn:oid:{world['uid']['other']}")
    assert sorted(uids(bundle)) == sorted([world["uid"]["ct"], world["uid"]["us"]])
    assert sorted(uids(by_uid)) == sorted([world["uid"]["ct"], world["uid"]["other"]])


# -- the patient search parameters -------------------------------------------------------


@pytest.mark.parametrize("name", ["patient:identifier", "subject:identifier",
                                  "subject.identifier", "subject:Patient.identifier",
                                  "patient.identifier"])
def test_the_patient_is_found_by_its_identifier_as_a_logical_reference(world, name):
    """ImagingStudy.subject is a logical reference (an identifier, no Patient resource here):
    R4's ``:identifier`` modifier is the standard way to search it."""
    with fhir_client(world) as client:
        bundle = get_bundle(client, **{name: f"{NHS_SYSTEM}|{NHS}"})
    assert uids(bundle) == [world["uid"]["us"], world["uid"]["ct"]]


def test_status_is_a_search_parameter(world):
    nhs = {"patient.identifier": f"{NHS_SYSTEM}|{NHS}"}
    with fhir_client(world) as client:
        available = get_bundle(client, **nhs, status="available")
        cancelled = get_bundle(client, **nhs, status="cancelled")
        bad = client.get("/fhir/ImagingStudy", params={**nhs, "status": "gone"})
    assert uids(available) == [world["uid"]["us"], world["uid"]["ct"]]
    assert uids(cancelled) == []
    refused(bad)


# -- dates --------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ("2024", ["ct"]), ("2024-03", ["ct"]), ("ge2025", ["us"]), ("lt2025-06", ["ct"]),
    ("gt2024-03", ["us"]), ("le2024", ["ct"]), ("eq2023", []),
])
def test_started_takes_a_year_or_a_month_as_well_as_a_day(world, value, expected):
    with fhir_client(world) as client:
        bundle = get_bundle(client, **{"patient.identifier": f"{NHS_SYSTEM}|{NHS}",
                                       "started": value})
    assert uids(bundle) == [world["uid"][name] for name in expected]


def test_two_started_ranges_that_do_not_meet_find_nothing_rather_than_fail(world):
    with fhir_client(world) as client:
        answer = client.get("/fhir/ImagingStudy?patient.identifier="
                            f"{NHS_SYSTEM}|{NHS}&started=2024-03-01&started=2025-06-10")
    assert answer.status_code == 200, answer.text
    assert uids(Bundle.model_validate(answer.json())) == []


# -- paging, totals, _summary --------------------------------------------------------------


def test_count_zero_answers_the_total_without_a_next_link_that_loops(world):
    with fhir_client(world) as client:
        bundle = get_bundle(client, **{"patient.identifier": f"{NHS_SYSTEM}|{NHS}",
                                       "_count": "0"})
    assert not bundle.entry
    assert bundle.total == 2
    assert not [link for link in bundle.link if link.relation == "next"]


def test_summary_count_answers_only_the_total(world):
    with fhir_client(world) as client:
        bundle = get_bundle(client, **{"patient.identifier": f"{NHS_SYSTEM}|{NHS}",
                                       "_summary": "count"})
        bad = client.get("/fhir/ImagingStudy", params={"_summary": "everything"})
    assert not bundle.entry and bundle.total == 2
    refused(bad)


def test_the_last_page_carries_the_total(world):
    with fhir_client(world) as client:
        bundle = get_bundle(client, **{"patient.identifier": f"{NHS_SYSTEM}|{NHS}"})
    assert bundle.total == 2


def test_paging_walks_every_match_past_the_query_engines_cap(world):
    """The archive caps one QIDO-RS answer at 3 matches here; a FHIR search of all five
    studies, two a page, still reaches every one of them (or says it cannot), never stopping
    silently after the cap."""
    seen: list[str] = []
    with fhir_client(world) as client:
        answer = client.get("/fhir/ImagingStudy", params={"_count": "2"})
        pages = 0
        while True:
            assert answer.status_code == 200, answer.text
            bundle = Bundle.model_validate(answer.json())
            seen += uids(bundle)
            pages += 1
            following = [link.url for link in bundle.link if link.relation == "next"]
            if not following or pages > 10:
                break
            answer = client.get(following[0])
    assert sorted(seen) == sorted(world["uid"].values())
    assert len(seen) == len(set(seen))


def test_the_self_link_shows_only_the_parameters_that_were_applied(world):
    with fhir_client(world) as client:
        bundle = get_bundle(client, **{"patient.identifier": f"{NHS_SYSTEM}|{NHS}",
                                       "_format": "json", "_pretty": "true"})
    [self_link] = [link.url for link in bundle.link if link.relation == "self"]
    assert "_format" not in self_link and "_pretty" not in self_link
    assert self_link.startswith(f"{PUBLIC}/fhir/ImagingStudy?")


def test_unknown_parameters_are_ignored_when_the_client_prefers_lenient_handling(world):
    nhs = {"patient.identifier": f"{NHS_SYSTEM}|{NHS}", "_elements": "id"}
    with fhir_client(world) as client:
        strict = client.get("/fhir/ImagingStudy", params=nhs,
                            headers={"Prefer": "handling=strict"})
        default = client.get("/fhir/ImagingStudy", params=nhs)
        lenient = get_bundle(client, headers={"Prefer": "handling=lenient"}, **nhs)
    refused(strict)
    refused(default)  # unknown filters are refused unless the client asks otherwise
    assert uids(lenient) == [world["uid"]["us"], world["uid"]["ct"]]
    [self_link] = [link.url for link in lenient.link if link.relation == "self"]
    assert "_elements" not in self_link


# -- resources are valid R4 ------------------------------------------------------------------


def test_a_negative_dicom_series_number_does_not_make_an_invalid_resource(world):
    """ImagingStudy.series.number is an unsignedInt; DICOM IS allows -1."""
    with fhir_client(world) as client:
        answer = client.get(f"/fhir/ImagingStudy/{resource_id(world['uid']['negative'])}")
    assert answer.status_code == 200, answer.text
    study = ImagingStudy.model_validate(answer.json())
    assert study.series[0].number is None


def test_every_resource_of_a_broad_search_is_valid_r4(world):
    with fhir_client(world) as client:
        bundle = get_bundle(client, _count="100")
    assert len(uids(bundle)) == len(world["uid"])


# -- errors and negotiation ------------------------------------------------------------------


def test_a_method_the_server_does_not_offer_is_not_supported(world):
    with fhir_client(world) as client:
        answer = client.delete(f"/fhir/ImagingStudy/{resource_id(world['uid']['ct'])}")
    refused(answer, 405, "not-supported")


def test_the_capability_statement_names_every_parameter_the_search_takes(world):
    with fhir_client(world) as client:
        statement = CapabilityStatement.model_validate(client.get("/fhir/metadata").json())
    [resource] = statement.rest[0].resource
    names = {p.name for p in resource.searchParam}
    assert {"patient", "subject", "identifier", "started", "modality", "status", "_id",
            "_count"} <= names


# -- audit ------------------------------------------------------------------------------------


def test_a_read_is_audited_against_its_study(world):
    """A FHIR read shows a study's details: the study's own access report must list it, as
    for a WADO-RS metadata read."""
    uid = world["uid"]["h101"]
    with fhir_client(world) as client:
        assert client.get(f"/fhir/ImagingStudy/{resource_id(uid)}").status_code == 200
    events = [e for e in world["archive"].audit.events(study_uid=uid)
              if e["actor"] == "user:clin" and e["action"] != "study.query"]
    assert events and events[0]["outcome"] == "success"


def test_a_page_of_more_studies_than_the_query_engines_cap_keeps_every_studys_series(world):
    """The series of a page's studies are asked for in one query: past the engine's cap (3
    here) the later studies must not lose their series (numberOfSeries 0, no series)."""
    with fhir_client(world) as client:
        bundle = get_bundle(client, _count="5")
    found = [ImagingStudy.model_validate(e.resource.model_dump()) for e in bundle.entry]
    assert len(found) == 5
    assert all(s.numberOfSeries == 1 and len(s.series) == 1 for s in found)


def test_a_reviewer_sees_only_what_was_shared_whatever_the_search_or_page(world):
    """A reviewer with one study shared finds it and nothing else: not by the patient's NHS
    number (the same patient's other study), not by another study's id or accession, not in a
    count, not by moving the paging offset."""
    from imageshare.sharing.links import NewShare
    from imageshare.storage.index.schema import shares

    archive, ct = world["archive"], world["uid"]["ct"]
    archive.users.add("rcp", PASSWORD, "reviewer")
    owner = Actor("user", "clin", "clinician", "127.0.0.1")
    archive.shares.create(NewShare(ct, recipient_user="rcp", deidentified=False), owner, None)
    with archive.engine.begin() as conn:  # as if the reviewer had opened it with its passcode
        conn.execute(update(shares).values(opened_at=datetime.now(UTC)))
    nhs = {"patient:identifier": f"{NHS_SYSTEM}|{NHS}"}
    with fhir_client(world, "rcp") as client:
        assert uids(get_bundle(client, **nhs)) == [ct]
        assert get_bundle(client, **nhs, _summary="count").total == 1
        assert get_bundle(client, _summary="count").total == 1
        assert uids(get_bundle(client, _offset="1", _count="1")) == []
        assert uids(get_bundle(client, identifier="|ACC-US,|ACC-OTHER")) == []
        assert uids(get_bundle(client, _id=resource_id(world["uid"]["us"]))) == []
        assert client.get(f"/fhir/ImagingStudy/{resource_id(world['uid']['us'])}"
                          ).status_code == 404
        assert client.get(f"/fhir/ImagingStudy/{resource_id(ct)}").status_code == 200


@pytest.mark.parametrize("value", ["lt0001-01-01", "gt9999-12-31", "gt9999", "lt0001"])
def test_a_started_range_at_the_edge_of_the_calendar_finds_nothing_rather_than_failing(
        world, value):
    with fhir_client(world) as client:
        assert uids(get_bundle(client, started=value)) == []


def test_the_same_ten_digits_issued_by_another_authority_are_not_the_nhs_number(world):
    """A hospital number of another trust (Issuer of Patient ID RXX) that happens to equal
    an NHS number belongs to someone else: an NHS-number search must not return it (the
    wrong patient's images in the record)."""
    nhs = {"patient.identifier": f"{NHS_SYSTEM}|{NHS}"}
    with fhir_client(world) as client:
        found = uids(get_bundle(client, **nhs))
        counted = get_bundle(client, **nhs, _summary="count").total
    assert world["uid"]["collision"] not in found
    assert found == [world["uid"]["us"], world["uid"]["ct"]] and counted == 2


def test_a_study_has_one_id_and_no_alias_reads_it(world):
    """Leading zeros decode to the same number: ``0`` + an id must not read the study under
    an id the resource does not carry (caches, audit and the client's references would see
    two resources)."""
    real = resource_id(world["uid"]["ct"])
    with fhir_client(world) as client:
        assert client.get(f"/fhir/ImagingStudy/{real}").status_code == 200
        refused(client.get(f"/fhir/ImagingStudy/0{real}"), 404, "not-found")
        assert uids(get_bundle(client, _id=f"00{real}")) == []


def test_format_overrides_the_accept_header(world):
    """A browser following a link with ``_format=json`` sends ``Accept: text/html``: the
    parameter wins (FHIR R4 http, content type and encodings)."""
    with fhir_client(world) as client:
        answer = client.get("/fhir/ImagingStudy", params={"_format": "json", "_count": "1"},
                            headers={"Accept": "text/html"})
        metadata = client.get("/fhir/metadata?_format=application/fhir%2Bjson",
                              headers={"Accept": "text/html"})
    assert answer.status_code == metadata.status_code == 200, answer.text
    Bundle.model_validate(answer.json())


def test_sort_newest_first_is_taken_and_other_orders_are_refused(world):
    nhs = {"patient:identifier": f"{NHS_SYSTEM}|{NHS}"}
    with fhir_client(world) as client:
        newest = get_bundle(client, **nhs, _sort="-started")
        oldest = client.get("/fhir/ImagingStudy", params={**nhs, "_sort": "started"})
    assert uids(newest) == [world["uid"]["us"], world["uid"]["ct"]]
    refused(oldest)



def test_a_patients_token_reveals_no_other_patient_by_any_search_or_page(world):
    """A patient account bound to its record (H101) sees its own study and nothing of anyone
    else: not by another patient's NHS or hospital number, accession, id, date range, count,
    paging offset or lenient handling."""
    from imageshare.storage.index.schema import patient_accounts

    archive, own = world["archive"], world["uid"]["h101"]
    archive.users.add("pat101", PASSWORD, "patient")
    with archive.engine.begin() as conn:
        conn.execute(insert(patient_accounts).values(
            email="p101@home.example", username="pat101", patient_id="H101", issuer="",
            invited_by="tests", created_at=datetime.now(UTC)))
    lenient = {"Prefer": "handling=lenient"}
    with fhir_client(world, "pat101") as client:
        assert uids(get_bundle(client)) == [own]
        assert get_bundle(client, _summary="count").total == 1
        for params in ({"patient:identifier": f"{NHS_SYSTEM}|{NHS}"},
                       {"patient.identifier": f"{HOSPITAL}|H100"},
                       {"identifier": "|ACC-CT,|ACC-US,|ACC-OTHER"},
                       {"_id": ",".join(resource_id(u) for n, u in world["uid"].items()
                                        if n != "h101")},
                       {"started": "ge2024"}, {"_offset": "1"},
                       {"subject:identifier": f"{HOSPITAL}|H200", "_summary": "count"}):
            found = get_bundle(client, headers=lenient, **params)
            assert uids(found) == [] and found.total in (None, 0), params
        assert uids(get_bundle(client, headers=lenient,
                               **{"_has:Observation:patient:identifier": "x"})) == [own]
        for name, uid in world["uid"].items():
            expected = 200 if name == "h101" else 404
            assert client.get(f"/fhir/ImagingStudy/{resource_id(uid)}").status_code == expected


def test_the_answer_is_in_the_media_type_and_fhir_version_asked_for(world):
    """A client asking for plain ``application/json`` gets that media type (FHIR R4 http:
    the server SHOULD answer with the generic type asked for); one asking for another FHIR
    version (``fhirVersion=3.0``) gets 406, not R4 content it would misread."""
    url = f"/fhir/ImagingStudy/{resource_id(world['uid']['ct'])}"
    with fhir_client(world) as client:
        plain = client.get(url, headers={"Accept": "application/json"})
        r4 = client.get(url, headers={"Accept": "application/fhir+json; fhirVersion=4.0"})
        stu3 = client.get(url, headers={"Accept": "application/fhir+json; fhirVersion=3.0"})
        by_format = client.get(url, params={"_format": "application/json"})
    assert plain.status_code == r4.status_code == by_format.status_code == 200
    assert plain.headers["content-type"].startswith("application/json")
    assert by_format.headers["content-type"].startswith("application/json")
    assert r4.headers["content-type"].startswith("application/fhir+json")
    refused(stu3, 406, "not-supported")
