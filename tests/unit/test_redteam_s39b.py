"""Red team of what landed in session 39 (second pass): FHIR page links a search by POST
hands out that cannot be followed (a 500, or an address too long for the server), page
tokens decrypted whatever their size, the audit page's free-text filter missing what it was
asked for (a name in another case outside ASCII, a file name with accents or quotes in an
event's detail) or failing on text that is not Unicode, an EHR launch that decided an
account's stage on its own instead of asking effective_role, and an ended upload invitation
told "this upload was sent already"."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from imageshare.access import policy
from imageshare.audit.trail import AuditEvent
from imageshare.domain.actors import Actor
from imageshare.domain.errors import Forbidden
from imageshare.ehr.launch import sign_launch
from imageshare.fhir.page_seal import MAX_PAGE_TOKEN, MAX_SEARCH_FIELDS
from imageshare.storage.index.schema import upload_invitations
from imageshare.uploads.invitations import UploadRequest
from imageshare.web.server import create_app
from tests.conftest import act_as_admin, make_archive, make_started_archive
from tests.factory import ct_series
from tests.mail import smtp_server

FHIR = {"Accept": "application/fhir+json"}
HTML = {"Accept": "text/html"}
PASSWORD = "red-team-s39b-password"
SYSTEM = Actor("system", "tests", "admin", "tests")
STAFF = Actor("user", "clerk", "radiographer", "127.0.0.1")
HOSPITAL = "urn:imageshare:hospital-number"


# -- FHIR page links of a search by POST ---------------------------------------------------------


@pytest.fixture(scope="module")
def fhir_world(tmp_path_factory):
    """H3901 has one study; clin is a clinician with an API token."""
    tmp = tmp_path_factory.mktemp("s39b-fhir")
    archive = make_archive(tmp, http_host="127.0.0.1", http_port=26700)
    for path in ct_series(tmp / "ct", 1, patient_id="H3901", patient_name="Private^Pat"):
        archive.ingest.store_copy(path, SYSTEM)
    archive.users.add("clin", PASSWORD, "clinician")
    token = archive.users.create_token("clin", "ehr")
    with TestClient(create_app(archive),
                    headers={"Authorization": f"Bearer {token}", **FHIR}) as client:
        yield {"archive": archive, "client": client}
    archive.close()


def test_a_search_by_post_hands_out_no_page_link_that_cannot_be_followed(fhir_world):
    """A search by POST of the most parameters a search takes: its page links add _count and
    _offset, which made the link's sealed search longer than the limit, and following it
    (even the self link) ended in a server error. The search is refused naming the limit."""
    ehr = fhir_world["client"]
    form = [("status", "available")] * (MAX_SEARCH_FIELDS - 1)
    answer = ehr.post("/fhir/ImagingStudy/_search", content=urlencode(form),
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    if answer.status_code == 200:  # then every link it gives must work
        for link in answer.json()["link"]:
            followed = ehr.get(link["url"])
            assert followed.status_code == 200, (link["relation"], followed.status_code)
        pytest.fail("a search whose page links carry more than the limit was answered")
    assert answer.status_code == 400, answer.text
    said = answer.json()["issue"][0]["diagnostics"]
    assert f"at most {MAX_SEARCH_FIELDS} parameters" in said and "_count" in said
    # one parameter fewer fits, and its self link is followed
    fits = ehr.post("/fhir/ImagingStudy/_search",
                    content=urlencode([("status", "available")] * (MAX_SEARCH_FIELDS - 2)),
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert fits.status_code == 200, fits.text
    assert ehr.get(fits.json()["link"][0]["url"]).status_code == 200


def test_a_search_by_get_hands_out_no_page_link_that_would_be_refused(fhir_world):
    """199 parameters are taken, but the page links add _count and _offset, and a link of
    201 parameters was refused when followed. The search is refused naming the limit."""
    ehr = fhir_world["client"]
    answer = ehr.get("/fhir/ImagingStudy?"
                     + urlencode([("status", "available")] * (MAX_SEARCH_FIELDS - 1)))
    if answer.status_code == 200:
        for link in answer.json()["link"]:
            followed = ehr.get(link["url"])
            assert followed.status_code == 200, (link["relation"], followed.text)
    assert answer.status_code == 400, answer.text
    assert "_count and _offset" in answer.json()["issue"][0]["diagnostics"]
    with_count = [("_count", "5"), *[("status", "available")] * (MAX_SEARCH_FIELDS - 2)]
    fits = ehr.get("/fhir/ImagingStudy?" + urlencode(with_count))
    assert fits.status_code == 200, fits.text
    assert ehr.get(fits.json()["link"][0]["url"]).status_code == 200


def test_a_page_token_longer_than_any_the_server_makes_is_refused_unopened(fhir_world):
    """A _page value longer than any link the server hands out is refused before it is
    decrypted, even one made with the server's own key (here: a real seal of a long search
    that still fits within the longest address the server takes)."""
    archive, ehr = fhir_world["archive"], fhir_world["client"]
    clin = Actor("user", "clin", "clinician", "127.0.0.1")
    query = urlencode([("_count", "1"), *[("status", "available")] * 10,
                       ("patient.identifier", f"{HOSPITAL}|H3901")]) + "&_offset=0"
    token = ""
    for size in range(6000, 0, -10):  # _pretty is ignored by the search, whatever its value
        token = archive.fhir_pages.seal(f"{query}&_pretty={'x' * size}", clin)
        if len(token) <= 8100:
            break
    assert MAX_PAGE_TOKEN < len(token) <= 8100
    refused = ehr.get("/fhir/ImagingStudy?" + urlencode({"_page": token}))
    assert refused.status_code == 410, refused.text
    assert refused.json()["resourceType"] == "OperationOutcome"
    # the same search sealed at an ordinary size is followed
    ordinary = archive.fhir_pages.seal(query, clin)
    assert len(ordinary) <= MAX_PAGE_TOKEN
    followed = ehr.get("/fhir/ImagingStudy?" + urlencode({"_page": ordinary}))
    assert followed.status_code == 200, followed.text
    assert followed.json()["total"] == 1
    for link in followed.json()["link"]:
        assert set(dict(parse_qsl(urlsplit(link["url"]).query))) == {"_page"}


# -- the audit trail's free-text filter ----------------------------------------------------------


def _record(archive, actor_name: str, **detail: str) -> None:
    archive.audit.record(AuditEvent(actor=Actor("user", actor_name, "clinician", "10.1.2.3"),
                                    action="share.create", outcome="success", detail=detail))


def test_the_audit_filter_finds_a_name_outside_ascii_in_any_case(any_archive):
    archive = any_archive
    """SQLite's lower() folds ASCII letters only: JÓZEF did not find józef."""
    _record(archive, "józef")
    _record(archive, "anna")
    found = [e["actor"] for e in archive.audit.events(text="JÓZEF")]
    assert found == ["user:józef"]
    assert [e["actor"] for e in archive.audit.events(text="Józef")] == ["user:józef"]


