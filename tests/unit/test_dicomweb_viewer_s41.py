"""DICOMweb and viewer defects (session 41): the Study, Series and Instance Bulkdata resources
(PS3.18 10.4.3.3.5) answered instead of a redirect to a 404; a viewport source region with a
negative width or height flipped, not refused (PS3.18 8.3.5.1.3), and bad viewports refused
with the reason; the URLs in DICOMweb answers never taken from a forged Host header; the
viewer's drawing tools offered only on the images where the server keeps the marks."""

from __future__ import annotations

import contextlib
import io
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image
from pydicom import dcmread

from imageshare.domain.actors import Actor, cli_actor
from imageshare.sharing.links import NewShare
from imageshare.web.server import create_app, http_server_config
from tests.conftest import act_as_admin, make_started_archive, require
from tests.factory import ct_series
from tests.multipart_helpers import parse_multipart
from tests.peers import free_port

ACTOR = cli_actor()
OWNER = Actor("user", "sono", "sonographer", "127.0.0.1")
PASSWORD = "a-long-password-s41"
PNG = {"Accept": "image/png"}
ARROW = [{"kind": "arrow", "points": [[1, 1], [10, 10]]}]


@pytest.fixture
def stored(archive, tmp_path) -> dict[str, Any]:
    """A study of two CT series (two slices each, 64x64 random pixels) and its paths."""
    first = ct_series(tmp_path / "a", count=2, patient_id="S41")
    study = dcmread(first[0], stop_before_pixels=True).StudyInstanceUID
    second = ct_series(tmp_path / "b", count=2, patient_id="S41", study_uid=study)
    for path in (*first, *second):
        archive.ingest.store_copy(path, ACTOR)
    return {"study": study, "first": first, "second": second}


def _url(path: Path) -> str:
    ds = dcmread(path, stop_before_pixels=True)
    return (f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")


def _bulk_uris(metadata: list[dict[str, Any]]) -> set[str]:
    """Every BulkDataURI of a metadata answer (top level: CT slices have no deeper ones)."""
    return {e["BulkDataURI"] for attrs in metadata for e in attrs.values()
            if "BulkDataURI" in e}


# -- 1. the Study, Series and Instance Bulkdata resources --------------------------------------


def test_instance_bulkdata_without_a_path_is_its_bulk_data_not_a_redirect_to_a_404(
        client, stored):
    """``.../bulkdata`` answered 307 to ``.../bulkdata/``, which answered 404. PS3.18
    10.4.3.3.5: an Instance Bulkdata resource holds all the instance's bulk data, each part
    named by the BulkDataURI its metadata gives."""
    path = stored["first"][0]
    metadata = client.get(_url(path) + "/metadata").json()
    for suffix in ("/bulkdata", "/bulkdata/"):
        response = client.get(_url(path) + suffix, follow_redirects=False)
        assert response.status_code == 200, (suffix, response.status_code, response.text)
        assert response.headers["content-type"].startswith(
            'multipart/related; type="application/octet-stream"')
        parts = parse_multipart(response)
        assert {h["content-location"] for h, _body in parts} == _bulk_uris(metadata)
        (pixels,) = [body for h, body in parts if h["content-location"].endswith("/7FE00010")]
        assert pixels == dcmread(path).PixelData


@pytest.mark.parametrize("level", ["series", "study"])
def test_series_and_study_bulkdata_hold_every_instances_bulk_data(client, stored, level):
    """``/studies/{s}/series/{se}/bulkdata`` and ``/studies/{s}/bulkdata`` (with or without
    the slash) were 404: they hold the bulk data of every instance, as the metadata names
    it; what cannot be sent in the Accept asked is refused 406 before anything is sent."""
    ds = dcmread(stored["first"][0], stop_before_pixels=True)
    root = f"/dicomweb/studies/{ds.StudyInstanceUID}"
    if level == "series":
        root += f"/series/{ds.SeriesInstanceUID}"
    paths = stored["first"] if level == "series" else [*stored["first"], *stored["second"]]
    metadata = client.get(root + "/metadata").json()
    for suffix in ("/bulkdata", "/bulkdata/"):
        response = client.get(root + suffix, follow_redirects=False)
        assert response.status_code == 200, (suffix, response.text)
        parts = parse_multipart(response)
        assert {h["content-location"] for h, _b in parts} == _bulk_uris(metadata)
        assert sorted(body for _h, body in parts) == sorted(
            dcmread(p).PixelData for p in paths)
    refused = client.get(root + "/bulkdata", headers={"Accept": "application/dicom+json"})
    assert refused.status_code == 406
    assert refused.headers["content-type"] == "application/problem+json"
    assert "octet-stream" in refused.json()["detail"]


# -- 2. the viewport: a negative source width or height flips ---------------------------------


def _png(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)))


