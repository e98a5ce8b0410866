"""Browser sessions: HttpOnly SameSite cookie, CSRF on changes, lockout, sign-out."""

from __future__ import annotations

import time

import pyotp

from tests.conftest import ADMIN_PASSWORD

CLINICIAN_PASSWORD = "clinician-password"


def enrol_two_factor(archive, username) -> pyotp.TOTP:
    """Set up TOTP for ``username`` as the account page does; returns the authenticator."""
    uri = archive.users.begin_two_factor(username)
    totp = pyotp.parse_uri(uri)
    archive.users.confirm_two_factor(username, totp.now())
    return totp


def next_code(totp: pyotp.TOTP) -> str:
    """A code not used yet (each code works once)."""
    return totp.generate_otp(int(time.time()) // totp.interval + 1)


def sign_in(client, username="clin", password=CLINICIAN_PASSWORD, code=""):
    return client.post("/api/session",
                       json={"username": username, "password": password, "code": code})


def test_sign_in_sets_a_safe_cookie_and_the_session_authenticates(archive, anonymous):
    archive.users.add("clin", CLINICIAN_PASSWORD, "clinician")
    response = sign_in(anonymous)
    assert response.status_code == 200
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert ADMIN_PASSWORD not in response.text
    assert anonymous.get("/api/me").json()["username"] == "clin"
    assert anonymous.get("/dicomweb/studies").status_code in (200, 204)


def test_changes_in_a_session_need_its_csrf_token(archive, anonymous):
    totp = enrol_two_factor(archive, "admin")
    csrf = sign_in(anonymous, "admin", ADMIN_PASSWORD, next_code(totp)).json()["csrf_token"]
    body = {"ae_title": "PACS9", "host": "10.0.0.9", "port": 104}
    assert anonymous.post("/api/nodes", json=body).status_code == 403
    assert anonymous.post("/api/nodes", json=body,
                          headers={"X-CSRF-Token": "forged"}).status_code == 403
    assert anonymous.post("/api/nodes", json=body,
                          headers={"X-CSRF-Token": csrf}).status_code == 201


def test_sign_out_ends_the_session_for_good(archive, anonymous):
    archive.users.add("clin", CLINICIAN_PASSWORD, "clinician")
    csrf = sign_in(anonymous).json()["csrf_token"]
    stolen = anonymous.cookies.get("imageshare_session")
    assert anonymous.delete("/api/session", headers={"X-CSRF-Token": csrf}).status_code == 204
    anonymous.cookies.set("imageshare_session", stolen)
    assert anonymous.get("/api/me").status_code == 401


def test_five_wrong_passwords_lock_the_account_with_the_same_answer(archive, anonymous):
    archive.users.add("clerk", "right-password-1", "clinician")
    for _ in range(5):
        wrong = anonymous.post("/api/session", json={"username": "clerk", "password": "nope"})
        assert wrong.status_code == 401
    locked = anonymous.post("/api/session",
                            json={"username": "clerk", "password": "right-password-1"})
    assert locked.status_code == 401
    assert locked.json()["detail"] == wrong.json()["detail"]
    assert anonymous.get("/api/me", auth=("clerk", "right-password-1")).status_code == 401
    failures = [e for e in archive.audit.events(action="session.start")
                if e["outcome"] == "failure"]
    assert len(failures) == 6


def test_unknown_user_gets_the_same_answer(anonymous):
    response = anonymous.post("/api/session", json={"username": "ghost", "password": "x"})
    assert response.status_code == 401
    assert response.json()["detail"] == (
        "wrong username, password or code, or the account is locked")


def test_an_admin_without_two_factor_may_only_set_it_up(anonymous):
    response = sign_in(anonymous, "admin", ADMIN_PASSWORD)
    assert response.json()["stage"] == "enrol"
    assert anonymous.get("/api/me").status_code == 200
    assert anonymous.get("/dicomweb/studies").status_code == 403
    assert anonymous.get("/api/nodes").status_code == 403


def test_two_factor_accounts_need_the_current_code_once(archive, anonymous):
    archive.users.add("clin", CLINICIAN_PASSWORD, "clinician")
    totp = enrol_two_factor(archive, "clin")
    without_code = sign_in(anonymous)  # the code is asked for (as the sign-in page does)
    assert without_code.status_code == 200 and without_code.json()["stage"] == "code"
    assert anonymous.get("/api/me").status_code in (401, 403)
    anonymous.cookies.clear()
    assert sign_in(anonymous, code="000000").status_code == 401
    code = next_code(totp)
    assert sign_in(anonymous, code=code).status_code == 200
    assert sign_in(anonymous, code=code).status_code == 401  # a code works once
    # programs cannot skip the second factor with HTTP Basic: they use API tokens
    assert anonymous.get("/api/me", auth=("clin", CLINICIAN_PASSWORD)).status_code == 401


def test_a_session_idle_for_half_an_hour_ends_and_one_in_use_lives_on(archive):
    """Every request reads the session; its last use is written at most every half minute
    (not once per request), and the 30-minute idle limit holds to within that."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import select, update

    from imageshare.storage.index.schema import sessions

    archive.users.add("idle", "idle-password-123", "clinician")
    secret, _csrf = archive.sessions.start("idle", "testclient")

    def seen(ago: timedelta | None = None) -> datetime:
        with archive.engine.begin() as conn:
            if ago is not None:
                conn.execute(update(sessions).values(last_seen_at=datetime.now(UTC) - ago))
            value = conn.execute(select(sessions.c.last_seen_at)).scalar_one()
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    before = seen(timedelta(seconds=5))
    assert archive.sessions.find(secret, "testclient") is not None
    assert seen() == before  # used a moment ago: nothing written
    seen(timedelta(minutes=29))
    assert archive.sessions.find(secret, "testclient") is not None
    assert datetime.now(UTC) - seen() < timedelta(seconds=30)  # in use: it lives on
    seen(timedelta(minutes=31))
    assert archive.sessions.find(secret, "testclient") is None  # idle too long: ended


def test_wrong_passwords_tried_at_once_by_several_processes_are_each_counted(archive):
    """A guesser spreading tries over the server's HTTP processes gets no extra ones: failures
    counted at the same moment all count, and the fifth locks the account."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import select

    from imageshare.access.lockout import Lockout
    from imageshare.storage.index.schema import login_failures, users

    archive.users.add("guessed", "long-enough-password", "clinician")
    with archive.engine.connect() as conn:
        user_pk = conn.execute(select(users.c.pk).where(users.c.username == "guessed")).scalar()
    lockouts = [Lockout(archive.engine) for _ in range(4)]  # one per process
    start = threading.Barrier(4)
    for round_ in range(30):
        source = f"203.0.113.{round_}"

        def fail(number: int, source: str = source) -> bool:
            start.wait()
            return lockouts[number].failed(user_pk, source)

        with ThreadPoolExecutor(4) as pool:
            assert not any(pool.map(fail, range(4)))
        with archive.engine.connect() as conn:
            assert conn.execute(select(login_failures.c.failures).where(
                login_failures.c.source == source)).scalar() == 4
        assert lockouts[0].failed(user_pk, source)  # the fifth locks


def test_a_two_factor_account_without_a_code_is_asked_for_it_and_can_do_nothing_else(
        archive, anonymous):
    """A JSON sign-in with the right password and no code starts a session at the code stage
    (not a failure): it reads nothing until ``/api/session/code`` took the right code."""
    archive.users.add("clin", CLINICIAN_PASSWORD, "clinician")
    totp = enrol_two_factor(archive, "clin")
    started = sign_in(anonymous)
    assert started.status_code == 200
    assert started.json()["stage"] == "code"
    assert anonymous.get("/dicomweb/studies").status_code in (401, 403)
    assert anonymous.get("/api/me").status_code in (401, 403)
    csrf = started.json()["csrf_token"]
    wrong = anonymous.post("/api/session/code", json={"code": "000000"},
                           headers={"X-CSRF-Token": csrf})
    assert wrong.status_code == 401
    assert anonymous.get("/dicomweb/studies").status_code in (401, 403)
    confirmed = anonymous.post("/api/session/code", json={"code": next_code(totp)},
                               headers={"X-CSRF-Token": csrf})
    assert confirmed.status_code == 200, confirmed.text
    assert confirmed.json()["stage"] == "full"
    assert confirmed.json()["csrf_token"] != csrf
    assert anonymous.get("/api/me").json()["username"] == "clin"
    actions = [(e["action"], e["outcome"]) for e in archive.audit.events()
               if e["action"].startswith("session.") and "clin" in str(e)]
    assert ("session.code", "failure") in actions and ("session.code", "success") in actions
    assert ("session.start", "failure") not in actions


def test_the_code_route_is_refused_to_a_full_session_and_to_no_session(archive, anonymous):
    archive.users.add("clin", CLINICIAN_PASSWORD, "clinician")
    assert anonymous.post("/api/session/code", json={"code": "123456"}).status_code == 401
    csrf = sign_in(anonymous).json()["csrf_token"]
    refused = anonymous.post("/api/session/code", json={"code": "123456"},
                             headers={"X-CSRF-Token": csrf})
    assert refused.status_code == 403
