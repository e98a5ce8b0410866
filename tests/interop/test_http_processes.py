"""Several processes serving HTTP on one port (IMAGESHARE_HTTP_PROCESSES): both take
connections, a tus upload whose chunks reach either process is stored whole, and SIGTERM
stops them all."""

from __future__ import annotations

import base64
import os
import re
import signal
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


def _listening(port: int) -> set[int]:
    """The processes holding a socket that listens on ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                inodes.add(fields[9])
    holders = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        if any(link == f"socket:[{inode}]" for link in links for inode in inodes):
            holders.add(int(pid))
    return holders


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
        assert len(processes) == 2 and server.process.pid in processes
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
