"""Red team of the web application (session 37), replaying known attacks as an outsider, a
patient, a reviewer, a partner site and staff: downloads and images of patient data that a
browser or proxy could keep, a session cookie a sibling host could plant, a share link or
invitation opened in a browser by another site's page, the HTTP server's own refusals over
TLS without HSTS, and a client that asks for an answer and never reads it."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from imageshare.storage.index.schema import background_jobs
from imageshare.web import server as web_server
from imageshare.web.server import HSTS, create_app
from tests.conftest import ADMIN_PASSWORD, make_archive, require_tool
from tests.factory import ct_series
from tests.peers import free_port
from tests.unit.test_attack_replay_s31 import _upload_invitation, inviting  # noqa: F401
from tests.unit.test_closed_inbox import HOSPITAL
from tests.unit.test_http_attacks_s36 import serving
from tests.unit.test_patient_account_links import (  # noqa: F401 - its fixture
    _invite_by_staff,
    _sign_up,
    hospital,
)
from tests.unit.test_sessions import enrol_two_factor, next_code
from tests.unit.test_web_pages import HTML, PASSWORD, SYSTEM, browser_sign_in, csrf_of

NO_STORE = "no-store"


@pytest.fixture
def admin_browser(archive, anonymous):
    """The administrator signed in with a browser (password and code)."""
    totp = enrol_two_factor(archive, "admin")
    assert browser_sign_in(anonymous, "admin", ADMIN_PASSWORD,
                           code=next_code(totp)).status_code == 303
    return anonymous


# -- downloads of patient data are kept by no cache -------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "pdf"])
def test_a_downloaded_access_report_is_kept_by_no_browser_or_proxy_cache(
        archive, admin_browser, tmp_path, fmt):
    """A subject access report names the patient and everyone who saw their images: saved
    from a shared computer's browser, it must not stay in its cache (nor a proxy's)."""
    [path] = ct_series(tmp_path / "ct", 1, size=16, patient_id="H37", patient_name="Doe^Jane")
    archive.ingest.store_copy(path, SYSTEM)
    form = admin_browser.get("/admin/reports", headers=HTML)
    answer = admin_browser.post("/admin/reports/patient", headers=HTML, data={
        "csrf_token": csrf_of(form.text), "patient_id": "H37", "format": fmt})
    assert answer.status_code == 200
    assert answer.headers["content-disposition"].startswith("attachment;")
    assert answer.headers.get("cache-control") == NO_STORE
    assert answer.headers.get("x-content-type-options") == "nosniff"


def test_a_patients_own_download_is_kept_by_no_browser_or_proxy_cache(hospital):  # noqa: F811
    """A patient downloading their images on a library or family computer: the zip of their
    images must not stay in its browser's cache."""
    archive, sink, studies = hospital
    clerk = TestClient(create_app(archive))
    browser_sign_in(clerk, "clerk", "patients-password")
    ada = _sign_up(archive, _invite_by_staff(archive, sink, clerk, "ada@home.example",
                                             "H100"), "ada")
    answer = ada.get(f"/my/studies/{studies['H100']}/download")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/zip"
    assert answer.headers.get("cache-control") == NO_STORE


def test_a_fhir_error_naming_what_was_asked_is_kept_by_no_cache(client):
    """FHIR answers are private (no-store); its errors were not, though a 404 is cacheable
    by default and can name the study or hospital number asked for."""
    fhir = {"Accept": "application/fhir+json"}
    missing = client.get("/fhir/ImagingStudy/1.2.3.4.5", headers=fhir)
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/fhir+json")
    assert missing.headers.get("cache-control") == NO_STORE
    refused = client.get("/fhir/ImagingStudy?patient.identifier=H1&_format=text/csv",
                         headers=fhir)
    assert refused.status_code >= 400 and refused.headers.get("cache-control") == NO_STORE


# -- JSON bodies: a field the route does not define is refused, never ignored ------------------


