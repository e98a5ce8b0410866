"""Red team, session 34: EHR launches (IHE IID), FHIR R4 ImagingStudy and notifications, as a
demanding EHR, an attacker and a real mail server see them.

IID values are matched exactly and name one patient: a wildcard or a DICOM value list, a
hospital number of another issuer, an accession number shared by two patients never open
another patient's studies. Launch links open people's accounts only and take an EHR clock a
little ahead. FHIR takes ``_format`` with its MIME parameters and refuses a time it cannot
read. E-mail copies of notifications go to one address, on header lines nobody can add to,
and carry no text of the notification (it may hold a job's error or a site's words)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlencode

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome
from pydicom import dcmread
from sqlalchemy import insert, update

from imageshare.domain.actors import Actor
from imageshare.ehr.launch import sign_launch
from imageshare.fhir.imaging_study import resource_id
from imageshare.notify import Mailer, MailSettings
from imageshare.storage.index.schema import notifications, users
from imageshare.web.server import create_app
from tests.conftest import make_archive, make_started_archive
from tests.factory import ct_series
from tests.mail import smtp_server
from tests.peers import free_port
from tests.unit.test_web_pages import browser_sign_in

PASSWORD = "redteam-s34-password"
SYSTEM = Actor("system", "tests", "admin", "tests")
HTML = {"Accept": "text/html"}
FHIR = {"Accept": "application/fhir+json"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Alice (hospital number H100, no issuer, accession ACC-1), Bob (number H100 given by
    another hospital, issuer OTHERHOSP, accession ACC-1 too) and Carol (H300, ACC-3); a
    clinician, a service account and an EHR."""
    tmp = tmp_path_factory.mktemp("s34")
    archive = make_archive(tmp, public_url="https://images.example")
    archive.users.ensure_admin(PASSWORD)
    made = {
        "alice": ct_series(tmp / "a", 1, patient_id="H100", patient_name="Alpha^Alice",
                           AccessionNumber="ACC-1", StudyDate="20240301"),
        "bob": ct_series(tmp / "b", 1, patient_id="H100", patient_name="Bravo^Bob",
                         IssuerOfPatientID="OTHERHOSP", AccessionNumber="ACC-1",
                         StudyDate="20240302"),
        "carol": ct_series(tmp / "c", 1, patient_id="H300", patient_name="Charlie^Carol",
                           AccessionNumber="ACC-3", StudyDate="20240303"),
    }
    for paths in made.values():
        archive.ingest.store_copy(paths[0], SYSTEM)
    archive.users.add("clin", PASSWORD, "clinician")
    archive.users.add("pacs-bridge", PASSWORD, "service")
    secret = archive.ehr_launches.add("epr")
    uid = {name: dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
           for name, paths in made.items()}
    yield {"archive": archive, "app": create_app(archive), "secret": secret, "uid": uid}
    archive.close()


def launch_url(secret: str, user: str = "clin", expires_in: int = 120, **context: str) -> str:
    params = {**context, "ehr": "epr", "user": user,
              "expires": str(int(time.time()) + expires_in),
              "nonce": f"s34-{time.monotonic_ns()}-nonce"}
    items = list(params.items())
    return "/iid?" + urlencode([*items, ("signature", sign_launch(items, secret))])


def launches(archive) -> list[dict]:
    """``ehr.launch`` events, newest first."""
    return list(archive.audit.events("ehr.launch", limit=100_000))


def names_in(text: str) -> set[str]:
    return {n for n in ("Alpha", "Bravo", "Charlie") if n in text}


# -- IID -----------------------------------------------------------------------------------


@pytest.mark.parametrize("context", [
    {"requestType": "PATIENT", "patientID": "H*"},
    {"requestType": "PATIENT", "patientID": "H?00"},
    {"requestType": "PATIENT", "patientID": "H300\\H100"},
    {"requestType": "STUDY", "accessionNumber": "ACC*"},
    {"requestType": "STUDY", "accessionNumber": "ACC-3\\ACC-1"},
])
def test_iid_wildcards_and_dicom_value_lists_are_refused_and_show_nobody(world, context):
    """A signed launch for ``H*`` listed every patient whose number starts with H."""
    with TestClient(world["app"]) as browser:
        answer = browser.get(launch_url(world["secret"], **context), headers=HTML)
    assert answer.status_code == 400
    assert names_in(answer.text) == set()


