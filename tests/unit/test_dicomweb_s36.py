"""DICOMweb (session 36): HEAD of a whole study or series answered by its own route (audited
as a metadata read, nothing read), QIDO-RS answers writing stored values as the WADO-RS
metadata does, and STOW-RS failure reasons that fit an Error Comment without a cut word."""

from __future__ import annotations

from typing import Any

from tests.factory import ct_series
from tests.multipart_helpers import encode_multipart
from tests.unit.test_dicomweb import ACTOR, _uids, stored  # noqa: F401 - the fixture
from tests.unit.test_dicomweb_redteam_s35 import _url, _with_raw

MULTIPART_DICOM = 'multipart/related; type="application/dicom"'


def _media(response: Any) -> str:
    """The Content-Type without its boundary (a new one per answer)."""
    return response.headers["content-type"].split("; boundary=")[0]


# -- 1. HEAD of a study or series --------------------------------------------------------------


def test_head_of_a_study_or_series_is_a_metadata_read_that_opens_no_instance(
        client, archive, stored, monkeypatch):
    """A HEAD of a study (a download manager checking a link) was answered as GET: audited
    as the study sent (study.retrieve) and instances read. Now it reads the index only and
    is audited as a metadata read, with GET's status and headers and no body."""
    opened: list[str] = []
    real_open = archive.retrieve.open

    def counting_open(inst: Any) -> Any:
        opened.append(inst.sop_uid)
        return real_open(inst)

    monkeypatch.setattr(archive.retrieve, "open", counting_open)
    study, series, _ = _uids(stored["ct"][0])
    for url in (f"/dicomweb/studies/{study}", f"/dicomweb/studies/{study}/series/{series}"):
        head = client.head(url)
        assert (head.status_code, head.content) == (200, b""), url
        assert _media(head) == MULTIPART_DICOM, url
        assert "content-length" not in head.headers  # GET streams: it has none either
    assert opened == []
    assert list(archive.audit.events(action="study.retrieve", study_uid=study)) == []
    reads = list(archive.audit.events(action="study.metadata", study_uid=study))
    assert [event["outcome"] for event in reads] == ["success", "success"]


def test_head_of_a_study_negotiates_and_refuses_as_get_does(client, stored):
    study, series, _ = _uids(stored["ct"][0])
    url = f"/dicomweb/studies/{study}/series/{series}"
    asked = f'{MULTIPART_DICOM}; transfer-syntax=1.2.840.10008.1.2.4.90'
    got = client.get(url, headers={"Accept": asked})
    head = client.head(url, headers={"Accept": asked})
    assert (head.status_code, head.content) == (got.status_code, b"") == (200, b"")
    assert _media(head) == _media(got) == f"{MULTIPART_DICOM}"
    # three instances cannot be one application/dicom body; an unknown study is not found
    for accept, status in (("application/dicom", 406), ("text/html", 406)):
        assert client.head(url, headers={"Accept": accept}).status_code == status
        assert client.get(url, headers={"Accept": accept}).status_code == status
    assert client.head("/dicomweb/studies/1.2.3.4").status_code == 404
    assert client.head(f"/dicomweb/studies/{study}/series/1.2.3.4").status_code == 404


def test_head_of_a_study_needs_the_download_permission_like_get(archive, anonymous, stored):
    """HEAD goes through GET's one permission (study.download): no credentials is 401, an
    account that may not read studies (another site's) is refused as GET is."""
    study, series, _ = _uids(stored["ct"][0])
    archive.users.add("othersite", "long-enough-password", "site")
    token = archive.users.create_token("othersite", "exchange")
    for url in (f"/dicomweb/studies/{study}", f"/dicomweb/studies/{study}/series/{series}"):
        assert anonymous.head(url).status_code == 401
        headers = {"Authorization": f"Bearer {token}"}
        got = anonymous.get(url, headers=headers)
        head = anonymous.head(url, headers=headers)
        assert got.status_code == 403
        assert (head.status_code, head.content) == (403, b"")


# -- 2. QIDO-RS values written as the WADO-RS metadata writes them ----------------------------


