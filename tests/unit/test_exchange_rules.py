"""What lands in the inbox (and so expires unless accepted), and what does not."""

from __future__ import annotations

from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence
from sqlalchemy import select

from imageshare.access.policy import INBOX
from imageshare.domain.actors import Actor, cli_actor
from imageshare.storage.index.schema import (
    inbox_items,
    instances,
    patient_identifiers,
    patients,
)
from tests.factory import ct_series


def classes(archive):
    with archive.engine.connect() as conn:
        return sorted(conn.execute(select(instances.c.retention_class)).scalars())


def test_only_other_hospitals_fill_the_inbox(archive, tmp_path):
    modality = Actor("node", "US_ROOM_1", "node", "US_ROOM_1@10.0.0.5",
                     grants=frozenset({"dicom.store"}))
    hospital = Actor("node", "DISTRICT", "node", "DISTRICT@10.1.0.9",
                     grants=frozenset({"dicom.store", INBOX}))
    site_account = Actor("user", "site-b", "site", "10.2.0.1")
    service_account = Actor("user", "gateway", "service", "10.3.0.1")
    for n, actor in enumerate((modality, service_account, hospital, site_account)):
        for path in ct_series(tmp_path / str(n), 1, patient_id=f"P{n}"):
            archive.ingest.store_copy(path, actor)
    assert classes(archive) == ["clinical", "clinical", "inbox", "inbox"]
    with archive.engine.connect() as conn:
        sites = sorted(conn.execute(select(inbox_items.c.site)).scalars())
    assert sites == ["DISTRICT", "site-b"]


def test_a_pending_arrival_changes_no_record_and_an_nhs_number_reconciles_only_one_person(
        archive, tmp_path):
    """Another hospital sends a study under our patient's hospital number carrying someone
    else's NHS number: before anyone accepts it, our patient's record does not gain that
    number; and a study whose NHS number points at a record with another birth date, or at
    two records, is not filed there by itself."""
    modality = Actor("node", "US_ROOM_1", "node", "US_ROOM_1@10.0.0.5",
                     grants=frozenset({"dicom.store"}))
    hospital = Actor("node", "DISTRICT", "node", "DISTRICT@10.1.0.9",
                     grants=frozenset({"dicom.store", INBOX}))

    def stored(folder: str, actor: Actor, nhs: str = "", **details) -> str:
        path = ct_series(tmp_path / folder, 1, **details)[0]
        if nhs:
            ds = dcmread(path)
            item = Dataset()
            item.PatientID, item.IssuerOfPatientID = nhs, "NHS"
            ds.OtherPatientIDsSequence = Sequence([item])
            ds.save_as(path)
        return archive.ingest.store_copy(path, actor).study_uid

    stored("alice", modality, patient_id="H0001", patient_name="Local^Alice",
           PatientBirthDate="19700101")
    stored("bob", modality, nhs="9434765919", patient_id="H0002",
           patient_name="Local^Bob", PatientBirthDate="19600101")
    stored("planted", hospital, nhs="9434765919", patient_id="H0001",
           patient_name="Local^Alice", PatientBirthDate="19700101")
    with archive.engine.connect() as conn:
        held_by = set(conn.execute(select(patients.c.patient_id).join(
            patient_identifiers, patient_identifiers.c.patient_pk == patients.c.pk).where(
            patient_identifiers.c.value == "9434765919")).scalars())
    assert held_by == {"H0002"}, held_by  # not our Alice's record
    # Their study of Bob with another birth date: not filed under our Bob by itself.
    other = stored("other-bob", hospital, nhs="9434765919", patient_id="THEIR-9",
                   patient_name="Local^Bob", PatientBirthDate="19610101")
    item = next(i for i in archive.inbox.items() if i.study_uid == other)
    assert archive.inbox.local_match(item) is None
    # Their study of Bob as we know him: proposed, and filed under him on accepting.
    same = stored("same-bob", hospital, nhs="9434765919", patient_id="THEIR-8",
                  patient_name="Local^Bob", PatientBirthDate="19600101")
    item = next(i for i in archive.inbox.items() if i.study_uid == same)
    assert archive.inbox.local_match(item).patient_id == "H0002"
    assert "H0002" in archive.inbox.accept(item.pk, cli_actor())


def test_accepting_one_sites_item_accepts_only_what_that_site_sent(archive, tmp_path):
    """Two hospitals send instances of one study: each inbox item is decided alone."""
    first = Actor("node", "HOSP_B", "node", "HOSP_B@10.1.0.9",
                  grants=frozenset({"dicom.store", INBOX}))
    second = Actor("user", "site-c", "site", "10.2.0.1")
    for name, actor in (("b", first), ("c", second)):
        path = ct_series(tmp_path / name, 1, patient_id="Y1", study_uid="1.2.3.77")[0]
        archive.ingest.store_copy(path, actor)
    items = {i.site: i for i in archive.inbox.items()}
    assert set(items) == {"HOSP_B", "site-c"}
    archive.inbox.accept(items["HOSP_B"].pk, cli_actor(), reconcile=False)
    assert classes(archive) == ["clinical", "inbox"]
    assert archive.inbox.reject(items["site-c"].pk, cli_actor()).instances == 1
    assert classes(archive) == ["clinical"]


def test_a_dicom_caller_nobody_registered_lands_in_the_inbox(archive, tmp_path):
    """Let in by IMAGESHARE_STORE_FROM_ANY_AE (or calling from another host than the one
    registered), a caller is not trusted as one of our modalities."""
    stranger = Actor("node", "ANYONE", "node", "ANYONE@192.0.2.7", registered=False,
                     grants=frozenset({"dicom.store"}))
    archive.ingest.store_copy(ct_series(tmp_path / "s", 1, patient_id="Z9")[0], stranger)
    assert classes(archive) == ["inbox"]
