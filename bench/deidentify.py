"""De-identification throughput: ImageShare side by side with the PyPI packages ``deid`` and
``dicognito`` on the same files in the same run (read, de-identify, write), plus ImageShare's
pixel path (burned-in text blanked and verified with Tesseract), and the cost of ImageShare's
independent verifier, measured apart.

The metadata rows compare like with like: every tool de-identifies the attributes and writes
the pixel data unchanged. ImageShare runs its product path (``Deidentifier.write``: the header
is read and cleaned, pixel data that needs no cleaning is copied in the kernel without being
loaded) with the verifier switched off; the verifier then checks every output against its
source (no OCR is needed for these files) and its time is reported on its own.

One command: ``python bench/deidentify.py`` (or ``make bench-deid``). Prints a table (instances/s,
MB/s and ratios) and writes bench/out/deid.json.

    --ct N      CT slices, 512x512 16-bit (default 200)
    --loops N   ultrasound loops, 60 frames 320x240 RGB (default 10)
    --rounds N  metadata runs per tool, interleaved; the median is reported (default 3)
    --no-pixels skip the pixel path (OCR) rows
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

from imageshare.deid.profiles import DEFAULT_PROFILES, Profile  # noqa: E402
from imageshare.deid.pseudonyms import Pseudonyms  # noqa: E402
from imageshare.deid.service import TRUST_PIXELS, Deidentifier  # noqa: E402
from imageshare.verify import Verifier  # noqa: E402
from tests.factory import ct_series, us_cine  # noqa: E402

OUT = ROOT / "bench" / "out"
SECRET = b"benchmark-secret-0123456789abcdef"


# The Basic Profile with the options the teaching profile uses, minus the pixel path: what deid
# and dicognito do (attributes only; pixel data written unchanged).
METADATA = Profile("metadata", DEFAULT_PROFILES["teaching"].options - {"clean_pixel_data"})


VERIFIER_SECONDS: list[float] = []  # the verifier's own time, file by file, as it reports it


def _imageshare_metadata(verify: bool = False) -> Callable[[Path, Path], None]:
    deidentifier = Deidentifier(METADATA, Pseudonyms(SECRET), burned_in=TRUST_PIXELS,
                                verifier=Verifier(ocr="never") if verify else None)

    def run(source: Path, target: Path) -> None:
        with open(source, "rb") as fp, open(target, "w+b") as out:
            outcome = deidentifier.write(fp, out)
        assert not outcome.held_back, outcome.report.get("reason")
        if verify:
            assert outcome.report["verification"]["findings"] == []
            VERIFIER_SECONDS.append(outcome.report["verification"]["seconds"])

    return run


def _imageshare_pixels() -> Callable[[Path, Path], None]:
    """The whole product path: burned-in text cleaned with OCR, every copy verified (the
    verifier reads the frames with its own OCR too)."""
    deidentifier = Deidentifier(DEFAULT_PROFILES["basic"], Pseudonyms(SECRET),
                                verifier=Verifier())

    def run(source: Path, target: Path) -> None:
        with open(source, "rb") as fp, open(target, "w+b") as out:
            deidentifier.write(fp, out)

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
    parser.add_argument("--no-pixels", action="store_true", help="skip the pixel path (OCR)")
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
    tools = {"imageshare": _imageshare_metadata(), "dicognito": _dicognito(), "deid": _deid(),
             "imageshare+verifier": _imageshare_metadata(verify=True)}
    results: dict[str, dict[str, dict[str, float]]] = {}
    verification: dict[str, dict[str, float]] = {}
    for label, files in sets.items():
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in tools}
        checks: list[float] = []
        for _round in range(args.rounds):  # interleaved, so that caches favour nobody
            for name, tool in tools.items():
                VERIFIER_SECONDS.clear()
                rounds[name].append(measure(name, tool, files, args.work / "out"))
                if name == "imageshare+verifier":
                    checks.append(sum(VERIFIER_SECONDS))
        medians = {name: sorted(runs, key=lambda r: r["instances_per_s"])[len(runs) // 2]
                   for name, runs in rounds.items()}
        verified = medians.pop("imageshare+verifier")
        results[f"metadata, {label}"] = medians
        # the verifier's cost as it measures itself (reading the source's identity, then the
        # written output), and the whole verified path against the unverified one
        check = sorted(checks)[len(checks) // 2]
        verification[f"metadata, {label}"] = {
            "seconds": check, "instances": len(files),
            "share_of_deidentification": check / medians["imageshare"]["seconds"],
            "verified_path_seconds": verified["seconds"]}
        if not args.no_pixels:
            results[f"pixels (OCR), {label}"] = {
                "imageshare": measure("pixels", _imageshare_pixels(), files,
                                      args.work / "out")}
    print(f"\n{'run':<34} {'tool':<11} {'inst/s':>9} {'MB/s':>8}  ratio (ImageShare / tool)")
    for run, by_tool in results.items():
        mine = by_tool["imageshare"]["instances_per_s"]
        for tool, figures in by_tool.items():
            ratio = "" if tool == "imageshare" else f"x{mine / figures['instances_per_s']:.2f}"
            print(f"{run:<34} {tool:<11} {figures['instances_per_s']:>9.1f} "
                  f"{figures['mb_per_s']:>8.1f}  {ratio}")
    print(f"\n{'verifier (no OCR needed) on':<34} {'ms/inst':>9}  share of de-id time  "
          "(verified path / unverified)")
    for run, figures in verification.items():
        ratio = figures["verified_path_seconds"] / results[run]["imageshare"]["seconds"]
        print(f"{run:<34} {figures['seconds'] / figures['instances'] * 1000:>9.2f}  "
              f"{figures['share_of_deidentification']:>19.0%}  x{ratio:.2f}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "deid.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d"), "ct": args.ct, "loops": args.loops,
         "results": results, "verification": verification}, indent=2))
    shutil.rmtree(args.work, ignore_errors=True)
    print(f"\nwritten to {OUT / 'deid.json'}")


if __name__ == "__main__":
    main()
