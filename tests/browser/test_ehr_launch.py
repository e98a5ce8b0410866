"""A clinician clicks "Images" in the EHR: a signed launch URL opens ImageShare's viewer in a
real browser, signed in, with no patient detail in any address; the same URL used again is
refused with a page saying why."""

from __future__ import annotations

import time
from collections.abc import Iterator
from urllib.parse import urlencode

import pytest
from pydicom import Dataset, dcmread

from imageshare.app import build_archive
from imageshare.domain.actors import cli_actor
from imageshare.ehr.launch import sign_launch
from imageshare.settings import load_settings
from tests.factory import ct_series
from tests.peers import RunningServer

pytestmark = pytest.mark.browser

PASSWORD = "clinician-password"
NHS_NUMBER = "9434765919"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A running server with one CT study, the clinician ``clin`` and the EHR ``epr``."""
    root = tmp_path_factory.mktemp("ehr-launch")
    nhs = Dataset()
    nhs.PatientID = NHS_NUMBER
    nhs.IssuerOfPatientID = "NHS"
    ct = ct_series(root / "in", count=5, size=128, patient_id="H7001",
                   patient_name="Evans^Mary", OtherPatientIDsSequence=[nhs],
                   AccessionNumber="ACC-EHR-1")
    # One DICOM process and a short grace: this test needs neither, and starts faster.
    server = RunningServer(root / "data", extra_env={
        "IMAGESHARE_DICOM_PROCESSES": "1", "IMAGESHARE_SHUTDOWN_GRACE_SECONDS": "1"})
    # Set up in-process before the server starts (three command-line runs cost seconds each).
    archive = build_archive(load_settings(environ=server.env()))
    try:
        for path in ct:
            archive.ingest.store_copy(path, cli_actor())
        archive.users.add("clin", PASSWORD, "clinician")
        secret = archive.ehr_launches.add("epr")
    finally:
        archive.close()
    server.start()
    try:
        yield {"server": server, "secret": secret,
               "ct": dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID}
    finally:
        server.stop()


def _launch_url(site: dict, **context: str) -> str:
    params = [*context.items(), ("ehr", "epr"), ("user", "clin"),
              ("expires", str(int(time.time()) + 60)), ("nonce", f"browser-{time.time_ns()}")]
    return (f"{site['server'].url}/iid?"
            + urlencode([*params, ("signature", sign_launch(params, site["secret"]))]))


def test_a_signed_launch_url_from_the_ehr_opens_the_viewer_once(chromium, site, screenshot):
    url = _launch_url(site, requestType="STUDY", accessionNumber="ACC-EHR-1")
    context = chromium.new_context(viewport={"width": 1280, "height": 800})
    try:
        tab = context.new_page()
        addresses: list[str] = []
        tab.on("request", lambda r: addresses.append(r.url))
        # The EHR's page (another origin) links to ImageShare; the clinician clicks it.
        tab.set_content(f'<a id="images" href="{url}">Images</a>')
        tab.click("#images")
        tab.wait_for_url(f"{site['server'].url}/viewer/{site['ct']}", timeout=15000)
        tab.wait_for_function("() => window.imageshareViewer && "
                              "window.imageshareViewer.shown.length > 0", timeout=15000)
        assert "Evans, Mary" in tab.inner_text("body")
        screenshot(tab, "launched-viewer")
        assert not [a for a in addresses if NHS_NUMBER in a or "Evans" in a or "H7001" in a]
    finally:
        context.close()
    replay = chromium.new_context()
    try:
        tab = replay.new_page()
        tab.goto(url)
        assert "The launch link was refused" in tab.inner_text("main")
        assert "used already" in tab.inner_text("main")
        screenshot(tab, "replayed")
    finally:
        replay.close()
