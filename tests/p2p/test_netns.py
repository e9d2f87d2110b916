"""Discovery over real mDNS, across network namespaces joined by a bridge.

Each node is a namespace with a veth into a bridge that lives in its own
namespace (multicast snooping off, a 224.0.0.0/4 route per node, as measured).
Needs root; skipped without it unless ``CI`` is set, where it must run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemons import BLOBSTORE, daemon, wait_until
from helpers import cli_env, make_tree, run_cli, snapshot

pytestmark = pytest.mark.root


def _need_root() -> None:
    reason = ""
    if os.geteuid() != 0:
        reason = "needs root for network namespaces"
    elif shutil.which("ip") is None:
        reason = "needs iproute2 (ip)"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the namespace tests: {reason}")
        pytest.skip(reason)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Node:
    ns: str
    addr: str

    def run(
        self, *cmd: str | Path, env: dict[str, str], timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.ns, *map(str, cmd)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def http_json(self, url: str) -> object:
        code = f"import json,urllib.request;print(urllib.request.urlopen({url!r}).read().decode())"
        proc = self.run(sys.executable, "-c", code, env=dict(os.environ))
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)


@pytest.fixture
def lab() -> Iterator[list[Node]]:
    """Four node namespaces on one bridge; removed however the test ends."""
    _need_root()
    tag = uuid.uuid4().hex[:6]
    subnet = f"10.{100 + int(tag[:2], 16) % 100}.{int(tag[2:4], 16)}"
    bridge_ns = f"bsbr-{tag}"
    created: list[str] = []
    try:
        _ip("netns", "add", bridge_ns)
        created.append(bridge_ns)
        _ip("-n", bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge_ns, "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", bridge_ns, "link", "set", "br0", "up")
        nodes = []
        for i in range(4):
            ns = f"bsn{i}-{tag}"
            _ip("netns", "add", ns)
            created.append(ns)
            host_end, bridge_end = f"v{i}{tag}", f"b{i}{tag}"
            _ip("link", "add", host_end, "type", "veth", "peer", "name", bridge_end)
            _ip("link", "set", host_end, "netns", ns)
            _ip("link", "set", bridge_end, "netns", bridge_ns)
            _ip("-n", bridge_ns, "link", "set", bridge_end, "master", "br0")
            _ip("-n", bridge_ns, "link", "set", bridge_end, "up")
            addr = f"{subnet}.{i + 1}"
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", host_end)
            _ip("-n", ns, "link", "set", host_end, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", host_end)
            nodes.append(Node(ns, addr))
        yield nodes
    finally:
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def test_mdns_discovery_and_region_filtering(lab: list[Node], tmp_path: Path) -> None:
    store = (tmp_path / "store").as_uri()
    src = make_tree(tmp_path / "src")
    assert run_cli(["push", src, "apps/ns"], cli_env(store, tmp_path / "pc")).returncode == 0
    # Nodes 0-2 run a daemon on the default address; node 3 runs none (a client only).
    regions = ["east", "east", "west"]
    with ExitStack() as stack:
        daemons = [
            stack.enter_context(
                daemon(
                    store,
                    tmp_path / f"cache-{i}",
                    listen="0.0.0.0:7411",
                    peers="auto",
                    region=regions[i],
                    node=f"{regions[i]}-{i}",
                    prefix=["ip", "netns", "exec", node.ns],
                )
            )
            for i, node in enumerate(lab[:3])
        ]
        assert len(daemons) == 3

        def east_daemon_sees_one_peer() -> bool:
            health = lab[0].http_json(f"http://{daemons[0].http}/healthz")
            assert isinstance(health, dict)
            return bool(health["peers"] == 1)

        wait_until(east_daemon_sees_one_peer, "east-0 to discover east-1 over mDNS")

        env = cli_env(
            store,
            tmp_path / "client-cache",
            {"BLOBSTORE_PEERS": "auto", "BLOBSTORE_REGION": "east"},
        )
        # Node 3 has no daemon of its own: it finds the region by mDNS alone.
        proc = lab[3].run(BLOBSTORE, "peers", "--json", "--all", "--wait", "2", env=env)
        assert proc.returncode == 0, proc.stderr
        rows = json.loads(proc.stdout)["peers"]
        seen = {p["node"]: (p["status"], p["source"]) for p in rows if p["source"] != "local"}
        # The west node announces itself on the same link but is never used.
        assert seen == {"east-0": ("up", "mdns"), "east-1": ("up", "mdns")}
        [local] = [p for p in rows if p["source"] == "local"]
        assert local["status"] == "down"  # nothing listens on this node's 127.0.0.1:7411

        # Node 0's pull asks its own daemon, which names east-1: no wait for mDNS.
        proc = lab[0].run(BLOBSTORE, "pull", "apps/ns", tmp_path / "out", "--json", env=env)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["from"]["peer"] > 0
        assert snapshot(tmp_path / "out") == snapshot(src)
        proc = lab[0].run(BLOBSTORE, "peers", "--json", "--wait", "0", env=env)
        assert proc.returncode == 0, proc.stderr
        assert {p["node"] for p in json.loads(proc.stdout)["peers"]} == {"east-0", "east-1"}

        west = lab[2].http_json(f"http://{daemons[2].http}/healthz")
        assert isinstance(west, dict)
        assert west["peers"] == 0

        # A clean stop sends mDNS goodbyes: the other east daemon drops it.
        assert daemons[1].stop() == 0
        wait_until(lambda: not east_daemon_sees_one_peer(), "east-0 to drop the stopped peer")
