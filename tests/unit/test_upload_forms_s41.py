"""The upload invitation and import forms ask for the patient's family and given names as
people write them (they asked for ``FAMILY^Given``, DICOM's notation, which a clerk typing
"Ada Lovelace" got wrong: a patient named "Ada Lovelace" with no given name, matched to no
study). The two fields make the DICOM name; what a program posts as ``patient_name`` still
works."""

from __future__ import annotations

from fastapi.testclient import TestClient
from pydicom import dcmread

from imageshare.domain.actors import cli_actor
from imageshare.web.server import create_app
from tests.conftest import make_started_archive
from tests.factory import ct_series
from tests.peers import ADMIN_PASSWORD
from tests.unit.test_web_pages import browser_sign_in, csrf_of

PASSWORD = "uploads-password"
HTML = {"Accept": "text/html"}


def _clerk(tmp_path):
    archive = make_started_archive(tmp_path, public_url="https://images.hospital.example")
    archive.users.ensure_admin(ADMIN_PASSWORD)
    archive.users.add("clerk", PASSWORD, "radiographer")
    client = TestClient(create_app(archive))
    browser_sign_in(client, "clerk", PASSWORD)
    return archive, client


def test_the_invitation_takes_family_and_given_names_in_their_own_fields(tmp_path) -> None:
    archive, clerk = _clerk(tmp_path)
    try:
        page = clerk.get("/uploads", headers=HTML)
        assert 'name="family_name"' in page.text and 'name="given_name"' in page.text
        assert "FAMILY^Given" not in page.text
        sent = clerk.post("/uploads/invite", data={
            "csrf_token": csrf_of(page.text), "family_name": " Lovelace ",
            "given_name": "Ada^Augusta", "hospital_number": "H100",
            "email": "ada@home.example", "days": "14"}, headers=HTML)
        assert sent.status_code == 200, sent.text[-500:]
        [invitation] = archive.uploads.invitations.all()
        # a delimiter typed inside a name does not move the rest into another part
        assert invitation.patient_name == "Lovelace^Ada Augusta"

        # a refused form comes back with the two names as typed
        again = clerk.post("/uploads/invite", data={
            "csrf_token": csrf_of(page.text), "family_name": "Byron",
            "given_name": "Ada", "hospital_number": "H101", "email": "not an address",
            "days": "14"}, headers=HTML)
        assert again.status_code == 400
        assert 'name="family_name" value="Byron"' in again.text
        assert 'name="given_name" value="Ada"' in again.text
    finally:
        clerk.close()
        archive.close()


def test_the_import_form_of_a_study_shows_its_patient_s_names_apart(tmp_path) -> None:
    archive, clerk = _clerk(tmp_path)
    try:
        [path] = ct_series(tmp_path / "ct", count=1, patient_id="H200",
                           patient_name="Babbage^Charles")
        archive.ingest.store_copy(path, cli_actor())
        study = dcmread(path, stop_before_pixels=True).StudyInstanceUID
        form = clerk.get(f"/uploads/import?study={study}", headers=HTML)
        assert 'name="family_name" value="Babbage"' in form.text
        assert 'name="given_name" value="Charles"' in form.text
    finally:
        clerk.close()
        archive.close()


def test_the_search_at_other_hospitals_takes_the_names_apart_too(tmp_path) -> None:
    archive, clerk = _clerk(tmp_path)
    try:
        [path] = ct_series(tmp_path / "ct", count=1, patient_id="H300",
                           patient_name="Lovelace^Ada", PatientBirthDate="19151210")
        archive.ingest.store_copy(path, cli_actor())
        form = clerk.get("/exchange", headers=HTML)
        assert 'name="family_name"' in form.text and "FAMILY^Given" not in form.text
        found = clerk.post("/exchange", headers=HTML, data={
            "csrf_token": csrf_of(form.text), "family_name": "Lovelace",
            "given_name": "Ada", "dob": "1915-12-10"})
        assert found.status_code == 200, found.text[-500:]
        study = dcmread(path, stop_before_pixels=True).StudyInstanceUID
        assert f'href="/studies/{study}"' in found.text
        assert 'name="family_name" value="Lovelace"' in found.text
        assert 'name="given_name" value="Ada"' in found.text
    finally:
        clerk.close()
        archive.close()
