"""SIGKILL at hundreds of random points while storing, then start-up recovery.

Each round forks a child that opens the archive as a server process would and stores a few
instances through the real ingest service, the way C-STORE (a received file in staging) and
STOW-RS (a multipart body split into parts, stored as one batch) hand them over, telling
the parent each acknowledgement. The parent waits for a random number of those
acknowledgements and kills it with SIGKILL within the next store (or after the last), runs
start-up recovery, and checks: every acknowledged instance is indexed and byte-identical;
nothing indexed is half-stored; no blob is left that the index does not know; no staging or
partial file is left; the study counts agree with the instances.

``IMAGESHARE_KILL_ROUNDS`` sets the number of rounds (default 240). The whole-server
SIGKILL test is in tests/interop/test_durability.py.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import tempfile
import time
import warnings
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from imageshare.app import build_archive, recover
from imageshare.domain.actors import Actor
from imageshare.settings import load_settings
from imageshare.storage.index.schema import instances, series, studies
from imageshare.web.multipart import PartSink
from tests.factory import ct_series
from tests.multipart_helpers import encode_multipart

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
ROUNDS = int(os.environ.get("IMAGESHARE_KILL_ROUNDS", "240"))
# A busy machine gets fewer rounds rather than a slow suite (at least MIN_KILLS are made).
BUDGET_SECONDS = float(os.environ.get("IMAGESHARE_KILL_SECONDS", "35"))
MIN_KILLS = 100
MIN_INSIDE = 60  # rounds go on (up to ROUNDS) until this many kills landed inside a batch
PER_ROUND = 3
CALIBRATION = 3  # rounds not killed, to time a batch on this machine
ACTOR = Actor("node", "PYNETDICOM", "node", "PYNETDICOM@127.0.0.1")


def _instances(template: Path, count: int, studies_: int = 8) -> list[tuple[str, bytes]]:
    """``count`` distinct instances (SOP Instance UID, Part 10 bytes) over a few studies."""
    base = dcmread(template)
    study_uids = [(generate_uid(), generate_uid()) for _ in range(studies_)]
    made = []
    for i in range(count):
        base.StudyInstanceUID, base.SeriesInstanceUID = study_uids[i % studies_]
        base.SOPInstanceUID = base.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        base.InstanceNumber = i + 1
        out = BytesIO()
        base.save_as(out, enforce_file_format=True)
        made.append((str(base.SOPInstanceUID), out.getvalue()))
    return made


def _child(settings, batch: list[tuple[str, bytes, str]], pipe: int) -> None:
    """Store ``batch`` as a server process would; report readiness and each acknowledgement."""
    archive = build_archive(settings, upgrade=False)
    os.write(pipe, b"R\n")
    request: list[tuple[str, bytes]] = []  # STOW-RS parts that arrive in one request
    for number, (uid, data, way) in enumerate(batch):
        if way == "c-store":  # pynetdicom has written the data set to a staging file
            out, path = archive.ingest.staging_file()
            with out:
                out.write(data)
            archive.ingest.store_staged(path, ACTOR)
            os.write(pipe, f"A {uid}\n".encode())
            continue
        request.append((uid, data))
        if number + 1 < len(batch) and batch[number + 1][2] == "stow":
            continue  # the next instance is a part of the same request
        # STOW-RS: the body is split into part files, stored as one batch, acknowledged
        # together when the batch returns.
        body, content_type = encode_multipart([d for _u, d in request])
        sink = PartSink(content_type.split("boundary=")[1].strip('"'),
                        archive.ingest.staging_file)
        sink.feed(body)
        sink.close()
        results = archive.ingest.store_staged_many([p.path for p in sink.parts], ACTOR)
        for (part_uid, _data), result in zip(request, results, strict=True):
            assert not isinstance(result, Exception), result
            os.write(pipe, f"A {part_uid}\n".encode())
        request = []
    archive.close()


def _acks(lines: list[bytes]) -> list[str]:
    return [line[2:].decode().strip() for line in lines if line.startswith(b"A ")]


def _check(archive, acknowledged: set[str], digests: dict[str, str]) -> None:
    assert not list(archive.settings.staging_dir.iterdir()), "staging left behind"
    assert not list((archive.blobs.root / ".tmp").iterdir()), "partial blob left behind"
    with archive.engine.connect() as conn:
        indexed = dict(conn.execute(select(instances.c.sop_uid, instances.c.blob_key)).all())
        per_study = conn.execute(
            select(studies.c.num_instances, func.count(instances.c.pk))
            .join(series, series.c.study_pk == studies.c.pk)
            .join(instances, instances.c.series_pk == series.c.pk)
            .group_by(studies.c.pk)).all()
    assert set(archive.blobs.keys()) == set(indexed.values()), "orphan or missing blob"
    missing = acknowledged - set(indexed)
    assert not missing, f"{len(missing)} acknowledged instance(s) lost"
    for uid, key in indexed.items():
        with archive.blobs.open(key) as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == digests[uid], "half-stored"
    assert all(counted == actual for counted, actual in per_study), "counts disagree"


def test_sigkill_at_hundreds_of_random_points_loses_nothing_acknowledged(tmp_path):
    shm = Path("/dev/shm")
    # Process death, not power loss, is tested: a RAM file system keeps it fast.
    root = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() and os.access(shm, os.W_OK) \
        else tmp_path
    settings = load_settings({"data_dir": root / "data", "min_free_disk_mb": 0,
                              "log_level": "ERROR"}, environ={})
    build_archive(settings).close()  # migrated once, as by the first start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        template = ct_series(tmp_path / "t", count=1, size=16, patient_id="KILL1")[0]
        pool = _instances(template, ROUNDS * PER_ROUND)
    digests = {uid: hashlib.sha256(data).hexdigest() for uid, data in pool}
    rng = random.Random(20261130)
    acknowledged: set[str] = set()
    killed_inside = finished = 0
    store_time = 0.0
    started = time.monotonic()
    try:
        for number in range(ROUNDS):
            enough = killed_inside >= MIN_INSIDE and number - CALIBRATION >= MIN_KILLS
            if enough and time.monotonic() - started > BUDGET_SECONDS:
                break
            batch = [(uid, data, rng.choice(["c-store", "stow"]))
                     for uid, data in pool[number * PER_ROUND:(number + 1) * PER_ROUND]]
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                os.close(read_end)
                try:
                    _child(settings, batch, write_end)
                finally:
                    os._exit(0)
            os.close(write_end)
            reader = os.fdopen(read_end, "rb")
            assert reader.readline() == b"R\n"
            lines: list[bytes] = []
            if number < CALIBRATION:  # let it finish: how long does one store take here?
                ready = time.monotonic()
                lines = reader.readlines()
                os.waitpid(pid, 0)
                store_time = max(store_time, (time.monotonic() - ready) / PER_ROUND)
            else:
                # The kill point follows the child's progress, not a guess at the machine's
                # speed: wait for a random number of acknowledgements, then kill within the
                # next store (at once, anywhere in it) or, now and then, after the last one.
                wait_for = rng.choice([*range(PER_ROUND)] * 3 + [PER_ROUND])
                while len(_acks(lines)) < wait_for and (line := reader.readline()):
                    lines.append(line)
                time.sleep(rng.choice([rng.uniform(0, 0.0005), rng.uniform(0, store_time),
                                       rng.uniform(0, store_time)]))
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                lines += reader.readlines()
            reader.close()
            acks = _acks(lines)
            acknowledged.update(acks)
            if number < CALIBRATION:
                assert len(acks) == PER_ROUND
            elif len(acks) < PER_ROUND:
                killed_inside += 1
            else:
                finished += 1
            archive = build_archive(settings)  # the next start
            try:
                recover(archive)
                _check(archive, acknowledged, digests)
            finally:
                archive.close()
    finally:
        import shutil

        if root != tmp_path:
            shutil.rmtree(root, ignore_errors=True)
    took = time.monotonic() - started
    kills = killed_inside + finished
    print(f"{kills} kills ({killed_inside} during a batch, {finished} after it), "
          f"{len(acknowledged)} acknowledged, store {store_time * 1000:.0f} ms, {took:.1f} s")
    assert kills >= MIN_KILLS
    assert killed_inside >= MIN_INSIDE, "kills must land while storing"
    assert len(acknowledged) >= kills // 2, "kills must land between stores too"
