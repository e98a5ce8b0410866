"""Faults at ingest: damaged files are refused with a reason and change nothing, values that do
not fit their VR are kept, and start-up recovery survives any blob."""

from __future__ import annotations

import io
import logging

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from sqlalchemy import func, select

from imageshare.app import recover
from imageshare.domain.actors import cli_actor
from imageshare.domain.errors import InvalidInstance, OutOfResources
from imageshare.storage.blobs import new_blob_key
from imageshare.storage.index.schema import instances, patients, studies
from tests.conftest import make_archive
from tests.damaged import damaged_files, nested_sequences, odd_but_storable
from tests.factory import ct_series

ACTOR = cli_actor()


def _count(archive, table=instances) -> int:
    with archive.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar()


def _blobs(archive) -> list[str]:
    return list(archive.blobs.keys())


DAMAGED = [
    "nested-500", "corrupted-vr", "length-past-end", "ends-inside-a-header", "missing-columns",
    "short-pixel-data", "fewer-frames-than-declared", "unreadable-rows",
    "native-syntax-encapsulated-data", "offset-table-disagrees", "more-frames-than-fragments",
    "compressed-syntax-native-data", "stray-item-delimiter", "truncated"]


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> dict[str, bytes]:
    return damaged_files(tmp_path_factory.mktemp("damaged"))


@pytest.fixture(scope="module")
def refusing(tmp_path_factory):
    """One archive for all the refusals (each must leave it as empty as it was)."""
    built = make_archive(tmp_path_factory.mktemp("refusing"))
    yield built
    built.close()


@pytest.mark.parametrize("name", DAMAGED)
def test_damaged_data_set_is_refused_with_its_reason_and_changes_nothing(refusing, damaged,
                                                                        name):
    with pytest.raises(InvalidInstance) as info:
        refusing.ingest.store_stream(io.BytesIO(damaged[name]), ACTOR)
    assert len(str(info.value)) > 10
    assert _count(refusing) == 0 and _blobs(refusing) == []
    assert not list(refusing.ingest.staging_dir.iterdir())
    event = next(refusing.audit.events(action="instance.store"))  # the latest
    assert event["outcome"] == "refused" and event["detail"]["reason"] == str(info.value)


def test_every_damaged_case_is_listed_in_the_refusal_test(damaged):
    assert set(damaged) == set(DAMAGED)


def test_500_nested_sequences_are_refused_as_too_deep_not_as_a_crash(archive, tmp_path):
    good = ct_series(tmp_path / "in", count=1)[0].read_bytes()
    with pytest.raises(InvalidInstance, match="nested more than 32 levels"):
        archive.ingest.store_stream(io.BytesIO(nested_sequences(good, 500)), ACTOR)
    # 30 levels are real-world (deep structured reports) and stored.
    result = archive.ingest.store_stream(io.BytesIO(nested_sequences(good, 30)), ACTOR)
    assert result.outcome == "stored"


def test_values_that_do_not_fit_their_vr_are_kept_as_received_and_indexed(archive, tmp_path):
    for name, data in odd_but_storable(tmp_path / "odd").items():
        result = archive.ingest.store_stream(io.BytesIO(data), ACTOR)
        assert result.outcome == "stored", name
        (inst,) = archive.retrieve.select(ACTOR, "study.retrieve",
                                          sop_uids=[result.sop_instance_uid])
        with archive.retrieve.open(inst) as fh:
            assert fh.read() == data, name
    with archive.engine.connect() as conn:
        birth = conn.execute(select(patients.c.birth_date)
                             .where(patients.c.patient_id == "ODD1")).scalar()
        number = conn.execute(select(instances.c.instance_number)
                              .where(instances.c.sop_uid == result.sop_instance_uid)).scalar()
    assert birth == "19701345"  # the archive keeps what it was sent
    assert number == 1


def test_pydicom_bad_vr_file_is_stored_with_its_frames_counted_from_the_pixel_data(archive):
    """badVR.dcm: Number of Frames is '1A'; 6000 bytes of 10x10x32-bit pixels are 15 frames."""
    result = archive.ingest.store_copy(get_testdata_file("badVR.dcm"), ACTOR)
    assert result.outcome == "stored"
    with archive.engine.connect() as conn:
        frames = conn.execute(select(instances.c.number_of_frames)).scalar()
        attrs = conn.execute(select(studies.c.attrs)).scalar()
    assert frames == 15
    assert attrs["0020000D"]["Value"] == [result.study_uid]


def test_a_failure_while_parsing_leaves_no_blob_behind(archive, tmp_path, monkeypatch):
    import imageshare.archive.ingest as ingest_module

    def explode(*_args, **_kwargs):
        raise RecursionError("deep")

    monkeypatch.setattr(ingest_module, "read_header", explode)
    path = ct_series(tmp_path / "in", count=1)[0]
    with pytest.raises(RecursionError):
        archive.ingest.store_copy(path, ACTOR)
    assert _blobs(archive) == [] and _count(archive) == 0


def test_start_up_recovery_quarantines_a_blob_it_cannot_store_and_goes_on(
        archive, tmp_path, caplog):
    good = ct_series(tmp_path / "in", count=1, patient_name="Secret^Person")[0]
    bad_key, good_key = new_blob_key(), new_blob_key()
    for key, data in ((bad_key, nested_sequences(good.read_bytes(), 500)),
                      (good_key, good.read_bytes())):
        archive.blobs.put(key, io.BytesIO(data), len(data))
    with caplog.at_level(logging.INFO):
        assert recover(archive) == 1
    assert _count(archive) == 1
    quarantine = archive.settings.quarantine_dir
    assert (quarantine / f"{bad_key}.dcm").read_bytes() == nested_sequences(
        good.read_bytes(), 500)
    assert "nested more than 32 levels" in (quarantine / f"{bad_key}.txt").read_text()
    assert bad_key not in _blobs(archive)
    assert bad_key in caplog.text and "Secret" not in caplog.text


