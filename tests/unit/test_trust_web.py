"""Issue 10, the HTTP, sign-in and sharing attacks: each one tried again, and now refused.

Second factor on every channel, identifiable shares at item level with their rights and their
passcode, shares only to real accounts (or bound invitations), marks per recipient, Basic
failures throttled and audited without an account lockout anyone can trigger, password
changes that end sessions, links only from the public address, searches that keep patient
details out of URLs, marks saved whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError, InvalidInstance
from imageshare.sharing.links import NewShare
from imageshare.storage.index.schema import shares, users
from imageshare.web.server import create_app
from tests.conftest import ADMIN_PASSWORD, make_archive, make_started_archive
from tests.factory import ct_series, us_cine
from tests.mail import smtp_server
from tests.unit.test_sessions import enrol_two_factor, next_code
from tests.unit.test_web_pages import HTML, browser_sign_in, csrf_of

PASSWORD = "a-long-password"
OWNER = Actor("user", "sono", "sonographer", "127.0.0.1")


def client_for(archive, address: str = "testclient") -> TestClient:
    """Another browser or program, calling from ``address``."""
    return TestClient(create_app(archive), client=(address, 50000))


ROLES = {"sono": "sonographer", "drno": "reviewer", "clin": "clinician"}


def accounts(archive, *names: str) -> None:
    """Make the accounts a test needs (each password hash costs time on purpose)."""
    for name in names:
        archive.users.add(name, PASSWORD, ROLES[name])


@pytest.fixture
def study(archive, tmp_path):
    """One patient's study: a CT series of three slices and a colour ultrasound clip."""
    uid = archive.ingest.store_copy(us_cine(tmp_path / "us", frames=4, patient_id="H4242",
                                            patient_name="Hopper^Grace"), OWNER).study_uid
    for path in ct_series(tmp_path / "ct", 3, patient_id="H4242", patient_name="Hopper^Grace",
                          study_uid=uid):
        archive.ingest.store_copy(path, OWNER)
    record = archive.catalogue.record(uid)
    ct = next(s for s in record.series if s.modality == "CT")
    us = next(s for s in record.series if s.modality == "US")
    return {"uid": uid, "ct": ct, "us": us}


def open_link(client, created):
    return client.post(created.path, data={"passcode": created.passcode}, headers=HTML,
                       follow_redirects=False)


def series_uids(answer) -> set[str]:
    return {item["0020000E"]["Value"][0] for item in answer.json()} if answer.content else set()


# -- item 1: the second factor on every channel ------------------------------------------------


def test_an_admin_without_a_second_factor_can_only_enrol_over_http_basic(archive, anonymous):
    basic = ("admin", ADMIN_PASSWORD)
    assert anonymous.get("/api/me", auth=basic).json() == {"username": "admin",
                                                            "role": "enrolling"}
    made = anonymous.post("/admin/users", auth=basic, data={
        "username": "backdoor", "role": "admin", "password": "backdoor-password"})
    assert made.status_code == 403
    assert "backdoor" not in [a.username for a in archive.users.accounts()]
    assert anonymous.post("/api/tokens", auth=basic, json={"name": "forever"}).status_code == 403
    assert archive.users.tokens("admin") == []
    assert anonymous.get("/dicomweb/studies", auth=basic).status_code == 403
    assert anonymous.post("/api/nodes", auth=basic, json={
        "ae_title": "EVIL", "host": "10.9.9.9", "port": 104}).status_code == 403
    assert anonymous.get("/api/audit", auth=basic).status_code == 403
    denied = [e for e in archive.audit.events("access.denied") if e["actor"] == "user:admin"]
    assert len(denied) == 5


def test_tokens_of_an_unenrolled_admin_only_work_when_made_on_the_command_line(archive,
                                                                               anonymous):
    web = {"Authorization": f"Bearer {archive.users.create_token('admin', 'old')}"}
    cli = {"Authorization": "Bearer " + archive.users.create_token("admin", "job", "cli")}
    assert anonymous.get("/dicomweb/studies", headers=web).status_code == 403
    assert anonymous.post("/api/tokens", headers=web, json={"name": "x"}).status_code == 403
    assert anonymous.get("/dicomweb/studies", headers=cli).status_code in (200, 204)
    enrol_two_factor(archive, "admin")
    assert anonymous.get("/dicomweb/studies", headers=web).status_code in (200, 204)


