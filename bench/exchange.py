"""Moving a study between hospitals: a 500-instance CT pushed from one site to another and
retrieved by the other, ImageShare to ImageShare side by side with Orthanc to Orthanc
(Debian's Orthanc), same data, same run, DIMSE on loopback.

One command: ``python bench/exchange.py`` (or ``make bench-exchange``). Prints a table and
writes bench/out/exchange.json.

    --instances N   CT slices, 512x512 16-bit (default 500)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import httpx
from pydicom import dcmread

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.factory import ct_series  # noqa: E402
from tests.peers import OrthancServer, RunningServer  # noqa: E402

OUT = ROOT / "bench" / "out"
STAFF = ("bench", "bench-password-1")


def _api(server: RunningServer, method: str, path: str, **kwargs: object) -> dict:
    with httpx.Client(base_url=server.url, auth=STAFF, timeout=600) as client:
        response = client.request(method, path, **kwargs)
    response.raise_for_status()
    return response.json()


def _wait(check: object, timeout: float = 1800.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise TimeoutError("the transfer did not finish")


def imageshare_pair(work: Path, files: list[Path], study_uid: str) -> dict[str, float]:
    a = RunningServer(work / "is-a", ae_title="SITEA").start()
    b = RunningServer(work / "is-b", ae_title="SITEB").start()
    try:
        for server in (a, b):
            server.cli("user", "add", STAFF[0], "--role", "clinician", "--password", STAFF[1])
        a.cli("node", "add", "SITEB", "--host", "127.0.0.1", "--port", str(b.dicom_port))
        b.cli("node", "add", "SITEA", "--host", "127.0.0.1", "--port", str(a.dicom_port))
        a.cli("import", "--quiet", str(files[0].parent))
        started = time.perf_counter()
        transfer = _api(a, "POST", "/api/exchange/push",
                        json={"site": "SITEB", "study_uid": study_uid, "priority": "urgent"})
        _wait(lambda: _api(a, "GET", f"/api/exchange/transfers/{transfer['public_id']}")
              ["state"] in ("delivered", "failed"))
        push = time.perf_counter() - started
        # retrieve: a third site (C) pulls the study from A
        c = RunningServer(work / "is-c", ae_title="SITEC").start()
        try:
            c.cli("user", "add", STAFF[0], "--role", "clinician", "--password", STAFF[1])
            c.cli("node", "add", "SITEA", "--host", "127.0.0.1", "--port", str(a.dicom_port))
            a.cli("node", "add", "SITEC", "--host", "127.0.0.1", "--port", str(c.dicom_port))
            started = time.perf_counter()
            job = _api(c, "POST", "/api/exchange/retrieve",
                       json={"site": "SITEA", "study_uid": study_uid})
            _wait(lambda: _api(c, "GET", f"/api/jobs/{job['id']}")["state"]
                  in ("done", "failed"))
            retrieve = time.perf_counter() - started
            received = _api(c, "GET", f"/api/jobs/{job['id']}")["done"]
        finally:
            c.stop()
        assert received == len(files), f"retrieved {received} of {len(files)}"
        return {"push_s": push, "retrieve_s": retrieve}
    finally:
        a.stop()
        b.stop()


def orthanc_pair(work: Path, files: list[Path], study_uid: str) -> dict[str, float]:
    x = OrthancServer(work / "or-x", ae_title="ORX")
    y = OrthancServer(work / "or-y", ae_title="ORY")
    z = OrthancServer(work / "or-z", ae_title="ORZ")
    x.start({"ORY": ["ORY", "127.0.0.1", y.dicom_port],
             "ORZ": ["ORZ", "127.0.0.1", z.dicom_port]})
    y.start({"ORX": ["ORX", "127.0.0.1", x.dicom_port]})
    z.start({"ORX": ["ORX", "127.0.0.1", x.dicom_port]})
    try:
        with x.http() as client:
            for path in files:
                client.post("/instances", content=path.read_bytes()).raise_for_status()
            orthanc_id = client.post("/tools/find", json={"Level": "Study", "Query": {
                "StudyInstanceUID": study_uid}}).json()[0]
            started = time.perf_counter()
            client.post("/modalities/ORY/store", json={"Resources": [orthanc_id],
                                                       "Synchronous": True},
                        timeout=1800).raise_for_status()
            push = time.perf_counter() - started
        with z.http() as client:
            started = time.perf_counter()
            client.post("/modalities/ORX/move", json={
                "Level": "Study", "Resources": [{"StudyInstanceUID": study_uid}],
                "TargetAet": "ORZ", "Synchronous": True}, timeout=1800).raise_for_status()
            retrieve = time.perf_counter() - started
            count = len(client.get("/instances").json())
        assert count == len(files), f"Orthanc retrieved {count} of {len(files)}"
        return {"push_s": push, "retrieve_s": retrieve}
    finally:
        for server in (x, y, z):
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--work", type=Path, default=OUT / "exchange-work")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    print(f"generating a {args.instances}-instance CT study", flush=True)
    files = ct_series(args.work / "data", count=args.instances, size=512)
    study_uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    ours = imageshare_pair(args.work, files, study_uid)
    theirs = orthanc_pair(args.work, files, study_uid)
    print(f"\n{'move of a ' + str(args.instances) + '-instance CT':<34} {'ImageShare':>11} "
          f"{'Orthanc':>9}  ratio")
    for key, label in (("push_s", "push (s)"), ("retrieve_s", "retrieve, C-MOVE (s)")):
        print(f"{label:<34} {ours[key]:>11.2f} {theirs[key]:>9.2f}  x{theirs[key] / ours[key]:.2f}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "exchange.json").write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "instances": args.instances,
        "imageshare": ours, "orthanc": theirs}, indent=2))
    shutil.rmtree(args.work, ignore_errors=True)
    print(f"\nwritten to {OUT / 'exchange.json'}")


if __name__ == "__main__":
    main()
