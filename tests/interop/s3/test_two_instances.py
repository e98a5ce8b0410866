"""Several instances, one service: two ``imageshare serve`` processes on one PostgreSQL and
one S3 store (SeaweedFS) behind HAProxy, configured as the reference deployment in
docs/scale-out.md (its example environment and HAProxy configuration are the ones used)."""

from __future__ import annotations

import io
import os
import subprocess
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import create_engine, text

from tests.conftest import require_tool
from tests.factory import ct_series
from tests.interop.s3.conftest import s3_server_env
from tests.multipart_helpers import parse_multipart
from tests.peers import RunningServer, free_port, wait_for_port

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "docs" / "scale-out"
LEASE_SECONDS = 3
COUNT = 12  # instances of the exported study: de-identified and checked, ~1 s each here


def _example_variables() -> set[str]:
    lines = (EXAMPLE / "instance.env").read_text().splitlines()
    return {line.split("=", 1)[0] for line in lines if line and not line.startswith("#")}


@pytest.fixture(scope="module")
def pair(tmp_path_factory, postgres, s3_server) -> Iterator[tuple[RunningServer, RunningServer]]:
    """Two instances started once for the module, with every variable of the example
    environment: the same database, store and keys; each with its own data folder, HTTP and
    DICOM ports."""
    lb_http = free_port()
    shared = {
        **s3_server_env(s3_server),
        "IMAGESHARE_DATABASE_URL": postgres.new_database(),
        "IMAGESHARE_SECRET_KEY": Fernet.generate_key().decode(),
        "IMAGESHARE_DEID_SECRET": "the same pseudonyms on every instance of this service",
        "IMAGESHARE_PUBLIC_URL": f"http://127.0.0.1:{lb_http}",
        "IMAGESHARE_TRUSTED_PROXIES": "127.0.0.1",
        "IMAGESHARE_JOB_LEASE_SECONDS": str(LEASE_SECONDS),
        # quicker than in production, for the tests
        "IMAGESHARE_DICOM_PROCESSES": "1",
        "IMAGESHARE_JOB_RETRY_SECONDS": "1,1,1",
        "IMAGESHARE_RETENTION_EVERY_SECONDS": "2",
    }
    assert _example_variables() <= set(shared)
    base = tmp_path_factory.mktemp("two-instances")
    first = RunningServer(base / "a" / "data", extra_env=shared).start()
    second = RunningServer(base / "b" / "data", extra_env=shared)
    second.modalities = ()  # registered once, in the shared database, by the first
    try:
        second.start()
    except BaseException:
        first.stop()
        raise
    first._admin_token = second._admin_token = _directory_call(
        first, lambda users: users.create_token("admin", "two-instance tests", origin="cli"))
    first.lb_http = lb_http  # type: ignore[attr-defined]
    yield first, second
    for server in (first, second):
        server.stop()
        assert not (server.data_dir / "blobs").exists()


def _directory_call(server: RunningServer, call):
    """``call(users)`` on the shared database's user directory, from the test process (as
    quick as the command line is slow)."""
    from imageshare.access.users import UserDirectory
    from imageshare.app import _secret_box
    from imageshare.settings import load_settings
    from imageshare.storage.index.database import make_engine

    settings = load_settings(environ=server.env())
    engine = make_engine(settings.resolved_database_url)
    try:
        return call(UserDirectory(engine, _secret_box(settings)))
    finally:
        engine.dispose()


def _store(port: int, paths: list[Path]) -> int:
    ae = AE(ae_title="PYNETDICOM")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120  # a loaded machine
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="IMAGESHARE")
    assert assoc.is_established
    stored = 0
    try:
        for path in paths:
            status = assoc.send_c_store(path)
            stored += bool(status and status.get("Status") == 0x0000)
    finally:
        assoc.release()
    return stored


