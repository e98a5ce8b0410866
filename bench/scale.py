"""Scale on PostgreSQL, side by side with Orthanc and its PostgreSQL index (issue 12, item 5).

One command: ``python bench/scale.py`` (or ``make bench-scale``). Starts a throwaway
PostgreSQL 15 (Debian's) and runs, in one go:

1. **QIDO-RS latency at a million instances.** ImageShare's index is bulk-loaded with
   ``COPY`` through its own schema (the migrations make the tables; the rows are built by
   ingest's own header code, ``header_from_dataset``, from the data set of each series, and
   carry the counters ingest keeps), from a reproducible catalogue (``bench/catalogue.py``:
   20,000 studies x 5 series x 10 instances, 12,000 patients, 100 surnames, dates over 21
   years, a hospital's modality mix). The instances that instance-level queries answer for
   are real files in the blob store (those queries read stored headers). Single client,
   p50/p95 per kind of query. Target: p95 <= 20 ms.
2. **The same queries at an equal size against Orthanc** (Debian's Orthanc 1.10 with its
   PostgreSQL index plugin and DICOMweb plugin), both loaded with the same real files (the
   first N instances of the catalogue) through their front doors: ``imageshare import`` and
   DCMTK's storescu to Orthanc. Sending a million instances to Orthanc does not fit one
   session on this machine, so the side-by-side runs at the largest equal size that does
   (``--equal-instances``, default 50,000). Before measuring, the answers of ImageShare's
   bulk-loaded index and of its real ingest are compared for the same studies.
3. **QIDO-RS throughput with 20 concurrent clients** on the equal-size data: ImageShare with
   a service account's API token (bearer), Orthanc with HTTP Basic (``RegisteredUsers``),
   mixed queries on keep-alive connections for a fixed time; requests/s and p95.
4. **The cost of a second instance**: two ``imageshare serve`` on one PostgreSQL and one blob
   folder, receiving one CT study by C-STORE at once (half each, storescu), against one
   instance receiving all of it with the same number of associations; checks that every
   instance was indexed once and no store failed.

Prints tables and writes bench/out/scale.json.

    --quick                 small sizes, for a smoke run
    --instances N           instances bulk-loaded for (1) (default 1,000,000)
    --equal-instances N     instances sent to both for (2) and (3) (default 50,000)
    --only qido,equal,throughput,instances
    --keep-work             keep the generated files (and the real files' folder) for a re-run
    --postgres DIR          keep the PostgreSQL cluster in DIR (made on first use) and reuse its
                            bulk-loaded million on the next run instead of loading it again
                            (minutes); migrations added since are applied to it first
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import catalogue as cat  # noqa: E402
from bench.blobstore import ThrowawayPostgres  # noqa: E402
from bench.run import storescu  # noqa: E402
from tests.factory import ct_series  # noqa: E402
from tests.peers import (  # noqa: E402
    OrthancServer,
    RunningServer,
    child_pids,
    free_port,
    wait_for_port,
)

OUT = ROOT / "bench" / "out"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
POSTGRES_PLUGIN = "/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so"
TARGET_P95_MS = 20.0
SERVICE = "bench-service"
ORTHANC_USER = ("bench", "bench-orthanc-password")
SECRET_KEY = "bench-scale-shared-secret-key-0123456789abcdef"


class KeptPostgres(ThrowawayPostgres):
    """A PostgreSQL 15 cluster kept in ``folder`` between runs (made on first use; stopped,
    not deleted, at the end), so that a bulk-loaded index can be measured again."""

    def __init__(self, folder: Path) -> None:  # noqa: D107 - the class says it
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not versions:
            raise SystemExit("PostgreSQL is needed: apt-get install postgresql")
        self.bin = versions[-1].parent
        self.base = folder.resolve()
        self.run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        data, sock = self.base / "data", self.base / "sock"
        if not (data / "PG_VERSION").exists():
            shutil.rmtree(self.base, ignore_errors=True)
            for path in (self.base, data, sock):
                path.mkdir(parents=True)
                if self.run_as:
                    shutil.chown(path, "postgres", "postgres")
            self.base.chmod(0o755)
            subprocess.run([*self.run_as, str(self.bin / "initdb"), "-D", str(data), "-U",
                            "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"],
                           check=True, capture_output=True)
            (self.base / "port").write_text(str(free_port()))
        self.port = int((self.base / "port").read_text())
        running = subprocess.run([*self.run_as, str(self.bin / "pg_ctl"), "-D", str(data),
                                  "status"], capture_output=True).returncode == 0
        if not running:
            subprocess.run([*self.run_as, str(self.bin / "pg_ctl"), "-D", str(data), "-l",
                            str(data / "server.log"), "-w", "start", "-o",
                            f"-p {self.port} -k {sock} -c listen_addresses=127.0.0.1 "
                            "-c max_connections=300"], check=True, capture_output=True)
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            names = [r[0] for r in conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE 'bench%'")]
            for name in names:  # the equal-size and second-instance databases of a past run
                conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        self.count = 0

    def database(self, name: str) -> tuple[str, bool]:
        """The URL of database ``name`` and whether it already existed."""
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            existed = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                   (name,)).fetchone() is not None
            if not existed:
                conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}", existed

    def stop(self) -> None:
        """Stop the cluster and keep its files."""
        subprocess.run([*self.run_as, str(self.bin / "pg_ctl"), "-D", str(self.base / "data"),
                        "-m", "fast", "-w", "stop"], capture_output=True)


# -- ImageShare's index, bulk-loaded -----------------------------------------------------------


def _copy(cur: Any, table: str, columns: tuple[str, ...], rows: Iterator[tuple]) -> int:
    count = 0
    with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
            count += 1
    return count


def bulk_load(url: str, studies: int, shape: cat.Shape, blob_root: Path,
              with_files: set[int]) -> dict[str, float]:
    """Fill a migrated, empty ImageShare index with ``studies`` studies of the catalogue,
    row for row as ingest writes them; the instances of ``with_files`` also get their files
    in the blob store. Returns timings."""
    import psycopg

    from imageshare.archive.header import header_from_dataset
    from imageshare.storage.files import FileBlobStore
    from imageshare.storage.index.database import make_engine, migrate

    engine = make_engine(url)
    migrate(engine)
    engine.dispose()
    blobs = FileBlobStore(blob_root)
    started = time.perf_counter()
    now = dt.datetime.now(dt.UTC)
    patients: list[tuple] = []
    study_rows: list[tuple] = []
    series_rows: list[tuple] = []
    # per series: (series pk, instance template) to stream the instance rows from
    templates: list[tuple[int, int, int, dict[str, Any], str, str]] = []
    seen_patient = -1
    sample_size = 0
    for s in range(studies):
        received = now - dt.timedelta(minutes=(studies - s))
        modalities = cat.modality_of(s)[0]
        for k in range(shape.series):
            h = header_from_dataset(cat.instance_dataset(s, k, 0), cat.ExplicitVRLittleEndian)
            if k == 0:
                patient = cat.patient_of(s)
                if patient != seen_patient:
                    seen_patient = patient
                    patients.append((patient + 1, h.patient_id, h.issuer, h.patient_name,
                                     h.name_norm, h.birth_date, h.sex,
                                     json.dumps(h.patient_json), received))
                study_rows.append((s + 1, h.study_uid, patient + 1, modalities, shape.series,
                                   shape.per_study, json.dumps(h.study_json), received,
                                   received, *h.study.values()))
            series_pk = s * shape.series + k + 1
            series_rows.append((series_pk, h.series_uid, s + 1, shape.instances,
                                json.dumps(h.series_json), received, *h.series.values()))
            templates.append((s, k, series_pk, h.instance, h.sop_class_uid, h.transfer_syntax))
        if not sample_size:
            buffer = io.BytesIO()
            cat.instance_dataset(s, 0, 0).save_as(buffer, enforce_file_format=True)
            sample_size = len(buffer.getvalue())
    headers_s = time.perf_counter() - started

    def instance_rows() -> Iterator[tuple]:
        pk = 0
        for s, k, series_pk, instance, sop_class, syntax in templates:
            received = now - dt.timedelta(minutes=(studies - s))
            minute = int(received.timestamp()) // 60
            for i in range(shape.instances):
                pk += 1
                key = f"{minute:08x}{pk:024x}"
                uid = cat.sop_uid(s, k, i)
                if s in with_files:
                    buffer = io.BytesIO()
                    cat.instance_dataset(s, k, i).save_as(buffer, enforce_file_format=True)
                    size = len(buffer.getvalue())
                    buffer.seek(0)
                    digest = blobs.put(key, buffer, size).sha256
                else:  # no file: nothing measured reads it
                    size, digest = sample_size, hashlib.sha256(uid.encode()).hexdigest()
                yield (pk, uid, series_pk, sop_class, i + 1, syntax,
                       instance["number_of_frames"], instance["rows"], instance["columns"],
                       instance["bits_allocated"], key, size, digest, "clinical",
                       "STORESCU", received)

    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        _copy(cur, "patients", ("pk", "patient_id", "issuer", "name", "name_norm",
                                "birth_date", "sex", "attrs", "created_at"), iter(patients))
        study_columns = tuple(header_from_dataset(cat.instance_dataset(0, 0, 0),
                                                  cat.ExplicitVRLittleEndian).study)
        series_columns = tuple(header_from_dataset(cat.instance_dataset(0, 0, 0),
                                                   cat.ExplicitVRLittleEndian).series)
        _copy(cur, "studies", ("pk", "study_uid", "patient_pk", "modalities", "num_series",
                               "num_instances", "attrs", "created_at", "updated_at",
                               *study_columns), iter(study_rows))
        _copy(cur, "series", ("pk", "series_uid", "study_pk", "num_instances", "attrs",
                              "created_at", *series_columns), iter(series_rows))
        count = _copy(cur, "instances", (
            "pk", "sop_uid", "series_pk", "sop_class_uid", "instance_number",
            "transfer_syntax", "number_of_frames", "rows", "columns", "bits_allocated",
            "blob_key", "size", "sha256", "retention_class", "received_from", "received_at"),
            instance_rows())
        for table in ("patients", "studies", "series", "instances"):
            cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'pk'), "
                        f"(SELECT max(pk) FROM {table}))")
        conn.commit()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return {"instances": count, "patients": len(patients), "headers_s": headers_s,
            "total_s": time.perf_counter() - started}


# -- queries ---------------------------------------------------------------------------------

KINDS = ("patient name prefix", "patient ID", "study date range", "modality + date range",
         "study UID", "series of a study", "instances of a series", "instances of a study")


def queries(studies: int, rounds: int, shape: cat.Shape,
            with_files: list[int]) -> list[tuple[str, str]]:
    """(kind, path below the DICOMweb root) for ``rounds`` rounds over the studies."""
    out = []
    for r in range(rounds):
        s = (r * 7919 + 13) % studies
        surname = cat.patient_name(cat.patient_of(s)).split("^")[0]
        date = cat.study_date(s)
        month = f"{date[:6]}01-{date[:6]}28"
        modality = cat.modality_of(s)[0]
        f = with_files[r % len(with_files)]
        out += [
            ("patient name prefix", f"studies?PatientName={surname[:3]}*&limit=25"),
            ("patient ID", f"studies?PatientID={cat.patient_id(cat.patient_of(s))}"),
            ("study date range", f"studies?StudyDate={month}&limit=25"),
            ("modality + date range",
             f"studies?ModalitiesInStudy={modality}&StudyDate={month}&limit=25"),
            ("study UID", f"studies?StudyInstanceUID={cat.study_uid(s)}"),
            ("series of a study", f"studies/{cat.study_uid(s)}/series"),
            ("instances of a series", f"studies/{cat.study_uid(f)}/series/"
                                      f"{cat.series_uid(f, r % shape.series)}/instances"),
            ("instances of a study", f"studies/{cat.study_uid(f)}/instances?limit=20"),
        ]
    return out


def files_sample(studies: int, count: int) -> list[int]:
    """The studies whose instances get real files (instance-level queries ask for them)."""
    step = max(1, studies // count)
    return list(range(7, studies, step))[:count]


FLOOR = "no query (floor)"


def cpu_and_wait(pid: int, reaped: bool = True) -> tuple[float, float]:
    """Seconds of CPU used so far, and seconds spent runnable but waiting for a CPU (the
    scheduler's run-queue delay), by every thread of ``pid`` and its live descendants; the
    CPU includes the children ``pid`` has already reaped (PostgreSQL's ended connections),
    whose waits are not known."""
    cpu = wait = 0.0
    if reaped:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu += (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            ran, waited, _ = (task / "schedstat").read_text().split()
        except (OSError, ValueError):
            continue
        cpu += int(ran) / 1e9
        wait += int(waited) / 1e9
    for child in child_pids(pid):
        more = cpu_and_wait(child, reaped=False)
        cpu, wait = cpu + more[0], wait + more[1]
    return cpu, wait


class Usage:
    """CPU and run-queue wait of the server and of PostgreSQL over a stretch of requests."""

    def __init__(self, server_pid: int, postgres: ThrowawayPostgres) -> None:
        self.pids = {"server": server_pid, "postgres": int(
            (postgres.base / "data" / "postmaster.pid").read_text().split()[0])}
        self.start = {name: cpu_and_wait(pid) for name, pid in self.pids.items()}

    def per_request(self, requests: int) -> dict[str, float]:
        """Milliseconds per request since this was made: ``server_cpu``, ``server_wait``,
        ``postgres_cpu``, ``postgres_wait``."""
        out = {}
        for name, pid in self.pids.items():
            cpu, wait = cpu_and_wait(pid)
            out[f"{name}_cpu"] = (cpu - self.start[name][0]) * 1000 / requests
            out[f"{name}_wait"] = (wait - self.start[name][1]) * 1000 / requests
        return out


def latencies(client: httpx.Client, base: str, plan: list[tuple[str, str]],
              warmup: int, floor: str) -> dict[str, dict[str, float]]:
    """Single-client latency per kind: p50 and p95 in ms (the first ``warmup`` rounds are
    not counted). Once a round the server's cheapest answer (``floor``: no query, no
    database) is timed too: on a shared machine it shows what the machine adds."""
    times: dict[str, list[float]] = {k: [] for k in (*KINDS, FLOOR)}
    empty: dict[str, int] = {k: 0 for k in KINDS}
    rounds = [*plan]
    plan = []
    for n, query in enumerate(rounds):
        plan.append(query)
        if n % len(KINDS) == len(KINDS) - 1:
            plan.append((FLOOR, floor))
    for n, (kind, path) in enumerate(plan):
        started = time.perf_counter()
        if kind == FLOOR:
            response = client.get(path)
            elapsed = (time.perf_counter() - started) * 1000
            response.raise_for_status()
            if n >= warmup * (len(KINDS) + 1):
                times[kind].append(elapsed)
            continue
        response = client.get(f"{base}/{path}", headers={"Accept": "application/dicom+json"})
        elapsed = (time.perf_counter() - started) * 1000
        if response.status_code not in (200, 204):
            raise RuntimeError(f"{path}: {response.status_code} {response.text[:300]}")
        if response.status_code == 204 or not response.json():
            empty[kind] += 1
        if n >= warmup * (len(KINDS) + 1):
            times[kind].append(elapsed)
    result = {}
    everything = sorted(t for k, v in times.items() if k != FLOOR for t in v)
    for kind, values in [*times.items(), ("all", everything)]:
        values.sort()
        result[kind] = {"p50": statistics.median(values),
                        "p95": values[max(0, int(len(values) * 0.95) - 1)],
                        "n": len(values), "empty": empty.get(kind, 0)}
    return result


def _comparable(answer: list[dict[str, Any]]) -> list[str]:
    """The answer without Retrieve URLs (host and port differ), in a fixed order (the index
    order is the order of arrival)."""
    return sorted(json.dumps({k: v for k, v in item.items() if k != "00081190"},
                             sort_keys=True) for item in answer)


def compare_answers(bulk: RunningServer, real: RunningServer, plan: list[tuple[str, str]]
                    ) -> int:
    """Ask both servers the same queries; raise if an answer differs. Returns how many
    were compared."""
    compared = 0
    with bulk.http() as a, real.http() as b:
        for _kind, path in plan:
            one, two = a.get(f"/dicomweb/{path}"), b.get(f"/dicomweb/{path}")
            if one.status_code != two.status_code:
                raise RuntimeError(f"{path}: {one.status_code} vs {two.status_code}")
            if one.status_code == 200 and _comparable(one.json()) != _comparable(two.json()):
                raise RuntimeError(f"bulk-loaded and ingested answers differ for {path}:\n"
                                   f"{one.text[:1500]}\n{two.text[:1500]}")
            compared += 1
    return compared


# -- servers ---------------------------------------------------------------------------------


def start_imageshare(folder: Path, env: dict[str, str]) -> RunningServer:
    for attempt in (1, 2):  # a start can time out on a busy shared machine
        server = RunningServer(folder / "data", extra_env=env)
        try:
            return server.start()
        except TimeoutError:
            server.stop()
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def service_token(server: RunningServer) -> str:
    """An API token of a machine account (role service), as a PACS or viewer would hold."""
    added = server.cli("user", "add", SERVICE, "--role", "service", "--password",
                       "bench-service-password-1", check=False)
    if added.returncode != 0 and "exists" not in (added.stdout + added.stderr).lower():
        raise RuntimeError(added.stdout + added.stderr)
    return server.cli("user", "token", SERVICE, "--name", "bench").stdout.strip().splitlines()[-1]


class PostgresOrthanc(OrthancServer):
    """Debian's Orthanc with its PostgreSQL index and DICOMweb plugins, HTTP Basic on."""

    def start_with(self, postgres: ThrowawayPostgres, database: str) -> PostgresOrthanc:
        """Start on ``database`` of ``postgres`` (made when missing)."""
        with __import__("psycopg").connect(
                f"host=127.0.0.1 port={postgres.port} user=postgres dbname=postgres",
                autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                (database,)).fetchone():
                conn.execute(f'CREATE DATABASE "{database}"')
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "orthanc-bench", "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"), "HttpPort": self.http_port,
            "DicomPort": self.dicom_port, "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
            "RegisteredUsers": {ORTHANC_USER[0]: ORTHANC_USER[1]},
            "Plugins": [DICOMWEB_PLUGIN, POSTGRES_PLUGIN], "DicomCheckCalledAet": False,
            "HttpThreadsCount": 50, "HttpTimeout": 60,
            "PostgreSQL": {"EnableIndex": True, "EnableStorage": False, "Host": "127.0.0.1",
                           "Port": postgres.port, "Database": database,
                           "Username": "postgres", "Password": "", "Lock": False},
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config))
        log = open(self.folder / "orthanc.log", "a")  # noqa: SIM115 - the process keeps it
        self.process = subprocess.Popen([shutil.which("Orthanc") or "Orthanc", str(path)],
                                        stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError((self.folder / "orthanc.log").read_text()[-2000:])
            try:
                if httpx.get(self.url + "/system", auth=ORTHANC_USER,
                             timeout=1).status_code == 200:
                    wait_for_port(self.dicom_port)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError("Orthanc did not start")

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, auth=ORTHANC_USER)


