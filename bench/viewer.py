"""Viewer benchmark: time to first image of a 300-slice CT series and sustained cine frame rate
of a 640x480 RGB 60-frame loop, in headless Chromium on loopback, ImageShare's viewer side by
side with Orthanc's own web viewer (Debian package orthanc-webviewer) on the same files.

One command: ``python bench/viewer.py`` (or ``make bench-viewer``). Prints a table and writes
bench/out/viewer.json.

It also opens pydicom's 120-frame 640x480 echo loop (``color3d_jpeg_baseline.dcm``, JPEG
baseline YBR_FULL_422, 33.3 ms frame time) and measures the time to the first frame and to
the first full-rate playback: the first moment from which one second of playback shows at
least 90 % of the file's 30 frames. ``--current PATH`` runs the same measurement against the
ImageShare code in another checkout (e.g. ``git worktree add /tmp/main main``): the current
viewer, side by side with this one. ``--echo-only`` skips the CT and 60-frame measurements.

Both viewers are measured the same way: a script injected before the page loads samples the
centre of every canvas on each animation frame; the first image is the first time a canvas
shows non-black pixels (milliseconds since navigation started), and the cine rate is the
number of distinct pictures shown per second over a few seconds of playback.

    --slices N   CT slices (default 300)      --runs N   cold page loads per viewer (default 5)
    --current PATH   another checkout's ImageShare as the "current" column
    --echo-only      only the 120-frame echo loop
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from pydicom import dcmread
from pydicom.data import get_testdata_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.browser.conftest import CHROMIUM_ARGS, chromium_path  # noqa: E402
from tests.factory import ct_series, us_cine  # noqa: E402
from tests.peers import OrthancServer, RunningServer  # noqa: E402

OUT = ROOT / "bench" / "out"
WEBVIEWER_PLUGIN = "/usr/share/orthanc/plugins/libOrthancWebViewer.so"
PASSWORD = "benchmark-password"

# Injected into every page before its own scripts: watches canvases, records what it sees.
PROBE = """
(() => {
  const probe = window.__probe = {first: null, changes: [], last: null};
  function sample() {
    for (const c of document.querySelectorAll('canvas')) {
      if (!c.width || !c.height) continue;
      let ctx;
      try { ctx = c.getContext('2d', {willReadFrequently: true}); } catch (e) { continue; }
      if (!ctx) continue;
      const w = Math.min(64, c.width), h = Math.min(64, c.height);
      const d = ctx.getImageData((c.width - w) >> 1, (c.height - h) >> 1, w, h).data;
      let sum = 0;
      for (let i = 0; i < d.length; i += 4) sum += d[i] * 3 + d[i + 1] * 5 + d[i + 2] * 7;
      if (sum === 0) continue;
      const now = performance.now();
      if (probe.first === null) probe.first = now;
      if (sum !== probe.last) { probe.changes.push(now); probe.last = sum; }
      return;
    }
  }
  function loop() { sample(); requestAnimationFrame(loop); }
  requestAnimationFrame(loop);
})();
"""


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@contextmanager
def probed_page(browser: object, url: str, login: callable | None) -> Iterator[object]:
    """A fresh browser context (signed in by ``login``) on ``url`` with the probe running,
    once the first image is on a canvas."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        if login:
            login(context)
        page = context.new_page()
        page.add_init_script(PROBE)
        page.goto(url)
        page.wait_for_function("() => window.__probe.first !== null", timeout=60000)
        yield page
    finally:
        context.close()


def first_image_ms(browser: object, url: str, login: callable | None) -> float:
    """Milliseconds from navigation start to the first non-black canvas, in a fresh context."""
    with probed_page(browser, url, login) as page:
        return float(page.evaluate("window.__probe.first"))


def cine_fps(browser: object, url: str, login: callable | None, start: callable,
             seconds: float = 3.0) -> float:
    """Distinct pictures shown per second during ``seconds`` of playback."""
    with probed_page(browser, url, login) as page:
        start(page)
        page.wait_for_timeout(500)
        t0 = page.evaluate("performance.now()")
        page.wait_for_timeout(seconds * 1000)
        changes = page.evaluate(f"window.__probe.changes.filter(t => t >= {t0})")
        return len(changes) / seconds


