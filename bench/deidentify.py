"""De-identification throughput: ImageShare side by side with the PyPI packages ``deid`` and
``dicognito`` on the same files in the same run (read, de-identify, write), plus ImageShare's
pixel path (burned-in text blanked and verified with Tesseract).

One command: ``python bench/deidentify.py`` (or ``make bench-deid``). Prints a table (instances/s,
MB/s and ratios) and writes bench/out/deid.json.

    --ct N      CT slices, 512x512 16-bit (default 200)
    --loops N   ultrasound loops, 60 frames 320x240 RGB (default 10)
    --rounds N  metadata runs per tool, interleaved; the median is reported (default 3)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imageshare.deid.engine import AttributeCleaner  # noqa: E402
from imageshare.deid.profiles import DEFAULT_PROFILES, Profile  # noqa: E402
from imageshare.deid.pseudonyms import Pseudonyms  # noqa: E402
from imageshare.deid.service import SAFE_PRIVATE, Deidentifier  # noqa: E402
from tests.factory import ct_series, us_cine  # noqa: E402

OUT = ROOT / "bench" / "out"
SECRET = b"benchmark-secret-0123456789abcdef"


def _imageshare_metadata() -> Callable[[Path, Path], None]:
    # The Basic Profile with the options the teaching profile uses, minus the pixel path:
    # what deid and dicognito do (attributes only).
    profile = Profile("metadata", DEFAULT_PROFILES["teaching"].options - {"clean_pixel_data"})
    cleaner = AttributeCleaner(profile, Pseudonyms(SECRET), SAFE_PRIVATE)

    def run(source: Path, target: Path) -> None:
        ds = dcmread(source)
        cleaner.apply(ds)
        ds.save_as(target)

    return run


def _imageshare_pixels() -> Callable[[Path, Path], None]:
    deidentifier = Deidentifier(DEFAULT_PROFILES["basic"], Pseudonyms(SECRET))

    def run(source: Path, target: Path) -> None:
        outcome = deidentifier.instance(dcmread(source))
        if outcome.dataset is not None:
            outcome.dataset.save_as(target)

    return run


def _dicognito() -> Callable[[Path, Path], None]:
    from dicognito.anonymizer import Anonymizer

    anonymizer = Anonymizer(seed="benchmark")

    def run(source: Path, target: Path) -> None:
        ds = dcmread(source)
        anonymizer.anonymize(ds)
        ds.save_as(target)

    return run


def _deid() -> Callable[[Path, Path], None]:
    import logging

    from deid.config import DeidRecipe
    from deid.dicom import replace_identifiers

    logging.getLogger("deid").setLevel(logging.ERROR)
    recipe = DeidRecipe()

    def run(source: Path, target: Path) -> None:
        replace_identifiers(dicom_files=[str(source)], deid=recipe, save=True,
                            output_folder=str(target.parent), overwrite=True)

    return run


def measure(name: str, tool: Callable[[Path, Path], None], files: list[Path],
            work: Path) -> dict[str, float]:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    size = sum(p.stat().st_size for p in files)
    started = time.perf_counter()
    for i, path in enumerate(files):
        folder = out / f"{i:05d}"
        folder.mkdir()
        tool(path, folder / path.name)
    seconds = time.perf_counter() - started
    return {"instances_per_s": len(files) / seconds, "mb_per_s": size / 1e6 / seconds,
            "seconds": seconds, "instances": len(files)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=int, default=200)
    parser.add_argument("--loops", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="median of this many runs")
    shm = Path("/dev/shm")
    parser.add_argument("--work", type=Path,
                        default=shm / "imageshare-deid-bench" if shm.is_dir() else OUT / "work",
                        help="working folder (default: memory-backed /dev/shm, so that disk "
                        "write-back does not decide the figures)")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    data = args.work / "in"
    print(f"generating {args.ct} CT slices and {args.loops} ultrasound loops", flush=True)
    sets = {
        "CT 512x512": ct_series(data / "ct", count=args.ct, size=512),
        "US 60x320x240 RGB": [us_cine(data / "us", frames=60, rows=240, cols=320)
                              for _ in range(args.loops)],
    }
    tools = {"imageshare": _imageshare_metadata(), "dicognito": _dicognito(), "deid": _deid()}
    results: dict[str, dict[str, dict[str, float]]] = {}
    for label, files in sets.items():
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in tools}
        for _round in range(args.rounds):  # interleaved, so that caches favour nobody
            for name, tool in tools.items():
                rounds[name].append(measure(name, tool, files, args.work / "out"))
        results[f"metadata, {label}"] = {
            name: sorted(runs, key=lambda r: r["instances_per_s"])[len(runs) // 2]
            for name, runs in rounds.items()
        }
        results[f"pixels (OCR), {label}"] = {
            "imageshare": measure("pixels", _imageshare_pixels(), files, args.work / "out")}
    print(f"\n{'run':<34} {'tool':<11} {'inst/s':>9} {'MB/s':>8}  ratio (ImageShare / tool)")
    for run, by_tool in results.items():
        mine = by_tool["imageshare"]["instances_per_s"]
        for tool, figures in by_tool.items():
            ratio = "" if tool == "imageshare" else f"x{mine / figures['instances_per_s']:.2f}"
            print(f"{run:<34} {tool:<11} {figures['instances_per_s']:>9.1f} "
                  f"{figures['mb_per_s']:>8.1f}  {ratio}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "deid.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d"), "ct": args.ct, "loops": args.loops,
         "results": results}, indent=2))
    shutil.rmtree(args.work, ignore_errors=True)
    print(f"\nwritten to {OUT / 'deid.json'}")


if __name__ == "__main__":
    main()
