"""SIGKILL while several associations store: every acknowledged instance survives intact."""

from __future__ import annotations

import threading
import time

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests.factory import ct_series
from tests.multipart_helpers import parse_multipart
from tests.peers import RunningServer

pytestmark = pytest.mark.interop


def _store_all(port: int, paths, acknowledged: list, stop: threading.Event) -> None:
    ae = AE(ae_title="PYNETDICOM")  # a registered modality
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="IMAGESHARE")
    if not assoc.is_established:
        return
    try:
        for path in paths:
            if stop.is_set():
                break
            status = assoc.send_c_store(path)
            if status and status.get("Status") == 0x0000:
                acknowledged.append(path)
    except Exception:  # noqa: BLE001 - the server was killed under us: expected
        pass
    finally:
        if assoc.is_established:
            assoc.abort()


def store_concurrently(port: int, paths: list, associations: int = 4) -> list:
    """Send ``paths`` over several associations at once; the ones acknowledged."""
    acknowledged: list = []
    stop = threading.Event()
    threads = [threading.Thread(target=_store_all,
                                args=(port, paths[i::associations], acknowledged, stop))
               for i in range(associations)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return acknowledged


def test_acknowledged_instances_survive_sigkill(tmp_path):
    server = RunningServer(tmp_path / "data").start()
    batches = [ct_series(tmp_path / f"b{i}", count=150, size=128, patient_id=f"DUR{i}")
               for i in range(4)]
    acknowledged: list = []
    stop = threading.Event()
    threads = [threading.Thread(target=_store_all,
                                args=(server.dicom_port, batch, acknowledged, stop))
               for batch in batches]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < 120 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.kill()
    stop.set()
    for t in threads:
        t.join(30)
    sent_all = sum(len(b) for b in batches)
    assert 0 < len(acknowledged) < sent_all, "the kill must land while stores are running"

    restarted = RunningServer(tmp_path / "data", http_port=server.http_port,
                              dicom_port=server.dicom_port).start()
    try:
        with restarted.http() as http:
            for path in acknowledged:
                ds = dcmread(path)
                response = http.get(
                    f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                    f"/instances/{ds.SOPInstanceUID}",
                    headers={"Accept": 'multipart/related; type="application/dicom"'})
                ((_h, body),) = parse_multipart(response)
                assert ds.PixelData in body
            # Everything indexed is whole: every listed instance can be read completely.
            listed = http.get("/dicomweb/instances", params={"limit": 1000}).json()
            assert len(listed) >= len(acknowledged)
            for item in listed:
                url = item["00081190"]["Value"][0] + "/frames/1"
                frame = http.get(url, headers={
                    "Accept": 'multipart/related; type="application/octet-stream"'})
                ((_h, body),) = parse_multipart(frame)
                assert len(body) == 128 * 128 * 2
        assert not any((tmp_path / "data" / "staging").iterdir())
    finally:
        restarted.stop()


def test_concurrent_associations_into_one_new_study_all_succeed(server, tmp_path):
    """Several processes share the DICOM port: racing inserts of one study stay consistent."""
    paths = ct_series(tmp_path / "ct", count=80, size=32, patient_id="RACE1")
    assert len(store_concurrently(server.dicom_port, paths)) == 80
    with server.http() as http:
        (study,) = http.get("/dicomweb/studies", params={"PatientID": "RACE1"}).json()
        series = http.get(f"/dicomweb/studies/{study['0020000D']['Value'][0]}/series").json()
    assert study["00201208"]["Value"] == [80]
    assert study["00201206"]["Value"] == [1]
    assert [s["00201209"]["Value"] for s in series] == [[80]]


def test_server_on_postgresql_takes_concurrent_associations_into_one_study(postgres, tmp_path):
    running = RunningServer(
        tmp_path / "pg-server",
        extra_env={"IMAGESHARE_DATABASE_URL": postgres.new_database()},
    ).start()
    try:
        paths = ct_series(tmp_path / "ct", count=60, size=32, patient_id="PGRACE")
        assert len(store_concurrently(running.dicom_port, paths)) == 60
        with running.http() as http:
            (study,) = http.get("/dicomweb/studies", params={"PatientID": "PGRACE"}).json()
        assert study["00201208"]["Value"] == [60]
    finally:
        running.stop()
