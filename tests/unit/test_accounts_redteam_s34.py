"""Red team of accounts, sign-in, sessions and the second factor (session 34).

Each test is an attack a demanding user or an attacker made, or a defect left from a browser
walk: two-factor set-up that forgot its key after one wrong code, a code prompt with no way
out, administrator actions on one click, an API token limit counted outside its transaction,
a session's password-change form as an unlimited password oracle, login CSRF, look-alike
user names, and a half-signed-in session that lived for hours.
"""

from __future__ import annotations

import re
import threading
import time
from datetime import UTC, datetime, timedelta

import pyotp
import pytest
from sqlalchemy import update

from imageshare.access.users import MAX_LIVE_TOKENS
from imageshare.domain.errors import ImageShareError
from imageshare.storage.index.schema import sessions
from tests.conftest import ADMIN_PASSWORD
from tests.unit.test_sessions import enrol_two_factor, next_code
from tests.unit.test_web_pages import HTML, browser_sign_in, csrf_of

PASSWORD = "a-long-password"


def _secret_on(html: str) -> str | None:
    found = re.search(r'class="totp-secret">([A-Z2-7]+)<', html)
    return found.group(1) if found else None


def _hidden(html: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]*)"', html)
    return found.group(1) if found else ""


def _begin_two_factor(client) -> tuple[str, str]:
    """Press "Set up two-factor sign-in" on the account page: (the key shown, the page)."""
    account = client.get("/account", headers=HTML)
    setup = client.post("/account/two-factor", headers=HTML, data={
        "csrf_token": csrf_of(account.text), "current": PASSWORD})
    secret = _secret_on(setup.text)
    assert secret, setup.text
    return secret, setup.text


def _confirm(client, page: str, code: str, follow: bool = True):
    """Send the set-up form of ``page`` with ``code`` (and whatever else the form holds)."""
    return client.post("/account/two-factor/confirm", headers=HTML, follow_redirects=follow,
                       data={"csrf_token": csrf_of(page), "code": code,
                             "key": _hidden(page, "key")})


# -- (1) a wrong code while setting up two-factor sign-in ---------------------------------------


def test_a_wrong_code_while_setting_up_two_factor_shows_the_same_key_again(archive, anonymous):
    archive.users.add("sono", PASSWORD, "sonographer")
    browser_sign_in(anonymous, "sono")
    secret, setup = _begin_two_factor(anonymous)
    wrong = _confirm(anonymous, setup, "00000")
    assert wrong.status_code == 400
    assert _secret_on(wrong.text) == secret  # the same key: the app already holds it
    assert "<svg" in wrong.text  # and its QR code
    assert "new key" not in wrong.text
    done = _confirm(anonymous, wrong.text, pyotp.TOTP(secret).now(), follow=False)
    assert done.status_code == 303
    assert archive.users.two_factor_enabled("sono")


def test_a_set_up_started_again_elsewhere_is_not_turned_on_nor_shown_by_an_older_page(
        archive, anonymous):
    """Enrolment hijack: someone holding the password starts a set-up of their own while the
    owner is scanning theirs. The owner's page must not then show (nor put in force) the
    other person's key: the owner would be protected by a phone that is not theirs."""
    archive.users.add("sono", PASSWORD, "sonographer")
    browser_sign_in(anonymous, "sono")
    mine, setup = _begin_two_factor(anonymous)
    theirs = pyotp.parse_uri(archive.users.begin_two_factor("sono")).secret
    refused = _confirm(anonymous, setup, pyotp.TOTP(mine).now())
    assert refused.status_code == 400
    assert theirs not in refused.text and not archive.users.two_factor_enabled("sono")
    # a code of the other key, sent from the older page, does not turn it on either
    refused = _confirm(anonymous, setup, pyotp.TOTP(theirs).now())
    assert refused.status_code == 400 and not archive.users.two_factor_enabled("sono")


# -- (2) the code prompt has a way out -------------------------------------------------------


