"""A clinician at hospital A finds a patient, checks the other hospital (a second real
ImageShare, reached through a slow network link) from the study page, and retrieves the
study held only there: the status per site goes from not yet checked to checking, up to date,
downloading and stored here as a temporary copy from Hospital B until its expiry date; the
copy says so wherever it is shown, and the finished retrieval's page opens the study.
Real Chromium, two real ImageShare servers."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.factory import ct_series
from tests.peers import RunningServer, free_port
from tests.sites import Preparing

pytestmark = pytest.mark.browser
PASSWORD = "clinician-password"
NHS = "9434765919"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


class SlowLink:
    """A TCP forwarder on loopback that holds every chunk the server sends back for
    ``delay`` seconds: a slow line to the other hospital, so that checking and downloading
    last long enough to be seen."""

    def __init__(self, upstream_port: int, delay: float) -> None:
        self.port = free_port()
        self._upstream = upstream_port
        self._delay = delay
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _pipe(self, reader, writer, delay: float) -> None:
        try:
            while data := await reader.read(65536):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _client(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream)
        await asyncio.gather(self._pipe(reader, up_writer, 0.0),
                             self._pipe(up_reader, writer, self._delay))

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()
        server.close()
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    def start(self) -> SlowLink:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def hospitals(tmp_path) -> Iterator[dict]:
    a = RunningServer(tmp_path / "a", ae_title="SITEA")
    b = RunningServer(tmp_path / "b", ae_title="SITEB")
    link = SlowLink(b.http_port, 0.6)
    here = ct_series(tmp_path / "here", 1, patient_id=NHS, patient_name="Franklin^Rosalind")
    there = ct_series(tmp_path / "there", 6, patient_id=NHS, patient_name="Franklin^Rosalind")
    at_a, at_b = Preparing(a), Preparing(b)
    try:
        at_a.studies(here)
        at_b.studies(there)
        at_a.user("doctor", PASSWORD, "clinician")
        token = at_b.user("site-a", "service-password", "service", token=True)
        # Hospital B is reached through the slow line.
        at_a.site("SITEB", b, "Hospital B", token, inbox=False)
        at_a.archive.nodes.add(replace(at_a.archive.nodes.get("SITEB"), dicomweb_url=(
            f"http://127.0.0.1:{link.port}/dicomweb")), replace=True)
    finally:
        at_a.close()
        at_b.close()
    link.start()
    try:
        a.start()
        b.start()
        yield {"a": a, "here": dcmread(here[0], stop_before_pixels=True).StudyInstanceUID,
               "there": dcmread(there[0], stop_before_pixels=True).StudyInstanceUID}
    finally:
        link.stop()
        a.stop()
        b.stop()


def test_a_clinician_retrieves_a_temporary_copy_and_sees_each_state(
        chromium, hospitals, tmp_path):
    base = hospitals["a"].url
    shots = tmp_path / "screenshots"
    shots.mkdir()
    context = chromium.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()

    def shot(label: str) -> None:
        page.screenshot(path=str(shots / f"exchange-{label}.png"), full_page=False)

    page.goto(base + "/login")
    page.fill("input[name=username]", "doctor")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(base + "/")
    page.fill("input[name=q]", "943 476 5919")
    page.press("input[name=q]", "Enter")
    page.click("text=Franklin, Rosalind")
    page.wait_for_url(f"{base}/studies/{hospitals['here']}")
    panel = page.locator("#site-status")
    assert "Hospital B: not yet checked" in " ".join(panel.inner_text().split())
    assert "SITEB" not in panel.inner_text()

    page.click("button.check-sites")
    page.wait_for_selector("#site-status .site-row[data-state=checking]", timeout=10000)
    page.locator("#other-sites").scroll_into_view_if_needed()
    shot("1-checking")
    row = f"#site-status tr[data-study='{hospitals['there']}']"
    page.wait_for_selector(row, timeout=30000)
    text = page.inner_text("#site-status")
    assert "up to date" in text and "checked" in text and "linked" in text
    assert "only at Hospital B" in text
    shot("2-only-at-hospital-b")

    page.click(f"{row} button.retrieve")
    page.wait_for_selector(f"{row}[data-local=downloading]", timeout=20000)
    page.locator("#other-sites").scroll_into_view_if_needed()
    job_link = page.get_attribute(f"{row} a.follow-job", "href")
    # Progress shows while it comes in (the slow line makes it last a few seconds).
    page.wait_for_selector(f"{row} >> text=/downloading [1-5]\\/6/", timeout=30000)
    shot("3-downloading")
    page.wait_for_selector(f"{row}[data-local=temporary]", timeout=60000)
    stored = page.inner_text(row)
    assert "stored here as a temporary copy from Hospital B until" in stored
    page.locator("#other-sites").scroll_into_view_if_needed()
    shot("4-stored-temporary-copy")

    page.click(f"{row} >> text=Open")
    page.wait_for_url(f"{base}/studies/{hospitals['there']}")
    banner = page.inner_text(".temporary-copy")
    assert "Temporary copy from Hospital B, stored here until" in banner
    shot("5-temporary-copy-study")

    # Wherever the copy is shown it says where it came from and until when.
    page.click("text=Open viewer")
    assert "temporary copy from Hospital B until" in page.inner_text(".viewer-banner")
    page.goto(base + "/")
    assert "temporary copy from Hospital B until" in page.inner_text("table.results")
    # The finished retrieval's page opens the study (it used to offer a download: 400).
    page.goto(base + job_link)
    assert "Download" not in page.inner_text("#job")
    page.click("a.open-study")
    page.wait_for_url(f"{base}/studies/{hospitals['there']}")
    context.close()

    for name in ("1-checking", "3-downloading", "4-stored-temporary-copy",
                 "5-temporary-copy-study"):
        assert (shots / f"exchange-{name}.png").stat().st_size > 10_000
    if os.environ.get("IMAGESHARE_UPDATE_SCREENSHOTS"):  # refresh the documentation's copies
        DOCS.mkdir(parents=True, exist_ok=True)
        for found in sorted(shots.glob("exchange-*.png")):
            shutil.copy(found, DOCS / found.name)
