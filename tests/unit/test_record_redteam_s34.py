"""Red team of the patient record's editing side (session 34): a correction never rewrites
another patient's record behind its back, two corrections at once never lose one half-way,
values a DICOM header cannot hold are refused, comments and attachments refuse what would
break or mislead, a document is saved rather than opened, and a study still in the inbox is
reviewed there, not corrected, commented or attached to from the study page."""

from __future__ import annotations

import re
import struct
import zlib

import pytest
from pydicom import dcmread

from imageshare.archive.corrections import PatientDetails
from imageshare.archive.search import StudySearch
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError
from tests.factory import ct_series, us_cine

STAFF = Actor("user", "sono", "sonographer", "127.0.0.1")
OTHER_SITE = Actor("user", "rxh", "site", "192.0.2.7")
NHS = "9434765919"
OTHER_NHS = "9434765870"
PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
HTML = {"Accept": "text/html"}
PASSWORD = "a-long-password"


def store(archive, paths, actor=STAFF):
    return [archive.ingest.store_copy(p, actor) for p in paths][0].study_uid


def headers_of(archive, study_uid):
    found = archive.retrieve.select(STAFF, "study.retrieve", study_uids=[study_uid])
    out = []
    for inst in found:
        with archive.retrieve.open(inst) as fp:
            out.append(dcmread(fp, stop_before_pixels=True))
    return out


def nhs_in(header) -> str:
    return next((str(i.PatientID) for i in header.get("OtherPatientIDsSequence", [])
                 if str(i.get("IssuerOfPatientID", "")) == "NHS"), "")


@pytest.fixture
def smith(archive, tmp_path):
    """Ann Smith's record (H1, born 1970-01-01, female, NHS number) with a CT study."""
    from pydicom import Dataset

    item = Dataset()
    item.PatientID, item.IssuerOfPatientID = NHS, "NHS"
    return store(archive, ct_series(tmp_path / "h1", 2, patient_id="H1",
                                    patient_name="Smith^Ann", PatientBirthDate="19700101",
                                    PatientSex="F", OtherPatientIDsSequence=[item]))


@pytest.fixture
def emergency(archive, tmp_path):
    """An emergency ultrasound filed under a temporary identity."""
    return store(archive, [us_cine(tmp_path / "us", frames=2, patient_id="EMERG9",
                                   patient_name="Unknown^Female")])


# -- corrections onto an existing record -------------------------------------------------------


def test_filing_a_study_under_an_existing_record_leaves_that_record_and_its_headers_alone(
        archive, smith, emergency):
    """The form was filled in without the record's sex and NHS number: the study takes the
    record's details; the record keeps its NHS number and sex, and the index keeps agreeing
    with the headers of the record's other studies."""
    archive.corrections.correct_study(
        emergency, PatientDetails("SMITH^ANN", "H1", birth_date="1970-01-01"),
        "identified", STAFF)
    for uid in (smith, emergency):
        patient = archive.catalogue.record(uid).patient
        assert (patient.name, patient.sex, patient.nhs_number) == ("Smith^Ann", "F", NHS)
        for header in headers_of(archive, uid):
            assert (str(header.PatientName), header.PatientSex, nhs_in(header)) == (
                "Smith^Ann", "F", NHS)
    page = archive.search.search(StudySearch(nhs_number=NHS), STAFF, None)
    assert sorted(s.study_uid for s in page.studies) == sorted([smith, emergency])
    changed = {c.attribute: c.new_value for c in archive.corrections.history(emergency)}
    assert changed["NHS number"] == NHS and changed["Sex"] == "F"
    assert archive.corrections.history(smith) == []


def test_filing_under_an_existing_record_with_another_nhs_number_or_sex_is_refused(
        archive, smith, emergency):
    for details in (PatientDetails("Smith^Ann", "H1", nhs_number=OTHER_NHS,
                                   birth_date="19700101"),
                    PatientDetails("Smith^Ann", "H1", birth_date="19700101", sex="M")):
        with pytest.raises(ImageShareError, match="another (NHS number|sex)"):
            archive.corrections.correct_study(emergency, details, "identified", STAFF)
    assert archive.catalogue.record(emergency).patient.patient_id == "EMERG9"
    assert archive.catalogue.record(smith).patient.nhs_number == NHS


