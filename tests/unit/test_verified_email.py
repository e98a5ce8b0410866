"""An account's e-mail address counts for what is addressed to it ("Shared with me") only once
it is confirmed: an address an account types for itself (with nothing but its own password)
is the account's only after the person follows the one-time link mailed to it; addresses an
administrator sets, or an invitation binds, count at once."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect, select, text, update

from imageshare.domain.actors import Actor
from imageshare.sharing.links import NewShare
from imageshare.storage.index.database import make_engine
from imageshare.storage.index.schema import email_confirmations, users
from imageshare.web.server import create_app
from tests.conftest import (
    ADMIN_PASSWORD,
    downgrade_index,
    make_archive,
    make_started_archive,
    upgrade_index,
)
from tests.factory import ct_series
from tests.mail import smtp_server
from tests.unit.test_sessions import enrol_two_factor, next_code
from tests.unit.test_web_pages import browser_sign_in, csrf_of

PASSWORD = "a-long-password"
HTML = {"Accept": "text/html"}
SYSTEM = Actor("system", "t", "admin", "t")
OWNER = Actor("user", "sono", "sonographer", "127.0.0.1")
COLLEAGUE = "dr.house@elsewhere.example"
TITLE = "Second opinion for Dr House"
LINK = re.compile(r"https://images\.hospital\.example(/account/email/confirm/[\w-]+)")


@pytest.fixture
def hospital(tmp_path) -> Iterator[tuple]:
    """An archive with a real SMTP server and its public URL; a sonographer who shared a
    study with a colleague's address, and a reviewer account ``nosy``."""
    with smtp_server() as (sink, port):
        archive = make_started_archive(tmp_path, smtp_host="127.0.0.1", smtp_port=port,
                                       public_url="https://images.hospital.example")
        archive.users.ensure_admin(ADMIN_PASSWORD)
        archive.users.add("sono", PASSWORD, "sonographer")
        archive.users.add("nosy", PASSWORD, "reviewer")
        [path] = ct_series(tmp_path / "s", 1, size=16, patient_id="H100")
        study = archive.ingest.store_copy(path, SYSTEM).study_uid
        archive.shares.create(NewShare(study, recipient_email=COLLEAGUE, title=TITLE),
                              OWNER, None)
        try:
            yield archive, sink
        finally:
            archive.close()


def _signed_in(archive, username: str) -> TestClient:
    client = TestClient(create_app(archive))
    assert browser_sign_in(client, username, PASSWORD).status_code == 303
    return client


def _change_email(client: TestClient, email: str):
    csrf = csrf_of(client.get("/account", headers=HTML).text)
    return client.post("/account/email", headers=HTML, follow_redirects=False,
                       data={"csrf_token": csrf, "email": email, "current": PASSWORD})


def _links(archive, sink, address: str, count: int = 1) -> list[str]:
    """The confirmation links mailed to ``address`` so far (paths), waiting for ``count``."""
    archive.notifier.mailer.flush()
    sink.wait_for(address, count)
    return [m.group(1) for body in sink.bodies(address) for m in LINK.finditer(body)]


def _asking(archive, sink, username: str) -> tuple[TestClient, str]:
    """``username`` signed in, having typed the colleague's address for itself: its client
    and the one confirmation link mailed to that address."""
    client = _signed_in(archive, username)
    assert _change_email(client, COLLEAGUE).status_code == 303
    [link] = _links(archive, sink, COLLEAGUE)
    return client, link


def _confirm(client: TestClient, link: str):
    form = client.get(link, headers=HTML)
    csrf = csrf_of(form.text)
    return client.post(link, headers=HTML, data={"csrf_token": csrf})


def test_an_account_that_takes_a_colleagues_address_sees_none_of_the_shares_sent_to_it(
        hospital):
    archive, sink = hospital
    nosy = _signed_in(archive, "nosy")
    assert _change_email(nosy, COLLEAGUE).status_code == 303
    listing = nosy.get("/shared-with-me", headers=HTML)
    assert listing.status_code == 200
    assert TITLE not in listing.text and "sono" not in listing.text
    assert "Nothing has been shared with you" in listing.text
    assert f"Shares sent to <strong>{COLLEAGUE}</strong> appear here once you confirm" in (
        listing.text)
    assert archive.shares.received("nosy") == []
    # The colleague is mailed a link, which says which account asked and what to do if not
    # them; nosy, who cannot read that mailbox, never sees the share.
    assert len(_links(archive, sink, COLLEAGUE)) == 1
    [body] = sink.bodies(COLLEAGUE)
    assert '"nosy"' in body and "ignore this message" in body
    assert "Not confirmed yet" in nosy.get("/account", headers=HTML).text
    nosy.close()