def test_the_command_line_makes_tokens_marked_as_its_own(tmp_path, capsys):
    from imageshare.cli import main

    archive = make_archive(tmp_path)
    archive.users.ensure_admin(ADMIN_PASSWORD)
    archive.close()
    assert main(["user", "token", "admin", "--data-dir", str(tmp_path / "data")]) == 0
    printed = capsys.readouterr().out.strip()
    archive = make_archive(tmp_path)
    try:
        assert [t["origin"] for t in archive.users.tokens("admin")] == ["cli"]
        assert archive.users.authenticate_token(printed).role == "admin"
    finally:
        archive.close()


def test_a_full_session_of_an_unenrolled_admin_still_only_enrols(archive, anonymous):
    secret, _csrf = archive.sessions.start("admin", "testclient", "full")
    anonymous.cookies.set("imageshare_session", secret)
    assert anonymous.get("/api/me").json()["role"] == "enrolling"
    assert anonymous.get("/api/nodes").status_code == 403


def test_programs_never_reach_page_forms_that_change_something(archive, anonymous, study):
    accounts(archive, "clin")
    uid = study["uid"]
    token = {"Authorization": "Bearer " + archive.users.create_token("clin", "script")}
    for credentials in ({"auth": ("clin", PASSWORD)}, {"headers": {**HTML, **token}}):
        kwargs = {"headers": HTML, **credentials}
        answer = anonymous.post(f"/studies/{uid}/comments", data={"body": "forged"}, **kwargs)
        assert answer.status_code == 403
        assert anonymous.get(f"/studies/{uid}", **kwargs).status_code == 200  # reading is fine
    assert archive.comments.for_study(uid) == []


# -- item 2: an identifiable share gives exactly its items and rights ----------------------------


def test_an_identifiable_share_reaches_only_its_items_with_only_its_rights(archive, anonymous,
                                                                           study):
    accounts(archive, "drno")
    uid, ct, us = study["uid"], study["ct"], study["us"]
    created = archive.shares.create(NewShare(
        uid, series_uids=(ct.series_uid,), recipient_user="drno", deidentified=False,
        allow_download=False, allow_comment=False), OWNER, None)
    token = {"Authorization": "Bearer " + archive.users.create_token("drno", "viewer")}
    browser_sign_in(anonymous, "drno")
    # Before the passcode: nothing at all, on any route.
    assert anonymous.get(f"/studies/{uid}", headers=HTML).status_code == 403
    assert anonymous.get("/dicomweb/studies", headers=token).status_code == 403
    assert anonymous.get(f"/viewer/{uid}", headers=HTML).status_code == 403
    assert open_link(anonymous, created).status_code == 303

    page = anonymous.get(f"/studies/{uid}", headers=HTML)
    assert page.status_code == 200 and ct.series_uid in page.text
    assert us.series_uid not in page.text
    viewer = anonymous.get(f"/viewer/{uid}", headers=HTML)
    assert ct.series_uid in viewer.text and us.series_uid not in viewer.text
    [found] = anonymous.get("/dicomweb/studies", headers=token).json()
    assert found["00201206"]["Value"] == [1] and found["00201208"]["Value"] == [3]
    assert found["00080061"]["Value"] == ["CT"]
    base = f"/dicomweb/studies/{uid}"
    assert series_uids(anonymous.get(f"{base}/series", headers=token)) == {ct.series_uid}
    assert len(anonymous.get(f"{base}/instances", headers=token).json()) == 3
    ct_sop, us_sop = ct.instances[0].sop_uid, us.instances[0].sop_uid
    ct_path = f"{base}/series/{ct.series_uid}/instances/{ct_sop}"
    us_path = f"{base}/series/{us.series_uid}/instances/{us_sop}"
    assert anonymous.get(f"{ct_path}/metadata", headers=token).status_code == 200
    assert anonymous.get(f"{ct_path}/rendered", headers=token).status_code == 200
    for unshared in (f"{us_path}/metadata", f"{us_path}/rendered",
                     f"{base}/series/{us.series_uid}/metadata"):
        assert anonymous.get(unshared, headers=token).status_code == 404, unshared
    # View only: no DICOM files, nor their stored pixels (frames, bulk data: with the
    # metadata they make the file again), no exports, no comments, no marks.
    assert anonymous.get(ct_path, headers=token).status_code == 403
    for pixels in (f"{ct_path}/frames/1", f"{ct_path}/bulkdata/7FE00010",
                   f"{us_path}/frames/1"):
        assert anonymous.get(pixels, headers={**token, "Accept": 'multipart/related; '
                             'type="application/octet-stream"; transfer-syntax=*'}
                             ).status_code == 403, pixels
    assert anonymous.get(base, headers=token).status_code == 403
    assert anonymous.post(f"/api/studies/{uid}/exports", headers=token, json={}
                          ).status_code == 403
    csrf = csrf_of(page.text)
    assert anonymous.post(f"/studies/{uid}/comments", headers=HTML,
                          data={"body": "x", "csrf_token": csrf}).status_code == 403
    assert anonymous.post(f"/api/studies/{uid}/annotations", headers={"X-CSRF-Token": csrf},
                          json={"sop_uid": ct_sop, "marks": []}).status_code == 403
    results = anonymous.post("/search", headers=HTML, data={"csrf_token": csrf, "q": "hopper"})
    assert results.status_code == 200 and f"/studies/{uid}" in results.text

    # A second share of the clip, with download and comments: its own rights, item by item.
    second = archive.shares.create(NewShare(
        uid, series_uids=(us.series_uid,), recipient_user="drno", deidentified=False,
        allow_download=True), OWNER, None)
    open_link(anonymous, second)
    assert anonymous.get(us_path, headers=token).status_code == 200
    assert anonymous.get(ct_path, headers=token).status_code == 404  # still view-only
    assert anonymous.post(f"/studies/{uid}/comments", headers=HTML,
                          data={"body": "Seen", "csrf_token": csrf}).status_code == 200
    archive.shares.revoke(second.public_id, OWNER)
    assert anonymous.get(us_path, headers=token).status_code == 403


