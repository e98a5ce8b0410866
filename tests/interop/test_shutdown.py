"""SIGTERM and SIGINT stop the server cleanly: associations in progress finish (within a
bound), the index is closed, and the process exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests.factory import ct_series
from tests.peers import RunningServer, child_pids

pytestmark = pytest.mark.interop


def _stored_count(server: RunningServer) -> int:
    with server.http() as http:
        response = http.get("/dicomweb/instances", params={"limit": 1000})
    return 0 if response.status_code == 204 else len(response.json())


def test_sigterm_lets_an_association_in_progress_finish_and_exits_0(tmp_path):
    server = RunningServer(tmp_path / "data", extra_env={
        "IMAGESHARE_DICOM_PROCESSES": "2", "IMAGESHARE_SHUTDOWN_GRACE_SECONDS": "20"}).start()
    paths = ct_series(tmp_path / "ct", count=40, size=256, patient_id="TERM1")
    acknowledged: list = []
    started = threading.Event()

    def send() -> None:
        ae = AE()
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="IMAGESHARE")
        for path in paths:
            status = assoc.send_c_store(path)
            if status and status.Status == 0:
                acknowledged.append(path)
            started.set()
            time.sleep(0.02)
        assoc.release()

    sender = threading.Thread(target=send)
    sender.start()
    started.wait(30)
    server.process.send_signal(signal.SIGTERM)
    sender.join(60)
    assert server.process.wait(40) == 0
    assert len(acknowledged) == len(paths), "the association in progress was drained"
    log = server.log_path.read_text()
    assert "ImageShare stopped" in log and "Traceback" not in log

    again = RunningServer(tmp_path / "data",
                          extra_env={"IMAGESHARE_DICOM_PROCESSES": "1"}).start()
    try:
        assert _stored_count(again) == len(paths)
        ds = dcmread(paths[-1], stop_before_pixels=True)
        with again.http() as http:
            assert http.get(f"/dicomweb/studies/{ds.StudyInstanceUID}/metadata"
                            ).status_code == 200
    finally:
        again.stop()


def test_sigint_with_an_idle_association_ends_it_after_the_grace_and_exits_0(tmp_path):
    server = RunningServer(tmp_path / "data", extra_env={
        "IMAGESHARE_DICOM_PROCESSES": "1", "IMAGESHARE_SHUTDOWN_GRACE_SECONDS": "2"}).start()
    ae = AE()
    ae.add_requested_context(CTImageStorage)
    # opened, never released
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="IMAGESHARE")
    assert assoc.is_established
    begun = time.monotonic()
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(30) == 0
    assert time.monotonic() - begun < 15
    assert "ImageShare stopped" in server.log_path.read_text()
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not assoc.is_established  # the server ended it


def _answers(url: str) -> bool:
    """True when ``url`` answers 200."""
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _serve_in_own_group(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """``imageshare serve`` with two DICOM and two HTTP processes, in a process group of its
    own (as a terminal's), its output in a file."""
    server = RunningServer(tmp_path / "data", extra_env={
        "IMAGESHARE_DICOM_PROCESSES": "2", "IMAGESHARE_HTTP_PROCESSES": "2"})
    server.data_dir.mkdir(parents=True)
    output = tmp_path / "serve.log"
    with open(output, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "imageshare", "serve"],
                                   env=server.env(), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return process, output


def test_ctrl_c_while_the_workers_start_stops_everything_quietly(tmp_path):
    """Ctrl-C in a terminal reaches the whole process group: workers still importing do not
    each print a KeyboardInterrupt; the server stops them and exits 0."""
    process, output = _serve_in_own_group(tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not child_pids(process.pid):
            assert process.poll() is None and time.monotonic() < deadline, output.read_text()
            time.sleep(0.02)
        workers = child_pids(process.pid)
        time.sleep(0.3)  # the worker is importing now
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(60) == 0, output.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    text = output.read_text()
    assert "KeyboardInterrupt" not in text and "Traceback" not in text, text
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        assert time.monotonic() < deadline, "a worker outlived the server"
        time.sleep(0.1)


def _descendants(pid: int) -> list[int]:
    return [p for child in child_pids(pid) for p in (child, *_descendants(child))]


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_no_process_of_a_killed_server_outlives_it(tmp_path):
    """A server killed outright (SIGKILL, the OOM killer) leaves no worker behind holding its
    ports: a new server on the same ports and data then takes every association."""
    server = RunningServer(tmp_path / "data", extra_env={
        "IMAGESHARE_DICOM_PROCESSES": "3", "IMAGESHARE_HTTP_PROCESSES": "2"}).start()
    try:
        others = _descendants(server.process.pid)
        assert len(others) >= 4, others  # the workers, and what forks and tracks them
        server.process.kill()
        server.process.wait(10)
        deadline = time.monotonic() + 15
        while alive := [pid for pid in others if _running(pid)]:
            assert time.monotonic() < deadline, f"outlived the server: {alive}"
            time.sleep(0.1)
        server.start()
        paths = ct_series(tmp_path / "ct", count=12, size=16, patient_id="AFTERKILL")
        ae = AE()
        ae.add_requested_context(CTImageStorage)
        for path in paths:
            assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.ae_title)
            assert assoc.is_established
            assert assoc.send_c_store(dcmread(path)).Status == 0
            assoc.release()
        assert _stored_count(server) == 12
    finally:
        server.stop()


def test_a_closed_terminal_sighup_to_every_process_drains_and_stops_them_all(tmp_path):
    """Closing the terminal (or a habit of `kill -HUP`) sends SIGHUP to the whole process
    group: the server and its workers stop as on SIGTERM, exit 0, and leave nothing behind
    (before, each died at once, undrained, and systemd saw no failure to restart)."""
    process, output = _serve_in_own_group(tmp_path)
    try:
        deadline = time.monotonic() + 90
        while "ImageShare listening" not in output.read_text():
            assert process.poll() is None and time.monotonic() < deadline, output.read_text()
            time.sleep(0.1)
        address = output.read_text().split("ImageShare listening: ", 1)[1].split(" ", 1)[0]
        while not _answers(f"{address}healthz"):  # the HTTP server itself runs: uvicorn
            assert process.poll() is None and time.monotonic() < deadline, output.read_text()
            time.sleep(0.1)
        others = _descendants(process.pid)
        os.killpg(process.pid, signal.SIGHUP)
        assert process.wait(60) == 0, output.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    text = output.read_text()
    assert "ImageShare stopped" in text and "Traceback" not in text, text
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in others):
        assert time.monotonic() < deadline, "a process outlived the server"
        time.sleep(0.1)