def test_following_the_mailed_link_shows_the_shares_sent_to_the_address(hospital):
    archive, sink = hospital
    archive.users.add("house", PASSWORD, "reviewer")
    house = _signed_in(archive, "house")
    assert _change_email(house, COLLEAGUE).status_code == 303
    assert TITLE not in house.get("/shared-with-me", headers=HTML).text
    [link] = _links(archive, sink, COLLEAGUE)
    form = house.get(link, headers=HTML)
    assert form.status_code == 200 and f"Confirm {COLLEAGUE}" in form.text
    # Opening the link alone confirms nothing (a mail scanner may open it).
    assert TITLE not in house.get("/shared-with-me", headers=HTML).text
    done = _confirm(house, link)
    assert done.status_code == 200 and "is confirmed as your address" in done.text
    listing = house.get("/shared-with-me", headers=HTML)
    assert TITLE in listing.text and "appear here once you confirm" not in listing.text
    assert [s.title for s in archive.shares.received("house")] == [TITLE]
    assert "Confirmed: shares sent to this address" in house.get("/account", headers=HTML).text
    assert [(e["outcome"], e["detail"]["user"]) for e in archive.audit.events("user.email-link")
            ] == [("success", "house")]
    assert [(e["outcome"], e["actor"]) for e in archive.audit.events("user.email-confirm")
            ] == [("success", "user:house")]
    # Only the hash of the link's secret is stored.
    secret = link.rsplit("/", 1)[1]
    assert len(secret) >= 43  # 32 random bytes
    with archive.engine.connect() as conn:
        stored = conn.execute(select(email_confirmations.c.token_hash)).scalars().all()
    assert stored and secret not in stored and all(len(h) == 64 for h in stored)
    house.close()


def test_a_confirmation_link_works_once(hospital):
    archive, sink = hospital
    archive.users.add("house", PASSWORD, "reviewer")
    house, link = _asking(archive, sink, "house")
    form = house.get(link, headers=HTML)
    assert _confirm(house, link).status_code == 200
    again = house.post(link, headers=HTML, data={"csrf_token": csrf_of(form.text)})
    assert again.status_code == 410 and "used already" in again.text
    assert house.get(link, headers=HTML).status_code == 410
    refused = [e for e in archive.audit.events("user.email-confirm") if e["outcome"] == "failure"]
    assert refused and "used already" in refused[0]["detail"]["reason"]
    house.close()