def test_an_identifiable_share_link_needs_its_recipient_signed_in_before_the_passcode(
        archive, anonymous, study):
    accounts(archive, "drno", "clin")
    created = archive.shares.create(NewShare(study["uid"], recipient_user="drno",
                                             deidentified=False), OWNER, None)
    assert open_link(anonymous, created).status_code == 403  # not signed in
    browser_sign_in(anonymous, "clin")
    assert open_link(anonymous, created).status_code == 403  # someone else
    share = archive.shares.by_public_id(created.public_id, "sono")
    assert share.opened_at is None and share.failed_attempts == 0
    refusals = [e for e in archive.audit.events("share.passcode") if e["outcome"] == "failure"]
    assert len(refusals) == 2


# -- item 3: identifiable shares go only to real accounts, or to bound invitations --------------


@pytest.fixture
def mailing(tmp_path) -> Iterator[tuple]:
    """An archive that sends e-mail to a real SMTP server; its public URL is set."""
    with smtp_server() as (sink, port):
        built = make_started_archive(tmp_path, smtp_host="127.0.0.1", smtp_port=port,
                                     public_url="https://images.hospital.example")
        built.users.ensure_admin(ADMIN_PASSWORD)
        built.users.add("sono", PASSWORD, "sonographer")
        uid = built.ingest.store_copy(us_cine(tmp_path / "us", frames=2, patient_id="H77",
                                              patient_name="Lovelace^Ada"), OWNER).study_uid
        try:
            yield built, sink, uid
        finally:
            built.close()


def test_identifiable_shares_go_only_to_existing_accounts(archive, study):
    with pytest.raises(ImageShareError, match="no user account 'ghost'"):
        archive.shares.create(NewShare(study["uid"], recipient_user="ghost",
                                       deidentified=False), OWNER, None)
    assert archive.shares.owned("sono") == []


def test_an_identifiable_share_to_an_address_binds_the_account_its_invitation_makes(mailing):
    archive, sink, uid = mailing
    created = archive.shares.create_and_send(NewShare(
        uid, recipient_email="mentor@elsewhere.example", deidentified=False), OWNER, None)
    archive.shares.mailer.flush()
    bodies = sink.bodies("mentor@elsewhere.example")
    assert len(bodies) == 2  # the link, and the invitation to make the account
    secret = re.search(r"/invite/([\w-]+)", "".join(bodies)).group(1)
    with TestClient(create_app(archive)) as guest:
        assert guest.post(f"/invite/{secret}", headers=HTML, follow_redirects=False, data={
            "username": "mentor", "password": PASSWORD}).status_code == 303
        share = archive.shares.by_public_id(created.public_id, "sono")
        assert share.recipient_user == "mentor"
        browser_sign_in(guest, "mentor")
        assert guest.get(f"/studies/{uid}", headers=HTML).status_code == 403
        open_link(guest, created)
        assert guest.get(f"/studies/{uid}", headers=HTML).status_code == 200


