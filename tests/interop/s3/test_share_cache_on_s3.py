"""Share links on an archive whose blobs are on S3: the local copies a share serves are made
from the stored blob they name, so a corrected instance is never served stale, on any
instance; copies of a share that ended are removed."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import update

from imageshare.app import Archive
from imageshare.archive.corrections import PatientDetails
from imageshare.domain.actors import Actor
from imageshare.sharing.links import NewShare, Share, ShareItem
from imageshare.storage.index.schema import shares
from tests.conftest import make_archive
from tests.factory import ct_series

OWNER = Actor("user", "sono", "sonographer", "127.0.0.1")
HTML = {"Accept": "text/html"}
WRONG = PatientDetails("Wrong^Name", "H4242", birth_date="19700101", sex="O")
RIGHT = PatientDetails("Right^Name", "H4242", birth_date="19700101", sex="F")


@pytest.fixture
def study(archive: Archive, tmp_path: Path) -> str:
    """One CT instance of ``Wrong^Name``, stored on S3."""
    archive.users.add("sono", "a-long-password", "sonographer")
    archive.users.add("drwho", "a-long-password", "reviewer")
    (path,) = ct_series(tmp_path / "ct", 1, patient_id=WRONG.patient_id,
                        patient_name=WRONG.name)
    return archive.ingest.store_copy(path, OWNER).study_uid


@pytest.fixture
def second(archive: Archive, tmp_path: Path, s3_settings: dict[str, str]) -> Iterator[Archive]:
    """Another instance of the same service: the same index and S3 store, its own data
    folder (and so its own share-cache)."""
    built = make_archive(tmp_path / "b", archive.settings.resolved_database_url, **s3_settings)
    yield built
    built.close()


def _correct(archive: Archive, study: str) -> None:
    archive.corrections.correct_study(study, RIGHT, "the name was wrong", OWNER)


def _served(archive: Archive, share: Share, item: ShareItem) -> tuple[Path, bytes]:
    path = archive.shares.content(share, item)
    assert path is not None
    return path, path.read_bytes()


def _name(data: bytes) -> str:
    return str(dcmread(io.BytesIO(data), stop_before_pixels=True).PatientName)


def _share_of(archive: Archive, public_id: str) -> tuple[Share, ShareItem]:
    share = archive.shares.by_public_id(public_id, OWNER.name)
    return share, archive.shares.items(share)[0]


def _cache(archive: Archive, public_id: str) -> Path:
    return archive.settings.data_dir / "share-cache" / public_id


def test_an_identifiable_share_serves_the_corrected_name_after_a_correction(
        archive, anonymous, study):
    created = archive.shares.create(NewShare(study, deidentified=False, recipient_user="drwho",
                                             allow_download=True), OWNER, None)
    anonymous.post("/login", data={"username": "drwho", "password": "a-long-password"},
                   headers=HTML)
    assert anonymous.post(created.path, data={"passcode": created.passcode}, headers=HTML,
                          follow_redirects=False).status_code == 303

    def downloaded_name() -> str:
        response = anonymous.get(created.path + "/download?format=zip")
        assert response.status_code == 200
        with zipfile.ZipFile(io.BytesIO(response.content)) as zipped:
            (name,) = zipped.namelist()
            return _name(zipped.read(name))

    assert downloaded_name() == "Wrong^Name"
    _correct(archive, study)
    assert downloaded_name() == "Right^Name"
    # the copy of the old bytes went with them: one copy, of the current blob
    copies = list(_cache(archive, created.public_id).rglob("*.dcm"))
    assert len(copies) == 1 and _name(copies[0].read_bytes()) == "Right^Name"


def test_a_correction_on_another_instance_is_served_by_this_one(archive, second, study):
    created = archive.shares.create(NewShare(study, deidentified=False,
                                             recipient_user="drwho"), OWNER, None)
    share, item = _share_of(archive, created.public_id)
    assert _name(_served(archive, share, item)[1]) == "Wrong^Name"
    _correct(second, study)
    assert _name(_served(second, share, item)[1]) == "Right^Name"
    assert _name(_served(archive, share, item)[1]) == "Right^Name"


def test_a_deidentified_share_rebuilds_its_copy_after_a_correction(archive, second, study):
    created = archive.shares.create(NewShare(study, profile="teaching"), OWNER, None)
    share, item = _share_of(archive, created.public_id)
    assert archive.shares.prepare(share) == 0
    before, data = _served(archive, share, item)
    assert dcmread(io.BytesIO(data)).PatientSex == "O"  # kept by the teaching profile
    _correct(second, study)
    after, data = _served(archive, share, item)
    header = dcmread(io.BytesIO(data))
    assert header.PatientSex == "F" and b"Right" not in data and b"Wrong" not in data
    assert after != before and not before.exists()
    assert header.SOPInstanceUID == item.public_sop_uid != item.sop_uid
    # and the same on the instance that made the correction
    assert dcmread(_served(second, share, item)[0]).PatientSex == "F"


def test_a_revoked_share_leaves_no_copies_on_any_instance(archive, second, study):
    created = archive.shares.create(NewShare(study, deidentified=False,
                                             recipient_user="drwho"), OWNER, None)
    share, item = _share_of(archive, created.public_id)
    _served(archive, share, item)
    _served(second, share, item)
    assert _cache(archive, created.public_id).is_dir()
    archive.shares.revoke(created.public_id, OWNER)
    assert not _cache(archive, created.public_id).exists()
    # the other instance removes its own copies when it tidies (it does so now and then)
    assert _cache(second, created.public_id).is_dir()
    assert second.shares.remove_ended_copies() == 1
    assert not _cache(second, created.public_id).exists()


def test_an_expired_shares_copies_are_removed_by_the_share_notices(archive, study):
    ended = archive.shares.create(NewShare(study, deidentified=False,
                                           recipient_user="drwho"), OWNER, None)
    live = archive.shares.create(NewShare(study, deidentified=False,
                                          recipient_user="drwho"), OWNER, None)
    for created in (ended, live):
        _served(archive, *_share_of(archive, created.public_id))
    with archive.engine.begin() as conn:
        conn.execute(update(shares).where(shares.c.public_id == ended.public_id)
                     .values(expires_at=datetime.now(UTC) - timedelta(minutes=1)))
    archive.shares.notify_expiring()
    assert not _cache(archive, ended.public_id).exists()
    assert list(_cache(archive, live.public_id).rglob("*.dcm"))
