"""Nothing received from another hospital is part of the patient record until a person has
accepted it: a pending inbox study is in no search, query or retrieval, only in the inbox
and its own viewer; accepting it makes it part of the record everywhere at once."""

from __future__ import annotations

from dataclasses import replace

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from imageshare.access.policy import INBOX
from imageshare.archive.query import Query
from imageshare.archive.search import StudySearch
from imageshare.domain.actors import Actor, cli_actor
from imageshare.domain.errors import ImageShareError, NotFound
from imageshare.storage.index.schema import (
    instances,
    patients,
    series,
    studies,
    study_comments,
)
from imageshare.web.server import create_app
from tests.conftest import downgrade_index, upgrade_index
from tests.factory import ct_series
from tests.unit.test_web_pages import HTML, PASSWORD, browser_sign_in, csrf_of

HOSPITAL = Actor("node", "DISTRICT", "node", "DISTRICT@10.1.0.9",
                 grants=frozenset({"dicom.store", INBOX}))
STAFF = cli_actor()
MULTIPART = {"Accept": 'multipart/related; type="application/dicom"'}


@pytest.fixture
def received(archive, tmp_path):
    """One study of our own and one received from another hospital, still pending."""
    ours = [archive.ingest.store_copy(p, STAFF)
            for p in ct_series(tmp_path / "ours", 2, patient_id="OURS1")]
    theirs = [archive.ingest.store_copy(p, HOSPITAL)
              for p in ct_series(tmp_path / "theirs", 3, patient_id="SENT9",
                                 patient_name="Sent^Patient")]
    (item,) = archive.inbox.items()
    return ours[0], theirs[0], item


def _uids(matches, tag):
    return {m.attributes[tag]["Value"][0] for m in matches}


def test_a_pending_study_is_in_no_query_at_any_level(archive, received):
    ours, theirs, _item = received
    for level, tag in (("PATIENT", "00100020"), ("STUDY", "0020000D"),
                       ("SERIES", "0020000E"), ("IMAGE", "00080018")):
        found = archive.query.find(Query(level=level, identifier={}), STAFF)
        assert found, level
        assert theirs.study_uid not in {m.study_uid for m in found}, level
        if level == "PATIENT":
            assert _uids(found, tag) == {"OURS1"}
    by_key = archive.query.find(Query(level="STUDY", identifier={
        "0020000D": {"vr": "UI", "Value": [theirs.study_uid]}}), STAFF)
    assert by_key == []


def test_a_pending_study_cannot_be_retrieved_searched_or_viewed(archive, received):
    _ours, theirs, _item = received
    with pytest.raises(NotFound):
        archive.retrieve.select(STAFF, "dicom.retrieve", study_uids=[theirs.study_uid])
    with pytest.raises(NotFound):
        archive.retrieve.select(STAFF, "dicom.retrieve", patient_ids=["SENT9"])
    with pytest.raises(NotFound):
        archive.catalogue.view(theirs.study_uid, STAFF, None)
    page = archive.search.search(StudySearch(text="Sent"), STAFF, None)
    assert page.studies == []


def test_over_http_only_the_inbox_viewer_shows_it(client, archive, received):
    _ours, theirs, item = received
    study = theirs.study_uid
    assert client.get("/dicomweb/studies", params={"PatientID": "SENT9"}).json() == []
    assert client.get(f"/dicomweb/studies/{study}/series").json() == []
    assert client.get(f"/dicomweb/studies/{study}", headers=MULTIPART).status_code == 404
    assert client.get(f"/dicomweb/studies/{study}/metadata").status_code == 404
    assert client.get(f"/studies/{study}").status_code == 404
    assert client.get(f"/viewer/{study}").status_code == 404

    inbox = client.get("/inbox")
    assert f"/inbox/{item.pk}/viewer" in inbox.text and f"/studies/{study}" not in inbox.text
    viewer = client.get(f"/inbox/{item.pk}/viewer")
    assert viewer.status_code == 200 and f"/inbox/{item.pk}/dicomweb" in viewer.text
    series_uid = theirs.series_uid
    image = client.get(f"/inbox/{item.pk}/dicomweb/studies/{study}/series/{series_uid}"
                       f"/instances/{theirs.sop_instance_uid}/rendered",
                       headers={"Accept": "image/png"})
    assert image.status_code == 200 and image.content[:4] == b"\x89PNG"
    # The inbox viewer reaches only its own item's study.
    ours = received[0]
    other = client.get(f"/inbox/{item.pk}/dicomweb/studies/{ours.study_uid}/series/"
                       f"{ours.series_uid}/instances/{ours.sop_instance_uid}/rendered")
    assert other.status_code == 404


