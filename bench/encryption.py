"""The cost of encryption at rest: the same ingest and retrieval on a plain and on an
encrypted file blob store, side by side.

One command: ``python bench/encryption.py`` (or ``make bench-encryption``). Builds two fresh
installations in a temporary folder (SQLite index, file blob store; one with
``encrypt_blobs`` on), then, interleaved and repeated, (1) ingests the same 512 KB CT slices
through the one ingest pipeline (parsed, fsynced, indexed: what every C-STORE and STOW-RS
does), (2) reads every stored instance back whole (what WADO-RS and C-MOVE send), and (3)
reads single frames of 13.8 MB ultrasound cine loops by range (what the viewer's frame
requests do). Prints a Markdown table and writes JSON (bench/out/encryption.json).

    --quick        60 slices, 2 loops, one repeat, for a smoke run
    --repeats N    rounds per set-up (median kept; default 3)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imageshare.app import build_archive  # noqa: E402
from imageshare.domain.actors import cli_actor  # noqa: E402
from imageshare.settings import load_settings  # noqa: E402
from tests.factory import ct_series, us_cine  # noqa: E402

OUT = ROOT / "bench" / "out"


def _round(work: Path, encrypted: bool, slices: list[Path], loops: list[Path],
           frame_reads: int) -> dict[str, float]:
    """One fresh installation: ingest, read back whole, read frames; rates of each."""
    data = work / ("enc" if encrypted else "plain") / str(time.monotonic_ns())
    archive = build_archive(load_settings({"data_dir": data, "encrypt_blobs": encrypted},
                                          environ={}))
    actor = cli_actor()
    try:
        files = slices + loops
        volume = sum(p.stat().st_size for p in files)
        started = time.perf_counter()
        stored = [archive.ingest.store_copy(p, actor) for p in files]
        ingest = time.perf_counter() - started
        keys = [_key(archive, s.sop_instance_uid) for s in stored]
        started = time.perf_counter()
        read = 0
        for key in keys:
            with archive.blobs.open(key) as fh:
                while chunk := fh.read(1 << 20):
                    read += len(chunk)
        whole = time.perf_counter() - started
        assert read == volume, (read, volume)
        loop_keys = keys[len(slices):]
        frame = 320 * 240 * 3
        pick = random.Random(7)
        size = loops[0].stat().st_size
        started = time.perf_counter()
        for _ in range(frame_reads):
            key = pick.choice(loop_keys)
            start = size - frame * (1 + pick.randrange(60))
            with archive.blobs.open_range(key, start, frame) as fh:
                assert len(fh.read()) == frame
        frames = time.perf_counter() - started
    finally:
        archive.close()
    return {"ingest_inst_s": len(files) / ingest, "ingest_mb_s": volume / ingest / 1e6,
            "read_mb_s": volume / whole / 1e6, "frames_per_s": frame_reads / frames,
            "frame_ms": frames / frame_reads * 1000}


def _key(archive, sop_uid: str) -> str:
    from sqlalchemy import select

    from imageshare.storage.index.schema import instances

    with archive.engine.connect() as conn:
        return conn.execute(select(instances.c.blob_key)
                            .where(instances.c.sop_uid == sop_uid)).scalar_one()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT / "encryption.json")
    args = parser.parse_args()
    count, loop_count, repeats = (60, 2, 1) if args.quick else (300, 6, args.repeats)
    with tempfile.TemporaryDirectory(prefix="imageshare-bench-enc-") as tmp:
        work = Path(tmp)
        slices = ct_series(work / "ct", count, size=512, patient_id="BENCHENC")
        loops = [us_cine(work / "us" / str(n), frames=60, rows=240, cols=320,
                         patient_id="BENCHENC", patient_name="Doe^Jane")
                 for n in range(loop_count)]
        runs: dict[str, list[dict[str, float]]] = {"plain": [], "encrypted": []}
        for _ in range(repeats):
            for kind in ("plain", "encrypted"):
                runs[kind].append(_round(work, kind == "encrypted", slices, loops, 600))
    medians = {kind: {m: statistics.median(r[m] for r in rounds) for m in rounds[0]}
               for kind, rounds in runs.items()}
    rows = [("ingest 512 KB CT slices + 13.8 MB cine loops", "inst/s", "ingest_inst_s"),
            ("ingest", "MB/s", "ingest_mb_s"),
            ("read back whole instances", "MB/s", "read_mb_s"),
            ("single frames by range (230 KB)", "frames/s", "frames_per_s"),
            ("single frame by range", "ms", "frame_ms")]
    print(f"Encryption at rest, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores: "
          f"{count} CT slices + {loop_count} cine loops, median of {repeats} round(s)\n")
    print("| measurement | unit | plain file store | encrypted | encrypted / plain |")
    print("|---|---|---:|---:|---:|")
    for label, unit, metric in rows:
        plain, enc = medians["plain"][metric], medians["encrypted"][metric]
        print(f"| {label} | {unit} | {plain:,.1f} | {enc:,.1f} | {enc / plain:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"slices": count, "loops": loop_count, "repeats": repeats,
                                    "runs": runs, "median": medians}, indent=2))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
