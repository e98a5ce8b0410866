"""A Part 10 file whose meta information names another instance than its data set is stored
with meta information that names the data set, the data set kept byte for byte (PS3.10 7.1)."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from imageshare.domain.actors import cli_actor
from tests.factory import ct_series

ACTOR = cli_actor()


def _after_meta(data: bytes) -> bytes:
    """The bytes of a Part 10 file after its file meta information (the data set)."""
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length:]


def _stale_meta_copy(tmp_path: Path, name: str, *, drop: bool = False) -> tuple[Path, str]:
    """A CT file whose meta information kept the UIDs of the instance it was made from (as
    faulty anonymisers leave it), or has no Media Storage UIDs at all; and its SOP Instance
    UID."""
    source = ct_series(tmp_path / name, count=1, patient_id=f"P-{name}")[0]
    ds = dcmread(source)
    if drop:
        del ds.file_meta.MediaStorageSOPInstanceUID
        del ds.file_meta.MediaStorageSOPClassUID
    else:
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture
    target = tmp_path / f"{name}.dcm"
    ds.save_as(target, enforce_file_format=False)
    return target, str(ds.SOPInstanceUID)


def _stored_bytes(archive, sop_uid: str) -> bytes:
    (inst,) = archive.retrieve.select(ACTOR, "study.retrieve", sop_uids=[sop_uid])
    with archive.retrieve.open(inst) as fh:
        return fh.read()


def _assert_meta_names_data_set(stored: bytes, received: bytes, tmp_path: Path) -> None:
    out = tmp_path / "out.dcm"
    out.write_bytes(stored)
    ds = dcmread(out)
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert ds.file_meta.TransferSyntaxUID == dcmread(out).file_meta.TransferSyntaxUID
    assert _after_meta(stored) == _after_meta(received)  # the data set untouched


def test_a_file_whose_meta_names_another_instance_is_stored_with_meta_of_its_data_set(
        archive, tmp_path):
    path, sop = _stale_meta_copy(tmp_path, "one")
    received = path.read_bytes()
    result = archive.ingest.store_copy(path, ACTOR)
    assert (result.outcome, result.sop_instance_uid) == ("stored", sop)
    _assert_meta_names_data_set(_stored_bytes(archive, sop), received, tmp_path)
    assert not list(archive.ingest.staging_dir.iterdir())
    assert sum(1 for _ in archive.blobs.keys()) == 1  # the first copy was not kept


def test_a_file_without_media_storage_uids_gets_them(archive, tmp_path):
    path, sop = _stale_meta_copy(tmp_path, "bare", drop=True)
    received = path.read_bytes()
    archive.ingest.store_copy(path, ACTOR)
    _assert_meta_names_data_set(_stored_bytes(archive, sop), received, tmp_path)


def test_a_stow_batch_rewrites_only_the_files_whose_meta_disagrees(archive, tmp_path):
    stale, stale_sop = _stale_meta_copy(tmp_path, "stale")
    good = ct_series(tmp_path / "good", count=1, patient_id="P-good")[0]
    good_sop = str(dcmread(good).SOPInstanceUID)
    received = {stale_sop: stale.read_bytes(), good_sop: good.read_bytes()}
    staged = []
    for i, p in enumerate((stale, good)):
        copy = archive.ingest.staging_dir / f"part{i}.dcm"
        copy.write_bytes(p.read_bytes())
        staged.append(copy)
    results = archive.ingest.store_staged_many(staged, ACTOR)
    assert [r.outcome for r in results] == ["stored", "stored"]
    _assert_meta_names_data_set(_stored_bytes(archive, stale_sop), received[stale_sop],
                                tmp_path)
    assert _stored_bytes(archive, good_sop) == received[good_sop]  # as received
    assert not list(archive.ingest.staging_dir.iterdir())
    assert sum(1 for _ in archive.blobs.keys()) == 2
