"""Viewer benchmark: time to first image of a 300-slice CT series and sustained cine frame rate
of a 640x480 RGB 60-frame loop, in headless Chromium on loopback, ImageShare's viewer side by
side with Orthanc's own web viewer (Debian package orthanc-webviewer) on the same files.

One command: ``python bench/viewer.py`` (or ``make bench-viewer``). Prints a table and writes
bench/out/viewer.json.

Both viewers are measured the same way: a script injected before the page loads samples the
centre of every canvas on each animation frame; the first image is the first time a canvas
shows non-black pixels (milliseconds since navigation started), and the cine rate is the
number of distinct pictures shown per second over a few seconds of playback.

    --slices N   CT slices (default 300)      --runs N   cold page loads per viewer (default 5)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--work", type=Path, default=OUT / "viewer-work")
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

    imageshare = RunningServer(args.work / "imageshare").start()
    orthanc = None
    results: dict[str, dict[str, float | str]] = {}
    try:
        imageshare.cli("import", "--quiet", str(data))
        imageshare.cli("user", "add", "bench", "--role", "clinician", "--password", PASSWORD)
        orthanc_ct = ""
        if Path(WEBVIEWER_PLUGIN).exists() and shutil.which("Orthanc"):
            orthanc = OrthancServer(args.work / "orthanc")
            orthanc.start({}, plugins=[WEBVIEWER_PLUGIN])
            with orthanc.http() as client:
                for path in [*ct, us]:
                    client.post("/instances", content=path.read_bytes()).raise_for_status()
                orthanc_ct = _orthanc_series(client, ct_study)

        def login(context: object) -> None:
            context.request.post(imageshare.url + "/api/session",
                                 data={"username": "bench", "password": PASSWORD})

        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
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
        if orthanc is not None:
            orthanc.stop()
    _report(results, args)


def _orthanc_series(client: httpx.Client, study_uid: str) -> str:
    found = client.post("/tools/find", json={"Level": "Series",
                                              "Query": {"StudyInstanceUID": study_uid}}).json()
    return found[0]


def _report(results: dict[str, dict[str, float | str]], args: argparse.Namespace) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"\n{'metric':<40} {'unit':<9} {'ImageShare':>11} {'Orthanc viewer':>15}  ratio")
    for metric, row in results.items():
        mine, theirs = row.get("imageshare"), row.get("orthanc-webviewer")
        ratio = ""
        if isinstance(mine, float) and isinstance(theirs, float) and mine and theirs:
            ratio = f"x{(theirs / mine if row['unit'] == 'ms' else mine / theirs):.2f}"
        theirs_text = f"{theirs:,.1f}" if isinstance(theirs, float) else str(theirs or "n/a")
        print(f"{metric:<40} {row['unit']:<9} {mine:>11,.1f} {theirs_text:>15}  {ratio}")
    payload = {"date": time.strftime("%Y-%m-%d"), "slices": args.slices, "runs": args.runs,
               "results": results}
    (OUT / "viewer.json").write_text(json.dumps(payload, indent=2))
    print(f"\nwritten to {OUT / 'viewer.json'}")


if __name__ == "__main__":
    main()
