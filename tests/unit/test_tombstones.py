"""Deleted images stay deleted, and corrected ones stay corrected, when the machine stops
between the index commit and the removal of the old blobs: start-up recovery removes those
blobs instead of indexing them again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import func, select

from imageshare.app import recover
from imageshare.archive.corrections import PatientDetails
from imageshare.archive.query import Query
from imageshare.domain.actors import Actor
from imageshare.storage.backup import backup
from imageshare.storage.index.schema import blob_tombstones, instances
from tests.factory import ct_series

STAFF = Actor("user", "sono", "sonographer", "127.0.0.1")
ADMIN = Actor("user", "ig-lead", "admin", "10.0.0.1")


SITE = Actor("node", "RETRIEVED", "node", "RETRIEVED@10.9.0.1", grants=frozenset({"dicom.store"}))


def _store(archive, folder: Path, count: int = 2, actor: Actor = STAFF, **dicom: object) -> str:
    results = [archive.ingest.store_copy(p, actor) for p in ct_series(folder, count, **dicom)]
    return results[0].study_uid


def _temporary_study_expired(archive, folder: Path) -> str:
    """A retrieved (temporary) study whose retention period is over."""
    archive.retention.set_rule("source", "RETRIEVED", "temporary", ADMIN)
    study = _store(archive, folder, actor=SITE)
    archive.deletion.clock = lambda: datetime.now(UTC) + timedelta(days=60)
    return study


def _count(archive, table) -> int:
    with archive.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar()


class _StoreStops:
    """The blob store fails every removal, as a machine stopping right after the commit."""

    def __init__(self, archive, monkeypatch) -> None:
        self.archive, self.monkeypatch = archive, monkeypatch

    def __enter__(self) -> None:
        def refuse(_key: str) -> None:
            raise OSError("power lost")
        self.monkeypatch.setattr(self.archive.blobs, "delete", refuse)

    def __exit__(self, *_exc: object) -> None:
        self.monkeypatch.undo()


def test_a_deleted_study_does_not_come_back_after_a_stop_before_its_blobs_went(
        archive, tmp_path, monkeypatch):
    study = _temporary_study_expired(archive, tmp_path / "a")
    kept = _store(archive, tmp_path / "b", count=1, patient_id="OTHER")
    with _StoreStops(archive, monkeypatch):
        removed = archive.deletion.expired(ADMIN)
    assert removed.instances == 2 and len(removed.blobs_left) == 2
    assert len(list(archive.blobs.keys())) == 3  # the bytes are still there

    assert recover(archive) == 0  # nothing is indexed again
    assert study not in {m.study_uid for m in archive.query.find(
        Query("STUDY", {"0020000D": {"vr": "UI"}}), ADMIN)}
    with archive.engine.connect() as conn:
        left = conn.execute(select(instances.c.blob_key)).scalars().all()
    assert len(left) == 1 and set(archive.blobs.keys()) == set(left)  # only `kept`'s blob
    assert _count(archive, blob_tombstones) == 0
    assert archive.catalogue.record(kept) is not None


def test_tombstones_are_settled_when_the_blobs_go_at_once(archive, tmp_path):
    _temporary_study_expired(archive, tmp_path / "a")
    removed = archive.deletion.expired(ADMIN)
    assert removed.instances == 2 and not removed.blobs_left
    assert _count(archive, blob_tombstones) == 0 and not list(archive.blobs.keys())


def test_a_correction_is_not_undone_by_its_old_blobs_after_a_stop(archive, tmp_path, monkeypatch):
    study = _store(archive, tmp_path / "a", patient_id="EMERG1", patient_name="Unknown^Male")
    with _StoreStops(archive, monkeypatch):
        archive.corrections.correct_study(study, PatientDetails("Jones^Peter", "H12345"),
                                          "identified by ward", STAFF)
    assert len(list(archive.blobs.keys())) == 4  # old and new content of both instances

    assert recover(archive) == 0
    assert len(list(archive.blobs.keys())) == 2 and _count(archive, blob_tombstones) == 0
    quarantine = archive.ingest.quarantine_dir
    assert not quarantine.exists() or not list(quarantine.iterdir()), \
        "the old content (with the old patient details) was kept in quarantine"
    for inst in archive.retrieve.select(STAFF, "study.retrieve", study_uids=[study]):
        with archive.retrieve.open(inst) as fp:
            ds = dcmread(fp, stop_before_pixels=True)
        assert ds.PatientID == "H12345" and str(ds.PatientName) == "Jones^Peter"


def test_a_correction_under_a_legal_hold_keeps_the_original_content_until_the_hold_is_lifted(
        archive, tmp_path):
    """A hold freezes evidence: correcting a misfiled study still works (clinical safety),
    but the bytes as they were stay in the store (never indexed again, never removed) until
    the hold is lifted."""
    archive.users.add(ADMIN.name, "long-enough-password", "admin")
    study = _store(archive, tmp_path / "a", patient_id="LIT1", patient_name="Doe^Jane")
    originals = set(archive.blobs.keys())
    hold = archive.retention.place_hold(ADMIN, "litigation", patient_id="LIT1")
    archive.corrections.correct_study(study, PatientDetails("Roe^Richard", "H777"),
                                      "filed under the wrong patient", STAFF)
    assert originals <= set(archive.blobs.keys()) and len(list(archive.blobs.keys())) == 4
    [event] = [e for e in archive.audit.events(action="patient.correction")
               if e["study_uid"] == study]
    assert "originals_kept_for_legal_hold" in str(event["detail"])

    assert recover(archive) == 0  # kept, not indexed again, not removed
    assert originals <= set(archive.blobs.keys())
    report = backup(archive.engine, archive.blobs, tmp_path / "backup")
    assert report.complete and report.blobs == 4  # the evidence is in the backup too
    archive.retention.lift_hold(hold.public_id, ADMIN, "settled")
    assert not originals & set(archive.blobs.keys())
    assert len(list(archive.blobs.keys())) == 2 and _count(archive, blob_tombstones) == 0


def test_a_new_version_does_not_replace_an_instance_under_a_legal_hold(tmp_path):
    from tests.conftest import make_archive

    archive = make_archive(tmp_path, overwrite_instances=True)
    try:
        archive.users.add(ADMIN.name, "long-enough-password", "admin")
        path = ct_series(tmp_path / "in", 1, patient_id="LIT2")[0]
        archive.ingest.store_copy(path, STAFF)
        archive.retention.place_hold(ADMIN, "litigation", patient_id="LIT2")
        ds = dcmread(path)
        ds.SeriesDescription = "changed after the hold"
        changed = tmp_path / "changed.dcm"
        ds.save_as(changed, enforce_file_format=True)
        result = archive.ingest.store_copy(changed, STAFF)
        assert result.outcome == "kept_first" and "legal hold" in result.warning
        (inst,) = archive.retrieve.select(STAFF, "study.retrieve", sop_uids=[ds.SOPInstanceUID])
        with archive.retrieve.open(inst) as fh:
            assert fh.read() == path.read_bytes()
    finally:
        archive.close()
