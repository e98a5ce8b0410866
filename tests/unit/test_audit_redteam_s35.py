"""Red team of "who saw what" (session 35): every step of a tus upload is audited (also when
refused), a deleted case names the study and patient it was made from, a refusal for want of
consent names whose consent, and a patient is named with the issuer of their ID (a patient
ID is unique only with its Issuer of Patient ID), in the trail and in the ATNA message
(HL7 CX, IHE ITI ATNA / PS3.15 A.5.3)."""

from __future__ import annotations

import base64
import json
import re
import shutil
from datetime import UTC, date, datetime

import pytest
from fastapi.testclient import TestClient
from lxml import etree
from pydicom import dcmread

from imageshare.audit.atna import audit_message
from imageshare.audit.reports import patient_report
from imageshare.audit.trail import AuditEvent
from imageshare.domain.actors import Actor
from imageshare.domain.errors import Forbidden
from imageshare.teaching.library import CaseFields
from imageshare.uploads.invitations import UploadRequest
from imageshare.web.server import create_app
from tests.conftest import require
from tests.factory import ct_series, us_cine
from tests.unit import test_uploads
from tests.unit.test_atna import CONFIG, audit_schema
from tests.unit.test_uploads import STAFF, TUS, _b64, _invite, _open
from tests.unit.test_web_pages import browser_sign_in

hospital = test_uploads.hospital  # an archive with a clerk and a mail server
SYSTEM = Actor("system", "tests", "admin", "tests")
AUTHOR = Actor("user", "edu", "educator", "127.0.0.1")


def _patient_object(xml: bytes) -> etree._Element:
    doc = etree.fromstring(xml)
    assert audit_schema().validate(doc), str(audit_schema().error_log)
    (patient,) = [o for o in doc.iterfind("ParticipantObjectIdentification")
                  if o.get("ParticipantObjectTypeCodeRole") == "1"]
    return patient


def _row(action: str, patient_id: str, detail: dict) -> dict:
    return {"seq": 3, "at": datetime(2026, 12, 4, 9, 0, tzinfo=UTC), "actor": "user:dr.who",
            "actor_kind": "user", "source": "10.0.0.7", "action": action,
            "outcome": "success", "patient_id": patient_id,
            "study_uid": "1.2.826.0.1.3680043.10.543.9", "instance_count": 1,
            "detail": json.dumps(detail)}


# -- the patient ID with its issuer ---------------------------------------------------------


def test_the_atna_patient_is_its_id_with_its_issuer_in_hl7_cx_form():
    """A repository receiving H100 from two hospitals could not tell the two patients apart:
    the ID is sent as ID^^^NAMESPACE (or ID^^^&OID&ISO), the issuer also as a detail."""
    patient = _patient_object(audit_message(
        _row("study.view", "H100", {"patient_issuer": "RVJ"}), CONFIG))
    assert patient.get("ParticipantObjectID") == "H100^^^RVJ"
    (issuer,) = patient.iterfind("ParticipantObjectDetail")
    assert (issuer.get("type"), base64.b64decode(issuer.get("value"))) == (
        "IssuerOfPatientID", b"RVJ")
    oid = _patient_object(audit_message(
        _row("study.view", "H100", {"patient_issuer": "2.16.840.1.113883.2.1.4.1"}), CONFIG))
    assert oid.get("ParticipantObjectID") == "H100^^^&2.16.840.1.113883.2.1.4.1&ISO"
    # An ID carrying the CX delimiters cannot pass itself off as another ID and issuer.
    forged = _patient_object(audit_message(
        _row("study.view", "X^^^OTHER", {"patient_issuer": "A&B"}), CONFIG))
    assert forged.get("ParticipantObjectID") == "X\\S\\\\S\\\\S\\OTHER^^^A\\T\\B"
    bare = _patient_object(audit_message(_row("study.view", "H100", {}), CONFIG))
    assert bare.get("ParticipantObjectID") == "H100"
    assert bare.find("ParticipantObjectDetail") is None


def test_an_event_about_a_study_names_its_patient_with_the_issuer_of_the_record(archive,
                                                                               tmp_path):
    """Two patients with hospital number 123, one of each hospital: each view is recorded
    with the issuer of the record it read, without the code that records it saying so."""
    one = archive.ingest.store_copy(ct_series(tmp_path / "a", 1, patient_id="123",
                                              IssuerOfPatientID="RVJ")[0], SYSTEM)
    two = archive.ingest.store_copy(ct_series(tmp_path / "b", 1, patient_id="123",
                                              IssuerOfPatientID="RA7")[0], SYSTEM)
    viewer = Actor("user", "dr.who", "clinician", "10.0.0.7")
    archive.audit.record([
        AuditEvent(viewer, "study.view", "success", patient_id="123",
                   study_uid=one.study_uid, detail={"n": "s35-1"}),
        AuditEvent(viewer, "study.view", "success", patient_id="123",
                   study_uid=two.study_uid, detail={"n": "s35-2"})])
    issuers = {e["study_uid"]: e["detail"].get("patient_issuer")
               for e in archive.audit.events("study.view")}
    assert issuers == {one.study_uid: "RVJ", two.study_uid: "RA7"}
    (row,) = [e for e in archive.audit.events("study.view") if e["study_uid"] == two.study_uid]
    row = {**row, "detail": json.dumps(row["detail"])}
    assert _patient_object(audit_message(row, CONFIG)).get("ParticipantObjectID") == \
        "123^^^RA7"
    # An event naming another patient than the study's record is not given that record's
    # issuer (the study was filed under another patient before a correction).
    archive.audit.record(AuditEvent(viewer, "study.view", "success", patient_id="999",
                                    study_uid=one.study_uid, detail={"n": "s35-3"}))
    (other,) = archive.audit.events(detail=("n", "s35-3"))
    assert "patient_issuer" not in other["detail"]