def test_an_invitation_cannot_take_the_name_a_share_points_at(mailing):
    archive, _sink, uid = mailing
    archive.users.add("victim", PASSWORD, "reviewer")
    created = archive.shares.create(NewShare(uid, recipient_user="victim",
                                             deidentified=False), OWNER, None)
    # A share made before this rule, naming an account that no longer exists by that name.
    with archive.engine.begin() as conn:
        conn.execute(update(shares).values(recipient_user="departed"))
    secret = archive.users.invite("anyone@elsewhere.example", "sono")
    with TestClient(create_app(archive)) as guest:
        taken = guest.post(f"/invite/{secret}", headers=HTML,
                           data={"username": "departed", "password": PASSWORD})
        assert taken.status_code == 400 and "not available" in taken.text
        assert guest.get(f"/invite/{secret}", headers=HTML).status_code == 200  # still usable
    # Even an account of that name made otherwise sees nothing without the passcode.
    archive.users.add("departed", PASSWORD, "reviewer")
    assert archive.shares.grants_for(Actor("user", "departed", "reviewer")) == ()
    assert created.passcode


# -- item 8: a share's viewer carries only its own recipient's marks ------------------------------


def test_a_share_viewer_carries_only_its_own_recipients_marks(archive, anonymous, study):
    uid, ct = study["uid"], study["ct"]
    sop = ct.instances[0].sop_uid
    archive.annotations.save(uid, sop, 1, [{"kind": "arrow", "points": [[1, 1], [9, 9]],
                                            "label": "staff only"}], OWNER, "sono", None)
    links = {}
    for email in ("first@elsewhere.example", "second@elsewhere.example"):
        created = archive.shares.create(NewShare(uid, series_uids=(ct.series_uid,),
                                                 recipient_email=email), OWNER, None)
        reader = client_for(archive)
        open_link(reader, created)
        share = archive.shares.by_token(created.path.removeprefix("/s/"))
        public = next(i.public_sop_uid for i in archive.shares.items(share) if i.sop_uid == sop)
        case = reader.get(created.path + "/case", headers=HTML)
        saved = reader.post(created.path + "/annotations", headers={
            "X-CSRF-Token": re.search(r'name="csrf_token" value="([^"]+)"', case.text).group(1)},
            json={"sop_uid": public, "marks": [{"kind": "length", "points": [[2, 2], [8, 8]],
                                                "label": f"by {email[:5]}"}]})
        assert saved.status_code == 200, saved.text
        links[email] = (reader, created)
    for email, (reader, created) in links.items():
        viewer = reader.get(created.path + "/viewer", headers=HTML).text
        manifest = re.search(r'<script id="manifest" type="application/json">(.*?)</script>',
                             viewer, re.S).group(1)
        assert f"by {email[:5]}" in manifest and '"author": "you"' in manifest
        assert "staff only" not in manifest and '"sono"' not in manifest
        for other in links:
            assert other not in manifest
            if other != email:
                assert f"by {other[:5]}" not in manifest


# -- item 11: Basic failures throttled per address and audited; no remote lockout ----------------


def test_http_basic_failures_are_throttled_per_address_and_audited(archive, study):
    accounts(archive, "clin")
    from imageshare.access.throttle import SignInThrottle

    # the default is 20 (each try costs argon2)
    archive.throttle = SignInThrottle(archive.engine, limit=6)
    guesser, colleague = client_for(archive, "203.0.113.9"), client_for(archive, "10.1.1.5")
    for _ in range(6):
        assert guesser.get("/api/me", auth=("clin", "guess")).status_code == 401
    assert guesser.get("/api/me", auth=("clin", PASSWORD)).status_code == 429
    assert guesser.get("/api/me", auth=("someone", PASSWORD)).status_code == 429
    assert colleague.get("/api/me", auth=("clin", PASSWORD)).status_code == 200
    failures = [e for e in archive.audit.events("session.basic")]
    assert len(failures) == 6 and failures[0]["source"] == "203.0.113.9"
    throttled = [e for e in archive.audit.events("access.denied")
                 if e["detail"].get("reason", "").startswith("too many failed")]
    assert len(throttled) == 2


