"""A patient account reaches the record it was invited for, and only that: the record is
bound through the one-time invitation the account was made with, never by e-mail address,
so changing the address (which needs the current password) changes nothing it may see."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text

from imageshare.domain.actors import Actor
from imageshare.storage.index.database import make_engine
from imageshare.storage.index.schema import account_invites, patient_accounts
from imageshare.web.server import create_app
from tests.conftest import ADMIN_PASSWORD, make_archive, make_started_archive, upgrade_index
from tests.factory import ct_series
from tests.mail import smtp_server
from tests.unit.test_web_pages import browser_sign_in, csrf_of

PASSWORD = "patients-password"
HTML = {"Accept": "text/html"}
SYSTEM = Actor("system", "t", "admin", "t")


@pytest.fixture
def hospital(tmp_path) -> Iterator[tuple]:
    """An archive with a real SMTP server and its public URL, a clerk, and one accepted
    study in each of the records H100 (Ada) and H200 (Bob)."""
    with smtp_server() as (sink, port):
        archive = make_started_archive(tmp_path, smtp_host="127.0.0.1", smtp_port=port,
                                       public_url="https://images.hospital.example")
        archive.users.ensure_admin(ADMIN_PASSWORD)
        archive.users.add("clerk", PASSWORD, "radiographer")
        studies = {}
        for patient_id, name in (("H100", "Lovelace^Ada"), ("H200", "Babbage^Bob")):
            [path] = ct_series(tmp_path / patient_id, 1, size=16, patient_id=patient_id,
                               patient_name=name)
            studies[patient_id] = archive.ingest.store_copy(path, SYSTEM).study_uid
        try:
            yield archive, sink, studies
        finally:
            archive.close()


def _invite_by_staff(archive, sink, clerk: TestClient, email: str, number: str) -> str:
    """Staff invite a patient on the uploads page; returns the secret e-mailed to them."""
    csrf = csrf_of(clerk.get("/uploads", headers=HTML).text)
    answer = clerk.post("/uploads/patients", headers=HTML, follow_redirects=False, data={
        "csrf_token": csrf, "email": email, "hospital_number": number, "issuer": ""})
    assert answer.status_code == 303, answer.text
    archive.uploads.invitations.mailer.flush()
    return re.findall(r"/invite/([\w-]+)", "".join(sink.bodies(email)))[-1]


def _sign_up(archive, secret: str, username: str) -> TestClient:
    client = TestClient(create_app(archive))
    made = client.post(f"/invite/{secret}", data={"username": username, "password": PASSWORD},
                       follow_redirects=False)
    assert made.status_code in (200, 303), made.text
    assert browser_sign_in(client, username, PASSWORD).status_code == 303
    return client


def _change_email(client: TestClient, email: str, current: str | None):
    csrf = csrf_of(client.get("/account", headers=HTML).text)
    data = {"csrf_token": csrf, "email": email}
    if current is not None:
        data["current"] = current
    return client.post("/account/email", data=data, headers=HTML, follow_redirects=False)


def test_a_patient_who_takes_another_patients_address_still_sees_only_her_own_images(
        hospital):
    archive, sink, studies = hospital
    ada_study, bob_study = studies["H100"], studies["H200"]
    clerk = TestClient(create_app(archive))
    browser_sign_in(clerk, "clerk", PASSWORD)
    ada_secret = _invite_by_staff(archive, sink, clerk, "ada@home.example", "H100")
    bob_secret = _invite_by_staff(archive, sink, clerk, "bob@home.example", "H200")
    ada = _sign_up(archive, ada_secret, "ada")
    # Without her password the address does not change; with it, it does (and is audited).
    assert _change_email(ada, "bob@home.example", None).status_code == 400
    assert _change_email(ada, "bob@home.example", "not-her-password").status_code == 400
    assert archive.users.email_of("ada") == "ada@home.example"
    changed = _change_email(ada, "bob@home.example", PASSWORD)
    assert changed.status_code == 303, changed.text
    assert archive.users.email_of("ada") == "bob@home.example"
    outcomes = [e["outcome"] for e in archive.audit.events("user.email")]
    assert sorted(outcomes) == ["failure", "failure", "success"]
    # Her own images, and nothing of Bob's.
    mine = ada.get("/my", headers=HTML)
    assert mine.status_code == 200
    assert ada_study in mine.text and bob_study not in mine.text
    assert ada.get(f"/my/studies/{ada_study}/download").status_code == 200
    assert ada.get(f"/my/studies/{bob_study}/download").status_code in (403, 404)
    assert ada.get(f"/viewer/{ada_study}", headers=HTML).status_code == 200
    assert ada.get(f"/viewer/{bob_study}", headers=HTML).status_code in (403, 404)
    shared = ada.post(f"/my/studies/{bob_study}/share", headers=HTML, data={
        "csrf_token": csrf_of(mine.text), "email": "dr.who@elsewhere.example", "days": "7"})
    # Refused like any study not hers: not found, nothing made.
    assert shared.status_code == 404 and "no such study" in shared.text.lower()
    assert not [e for e in archive.audit.events("share.create") if e["actor"] == "user:ada"]
    assert archive.uploads.patients.records(Actor("user", "ada", "patient")) == [("H100", "")]
    # Bob signs up later with his own invitation and sees his record, not Ada's.
    bob = _sign_up(archive, bob_secret, "bob")
    bobs = bob.get("/my", headers=HTML)
    assert bob_study in bobs.text and ada_study not in bobs.text
    assert bob.get(f"/my/studies/{bob_study}/download").status_code == 200
    # Changing back and forth changes nothing either.
    assert _change_email(ada, "ada@home.example", PASSWORD).status_code == 303
    assert archive.uploads.patients.records(Actor("user", "ada", "patient")) == [("H100", "")]
    for client in (clerk, ada, bob):
        client.close()


def test_an_account_with_an_invited_address_but_not_made_with_the_invitation_gets_nothing(
        hospital):
    """A patient account made another way (an administrator, another invitation) that holds
    the invited address is not bound to the record; the invitation's own account is."""
    archive, sink, studies = hospital
    archive.uploads.patients.invite("bob@home.example", "H200", "", SYSTEM)
    archive.users.add("mallory", PASSWORD, "patient", email="bob@home.example")
    mallory = Actor("user", "mallory", "patient")
    assert archive.uploads.patients.records(mallory) == []
    assert archive.uploads.patients.grants_for(mallory) == ()
    archive.uploads.invitations.mailer.flush()
    secret = re.findall(r"/invite/([\w-]+)", "".join(sink.bodies("bob@home.example")))[-1]
    archive.users.accept_invitation(secret, "bob", PASSWORD)
    archive.users.set_email("bob", "elsewhere@home.example")
    bob = Actor("user", "bob", "patient")
    assert archive.uploads.patients.records(bob) == [("H200", "")]
    assert [g.study_uid for g in archive.uploads.patients.grants_for(bob)] == [studies["H200"]]
    assert archive.uploads.patients.records(mallory) == []
    assert len(list(archive.audit.events("patient.bind"))) == 1