def test_a_negative_viewport_source_width_or_height_flips_the_region(client, stored):
    """PS3.18 8.3.5.1.3: (sx, sy) is the source region's top-left corner and a negative sw
    or sh flips that axis. ``viewport=64,64,0,0,-64,-64`` (the whole image turned over) was
    refused as lying outside the image, and a region away from the edge was taken from the
    wrong side of its corner."""
    url = _url(stored["first"][0]) + "/rendered"
    whole = _png(client.get(url, headers=PNG))
    assert whole.shape == (64, 64)
    assert np.array_equal(
        _png(client.get(url, headers=PNG, params={"viewport": "64,64,0,0,-64,-64"})),
        whole[::-1, ::-1])
    assert np.array_equal(
        _png(client.get(url, headers=PNG, params={"viewport": "64,64,8,4,-16,-8"})),
        whole[4:12, 8:24][::-1, ::-1])
    assert np.array_equal(  # sh left out: to the bottom edge, not flipped
        _png(client.get(url, headers=PNG, params={"viewport": "64,64,0,0,-64,"})),
        whole[:, ::-1])
    assert np.array_equal(  # a region running past the edge is clipped to it
        _png(client.get(url, headers=PNG, params={"viewport": "64,64,60,0,-16,8"})),
        whole[0:8, 60:64][:, ::-1])


@pytest.mark.parametrize(("viewport", "reason"), [
    ("0,64", "between 1 and 8192"),
    ("64,0", "between 1 and 8192"),
    ("100000,100000", "between 1 and 8192"),
    ("8193,10", "between 1 and 8192"),
    ("64,64,64,0,8,8", "outside the image (64x64)"),
    ("64,64,0,70,8,-8", "outside the image (64x64)"),
    ("64,64,0,0,0,-8", "not be empty"),
])
def test_a_viewport_that_cannot_be_rendered_is_refused_with_the_reason(
        archive, client, stored, viewport, reason):
    """An empty or oversized viewport, or a source region starting outside the image, is a
    400 problem saying why; an oversized one is refused before the image is read (nothing is
    audited as viewed)."""
    url = _url(stored["first"][0]) + "/rendered"
    viewed = len(list(archive.audit.events(action="study.view")))
    response = client.get(url, headers=PNG, params={"viewport": viewport})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert reason in response.json()["detail"]
    if "8192" in reason:
        assert len(list(archive.audit.events(action="study.view"))) == viewed


# -- 3. URLs in answers never come from a forged Host header ----------------------------------


def _urls_in(client: httpx.Client, study: str, **headers: str) -> list[str]:
    """The Retrieve URLs of a QIDO answer and the BulkDataURIs of the study's metadata."""
    found = client.get("/dicomweb/studies", headers=headers).json()
    metadata = client.get(f"/dicomweb/studies/{study}/metadata", headers=headers).json()
    return ([a["00081190"]["Value"][0] for a in found]
            + sorted(_bulk_uris(metadata)))


