"""A page form refused by its field rules says in words which field to correct and why
("Port: must be a whole number", "AE title is required"), never the framework's
"body.port" nor what was typed (it may be patient data), and offers the way back to the
form."""

from __future__ import annotations

from tests.unit.test_accounts_redteam_s34 import admin_browser  # noqa: F401
from tests.unit.test_web_pages import HTML, csrf_of


def test_a_refused_page_form_names_the_fields_in_words(archive, admin_browser):  # noqa: F811
    sites = admin_browser.get("/admin/sites", headers=HTML)
    refused = admin_browser.post("/admin/sites", headers=HTML, data={
        "csrf_token": csrf_of(sites.text), "host": "pacs.example", "port": "Smith^John"})
    assert refused.status_code == 422
    assert "Some fields are not right" in refused.text
    assert "Port: must be a whole number" in refused.text
    assert "AE title is required" in refused.text
    assert "body." not in refused.text and "Smith^John" not in refused.text
    assert "Back to the form" in refused.text