def test_an_nhs_number_given_to_a_record_that_lacked_one_reaches_all_its_studies(
        archive, tmp_path, emergency):
    """Filing a study under a record and giving it the NHS number it lacked rewrites the
    record's other studies too (their headers would otherwise disagree with the index), and
    their history says so."""
    jones = store(archive, ct_series(tmp_path / "h2", 2, patient_id="H2",
                                     patient_name="Jones^Bob", PatientBirthDate="19600505"))
    archive.corrections.correct_study(
        emergency, PatientDetails("Jones^Bob", "H2", nhs_number=NHS, birth_date="19600505"),
        "identified", STAFF)
    for uid in (jones, emergency):
        assert archive.catalogue.record(uid).patient.nhs_number == NHS
        assert all(nhs_in(h) == NHS for h in headers_of(archive, uid))
    assert [(c.attribute, c.old_value, c.new_value)
            for c in archive.corrections.history(jones)] == [("NHS number", "", NHS)]


def test_records_with_different_nhs_numbers_are_not_merged(archive, tmp_path, smith):
    from pydicom import Dataset

    item = Dataset()
    item.PatientID, item.IssuerOfPatientID = OTHER_NHS, "NHS"
    other = store(archive, ct_series(tmp_path / "h3", 1, patient_id="H3",
                                     patient_name="Smith^Anne", OtherPatientIDsSequence=[item]))
    with pytest.raises(ImageShareError, match="different NHS numbers"):
        archive.corrections.merge(other, "H1", "", "same person?", STAFF)
    assert archive.catalogue.record(other).patient.patient_id == "H3"


# -- values a header cannot hold ----------------------------------------------------------------


@pytest.mark.parametrize("details", [
    PatientDetails("Doe\\Jane", "H9"),             # a backslash makes two names
    PatientDetails("Doe^Jane", "H9\\H10"),
    PatientDetails("Doe^Jane\r\nX", "H9"),         # control characters
    PatientDetails("Doe^Jane", "H9", issuer="TRUST\x00"),
    PatientDetails("Doe^Jane", "H9", issuer="I" * 65),
    PatientDetails("D" * 65 + "^Jane", "H9"),      # a component group over 64 characters
    PatientDetails("A^B^C^D^E^F", "H9"),           # more than five components
])
def test_patient_details_a_dicom_header_cannot_hold_are_refused(
        archive, emergency, details):
    with pytest.raises(ImageShareError):
        archive.corrections.correct_study(emergency, details, "identified", STAFF)
    assert [str(h.PatientName) for h in headers_of(archive, emergency)] == ["Unknown^Female"]


def test_a_reason_with_a_nul_is_refused(archive, emergency):
    with pytest.raises(ImageShareError, match="control characters"):
        archive.corrections.correct_study(emergency, PatientDetails("Doe^Jane", "H9"),
                                          "identified\x00", STAFF)


# -- two corrections at once --------------------------------------------------------------------


def test_a_correction_made_meanwhile_by_someone_else_is_not_overwritten_half_way(
        archive, emergency):
    """While one correction rewrites the images, another one of the same study commits: the
    first is refused (its rewritten blobs removed) instead of putting its blobs in place of
    the other's, leaving the other's blobs orphaned in the store and its own history naming
    old values that were no longer there."""
    corrections = archive.corrections
    rewrite = corrections._rewrite
    raced: list[str] = []

    def racing(key, details):
        result = rewrite(key, details)
        if not raced:
            raced.append("racing")
            corrections.correct_study(emergency, PatientDetails("Brown^Eve", "H20"),
                                      "identified by ward", STAFF)
        return result

    corrections._rewrite = racing
    with pytest.raises(ImageShareError, match="changed by someone else"):
        corrections.correct_study(emergency, PatientDetails("Green^Amy", "H21"),
                                  "identified in ED", STAFF)
    assert raced
    assert len(list(archive.blobs.keys())) == 1  # the study's one instance, nothing orphaned
    assert [(str(h.PatientName), h.PatientID) for h in headers_of(archive, emergency)] == [
        ("Brown^Eve", "H20")]
    assert archive.catalogue.record(emergency).patient.patient_id == "H20"
    assert {c.new_value for c in corrections.history(emergency)
            if c.attribute == "Hospital number"} == {"H20"}


