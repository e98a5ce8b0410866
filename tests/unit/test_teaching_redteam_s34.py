"""Red-team replay (session 34): teaching cases attacked as an educator who types what she
should not, a second educator, a patient who withdraws consent and a user with two tabs open.
Each test failed before its fix."""

from __future__ import annotations

import io
import re
import shutil
from collections.abc import Iterator
from datetime import UTC, date, datetime

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import event, insert

from imageshare.domain.actors import Actor
from imageshare.domain.errors import Forbidden, ImageShareError
from imageshare.storage.index.schema import cases as cases_table
from imageshare.teaching.library import CaseFields
from imageshare.web.server import create_app
from tests.conftest import require
from tests.factory import us_cine

HTML = {"Accept": "text/html"}
PASSWORD = "a-long-password"
SYSTEM = Actor("system", "tests", "admin", "tests")
AUTHOR = Actor("user", "edu", "educator", "127.0.0.1")


@pytest.fixture(autouse=True)
def _tesseract():
    require(shutil.which("tesseract") is not None, "Tesseract OCR (Debian package tesseract-ocr)")


@pytest.fixture
def source(archive, tmp_path):
    """A colour ultrasound study of Jane Marple (H31337) and the educators who teach."""
    archive.users.add("edu", PASSWORD, "educator")
    archive.users.add("edu2", PASSWORD, "educator")
    return archive.ingest.store_copy(us_cine(tmp_path / "us", frames=4, patient_id="H31337",
                                             patient_name="Marple^Jane"), SYSTEM)


def _signed_in(archive, name: str) -> Iterator[TestClient]:
    with TestClient(create_app(archive)) as browser:
        signed = browser.post("/login", data={"username": name, "password": PASSWORD},
                              headers=HTML)
        assert signed.status_code == 200, signed.text
        yield browser


@pytest.fixture
def author(archive, source):
    yield from _signed_in(archive, "edu")


@pytest.fixture
def colleague(archive, source):
    yield from _signed_in(archive, "edu2")


