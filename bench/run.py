"""ImageShare benchmarks, side by side with Orthanc (Debian) and a bare pynetdicom floor.

One command: ``python bench/run.py`` (or ``make bench``). Prints a table, writes JSON to
bench/out/results.json. Every figure is measured in the same run on the same generated data;
ratios compare ImageShare with the named peer.

    --quick              small sizes, for a smoke run
    --qido-instances N   instances indexed before QIDO latency is measured (default 100000)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.factory import ct_series, us_cine  # noqa: E402
from tests.peers import (  # noqa: E402
    OrthancServer,
    RunningServer,
    child_pids,
    free_port,
    wait_for_port,
)

OUT = ROOT / "bench" / "out"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


@dataclass
class Results:
    rows: list[dict] = field(default_factory=list)

    def add(self, metric: str, unit: str, values: dict[str, float], better: str = "higher",
            note: str = "") -> None:
        row = {"metric": metric, "unit": unit, "values": values, "better": better, "note": note}
        self.rows.append(row)
        print(self._line(row) + (f"\n    ({note})" if note else ""), flush=True)

    @staticmethod
    def _line(row: dict) -> str:
        values = row["values"]
        cells = "  ".join(f"{k}={v:,.2f}" for k, v in values.items())
        ratios = []
        mine = values.get("imageshare")
        for peer, value in values.items():
            if peer != "imageshare" and mine and value:
                ratio = mine / value if row["better"] == "higher" else value / mine
                ratios.append(f"x{ratio:.2f} vs {peer}")
        return f"{row['metric']:<46} {row['unit']:<10} {cells}   {'; '.join(ratios)}"


# -- peers -----------------------------------------------------------------------------------


class Floor:
    """bench/floor_scp.py: a pynetdicom SCP that writes and fsyncs each file, nothing else."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "floor_scp.py"), str(self.port), str(folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(20)


def start_imageshare(work: Path, name: str) -> RunningServer:
    shutil.rmtree(work / name, ignore_errors=True)
    return RunningServer(work / name / "data").start()


def start_orthanc(work: Path, name: str) -> OrthancServer:
    plugins = [DICOMWEB_PLUGIN] if Path(DICOMWEB_PLUGIN).exists() else []
    for attempt in range(3):  # a free port can be taken between choosing and binding it
        shutil.rmtree(work / name, ignore_errors=True)
        server = OrthancServer(work / name)
        try:
            server.start({}, plugins)
            return server
        except RuntimeError:
            if attempt == 2:
                raise
            time.sleep(1)
    raise AssertionError("unreachable")


