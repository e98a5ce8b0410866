"""The teaching library: a teaching case is a de-identified, verified copy made when it is
created (no patient identifier on any of its pages), with its own words, non-DICOM files of
every kind told by their content, search, a stable address, presentation mode, and the marks
drawn on the images carried into the copy."""

from __future__ import annotations

import io
import re
import shutil
import zipfile

import av
import numpy as np
import pytest
from PIL import Image

from imageshare.domain.actors import Actor
from tests.conftest import require
from tests.factory import us_cine

HTML = {"Accept": "text/html"}
PASSWORD = "a-long-password"
SYSTEM = Actor("system", "tests", "admin", "tests")
# What identifies the source patient (tests/factory.py writes the accession and birth date).
IDENTIFIERS = ("Marple", "Jane", "H31337", "ACC001", "19700101", "1970-01-01")


@pytest.fixture(autouse=True)
def _tesseract():
    require(shutil.which("tesseract") is not None, "Tesseract OCR (Debian package tesseract-ocr)")


def csrf(text: str) -> str:
    return re.search(r'name="csrf-token" content="([^"]+)"', text).group(1)


def pdf_bytes(**info: str) -> bytes:
    from pypdf import PdfWriter

    writer = PdfWriter()
    writer.add_blank_page(200, 100)
    if info:
        writer.add_metadata({f"/{k}": v for k, v in info.items()})
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def png_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def mp4_bytes() -> bytes:
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 40, np.uint8),
                                               format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def pptx_bytes(core: str = "") -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as package:
        package.writestr("[Content_Types].xml", "<Types/>")
        package.writestr("ppt/presentation.xml", "<p:presentation/>")
        if core:
            package.writestr("docProps/core.xml", core)
    return out.getvalue()


def parts(content: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(content)) as package:
        return {name: package.read(name) for name in package.namelist()}


@pytest.fixture
def educator(archive, anonymous, tmp_path):
    """An educator, signed in, and a colour ultrasound study with a mark drawn on it."""
    archive.users.add("edu", PASSWORD, "educator")
    stored = archive.ingest.store_copy(us_cine(tmp_path / "us", frames=4, patient_id="H31337",
                                               patient_name="Marple^Jane"), SYSTEM)
    archive.annotations.save(stored.study_uid, stored.sop_instance_uid, 2, [
        {"kind": "arrow", "points": [[10, 10], [40, 40]], "label": "effusion"}],
        SYSTEM, "edu", None, author_key="edu")
    anonymous.post("/login", data={"username": "edu", "password": PASSWORD}, headers=HTML)
    anonymous.source = stored
    return anonymous


def make_case(educator, **fields):
    page = educator.get(f"/studies/{educator.source.study_uid}", headers=HTML)
    assert 'action="/studies/' in page.text and "Make a teaching case" in page.text
    made = educator.post(f"/studies/{educator.source.study_uid}/teaching", headers=HTML,
                         follow_redirects=False, data={
                             "csrf_token": csrf(page.text), "title": "Pericardial effusion",
                             "modality": "US", "body_part": "heart", "collection": "MDT June",
                             "history": "Breathless, hypotensive.",
                             "diagnosis": "Pericardial effusion with tamponade", **fields})
    assert made.status_code == 303, made.text
    return made.headers["location"].split("?")[0]


def test_a_teaching_case_is_a_verified_de_identified_copy_with_no_identifier_on_its_pages(
        archive, educator):
    path = make_case(educator)
    assert re.fullmatch(r"/teaching/[0-9a-f]{16}", path)
    case = archive.teaching.get(path.rsplit("/", 1)[1])
    (copy_uid,) = archive.teaching.studies(case)
    assert copy_uid != educator.source.study_uid
    copy = archive.catalogue.record(copy_uid)
    assert copy.patient.patient_id != "H31337" and "Marple" not in str(copy.patient.name)
    (event,) = archive.audit.events("teaching.create")
    # the clip and the presentation state of its mark
    assert event["detail"]["profile"] == "teaching" and event["detail"]["copied"] == 2
    assert event["detail"]["held_back"] == 0
    pages = [educator.get(p, headers=HTML) for p in (
        path, f"{path}/viewer", f"{path}/present", "/teaching")]
    for shown in pages:
        assert shown.status_code == 200
        for identifier in IDENTIFIERS + (educator.source.study_uid,
                                         educator.source.sop_instance_uid):
            assert identifier not in shown.text, (shown.url, identifier)
    assert "Pericardial effusion with tamponade" in pages[0].text


def test_marks_drawn_on_the_images_are_carried_into_the_copy(archive, educator):
    case = archive.teaching.get(make_case(educator).rsplit("/", 1)[1])
    (copy_uid,) = archive.teaching.studies(case)
    marks = archive.annotations.for_study(copy_uid)
    ((key, shown),) = marks.items()
    assert key.endswith("|2") and shown[0]["label"] == "effusion"
    assert key.split("|")[0] != educator.source.sop_instance_uid
    states = [s for s in archive.catalogue.record(copy_uid).series if s.modality == "PR"]
    assert states, "the presentation state went through the profile with the images"


