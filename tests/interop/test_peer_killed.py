"""A push whose peer dies halfway (DCMTK's storescp killed with SIGKILL): it never stays
'sending'. When the peer comes back within the retries the push resumes with only what the
peer had not acknowledged and ends delivered; when it does not, it ends failed with the
reason. The sender is told either way. A transfer interrupted by a restart is resumed."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from imageshare.domain.actors import Actor
from imageshare.exchange.nodes import Node
from tests.conftest import make_archive, require_tool
from tests.factory import ct_series
from tests.peers import free_port, wait_for_port

pytestmark = pytest.mark.interop
SENDER = Actor("user", "radiographer1", "radiographer", "127.0.0.1")
COUNT = 60


def _storescp(port: int, folder: Path) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([require_tool("storescp"), "-aet", "PEER", "-od", str(folder),
                                str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for_port(port)
    return process


def _received(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if not p.name.endswith(".tmp")} if (
        folder.exists()) else set()


def _site(tmp_path: Path, retries: str):
    archive = make_archive(tmp_path, push_retry_seconds=retries)
    study = ct_series(tmp_path / "study", count=COUNT, size=128, patient_id="PUSH1")
    for path in study:
        archive.ingest.store_copy(path, SENDER)
    port = free_port()
    archive.nodes.add(Node("PEER", "127.0.0.1", port, display_name="Peer Hospital"))
    return archive, study, port


def _wait(archive, public_id: str, timeout: float = 60) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        transfer = archive.transfers.get(public_id)
        if transfer.state in ("delivered", "failed"):
            return transfer
        time.sleep(0.05)
    raise AssertionError(f"transfer still {archive.transfers.get(public_id).state}")


def _kill_when(process: subprocess.Popen, folder: Path, count: int) -> int:
    deadline = time.monotonic() + 60
    while len(_received(folder)) < count and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    return len(_received(folder))


def test_a_push_whose_peer_dies_halfway_resumes_without_resending_and_is_delivered(tmp_path):
    archive, study, port = _site(tmp_path, "1.5,1.5,1.5")
    try:
        first = _storescp(port, tmp_path / "peer-1")
        study_uid = dcmread(study[0], stop_before_pixels=True).StudyInstanceUID
        transfer = archive.transfers.send(study_uid, "PEER", SENDER)
        before = _kill_when(first, tmp_path / "peer-1", COUNT // 3)
        assert 0 < before < COUNT, "the peer must die halfway"
        second = _storescp(port, tmp_path / "peer-2")  # back before the first retry
        try:
            done = _wait(archive, transfer.public_id)
        finally:
            second.terminate()
            second.wait(10)
        assert done.state == "delivered", done.reason
        assert (done.sent, done.failed, done.total) == (COUNT, 0, COUNT)
        again = _received(tmp_path / "peer-2")
        # Only what the peer had not acknowledged was sent again (the one in flight at the
        # kill may be sent twice: its acknowledgement was lost with the peer).
        assert len(again) <= COUNT - before + 1
        assert _received(tmp_path / "peer-1") | again == {
            f"CT.{dcmread(p, stop_before_pixels=True).SOPInstanceUID}" for p in study}
        (note,) = archive.notifier.recent("radiographer1")
        assert "delivered to Peer Hospital" in str(note)
    finally:
        archive.close()


def test_a_push_whose_peer_stays_dead_ends_failed_with_the_reason(tmp_path):
    archive, study, port = _site(tmp_path, "0.2,0.2")
    try:
        peer = _storescp(port, tmp_path / "peer")
        study_uid = dcmread(study[0], stop_before_pixels=True).StudyInstanceUID
        transfer = archive.transfers.send(study_uid, "PEER", SENDER)
        delivered = _kill_when(peer, tmp_path / "peer", COUNT // 2)
        done = _wait(archive, transfer.public_id)
        assert done.state == "failed"
        assert "Peer Hospital" in done.reason
        assert done.attempts == 3
        assert delivered - 1 <= done.sent <= delivered and done.failed == COUNT - done.sent
        (note,) = archive.notifier.recent("radiographer1")
        assert "failed" in str(note) and "Peer Hospital" in str(note)
        (audited,) = [e for e in archive.audit.events(action="exchange.push")
                      if e["detail"].get("transfer") == transfer.public_id]
        assert audited["outcome"] == "failure" and audited["detail"]["reason"] == done.reason
    finally:
        archive.close()


def test_a_transfer_left_sending_by_a_crash_is_resumed_on_start(tmp_path):
    from datetime import UTC, datetime

    from sqlalchemy import insert

    from imageshare.storage.index.schema import transfers

    archive, study, port = _site(tmp_path, "0.2")
    peer = _storescp(port, tmp_path / "peer")
    try:
        study_uid = dcmread(study[0], stop_before_pixels=True).StudyInstanceUID
        now = datetime.now(UTC)
        with archive.engine.begin() as conn:  # what a process killed mid-push leaves behind
            conn.execute(insert(transfers).values(
                public_id="crashed0001", study_uid=study_uid, site="PEER", priority="urgent",
                note="", state="sending", sent=0, total=COUNT, failed=0, attempts=1,
                reason="", created_by="radiographer1", created_at=now, updated_at=now))
        archive.close()
        restarted = make_archive(tmp_path, push_retry_seconds="0.2")
        try:
            assert restarted.transfers.resume_interrupted() == 1
            done = _wait(restarted, "crashed0001")
            assert done.state == "delivered" and done.sent == COUNT
            assert len(_received(tmp_path / "peer")) == COUNT
        finally:
            restarted.close()
    finally:
        peer.terminate()
        peer.wait(10)
