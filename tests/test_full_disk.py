"""Full disks, for real: small tmpfs mounts (needs root; CI runs as root).

- Pulling into a destination that fills up: exit 1 with one line, no temp
  files and no partial file under a final name.
- A full cache disk must not fail the pull: the chunk is served, not cached.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import assert_one_line_error, cli_env, random_bytes, run_cli, temp_leftovers, write


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, unmounted afterwards even when the test fails."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI must run as root to mount tmpfs")
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _push(tmp_path: Path, store: str) -> None:
    src = tmp_path / "src"
    write(src / "small.txt", b"fits\n")
    write(src / "weights.bin", random_bytes(12 << 20, "full-disk"))
    proc = run_cli(["push", src, "apps/big"], cli_env(store, tmp_path / "push-cache"))
    assert proc.returncode == 0, proc.stderr


def test_pull_into_full_disk_fails_cleanly(tmp_path: Path, small_disk: Path) -> None:
    store = f"file://{tmp_path / 'store'}"
    _push(tmp_path, store)
    dest = small_disk / "data"
    proc = run_cli(["pull", "apps/big", dest], cli_env(store, tmp_path / "cache"))
    assert_one_line_error(proc, "no space")
    assert temp_leftovers(dest) == []
    assert not (dest / "weights.bin").exists()  # never a partial file under its name
    # what did fit is complete (small files go first)
    if (dest / "small.txt").exists():
        assert (dest / "small.txt").read_bytes() == b"fits\n"


def test_full_cache_disk_does_not_fail_the_pull(tmp_path: Path, small_disk: Path) -> None:
    store = f"file://{tmp_path / 'store'}"
    _push(tmp_path, store)
    dest = tmp_path / "out"
    proc = run_cli(["pull", "apps/big", dest, "--json"], cli_env(store, small_disk / "cache"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["from"]["origin"] == (12 << 20) + 5
    assert (dest / "weights.bin").read_bytes() == random_bytes(12 << 20, "full-disk")
    warnings = [ln for ln in proc.stderr.splitlines() if "no space left for the cache" in ln]
    assert len(warnings) == 1, proc.stderr  # said once, not once per chunk