def test_guessing_from_afar_cannot_lock_an_account_out_elsewhere(archive):
    attacker, admin = client_for(archive, "198.51.100.7"), client_for(archive, "10.0.0.2")
    for _ in range(5):
        attacker.post("/api/session", json={"username": "admin", "password": "guess"})
    # the attacker's own address is locked out (even with the right password) ...
    assert attacker.post("/api/session", json={"username": "admin",
                                                "password": ADMIN_PASSWORD}).status_code == 401
    # ... the administrator at their own desk is not
    signed = admin.post("/api/session", json={"username": "admin", "password": ADMIN_PASSWORD})
    assert signed.status_code == 200 and signed.json()["stage"] == "enrol"
    assert archive.users.account("admin").locked


# -- item 12: password changes end sessions; e-mail links only from the public address ------------


def test_a_password_change_ends_the_accounts_other_sessions(archive, study):
    accounts(archive, "clin")
    here, elsewhere = client_for(archive), client_for(archive, "10.2.2.2")
    token = {"Authorization": "Bearer " + archive.users.create_token("clin", "pacs-viewer")}
    browser_sign_in(here, "clin")
    browser_sign_in(elsewhere, "clin")
    account = here.get("/account", headers=HTML)
    changed = here.post("/account/password", headers=HTML, data={
        "csrf_token": csrf_of(account.text), "current": PASSWORD, "new": "a-new-password-9"})
    assert changed.status_code == 200 and "every other session" in changed.text
    assert "pacs-viewer" in changed.text  # listed, to revoke
    assert elsewhere.get("/api/me").status_code == 401
    assert here.get("/api/me").status_code == 200
    assert here.get("/api/me", headers=token).status_code == 200
    [event] = archive.audit.events("account.password")
    assert event["detail"]["sessions_ended"] == 1


def test_email_links_are_refused_until_the_public_address_is_set(archive, anonymous, study):
    accounts(archive, "sono")
    browser_sign_in(anonymous, "sono")
    page = anonymous.get(f"/studies/{study['uid']}", headers=HTML)
    refused = anonymous.post(f"/studies/{study['uid']}/share", headers=HTML, data={
        "csrf_token": csrf_of(page.text), "recipient_email": "mentor@elsewhere.example"})
    assert refused.status_code == 409 and "IMAGESHARE_PUBLIC_URL" in refused.text
    assert archive.shares.owned("sono") == []


def test_email_links_never_take_the_requests_host(mailing):
    archive, sink, uid = mailing
    with TestClient(create_app(archive)) as sender:
        browser_sign_in(sender, "sono")
        page = sender.get(f"/studies/{uid}", headers=HTML)
        sender.post(f"/studies/{uid}/share", headers={**HTML, "Host": "attacker.example"},
                    data={"csrf_token": csrf_of(page.text),
                          "recipient_email": "mentor@elsewhere.example"})
    archive.shares.mailer.flush()
    [body] = sink.bodies("mentor@elsewhere.example")
    assert "https://images.hospital.example/s/" in body and "attacker" not in body
    # Notifications by e-mail link to the public address too.
    with archive.engine.begin() as conn:
        conn.execute(update(users).where(users.c.username == "sono")
                     .values(email="unconfirmed@hospital.example"))
    archive.notifier.notify("sono", "share.comment", "A reviewer commented", "/shares/abc")
    archive.shares.mailer.flush()
    assert sink.bodies("unconfirmed@hospital.example") == []  # never confirmed: no mail
    with archive.engine.begin() as conn:
        conn.execute(update(users).where(users.c.username == "sono")
                     .values(email="sono@hospital.example", email_verified_at=datetime.now(UTC)))
    archive.notifier.notify("sono", "share.comment", "A reviewer commented", "/shares/abc")
    archive.shares.mailer.flush()
    [notice] = sink.bodies("sono@hospital.example")
    assert "https://images.hospital.example/shares/abc" in notice


# -- item 13: no patient details in any URL ------------------------------------------------------