# -- comments and attachments -------------------------------------------------------------------


def test_a_comment_with_control_characters_is_refused(any_archive, tmp_path):
    """A NUL made PostgreSQL fail the insert (a server error, not a refusal with a
    reason); none is stored on either database."""
    study = store(any_archive, [us_cine(tmp_path / "us", frames=2, patient_id="EMERG9")])
    with pytest.raises(ImageShareError, match="control characters"):
        any_archive.comments.add(study, "EMERG9", "fine\x00<script>", STAFF)
    any_archive.comments.add(study, "EMERG9", "line one\nline two\ttabbed", STAFF)
    assert [c.body for c in any_archive.comments.for_study(study)] == [
        "line one\nline two\ttabbed"]


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


def test_a_photo_claiming_hundreds_of_millions_of_pixels_is_refused_with_a_reason(
        archive, emergency):
    with pytest.raises(ImageShareError, match="too many pixels"):
        archive.attachments.attach(emergency, "bomb.png", _png_header_only(30000, 30000),
                                   "", STAFF)


def test_a_document_title_taken_from_a_file_name_drops_folders_and_control_characters(
        archive, emergency):
    stored = archive.attachments.attach(emergency, "C:\\fakepath\\ward\\Discharge.pdf", PDF,
                                        "", STAFF)
    typed = archive.attachments.attach(emergency, "x.pdf", PDF, "Letter\r\nInjected: yes",
                                       STAFF)
    titles = {}
    for result in (stored, typed):
        inst = archive.retrieve.select(STAFF, "study.retrieve",
                                       sop_uids=[result.sop_instance_uid])[0]
        with archive.retrieve.open(inst) as fp:
            titles[result.sop_instance_uid] = str(dcmread(fp).DocumentTitle)
    assert titles == {stored.sop_instance_uid: "Discharge",
                      typed.sop_instance_uid: "Letter Injected: yes"}


# -- the pages ----------------------------------------------------------------------------------


def _csrf(html: str) -> str:
    return re.search(r'name="csrf-token" content="([^"]*)"', html).group(1)


@pytest.fixture
def browser(archive, anonymous):
    archive.users.add("sono", PASSWORD, "sonographer")
    assert anonymous.post("/login", data={"username": "sono", "password": PASSWORD},
                          headers=HTML, follow_redirects=False).status_code == 303
    return anonymous


def test_an_attached_pdf_is_saved_not_opened_in_the_archives_origin(
        archive, browser, emergency):
    report = archive.attachments.attach(emergency, "r.pdf", PDF, "Report", STAFF)
    got = browser.get(f"/studies/{emergency}/documents/{report.sop_instance_uid}")
    assert got.status_code == 200 and got.content == PDF
    assert got.headers["content-disposition"].startswith("attachment")
    assert got.headers["x-content-type-options"] == "nosniff"


def test_a_study_waiting_in_the_inbox_is_not_corrected_commented_or_attached_to_from_its_page(
        archive, browser, emergency, tmp_path):
    """The inbox reviews what another site sent (reconciling its patient there); the study
    page's forms, posted by hand, do not bypass that review (a guard: the permission
    dependency keeps these routes to studies in the record)."""
    arrived = store(archive, [us_cine(tmp_path / "in", frames=2, patient_id="RXH77",
                                      patient_name="Sent^ByThem")], OTHER_SITE)
    assert not archive.catalogue.in_record(arrived)
    csrf = _csrf(browser.get(f"/studies/{emergency}", headers=HTML).text)
    answers = [
        browser.post(f"/studies/{arrived}/patient", headers=HTML, data={
            "csrf_token": csrf, "family": "Smith", "given": "Ann", "patient_id": "H1",
            "reason": "reconciled by hand"}),
        browser.post(f"/studies/{arrived}/merge", headers=HTML, data={
            "csrf_token": csrf, "target_patient_id": "EMERG9", "reason": "same"}),
        browser.post(f"/studies/{arrived}/comments", headers=HTML,
                     data={"csrf_token": csrf, "body": "seen"}),
        browser.post(f"/studies/{arrived}/documents", headers=HTML, data={"csrf_token": csrf},
                     files={"file": ("r.pdf", PDF, "application/pdf")}),
    ]
    assert [a.status_code for a in answers] == [404] * 4
    record = archive.catalogue.record(arrived)
    assert record.patient.patient_id == "RXH77"
    assert not [s for s in record.series if s.is_documents]
    assert archive.comments.for_study(arrived) == []


