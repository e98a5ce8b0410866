"""Consent records: what a patient agreed to, recorded with its day, way and recorder, and
enforced on identifiable teaching and research shares."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient

from imageshare.domain.actors import Actor
from imageshare.domain.errors import ConsentMissing, ImageShareError
from imageshare.sharing.links import NewShare
from imageshare.web.server import create_app
from tests.factory import ct_series
from tests.unit.test_web_pages import HTML, browser_sign_in, csrf_of

PASSWORD = "consent-password"
DOCTOR = Actor("user", "dr-who", "clinician", "10.0.0.4")


@pytest.fixture
def study(archive, tmp_path) -> str:
    archive.users.add("dr-who", PASSWORD, "clinician")
    archive.users.add("colleague", PASSWORD, "clinician")
    return archive.ingest.store_copy(ct_series(tmp_path / "s", 1, patient_id="CONS1")[0],
                                     Actor("system", "t", "admin", "t")).study_uid


def _identifiable(study_uid: str, purpose: str) -> NewShare:
    return NewShare(study_uid, recipient_user="colleague", deidentified=False, purpose=purpose)


def test_an_identifiable_teaching_share_needs_the_patients_consent_and_stops_at_withdrawal(
        archive, study):
    today = datetime.now(UTC).date()
    with pytest.raises(ConsentMissing, match="no consent to identifiable teaching use"):
        archive.shares.create(_identifiable(study, "teaching"), DOCTOR, None)
    archive.consents.record_decision(study, "teaching", "granted", today.isoformat(), "form",
                                     DOCTOR, "signed at clinic")
    assert archive.shares.create(_identifiable(study, "teaching"), DOCTOR, None).public_id
    with pytest.raises(ConsentMissing, match="no consent to research use"):
        archive.shares.create(_identifiable(study, "research"), DOCTOR, None)
    archive.consents.record_decision(study, "teaching", "withdrawn", today.isoformat(),
                                     "verbal", DOCTOR)
    with pytest.raises(ConsentMissing, match=f"was withdrawn on {today.isoformat()}"):
        archive.shares.create(_identifiable(study, "teaching"), DOCTOR, None)
    # Direct care and de-identified teaching need no consent.
    assert archive.shares.create(_identifiable(study, "care"), DOCTOR, None).public_id
    assert archive.shares.create(NewShare(study, purpose="teaching"), DOCTOR, None).public_id
    refusals = list(archive.audit.events("consent.refused"))
    assert len(refusals) == 3 and {r["detail"]["purpose"] for r in refusals} == {
        "teaching", "research"}
    [record, withdrawal] = sorted(archive.audit.events("consent.record"),
                                  key=lambda e: e["pk"])
    assert (record["detail"]["decision"], withdrawal["detail"]["decision"]) == (
        "granted", "withdrawn")
    assert record["actor"] == "user:dr-who" and record["patient_id"] == "CONS1"


def test_withdrawing_consent_ends_the_identifiable_shares_made_under_it(archive, study,
                                                                         tmp_path):
    """A patient who withdraws consent to teaching use: the identifiable teaching shares of
    their images end at once (audited, with the reason); their care shares, de-identified
    shares and other patients' teaching shares go on."""
    today = datetime.now(UTC).date().isoformat()
    other = archive.ingest.store_copy(ct_series(tmp_path / "o", 1, patient_id="CONS2")[0],
                                      Actor("system", "t", "admin", "t")).study_uid
    for uid in (study, other):
        archive.consents.record_decision(uid, "teaching", "granted", today, "form", DOCTOR)
    teaching = archive.shares.create(_identifiable(study, "teaching"), DOCTOR, None)
    care = archive.shares.create(_identifiable(study, "care"), DOCTOR, None)
    anonymous = archive.shares.create(NewShare(study, purpose="teaching"), DOCTOR, None)
    theirs = archive.shares.create(_identifiable(other, "teaching"), DOCTOR, None)

    archive.consents.record_decision(study, "teaching", "withdrawn", today, "verbal", DOCTOR)
    ended = {s.public_id: s.revoked_at is not None for s in (
        archive.shares.by_public_id(c.public_id, DOCTOR.name)
        for c in (teaching, care, anonymous, theirs))}
    assert ended == {teaching.public_id: True, care.public_id: False,
                     anonymous.public_id: False, theirs.public_id: False}
    [revoked] = list(archive.audit.events("share.revoke"))
    assert revoked["detail"] == {"share": teaching.public_id,
                                 "reason": "the patient's consent to teaching was withdrawn"}
    assert revoked["patient_id"] == "CONS1" and revoked["actor"] == "user:dr-who"


