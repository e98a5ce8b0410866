"""The archive with its blobs on a real S3 server (SeaweedFS, started once per session).

The modules beside this file import the archive's own tests (from tests/unit and
tests/interop) and run them again with these fixtures in place of the file-store ones: the
same behaviour, proven on the object store. Each test gets a fresh prefix in the bucket, and
each fixture checks that no blob went to a local folder.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from imageshare.app import Archive
from imageshare.storage.s3 import S3BlobStore
from tests.conftest import make_archive
from tests.peers import ADMIN_PASSWORD, RunningServer
from tests.s3_server import SeaweedS3


@pytest.fixture
def s3_settings(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Settings for a store under a fresh prefix; AWS_* variables set as an operator would."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return {"storage_url": s3_server.storage_url(), "s3_endpoint_url": s3_server.endpoint}


def _s3_archive(tmp_path: Path, s3_settings: dict[str, str], database_url: str = "",
                **settings: object) -> Archive:
    built = make_archive(tmp_path, database_url, **s3_settings, **settings)
    assert isinstance(built.blobs, S3BlobStore)
    built.users.ensure_admin(ADMIN_PASSWORD)
    return built


@pytest.fixture
def archive(tmp_path: Path, s3_settings: dict[str, str]) -> Iterator[Archive]:
    """An archive on SQLite with its blobs on S3."""
    built = _s3_archive(tmp_path, s3_settings)
    yield built
    built.close()
    assert not (tmp_path / "data" / "blobs").exists()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_archive(request: pytest.FixtureRequest, tmp_path: Path,
                s3_settings: dict[str, str]) -> Iterator[Archive]:
    """The same on SQLite and on PostgreSQL (the scale-out pair: PostgreSQL + S3)."""
    url = request.getfixturevalue("postgres").new_database() if (
        request.param == "postgresql") else ""
    built = _s3_archive(tmp_path, s3_settings, url)
    yield built
    built.close()
    assert not (tmp_path / "data" / "blobs").exists()


def s3_server_env(s3_server: SeaweedS3) -> dict[str, str]:
    """Environment of an ``imageshare serve`` keeping its blobs on S3 (fresh prefix)."""
    return {**s3_server.env(), "IMAGESHARE_STORAGE_URL": s3_server.storage_url()}


@pytest.fixture
def server(tmp_path: Path, s3_server: SeaweedS3) -> Iterator[RunningServer]:
    """``imageshare serve`` (several DICOM processes) with its blobs on S3."""
    running = RunningServer(tmp_path / "server-data", extra_env=s3_server_env(s3_server))
    running.start()
    yield running
    running.stop()
    assert not (tmp_path / "server-data" / "blobs").exists()
