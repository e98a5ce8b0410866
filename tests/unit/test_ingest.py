"""The one ingest pipeline: durable, indexed, de-duplicated; conflicts and bad input refused."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from sqlalchemy import func, select

from imageshare.domain.actors import Actor, cli_actor
from imageshare.domain.errors import ConflictingInstance, InvalidInstance
from imageshare.storage.index.schema import audit_events, instances, patients, series, studies
from tests.conftest import make_archive
from tests.factory import broken_files, ct_series, us_cine

ACTOR = cli_actor()


def counts(archive) -> dict[str, int]:
    with archive.engine.connect() as conn:
        return {
            t.name: conn.execute(select(func.count()).select_from(t)).scalar()
            for t in (patients, studies, series, instances)
        }


def blob_files(archive) -> int:
    return sum(1 for _ in archive.blobs.keys())


def test_stored_instance_is_indexed_and_byte_identical(any_archive, tmp_path):
    path = ct_series(tmp_path / "in", count=1)[0]
    result = any_archive.ingest.store_copy(path, ACTOR)
    assert result.outcome == "stored"
    (inst,) = any_archive.retrieve.select(ACTOR, "study.retrieve",
                                          sop_uids=[result.sop_instance_uid])
    with any_archive.retrieve.open(inst) as fh:
        assert fh.read() == path.read_bytes()
    assert counts(any_archive) == {"patients": 1, "studies": 1, "series": 1, "instances": 1}


def test_study_counts_and_modalities_follow_each_instance(any_archive, tmp_path):
    paths = ct_series(tmp_path / "ct", count=3, patient_id="P9")
    study_uid = dcmread(paths[0]).StudyInstanceUID
    cine = us_cine(tmp_path / "us", frames=4, patient_id="P9", patient_name="Doe^Jane",
                   study_uid=study_uid)
    for p in [*paths, cine]:
        any_archive.ingest.store_copy(p, ACTOR)
    with any_archive.engine.connect() as conn:
        row = conn.execute(select(studies)).mappings().one()
    assert (row["num_series"], row["num_instances"], row["modalities"]) == (2, 4, "CT\\US")


def test_same_instance_twice_is_a_success_that_changes_nothing(archive, tmp_path):
    path = ct_series(tmp_path / "in", count=1)[0]
    archive.ingest.store_copy(path, ACTOR)
    before = (counts(archive), blob_files(archive))
    again = archive.ingest.store_copy(path, ACTOR)
    assert again.outcome == "duplicate"
    assert (counts(archive), blob_files(archive)) == before


def _changed_copy(path: Path, target: Path) -> Path:
    ds = dcmread(path)
    ds.StudyDescription = "Changed content"
    ds.save_as(target, enforce_file_format=True)
    return target


def test_new_content_under_known_uid_keeps_the_first_and_is_audited(archive, tmp_path):
    path = ct_series(tmp_path / "in", count=1)[0]
    archive.ingest.store_copy(path, ACTOR)
    changed = _changed_copy(path, tmp_path / "changed.dcm")
    result = archive.ingest.store_copy(changed, ACTOR)
    assert result.outcome == "kept_first" and result.warning
    (inst,) = archive.retrieve.select(ACTOR, "study.retrieve", sop_uids=[result.sop_instance_uid])
    with archive.retrieve.open(inst) as fh:
        assert fh.read() == path.read_bytes()
    assert blob_files(archive) == 1
    with archive.engine.connect() as conn:
        details = conn.execute(
            select(audit_events.c.detail).where(audit_events.c.action == "instance.store")
        ).scalars().all()
    assert any('"kept_first"' in d for d in details)


def test_overwrite_setting_replaces_content(tmp_path):
    archive = make_archive(tmp_path, overwrite_instances=True)
    try:
        path = ct_series(tmp_path / "in", count=1)[0]
        archive.ingest.store_copy(path, ACTOR)
        changed = _changed_copy(path, tmp_path / "changed.dcm")
        assert archive.ingest.store_copy(changed, ACTOR).outcome == "replaced"
        (inst,) = archive.retrieve.select(ACTOR, "study.retrieve",
                                          sop_uids=[dcmread(path).SOPInstanceUID])
        with archive.retrieve.open(inst) as fh:
            assert fh.read() == changed.read_bytes()
        assert blob_files(archive) == 1
    finally:
        archive.close()


def test_a_retrieval_from_another_site_never_replaces_a_stored_instance(tmp_path):
    """With overwrite on, a partner's different version of an instance (a DICOMweb retrieval
    stores as the exchange's system actor) leaves ours as it is."""
    archive = make_archive(tmp_path, overwrite_instances=True)
    try:
        path = ct_series(tmp_path / "in", count=1)[0]
        archive.ingest.store_copy(path, ACTOR)
        changed = _changed_copy(path, tmp_path / "changed.dcm")
        exchange = Actor("system", "exchange", "system", "dicomweb")
        assert archive.ingest.store_copy(changed, exchange).outcome == "kept_first"
        (inst,) = archive.retrieve.select(ACTOR, "study.retrieve",
                                          sop_uids=[dcmread(path).SOPInstanceUID])
        with archive.retrieve.open(inst) as fh:
            assert fh.read() == path.read_bytes()
    finally:
        archive.close()