def test_accepting_makes_it_part_of_the_record_everywhere(client, archive, received):
    _ours, theirs, item = received
    archive.inbox.accept(item.pk, STAFF)
    study = theirs.study_uid
    assert len(archive.retrieve.select(STAFF, "dicom.retrieve", study_uids=[study])) == 3
    found = client.get("/dicomweb/studies", params={"StudyInstanceUID": study}).json()
    assert [s["0020000D"]["Value"][0] for s in found] == [study]
    assert client.get(f"/studies/{study}").status_code == 200


def test_a_rejected_study_never_becomes_visible(client, archive, received):
    _ours, theirs, item = received
    archive.inbox.reject(item.pk, STAFF)
    assert client.get("/dicomweb/studies", params={"PatientID": "SENT9"}).json() == []
    with pytest.raises(NotFound):
        archive.retrieve.select(STAFF, "dicom.retrieve", study_uids=[theirs.study_uid])


def _summary(client, archive, study: str) -> tuple[str, ...]:
    """The study's modalities, series and instances (QIDO-RS), and its patient's studies,
    series and instances (C-FIND at patient level)."""
    (found,) = client.get("/dicomweb/studies", params={
        "StudyInstanceUID": study, "includefield": "all"}).json()
    values = [found[tag]["Value"] for tag in ("00080061", "00201206", "00201208")]
    (patient,) = archive.query.find(Query(level="PATIENT", identifier={
        "00100020": {"vr": "LO", "Value": ["OURS1"]}, "00201200": {"vr": "IS"},
        "00201202": {"vr": "IS"}, "00201204": {"vr": "IS"}}), STAFF)
    counts = [patient.attributes[tag]["Value"][0] for tag in ("00201200", "00201202",
                                                              "00201204")]
    return ("\\".join(values[0]), *(str(v[0]) for v in values[1:]), *(str(c) for c in counts))


def test_what_waits_in_the_inbox_counts_in_no_summary_of_our_study(client, archive, tmp_path):
    """Another hospital sends an MR series into a study of ours (and a study of its own for
    our patient): until a person accepts them, the study's modalities, its numbers of series
    and instances, its series' and its patient's counts are those of our record alone, in
    QIDO-RS, C-FIND and the study list; accepted, they count; rejected, they never did."""
    ours = [archive.ingest.store_copy(p, STAFF)
            for p in ct_series(tmp_path / "ours", 2, patient_id="OURS1")][0]
    study = ours.study_uid
    theirs = [archive.ingest.store_copy(p, HOSPITAL) for p in ct_series(
        tmp_path / "theirs", 3, patient_id="OURS1", study_uid=study, Modality="MR")]
    archive.ingest.store_copy(ct_series(tmp_path / "new", 1, patient_id="OURS1")[0],
                              HOSPITAL)
    assert _summary(client, archive, study) == ("CT", "1", "2", "1", "1", "2")
    series = client.get(f"/dicomweb/studies/{study}/series").json()
    assert [s["00201209"]["Value"][0] for s in series] == [2]
    (found,) = archive.query.find(Query(level="STUDY", identifier={
        "0020000D": {"vr": "UI", "Value": [study]}, "00080061": {"vr": "CS"},
        "00201208": {"vr": "IS"}}), STAFF)
    assert found.attributes["00080061"]["Value"] == ["CT"]
    assert found.attributes["00201208"]["Value"] == [2]
    (row,) = archive.search.search(StudySearch(text="OURS1"), STAFF, None).studies
    assert (row.modalities, row.instance_count) == ("CT", 2)
    assert "MR" not in archive.catalogue.record(study, include_review=False).modalities

    items = {i.study_uid: i for i in archive.inbox.items()}
    archive.inbox.accept(items[study].pk, STAFF, reconcile=False)
    assert _summary(client, archive, study) == ("CT\\MR", "2", "5", "1", "2", "5")
    series = client.get(f"/dicomweb/studies/{study}/series").json()
    assert sorted(s["00201209"]["Value"][0] for s in series) == [2, 3]
    more = ct_series(tmp_path / "more", 1, patient_id="OURS1", study_uid=study,
                     SeriesInstanceUID=theirs[0].series_uid, Modality="MR")
    archive.ingest.store_copy(more[0], STAFF)  # and the record grows as ever after
    assert _summary(client, archive, study) == ("CT\\MR", "2", "6", "1", "2", "6")

    (other,) = [i for i in archive.inbox.items() if i.status == "pending"]
    archive.inbox.reject(other.pk, STAFF)
    assert _summary(client, archive, study) == ("CT\\MR", "2", "6", "1", "2", "6")