def test_an_e_mail_change_needs_the_current_password_and_wrong_ones_count(tmp_path):
    archive = make_archive(tmp_path)
    try:
        archive.users.add("sono", PASSWORD, "sonographer", email="sono@example.org")
        with TestClient(create_app(archive)) as client:
            browser_sign_in(client, "sono", PASSWORD)
            page = client.get("/account", headers=HTML)
            assert 'name="current"' in page.text.split('action="/account/email"', 1)[1]
            refused = _change_email(client, "someone@example.org", "")
            assert refused.status_code == 400 and "current password" in refused.text
            assert _change_email(client, "someone@example.org", "wrong-one").status_code == 400
            assert archive.users.email_of("sono") == "sono@example.org"
            assert _change_email(client, "new@example.org", PASSWORD).status_code == 303
            assert archive.users.email_of("sono") == "new@example.org"
        with archive.engine.connect() as conn:
            failures = conn.execute(text(
                "SELECT SUM(failures) FROM login_failures f JOIN users u ON u.pk = f.user_pk "
                "WHERE u.username = 'sono'")).scalar()
        assert failures == 2
    finally:
        archive.close()


def test_a_taken_user_name_leaves_the_invitation_usable_and_unclaimed(hospital):
    archive, sink, _studies = hospital
    archive.uploads.patients.invite("ada@home.example", "H100", "", SYSTEM)
    archive.uploads.invitations.mailer.flush()
    secret = re.findall(r"/invite/([\w-]+)", "".join(sink.bodies("ada@home.example")))[-1]
    with pytest.raises(Exception, match="exists already"):
        archive.users.accept_invitation(secret, "clerk", PASSWORD)
    with archive.engine.connect() as conn:
        row = conn.execute(select(account_invites.c.used_at, account_invites.c.accepted_by)
                           .where(account_invites.c.role == "patient")).one()
    assert row.used_at is None and row.accepted_by == ""
    assert archive.uploads.patients.records(Actor("user", "clerk", "patient")) == []
    assert archive.users.accept_invitation(secret, "ada", PASSWORD) == "patient"
    assert archive.uploads.patients.records(Actor("user", "ada", "patient")) == [("H100", "")]