def test_someone_at_the_code_prompt_can_sign_out_and_that_half_session_ends(archive, anonymous):
    archive.users.add("sono", PASSWORD, "sonographer")
    enrol_two_factor(archive, "sono")
    signed = browser_sign_in(anonymous, "sono")
    assert signed.headers["location"].startswith("/login/code")
    half = anonymous.cookies.get("imageshare_session")
    prompt = anonymous.get("/login/code", headers=HTML)
    action = re.search(r'<form[^>]*action="([^"]+)"[^>]*>\s*<input type="hidden" '
                       r'name="csrf_token"[^>]*>\s*<button[^>]*>Sign out', prompt.text)
    assert action, "the code prompt offers no way to sign out"
    out = anonymous.post(action.group(1), headers=HTML, follow_redirects=False,
                         data={"csrf_token": csrf_of(prompt.text)})
    assert out.status_code == 303 and out.headers["location"].startswith("/login")
    assert archive.sessions.find(half, "testclient") is None  # ended on the server
    anonymous.cookies.set("imageshare_session", half)
    again = anonymous.get("/login/code", headers=HTML, follow_redirects=False)
    assert again.status_code != 200
    ended = [e for e in archive.audit.events("session.end") if e["actor"] == "user:sono"]
    assert ended


# -- (3) administrator actions on accounts ask first ---------------------------------------------


@pytest.fixture
def admin_browser(archive, anonymous):
    totp = enrol_two_factor(archive, "admin")
    browser_sign_in(anonymous, "admin", ADMIN_PASSWORD, code=next_code(totp))
    archive.users.add("rev1", PASSWORD, "reviewer")
    return anonymous


def test_disabling_an_account_asks_for_confirmation_first(archive, admin_browser):
    users = admin_browser.get("/admin/users", headers=HTML)
    asked = admin_browser.post("/admin/users/rev1/disable", headers=HTML,
                               follow_redirects=False,
                               data={"csrf_token": csrf_of(users.text)})
    assert asked.status_code == 200
    assert archive.users.authenticate("rev1", PASSWORD) is not None  # nothing happened yet
    assert 'name="confirm"' in asked.text and "rev1" in asked.text
    done = admin_browser.post("/admin/users/rev1/disable", headers=HTML,
                              follow_redirects=False,
                              data={"csrf_token": csrf_of(asked.text), "confirm": "yes"})
    assert done.status_code == 303
    assert archive.users.authenticate("rev1", PASSWORD) is None


def test_resetting_a_password_asks_for_confirmation_first(archive, admin_browser):
    users = admin_browser.get("/admin/users", headers=HTML)
    asked = admin_browser.post("/admin/users/rev1/reset", headers=HTML,
                               data={"csrf_token": csrf_of(users.text),
                                     "reset_two_factor": "1"})
    assert asked.status_code == 200 and "temporary-password" not in asked.text
    assert archive.users.authenticate("rev1", PASSWORD) is not None
    assert 'name="reset_two_factor" value="1"' in asked.text  # the choice is carried on
    done = admin_browser.post("/admin/users/rev1/reset", headers=HTML, data={
        "csrf_token": csrf_of(asked.text), "confirm": "yes", "reset_two_factor": "1"})
    shown = re.search(r'class="temporary-password">([^<]+)<', done.text)
    assert shown is not None
    temporary = shown.group(1)
    assert archive.users.authenticate("rev1", PASSWORD) is None
    assert archive.users.authenticate("rev1", temporary) is not None


# -- (4) the live API token limit ----------------------------------------------------------------


def test_the_token_limit_holds_for_every_way_a_token_is_made(archive, anonymous):
    archive.users.add("bob", PASSWORD, "clinician")
    for n in range(MAX_LIVE_TOKENS):
        archive.users.create_token("bob", f"t{n}")
    with pytest.raises(ImageShareError, match="revoke one"):
        archive.users.create_token("bob", "one more")
    browser_sign_in(anonymous, "bob")
    account = anonymous.get("/account", headers=HTML)
    refused = anonymous.post("/account/tokens", headers=HTML, data={
        "csrf_token": csrf_of(account.text), "name": "page", "current": PASSWORD})
    assert refused.status_code == 400 and "new-token" not in refused.text
    live = [t for t in archive.users.tokens("bob") if t["revoked_at"] is None]
    assert len(live) == MAX_LIVE_TOKENS


