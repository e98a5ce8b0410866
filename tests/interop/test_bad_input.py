"""Broken files through C-STORE, STOW-RS and import: refused with reasons, nothing changed."""

from __future__ import annotations

import zipfile

import httpx
import pytest
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, UltrasoundImageStorage, Verification

from tests.factory import broken_files, ct_series
from tests.multipart_helpers import encode_multipart

pytestmark = pytest.mark.interop


def _nothing_stored(server) -> bool:
    with server.http() as http:
        response = http.get("/dicomweb/instances")
        return response.status_code == 200 and response.json() == []


@pytest.fixture
def chunked_send():
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
    yield
    _config.STORE_SEND_CHUNKED_DATASET = previous


def test_c_store_of_broken_files_fails_per_file_and_server_keeps_running(
    server, tmp_path, chunked_send
):
    server.register("BROKEN")
    ae = AE(ae_title="BROKEN")
    for uid in (CTImageStorage, UltrasoundImageStorage, Verification):
        ae.add_requested_context(uid, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.90"])
    sent = 0
    for name, path in broken_files(tmp_path).items():
        if name in ("garbage", "empty", "no-preamble"):
            continue  # no file meta: a sender cannot even address these over DIMSE
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="IMAGESHARE")
        assert assoc.is_established
        try:
            status = assoc.send_c_store(path)
        except (AttributeError, ValueError):
            assoc.abort()
            continue  # pynetdicom itself refused to send it
        assert status.Status & 0xF000 in (0xA000, 0xC000), (name, hex(status.Status))
        assert status.get("ErrorComment"), name
        assoc.release()
        sent += 1
    assert sent >= 4
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="IMAGESHARE")
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    assert _nothing_stored(server)


def test_stow_of_broken_files_answers_409_with_a_reason_for_each(server, tmp_path):
    files = broken_files(tmp_path)
    body, content_type = encode_multipart([p.read_bytes() for p in files.values()])
    with server.http() as http:
        response = http.post("/dicomweb/studies", content=body,
                             headers={"Content-Type": content_type})
    assert response.status_code == 409
    failed = response.json()["00081198"]["Value"]
    assert len(failed) == len(files)
    assert all(item["00000902"]["Value"][0] for item in failed)
    assert _nothing_stored(server)


def test_stow_with_a_malformed_body_is_a_clear_error(server):
    with server.http() as http:
        response = http.post("/dicomweb/studies", content=b"--b\r\nno end",
                             headers={"Content-Type": 'multipart/related; boundary=b; '
                                                      'type="application/dicom"'})
    assert response.status_code in (400, 409)
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert _nothing_stored(server)


def test_import_refuses_broken_files_and_unsafe_zip_paths(server, tmp_path):
    folder = tmp_path / "media"
    folder.mkdir()
    for name, path in broken_files(tmp_path / "src").items():
        path.rename(folder / f"{name}.dcm")
    good = ct_series(tmp_path / "good", count=1, patient_id="ZIPOK")[0]
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as archive:
        archive.writestr("../../escape.dcm", good.read_bytes())
        archive.writestr("/abs/path.dcm", good.read_bytes())
        archive.writestr("ok/fine.dcm", good.read_bytes())
    result = server.cli("import", "--quiet", str(folder), str(tmp_path / "evil.zip"),
                        check=False)
    assert result.returncode == 1
    refused = [line for line in result.stdout.splitlines() if line.startswith("refused:")]
    assert any("../../escape.dcm: unsafe path" in line for line in refused)
    assert any("/abs/path.dcm: unsafe path" in line for line in refused)
    assert any("truncated" in line for line in refused)
    assert "1 stored" in result.stdout
    assert not (tmp_path / "escape.dcm").exists()
    with server.http() as http:
        (study,) = http.get("/dicomweb/studies").json()
        assert study["00100020"]["Value"] == ["ZIPOK"]