# -- tus uploads ----------------------------------------------------------------------------


def _steps(archive) -> list[tuple[str, str, str, str, dict]]:
    found = []
    for action in ("upload.announce", "upload.chunk", "upload.offset", "upload.withdraw"):
        for e in archive.audit.events(action):
            found.append((e["action"], e["outcome"], e["actor"], e["patient_id"], e["detail"]))
    return found


def test_every_tus_step_of_an_invited_upload_is_audited_with_its_patient(hospital):
    """Announcing a file, sending its bytes, asking how far it got and withdrawing it left
    nothing in the audit trail but the withdrawal: who sent what for which patient could
    not be told. Each step is an event naming the patient (with the issuer) and the file;
    the uploader is named by the invitation, never by anything about the patient."""
    archive, _sink = hospital
    created = _invite(archive, issuer="RVJ")
    with TestClient(create_app(archive), raise_server_exceptions=False) as client:
        csrf = _open(client, created)
        headers = {**TUS, "X-CSRF-Token": csrf}
        announced = client.post(created.path + "/files", headers={
            **headers, "Upload-Length": "10",
            "Upload-Metadata": f"filename {_b64('a.jpg')}"})
        assert announced.status_code == 201, announced.text
        url = announced.headers["location"]
        file_id = url.rsplit("/", 1)[-1]
        chunk = client.patch(url, content=b"01234", headers={
            **headers, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"})
        assert chunk.status_code == 204
        assert client.head(url, headers=headers).headers["upload-offset"] == "5"
        wrong = client.patch(url, content=b"56789", headers={
            **headers, "Upload-Offset": "2", "Content-Type": "application/offset+octet-stream"})
        assert wrong.status_code == 409
        assert client.delete(url, headers=headers).status_code == 204
        gone = client.delete(url, headers=headers)
        assert gone.status_code == 404
    steps = _steps(archive)
    uploader = f"upload:{created.public_id}"
    assert all(actor == uploader and patient == "H100" and d["upload"] == created.public_id
               and d["file"] == file_id and d["patient_issuer"] == "RVJ"
               for _a, _o, actor, patient, d in steps), steps
    outcomes = sorted((a, o, d.get("offset")) for a, o, _u, _p, d in steps)
    assert outcomes == sorted([
        ("upload.announce", "success", 0), ("upload.chunk", "success", 5),
        ("upload.chunk", "failure", None), ("upload.offset", "success", 5),
        ("upload.withdraw", "success", None), ("upload.withdraw", "failure", None)])
    (refused,) = [d for a, o, _u, _p, d in steps if a == "upload.chunk" and o == "failure"]
    assert "continues at byte 5" in refused["reason"]
    assert all("Lovelace" not in json.dumps(d) and "ada@" not in json.dumps(d)
               for *_x, d in steps)


def test_a_member_of_staff_reaching_for_another_ones_import_is_an_audited_refusal(hospital):
    """A staff import batch is its maker's alone: another clerk asking how far its files
    got is refused (not found) and that refusal, naming the batch's patient, is recorded."""
    archive, _sink = hospital
    batch = archive.uploads.invitations.staff_import(
        UploadRequest(patient_name="Lovelace^Ada", hospital_number="H100",
                                   issuer="RVJ", birth_date="19151210"), STAFF)
    archive.users.add("clerk2", test_uploads.PASSWORD, "radiographer")
    with TestClient(create_app(archive), raise_server_exceptions=False) as client:
        browser_sign_in(client, "clerk2", test_uploads.PASSWORD)
        asked = client.head(f"/uploads/{batch.public_id}/files/0123abcd", headers=TUS)
        assert asked.status_code == 404
    (event,) = archive.audit.events("upload.offset")
    assert (event["actor"], event["outcome"], event["patient_id"]) == (
        "user:clerk2", "failure", "H100")
    assert event["detail"]["upload"] == batch.public_id
    assert event["detail"]["patient_issuer"] == "RVJ"


# -- teaching cases -------------------------------------------------------------------------


@pytest.fixture
def source(archive, tmp_path):
    """A colour ultrasound study of Jane Marple (H31337, issued by RVJ) and its educator."""
    require(shutil.which("tesseract") is not None, "Tesseract OCR (Debian package tesseract-ocr)")
    archive.users.add("edu", "a-long-password", "educator")
    path = us_cine(tmp_path / "us", frames=4, patient_id="H31337", patient_name="Marple^Jane")
    ds = dcmread(path)
    ds.IssuerOfPatientID = "RVJ"
    ds.save_as(path)
    return archive.ingest.store_copy(path, SYSTEM)


def test_a_deleted_teaching_case_names_the_study_and_patient_it_was_made_from(archive,
                                                                              source):
    """case.delete said only "case 1a2b...": the patient's access report did not list it,
    and a DICOM Study Deleted message claimed a deletion of a study that is still there."""
    case = archive.teaching.create(AUTHOR, CaseFields(title="Effusion"), source.study_uid)
    copies = archive.teaching.studies(case)
    archive.teaching.delete(case, AUTHOR)
    (event,) = archive.audit.events("case.delete")
    assert (event["patient_id"], event["study_uid"]) == ("H31337", source.study_uid)
    assert event["detail"]["case"] == case.public_id
    assert event["detail"]["copies"] == copies
    assert event["detail"]["patient_issuer"] == "RVJ"
    report = patient_report(archive.engine, "H31337")
    assert "case.delete" in [r.action for r in report.rows]
    doc = etree.fromstring(audit_message(
        {**event, "seq": 1, "detail": json.dumps(event["detail"])}, CONFIG))
    assert audit_schema().validate(doc), str(audit_schema().error_log)
    assert doc.find("EventIdentification/EventID").get("csd-code") != "110105"
    objects = {o.find("ParticipantObjectIDTypeCode").get("csd-code"): o.get("ParticipantObjectID")
               for o in doc.iterfind("ParticipantObjectIdentification")}
    assert objects == {"2": "H31337^^^RVJ", "110180": source.study_uid,
                       "case": case.public_id}


def test_a_case_refused_for_a_withdrawn_consent_names_whose_consent(archive, source):
    """The refusal said "teaching: consent withdrawn" with no patient or study: the
    patient's report did not show that their decision was enforced."""
    case = archive.teaching.create(AUTHOR, CaseFields(title="Effusion"), source.study_uid)
    archive.consents.record_decision(source.study_uid, "teaching", "withdrawn",
                                     date.today().isoformat(), "form", SYSTEM)
    with pytest.raises(Forbidden):
        archive.teaching.record_view(case, Actor("user", "edu2", "educator", "10.0.0.2"))
    (event,) = [e for e in archive.audit.events("consent.refused")
                if e["detail"].get("case") == case.public_id]
    assert (event["patient_id"], event["study_uid"], event["outcome"]) == (
        "H31337", source.study_uid, "failure")
    assert event["detail"]["patient_issuer"] == "RVJ"


def test_a_patient_looking_at_their_own_studies_is_in_their_access_report(hospital,
                                                                          tmp_path):
    """The list of a patient's own studies was recorded naming nobody: the patient's
    access report never showed that their account looked at their images."""
    archive, sink = hospital
    stored = archive.ingest.store_copy(ct_series(tmp_path / "own", 1, patient_id="H100",
                                                 IssuerOfPatientID="RVJ")[0], SYSTEM)
    archive.uploads.patients.invite("ada@home.example", "H100", "RVJ", STAFF)
    archive.uploads.invitations.mailer.flush()
    secret = re.search(r"/invite/([\w-]+)", "".join(sink.bodies("ada@home.example"))).group(1)
    with TestClient(create_app(archive)) as patient:
        made = patient.post(f"/invite/{secret}", data={
            "username": "ada", "password": test_uploads.PASSWORD}, follow_redirects=False)
        assert made.status_code in (200, 303), made.text
        browser_sign_in(patient, "ada", test_uploads.PASSWORD)
        mine = patient.get("/my", headers=test_uploads.HTML)
        assert mine.status_code == 200 and stored.study_uid in mine.text
    (event,) = archive.audit.events("patient.studies")
    assert (event["actor"], event["patient_id"], event["instance_count"]) == (
        "user:ada", "H100", 1)
    assert event["detail"]["patient_issuer"] == "RVJ"
    assert "patient.studies" in [r.action for r in patient_report(archive.engine, "H100").rows]


def test_a_staff_import_page_naming_its_patient_is_audited(hospital):
    archive, _sink = hospital
    batch = archive.uploads.invitations.staff_import(
        UploadRequest(patient_name="Lovelace^Ada", hospital_number="H100", issuer="RVJ",
                      birth_date="19151210"), STAFF)
    with TestClient(create_app(archive)) as client:
        browser_sign_in(client, "clerk", test_uploads.PASSWORD)
        shown = client.get(f"/uploads/{batch.public_id}/upload", headers=test_uploads.HTML)
        assert shown.status_code == 200 and "H100" in shown.text
    reads = [e for e in archive.audit.events("upload.read")
             if e["detail"].get("upload") == batch.public_id]
    assert [(e["actor"], e["patient_id"], e["detail"]["patient_issuer"]) for e in reads] == [
        ("user:clerk", "H100", "RVJ")]
