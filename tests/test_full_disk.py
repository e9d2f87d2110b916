"""Full disks, for real: small tmpfs mounts (needs root; CI runs as root).

- Pulling into a destination that fills up: exit 1 with one line, no temp
  files and no partial file under a final name.
- A full cache disk must not fail the pull: the chunk is served, not cached.
- The node store on a full disk: a failed write leaves no temp file, evicts a
  little (not everything), raises DiskFull, and the store keeps serving.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from helpers import (
    BLOBSTORE,
    assert_one_line_error,
    cli_env,
    random_bytes,
    run_cli,
    temp_leftovers,
    write,
)
from s3server import free_ports

from blobstore.config import CacheConfig
from blobstore.errors import DiskFull
from blobstore.ids import ChunkId, hash_bytes
from blobstore.manifest import ChunkRef
from blobstore.nodestore import NodeStore
from blobstore.objectstore import chunk_key
from blobstore.stores import open_object_store


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
    assert_one_line_error(proc, "No space left on device")
    assert temp_leftovers(dest) == []
    assert not (dest / "weights.bin").exists()  # never a partial file under its name
    # what did fit is complete (small files go first)
    if (dest / "small.txt").exists():
        assert (dest / "small.txt").read_bytes() == b"fits\n"


def test_full_cache_disk_does_not_fail_the_pull(tmp_path: Path, small_disk: Path) -> None:
    store = f"file://{tmp_path / 'store'}"
    _push(tmp_path, store)
    dest = tmp_path / "out"
    # copy mode keeps a node-owned copy (auto would seed from DEST and not fill the cache)
    proc = run_cli(
        ["pull", "apps/big", dest, "--json", "--link-mode", "copy"],
        cli_env(store, small_disk / "cache"),
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["from"]["origin"] == (12 << 20) + 5
    assert (dest / "weights.bin").read_bytes() == random_bytes(12 << 20, "full-disk")
    warnings = [ln for ln in proc.stderr.splitlines() if "no space left for the cache" in ln]
    assert len(warnings) == 1, proc.stderr  # said once, not once per chunk
    assert _temp_files(small_disk / "cache") == []  # failed cache writes leave nothing


def _temp_files(cache: Path) -> list[Path]:
    return [p for p in (cache / "tmp").rglob("*") if p.is_file() and p.name != ".lock"]


@pytest.fixture
def daemon_on_small_disk(tmp_path: Path, small_disk: Path) -> Iterator[tuple[str, str, Path]]:
    """A real daemon whose cache is the full-to-be tmpfs: (listen, http, cache)."""
    store = f"file://{tmp_path / 'store'}"
    write(tmp_path / "store" / "README", b"a file store\n")
    cache = small_disk / "cache"
    http = f"127.0.0.1:{free_ports(1)[0]}"
    with open(tmp_path / "daemon.log", "w") as log:
        proc = subprocess.Popen(
            [BLOBSTORE, "daemon", "--listen", "127.0.0.1:0", "--http", http, "--peers", "none"],
            env=cli_env(store, cache),
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    assert proc.stdout is not None
    try:
        ready: dict[str, str] = {}
        deadline = time.monotonic() + 30
        while not ready and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 0.1)[0]:
                ready = json.loads(proc.stdout.readline() or "{}")
        assert ready.get("event") == "ready", (tmp_path / "daemon.log").read_text()
        yield ready["listen"], http, cache
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_daemon_with_a_full_cache_disk_keeps_serving(
    tmp_path: Path, daemon_on_small_disk: tuple[str, str, Path]
) -> None:
    _, http, cache = daemon_on_small_disk
    # 12 MiB of chunks the daemon reads through by id (it is every chunk's home)
    ids = anyio.run(_store_chunks, f"file://{tmp_path / 'store'}", 48, 256 << 10)
    for _attempt in range(2):  # into a cache disk that holds under 4 MiB, twice
        for chunk_id in ids:
            with urllib.request.urlopen(f"http://{http}/chunks/{chunk_id}", timeout=30) as resp:
                assert hash_bytes(resp.read()) == chunk_id
        # no partial temp files filling the disk, and the daemon still holds chunks
        assert _temp_files(cache) == []
        held = [p for p in cache.glob("??/*") if p.is_file()]
        assert len(held) >= 4
    with urllib.request.urlopen(f"http://{http}/chunks/{held[0].name}", timeout=10) as resp:
        assert resp.read() == held[0].read_bytes()


async def _store_chunks(store_url: str, count: int, size: int) -> list[ChunkId]:
    ids = []
    async with open_object_store(store_url) as store:
        for i in range(count):
            data = random_bytes(size, f"daemon-chunk-{i}")
            ids.append(hash_bytes(data))
            await store.put(chunk_key(ids[-1]), data)
    return ids


def _store_files(root: Path) -> list[Path]:
    """Every file under the store but its own bookkeeping (index, locks)."""
    own = {"index.sqlite", "index.sqlite-wal", "index.sqlite-shm", "lock", ".lock"}
    return [p for p in root.rglob("*") if p.is_file() and p.name not in own]


@pytest.mark.anyio
async def test_node_store_on_a_full_disk_keeps_serving(small_disk: Path) -> None:
    root = small_disk / "cache"
    piece = 256 << 10
    held: dict[ChunkId, bytes] = {}
    async with NodeStore(CacheConfig(root)) as store:

        async def fill() -> None:
            for i in range(64):  # 16 MiB into 4 MiB
                data = random_bytes(piece, f"loose-{i}")
                await store.put(hash_bytes(data), data)
                held[hash_bytes(data)] = data

        with pytest.raises(DiskFull, match=r"cannot write cache .*: No space left on device"):
            await fill()
        # no temp file left behind, the accounting matches the disk
        assert [p for p in (root / "tmp").rglob("*") if p.is_file() and p.name != ".lock"] == []
        assert sum(p.stat().st_size for p in _store_files(root)) == store.used_bytes
        # it evicted a little to make room, not everything, and serves the rest
        kept = [c for c in held if store.contains(c)]
        assert len(kept) >= len(held) // 2
        for chunk_id in kept:
            assert await store.get(chunk_id) == held[chunk_id]

        # A whole file that cannot fit: the write fails, the temp file goes at once.
        big = random_bytes(8 << 20, "too-big")
        refs = [ChunkRef(hash_bytes(big[o : o + piece]), piece) for o in range(0, len(big), piece)]
        writer = store.begin_file(ChunkId("a" * 64), len(big))

        def write_all() -> None:
            for n in range(len(refs)):
                writer.write(big[n * piece : (n + 1) * piece], n * piece)

        with pytest.raises(DiskFull):
            write_all()
        assert not writer.tmp.exists()
        with pytest.raises(DiskFull):
            await writer.commit(refs)
        assert [p for p in (root / "tmp").rglob("*") if p.is_file() and p.name != ".lock"] == []
        kept = [c for c in held if store.contains(c)]
        assert kept
        for chunk_id in kept:
            assert await store.get(chunk_id) == held[chunk_id]
        # and after the failures, a write that fits succeeds again
        data = random_bytes(piece, "after")
        await store.put(hash_bytes(data), data)
        assert await store.get(hash_bytes(data)) == data
