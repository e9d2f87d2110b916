"""A node's ``blobstore daemon`` for the benchmarks' node-agent rows: the CLI's
pulls go to it (blobstore/agent.py) when it runs on the pull's node store."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BLOBSTORE = str(Path(sys.executable).parent / "blobstore")


@contextmanager
def node_daemon(env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """``blobstore daemon`` on ``env``'s node store (its peers setting as given),
    serving its node agent; stopped (SIGTERM) on exit."""
    proc = subprocess.Popen(
        [BLOBSTORE, "daemon", "--listen", "127.0.0.1:0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline() or "{}")
        if not ready.get("agent"):
            raise SystemExit(f"the daemon did not start its node agent: {ready}")
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)
