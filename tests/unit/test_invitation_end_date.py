"""An upload invitation ends on its date whatever became of it: a link already used to send
images does not open after the end date (its page says what was sent for whom)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi.testclient import TestClient
from sqlalchemy import update

from imageshare.storage.index.schema import upload_invitations
from imageshare.web.server import create_app
from tests.unit.test_exchange_uploads_redteam_s32 import _cd_slice
from tests.unit.test_uploads import (
    _invite,
    _open,
    _refused,
    _send,
    _tus_upload,
    hospital,  # noqa: F401 - the fixture
)


def test_a_sent_invitation_does_not_open_after_its_end_date(hospital, tmp_path):  # noqa: F811
    archive, _sink = hospital
    created = _invite(archive)
    path = _cd_slice(tmp_path)
    with TestClient(create_app(archive)) as client:
        csrf = _open(client, created)
        _tus_upload(client, created.path, csrf, path, path.name)
        assert 'data-state="done"' in _send(client, created.path, csrf)
        assert archive.uploads.invitations.by_public_id(
            created.public_id).state == "submitted"
        assert client.get(created.path, headers={"Accept": "text/html"}).status_code == 200
        with archive.engine.begin() as conn:
            conn.execute(update(upload_invitations).where(
                upload_invitations.c.public_id == created.public_id).values(
                expires_at=datetime.now(UTC) - timedelta(minutes=1)))
        page = client.get(created.path, headers={"Accept": "text/html"})
        upload_page = client.get(created.path + "/upload", headers={"Accept": "text/html"},
                                 follow_redirects=False)
    assert page.status_code == 410 and "expired" in page.text
    assert "Lovelace" not in page.text
    assert _refused(upload_page) and "Lovelace" not in upload_page.text
