"""Search for people, attachments stored as DICOM, corrections and merges of patient details."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread

from imageshare.archive.corrections import PatientDetails
from imageshare.archive.search import StudySearch
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError, InvalidQuery
from tests.factory import ct_series, us_cine

STAFF = Actor("user", "sono", "sonographer", "127.0.0.1")
VALID_NHS = "9434765919"
PDF = (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[]"
       b"/Count 0>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n")


def store_all(archive, paths):
    results = [archive.ingest.store_copy(p, STAFF) for p in paths]
    return results[0].study_uid


def found(archive, **criteria):
    page = archive.search.search(StudySearch(**criteria), STAFF, None)
    return [s.study_uid for s in page.studies]


def stored_header(archive, study_uid):
    inst = archive.retrieve.select(STAFF, "study.retrieve", study_uids=[study_uid])
    with archive.retrieve.open(inst[0]) as fp:
        return dcmread(fp, stop_before_pixels=True)


def test_search_box_finds_partial_names_ignoring_case_and_accents(archive, tmp_path):
    mueller = store_all(archive, ct_series(tmp_path / "a", 1, patient_name="Müller^Jürgen",
                                           patient_id="H1"))
    store_all(archive, ct_series(tmp_path / "b", 1, patient_name="Smith^Ann", patient_id="H2"))
    assert found(archive, text="mull") == [mueller]
    assert found(archive, text="jurg") == [mueller]
    assert found(archive, text="H1") == [mueller]
    assert found(archive, name="MÜLLER") == [mueller]


def test_nhs_number_is_checked_and_found_in_other_patient_ids(archive, tmp_path):
    from pydicom import Dataset

    item = Dataset()
    item.PatientID = VALID_NHS
    item.IssuerOfPatientID = "NHS"
    study = store_all(archive, ct_series(tmp_path / "a", 1, patient_id="H7",
                                         OtherPatientIDsSequence=[item]))
    assert found(archive, nhs_number="943 476 5919") == [study]
    assert found(archive, text=VALID_NHS) == [study]
    with pytest.raises(InvalidQuery, match="not a valid NHS number"):
        found(archive, nhs_number="9434765918")


def test_nhs_number_field_ignores_the_same_digits_issued_by_another_hospital(archive, tmp_path):
    """Ten digits that pass the check digit but are another trust's hospital number belong to
    someone else: the NHS number field does not find them; the free-text box does (as a
    hospital number) and the row says whose number it is."""
    from pydicom import Dataset

    theirs = Dataset()
    theirs.PatientID = VALID_NHS
    theirs.IssuerOfPatientID = "RXH-HOSPITAL"
    other = store_all(archive, ct_series(tmp_path / "a", 1, patient_id="H8",
                                         patient_name="Other^Person",
                                         OtherPatientIDsSequence=[theirs]))
    hospital = store_all(archive, ct_series(tmp_path / "b", 1, patient_id=VALID_NHS,
                                            patient_name="Hospital^Number",
                                            IssuerOfPatientID="RXH-HOSPITAL"))
    ours = Dataset()
    ours.PatientID = VALID_NHS
    ours.IssuerOfPatientID = "NHS"
    mine = store_all(archive, ct_series(tmp_path / "c", 1, patient_id="H9",
                                        OtherPatientIDsSequence=[ours]))
    assert found(archive, nhs_number=VALID_NHS) == [mine]
    assert other not in found(archive, text=VALID_NHS)
    assert set(found(archive, text=VALID_NHS)) == {mine, hospital}


def test_search_filters_and_pages(archive, tmp_path):
    for i in range(30):
        ct_paths = ct_series(tmp_path / f"s{i}", 1, patient_id=f"P{i:02d}",
                             StudyDate=f"2024{1 + i % 12:02d}01")
        store_all(archive, ct_paths)
    first = archive.search.search(StudySearch(modality="CT"), STAFF, None)
    second = archive.search.search(StudySearch(modality="CT", page=2), STAFF, None)
    assert len(first.studies) == 25 and first.has_next
    assert len(second.studies) == 5 and not second.has_next
    assert first.studies[0].study_date >= first.studies[-1].study_date
    assert len(found(archive, date_from="2024-03-01", date_to="2024-03-31")) == 3
    assert found(archive, modality="MR") == []
    with pytest.raises(InvalidQuery):
        found(archive, date_from="2024-04-01", date_to="2024-03-01")


def test_a_pdf_report_is_stored_as_encapsulated_pdf_in_the_same_study(archive, tmp_path):
    study = store_all(archive, ct_series(tmp_path / "ct", 2))
    result = archive.attachments.attach(study, "report.pdf", PDF, "Radiology report", STAFF)
    assert result.study_uid == study and result.outcome == "stored"
    record = archive.catalogue.record(study)
    docs = [s for s in record.series if s.is_documents]
    assert len(docs) == 1 and docs[0].modality == "DOC"
    inst = archive.retrieve.select(STAFF, "study.retrieve", sop_uids=[result.sop_instance_uid])[0]
    with archive.retrieve.open(inst) as fp:
        ds = dcmread(fp)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1"
    assert ds.PatientID == "PAT001" and ds.DocumentTitle == "Radiology report"
    with archive.retrieve.open(inst) as fp:
        assert archive.attachments.document(fp).content == PDF


def test_a_photo_of_a_paper_report_becomes_secondary_capture(archive, tmp_path):
    study = store_all(archive, ct_series(tmp_path / "ct", 1))
    photo = io.BytesIO()
    Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(photo, "JPEG")
    result = archive.attachments.attach(study, "paper.jpg", photo.getvalue(), "", STAFF)
    inst = archive.retrieve.select(STAFF, "study.retrieve", sop_uids=[result.sop_instance_uid])[0]
    with archive.retrieve.open(inst) as fp:
        ds = dcmread(fp)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert ds.pixel_array.shape == (40, 30, 3)
    with pytest.raises(ImageShareError, match="PDF, a JPEG or a PNG"):
        archive.attachments.attach(study, "notes.txt", b"hello", "", STAFF)


def test_correcting_an_emergency_study_rewrites_headers_and_keeps_history(archive, tmp_path):
    study = store_all(archive, [us_cine(tmp_path / "us", frames=3, patient_id="EMERG1",
                                        patient_name="Unknown^Male")])
    details = PatientDetails("Jones^Peter", "H12345", nhs_number=VALID_NHS,
                             birth_date="1980-02-29", sex="M")
    archive.corrections.correct_study(study, details, "identified by ward", STAFF)
    header = stored_header(archive, study)
    assert str(header.PatientName) == "Jones^Peter" and header.PatientID == "H12345"
    assert header.PatientBirthDate == "19800229"
    assert header.OtherPatientIDsSequence[0].PatientID == VALID_NHS
    assert found(archive, text="jones") == [study]
    assert found(archive, text="unknown") == []
    assert found(archive, nhs_number=VALID_NHS) == [study]
    history = archive.corrections.history(study)
    changed = {c.attribute: (c.old_value, c.new_value) for c in history}
    assert changed["Hospital number"] == ("EMERG1", "H12345")
    assert changed["Patient's name"] == ("Unknown^Male", "Jones^Peter")
    assert all(c.reason == "identified by ward" and c.actor == "user:sono" for c in history)
    events = list(archive.audit.events("patient.correction"))
    assert events[0]["study_uid"] == study and events[0]["actor"] == "user:sono"
    # pixels are untouched and the old blob is gone
    inst = archive.retrieve.select(STAFF, "study.retrieve", study_uids=[study])[0]
    with archive.retrieve.open(inst) as fp:
        assert dcmread(fp).pixel_array.shape == (3, 120, 160, 3)
    assert len(list(archive.blobs.keys())) == 1


def test_a_correction_is_refused_without_a_reason_or_onto_another_persons_number(
        archive, tmp_path):
    study = store_all(archive, ct_series(tmp_path / "a", 1, patient_id="TEMP1"))
    store_all(archive, ct_series(tmp_path / "b", 1, patient_id="H1", patient_name="Other^Ann"))
    with pytest.raises(ImageShareError, match="say why"):
        archive.corrections.correct_study(study, PatientDetails("A^B", "H9"), "", STAFF)
    with pytest.raises(ImageShareError, match="merge"):
        archive.corrections.correct_study(study, PatientDetails("Doe^Jane", "H1"), "x", STAFF)
    with pytest.raises(ImageShareError, match="NHS"):
        archive.corrections.correct_study(
            study, PatientDetails("Doe^Jane", "H9", nhs_number="1234567890"), "x", STAFF)
    assert stored_header(archive, study).PatientID == "TEMP1"


def test_merging_two_records_moves_every_study(archive, tmp_path):
    temp_a = store_all(archive, ct_series(tmp_path / "a", 2, patient_id="TEMP1",
                                          patient_name="Unknown^A"))
    temp_b = store_all(archive, ct_series(tmp_path / "b", 1, patient_id="TEMP1",
                                          patient_name="Unknown^A"))
    real = store_all(archive, ct_series(tmp_path / "c", 1, patient_id="H5",
                                        patient_name="Real^Person"))
    archive.corrections.merge(temp_a, "H5", "", "same patient", STAFF)
    for study in (temp_a, temp_b, real):
        assert stored_header(archive, study).PatientID == "H5"
        assert archive.catalogue.record(study).patient.name == "Real^Person"
    assert sorted(found(archive, hospital_number="H5")) == sorted([temp_a, temp_b, real])
    assert found(archive, hospital_number="TEMP1") == []
    assert {c.kind for c in archive.corrections.history(temp_b)} == {"merge"}


def test_a_correction_records_the_digests_of_the_rewritten_blobs(archive, tmp_path):
    from tests.unit.test_ingest import blob_digests, stored_digests

    study = store_all(archive, ct_series(tmp_path / "ct", 2, patient_id="EMERG2",
                                         patient_name="Unknown^Female"))
    before = stored_digests(archive)
    archive.corrections.correct_study(study, PatientDetails("Smith^Ann", "H777"),
                                      "identified", STAFF)
    after = stored_digests(archive)
    assert after == blob_digests(archive)
    assert set(after) == set(before) and all(after[u] != before[u] for u in after)
