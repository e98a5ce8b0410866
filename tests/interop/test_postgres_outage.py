"""PostgreSQL stopped (immediate shutdown, as a crash) while a modality stores: nothing is
acknowledged that is not indexed, reads answer 503 with a reason, and once the database is
back the server takes stores again by itself; a restart finds nothing half-stored.

The test runs its own throwaway cluster, so that the suite's shared one is not disturbed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests.conftest import _pg_bin, require
from tests.factory import ct_series
from tests.peers import RunningServer, free_port

pytestmark = pytest.mark.interop


class Cluster:
    """A PostgreSQL cluster this test may stop and start."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.base = Path(tempfile.mkdtemp(prefix="imageshare-pg-outage-"))
        self.base.chmod(0o755)
        self.data, self.sock = self.base / "data", self.base / "sock"
        self.port = free_port()
        self.run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        for folder in (self.data, self.sock):
            folder.mkdir()
            if self.run_as:
                shutil.chown(folder, "postgres", "postgres")
        self._ctl(["initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                   "-E", "UTF8", "--locale=C.UTF-8"])

    def _ctl(self, args: list[str]) -> None:
        subprocess.run([*self.run_as, str(self.bin / args[0]), *args[1:]], check=True,
                       capture_output=True, timeout=120)

    def start(self) -> None:
        self._ctl(["pg_ctl", "-D", str(self.data), "-l", str(self.data / "server.log"), "-w",
                   "start", "-o", f"-p {self.port} -k {self.sock} "
                   "-c listen_addresses=127.0.0.1"])

    def crash(self) -> None:
        self._ctl(["pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"])

    def remove(self) -> None:
        subprocess.run([*self.run_as, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m",
                        "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    bin_dir = _pg_bin()
    require(bin_dir is not None, "PostgreSQL server (Debian package postgresql)")
    made = Cluster(bin_dir)  # type: ignore[arg-type]
    made.start()
    yield made
    made.remove()


def test_postgresql_stopped_mid_ingest_loses_nothing_and_the_server_recovers(
        cluster, tmp_path):
    server = RunningServer(tmp_path / "data", extra_env={
        "IMAGESHARE_DATABASE_URL": cluster.url, "IMAGESHARE_DICOM_PROCESSES": "1"}).start()
    server.admin_token()  # made on the command line, which needs the database: before it stops
    paths = ct_series(tmp_path / "ct", count=90, size=64, patient_id="PGOUT1")
    acknowledged: list[Path] = []
    refused: list[int] = []
    outage = threading.Event()
    back = threading.Event()

    def send() -> None:
        ae = AE()
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="IMAGESHARE")
        for path in paths:
            if len(acknowledged) == 30 and not outage.is_set():
                outage.set()
                back.wait(60)
            status = assoc.send_c_store(path)
            assert status, "the association must survive the database outage"
            if status.Status == 0:
                acknowledged.append(path)
            else:
                refused.append(status.Status)
            time.sleep(0.005)
        assoc.release()

    sender = threading.Thread(target=send)
    sender.start()
    assert outage.wait(120)
    cluster.crash()
    # While it is down: stores fail cleanly, reads say why.
    down_ae = AE()
    down_ae.add_requested_context(CTImageStorage)
    assoc = down_ae.associate("127.0.0.1", server.dicom_port, ae_title="IMAGESHARE")
    status = assoc.send_c_store(paths[-1])
    assoc.release()
    assert status.Status == 0xA700
    with server.http() as http:
        response = http.get("/dicomweb/studies")
    assert response.status_code == 503, response.status_code
    cluster.start()
    back.set()
    sender.join(120)
    assert len(acknowledged) + len(refused) == len(paths)
    assert len(acknowledged) >= 60, "stores must work again without a restart"
    server.stop()
    assert server.process.returncode == 0

    again = RunningServer(tmp_path / "data", http_port=server.http_port,
                          dicom_port=server.dicom_port, extra_env={
                              "IMAGESHARE_DATABASE_URL": cluster.url,
                              "IMAGESHARE_DICOM_PROCESSES": "1"}).start()
    try:
        with again.http() as http:
            listed = http.get("/dicomweb/instances", params={"limit": 1000}).json()
            stored = {item["00080018"]["Value"][0] for item in listed}
            assert {dcmread(p, stop_before_pixels=True).SOPInstanceUID
                    for p in acknowledged} <= stored
            for item in listed:  # everything indexed is whole
                frame = http.get(item["00081190"]["Value"][0] + "/frames/1", headers={
                    "Accept": 'multipart/related; type="application/octet-stream"'})
                assert frame.status_code == 200 and 64 * 64 * 2 <= len(frame.content)
        blobs = [p for p in (tmp_path / "data" / "blobs").rglob("*")
                 if p.is_file() and ".tmp" not in p.parts]
        assert len(blobs) == len(stored), "no blob the index does not know"
    finally:
        again.stop()
