"""Red-team replay (session 32): teaching files, accreditation review cases and share links,
attacked as a reviewer, an educator and an auditor. Each test failed before its fix."""

from __future__ import annotations

import re
import shutil

import pytest
from sqlalchemy import update

from imageshare.domain.actors import Actor
from imageshare.domain.errors import Forbidden, ImageShareError, NotFound
from imageshare.sharing.links import NewShare
from imageshare.storage.index.schema import share_items
from imageshare.teaching.library import CaseFields
from tests.conftest import require
from tests.factory import us_cine

OWNER = Actor("user", "trainee", "sonographer", "127.0.0.1")
MENTOR = Actor("share", "mentor", "share-recipient", "10.1.1.1")
HTML = {"Accept": "text/html"}
PASSWORD = "a-long-password"


@pytest.fixture(autouse=True)
def _tesseract():
    require(shutil.which("tesseract") is not None, "Tesseract OCR (Debian package tesseract-ocr)")


@pytest.fixture
def two_studies(archive, tmp_path):
    """Two ultrasound studies of two patients (a case may gather both)."""
    archive.users.add("trainee", PASSWORD, "sonographer")
    first = archive.ingest.store_copy(us_cine(tmp_path / "a", frames=2, patient_id="H1001",
                                              patient_name="Lovelace^Ada"), OWNER).study_uid
    second = archive.ingest.store_copy(us_cine(tmp_path / "b", frames=2, patient_id="H2002",
                                               patient_name="Hopper^Grace"), OWNER).study_uid
    return first, second


def _open(anonymous, created):
    """The reviewer's browser with the link opened; returns the case page's CSRF token."""
    opened = anonymous.post(created.path, data={"passcode": created.passcode}, headers=HTML)
    assert opened.status_code == 200, opened.text
    return re.search(r'name="csrf_token" value="([^"]+)"', opened.text).group(1)


# -- audit: every read and change by a reviewer names the patient's study -------------------


def test_a_reviewers_view_download_and_feedback_name_every_shared_study_in_the_audit(
        archive, anonymous, two_studies):
    """A patient's access report (subject access request) finds events by patient or study:
    a link's case views, downloads, comments, feedback and sign-off named no study, so what a
    reviewer saw and downloaded of the patient was missing from it."""
    first, second = two_studies
    created = archive.shares.create(NewShare(
        "", selection=((first, "", ""), (second, "", "")), allow_download=True,
        profile="accreditation"), OWNER, None)
    token = _open(anonymous, created)
    assert anonymous.get(created.path + "/download", headers=HTML).status_code == 200
    anonymous.post(created.path + "/comments", headers=HTML,
                   data={"csrf_token": token, "body": "Good views"})
    anonymous.post(created.path + "/feedback", headers=HTML, data={
        "csrf_token": token, "view_obtained": "yes", "image_quality": "4",
        "agreement": "agree"})
    anonymous.post(created.path + "/signoff", headers=HTML,
                   data={"csrf_token": token, "note": "Signed"})
    for action in ("share.create", "share.view", "share.download", "share.comment",
                   "share.feedback", "share.signoff"):
        named = {e["study_uid"] for e in archive.audit.events(action)}
        assert named == {first, second}, action
    # The owner's visit summary counts each use once, not once per study (the case page was
    # shown four times: after the passcode and after each form).
    (visit,) = [v for v in archive.shares.visits(archive.shares.owned("trainee")[0])
                if v["who"] == "the link's recipient"]
    assert (visit["views"], visit["downloads"], visit["comments"], visit["feedback"]) == (
        4, 1, 1, 1)


# -- double submits and over-long text --------------------------------------------------------


