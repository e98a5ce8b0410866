"""API tokens outlive the session and a password change, so a session alone makes none over
the API either (the account page already asks for the current password), and an
administrator's password reset revokes the person's live tokens with the password: whoever
held the old password may have made them."""

from __future__ import annotations

import re

from tests.unit.test_accounts_redteam_s34 import PASSWORD, admin_browser  # noqa: F401
from tests.unit.test_web_pages import HTML, browser_sign_in, csrf_of


def test_a_browser_session_makes_a_token_over_the_api_only_with_the_password(
        archive, anonymous):
    archive.users.add("bob", PASSWORD, "clinician")
    browser_sign_in(anonymous, "bob", PASSWORD)
    headers = {"X-CSRF-Token": csrf_of(anonymous.get("/account", headers=HTML).text)}
    refused = anonymous.post("/api/tokens", json={"name": "stolen"}, headers=headers)
    assert refused.status_code == 400 and "password" in refused.json()["detail"]
    wrong = anonymous.post("/api/tokens", json={"name": "stolen", "password": "guess"},
                           headers=headers)
    assert wrong.status_code == 400
    assert archive.users.tokens("bob") == []
    made = anonymous.post("/api/tokens", json={"name": "ohif", "password": PASSWORD},
                          headers=headers)
    assert made.status_code == 201 and made.json()["token"]


def test_an_administrators_reset_revokes_the_persons_tokens(archive, admin_browser):  # noqa: F811
    token = archive.users.create_token("rev1", "laptop")
    assert archive.users.authenticate_token(token) is not None
    users = admin_browser.get("/admin/users", headers=HTML)
    asked = admin_browser.post("/admin/users/rev1/reset", headers=HTML,
                               data={"csrf_token": csrf_of(users.text)})
    assert "API tokens stop working" in asked.text
    assert archive.users.authenticate_token(token) is not None  # asked, not done
    done = admin_browser.post("/admin/users/rev1/reset", headers=HTML, data={
        "csrf_token": csrf_of(asked.text), "confirm": "yes"})
    assert re.search(r'class="temporary-password">([^<]+)<', done.text)
    assert archive.users.authenticate_token(token) is None
    revoked = [e for e in archive.audit.events("token.revoke") if e["outcome"] == "success"]
    assert revoked and revoked[0]["actor"] == "user:admin"
