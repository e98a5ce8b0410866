"""Filing arrivals for review apart from the record, and record-only study summaries, as a
red team attacked them: each test here was a way what waits for a person's decision reached
the record, blocked what should be filed, or was filed under the wrong patient (the
docstrings tell what happened before the fix)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import delete, select

from imageshare.access.policy import INBOX
from imageshare.archive.indexing import file_under_record
from imageshare.domain.actors import Actor, cli_actor
from imageshare.domain.errors import ImageShareError
from imageshare.storage.index.schema import instances, patients, studies
from tests.factory import ct_series

HOSPITAL = Actor("node", "DISTRICT", "node", "DISTRICT@10.1.0.9",
                 grants=frozenset({"dicom.store", INBOX}))
STAFF = cli_actor()
# An IssuerOfPatientID of 60 characters (LO allows 64): an OID-style issuer, for example.
LONG_ISSUER = "urn:oid:2.16.840.1.113883.2.1.4.1.3.6.1.4.1.21367.2017.10.1"[:60].ljust(60, "9")


def _upload(archive, path) -> str:
    """Store ``path`` as an upload waiting for quality review (as the upload service does)."""
    with open(path, "rb") as stream:
        return archive.ingest.store_stream(stream, STAFF, review_site="portal").study_uid


def _patient_rows(archive) -> set[tuple[str, str, str]]:
    with archive.engine.connect() as conn:
        return {tuple(r) for r in conn.execute(
            select(patients.c.patient_id, patients.c.issuer, patients.c.name))}


def test_an_upload_waiting_for_review_does_not_refuse_another_hospitals_study(
        archive, tmp_path):
    """A patient's upload (files from a CD, carrying that CD's Patient ID CD1 and another
    person's details) is filed under ``inbox:`` for CD1; another hospital's transfer of its
    own patient under CD1 is then refused ("waits for review with another name"): what an
    uploader's files say, which is thrown away on acceptance anyway (an upload is filed
    under the invited patient), blocks a hospital's study. indexing.py index_instance: the
    "another person waits" refusal compares with a ``inbox:`` row an upload made."""
    _upload(archive, ct_series(tmp_path / "cd", 1, patient_id="CD1",
                               patient_name="Upload^Person")[0])
    sent = archive.ingest.store_copy(
        ct_series(tmp_path / "sent", 1, patient_id="CD1", patient_name="Hospital^Person",
                  PatientBirthDate="19600101")[0], HOSPITAL)
    assert sent.outcome == "stored"


def test_an_upload_is_not_filed_under_another_hospitals_pending_patient(archive, tmp_path):
    """Another hospital's study of CD2 (a number we have no record of) waits for review;
    a patient's upload whose files carry CD2 with other details is filed under that
    hospital's ``inbox:`` row (uploads are exempt from the "another person waits" check):
    the upload's quality review shows the other hospital's patient (name, birth date) as
    the uploader's. indexing.py index_instance (``retention_class != "upload"``)."""
    archive.ingest.store_copy(
        ct_series(tmp_path / "sent", 1, patient_id="CD2", patient_name="Hospital^Person",
                  PatientBirthDate="19600101")[0], HOSPITAL)
    uploaded = _upload(archive, ct_series(tmp_path / "cd", 1, patient_id="CD2",
                                          patient_name="Upload^Person")[0])
    patient = archive.catalogue.record(uploaded).patient
    assert (patient.name, patient.birth_date) == ("Upload^Person", "19700101")


