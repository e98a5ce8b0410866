"""A full disk, for real: the server's data folder on an 8 MB tmpfs.

Stores that do not fit are answered A700 "out of resources" (DIMSE, also when the disk fills
while pynetdicom receives the data set) and 507 with a reason (STOW-RS); reads whose audit
row cannot be written answer 503 with a reason; with a free-space floor stores are refused
before the disk is full. Nothing acknowledged is lost, and the server recovers by itself
once there is room again.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.conftest import require
from tests.factory import ct_series
from tests.multipart_helpers import encode_multipart
from tests.peers import RunningServer

pytestmark = pytest.mark.interop


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """An 8 MB tmpfs mounted for the test (needs root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                          capture_output=True) if os.geteuid() == 0 else None
    require(done is not None and done.returncode == 0, "mounting an 8 MB tmpfs (root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(folder: Path) -> Path:
    """Take every free byte of the file system holding ``folder``; returns the filler."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as out:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    out.write(b"\0" * size)
            except OSError:
                continue
    return filler


def _store(port: int, paths: list[Path]) -> list[tuple[Path, int, str]]:
    """C-STORE each path on one association: (path, status, error comment)."""
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="IMAGESHARE")
    assert assoc.is_established
    answers = []
    try:
        for path in paths:
            status = assoc.send_c_store(path)
            assert status, "the association must not be aborted"
            answers.append((path, status.Status, str(status.get("ErrorComment", ""))))
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()
    return answers


def test_full_disk_is_answered_out_of_resources_and_the_server_recovers_by_itself(
        small_disk, tmp_path):
    # Room held back for "room again" below: what the filler takes back is only the crumbs
    # left when the disk filled, which vary with how much of the last slice fitted.
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (1 << 20))
    server = RunningServer(small_disk, extra_env={"IMAGESHARE_MIN_FREE_DISK_MB": "0",
                                                 "IMAGESHARE_DICOM_PROCESSES": "1"})
    server.start()
    try:
        slices = ct_series(tmp_path / "ct", count=24, size=512, patient_id="FULL1")
        answers = _store(server.dicom_port, slices)
        acknowledged = [p for p, status, _c in answers if status == 0]
        refused = [(status, comment) for _p, status, comment in answers if status != 0]
        assert acknowledged and refused, "the disk must fill up part way"
        assert all(status == 0xA700 and "out of resources" in comment
                   for status, comment in refused), refused

        # STOW-RS on the full disk: 507 with the reason.
        more = ct_series(tmp_path / "stow", count=2, size=512, patient_id="FULL2")
        body, content_type = encode_multipart([p.read_bytes() for p in more])
        with server.http() as http:
            response = http.post("/dicomweb/studies", content=body,
                                 headers={"Content-Type": content_type})
        assert response.status_code == 507, response.text[:300]
        assert "out of resources" in response.text

        # Reads whose audit row cannot be written: 503 with a reason, never a bare 500.
        filler = _fill(small_disk)
        first = dcmread(acknowledged[0], stop_before_pixels=True)
        url = (f"/dicomweb/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
               f"/instances/{first.SOPInstanceUID}")
        with server.http() as http:
            response = http.get(url, headers={"Accept": "multipart/related; "
                                              'type="application/dicom"'})
        assert response.status_code == 503, response.status_code
        assert "audit" in response.json()["detail"]

        # Room again: every acknowledged instance is there and stores work, no restart.
        filler.unlink()
        ballast.unlink()
        with server.http() as http:
            for path in acknowledged:
                ds = dcmread(path, stop_before_pixels=True)
                response = http.get(
                    f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                    f"/instances/{ds.SOPInstanceUID}",
                    headers={"Accept": 'multipart/related; type="application/dicom"'})
                assert response.status_code == 200
                assert path.read_bytes()[-1000:] in response.content
            listed = http.get("/dicomweb/instances", params={"limit": 1000}).json()
        assert len(listed) == len(acknowledged)
        small = ct_series(tmp_path / "small", count=1, size=16, patient_id="FULL3")
        assert _store(server.dicom_port, small)[0][1] == 0
    finally:
        server.stop()
    assert server.process.returncode == 0


def test_below_the_free_space_floor_stores_are_refused_before_the_disk_is_full(
        small_disk, tmp_path):
    server = RunningServer(small_disk, extra_env={"IMAGESHARE_MIN_FREE_DISK_MB": "5",
                                                 "IMAGESHARE_DICOM_PROCESSES": "1"})
    server.start()
    try:
        slices = ct_series(tmp_path / "ct", count=12, size=512, patient_id="FLOOR1")
        answers = _store(server.dicom_port, slices)
        refused = [(s, c) for _p, s, c in answers if s != 0]
        assert refused and all(s == 0xA700 and "less than 5 MB free" in c for s, c in refused)
        body, content_type = encode_multipart([slices[-1].read_bytes()])
        with server.http() as http:
            response = http.post("/dicomweb/studies", content=body,
                                 headers={"Content-Type": content_type})
            assert response.status_code == 507
            assert "less than 5 MB free" in response.text
            # The disk is not full: reads and their audit rows still work.
            assert http.get("/dicomweb/studies").status_code == 200
        stat = os.statvfs(small_disk)
        assert stat.f_bavail * stat.f_frsize > 4 << 20
    finally:
        server.stop()
