"""The study page's "This patient's other studies": only the same patient's, never another
trust's patient who has the same hospital number, nor every study without a patient ID."""

from __future__ import annotations

from imageshare.domain.actors import SYSTEM
from tests.factory import ct_series
from tests.unit.test_web_pages import HTML, browser  # noqa: F401


def _store(archive, folder, **attrs) -> str:
    return archive.ingest.store_copy(ct_series(folder, 1, **attrs)[0], SYSTEM).study_uid


def test_the_other_studies_are_of_the_same_hospital_number_and_issuer_only(
        archive, browser, tmp_path):  # noqa: F811
    mine = _store(archive, tmp_path / "a", patient_id="H100", patient_name="Doe^Jane",
                  IssuerOfPatientID="RTH", StudyDescription="CT head")
    prior = _store(archive, tmp_path / "b", patient_id="H100", patient_name="Doe^Jane",
                   IssuerOfPatientID="RTH", StudyDescription="CT head prior",
                   StudyDate="20200101")
    theirs = _store(archive, tmp_path / "c", patient_id="H100", patient_name="Smith^John",
                    IssuerOfPatientID="OTHERTRUST", StudyDescription="OTHER PATIENT CT")
    page = browser.get(f"/studies/{mine}", headers=HTML)
    assert page.status_code == 200
    others = page.text.split('id="other-studies"', 1)[1].split("</section>", 1)[0]
    assert prior in others
    assert theirs not in others and "OTHER PATIENT" not in others


def test_a_study_without_a_patient_id_lists_no_other_studies(archive, browser, tmp_path):  # noqa: F811
    first = _store(archive, tmp_path / "a", patient_id="", patient_name="",
                   StudyDescription="EMERGENCY A")
    second = _store(archive, tmp_path / "b", patient_id="", patient_name="",
                    StudyDescription="EMERGENCY B")
    page = browser.get(f"/studies/{first}", headers=HTML)
    assert page.status_code == 200
    others = page.text.split('id="other-studies"', 1)[1].split("</section>", 1)[0]
    assert second not in others
    assert "No other studies of this patient are stored here." in others