def test_sigterm_stops_transfers_retrying_in_every_http_process_at_once(tmp_path):
    """Transfers to a site that never answers wait between attempts (2, 10, 30 s). Only the
    first process stopped them on SIGTERM: a second HTTP process running one waited its
    whole grace for it (20 s here), so a stop took longer than systemd's patience. Every
    process now stops them between instances (they are resumed on the next start)."""
    import socket

    server = RunningServer(tmp_path / "data", extra_env={
        "IMAGESHARE_HTTP_PROCESSES": "2", "IMAGESHARE_DICOM_PROCESSES": "1",
        "IMAGESHARE_JOB_WORKERS": "1", "IMAGESHARE_SHUTDOWN_GRACE_SECONDS": "20"}).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    studies = []
    for number in range(2):
        [path] = ct_series(tmp_path / f"ct{number}", count=1, patient_id=f"TX{number}")
        studies.append(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    server.cli("import", "--quiet", str(tmp_path / "ct0"), str(tmp_path / "ct1"))
    server.cli("node", "add", "NOWHERE", "--host", "127.0.0.1", "--port", str(closed),
               "--name", "Nowhere hospital", "--no-query", "--no-store")
    try:
        # two transfers and one job slot in each of the two processes: both run one
        with server.http() as http:
            for uid in studies:
                sent = http.post("/api/exchange/push", json={"site": "NOWHERE",
                                                              "study_uid": uid})
                assert sent.status_code == 202, sent.text
        deadline = time.monotonic() + 60
        while server.log_path.read_text().count("Association request failed") < 4:
            assert time.monotonic() < deadline, server.log_path.read_text()[-3000:]
            time.sleep(0.2)
        begun = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(40) == 0
        took = time.monotonic() - begun
        assert took < 8, f"a retrying transfer held the stop back {took:.1f} s"
    finally:
        server.stop()
