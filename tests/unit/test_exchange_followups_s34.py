"""Another hospital's push whose patient collides with one of ours under the same number is
held in the inbox for a person (even where the installation refuses such instances from its
own modalities): refusing it would fail a possibly urgent push, and holding files nothing.
The JSON API shows site addresses as the pages do, never a password left in one, and checks
a new address with the registry's one rule."""

from __future__ import annotations

from sqlalchemy import update

from imageshare.domain.actors import cli_actor
from imageshare.exchange.nodes import Node
from imageshare.storage.index.schema import nodes as nodes_table
from tests.conftest import make_archive
from tests.factory import ct_series
from tests.unit.test_exchange_redteam_s34 import HOSPITAL


def test_another_hospitals_colliding_patient_is_held_not_refused(tmp_path) -> None:
    built = make_archive(tmp_path)  # patient_mismatch: refuse (the default)
    try:
        built.nodes.add(Node("DISTRICT", "10.1.0.9", 104, inbox=True))
        built.ingest.store_copy(ct_series(tmp_path / "ours", 1, patient_id="H100",
                                          patient_name="Lovelace^Ada",
                                          PatientBirthDate="19151210")[0], cli_actor())
        theirs = ct_series(tmp_path / "theirs", 1, patient_id="H100",
                           patient_name="Other^Person", PatientBirthDate="19800101")[0]
        held = built.ingest.store_copy(theirs, HOSPITAL)
        assert held.outcome == "held"
        (item,) = built.inbox.items()
        assert item.study_uid == held.study_uid
        # Our own modality sending the same is still refused with the reason.
        again = ct_series(tmp_path / "modality", 1, patient_id="H100",
                          patient_name="Other^Person", PatientBirthDate="19800101")[0]
        try:
            built.ingest.store_copy(again, cli_actor())
        except Exception as exc:  # noqa: BLE001 - the refusal names the mismatch
            assert "H100" in str(exc) or "patient" in str(exc).lower()
        else:
            raise AssertionError("a mismatched patient from our own side was stored")
    finally:
        built.close()


def test_the_api_never_shows_a_password_left_in_a_site_address(archive, anonymous) -> None:
    from tests.conftest import ADMIN_PASSWORD
    from tests.unit.test_sessions import enrol_two_factor, next_code
    from tests.unit.test_web_pages import browser_sign_in, csrf_of

    archive.nodes.add(Node("OLDSITE", "10.1.0.7", 104,
                           dicomweb_url="https://pacs.example/dicomweb"))
    with archive.engine.begin() as conn:  # as an older version let it in
        conn.execute(update(nodes_table).where(nodes_table.c.ae_title == "OLDSITE").values(
            dicomweb_url="https://user:hunter2@pacs.example/dicomweb"))
    totp = enrol_two_factor(archive, "admin")
    browser_sign_in(anonymous, "admin", ADMIN_PASSWORD, code=next_code(totp))
    csrf = {"X-CSRF-Token": csrf_of(anonymous.get("/account", headers={
        "Accept": "text/html"}).text)}
    listed = anonymous.get("/api/nodes")
    assert listed.status_code == 200
    assert "hunter2" not in listed.text and "***@pacs.example" in listed.text
    refused = anonymous.post("/api/nodes", headers=csrf, json={
        "ae_title": "META", "host": "10.1.0.8", "port": 104,
        "dicomweb_url": "http://169.254.169.254/latest"})
    assert refused.status_code == 422 and "body.dicomweb_url" in refused.text
    assert archive.nodes.find("META") is None
