"""Nothing received from another hospital is part of the patient record until a person has
accepted it: a pending inbox study is in no search, query or retrieval, only in the inbox
and its own viewer; accepting it makes it part of the record everywhere at once."""

from __future__ import annotations

import pytest

from imageshare.access.policy import INBOX
from imageshare.archive.query import Query
from imageshare.archive.search import StudySearch
from imageshare.domain.actors import Actor, cli_actor
from imageshare.domain.errors import NotFound
from tests.factory import ct_series

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
