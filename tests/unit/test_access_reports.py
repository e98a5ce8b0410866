"""Access reports: every access to one patient's images by anyone (staff, share links, other
sites, exports), filterable by date, as a page, CSV and PDF; one user's activity; making a
report is itself audited, and the patient is never named in an address.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

import pytest
from pypdf import PdfReader
from sqlalchemy import update

from imageshare.audit.trail import AuditEvent
from imageshare.domain.actors import SYSTEM, Actor
from imageshare.storage.index.schema import audit_events
from tests.factory import ct_series
from tests.unit.test_sessions import enrol_two_factor, next_code
from tests.unit.test_web_pages import HTML, browser_sign_in, csrf_of

STAFF = Actor("user", "dr.jones", "clinician", "10.0.0.7")
REVIEWER = Actor("share", "ab12cd", "reviewer", "192.0.2.4")
SITE = Actor("node", "OTHERSITE", "site", "OTHERSITE@10.9.9.9")


def _accesses(archive, tmp_path):
    """A patient's study stored, then seen by staff, a share link, another site and an
    export; another patient seen by the same clinician."""
    mine = [archive.ingest.store_copy(p, SYSTEM) for p in ct_series(
        tmp_path / "mine", 2, patient_id="SAR123")]
    other = archive.ingest.store_copy(ct_series(tmp_path / "other", 1, patient_id="OTH9")[0],
                                      SYSTEM)
    study = mine[0].study_uid
    archive.retrieve.select(STAFF, "study.view", study_uids=[study])
    archive.audit.record(AuditEvent(REVIEWER, "share.view", "success", study_uid=study,
                                    instance_count=2, detail={"share": "S1"}))
    archive.retrieve.select(SITE, "study.move", study_uids=[study])
    archive.audit.record(AuditEvent(STAFF, "study.export", "success", study_uid=study,
                                    detail={"format": "zip", "deidentified": False}))
    archive.retrieve.select(STAFF, "study.view", study_uids=[other.study_uid])
    return study, other.study_uid


@pytest.fixture
def client(archive, anonymous):
    """An information-governance lead's browser: an administrator signed in with a second
    factor, posting the report forms with the session's CSRF token."""
    archive.users.add("ig.lead", "a-long-password", "admin")
    totp = enrol_two_factor(archive, "ig.lead")
    assert browser_sign_in(anonymous, "ig.lead", code=next_code(totp)).status_code == 303
    token = csrf_of(anonymous.get("/admin/reports", headers=HTML).text)

    class Browser:
        def post(self, url, data):
            return anonymous.post(url, data={"csrf_token": token, **data}, headers=HTML)

    return Browser()


def _csv(response) -> list[dict]:
    return list(csv.DictReader(io.StringIO(response.text)))


def test_a_patients_report_lists_every_channel_and_nothing_of_other_patients(
        archive, client, tmp_path):
    study, other_study = _accesses(archive, tmp_path)
    answer = client.post("/admin/reports/patient", data={"patient_id": "SAR123",
                                                          "format": "csv"})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/csv")
    assert "SAR123" not in answer.headers["content-disposition"]
    rows = _csv(answer)
    seen = [(r["who"], r["channel"], r["action"]) for r in rows]
    assert ("user:dr.jones", "staff", "study.view") in seen
    assert ("share:ab12cd", "share link", "share.view") in seen
    assert ("node:OTHERSITE", "other site", "study.move") in seen
    assert ("user:dr.jones", "staff", "study.export") in seen
    assert [r for r in rows if r["action"] == "instance.store"]  # how the images came in
    assert all(r["study"] in (study, "") for r in rows)
    assert other_study not in answer.text and "OTH9" not in answer.text


def test_the_date_filter_keeps_only_accesses_in_the_period(archive, client, tmp_path):
    study, _ = _accesses(archive, tmp_path)
    long_ago = datetime.now(UTC) - timedelta(days=400)
    with archive.engine.begin() as conn:
        conn.execute(update(audit_events).where(audit_events.c.action == "share.view")
                     .values(at=long_ago))
    since = (datetime.now(UTC) - timedelta(days=30)).date().isoformat()
    recent = _csv(client.post("/admin/reports/patient",
                              data={"patient_id": "SAR123", "since": since, "format": "csv"}))
    assert recent and "share.view" not in {r["action"] for r in recent}
    old = _csv(client.post("/admin/reports/patient", data={
        "patient_id": "SAR123", "until": (long_ago + timedelta(days=1)).date().isoformat(),
        "format": "csv"}))
    assert [r["action"] for r in old] == ["share.view"]
    bad = client.post("/admin/reports/patient", data={"patient_id": "SAR123",
                                                      "since": "yesterday"})
    assert bad.status_code == 400 and "YYYY-MM-DD" in bad.text


def test_the_pdf_and_the_page_show_the_same_accesses(archive, client, tmp_path):
    _accesses(archive, tmp_path)
    pdf = client.post("/admin/reports/patient", data={"patient_id": "SAR123",
                                                       "format": "pdf"})
    assert pdf.headers["content-type"] == "application/pdf"
    text = "".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf.content)).pages)
    assert "patient SAR123" in text and "share:ab12cd" in text and "node:OTHERSITE" in text
    html = client.post("/admin/reports/patient", data={"patient_id": "SAR123"}).text
    assert "share link" in html and "other site" in html and "dr.jones" in html


def test_a_users_report_lists_what_they_did_to_any_patient(archive, client, tmp_path):
    study, other_study = _accesses(archive, tmp_path)
    rows = _csv(client.post("/admin/reports/user", data={"username": "dr.jones",
                                                          "format": "csv"}))
    assert {r["who"] for r in rows} == {"user:dr.jones"}
    assert {r["study"] for r in rows} == {study, other_study}
    site = _csv(client.post("/admin/reports/user", data={"username": "node:OTHERSITE",
                                                          "format": "csv"}))
    assert [r["action"] for r in site] == ["study.move"]


def test_making_a_report_is_audited_with_the_patient(archive, client, tmp_path):
    _accesses(archive, tmp_path)
    client.post("/admin/reports/patient", data={"patient_id": "SAR123", "format": "csv"})
    (event,) = archive.audit.events(action="audit.report")
    assert event["patient_id"] == "SAR123" and event["detail"]["report"] == "patient"
    # The report on this patient now includes that someone looked at their access history.
    again = _csv(client.post("/admin/reports/patient", data={"patient_id": "SAR123",
                                                             "format": "csv"}))
    assert "audit.report" in {r["action"] for r in again}
