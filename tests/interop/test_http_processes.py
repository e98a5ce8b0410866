"""Several processes serving HTTP on one port (IMAGESHARE_HTTP_PROCESSES): both take
connections and keep even shares of them, a tus upload whose chunks reach either process is
stored whole, a worker that dies is started again, and SIGTERM stops them all."""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.factory import ct_series
from tests.peers import RunningServer

pytestmark = pytest.mark.interop
PASSWORD = "http-processes-clerk"
HTML = {"Accept": "text/html"}
TUS = {"Tus-Resumable": "1.0.0"}


def _holding(port: int, state: str) -> dict[int, int]:
    """How many sockets on local ``port`` in ``state`` (0A: listening, 01: established) each
    process holds."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:
                inodes.add(f"socket:[{fields[9]}]")
    holders = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        held = sum(link in inodes for link in links)
        if held:
            holders[int(pid)] = held
    return holders


def _listening(port: int) -> set[int]:
    """The processes holding a socket that listens on ``port``."""
    return set(_holding(port, "0A"))


def _started_again(port: int, known: set[int]) -> int:
    """The one new process that listens on ``port`` beside ``known``, seen in two scans in a
    row (the process workers are forked from holds the socket for a moment while it forks
    one, and is not the worker)."""
    deadline = time.monotonic() + 60
    before: set[int] = set()
    while True:
        now = _listening(port) - known
        if len(now) == 1 and now == before:
            return now.pop()
        assert time.monotonic() < deadline, f"the HTTP worker was not started again: {now}"
        before = now
        time.sleep(0.3)


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_two_http_processes_share_the_port_and_the_work_and_stop_together(tmp_path):
    server = RunningServer(tmp_path / "data", modalities=(), extra_env={
        "IMAGESHARE_HTTP_PROCESSES": "2", "IMAGESHARE_DICOM_PROCESSES": "1"})
    server.cli("user", "add", "clerk", "--role", "radiographer", "--password", PASSWORD)
    server.start()
    try:
        processes = _listening(server.http_port)
        assert len(processes) == 2 and server.process.pid in processes, (
            processes, server.process.pid)
        (worker,) = processes - {server.process.pid}

        signed = httpx.Client(base_url=server.url, headers=HTML)
        assert signed.post("/login", data={"username": "clerk", "password": PASSWORD}
                           ).status_code == 303
        csrf = re.search(r'name="csrf-token" content="([^"]*)"',
                         signed.get("/uploads/import").text)[1]
        cookies = signed.cookies

        def fresh() -> httpx.Client:
            """A new connection (the kernel picks the process), the same session."""
            return httpx.Client(base_url=server.url, headers=HTML, cookies=cookies)

        # Pages on new connections: each process serves its share (CPU used by both).
        before = {pid: _cpu(pid) for pid in processes}
        for _ in range(60):
            with fresh() as client:
                assert client.get("/uploads/import").status_code == 200
        used = {pid: _cpu(pid) - before[pid] for pid in processes}
        assert min(used.values()) >= 0.03, used

        # One file in eight chunks, each on a new connection: stored whole.
        started = signed.post("/uploads/import", follow_redirects=False, data={
            "csrf_token": csrf, "patient_name": "Spread^Over", "hospital_number": "S1",
            "birth_date": "1970-01-01", "reference": "two processes"})
        assert started.status_code == 303
        base = started.headers["location"].removesuffix("/upload")
        (path,) = ct_series(tmp_path / "ct", count=1, size=256, patient_id="S1",
                            patient_name="Spread^Over", PatientBirthDate="19700101")
        data = path.read_bytes()
        name = base64.b64encode(b"CT.dcm").decode()
        with fresh() as client:
            created = client.post(base + "/files", headers={
                **TUS, "X-CSRF-Token": csrf, "Upload-Length": str(len(data)),
                "Upload-Metadata": f"filename {name}"})
        assert created.status_code == 201
        offset, step = 0, len(data) // 8 + 1
        while offset < len(data):
            with fresh() as client:
                answer = client.patch(created.headers["location"],
                                      content=data[offset:offset + step], headers={
                    **TUS, "X-CSRF-Token": csrf, "Upload-Offset": str(offset),
                    "Content-Type": "application/offset+octet-stream"})
            assert answer.status_code == 204, answer.text
            offset = int(answer.headers["upload-offset"])
        sent = signed.post(base + "/send", data={"csrf_token": csrf}, follow_redirects=False)
        assert sent.status_code == 303
        deadline = time.monotonic() + 60
        while 'data-state="done"' not in (shown := signed.get(sent.headers["location"]).text):
            assert 'data-state="failed"' not in shown and time.monotonic() < deadline
            time.sleep(0.2)
        assert "1 file(s) received" in shown

        # Six keep-alive connections, as a browser opens: however the processes took them at
        # first, they end up holding three each (one more for the signed-in client's own, if
        # it is still open).
        browsers = [fresh() for _ in range(6)]
        for _ in range(20):
            for browser in browsers:
                assert browser.get("/uploads/import").status_code == 200
        held = _holding(server.http_port, "01")
        fewer, more = sorted(held.get(pid, 0) for pid in processes)
        assert fewer + more >= 6 and more - fewer <= 1, held
        for browser in browsers:
            browser.close()

        # A worker that dies is started again, and serves.
        os.kill(worker, signal.SIGKILL)
        worker = _started_again(server.http_port, {server.process.pid, worker})
        for _ in range(20):
            with fresh() as client:
                assert client.get("/uploads/import").status_code == 200
        assert "HTTP worker-1 stopped unexpectedly" in server.log_path.read_text()

        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(40) == 0
        deadline = time.monotonic() + 10
        while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{worker}").exists(), "the HTTP worker outlived the server"
        log = server.log_path.read_text()
        assert "ImageShare stopped" in log and "Traceback" not in log
    finally:
        server.stop()


def test_a_second_server_on_the_same_ports_is_refused_with_a_reason(tmp_path):
    """The processes of one server share its ports; another server started on them fails
    at once, saying why, instead of silently taking part of their connections."""
    server = RunningServer(tmp_path / "data", modalities=(), extra_env={
        "IMAGESHARE_HTTP_PROCESSES": "2", "IMAGESHARE_DICOM_PROCESSES": "2"}).start()
    try:
        for same in ({"http_port": server.http_port}, {"dicom_port": server.dicom_port}):
            what = "HTTP" if "http_port" in same else "DICOM"
            other = RunningServer(tmp_path / f"other-{what}", modalities=(), extra_env={
                "IMAGESHARE_HTTP_PROCESSES": "2", "IMAGESHARE_DICOM_PROCESSES": "2"}, **same)
            other.data_dir.mkdir(parents=True)
            ended = subprocess.run([sys.executable, "-m", "imageshare", "serve"],
                                   env=other.env(), capture_output=True, text=True,
                                   timeout=120)
            assert ended.returncode == 2, ended.stderr
            assert f"cannot listen for {what} on 127.0.0.1:" in ended.stderr
            assert "is another server running on this port?" in ended.stderr
            assert "Traceback" not in ended.stderr
        with server.http() as http:
            assert http.get("/healthz").status_code == 200
    finally:
        server.stop()