# -- concurrent clients ----------------------------------------------------------------------


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, int, bool]:
    """The status, the body's size, and whether the server closes the connection after it
    (``Connection: close``)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    closes = headers.get("connection", "").lower() == "close"
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
        return status, len(body), closes
    size = 0
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            length = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            size += length
            await reader.readexactly(length + 2)
            if length == 0:
                return status, size, closes
    raise RuntimeError("a response without a length")


async def _client(port: int, paths: list[str], authorization: str, start: int,
                  seconds: float, warmup: float, results: list[float], errors: list[str],
                  warmups: list[float], reconnects: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    began = time.perf_counter()
    n, reconnect = start, False
    try:
        while True:
            now = time.perf_counter()
            if now - began > warmup + seconds:
                return
            if reconnect:  # as a browser does (the next request's time includes it)
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                reconnects.append(1)
            path = paths[n % len(paths)]
            n += 1
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                         f"Accept: application/dicom+json\r\nAuthorization: {authorization}\r\n"
                         "\r\n".encode())
            await writer.drain()
            status, _size, closes = await _read_response(reader)
            done = time.perf_counter()
            reconnect = closes
            if status != 200:
                errors.append(f"{status} {path}")
            elif now - began >= warmup:
                results.append((done - now) * 1000)
            else:
                warmups.append(done)
    finally:
        writer.close()


def throughput(port: int, paths: list[str], authorization: str, clients: int,
               seconds: float, warmup: float = 3.0) -> dict[str, float]:
    """``clients`` keep-alive connections asking ``paths`` round robin for ``seconds`` (after
    ``warmup``): requests/s, p50 and p95 ms, errors."""
    results: list[float] = []
    errors: list[str] = []
    warmups: list[float] = []
    reconnects: list[int] = []

    async def run() -> None:
        await asyncio.gather(*(
            _client(port, paths, authorization, i * 7, seconds, warmup, results, errors,
                    warmups, reconnects)
            for i in range(clients)))

    asyncio.run(run())
    results.sort()
    return {"requests_per_s": len(results) / seconds, "p50": statistics.median(results),
            "p95": results[int(len(results) * 0.95) - 1], "requests": len(results),
            "warmup_requests": len(warmups) + len(errors),
            "errors": len(errors), "first_errors": errors[:3],
            "reconnects": len(reconnects)}


# -- the rounds ------------------------------------------------------------------------------


def print_latency_table(title: str, columns: dict[str, dict[str, dict[str, float]]]) -> None:
    names = list(columns)
    print(f"\n{title}")
    header = " | ".join(f"{n} p50 | {n} p95" for n in names)
    print(f"| query | {header} |" + (" p95 ratio (Orthanc / ImageShare) |"
                                      if len(names) == 2 else ""))
    print("|---|" + "---:|" * (2 * len(names) + (1 if len(names) == 2 else 0)))
    for kind in (*KINDS, "all", FLOOR):
        cells = " | ".join(f"{columns[n][kind]['p50']:.1f} | {columns[n][kind]['p95']:.1f}"
                           for n in names)
        ratio = ""
        if len(names) == 2:
            ratio = f" x{columns[names[1]][kind]['p95'] / columns[names[0]][kind]['p95']:.2f} |"
        print(f"| {kind} | {cells} |{ratio}")


def qido_million(work: Path, postgres: ThrowawayPostgres, instances: int, shape: cat.Shape,
                 rounds: int) -> tuple[dict[str, Any], RunningServer]:
    studies = instances // shape.per_study
    with_files = files_sample(studies, 60)
    loaded: dict[str, Any] | None = None
    if isinstance(postgres, KeptPostgres):  # loaded once, measured again and again
        folder = postgres.base / f"is-million-{instances}"
        url, existed = postgres.database(f"million{instances}")
        record = folder / "loaded.json"
        if existed and record.exists():
            loaded = {**json.loads(record.read_text()), "reused": True}
            from imageshare.storage.index.database import make_engine, migrate

            engine = make_engine(url)
            migrate(engine)  # migrations added since it was loaded
            engine.dispose()
            print(f"reusing the bulk-loaded index of {loaded['instances']:,} instances",
                  flush=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)
            if existed:
                with __import__("psycopg").connect(
                        f"host=127.0.0.1 port={postgres.port} user=postgres dbname=postgres",
                        autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE "million{instances}" WITH (FORCE)')
                url, _ = postgres.database(f"million{instances}")
    else:
        folder = work / "is-million"
        shutil.rmtree(folder, ignore_errors=True)
        url = postgres.new_database()
    if loaded is None:
        (folder / "data").mkdir(parents=True)
        print(f"bulk-loading {studies * shape.per_study:,} instances ({studies:,} studies) "
              "into ImageShare's index", flush=True)
        loaded = bulk_load(url, studies, shape, folder / "data" / "blobs", set(with_files))
        print(f"  loaded in {loaded['total_s']:.0f} s ({loaded['patients']:,} patients)",
              flush=True)
        (folder / "loaded.json").write_text(json.dumps(loaded))
    server = start_imageshare(folder, {"IMAGESHARE_DATABASE_URL": url})
    token = service_token(server)
    plan = queries(studies, rounds, shape, with_files)
    with httpx.Client(base_url=server.url, timeout=120,
                      headers={"Authorization": f"Bearer {token}"}) as client:
        usage = Usage(server.process.pid, postgres)  # type: ignore[union-attr]
        measured = latencies(client, "/dicomweb", plan, warmup=5, floor="/healthz")
        cost = usage.per_request(len(plan) + len(plan) // len(KINDS))
    print_latency_table(f"QIDO-RS at {loaded['instances']:,} instances on PostgreSQL, "
                        "one client (ms)", {"ImageShare": measured})
    print("per request, all kinds and the floor (ms): ImageShare CPU "
          f"{cost['server_cpu']:.2f}, waiting for a CPU {cost['server_wait']:.2f}; "
          f"PostgreSQL CPU {cost['postgres_cpu']:.2f}, waiting for a CPU "
          f"{cost['postgres_wait']:.2f}")
    return {"loaded": loaded, "studies": studies, "with_files": with_files,
            "latency_ms": measured, "per_request_ms": cost,
            "target_p95_ms": TARGET_P95_MS, "met": measured["all"]["p95"] <= TARGET_P95_MS,
            "worst_kind_p95_ms": max(v["p95"] for k, v in measured.items()
                                     if k not in ("all", FLOOR))
            }, server


def load_equal(work: Path, postgres: ThrowawayPostgres, instances: int, shape: cat.Shape
               ) -> tuple[RunningServer, OrthancServer, dict[str, Any]]:
    """ImageShare and Orthanc (PostgreSQL index) holding the same ``instances`` real files."""
    studies = instances // shape.per_study
    data = work / f"files-{studies}"
    if not data.exists():
        print(f"writing {studies * shape.per_study:,} instances as files", flush=True)
        partial = work / "files-partial"
        shutil.rmtree(partial, ignore_errors=True)
        for s in range(studies):
            cat.write_study(partial, s, shape)
        partial.rename(data)
    files = sorted(data.rglob("*.dcm"))
    facts: dict[str, Any] = {"instances": len(files), "studies": studies}
    kept = isinstance(postgres, KeptPostgres)
    if kept:  # both loaded once and measured again on later runs
        folder = postgres.base / f"is-equal-{instances}"
        url, existed = postgres.database(f"equal{instances}")
        reused = existed and (folder / "loaded.json").exists()
        orthanc_db, orthanc_folder = f"orthanc_equal{instances}", postgres.base / (
            f"orthanc-equal-{instances}")
    else:
        folder, url, reused = work / "is-equal", postgres.new_database(), False
        orthanc_db, orthanc_folder = "orthanc_equal", work / "orthanc-equal"
    if not reused:
        shutil.rmtree(folder, ignore_errors=True)
    server = start_imageshare(folder, {"IMAGESHARE_DATABASE_URL": url})
    if reused:
        _orthanc_database(postgres, orthanc_db, wait_for_flush=True)  # as it is measured
        orthanc = PostgresOrthanc(orthanc_folder).start_with(postgres, orthanc_db)
        with orthanc.http() as client:
            held = client.get("/statistics").json()["CountInstances"]
        if held == len(files):
            print(f"reusing ImageShare and Orthanc loaded with {len(files):,} instances",
                  flush=True)
            return server, orthanc, {**facts, **json.loads((folder / "loaded.json").read_text()),
                                     "reused": True}
        raise RuntimeError(f"the kept Orthanc holds {held} of {len(files)} instances: remove "
                           f"{orthanc_folder} and {folder} to load both again")
    # Orthanc's index database commits without waiting for its WAL flush while it loads
    # (loading is not what is measured; it is restarted with the default before queries).
    _orthanc_database(postgres, orthanc_db, wait_for_flush=False)
    orthanc = PostgresOrthanc(orthanc_folder).start_with(postgres, orthanc_db)

    def imageshare_import() -> float:
        started = time.perf_counter()
        load = server.cli("import", "--quiet", str(data), timeout=None)  # a large load
        if "refused:" in load.stdout:
            raise RuntimeError(load.stdout[-500:])
        return time.perf_counter() - started

    def orthanc_cstore() -> float:
        return storescu(orthanc.dicom_port, "ORTHANC", files, 4)

    with _parallel() as pool:  # both load at once
        ours, theirs = pool.submit(imageshare_import), pool.submit(orthanc_cstore)
        facts["imageshare_import_s"], facts["orthanc_cstore_s"] = ours.result(), theirs.result()
    orthanc.stop()
    _orthanc_database(postgres, orthanc_db, wait_for_flush=True)
    orthanc = PostgresOrthanc(orthanc_folder).start_with(postgres, orthanc_db)
    print(f"  ImageShare imported {len(files):,} in {facts['imageshare_import_s']:.0f} s; "
          f"Orthanc received them by C-STORE (4 associations) in "
          f"{facts['orthanc_cstore_s']:.0f} s", flush=True)
    with orthanc.http() as client:
        held = client.get("/statistics").json()["CountInstances"]
    if held != len(files):
        raise RuntimeError(f"Orthanc holds {held} of {len(files)} instances")
    (folder / "loaded.json").write_text(json.dumps(
        {k: facts[k] for k in ("imageshare_import_s", "orthanc_cstore_s")}))
    return server, orthanc, facts


def _orthanc_database(postgres: ThrowawayPostgres, database: str, wait_for_flush: bool
                      ) -> None:
    """Make ``database`` if missing; its commits wait for the WAL flush or not."""
    import psycopg

    with psycopg.connect(f"host=127.0.0.1 port={postgres.port} user=postgres dbname=postgres",
                         autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                            (database,)).fetchone():
            conn.execute(f'CREATE DATABASE "{database}"')
        setting = "RESET synchronous_commit" if wait_for_flush else "SET synchronous_commit = off"
        conn.execute(f'ALTER DATABASE "{database}" {setting}')


def qido_equal(server: RunningServer, orthanc: OrthancServer, facts: dict[str, Any],
               shape: cat.Shape, rounds: int, million: RunningServer | None,
               million_files: list[int]) -> dict[str, Any]:
    studies = facts["studies"]
    with_files = list(range(studies))
    plan = queries(studies, rounds, shape, with_files)
    if million is not None:  # the bulk-loaded index answers like real ingest
        both = [f for f in million_files if f < studies]  # files in both blob stores
        sample = [q for q in queries(studies, 20, shape, both)
                  if q[0] in ("patient ID", "study UID", "series of a study",
                              "instances of a series")]  # no limit: the order may differ
        facts["answers_compared"] = compare_answers(million, server, sample)
        print(f"  bulk-loaded and ingested ImageShare answer {facts['answers_compared']} "
              "queries alike", flush=True)
    token = service_token(server)
    with httpx.Client(base_url=server.url, timeout=120,
                      headers={"Authorization": f"Bearer {token}"}) as client:
        ours = latencies(client, "/dicomweb", plan, warmup=5, floor="/healthz")
    with orthanc.http() as client:
        theirs = latencies(client, "/dicom-web", plan, warmup=5, floor="/system")
    print_latency_table(f"QIDO-RS at {facts['instances']:,} instances, same files, both on "
                        "PostgreSQL, one client (ms)",
                        {"ImageShare": ours, "Orthanc": theirs})
    return {**facts, "token": token, "latency_ms": {"imageshare": ours, "orthanc": theirs}}


def throughput_round(server: RunningServer, orthanc: OrthancServer, equal: dict[str, Any],
                     shape: cat.Shape, clients: int, seconds: float,
                     postgres: ThrowawayPostgres) -> dict[str, Any]:
    studies = equal["studies"]
    plan = queries(studies, 400, shape, list(range(studies)))
    usage = Usage(server.process.pid, postgres)  # type: ignore[union-attr]
    ours = throughput(server.http_port, [f"/dicomweb/{p}" for _k, p in plan],
                      f"Bearer {equal['token']}", clients, seconds)
    ours["per_request_ms"] = usage.per_request(ours["requests"] + ours["warmup_requests"])
    import base64

    basic = base64.b64encode(":".join(ORTHANC_USER).encode()).decode()
    usage = Usage(orthanc.process.pid, postgres)  # type: ignore[union-attr]
    theirs = throughput(orthanc.http_port, [f"/dicom-web/{p}" for _k, p in plan],
                        f"Basic {basic}", clients, seconds)
    theirs["per_request_ms"] = usage.per_request(theirs["requests"] + theirs["warmup_requests"])
    print(f"\nQIDO-RS throughput, {clients} concurrent clients, mixed queries, "
          f"{equal['instances']:,} instances, {seconds:.0f} s each")
    print("| server | auth | requests/s | p50 ms | p95 ms | errors | server CPU ms/request | "
          "PostgreSQL CPU ms/request |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, auth, row in (("ImageShare", "API token (bearer)", ours),
                            ("Orthanc", "HTTP Basic", theirs)):
        print(f"| {name} | {auth} | {row['requests_per_s']:.1f} | {row['p50']:.1f} | "
              f"{row['p95']:.1f} | {row['errors']} | {row['per_request_ms']['server_cpu']:.2f} | "
              f"{row['per_request_ms']['postgres_cpu']:.2f} |")
    rate = ours["requests_per_s"] / theirs["requests_per_s"]
    print(f"ratio (ImageShare / Orthanc): requests/s x{rate:.2f}, "
          f"p95 x{theirs['p95'] / ours['p95']:.2f} (Orthanc's p95 / ImageShare's)")
    return {"clients": clients, "seconds": seconds, "imageshare": ours, "orthanc": theirs}


def send(port: int, ae: str, files: list[Path], associations: int) -> float:
    """Seconds to send ``files`` with ``associations`` storescu processes at once; raises
    with storescu's own words when one fails."""
    chunks = [files[i::associations] for i in range(associations)]
    started = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aec", ae, "127.0.0.1", str(port),
                               *map(str, chunk)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for chunk in chunks]
    failures = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"storescu exit {proc.returncode}: {out.decode()[-800:]}")
    if failures:
        raise RuntimeError("\n".join(failures))
    return time.perf_counter() - started