def test_server_starts_after_a_blob_that_crashed_start_up_before(tmp_path):
    """The reported fault: an orphan blob of 500 nested sequences stopped every start."""
    built = make_archive(tmp_path)
    good = ct_series(tmp_path / "in", count=1)[0].read_bytes()
    nested = nested_sequences(good, 500)
    built.blobs.put(new_blob_key(), io.BytesIO(nested), len(nested))
    built.close()
    again = make_archive(tmp_path)
    try:
        recover(again)
        assert list(again.settings.quarantine_dir.glob("*.dcm"))
    finally:
        again.close()


def test_stores_are_refused_below_the_free_space_floor(tmp_path):
    import os

    stat = os.statvfs(tmp_path)
    free_mb = stat.f_bavail * stat.f_frsize >> 20
    built = make_archive(tmp_path, min_free_disk_mb=free_mb + 1024)
    try:
        path = ct_series(tmp_path / "in", count=1)[0]
        with pytest.raises(OutOfResources, match="less than .* MB free"):
            built.ingest.store_copy(path, ACTOR)
        assert _count(built) == 0 and list(built.blobs.keys()) == []
        (event,) = built.audit.events(action="instance.store")
        assert event["outcome"] == "failure"
    finally:
        built.close()


def test_damaged_case_files_parse_with_pydicom_only_where_intended(tmp_path):
    """The corpus really is damaged where it says so: the odd files still read in pydicom."""
    for data in odd_but_storable(tmp_path).values():
        assert dcmread(io.BytesIO(data)).SOPInstanceUID


# -- a Patient ID on record with another name or birth date ------------------------------------


def _record(archive, patient_id: str) -> tuple:
    with archive.engine.connect() as conn:
        return tuple(conn.execute(select(patients.c.name, patients.c.birth_date, patients.c.attrs)
                                  .where(patients.c.patient_id == patient_id,
                                         patients.c.issuer == "")).one())


@pytest.mark.parametrize("change", [{"patient_name": "Intruder^Ivan"},
                                    {"PatientBirthDate": "19991231"}])
def test_an_instance_contradicting_the_patient_record_is_refused_and_changes_nothing(
        archive, tmp_path, change):
    from imageshare.domain.errors import ConflictingInstance

    first = ct_series(tmp_path / "a", count=1, patient_id="REC1")[0]
    archive.ingest.store_copy(first, ACTOR)
    before = (_record(archive, "REC1"), _count(archive), _blobs(archive))
    other = ct_series(tmp_path / "b", count=1, patient_id="REC1", **change)[0]
    with pytest.raises(ConflictingInstance, match="REC1.* on record with another"):
        archive.ingest.store_copy(other, ACTOR)
    assert (_record(archive, "REC1"), _count(archive), _blobs(archive)) == before
    refused = [e for e in archive.audit.events(action="instance.store")
               if e["outcome"] == "refused"]
    assert "differs from the record" in refused[0]["detail"]["conflict"]
    # More of the first study with the other details is refused too.
    same_study = ct_series(tmp_path / "c", count=1, patient_id="REC1",
                           study_uid=dcmread(first).StudyInstanceUID, **change)[0]
    with pytest.raises(ConflictingInstance):
        archive.ingest.store_copy(same_study, ACTOR)


def test_names_differing_only_in_case_accents_or_empty_components_are_the_same_patient(
        archive, tmp_path):
    archive.ingest.store_copy(
        ct_series(tmp_path / "a", count=1, patient_id="REC2", patient_name="Müller^Jürgen")[0],
        ACTOR)
    for i, name in enumerate(("MULLER^JURGEN", "muller^jurgen^^", "")):
        result = archive.ingest.store_copy(
            ct_series(tmp_path / f"n{i}", count=1, patient_id="REC2", patient_name=name)[0],
            ACTOR)
        assert result.outcome == "stored"


def test_with_hold_a_contradicting_study_is_held_for_reconciliation_then_accepted(tmp_path):
    built = make_archive(tmp_path, patient_mismatch="hold")
    try:
        built.ingest.store_copy(ct_series(tmp_path / "a", count=1, patient_id="REC3",
                                          patient_name="Doe^Jane")[0], ACTOR)
        record = _record(built, "REC3")
        held_files = ct_series(tmp_path / "b", count=2, patient_id="REC3",
                               patient_name="Wrong^Name")
        results = [built.ingest.store_copy(p, ACTOR) for p in held_files]
        assert [r.outcome for r in results] == ["held", "held"]
        assert "held for reconciliation" in results[0].warning
        assert _record(built, "REC3") == record  # the record is never changed by it
        (item,) = built.inbox.items()
        assert item.instances == 2 and "name differs" in item.note
        # Retention never removes what is held.
        from datetime import UTC, datetime, timedelta

        built.retention.run(ACTOR, datetime.now(UTC) + timedelta(days=3650))
        assert _count(built) == 3
        built.inbox.accept(item.pk, ACTOR)
        held_study = built.catalogue.record(results[0].study_uid)
        assert (held_study.patient.patient_id, held_study.patient.issuer) == ("REC3", "")
        assert held_study.patient.name == "Doe^Jane"
        assert _record(built, "REC3")[:2] == record[:2]
    finally:
        built.close()
