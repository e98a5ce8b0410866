"""A study two administrators deleted does not come back when a modality sends it again (IHE
IOCM rejected objects): C-STORE and STOW-RS of its instances are refused with the reason, new
instances are taken, an administrator can allow it again, and retention's expiry is no
rejection."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import func, select

from imageshare.domain.actors import Actor
from imageshare.domain.errors import ConflictingInstance
from imageshare.storage.index.schema import instances
from tests.factory import ct_series
from tests.listener import listening
from tests.multipart_helpers import encode_multipart

IG1 = Actor("user", "ig-lead", "admin", "10.0.0.1")
IG2 = Actor("user", "caldicott", "admin", "10.0.0.2")
MODALITY = Actor("node", "CT1", "node", "CT1@10.0.0.9")


class _Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def deleted(archive, tmp_path):
    """A three-slice study stored by a modality and deleted by two administrators; returns
    (archive, its files, its study UID)."""
    for actor in (IG1, IG2):
        archive.users.add(actor.name, "long-enough-password", "admin")
    clock = _Clock()
    archive.deletion.clock = clock
    paths = ct_series(tmp_path / "ct", 3, patient_id="P1", PatientBirthDate="19500101",
                      IssuerOfPatientID="RVJ")
    uid = ""
    for path in paths:
        uid = archive.ingest.store_copy(path, MODALITY).study_uid
    clock.now += timedelta(days=366 * 9)  # past the clinical retention of an adult's study
    request = archive.retention.request_deletion(uid, IG1, "wrong patient: images of P2")
    assert archive.retention.approve_deletion(request.public_id, IG2).instances == 3
    return archive, paths, uid


def _count(archive) -> int:
    with archive.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(instances)).scalar_one()


def test_an_instance_sent_again_after_an_approved_deletion_is_refused(deleted):
    archive, paths, uid = deleted
    blobs_before = set(archive.blobs.keys())
    with pytest.raises(ConflictingInstance) as refused:
        archive.ingest.store_copy(paths[0], MODALITY)
    assert "deleted here by an approved deletion" in str(refused.value)
    assert "allow it again" in str(refused.value)
    # The refusal names the deletion request, so that the operator finds who approved it.
    [approval] = list(archive.audit.events("deletion.approve"))
    assert f"request {approval['detail']['request']}" in str(refused.value)
    assert "P1" not in str(refused.value)
    assert _count(archive) == 0 and set(archive.blobs.keys()) == blobs_before
    [event] = [e for e in archive.audit.events("instance.store") if e["outcome"] == "refused"]
    assert event["study_uid"] == uid
    assert event["detail"]["conflict"] == "deleted by an approved deletion"


def test_c_store_and_stow_of_a_deleted_instance_answer_a_failure_with_the_reason(
        deleted, client):
    archive, paths, _uid = deleted
    scu = AE(ae_title="CT1")
    scu.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    with listening(archive, "CT1") as served:
        assoc = scu.associate("127.0.0.1", served.port, ae_title="IMAGESHARE")
        status = assoc.send_c_store(dcmread(paths[1]))
        assoc.release()
    assert status.Status != 0x0000 and (status.Status & 0xF000) in (0xA000, 0xC000, 0x0000)
    assert "deleted here by an approved deletion" in str(status.ErrorComment)
    body, content_type = encode_multipart([paths[2].read_bytes()])
    response = client.post("/dicomweb/studies", content=body, headers={
        "Content-Type": content_type, "Accept": "application/dicom+json"})
    assert response.status_code == 409, response.text
    failed = response.json()["00081198"]["Value"]
    assert failed[0]["00081155"]["Value"] == [str(dcmread(paths[2]).SOPInstanceUID)]
    assert _count(archive) == 0


def test_a_new_instance_of_the_deleted_study_is_taken(deleted, tmp_path):
    archive, _paths, uid = deleted
    [extra] = ct_series(tmp_path / "extra", 1, patient_id="P1", PatientBirthDate="19500101",
                        StudyInstanceUID=uid)
    assert archive.ingest.store_copy(extra, MODALITY).outcome == "stored"
    assert _count(archive) == 1


def test_an_administrator_allows_a_deleted_study_again(deleted, imageshare):
    archive, paths, uid = deleted
    data = archive.settings.data_dir
    refused = imageshare(data, "deletion", "allow-again", uid, "--reason", "sent in error",
                         "--by", "nobody")
    assert refused.returncode != 0
    with pytest.raises(ConflictingInstance):
        archive.ingest.store_copy(paths[0], MODALITY)
    done = imageshare(data, "deletion", "allow-again", uid, "--reason",
                      "the study was P1's after all", "--by", IG1.name)
    assert done.returncode == 0 and "3 instance(s)" in done.stdout
    assert all(archive.ingest.store_copy(p, MODALITY).outcome == "stored" for p in paths)
    assert _count(archive) == 3
    [allowed] = archive.audit.events("deletion.allow_again")
    assert allowed["actor"] == f"user:{IG1.name}" and allowed["study_uid"] == uid
    # The study is gone: the patient is named with the issuer recorded with the request.
    assert (allowed["patient_id"], allowed["detail"]["patient_issuer"]) == ("P1", "RVJ")
    again = imageshare(data, "deletion", "allow-again", uid, "--reason", "twice",
                       "--by", IG1.name)
    assert again.returncode == 1 and "no instance" in again.stderr


def test_retention_expiry_is_no_rejection(archive, tmp_path):
    clock = _Clock()
    archive.deletion.clock = clock
    retriever = Actor("system", "retrieve", "admin", "retrieve")
    [path] = ct_series(tmp_path / "t", 1)
    stored = archive.ingest.store_copy(path, MODALITY)
    with archive.engine.begin() as conn:
        conn.execute(instances.update().values(retention_class="temporary"))
    clock.now += timedelta(days=400)
    assert archive.deletion.expired(retriever, clock.now).instances == 1
    assert archive.ingest.store_copy(path, MODALITY).study_uid == stored.study_uid
    assert _count(archive) == 1


def test_the_deletions_page_says_what_is_refused_and_lets_an_administrator_allow_it_again(
        deleted):
    """The deletions page says how many images of a deleted study are refused if sent again;
    an administrator allows them again there, saying why (asked for), and then a modality's
    copy is taken."""
    from imageshare.web.server import create_app
    from tests.unit.test_retention_pages import _admin_browser, _post
    from tests.unit.test_web_pages import HTML

    archive, paths, uid = deleted
    [request] = archive.retention.deletion_requests()
    app = create_app(archive)
    admin, csrf = _admin_browser(archive, app, "records-lead")
    page = admin.get("/admin/deletions", headers=HTML).text
    assert "Its 3 images are refused if sent again." in page
    action = f"/admin/deletions/{request.public_id}/allow-again"
    assert f'action="{action}"' in page

    unexplained = _post(admin, csrf, action, note="  ")
    assert unexplained.status_code == 400 and "say why" in unexplained.text.lower()
    with pytest.raises(ConflictingInstance):
        archive.ingest.store_copy(paths[0], MODALITY)

    allowed = _post(admin, csrf, action, note="deleted by mistake: wrong study chosen")
    assert allowed.status_code == 303
    page = admin.get(allowed.headers["location"], headers=HTML).text
    assert "may be stored again" in page and action not in page
    assert archive.ingest.store_copy(paths[0], MODALITY).study_uid == uid
    [event] = list(archive.audit.events("deletion.allow_again"))
    assert (event["actor"], event["outcome"], event["instance_count"]) == (
        "user:records-lead", "success", 3)
    assert (event["patient_id"], event["detail"]["patient_issuer"]) == ("P1", "RVJ")
    # Once allowed, asking again is no change: the request is no longer refusing anything.
    assert _post(admin, csrf, action, note="again").status_code == 303
    assert archive.retention.refused_again(request) == 0
