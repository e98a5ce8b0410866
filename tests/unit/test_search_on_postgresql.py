"""A QIDO-RS search on PostgreSQL: answered and audited with as little database traffic as
the rules allow, its audit event committed before the answer, a revoked token refused at
once on another instance, and connections the database dropped replaced without an error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, event, func, select
from sqlalchemy.engine import make_url

from imageshare.app import Archive
from imageshare.domain.actors import Actor
from imageshare.storage.index.schema import api_tokens, audit_events
from tests.conftest import ADMIN_PASSWORD, make_archive
from tests.factory import ct_series

ADMIN = Actor("user", "admin", "admin", "127.0.0.1")
DICOM_JSON = {"Accept": "application/dicom+json"}


def _client(archive: Archive, token: str) -> object:
    from fastapi.testclient import TestClient

    from imageshare.web.server import create_app

    client = TestClient(create_app(archive))
    client.headers["Authorization"] = f"Bearer {token}"
    return client


@pytest.fixture
def on_postgres(tmp_path: Path, postgres) -> Iterator[tuple[Archive, str, str]]:
    """An archive on a fresh PostgreSQL database with one stored study: (archive, database
    URL, the study's UID)."""
    url = postgres.new_database()
    archive = make_archive(tmp_path / "one", url)
    archive.users.ensure_admin(ADMIN_PASSWORD)
    paths = ct_series(tmp_path / "in", count=2, patient_id="PGQ1")
    study = archive.ingest.store_copy(paths[0], ADMIN).study_uid
    archive.ingest.store_copy(paths[1], ADMIN)
    yield archive, url, study
    archive.close()


def _query_events(url: str) -> list[tuple[str, int]]:
    """Search events as another process sees them (committed only)."""
    other = create_engine(make_url(url).set(drivername="postgresql+psycopg"))
    try:
        with other.connect() as conn:
            return [(r.outcome, r.instance_count) for r in conn.execute(
                select(audit_events.c.outcome, audit_events.c.instance_count)
                .where(audit_events.c.action == "study.query").order_by(audit_events.c.seq))]
    finally:
        other.dispose()


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def test_a_search_is_answered_and_audited_on_one_connection_with_one_commit(on_postgres):
    archive, url, study = on_postgres
    token = archive.users.create_token("admin", "pacs", origin="cli")
    counts = {"checkouts": 0, "commits": 0, "statements": 0}

    def count(name: str):  # noqa: ANN202 - an event listener
        def listener(*_args: object) -> None:
            counts[name] += 1
        return listener

    with _client(archive, token) as client:
        assert client.get("/dicomweb/studies", headers=DICOM_JSON).status_code == 200  # warm
        event.listen(archive.engine.pool, "checkout", count("checkouts"))
        event.listen(archive.engine, "commit", count("commits"))
        event.listen(archive.engine, "before_cursor_execute", count("statements"))
        answer = client.get("/dicomweb/studies", params={"StudyInstanceUID": study},
                            headers=DICOM_JSON)
    assert answer.status_code == 200 and len(answer.json()) == 1
    # One connection for the token, one for the search and its audit event, one commit; no
    # liveness ping (it would be a statement of its own on each connection).
    assert counts == {"checkouts": 2, "commits": 1, "statements": 4}, counts
    assert _query_events(url)[-1] == ("success", 1)


def test_a_search_that_finds_nothing_is_audited_and_committed_before_the_answer(on_postgres):
    archive, url, _study = on_postgres
    token = archive.users.create_token("admin", "pacs", origin="cli")
    before = len(_query_events(url))
    with _client(archive, token) as client:
        answer = client.get("/dicomweb/studies", params={"PatientID": "NOBODY-HERE"},
                            headers=DICOM_JSON)
        assert answer.status_code == 200 and answer.json() == []
        events = _query_events(url)  # read by another connection while the client is open
    assert len(events) == before + 1 and events[-1] == ("success", 0)


def test_a_search_that_fails_leaves_a_failure_event_and_no_success(on_postgres):
    archive, url, _study = on_postgres
    token = archive.users.create_token("admin", "pacs", origin="cli")
    before = len(_query_events(url))
    with _client(archive, token) as client:
        answer = client.get("/dicomweb/studies", params={"StudyDate": "2023-99-99"},
                            headers=DICOM_JSON)
    assert answer.status_code == 400
    assert _query_events(url)[before:] == [("failure", 0)]


def test_a_revoked_token_is_refused_at_once_by_another_instance(on_postgres, tmp_path):
    archive, url, _study = on_postgres
    token = archive.users.create_token("admin", "pacs", origin="cli")
    other = make_archive(tmp_path / "two", url)  # a second instance on the same index
    try:
        with _client(other, token) as client:
            assert client.get("/dicomweb/studies", headers=DICOM_JSON).status_code == 200
            with archive.engine.connect() as conn:
                pk = conn.execute(select(func.max(api_tokens.c.pk))).scalar_one()
            archive.users.revoke_token("admin", pk)
            assert client.get("/dicomweb/studies", headers=DICOM_JSON).status_code == 401
    finally:
        other.close()


def _terminate_others(url: str) -> int:
    """End every server process of the database's other connections (as a restart, a
    failover or an administrator would); returns how many."""
    with psycopg.connect(_dsn(url), autocommit=True) as conn:
        pids = [r[0] for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()")]
        for pid in pids:
            conn.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
    return len(pids)


def test_pooled_connections_the_database_dropped_are_replaced_without_an_error(on_postgres):
    archive, url, study = on_postgres
    token = archive.users.create_token("admin", "pacs", origin="cli")
    with _client(archive, token) as client:
        for _ in range(3):
            assert client.get("/dicomweb/studies", headers=DICOM_JSON).status_code == 200
        assert _terminate_others(url) >= 1
        answer = client.get("/dicomweb/studies", params={"StudyInstanceUID": study},
                            headers=DICOM_JSON)
        assert answer.status_code == 200 and len(answer.json()) == 1
        assert client.get("/healthz").status_code == 200


def test_a_connection_dropped_just_after_check_out_is_retried_once_on_a_new_one(on_postgres):
    archive, url, study = on_postgres
    token = archive.users.create_token("admin", "pacs", origin="cli")
    doomed: list[int] = []
    checkouts = []

    def drop_after_check_out(dbapi_conn, _record, _proxy) -> None:  # noqa: ANN001
        # After the pool's own check has passed, the server ends this very connection: the
        # first of the token look-up (its retry is the second check-out) and the first of the
        # search (the third).
        checkouts.append(dbapi_conn)
        if len(checkouts) in (1, 3):
            doomed.append(dbapi_conn.info.backend_pid)
            with psycopg.connect(_dsn(url), autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(%s, 5000)", (doomed[-1],))

    with _client(archive, token) as client:
        assert client.get("/dicomweb/studies", headers=DICOM_JSON).status_code == 200
        before = len(_query_events(url))
        event.listen(archive.engine.pool, "checkout", drop_after_check_out)
        try:
            answer = client.get("/dicomweb/studies", params={"StudyInstanceUID": study},
                                headers=DICOM_JSON)
        finally:
            event.remove(archive.engine.pool, "checkout", drop_after_check_out)
    # Both the token's connection and the search's were ended under them: both retried.
    assert len(doomed) == 2 and len(checkouts) == 4
    assert answer.status_code == 200 and len(answer.json()) == 1
    assert _query_events(url)[before:] == [("success", 1)], "audited once, not twice"


def test_pooled_connections_are_checked_in_a_process_with_more_than_1024_open_files(
        on_postgres):
    archive, url, study = on_postgres
    token = archive.users.create_token("admin", "pacs", origin="cli")
    import os
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1300:
        pytest.skip("this process may not open more than 1,300 files")
    archive.engine.dispose()  # the pool's next connections are made after the files below
    held = [os.open(os.devnull, os.O_RDONLY)]
    while held[-1] < 1100:  # a busy server's files, filling every lower descriptor
        held.append(os.open(os.devnull, os.O_RDONLY))
    try:
        with _client(archive, token) as client:
            for _ in range(3):
                answer = client.get("/dicomweb/studies", params={"StudyInstanceUID": study},
                                    headers=DICOM_JSON)
                assert answer.status_code == 200 and len(answer.json()) == 1
    finally:
        for fd in held:
            os.close(fd)