def test_a_forged_host_header_never_reaches_the_urls_in_dicomweb_answers(client, stored):
    """Without IMAGESHARE_PUBLIC_URL the Retrieve URL (0008,1190) and the BulkDataURIs took
    their host from the Host header: ``Host: evil.example`` sent the next request (and its
    credentials), or a shared cache's copy of the answer, to the attacker. A Host naming
    this server is kept; any other gives the address the server listens on."""
    forged = _urls_in(client, stored["study"], Host="evil.example:8443")
    assert forged and all(urlsplit(u).hostname == "127.0.0.1" for u in forged), forged
    assert not any("evil" in u for u in forged)
    other_port = _urls_in(client, stored["study"], Host="localhost:9999")
    assert all(urlsplit(u).netloc == urlsplit(forged[0]).netloc for u in other_port)
    # the connection's own address (``testserver`` in-process) and localhost are this server
    assert all(u.startswith("http://testserver/dicomweb/")
               for u in _urls_in(client, stored["study"]))
    assert all(u.startswith("http://localhost/dicomweb/")
               for u in _urls_in(client, stored["study"], Host="localhost"))


def test_the_public_url_when_set_names_every_dicomweb_url(tmp_path):
    built = make_started_archive(tmp_path, public_url="https://images.example.nhs.uk/")
    try:
        path = ct_series(tmp_path / "ct", count=1, patient_id="S41P")[0]
        built.ingest.store_copy(path, ACTOR)
        study = dcmread(path, stop_before_pixels=True).StudyInstanceUID
        with TestClient(create_app(built)) as client:
            act_as_admin(client, built)
            urls = _urls_in(client, study, Host="evil.example")
        assert urls and all(u.startswith("https://images.example.nhs.uk/dicomweb/studies/")
                            for u in urls)
    finally:
        built.close()


