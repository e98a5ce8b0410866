"""Attacks on the HTTP server itself, against a real one (uvicorn with the limited protocol,
run in this process so that its time limits can be made short): request heads and bodies
trickled to hold connections (slowloris), HEAD answered as GET without its body (and without
doing what GET would do beyond that), and HSTS over HTTPS only."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from pydicom import dcmread

from imageshare.domain.actors import cli_actor
from imageshare.web import multipart
from imageshare.web import server as web_server
from imageshare.web.server import create_app, http_server_config
from tests.conftest import make_archive, require_tool
from tests.factory import ct_series
from tests.multipart_helpers import encode_multipart
from tests.peers import ADMIN_PASSWORD, free_port
from tests.unit.test_ehr_integration import launch_url

CLINICIAN_PASSWORD = "clinician-password-s36"
HEAD_SECONDS = 1.0  # the server's limits while these tests run (20 s in service)
BODY_SECONDS = 1.0
BODY_MIN_RATE = 50_000
SLOW_ANSWER_SECONDS = 2.5
STUDY_SIZE = 40  # instances of the study that is downloaded


@contextlib.contextmanager
def serving(archive: Any, customise: Callable[[FastAPI], None] | None = None
            ) -> Iterator[str]:
    """The archive's web application served by uvicorn with the server's own configuration
    (the limited protocol, HTTPS when the archive has a certificate) on a free port, in a
    thread of this process; yields its base URL."""
    app = create_app(archive)
    if customise is not None:
        customise(app)
    server = uvicorn.Server(http_server_config(app, archive.settings))
    thread = threading.Thread(target=server.run, name="http-under-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    scheme = "https" if archive.settings.tls_certificate else "http"
    try:
        yield f"{scheme}://127.0.0.1:{archive.settings.http_port}"
    finally:
        server.should_exit = True
        thread.join(20)


def _slow_page(app: FastAPI) -> None:
    async def slow() -> PlainTextResponse:
        await asyncio.sleep(SLOW_ANSWER_SECONDS)
        return PlainTextResponse("slow answer")

    app.add_api_route("/slow-for-test", slow, methods=["GET"])


@pytest.fixture(scope="module")
def short_limits() -> Iterator[None]:
    """The server's time limits made short (they are read as each connection needs them)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(web_server, "HEAD_SECONDS", HEAD_SECONDS)
        patch.setattr(web_server, "BODY_SECONDS", BODY_SECONDS)
        patch.setattr(web_server, "BODY_MIN_RATE", BODY_MIN_RATE)
        yield


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, short_limits: None) -> Iterator[dict]:
    """A plain-HTTP server with a clinician, a CT study, an EHR allowed to launch, an
    administrator's API token and a page that takes a while to answer."""
    folder = tmp_path_factory.mktemp("s36")
    archive = make_archive(folder, http_port=free_port())
    archive.users.ensure_admin(ADMIN_PASSWORD)
    archive.users.add("clin", CLINICIAN_PASSWORD, "clinician")
    paths = ct_series(folder / "ct", count=STUDY_SIZE, size=128, patient_id="S36HEAD")
    for path in paths:
        archive.ingest.store_copy(path, cli_actor())
    token = archive.users.create_token("admin", "tests", origin="cli")
    with serving(archive, _slow_page) as url:
        yield {"archive": archive, "url": url, "port": archive.settings.http_port,
               "paths": paths, "token": token, "ehr": archive.ehr_launches.add("epr")}
    archive.close()


# -- raw connections ----------------------------------------------------------------------------


class Raw:
    """A raw TCP connection to the server, to send exactly what an attacker would."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> bool:
        """False once the server has closed the connection."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def answered(self, wait: float) -> bool:
        """Whether the server sent something (or closed) within ``wait`` seconds."""
        return bool(self.buffer) or bool(select.select([self.sock], [], [], wait)[0])

    def rest(self, wait: float = 3.0) -> tuple[bytes, bool]:
        """What the server sends within ``wait`` seconds, and whether it closed."""
        data, self.buffer = self.buffer, b""
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([self.sock], [], [], left)[0]:
                break
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return data, True
            if not chunk:
                return data, True
            data += chunk
        return data, False

    def answer(self) -> tuple[str, dict[str, str], bytes]:
        """One whole answer with a Content-Length: status line, headers, body."""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, f"closed before an answer: {self.buffer[:200]!r}"
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            chunk = self.sock.recv(65536)
            assert chunk, "closed in the middle of an answer"
            self.buffer += chunk
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, headers, body