def _server_errors(server: RunningServer) -> list[str]:
    text = server.log_path.read_text() if server.log_path and server.log_path.exists() else ""
    return [line for line in text.splitlines()
            if "ERROR" in line or "Traceback" in line or "failed" in line.lower()]


def instances_round(work: Path, postgres: ThrowawayPostgres, count: int, associations: int,
                    repeats: int) -> dict[str, Any]:
    """One instance against two on one database and one blob folder, same C-STORE load."""
    ct_dir = work / f"ct-{count}"
    files = sorted(ct_dir.glob("*.dcm")) or ct_series(ct_dir, count=count, size=512,
                                                      patient_id="BENCHCT")
    from pydicom import dcmread

    study = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    runs: dict[str, list[float]] = {"one": [], "two": []}
    per_instance: list[list[int]] = []
    errors: list[str] = []
    failures: list[dict[str, Any]] = []
    for repeat in range(repeats):
        for setup in ("one", "two"):
            folder = work / f"instances-{setup}-{repeat}"
            shutil.rmtree(folder, ignore_errors=True)
            env = {"IMAGESHARE_DATABASE_URL": postgres.new_database(),
                   "IMAGESHARE_STORAGE_URL": (folder / "blobs").resolve().as_uri(),
                   "IMAGESHARE_SECRET_KEY": SECRET_KEY}
            servers = []
            try:
                for n in range(1 if setup == "one" else 2):
                    servers.append(start_imageshare(folder / f"node{n}", env))
                if setup == "one":
                    seconds = send(servers[0].dicom_port, servers[0].ae_title, files,
                                   associations)
                else:
                    halves = [files[0::2], files[1::2]]
                    started = time.perf_counter()
                    with _parallel() as pool:
                        done = [pool.submit(send, srv.dicom_port, srv.ae_title, half,
                                            associations // 2)
                                for srv, half in zip(servers, halves, strict=True)]
                        for future in done:
                            future.result()
                    seconds = time.perf_counter() - started
                with servers[-1].http() as http:
                    found = http.get(f"/dicomweb/studies/{study}/instances",
                                     params={"limit": count + 10}).json()
                uids = [i["00080018"]["Value"][0] for i in found]
                if len(uids) != len(files) or len(set(uids)) != len(files):
                    raise RuntimeError(f"{setup}: {len(set(uids))} of {len(files)} indexed")
                if setup == "two":
                    with servers[0].http() as http:
                        seen = http.get("/dicomweb/studies",
                                        params={"StudyInstanceUID": study}).json()
                    per_instance.append([len(h) for h in halves])
                    if seen[0]["00201208"]["Value"][0] != len(files):
                        raise RuntimeError("the first instance does not see every instance")
                blobs = [p for p in (folder / "blobs").rglob("*") if p.is_file()
                         and ".tmp" not in p.parts]
                if len(blobs) != len(files):
                    raise RuntimeError(f"{setup}: {len(blobs)} blobs for {len(files)} files")
                runs[setup].append(seconds)  # a clean send
            except RuntimeError as exc:  # a refused store or a missing instance: kept, shown
                reasons = _failed_events(env["IMAGESHARE_DATABASE_URL"])
                failures.append({"setup": setup, "repeat": repeat, "error": str(exc)[-800:],
                                 "failed_audit_events": reasons})
                print(f"  {setup} instance(s), repeat {repeat}: FAILED: {str(exc)[-300:]}; "
                      f"failed events in the audit trail: {reasons}", flush=True)
            finally:
                for server in servers:
                    errors += _server_errors(server)
                    server.stop()
            shutil.rmtree(folder, ignore_errors=True)
    rates = {k: len(files) / statistics.median(v) if v else float("nan")
             for k, v in runs.items()}
    result = {"instances": len(files), "megabytes": sum(p.stat().st_size for p in files) / 1e6,
              "associations": associations, "repeats": repeats, "runs_s": runs,
              "one_inst_s": rates["one"], "two_inst_s": rates["two"],
              "ratio": rates["two"] / rates["one"], "server_errors": errors[:20],
              "failed_sends": failures}
    failed = {k: sum(f["setup"] == k for f in failures) for k in runs}
    print(f"\nCost of a second instance: {len(files)} CT slices of 512 KB into one study by "
          f"C-STORE, {associations} associations in all, median of the clean sends of "
          f"{repeats}")
    print("| set-up | inst/s | two / one | failed sends | errors in logs |")
    print("|---|---:|---:|---:|---:|")
    print(f"| one instance | {rates['one']:.1f} | | {failed['one']} of {repeats} | |")
    print(f"| two instances, one PostgreSQL, one blob folder | {rates['two']:.1f} | "
          f"x{result['ratio']:.2f} | {failed['two']} of {repeats} | {len(errors)} |")
    return result


def _failed_events(url: str) -> list[str]:
    """Action and reason of every failed event in the audit trail of the index at ``url``."""
    import psycopg

    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT action, outcome, detail FROM audit_events "
                            "WHERE outcome <> 'success' ORDER BY pk").fetchall()
    return [f"{action} {outcome}: {detail[:300]}" for action, outcome, detail in rows]


