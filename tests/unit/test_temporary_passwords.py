"""A password an administrator hands over (a reset, an account made without one) is
temporary: signed in with it, on any channel, the account can do nothing but choose its own
on the account page; once it has, it works as before. A password the administrator set
deliberately, or one the person chose, carries no such obligation."""

from __future__ import annotations

import base64
import re

from tests.unit.test_accounts_redteam_s34 import PASSWORD, admin_browser  # noqa: F401
from tests.unit.test_web_pages import HTML, browser_sign_in, csrf_of


def _reset(admin, username: str) -> str:
    users = admin.get("/admin/users", headers=HTML)
    asked = admin.post(f"/admin/users/{username}/reset", headers=HTML,
                       data={"csrf_token": csrf_of(users.text)})
    done = admin.post(f"/admin/users/{username}/reset", headers=HTML,
                      data={"csrf_token": csrf_of(asked.text), "confirm": "yes"})
    return re.search(r'class="temporary-password">([^<]+)<', done.text).group(1)


def _basic(username: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_a_reset_password_lets_the_person_do_nothing_but_choose_their_own(
        archive, admin_browser):  # noqa: F811
    from fastapi.testclient import TestClient

    from imageshare.web.server import create_app

    archive.users.add("clin9", PASSWORD, "clinician")
    temporary = _reset(admin_browser, "clin9")
    with TestClient(create_app(archive)) as person:
        signed_in = browser_sign_in(person, "clin9", temporary)
        assert signed_in.headers["location"] == "/account#password"
        search = person.get("/search", headers=HTML, follow_redirects=False)
        assert search.status_code == 303 and search.headers["location"] == "/account#password"
        account = person.get("/account", headers=HTML)
        assert "temporary one an administrator gave you" in account.text
        # Programs with the temporary password get nothing either.
        assert person.get("/dicomweb/studies",
                          headers=_basic("clin9", temporary)).status_code == 403
        changed = person.post("/account/password", headers=HTML, follow_redirects=False,
                              data={"csrf_token": csrf_of(account.text), "current": temporary,
                                    "new": "my own long password"})
        assert changed.status_code == 303
        assert person.get("/search", headers=HTML, follow_redirects=False).status_code == 200
        assert "temporary one" not in person.get("/account", headers=HTML).text


def test_an_account_made_without_a_password_starts_with_a_temporary_one(
        archive, admin_browser):  # noqa: F811
    users = admin_browser.get("/admin/users", headers=HTML)
    added = admin_browser.post("/admin/users", headers=HTML, data={
        "csrf_token": csrf_of(users.text), "username": "rad2", "role": "radiographer"})
    temporary = re.search(r'class="temporary-password">([^<]+)<', added.text).group(1)
    actor = archive.users.authenticate("rad2", temporary)
    assert actor is not None and actor.role == "changing-password"
    archive.users.add("rad3", PASSWORD, "radiographer")  # a password set on purpose
    assert archive.users.authenticate("rad3", PASSWORD).role == "radiographer"
