"""gc: sweep unreferenced objects older than the grace period; evict the cache to its limits."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import botocore.config
import botocore.session
import pytest
from helpers import cli_env, pack, random_bytes, run_cli, write
from s3proxy import CountingProxy, Fault
from s3server import ACCESS_KEY, REGION, SECRET_KEY, SeaweedS3Server

from blobstore.client import Client
from blobstore.config import CacheConfig, Config, PeerConfig, S3Config
from blobstore.errors import InvalidManifest, StoreUnavailable
from blobstore.gc import collect
from blobstore.ids import ChunkId, hash_bytes
from blobstore.manifest import Image, ImageLayer, Tree
from blobstore.nodestore import NodeStore
from blobstore.objectstore import CHUNKS, MANIFESTS, ObjectStore, chunk_key, ref_key
from blobstore.packs import list_packs
from blobstore.s3store import S3ObjectStore
from blobstore.stores import parse_s3_url

pytestmark = pytest.mark.anyio

HOUR = 3600.0


async def keys(store: ObjectStore, prefix: str) -> set[str]:
    return {info.key async for info in store.list(prefix)}


async def two_trees(client: Client, tmp_path: Path) -> tuple[set[ChunkId], set[ChunkId]]:
    """Push trees ``keep`` and ``drop`` sharing one file, then delete ref ``drop``.
    Returns (packs keep names, packs only drop named)."""
    shared = random_bytes(2 << 20, "shared")
    write(tmp_path / "keep" / "shared.bin", shared)
    write(tmp_path / "keep" / "mine.bin", random_bytes(600 << 10, "keep"))
    write(tmp_path / "drop" / "shared.bin", shared)
    write(tmp_path / "drop" / "gone.bin", random_bytes(3 << 20, "drop"))
    pack_sets = []
    for name in ("keep", "drop"):
        await client.push(tmp_path / name, name)
        _, tree = await client.load(name)
        assert isinstance(tree, Tree)
        pack_sets.append({c.pack for c in tree.chunk_refs() if c.pack is not None})
    await client.catalog.delete_ref("drop")
    assert pack_sets[1] - pack_sets[0]  # drop's own file went into a pack of its own
    return pack_sets[0], pack_sets[1] - pack_sets[0]


async def pack_keys(store: ObjectStore) -> set[ChunkId]:
    return set((await list_packs(store)).packs)


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
            f"{MANIFESTS}{await client.catalog.resolve('keep')}"
        }
        age_file_store(store_dir, 2 * HOUR)
        young = random_bytes(1000, "young")  # e.g. an in-flight push's chunk
        await client.origin.put(hash_bytes(young), young)

        result = await collect(client.object_store, None, grace_seconds=HOUR)
        assert (result.refs, result.live_manifests) == (1, 1)
        assert (result.swept_packs, result.swept_chunks) == (len(dropped), 0)
        assert result.swept_manifests == 1
        assert await pack_keys(client.object_store) == keep
        assert await keys(client.object_store, CHUNKS) == {chunk_key(hash_bytes(young))}
        assert not (await keys(client.object_store, MANIFESTS)) & drop_manifest
        # the kept tree is intact
        pulled = await client.pull("keep", tmp_path / "dst")
        assert pulled.files == 2
        again = await collect(client.object_store, None, grace_seconds=HOUR)
        assert (again.swept_packs, again.swept_chunks, again.swept_manifests) == (0, 0, 0)


async def test_grace_and_dry_run_on_every_backend(object_store_url: str, tmp_path: Path) -> None:
    async with Client.open(config_for(object_store_url, tmp_path / "c"), peers=False) as client:
        keep, dropped = await two_trees(client, tmp_path)
        before = await keys(client.object_store, "")
        young = await collect(client.object_store, None, grace_seconds=HOUR)
        assert (young.swept_packs, young.swept_manifests) == (0, 0)  # everything is young
        # A negative grace puts the cutoff in the future: every unreferenced object is "old".
        dry = await collect(client.object_store, None, grace_seconds=-HOUR, dry_run=True)
        assert (dry.swept_packs, dry.swept_manifests, dry.dry_run) == (len(dropped), 1, True)
        assert await keys(client.object_store, "") == before
        real = await collect(client.object_store, None, grace_seconds=-HOUR)
        assert (real.swept_packs, real.swept_manifests) == (len(dropped), 1)
        assert await pack_keys(client.object_store) == keep
        assert (await client.pull("keep", tmp_path / "dst")).files == 2


async def test_undecodable_intact_manifest_sweeps_nothing(
    object_store_url: str, tmp_path: Path
) -> None:
    """Bytes that match their id but do not decode may be a newer format: whatever
    it names might be live, so gc sweeps nothing rather than guess."""
    async with Client.open(config_for(object_store_url, tmp_path / "c"), peers=False) as client:
        await two_trees(client, tmp_path)
        future = pack({"v": 99, "kind": "tree", "entries": []})
        await client.object_store.put(f"{MANIFESTS}{hash_bytes(future)}", future)
        await client.object_store.put(ref_key("future"), hash_bytes(future).encode() + b"\n")
        before = await keys(client.object_store, "")
        with pytest.raises(InvalidManifest, match="version 99"):
            await collect(client.object_store, None, grace_seconds=-HOUR)
        assert await keys(client.object_store, "") == before


async def test_bad_refs_are_reported_and_do_not_block_gc(
    object_store_url: str, tmp_path: Path
) -> None:
    """A ref holding garbage, a dangling ref, a ref to a corrupt manifest, and an
    image with one layer manifest missing: each is reported, everything a ref still
    reaches is kept, and the rest is swept (was: gc refused to sweep anything)."""
    async with Client.open(config_for(object_store_url, tmp_path / "c"), peers=False) as client:
        store = client.object_store
        await two_trees(client, tmp_path)
        keep_id = await client.catalog.resolve("keep")
        write(tmp_path / "victim" / "w.bin", random_bytes(700 << 10, "victim"))
        await client.push(tmp_path / "victim", "victim")
        victim_id = await client.catalog.resolve("victim")
        await store.put(f"{MANIFESTS}{victim_id}", b"\x00" * 40)  # corrupt in place
        gone = hash_bytes(b"a manifest that was never stored")
        image = Image(
            b"{}",
            "application/vnd.oci.image.manifest.v1+json",
            b"{}",
            (ImageLayer("sha256:" + "1" * 64, keep_id), ImageLayer("sha256:" + "2" * 64, gone)),
        )
        image_id = await client.catalog.save(image)
        await store.put(ref_key("img"), image_id.encode() + b"\n")
        await store.put(ref_key("garbage"), b"not an id\n")
        await store.put(ref_key("dangling"), gone.encode() + b"\n")
        orphan = random_bytes(1000, "orphan")  # an unreferenced loose chunk
        await store.put(chunk_key(hash_bytes(orphan)), orphan)
        before = await keys(store, "")

        result = await collect(store, None, grace_seconds=-HOUR)
        problems = "\n".join(result.bad_refs)
        assert len(result.bad_refs) == 4, problems
        for needle in (
            "'garbage' holds",
            f"'dangling' reaches manifest {gone}, which is missing",
            f"'victim' reaches manifest {victim_id}, which is corrupt",
            f"'img' reaches manifest {gone}, which is missing",
        ):
            assert needle in problems
        # the rest is collected: drop's manifest, the orphan chunk (and, whatever
        # the chunk layout, nothing keep needs: it still pulls and verifies)
        assert result.swept_manifests == 1
        left = await keys(store, "")
        assert chunk_key(hash_bytes(orphan)) not in left
        assert {f"{MANIFESTS}{m}" for m in (keep_id, image_id, victim_id)} <= left
        assert len(before - left) >= 2
        assert (await client.pull("keep", tmp_path / "dst")).files == 2
        assert (await client.verify("keep")).ok


@pytest.mark.s3
async def test_store_unavailable_while_marking_sweeps_nothing(
    s3_env: SeaweedS3Server, tmp_path: Path
) -> None:
    url = s3_env.bucket_url()
    async with Client.open(config_for(url, tmp_path / "c"), peers=False) as client:
        await two_trees(client, tmp_path)
        before = await keys(client.object_store, "")
    bucket, prefix = parse_s3_url(url)
    async with CountingProxy.to_endpoint(s3_env.endpoint) as proxy:
        proxy.arm(Fault("truncate", "GET", "/refs/keep", at=10))
        async with S3ObjectStore(
            bucket, prefix, S3Config.from_env(endpoint_url=proxy.endpoint)
        ) as store:
            with pytest.raises(StoreUnavailable, match="cut short"):
                await collect(store, None, grace_seconds=-HOUR)
            proxy.disarm()
            assert await keys(store, "") == before


@pytest.mark.s3
def test_s3_folder_key_under_refs_breaks_neither_ls_nor_gc(
    s3_server: SeaweedS3Server, tmp_path: Path
) -> None:
    """S3 consoles make "folders" as zero-byte keys ending in '/' (refs/apps/)."""
    url = s3_server.bucket_url()
    env = cli_env(url, tmp_path / "cache", s3_server.client_env())
    write(tmp_path / "src" / "a.bin", random_bytes(1 << 20, "folder"))
    assert run_cli(["push", tmp_path / "src", "apps/a"], env).returncode == 0
    bucket, prefix = parse_s3_url(url)
    for folder in ("refs/", "refs/apps/", "refs/empty/"):
        put_raw(s3_server, bucket, f"{prefix}/{folder}")
    ls = run_cli(["ls", "--json"], env)
    assert ls.returncode == 0, ls.stderr
    assert [row["ref"] for row in json.loads(ls.stdout)] == ["apps/a"]
    assert "Traceback" not in ls.stderr
    gc = run_cli(["gc", "--json", "--grace", "0s"], env)
    assert gc.returncode == 0, gc.stderr
    assert (json.loads(gc.stdout)["refs"], json.loads(gc.stdout)["bad_refs"]) == (1, [])


def put_raw(s3: SeaweedS3Server, bucket: str, key: str) -> None:
    """An empty object under any key, as an S3 console makes one (no key checks)."""
    client = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=s3.endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=botocore.config.Config(s3={"addressing_style": "path"}),
    )
    try:
        client.put_object(Bucket=bucket, Key=key, Body=b"")
    finally:
        client.close()


def test_cli_ls_and_gc_report_bad_refs(tmp_path: Path) -> None:
    store = tmp_path / "store"
    env = cli_env(store.as_uri(), tmp_path / "cache")
    write(tmp_path / "src" / "a.bin", random_bytes(1 << 20, "cli-bad"))
    assert run_cli(["push", tmp_path / "src", "good"], env).returncode == 0
    write(store / "refs" / "garbage", b"\xff\xfe")
    write(store / "refs" / "dangling", b"ab" * 32 + b"\n")
    ls = run_cli(["ls"], env)
    assert ls.returncode == 0, ls.stderr
    assert [line.split()[-1] for line in ls.stdout.splitlines()] == ["dangling", "garbage", "good"]
    assert ls.stdout.count("(broken)") == 1  # garbage; dangling shows the id it holds
    assert "Traceback" not in ls.stderr
    assert "'dangling' names manifest" in ls.stderr
    assert "'garbage' holds" in ls.stderr
    gc = run_cli(["gc", "--grace", "0s"], env)
    assert gc.returncode == 0, gc.stderr
    assert "2 bad refs" in gc.stdout
    assert "'dangling' reaches manifest" in gc.stderr
    assert "'garbage' holds" in gc.stderr


async def test_cache_is_evicted_to_its_limits(tmp_path: Path) -> None:
    store = (tmp_path / "store").as_uri()
    async with Client.open(config_for(store, tmp_path / "c"), peers=False) as client:
        write(tmp_path / "src" / "a.bin", random_bytes(8 << 20, "evict"))
        await client.push(tmp_path / "src", "t")
        # copy mode: the node store owns a copy (auto on ext4 would only seed DEST)
        await client.pull("t", tmp_path / "dst", link_mode="copy")
        filled = client.cache.used_bytes
    assert filled == 8 << 20
    small = CacheConfig(tmp_path / "c", max_bytes=4 << 20, high_watermark=0.9, low_watermark=0.5)
    async with (
        NodeStore(small) as cache,
        Client.open(config_for(store, tmp_path / "c2"), peers=False) as client,
    ):
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
    env = cli_env((tmp_path / "store").as_uri(), tmp_path / "cache", {"BLOBSTORE_CACHE_SIZE": "1M"})
    write(tmp_path / "src" / "a.bin", random_bytes(3 << 20, "cli-gc"))
    assert run_cli(["push", tmp_path / "src", "t"], env).returncode == 0
    assert run_cli(["pull", "t", tmp_path / "dst"], env).returncode == 0
    proc = run_cli(["gc", "--json", "--grace", "1h"], env)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert {
        "cache_evicted_bytes",
        "cache_bytes",
        "refs",
        "swept_chunks",
        "swept_manifests",
        "swept_bytes",
        "dry_run",
    } <= doc.keys()
    assert doc["cache_bytes"] <= 1 << 20
    assert (doc["refs"], doc["swept_chunks"]) == (1, 0)