def test_the_migration_keeps_existing_links_and_links_the_unambiguous_ones(tmp_path):
    """At revision 0026 links were made by e-mail at first use. After 0027: a bound record
    keeps its account unless its invitation made another account; an unbound one is linked
    to its invitation, and a used invitation to the one account made just after it was used,
    whatever address that account has now."""
    data = tmp_path / "data"
    data.mkdir()
    engine = make_engine(f"sqlite:///{data / 'index.sqlite'}")
    upgrade_index(engine, "0026")
    t0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)

    def at(seconds: int) -> datetime:
        return t0 + timedelta(seconds=seconds)

    with engine.begin() as conn:
        for pk, email, created, used in (
                (1, "carol@home.example", at(0), at(100)),   # bound already (first use)
                (2, "dan@home.example", at(10), at(200)),    # signed up, never looked
                (3, "eve@home.example", at(20), None),       # not signed up yet
                (4, "fay@home.example", at(30), at(300)),    # two accounts made at once
                (5, "gus@home.example", at(40), at(300)),
                (6, "hal@home.example", at(50), at(400))):   # taken by mallory's address
            conn.execute(text(
                "INSERT INTO account_invites (pk, token_hash, email, role, invited_by, "
                "created_at, expires_at, used_at) VALUES (:pk, :hash, :email, 'patient', "
                "'clerk', :created, :expires, :used)"), {
                    "pk": pk, "hash": f"{pk:064d}", "email": email, "created": created,
                    "expires": created + timedelta(days=14), "used": used})
            conn.execute(text(
                "INSERT INTO patient_accounts (email, username, patient_id, issuer, "
                "invited_by, created_at) VALUES (:email, :user, :pid, '', 'clerk', "
                ":created)"), {"email": email,
                               "user": {1: "carol", 6: "mallory"}.get(pk, ""),
                               "pid": f"H{pk}00", "created": created + timedelta(
                                   milliseconds=5)})
        for username, email, created in (
                ("carol", "carol@home.example", at(101)),
                ("dan", "eve@home.example", at(201)),  # changed his address to Eve's
                ("fay", "fay@home.example", at(301)), ("gus", "gus@home.example", at(302)),
                ("mallory", "hal@home.example", at(60)), ("hal", "hal@home.example", at(401))):
            conn.execute(text(
                "INSERT INTO users (username, password_hash, role, disabled, created_at, "
                "email) VALUES (:u, 'x', 'patient', 0, :created, :email)"),
                {"u": username, "created": created, "email": email})
    upgrade_index(engine, "0027")
    with engine.connect() as conn:
        links = {r.patient_id: (r.invite_pk, r.username) for r in conn.execute(
            select(patient_accounts.c.patient_id, patient_accounts.c.invite_pk,
                   patient_accounts.c.username))}
        accepted = dict(conn.execute(select(account_invites.c.pk,
                                            account_invites.c.accepted_by)).all())
    engine.dispose()
    # Mallory had typed Hal's address before Hal signed in and was given his record: the
    # invitation made Hal's account, so the record is unbound (and Hal's on first use).
    assert links == {"H100": (1, "carol"), "H200": (2, ""), "H300": (3, ""),
                     "H400": (4, ""), "H500": (5, ""), "H600": (6, "")}
    assert accepted == {1: "carol", 2: "dan", 3: "", 4: "", 5: "", 6: "hal"}
    archive = make_archive(tmp_path)
    try:
        records = archive.uploads.patients.records
        assert records(Actor("user", "carol", "patient")) == [("H100", "")]
        assert records(Actor("user", "dan", "patient")) == [("H200", "")]
        assert records(Actor("user", "fay", "patient")) == []
        assert records(Actor("user", "gus", "patient")) == []
        assert records(Actor("user", "mallory", "patient")) == []
        assert records(Actor("user", "hal", "patient")) == [("H600", "")]
    finally:
        archive.close()
