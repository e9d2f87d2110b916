"""A real daemon serves its peers from seeds: files an ``auto`` pull on its node
wrote straight into their destination (ext4/tmpfs: no clones), verified on every
read, and never a seed that changed."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from daemons import cluster
from helpers import cli_env, make_tree, random_bytes, run_cli, snapshot, write


def _clones(where: Path) -> bool:
    (where / "probe").write_bytes(b"x")
    return (
        subprocess.run(
            ["cp", "--reflink=always", where / "probe", where / "probe2"],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )


def _scribble(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(1000)
        f.write(b"\xff" * 64)


def test_daemon_serves_chunks_from_seeds_and_never_a_changed_one(tmp_path: Path) -> None:
    if _clones(tmp_path):
        pytest.skip("this filesystem clones: auto reflinks instead of seeding")
    store = (tmp_path / "store").as_uri()
    src = make_tree(tmp_path / "src")
    write(src / "more.bin", random_bytes(3 << 20, "seeds"))
    assert run_cli(["push", src, "t"], cli_env(store, tmp_path / "pusher")).returncode == 0
    with cluster(store, tmp_path, 1) as (home,):
        # A pull on the daemon's own node (same node store), peers off: seeds in d0/.
        local = cli_env(store, home.cache, {"BLOBSTORE_PEERS": "none"})
        proc = run_cli(["pull", "t", tmp_path / "d0", "--json"], local)
        assert proc.returncode == 0, proc.stderr
        first = json.loads(proc.stdout)
        assert first["from"]["origin"] == first["bytes"]
        assert list(home.cache.glob("files/??/*")) == []  # written once: in d0/
        time.sleep(1.2)  # the daemon looks for new index rows at most once a second
        peers = {"BLOBSTORE_PEERS": home.listen}
        proc = run_cli(
            ["pull", "t", tmp_path / "d1", "--json"], cli_env(store, tmp_path / "other-node", peers)
        )
        assert proc.returncode == 0, proc.stderr
        second = json.loads(proc.stdout)
        assert second["from"]["origin"] == 0  # every chunk from the daemon's seeds
        assert second["from"]["peer"] > 0
        assert home.metrics()["blobstore_peer_origin_fetches_total"] == 0
        assert snapshot(tmp_path / "d1") == snapshot(src)

        # A seed changed in place is never served again: the region refetches it.
        _scribble(tmp_path / "d0" / "more.bin")
        proc = run_cli(
            ["pull", "t", tmp_path / "d2", "--json"], cli_env(store, tmp_path / "third-node", peers)
        )
        assert proc.returncode == 0, proc.stderr
        assert snapshot(tmp_path / "d2") == snapshot(src)
        assert home.metrics()["blobstore_peer_origin_fetches_total"] > 0