def test_educators_attach_pdfs_photos_videos_and_slides_typed_by_content(archive, educator,
                                                                         anonymous):
    path = make_case(educator)
    page = educator.get(path, headers=HTML)
    files = {"report.pdf": pdf_bytes(), "photo.bin": png_bytes(), "clip.mp4": mp4_bytes(),
             "talk.pptx": pptx_bytes()}
    for name, content in files.items():
        sent = educator.post(f"{path}/files", headers=HTML, files={
            "file": (name, content, "application/octet-stream")},
            data={"csrf_token": csrf(page.text), "title": name})
        assert sent.status_code == 200 and "The file was attached" in sent.text, name
    refused = educator.post(f"{path}/files", headers=HTML, files={
        "file": ("run.pdf", b"MZ\x90\x00 not a pdf", "application/pdf")},
        data={"csrf_token": csrf(page.text)})
    assert refused.status_code == 400 and "cannot be attached" in refused.text
    case = archive.teaching.get(path.rsplit("/", 1)[1])
    kept = {a.title: a for a in archive.teaching.attachments(case)}
    assert {t: a.media_type for t, a in kept.items()} == {
        "report.pdf": "application/pdf", "photo.bin": "image/png", "clip.mp4": "video/mp4",
        "talk.pptx": "application/vnd.openxmlformats-officedocument.presentationml."
                     "presentation"}
    video = educator.get(f"{path}/files/{kept['clip.mp4'].public_id}")
    assert video.headers["content-type"] == "video/mp4" and video.content == files["clip.mp4"]
    assert video.headers["content-disposition"].startswith("inline")
    slides = educator.get(f"{path}/files/{kept['talk.pptx'].public_id}")
    assert slides.headers["content-disposition"].startswith("attachment")
    assert parts(slides.content) == parts(files["talk.pptx"])
    assert {e["detail"]["kind"] for e in archive.audit.events("case.attach")} == {
        "pdf", "image", "video", "document"}
    present = educator.get(f"{path}/present", headers=HTML)
    assert f"/files/{kept['clip.mp4'].public_id}" in present.text  # videos are presented


def test_documents_are_kept_without_what_they_say_about_who_made_them(
        archive, educator, monkeypatch):
    """A teaching case is de-identified: a PDF's author, title and XMP, an office document's
    properties (author, last editor, company) are not kept; the pages are. An office package
    that would unpack to too much is refused before it is unpacked."""
    import imageshare.teaching.files as files

    path = make_case(educator)
    page = educator.get(path, headers=HTML)
    core = ('<cp:coreProperties xmlns:cp="http://schemas.openxmlformats.org/package/2006/'
            'metadata/core-properties" xmlns:dc="http://purl.org/dc/elements/1.1/">'
            '<dc:creator>Dr Amelia Pond</dc:creator><cp:lastModifiedBy>John Smith H31337'
            '</cp:lastModifiedBy></cp:coreProperties>')
    sent = {"report.pdf": pdf_bytes(Author="Dr Amelia Pond", Title="John Smith H31337"),
            "talk.pptx": pptx_bytes(core)}
    for name, content in sent.items():
        answer = educator.post(f"{path}/files", headers=HTML, files={
            "file": (name, content, "application/octet-stream")},
            data={"csrf_token": csrf(page.text), "title": name})
        assert answer.status_code == 200 and "The file was attached" in answer.text, name
    case = archive.teaching.get(path.rsplit("/", 1)[1])
    kept = {a.title: a for a in archive.teaching.attachments(case)}
    pdf = educator.get(f"{path}/files/{kept['report.pdf'].public_id}").content
    slides = educator.get(f"{path}/files/{kept['talk.pptx'].public_id}").content
    for leak in (b"Amelia", b"Pond", b"H31337", b"John Smith"):
        assert leak not in pdf and all(leak not in v for v in parts(slides).values()), leak
    from pypdf import PdfReader

    assert len(PdfReader(io.BytesIO(pdf)).pages) == 1
    assert parts(slides)["ppt/presentation.xml"] == b"<p:presentation/>"
    monkeypatch.setattr(files, "MAX_UNPACKED", 40)
    bomb = educator.post(f"{path}/files", headers=HTML, files={
        "file": ("big.pptx", pptx_bytes(core), "application/octet-stream")},
        data={"csrf_token": csrf(page.text), "title": "big"})
    assert bomb.status_code == 400 and "unpacks to more than" in bomb.text
    assert {a.title for a in archive.teaching.attachments(case)} == set(sent)


