"""Patient data and secrets at rest: the data folder is private to the service, and TOTP
secrets and site credentials are encrypted in the database with a key kept outside it."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pyotp
import pytest
from sqlalchemy import select, text

from imageshare.domain.errors import ConfigurationError
from imageshare.exchange.nodes import Node
from imageshare.storage.index.database import make_engine
from imageshare.storage.index.schema import users
from tests.conftest import make_archive, upgrade_index
from tests.factory import ct_series
from tests.multipart_helpers import encode_multipart
from tests.peers import RunningServer

SITE_PASSWORD = "s3cret-site-passw0rd"


def _raw_index(data_dir: Path) -> bytes:
    """Every byte SQLite keeps for the index (main file, write-ahead log, shared memory)."""
    return b"".join(p.read_bytes() for p in data_dir.glob("index.sqlite*"))


def _enrol(archive, username: str) -> str:
    uri = archive.users.begin_two_factor(username)
    secret = pyotp.parse_uri(uri).secret
    archive.users.confirm_two_factor(username, pyotp.TOTP(secret).now())
    return secret


def test_totp_secrets_and_site_credentials_are_not_in_the_database_file(tmp_path):
    archive = make_archive(tmp_path)
    archive.users.add("sono", "a-long-password", "sonographer")
    secret = _enrol(archive, "sono")
    archive.nodes.add(Node("REMOTE", "127.0.0.1", 104, dicomweb_url="https://remote.example",
                           dicomweb_auth=f"siteuser:{SITE_PASSWORD}"))
    archive.close()
    raw = _raw_index(tmp_path / "data")
    assert secret.encode() not in raw
    assert SITE_PASSWORD.encode() not in raw
    key_file = tmp_path / "data" / "secret-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    again = make_archive(tmp_path)
    try:
        assert again.nodes.get("REMOTE").dicomweb_auth == f"siteuser:{SITE_PASSWORD}"
        step = int(time.time()) // 30 + 1
        assert again.users.check_code("sono", pyotp.TOTP(secret).generate_otp(step))
    finally:
        again.close()


def test_plaintext_secrets_of_an_older_version_are_encrypted_on_start(tmp_path):
    """An index at revision 0011 (plaintext columns) is migrated and its secrets sealed."""
    data = tmp_path / "data"
    data.mkdir()
    engine = make_engine(f"sqlite:///{data / 'index.sqlite'}")
    upgrade_index(engine, "0011")
    secret = pyotp.random_base32()
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    with engine.begin() as conn:  # as version 0011 wrote them
        conn.execute(text(  # the columns 0011 had (not those added since)
            "INSERT INTO users (username, password_hash, role, disabled, created_at, "
            "totp_secret, totp_enabled) VALUES ('old', 'x', 'clinician', 0, :now, :secret, 1)"),
            {"now": now, "secret": secret})
        conn.execute(text(
            "INSERT INTO nodes (ae_title, host, port, dicomweb_url, display_name, may_query, "
            "may_retrieve, may_store, created_at, dicomweb_auth) VALUES ('OLDSITE', "
            "'127.0.0.1', 104, '', '', 1, 1, 1, :now, :auth)"),
            {"now": now, "auth": f"u:{SITE_PASSWORD}"})
    engine.dispose()
    assert SITE_PASSWORD.encode() in _raw_index(data)

    archive = make_archive(tmp_path)
    try:
        raw = _raw_index(data)
        assert secret.encode() not in raw
        assert SITE_PASSWORD.encode() not in raw
        with archive.engine.connect() as conn:
            stored = conn.execute(select(users.c.totp_secret)).scalar()
        assert stored.startswith("fernet1:")
        assert archive.nodes.get("OLDSITE").dicomweb_auth == f"u:{SITE_PASSWORD}"
        assert archive.users.check_code(
            "old", pyotp.TOTP(secret).generate_otp(int(time.time()) // 30 + 1))
    finally:
        archive.close()


def test_a_key_from_the_environment_is_used_and_another_key_is_refused(tmp_path):
    key = "k" * 40
    archive = make_archive(tmp_path, secret_key=key)
    archive.nodes.add(Node("REMOTE", "127.0.0.1", 104, dicomweb_auth=f"u:{SITE_PASSWORD}"))
    archive.close()
    assert not (tmp_path / "data" / "secret-key").exists()
    with pytest.raises(ConfigurationError, match="another key"):
        other = make_archive(tmp_path, secret_key="z" * 40)
        try:
            other.nodes.get("REMOTE")
        finally:
            other.close()


def test_the_data_folder_and_everything_the_server_writes_are_private(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    (data / "exports").mkdir(mode=0o755)
    old_export = data / "exports" / "old.zip"
    old_export.write_bytes(b"PK old export")
    old_export.chmod(0o644)
    server = RunningServer(data)
    server.start()
    try:
        files = ct_series(tmp_path / "ct", count=2, size=16, patient_id="PRIV1")
        body, content_type = encode_multipart([p.read_bytes() for p in files])
        with server.http() as client:
            stored = client.post("/dicomweb/studies", content=body,
                                 headers={"Content-Type": content_type})
            assert stored.status_code == 200
        server.cli("import", "--quiet", str(tmp_path / "ct"))
    finally:
        server.stop()
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    seen = {"index.sqlite": False, "blob": False}
    for path in [data, *data.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_dir():
            assert mode == 0o700, path
        else:
            assert mode == 0o600, (path, oct(mode))
            seen["index.sqlite"] |= path.name == "index.sqlite"
            seen["blob"] |= "blobs" in path.parts
    assert all(seen.values()), seen

