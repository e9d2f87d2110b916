"""The push index (git's index, for push): a file whose stat matches what the
node recorded is not read again; a changed file (even with size and mtime
restored), a racily clean one, a chunk in a pack that went missing or that
verify found bad are. A push with nothing to do makes two requests. And a new
process locating chunks by id reads only the pack indexes this node lacks."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from helpers import cli_env, random_bytes, run_cli, snapshot, write
from s3proxy import CountingProxy
from s3server import SeaweedS3Server

from blobstore.client import Client
from blobstore.config import CacheConfig, Config, PeerConfig
from blobstore.manifest import Tree
from blobstore.objectstore import pack_key
from blobstore.packs import PackConfig, list_packs

pytestmark = pytest.mark.anyio

MiB = 1 << 20
WINDOW_NS = 100_000_000
"""A short racy window, so tests need not wait 2 s for files to be clean."""


def config_for(store_url: str, cache: Path) -> Config:
    return Config(store_url=store_url, cache=CacheConfig(cache), peers=PeerConfig(mode="none"))


@pytest.fixture
async def client(object_store_url: str, tmp_path: Path) -> AsyncIterator[Client]:
    async with Client.open(config_for(object_store_url, tmp_path / "cache"), peers=False) as c:
        c.packs = PackConfig(target_bytes=2 * MiB, uploads=2)
        c.racy_window_ns = WINDOW_NS
        yield c


def clean_tree(root: Path) -> Path:
    """A tree whose files are older than the racy window."""
    write(root / "big.bin", random_bytes(8 * MiB, "big"))
    write(root / "a/small.txt", b"small\n")
    write(root / "a/other.bin", random_bytes(300_000, "other"))
    write(root / "empty", b"")
    time.sleep(3 * WINDOW_NS / 1e9)
    return root


HAS_PROC_IO = Path("/proc/self/io").exists()


def overwrite_in_place(path: Path, offset: int, data: bytes) -> None:
    """Same inode, same size; mtime and ctime move."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def rchar() -> int:
    """Bytes this process passed to read() and friends (files, pipes)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


async def test_noop_push_reads_no_file_bytes(client: Client, tmp_path: Path) -> None:
    src = clean_tree(tmp_path / "src")
    first = await client.push(src, "t")
    assert (first.reused_files, first.read_bytes) == (0, first.bytes)
    has_proc = HAS_PROC_IO
    before = rchar() if has_proc else 0
    again = await client.push(src, "t")
    read = rchar() - before if has_proc else 0
    assert (again.manifest, again.new_chunks, again.read_bytes) == (first.manifest, 0, 0)
    assert again.reused_files == again.files == 4
    assert again.chunks == first.chunks
    if has_proc:
        assert read < 1 * MiB, read  # the 8 MiB file was not read
    # another ref of the same tree: the full path (lease, manifest, ref), still no reads
    other = await client.push(src, "u")
    assert (other.manifest, other.read_bytes, other.reused_files) == (first.manifest, 0, 4)
    assert await client.catalog.resolve("u") == first.manifest
    pulled = await client.pull("u", tmp_path / "dst")
    assert pulled.files == 4
    assert snapshot(tmp_path / "dst") == snapshot(src)


async def test_file_changed_in_place_with_size_and_mtime_restored_is_read(
    client: Client, tmp_path: Path
) -> None:
    src = clean_tree(tmp_path / "src")
    first = await client.push(src, "t")
    path = src / "a/other.bin"
    st = os.stat(path)
    overwrite_in_place(path, 1000, b"changed!")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        st.st_size,
        st.st_mtime_ns,
        st.st_ino,
    )
    assert after.st_ctime_ns != st.st_ctime_ns
    again = await client.push(src, "t")
    assert again.manifest != first.manifest
    assert (again.reused_files, again.read_bytes) == (3, st.st_size)
    pulled = await client.pull("t", tmp_path / "dst")
    assert pulled.files == 4
    assert snapshot(tmp_path / "dst") == snapshot(src)


async def test_racily_clean_file_is_read_again(client: Client, tmp_path: Path) -> None:
    src = clean_tree(tmp_path / "src")
    fresh = write(src / "fresh.bin", random_bytes(200_000, "fresh"))  # inside the window
    first = await client.push(src, "t")
    assert first.read_bytes == first.bytes
    await anyio.sleep(3 * WINDOW_NS / 1e9)  # fresh.bin is clean now, but was not recorded
    again = await client.push(src, "t")  # so it is read again, though its stat matches
    assert (again.manifest, again.new_chunks) == (first.manifest, 0)
    assert (again.reused_files, again.read_bytes) == (4, fresh.stat().st_size)
    third = await client.push(src, "t")  # clean now (the second push recorded it)
    assert (third.reused_files, third.read_bytes) == (5, 0)


async def test_default_window_rereads_files_just_written(
    object_store_url: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    write(src / "a.bin", random_bytes(100_000, "a"))
    async with Client.open(config_for(object_store_url, tmp_path / "cache"), peers=False) as c:
        first = await c.push(src, "t")
        again = await c.push(src, "t")  # written < 2 s before the first push began
    assert (again.manifest, again.new_chunks) == (first.manifest, 0)
    assert (again.reused_files, again.read_bytes) == (0, 100_000)


async def test_missing_pack_or_bad_location_is_not_reused(client: Client, tmp_path: Path) -> None:
    src = clean_tree(tmp_path / "src")
    await client.push(src, "t")
    _, tree = await client.load("t")
    assert isinstance(tree, Tree)
    packs = sorted({c.pack for c in tree.chunk_refs() if c.pack is not None})
    assert len(packs) >= 3
    await client.object_store.delete(pack_key(packs[0]))  # the push index still names it
    lost = {c.id for c in tree.chunk_refs() if c.pack == packs[0]}
    again = await client.push(src, "t")
    assert again.new_chunks == len(lost)
    hit = [e for e in tree.entries if any(c.pack == packs[0] for c in e.chunks)]
    assert again.read_bytes == sum(e.size for e in hit)  # only the files with lost chunks
    assert again.reused_files == 4 - len(hit)
    _, fixed = await client.load("t")
    assert isinstance(fixed, Tree)
    assert packs[0] not in {c.pack for c in fixed.chunk_refs()}
    assert (await client.verify("t")).ok

    bad = next(c for c in fixed.chunk_refs() if c.pack == packs[1])
    client.index_cache.add_bad({(bad.id, packs[1])})  # as verify records it
    third = await client.push(src, "t")
    assert third.new_chunks >= 1
    assert third.read_bytes > 0
    _, moved = await client.load("t")
    assert isinstance(moved, Tree)
    assert (bad.id, packs[1]) not in {(c.id, c.pack) for c in moved.chunk_refs()}
    pulled = await client.pull("t", tmp_path / "dst")
    assert pulled.files == 4
    assert snapshot(tmp_path / "dst") == snapshot(src)


# --------------------------------------------------------------------------- requests


@pytest.mark.s3
async def test_noop_push_makes_two_requests_and_new_processes_read_new_indexes_only(
    s3_env: SeaweedS3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted at the wire by a proxy in front of SeaweedFS."""
    src = clean_tree(tmp_path / "src")
    cache = tmp_path / "cache"
    url = s3_env.bucket_url()
    async with CountingProxy.to_endpoint(s3_env.endpoint) as proxy:
        proxy.http = True
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        async with Client.open(config_for(url, cache), peers=False) as c:
            c.packs = PackConfig(target_bytes=2 * MiB)
            c.racy_window_ns = WINDOW_NS
            first = await c.push(src, "t")
            proxy.reset()
            again = await c.push(src, "t")
            noop = dict(proxy.requests)
            packs = len((await list_packs(c.object_store)).packs)
        assert (again.new_chunks, again.read_bytes) == (0, 0)
        assert noop == {"GET": 2}, noop  # the ref, one LIST of packs/; no lease, no writes
        assert first.chunks > 5 * sum(noop.values())

        # A second process (a new client on the node's cache) locating by id:
        # the LIST, then only the chunk's ranged GET (every index is cached).
        async with Client.open(config_for(url, cache), peers=False) as c2:
            _, t = await c2.load("t")
            assert isinstance(t, Tree)
            chunk = next(iter(t.chunk_refs()))
            proxy.reset()
            data = await c2.origin.get(chunk.id)
            assert len(data) == chunk.size
            assert c2.origin.locator.index_fetches == 0
            assert proxy.requests["GET"] == 2, proxy.requests
        # New packs from elsewhere: the next process reads just their indexes.
        write(tmp_path / "more/new.bin", random_bytes(5 * MiB, "new"))
        async with Client.open(config_for(url, tmp_path / "other-cache"), peers=False) as c3:
            c3.packs = PackConfig(target_bytes=2 * MiB)
            await c3.push(tmp_path / "more", "more")
            _, more = await c3.load("more")
            new_packs = len((await list_packs(c3.object_store)).packs) - packs
        assert new_packs >= 2
        assert isinstance(more, Tree)
        async with Client.open(config_for(url, cache), peers=False) as c4:
            proxy.reset()
            chunk = next(iter(more.chunk_refs()))
            assert len(await c4.origin.get(chunk.id)) == chunk.size
            assert c4.origin.locator.index_fetches == new_packs
            assert proxy.requests["GET"] == 2 + new_packs, proxy.requests


def test_cli_noop_push_reports_nothing_read(object_store_url: str, tmp_path: Path) -> None:
    """As a user runs it, with the default 2 s racy window: the second push of
    an unchanged tree reads no file bytes (push --json says so)."""
    src = tmp_path / "src"
    write(src / "big.bin", random_bytes(3 * MiB, "cli"))
    write(src / "d/small.txt", b"hello\n")
    time.sleep(2.2)  # older than the racy window when the first push begins
    env = cli_env(object_store_url, tmp_path / "cache")
    docs = []
    for _ in range(2):
        proc = run_cli(["push", src, "t", "--json"], env)
        assert proc.returncode == 0, proc.stderr
        docs.append(json.loads(proc.stdout))
    first, again = docs
    assert (first["read_bytes"], first["reused_files"]) == (first["bytes"], 0)
    assert (again["read_bytes"], again["reused_files"]) == (0, 2)
    assert (again["manifest"], again["new_chunks"]) == (first["manifest"], 0)