def test_accepting_does_not_file_another_persons_images_under_our_record(archive, tmp_path):
    """Another hospital sends study S of NEW5 (Sent^Five, 1950), a number we have no record
    of; our modality then stores an image into S for NEW5 as another person (Local^Other,
    1990). Before: the study moved to a new record made from our image, and accepting the
    hospital's item filed Sent^Five's images under Local^Other's record, unchecked. Now our
    image is refused with a reason while S waits, and S, accepted, makes its own record."""
    sent = ct_series(tmp_path / "sent", 2, patient_id="NEW5", patient_name="Sent^Five",
                     PatientBirthDate="19500101")
    study = ""
    for path in sent:
        study = archive.ingest.store_copy(path, HOSPITAL).study_uid
    with pytest.raises(ImageShareError, match="waits for review"):
        archive.ingest.store_copy(
            ct_series(tmp_path / "ours", 1, patient_id="NEW5", patient_name="Local^Other",
                      PatientBirthDate="19900909", study_uid=study)[0], STAFF)
    (item,) = archive.inbox.items()
    archive.inbox.accept(item.pk, STAFF, reconcile=False)
    assert ("NEW5", "", "Sent^Five") in _patient_rows(archive)
    assert not [r for r in _patient_rows(archive) if r[2] == "Local^Other"]


def test_an_accepted_study_keeps_a_long_issuer_of_patient_id(archive, tmp_path):
    """A study of L1 whose IssuerOfPatientID has 60 characters waits under ``inbox:`` +
    issuer cut to 64 characters; accepted, file_under_record strips the prefix and files it
    under a record with the issuer cut to 57 characters, which is not the patient's issuer:
    our own next image of the same study (the full issuer) is refused ("already belongs to
    another patient"). indexing.py issuers_standing_for / file_under_record (and the
    ``[:64]`` of the review issuer in index_instance)."""
    for path in ct_series(tmp_path / "sent", 1, patient_id="L1",
                          IssuerOfPatientID=LONG_ISSUER):
        archive.ingest.store_copy(path, HOSPITAL)
    (item,) = archive.inbox.items()
    archive.inbox.accept(item.pk, STAFF, reconcile=False)
    assert ("L1", LONG_ISSUER) in {(p, i) for p, i, _n in _patient_rows(archive)}
    time.sleep(1.2)  # the index writer forgets what it remembered of the study
    ours = archive.ingest.store_copy(
        ct_series(tmp_path / "ours", 1, patient_id="L1", IssuerOfPatientID=LONG_ISSUER,
                  study_uid=item.study_uid)[0], STAFF)
    assert ours.outcome == "stored"


def test_a_legal_hold_on_a_patient_with_a_long_issuer_keeps_what_waits_for_review(
        archive, tmp_path):
    """A legal hold on patient L2 (issuer of 60 characters) known only from another
    hospital's study waiting for review: place_hold finds the patient (issuers_standing_for
    cuts ``inbox:`` + issuer to 64), but instance_facts compares the hold's issuer with
    record_issuer(``inbox:`` + cut issuer), the cut issuer: the hold covers nothing and the
    retention job deletes the study when the inbox period is over. retention/facts.py
    instance_facts / indexing.py record_issuer."""
    from tests.unit.test_retention import SimulatedClock

    archive.users.add("ig", "long-enough-password", "admin")
    admin = Actor("user", "ig", "admin", "10.0.0.1")
    clock = SimulatedClock(datetime.now(UTC))
    archive.deletion.clock = clock
    study = archive.ingest.store_copy(
        ct_series(tmp_path / "sent", 1, patient_id="L2", IssuerOfPatientID=LONG_ISSUER)[0],
        HOSPITAL).study_uid
    archive.retention.place_hold(admin, "litigation", patient_id="L2", issuer=LONG_ISSUER)
    clock.now += timedelta(days=60)
    archive.retention.run(admin)
    with archive.engine.connect() as conn:
        left = conn.execute(select(studies.c.study_uid)).scalars().all()
    assert left == [study]