class _Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        if tag == "form":
            self.forms.append({"method": (values.get("method") or "get").lower(),
                               "action": values.get("action"), "fields": set()})
        elif tag in ("input", "select", "textarea") and self.forms:
            self.forms[-1]["fields"].add(values.get("name"))
        elif tag == "a" and values.get("href"):
            self.links.append(values["href"])


PATIENT_FIELDS = {"q", "nhs", "nhs_number", "name", "dob", "birth_date", "hospital_number",
                  "family_name", "given_name",
                  "patient_id", "family", "given"}


def test_no_form_or_link_puts_patient_details_in_a_url(archive, anonymous, study):
    accounts(archive, "sono")
    archive.users.set_role("sono", "admin")
    enrol_two_factor_code = enrol_two_factor(archive, "sono")
    browser_sign_in(anonymous, "sono", code=next_code(enrol_two_factor_code))
    csrf = csrf_of(anonymous.get("/", headers=HTML).text)
    pages = ["/", "/search", f"/studies/{study['uid']}", "/exchange", "/account",
             f"/studies/{study['uid']}/patient", "/admin/users", "/shares", "/cases"]
    results = anonymous.post("/search", headers=HTML, data={"csrf_token": csrf, "q": "hopper"})
    many = anonymous.post("/exchange", headers=HTML, data={"csrf_token": csrf, "nhs": "",
                                                           "hospital_number": "H4242"})
    bodies = [anonymous.get(p, headers=HTML).text for p in pages] + [results.text, many.text]
    checked = 0
    for body in bodies:
        parser = _Forms()
        parser.feed(body)
        for form in parser.forms:
            if form["fields"] & PATIENT_FIELDS:
                assert form["method"] == "post", form
                checked += 1
        for link in parser.links:
            query = link.partition("?")[2]
            assert not {p.partition("=")[0] for p in query.split("&")} & PATIENT_FIELDS, link
            assert "H4242" not in link and "opper" not in link
    assert checked >= 6
    assert "Hopper" in results.text
    ignored = anonymous.get("/search?name=Hopper", headers=HTML)
    assert ignored.status_code == 200 and "<h2>Recent studies</h2>" in ignored.text
    token = {"Authorization": "Bearer " + archive.users.create_token("sono", "x")}
    assert anonymous.get("/api/exchange/search?nhs=9434765919", headers=token
                         ).status_code == 405
    assert anonymous.post("/api/exchange/search", headers=token,
                          json={"hospital_number": "H4242"}).status_code == 200


# -- item 15: marks are saved whole, on colour ultrasound too -------------------------------------


def test_marks_on_a_colour_clip_through_a_share_are_saved_with_their_presentation_state(
        archive, study):
    uid, us = study["uid"], study["us"]
    created = archive.shares.create(NewShare(uid, series_uids=(us.series_uid,)), OWNER, None)
    reader = client_for(archive)
    open_link(reader, created)
    share = archive.shares.by_token(created.path.removeprefix("/s/"))
    [item] = archive.shares.items(share)
    case = reader.get(created.path + "/case", headers=HTML)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', case.text).group(1)
    saved = reader.post(created.path + "/annotations", headers={"X-CSRF-Token": csrf},
                        json={"sop_uid": item.public_sop_uid, "frame": 3, "marks": [
                            {"kind": "arrow", "points": [[40, 30], [2, 2]]}]})
    assert saved.status_code == 200 and saved.json() == {"marks": 1}
    states = [s for s in archive.catalogue.record(uid).series if s.modality == "PR"]
    assert [s.instances[0].sop_class_uid for s in states] == ["1.2.840.10008.5.1.4.1.1.11.2"]
    assert archive.annotations.for_share(share.public_id, [item])


class _RefusingIngest:
    """The archive's ingest, refusing every store (as a full disk or a bad header would)."""

    def store_stream(self, *args, **kwargs):
        raise InvalidInstance("refused", "", "")


def test_marks_are_not_kept_when_their_presentation_state_cannot_be_stored(archive, study):
    from imageshare.archive.annotations import AnnotationBook

    book = AnnotationBook(archive.engine, archive.retrieve, _RefusingIngest(), archive.audit)
    sop = study["ct"].instances[0].sop_uid
    with pytest.raises(InvalidInstance):
        book.save(study["uid"], sop, 1, [{"kind": "arrow", "points": [[1, 1], [9, 9]]}],
                  OWNER, "sono", None)
    assert book.for_study(study["uid"]) == {}