def test_only_the_author_changes_a_case_others_may_read_it(archive, educator, anonymous):
    path = make_case(educator)
    archive.users.add("edu2", PASSWORD, "educator")
    from fastapi.testclient import TestClient

    from imageshare.web.server import create_app

    with TestClient(create_app(archive)) as other:
        other.post("/login", data={"username": "edu2", "password": PASSWORD}, headers=HTML)
        page = other.get(path, headers=HTML)
        assert page.status_code == 200 and "Pericardial effusion" in page.text
        assert 'action="' + path + '/files"' not in page.text
        refused = other.post(f"{path}/files", headers=HTML, files={
            "file": ("a.pdf", pdf_bytes(), "application/pdf")},
            data={"csrf_token": csrf(page.text)})
        assert refused.status_code == 403


def test_the_library_is_searched_by_keyword_diagnosis_modality_body_part_and_collection(
        archive, educator):
    make_case(educator)
    make_case(educator, title="Gallstones", modality="US", body_part="abdomen",
              diagnosis="Cholelithiasis", collection="Course 3", keywords="gallbladder stones")
    library = educator.get("/teaching", headers=HTML)
    token = re.search(r'name="csrf_token" value="([^"]+)"', library.text).group(1)

    def titles(**query):
        found = educator.post("/teaching", headers=HTML, data={"csrf_token": token, **query})
        return re.findall(r'<a href="/teaching/[0-9a-f]+">([^<]+)</a>', found.text)

    assert sorted(titles()) == ["Gallstones", "Pericardial effusion"]
    assert titles(q="gallbladder") == ["Gallstones"]
    assert titles(diagnosis="tamponade") == ["Pericardial effusion"]
    assert titles(body_part="HEART") == ["Pericardial effusion"]
    assert sorted(titles(modality="us")) == ["Gallstones", "Pericardial effusion"]
    assert titles(collection="Course 3") == ["Gallstones"]
    assert titles(q="100%_") == []  # wildcards are literal


def slides_of(html: str) -> list[dict]:
    import json

    return json.loads(html.split('<script id="present-manifest" type="application/json">')[1]
                      .split("</script>")[0])["slides"]


def test_presentation_asks_first_and_reveals_the_diagnosis_on_demand(educator):
    path = make_case(educator)
    shown = educator.get(f"{path}/present", headers=HTML)
    assert "What are the findings, and what is the diagnosis?" in shown.text
    assert '<div class="reveal" id="reveal" hidden></div>' in shown.text  # filled on demand
    slides = slides_of(shown.text)
    assert [s["kind"] for s in slides] == ["question", "series", "answer"]
    assert slides[0]["history"] == "Breathless, hypotensive."
    assert ["Diagnosis", "Pericardial effusion with tamponade"] in slides[-1]["answers"]
    assert round(slides[1]["frameRate"]) == 30 and slides[1]["cine"]  # Frame Time 33.3 ms
    assert any(m["label"] == "effusion" for marks in slides[1]["marks"].values()
               for m in marks)  # the marks go with the slides
    assert '<script src="/static/present.js">' in shown.text


def test_a_collection_is_presented_case_after_case(educator):
    first = make_case(educator)
    make_case(educator, title="Another effusion", collection="MDT June")
    make_case(educator, title="Elsewhere", collection="Course 3")
    shown = educator.get(f"{first}/present?collection=1", headers=HTML)
    slides = slides_of(shown.text)
    questions = [(s["title"], s["number"], s["count"]) for s in slides
                 if s["kind"] == "question"]
    assert questions == [("Another effusion", 1, 2), ("Pericardial effusion", 2, 2)]
    assert [s["kind"] for s in slides].count("answer") == 2


def test_a_teaching_case_shared_by_link_is_presented_with_the_answer_on_demand(archive,
                                                                              educator):
    path = make_case(educator, findings="Large effusion, RV diastolic collapse")
    page = educator.get(path, headers=HTML)
    shared = educator.post(f"{path}/share", headers=HTML, data={"csrf_token": csrf(page.text)})
    passcode = re.search(r'class="share-passcode[^"]*">([^<]+)<', shared.text).group(1)
    link = re.search(r'class="share-link">[^<]*(/s/[^<]+)<', shared.text).group(1)
    from fastapi.testclient import TestClient

    from imageshare.web.server import create_app

    with TestClient(create_app(archive)) as audience:
        audience.post(link, data={"passcode": passcode}, headers=HTML)
        shown = audience.get(link + "/present", headers=HTML)
    assert shown.status_code == 200
    slides = slides_of(shown.text)
    assert slides[0]["kind"] == "question"
    assert slides[0]["history"] == "Breathless, hypotensive."
    ((label, answer),) = slides[-1]["answers"]
    assert "RV diastolic collapse" in answer and "tamponade" in answer
    assert round(slides[1]["frameRate"]) == 30 and f"{link}/dicomweb" in shown.text
    ((key, marks),) = slides[1]["marks"].items()  # the educator's mark, under the share's UIDs
    assert marks[0]["label"] == "effusion" and "author" not in marks[0]
    assert key.split("|")[0] in {f["sop"] for f in slides[1]["frames"]}
    for identifier in IDENTIFIERS:
        assert identifier not in shown.text