def test_upgrading_takes_waiting_instances_out_of_the_summaries(archive, tmp_path):
    """Counts kept by an older version (everything a study held) are those of the record
    after the upgrade; downgrading gives the older version its counts back. A patient an
    older version knew only from another hospital's waiting study is filed for review."""
    study = [archive.ingest.store_copy(p, STAFF)
             for p in ct_series(tmp_path / "ours", 2, patient_id="OURS1")][0].study_uid
    for p in ct_series(tmp_path / "theirs", 3, patient_id="OURS1", study_uid=study,
                       Modality="MR"):
        archive.ingest.store_copy(p, HOSPITAL)
    archive.ingest.store_copy(ct_series(tmp_path / "new", 1, patient_id="SENT9")[0], HOSPITAL)

    def issuers() -> dict[str, str]:
        with archive.engine.connect() as conn:
            return dict(conn.execute(select(patients.c.patient_id, patients.c.issuer)).all())

    def stored() -> tuple[str, int, int, list[int]]:
        with archive.engine.connect() as conn:
            row = conn.execute(select(studies.c.modalities, studies.c.num_series,
                                      studies.c.num_instances)
                               .where(studies.c.study_uid == study)).one()
            counts = sorted(conn.execute(select(series.c.num_instances)).scalars())
        return (*row, counts)

    assert stored() == ("CT", 1, 2, [0, 0, 2])
    assert issuers() == {"OURS1": "", "SENT9": "inbox:"}
    downgrade_index(archive.engine, "0028")
    assert stored() == ("CT\\MR", 2, 5, [1, 2, 3])
    with archive.engine.begin() as conn:  # as an older version filed it
        conn.execute(update(patients).where(patients.c.patient_id == "SENT9")
                     .values(issuer=""))
    upgrade_index(archive.engine, "0029")
    assert stored() == ("CT", 1, 2, [0, 0, 2])
    assert issuers() == {"OURS1": "", "SENT9": "inbox:"}


def test_no_study_page_or_action_reaches_a_pending_study(archive, received):
    """The study's own pages and actions answer as for a study that does not exist, for the
    pending study, whatever the caller may do elsewhere (and each refusal is audited)."""
    ours, theirs, _item = received
    archive.users.add("dr-who", PASSWORD, "clinician")
    with TestClient(create_app(archive)) as browser:
        browser_sign_in(browser, "dr-who")
        csrf = csrf_of(browser.get("/", headers=HTML).text)
        for study, wanted in ((theirs.study_uid, 404), (ours.study_uid, 200)):
            answers = [
                browser.get(f"/studies/{study}/sites", headers=HTML),
                browser.post(f"/studies/{study}/check", data={"csrf_token": csrf},
                             headers=HTML),
                browser.post(f"/studies/{study}/comments", headers=HTML,
                             data={"csrf_token": csrf, "body": "seen"}),
                browser.post(f"/studies/{study}/documents", headers=HTML,
                             data={"csrf_token": csrf, "title": "letter"},
                             files={"file": ("letter.pdf", b"%PDF-1.4\n%%EOF\n")}),
            ]
            assert [a.status_code for a in answers] == [wanted] * 4, study
    assert _untouched(archive, theirs.study_uid)


def _untouched(archive, study: str) -> bool:
    """Nothing was added to the pending study: it still holds only what was sent."""
    with archive.engine.connect() as conn:
        classes = set(conn.execute(select(instances.c.retention_class).join(
            series, series.c.pk == instances.c.series_pk).join(
            studies, studies.c.pk == series.c.study_pk).where(
            studies.c.study_uid == study)).scalars())
        comments = conn.execute(select(study_comments.c.pk).where(
            study_comments.c.study_uid == study)).all()
    return classes == {"inbox"} and not comments


def test_a_patient_first_known_from_another_hospital_joins_the_record_when_accepted(
        archive, tmp_path):
    """Another hospital's study of a patient we had no record of makes no record of its own
    (so that our scanner's images of the same hospital number are filed as ever, with our
    details); accepted, it is filed under that hospital number's record, or refused with a
    reason when the record names someone else."""
    for p in ct_series(tmp_path / "sent", 2, patient_id="NEW7", patient_name="Sent^Seven"):
        archive.ingest.store_copy(p, HOSPITAL)
    for p in ct_series(tmp_path / "other", 1, patient_id="NEW8", patient_name="Sent^Eight"):
        archive.ingest.store_copy(p, HOSPITAL)
    # Meanwhile our scanner images a different person under NEW8: filed under our details.
    ours = archive.ingest.store_copy(
        ct_series(tmp_path / "ours", 1, patient_id="NEW8", patient_name="Local^Eight")[0],
        STAFF)
    assert ours.outcome == "stored"
    items = {archive.catalogue.record(i.study_uid).patient.patient_id: i
             for i in archive.inbox.items()}

    archive.inbox.accept(items["NEW7"].pk, STAFF, reconcile=False)
    (found,) = archive.query.find(Query(level="PATIENT", identifier={
        "00100020": {"vr": "LO", "Value": ["NEW7"]}, "00100010": {"vr": "PN"}}), STAFF)
    assert found.attributes["00100010"]["Value"] == [{"Alphabetic": "Sent^Seven"}]

    with pytest.raises(ImageShareError, match="reconcile the patient first"):
        archive.inbox.accept(items["NEW8"].pk, STAFF, reconcile=False)
    (found,) = archive.query.find(Query(level="PATIENT", identifier={
        "00100020": {"vr": "LO", "Value": ["NEW8"]}, "00100010": {"vr": "PN"},
        "00201204": {"vr": "IS"}}), STAFF)
    assert found.attributes["00100010"]["Value"] == [{"Alphabetic": "Local^Eight"}]
    assert found.attributes["00201204"]["Value"] == [1]
    assert archive.inbox.item(items["NEW8"].pk).status == "pending"


