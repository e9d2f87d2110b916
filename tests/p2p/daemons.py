"""Real ``blobstore daemon`` processes for tests: start, wait ready, inspect, stop."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from s3server import free_ports

BLOBSTORE = str(Path(sys.executable).parent / "blobstore")


@dataclass
class Daemon:
    proc: subprocess.Popen[str]
    node: str
    listen: str
    http: str
    cache: Path
    log: Path
    extra: dict[str, object] = field(default_factory=dict)

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://{self.http}{path}", timeout=10) as resp:
            body: bytes = resp.read()
            return body

    def health(self) -> dict[str, object]:
        doc: dict[str, object] = json.loads(self.get("/healthz"))
        return doc

    def metrics(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for line in self.get("/metrics").decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout)


def daemon_env(store: str, cache: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(BLOBSTORE_STORE=store, BLOBSTORE_CACHE=str(cache))
    env.update(extra or {})
    return env


@contextmanager
def daemon(
    store: str,
    cache: Path,
    *,
    listen: str,
    peers: str,
    region: str = "default",
    node: str | None = None,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    prefix: Sequence[str] = (),
    ready_timeout: float = 30,
) -> Iterator[Daemon]:
    """Start one daemon; stop it (SIGTERM, then SIGKILL) however the test ends."""
    http = f"{listen.rpartition(':')[0]}:{free_ports(1)[0]}"
    log = cache.with_name(cache.name + ".log")
    cmd = [
        *prefix,
        BLOBSTORE,
        "daemon",
        "--listen",
        listen,
        "--http",
        http,
        "--peers",
        peers,
        "--region",
        region,
        "--health-interval",
        "0.3",
        "-v",
        *args,
    ]
    if node:
        cmd += ["--node-id", node]
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            cmd,
            env=daemon_env(store, cache, env),
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
        )
    try:
        ready = _wait_ready(proc, log, ready_timeout)
        yield Daemon(proc, ready["node"], ready["listen"], ready["http"] or http, cache, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def _wait_ready(proc: subprocess.Popen[str], log: Path, timeout: float) -> dict[str, str]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        readable, _, _ = select.select([proc.stdout], [], [], 0.1)
        if readable:
            line = proc.stdout.readline()
            if line:
                doc: dict[str, str] = json.loads(line)
                if doc.get("event") == "ready":
                    return doc
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"daemon did not become ready:\n{log.read_text()[-3000:]}")


@contextmanager
def cluster(
    store: str,
    root: Path,
    count: int,
    *,
    region: str = "default",
    args_for: Mapping[int, Sequence[str]] | None = None,
    extra_peers: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Iterator[list[Daemon]]:
    """``count`` daemons on loopback that know each other through a static list."""
    ports = free_ports(count)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    peers = ",".join([*addresses, *extra_peers])
    with ExitStack() as stack:
        daemons = [
            stack.enter_context(
                daemon(
                    store,
                    root / f"cache-{i}",
                    listen=addresses[i],
                    peers=peers,
                    region=region,
                    node=f"{region}-node-{i}",
                    args=(args_for or {}).get(i, ()),
                    env=env,
                )
            )
            for i in range(count)
        ]
        wait_until(
            lambda: all(d.health()["peers"] == count - 1 for d in daemons),
            "daemons to see each other",
        )
        yield daemons


def wait_until(predicate: object, what: str, timeout: float = 20) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