def test_study_of_another_patient_is_refused_with_reason(any_archive, tmp_path):
    first = ct_series(tmp_path / "a", count=1, patient_id="A1")[0]
    any_archive.ingest.store_copy(first, ACTOR)
    ds = dcmread(first)
    other = ct_series(tmp_path / "b", count=1, patient_id="B2", study_uid=ds.StudyInstanceUID)[0]
    before = (counts(any_archive), blob_files(any_archive))
    with pytest.raises(ConflictingInstance, match="already belongs to another patient") as info:
        any_archive.ingest.store_copy(other, ACTOR)
    assert "A1" not in str(info.value)  # the sender is not told whose study it is
    assert (counts(any_archive), blob_files(any_archive)) == before
    (event,) = list(any_archive.audit.events(action="instance.store", limit=1))
    assert event["outcome"] == "refused" and "'A1'" in event["detail"]["conflict"]


def test_compressed_transfer_syntaxes_are_stored_as_received(archive, tmp_path):
    for name in ("US1_J2KR.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm", "JPEG-LL.dcm"):
        source = Path(get_testdata_file(name))
        result = archive.ingest.store_copy(source, ACTOR)
        (inst,) = archive.retrieve.select(ACTOR, "study.retrieve",
                                          sop_uids=[result.sop_instance_uid])
        assert inst.transfer_syntax == dcmread(source).file_meta.TransferSyntaxUID
        with archive.retrieve.open(inst) as fh:
            assert fh.read() == source.read_bytes()


def test_broken_files_are_refused_with_a_reason_and_change_nothing(archive, tmp_path):
    before = (counts(archive), blob_files(archive))
    for name, path in broken_files(tmp_path).items():
        with pytest.raises(InvalidInstance) as info:
            archive.ingest.store_copy(path, ACTOR)
        assert str(info.value), name
    assert (counts(archive), blob_files(archive)) == before
    assert not list(archive.ingest.staging_dir.iterdir())


def test_unindexed_blob_is_recovered_on_start(archive, tmp_path):
    from imageshare.app import recover

    path = ct_series(tmp_path / "in", count=1)[0]
    with open(path, "rb") as fh:
        archive.blobs.put("ab" * 16, fh, path.stat().st_size)
    assert recover(archive) == 1
    assert counts(archive)["instances"] == 1
    assert blob_files(archive) == 1


def test_pipeline_leaves_no_staging_files(archive, tmp_path):
    for p in ct_series(tmp_path / "in", count=3):
        archive.ingest.store_copy(p, ACTOR)
    assert not list(archive.ingest.staging_dir.iterdir())
    shutil.rmtree(tmp_path / "in")


def test_a_failing_index_write_stores_nothing_and_is_audited(archive, tmp_path, monkeypatch):
    import imageshare.archive.ingest as ingest_module

    def broken(*_args, **_kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ingest_module, "index_instance", broken)
    path = ct_series(tmp_path / "in", count=1)[0]
    with pytest.raises(RuntimeError):
        archive.ingest.store_copy(path, ACTOR)
    assert counts(archive)["instances"] == 0
    assert blob_files(archive) == 0
    (event,) = list(archive.audit.events(action="instance.store"))
    assert event["outcome"] == "failure"


def test_start_up_recovery_looks_only_at_blobs_made_since_the_previous_start(archive, tmp_path):
    import time

    from imageshare.app import recover
    from imageshare.storage.blobs import key_prefix_for, new_blob_key

    assert recover(archive) == 0  # first start: everything looked at, nothing lost
    paths = ct_series(tmp_path / "in", count=2)
    old_key = key_prefix_for(time.time() - 86400) + "0" * 24  # made before that start
    new_key = new_blob_key()
    for key, path in ((old_key, paths[0]), (new_key, paths[1])):
        with open(path, "rb") as fh:
            archive.blobs.put(key, fh, path.stat().st_size)
    assert recover(archive) == 1
    assert counts(archive)["instances"] == 1
    assert old_key in set(archive.blobs.keys()) and new_key not in set(archive.blobs.keys())


def stored_digests(archive) -> dict[str, tuple[int, str]]:
    """SOP Instance UID -> (size, SHA-256) as the index recorded them."""
    with archive.engine.connect() as conn:
        rows = conn.execute(select(instances.c.sop_uid, instances.c.size, instances.c.sha256))
        return {r.sop_uid: (r.size, r.sha256) for r in rows}


