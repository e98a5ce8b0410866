"""Red team of the web application (session 39): a link checker or mail scanner asking with
HEAD (a share's download built and audited, notifications marked read), a service account
signing in to the browser with its password, a FHIR search by POST whose page links put the
patient's number back into URLs, FHIR links taken from a Host header anyone can send, a
search with too many parameters told something untrue, and a recipient told only "not
right" after a wrong passcode."""

from __future__ import annotations

import base64
import re
import shutil
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
from fastapi.testclient import TestClient

from imageshare.access.passcodes import MAX_PASSCODE_FAILURES
from imageshare.domain.actors import Actor
from imageshare.sharing.links import NewShare
from imageshare.web.server import HeadAsGet, _flat_routes, create_app
from tests.conftest import make_archive, require
from tests.factory import ct_series

HTML = {"Accept": "text/html"}
FHIR = {"Accept": "application/fhir+json"}
PASSWORD = "red-team-s39-password"
OWNER = Actor("user", "sono", "sonographer", "127.0.0.1")
SYSTEM = Actor("system", "tests", "admin", "tests")
HOSPITAL = "urn:imageshare:hospital-number"


def _events(archive, action: str) -> list[dict]:
    return list(archive.audit.events(action=action))


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1.2.3", path)


# -- HEAD ---------------------------------------------------------------------------------------


@pytest.fixture
def shared(archive, tmp_path):
    """A de-identified share of a two-slice CT, downloads allowed."""
    archive.users.add("sono", PASSWORD, "sonographer")
    paths = ct_series(tmp_path / "ct", 2, patient_id="H3939", patient_name="Secret^Sam")
    study = [archive.ingest.store_copy(p, OWNER) for p in paths][0].study_uid
    return archive.shares.create(NewShare(study, allow_download=True), OWNER, None)


def test_head_of_a_share_download_builds_no_zip_and_records_no_download(archive, shared):
    """A download manager or scanner asking HEAD of an opened link's download: nothing is
    built, nothing is recorded as downloaded; GET still downloads (and is recorded once)."""
    require(shutil.which("tesseract") is not None, "Tesseract OCR (Debian package tesseract-ocr)")
    staging = archive.settings.staging_dir
    with TestClient(create_app(archive)) as browser:
        opened = browser.post(shared.path, data={"passcode": shared.passcode}, headers=HTML,
                              follow_redirects=False)
        assert opened.status_code == 303
        before = set(staging.iterdir()) if staging.exists() else set()
        head = browser.head(shared.path + "/download")
        assert head.status_code == 405
        assert head.headers["allow"] == "GET"
        assert head.content == b""
        assert _events(archive, "share.download") == []
        assert (set(staging.iterdir()) if staging.exists() else set()) == before
        got = browser.get(shared.path + "/download")
    assert got.status_code == 200 and got.content[:2] == b"PK"
    assert len(_events(archive, "share.download")) == 1


def test_head_of_notifications_leaves_them_unread(archive):
    archive.users.add("sono", PASSWORD, "sonographer")
    archive.notifier.notify("sono", "share.locked", "A share link was locked", "/shares/x")
    with TestClient(create_app(archive)) as browser:
        signed_in = browser.post("/login", data={"username": "sono", "password": PASSWORD},
                                 headers=HTML, follow_redirects=False)
        assert signed_in.status_code == 303
        head = browser.head("/notifications", headers=HTML)
        assert head.status_code == 405 and head.headers["allow"] == "GET"
        assert archive.notifier.unread("sono") == 1
        assert browser.get("/notifications", headers=HTML).status_code == 200
    assert archive.notifier.unread("sono") == 0


def test_every_get_route_not_opted_in_answers_head_405_without_running(archive, anonymous):
    """The rule covers routes added later by default: a GET route answers HEAD as GET only
    when HeadAsGet.HEAD_AS_GET names it; every other one answers 405 with Allow, its handler
    (and even its authorisation) never run: nothing is audited."""
    routes = _flat_routes(create_app(archive).router.routes)
    own_head = {path for path, methods in routes if "HEAD" in methods}
    gets = {path for path, methods in routes if "GET" in methods} - own_head
    assert HeadAsGet.HEAD_AS_GET <= gets  # no name there is a typo
    refused = sorted(gets - HeadAsGet.HEAD_AS_GET)
    assert {"/s/{token}/download", "/notifications", "/iid", "/logbook.{format}",
            "/my/studies/{study_uid}/download", "/api/jobs/{job_id}/file",
            "/studies/{study_uid}/sites"} <= set(refused)
    before = len(list(archive.audit.events()))
    for path in refused:
        head = anonymous.head(_concrete(path), follow_redirects=False)
        assert head.status_code == 405, path
        assert "GET" in head.headers["allow"].split(", "), path
        assert "HEAD" not in head.headers["allow"], path
    assert len(list(archive.audit.events())) == before