def _store_at_once(jobs: list[tuple[int, list[Path]]]) -> list[int | str]:
    """Each (port, paths) on its own association, all at once: how many each stored (or
    what went wrong)."""
    results: list[int | str] = [""] * len(jobs)

    def run(index: int, port: int, paths: list[Path]) -> None:
        try:
            results[index] = _store(port, paths)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion
            results[index] = repr(exc)

    threads = [threading.Thread(target=run, args=(i, port, paths))
               for i, (port, paths) in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return results


def _study_on(server: RunningServer, study_uid: str) -> int:
    with server.http() as http:
        found = http.get("/dicomweb/studies", params={"StudyInstanceUID": study_uid})
        found.raise_for_status()
        (study,) = found.json()
        return int(study["00201208"]["Value"][0])


def test_a_study_stored_through_both_instances_at_once_is_one_study_found_on_either(
        pair, tmp_path):
    first, second = pair
    paths = ct_series(tmp_path / "ct", count=12, patient_id="TWOINST1")
    study_uid = dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
    assert _store_at_once([(first.dicom_port, paths[0::2]),
                           (second.dicom_port, paths[1::2])]) == [6, 6]
    assert _study_on(first, study_uid) == _study_on(second, study_uid) == 12
    # Retrieved from either: each instance serves what the other received.
    for server, sent in ((first, paths[1]), (second, paths[0])):
        ds = dcmread(sent)
        with server.http() as http:
            answer = http.get(f"/dicomweb/studies/{study_uid}/series/{ds.SeriesInstanceUID}"
                              f"/instances/{ds.SOPInstanceUID}",
                              headers={"Accept": "multipart/related; type=\"application/dicom\""})
            answer.raise_for_status()
        ((_headers, part),) = parse_multipart(answer)
        assert dcmread(io.BytesIO(part)).PixelData == ds.PixelData


def test_a_share_made_on_one_instance_opens_on_the_other(pair, tmp_path):
    first, second = pair
    paths = ct_series(tmp_path / "ct", count=2, patient_id="TWOINST2")
    assert _store(first.dicom_port, paths) == 2
    study_uid = dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
    with first.http() as http:
        made = http.post(f"/api/studies/{study_uid}/shares", json={"days": 3})
        assert made.status_code == 201, made.text
    share = made.json()
    token_path = httpx.URL(share["url"]).path
    with httpx.Client(base_url=second.url, timeout=60) as browser:
        assert browser.get(token_path).status_code == 200
        opened = browser.post(token_path, data={"passcode": share["passcode"]})
        assert opened.status_code == 303, opened.text
        assert browser.get(opened.headers["location"]).status_code == 200
        cookies = browser.cookies
    # The link's session, started on the second instance, holds on the first.
    with httpx.Client(base_url=first.url, timeout=60, cookies=cookies) as browser:
        assert browser.get(f"{token_path}/case").status_code == 200


def test_a_session_and_its_csrf_token_hold_on_both_instances(pair):
    first, second = pair
    _directory_call(first, lambda users: users.add("clinician7", "a long password 7",
                                                   "clinician"))
    with httpx.Client(base_url=first.url, timeout=60) as on_first:
        signed_in = on_first.post("/api/session", json={"username": "clinician7",
                                                         "password": "a long password 7"})
        assert signed_in.status_code == 200, signed_in.text
        csrf = signed_in.json()["csrf_token"]
        cookies = on_first.cookies
    with httpx.Client(base_url=second.url, timeout=60, cookies=cookies) as on_second:
        assert on_second.get("/api/me").json()["username"] == "clinician7"
        refused = on_second.post("/api/tokens", json={"name": "no csrf"})
        assert refused.status_code == 403
        made = on_second.post("/api/tokens", headers={"X-CSRF-Token": csrf},
                              json={"name": "laptop", "password": "a long password 7"})
        assert made.status_code == 201, made.text


def test_a_login_lockout_is_counted_across_both_instances(pair):
    first, second = pair
    _directory_call(first, lambda users: users.add("radiographer7", "the right password",
                                                   "radiographer"))
    for attempt in range(5):  # five wrong passwords, alternating between the instances
        server = (first, second)[attempt % 2]
        wrong = httpx.post(server.url + "/api/session", timeout=60, json={
            "username": "radiographer7", "password": f"wrong password {attempt}"})
        assert wrong.status_code == 401
    for server in (first, second):  # now the right one is refused on both
        right = httpx.post(server.url + "/api/session", timeout=60, json={
            "username": "radiographer7", "password": "the right password"})
        assert right.status_code == 401


def test_the_retention_task_runs_by_itself_once_its_time_has_come(pair, tmp_path):
    first, second = pair
    paths = ct_series(tmp_path / "ct", count=3, patient_id="TWOINST3")
    assert _store(second.dicom_port, paths) == 3
    study_uid = dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
    engine = create_engine(first.env()["IMAGESHARE_DATABASE_URL"])
    try:
        with engine.begin() as conn:
            # A temporary copy retrieved from another site; the clock moved on 31 days.
            conn.execute(text(
                "UPDATE instances SET retention_class = 'temporary', "
                "received_at = now() - interval '31 days' WHERE series_pk IN ("
                "SELECT series.pk FROM series JOIN studies ON studies.pk = series.study_pk "
                "WHERE studies.study_uid = :uid)"), {"uid": study_uid})
            moved_at = conn.execute(text("SELECT now()")).scalar()
        deadline = time.monotonic() + 30
        with first.http() as http:
            while time.monotonic() < deadline:
                if http.get("/dicomweb/studies",
                            params={"StudyInstanceUID": study_uid}).json() == []:
                    break
                time.sleep(0.5)
            else:
                pytest.fail("the retention task did not remove the expired copy")
        with engine.connect() as conn:
            runs = conn.execute(text(
                "SELECT dedupe_key, state, finished_at FROM background_jobs "
                "WHERE kind = 'retention'")).all()
    finally:
        engine.dispose()
    assert any(r.finished_at is not None and r.finished_at >= moved_at for r in runs)
    keys = [r.dedupe_key for r in runs]
    assert len(keys) == len(set(keys))  # one job per period, however many instances
    assert {r.state for r in runs} <= {"queued", "running", "done"}


@pytest.fixture(scope="module")
def balancer(pair, tmp_path_factory) -> Iterator[tuple[str, int]]:
    """HAProxy with docs/scale-out/haproxy.cfg in front of the pair: (HTTP URL, DICOM port)."""
    haproxy = require_tool("haproxy")
    first, second = pair
    dicom = free_port()
    env = {**os.environ, "LB_HTTP": f"127.0.0.1:{first.lb_http}",
           "LB_DICOM": f"127.0.0.1:{dicom}",
           "INSTANCE_A_HTTP": f"127.0.0.1:{first.http_port}",
           "INSTANCE_B_HTTP": f"127.0.0.1:{second.http_port}",
           "INSTANCE_A_DICOM": f"127.0.0.1:{first.dicom_port}",
           "INSTANCE_B_DICOM": f"127.0.0.1:{second.dicom_port}"}
    log = open(tmp_path_factory.mktemp("haproxy") / "haproxy.log", "w")
    process = subprocess.Popen([haproxy, "-db", "-f", str(EXAMPLE / "haproxy.cfg")], env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(first.lb_http)
        wait_for_port(dicom)
        url = f"http://127.0.0.1:{first.lb_http}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # both backends checked healthy
            if all(httpx.get(url + "/healthz", timeout=5).status_code == 200
                   for _ in range(4)):
                break
            time.sleep(0.2)
        yield url, dicom
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def test_behind_the_load_balancer_stores_and_a_session_work_whichever_instance_answers(
        pair, balancer, tmp_path):
    url, dicom = balancer
    paths = ct_series(tmp_path / "ct", count=4, patient_id="TWOINST5")
    assert _store_at_once([(dicom, paths[0::2]), (dicom, paths[1::2])]) == [2, 2]
    _directory_call(pair[0], lambda users: users.add("clinician8", "a long password 8",
                                                     "clinician"))
    with httpx.Client(base_url=url, timeout=60) as browser:
        signed_in = browser.post("/api/session", json={"username": "clinician8",
                                                       "password": "a long password 8"})
        assert signed_in.status_code == 200, signed_in.text
        csrf = signed_in.json()["csrf_token"]
        for _ in range(4):  # round robin: every other request on the other instance
            assert browser.get("/api/me").json()["username"] == "clinician8"
        token = browser.post("/api/tokens", headers={"X-CSRF-Token": csrf},
                             json={"name": "viewer", "password": "a long password 8"}
                             ).json()["token"]
    study_uid = dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
    with httpx.Client(base_url=url, timeout=60,
                      headers={"Authorization": f"Bearer {token}"}) as viewer:
        for _ in range(2):
            (study,) = viewer.get("/dicomweb/studies",
                                  params={"StudyInstanceUID": study_uid}).json()
            assert study["00201208"]["Value"] == [4]


def test_an_upload_received_by_one_instance_is_checked_by_it_whichever_leases_the_job(
        pair, tmp_path):
    """The files of a browser upload stay in the data folder of the instance that received
    them until they are sent (the load balancer keeps one uploader on one instance): the
    other instance refuses to continue a file it does not have (the browser starts that
    file again), and the intake job, leased by either, is run by the one with the files."""
    import base64
    import re

    from tests.upload_media import photo

    first, second = pair
    _directory_call(first, lambda users: users.add("clerk9", "a long password 9",
                                                   "radiographer"))
    slices = ct_series(tmp_path / "cd", 3, patient_id="CD-9", patient_name="Upload^Nine")
    picture = photo(tmp_path / "IMG_9.jpg")
    html = {"Accept": "text/html"}
    with httpx.Client(base_url=first.url, timeout=120, headers=html) as browser:
        assert browser.post("/login", data={"username": "clerk9",
                                            "password": "a long password 9"}).status_code == 303
        csrf = re.search(r'name="csrf-token" content="([^"]*)"',
                         browser.get("/uploads/import").text).group(1)
        started = browser.post("/uploads/import", follow_redirects=False, data={
            "csrf_token": csrf, "patient_name": "Upload^Nine", "hospital_number": "U9",
            "birth_date": "1970-01-01", "reference": "two instances"})
        assert started.status_code == 303
        base = started.headers["location"].removesuffix("/upload")
        tus = {"Tus-Resumable": "1.0.0", "X-CSRF-Token": csrf}
        for path in [*slices, picture]:
            data = path.read_bytes()
            name = base64.b64encode(path.name.encode()).decode()
            made = browser.post(base + "/files", content=data, headers={
                **tus, "Upload-Length": str(len(data)), "Upload-Metadata": f"filename {name}",
                "Content-Type": "application/offset+octet-stream"})
            assert made.status_code == 201 and made.headers["upload-offset"] == str(len(data))
        half = browser.post(base + "/files", content=b"\0" * 10, headers={
            **tus, "Upload-Length": "20", "Upload-Metadata": "filename eC5iaW4=",
            "Content-Type": "application/offset+octet-stream"})
        cookies = browser.cookies
        with httpx.Client(base_url=second.url, timeout=120, headers=html,
                          cookies=cookies) as elsewhere:
            moved = elsewhere.head(half.headers["location"], headers=tus)
            assert moved.status_code == 404  # kept by the first: the browser starts it again
        browser.delete(half.headers["location"], headers=tus)
        sent = browser.post(base + "/send", data={"csrf_token": csrf}, follow_redirects=False)
        assert sent.status_code == 303
        deadline = time.monotonic() + 120
        while 'data-state="done"' not in (shown := browser.get(sent.headers["location"]).text):
            assert 'data-state="failed"' not in shown
            assert time.monotonic() < deadline, "the intake never finished"
            time.sleep(0.5)
        assert "4 file(s) received" in shown


def test_an_export_whose_instance_is_killed_mid_job_is_finished_by_the_other(pair, tmp_path):
    first, second = pair
    paths = ct_series(tmp_path / "ct", count=COUNT, patient_id="TWOINST4")
    assert _store(first.dicom_port, paths) == COUNT
    study_uid = dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
    with first.http() as http:
        started = http.post(f"/api/studies/{study_uid}/exports",
                            json={"format": "zip", "deidentify": True})
        assert started.status_code == 202, started.text
        job_id = started.json()["id"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            job = http.get(f"/api/jobs/{job_id}").json()
            if job["state"] == "running" and job["done"] > 0:
                break
            assert job["state"] in ("queued", "running"), job
            time.sleep(0.05)
    assert job["done"] < COUNT, "the kill must land while the export runs"
    first.kill()
    with second.http() as http:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            job = http.get(f"/api/jobs/{job_id}").json()
            if job["state"] in ("done", "failed"):
                break
            time.sleep(0.2)
        assert job["state"] == "done", job
        assert job["done"] == COUNT
        download = http.get(job["download"])
        assert download.status_code == 200
    with zipfile.ZipFile(io.BytesIO(download.content)) as exported:
        dicom_files = [n for n in exported.namelist() if not n.endswith("/")
                       and n.upper() != "DICOMDIR"]
    assert len(dicom_files) == COUNT

