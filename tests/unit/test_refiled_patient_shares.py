"""A study a patient shared from their own account, then filed under another patient (a
correction to another hospital number, a merge), is no longer the sharer's to show: the
patient's live links of it end in the change's own transaction, audited with the reason.
Links staff made of it stay (they were about the images, and show the corrected identity)."""

from __future__ import annotations

from imageshare.archive.corrections import PatientDetails
from imageshare.domain.actors import Actor, cli_actor
from imageshare.sharing.links import NewShare
from tests.factory import ct_series

PATIENT = Actor("user", "pat1", "patient", "192.0.2.20")
STAFF = Actor("user", "sono", "sonographer", "127.0.0.1")


def test_a_patients_link_ends_when_the_study_is_filed_under_another_patient(
        archive, tmp_path) -> None:
    archive.users.add("pat1", "a-long-password", "patient")
    archive.users.add("sono", "a-long-password", "sonographer")
    uid = ""
    for path in ct_series(tmp_path / "s", 1, patient_id="H100", patient_name="Wrong^Person",
                          PatientBirthDate="19700101"):
        uid = archive.ingest.store_copy(path, cli_actor()).study_uid
    theirs = archive.shares.create(NewShare(uid, recipient_email="gp@example.org",
                                            deidentified=False, days=14), PATIENT, None)
    ours = archive.shares.create(NewShare(uid, recipient_email="mentor@example.org",
                                          deidentified=False, days=14), STAFF, None)
    archive.corrections.correct_study(
        uid, PatientDetails("Right^Person", "H200", birth_date="19800202"),
        "filed under the wrong patient", cli_actor())
    assert archive.shares.by_public_id(theirs.public_id, "pat1").revoked_at is not None
    assert archive.shares.by_public_id(ours.public_id, "sono").revoked_at is None
    [revoked] = [e for e in archive.audit.events("share.revoke")
                 if e["detail"]["share"] == theirs.public_id]
    assert revoked["detail"]["reason"] == "the study was filed under another patient"