def test_head_of_an_opted_in_route_still_answers_like_get(anonymous):
    got, head = anonymous.get("/healthz"), anonymous.head("/healthz")
    assert (head.status_code, head.content) == (got.status_code, b"")
    assert head.headers["content-length"] == got.headers["content-length"]
    assert anonymous.head("/s/no-such-link", headers=HTML).status_code == 404


# -- machine accounts in the browser -----------------------------------------------------------


@pytest.mark.parametrize("role", ["service", "site"])
def test_a_machine_account_gets_no_browser_session_and_is_told_why(archive, role):
    archive.users.add("machine", PASSWORD, role)
    with TestClient(create_app(archive)) as browser:
        page = browser.post("/login", data={"username": "machine", "password": PASSWORD},
                            headers=HTML, follow_redirects=False)
        assert page.status_code == 403
        assert "for a program" in page.text and "API token" in page.text
        assert "set-cookie" not in page.headers
        assert browser.get("/api/me").status_code == 401
        as_json = browser.post("/api/session", json={"username": "machine",
                                                     "password": PASSWORD})
        assert as_json.status_code == 403
        assert "API token" in as_json.json()["detail"]
        assert "set-cookie" not in as_json.headers
        wrong = browser.post("/login", data={"username": "machine", "password": "not-it"},
                             headers=HTML, follow_redirects=False)
        assert wrong.status_code == 401 and "for a program" not in wrong.text
    refusals = [e for e in _events(archive, "session.start") if e["outcome"] == "refused"]
    assert len(refusals) == 2
    assert all(e["actor"] == "user:machine" and e["detail"]["reason"] == "machine account"
               for e in refusals)
    assert not [e for e in _events(archive, "session.start") if e["outcome"] == "success"]
    # HTTP Basic, its way in, still works
    basic = base64.b64encode(f"machine:{PASSWORD}".encode()).decode()
    with TestClient(create_app(archive), headers={"Authorization": f"Basic {basic}"}) as program:
        assert program.get("/api/me").status_code == 200


def test_a_person_still_signs_in(archive):
    archive.users.add("sono", PASSWORD, "sonographer")
    with TestClient(create_app(archive)) as browser:
        page = browser.post("/login", data={"username": "sono", "password": PASSWORD},
                            headers=HTML, follow_redirects=False)
        assert page.status_code == 303
        assert browser.get("/api/me").json()["username"] == "sono"


# -- FHIR --------------------------------------------------------------------------------------


FHIR_PORT = 26103


@pytest.fixture(scope="module")
def fhir_world(tmp_path_factory):
    """H3900 has three studies; no public URL is configured; the server listens on
    127.0.0.1:26103 (not bound: the client is in-process)."""
    tmp = tmp_path_factory.mktemp("s39-fhir")
    archive = make_archive(tmp, http_host="127.0.0.1", http_port=FHIR_PORT)
    for n, date in enumerate(("20230101", "20240101", "20250101")):
        for path in ct_series(tmp / f"s{n}", 1, patient_id="H3900",
                              patient_name="Private^Pat", StudyDate=date):
            archive.ingest.store_copy(path, SYSTEM)
    archive.users.add("clin", PASSWORD, "clinician")
    archive.users.add("other", PASSWORD, "clinician")
    app = create_app(archive)
    yield {"archive": archive, "app": app}
    archive.close()


def _fhir(world, username: str = "clin") -> TestClient:
    token = world["archive"].users.create_token(username, "ehr")
    return TestClient(world["app"], headers={"Authorization": f"Bearer {token}", **FHIR})


def _links(bundle: dict) -> dict[str, str]:
    return {link["relation"]: link["url"] for link in bundle["link"]}