@pytest.mark.parametrize(("path", "body", "field"), [
    # Misspelt, the zip would be made unencrypted, or of the whole study.
    ("/api/studies/{study}/exports", {"format": "zip", "pasword": "a-long-secret"},
     "body.pasword"),
    ("/api/studies/{study}/exports", {"series_uid": ["1.2.3"]}, "body.series_uid"),
    ("/api/studies/{study}/exports", {"deidentify": True, "owner": "admin"}, "body.owner"),
    ("/api/studies/{study}/consent", {"purpose": "teaching", "decision": "granted",
                                      "given_on": "2026-01-02", "source": "verbal",
                                      "notes": "by phone", "recorded_by": "dr.other"},
     "body.notes"),
    ("/api/studies/{study}/annotations", {"sop_uid": "1.2.3", "marks": [], "author": "x"},
     "body.author"),
])
def test_a_json_body_field_the_route_does_not_define_is_refused_and_nothing_is_done(
        archive, client, tmp_path, path, body, field):
    """A misspelt or extra field was silently dropped: an export asked for with a password
    came out unencrypted, a consent's note was lost. Refused like the share and token
    bodies, naming the field, and nothing is queued or recorded."""
    [ct] = ct_series(tmp_path / "ct", 1, size=16, patient_id="H37", patient_name="Doe^Jane")
    study = archive.ingest.store_copy(ct, SYSTEM).study_uid
    answer = client.post(path.format(study=study), json=body)
    assert answer.status_code == 422, answer.text
    assert field in answer.json()["detail"]
    with archive.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(background_jobs)).scalar() == 0
    assert archive.consents.history(study, SYSTEM) == []


# -- passcodes posted by another site's page (login CSRF into a link) --------------------------