def test_a_hospital_number_of_another_issuer_never_opens_our_patient_of_that_number(world):
    """``H100^^^OTHERHOSP`` is Bob (OTHERHOSP's H100), never Alice (our H100): it listed both."""
    with TestClient(world["app"]) as browser:
        other = browser.get(launch_url(world["secret"], requestType="PATIENT",
                                       patientID="H100^^^OTHERHOSP"), headers=HTML)
    assert other.status_code == 200
    assert names_in(other.text) == {"Bravo"}
    [event] = launches(world["archive"])[:1]
    assert event["outcome"] == "success" and event["patient_id"] == "H100"
    assert event["detail"]["issuer"] == "OTHERHOSP"


def test_a_number_or_accession_that_matches_two_patients_is_refused_as_ambiguous(world):
    """The EHR has one patient open: a bare H100 (ours and OTHERHOSP's) or ACC-1 (given to
    Alice and to Bob) is refused (409, audited) instead of showing two patients as one."""
    archive = world["archive"]
    with TestClient(world["app"]) as browser:
        by_number = browser.get(launch_url(world["secret"], requestType="PATIENT",
                                           patientID="H100"), headers=HTML)
        number_event = launches(archive)[0]
        by_accession = browser.get(launch_url(world["secret"], requestType="STUDY",
                                              accessionNumber="ACC-1"), headers=HTML)
        accession_event = launches(archive)[0]
        single = browser.get(launch_url(world["secret"], requestType="STUDY",
                                        accessionNumber="ACC-3"), headers=HTML)
    for answer, event in ((by_number, number_event), (by_accession, accession_event)):
        assert answer.status_code == 409, answer.text
        assert names_in(answer.text) == set()
        assert event["outcome"] == "failure" and event["detail"]["reason"] == "ambiguous"
    assert single.status_code == 200 and f"/viewer/{world['uid']['carol']}" in single.text


def test_a_launch_is_audited_with_the_patient_and_names_an_ehr_only_when_signed(world):
    """The ehr.launch event carries the patient (ATNA: whose data was shown); a signed-in
    user's unsigned /iid?ehr=epr is not recorded as a launch from the EHR "epr"."""
    archive = world["archive"]
    with TestClient(world["app"]) as browser:
        opened = browser.get(launch_url(world["secret"], requestType="STUDY",
                                        studyUID=world["uid"]["carol"]), headers=HTML)
        assert opened.status_code == 200
        signed = launches(archive)[0]
        browser.get("/iid?" + urlencode({"requestType": "STUDY", "studyUID": world["uid"][
            "carol"], "ehr": "epr"}), headers=HTML)
        unsigned = launches(archive)[0]
    assert signed["patient_id"] == "H300" and signed["detail"]["ehr"] == "epr"
    assert unsigned["detail"]["signed"] is False and unsigned["detail"]["ehr"] == ""
    assert unsigned["patient_id"] == "H300"


def test_a_launch_link_never_opens_a_machine_account(world):
    """A service account's browser session would make what it shows nobody's in the audit
    trail (the EHR signs any user name it likes)."""
    with TestClient(world["app"]) as browser:
        answer = browser.get(launch_url(world["secret"], user="pacs-bridge",
                                        requestType="STUDY", studyUID=world["uid"]["carol"]),
                             headers=HTML, follow_redirects=False)
    assert answer.status_code == 403 and "set-cookie" not in answer.headers
    assert launches(world["archive"])[0]["detail"]["reason"] == "machine"


def test_an_ehr_clock_a_little_ahead_still_launches_once(world):
    """An EHR signing for the longest validity with its clock 30 s ahead is taken; the link
    still opens only once."""
    longest = world["archive"].ehr_launches.max_seconds
    url = launch_url(world["secret"], expires_in=longest + 30, requestType="STUDY",
                     studyUID=world["uid"]["carol"])
    with TestClient(world["app"]) as browser:
        assert browser.get(url, headers=HTML).status_code == 200
        browser.cookies.clear()
        assert browser.get(url, headers=HTML).status_code == 403


# -- FHIR ----------------------------------------------------------------------------------


