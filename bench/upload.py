"""Browser upload (tus) of a CD-sized folder against ``imageshare import`` of the same folder.

One command: ``python bench/upload.py`` (or ``make bench-upload``). Writes a folder of 512 KB
CT slices (700 MB by default, as a full CD), then, interleaved and repeated:

- **upload**: a member of staff signs in to a fresh ``imageshare serve`` and imports the
  folder from the browser's import page: every file sent with tus 1.0 over loopback
  (creation-with-upload: one POST carrying the first 8 MB of each file, PATCH chunks for
  the rest; six files at a time, as ``static/upload.js`` does; each DICOM file is stored
  for review as it arrives), then **Send**, timed until the intake job has made every file
  an instance waiting for review (the page's ``data-state="done"``). The server's peak RSS
  (VmHWM of the process and its children) is read afterwards; the peak of the memory all its
  processes use together (their PSS added) is sampled four times a second throughout.
- **import**: ``imageshare import FOLDER --quiet`` into a fresh data folder (no server), timed
  to its exit; its peak RSS from ``wait4``.

Every run is checked (the right number of instances indexed). Prints a table and writes JSON
(bench/out/upload.json). Targets (issue 13): upload at least 0.8x the CLI's rate; the
server's peak memory under 300 MB.

    --size-mb N   size of the folder (default 700)
    --repeats N   runs of each (median kept; default 2)
    --parallel N  files sent at once (default 6, as the browser page)
    --client browser  send with the import page itself in Debian's Chromium (Playwright)
                      instead of httpx threads: the browser's own CPU, as a user's would be
    --http-processes N  processes serving HTTP (IMAGESHARE_HTTP_PROCESSES; default 0, the
                        server's own default: one per core, at most 4)
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import cpu_seconds, peak_rss_mb  # noqa: E402
from imageshare.app import http_processes  # noqa: E402
from imageshare.settings import Settings  # noqa: E402
from tests.factory import ct_series  # noqa: E402
from tests.peers import RunningServer, child_pids  # noqa: E402

OUT = ROOT / "bench" / "out"
SLICE_BYTES = 512 * 512 * 2
CHUNK = 8 << 20
PARALLEL = 6
TUS = {"Tus-Resumable": "1.0.0"}
HTML = {"Accept": "text/html"}
CLERK_PASSWORD = "bench-clerk-password"
IMPORT_FORM = {"patient_name": "Bench^Upload", "hospital_number": "B1",
               "birth_date": "1970-01-01", "reference": "bench"}
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--no-first-run"]
TARGET_RATE = 0.8
TARGET_RSS_MB = 300


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf-token" content="([^"]*)"', html)
    if not found:
        raise SystemExit("no CSRF token on the page")
    return found.group(1)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def make_folder(root: Path, megabytes: int) -> list[Path]:
    """A CD-like folder: one study of 512 KB CT slices adding up to ``megabytes``."""
    count = max(1, (megabytes << 20) // SLICE_BYTES)
    return ct_series(root / "CD" / "DICOM", count=count, size=512, patient_id="CD-1",
                     patient_name="Bench^Upload")


def _send_file(client: httpx.Client, base: str, csrf: str, path: Path, name: str) -> None:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        first = fh.read(CHUNK)
        created = client.post(base + "/files", content=first, headers={
            **TUS, "X-CSRF-Token": csrf, "Upload-Length": str(size),
            "Upload-Metadata": f"filename {_b64(path.name)},relativePath {_b64(name)}",
            "Content-Type": "application/offset+octet-stream"})
        if created.status_code != 201:
            raise SystemExit(f"tus creation refused: {created.status_code} "
                             f"{created.text[:200]}")
        url = created.headers["location"]
        offset = int(created.headers["upload-offset"])
        fh.seek(offset)
        while offset < size:
            chunk = fh.read(CHUNK)
            answer = client.patch(url, content=chunk, headers={
                **TUS, "X-CSRF-Token": csrf, "Upload-Offset": str(offset),
                "Content-Type": "application/offset+octet-stream"})
            if answer.status_code != 204:
                raise SystemExit(f"tus PATCH refused: {answer.status_code} {answer.text[:200]}")
            offset = int(answer.headers["upload-offset"])


def upload_run(work: Path, folder: Path, files: list[Path], parallel: int = PARALLEL,
               http_processes: int = 0, client: str = "python") -> dict[str, float]:
    """Seconds from the first byte to every file waiting for review, the peak RSS (of the
    largest process, and of all the server's processes added), and the CPU time per file of
    each process (and of the whole machine) while the files are sent. ``client``: "python"
    (httpx, ``parallel`` files at once) or "browser" (the import page itself in Debian's
    Chromium, driven by Playwright: the folder chosen as a user would)."""
    server = RunningServer(work / "upload-data", modalities=(), extra_env={
        "IMAGESHARE_HTTP_PROCESSES": str(http_processes)})
    server.cli("user", "add", "clerk", "--role", "radiographer", "--password", CLERK_PASSWORD)
    server.start()
    try:
        send = _send_with_browser if client == "browser" else _send_with_python
        sampling: list[PssSampler] = []  # from the first byte sent (after the sign-in)
        timing = send(server, folder, files, parallel,
                      lambda: sampling.append(PssSampler(server.process.pid)))
        memory = sampling[0]
        pss_all = memory.stop()
        rss = peak_rss_mb(server.process.pid)
        rss_all = sum(_own_peak_mb(pid) for pid in _tree(server.process.pid))
    finally:
        server.stop()
    return {**timing, "peak_rss_mb": rss, "peak_rss_mb_all_processes": rss_all,
            "peak_pss_mb_all_processes": pss_all,
            "pss_mb_each_process_at_peak": sorted(memory.at_peak.values(), reverse=True)}


def _send_with_python(server: RunningServer, folder: Path, files: list[Path], parallel: int,
                      sending: Callable[[], None]) -> dict[str, float]:
    """Sign in, open an import, send every file with tus (``parallel`` at once), press Send
    and wait for the intake; the seconds and CPU per file. ``sending()`` is called just
    before the first byte."""
    with httpx.Client(base_url=server.url, timeout=300, headers=HTML) as client:
        signed = client.post("/login", data={"username": "clerk", "password": CLERK_PASSWORD})
        if signed.status_code != 303 or "/account" in signed.headers.get("location", ""):
            raise SystemExit(f"sign-in failed: {signed.status_code}")
        csrf = _csrf(client.get("/uploads/import").text)
        started = client.post("/uploads/import", follow_redirects=False, data={
            "csrf_token": csrf, **IMPORT_FORM})
        if started.status_code != 303:
            raise SystemExit(f"import page refused: {started.status_code}")
        base = started.headers["location"].removesuffix("/upload")
        sending()
        begin = time.perf_counter()
        cpu_before = _cpu(server.process.pid)
        with ThreadPoolExecutor(parallel) as pool:
            for done in [pool.submit(_send_file, client, base, csrf, path,
                                     str(path.relative_to(folder.parent)))
                         for path in files]:
                done.result()
        uploaded = time.perf_counter() - begin
        cpu = _cpu_per_file(server.process.pid, cpu_before, len(files))
        sent = client.post(base + "/send", data={"csrf_token": csrf}, follow_redirects=False)
        if sent.status_code != 303:
            raise SystemExit(f"send refused: {sent.status_code} {sent.text[:300]}")
        progress = sent.headers["location"]
        while 'data-state="done"' not in (shown := client.get(progress).text):
            if 'data-state="failed"' in shown:
                raise SystemExit("the intake failed")
            time.sleep(0.2)
        seconds = time.perf_counter() - begin
    return _checked(shown, len(files), seconds, uploaded, cpu)


def _send_with_browser(server: RunningServer, folder: Path, files: list[Path],
                       _parallel: int, sending: Callable[[], None]) -> dict[str, float]:
    """The same in Chromium: sign in, fill the import form, choose the folder (the page
    sends six files at once), wait until every row is done, press Send, wait for the
    intake. The client's CPU is Chromium's (all its processes)."""
    from playwright.sync_api import sync_playwright

    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        raise SystemExit("--client browser needs Debian's chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context().new_page()
            page.goto(server.url + "/login")
            page.fill("input[name=username]", "clerk")
            page.fill("input[name=password]", CLERK_PASSWORD)
            page.click("button:has-text('Sign in')")
            page.wait_for_load_state()
            page.goto(server.url + "/uploads/import")
            for name, value in IMPORT_FORM.items():
                page.fill(f"input[name={name}]", value)
            page.click("button:has-text('Choose the files')")
            page.wait_for_selector("#pick-folder", state="attached")
            sending()
            begin = time.perf_counter()
            cpu_before = _cpu(server.process.pid)
            page.set_input_files("#pick-folder", str(folder))
            page.wait_for_function(  # every file arrived, or some could not be sent
                "n => { const rows = document.querySelectorAll('#files li');"
                " return rows.length >= n && [...rows].every("
                "r => r.className === 'done' || r.className === 'failed'); }",
                arg=len(files), polling=250, timeout=3_600_000)
            failed = page.locator("#files li.failed")
            if failed.count():
                raise SystemExit(f"{failed.count()} file(s) not sent: "
                                 f"{failed.first.inner_text()}")
            uploaded = time.perf_counter() - begin
            cpu = _cpu_per_file(server.process.pid, cpu_before, len(files))
            page.click("#send")
            page.wait_for_selector("#intake[data-state=done]", timeout=3_600_000)
            seconds = time.perf_counter() - begin
            shown = page.inner_text("#intake")
        finally:
            browser.close()
    return _checked(shown, len(files), seconds, uploaded, cpu)


def _cpu_per_file(server: int, before: dict[str, float], count: int) -> dict[str, float]:
    """Milliseconds of CPU per file of each of :func:`_cpu`'s parts since ``before``."""
    return {k: (v - before[k]) * 1000 / count for k, v in _cpu(server).items()}


def _checked(shown: str, count: int, seconds: float, uploaded: float,
             cpu: dict[str, float]) -> dict[str, float]:
    """A run's figures, once the page after Send (``shown``) reports every file received."""
    received = re.search(r"(\d+) file\(s\) received", shown)
    if not received or int(received.group(1)) != count:
        raise SystemExit(f"not every file was received: {received and received[0]}")
    return {"seconds": seconds, "upload_seconds": uploaded, "intake_seconds": seconds - uploaded,
            **{f"cpu_ms_per_file_{k}": v for k, v in cpu.items()}}


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    return [pid, *(p for child in child_pids(pid) for p in _tree(child))]


class PssSampler:
    """The highest memory of ``pid`` and all its descendants together, sampled four times a
    second from now until :meth:`stop`: the sum of their proportional set sizes (PSS: a page
    that n processes share counts 1/n in each, so the sum is the memory they use; a sum of
    RSS would count every shared page once per process)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0.0
        self.at_peak: dict[int, float] = {}  # each process's PSS at the peak
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while True:
            each = {pid: _pss_mb(pid) for pid in _tree(self.pid)}
            if sum(each.values()) > self.peak:
                self.peak, self.at_peak = sum(each.values()), each
            if self._done.wait(0.25):
                return

    def stop(self) -> float:
        """The peak in MB."""
        self._done.set()
        self._thread.join()
        return self.peak


def _pss_mb(pid: int) -> float:
    """The PSS of ``pid`` now."""
    return _proc_mb(pid, "smaps_rollup", "Pss:")


def _own_peak_mb(pid: int) -> float:
    """The peak RSS (VmHWM) of ``pid`` alone."""
    return _proc_mb(pid, "status", "VmHWM:")


def _proc_mb(pid: int, name: str, field: str) -> float:
    """A size in kB that /proc/PID/``name`` gives on its line starting with ``field``, in MB
    (0 for a process gone meanwhile)."""
    try:
        text = Path(f"/proc/{pid}/{name}").read_text()
    except OSError:
        return 0.0
    found = [line.split()[1] for line in text.splitlines() if line.startswith(field)]
    return int(found[0]) / 1024 if found else 0.0


def _cpu(server: int) -> dict[str, float]:
    """CPU seconds so far of the web server's own process, of its worker processes, and of
    this client (this process and its other descendants: Playwright and Chromium)."""
    own = cpu_seconds(os.getpid()) - cpu_seconds(server)  # with a browser, its processes
    workers = sum(cpu_seconds(child) for child in child_pids(server))
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # not idle, iowait
    return {"server": cpu_seconds(server) - workers, "server_workers": workers,
            "client": own, "machine": busy}


def import_run(work: Path, folder: Path, count: int) -> dict[str, float]:
    """Seconds for ``imageshare import`` of the folder into a fresh installation."""
    data = work / "import-data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGESHARE_")}
    env.update(IMAGESHARE_DATA_DIR=str(data), IMAGESHARE_LOG_LEVEL="WARNING")
    begin = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "imageshare", "import", str(folder),
                                "--quiet"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - begin
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("imageshare import failed: " + process.stderr.read().decode()[-500:])
    from sqlalchemy import func, select

    from imageshare.storage.index.database import make_engine
    from imageshare.storage.index.schema import instances

    engine = make_engine(f"sqlite:///{data / 'index.sqlite'}")
    with engine.connect() as conn:
        stored = conn.execute(select(func.count()).select_from(instances)).scalar()
    engine.dispose()
    if stored != count:
        raise SystemExit(f"import stored {stored} of {count}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=700)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=PARALLEL,
                        help="files sent at once (the browser page sends 6)")
    parser.add_argument("--client", choices=("python", "browser"), default="python",
                        help="who sends the files: httpx threads (python) or the import "
                        "page itself in Debian's Chromium (browser)")
    parser.add_argument("--http-processes", type=int, default=0,
                        help="the server's IMAGESHARE_HTTP_PROCESSES (0, the default: the "
                        "server's own, one per core up to 4)")
    args = parser.parse_args()
    processes = http_processes(Settings(http_processes=args.http_processes))
    OUT.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="imageshare-bench-upload-"))
    try:
        files = make_folder(root, args.size_mb)
        folder = root / "CD"
        size = sum(p.stat().st_size for p in files)
        runs: dict[str, list[dict[str, float]]] = {"upload": [], "import": []}
        for repeat in range(args.repeats):
            for kind in ("upload", "import") if repeat % 2 == 0 else ("import", "upload"):
                work = root / f"{kind}-{repeat}"
                work.mkdir()
                result = (upload_run(work, folder, files, args.parallel, args.http_processes,
                                     args.client)
                          if kind == "upload"
                          else import_run(work, folder, len(files)))
                runs[kind].append(result)
                phases = (f" (sending {result['upload_seconds']:.1f} s, intake "
                          f"{result['intake_seconds']:.1f} s; CPU ms per file while sending: "
                          f"server {result['cpu_ms_per_file_server']:.1f}, its workers "
                          f"{result['cpu_ms_per_file_server_workers']:.1f}, client "
                          f"{result['cpu_ms_per_file_client']:.1f}, whole machine "
                          f"{result['cpu_ms_per_file_machine']:.1f})"
                          if kind == "upload" else "")
                each = " + ".join(f"{mb:.0f}"
                                  for mb in result.get("pss_mb_each_process_at_peak", []))
                together = (f", all processes {result['peak_rss_mb_all_processes']:.0f} MB; "
                            f"PSS added {result['peak_pss_mb_all_processes']:.0f} MB ({each})"
                            if kind == "upload" else "")
                print(f"  {kind} run {repeat + 1}: {result['seconds']:.1f} s{phases}, "
                      f"peak RSS {result['peak_rss_mb']:.0f} MB{together}", flush=True)
                shutil.rmtree(work, ignore_errors=True)
        summary = {}
        for kind, results in runs.items():
            seconds = statistics.median(r["seconds"] for r in results)
            summary[kind] = {"seconds": seconds, "mb_per_s": size / (1 << 20) / seconds,
                             "files_per_s": len(files) / seconds,
                             "peak_rss_mb": max(r["peak_rss_mb"] for r in results)}
            if kind == "upload":
                for key in ("peak_rss_mb_all_processes", "peak_pss_mb_all_processes"):
                    summary[kind][key] = max(r[key] for r in results)
        ratio = summary["upload"]["mb_per_s"] / summary["import"]["mb_per_s"]
        client_label = ("the import page in Chromium" if args.client == "browser"
                        else f"httpx, {args.parallel} files at once")
        print(f"\n{len(files)} files, {size / (1 << 20):.0f} MB, median of {args.repeats}, "
              f"load average {os.getloadavg()[0]:.1f}\n")
        print("| way in | seconds | MB/s | files/s | peak RSS MB |")
        print("|---|---:|---:|---:|---:|")
        for kind, label in (("upload", f"browser upload (tus, {client_label}) + intake job"),
                            ("import", "`imageshare import`")):
            row = summary[kind]
            print(f"| {label} | {row['seconds']:.1f} | {row['mb_per_s']:.1f} | "
                  f"{row['files_per_s']:.1f} | {row['peak_rss_mb']:.0f} |")
        rss = summary["upload"]["peak_rss_mb"]
        print(f"\nupload / import rate: x{ratio:.2f} (target >= {TARGET_RATE}); server peak "
              f"RSS {rss:.0f} MB in its largest process, "
              f"{summary['upload']['peak_rss_mb_all_processes']:.0f} MB in all its processes "
              f"added, {summary['upload']['peak_pss_mb_all_processes']:.0f} MB used by all "
              f"its processes (PSS added; target < {TARGET_RSS_MB}); {processes} HTTP "
              "process(es)")
        (OUT / "upload.json").write_text(json.dumps({
            "files": len(files), "bytes": size, "repeats": args.repeats, "runs": runs,
            "client": args.client,
            "summary": summary, "ratio": ratio, "http_processes": processes,
            "targets": {
                "rate_ratio": TARGET_RATE, "peak_rss_mb": TARGET_RSS_MB},
            "load_average": os.getloadavg()}, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
