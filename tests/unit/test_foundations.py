"""Settings, identifiers, the blob store contract and migrations."""

from __future__ import annotations

import io
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from imageshare.app import create_admin
from imageshare.domain.errors import ConfigurationError
from imageshare.domain.identifiers import is_valid_nhs_number, is_valid_uid, normalise_name
from imageshare.settings import env_name, load_settings, setting_docs
from imageshare.storage.files import FileBlobStore
from imageshare.storage.index.database import (
    current_revision,
    head_revision,
    make_engine,
    migrate,
    newest_migration,
)
from imageshare.storage.index.schema import metadata
from tests.conftest import make_archive

ROOT = Path(__file__).resolve().parents[2]


def test_environment_overrides_file_and_defaults(tmp_path):
    config = tmp_path / "imageshare.toml"
    config.write_text('[imageshare]\nhttp_port = 9000\nae_title = "FROMFILE"\n')
    settings = load_settings(
        {"dicom_port": 2000}, environ={"IMAGESHARE_AE_TITLE": "FROMENV"}, config_file=config
    )
    assert (settings.http_port, settings.ae_title, settings.dicom_port) == (9000, "FROMENV", 2000)
    assert settings.http_host == "127.0.0.1"


def test_invalid_setting_values_are_refused_clearly():
    with pytest.raises(ConfigurationError, match="IMAGESHARE|http_port"):
        load_settings(environ={"IMAGESHARE_HTTP_PORT": "eighty"})
    with pytest.raises(ConfigurationError, match="unknown setting"):
        load_settings({"no_such_setting": 1}, environ={})


def test_numbers_below_their_floor_are_refused_before_anything_runs():
    """A negative size limit, an endless or NaN timeout, or a retention period of 0 days (the
    retention task would delete arrivals the day they came) stops the start with a reason."""
    for name, value in (("temporary_days", "0"), ("upload_retention_days", "-3"),
                        ("http_port", "-1"), ("recovery_grace_seconds", "nan"),
                        ("recovery_grace_seconds", "inf")):
        with pytest.raises(ConfigurationError, match=f"{name} is a number of"):
            load_settings(environ={f"IMAGESHARE_{name.upper()}": value})
    assert load_settings(environ={"IMAGESHARE_TEMPORARY_DAYS": "1"}).temporary_days == 1


def test_settings_with_a_list_of_choices_are_checked_when_loaded():
    with pytest.raises(ConfigurationError, match="smtp_tls is one of none, starttls, ssl"):
        load_settings(environ={"IMAGESHARE_SMTP_TLS": "tls"})
    with pytest.raises(ConfigurationError, match="log_level"):
        load_settings(environ={"IMAGESHARE_LOG_LEVEL": "loud"})
    with pytest.raises(ConfigurationError, match="push_retry_seconds"):
        load_settings(environ={"IMAGESHARE_PUSH_RETRY_SECONDS": "2,soon"})
    loaded = load_settings(environ={"IMAGESHARE_LOG_LEVEL": "debug",
                                    "IMAGESHARE_SQLITE_SYNCHRONOUS": "full",
                                    "IMAGESHARE_PUSH_RETRY_SECONDS": "1, 5"})
    assert (loaded.log_level, loaded.sqlite_synchronous) == ("DEBUG", "FULL")
    assert loaded.push_retry_schedule == (1.0, 5.0)


def test_readme_documents_every_setting_and_command():
    readme = (ROOT / "README.md").read_text()
    table = subprocess.run([sys.executable, "-m", "imageshare", "settings", "--markdown"],
                           capture_output=True, text=True, check=True).stdout.strip()
    documented = readme.split("<!-- settings:start -->")[1].split("<!-- settings:end -->")[0]
    assert documented.strip() == table, "regenerate the table: imageshare settings --markdown"
    for name, env, _default, _help in setting_docs():
        assert env in readme, f"{env} is not documented in README.md"
        assert env == env_name(name)
    commands = subprocess.run([sys.executable, "-m", "imageshare", "commands"],
                              capture_output=True, text=True, check=True).stdout
    listed = readme.split("<!-- commands:start -->")[1].split("<!-- commands:end -->")[0]
    assert listed.strip() == f"```sh\n{commands}```", "regenerate: imageshare commands"
    for command in ("imageshare serve", "imageshare user add", "imageshare node add",
                    "imageshare import", "imageshare audit export", "make run", "make test"):
        assert command in readme, command


@pytest.mark.parametrize(
    ("value", "valid"),
    [("9434765919", True), ("943 476 5919", True), ("9434765918", False),
     ("123", False), ("", False)],
)
def test_nhs_number_check_digit(value, valid):
    assert is_valid_nhs_number(value) is valid


def test_uid_and_name_rules():
    assert is_valid_uid("1.2.840.10008.1.2.1")
    assert not is_valid_uid("1.02.3") and not is_valid_uid("1." + "1" * 70)
    assert normalise_name("Müller^Jürgen  ") == "MULLER^JURGEN"