def test_the_audit_filter_finds_text_in_a_detail_as_it_was_written(any_archive):
    """An event's detail is kept as JSON (accents written \\u00e9, quotes \\"): a file name
    with an accent or a quoted reason was never found."""
    archive = any_archive
    _record(archive, "anna", file="Zdjęcie kolana.jpg")
    _record(archive, "anna", reason='patient said "wrong knee"')
    _record(archive, "anna", file="other.jpg")
    assert [e["detail"]["file"] for e in archive.audit.events(text="zdjęcie")] == [
        "Zdjęcie kolana.jpg"]
    assert [e["detail"]["file"] for e in archive.audit.events(text="ZDJĘCIE KOL")] == [
        "Zdjęcie kolana.jpg"]
    assert [e["detail"]["reason"] for e in archive.audit.events(text='"wrong knee"')] == [
        'patient said "wrong knee"']
    # wildcards stay themselves
    assert list(archive.audit.events(text="%")) == []
    assert list(archive.audit.events(text="_")) == []


def test_the_audit_filter_takes_text_that_is_not_unicode_or_has_nul(any_archive):
    """A lone surrogate (bytes that were not UTF-8, decoded with surrogateescape) made the
    database refuse the query; a NUL is matched as the trail writes it (U+FFFD)."""
    archive = any_archive
    archive.audit.record(AuditEvent(actor=Actor("user", "x\x00y", "clinician", "10.1.2.3"),
                                    action="share.create", outcome="success"))
    _record(archive, "anna")
    # not an error: what cannot be stored is asked for as the trail stores it (U+FFFD)
    assert [e["actor"] for e in archive.audit.events(text="\udcff")] == ["user:x\ufffdy"]
    assert [e["actor"] for e in archive.audit.events(text="x\x00y")] == ["user:x\ufffdy"]
    assert list(archive.audit.events(action="share.create\x00")) == []


def test_the_audit_page_answers_any_text_and_records_what_was_asked(any_archive):
    """The audit page asked for a NUL (PostgreSQL refuses NUL in text) or bytes that are
    not UTF-8: it answers (nothing found), and audit.read records the filter applied."""
    archive = any_archive
    _record(archive, "józef")
    with TestClient(create_app(archive)) as admin:
        act_as_admin(admin, archive)
        for asked, applied in (("%00", ""), ("a%00b", "a b"), ("%FF%FE", "\ufffd\ufffd"),
                               ("J%C3%93ZEF", "JÓZEF")):
            page = admin.get(f"/admin/audit?text={asked}&action=share.create%00",
                             headers=HTML)
            assert page.status_code == 200, (asked, page.status_code)
            read = next(archive.audit.events(action="audit.read", limit=1))
            assert read["detail"].get("text", "") == applied, asked
    found = [e["actor"] for e in archive.audit.events(action="share.create", text="JÓZEF")]
    assert found == ["user:józef"]


