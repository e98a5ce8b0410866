"""What several instances sharing one index rely on, short of starting servers (those are in
tests/interop/s3/test_two_instances.py)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from sqlalchemy import func, select, update

from imageshare.app import _recover_range, recover
from imageshare.domain.actors import Actor
from imageshare.export.service import ExportRequest
from imageshare.storage.blobs import key_prefix_for, new_blob_key
from imageshare.storage.index.schema import background_jobs, instances
from tests.conftest import make_archive
from tests.factory import ct_series

ADMIN = Actor("user", "admin", "admin", "127.0.0.1")


def _indexed(archive) -> int:
    with archive.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(instances)).scalar_one()


def _recovery_state(archive) -> str:
    with archive.engine.connect() as conn:
        return conn.execute(select(background_jobs.c.state).where(
            background_jobs.c.kind == "recover")).scalar_one()


class _Later:
    """The time module, ``seconds`` later."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    def __getattr__(self, name: str):
        return getattr(time, name)

    def time(self) -> float:
        return time.time() + self._seconds


def test_recovery_on_a_shared_index_leaves_a_young_blob_to_a_later_job(tmp_path, postgres,
                                                                       monkeypatch):
    archive = make_archive(tmp_path, postgres.new_database(), recovery_grace_seconds=120)
    try:
        assert recover(archive) == 0
        paths = ct_series(tmp_path / "in", count=2)
        old_key = key_prefix_for(time.time() - 600) + "0" * 24  # before the grace period
        young_key = new_blob_key()  # perhaps still on its way into the index elsewhere
        for key, path in ((old_key, paths[0]), (young_key, paths[1])):
            with open(path, "rb") as fh:
                archive.blobs.put(key, fh, path.stat().st_size)
        (tmp_path / "data" / "recovered-until").unlink()  # looks at everything again
        assert recover(archive) == 1
        assert young_key in set(archive.blobs.keys()) and _indexed(archive) == 1
        with archive.engine.begin() as conn:
            (job,) = conn.execute(select(background_jobs).where(
                background_jobs.c.kind == "recover")).mappings().all()
            assert job["state"] == "queued" and job["run_after"] > datetime.now(UTC)
            # the grace period is over
            monkeypatch.setattr("imageshare.app.time", _Later(121 + 60))
            conn.execute(update(background_jobs).values(run_after=datetime.now(UTC)))
        deadline = time.monotonic() + 20
        while _recovery_state(archive) != "done" and time.monotonic() < deadline:
            time.sleep(0.1)  # the job indexes the blob's copy, then removes the blob
        assert _indexed(archive) == 2 and young_key not in set(archive.blobs.keys())
    finally:
        archive.close()


def test_a_finished_export_tells_the_person_who_started_it(archive, tmp_path):
    paths = ct_series(tmp_path / "in", count=2)
    study_uid = [archive.ingest.store_copy(path, ADMIN) for path in paths][0].study_uid
    job = archive.exports.start(ExportRequest(study_uid, deidentify=False), ADMIN, None)
    deadline = time.monotonic() + 60
    while archive.jobs.get(job.id, "admin").state in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert archive.jobs.get(job.id, "admin").state == "done"
    (note,) = archive.notifier.recent("admin")
    assert note["kind"] == "job.done" and note["link"] == f"/jobs/{job.id}"
    assert "2 file(s) exported" in str(note["text"])


def test_a_queued_job_is_cancelled_by_its_owner_only_and_never_runs(archive, anonymous,
                                                                   tmp_path):
    from imageshare.jobs import Job

    archive.users.add("clin", "a long password 1", "clinician")
    archive.users.add("other", "a long password 2", "clinician")
    # No instance runs this kind yet: the job stays queued.
    job: Job = archive.jobs.submit("clin", "later", "Something later", {})
    other = anonymous.post(f"/api/jobs/{job.id}/cancel", auth=("other", "a long password 2"))
    assert other.status_code == 404
    cancelled = anonymous.post(f"/api/jobs/{job.id}/cancel",
                               auth=("clin", "a long password 1"))
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    again = anonymous.post(f"/api/jobs/{job.id}/cancel", auth=("clin", "a long password 1"))
    assert again.status_code == 400
    ran: list[str] = []
    archive.jobs.register("later", lambda job, params: ran.append(job.id))
    assert archive.jobs.run_pending() == 0 and ran == []


def test_recovery_never_removes_a_blob_its_writer_indexed_meanwhile(any_archive, tmp_path):
    """Another instance's STOW-RS batch has its blobs in the store and commits its index rows
    while recovery is storing the first of them again: every instance stays readable, and
    recovery removes no blob a row refers to."""
    archive = any_archive
    batch = archive.ingest.begin_batch(ADMIN)
    for number, path in enumerate(ct_series(tmp_path / "in", count=6)):
        staged = tmp_path / f"staged-{number}.dcm"
        staged.write_bytes(path.read_bytes())
        batch.add(staged)
    deadline = time.monotonic() + 20
    while len(list(archive.blobs.keys())) < 6:  # in the store, not yet in the index
        assert time.monotonic() < deadline
        time.sleep(0.05)
    store_staged = archive.ingest.store_staged
    answers: list = []

    def writer_commits_meanwhile(path, actor, *args, **kwargs):
        stored = store_staged(path, actor, *args, **kwargs)
        if not answers:
            answers.extend(batch.finish())
        return stored

    archive.ingest.store_staged = writer_commits_meanwhile
    _recover_range(archive, "")
    assert [getattr(a, "outcome", a) for a in answers].count("stored") >= 5, answers
    with archive.engine.connect() as conn:
        keys = list(conn.execute(select(instances.c.blob_key)).scalars())
    assert len(keys) == 6
    for key in keys:
        with archive.blobs.open(key) as fh:  # KeyError: the blob was removed from its row
            assert fh.read(132)[128:] == b"DICM"
    assert set(archive.blobs.keys()) == set(keys), "a copy was left behind"


def test_a_retrieval_marks_temporary_only_what_the_site_sent(archive, tmp_path):
    """Our modality stores into a study while it is being retrieved from another site: the
    site's instances become the temporary copy; ours stay in the record (they would have
    expired with the copy)."""
    since = datetime.now(UTC)
    site, ours = (ct_series(tmp_path / name, count=1, patient_id="TMP1", study_uid="1.2.3.99")[0]
                  for name in ("site", "ours"))
    archive.ingest.store_copy(site, Actor("node", "HOSP_B", "node", "HOSP_B@10.0.0.2"))
    archive.ingest.store_copy(ours, Actor("node", "HOSPXB", "node", "HOSPXB@10.0.0.3"))
    assert archive.exchange._mark_temporary("1.2.3.99", "HOSP_B", since) == 1
    with archive.engine.connect() as conn:
        classes = dict(conn.execute(select(instances.c.received_from,
                                           instances.c.retention_class)).all())
    assert classes == {"HOSP_B@10.0.0.2": "temporary", "HOSPXB@10.0.0.3": "clinical"}