def test_migrations_build_exactly_the_declared_schema(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'i.sqlite'}")
    migrate(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diff == []
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_migrations_on_postgresql_match_too(postgres):
    engine = make_engine(postgres.new_database())
    migrate(engine)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []


def test_patient_name_prefix_search_uses_the_name_index_on_postgresql(postgres):
    engine = make_engine(postgres.new_database())
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO patients (patient_id, issuer, name, name_norm, birth_date, sex, attrs,"
            " created_at) SELECT 'P' || g, '', 'N', 'NAME' || g, '', '', '{}', now()"
            " FROM generate_series(1, 5000) g"))
        conn.execute(text("ANALYZE patients"))
        plan = "\n".join(conn.execute(text(
            "EXPLAIN SELECT pk FROM patients WHERE name_norm LIKE 'NAME123%' ESCAPE '\\'"
        )).scalars())
    assert "ix_patients_name_norm" in plan, plan


def test_the_head_revision_is_found_without_alembic(tmp_path):
    """A start checks the schema without loading alembic: the head read from the migration
    files is the one alembic finds, and a database migrated to it is recognised."""
    engine = make_engine(f"sqlite:///{tmp_path / 'i.sqlite'}")
    assert newest_migration() == head_revision(engine)
    migrate(engine)
    assert current_revision(engine) == newest_migration()
    migrate(engine, upgrade=False)  # at the head: nothing to do


def test_database_from_a_newer_version_is_refused(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'i.sqlite'}")
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(ConfigurationError, match="newer than this ImageShare"):
        migrate(engine)


def test_older_database_is_refused_without_upgrade(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'i.sqlite'}")
    with pytest.raises(ConfigurationError, match="imageshare db upgrade"):
        migrate(engine, upgrade=False)


def test_first_start_creates_admin_and_prints_generated_password_once(tmp_path):
    env = {"IMAGESHARE_DATA_DIR": str(tmp_path / "d"), "PATH": "/usr/bin:/bin"}
    code = (
        "from imageshare.app import build_archive; from imageshare.settings import load_settings;"
        "a = build_archive(load_settings());"
        "print(a.users.ensure_admin(''));print(a.users.ensure_admin(''))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert re.fullmatch(r"[A-Za-z0-9_-]{20}", out[0])
    assert out[1] == "None"


@pytest.mark.parametrize("on_a_terminal", [True, False])
def test_a_generated_admin_password_is_kept_in_a_file_only_its_owner_can_read(
        tmp_path, on_a_terminal):
    archive = make_archive(tmp_path)
    try:
        console = io.StringIO()
        path = create_admin(archive, console, interactive=on_a_terminal)
        password = path.read_text().strip()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.parent == tmp_path / "data"
        assert str(path.resolve()) in console.getvalue()
        # The console (perhaps a log) shows the password only when it is a terminal.
        assert (password in console.getvalue()) is on_a_terminal
        assert archive.users.sign_in("admin", password) is not None
        assert create_admin(archive, io.StringIO(), interactive=on_a_terminal) is None
    finally:
        archive.close()


def test_blob_stores_of_several_processes_share_new_folders_safely(tmp_path):
    """Each process has its own store object; they race to make the same minute folder."""
    import threading

    from imageshare.storage.blobs import new_blob_key

    stores = [FileBlobStore(tmp_path / "blobs") for _ in range(8)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(stores))

    def put_some(store: FileBlobStore) -> None:
        try:
            start.wait()
            for _ in range(20):
                store.put(new_blob_key(), io.BytesIO(b"data"), 4)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=put_some, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(list(stores[0].keys())) == 160


def test_a_folder_made_by_another_process_meanwhile_is_not_an_error(tmp_path, monkeypatch):
    """Another process creates each folder just before we do."""
    import os
    from pathlib import Path as RealPath

    from imageshare.storage.blobs import new_blob_key

    store = FileBlobStore(tmp_path / "blobs")
    original = RealPath.mkdir

    def racing_mkdir(self, *args, **kwargs):
        os.makedirs(self, exist_ok=True)  # the other process got there first
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RealPath, "mkdir", racing_mkdir)
    key = new_blob_key()
    store.put(key, io.BytesIO(b"data"), 4)
    assert list(store.keys()) == [key]


def test_installed_dicom_libraries_are_above_their_known_vulnerabilities():
    """pydicom 3.0.2 fixed a path traversal through DICOMDIR File IDs (CVE-2026-32711,
    GHSA-v856-2rf8-9f28); pynetdicom 3.0.4 is the floor the trust review set. pyproject asks
    for at least these, and the installed ones meet them."""
    from importlib.metadata import version

    from packaging.version import Version

    assert Version(version("pydicom")) >= Version("3.0.2")
    assert Version(version("pynetdicom")) >= Version("3.0.4")
    declared = (ROOT / "pyproject.toml").read_text()
    assert '"pydicom>=3.0.2' in declared and '"pynetdicom>=3.0.4' in declared
