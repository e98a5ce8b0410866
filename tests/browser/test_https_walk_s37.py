"""An administrator over HTTPS, in real Chromium: signs in with password and second factor,
opens a study page and signs out; the browser keeps the session under the ``__Host-`` name,
Secure, HttpOnly and SameSite=Strict for path /, and drops it on signing out."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.browser.test_pages_walk_s33 import sign_in
from tests.factory import ct_series
from tests.peers import ADMIN_PASSWORD, RunningServer
from tests.pki import make_pki

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def https_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server serving HTTPS only (a test CA's certificate) with one imported study."""
    root = tmp_path_factory.mktemp("https37")
    pki = make_pki(root / "pki")
    ct_series(root / "in", count=1, size=32, patient_id="H3701", patient_name="Doe^Jane")
    server = RunningServer(root / "data", scheme="https", ca_file=str(pki.ca))
    server.extra_env.update(IMAGESHARE_TLS_CERTIFICATE=str(pki.server.cert),
                            IMAGESHARE_TLS_PRIVATE_KEY=str(pki.server.key))
    server.start()
    try:
        server.cli("import", "--quiet", str(root / "in"))
        yield server
    finally:
        server.stop()


def test_an_administrator_signs_in_with_a_code_over_https_and_out_again(
        chromium, https_site, screenshot):
    import pyotp

    base = https_site.url
    context = chromium.new_context(ignore_https_errors=True)
    page = context.new_page()
    sign_in(page, base, "admin", ADMIN_PASSWORD)
    assert page.url == base + "/account#two-factor"  # an administrator must enrol first
    page.click("#two-factor button[type=submit]")
    page.wait_for_load_state()
    totp = pyotp.TOTP(page.locator(".totp-secret").inner_text().strip())
    page.fill("#two-factor input[name=code]", totp.now())
    page.click("#two-factor button[type=submit]")
    page.wait_for_load_state()
    page.click("header button:has-text('Sign out')")
    page.wait_for_load_state()

    sign_in(page, base, "admin", ADMIN_PASSWORD)
    assert "/login/code" in page.url
    assert context.cookies() and context.cookies()[0]["name"] == "__Host-imageshare_session"
    # The code of the next half minute (the one that turned the factor on is spent).
    page.fill("input[name=code]", totp.at(time.time() + totp.interval))
    page.click("form[action='/login/code'] button[type=submit]")
    page.wait_for_load_state()
    assert page.url == base + "/"
    [cookie] = context.cookies()
    assert {k: cookie[k] for k in ("name", "secure", "httpOnly", "sameSite", "path")} == {
        "name": "__Host-imageshare_session", "secure": True, "httpOnly": True,
        "sameSite": "Strict", "path": "/"}

    page.locator("header input[name=q]").fill("H3701")
    page.locator("header input[name=q]").press("Enter")
    page.wait_for_load_state()
    page.locator("a[href^='/studies/']").first.click()
    page.wait_for_load_state()
    assert "/studies/" in page.url and "Doe" in page.inner_text("main")
    screenshot(page, "study-over-https")

    page.click("header button:has-text('Sign out')")
    page.wait_for_load_state()
    assert "/login" in page.url
    assert context.cookies() == []
    page.go_back()
    page.wait_for_load_state()
    assert "/login" in page.url  # the study page is not shown again from the back button
    context.close()
