"""gc: sweep unreferenced objects older than the grace period; evict the cache to its limits."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from helpers import cli_env, random_bytes, run_cli, write

from blobstore.client import Client
from blobstore.config import CacheConfig, Config, PeerConfig
from blobstore.errors import InvalidManifest
from blobstore.gc import collect
from blobstore.ids import ChunkId, hash_bytes
from blobstore.manifest import Tree
from blobstore.nodestore import NodeStore
from blobstore.objectstore import CHUNKS, MANIFESTS, ObjectStore, chunk_key, ref_key

pytestmark = pytest.mark.anyio

HOUR = 3600.0


async def keys(store: ObjectStore, prefix: str) -> set[str]:
    return {info.key async for info in store.list(prefix)}


async def two_trees(client: Client, tmp_path: Path) -> tuple[set[ChunkId], set[ChunkId]]:
    """Push trees ``keep`` and ``drop`` sharing one file, then delete ref ``drop``.
    Returns (chunks of keep, chunks only drop had)."""
    shared = random_bytes(2 << 20, "shared")
    write(tmp_path / "keep" / "shared.bin", shared)
    write(tmp_path / "keep" / "mine.bin", random_bytes(600 << 10, "keep"))
    write(tmp_path / "drop" / "shared.bin", shared)
    write(tmp_path / "drop" / "gone.bin", random_bytes(3 << 20, "drop"))
    chunk_sets = []
    for name in ("keep", "drop"):
        await client.push(tmp_path / name, name)
        _, tree = await client.load(name)
        assert isinstance(tree, Tree)
        chunk_sets.append({c.id for c in tree.chunk_refs()})
    await client.catalog.delete_ref("drop")
    return chunk_sets[0], chunk_sets[1] - chunk_sets[0]


def age_file_store(root: Path, seconds: float) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            old = time.time() - seconds
            os.utime(path, (old, old))


def config_for(url: str, cache: Path, max_bytes: int = 1 << 30) -> Config:
    return Config(url, CacheConfig(cache, max_bytes=max_bytes), peers=PeerConfig(mode="none"))


async def test_sweeps_only_old_unreferenced_objects(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    async with Client.open(config_for(store_dir.as_uri(), tmp_path / "c"), peers=False) as client:
        keep, dropped = await two_trees(client, tmp_path)
        drop_manifest = (await keys(client.object_store, MANIFESTS)) - {
            f"{MANIFESTS}{await client.catalog.resolve('keep')}"}
        age_file_store(store_dir, 2 * HOUR)
        young = random_bytes(1000, "young")  # e.g. an in-flight push's chunk
        await client.origin.put(hash_bytes(young), young)

        result = await collect(client.object_store, None, grace_seconds=HOUR)
        assert (result.refs, result.live_manifests) == (1, 1)
        assert result.swept_chunks == len(dropped)
        assert result.swept_manifests == 1
        left = await keys(client.object_store, CHUNKS)
        assert left == {chunk_key(c) for c in keep} | {chunk_key(hash_bytes(young))}
        assert not (await keys(client.object_store, MANIFESTS)) & drop_manifest
        # the kept tree is intact
        pulled = await client.pull("keep", tmp_path / "dst")
        assert pulled.files == 2
        again = await collect(client.object_store, None, grace_seconds=HOUR)
        assert (again.swept_chunks, again.swept_manifests) == (0, 0)


async def test_grace_and_dry_run_on_every_backend(object_store_url: str, tmp_path: Path) -> None:
    async with Client.open(config_for(object_store_url, tmp_path / "c"), peers=False) as client:
        keep, dropped = await two_trees(client, tmp_path)
        before = await keys(client.object_store, "")
        young = await collect(client.object_store, None, grace_seconds=HOUR)
        assert (young.swept_chunks, young.swept_manifests) == (0, 0)  # everything is young
        # A negative grace puts the cutoff in the future: every unreferenced object is "old".
        dry = await collect(client.object_store, None, grace_seconds=-HOUR, dry_run=True)
        assert (dry.swept_chunks, dry.swept_manifests, dry.dry_run) == (len(dropped), 1, True)
        assert await keys(client.object_store, "") == before
        real = await collect(client.object_store, None, grace_seconds=-HOUR)
        assert (real.swept_chunks, real.swept_manifests) == (len(dropped), 1)
        assert await keys(client.object_store, CHUNKS) == {chunk_key(c) for c in keep}
        assert (await client.pull("keep", tmp_path / "dst")).files == 2


async def test_unreadable_ref_sweeps_nothing(object_store_url: str, tmp_path: Path) -> None:
    async with Client.open(config_for(object_store_url, tmp_path / "c"), peers=False) as client:
        await two_trees(client, tmp_path)
        await client.object_store.put(ref_key("broken"), b"not an id\n")
        before = await keys(client.object_store, "")
        with pytest.raises(InvalidManifest, match="broken"):
            await collect(client.object_store, None, grace_seconds=-HOUR)
        assert await keys(client.object_store, "") == before


async def test_cache_is_evicted_to_its_limits(tmp_path: Path) -> None:
    store = (tmp_path / "store").as_uri()
    async with Client.open(config_for(store, tmp_path / "c"), peers=False) as client:
        write(tmp_path / "src" / "a.bin", random_bytes(8 << 20, "evict"))
        await client.push(tmp_path / "src", "t")
        await client.pull("t", tmp_path / "dst")
        filled = client.cache.used_bytes
    assert filled == 8 << 20
    small = CacheConfig(tmp_path / "c", max_bytes=4 << 20, high_watermark=0.9, low_watermark=0.5)
    async with NodeStore(small) as cache, Client.open(
        config_for(store, tmp_path / "c2"), peers=False
    ) as client:
        result = await collect(client.object_store, cache, grace_seconds=HOUR)
        assert cache.used_bytes <= 2 << 20
        # the store enforces its limit when it opens; gc evicts whatever is still over
        assert cache.evicted_bytes == filled - cache.used_bytes
        assert result.cache_evicted_bytes <= cache.evicted_bytes
        assert result.cache_bytes == cache.used_bytes
        assert (result.swept_chunks, result.swept_manifests) == (0, 0)
    async with NodeStore(small) as cache:
        assert cache.used_bytes <= 2 << 20  # the files are really gone


def test_cli_gc_json(tmp_path: Path) -> None:
    env = cli_env((tmp_path / "store").as_uri(), tmp_path / "cache",
                  {"BLOBSTORE_CACHE_SIZE": "1M"})
    write(tmp_path / "src" / "a.bin", random_bytes(3 << 20, "cli-gc"))
    assert run_cli(["push", tmp_path / "src", "t"], env).returncode == 0
    assert run_cli(["pull", "t", tmp_path / "dst"], env).returncode == 0
    proc = run_cli(["gc", "--json", "--grace", "1h"], env)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert {"cache_evicted_bytes", "cache_bytes", "refs", "swept_chunks",
            "swept_manifests", "swept_bytes", "dry_run"} <= doc.keys()
    assert doc["cache_bytes"] <= 1 << 20
    assert (doc["refs"], doc["swept_chunks"]) == (1, 0)