def test_tokens_made_at_the_same_moment_cannot_pass_the_limit(archive):
    archive.users.add("bob", PASSWORD, "clinician")
    for n in range(MAX_LIVE_TOKENS - 2):
        archive.users.create_token("bob", f"t{n}")
    start = threading.Barrier(6)

    def make(n: int) -> None:
        start.wait()
        try:
            archive.users.create_token("bob", f"race{n}")
        except ImageShareError:
            pass

    threads = [threading.Thread(target=make, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    live = [t for t in archive.users.tokens("bob") if t["revoked_at"] is None]
    assert len(live) == MAX_LIVE_TOKENS


def test_tokens_asked_for_at_once_over_the_api_cannot_pass_the_limit(
        archive, anonymous, monkeypatch):
    """The count of live tokens and the new token are one transaction: a count read apart
    (here made slow, as on a busy database) lets every request in the gap pass."""
    archive.users.add("bob", PASSWORD, "clinician")
    for n in range(MAX_LIVE_TOKENS - 1):
        archive.users.create_token("bob", f"t{n}")
    listed = archive.users.tokens

    def slow_list(username: str) -> list[dict[str, object]]:
        found = listed(username)
        time.sleep(0.3)
        return found

    monkeypatch.setattr(archive.users, "tokens", slow_list)
    start = threading.Barrier(8)
    answers: list[int] = []

    def ask(n: int) -> None:
        start.wait()
        answers.append(anonymous.post("/api/tokens", json={"name": f"race{n}"},
                                      auth=("bob", PASSWORD)).status_code)

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers) == [201] + [400] * 7
    live = [t for t in archive.users.tokens("bob") if t["revoked_at"] is None]
    assert len(live) == MAX_LIVE_TOKENS


def test_a_session_alone_cannot_mint_a_token_on_the_account_page(archive, anonymous):
    """A token outlives the session and a password change: making one from the page needs
    the current password, as changing the address does."""
    archive.users.add("bob", PASSWORD, "clinician")
    browser_sign_in(anonymous, "bob")
    account = anonymous.get("/account", headers=HTML)
    refused = anonymous.post("/account/tokens", headers=HTML, data={
        "csrf_token": csrf_of(account.text), "name": "stolen", "current": "wrong-password"})
    assert refused.status_code == 400 and archive.users.tokens("bob") == []
    made = anonymous.post("/account/tokens", headers=HTML, data={
        "csrf_token": csrf_of(account.text), "name": "mine", "current": PASSWORD})
    assert made.status_code == 200 and 'class="new-token"' in made.text


# -- the account page is no password oracle ----------------------------------------------------


def test_wrong_current_passwords_on_the_account_page_lock_like_sign_ins(archive, anonymous):
    """Someone holding a session must not guess the password without end through the
    password-change form (and then hold the password itself)."""
    archive.users.add("bob", PASSWORD, "clinician")
    browser_sign_in(anonymous, "bob")
    account = anonymous.get("/account", headers=HTML)
    for n in range(5):
        wrong = anonymous.post("/account/password", headers=HTML, data={
            "csrf_token": csrf_of(account.text), "current": f"guess-{n}-xx",
            "new": "another-long-password"})
        assert wrong.status_code == 400
    right = anonymous.post("/account/password", headers=HTML, data={
        "csrf_token": csrf_of(account.text), "current": PASSWORD,
        "new": "another-long-password"})
    assert right.status_code == 400  # locked from this address: the same answer
    assert archive.users.authenticate("bob", PASSWORD, "elsewhere") is not None


# -- login CSRF ---------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{"Origin": "https://evil.example"},
                                     {"Sec-Fetch-Site": "cross-site"},
                                     {"Origin": "null"}])
def test_another_site_cannot_sign_a_browser_in(archive, anonymous, headers):
    """Login CSRF: a page elsewhere posting the attacker's credentials to /login would sign
    the victim's browser into the attacker's account (their uploads would go there)."""
    archive.users.add("mallory", PASSWORD, "clinician")
    answer = anonymous.post("/login", headers={**HTML, **headers}, follow_redirects=False,
                            data={"username": "mallory", "password": PASSWORD})
    assert answer.status_code == 403
    assert "imageshare_session" not in answer.headers.get("set-cookie", "")
    same = anonymous.post("/login", follow_redirects=False, data={
        "username": "mallory", "password": PASSWORD},
        headers={**HTML, "Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"})
    assert same.status_code == 303


# -- sessions -----------------------------------------------------------------------------------


def test_a_session_waiting_for_its_code_does_not_wait_for_hours(archive):
    archive.users.add("sono", PASSWORD, "sonographer")
    enrol_two_factor(archive, "sono")
    secret, _csrf = archive.sessions.start("sono", "testclient", "code")
    assert archive.sessions.find(secret, "testclient") is not None
    with archive.engine.begin() as conn:
        conn.execute(update(sessions).values(
            created_at=datetime.now(UTC) - timedelta(minutes=16),
            last_seen_at=datetime.now(UTC)))
    assert archive.sessions.find(secret, "testclient") is None