def test_an_attachment_over_the_limit_is_refused_before_it_is_read(
        archive, browser, emergency, monkeypatch):
    monkeypatch.setattr("imageshare.web.pages.studies.MAX_ATTACHMENT", 16)
    csrf = _csrf(browser.get(f"/studies/{emergency}", headers=HTML).text)
    answer = browser.post(f"/studies/{emergency}/documents", headers=HTML,
                          data={"csrf_token": csrf},
                          files={"file": ("r.pdf", PDF, "application/pdf")})
    assert answer.status_code == 413
    assert not [s for s in archive.catalogue.record(emergency).series if s.is_documents]


def test_after_a_correction_qido_and_wado_metadata_show_only_the_corrected_identity(
        archive, client, emergency):
    archive.corrections.correct_study(emergency, PatientDetails("Brown^Eve", "H20",
                                                                nhs_number=NHS), "found", STAFF)
    found = client.get("/dicomweb/studies", params={"PatientID": "H20"}).json()
    assert [s["0020000D"]["Value"][0] for s in found] == [emergency]
    assert found[0]["00100010"]["Value"][0]["Alphabetic"] == "Brown^Eve"
    assert client.get("/dicomweb/studies", params={"PatientID": "EMERG9"}).content in (
        b"", b"[]")
    for level in (f"/dicomweb/studies/{emergency}/metadata",):
        meta = client.get(level).json()
        assert {m["00100020"]["Value"][0] for m in meta} == {"H20"}
        assert {m["00100010"]["Value"][0]["Alphabetic"] for m in meta} == {"Brown^Eve"}
    series = client.get(f"/dicomweb/studies/{emergency}/series").json()
    assert series and "Unknown" not in str(series)


@pytest.mark.parametrize("mark", [
    {"kind": "text", "points": "12", "label": "x"},                  # digits, not a point
    {"kind": "arrow", "points": [["1", "2"], ["30", "40"]]},         # strings, not numbers
    {"kind": "arrow", "points": [[True, 2], [30, 40]]},
    {"kind": "text", "points": [[5, 5]], "label": {"a": 1}},         # not text
    {"kind": "text", "points": [[5, 5]], "label": "a\x00b"},         # a NUL (PostgreSQL)
    {"kind": "text", "points": [[5, 5]], "label": "x" * 65},         # not cut silently
])
def test_a_malformed_mark_is_refused_not_guessed(archive, emergency, mark):
    sop = archive.catalogue.record(emergency).series[0].instances[0].sop_uid
    with pytest.raises(ImageShareError):
        archive.annotations.save(emergency, sop, 1, [mark], STAFF, "sono", None)
    assert archive.annotations.for_study(emergency) == {}


def test_rewritten_images_of_a_correction_cut_short_by_a_crash_are_not_indexed_at_restart(
        archive, tmp_path, monkeypatch):
    """A power loss after the rewritten images are stored and before the commit leaves them
    in the store; start-up recovery, which indexes every blob the index does not know, must
    not put half a correction (one image with the new name, no history, no audit) in place
    of the stored image (a guard: recovery refuses such a copy today)."""
    from imageshare.app import recover

    study = store(archive, ct_series(tmp_path / "c", 1, patient_id="H30",
                                     patient_name="Smyth^Jo"))
    before = {str(h.SOPInstanceUID): str(h.PatientName) for h in headers_of(archive, study)}
    keys = set(archive.blobs.keys())

    class PowerLoss(Exception):
        """Stands for the process dying before the commit: nothing after it runs."""

    def power_loss(*_args, **_kwargs):
        raise PowerLoss

    monkeypatch.setattr(archive.corrections, "_commit", power_loss)
    monkeypatch.setattr(archive.blobs, "delete", lambda _key: None)  # no clean-up either
    with pytest.raises(PowerLoss):
        archive.corrections.correct_study(study, PatientDetails("Smith^Jo", "H30"), "typo",
                                          STAFF)
    monkeypatch.undo()
    assert set(archive.blobs.keys()) > keys  # the crash left the rewritten image behind
    recover(archive)
    assert {str(h.SOPInstanceUID): str(h.PatientName)
            for h in headers_of(archive, study)} == before
    assert set(archive.blobs.keys()) == keys
    assert archive.catalogue.record(study).patient.name == "Smyth^Jo"