def test_a_double_submitted_feedback_or_comment_is_kept_once(archive, anonymous, two_studies):
    created = archive.shares.create(NewShare(two_studies[0]), OWNER, None)
    token = _open(anonymous, created)
    feedback = {"csrf_token": token, "view_obtained": "partly", "image_quality": "3",
                "agreement": "unsure", "findings": "Apex foreshortened"}
    for _ in range(2):
        sent = anonymous.post(created.path + "/feedback", headers=HTML, data=feedback)
        assert sent.status_code == 200 and "your feedback was sent" in sent.text
        anonymous.post(created.path + "/comments", headers=HTML,
                       data={"csrf_token": token, "body": "Nice loop"})
    share = archive.shares.owned("trainee")[0]
    assert len(archive.shares.feedback(share)) == 1
    assert len(archive.shares.comments(share)) == 1
    # A different opinion afterwards is kept.
    anonymous.post(created.path + "/feedback", headers=HTML,
                   data={**feedback, "image_quality": "4"})
    assert len(archive.shares.feedback(share)) == 2


def test_a_second_sign_off_sent_at_the_same_moment_does_not_replace_the_first(
        archive, two_studies):
    created = archive.shares.create(NewShare(two_studies[0]), OWNER, None)
    share = archive.shares.by_token(created.token)
    archive.shares.give_feedback(share, MENTOR, "yes", 4, "", "agree", "")
    stale = archive.shares.by_token(created.token)  # both requests read it before either wrote
    archive.shares.sign_off(stale, MENTOR, "Competent: signed")
    with pytest.raises(ImageShareError, match="signed off already"):
        archive.shares.sign_off(stale, MENTOR, "second click")
    assert archive.shares.by_token(created.token).sign_off_note == "Competent: signed"


def test_over_long_feedback_is_refused_with_the_reason_not_cut_short(archive, anonymous,
                                                                      two_studies):
    created = archive.shares.create(NewShare(two_studies[0]), OWNER, None)
    token = _open(anonymous, created)
    refused = anonymous.post(created.path + "/feedback", headers=HTML, data={
        "csrf_token": token, "view_obtained": "yes", "image_quality": "4",
        "agreement": "agree", "findings": "x" * 10_001})
    assert refused.status_code == 400 and "10,000 characters" in refused.text
    share = archive.shares.owned("trainee")[0]
    assert archive.shares.feedback(share) == []
    with pytest.raises(ImageShareError, match="10,000 characters"):
        archive.shares.sign_off(share, MENTOR, "y" * 10_001)


def test_an_over_long_teaching_field_is_refused_with_its_name():
    with pytest.raises(ImageShareError, match="findings"):
        CaseFields(title="Effusion", findings="z" * 10_001).values()


# -- the share's items, exactly ----------------------------------------------------------------


def test_a_comment_on_an_image_held_back_by_de_identification_is_refused(archive, two_studies):
    created = archive.shares.create(NewShare(two_studies[0]), OWNER, None)
    share = archive.shares.by_token(created.token)
    (item,) = archive.shares.items(share)
    with archive.engine.begin() as conn:
        conn.execute(update(share_items).where(share_items.c.share_pk == share.pk)
                     .values(held_back=True))
    with pytest.raises(NotFound):
        archive.shares.comment(share, MENTOR, "What is this?", item.public_sop_uid)
    assert archive.shares.comments(share) == []


# -- teaching: another educator's attempt to change a case is refused and audited -------------


def test_another_educators_attempt_to_change_a_teaching_case_is_audited(archive, tmp_path):
    archive.users.add("edu", PASSWORD, "educator")
    source = archive.ingest.store_copy(us_cine(tmp_path / "t", frames=2, patient_id="H3003",
                                               patient_name="Marple^Jane"), OWNER).study_uid
    author = Actor("user", "edu", "educator", "127.0.0.1")
    case = archive.teaching.create(author, CaseFields(title="Effusion"), source)
    other = Actor("user", "edu2", "educator", "10.2.2.2")
    with pytest.raises(Forbidden):
        archive.teaching.update(case, other, CaseFields(title="Mine now"))
    with pytest.raises(Forbidden):
        archive.teaching.delete(case, other)
    denied = [e for e in archive.audit.events("access.denied") if e["actor"] == "user:edu2"]
    assert {e["detail"]["wanted"] for e in denied} == {"case.update", "case.delete"}
    assert archive.teaching.get(case.public_id).title == "Effusion"


