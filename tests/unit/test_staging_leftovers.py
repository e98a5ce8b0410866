"""What a cut-off receive or a stopped process leaves in staging is removed, and nothing a
running process is writing: a data set cut off mid-transfer is removed when its connection
closes; at start-up, files of processes that have ended go (a crashed server's, a killed
import's) while a running import's stay; leftover folders no longer stop the start; every
ten minutes the server clears what its own ended processes left."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

import imageshare.storage.files as files_module
from imageshare.app import _start_staging_sweep, recover
from imageshare.dicom.scp import DicomListener
from imageshare.storage.files import make_private
from tests.factory import ct_series
from tests.listener import listening


@pytest.fixture
def ended_pid() -> int:
    """The process number of a process that has ended (and was reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.fixture
def running_pid() -> Iterator[int]:
    """The process number of another process that is running (an import, say)."""
    child = subprocess.Popen(["sleep", "60"])
    yield child.pid
    child.kill()
    child.wait()


@pytest.fixture
def an_hour_is_a_second(monkeypatch) -> float:
    """How long an untouched leftover lasts, shortened (a file's change time cannot be set
    back, so the tests wait for it)."""
    monkeypatch.setattr(files_module, "LEFTOVER_AFTER_SECONDS", 1.0)
    return 1.2


def _leftover(folder: Path, name: str, is_folder: bool = False) -> Path:
    path = folder / name
    if is_folder:
        path.mkdir()
        (path / "shared.zip").write_bytes(b"PK partial")
    else:
        path.write_bytes(b"\0" * 4096)
    return path


def test_start_up_removes_what_ended_processes_left_and_keeps_a_running_imports_files(
        archive, ended_pid, running_pid, an_hour_is_a_second):
    staging = archive.settings.staging_dir
    blob_tmp = archive.blobs.root / ".tmp"
    stale = _leftover(staging, "tmpab12cd.dcm")  # an older version's, untouched for an hour
    time.sleep(an_hour_is_a_second)
    crashed = _leftover(staging, f"{ended_pid}-k2j3h4.dcm")
    own_namesake = _leftover(staging, f"{os.getpid()}-k2j3h4.dcm")  # pid 1 in a container
    download = _leftover(staging, f"{ended_pid}-share-x1y2", is_folder=True)
    importing = _leftover(staging, f"{running_pid}-q8w9e7.dcm")
    young_unnamed = _leftover(staging, "tmpq8w9e7.dcm")
    partial_blob = _leftover(blob_tmp, f"{ended_pid}-{'ab' * 16}.part")
    importing_blob = _leftover(blob_tmp, f"{running_pid}-{'cd' * 16}.part")

    assert recover(archive) == 0  # a leftover folder used to stop the start (IsADirectory)

    for gone in (crashed, own_namesake, download, stale, partial_blob):
        assert not gone.exists(), gone.name
    for kept in (importing, young_unnamed, importing_blob):
        assert kept.exists(), kept.name


def test_a_running_processs_file_left_untouched_for_an_hour_is_removed(
        archive, running_pid, an_hour_is_a_second):
    stuck = _leftover(archive.settings.staging_dir, f"{running_pid}-z1.dcm", is_folder=True)
    time.sleep(an_hour_is_a_second / 2)
    (stuck / "shared.zip").write_bytes(b"PK still being written")
    time.sleep(an_hour_is_a_second / 2)
    recover(archive)
    assert stuck.exists(), "a folder whose file is still written to is not a leftover"
    time.sleep(an_hour_is_a_second)
    recover(archive)
    assert not stuck.exists()


def test_the_servers_sweep_clears_what_its_ended_processes_left(archive, ended_pid,
                                                                running_pid):
    staging = archive.settings.staging_dir
    died_mid_receive = _leftover(staging, f"{ended_pid}-r4t5.dcm")
    receiving = _leftover(staging, f"{running_pid}-r4t6.dcm")
    own = _leftover(staging, f"{os.getpid()}-r4t7.dcm")  # this process is running
    stop = _start_staging_sweep(archive, every=0.05)
    try:
        deadline = time.monotonic() + 5
        while died_mid_receive.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
    assert not died_mid_receive.exists()
    assert receiving.exists() and own.exists()


def test_a_folder_removed_while_its_privacy_is_checked_does_not_stop_the_start(
        tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "share-cache" / "gone").mkdir(parents=True)
    (data / "share-cache" / "stays").mkdir()
    (data / "share-cache" / "stays" / "f").write_bytes(b"x")
    (data / "share-cache" / "stays" / "f").chmod(0o644)
    real_scandir = os.scandir

    def scandir_after_removal(path):
        if not isinstance(path, int) and Path(path).name == "gone":
            shutil.rmtree(path)  # another process finished with it meanwhile
        return real_scandir(path)

    monkeypatch.setattr(files_module.os, "scandir", scandir_after_removal)
    make_private(data)
    assert (os.stat(data / "share-cache" / "stays" / "f").st_mode & 0o777) == 0o600


@pytest.fixture
def listener(archive) -> Iterator[DicomListener]:
    with listening(archive, "PYNETDICOM") as served:
        yield served


def _staged(archive) -> list[Path]:
    return list(archive.settings.staging_dir.iterdir())


def test_a_data_set_cut_off_mid_transfer_is_removed_when_its_connection_closes(
        archive, listener, tmp_path):
    big = ct_series(tmp_path / "big", count=1, size=1024, patient_id="CUT1")[0]  # 2 MB
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="IMAGESHARE")
    assert assoc.is_established
    # The client's network side stops after 300 KB, as a modality losing its link would.
    wire = assoc.dul.socket
    real_send = wire.send
    room = {"bytes": 300_000}
    held = threading.Event()

    def send_some(data: bytes) -> None:
        part = data[:room["bytes"]]
        room["bytes"] -= len(part)
        if part:
            real_send(part)
        if len(part) < len(data):
            held.wait(10)

    wire.send = send_some
    sender = threading.Thread(target=_send_quietly, args=(assoc, big), daemon=True)
    sender.start()
    deadline = time.monotonic() + 10
    while not (_staged(archive) and _staged(archive)[0].stat().st_size > 250_000):
        assert time.monotonic() < deadline, "the transfer never started"
        time.sleep(0.01)
    wire.socket.shutdown(socket.SHUT_RDWR)
    wire.socket.close()
    held.set()
    deadline = time.monotonic() + 10
    while _staged(archive):
        assert time.monotonic() < deadline, "the cut-off data set stayed in staging"
        time.sleep(0.02)
    assoc.abort()
    sender.join(10)

    # The listener goes on; a whole store leaves nothing in staging either.
    again = AE(ae_title="PYNETDICOM")
    again.add_requested_context(CTImageStorage)
    other = again.associate("127.0.0.1", listener.port, ae_title="IMAGESHARE")
    small = ct_series(tmp_path / "small", count=1, patient_id="CUT2")[0]
    assert other.send_c_store(dcmread(small)).Status == 0
    other.release()
    assert not _staged(archive)


def _send_quietly(assoc, path: Path) -> None:
    with contextlib.suppress(Exception):  # the connection is cut under it: expected
        assoc.send_c_store(dcmread(path))
