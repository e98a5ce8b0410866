"""The governance pages: administrators place and lift legal holds and delete a study only
together (one asks, another approves); the study page shows its retention class and holds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi.testclient import TestClient

from imageshare.domain.actors import Actor
from imageshare.web.server import create_app
from tests.factory import ct_series
from tests.unit.test_sessions import enrol_two_factor, next_code
from tests.unit.test_web_pages import HTML, browser_sign_in, csrf_of

PASSWORD = "governance-password"


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def _admin_browser(archive, app, name: str) -> tuple[TestClient, str]:
    archive.users.add(name, PASSWORD, "admin")
    totp = enrol_two_factor(archive, name)
    client = TestClient(app)
    browser_sign_in(client, name, PASSWORD, next_code(totp))
    return client, csrf_of(client.get("/", headers=HTML).text)


def _post(client, csrf, path, **fields):
    return client.post(path, data={"csrf_token": csrf, **fields}, headers=HTML,
                       follow_redirects=False)


def test_two_administrators_delete_a_study_only_after_its_years_and_never_under_a_hold(
        archive, tmp_path):
    clock = Clock()
    archive.deletion.clock = clock
    paths = ct_series(tmp_path / "s", 2, patient_id="GOV1", PatientBirthDate="19500101")
    uid = ""
    for path in paths:
        uid = archive.ingest.store_copy(path, Actor("system", "t", "admin", "t")).study_uid
    app = create_app(archive)
    lead, lead_csrf = _admin_browser(archive, app, "ig-lead")
    guardian, guardian_csrf = _admin_browser(archive, app, "caldicott")
    try:
        study = lead.get(f"/studies/{uid}", headers=HTML).text
        assert 'class="retention-class">clinical<' in study
        assert "May not be deleted now: clinical images must be kept until" in study

        too_soon = _post(lead, lead_csrf, "/admin/deletions", study_uid=uid, reason="duplicate")
        assert too_soon.status_code == 409 and "must be kept until" in too_soon.text

        clock.now += timedelta(days=366 * 8 + 2)
        assert _post(guardian, guardian_csrf, "/admin/holds", study_uid=uid,
                     reason="complaint open").status_code == 303
        study = lead.get(f"/studies/{uid}", headers=HTML).text
        assert "Legal hold on study" in study and "complaint open" in study
        held = _post(lead, lead_csrf, "/admin/deletions", study_uid=uid, reason="duplicate")
        assert held.status_code == 409 and "legal hold" in held.text

        [hold] = archive.retention.holds()
        assert _post(lead, lead_csrf, f"/admin/holds/{hold.public_id}/lift",
                     reason="complaint closed").status_code == 303
        assert _post(lead, lead_csrf, "/admin/deletions", study_uid=uid,
                     reason="duplicate").status_code == 303
        [request] = archive.retention.deletion_requests("pending")
        listing = lead.get("/admin/deletions", headers=HTML).text
        assert "Approve and delete" not in listing and "Withdraw" in listing
        own = _post(lead, lead_csrf, f"/admin/deletions/{request.public_id}/approve")
        assert own.status_code == 403 and lead.get(f"/studies/{uid}",
                                                   headers=HTML).status_code == 200
        assert "Approve and delete" in guardian.get("/admin/deletions", headers=HTML).text
        done = _post(guardian, guardian_csrf, f"/admin/deletions/{request.public_id}/approve")
        assert done.status_code == 303
        assert lead.get(f"/studies/{uid}", headers=HTML).status_code == 404
        holds_page = lead.get("/admin/holds", headers=HTML).text
        assert "lifted by ig-lead" in holds_page and "complaint closed" in holds_page
    finally:
        lead.close()
        guardian.close()
    actions = [(e["action"], e["outcome"], e["actor"]) for e in archive.audit.events(limit=200)]
    assert ("deletion.approve", "failure", "user:ig-lead") in actions
    assert ("deletion.approve", "success", "user:caldicott") in actions
    assert ("retention.hold.place", "success", "user:caldicott") in actions


def test_an_administrator_sets_a_retention_rule_on_the_page_and_arrivals_follow_it(
        archive, tmp_path):
    app = create_app(archive)
    admin, csrf = _admin_browser(archive, app, "ig-lead")
    try:
        assert _post(admin, csrf, "/admin/retention", kind="source", value="RESEARCH_PACS",
                     retention_class="research").status_code == 303
        bad = _post(admin, csrf, "/admin/retention", kind="source", value="X",
                    retention_class="inbox")
        assert bad.status_code == 400 and "a rule gives one of the classes" in bad.text.lower()
        rules = admin.get("/admin/retention", headers=HTML).text
        assert "RESEARCH_PACS" in rules
        # The classes are explained with this installation's periods, not placeholders.
        periods = archive.retention.periods
        assert f"at least {periods.clinical_years} years" in rules and " N years" not in rules
    finally:
        admin.close()
    uid = archive.ingest.store_copy(
        ct_series(tmp_path / "r", 1, patient_id="RES1")[0],
        Actor("node", "RESEARCH_PACS", "node", "RESEARCH_PACS@h",
              grants=frozenset({"dicom.store"}))).study_uid
    assert [c.retention_class for c in archive.retention.study_retention(uid).classes] == [
        "research"]