def test_recovery_does_not_make_a_pending_arrival_part_of_the_record(archive, tmp_path):
    """Another hospital's study of R1 (no record here) waits under ``inbox:``; the index
    loses the last commit (power loss) and start-up recovery indexes the lost blob again as
    the system's own, clinical arrival: the whole study moves to a new record R1 made from
    the sender's details, in every search, without anyone accepting it. ingest.py
    recover_unindexed (stores as SYSTEM) / indexing.py index_instance (_move_study)."""
    from imageshare.app import recover

    for path in ct_series(tmp_path / "sent", 2, patient_id="R1", patient_name="Sent^Recovered"):
        archive.ingest.store_copy(path, HOSPITAL)
    (item,) = archive.inbox.items()
    with archive.engine.begin() as conn:  # the last commit is lost: its blob stays
        lost = conn.execute(select(instances.c.pk).order_by(instances.c.pk.desc())).scalar()
        conn.execute(delete(instances).where(instances.c.pk == lost))
    archive.ingest.parents_changed()
    assert recover(archive) == 1  # back in the study, waiting with it
    assert not archive.catalogue.in_record(item.study_uid)
    assert ("R1", "", "Sent^Recovered") not in _patient_rows(archive)
    archive.inbox.accept(item.pk, STAFF, reconcile=False)
    assert len(archive.retrieve.select(STAFF, "dicom.retrieve",
                                       study_uids=[item.study_uid])) == 2


def test_two_acceptances_of_one_unknown_patients_studies_both_succeed_on_postgresql(
        tmp_path, postgres):
    """Two studies of N9 (no record here) wait under ``inbox:N9``; two people accept one
    each at the same time (two app instances): both file_under_record find no record N9 and
    insert one; the second waits on the first's row and then fails with a unique violation
    (an error page, the item still pending). indexing.py file_under_record inserts without
    allowing for another transaction making the same record."""
    from tests.conftest import make_archive

    archive = make_archive(tmp_path, postgres.new_database())
    try:
        for name in ("a", "b"):
            for path in ct_series(tmp_path / name, 1, patient_id="N9",
                                  patient_name="Sent^Nine"):
                archive.ingest.store_copy(path, HOSPITAL)
        first, second = archive.inbox.items()
        errors: list[BaseException] = []

        def accept() -> None:
            try:
                archive.inbox.accept(second.pk, STAFF, reconcile=False)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        with archive.engine.connect() as conn:
            transaction = conn.begin()
            study_pk = conn.execute(select(studies.c.pk).where(
                studies.c.study_uid == first.study_uid)).scalar_one()
            file_under_record(conn, study_pk)
            other = threading.Thread(target=accept)
            other.start()
            time.sleep(1.0)  # the other acceptance waits for this one's new record
            transaction.commit()
        other.join(timeout=30)
        assert not [f"{type(e).__name__}: {str(e).splitlines()[0]}" for e in errors]
        assert archive.inbox.item(second.pk).status == "accepted"
    finally:
        archive.close()


def test_giving_the_same_address_again_does_not_void_the_only_link(tmp_path):
    """An account types its address; a confirmation link is mailed. Not seeing it at once,
    the person saves the same address again within the minute: change_own_email voids the
    mailed link first, then finds a new one "throttled" and mails nothing, and the account
    page says "saved". The one link the person has answers "replaced ... use the newest
    link", and there is none (after five a day, none until tomorrow). access/users.py
    change_own_email (voids before _mail_link's throttle; the same unconfirmed address is
    treated as a new one)."""
    import re

    from tests.conftest import make_archive
    from tests.mail import smtp_server

    address = "me@reviewer.example"
    with smtp_server() as (sink, port):
        archive = make_archive(tmp_path, smtp_host="127.0.0.1", smtp_port=port,
                               public_url="https://images.hospital.example")
        try:
            archive.users.add("rev", "a-long-password", "reviewer")
            me = Actor("user", "rev", "reviewer", "127.0.0.1")

            def change() -> str:
                return archive.users.change_own_email(
                    "rev", "a-long-password", address, mailer=archive.notifier.mailer,
                    link_base=archive.settings.public_url, actor=me)

            assert change() == "sent"
            archive.notifier.mailer.flush()
            sink.wait_for(address, 1)
            (secret,) = re.findall(r"/account/email/confirm/([\w-]+)", sink.bodies(address)[0])
            change()  # the same address, saved again a moment later
            assert archive.users.confirm_email(secret, me) == address
        finally:
            archive.close()
