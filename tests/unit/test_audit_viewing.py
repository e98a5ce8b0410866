"""A viewing is one audit event: a viewer fetching a study's frames, renderings and
thumbnails one by one left one ``study.view`` row per fetch (hundreds for one CT), which
buried who saw what under repeats. The same successful access by the same user from the same
address within ``audit_view_window_seconds`` is now recorded once; refusals, failures, whole
instances and other users are recorded every time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread

from imageshare.app import Archive
from imageshare.audit.repeats import RepeatWindow
from imageshare.domain.actors import cli_actor
from imageshare.web.server import create_app
from tests.conftest import act_as_admin, make_started_archive
from tests.factory import ct_series
from tests.peers import ADMIN_PASSWORD


def _stored(archive: Archive, tmp_path: Path) -> list[str]:
    """URLs of the two stored slices of one CT study."""
    urls = []
    for path in ct_series(tmp_path / "ct", count=2, patient_id="VIEW1"):
        archive.ingest.store_copy(path, cli_actor())
        ds = dcmread(path, stop_before_pixels=True)
        urls.append(f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                    f"/instances/{ds.SOPInstanceUID}")
    return urls


def _views(archive: Archive, action: str = "study.view") -> list[dict]:
    return [e for e in archive.audit.events(action=action) if e["patient_id"] == "VIEW1"
            or e["outcome"] != "success"]


@pytest.fixture
def served(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Archive,
                                                                              httpx.Client]]:
    window = getattr(request, "param", 300.0)
    archive = make_started_archive(tmp_path, audit_view_window_seconds=window)
    archive.users.ensure_admin(ADMIN_PASSWORD)
    with TestClient(create_app(archive)) as client:
        act_as_admin(client, archive)
        yield archive, client
    archive.close()


def test_a_viewer_fetching_frames_and_thumbnails_is_one_event(served, tmp_path) -> None:
    archive, client = served
    first, second = _stored(archive, tmp_path)
    for url in (f"{first}/frames/1/rendered", f"{first}/frames/1/rendered",
                f"{first}/thumbnail", f"{second}/rendered", f"{second}/frames/1/thumbnail"):
        assert client.get(url).status_code == 200, url

    (view,) = _views(archive)
    assert view["outcome"] == "success"
    assert view["actor"] == "user:admin"

    # the stored frames a viewer such as OHIF fetches: one event for the viewing too
    for _ in range(3):
        response = client.get(f"{first}/frames/1",
                              headers={"Accept": "multipart/related; type=\"application/"
                                                 "octet-stream\"; transfer-syntax=*"})
        assert response.status_code == 200
    assert len(_views(archive, "study.retrieve")) == 1

    # a whole instance is recorded each time it is taken
    for _ in range(2):
        assert client.get(first, headers={"Accept": "application/dicom"}).status_code == 200
    assert len(_views(archive, "study.retrieve")) == 3


def test_refusals_and_other_users_are_recorded_every_time(served, tmp_path) -> None:
    archive, client = served
    first, _second = _stored(archive, tmp_path)
    missing = first.rsplit("/", 1)[0] + "/1.2.3.4.5.6.7"
    for _ in range(2):
        assert client.get(f"{missing}/rendered").status_code == 404
    assert [e["outcome"] for e in _views(archive)] == ["failure", "failure"]

    assert client.get(f"{first}/rendered").status_code == 200
    archive.users.add("dr.other", "a-long-password-1", "clinician")
    other = archive.users.create_token("dr.other", "viewer", origin="cli")
    response = client.get(f"{first}/rendered", headers={"Authorization": f"Bearer {other}"})
    assert response.status_code == 200
    assert client.get(f"{first}/rendered").status_code == 200
    successes = [e["actor"] for e in _views(archive) if e["outcome"] == "success"]
    assert sorted(successes) == ["user:admin", "user:dr.other"]


@pytest.mark.parametrize("served", [0.0], indirect=True)
def test_a_window_of_zero_records_every_request(served, tmp_path) -> None:
    archive, client = served
    first, _second = _stored(archive, tmp_path)
    for _ in range(3):
        assert client.get(f"{first}/frames/1/rendered").status_code == 200
    assert len(_views(archive)) == 3


def test_a_viewing_after_the_window_is_recorded_again() -> None:
    now = [1000.0]
    window = RepeatWindow(300, clock=lambda: now[0])
    key = ("user:admin", "10.0.0.1", "study.view", "P1", "1.2.3")
    assert not window.seen(key)
    window.note(key)
    now[0] += 299
    assert window.seen(key)
    assert not window.seen(("user:admin", "10.0.0.2", "study.view", "P1", "1.2.3"))
    now[0] += 2
    assert not window.seen(key)
