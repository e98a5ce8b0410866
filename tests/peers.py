"""Real servers started on loopback for tests and benchmarks: ImageShare and Orthanc."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ADMIN_PASSWORD = "admin-test-password"


_PORT_SLICE = 2000  # ports of one pytest-xdist worker (gw0: 10000-11999, gw1: 12000-...)
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port nobody listens on right now, for a server started a little later.

    Taken below the kernel's ephemeral range, where no outgoing connection (of this test or
    of a test running beside it) can take it as its local port in the meantime, and from a
    slice of its own for each pytest-xdist worker, so that tests running in parallel never
    pick the same one. Where the ephemeral range leaves no room, any port the kernel gives."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "").removeprefix("gw")
    first = 10000 + (int(worker) if worker.isdigit() else 7) * _PORT_SLICE
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    if first + _PORT_SLICE <= low:
        start = int.from_bytes(os.urandom(2), "big") % _PORT_SLICE
        for step in range(_PORT_SLICE):
            port = first + (start + step) % _PORT_SLICE
            if port in _handed_out:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    """Block until something accepts connections on ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


@dataclass
class RunningServer:
    """``imageshare serve`` as a separate process on free ports."""

    data_dir: Path
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    ae_title: str = "IMAGESHARE"
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    # The modalities the tests send from, registered (store only, at 127.0.0.1) before the
    # server starts, as a hospital registers its scanners: only registered AEs may store.
    modalities: tuple[str, ...] = ("STORESCU", "DCMSEND", "PYNETDICOM")
    scheme: str = "http"  # "https" with IMAGESHARE_TLS_* in extra_env
    ca_file: str | None = None  # trusted for https
    _admin_token: str = ""

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.http_port}"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=self.ca_file) if self.ca_file else True

    @property
    def dicomweb(self) -> str:
        return self.url + "/dicomweb"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGESHARE_")}
        env.update(
            IMAGESHARE_DATA_DIR=str(self.data_dir),
            IMAGESHARE_HTTP_PORT=str(self.http_port),
            IMAGESHARE_DICOM_PORT=str(self.dicom_port),
            IMAGESHARE_AE_TITLE=self.ae_title,
            IMAGESHARE_ADMIN_PASSWORD=ADMIN_PASSWORD,
            IMAGESHARE_LOG_LEVEL="WARNING",
            # well inside stop()'s 15 s: an association or request a test left open ends the
            # grace, not the test (the 20 s default is tested in tests/interop/test_shutdown.py)
            IMAGESHARE_SHUTDOWN_GRACE_SECONDS="5",
        )
        env.update(self.extra_env)
        return env

    def cli(self, *args: str, check: bool = True, timeout: float | None = 300
            ) -> subprocess.CompletedProcess[str]:
        """Run ``imageshare ARGS`` against this server's data (killed after ``timeout``
        seconds; None: however long it takes)."""
        from tests.cli_forker import run_cli

        return run_cli(list(args), self.env(), check=check, timeout=timeout)

    def register(self, *ae_titles: str, host: str = "127.0.0.1", port: int = 104) -> None:
        """Register calling AE titles as modalities that may store (also while it runs)."""
        from imageshare.app import _secret_box
        from imageshare.exchange.nodes import Node, NodeRegistry
        from imageshare.settings import load_settings
        from imageshare.storage.index.database import make_engine, migrate

        # Only the index is opened (the blob store, say S3, takes its credentials from the
        # process environment, which is the server's, not this one's).
        settings = load_settings(environ=self.env())
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        engine = make_engine(settings.resolved_database_url)
        try:
            migrate(engine)
            nodes = NodeRegistry(engine, _secret_box(settings))
            for ae in ae_titles:
                if nodes.find(ae) is None:
                    nodes.add(Node(ae, host, port, may_query=False, may_retrieve=False,
                                   searchable=False, retrieve_from=False, send_to=False))
        finally:
            engine.dispose()

    def start(self) -> RunningServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.modalities:
            self.register(*self.modalities)
        self.log_path = self.data_dir.parent / f"server-{self.http_port}.log"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "imageshare", "serve"], env=self.env(), stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 90  # a loaded machine (CI, parallel work) can take a while
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("server exited: " + self.log_path.read_text()[-2000:])
            try:
                if httpx.get(self.url + "/healthz", timeout=1,
                             verify=self.verify).status_code == 200:
                    wait_for_port(self.dicom_port)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()  # a server that did not come up is not left running
        raise TimeoutError("server did not start: " + self.log_path.read_text()[-2000:])

    def kill(self) -> None:
        """SIGKILL: no chance to clean up."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM, as systemd stops a service: a server that has not ended 15 seconds later
        is killed and the test fails (an idle server stops in about a second)."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self._dump_stacks()
                self.kill()
                log = self.log_path.read_text()[-12000:] if self.log_path else ""
                raise AssertionError("the server did not stop within 15 s of SIGTERM; it was "
                                     "killed. Its log (with every thread's stack, SIGUSR1) "
                                     "ends:\n" + log) from None

    def _dump_stacks(self) -> None:
        """Ask the server and its worker processes for every thread's stack (SIGUSR1, which
        ``imageshare serve`` answers in its log), to show where a stop hangs."""
        assert self.process is not None
        family, parents = [self.process.pid], [self.process.pid]
        while parents:  # the workers are the children of the server's forkserver
            parents = [int(c) for p in parents for c in subprocess.run(
                ["pgrep", "-P", str(p)], capture_output=True, text=True,
                check=False).stdout.split()]
            family += parents
        for pid in family:
            try:
                os.kill(pid, signal.SIGUSR1)
            except OSError:
                pass
        time.sleep(1.0)

    def admin_token(self) -> str:
        """An API token of ``admin`` made on the command line (an administrator without a
        second factor can do nothing else over HTTP Basic but enrol)."""
        if not self._admin_token:
            self._admin_token = self.cli("user", "token", "admin", "--name", "tests"
                                         ).stdout.strip().splitlines()[-1]
        return self._admin_token

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, verify=self.verify,
                            headers={"Authorization": f"Bearer {self.admin_token()}"})


@dataclass
class OrthancServer:
    """Debian's Orthanc on loopback with its own folders and ports."""

    folder: Path
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    ae_title: str = "ORTHANC"
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, modalities: dict[str, list], plugins: list[str] | None = None,
              extra: dict | None = None) -> None:
        """Start with these DICOM modalities, plugins and further configuration."""
        import json

        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "orthanc-test", "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"), "HttpPort": self.http_port,
            "DicomPort": self.dicom_port, "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomModalities": modalities, "Plugins": plugins or [],
            "DicomCheckCalledAet": False, "StableAge": 1, "HttpTimeout": 60,
            "DicomScuTimeout": 30, **(extra or {}),
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config))
        log = open(self.folder / "orthanc.log", "a")
        self.process = subprocess.Popen(
            [shutil.which("Orthanc") or "Orthanc", str(path)], stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError((self.folder / "orthanc.log").read_text()[-2000:])
            try:
                if httpx.get(self.url + "/system", timeout=1).status_code == 200:
                    wait_for_port(self.dicom_port)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("Orthanc did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120)


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found