def test_a_signed_off_case_takes_no_more_feedback(archive, anonymous, two_studies):
    """The sign-off is the logbook's final word: feedback posted after it (the form is gone,
    the route was still open) is refused with the reason."""
    created = archive.shares.create(NewShare(two_studies[0]), OWNER, None)
    token = _open(anonymous, created)
    feedback = {"csrf_token": token, "view_obtained": "yes", "image_quality": "4",
                "agreement": "agree"}
    anonymous.post(created.path + "/feedback", headers=HTML, data=feedback)
    anonymous.post(created.path + "/signoff", headers=HTML, data={"csrf_token": token})
    late = anonymous.post(created.path + "/feedback", headers=HTML,
                          data={**feedback, "agreement": "disagree"})
    assert late.status_code == 400 and "signed off" in late.text
    share = archive.shares.owned("trainee")[0]
    assert [f["agreement"] for f in archive.shares.feedback(share)] == ["agree"]


def test_opening_a_teaching_case_in_the_viewer_is_audited(archive, anonymous, tmp_path):
    archive.users.add("edu", PASSWORD, "educator")
    source = archive.ingest.store_copy(us_cine(tmp_path / "t", frames=2, patient_id="H3003",
                                               patient_name="Marple^Jane"), OWNER).study_uid
    case = archive.teaching.create(Actor("user", "edu", "educator", "127.0.0.1"),
                                   CaseFields(title="Effusion"), source)
    anonymous.post("/login", data={"username": "edu", "password": PASSWORD}, headers=HTML)
    assert anonymous.get(case.path + "/viewer", headers=HTML).status_code == 200
    assert [e["detail"] for e in archive.audit.events("case.view")] == [
        {"case": case.public_id, "format": "viewer"}]


def test_an_over_long_share_message_is_refused_not_cut_short(archive, two_studies):
    with pytest.raises(ImageShareError, match="message may have at most 4,000"):
        archive.shares.create(NewShare(two_studies[0], message="m" * 4001), OWNER, None)
    assert archive.shares.owned("trainee") == []
    # A teaching case's findings, differential and diagnosis together fit.
    archive.shares.create(NewShare(two_studies[0], interpretation="i" * 30_000), OWNER, None)
    assert len(archive.shares.owned("trainee")[0].interpretation) == 30_000


# -- words the sender typed that name the patient ----------------------------------------------


@pytest.mark.parametrize("field, text", [
    ("title", "Ada Lovelace echo"), ("message", "Mrs Lovelace, seen on ICU"),
    ("description", "Patient H1001, breathless"), ("interpretation", "DOB 01/01/1970, LV ok")])
def test_a_de_identified_share_whose_words_name_the_patient_is_refused(archive, two_studies,
                                                                       field, text):
    """The reviewer of a de-identified case must not read the patient's name, ID or birth
    date in the title, message, description or interpretation the sender typed."""
    with pytest.raises(ImageShareError, match=f"the {field} names the patient") as refused:
        archive.shares.create(NewShare(two_studies[0], **{field: text}), OWNER, None)
    assert "Lovelace" not in str(refused.value) and "H1001" not in str(refused.value)
    assert archive.shares.owned("trainee") == []


def test_clinical_words_that_share_a_name_part_are_not_refused(archive, tmp_path):
    archive.users.add("trainee", PASSWORD, "sonographer")
    study = archive.ingest.store_copy(us_cine(tmp_path / "l", frames=2, patient_id="H4004",
                                              patient_name="Long^Grace"), OWNER).study_uid
    archive.shares.create(NewShare(study, title="Parasternal long axis",
                                   message="Amazing grace period"), OWNER, None)
    # An identifiable share names the patient by design.
    archive.shares.create(NewShare(study, deidentified=False, recipient_user="trainee",
                                   message="Grace Long, H4004"), OWNER, None)