def peak_rss_mb(pid: int) -> float:
    """The highest peak RSS (VmHWM) of ``pid`` and its descendants (the DICOM workers)."""
    peaks = []
    for process in [pid, *child_pids(pid)]:
        try:
            status = Path(f"/proc/{process}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
        peaks.extend(peak_rss_mb(child) for child in child_pids(process) if child != pid)
    return max(peaks) if peaks else float("nan")


# -- workloads -------------------------------------------------------------------------------


def storescu(port: int, ae: str, files: list[Path], associations: int) -> float:
    """Seconds to send ``files`` with ``associations`` storescu processes in parallel."""
    chunks = [files[i::associations] for i in range(associations)]
    start = time.perf_counter()
    procs = []
    for chunk in chunks:
        listing = OUT / f"files-{len(procs)}.txt"
        listing.write_text("\n".join(map(str, chunk)))
        procs.append(subprocess.Popen(
            ["storescu", "-aec", ae, "127.0.0.1", str(port), *map(str, chunk)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for proc in procs:
        _out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - start


def c_store_round(work: Path, label: str, files: list[Path], associations: int,
                  results: Results, repeats: int = 3) -> None:
    """Fresh servers for every send. ImageShare and the floor are sent to ``repeats`` times,
    interleaved, and their median is kept (this disk's fsync times vary a lot); Orthanc,
    which takes ten times longer, once."""
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    runs: dict[str, list[float]] = {"imageshare": [], "pynetdicom-floor": []}
    for repeat in range(repeats):
        server = start_imageshare(work, f"is-{label}-{associations}-{repeat}")
        try:
            runs["imageshare"].append(
                storescu(server.dicom_port, server.ae_title, files, associations))
            with server.http() as http:
                listed = http.get("/dicomweb/instances", params={"limit": 1}).status_code
            assert listed == 200
        finally:
            server.stop()
        shutil.rmtree(work / f"is-{label}-{associations}-{repeat}", ignore_errors=True)
        floor = Floor(work / f"floor-{label}-{associations}-{repeat}")
        try:
            runs["pynetdicom-floor"].append(storescu(floor.port, "FLOOR", files, associations))
        finally:
            floor.stop()
        shutil.rmtree(work / f"floor-{label}-{associations}-{repeat}", ignore_errors=True)
    orthanc = start_orthanc(work, f"orthanc-{label}-{associations}")
    try:
        runs["orthanc"] = [storescu(orthanc.dicom_port, "ORTHANC", files, associations)]
    finally:
        orthanc.stop()
    shutil.rmtree(work / f"orthanc-{label}-{associations}", ignore_errors=True)
    seconds = {k: statistics.median(v) for k, v in runs.items()}
    seconds = {k: seconds[k] for k in ("imageshare", "orthanc", "pynetdicom-floor")}
    results.add(f"C-STORE {label}, {associations} assoc", "inst/s",
                {k: len(files) / v for k, v in seconds.items()},
                note=f"median of {repeats} (Orthanc: 1)")
    results.add(f"C-STORE {label}, {associations} assoc", "MB/s",
                {k: size_mb / v for k, v in seconds.items()})


def _multipart(paths: list[Path], boundary: str) -> bytes:
    body = bytearray()
    for path in paths:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body += path.read_bytes() + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time used so far by ``pid`` and its descendants (all their threads)."""
    total = 0.0
    for process in [pid, *child_pids(pid)]:
        try:
            fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        if process != pid:
            total += sum(cpu_seconds(child) for child in child_pids(process))
    return total


def _stow_send(http: httpx.Client, path: str, bodies: list[bytes], headers: dict[str, str],
               pid: int) -> tuple[float, float]:
    """(seconds, server CPU seconds) to send ``bodies`` one request after another."""
    cpu = cpu_seconds(pid)
    start = time.perf_counter()
    for body in bodies:
        response = http.post(path, content=body, headers=headers)
        assert response.status_code == 200, response.text[:300]
    return time.perf_counter() - start, cpu_seconds(pid) - cpu


def stow_round(work: Path, files: list[Path], results: Results, repeats: int = 3) -> None:
    """Fresh servers for every send, ImageShare and Orthanc interleaved ``repeats`` times
    (other work on the machine then weighs on both alike); the median is kept, and the
    servers' CPU time per instance (less sensitive to the machine's load) beside it."""
    boundary = "benchboundary0123456789"
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; '
                               f"boundary={boundary}"}
    batches = [files[i:i + 25] for i in range(0, len(files), 25)]
    bodies = [_multipart(b, boundary) for b in batches]
    runs: dict[str, list[tuple[float, float]]] = {"imageshare": [], "orthanc": []}
    peers: list[tuple[str, Any, str, str]] = [
        ("imageshare", start_imageshare, "is", "/dicomweb/studies"),
        ("orthanc", start_orthanc, "orthanc", "/dicom-web/studies")]
    for repeat in range(repeats):
        for name, start, prefix, path in peers:
            folder = f"{prefix}-stow-{repeat}"
            server = start(work, folder)
            try:
                with server.http() as http:
                    runs[name].append(
                        _stow_send(http, path, bodies, headers, server.process.pid))
            finally:
                server.stop()
            shutil.rmtree(work / folder, ignore_errors=True)
    each = "; ".join(f"{k}: " + ", ".join(f"{len(files) / s:.0f}" for s, _c in v)
                     for k, v in runs.items())
    results.add("STOW-RS CT, 25 per request", "inst/s",
                {k: len(files) / statistics.median(s for s, _c in v) for k, v in runs.items()},
                note=f"median of {repeats} interleaved runs ({each} inst/s)")
    results.add("STOW-RS CT, server CPU per instance", "ms",
                {k: 1000 * statistics.median(c for _s, c in v) / len(files)
                 for k, v in runs.items()}, better="lower")


def tiny_instances(folder: Path, count: int, per_study: int = 20) -> list[Path]:
    """``count`` small CT instances in studies of ``per_study`` (for index-size tests)."""
    paths = []
    folder.mkdir(parents=True, exist_ok=True)
    names = ["Smith^John", "Jones^Mary", "Müller^Jürgen", "Taylor^Ann", "Brown^Oliver"]
    for s in range(count // per_study):
        made = ct_series(folder / f"s{s:05d}", count=per_study, size=8,
                         patient_id=f"P{s:06d}", patient_name=f"{names[s % 5]}{s}",
                         StudyDate=f"20{10 + s % 15:02d}{1 + s % 12:02d}{1 + s % 28:02d}",
                         AccessionNumber=f"A{s:07d}")
        paths.extend(made)
    return paths


def _latencies(client: httpx.Client, urls: list[str]) -> tuple[float, float]:
    times = []
    for url in urls:
        start = time.perf_counter()
        response = client.get(url)
        assert response.status_code in (200, 204), (url, response.status_code)
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1]


def qido_round(work: Path, count: int, results: Results) -> None:
    data = work / f"tiny-{count}"
    files = tiny_instances(data, count) if not data.exists() else sorted(data.rglob("*.dcm"))
    studies = count // 20
    queries = []
    for i in range(0, 200):
        s = (i * 7919) % studies
        queries += [
            f"studies?PatientID=P{s:06d}",
            "studies?PatientName=Smith*&limit=50",
            f"studies?StudyDate=2012{1 + i % 12:02d}01-2012{1 + i % 12:02d}28&limit=50",
            f"studies?AccessionNumber=A{s:07d}",
        ]
    server = start_imageshare(work, "is-qido")
    try:
        load = server.cli("import", "--quiet", str(data))
        assert "refused:" not in load.stdout, load.stdout[-500:]
        with server.http() as http:
            is_med, is_p95 = _latencies(http, [f"/dicomweb/{q}" for q in queries])
            rss_is = peak_rss_mb(server.process.pid)
    finally:
        server.stop()
    orthanc = start_orthanc(work, "orthanc-qido")
    try:
        storescu(orthanc.dicom_port, "ORTHANC", files, 4)
        with orthanc.http() as http:
            or_med, or_p95 = _latencies(http, [f"/dicom-web/{q}" for q in queries])
    finally:
        orthanc.stop()
    results.add(f"QIDO-RS median ({count:,} instances)", "ms",
                {"imageshare": is_med, "orthanc": or_med}, better="lower")
    results.add(f"QIDO-RS p95 ({count:,} instances)", "ms",
                {"imageshare": is_p95, "orthanc": or_p95}, better="lower")
    results.add(f"server peak RSS after QIDO ({count:,})", "MB", {"imageshare": rss_is},
                better="lower")


def _retrieve_seconds(url: str, token: str | None = None) -> tuple[float, int]:
    """Download with curl (a C client, so the client is not what is measured)."""
    command = ["curl", "-s", "-f", "-o", "/dev/null", "-w", "%{size_download} %{time_total}",
               "-H", 'Accept: multipart/related; type="application/dicom"; transfer-syntax=*']
    if token:
        command += ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    size, seconds = out.split()
    return float(seconds), int(size)


def wado_round(work: Path, files: list[Path], study_uid: str, results: Results) -> None:
    speeds = {}
    server = start_imageshare(work, "is-wado")
    try:
        server.cli("import", "--quiet", *map(str, files))
        url = f"{server.dicomweb}/studies/{study_uid}"
        token = server.admin_token()
        runs = [_retrieve_seconds(url, token) for _ in range(5)]
        speeds["imageshare"] = max(size / secs / 1e6 for secs, size in runs)
    finally:
        server.stop()
    orthanc = start_orthanc(work, "orthanc-wado")
    try:
        storescu(orthanc.dicom_port, "ORTHANC", files, 4)
        url = f"{orthanc.url}/dicom-web/studies/{study_uid}"
        runs = [_retrieve_seconds(url) for _ in range(5)]
        speeds["orthanc"] = max(size / secs / 1e6 for secs, size in runs)
    finally:
        orthanc.stop()
    results.add("WADO-RS study retrieve (best of 5, curl)", "MB/s", speeds)


def big_instance(folder: Path, megabytes: int) -> Path:
    """One multi-frame ultrasound loop of about ``megabytes`` MB (640x480 RGB frames)."""
    existing = sorted(folder.glob("us-*.dcm"))
    if existing:
        return existing[0]
    frames = max(1, megabytes * 1_000_000 // (480 * 640 * 3))
    return us_cine(folder, frames=frames, rows=480, cols=640, patient_id="BIG1")


def rss_round(work: Path, megabytes: int, results: Results) -> None:
    path = big_instance(work / "big", megabytes)
    peaks = {}
    server = start_imageshare(work, "is-big")
    try:
        storescu(server.dicom_port, server.ae_title, [path], 1)
        peaks["imageshare"] = peak_rss_mb(server.process.pid)
    finally:
        server.stop()
    orthanc = start_orthanc(work, "orthanc-big")
    try:
        storescu(orthanc.dicom_port, "ORTHANC", [path], 1)
        peaks["orthanc"] = peak_rss_mb(orthanc.process.pid)
    finally:
        orthanc.stop()
    floor = Floor(work / "floor-big")
    try:
        storescu(floor.port, "FLOOR", [path], 1)
        peaks["pynetdicom-floor"] = peak_rss_mb(floor.process.pid)
    finally:
        floor.stop()
    results.add(f"peak RSS ingesting a {path.stat().st_size / 1e9:.2f} GB instance", "MB",
                peaks, better="lower")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--qido-instances", type=int, default=None)
    parser.add_argument("--only", default="", help="comma list: cstore,stow,qido,wado,rss")
    parser.add_argument("--out", type=Path, default=OUT / "results.json")
    args = parser.parse_args()
    for tool in ("storescu", "Orthanc"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed: apt-get install dcmtk orthanc orthanc-dicomweb")
    quick = args.quick
    ct_count, us_count = (60, 4) if quick else (500, 20)
    qido_count = args.qido_instances or (2000 if quick else 100_000)
    big_mb = 100 if quick else 1024
    only = set(filter(None, args.only.split(","))) or {"cstore", "stow", "qido", "wado", "rss"}
    OUT.mkdir(parents=True, exist_ok=True)
    work = OUT / "work"
    work.mkdir(exist_ok=True)
    results = Results()
    ct_dir = work / f"ct-{ct_count}"
    ct = sorted(ct_dir.glob("*.dcm")) or ct_series(ct_dir, count=ct_count, size=512,
                                                   patient_id="BENCHCT")
    us_dir = work / f"us-{us_count}"
    us = sorted(us_dir.glob("*.dcm")) or [
        us_cine(us_dir, frames=60, rows=240, cols=320, patient_id="BENCHUS")
        for _ in range(us_count)]
    from pydicom import dcmread

    study_uid = dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID
    print(f"ImageShare benchmarks {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} cores; "
          f"CT {len(ct)} x 512x512x16 bit, US {len(us)} x 60 frames 320x240 RGB", flush=True)
    if "cstore" in only:
        for associations in (1, 4):
            c_store_round(work, "CT", ct, associations, results)
            c_store_round(work, "US cine", us, associations, results)
    if "stow" in only:
        stow_round(work, ct, results)
    if "wado" in only:
        wado_round(work, ct, study_uid, results)
    if "qido" in only:
        qido_round(work, qido_count, results)
    if "rss" in only:
        rss_round(work, big_mb, results)
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", *sys.argv]),
        "rows": results.rows}, indent=2))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    threading.stack_size(0)
    main()
