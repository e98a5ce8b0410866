"""What several instances sharing one index rely on, short of starting servers (those are in
tests/interop/s3/test_two_instances.py)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from sqlalchemy import func, select, update

from imageshare.app import recover
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


def test_recovery_on_a_shared_index_leaves_a_young_blob_to_a_later_job(tmp_path, postgres):
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
            conn.execute(update(background_jobs).values(run_after=datetime.now(UTC)))
        deadline = time.monotonic() + 20
        while _indexed(archive) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
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