def test_qido_sends_stored_values_exactly_as_the_metadata_does(archive, client, tmp_path):
    """Series Number "1.5" (an invalid IS) came as 1 in QIDO-RS but "1.5" in the metadata,
    and Operators' Name / Other Patient Names with an empty value among several came as
    plain strings ("Op^A", "", "Op^B": not DICOM JSON person names) where the metadata has
    person names and null. A viewer listing series then showed other numbers and names than
    the image it opened. Both answers now write each value the same way."""
    path = _with_raw(ct_series(tmp_path, count=1, size=16, patient_id="QI1")[0], {
        0x00200011: ("IS", b"1.5"), 0x00081070: ("PN", b"Op^A\\\\Op^B"),
        0x00101001: ("PN", b"Doe^A\\\\Roe^B"), 0x00081060: ("PN", b"\\Rd^X")})
    archive.ingest.store_copy(path, ACTOR)
    study, _, _ = _uids(path)
    (meta,) = client.get(f"{_url(path)}/metadata").json()
    assert meta["00200011"] == {"vr": "IS", "Value": ["1.5"]}
    assert meta["00081070"] == {"vr": "PN", "Value": [{"Alphabetic": "Op^A"}, None,
                                                      {"Alphabetic": "Op^B"}]}
    fields = {"includefield": ["OperatorsName", "OtherPatientNames", "SeriesNumber",
                               "NameOfPhysiciansReadingStudy"]}
    (series,) = client.get(f"/dicomweb/studies/{study}/series", params=fields).json()
    (in_study,) = client.get("/dicomweb/studies", params={
        "PatientID": "QI1", "includefield": ["OtherPatientNames",
                                             "NameOfPhysiciansReadingStudy"]}).json()
    for tag in ("00200011", "00081070", "00101001", "00081060"):
        assert series[tag] == meta[tag], tag
    for tag in ("00101001", "00081060"):
        assert in_study[tag] == meta[tag], tag
    xml = client.get(f"/dicomweb/studies/{study}/series", params=fields, headers={
        "Accept": 'multipart/related; type="application/dicom+xml"'}).text
    assert '<DicomAttribute tag="00200011" vr="IS" keyword="SeriesNumber"><Value ' \
           'number="1">1.5</Value>' in xml


# -- 3. STOW-RS failure reasons as Error Comments ------------------------------------------------


def test_a_long_stow_failure_reason_is_cut_at_a_word_not_inside_one(client, tmp_path):
    """An Error Comment (LO) holds 64 characters: "not a DICOM Part 10 file (no 128-byte
    preamble and 'DICM' prefix)" came back cut as "... and 'DICM' prefi". It is cut after
    the last whole word that fits and says so with "..."."""
    good = ct_series(tmp_path / "g", count=1, patient_id="EC1")[0].read_bytes()
    not_part10 = good[132:]  # the data set without the preamble and 'DICM'
    body, content_type = encode_multipart([good, not_part10])
    response = client.post("/dicomweb/studies", content=body,
                           headers={"Content-Type": content_type})
    assert response.status_code == 202
    (failed,) = response.json()["00081198"]["Value"]
    comment = failed["00000902"]["Value"][0]
    assert len(comment) <= 64
    assert comment.endswith("...")
    shown = comment.removesuffix("...")
    full = "not a DICOM Part 10 file (no 128-byte preamble and 'DICM' prefix)"
    assert full.startswith(shown) and full[len(shown)] == " ", comment
    assert shown.startswith("not a DICOM Part 10 file")


def test_an_empty_operator_name_among_several_is_not_shown_as_none(archive, tmp_path):
    """With the index now holding an empty name among several as null (as the metadata
    does), the study page's device details must not read "None" for it."""
    path = _with_raw(ct_series(tmp_path, count=1, size=16, patient_id="QI2")[0], {
        0x00081070: ("PN", b"Op^A\\\\Op^B"), 0x00181020: ("LO", b"v1\\\\v3")})
    archive.ingest.store_copy(path, ACTOR)
    (series,) = archive.catalogue.record(_uids(path)[0]).series
    assert series.device["Operator"] == "Op^A, Op^B"
    assert series.device["Software"] == "v1, v3"


def test_an_empty_value_among_several_matches_no_wildcard_that_needs_letters():
    """An empty value stored among several is JSON null: matched, it is empty text, not the
    word "None" (which N* or *one would otherwise find)."""
    from imageshare.archive.matching import json_matches

    stored = {"vr": "LO", "Value": ["SMITH", None]}
    assert not json_matches(stored, {"vr": "LO", "Value": ["N*"]})
    assert not json_matches(stored, {"vr": "LO", "Value": ["*one"]})
    assert json_matches(stored, {"vr": "LO", "Value": ["SM*"]})


def test_a_colour_frame_stored_by_plane_is_a_true_colour_jpeg_baseline_frame():
    """Colour ultrasound and photographs are often stored colour-by-plane (Planar
    Configuration 1): sent as JPEG baseline they keep their colours."""
    import io

    import numpy as np
    from PIL import Image
    from pydicom import Dataset

    from imageshare.archive.transcode import JPEG_BASELINE, can_encode_frames, encode_frame

    header = Dataset()
    header.Rows = header.Columns = 16
    header.SamplesPerPixel, header.BitsAllocated, header.BitsStored = 3, 8, 8
    header.HighBit, header.PixelRepresentation = 7, 0
    header.PhotometricInterpretation, header.PlanarConfiguration = "RGB", 1
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    assert can_encode_frames("1.2.840.10008.1.2.1", JPEG_BASELINE, header)
    sent = encode_frame(header, red.transpose(2, 0, 1).tobytes(), JPEG_BASELINE)
    shown = np.asarray(Image.open(io.BytesIO(sent))).astype(int)
    assert abs(shown[0, 0] - [255, 0, 0]).max() < 8
    assert abs(shown[8, 8] - [255, 0, 0]).max() < 8