ECHO_FPS = 30.0
FULL_RATE = 0.9


def echo_playback(browser: object, url: str, login: callable | None,
                  seconds: float = 25.0) -> tuple[float, float, float]:
    """(ms to the first frame, to the first motion (the second distinct picture), to the first
    full-rate second of playback) from navigation start, in a fresh context; NaN for what did
    not happen within ``seconds``."""
    with probed_page(browser, url, login) as page:
        first = float(page.evaluate("window.__probe.first"))
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            page.wait_for_timeout(250)
            changes = page.evaluate("window.__probe.changes")
            reached = _full_rate_from(changes)
            if reached is not None:
                return first, float(changes[1]), reached
        changes = page.evaluate("window.__probe.changes")
        return first, float(changes[1]) if len(changes) > 1 else float("nan"), float("nan")


def _full_rate_from(changes: list[float]) -> float | None:
    """The first change time from which the next second holds >= 90 % of 30 pictures."""
    needed = int(ECHO_FPS * FULL_RATE)
    for i, start in enumerate(changes):
        if i + needed - 1 < len(changes) and changes[i + needed - 1] - start <= 1000.0:
            return float(start)
    return None


def _echo_rows(browser: object, server: RunningServer, study: str, label: str, runs: int,
               results: dict[str, dict[str, float | str]]) -> None:
    def login(context: object) -> None:
        context.request.post(server.url + "/api/session",
                             data={"username": "bench", "password": PASSWORD})

    measured = [echo_playback(browser, f"{server.url}/viewer/{study}", login)
                for _ in range(runs)]
    results.setdefault("echo 120 frames: first frame", {"unit": "ms"})[label] = median(
        [m[0] for m in measured])
    results.setdefault("echo 120 frames: cine starts", {"unit": "ms"})[label] = median(
        [m[1] for m in measured])
    results.setdefault("echo 120 frames: first full-rate second", {"unit": "ms"})[label] = (
        median([m[2] for m in measured]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--work", type=Path, default=OUT / "viewer-work")
    parser.add_argument("--current", type=Path, default=None)
    parser.add_argument("--echo-only", action="store_true")
    args = parser.parse_args()
    chromium = chromium_path()
    if chromium is None:
        sys.exit("Chromium is needed (apt-get install chromium)")
    shutil.rmtree(args.work, ignore_errors=True)
    data = args.work / "data"
    print(f"generating a {args.slices}-slice 512x512 CT and a 60-frame 640x480 RGB loop",
          flush=True)
    ct = ct_series(data / "ct", count=args.slices, size=512, patient_id="BENCH1")
    us = us_cine(data / "us", frames=60, rows=480, cols=640, patient_id="BENCH2")
    ct_study = dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID
    us_study = dcmread(us, stop_before_pixels=True).StudyInstanceUID
    echo = Path(get_testdata_file("color3d_jpeg_baseline.dcm"))
    (data / "echo").mkdir(parents=True, exist_ok=True)
    shutil.copy(echo, data / "echo" / "echo.dcm")
    echo_study = dcmread(echo, stop_before_pixels=True).StudyInstanceUID

    imageshare = RunningServer(args.work / "imageshare").start()
    current = None
    orthanc = None
    results: dict[str, dict[str, float | str]] = {}
    try:
        if args.current is not None:
            # Only the server runs the other checkout's code: no in-process registration.
            current = RunningServer(args.work / "current", modalities=(),
                                    extra_env={"PYTHONPATH": str(args.current.resolve()),
                                               "PYTHONSAFEPATH": "1"}).start()
        for server in (imageshare, current):
            if server is None:
                continue
            server.cli("import", "--quiet", str(data))
            server.cli("user", "add", "bench", "--role", "clinician", "--password", PASSWORD)
        orthanc_ct = orthanc_echo = ""
        if Path(WEBVIEWER_PLUGIN).exists() and shutil.which("Orthanc"):
            orthanc = OrthancServer(args.work / "orthanc")
            orthanc.start({}, plugins=[WEBVIEWER_PLUGIN])
            with orthanc.http() as client:
                for path in [*ct, us, echo]:
                    client.post("/instances", content=path.read_bytes()).raise_for_status()
                orthanc_ct = _orthanc_series(client, ct_study)
                orthanc_echo = _orthanc_series(client, echo_study)

        def login(context: object) -> None:
            context.request.post(imageshare.url + "/api/session",
                                 data={"username": "bench", "password": PASSWORD})

        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            _echo_rows(browser, imageshare, echo_study, "imageshare", args.runs, results)
            if current is not None:
                _echo_rows(browser, current, echo_study, "current", args.runs, results)
            if orthanc is not None:
                url = f"{orthanc.url}/web-viewer/app/viewer.html?series={orthanc_echo}"
                results["echo 120 frames: first frame"]["orthanc-webviewer"] = median(
                    [first_image_ms(browser, url, None) for _ in range(args.runs)])
                results["echo 120 frames: cine starts"]["orthanc-webviewer"] = "no cine"
                results["echo 120 frames: first full-rate second"]["orthanc-webviewer"] = (
                    "no cine")
            if args.echo_only:
                browser.close()
                return
            ours = [first_image_ms(browser, f"{imageshare.url}/viewer/{ct_study}", login)
                    for _ in range(args.runs)]
            first_image = f"first image, {args.slices}-slice CT"
            results[first_image] = {"unit": "ms", "imageshare": median(ours)}
            ours_fps = cine_fps(browser, f"{imageshare.url}/viewer/{us_study}", login,
                                lambda page: page.wait_for_function(
                                    "() => window.imageshareViewer.playing", timeout=60000))
            results["cine, 640x480 RGB 60 frames at 30 fps"] = {"unit": "frames/s",
                                                               "imageshare": ours_fps}
            if orthanc is not None:
                url = f"{orthanc.url}/web-viewer/app/viewer.html?series="
                theirs = [first_image_ms(browser, url + orthanc_ct, None)
                          for _ in range(args.runs)]
                results[first_image]["orthanc-webviewer"] = median(theirs)
                # Its toolbar (2.8) has no cine control: frames can only be scrolled.
                results["cine, 640x480 RGB 60 frames at 30 fps"]["orthanc-webviewer"] = (
                    "no cine")
            browser.close()
    finally:
        imageshare.stop()
        if current is not None:
            current.stop()
        if orthanc is not None:
            orthanc.stop()
        _report(results, args)


def _orthanc_series(client: httpx.Client, study_uid: str) -> str:
    found = client.post("/tools/find", json={"Level": "Series",
                                              "Query": {"StudyInstanceUID": study_uid}}).json()
    return found[0]


def _report(results: dict[str, dict[str, float | str]], args: argparse.Namespace) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"\n{'metric':<42} {'unit':<9} {'ImageShare':>11} {'current':>9} "
          f"{'Orthanc viewer':>15}  ratio")
    for metric, row in results.items():
        mine, theirs = row.get("imageshare"), row.get("orthanc-webviewer")
        ratio = ""
        if isinstance(mine, float) and isinstance(theirs, float) and mine and theirs:
            ratio = f"x{(theirs / mine if row['unit'] == 'ms' else mine / theirs):.2f}"

        def shown(value: object) -> str:
            return f"{value:,.1f}" if isinstance(value, float) else str(value or "n/a")

        print(f"{metric:<42} {row['unit']:<9} {shown(mine):>11} "
              f"{shown(row.get('current')):>9} {shown(theirs):>15}  {ratio}")
    payload = {"date": time.strftime("%Y-%m-%d"), "slices": args.slices, "runs": args.runs,
               "results": results}
    (OUT / "viewer.json").write_text(json.dumps(payload, indent=2))
    print(f"\nwritten to {OUT / 'viewer.json'}")


if __name__ == "__main__":
    main()