def _parallel() -> Any:
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=2)


def _log_slow_statements(postgres: ThrowawayPostgres, milliseconds: int) -> None:
    """PostgreSQL logs every statement slower than ``milliseconds`` (kept beside the JSON)."""
    import psycopg

    with psycopg.connect(f"host=127.0.0.1 port={postgres.port} user=postgres dbname=postgres",
                         autocommit=True) as conn:
        conn.execute(f"ALTER SYSTEM SET log_min_duration_statement = {int(milliseconds)}")
        conn.execute("SELECT pg_reload_conf()")


def _load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--instances", type=int, default=None)
    parser.add_argument("--equal-instances", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="query rounds per kind")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--only", default="", help="comma list: qido,equal,throughput,instances")
    parser.add_argument("--work", type=Path, default=OUT / "scale-work")
    parser.add_argument("--keep-work", action="store_true", help="keep the generated files")
    parser.add_argument("--out", type=Path, default=OUT / "scale.json")
    parser.add_argument("--postgres", type=Path, default=None,
                        help="keep the PostgreSQL cluster (and the bulk-loaded million) here")
    args = parser.parse_args()
    for tool in ("storescu", "Orthanc"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed: apt-get install dcmtk orthanc "
                             "orthanc-dicomweb orthanc-postgresql postgresql")
    if not Path(POSTGRES_PLUGIN).exists():
        raise SystemExit("Orthanc's PostgreSQL plugin is needed: apt-get install "
                         "orthanc-postgresql")
    shape = cat.Shape()
    instances = args.instances or (20_000 if args.quick else 1_000_000)
    equal = args.equal_instances or (2_000 if args.quick else 50_000)
    rounds = args.rounds or (15 if args.quick else 60)
    seconds = args.seconds or (5.0 if args.quick else 30.0)
    only = set(filter(None, args.only.split(","))) or {"qido", "equal", "throughput",
                                                      "instances"}
    OUT.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    args.work.chmod(0o755)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(["python", *sys.argv]),
        "cores": os.cpu_count(), "load_average_start": _load_average()}
    print(f"Scale benchmarks {results['date']} on {os.cpu_count()} cores, load average "
          f"{results['load_average_start']}", flush=True)
    postgres = KeptPostgres(args.postgres) if args.postgres else ThrowawayPostgres()
    _log_slow_statements(postgres, 20)
    million = server = orthanc = None
    try:
        if "qido" in only:
            results["qido_million"], million = qido_million(
                args.work, postgres, instances, shape, rounds)
        if {"equal", "throughput"} & only:
            server, orthanc, facts = load_equal(args.work, postgres, equal, shape)
            results["qido_equal"] = qido_equal(
                server, orthanc, facts, shape, rounds, million,
                results.get("qido_million", {}).get("with_files", []))
            if million is not None:
                million.stop()
                million = None
            if "throughput" in only:
                results["throughput"] = throughput_round(server, orthanc, results["qido_equal"],
                                                         shape, args.clients, seconds, postgres)
            results["qido_equal"].pop("token", None)
        for running in (million, server, orthanc):
            if running is not None:
                running.stop()
        million = server = orthanc = None
        if "instances" in only:
            count = 100 if args.quick else 500
            results["second_instance"] = instances_round(args.work, postgres, count, 4,
                                                         1 if args.quick else 3)
    finally:
        for running in (million, server, orthanc):
            if running is not None:
                running.stop()
        slow = OUT / "scale-slow-statements.log"
        shutil.copyfile(postgres.base / "data" / "server.log", slow)
        postgres.stop()
        if not args.keep_work:
            shutil.rmtree(args.work, ignore_errors=True)
    results["load_average_end"] = _load_average()
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nload average at the end {results['load_average_end']}; written {args.out}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the servers on the way out
    main()