# -- EHR launch and the stages of signing in -----------------------------------------------------


def _launch(secret: str, user: str) -> str:
    items = [("requestType", "STUDY"), ("studyUID", "1.2.826.0.1.3939"), ("ehr", "epr"),
             ("user", user), ("expires", str(int(time.time()) + 120)),
             ("nonce", f"n-{time.monotonic_ns()}-s39b")]
    return "/iid?" + urlencode([*items, ("signature", sign_launch(items, secret))])


def test_an_ehr_launch_opens_only_an_account_effective_role_gives_its_whole_role(
        archive, monkeypatch):
    """A hospital requiring a second factor of clinicians too (policy.SECOND_FACTOR_ROLES):
    a clinician who has not set one up may only enrol on every channel, and a launch link
    must not open their account either. The launch asked its own questions (a temporary
    password, the administrator role) instead of effective_role, and let them in."""
    archive.users.add("clin", PASSWORD, "clinician")
    secret = archive.ehr_launches.add("epr")
    with TestClient(create_app(archive)) as browser:
        opened = browser.get(_launch(secret, "clin"), headers=HTML, follow_redirects=False)
        assert opened.status_code != 403, opened.text
        assert browser.get("/api/me").json()["username"] == "clin"
    monkeypatch.setattr(policy, "SECOND_FACTOR_ROLES", frozenset({"admin", "clinician"}))
    with TestClient(create_app(archive)) as browser:
        refused = browser.get(_launch(secret, "clin"), headers=HTML, follow_redirects=False)
        assert refused.status_code == 403, refused.text
        assert "second factor" in refused.text
        assert browser.get("/api/me").status_code == 401
    reasons = [e["detail"].get("reason") for e in archive.audit.events(action="ehr.launch")
               if e["outcome"] == "refused"]
    assert reasons == ["second-factor"]


# -- an ended upload invitation ------------------------------------------------------------------


@pytest.fixture
def hospital(tmp_path):
    """An archive with a real SMTP server and a public URL (invitations are mailed)."""
    with smtp_server() as (_sink, port):
        built = make_started_archive(tmp_path, smtp_host="127.0.0.1", smtp_port=port,
                                     public_url="https://images.hospital.example")
        try:
            yield built
        finally:
            built.close()


def test_an_expired_upload_invitation_says_it_ended_on_its_date_and_to_ask_again(hospital):
    archive = hospital
    archive.users.add("clerk", PASSWORD, "radiographer")
    invitations = archive.uploads.invitations
    created = invitations.invite(UploadRequest(patient_name="Lovelace^Ada",
                                               hospital_number="H100",
                                               email="ada@home.example"), STAFF)
    ended = datetime(2026, 11, 3, 9, 30, tzinfo=UTC)
    with archive.engine.begin() as conn:
        conn.execute(update(upload_invitations)
                     .where(upload_invitations.c.public_id == created.public_id)
                     .values(expires_at=ended))
    invitation = invitations.by_public_id(created.public_id)
    assert invitation.state == "expired"
    with pytest.raises(Forbidden) as refused:
        invitations.require_open(invitation)
    said = str(refused.value)
    assert "sent already" not in said
    assert "ended on 3 November 2026" in said
    assert "ask the hospital for a new link" in said
    assert "H100" not in said and "Lovelace" not in said
    # still open: nothing to refuse
    with archive.engine.begin() as conn:
        conn.execute(update(upload_invitations)
                     .where(upload_invitations.c.public_id == created.public_id)
                     .values(expires_at=datetime.now(UTC) + timedelta(days=1)))
    invitations.require_open(invitations.by_public_id(created.public_id))


def test_a_method_a_route_does_not_take_is_answered_405_naming_the_methods_it_does(tmp_path):
    """RFC 9110 15.5.6: a 405 names the methods the resource takes (Allow); the error
    handler dropped the header the framework gave it."""
    archive = make_archive(tmp_path)
    try:
        with TestClient(create_app(archive)) as client:
            for method in ("PUT", "DELETE", "PATCH"):
                answer = client.request(method, "/healthz")
                assert answer.status_code == 405, (method, answer.text)
                assert "GET" in answer.headers.get("Allow", ""), (method, answer.headers)
    finally:
        archive.close()
