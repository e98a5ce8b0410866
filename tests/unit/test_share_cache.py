"""The local copies a share serves (data_dir/share-cache): named by the stored blob they were
made from, rebuilt when the instance changes, removed when they may no longer be served."""

from __future__ import annotations

import os
import shutil
import time

import pytest
from pydicom import dcmread

from imageshare.archive.corrections import PatientDetails
from imageshare.domain.actors import Actor
from imageshare.sharing.links import NewShare
from tests.conftest import require
from tests.factory import ct_series

OWNER = Actor("user", "sono", "sonographer", "127.0.0.1")


@pytest.fixture
def study(archive, tmp_path):
    archive.users.add("sono", "a-long-password", "sonographer")
    archive.users.add("drwho", "a-long-password", "reviewer")
    paths = ct_series(tmp_path / "ct", 2, patient_id="H4242", patient_name="Wrong^Name")
    return [archive.ingest.store_copy(path, OWNER) for path in paths][0].study_uid


def _share(archive, study, **options):
    created = archive.shares.create(NewShare(study, **options), OWNER, None)
    share = archive.shares.by_public_id(created.public_id, OWNER.name)
    return share, archive.shares.items(share)


def _correct(archive, study):
    archive.corrections.correct_study(
        study, PatientDetails("Right^Name", "H4242", birth_date="19700101", sex="F"),
        "the name was wrong", OWNER)


def test_a_deidentified_copy_is_rebuilt_when_its_instance_is_corrected(archive, study):
    require(shutil.which("tesseract") is not None, "Tesseract OCR (Debian package tesseract-ocr)")
    share, items = _share(archive, study, profile="teaching")
    before = archive.shares.content(share, items[0])
    assert dcmread(before).PatientSex == "O"
    _correct(archive, study)
    after = archive.shares.content(share, items[0])
    assert dcmread(after).PatientSex == "F"
    assert after != before and not before.exists()
    stored = archive.shares.stored(share, items[0])
    assert after.name == stored.copy_name and stored.blob_key in after.name


def test_an_identifiable_share_on_the_file_store_serves_the_stored_file(archive, study):
    share, items = _share(archive, study, deidentified=False, recipient_user="drwho")
    _correct(archive, study)
    path = archive.shares.content(share, items[0])
    assert str(dcmread(path).PatientName) == "Right^Name"
    assert not (archive.settings.data_dir / "share-cache" / share.public_id).exists()


def test_tidying_removes_what_may_no_longer_be_served(archive, study):
    require(shutil.which("tesseract") is not None, "Tesseract OCR (Debian package tesseract-ocr)")
    share, items = _share(archive, study, profile="teaching")
    gone, _ = _share(archive, study, profile="teaching")
    cache = archive.settings.data_dir / "share-cache"
    current = archive.shares.content(share, items[0])
    folder = current.parent
    unfinished = folder / ".tmp123.part"  # another writer's, still being written
    unfinished.write_bytes(b"partial")
    old_layout = cache / share.public_id / f"{items[1].public_sop_uid}.dcm"
    old_layout.write_bytes(b"a copy from before copies were named by their blob")
    stale = folder / "0123456789abcdef.dcm"  # made from bytes since replaced
    stale.write_bytes(b"old")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    just_made = folder / "fedcba9876543210.dcm"  # made after the sweep read the index
    just_made.write_bytes(b"new")
    unshared = cache / share.public_id / "2.25.1"
    unshared.mkdir()
    (cache / gone.public_id).mkdir()
    archive.shares.revoke(gone.public_id, OWNER)
    (cache / "0000000000000000").mkdir()  # a share deleted since
    assert archive.shares.remove_ended_copies() == 1
    assert current.exists() and unfinished.exists() and just_made.exists()
    assert not stale.exists() and not old_layout.exists() and not unshared.exists()
    assert not (cache / gone.public_id).exists()
    assert not (cache / "0000000000000000").exists()