ELSEWHERE = [{"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
             {"Origin": "null"}]


@pytest.mark.parametrize("headers", ELSEWHERE)
def test_another_site_cannot_open_its_share_link_in_a_browser(archive, anonymous, tmp_path,
                                                              headers):
    """A page elsewhere posting a share link's passcode would open that link in the
    victim's browser (what they then write goes to the sender's share): refused like a
    sign-in from elsewhere, without costing the link a try; typed on the link's own page
    it opens."""
    from imageshare.sharing.links import NewShare

    [path] = ct_series(tmp_path / "ct", 1, size=16, patient_id="H37", patient_name="Doe^Jane")
    study = archive.ingest.store_copy(path, SYSTEM).study_uid
    created = archive.shares.create(NewShare(study), SYSTEM, None)
    posted = anonymous.post(created.path, data={"passcode": created.passcode},
                            headers={**HTML, **headers}, follow_redirects=False)
    assert posted.status_code == 403 and "another web site" in posted.text
    assert "imageshare_link" not in posted.headers.get("set-cookie", "")
    assert anonymous.get(created.path + "/case", headers=HTML,
                         follow_redirects=False).status_code in (303, 401)
    assert [e["detail"].get("reason") for e in archive.audit.events("share.passcode")
            ] == ["sent from another site"]
    typed = anonymous.post(created.path, data={"passcode": created.passcode},
                           headers={**HTML, "Origin": "http://testserver",
                                    "Sec-Fetch-Site": "same-origin"},
                           follow_redirects=False)
    assert typed.status_code == 303 and "imageshare_link=" in typed.headers["set-cookie"]


@pytest.mark.parametrize("headers", ELSEWHERE)
def test_another_site_cannot_open_an_invitation_to_upload_in_a_browser(inviting, headers):
    """The same for an invitation to upload: opened from elsewhere, the victim would send
    their images into the sender's invitation (and the uploader's own session would end)."""
    created = _upload_invitation(inviting)
    with TestClient(create_app(inviting)) as browser:
        posted = browser.post(created.path, data={"passcode": created.passcode},
                              headers={**HTML, **headers}, follow_redirects=False)
        assert posted.status_code == 403 and "another web site" in posted.text
        assert "imageshare_upload" not in posted.headers.get("set-cookie", "")
        assert [e["detail"].get("reason") for e in inviting.audit.events("upload.passcode")
                ] == ["sent from another site"]
        typed = browser.post(created.path, data={"passcode": created.passcode},
                             headers={**HTML, "Sec-Fetch-Site": "same-origin"},
                             follow_redirects=False)
        assert typed.status_code == 303
        assert "imageshare_upload=" in typed.headers["set-cookie"]


# -- the HTTP server itself -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_site(tmp_path_factory) -> Iterator[str]:
    """A real server over HTTPS with a one-second limit on request heads; its base URL."""
    require_tool("openssl")
    from tests.pki import make_pki

    pki = make_pki(tmp_path_factory.mktemp("pki"))
    folder = tmp_path_factory.mktemp("s37-tls")
    archive = make_archive(folder, http_port=free_port(), tls_certificate=str(pki.server.cert),
                           tls_private_key=str(pki.server.key))
    context = ssl.create_default_context(cafile=str(pki.ca))
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(web_server, "HEAD_SECONDS", 1.0)
            with serving(archive) as url:
                yield url, context
    finally:
        archive.close()


def _raw_answer(url: str, context: ssl.SSLContext, request: bytes) -> bytes:
    """What the server answers ``request`` sent over one TLS connection, until it closes."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        if request:
            tls.sendall(request)
        answer = b""
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            while chunk := tls.recv(65536):
                answer += chunk
    return answer


@pytest.mark.parametrize("request_bytes, status", [
    (b"NOT HTTP AT ALL\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n", b"431"),
    (b"GET /healthz HTTP/1.1\r\nHost: local", b"408"),  # the rest never comes
])
def test_the_servers_own_refusals_over_https_say_hsts_too(tls_site, request_bytes, status):
    """A browser's first answer from the host may be the server's own 400, 408 or 431: over
    TLS it says HSTS like every answer of the application."""
    url, context = tls_site
    answer = _raw_answer(url, context, request_bytes)
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 " + status), head[:40]
    assert b"strict-transport-security: " + HSTS in head


ANSWER_BYTES = 64 << 20  # far more than the socket buffers on the way hold


def _endless_download(app: FastAPI) -> None:
    async def big() -> StreamingResponse:
        async def chunks():
            block = b"\0" * (1 << 20)
            for _ in range(ANSWER_BYTES >> 20):
                yield block
        return StreamingResponse(chunks(), media_type="application/octet-stream",
                                 headers={"Content-Length": str(ANSWER_BYTES)})

    app.add_api_route("/big-for-test", big, methods=["GET"])


def test_a_client_that_never_reads_its_answer_is_let_go(tmp_path, monkeypatch):
    """A client asking for a large download and then reading nothing held the connection and
    its handler for ever (the server waited for the window to open); it is dropped once it
    has read nothing for the write time limit, and a client that reads gets its answer."""
    monkeypatch.setattr(web_server, "WRITE_SECONDS", 1.0)
    let_go = threading.Event()
    too_slow = web_server.LimitedHttpProtocol._write_too_slow

    def noted(protocol: web_server.LimitedHttpProtocol) -> None:
        too_slow(protocol)
        if protocol.transport.is_closing():
            let_go.set()

    monkeypatch.setattr(web_server.LimitedHttpProtocol, "_write_too_slow", noted)
    archive = make_archive(tmp_path, http_port=free_port())
    try:
        with serving(archive, _endless_download) as url:
            port = int(url.rsplit(":", 1)[1])
            with socket.socket() as stalled:
                stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                stalled.connect(("127.0.0.1", port))
                stalled.sendall(b"GET /big-for-test HTTP/1.1\r\nHost: x\r\n\r\n")
                # Reads nothing until the server let it go (however long a busy machine
                # takes to fill the buffers and run the timer).
                assert let_go.wait(60), "the server still waits for a client that never reads"
                stalled.settimeout(10)
                received = 0
                with contextlib.suppress(ConnectionError, TimeoutError):
                    while chunk := stalled.recv(1 << 20):
                        received += len(chunk)
            assert received < ANSWER_BYTES // 2  # cut off, not served on and on
            with socket.create_connection(("127.0.0.1", port), timeout=10) as reader:
                reader.sendall(b"GET /big-for-test HTTP/1.1\r\nHost: x\r\n"
                               b"Connection: close\r\n\r\n")
                got = 0
                while chunk := reader.recv(1 << 20):
                    got += len(chunk)
            assert got > ANSWER_BYTES  # head and the whole body
    finally:
        archive.close()


def test_images_of_a_study_waiting_in_the_inbox_are_kept_by_no_cache(client, archive,
                                                                       tmp_path):
    """The inbox viewer shows another hospital's patient before anyone accepted the study:
    its images must not stay in a browser's or proxy's cache (a study rejected, or opened on
    a shared workstation), as every DICOMweb answer of the archive's own is kept by none."""
    theirs = [archive.ingest.store_copy(p, HOSPITAL)
              for p in ct_series(tmp_path / "theirs", 3, size=16, patient_id="SENT9",
                                 patient_name="Sent^Patient")]
    (item,) = archive.inbox.items()
    base = (f"/inbox/{item.pk}/dicomweb/studies/{theirs[0].study_uid}/series/"
            f"{theirs[0].series_uid}")
    sop = theirs[0].sop_instance_uid
    for path in (f"{base}/thumbnail", f"{base}/instances/{sop}/rendered",
                 f"{base}/instances/{sop}/frames/1/rendered"):
        answer = client.get(path, headers={"Accept": "image/png"})
        assert answer.status_code == 200 and answer.content[:4] == b"\x89PNG", path
        assert answer.headers.get("cache-control") == NO_STORE, path
        assert answer.headers.get("x-content-type-options") == "nosniff", path


# -- the session cookie ------------------------------------------------------------------------


def test_over_https_the_session_cookie_is_host_only_and_a_planted_plain_one_is_not_read(
        archive):
    """Over HTTPS the session cookie is ``__Host-`` prefixed, Secure, HttpOnly, SameSite=
    Strict, for / of this host: a sibling host of the hospital's domain cannot plant one.
    A plainly named cookie holding a live session (planted by such a host, to fix the
    victim's browser in the planter's session) is not read; over plain HTTP (development,
    tests) the cookie keeps its plain name."""
    archive.users.add("sono", PASSWORD, "sonographer")
    archive.users.add("mallory", PASSWORD, "sonographer")
    with TestClient(create_app(archive), base_url="https://images.example") as browser:
        signed_in = browser_sign_in(browser, "sono", PASSWORD)
        assert signed_in.status_code == 303
        cookie = signed_in.headers["set-cookie"]
        assert cookie.startswith("__Host-imageshare_session=")
        attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
        assert {"secure", "httponly", "samesite", "path"} <= attributes
        assert "domain" not in attributes
        assert browser.get("/api/me").json()["username"] == "sono"
        out = browser.post("/logout", headers=HTML, follow_redirects=False, data={
            "csrf_token": csrf_of(browser.get("/account", headers=HTML).text)})
        assert out.status_code == 303
        assert out.headers["set-cookie"].startswith('__Host-imageshare_session="";')
        assert "secure" in out.headers["set-cookie"].lower()
    planted, _csrf = archive.sessions.start("mallory", "testclient")
    with TestClient(create_app(archive), base_url="https://images.example") as victim:
        victim.cookies.set("imageshare_session", planted)
        assert victim.get("/api/me").status_code == 401
        assert victim.get("/account", headers=HTML, follow_redirects=False).headers[
            "location"].startswith("/login")
    with TestClient(create_app(archive)) as plain:  # http://testserver
        answer = browser_sign_in(plain, "sono", PASSWORD)
        assert answer.headers["set-cookie"].startswith("imageshare_session=")
        assert "secure" not in answer.headers["set-cookie"].lower()
        assert plain.get("/api/me").json()["username"] == "sono"


@pytest.mark.parametrize("sent_by", [{"Sec-Fetch-Site": "cross-site"},
                                     {"Origin": "https://attacker.example"}])
def test_another_sites_page_cannot_act_with_a_browsers_stored_basic_credentials(
        archive, anonymous, sent_by):
    """A browser that once answered an HTTP Basic prompt sends those credentials with every
    request to the server, also a form another site's page posts: a route with no body
    (cancel a job) ran as its user. Refused (403) and the job stays queued; a program (no
    Origin, no Fetch Metadata) and the browser's own pages still act."""
    archive.users.add("clin", "a long password 1", "clinician")
    job = archive.jobs.submit("clin", "later", "Something later", {})
    credentials = ("clin", "a long password 1")
    forged = anonymous.post(f"/api/jobs/{job.id}/cancel", auth=credentials, headers=sent_by)
    assert forged.status_code == 403
    assert archive.jobs.get(job.id, "clin").state == "queued"
    own = anonymous.post(f"/api/jobs/{job.id}/cancel", auth=credentials,
                         headers={"Sec-Fetch-Site": "same-origin"})
    assert own.status_code == 200 and own.json()["state"] == "cancelled"
