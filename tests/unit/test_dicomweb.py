"""DICOMweb in process: QIDO-RS, WADO-RS, STOW-RS as PS3.18 describes, behind authentication."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file

from imageshare.domain.actors import cli_actor
from tests.factory import ct_series, us_cine
from tests.multipart_helpers import encode_multipart, parse_multipart

ACTOR = cli_actor()


@pytest.fixture
def stored(archive, tmp_path):
    ct = ct_series(tmp_path / "ct", count=3, patient_id="H1", patient_name="Doe^Jane")
    cine = us_cine(tmp_path / "us", frames=6, patient_id="H2")
    j2k = Path(get_testdata_file("US1_J2KR.dcm"))
    for p in [*ct, cine, j2k]:
        archive.ingest.store_copy(p, ACTOR)
    return {"ct": ct, "cine": cine, "j2k": j2k}


def _uids(path: Path) -> tuple[str, str, str]:
    ds = dcmread(path, stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def test_nothing_is_served_without_credentials(anonymous, stored):
    response = anonymous.get("/dicomweb/studies")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Basic")
    assert response.headers["content-type"] == "application/problem+json"


def test_wrong_password_is_refused(anonymous, stored):
    assert anonymous.get("/dicomweb/studies", auth=("admin", "wrong")).status_code == 401


def test_api_token_authenticates_dicomweb(archive, anonymous, stored):
    archive.users.add("clin", "long-enough-password", "clinician")
    token = archive.users.create_token("clin", "viewer")
    headers = {"Authorization": f"Bearer {token}"}
    assert anonymous.get("/dicomweb/studies", headers=headers).status_code == 200
    headers = {"Authorization": "Bearer is_not-a-real-token"}
    assert anonymous.get("/dicomweb/studies", headers=headers).status_code == 401


def test_qido_studies_returns_default_attributes_and_retrieve_url(client, stored):
    response = client.get("/dicomweb/studies", params={"PatientID": "H1"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/dicom+json"
    (study,) = response.json()
    assert study["00100010"]["Value"][0]["Alphabetic"] == "Doe^Jane"
    assert study["00201208"]["Value"] == [3]
    assert study["00081190"]["Value"][0].endswith(f"/dicomweb/studies/{_uids(stored['ct'][0])[0]}")


def test_qido_leaves_out_stored_values_json_cannot_carry_and_answers_the_rest(
        archive, client, stored):
    from sqlalchemy import update

    from imageshare.storage.index.schema import studies

    study_uid = _uids(stored["ct"][0])[0]
    with archive.engine.begin() as conn:  # as an old or damaged index might hold them
        attrs = conn.execute(studies.select().where(studies.c.study_uid == study_uid)
                             ).mappings().one()["attrs"]
        conn.execute(update(studies).where(studies.c.study_uid == study_uid).values(attrs={
            **attrs, "00081030": {"vr": "LO", "Value": ["Chest \ud800"]},
            "00080050": {"vr": "SH", "Value": [float("nan")]}}))
    for fields in ((), ("includefield", "all")):
        response = client.get("/dicomweb/studies", params=[("PatientID", "H1"), fields]
                              if fields else {"PatientID": "H1"})
        assert response.status_code == 200
        (study,) = response.json()
        assert "00081030" not in study and "00080050" not in study
        assert study["0020000D"]["Value"] == [study_uid] and study["00201208"]["Value"] == [3]


def test_qido_without_matches_answers_200_with_an_empty_list(client, stored):
    for url in ("/dicomweb/studies?PatientID=nobody", "/dicomweb/studies/1.2.3/series",
                "/dicomweb/studies/1.2.3/instances"):
        response = client.get(url)
        assert (response.status_code, response.json()) == (200, []), url
        assert response.headers["content-type"] == "application/dicom+json"
        # In DICOM XML: 200 with an empty payload (CP-2473), not a multipart body of no part
        # (RFC 2046 has none) that parsers refuse.
        xml = client.get(url, headers={
            "Accept": 'multipart/related; type="application/dicom+xml"'})
        assert (xml.status_code, xml.content) == (200, b""), url
        assert xml.headers["content-type"].startswith("multipart/related")


def test_qido_unknown_attribute_is_a_clear_400(client, stored):
    response = client.get("/dicomweb/studies", params={"NoSuchKeyword": "1"})
    assert response.status_code == 400
    assert "NoSuchKeyword" in response.json()["detail"]


def test_qido_includefield_and_paging(client, stored):
    response = client.get("/dicomweb/studies", params={"includefield": "00080070", "limit": 1})
    assert len(response.json()) == 1
    assert "Value" not in response.json()[0].get("00080070", {})  # a series-level attribute
    all_fields = client.get("/dicomweb/studies", params={"includefield": "all",
                                                         "PatientID": "H1"}).json()[0]
    assert all_fields["00100040"]["Value"] == ["O"]
    second = client.get("/dicomweb/studies", params={"limit": 1, "offset": 1}).json()
    assert second[0]["0020000D"] != response.json()[0]["0020000D"]


def test_qido_series_and_instances_of_a_study(client, stored):
    study, series, _ = _uids(stored["ct"][0])
    found = client.get(f"/dicomweb/studies/{study}/series").json()
    assert [s["0020000E"]["Value"][0] for s in found] == [series]
    instances = client.get(f"/dicomweb/studies/{study}/series/{series}/instances").json()
    assert sorted(i["00200013"]["Value"][0] for i in instances) == [1, 2, 3]
    assert all(i["00280100"]["Value"] == [16] for i in instances)


def test_wado_study_returns_every_instance_byte_identical(client, stored):
    study = _uids(stored["ct"][0])[0]
    response = client.get(
        f"/dicomweb/studies/{study}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
    )
    assert response.status_code == 200
    parts = parse_multipart(response)
    assert sorted(body for _, body in parts) == sorted(p.read_bytes() for p in stored["ct"])


def test_wado_default_transfer_syntax_decompresses_jpeg2000(client, stored):
    study, series, sop = _uids(stored["j2k"])
    response = client.get(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}",
                          headers={"Accept": 'multipart/related; type="application/dicom"'})
    ((headers, body),) = parse_multipart(response)
    assert "transfer-syntax=1.2.840.10008.1.2.1" in headers["content-type"]
    received = dcmread(io.BytesIO(body))
    assert received.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    original = dcmread(stored["j2k"])
    assert np.array_equal(received.pixel_array, original.pixel_array)
    assert received.SOPInstanceUID == original.SOPInstanceUID == sop
    assert received.file_meta.MediaStorageSOPInstanceUID == sop


def test_an_instance_compressed_for_the_client_keeps_its_identity(client, stored):
    study, series, sop = _uids(stored["ct"][0])
    response = client.get(
        f"/dicomweb/studies/{study}/series/{series}/instances/{sop}",
        headers={"Accept": 'multipart/related; type="application/dicom"; '
                           'transfer-syntax=1.2.840.10008.1.2.5'})
    ((headers, body),) = parse_multipart(response)
    assert "transfer-syntax=1.2.840.10008.1.2.5" in headers["content-type"]
    received = dcmread(io.BytesIO(body))
    assert received.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"
    assert received.SOPInstanceUID == sop
    assert received.file_meta.MediaStorageSOPInstanceUID == sop
    assert np.array_equal(received.pixel_array, dcmread(stored["ct"][0]).pixel_array)


def test_wado_unknown_uid_is_404(client, stored):
    assert client.get("/dicomweb/studies/1.2.3.4").status_code == 404


def test_metadata_has_header_and_bulk_data_uri_for_pixels(client, stored):
    study, series, sop = _uids(stored["cine"])
    (meta,) = client.get(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/metadata"
                         ).json()
    assert meta["00280008"]["Value"] == [6]
    assert meta["00181063"]["Value"] == [33.3]
    uri = meta["7FE00010"]["BulkDataURI"]
    assert uri.endswith(f"/instances/{sop}/bulkdata/7FE00010")
    assert "InlineBinary" not in meta["7FE00010"]


def test_frames_of_native_cine_are_raw_pixels(client, stored):
    study, series, sop = _uids(stored["cine"])
    response = client.get(
        f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/2,5",
        headers={"Accept": 'multipart/related; type="application/octet-stream"'},
    )
    parts = parse_multipart(response)
    pixels = dcmread(stored["cine"]).pixel_array
    assert [body for _, body in parts] == [pixels[1].tobytes(), pixels[4].tobytes()]


def test_frames_of_jpeg2000_as_stored_or_decoded(client, stored):
    study, series, sop = _uids(stored["j2k"])
    url = f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/1"
    as_stored = parse_multipart(client.get(url, headers={
        "Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}))
    assert as_stored[0][0]["content-type"].startswith("image/jp2")
    assert as_stored[0][1][:4] in (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0c")
    decoded = parse_multipart(client.get(url, headers={
        "Accept": 'multipart/related; type="application/octet-stream"'}))
    ds = dcmread(stored["j2k"])
    assert len(decoded[0][1]) == ds.Rows * ds.Columns * ds.SamplesPerPixel


def test_missing_frame_is_404(client, stored):
    study, series, sop = _uids(stored["cine"])
    url = f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/99"
    assert client.get(url).status_code == 404


def test_rendered_window_changes_pixels(client, stored):
    study, series, sop = _uids(stored["ct"][0])
    url = f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/rendered"
    narrow = client.get(url, params={"window": "0,100"}, headers={"Accept": "image/png"})
    wide = client.get(url, params={"window": "1000,4000"}, headers={"Accept": "image/png"})
    assert narrow.headers["content-type"] == "image/png"
    a = np.asarray(Image.open(io.BytesIO(narrow.content)))
    b = np.asarray(Image.open(io.BytesIO(wide.content)))
    assert a.shape == b.shape == (64, 64)
    assert not np.array_equal(a, b)


def test_thumbnail_is_small_jpeg(client, stored):
    study, series, sop = _uids(stored["cine"])
    response = client.get(f"/dicomweb/studies/{study}/series/{series}/thumbnail")
    assert response.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(response.content))
    assert max(image.size) <= 128


def test_stow_stores_and_reports_each_instance(client, archive, tmp_path):
    files = ct_series(tmp_path / "stow", count=2, patient_id="S1")
    body, content_type = encode_multipart([p.read_bytes() for p in files])
    response = client.post("/dicomweb/studies", content=body,
                           headers={"Content-Type": content_type})
    assert response.status_code == 200
    stored = response.json()["00081199"]["Value"]
    assert len(stored) == 2
    assert client.get("/dicomweb/studies", params={"PatientID": "S1"}).status_code == 200


def test_stow_partial_failure_answers_202_with_reasons(client, archive, tmp_path):
    good = ct_series(tmp_path / "g", count=1, patient_id="S2")[0].read_bytes()
    truncated = good[:-400]
    body, content_type = encode_multipart([good, truncated, b"not dicom at all"])
    response = client.post("/dicomweb/studies", content=body,
                           headers={"Content-Type": content_type})
    assert response.status_code == 202
    answer = response.json()
    assert len(answer["00081199"]["Value"]) == 1
    failed = answer["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failed] == [0xC000, 0xC000]
    assert "truncated" in failed[0]["00000902"]["Value"][0]
    # The truncated instance is named; the garbage part has no UIDs to name.
    truncated_uid = dcmread(io.BytesIO(good), stop_before_pixels=True).SOPInstanceUID
    assert failed[0]["00081155"]["Value"] == [truncated_uid]
    assert "Value" not in failed[1]["00081155"]


def test_stow_to_a_study_refuses_instances_of_another_study(client, tmp_path):
    part = ct_series(tmp_path / "x", count=1)[0].read_bytes()
    body, content_type = encode_multipart([part])
    response = client.post("/dicomweb/studies/1.2.826.0.1.3680043.99", content=body,
                           headers={"Content-Type": content_type})
    assert response.status_code == 409
    assert response.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]


def test_stow_needs_multipart_related(client):
    response = client.post("/dicomweb/studies", content=b"x",
                           headers={"Content-Type": "application/dicom"})
    assert response.status_code == 415


def test_wado_is_audited_per_study(client, archive, stored):
    study = _uids(stored["ct"][0])[0]
    client.get(f"/dicomweb/studies/{study}/metadata")
    (event,) = list(archive.audit.events(action="study.metadata", limit=1))
    assert (event["actor"], event["study_uid"], event["instance_count"]) == (
        "user:admin", study, 3)


def test_a_retrieval_nothing_can_answer_is_refused_before_it_is_audited(
    client, archive, stored
):
    study = _uids(stored["ct"][0])[0]
    for accept in ('multipart/related; type="application/dicom"; transfer-syntax=1.2.3.4',
                   "text/html"):
        response = client.get(f"/dicomweb/studies/{study}", headers={"Accept": accept})
        assert response.status_code == 406, accept
        assert response.headers["content-type"] == "application/problem+json"
    assert list(archive.audit.events(action="study.retrieve", limit=5)) == []


def test_stow_answers_in_dicom_xml_when_asked(client, tmp_path):
    import xml.etree.ElementTree as ET

    (path,) = ct_series(tmp_path / "x", count=1, patient_id="XML1")
    body, content_type = encode_multipart([path.read_bytes()])
    response = client.post("/dicomweb/studies", content=body, headers={
        "Content-Type": content_type, "Accept": "application/dicom+xml"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/dicom+xml")
    root = ET.fromstring(response.content)
    native = "{http://dicom.nema.org/PS3.19/models/NativeDICOM}"
    assert root.find(f"{native}DicomAttribute[@tag='00081199']") is not None


def test_cors_allows_only_configured_origins(tmp_path):
    from fastapi.testclient import TestClient

    from imageshare.web.server import create_app
    from tests.conftest import make_archive

    archive = make_archive(tmp_path, cors_origins="https://viewer.example.org")
    try:
        with TestClient(create_app(archive)) as client:
            allowed = client.options("/dicomweb/studies", headers={
                "Origin": "https://viewer.example.org",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization"})
            other = client.options("/dicomweb/studies", headers={
                "Origin": "https://evil.example.com", "Access-Control-Request-Method": "GET"})
        assert allowed.headers["access-control-allow-origin"] == "https://viewer.example.org"
        assert "access-control-allow-origin" not in other.headers
    finally:
        archive.close()


def test_wado_uri_serves_the_object_and_a_rendered_frame(client, stored):
    study, series, sop = _uids(stored["cine"])
    base = {"requestType": "WADO", "studyUID": study, "seriesUID": series, "objectUID": sop}
    dicom = client.get("/dicomweb/wado", params={**base, "contentType": "application/dicom"})
    assert dicom.headers["content-type"] == "application/dicom"
    assert dicom.content == stored["cine"].read_bytes()
    frame = client.get("/dicomweb/wado", params={**base, "frameNumber": 3, "rows": 60})
    assert frame.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(frame.content)).size == (80, 60)
    assert client.get("/dicomweb/wado", params={**base, "requestType": "X"}).status_code == 400


def test_qido_accepts_comma_separated_uid_and_code_lists(client, stored):
    uids = [_uids(stored["ct"][0])[0], _uids(stored["cine"])[0]]
    found = client.get("/dicomweb/studies", params={"StudyInstanceUID": ",".join(uids)}).json()
    assert sorted(s["0020000D"]["Value"][0] for s in found) == sorted(uids)
    by_modality = client.get("/dicomweb/studies", params={"ModalitiesInStudy": "CT,US"}).json()
    assert len(by_modality) == 3


def test_qido_warns_when_results_are_cut_at_the_maximum(tmp_path):
    from fastapi.testclient import TestClient

    from imageshare.web.server import create_app
    from tests.conftest import ADMIN_PASSWORD, make_archive

    archive = make_archive(tmp_path, qido_max_limit=2)
    archive.users.ensure_admin(ADMIN_PASSWORD)
    try:
        for i in range(3):
            archive.ingest.store_copy(ct_series(tmp_path / f"s{i}", count=1)[0], ACTOR)
        with TestClient(create_app(archive)) as client:
            token = archive.users.create_token("admin", "tests", origin="cli")
            client.headers["Authorization"] = f"Bearer {token}"
            cut = client.get("/dicomweb/studies")
            paged = client.get("/dicomweb/studies", params={"limit": 2, "offset": 2})
        assert len(cut.json()) == 2 and cut.headers["warning"].startswith("299 ")
        assert len(paged.json()) == 1 and "warning" not in paged.headers
    finally:
        archive.close()


def test_cors_opens_only_dicomweb_and_never_with_the_session_cookie(tmp_path):
    """An allowed viewer origin may call /dicomweb with its own token, nothing else: a script
    there (one XSS on the viewer's host) could otherwise read the app's pages with the user's
    session cookie, take the CSRF token and mint an API token."""
    from fastapi.testclient import TestClient

    from imageshare.web.server import create_app
    from tests.conftest import make_archive

    origin = "https://viewer.example.org"
    archive = make_archive(tmp_path, cors_origins=origin)
    try:
        with TestClient(create_app(archive)) as client:
            dicomweb = client.options("/dicomweb/studies", headers={
                "Origin": origin, "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization"})
            answers = [
                client.get("/api/me", headers={"Origin": origin}),
                client.get("/", headers={"Origin": origin}),
                client.options("/api/tokens", headers={
                    "Origin": origin, "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "x-csrf-token,content-type"}),
            ]
        assert dicomweb.headers["access-control-allow-origin"] == origin
        assert "authorization" in dicomweb.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in dicomweb.headers
        for answer in answers:
            assert "access-control-allow-origin" not in answer.headers, answer.request.url
            assert "access-control-allow-credentials" not in answer.headers
    finally:
        archive.close()


def test_dicomweb_and_fhir_answers_are_never_kept_by_a_cache(client, stored):
    """Metadata, searches and pixels name a patient: a shared or browser cache must not keep
    them after a right is revoked."""
    study, _series, _sop = _uids(stored["ct"][0])
    for path in (f"/dicomweb/studies/{study}/metadata", "/dicomweb/studies",
                 f"/dicomweb/studies/{study}/thumbnail", "/fhir/ImagingStudy"):
        answer = client.get(path)
        assert answer.status_code == 200, path
        assert answer.headers.get("cache-control") == "no-store", path
        assert answer.headers.get("x-content-type-options") == "nosniff", path


def test_uncompressed_frames_of_a_jpeg_ybr_full_422_loop_come_as_rgb(archive, client):
    """A JPEG loop stored as YBR_FULL_422 asked for uncompressed: YBR_FULL_422 has no layout of
    whole pixels, so the frame comes as RGB (what OHIF and the converted instance show), not
    as decoded YCbCr, which a viewer painted teal."""
    from pydicom.pixels import convert_color_space

    from tests.multipart_helpers import parse_multipart

    source = Path(get_testdata_file("color3d_jpeg_baseline.dcm"))
    archive.ingest.store_copy(source, ACTOR)
    study, series, sop = _uids(source)
    answer = client.get(
        f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/2",
        headers={"Accept": 'multipart/related; type="application/octet-stream"; '
                           "transfer-syntax=1.2.840.10008.1.2.1"})
    assert answer.status_code == 200
    (_headers, body), = parse_multipart(answer)
    rgb = dcmread(source).pixel_array[1]  # pydicom converts to RGB by default
    got = np.frombuffer(body, dtype=np.uint8).reshape(rgb.shape)
    assert np.abs(got.astype(int) - rgb.astype(int)).mean() < 2
    raw = convert_color_space(rgb, "RGB", "YBR_FULL")
    assert np.abs(got.astype(int) - raw.astype(int)).mean() > 10
