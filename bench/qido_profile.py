"""Where a QIDO-RS request's server time goes, on the bulk-loaded million of ``bench/scale.py``.

One command, after ``python bench/scale.py --only qido --postgres DIR`` has loaded and kept
the index in DIR: ``python bench/qido_profile.py --postgres DIR``. It builds the application
in this process (no HTTP server, no sockets: FastAPI's test client) on that index and asks
the same queries as the scale benchmark with a service account's API token, timing each
part of every request:

- ``token``: the API token look-up (``UserDirectory.authenticate_token``);
- ``find``: the search's SQL and the building of the matches (``QueryService`` reads);
- ``audit``: writing the search's audit event and its commit (``AuditTrail.record``);
- ``json``: rendering the answer (``_dicom_answer``);
- ``rest``: everything else in the request (routing, dependencies, policy, thread hops);
- ``(pings)`` and ``(commit)``: the pool's liveness pings and the COMMIT, wherever they
  happen (inside the stages above, or, for a commit after the audit, apart from ``rest``).

It also counts, per request, the statements sent (SQLAlchemy's cursor executions), the
liveness pings of the pool, pool check-outs and commits; with ``--log-statements`` the
PostgreSQL server itself logs every statement of one request of each kind (the ground truth
for round trips: BEGIN, ROLLBACK and pings included), printed below the table.

    --postgres DIR       the kept cluster (required)
    --instances N        which bulk-loaded index (default 1,000,000)
    --rounds N           query rounds per kind (default 30)
    --log-statements     also print what the server received for one request of each kind
    --cprofile N         also print the N functions of the server's threads (event loop and
                         thread pool, not the client's) with the most own CPU time (cProfile
                         on each thread's CPU clock)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import catalogue as cat  # noqa: E402
from bench.scale import KINDS, KeptPostgres, files_sample, queries  # noqa: E402

STAGES = ("token", "find", "audit", "json")


class Probe:
    """Per-request timings of the stages and counts of database work."""

    def __init__(self) -> None:
        self.times: dict[str, float] = defaultdict(float)
        self.counts: Counter[str] = Counter()
        self.active = 0

    def reset(self) -> None:
        """Start a new request."""
        self.times = defaultdict(float)
        self.counts = Counter()

    def wrap(self, stage: str, function: Callable[..., Any]) -> Callable[..., Any]:
        """``function`` timed into ``stage``."""
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            self.active += 1
            try:
                return function(*args, **kwargs)
            finally:
                self.active -= 1
                self.times[stage] += (time.perf_counter() - started) * 1000
        return timed


def instrument(archive: Any, probe: Probe) -> None:
    """Time the stages and count the database work of every request on ``archive``."""
    from sqlalchemy import event

    from imageshare.web import dicomweb

    archive.users.authenticate_token = probe.wrap("token", archive.users.authenticate_token)
    archive.query._find = probe.wrap("find", archive.query._find)
    archive.audit.record = probe.wrap("audit", archive.audit.record)
    dicomweb._dicom_answer = probe.wrap("json", dicomweb._dicom_answer)
    engine = archive.engine
    dialect = engine.dialect
    ping = dialect.do_ping

    def counted_ping(dbapi_connection: Any) -> Any:
        probe.counts["pings"] += 1
        started = time.perf_counter()
        try:
            return ping(dbapi_connection)
        finally:
            probe.times["(pings)"] += (time.perf_counter() - started) * 1000

    dialect.do_ping = counted_ping  # type: ignore[method-assign]
    commit = dialect.do_commit

    def timed_commit(dbapi_connection: Any) -> Any:
        started = time.perf_counter()
        try:
            return commit(dbapi_connection)
        finally:
            took = (time.perf_counter() - started) * 1000
            probe.times["(commit)"] += took
            if not probe.active:  # not inside a timed stage: counted apart from "rest"
                probe.times["commit outside"] += took

    dialect.do_commit = timed_commit  # type: ignore[method-assign]

    @event.listens_for(engine, "before_cursor_execute")
    def _statement(*_args: Any) -> None:
        probe.counts["statements"] += 1

    @event.listens_for(engine, "commit")
    def _commit(*_args: Any) -> None:
        probe.counts["commits"] += 1

    @event.listens_for(engine.pool, "checkout")
    def _checkout(*_args: Any) -> None:
        probe.counts["checkouts"] += 1


def _server_log(postgres: KeptPostgres) -> Path:
    return postgres.base / "data" / "server.log"


def _set(postgres: KeptPostgres, setting: str, value: str | None) -> None:
    import psycopg

    with psycopg.connect(f"host=127.0.0.1 port={postgres.port} user=postgres dbname=postgres",
                         autocommit=True) as conn:
        if value is None:
            conn.execute(f"ALTER SYSTEM RESET {setting}")
        else:
            conn.execute(f"ALTER SYSTEM SET {setting} = '{value}'")
        conn.execute("SELECT pg_reload_conf()")
    time.sleep(0.3)


def statements_of(postgres: KeptPostgres, client: Any,
                  plan: list[tuple[str, str]]) -> dict[str, list[str]]:
    """What the server received for one request of each kind (log_statement = all)."""
    log = _server_log(postgres)
    _set(postgres, "log_statement", "all")
    out: dict[str, list[str]] = {}
    try:
        for kind, path in plan[:len(KINDS)]:
            client.get(f"/dicomweb/{path}")  # warm: a first request may check a token's use
            start = log.stat().st_size
            client.get(f"/dicomweb/{path}")
            time.sleep(0.2)
            with open(log, "rb") as fh:
                fh.seek(start)
                text = fh.read().decode(errors="replace")
            out[kind] = [line.split("  ", 1)[1][:120] for line in text.splitlines()
                         if "LOG:  statement: " in line or "LOG:  execute " in line]
    finally:
        _set(postgres, "log_statement", None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", type=Path, required=True)
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--log-statements", action="store_true")
    parser.add_argument("--cprofile", type=int, default=0)
    args = parser.parse_args()
    from fastapi.testclient import TestClient

    from imageshare.app import build_archive
    from imageshare.settings import load_settings
    from imageshare.web.server import create_app
    from tests.peers import RunningServer

    shape = cat.Shape()
    studies = args.instances // shape.per_study
    postgres = KeptPostgres(args.postgres)
    try:
        url, existed = postgres.database(f"million{args.instances}")
        folder = postgres.base / f"is-million-{args.instances}"
        if not existed or not (folder / "loaded.json").exists():
            raise SystemExit("load it first: python bench/scale.py --only qido --postgres DIR")
        runner = RunningServer(folder / "data", extra_env={"IMAGESHARE_DATABASE_URL": url})
        environ = {**{k: v for k, v in os.environ.items() if not k.startswith("IMAGESHARE_")},
                   **{k: v for k, v in runner.env().items() if k.startswith("IMAGESHARE_")}}
        from bench.scale import service_token

        token = service_token(runner)
        archive = build_archive(load_settings(environ=environ))
        probe = Probe()
        instrument(archive, probe)
        plan = queries(studies, args.rounds, shape, files_sample(studies, 60))
        rows: dict[str, list[dict[str, float]]] = defaultdict(list)
        counts: dict[str, Counter[str]] = defaultdict(Counter)
        profiles: list[Any] = []
        if args.cprofile:  # every thread started from now on (the server's) is profiled
            import cProfile
            import threading

            def profile_thread(*_args: Any) -> None:
                profiles.append(cProfile.Profile(time.thread_time))
                profiles[-1].enable()

            threading.setprofile(profile_thread)
        with TestClient(create_app(archive), headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/dicom+json"}) as client:
            for n, (kind, path) in enumerate(plan):
                probe.reset()
                started = time.perf_counter()
                response = client.get(f"/dicomweb/{path}")
                total = (time.perf_counter() - started) * 1000
                response.raise_for_status()
                if n < 3 * len(KINDS):
                    continue  # warm-up
                parts = {s: probe.times.get(s, 0.0) for s in STAGES}
                parts["(pings)"] = probe.times.get("(pings)", 0.0)
                parts["(commit)"] = probe.times.get("(commit)", 0.0)
                parts["rest"] = total - sum(parts[s] for s in STAGES) - probe.times.get(
                    "commit outside", 0.0)
                parts["total"] = total
                for key in ("all", kind):
                    rows[key].append(parts)
                    counts[key].update(probe.counts)
                counts[kind]["requests"] += 1
                counts["all"]["requests"] += 1
            logged = (statements_of(postgres, client, plan)
                      if args.log_statements else {})
        print(f"\nQIDO-RS in process at {args.instances:,} instances, {args.rounds} rounds "
              f""
              f"(medians, ms; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())})")
        columns = (*STAGES, "(pings)", "(commit)", "rest", "total")
        print("| query | " + " | ".join(columns) + " | total p95 | statements | pings | "
              "check-outs | commits |")
        print("|---|" + "---:|" * (len(columns) + 5))
        for kind in (*KINDS, "all"):
            values = rows[kind]
            if not values:
                continue
            med = {c: statistics.median(v[c] for v in values) for c in columns}
            totals = sorted(v["total"] for v in values)
            p95 = totals[max(0, int(len(totals) * 0.95) - 1)]
            c = counts[kind]
            per = c["requests"] or 1
            print(f"| {kind} | " + " | ".join(f"{med[col]:.2f}" for col in columns)
                  + f" | {p95:.2f} | {c['statements'] / per:.1f} | {c['pings'] / per:.1f} | "
                  f"{c['checkouts'] / per:.1f} | {c['commits'] / per:.1f} |")
        if profiles:
            import io
            import pstats

            text = io.StringIO()
            for prof in profiles:
                prof.disable()
            stats = pstats.Stats(profiles[0], stream=text)
            for prof in profiles[1:]:
                stats.add(prof)
            stats.sort_stats("tottime").print_stats(args.cprofile)
            stats.sort_stats("cumulative").print_stats("imageshare", args.cprofile)
            print(text.getvalue())
        for kind, statements in logged.items():
            print(f"\n{kind}: {len(statements)} statements at the server")
            for line in statements:
                print(f"    {line}")
        archive.close()
    finally:
        postgres.stop()


if __name__ == "__main__":
    main()
