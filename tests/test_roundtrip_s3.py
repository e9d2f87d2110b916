"""A 2 GiB tree round-trips byte-identical through SeaweedFS via the CLI, with
the pull's peak RSS bounded and a second push uploading nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import BLOBSTORE, cli_env, make_big_tree, run_cli, snapshot, temp_leftovers
from s3server import SeaweedS3Server, find_weed

pytestmark = [pytest.mark.slow, pytest.mark.s3]

TOTAL = 2 << 30
MAX_PULL_RSS = 256 << 20


# A small, fresh interpreter runs the command and reports its children's peak RSS.
# Measuring from the test process itself would be wrong: a vfork'ed child's
# high-water mark starts at the (large) parent's RSS and survives exec.
_MEASURE = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def run_measured(args: list[str], env: dict[str, str]) -> tuple[str, int]:
    """Run the CLI in a fresh child; return (its stdout, its peak RSS in bytes)."""
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, BLOBSTORE, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, int(proc.stderr.splitlines()[-1]) * 1024  # kilobytes on Linux


@pytest.fixture
def own_s3(s3_server: SeaweedS3Server, tmp_path: Path) -> Iterator[SeaweedS3Server]:
    """A SeaweedFS of this test's own: ``weed mini`` sizes its volume slots from free
    disk space and every bucket takes several, so after the session's many small
    buckets a shared server can refuse 2 GiB ("No writable volumes")."""
    with SeaweedS3Server.start(tmp_path / "weed", find_weed()) as server:
        yield server


@pytest.mark.timeout(600)
def test_two_gib_round_trip_through_s3(own_s3: SeaweedS3Server, tmp_path: Path) -> None:
    src = tmp_path / "src"
    assert make_big_tree(src, TOTAL) == TOTAL
    env = cli_env(own_s3.bucket_url(), tmp_path / "cache", own_s3.client_env())

    push = run_cli(["push", src, "big/tree", "--json"], env, timeout=300)
    assert push.returncode == 0, push.stderr
    first = json.loads(push.stdout)
    assert first["bytes"] == TOTAL
    assert 0 < first["new_bytes"] < TOTAL  # duplicated content is stored once

    again = run_cli(["push", src, "big/tree", "--json"], env, timeout=300)
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout)
    assert (second["new_chunks"], second["new_bytes"]) == (0, 0)
    assert second["manifest"] == first["manifest"]

    # Disk is finite on CI: keep the source's fingerprint, not its 2 GiB.
    expected = snapshot(src)
    shutil.rmtree(src)

    dst = tmp_path / "dst"
    out, rss = run_measured(["pull", "big/tree", str(dst), "--json"], env)
    pulled = json.loads(out)
    print(f"pull peak RSS: {rss / (1 << 20):.0f} MiB, {pulled['seconds']} s")
    assert rss < MAX_PULL_RSS, f"pull peak RSS {rss >> 20} MiB"
    assert pulled["bytes"] == TOTAL
    assert pulled["from"]["origin"] == first["new_bytes"]  # each unique chunk fetched once
    assert pulled["from"]["origin"] + pulled["from"]["local"] == TOTAL
    assert temp_leftovers(dst) == []
    assert snapshot(dst) == expected
