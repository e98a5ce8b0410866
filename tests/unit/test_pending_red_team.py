"""What waits for a person's decision (inbox, held, upload) reaches nobody outside the inbox
and quality-control views before it is accepted: found by a red team, each test here was a
way it did (the docstrings tell what happened before)."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from imageshare.archive.corrections import PatientDetails
from imageshare.archive.query import Query
from imageshare.archive.search import StudySearch
from imageshare.domain.actors import cli_actor
from imageshare.domain.errors import ImageShareError, NotFound
from imageshare.storage.index.schema import patients, studies
from tests.factory import ct_series
from tests.unit.test_closed_inbox import HOSPITAL

STAFF = cli_actor()
HTML = {"Accept": "text/html"}


@pytest.fixture
def mixed(archive, tmp_path):
    """Our CT study (2 instances) for OURS1, into which another hospital sent an MR series
    (3 instances) still pending in the inbox; and a study of another hospital's patient
    SENT9, pending too."""
    ours = [archive.ingest.store_copy(p, STAFF)
            for p in ct_series(tmp_path / "ours", 2, patient_id="OURS1")][0]
    for p in ct_series(tmp_path / "mr", 3, patient_id="OURS1", study_uid=ours.study_uid,
                       Modality="MR"):
        archive.ingest.store_copy(p, HOSPITAL)
    sent = [archive.ingest.store_copy(p, HOSPITAL)
            for p in ct_series(tmp_path / "sent", 2, patient_id="SENT9",
                               patient_name="Sent^Patient", Modality="PT",
                               PatientBirthDate="19820304")][0]
    return ours, sent


def test_modalities_in_study_does_not_match_a_pending_series(client, archive, mixed):
    """ModalitiesInStudy=MR finds our CT study only because of the MR series that waits in
    the inbox: QIDO-RS, C-FIND, the web search's modality filter and FHIR all tell that an
    MR series exists (archive/query.py _modalities_condition looks at every series)."""
    ours, _sent = mixed
    qido = client.get("/dicomweb/studies", params={"ModalitiesInStudy": "MR"}).json()
    cfind = archive.query.find(Query(level="STUDY", identifier={
        "00080061": {"vr": "CS", "Value": ["MR"]}}), STAFF)
    web = archive.search.search(StudySearch(modality="MR"), STAFF, None).studies
    fhir = client.get("/fhir/ImagingStudy", params={"modality": "MR"}).json()
    assert [s["0020000D"]["Value"][0] for s in qido] == []
    assert [m.study_uid for m in cfind] == []
    assert [s.study_uid for s in web] == []
    assert fhir.get("total", len(fhir.get("entry", []))) == 0 and not fhir.get("entry")
    assert ours.study_uid  # (the study itself is part of the record)


def test_the_study_page_counts_only_the_record(client, archive, mixed):
    """The study page's retention panel (shown to all staff) lists the pending MR series'
    instances as "inbox 3": their existence and number reach the study page before anyone
    accepted them (retention/service.py study_retention counts every instance)."""
    ours, _sent = mixed
    classes = {c.retention_class: c.instances
               for c in archive.retention.study_retention(ours.study_uid, record_only=True).classes}
    assert classes == {"clinical": 2}
    page = client.get(f"/studies/{ours.study_uid}", headers=HTML)
    assert page.status_code == 200
    assert '<td class="retention-class">inbox</td>' not in page.text


def test_a_merge_finds_no_patient_known_only_from_the_inbox(archive, mixed):
    """Merging our patient into the hospital number of a patient that exists only in a
    pending inbox study succeeds (corrections.py _patient looks at every study): our record
    then carries the name and birth date another hospital sent, which nobody accepted."""
    ours, _sent = mixed
    with pytest.raises(NotFound):
        archive.corrections.merge(ours.study_uid, "SENT9", "", "same person", STAFF)
    with archive.engine.connect() as conn:
        name = conn.execute(select(patients.c.name).join(
            studies, studies.c.patient_pk == patients.c.pk).where(
            studies.c.study_uid == ours.study_uid)).scalar()
    assert name == "Doe^Jane"


def test_a_correction_does_not_tell_that_a_pending_patient_exists(archive, mixed):
    """Correcting our study to the hospital number of a patient known only from a pending
    inbox study answers that the number "already belongs to a record with another name or
    date of birth": the pending patient's existence (and that its details differ) reaches
    the person correcting, as it would not for an unknown number."""
    ours, _sent = mixed
    details = PatientDetails("Doe^Jane", "SENT9", "", "", "19700101", "O")
    try:
        archive.corrections.correct_study(ours.study_uid, details, "typo", STAFF)
    except ImageShareError as exc:
        assert "already belongs" not in str(exc)


def test_a_pending_arrival_gives_our_record_none_of_its_patient_details(archive, tmp_path):
    """Another hospital's study for a patient we had no record of creates the patient row
    with the sender's details (sex, comments, other IDs). When our own scanner then stores a
    study of that patient (name and birth date agree), the record is filed under that row:
    PATIENT-level C-FIND answers the sender's sex, comments and identifiers, before anyone
    accepted them and still after they were rejected (indexing.py _patient_pk inserts the
    sender's other IDs and attributes whatever ``add_ids`` says)."""
    from pydicom.dataset import Dataset

    other = Dataset()
    other.PatientID, other.IssuerOfPatientID = "D-777", "DISTRICT"
    for p in ct_series(tmp_path / "sent", 2, patient_id="NEW1", PatientSex="F",
                       PatientComments="sender's note", OtherPatientIDsSequence=[other]):
        archive.ingest.store_copy(p, HOSPITAL)
    for p in ct_series(tmp_path / "ours", 2, patient_id="NEW1", PatientSex="M"):
        archive.ingest.store_copy(p, STAFF)

    def patient_level() -> tuple[list, list]:
        (found,) = archive.query.find(Query(level="PATIENT", identifier={
            "00100020": {"vr": "LO", "Value": ["NEW1"]}}, return_all=True), STAFF)
        by_other_id = archive.query.find(Query(level="PATIENT", identifier={
            "00101002": {"vr": "SQ", "Value": [{"00100020": {"vr": "LO",
                                                             "Value": ["D-777"]}}]}}), STAFF)
        return found.attributes, by_other_id

    attrs, by_other_id = patient_level()
    assert attrs["00100040"].get("Value") == ["M"]
    assert "00104000" not in attrs  # PatientComments: only the sender wrote any
    assert by_other_id == []
    (item,) = archive.inbox.items()
    archive.inbox.reject(item.pk, STAFF)
    attrs, by_other_id = patient_level()
    assert attrs["00100040"].get("Value") == ["M"] and by_other_id == []


def test_accepting_while_a_batch_is_indexed_does_not_deadlock_on_postgresql(tmp_path, postgres):
    """The index writer commits a batch of arrivals in one transaction and locks each series
    as its instance arrives (any order); summarise_studies (an acceptance) locks the study's
    series in key order. A batch that counted an instance into the second series and then
    one into the first, while an acceptance of the same study waits for the second, closes
    the circle: PostgreSQL aborts one of them (here the person's acceptance fails, or the
    batch does). indexing.py summarise_studies: "locked ... as indexing locks them" holds
    for one instance, not for a batch."""
    import threading
    import time
    from datetime import UTC, datetime

    from imageshare.archive.header import read_header
    from imageshare.archive.indexing import KnownParents, index_instance
    from tests.conftest import make_archive

    archive = make_archive(tmp_path, postgres.new_database())
    try:
        first = ct_series(tmp_path / "one", 1, patient_id="OURS1")
        study = archive.ingest.store_copy(first[0], STAFF).study_uid
        second = ct_series(tmp_path / "two", 1, patient_id="OURS1", study_uid=study)
        archive.ingest.store_copy(second[0], STAFF)
        for p in ct_series(tmp_path / "mr", 1, patient_id="OURS1", study_uid=study,
                           Modality="MR"):
            archive.ingest.store_copy(p, HOSPITAL)
        (item,) = archive.inbox.items()
        series_one = read_header(first[0])[1].series_uid
        series_two = read_header(second[0])[1].series_uid

        def more(series_uid: str, folder: str):
            path = ct_series(tmp_path / folder, 1, patient_id="OURS1", study_uid=study,
                             SeriesInstanceUID=series_uid)[0]
            return read_header(path)[1]

        errors: list[tuple[str, BaseException]] = []
        known = KnownParents()
        now = datetime.now(UTC)
        with archive.engine.connect() as batch:
            transaction = batch.begin()
            try:
                index_instance(batch, more(series_two, "b2"), "k2", 1, "MODALITY@x", now,
                               known)

                def accept() -> None:
                    try:
                        archive.inbox.accept(item.pk, STAFF, reconcile=False)
                    except BaseException as exc:  # noqa: BLE001 - reported below
                        errors.append(("acceptance", exc))

                accepting = threading.Thread(target=accept)
                accepting.start()
                time.sleep(1.0)  # the acceptance holds the first series, waits for the second
                index_instance(batch, more(series_one, "b1"), "k1", 1, "MODALITY@x", now,
                               known)
                transaction.commit()
            except BaseException as exc:  # noqa: BLE001 - reported below
                transaction.rollback()
                errors.append(("batch", exc))
            accepting.join(timeout=30)
        assert not [f"{who}: {type(e).__name__}: {str(e).splitlines()[0]}"
                    for who, e in errors]
    finally:
        archive.close()
