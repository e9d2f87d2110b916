"""A herd on S3: push a big tree once, then N nodes pull it at the same moment
through their peer daemons (tests/p2p/test_s3_fanout.py, test_home_spans.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemons import BLOBSTORE, Daemon
from helpers import cli_env, make_big_tree, run_cli, snapshot
from s3server import SeaweedS3Server

REF = "apps/big"
HERD_HEALTH = {"BLOBSTORE_HEALTH_INTERVAL": "2"}
"""Checks every 2 s, timing out after 6 s (the default 3 s is hit on a 2-core CI box
running four daemons, four pulls, SeaweedFS and the proxy at once: a pull that marks
a busy home down reads its block from S3 and the region's S3 bytes pass 1.05x)."""


@dataclass(frozen=True)
class Pushed:
    store: str
    unique: int
    """Bytes the push uploaded (the tree's unique bytes)."""
    expected: dict[str, tuple[str, int, str]]
    """The tree's snapshot (its bytes are removed: disk is finite on CI)."""
    env: dict[str, str]
    """The AWS_* environment that reaches SeaweedFS directly, and a health check
    timeout for daemons and pulls (HERD_HEALTH)."""


def push_big_tree(
    s3_server: SeaweedS3Server, tmp_path: Path, bucket: str, size: int, seed: int
) -> Pushed:
    store = s3_server.bucket_url(bucket)
    src = tmp_path / "src"
    make_big_tree(src, size, seed=seed)
    direct = {**s3_server.client_env(), **HERD_HEALTH}
    proc = run_cli(
        ["push", src, REF, "--json"], cli_env(store, tmp_path / "pc", direct), timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    pushed = Pushed(store, json.loads(proc.stdout)["new_bytes"], snapshot(src), direct)
    shutil.rmtree(src)
    shutil.rmtree(tmp_path / "pc", ignore_errors=True)
    return pushed


def pull_at_once(
    store: str, tmp_path: Path, daemons: Sequence[Daemon], env: Mapping[str, str]
) -> list[tuple[dict[str, Any], str]]:
    """One CLI pull per daemon, all started together, each with every daemon as
    its peers, into tmp_path/out-<i>: each pull's --json document and stderr."""
    peers = ",".join(d.listen for d in daemons)
    pulls = [
        subprocess.Popen(
            [BLOBSTORE, "pull", REF, str(tmp_path / f"out-{i}"), "--json"],
            env=cli_env(store, tmp_path / f"node-cache-{i}", {**env, "BLOBSTORE_PEERS": peers}),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(len(daemons))
    ]
    results = [p.communicate(timeout=600) for p in pulls]
    for p, (_, err) in zip(pulls, results, strict=True):
        assert p.returncode == 0, err
    return [(json.loads(out), err) for out, err in results]