def _csrf(text: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', text)
    assert found is not None
    return found.group(1)


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(out, format="PNG")
    return out.getvalue()


# -- words that name the patient ---------------------------------------------------------------


def test_a_teaching_case_cannot_be_edited_afterwards_to_name_its_patient(archive, source):
    """The name check ran when a case was made, not when it was edited: a title changed to
    the patient's name reached every member of staff and every share of the case."""
    case = archive.teaching.create(AUTHOR, CaseFields(title="Effusion"), source.study_uid)
    for field, text in (("title", "Jane Marple effusion"), ("history", "Mrs Marple, 54"),
                        ("findings", "H31337: large effusion")):
        fields = {"title": "Effusion", field: text}
        with pytest.raises(ImageShareError, match=f"the {field} names the patient") as refused:
            archive.teaching.update(case, AUTHOR, CaseFields(**fields))
        assert "Marple" not in str(refused.value) and "H31337" not in str(refused.value)
    kept = archive.teaching.get(case.public_id)
    assert (kept.title, kept.history, kept.findings) == ("Effusion", "", "")
    # Clinical words are still saved.
    archive.teaching.update(case, AUTHOR, CaseFields(title="Effusion",
                                                     history="Breathless, long axis view"))
    assert archive.teaching.get(case.public_id).history == "Breathless, long axis view"


def test_marks_whose_words_name_the_patient_are_not_carried_into_the_case(archive, source):
    """Marks drawn on the patient's images were copied into the de-identified case as they
    were, a text mark "Mrs Marple" included."""
    uid, sop = source.study_uid, source.sop_instance_uid
    archive.annotations.save(uid, sop, 1, [
        {"kind": "text", "points": [[5, 5]], "label": "Mrs Marple"}], SYSTEM, "clin", None,
        author_key="clin")
    archive.annotations.save(uid, sop, 2, [
        {"kind": "arrow", "points": [[10, 10], [40, 40]], "label": "effusion"}], SYSTEM,
        "edu", None, author_key="edu")
    case = archive.teaching.create(AUTHOR, CaseFields(title="Effusion"), uid)
    (copy_uid,) = archive.teaching.studies(case)
    marks = archive.teaching.marks(case, copy_uid)
    labels = [m["label"] for frame in marks.values() for m in frame]
    assert labels == ["effusion"]


def test_an_attachment_is_never_titled_by_its_file_name(archive, source, author):
    """An attachment without a typed title was titled by the uploaded file's name, which
    often carries the patient's ("Marple_Jane_H31337_histology.png"), on the case page and
    in presentation mode."""
    case = archive.teaching.create(AUTHOR, CaseFields(title="Effusion"), source.study_uid)
    token = _csrf(author.get(case.path, headers=HTML).text)
    sent = author.post(case.path + "/files", headers=HTML, data={"csrf_token": token},
                       files={"file": ("Marple_Jane_H31337_histology.png", _png(),
                                       "image/png")})
    assert sent.status_code == 200, sent.text
    (kept,) = archive.teaching.attachments(case)
    assert kept.title == "Image attachment"
    shown = author.get(case.path, headers=HTML).text
    assert "Marple" not in shown and "H31337" not in shown
    # A typed title naming the patient is refused, nothing kept.
    refused = author.post(case.path + "/files", headers=HTML,
                          data={"csrf_token": token, "title": "Jane Marple histology"},
                          files={"file": ("a.png", _png(), "image/png")})
    assert refused.status_code == 400 and "names the patient" in refused.text
    assert "Marple" not in refused.text
    assert len(archive.teaching.attachments(case)) == 1


def test_adding_a_study_whose_patient_the_case_text_names_is_refused(archive, source,
                                                                      tmp_path):
    """The words were checked against the first study's patient only: a second study added
    later could be of the very patient the title names."""
    other = archive.ingest.store_copy(us_cine(tmp_path / "o", frames=2, patient_id="H4242",
                                              patient_name="Poirot^Hercule"), SYSTEM)
    case = archive.teaching.create(AUTHOR, CaseFields(title="Hercule Poirot follow-up"),
                                   source.study_uid)
    with pytest.raises(ImageShareError, match="the title names the patient"):
        archive.teaching.add_study(case, AUTHOR, other.study_uid)
    assert len(archive.teaching.studies(case)) == 1


# -- consent withdrawn after the case was made ---------------------------------------------------


def test_a_case_whose_patient_withdrew_teaching_consent_is_no_longer_shown(
        archive, source, author, colleague):
    """Withdrawal stopped new cases being made; the case already made stayed in the library,
    was shown, presented and shared."""
    case = archive.teaching.create(AUTHOR, CaseFields(title="Effusion", collection="MDT"),
                                   source.study_uid)
    archive.teaching.attach(case, AUTHOR, io.BytesIO(_png()), len(_png()), "Histology")
    (file_id,) = [a.public_id for a in archive.teaching.attachments(case)]
    assert colleague.get(case.path, headers=HTML).status_code == 200
    archive.consents.record_decision(source.study_uid, "teaching", "withdrawn",
                                     date.today().isoformat(), "form", SYSTEM)
    for path in (case.path, case.path + "/present", case.path + "/viewer",
                 f"{case.path}/files/{file_id}"):
        assert colleague.get(path, headers=HTML).status_code == 403, path
    token = _csrf(colleague.get("/teaching", headers=HTML).text)
    assert case.path not in colleague.get("/teaching", headers=HTML).text
    shared = colleague.post(case.path + "/share", headers=HTML,
                            data={"csrf_token": token, "form_key": "k1"})
    assert shared.status_code == 403
    with pytest.raises(Forbidden):
        archive.teaching.record_view(case, Actor("user", "edu2", "educator", "10.0.0.2"))
    refusals = list(archive.audit.events("consent.refused"))
    assert refusals and all(e["detail"]["purpose"] == "teaching" for e in refusals)
    # Its author sees why, and only the button to delete it.
    page = author.get(case.path, headers=HTML)
    assert page.status_code == 200 and "withdrawn" in page.text
    assert "/viewer" not in page.text and "/files/" not in page.text
    deleted = author.post(case.path + "/delete", headers=HTML,
                          data={"csrf_token": _csrf(page.text)}, follow_redirects=False)
    assert deleted.status_code == 303
    assert archive.teaching.search() == []


# -- two tabs ----------------------------------------------------------------------------------


def test_an_edit_from_a_page_opened_before_another_edit_does_not_overwrite_it(
        archive, source, author):
    """Two tabs (or a laptop and the meeting-room PC) with the edit form: the second save
    silently threw away the first one's findings."""
    case = archive.teaching.create(AUTHOR, CaseFields(title="Effusion"), source.study_uid)
    page = author.get(case.path, headers=HTML).text
    shown = re.search(r'name="version" value="([^"]+)"', page)
    assert shown is not None
    version = shown.group(1)
    form = {"csrf_token": _csrf(page), "version": version, "title": "Effusion"}
    first = author.post(case.path, headers=HTML, follow_redirects=False,
                        data={**form, "findings": "Large effusion, RV collapse"})
    assert first.status_code == 303
    second = author.post(case.path, headers=HTML, data={**form, "history": "Breathless"})
    assert second.status_code == 400 and "changed since" in second.text
    kept = archive.teaching.get(case.path.rsplit("/", 1)[1])
    assert (kept.findings, kept.history) == ("Large effusion, RV collapse", "")
    bad = author.post(case.path, headers=HTML, data={**form, "version": "yesterday"})
    assert bad.status_code == 400 and "version" in bad.text


# -- my cases ----------------------------------------------------------------------------------


def test_a_new_case_is_the_one_made_not_another_made_at_the_same_moment(archive, source):
    """CaseBook.create answered the owner's newest case: a case inserted by a second request
    between its insert and its read (PostgreSQL, read committed) was returned instead, and the
    first request's studies were put into the second's case."""
    engine = archive.engine
    done: list[bool] = []

    def another(conn, _cursor, statement, *_args) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO CASES") and not done:
            done.append(True)
            conn.execute(insert(cases_table).values(
                public_id="0000000000000000", owner="edu", title="Other tab", description="",
                folder="", kind="case", created_at=datetime.now(UTC), updated_at=datetime.now(UTC)))

    event.listen(engine, "after_cursor_execute", another)
    try:
        made = archive.cases.create(AUTHOR, "Mine")
    finally:
        event.remove(engine, "after_cursor_execute", another)
    assert made.title == "Mine"


def test_renaming_or_describing_a_case_is_audited_and_over_long_text_refused(archive, source):
    """A case's title and description (clinical words about the patient's studies) changed
    with no trace, and a description over 10,000 characters was cut short unseen."""
    case = archive.cases.create(AUTHOR, "Echo")
    archive.cases.update(case, "Echo, follow-up", "Pericardial effusion", "", AUTHOR)
    (changed,) = archive.audit.events("case.update")
    assert changed["actor"] == "user:edu"
    assert changed["detail"] == {"case": case.public_id, "fields": ["description", "title"]}
    with pytest.raises(ImageShareError, match="description may have at most 10,000"):
        archive.cases.update(case, "Echo", "d" * 10_001, "", AUTHOR)
    assert archive.cases.get(case.public_id, "edu").description == "Pericardial effusion"


def test_copies_stored_before_a_failed_copy_are_audited(archive, source, monkeypatch,
                                                       tmp_path):
    """An error half-way through copying a study left de-identified copies of the patient's
    images in the archive with no audit event saying they were read and copied."""
    from imageshare.archive.ingest import IngestService

    archive.ingest.store_copy(us_cine(tmp_path / "second", frames=2, patient_id="H31337",
                                      patient_name="Marple^Jane", study_uid=source.study_uid),
                              SYSTEM)

    stored: list = []
    real = IngestService.store_stream

    def fails_second(self, stream, actor):
        if stored:
            raise OSError("disk full")
        stored.append(real(self, stream, actor))
        return stored[-1]

    monkeypatch.setattr(IngestService, "store_stream", fails_second)
    with pytest.raises(OSError):
        archive.teaching.create(AUTHOR, CaseFields(title="Effusion"), source.study_uid,
                                series_uids=())
    (made,) = archive.audit.events("teaching.create")
    assert made["outcome"] == "failure" and made["detail"]["copied"] == 1
    assert made["study_uid"] == source.study_uid


def test_the_copies_made_from_a_patients_studies_are_found_for_consent_withdrawal(
        archive, source, tmp_path):
    other = archive.ingest.store_copy(us_cine(tmp_path / "o", frames=2, patient_id="H4242",
                                              patient_name="Poirot^Hercule"), SYSTEM)
    mine = archive.teaching.create(AUTHOR, CaseFields(title="Effusion"), source.study_uid)
    theirs = archive.teaching.create(AUTHOR, CaseFields(title="Other"), other.study_uid)
    assert archive.teaching.copies_from([source.study_uid]) == archive.teaching.studies(mine)
    archive.teaching.delete(theirs, AUTHOR)
    assert archive.teaching.copies_from([other.study_uid]) == []


def test_the_library_is_paged_so_no_case_is_out_of_reach(archive, source, author,
                                                         monkeypatch):
    """The library and its search showed the first 200 cases and nothing said there were
    more: case 201 could not be found by browsing."""
    from imageshare.web.pages import teaching as pages

    monkeypatch.setattr(pages, "PAGE_SIZE", 2)
    now = datetime.now(UTC)
    with archive.engine.begin() as conn:
        for n in range(5):  # one title twice: pages must neither repeat nor skip a case
            conn.execute(insert(cases_table).values(
                public_id=f"{n:016x}", owner="edu", title=f"Case {min(n, 3)}", description="",
                kind="teaching", created_at=now, updated_at=now))
    seen = []
    listing = author.get("/teaching", headers=HTML).text
    for number in range(1, 4):
        seen += re.findall(r'href="/teaching/([0-9a-f]{16})"', listing)
        if number < 3:
            assert "Next page" in listing
            listing = author.post("/teaching", headers=HTML, data={
                "csrf_token": _csrf(listing), "q": "case", "page": str(number + 1)}).text
    assert "Next page" not in listing and "Previous page" in listing
    assert sorted(seen) == [f"{n:016x}" for n in range(5)]
    assert author.get("/teaching?page=0", headers=HTML).status_code == 400


def _pptx(*extra: str) -> bytes:
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as package:
        package.writestr("[Content_Types].xml", "<Types/>")
        package.writestr("ppt/presentation.xml", "<p:presentation/>")
        for name in extra:
            package.writestr(name, b"\x00macro")
    return out.getvalue()


@pytest.mark.parametrize("content, reason", [
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 600, "legacy Office files"),
    (_pptx("ppt/vbaProject.bin"), "macros"),
])
def test_documents_that_cannot_be_cleaned_or_carry_macros_are_not_attached(archive, source,
                                                                          content, reason):
    """A legacy .ppt or .doc was kept with its title, subject, author and comments (which
    may name the patient), and a macro-enabled deck was handed to every learner."""
    case = archive.teaching.create(AUTHOR, CaseFields(title="Effusion"), source.study_uid)
    with pytest.raises(ImageShareError, match=reason):
        archive.teaching.attach(case, AUTHOR, io.BytesIO(content), len(content), "Slides")
    assert archive.teaching.attachments(case) == []
    plain = _pptx()
    archive.teaching.attach(case, AUTHOR, io.BytesIO(plain), len(plain), "Slides")
    assert [a.kind for a in archive.teaching.attachments(case)] == ["document"]