def test_an_expired_link_is_refused_and_confirms_nothing(hospital):
    archive, sink = hospital
    nosy, link = _asking(archive, sink, "nosy")
    form = nosy.get(link, headers=HTML)
    with archive.engine.begin() as conn:  # a day later
        conn.execute(update(email_confirmations).values(
            expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    refused = nosy.post(link, headers=HTML, data={"csrf_token": csrf_of(form.text)})
    assert refused.status_code == 410 and "has expired" in refused.text
    assert TITLE not in nosy.get("/shared-with-me", headers=HTML).text
    assert archive.users.verified_email_of("nosy") == ""
    nosy.close()


def test_a_link_expires_after_24_hours(hospital):
    archive, sink = hospital
    nosy, _link = _asking(archive, sink, "nosy")
    with archive.engine.connect() as conn:
        row = conn.execute(select(email_confirmations.c.created_at,
                                  email_confirmations.c.expires_at)).one()
    assert row.expires_at - row.created_at == timedelta(hours=24)
    nosy.close()


def test_changing_the_address_again_voids_the_earlier_link(hospital):
    archive, sink = hospital
    archive.users.add("house", PASSWORD, "reviewer")
    house, first = _asking(archive, sink, "house")
    form = house.get(first, headers=HTML)
    assert _change_email(house, "house@home.example").status_code == 303
    refused = house.post(first, headers=HTML, data={"csrf_token": csrf_of(form.text)})
    assert refused.status_code == 410 and "was replaced" in refused.text
    # Changing back does not revive it either: only a new link would do.
    assert _change_email(house, COLLEAGUE).status_code == 303
    assert house.get(first, headers=HTML).status_code == 410
    assert TITLE not in house.get("/shared-with-me", headers=HTML).text
    assert archive.users.verified_email_of("house") == ""
    house.close()


def test_a_link_works_only_for_the_account_that_asked_for_it(hospital):
    archive, sink = hospital
    archive.users.add("house", PASSWORD, "reviewer")
    house = _signed_in(archive, "house")
    nosy, link = _asking(archive, sink, "nosy")
    # The colleague, signed in as himself, follows the link nosy asked for: refused.
    answer = house.get(link, headers=HTML)
    assert answer.status_code == 403 and "another account" in answer.text
    assert TITLE not in nosy.get("/shared-with-me", headers=HTML).text
    assert archive.users.verified_email_of("nosy") == ""
    # A link that was never mailed is refused too.
    assert house.get("/account/email/confirm/not-a-link", headers=HTML).status_code == 410
    house.close()
    nosy.close()


def test_the_send_again_button_is_throttled_and_a_new_link_replaces_the_old(hospital):
    archive, sink = hospital
    archive.users.add("house", PASSWORD, "reviewer")
    house, first = _asking(archive, sink, "house")
    listing = house.get("/shared-with-me", headers=HTML)
    assert 'action="/account/email/confirmation"' in listing.text
    again = house.post("/account/email/confirmation", headers=HTML,
                       data={"csrf_token": csrf_of(listing.text)})
    assert again.status_code == 429 and "wait a minute" in again.text
    assert len(_links(archive, sink, COLLEAGUE)) == 1
    with archive.engine.begin() as conn:  # a minute later
        conn.execute(update(email_confirmations).values(
            created_at=datetime.now(UTC) - timedelta(minutes=2)))
    again = house.post("/account/email/confirmation", headers=HTML,
                       data={"csrf_token": csrf_of(listing.text)})
    assert again.status_code == 200 and f"A new confirmation link was mailed to {COLLEAGUE}" in (
        again.text)
    first_again, second = _links(archive, sink, COLLEAGUE, 2)
    assert first_again == first and second != first
    assert house.get(first, headers=HTML).status_code == 410
    assert _confirm(house, second).status_code == 200
    assert TITLE in house.get("/shared-with-me", headers=HTML).text
    outcomes = [e["outcome"] for e in archive.audit.events("user.email-link")]
    assert sorted(outcomes) == ["failure", "success", "success"]
    house.close()


def test_addresses_set_by_an_administrator_count_at_once(hospital, imageshare, tmp_path):
    archive, sink = hospital
    # On the command line (imageshare user add --email) ...
    ran = imageshare(tmp_path / "data", "user", "add", "house", "--role", "reviewer",
                     "--email", COLLEAGUE, "--password", PASSWORD)
    assert ran.returncode == 0, ran.stderr
    house = _signed_in(archive, "house")
    listing = house.get("/shared-with-me", headers=HTML)
    assert TITLE in listing.text and "appear here once you confirm" not in listing.text
    # ... and on the users page: an address nosy typed counts once an administrator sets it.
    nosy = _signed_in(archive, "nosy")
    _change_email(nosy, "nosy@hospital.example")
    [link] = _links(archive, sink, "nosy@hospital.example")
    totp = enrol_two_factor(archive, "admin")
    with TestClient(create_app(archive)) as admin:
        browser_sign_in(admin, "admin", ADMIN_PASSWORD, next_code(totp))
        users_page = admin.get("/admin/users", headers=HTML)
        changed = admin.post("/admin/users/nosy/email", headers=HTML, follow_redirects=False,
                             data={"csrf_token": csrf_of(users_page.text), "email": COLLEAGUE})
        assert changed.status_code == 303
    assert archive.users.verified_email_of("nosy") == COLLEAGUE
    assert TITLE in nosy.get("/shared-with-me", headers=HTML).text
    # The link mailed for the address nosy typed earlier no longer works.
    assert nosy.get(link, headers=HTML).status_code == 410
    house.close()
    nosy.close()


def test_an_address_bound_by_an_accepted_invitation_counts_at_once(hospital):
    archive, _sink = hospital
    secret = archive.users.invite(COLLEAGUE, "sono")
    archive.shares.accept_invitation(secret, "house", PASSWORD, "127.0.0.1")
    assert archive.users.account("house").email_verified
    house = _signed_in(archive, "house")
    assert TITLE in house.get("/shared-with-me", headers=HTML).text
    house.close()


def test_without_e_mail_set_up_the_address_is_saved_unconfirmed_and_the_page_says_why(
        tmp_path):
    archive = make_archive(tmp_path)
    try:
        archive.users.add("nosy", PASSWORD, "reviewer")
        with TestClient(create_app(archive)) as nosy:
            browser_sign_in(nosy, "nosy", PASSWORD)
            assert _change_email(nosy, COLLEAGUE).status_code == 303
            assert archive.users.email_of("nosy") == COLLEAGUE
            assert archive.users.verified_email_of("nosy") == ""
            listing = nosy.get("/shared-with-me", headers=HTML)
            asked = nosy.post("/account/email/confirmation", headers=HTML,
                              data={"csrf_token": csrf_of(listing.text)})
            assert asked.status_code == 400 and "IMAGESHARE_PUBLIC_URL" in asked.text
    finally:
        archive.close()


def _add_user(conn, pk: int, username: str, email: str) -> None:
    conn.execute(text(
        "INSERT INTO users (pk, username, password_hash, role, disabled, created_at, email) "
        "VALUES (:pk, :u, 'x', 'reviewer', 0, :at, :e)"),
        {"pk": pk, "u": username, "at": datetime(2026, 1, 5, tzinfo=UTC), "e": email})


def _email_event(conn, pk: int, actor: str, username: str, outcome: str = "success") -> None:
    conn.execute(text(
        "INSERT INTO audit_events (pk, at, actor, actor_kind, source, action, outcome, "
        "patient_id, study_uid, detail, instance_count) VALUES (:pk, :at, :actor, 'user', '', "
        "'user.email', :outcome, '', '', :detail, 0)"),
        {"pk": pk, "at": datetime(2026, 1, 6, tzinfo=UTC), "actor": actor,
         "outcome": outcome, "detail": f'{{"user": "{username}"}}'})


LONG = "r" * 125  # a username may have 128 characters; the trail keeps 128 of an actor's


def test_the_migration_trusts_addresses_an_account_did_not_type_for_itself(tmp_path):
    """At 0029 every address counted. After 0030: an address given when the account was made
    or last set by an administrator is confirmed; one the account last set itself is not
    (unless an invitation bound it). Downgrading drops the column and the links, and nothing
    that refers to an account."""
    data = tmp_path / "data"
    data.mkdir()
    engine = make_engine(f"sqlite:///{data / 'index.sqlite'}")
    upgrade_index(engine, "0029")
    with engine.begin() as conn:
        _add_user(conn, 1, "made", "made@example.org")          # given when made: trusted
        _add_user(conn, 2, "typed", COLLEAGUE)                  # set on the account page
        _add_user(conn, 3, "fixed", "fixed@example.org")        # typed, then admin set
        _add_user(conn, 4, "invited", "inv@example.org")        # typed its invited address
        _add_user(conn, 5, "empty", "")
        _add_user(conn, 6, LONG, COLLEAGUE)                     # typed; its actor label cut
        _email_event(conn, 1, "user:fixed", "fixed")
        _email_event(conn, 2, "user:typed", "typed")
        _email_event(conn, 3, "user:admin", "fixed")
        _email_event(conn, 4, "user:admin", "typed", outcome="failure")
        _email_event(conn, 5, "user:invited", "invited")
        _email_event(conn, 6, f"user:{LONG}"[:128], LONG)       # as the trail keeps actors
        conn.execute(text(  # the one API token and the one session of an account
            "INSERT INTO api_tokens (user_pk, name, token_hash, created_at, origin) "
            "VALUES (1, 'pacs', :h, :at, 'cli')"), {"h": "a" * 64, "at": datetime.now(UTC)})
        conn.execute(text(
            "INSERT INTO sessions (token_hash, user_pk, csrf_token, source, created_at, "
            "last_seen_at) VALUES (:h, 2, 'c', '', :at, :at)"),
            {"h": "b" * 64, "at": datetime.now(UTC)})
        conn.execute(text(
            "INSERT INTO account_invites (token_hash, email, role, invited_by, created_at, "
            "expires_at, accepted_by) VALUES ('h', 'inv@example.org', 'reviewer', 'sono', "
            ":at, :at, 'invited')"), {"at": datetime(2026, 1, 4, tzinfo=UTC)})
    upgrade_index(engine, "0030")
    with engine.connect() as conn:
        verified = dict(conn.execute(select(users.c.username,
                                            users.c.email_verified_at.is_not(None))).all())
    assert verified == {"made": True, "typed": False, "fixed": True, "invited": True,
                        "empty": False, LONG: False}
    downgrade_index(engine, "0029")
    inspector = inspect(engine)
    assert "email_confirmations" not in inspector.get_table_names()
    assert "email_verified_at" not in {c["name"] for c in inspector.get_columns("users")}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM users")).scalar() == 6
        # Rebuilding the users table on SQLite cascaded to nothing that refers to it.
        assert conn.execute(text("SELECT COUNT(*) FROM api_tokens")).scalar() == 1
        assert conn.execute(text("SELECT COUNT(*) FROM sessions")).scalar() == 1
    upgrade_index(engine, "0030")
    engine.dispose()