def test_two_hospitals_people_under_one_unknown_number_are_not_mixed(archive, tmp_path):
    """Two hospitals send studies of different people under the same hospital number, which
    we have no record of: the second is refused with a reason instead of being filed with
    the first (whose details would become the second's record when accepted)."""
    county = Actor("node", "COUNTY", "node", "COUNTY@10.1.0.7",
                   grants=frozenset({"dicom.store", INBOX}))
    archive.ingest.store_copy(ct_series(tmp_path / "b", 1, patient_id="X100",
                                        patient_name="First^Person")[0], HOSPITAL)
    with pytest.raises(ImageShareError, match="waits for review with another name"):
        archive.ingest.store_copy(ct_series(tmp_path / "c", 1, patient_id="X100",
                                            patient_name="Second^Person")[0], county)
    same = archive.ingest.store_copy(ct_series(tmp_path / "d", 1, patient_id="X100",
                                               patient_name="First^Person")[0], county)
    assert same.outcome == "stored"
    assert len(archive.inbox.items()) == 2


def test_of_two_decisions_at_once_one_wins_and_the_other_changes_nothing(archive, received,
                                                                         monkeypatch):
    """Two people (or two processes) decide one item at the same moment: both saw it
    pending. The first acceptance wins; the rejection that read it pending too is refused
    and deletes nothing of what was just accepted."""
    _ours, theirs, item = received
    archive.inbox.accept(item.pk, STAFF, reconcile=False)
    seen_pending = archive.inbox._decidable  # noqa: SLF001
    monkeypatch.setattr(archive.inbox, "_decidable", lambda pk, upload_review: replace(
        seen_pending(pk, upload_review), status="pending"))
    with pytest.raises(ImageShareError, match="decided already"):
        archive.inbox.reject(item.pk, STAFF, "not ours")
    with pytest.raises(ImageShareError, match="decided already"):
        archive.inbox.accept(item.pk, STAFF, reconcile=False)
    assert archive.inbox.item(item.pk).status == "accepted"
    assert archive.catalogue.in_record(theirs.study_uid)
    with archive.engine.connect() as conn:
        assert conn.execute(select(studies.c.num_instances).where(
            studies.c.study_uid == theirs.study_uid)).scalar() == 3


@pytest.mark.parametrize("decision", ["accept", "reject"])
def test_a_decision_a_stop_interrupted_goes_back_to_the_queue_at_the_next_start(
        archive, received, decision):
    """The machine stops after an item was claimed and before its decision was done (the
    process killed mid-request): the item must not stay "accepted" with its images outside
    the record. While claimed nobody else decides it; the next start gives it back (once the
    claim is old enough that no running decision can still own it), and it is decided then."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    from imageshare.app import recover
    from imageshare.exchange.inbox import ACCEPTING, REJECTING, _claim
    from imageshare.storage.index.schema import inbox_items

    _ours, theirs, item = received
    claimed = ACCEPTING if decision == "accept" else REJECTING
    with archive.engine.begin() as conn:
        _claim(conn, item.pk, claimed, STAFF, "")  # ... and then the power went
    assert not archive.catalogue.in_record(theirs.study_uid)
    with pytest.raises(ImageShareError, match="decided already"):
        archive.inbox.accept(item.pk, STAFF, reconcile=False)
    recover(archive)  # a start right after: the claim may still be a running decision's
    assert archive.inbox.item(item.pk).status == claimed
    with archive.engine.begin() as conn:
        conn.execute(update(inbox_items).where(inbox_items.c.pk == item.pk).values(
            decided_at=datetime.now(UTC) - timedelta(hours=2)))
    recover(archive)
    assert archive.inbox.item(item.pk).status == "pending"
    getattr(archive.inbox, decision)(item.pk, STAFF)
    assert archive.inbox.item(item.pk).status == f"{decision}ed"
    assert archive.catalogue.in_record(theirs.study_uid) is (decision == "accept")