def test_a_teaching_case_whose_history_names_the_patient_is_not_made(archive, tmp_path):
    source = archive.ingest.store_copy(us_cine(tmp_path / "t", frames=2, patient_id="H3003",
                                               patient_name="Marple^Jane"), OWNER).study_uid
    author = Actor("user", "edu", "educator", "127.0.0.1")
    with pytest.raises(ImageShareError, match="the history names the patient"):
        archive.teaching.create(author, CaseFields(title="Effusion",
                                                   history="Jane Marple, 54, breathless"),
                                source)
    assert archive.teaching.search() == []
    assert archive.audit.events("teaching.create") is not None
    assert not list(archive.audit.events("teaching.create"))


@pytest.mark.parametrize("text, named", [
    ("A4C view, 12 frames", False), ("Dr Long reviewed it", False),
    ("Parasternal long axis", False), ("Mr Long", True), ("Grace Long", True),
    ("seen 3/2/1981", True), ("3rd February 1981", True)])
def test_what_counts_as_naming_the_patient_in_typed_words(text, named):
    from pydicom import Dataset

    from imageshare.deid.identity import field_naming_the_patient, names_the_patient

    header = Dataset()
    header.PatientName, header.PatientID, header.PatientBirthDate = (
        "Long^Grace", "12", "19810203")
    assert names_the_patient(header, text) is named
    assert field_naming_the_patient([header], {"message": text}) == ("message" if named else "")


def test_marks_another_educator_draws_on_a_case_do_not_show_in_its_authors_presentation(
        archive, anonymous, tmp_path):
    """Anyone who may mark studies can draw on a teaching case's copy: those marks (and their
    labels) must not appear when the author presents the case, nor in the author's viewer."""
    archive.users.add("edu", PASSWORD, "educator")
    source = archive.ingest.store_copy(us_cine(tmp_path / "t", frames=2, patient_id="H3003",
                                               patient_name="Marple^Jane"), OWNER)
    archive.annotations.save(source.study_uid, source.sop_instance_uid, 1, [
        {"kind": "arrow", "points": [[1, 1], [9, 9]], "label": "carried-effusion"}],
        OWNER, "trainee", None, author_key="trainee")
    case = archive.teaching.create(Actor("user", "edu", "educator", "127.0.0.1"),
                                   CaseFields(title="Effusion"), source.study_uid)
    (copy_uid,) = archive.teaching.studies(case)
    (copy_sop,) = [i.sop_uid for s in archive.catalogue.record(copy_uid).series
                   if s.modality == "US" for i in s.instances]
    other = Actor("user", "edu2", "educator", "10.2.2.2")
    archive.annotations.save(copy_uid, copy_sop, 1, [
        {"kind": "arrow", "points": [[5, 5], [20, 20]], "label": "vandal-label"}],
        other, "edu2", None, author_key="edu2")
    anonymous.post("/login", data={"username": "edu", "password": PASSWORD}, headers=HTML)
    for page in ("/present", "/viewer"):
        shown = anonymous.get(case.path + page, headers=HTML)
        assert shown.status_code == 200
        assert "carried-effusion" in shown.text and "vandal-label" not in shown.text, page
    assert "vandal-label" in str(archive.teaching.marks(case, copy_uid, "edu2"))


def test_double_submits_are_kept_once_on_sqlite_and_postgresql(any_archive, tmp_path):
    """The "same words again" checks are one INSERT ... SELECT ... WHERE NOT EXISTS: valid on
    both databases."""
    archive = any_archive
    study = archive.ingest.store_copy(us_cine(tmp_path / "p", frames=2, patient_id="H5005",
                                              patient_name="Curie^Marie"), OWNER).study_uid
    created = archive.shares.create(NewShare(study), OWNER, None)
    share = archive.shares.by_token(created.token)
    for _ in range(2):
        archive.shares.comment(share, MENTOR, "Good depth")
        archive.shares.give_feedback(share, MENTOR, "yes", "5", "Normal", "agree", "")
    assert len(archive.shares.comments(share)) == len(archive.shares.feedback(share)) == 1
    archive.shares.sign_off(share, MENTOR, "ok")
    with pytest.raises(ImageShareError, match="signed off already"):
        archive.shares.sign_off(share, MENTOR, "again")