def trickle(conn: Raw, pieces: Iterable[bytes], every: float, give_up: float) -> float:
    """Send ``pieces`` one every ``every`` seconds until the server answers or closes (or
    ``give_up`` seconds pass); returns the seconds it took."""
    started = time.monotonic()
    for piece in pieces:
        if not conn.send(piece) or conn.answered(every):
            break
        if time.monotonic() - started > give_up:
            break
    return time.monotonic() - started


def _request(path: str = "/healthz", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode()


def _is_408(data: bytes) -> None:
    assert data.startswith(b"HTTP/1.1 408 "), data[:200]
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"content-type: application/problem+json" in head.lower()
    assert b'"status": 408' in body


# -- slow request heads -------------------------------------------------------------------------


def test_a_request_head_trickled_byte_by_byte_gets_408_and_the_connection_is_closed(site):
    conn = Raw(site["port"])
    try:
        endless = (b"GET /healthz HTTP/1.1\r\nHost: test\r\n" + b"X-Slow: a\r\n" * 1000)
        took = trickle(conn, (bytes([b]) for b in endless), 0.05, 10)
        data, closed = conn.rest()
    finally:
        conn.close()
    _is_408(data)
    assert closed
    # not cut before its time (asyncio may run a timer up to its clock's resolution early)
    assert HEAD_SECONDS - 0.05 <= took < HEAD_SECONDS + 2


def test_a_slow_but_complete_head_and_a_kept_alive_connection_are_served(site):
    conn = Raw(site["port"])
    try:
        for _ in range(3):  # three requests, each head sent in pieces, idle time between
            request = _request()
            for piece in (request[:10], request[10:25], request[25:]):
                assert conn.send(piece)
                time.sleep(HEAD_SECONDS / 4)
            status, headers, body = conn.answer()
            assert status == "HTTP/1.1 200 OK", (status, body)
            assert b'"status":"ok"' in body.replace(b" ", b"")
            assert headers.get("connection") != "close"
            time.sleep(HEAD_SECONDS * 0.7)
    finally:
        conn.close()


def test_a_connection_that_asks_nothing_is_closed_quietly(site):
    conn = Raw(site["port"])
    try:
        data, closed = conn.rest(HEAD_SECONDS + 2)
    finally:
        conn.close()
    assert (data, closed) == (b"", True)


def test_blank_lines_trickled_on_a_kept_alive_connection_do_not_hold_it_open(site):
    """Each byte used to put off the idle connection's end, and blank lines before a request
    start none, so a few bytes a second held the connection for ever."""
    conn = Raw(site["port"])
    try:
        assert conn.send(_request())
        assert conn.answer()[0] == "HTTP/1.1 200 OK"
        took = trickle(conn, (b"\r\n" for _ in range(1000)), 0.2, 8)
        data, closed = conn.rest()
    finally:
        conn.close()
    assert closed, "the connection was held open"
    assert took < HEAD_SECONDS + 2
    assert data == b"" or data.startswith(b"HTTP/1.1 408 ")


def test_a_request_sent_ahead_of_a_slow_answer_does_not_cut_into_that_answer(site):
    """A client may send its next request before the answer to the first one (pipelining);
    the part of it sent meanwhile is not late while the server is busy with the first."""
    conn = Raw(site["port"])
    try:
        following = _request()
        assert conn.send(_request("/slow-for-test") + following[:12])
        status, _headers, body = conn.answer()
        assert (status, body) == ("HTTP/1.1 200 OK", b"slow answer")
        assert conn.send(following[12:])
        status, _headers, body = conn.answer()
        assert status == "HTTP/1.1 200 OK", (status, body)
    finally:
        conn.close()


# -- slow request bodies ------------------------------------------------------------------------


def _stow_head(token: str, length: int, content_type: str) -> bytes:
    return (f"POST /dicomweb/studies HTTP/1.1\r\nHost: test\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: {content_type}\r\n"
            f"Accept: application/dicom+json\r\nContent-Length: {length}\r\n\r\n").encode()


def _upload(tmp_path: Path, patient: str) -> tuple[bytes, str, list[str]]:
    paths = ct_series(tmp_path / patient, count=6, size=192, patient_id=patient)
    body, content_type = encode_multipart([p.read_bytes() for p in paths])
    return body, content_type, [dcmread(p).SOPInstanceUID for p in paths]


def _stored(archive: Any, sops: list[str]) -> list[str]:
    return [sop for sop in sops if archive.retrieve.header(sop) is not None]


def test_a_body_trickled_below_the_rate_is_cut_off_with_408_and_nothing_is_stored(
        site, tmp_path, caplog):
    body, content_type, sops = _upload(tmp_path, "S36SLOW")
    conn = Raw(site["port"])
    try:
        assert conn.send(_stow_head(site["token"], len(body), content_type))
        pieces = (body[i:i + 100] for i in range(0, len(body), 100))  # 1 KB a second
        took = trickle(conn, pieces, 0.1, 10)
        data, closed = conn.rest()
    finally:
        conn.close()
    _is_408(data)
    assert b"slower than" in data
    assert closed
    assert took < BODY_SECONDS + 2
    assert _stored(site["archive"], sops) == []
    time.sleep(1)  # the application has seen the client go
    assert list(site["archive"].settings.staging_dir.iterdir()) == []
    # a client cut off (or gone) is no server error: no error logged for each attacker
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_large_upload_at_a_decent_rate_passes_well_beyond_the_first_window(site, tmp_path):
    body, content_type, sops = _upload(tmp_path, "S36FAST")
    assert len(body) > 3 * BODY_SECONDS * BODY_MIN_RATE
    conn = Raw(site["port"])
    try:
        assert conn.send(_stow_head(site["token"], len(body), content_type))
        started, piece = time.monotonic(), len(body) // 30
        for i in range(0, len(body), piece):  # at about 4 times the least rate
            assert conn.send(body[i:i + piece])
            time.sleep(piece / (4 * BODY_MIN_RATE))
        assert time.monotonic() - started > 2 * BODY_SECONDS
        status, _headers, answer = conn.answer()
    finally:
        conn.close()
    assert status == "HTTP/1.1 200 OK", answer[:300]
    assert sorted(_stored(site["archive"], sops)) == sorted(sops)


# -- HEAD ---------------------------------------------------------------------------------------


def _same_answer(got: httpx.Response, head: httpx.Response, vary: set[str]) -> None:
    assert head.status_code == got.status_code
    assert head.content == b""
    assert set(head.headers) == set(got.headers)
    for name in set(got.headers) - {"date"} - vary:
        assert head.headers[name] == got.headers[name], name


def test_head_of_healthz_and_of_a_staff_page_answers_like_get_without_a_body(site):
    with httpx.Client(base_url=site["url"]) as client:
        _same_answer(client.get("/healthz"), client.head("/healthz"), set())
        signed_in = client.post("/api/session", json={
            "username": "clin", "password": CLINICIAN_PASSWORD, "code": ""})
        assert signed_in.status_code == 200
        got = client.get("/search", headers={"Accept": "text/html"})
        head = client.head("/search", headers={"Accept": "text/html"})
        assert got.status_code == 200 and "<form" in got.text
        # the page carries a fresh CSP nonce and form token each time: so does its length
        _same_answer(got, head, {"content-length", "content-security-policy"})


@pytest.mark.parametrize("path", ["/search", "/api/me", "/admin/users", "/shares",
                                  "/dicomweb/studies?PatientID=S36HEAD"])
def test_head_without_sign_in_is_refused_exactly_like_get(site, path):
    with httpx.Client(base_url=site["url"]) as anonymous:
        got, head = anonymous.get(path), anonymous.head(path)
    assert got.status_code in (303, 401, 403)
    _same_answer(got, head, {"content-length"})


def test_head_of_a_page_beyond_ones_role_is_refused_exactly_like_get(site):
    with httpx.Client(base_url=site["url"]) as clinician:
        clinician.post("/api/session", json={
            "username": "clin", "password": CLINICIAN_PASSWORD, "code": ""})
        got, head = clinician.get("/admin/users"), clinician.head("/admin/users")
    assert got.status_code == 403
    _same_answer(got, head, {"content-length"})


def test_head_of_a_wado_rs_instance_keeps_its_own_handler(site):
    ds = dcmread(site["paths"][0], stop_before_pixels=True)
    url = (f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
           f"/instances/{ds.SOPInstanceUID}")
    archive = site["archive"]
    before = len(list(archive.audit.events(action="study.retrieve",
                                           study_uid=ds.StudyInstanceUID)))
    with httpx.Client(base_url=site["url"],
                      headers={"Authorization": f"Bearer {site['token']}"}) as client:
        head = client.head(url, headers={"Accept": "application/dicom"})
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-type"].startswith("application/dicom; transfer-syntax=")
    # its own HEAD reads no pixels and is audited as a metadata read, not a retrieval
    assert len(list(archive.audit.events(action="study.retrieve",
                                         study_uid=ds.StudyInstanceUID))) == before
    assert list(archive.audit.events(action="study.metadata", study_uid=ds.StudyInstanceUID))


def test_head_of_a_streamed_study_download_ends_promptly_and_stops_reading(
        site, monkeypatch):
    archive = site["archive"]
    opened = []
    read = archive.retrieve.open

    def slow_open(inst: Any) -> Any:
        opened.append(inst.sop_uid)
        time.sleep(0.05)  # a slow store: the whole study takes about 2 s
        return read(inst)

    monkeypatch.setattr(archive.retrieve, "open", slow_open)
    monkeypatch.setattr(multipart, "_PIECE", 65536)  # pieces of a few instances each
    study = dcmread(site["paths"][0], stop_before_pixels=True).StudyInstanceUID
    with httpx.Client(base_url=site["url"], timeout=30,
                      headers={"Authorization": f"Bearer {site['token']}"}) as client:
        started = time.monotonic()
        head = client.head(f"/dicomweb/studies/{study}")
        answered = time.monotonic() - started
        assert (head.status_code, head.content) == (200, b"")
        assert head.headers["content-type"].startswith("multipart/related")
        assert answered < 1.5  # GET takes 2 s and more
        time.sleep(1.5)  # long enough for the whole study, were it still being read
        assert len(opened) < STUDY_SIZE / 4
        opened.clear()
        got = client.get(f"/dicomweb/studies/{study}")  # while GET reads it all
    assert got.status_code == 200 and len(opened) == STUDY_SIZE


def test_head_of_a_signed_ehr_launch_link_does_not_sign_in_or_spend_it(site):
    """A launch link opens once; a link checker asking with HEAD must not use it up."""
    study = dcmread(site["paths"][0], stop_before_pixels=True).StudyInstanceUID
    url = launch_url(site["ehr"], requestType="STUDY", studyUID=study)
    with httpx.Client(base_url=site["url"]) as checker:
        head = checker.head(url)
    assert head.status_code == 405
    assert "set-cookie" not in head.headers
    with httpx.Client(base_url=site["url"]) as browser:
        opened = browser.get(url, headers={"Accept": "text/html"})
        assert opened.status_code == 200, opened.text[:300]
        assert browser.get("/api/me").json()["username"] == "clin"


# -- HSTS ---------------------------------------------------------------------------------------


HSTS = "max-age=31536000"


def test_hsts_is_sent_over_https_and_not_over_plain_http(site, tmp_path_factory):
    require_tool("openssl")
    from tests.pki import make_pki

    pki = make_pki(tmp_path_factory.mktemp("pki"))
    folder = tmp_path_factory.mktemp("s36-tls")
    archive = make_archive(folder, http_port=free_port(), tls_certificate=str(pki.server.cert),
                           tls_private_key=str(pki.server.key))
    try:
        with serving(archive) as url, httpx.Client(
                base_url=url, verify=ssl.create_default_context(cafile=str(pki.ca))) as client:
            assert url.startswith("https://")
            for answer in (client.get("/healthz"), client.get("/api/me"),
                           client.get("/no-such-page"), client.head("/healthz")):
                assert answer.headers["strict-transport-security"] == HSTS, answer.url
    finally:
        archive.close()
    with httpx.Client(base_url=site["url"]) as plain:
        for answer in (plain.get("/healthz"), plain.get("/api/me"), plain.head("/healthz")):
            assert "strict-transport-security" not in answer.headers


def test_hsts_follows_https_at_a_trusted_proxy_only(site, tmp_path):
    says_https = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "10.1.2.3"}
    with httpx.Client(base_url=site["url"]) as behind_proxy:  # 127.0.0.1 is trusted there
        assert behind_proxy.get("/healthz", headers=says_https).headers[
            "strict-transport-security"] == HSTS
    archive = make_archive(tmp_path, http_port=free_port(), trusted_proxies="10.9.9.9")
    try:
        with serving(archive) as url, httpx.Client(base_url=url) as stranger:
            answer = stranger.get("/healthz", headers=says_https)
            assert answer.status_code == 200
            assert "strict-transport-security" not in answer.headers
    finally:
        archive.close()
