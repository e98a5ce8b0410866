"""What an open DICOM association costs, side by side with Orthanc (Debian).

One command: ``python bench/associations.py``. Starts a fresh ``imageshare serve`` (one DICOM
process) and a fresh Orthanc, then measures on each, in the same run:

- the server's CPU while 8 associations stay open and idle for 5 s (ms of CPU per second);
- C-STORE of 300 CT slices of 525 KB with DCMTK's storescu over one association (instances
  per second, and the server's CPU per instance);
- C-GET of a study of 60 small CT instances (64x64) over one association (ms per
  sub-operation: a PDU held back for the peer's delayed acknowledgement shows here).

Prints a table and writes JSON (bench/out/associations.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pydicom import dcmread  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pynetdicom import AE, build_role, evt  # noqa: E402
from pynetdicom.sop_class import (  # noqa: E402
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from bench.run import cpu_seconds  # noqa: E402
from tests.factory import ct_series  # noqa: E402
from tests.peers import OrthancServer, RunningServer  # noqa: E402

OUT = ROOT / "bench" / "out"
CLIENT = "PROBE"


def _idle(port: int, ae_title: str, pid: int, count: int = 8, seconds: float = 5.0) -> float:
    """Server CPU (ms per second) while ``count`` associations stay open, idle."""
    ae = AE(ae_title=CLIENT)
    ae.add_requested_context(Verification)
    opened = [ae.associate("127.0.0.1", port, ae_title=ae_title) for _ in range(count)]
    assert all(a.is_established for a in opened), "an association was refused"
    time.sleep(1.0)
    before = cpu_seconds(pid)
    time.sleep(seconds)
    spent = cpu_seconds(pid) - before
    for assoc in opened:
        assoc.release()
    return 1000 * spent / seconds


def _store(port: int, ae_title: str, pid: int, files: list[Path]) -> tuple[float, float]:
    """(instances per second, server CPU ms per instance) for storescu over one association."""
    before, started = cpu_seconds(pid), time.perf_counter()
    subprocess.run(["storescu", "-aet", CLIENT, "-aec", ae_title, "127.0.0.1", str(port),
                    *map(str, files)], check=True, capture_output=True)
    took, spent = time.perf_counter() - started, cpu_seconds(pid) - before
    return len(files) / took, 1000 * spent / len(files)


def _get(port: int, ae_title: str, study: str, expected: int) -> float:
    """Milliseconds per C-GET sub-operation for the whole study over one association."""
    received: list[int] = []

    def on_store(_event: Any) -> int:
        received.append(1)
        return 0x0000

    ae = AE(ae_title=CLIENT)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title,
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    started = time.perf_counter()
    for _status, _identifier in assoc.send_c_get(query,
                                                 StudyRootQueryRetrieveInformationModelGet):
        pass
    took = time.perf_counter() - started
    assoc.release()
    assert len(received) == expected, f"C-GET gave {len(received)} of {expected}"
    return 1000 * took / expected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT / "associations.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-assoc-"))
    slices = ct_series(work / "ct", 300, size=512, patient_id="BENCH1")
    small = ct_series(work / "small", 60, size=64, patient_id="BENCH2")
    study = dcmread(small[0], stop_before_pixels=True).StudyInstanceUID
    results: dict[str, dict[str, float]] = {}

    imageshare = RunningServer(work / "imageshare", modalities=(), extra_env={
        "IMAGESHARE_DICOM_PROCESSES": "1", "IMAGESHARE_HTTP_PROCESSES": "1"})
    imageshare.cli("node", "add", CLIENT, "--host", "127.0.0.1", "--port", "104")
    imageshare.start()
    try:
        pid = imageshare.process.pid
        port = imageshare.dicom_port
        rate, cpu = _store(port, "IMAGESHARE", pid, slices)
        _store(port, "IMAGESHARE", pid, small)
        results["imageshare"] = {
            "idle_cpu_ms_per_s": _idle(port, "IMAGESHARE", pid),
            "store_inst_per_s": rate, "store_cpu_ms_per_inst": cpu,
            "get_ms_per_subop": _get(port, "IMAGESHARE", study, len(small))}
    finally:
        imageshare.stop()

    orthanc = OrthancServer(work / "orthanc")
    orthanc.start({CLIENT: [CLIENT, "127.0.0.1", 104]}, extra={
        "DicomAlwaysAllowStore": True, "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowEcho": True})
    try:
        assert orthanc.process is not None
        pid = orthanc.process.pid
        port = orthanc.dicom_port
        rate, cpu = _store(port, orthanc.ae_title, pid, slices)
        _store(port, orthanc.ae_title, pid, small)
        results["orthanc"] = {
            "idle_cpu_ms_per_s": _idle(port, orthanc.ae_title, pid),
            "store_inst_per_s": rate, "store_cpu_ms_per_inst": cpu,
            "get_ms_per_subop": _get(port, orthanc.ae_title, study, len(small))}
    finally:
        orthanc.stop()

    rows = [("idle: 8 open associations, server CPU ms/s", "idle_cpu_ms_per_s", False),
            ("C-STORE 300 x 525 KB, storescu, inst/s", "store_inst_per_s", True),
            ("C-STORE server CPU ms/instance", "store_cpu_ms_per_inst", False),
            ("C-GET 60 small CT, ms per sub-operation", "get_ms_per_subop", False)]
    print(f"DICOM associations {time.strftime('%Y-%m-%d %H:%M')}")
    print("| measure | ImageShare | Orthanc | ImageShare vs Orthanc |")
    print("|---|---:|---:|---:|")
    for label, key, higher_is_better in rows:
        ours, theirs = results["imageshare"][key], results["orthanc"][key]
        ratio = ours / theirs if higher_is_better else theirs / ours
        print(f"| {label} | {ours:.2f} | {theirs:.2f} | x{ratio:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"),
                                    "results": results}, indent=2))
    print(f"\nwritten {args.out} (ratios: above 1 means ImageShare is ahead)")


if __name__ == "__main__":
    main()
