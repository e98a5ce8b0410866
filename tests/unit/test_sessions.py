"""Browser sessions: HttpOnly SameSite cookie, CSRF on changes, lockout, sign-out."""

from __future__ import annotations

from tests.conftest import ADMIN_PASSWORD


def sign_in(client, password=ADMIN_PASSWORD):
    return client.post("/api/session", json={"username": "admin", "password": password})


def test_sign_in_sets_a_safe_cookie_and_the_session_authenticates(anonymous):
    response = sign_in(anonymous)
    assert response.status_code == 200
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert ADMIN_PASSWORD not in response.text
    assert anonymous.get("/api/me").json()["username"] == "admin"
    assert anonymous.get("/dicomweb/studies").status_code in (200, 204)


def test_changes_in_a_session_need_its_csrf_token(anonymous):
    csrf = sign_in(anonymous).json()["csrf_token"]
    body = {"ae_title": "PACS9", "host": "10.0.0.9", "port": 104}
    assert anonymous.post("/api/nodes", json=body).status_code == 403
    assert anonymous.post("/api/nodes", json=body,
                          headers={"X-CSRF-Token": "forged"}).status_code == 403
    assert anonymous.post("/api/nodes", json=body,
                          headers={"X-CSRF-Token": csrf}).status_code == 201


def test_sign_out_ends_the_session_for_good(anonymous):
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
    assert response.json()["detail"] == "wrong username or password, or the account is locked"