def test_the_author_is_told_how_many_images_were_held_back(archive, source, author,
                                                           tmp_path):
    """Images held back by de-identification (burned-in names) were silently missing from
    the case: its author could not tell the key image had been left out, nor why."""
    from imageshare.deid.service import Outcome

    archive.ingest.store_copy(us_cine(tmp_path / "second", frames=2, patient_id="H31337",
                                      patient_name="Marple^Jane", study_uid=source.study_uid),
                              SYSTEM)
    made = archive.teaching._deidentifier

    def holds_back_the_first(profile: str):
        deidentifier = made(profile)
        real = deidentifier.write
        calls: list[int] = []

        def write(source_file, target, prepare=None):
            calls.append(1)
            if len(calls) == 1:
                return Outcome(None, {"held_back": True, "reason": "burned-in text"})
            return real(source_file, target, prepare)

        deidentifier.write = write
        return deidentifier

    archive.teaching._deidentifier = holds_back_the_first
    case = archive.teaching.create(AUTHOR, CaseFields(title="Effusion"), source.study_uid)
    shown = author.get(case.path, headers=HTML).text
    assert "1 image of the study was held back" in shown


def test_links_to_a_teaching_case_end_when_its_patient_withdraws_teaching_consent(
        archive, source):
    """The case is no longer shown, and the links already made of it end too (audited with
    the reason), not only the patient's identifiable shares."""
    from imageshare.sharing.links import NewShare

    case = archive.teaching.create(AUTHOR, CaseFields(title="Effusion"), source.study_uid)
    (copy,) = archive.teaching.studies(case)
    link = archive.shares.create(NewShare(copy, days=14), AUTHOR, None)
    archive.consents.record_decision(source.study_uid, "teaching", "withdrawn",
                                     date.today().isoformat(), "form", SYSTEM)
    assert archive.shares.by_public_id(link.public_id, AUTHOR.name).revoked_at is not None
    [ended] = [e for e in archive.audit.events("share.revoke")
               if e["detail"]["share"] == link.public_id]
    assert ended["detail"]["reason"] == "the patient's consent to teaching use was withdrawn"