def test_fhir_format_takes_a_mime_type_with_its_fhir_version(world):
    token = world["archive"].users.create_token("clin", "s34")
    with TestClient(world["app"], headers={"Authorization": f"Bearer {token}"}) as ehr:
        r4 = ehr.get("/fhir/ImagingStudy", params={
            "_format": "application/fhir+json; fhirVersion=4.0", "identifier": "|ACC-3"})
        r5 = ehr.get("/fhir/ImagingStudy", params={
            "_format": "application/fhir+json; fhirVersion=5.0", "identifier": "|ACC-3"})
    assert r4.status_code == 200 and r4.json()["total"] == 1
    assert r5.status_code == 406 and r5.json()["resourceType"] == "OperationOutcome"


def test_fhir_started_with_a_time_that_does_not_parse_is_refused(world):
    token = world["archive"].users.create_token("clin", "s34")
    with TestClient(world["app"], headers={"Authorization": f"Bearer {token}", **FHIR}) as ehr:
        bad = ehr.get("/fhir/ImagingStudy", params={"started": "2024-03-03Tnonsense"})
        good = ehr.get("/fhir/ImagingStudy", params={"started": "2024-03-03T10:00:00+01:00"})
    assert bad.status_code == 400 and bad.json()["issue"][0]["code"] == "invalid"
    assert good.status_code == 200 and good.json()["total"] == 1


