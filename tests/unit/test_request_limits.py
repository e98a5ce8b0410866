"""Oversized requests (long addresses and headers, huge bodies, JSON, query strings, many
parts) are answered 4xx with a reason before the server reads them, never 500 or a memory
blow-up."""

from __future__ import annotations

import socket
import time

import pytest

from imageshare.web.multipart import media_type_params
from tests.conftest import act_as_admin, make_archive
from tests.factory import ct_series
from tests.multipart_helpers import encode_multipart
from tests.peers import ADMIN_PASSWORD, RunningServer


@pytest.fixture
def limited(tmp_path):
    """A client of an archive with small limits."""
    from fastapi.testclient import TestClient

    from imageshare.web.server import create_app

    archive = make_archive(tmp_path, stow_max_bytes=200_000, stow_max_parts=3,
                           max_body_bytes=10_000, max_upload_bytes=50_000)
    archive.users.ensure_admin(ADMIN_PASSWORD)
    with TestClient(create_app(archive)) as client:
        act_as_admin(client, archive)
        yield client, archive
    archive.close()


def _problem(response, status: int) -> str:
    assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"] == "application/problem+json"
    return response.json()["detail"]


def test_a_stow_body_over_the_limit_is_refused_413_before_it_is_read(limited, tmp_path):
    client, archive = limited
    body = b"x" * 300_000
    response = client.post("/dicomweb/studies", content=body, headers={
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})
    assert "stow_max_bytes" in _problem(response, 413)
    assert not list(archive.settings.staging_dir.iterdir())


def test_a_stow_body_without_a_length_is_stopped_at_the_limit(limited):
    client, archive = limited
    sent = []

    def chunks():
        for _ in range(100):
            sent.append(1)
            yield b"--b\r\nContent-Type: application/dicom\r\n\r\n" + b"x" * 10_000

    response = client.post("/dicomweb/studies", content=chunks(), headers={
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})
    assert "stow_max_bytes" in _problem(response, 413)
    assert not list(archive.settings.staging_dir.iterdir())


def test_a_stow_request_with_too_many_parts_is_refused_413_with_the_reason(limited, tmp_path):
    client, archive = limited
    files = ct_series(tmp_path / "ct", count=4, size=16)
    body, content_type = encode_multipart([p.read_bytes() for p in files])
    response = client.post("/dicomweb/studies", content=body,
                           headers={"Content-Type": content_type})
    assert "more than 3 parts" in _problem(response, 413)
    assert not list(archive.settings.staging_dir.iterdir())


def test_a_huge_part_header_in_stow_is_refused(limited):
    client, archive = limited
    body = b"--b\r\nX-Long: " + b"y" * 100_000 + b"\r\n\r\ndata\r\n--b--\r\n"
    response = client.post("/dicomweb/studies", content=body, headers={
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})
    assert response.status_code in (400, 413)
    assert response.json()["detail"]
    assert not list(archive.settings.staging_dir.iterdir())


def test_huge_json_is_refused_413_and_deep_json_is_not_a_server_error(limited):
    client, _archive = limited
    response = client.post("/api/session", content=b'{"username": "' + b"a" * 50_000 + b'"}',
                           headers={"Content-Type": "application/json"})
    assert "max_body_bytes" in _problem(response, 413)
    deep = b"[" * 5000 + b"]" * 5000
    response = client.post("/api/session", content=deep,
                           headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500


def test_an_upload_over_its_limit_is_refused_413(limited, tmp_path):
    client, _archive = limited
    response = client.post("/studies/1.2.3/documents", files={
        "file": ("report.pdf", b"%PDF-" + b"x" * 60_000, "application/pdf")})
    assert "max_upload_bytes" in _problem(response, 413)


def test_a_long_address_is_refused_414(limited):
    client, _archive = limited
    response = client.get("/dicomweb/studies", params={"PatientName": "a" * 9000})
    assert "longer than 8 KiB" in _problem(response, 414)
    many = "&".join(f"x{n}=1" for n in range(3000))
    assert client.get(f"/dicomweb/studies?{many}").status_code == 414


def test_too_many_header_fields_are_refused_431(limited):
    client, _archive = limited
    headers = {f"X-Field-{n}": "1" for n in range(150)}
    assert client.get("/healthz", headers=headers).status_code == 431


def test_media_type_parameters_are_parsed_in_linear_time():
    started = time.monotonic()
    media, params = media_type_params("multipart/related" + ';"' * 40_000)
    assert media == "multipart/related"
    media_type_params("a/b" + "; x" * 40_000)
    assert time.monotonic() - started < 0.5
    assert media_type_params('multipart/related; type="application/dicom"; boundary="a;b"')[
        1] == {"type": "application/dicom", "boundary": "a;b"}


def _raw(port: int, request: bytes, timeout: float = 20) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        try:
            conn.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        try:
            while chunk := conn.recv(65536):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return answer


def test_a_real_server_refuses_huge_request_heads_quickly_and_stays_up(tmp_path):
    """httptools alone took a minute and 200 MB over one 200 MB header."""
    server = RunningServer(tmp_path / "data", extra_env={"IMAGESHARE_DICOM_PORT": "0"})
    server.dicom_port = server.http_port  # nothing to wait for on the DICOM side
    server.start()
    try:
        started = time.monotonic()
        big_header = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000_000
        answer = _raw(server.http_port, big_header + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
        many = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 50_000 + b"\r\n"
        assert _raw(server.http_port, many).startswith(b"HTTP/1.1 431")
        long_url = b"GET /dicomweb/studies?" + b"a=1&" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        assert _raw(server.http_port, long_url)[:12] in (b"HTTP/1.1 414", b"HTTP/1.1 431")
        assert time.monotonic() - started < 10
        rss_kib = int(open(f"/proc/{server.process.pid}/status").read()
                      .split("VmHWM:")[1].split()[0])
        assert rss_kib < 400 * 1024
        with server.http() as client:
            assert client.get("/healthz").status_code == 200
    finally:
        server.stop()
