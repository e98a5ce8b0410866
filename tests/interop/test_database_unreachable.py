"""A PostgreSQL database that is not there (never made, a server down, a password refused)
ended every command and the server's start in a raw SQLAlchemy traceback; it is now one line
saying which database (never its password) and the driver's reason, exit 2."""

from __future__ import annotations

import pytest

from imageshare.domain.errors import ConfigurationError
from tests.conftest import make_archive
from tests.peers import free_port

pytestmark = pytest.mark.interop


def test_a_database_that_was_never_made_is_named_with_the_reason(tmp_path, postgres,
                                                                  imageshare):
    url = postgres.url("never_made_s37").replace("postgres@", "postgres:pg-password-s37@")
    with pytest.raises(ConfigurationError) as why:
        make_archive(tmp_path, database_url=url)
    said = str(why.value)
    assert "cannot be reached" in said and "never_made_s37" in said
    assert "does not exist" in said and "pg-password-s37" not in said
    ran = imageshare(tmp_path / "data", "db", "upgrade", database_url=url)
    assert ran.returncode == 2 and "Traceback" not in ran.stderr
    assert "never_made_s37" in ran.stderr and "pg-password-s37" not in ran.stderr


def test_a_server_that_is_down_is_named_with_the_reason(tmp_path):
    port = free_port()  # nothing listens there
    url = f"postgresql+psycopg://imageshare@127.0.0.1:{port}/imageshare"
    with pytest.raises(ConfigurationError, match="cannot be reached") as why:
        make_archive(tmp_path, database_url=url)
    assert f"127.0.0.1:{port}" in str(why.value)