def blob_digests(archive) -> dict[str, tuple[int, str]]:
    """SOP Instance UID -> (size, SHA-256) of the bytes the blob store holds for it."""
    found = {}
    with archive.engine.connect() as conn:
        for sop_uid, key in conn.execute(select(instances.c.sop_uid, instances.c.blob_key)):
            with archive.blobs.open(key) as fh:
                data = fh.read()
            found[sop_uid] = (len(data), hashlib.sha256(data).hexdigest())
    return found


def test_every_stored_blob_has_its_size_and_sha256_in_the_index(any_archive, tmp_path):
    paths = ct_series(tmp_path / "ct", count=2)
    for path in [*paths, paths[0]]:  # the repeat is a duplicate, recognised by digest
        any_archive.ingest.store_copy(path, ACTOR)
    recorded = stored_digests(any_archive)
    assert recorded == blob_digests(any_archive)
    assert sorted(recorded.values()) == sorted(
        (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths)


def test_a_replaced_instance_records_the_digest_of_its_new_bytes(tmp_path):
    archive = make_archive(tmp_path, overwrite_instances=True)
    try:
        path = ct_series(tmp_path / "in", count=1)[0]
        archive.ingest.store_copy(path, ACTOR)
        archive.ingest.store_copy(_changed_copy(path, tmp_path / "changed.dcm"), ACTOR)
        assert stored_digests(archive) == blob_digests(archive)
    finally:
        archive.close()


def test_instances_stored_before_digests_were_recorded_are_still_recognised(archive, tmp_path):
    path = ct_series(tmp_path / "in", count=1)[0]
    archive.ingest.store_copy(path, ACTOR)
    with archive.engine.begin() as conn:
        conn.execute(instances.update().values(sha256=None))
    assert archive.ingest.store_copy(path, ACTOR).outcome == "duplicate"
    changed = _changed_copy(path, tmp_path / "changed.dcm")
    assert archive.ingest.store_copy(changed, ACTOR).outcome == "kept_first"


def test_overwrite_never_lets_another_site_or_another_patient_replace_what_is_stored(
        tmp_path):
    """With overwrite on, another hospital's new version of a stored instance, or one that
    names another patient, is kept out (the stored instance stays); our own replaces it."""
    from imageshare.access.policy import INBOX
    from imageshare.domain.actors import Actor

    archive = make_archive(tmp_path, overwrite_instances=True)
    try:
        path = ct_series(tmp_path / "in", count=1, patient_id="OWN8",
                         patient_name="Own^Oscar")[0]
        archive.ingest.store_copy(path, ACTOR)
        original = path.read_bytes()
        hospital = Actor("node", "HOSP_B", "node", "HOSP_B@10.1.0.9",
                         grants=frozenset({"dicom.store", INBOX}))
        changed = _changed_copy(path, tmp_path / "changed.dcm")
        assert archive.ingest.store_copy(changed, hospital).outcome == "kept_first"
        stranger = dcmread(changed)
        stranger.PatientName = "Stranger^Sam"
        stranger.save_as(tmp_path / "stranger.dcm")
        assert archive.ingest.store_copy(tmp_path / "stranger.dcm",
                                         ACTOR).outcome == "kept_first"
        (inst,) = archive.retrieve.select(ACTOR, "study.retrieve",
                                          sop_uids=[dcmread(path).SOPInstanceUID])
        with archive.retrieve.open(inst) as fh:
            assert fh.read() == original
        assert archive.ingest.store_copy(changed, ACTOR).outcome == "replaced"
    finally:
        archive.close()


def _other_ids(count: int) -> Sequence:
    return Sequence([Dataset(PatientID=f"ALT{i}", IssuerOfPatientID="ELSEWHERE",
                             TypeOfPatientID="TEXT") for i in range(count)])


def test_a_patient_sequence_of_thousands_of_items_is_refused_before_it_is_parsed(
        archive, tmp_path):
    """Other Patient IDs are kept in the index and answered to queries: a real instance lists
    a handful. One listing thousands (a few megabytes that would take hundreds of megabytes
    to parse, and as many index rows) is refused with the reason; nothing is kept."""
    [many] = ct_series(tmp_path / "many", 1, size=16, patient_id="P9",
                       OtherPatientIDsSequence=_other_ids(5000))
    with pytest.raises(InvalidInstance, match="OtherPatientIDsSequence holds 5000 items"):
        archive.ingest.store_copy(many, cli_actor())
    with archive.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(instances)).scalar() == 0
    [few] = ct_series(tmp_path / "few", 1, size=16, patient_id="P9",
                      OtherPatientIDsSequence=_other_ids(3))
    assert archive.ingest.store_copy(few, cli_actor()).outcome == "stored"