# -- user names that look alike ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["Admin", "ADMIN", "\uff41dmin"])
def test_a_name_differing_from_another_only_by_case_or_width_is_refused(archive, name):
    with pytest.raises(ImageShareError, match="exists already"):
        archive.users.add(name, PASSWORD, "clinician")
    secret = archive.users.invite("x@example.org", "admin")
    with pytest.raises(ImageShareError, match="exists already"):
        archive.users.accept_invitation(secret, name, PASSWORD)
    assert archive.users.invitation(secret) is not None  # still usable with another name


def test_totp_codes_work_once_even_across_the_two_steps(archive, anonymous):
    archive.users.add("sono", PASSWORD, "sonographer")
    totp = enrol_two_factor(archive, "sono")
    code = next_code(totp)
    assert browser_sign_in(anonymous, "sono", code=code).headers["location"] == "/"
    other = type(anonymous)(anonymous.app)
    replay = browser_sign_in(other, "sono", code=code)
    assert replay.status_code == 401


# -- lockout and throttle across one IPv6 network -------------------------------------------


def test_a_guesser_cannot_step_round_the_lockout_through_the_addresses_of_one_ipv6_network(
        archive):
    """An IPv6 site holds at least a /64: counted per address, each of its 2**64 addresses
    would bring five fresh guesses at the account and twenty at the throttle."""
    from imageshare.domain.errors import TooManyRequests

    archive.users.add("bob", PASSWORD, "clinician")
    for n in range(5):
        assert archive.users.authenticate("bob", f"guess-{n}-xx", f"2001:db8:1:2::{n + 1}") is None
    assert archive.users.authenticate("bob", PASSWORD, "2001:db8:1:2::ab") is None  # locked
    assert archive.users.authenticate("bob", PASSWORD, "2001:db8:1:3::1") is not None
    assert archive.users.authenticate("bob", PASSWORD, "::ffff:192.0.2.7") is not None
    for n in range(20):
        archive.throttle.failed(f"2001:db8:9:9::{n + 1:x}")
    with pytest.raises(TooManyRequests):
        archive.throttle.check("2001:db8:9:9:ffff::1")
    archive.throttle.check("2001:db8:9:a::1")  # the next network is another caller


# -- turning two-factor sign-in on from a held session ---------------------------------------


def test_a_session_alone_cannot_start_two_factor_set_up_for_a_person(archive, anonymous):
    """Someone holding a stolen session (not the password) would bind the account to their
    own phone, and the owner could no longer sign in."""
    archive.users.add("sono", PASSWORD, "sonographer")
    browser_sign_in(anonymous, "sono")
    account = anonymous.get("/account", headers=HTML)
    refused = anonymous.post("/account/two-factor", headers=HTML, data={
        "csrf_token": csrf_of(account.text), "current": "not-the-password"})
    assert refused.status_code == 400 and _secret_on(refused.text) is None
    started = anonymous.post("/account/two-factor", headers=HTML, data={
        "csrf_token": csrf_of(account.text), "current": PASSWORD})
    assert _secret_on(started.text)


@pytest.mark.parametrize("stage", ["awaiting-code", "changing-password", "enrolling"])
def test_a_stage_of_signing_in_is_not_a_role_an_account_can_be_given(archive, imageshare,
                                                                      stage):
    """`user add --role awaiting-code` made an account that could only ever send codes, and
    the refusal of an unknown role listed the stages among the roles."""
    ran = imageshare(archive.settings.data_dir, "user", "add", "carl", "--role", stage,
                     "--password", "long-enough-password-1")
    assert ran.returncode != 0 and f"unknown role {stage!r}" in ran.stderr
    assert "site" in ran.stderr and not any(s in ran.stderr.split("roles:", 1)[1] for s in (
        "awaiting-code", "changing-password", "enrolling"))
    assert not [a for a in archive.users.accounts() if a.username == "carl"]
    archive.users.add("dana", "long-enough-password-2", "clinician")
    with pytest.raises(ImageShareError, match="unknown role"):
        archive.users.set_role("dana", stage)
    archive.users.set_role("dana", "site")  # a real role is still given
