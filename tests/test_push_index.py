"""The push index (git's index, for push): a file whose stat matches what the
node recorded is not read again; a changed file (even with size and mtime
restored), a racily clean one, a chunk in a pack that went missing or that
verify found bad are. A push with nothing to do makes one request (two once its
push index is stale); a pack gone under the ref it names is found by verify or
by that LIST, and a ref moved by a gc's repack sends the push the full way. And
a new process locating chunks by id reads only the pack indexes this node lacks."""

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
from blobstore.gc import collect
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
    client.push_index_fresh_ns = 0  # the push index is stale: a no-op push LISTs packs/
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
async def test_noop_push_makes_one_request_and_new_processes_read_new_indexes_only(
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
            noop = list(proxy.exchanges)
            c.push_index_fresh_ns = 0
            proxy.reset()
            stale = await c.push(src, "t")
            listed = list(proxy.exchanges)
            c.push_index_fresh_ns = 3600 * 10**9
            proxy.reset()
            await c.push(src, "t")  # the LIST refreshed the push index
            refreshed = list(proxy.exchanges)
            touched = src / "a/other.bin"
            touched.write_bytes(touched.read_bytes())  # same bytes, new mtime and ctime
            proxy.reset()
            rewritten = await c.push(src, "t")
            read_back = list(proxy.exchanges)
            await anyio.sleep(3 * WINDOW_NS / 1e9)
            proxy.reset()
            await c.push(src, "t")
            recorded = list(proxy.exchanges)
            listing = await list_packs(c.object_store)
        assert (again.new_chunks, again.read_bytes) == (0, 0)
        assert [m for m, _ in noop] == ["GET"], noop  # the ref; no lease, no LIST, no writes
        assert noop[0][1].endswith("/refs/t")
        assert (stale.new_chunks, stale.read_bytes, stale.manifest) == (0, 0, first.manifest)
        assert [m for m, _ in listed] == ["GET", "GET"], listed  # the ref, a LIST of packs/
        assert "list-type=2" in listed[1][1]
        assert [m for m, _ in refreshed] == ["GET"], refreshed
        assert first.chunks > 5 * len(listed)
        # a file rewritten with the same bytes: read, located in the ref's manifest,
        # nothing written (no lease); once older than the racy window, recorded
        assert (rewritten.manifest, rewritten.read_bytes) == (first.manifest, 300_000)
        assert [m for m, _ in read_back] == ["GET", "GET"], read_back
        assert read_back[1][1].endswith(f"/manifests/{first.manifest}")
        assert [m for m, _ in recorded] == ["GET", "GET"], recorded  # racy when pushed
        async with Client.open(config_for(url, cache), peers=False) as c:
            c.racy_window_ns = WINDOW_NS
            proxy.reset()
            await c.push(src, "t")
        assert [m for m, _ in proxy.exchanges] == ["GET"], proxy.exchanges
        # a new file: the full way at once (no GET of the ref or its manifest first)
        write(src / "a/new.txt", b"new\n")
        async with Client.open(config_for(url, cache), peers=False) as c:
            c.racy_window_ns = WINDOW_NS
            proxy.reset()
            grown = await c.push(src, "t")
            new_file = list(proxy.exchanges)
        assert grown.new_chunks == 1
        assert new_file[0][0] == "PUT", new_file
        assert "/leases/write-" in new_file[0][1]
        assert [m for m, t in new_file if "/refs/" in t] == ["PUT"], new_file
        packs = len(listing.packs)

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
        # New packs from elsewhere: the next process reads just their (one) index.
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
            assert c4.origin.locator.index_fetches == 1  # one group index for the push
            assert proxy.requests["GET"] == 3, proxy.requests


async def test_pack_gone_under_an_unchanged_ref_is_repaired_after_verify_or_a_list(
    client: Client, tmp_path: Path
) -> None:
    """Damage outside blobstore (a pack deleted by hand) under a ref that still
    names the tree: a no-op push within the push index's freshness trusts the
    ref (one GET, nothing written, nothing made worse); verify finds the pack
    missing and the next push uploads its chunks again; so does a no-op push
    once its push index is stale (its LIST shows the pack gone)."""
    src = clean_tree(tmp_path / "src")
    first = await client.push(src, "t")
    _, tree = await client.load("t")
    assert isinstance(tree, Tree)
    packs = sorted({c.pack for c in tree.chunk_refs() if c.pack is not None})
    await client.object_store.delete(pack_key(packs[0]))
    trusted = await client.push(src, "t")
    assert (trusted.manifest, trusted.new_chunks) == (first.manifest, 0)
    checked = await client.verify("t")
    assert not checked.ok
    assert checked.missing
    fixed = await client.push(src, "t")  # verify recorded the bad locations
    assert fixed.new_chunks == len({c.id for c in tree.chunk_refs() if c.pack == packs[0]})
    assert (await client.verify("t")).ok

    _, tree = await client.load("t")
    assert isinstance(tree, Tree)
    await client.object_store.delete(pack_key(packs[1]))
    client.push_index_fresh_ns = 0
    again = await client.push(src, "t")
    assert again.new_chunks == len({c.id for c in tree.chunk_refs() if c.pack == packs[1]})
    assert (await client.verify("t")).ok
    pulled = await client.pull("t", tmp_path / "dst")
    assert snapshot(tmp_path / "dst") == snapshot(src)
    assert pulled.files == 4


async def test_fresh_push_index_after_another_writer_and_gc_never_names_a_gone_pack(
    object_store_url: str, client: Client, tmp_path: Path
) -> None:
    """The push index names packs that another writer's push and a gc removed
    (or a gc repacked): the ref no longer names that tree, so the push takes the
    full path, whose LIST shows them gone, and uploads or relocates the chunks."""
    src = clean_tree(tmp_path / "src")
    first = await client.push(src, "t")
    async with Client.open(config_for(object_store_url, tmp_path / "other"), peers=False) as b:
        b.packs = PackConfig(target_bytes=2 * MiB)
        write(tmp_path / "b/new.bin", random_bytes(MiB, "b"))
        await b.push(tmp_path / "b", "t")  # another node moves the ref
    swept = await collect(client.object_store, None, grace_seconds=0)
    assert swept.swept_packs >= 3  # every pack of the first push
    again = await client.push(src, "t")  # the push index still names them all
    assert again.manifest != first.manifest
    assert again.new_chunks == first.new_chunks
    assert (await client.verify("t")).ok

    # a gc repack moves the ref onto new packs: the next push follows it
    write(tmp_path / "one/big.bin", random_bytes(8 * MiB, "big"))  # a part of src
    await anyio.sleep(3 * WINDOW_NS / 1e9)
    pushed = await client.push(tmp_path / "one", "one")
    assert pushed.new_chunks == 0
    await client.catalog.delete_ref("t")
    gc = await collect(client.object_store, None, grace_seconds=0, repack_below=1.0)
    assert gc.repacked_packs >= 1
    moved = await client.catalog.resolve("one")
    assert moved != pushed.manifest
    same = await client.push(tmp_path / "one", "one")
    assert (same.manifest, same.new_chunks, same.reused_files) == (moved, 0, 1)
    assert (await client.verify("one")).ok


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