def test_the_page_links_of_a_search_by_post_never_carry_its_parameters(fhir_world):
    wanted = {"patient.identifier": f"{HOSPITAL}|H3900", "_count": "1"}
    with _fhir(fhir_world) as ehr:
        first = ehr.post("/fhir/ImagingStudy/_search", data=wanted)
        assert first.status_code == 200, first.text
        links = _links(first.json())
        for url in links.values():
            assert "H3900" not in url and "identifier" not in url, url
            assert set(dict(parse_qsl(urlsplit(url).query))) == {"_page"}
        seen = [first.json()["entry"][0]["resource"]["id"]]
        nxt = ehr.get(links["next"])
        assert nxt.status_code == 200, nxt.text
        second = nxt.json()
        seen.append(second["entry"][0]["resource"]["id"])
        following = _links(second)
        assert "H3900" not in following["next"] and "H3900" not in following["previous"]
        third = ehr.get(following["next"]).json()
        seen.append(third["entry"][0]["resource"]["id"])
        assert "next" not in _links(third)
        back = ehr.get(_links(third)["previous"]).json()
        assert back["entry"][0]["resource"]["id"] == seen[1]
        # the same search by GET finds the same three studies, newest first
        by_get = ehr.get("/fhir/ImagingStudy", params={"patient.identifier":
                                                       f"{HOSPITAL}|H3900"}).json()
    assert seen == [e["resource"]["id"] for e in by_get["entry"]]
    assert len(set(seen)) == 3
    # another caller, or a page link with a search of its own added, opens nothing
    with _fhir(fhir_world, "other") as stranger:
        theirs = stranger.get(links["next"])
        assert theirs.status_code == 410
        assert theirs.json()["resourceType"] == "OperationOutcome"
    with _fhir(fhir_world) as ehr:
        mixed = ehr.get(links["next"] + "&patient.identifier=" + f"{HOSPITAL}|H1")
        assert mixed.status_code == 400
        assert ehr.get("/fhir/ImagingStudy?_page=not-a-page-link").status_code == 410


def test_fhir_links_never_take_their_host_from_the_request(fhir_world):
    with _fhir(fhir_world) as ehr:
        found = ehr.get("/fhir/ImagingStudy", params={"_count": "1"},
                        headers={"Host": "evil.example"})
        read = ehr.get(f"/fhir/ImagingStudy/{found.json()['entry'][0]['resource']['id']}",
                       headers={"Host": "evil.example"})
        capability = ehr.get("/fhir/metadata", headers={"Host": "evil.example"})
    assert found.status_code == read.status_code == capability.status_code == 200
    for answer in (found, read, capability):
        assert "evil.example" not in answer.text
    ours = f"http://127.0.0.1:{FHIR_PORT}/fhir"
    bundle = found.json()
    assert all(url.startswith(ours + "/ImagingStudy?") for url in _links(bundle).values())
    assert bundle["entry"][0]["fullUrl"].startswith(ours + "/ImagingStudy/")
    assert capability.json()["implementation"]["url"] == ours


def test_a_search_with_too_many_parameters_is_told_the_limit(fhir_world):
    fields = [("modality", "CT")] * 201
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    with _fhir(fhir_world) as ehr:
        by_post = ehr.post("/fhir/ImagingStudy/_search", content=urlencode(fields),
                           headers=form)
        by_get = ehr.get("/fhir/ImagingStudy", params=fields)
        in_both = ehr.post("/fhir/ImagingStudy/_search?modality=CT",
                           content=urlencode(fields[:200]), headers=form)
    for answer in (by_post, by_get, in_both):
        assert answer.status_code == 400
        outcome = answer.json()
        assert outcome["resourceType"] == "OperationOutcome"
        diagnostics = outcome["issue"][0]["diagnostics"]
        assert "at most 200 parameters" in diagnostics
        assert "UTF-8" not in diagnostics


# -- a wrong passcode --------------------------------------------------------------------------


def test_a_wrong_passcode_says_how_many_tries_are_left_and_where_the_passcode_comes_from(
        archive, shared):
    with TestClient(create_app(archive)) as recipient:
        for tried in range(1, MAX_PASSCODE_FAILURES):
            wrong = recipient.post(shared.path, data={"passcode": "WRONG1"}, headers=HTML)
            assert wrong.status_code == 401
            left = MAX_PASSCODE_FAILURES - tried
            said = "1 more try" if left == 1 else f"{left} more tries"
            assert f"{said} before this link locks" in wrong.text
            assert "by phone or text message" in wrong.text
            for secret in ("H3939", "Secret", "Sam", shared.public_id):
                assert secret not in wrong.text
        locked = recipient.post(shared.path, data={"passcode": "WRONG1"}, headers=HTML)
        assert locked.status_code == 410
        assert "more tr" not in locked.text
        assert recipient.post(shared.path, data={"passcode": shared.passcode},
                              headers=HTML).status_code == 410


def test_the_first_page_of_a_link_says_how_the_passcode_is_given(archive, shared):
    with TestClient(create_app(archive)) as recipient:
        first = recipient.get(shared.path, headers=HTML)
    assert first.status_code == 200
    assert "by phone or text message" in first.text
    assert "more tries" not in first.text