@contextlib.contextmanager
def serving(archive: Any) -> Iterator[str]:
    """The archive's web application served by uvicorn in a thread; yields its base URL."""
    server = uvicorn.Server(http_server_config(create_app(archive), archive.settings))
    thread = threading.Thread(target=server.run, name="s41-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{archive.settings.http_port}"
    finally:
        server.should_exit = True
        thread.join(20)


def test_a_real_server_answers_a_forged_host_with_its_own_address(tmp_path):
    """Over a real socket: the forged Host is replaced by the address and port the server
    listens on, which the client can follow (the answer's URL retrieves the study)."""
    port = free_port()
    built = make_started_archive(tmp_path, http_port=port)
    try:
        path = ct_series(tmp_path / "ct", count=1, patient_id="S41R")[0]
        built.ingest.store_copy(path, ACTOR)
        token = built.users.create_token("admin", "s41", origin="cli")
        with serving(built) as base, httpx.Client(
                base_url=base, headers={"Authorization": f"Bearer {token}"}) as http:
            found = http.get("/dicomweb/studies", headers={"Host": f"evil.example:{port}"})
            retrieve_url = found.json()[0]["00081190"]["Value"][0]
            assert retrieve_url.startswith(f"http://127.0.0.1:{port}/dicomweb/studies/")
            followed = http.get(retrieve_url + "/metadata")
            assert followed.status_code == 200
    finally:
        built.close()


# -- 4. the viewer offers drawing tools only where the marks would be kept ---------------------


@pytest.fixture
def reviewer(archive, tmp_path) -> dict[str, Any]:
    """See :func:`_reviewer_shares`."""
    return _reviewer_shares(archive, tmp_path)


def _reviewer_shares(archive: Any, tmp_path: Path) -> dict[str, Any]:
    """A study of two series made by ``sono``; ``rev`` (a reviewer) is named by two opened
    shares of it: the first series with the right to comment, the second to view only."""
    archive.users.add("sono", PASSWORD, "sonographer")
    archive.users.add("rev", PASSWORD, "reviewer")
    first = [archive.ingest.store_copy(p, OWNER) for p in ct_series(
        tmp_path / "a", 2, patient_id="H4141", patient_name="Hopper^Grace")]
    study = first[0].study_uid
    second = [archive.ingest.store_copy(p, OWNER) for p in ct_series(
        tmp_path / "b", 2, patient_id="H4141", patient_name="Hopper^Grace", study_uid=study)]
    for series, comment in ((first, True), (second, False)):
        created = archive.shares.create(NewShare(
            study, series_uids=(series[0].series_uid,), deidentified=False,
            recipient_user="rev", allow_comment=comment), OWNER, None)
        share = archive.shares.by_token(created.token)
        assert archive.shares.check_passcode(share, created.passcode, "127.0.0.1")
    return {"study": study, "first": first, "second": second}


def _manifest(html: str) -> dict[str, Any]:
    found = re.search(r'<script id="manifest" type="application/json">(.*?)</script>', html,
                      re.S)
    assert found is not None
    return json.loads(found.group(1))


def test_the_viewer_page_says_which_series_may_be_marked_as_the_server_decides(
        archive, reviewer):
    """The viewer page offered the drawing tools on every series of a study the reviewer
    may comment on anywhere; saving marks on the view-only series was then refused. The
    page now says per series where marks may go, and it agrees with the marks route."""
    token = archive.users.create_token("rev", "t", origin="cli")
    study = reviewer["study"]
    with TestClient(create_app(archive)) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        page = client.get(f"/viewer/{study}")
        assert page.status_code == 200, page.text
        manifest = _manifest(page.text)
        by_uid = {s["uid"]: s for s in manifest["series"]}
        commented = by_uid[reviewer["first"][0].series_uid]
        viewed = by_uid[reviewer["second"][0].series_uid]
        assert commented["annotate"] is True
        assert viewed["annotate"] is False and viewed["annotateSops"] == []
        assert manifest["annotationsUrl"] and 'data-tool="arrow"' in page.text
        for series, kept in ((reviewer["first"], True), (reviewer["second"], False)):
            saved = client.post(manifest["annotationsUrl"],
                                json={"sop_uid": series[0].sop_instance_uid, "marks": ARROW})
            assert (saved.status_code == 200) is kept, saved.text


def test_a_viewer_who_may_comment_nowhere_gets_no_drawing_tools(archive, reviewer, tmp_path):
    """Shared to view only: no drawing tool, no marks URL, no Save button in the page."""
    archive.users.add("onlyview", PASSWORD, "reviewer")
    created = archive.shares.create(NewShare(
        reviewer["study"], deidentified=False, recipient_user="onlyview",
        allow_comment=False), OWNER, None)
    share = archive.shares.by_token(created.token)
    assert archive.shares.check_passcode(share, created.passcode, "127.0.0.1")
    token = archive.users.create_token("onlyview", "t", origin="cli")
    with TestClient(create_app(archive)) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        page = client.get(f"/viewer/{reviewer['study']}")
    assert page.status_code == 200, page.text
    manifest = _manifest(page.text)
    assert manifest["annotationsUrl"] == ""
    assert all(s["annotate"] is False for s in manifest["series"])
    assert 'data-tool="arrow"' not in page.text and "save-marks" not in page.text


@pytest.mark.browser
def test_in_chromium_the_drawing_tools_show_only_on_the_series_that_may_be_marked(
        tmp_path):
    """Real Chromium, signed in as the reviewer: the Arrow tool is there on the series shared
    to comment, gone on the view-only series (the A key does not pick it either), and back
    on the first."""
    from tests.browser.conftest import CHROMIUM_ARGS, chromium_path

    path = chromium_path()
    require(path is not None, "Chromium (Debian package chromium)")
    from playwright.sync_api import sync_playwright

    built = make_started_archive(tmp_path, http_port=free_port())
    try:
        parts = _reviewer_shares(built, tmp_path)
        first_uid = parts["first"][0].series_uid
        with serving(built) as base, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.goto(base + "/login")
                page.fill("input[name=username]", "rev")
                page.fill("input[name=password]", PASSWORD)
                page.click("button[type=submit]")
                page.wait_for_load_state()
                page.goto(f"{base}/viewer/{parts['study']}?series={first_uid}")
                arrow = page.locator('[data-tool="arrow"]')
                arrow.wait_for(state="visible")
                buttons = page.locator(".series-button")
                uids = page.evaluate("JSON.parse(document.getElementById('manifest')"
                                     ".textContent).series.map((s) => s.uid)")
                other = 1 - uids.index(first_uid)
                buttons.nth(other).click()
                arrow.wait_for(state="hidden")
                assert page.locator("#save-marks").is_hidden()
                page.locator("#canvas").focus()
                page.keyboard.press("a")
                assert page.evaluate("window.imageshareViewer.tool") == "window"
                buttons.nth(1 - other).click()
                arrow.wait_for(state="visible")
            finally:
                browser.close()
    finally:
        built.close()