def test_a_patient_who_refused_teaching_use_is_not_made_a_teaching_case(archive, study,
                                                                          tmp_path):
    """De-identified teaching needs no consent, but a refusal (or withdrawal) on record is
    respected: no case is made from that patient's images (audited); another patient's
    study, and the same one once consent is granted again, are taught from; the case's
    later edits are audited."""
    from imageshare.domain.errors import Forbidden
    from imageshare.teaching.library import CaseFields

    archive.users.add("edu", PASSWORD, "educator")
    educator = Actor("user", "edu", "educator", "10.0.0.5")
    archive.consents.record_decision(study, "teaching", "refused", "2026-01-05", "form", DOCTOR)
    with pytest.raises(Forbidden, match="consent to teaching use was refused on 2026-01-05"):
        archive.teaching.create(educator, CaseFields(title="Pneumothorax"), study)
    [refusal] = list(archive.audit.events("consent.refused"))
    assert refusal["patient_id"] == "CONS1" and refusal["actor"] == "user:edu"
    assert archive.teaching.search() == []
    archive.consents.record_decision(study, "teaching", "granted", "2026-02-01", "form", DOCTOR)
    case = archive.teaching.create(educator, CaseFields(title="Pneumothorax"), study)
    archive.teaching.update(case, educator, CaseFields(title="Tension pneumothorax",
                                                       findings="Mediastinal shift"))
    [edit] = list(archive.audit.events("case.update"))
    assert edit["detail"]["case"] == case.public_id and "findings" in edit["detail"]["fields"]


def test_a_consent_record_needs_a_known_purpose_and_a_day_not_in_the_future(archive, study):
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    with pytest.raises(ImageShareError, match="future"):
        archive.consents.record_decision(study, "research", "granted", tomorrow, "form",
                                         DOCTOR)
    with pytest.raises(ImageShareError, match="one of: teaching, research, publication"):
        archive.consents.record_decision(study, "marketing", "granted", "2026-01-01", "form",
                                         DOCTOR)
    assert archive.consents.in_force(study) == {"teaching": None, "research": None,
                                                "publication": None}


def test_staff_record_consent_on_the_page_and_read_it_over_the_api(archive, study):
    archive.users.add("teacher", PASSWORD, "educator")
    app = create_app(archive)
    with TestClient(app) as browser, TestClient(app) as educator, TestClient(app) as api:
        browser_sign_in(browser, "dr-who", PASSWORD)
        form = browser.get(f"/studies/{study}/consent", headers=HTML)
        assert "No consent recorded" in form.text
        done = browser.post(f"/studies/{study}/consent", headers=HTML, follow_redirects=False,
                            data={"csrf_token": csrf_of(form.text), "purpose": "research",
                                  "decision": "granted", "given_on": "2026-01-05",
                                  "source": "electronic", "note": "trial portal"})
        assert done.status_code == 303
        page = browser.get(f"/studies/{study}", headers=HTML).text
        assert 'class="consent-research">granted (electronic, 2026-01-05)' in page
        assert 'class="consent-teaching">not recorded' in page
        browser_sign_in(educator, "teacher", PASSWORD)
        assert educator.get(f"/studies/{study}/consent", headers=HTML).status_code == 403
        listed = api.get(f"/api/studies/{study}/consent", auth=("dr-who", PASSWORD))
        assert listed.status_code == 200
        assert [(r["purpose"], r["decision"], r["recorded_by"]) for r in listed.json()] == [
            ("research", "granted", "dr-who")]
        shared = api.post(f"/api/studies/{study}/shares", auth=("dr-who", PASSWORD),
                          json={"deidentified": False, "recipient_user": "colleague",
                                "purpose": "teaching"})
        assert shared.status_code == 403
        assert "no consent to identifiable teaching use" in shared.json()["detail"]
    # The consent page and the API read (the study page is audited as a study view).
    assert len(list(archive.audit.events("consent.read"))) == 2