def test_an_nhs_number_already_on_another_patients_record_is_not_given_to_a_second_one(
        archive, smith, emergency):
    """Two records with one NHS number would be found, shared and sent as one person."""
    with pytest.raises(ImageShareError, match="already on the record with hospital number H1"):
        archive.corrections.correct_study(
            emergency, PatientDetails("Doe^Jane", "H9", nhs_number=NHS), "identified", STAFF)
    assert archive.catalogue.record(emergency).patient.nhs_number == ""
    # filing the study under the record that holds the number is the way
    archive.corrections.correct_study(
        emergency, PatientDetails("Smith^Ann", "H1", nhs_number=NHS, birth_date="19700101"),
        "identified", STAFF)
    assert archive.catalogue.record(emergency).patient.patient_id == "H1"


@pytest.mark.parametrize("content", [
    PDF[: len(PDF) // 2],                                           # cut short in transit
    b"%PDF-1.4\n<html><script>alert(document.domain)</script></html>",  # HTML behind a header
])
def test_a_pdf_without_its_end_of_file_marker_is_refused(archive, emergency, content):
    with pytest.raises(ImageShareError, match="incomplete"):
        archive.attachments.attach(emergency, "report.pdf", content, "Report", STAFF)
    assert not [s for s in archive.catalogue.record(emergency).series if s.is_documents]


def test_a_correction_to_a_name_with_accents_keeps_the_other_texts_of_a_latin1_header(
        archive, tmp_path):
    """A header in ISO_IR 100 (Latin-1) gets a name with letters beyond ASCII: its character
    set becomes UTF-8, so its other texts are written again in UTF-8, not left as Latin-1
    bytes under a UTF-8 label (read back as mojibake or refused)."""
    study = store(archive, ct_series(tmp_path / "l1", 1, patient_id="H40",
                                     patient_name="Unknown^Male", SpecificCharacterSet="ISO_IR 100",
                                     StudyDescription="Tête", InstitutionName="Hôpital Général",
                                     PatientComments="allergie: pénicilline"))
    archive.corrections.correct_study(study, PatientDetails("Müller^Jürgen", "H40"),
                                      "identified", STAFF)
    header, = headers_of(archive, study)
    assert str(header.PatientName) == "Müller^Jürgen"
    assert (header.StudyDescription, header.InstitutionName, header.PatientComments) == (
        "Tête", "Hôpital Général", "allergie: pénicilline")
    meta = archive.catalogue.record(study)
    assert meta.description == "Tête"


def test_two_studies_filed_at_once_under_one_new_number_with_different_names_do_not_merge(
        archive, tmp_path, emergency):
    """Both corrections found no record H50 and so checked nothing; the one committing
    second is refused instead of renaming the record the first one made (whose images would
    then disagree with the index)."""
    other = store(archive, ct_series(tmp_path / "o", 1, patient_id="EMERG10",
                                     patient_name="Unknown^Male"))
    corrections = archive.corrections
    rewrite = corrections._rewrite
    raced: list[str] = []

    def racing(key, details):
        result = rewrite(key, details)
        if not raced:
            raced.append("racing")
            corrections.correct_study(other, PatientDetails("Black^Tom", "H50"), "found",
                                      STAFF)
        return result

    corrections._rewrite = racing
    with pytest.raises(ImageShareError, match="made or changed meanwhile"):
        corrections.correct_study(emergency, PatientDetails("White^Sue", "H50"), "found",
                                  STAFF)
    assert archive.catalogue.record(other).patient.name == "Black^Tom"
    assert [str(h.PatientName) for h in headers_of(archive, other)] == ["Black^Tom"]
    assert archive.catalogue.record(emergency).patient.patient_id == "EMERG9"
    assert len(list(archive.blobs.keys())) == 2