@pytest.mark.parametrize("name, value", [
    ("patient", "Patient/H300"), ("subject.name", "Charlie"), ("patient:missing", "false"),
    ("identifier:of-type", "http://terminology.hl7.org/CodeSystem/v2-0203|ACSN|ACC-3"),
])
def test_lenient_handling_never_ignores_a_parameter_naming_the_patient_or_study(world, name,
                                                                                value):
    """Ignoring ``patient=Patient/H300`` under ``Prefer: handling=lenient`` answered every
    patient's studies to a search for one."""
    token = world["archive"].users.create_token("clin", "s34")
    with TestClient(world["app"], headers={"Authorization": f"Bearer {token}", **FHIR,
                                           "Prefer": "handling=lenient"}) as ehr:
        answer = ehr.get("/fhir/ImagingStudy", params={name: value})
        other = ehr.get("/fhir/ImagingStudy", params={"_elements": "id",
                                                      "identifier": "|ACC-3"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["issue"][0]["code"] == "invalid"
    assert other.status_code == 200 and other.json()["total"] == 1  # others still ignored


def test_a_fhir_search_by_a_hospital_number_two_issuers_share_is_refused(world):
    """``urn:imageshare:hospital-number|H100`` answered Alice's and Bob's (OTHERHOSP's H100)
    studies together, as one patient's; Bob's subject now names the number's issuer."""
    token = world["archive"].users.create_token("clin", "s34")
    system = "urn:imageshare:hospital-number"
    with TestClient(world["app"], headers={"Authorization": f"Bearer {token}", **FHIR}) as ehr:
        shared = ehr.get("/fhir/ImagingStudy", params={"patient.identifier": f"{system}|H100"})
        single = ehr.get("/fhir/ImagingStudy", params={"patient.identifier": f"{system}|H300"})
        bob = ehr.get(f"/fhir/ImagingStudy/{resource_id(world['uid']['bob'])}")
    assert shared.status_code == 400, shared.text
    assert OperationOutcome.model_validate(shared.json()).issue[0].code == "invalid"
    assert names_in(shared.text) == set()
    assert single.status_code == 200 and single.json()["total"] == 1
    ImagingStudy.model_validate(bob.json())  # valid R4
    identifier = bob.json()["subject"]["identifier"]
    assert identifier["value"] == "H100" and identifier["assigner"] == {"display": "OTHERHOSP"}


# -- notifications -------------------------------------------------------------------------


@pytest.fixture
def mailing(tmp_path: Path) -> Iterator[tuple]:
    """An archive with a real SMTP server; user ``sono`` has a confirmed address (mail goes
    to confirmed addresses only)."""
    with smtp_server() as (sink, port):
        archive = make_started_archive(tmp_path, smtp_host="127.0.0.1", smtp_port=port,
                                       public_url="https://images.example")
        archive.users.ensure_admin(PASSWORD)
        archive.users.add("sono", PASSWORD, "sonographer")
        with archive.engine.begin() as conn:
            conn.execute(update(users).where(users.c.username == "sono")
                         .values(email="sono@hospital.example",
                                 email_verified_at=datetime.now(UTC)))
        try:
            yield archive, sink
        finally:
            archive.close()


def test_a_mail_goes_to_one_address_only(mailing):
    """An address holding a list (``a, b``) sent a copy to every address in it."""
    archive, sink = mailing
    mailer = archive.notifier.mailer
    mailer.send("sono@hospital.example, spy@evil.example", "Subject", "Body")
    mailer.send("Sono <sono@hospital.example>", "Subject", "Body")
    mailer.send("sono@hospital.example", "One", "Body")
    mailer.flush()
    sink.wait_for("sono@hospital.example")
    assert [m["Subject"] for m in sink.messages] == ["One"]
    assert sink.recipients == [["sono@hospital.example"]]


def test_a_notification_text_with_line_breaks_neither_fails_nor_adds_header_lines(mailing):
    """A site's reason or a job's error with a line break raised ValueError out of notify
    (after the notification was kept): the request that caused it failed."""
    archive, sink = mailing
    archive.notifier.notify("sono", "exchange.push",
                            "Sending failed: refused\r\nBcc: spy@evil.example", "/transfers/x")
    archive.notifier.mailer.send("sono@hospital.example", "Two\r\nBcc: spy@evil.example",
                                 "Body")
    archive.notifier.mailer.flush()
    mails = sink.wait_for("sono@hospital.example", 2)
    assert len(mails) == 2
    assert all(r == ["sono@hospital.example"] for r in sink.recipients)
    assert all("\n" not in m["Subject"] and m["Bcc"] is None for m in mails)
    assert archive.notifier.recent("sono")[0]["kind"] == "exchange.push"


def test_the_mail_copy_of_a_notification_carries_none_of_its_text(mailing):
    """A job's error text (which can hold a patient's details) went into the subject and
    body of a mail to the user's own, outside, address."""
    archive, sink = mailing
    archive.notifier.notify("sono", "job.failed",
                            "Export: failed (no pixel data in Alpha^Alice 1970-01-01)",
                            "/jobs/abc")
    archive.notifier.mailer.flush()
    [mail] = sink.wait_for("sono@hospital.example")
    body = mail.get_payload(decode=True).decode()
    assert "Alice" not in body + mail["Subject"]
    assert "A job you started has failed" in body
    assert "https://images.example/jobs/abc" in body
    # The app (behind sign-in) keeps the whole text.
    assert "Alpha^Alice" in archive.notifier.recent("sono")[0]["text"]


def test_a_dead_smtp_server_neither_loses_the_notification_nor_holds_up_the_caller(tmp_path):
    archive = make_archive(tmp_path, smtp_host="127.0.0.1", smtp_port=free_port(),
                           public_url="https://images.example")
    try:
        archive.users.add("sono", PASSWORD, "sonographer")
        with archive.engine.begin() as conn:  # confirmed: a mail is really attempted
            conn.execute(update(users).where(users.c.username == "sono")
                         .values(email="sono@hospital.example",
                                 email_verified_at=datetime.now(UTC)))
        started = time.monotonic()
        archive.notifier.notify("sono", "share.comment", "A reviewer commented", "/shares/a")
        assert time.monotonic() - started < 2
        archive.notifier.mailer.flush(timeout=40)
        assert archive.notifier.recent("sono")[0]["link"] == "/shares/a"
    finally:
        archive.close()


def test_a_mail_that_cannot_be_made_is_dropped_not_raised():
    mailer = Mailer(MailSettings("127.0.0.1", free_port()))
    mailer.send("a\r\nb@hospital.example", "Subject", "Body")  # raised ValueError
    mailer.flush()


def test_notifications_link_only_to_paths_on_imageshare(mailing):
    """A notification whose link is not a path here (``javascript:``, ``//host``) is shown
    without a link, as it is kept."""
    archive, _ = mailing
    archive.notifier.notify("sono", "share.comment", "Kept by notify", "javascript:alert(1)")
    with archive.engine.begin() as conn:  # a row written before links were checked
        conn.execute(insert(notifications).values(
            username="sono", kind="share.comment", text="Old row", link="//evil.example/x",
            created_at=archive.notifier.recent("sono")[0]["created_at"]))
    with TestClient(create_app(archive)) as browser:
        assert browser_sign_in(browser, "sono", PASSWORD).status_code == 303
        page = browser.get("/notifications", headers=HTML)
    assert page.status_code == 200
    assert "Kept by notify" in page.text and "Old row" in page.text
    assert "javascript:" not in page.text and "//evil.example" not in page.text
