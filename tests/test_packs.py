"""Packs (issue 8): the index codec, the pack writer, dedup from pack indexes
(no request per chunk), stale caches and missing packs, verify/repair of bad
chunks (issue 10 item 12), migrate from the per-chunk layout, and gc that sweeps
and repacks packs without ever breaking a ref — on file:// and SeaweedFS S3."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import blake3
import pytest
from helpers import (
    cli_env,
    pack,
    random_bytes,
    run_cli,
    snapshot,
    write,
)
from s3proxy import CountingProxy, Fault
from s3server import SeaweedS3Server

from blobstore.chunker import DEFAULT_PARAMS, Chunker
from blobstore.client import Client
from blobstore.config import CacheConfig, Config, PeerConfig
from blobstore.errors import Corrupt, StoreUnavailable
from blobstore.gc import collect
from blobstore.ids import ChunkId, hash_bytes, id_to_bytes
from blobstore.manifest import ChunkRef, Layer, Tree
from blobstore.objectstore import CHUNKS, ObjectStore, chunk_key, index_key, pack_key
from blobstore.packs import (
    PackConfig,
    decode_group_index,
    decode_index,
    encode_group_index,
    encode_index,
    group_index_key,
    group_of,
    group_pack_id,
    list_packs,
    new_group_id,
    new_pack_id,
)
from blobstore.source import ChunkData
from blobstore.stores import open_object_store

pytestmark = pytest.mark.anyio

MiB = 1 << 20


def config_for(store_url: str, cache: Path) -> Config:
    return Config(store_url=store_url, cache=CacheConfig(cache), peers=PeerConfig(mode="none"))


@pytest.fixture
async def client(object_store_url: str, tmp_path: Path) -> AsyncIterator[Client]:
    async with Client.open(config_for(object_store_url, tmp_path / "cache"), peers=False) as c:
        c.packs = PackConfig(target_bytes=2 * MiB, uploads=2)
        yield c


def tree_of(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        write(root / name, data)
    return root


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return tree_of(
        tmp_path / "src",
        {
            "big.bin": random_bytes(5 * MiB, "big"),
            "a/small.txt": b"small\n",
            "a/other.bin": random_bytes(300_000, "other"),
            "copy-of-big.bin": random_bytes(5 * MiB, "big"),
        },
    )


async def load_tree(client: Client, ref: str) -> Tree:
    _, tree = await client.load(ref)
    assert isinstance(tree, Tree)
    return tree


async def damage(store: ObjectStore, ref: ChunkRef) -> None:
    """Overwrite ``ref``'s bytes inside its pack (the pack keeps its size)."""
    assert ref.pack is not None
    data = bytearray(await store.get(pack_key(ref.pack)))
    data[ref.offset : ref.offset + ref.size] = b"\0" * ref.size
    await store.put(pack_key(ref.pack), bytes(data))


# --------------------------------------------------------------------------- index codec


def test_index_round_trip_and_refusals() -> None:
    pack_id = new_pack_id()
    a, b = hash_bytes(b"a"), hash_bytes(b"bb")
    refs = (ChunkRef(a, 1, pack_id, 0), ChunkRef(b, 2, pack_id, 1))
    data = encode_index(pack_id, refs)
    assert decode_index(pack_id, data) == refs
    flipped = bytearray(data)
    flipped[50] ^= 1
    for bad, why in [
        (data[:-1], "checksum"),
        (bytes(flipped), "checksum"),
        (b"", "truncated"),
        (encode_index(new_pack_id(), refs), "another pack"),
        (_resealed(data, lambda body: body.replace(b"BSPACKIX", b"BSPACKIY")), "format"),
    ]:
        with pytest.raises(Corrupt, match=why) as info:
            decode_index(pack_id, bad)
        assert "\n" not in str(info.value)
    gap = (ChunkRef(a, 1, pack_id, 0), ChunkRef(b, 2, pack_id, 5))  # not end to end
    with pytest.raises(Corrupt, match="bad chunk extent"):
        decode_index(pack_id, encode_index(pack_id, gap))


def test_group_index_round_trip_and_refusals() -> None:
    group = new_group_id()
    first, second = group_pack_id(group, 0), group_pack_id(group, 1)
    a, b, c = hash_bytes(b"a"), hash_bytes(b"bb"), hash_bytes(b"ccc")
    packs = {
        first: (ChunkRef(a, 1, first, 0), ChunkRef(b, 2, first, 1)),
        second: (ChunkRef(c, 3, second, 0),),
    }
    data = encode_group_index(group, [*packs[second], *packs[first]])  # any order in
    assert decode_group_index(group, data) == packs
    head = struct.pack("<8sB28sI", b"BSPACKIX", 2, bytes.fromhex(group), 3)
    entry = struct.pack("<32sIQI", id_to_bytes(a), 0, 0, 1)
    assert data.startswith(head + entry)  # the layout is part of the store format
    flipped = bytearray(data)
    flipped[60] ^= 1
    gap = (ChunkRef(a, 1, first, 0), ChunkRef(b, 2, first, 5))
    for bad, why in [
        (data[:-1], "checksum"),
        (bytes(flipped), "checksum"),
        (b"", "truncated"),
        (encode_group_index(new_group_id()[:-2] + group[-2:], []), "another group"),
        (encode_index(first, packs[first]), "format"),
        (encode_group_index(group, gap), "bad chunk extent"),
    ]:
        with pytest.raises(Corrupt, match=why) as info:
            decode_group_index(group, bad)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="pack of the group"):
        encode_group_index(group, [ChunkRef(a, 1, new_pack_id(), 0)])


def _resealed(index: bytes, change: object) -> bytes:
    body = change(index[:-32])  # type: ignore[operator]
    return bytes(body) + blake3.blake3(body).digest()


def test_index_format_is_fixed() -> None:
    """Other tools read indexes: the layout is part of the store format."""
    pack_id = ChunkId("ab" * 32)
    chunk = hash_bytes(b"x")
    data = encode_index(pack_id, (ChunkRef(chunk, 1, pack_id, 0),))
    head = struct.pack("<8sB32sI", b"BSPACKIX", 1, id_to_bytes(pack_id), 1)
    entry = struct.pack("<32sQI", id_to_bytes(chunk), 0, 1)
    assert data == head + entry + blake3.blake3(head + entry).digest()


# --------------------------------------------------------------------------- writing packs


async def test_push_packs_new_chunks_in_file_order(client: Client, src: Path) -> None:
    pushed = await client.push(src, "t")
    tree = await load_tree(client, "t")
    listing = await list_packs(client.object_store)
    assert not listing.indexes  # no index per pack: one group index for the push
    (group,) = listing.groups
    assert {group_of(p) for p in listing.packs} == {group}
    assert len(listing.packs) >= 3  # ~5.3 MiB of new chunks in 2 MiB packs
    indexed = decode_group_index(group, await client.object_store.get(group_index_key(group)))
    assert set(indexed) == set(listing.packs)
    stored = 0
    for pack_id, info in listing.packs.items():
        data = await client.object_store.get(pack_key(pack_id))
        refs = indexed[pack_id]
        assert sum(r.size for r in refs) == len(data) == info.size  # raw concatenation
        assert len(refs) == 1 or len(data) <= client.packs.target_bytes
        for r in refs:
            assert hash_bytes(data[r.offset : r.offset + r.size]) == r.id
        stored += len(data)
    # The copy of big.bin was not stored again: each new chunk is in one pack once.
    assert stored == pushed.new_bytes < pushed.bytes
    big = next(e for e in tree.entries if e.path == "big.bin")
    copy = next(e for e in tree.entries if e.path == "copy-of-big.bin")
    assert copy.chunks == big.chunks
    for prev, ref in zip(big.chunks, big.chunks[1:], strict=False):  # file order
        if ref.pack == prev.pack:
            assert ref.offset == prev.offset + prev.size


async def test_a_long_push_writes_a_group_index_every_few_packs(client: Client, src: Path) -> None:
    """A crash in a long push loses the dedup of at most ``index_every`` packs:
    every group of that many packs gets its index as soon as they are stored."""
    client.packs = PackConfig(target_bytes=MiB, index_every=2)
    pushed = await client.push(src, "t")
    listing = await list_packs(client.object_store)
    assert len(listing.packs) >= 5
    assert len(listing.groups) == (len(listing.packs) + 1) // 2
    covered: dict[ChunkId, tuple[ChunkRef, ...]] = {}
    for group in listing.groups:
        found = decode_group_index(group, await client.object_store.get(group_index_key(group)))
        assert 1 <= len(found) <= 2
        covered |= found
    assert set(covered) == set(listing.packs)
    assert sum(r.size for refs in covered.values() for r in refs) == pushed.new_bytes
    assert (await client.verify("t")).ok


async def as_pack_indexes(store: ObjectStore) -> set[ChunkId]:
    """Rewrite a store as earlier versions wrote it: an index per pack, no group
    index. Returns the packs."""
    listing = await list_packs(store)
    for group in listing.groups:
        key = group_index_key(group)
        for pack_id, refs in decode_group_index(group, await store.get(key)).items():
            await store.put(index_key(pack_id), encode_index(pack_id, refs))
        await store.delete(key)
    return set(listing.packs)


async def test_stores_with_an_index_per_pack_still_dedup_verify_repack_and_gc(
    client: Client, src: Path, tmp_path: Path
) -> None:
    """Stores written by earlier versions (an index object per pack) keep
    working next to group indexes: dedup, verify, pull, gc, repack."""
    client.packs = PackConfig(target_bytes=8 * MiB)
    first = await client.push(src, "old")
    old_packs = await as_pack_indexes(client.object_store)
    assert len(old_packs) == 1
    client.packs = PackConfig(target_bytes=MiB)
    shutil.rmtree(client.index_cache.root)  # another node: nothing cached
    again = await client.push(src, "again")
    assert (again.manifest, again.new_chunks) == (first.manifest, 0)
    extra = tree_of(tmp_path / "extra", {"new.bin": random_bytes(3 * MiB, "new")})
    shutil.copy(src / "big.bin", extra / "big.bin")
    mixed = await client.push(extra, "mixed")
    assert mixed.new_chunks >= 3  # new.bin only: big.bin is in the old packs
    listing = await list_packs(client.object_store)
    assert set(listing.indexes) == old_packs
    assert len(listing.groups) == 1
    for ref in ("old", "mixed"):
        assert (await client.verify(ref)).ok
    await client.pull("mixed", tmp_path / "dst")
    assert snapshot(tmp_path / "dst") == snapshot(extra)

    for ref in ("old", "again"):
        await client.catalog.delete_ref(ref)
    gc = await collect(client.object_store, None, grace_seconds=0, repack_below=1.0)
    assert gc.repacked_packs == 1  # "mixed" names only big.bin's part of the old pack
    assert set((await list_packs(client.object_store)).retired) == old_packs
    swept = await collect(client.object_store, None, grace_seconds=0)
    after = await list_packs(client.object_store)
    assert not old_packs & (set(after.packs) | set(after.indexes) | set(after.retired))
    assert after.groups  # the new packs keep their group index
    assert (await client.verify("mixed")).ok
    assert swept.swept_packs == 1  # the retired one
    await client.pull("mixed", tmp_path / "dst2")
    assert snapshot(tmp_path / "dst2") == snapshot(extra)


async def test_noop_push_reads_only_uncached_indexes(client: Client, src: Path) -> None:
    first = await client.push(src, "t")
    async with client.writing() as ingestor:
        assert ingestor.index.index_fetches == 0  # this node wrote them: all cached
        assert len(ingestor.index) == first.new_chunks
    again = await client.push(src, "t")
    assert (again.manifest, again.new_chunks, again.new_bytes) == (first.manifest, 0, 0)
    shutil.rmtree(client.index_cache.root)  # another node: nothing cached
    async with client.writing() as ingestor:
        listing = await list_packs(client.object_store)
        assert len(listing.packs) >= 3
        assert ingestor.index.index_fetches == len(listing.groups) == 1  # one for the push
        assert len(ingestor.index) == first.new_chunks
    cold = await client.push(src, "u")
    assert (cold.manifest, cold.new_chunks) == (first.manifest, 0)


async def test_missing_pack_or_index_is_uploaded_again(
    client: Client, src: Path, tmp_path: Path
) -> None:
    client.push_index_fresh_ns = 0  # a while later: the push LISTs (push.py, damage nets)
    await client.push(src, "t")
    tree = await load_tree(client, "t")
    gone = sorted({c.pack for c in tree.chunk_refs() if c.pack is not None})[0]
    await client.object_store.delete(pack_key(gone))  # the local index cache still has it
    lost = {c.id for c in tree.chunk_refs() if c.pack == gone}
    again = await client.push(src, "t")
    assert again.new_chunks == len(lost)
    fixed = await load_tree(client, "t")
    assert gone not in {c.pack for c in fixed.chunk_refs()}
    assert (await client.verify("t")).ok
    assert not (client.index_cache.root / gone).exists()  # the stale copy was dropped

    # the group index of the first push gone: none of its packs can be deduped against
    first_group = group_of(gone)
    await client.object_store.delete(group_index_key(first_group))
    unindexed = {c.id for c in fixed.chunk_refs() if c.pack and group_of(c.pack) == first_group}
    assert unindexed
    third = await client.push(src, "t")
    assert third.new_chunks == len(unindexed)
    final = await load_tree(client, "t")
    assert all(c.pack and group_of(c.pack) != first_group for c in final.chunk_refs())
    assert (await client.verify("t")).ok
    pulled = await client.pull("t", tmp_path / "dst")
    assert pulled.files == 4
    assert snapshot(tmp_path / "dst") == snapshot(src)


# --------------------------------------------------------------------------- requests


@pytest.mark.s3
async def test_noop_push_makes_a_handful_of_requests(
    s3_env: SeaweedS3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push that uploads nothing costs O(1) requests (+1 LIST per ~300 packs),
    never one per chunk: counted at the wire by a proxy in front of SeaweedFS."""
    root = tree_of(
        tmp_path / "src",
        {f"shard-{i}.bin": random_bytes(16 * MiB, f"s{i}") for i in range(4)}
        | {f"small/{i}.txt": f"{i}\n".encode() for i in range(200)},
    )
    url = s3_env.bucket_url()
    async with CountingProxy.to_endpoint(s3_env.endpoint) as proxy:
        proxy.http = True
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        config = config_for(url, tmp_path / "cache")
        async with Client.open(config, peers=False) as c:
            first = await c.push(root, "t")
            assert first.chunks > 64
            proxy.reset()
            again = await c.push(root, "t")
            warm = sum(proxy.requests.values())
            shutil.rmtree(c.index_cache.root)
            proxy.reset()
            await c.push(root, "t")
            cold = sum(proxy.requests.values())
            packs = len((await list_packs(c.object_store)).packs)
    assert again.new_chunks == 0
    # lease put + gc check + delete, LIST packs/, GET ref + manifest: 6
    assert warm <= 10, proxy.requests
    assert cold <= 10 + packs  # plus one GET per index not cached yet
    assert first.chunks > 10 * warm  # i.e. not one request per chunk


@pytest.mark.s3
async def test_push_cut_off_before_its_index_leaves_the_ref_alone(
    s3_env: SeaweedS3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Packs and indexes first, then the manifest, then the ref: a push whose
    index uploads fail never moves the ref, and the next push is whole."""
    root = tree_of(tmp_path / "src", {"a.bin": random_bytes(3 * MiB, "a")})
    async with CountingProxy.to_endpoint(s3_env.endpoint) as proxy:
        proxy.http = True
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        config = config_for(s3_env.bucket_url(), tmp_path / "cache")
        async with Client.open(config, peers=False) as c:
            c.packs = PackConfig(target_bytes=MiB)
            await c.push(root, "t")
            before = await c.catalog.resolve("t")
            write(root / "b.bin", random_bytes(3 * MiB, "b"))
            fault = proxy.arm(Fault("cut_upload", "PUT", ".index", at=100))
            with pytest.raises(StoreUnavailable):
                await c.push(root, "t")
            assert fault.hits >= 1
            proxy.disarm()
            assert await c.catalog.resolve("t") == before
            assert (await c.verify("t")).ok
            again = await c.push(root, "t")
            assert again.new_chunks >= 3  # b.bin: its packs had no index, so not reused
            assert (await c.verify("t")).ok
            assert len((await load_tree(c, "t")).entries) == 2


# --------------------------------------------------------------------------- bad chunks


@pytest.mark.parametrize("how", ["corrupt", "empty"])
async def test_bad_chunk_found_by_verify_is_uploaded_again_by_push(
    client: Client, src: Path, tmp_path: Path, how: str
) -> None:
    """Issue 10 item 12: re-pushing used to upload 0 chunks and leave a ref that
    does not verify. verify remembers the bad location; push never reuses it."""
    await client.push(src, "t")
    tree = await load_tree(client, "t")
    victim = next(e for e in tree.entries if e.path == "a/other.bin").chunks[0]
    assert victim.pack is not None
    if how == "corrupt":
        await damage(client.object_store, victim)
    else:
        await client.object_store.put(pack_key(victim.pack), b"")
    checked = await client.verify("t")
    assert not checked.ok
    assert victim.id in checked.corrupt + checked.missing
    again = await client.push(src, "t")
    assert again.new_chunks >= 1
    assert (await client.verify("t")).ok
    pulled = await client.pull("t", tmp_path / "dst")
    assert pulled.bytes == again.bytes
    assert snapshot(tmp_path / "dst") == snapshot(src)


async def test_verify_repair_from_a_directory(client: Client, src: Path) -> None:
    await client.push(src, "t")
    before = await client.catalog.resolve("t")
    tree = await load_tree(client, "t")
    victims = [
        next(e for e in tree.entries if e.path == p).chunks[-1] for p in ("big.bin", "a/other.bin")
    ]
    for victim in victims:
        await damage(client.object_store, victim)
    repaired = await client.repair("t", src)
    assert repaired.ok
    assert repaired.repaired == 2
    assert repaired.old_manifest == before != repaired.manifest
    assert await client.catalog.resolve("t") == repaired.manifest
    assert (await client.verify("t")).ok
    assert (await client.repair("t", src)).repaired == 0  # nothing left to do


def test_cli_verify_repair(object_store_url: str, tmp_path: Path, src: Path) -> None:
    env = cli_env(object_store_url, tmp_path / "cache")
    assert run_cli(["push", src, "t"], env).returncode == 0

    async def break_one() -> None:
        async with Client.open(config_for(object_store_url, tmp_path / "c2"), peers=False) as c:
            tree = await load_tree(c, "t")
            await damage(
                c.object_store,
                tree.entries[-1].chunks[0]
                if tree.entries[-1].chunks
                else next(e for e in tree.entries if e.chunks).chunks[0],
            )

    anyio.run(break_one)
    broken = run_cli(["verify", "t"], env)
    assert broken.returncode == 1
    assert "1 corrupt" in broken.stderr
    usage = run_cli(["verify", "t", "--repair"], env)
    assert usage.returncode == 2  # a usage error
    assert "--from DIR" in usage.stderr
    fixed = run_cli(["verify", "t", "--repair", "--from", src], env)
    assert fixed.returncode == 0, fixed.stderr
    assert "repaired 1 chunks" in fixed.stdout
    assert run_cli(["verify", "t"], env).returncode == 0


# --------------------------------------------------------------------------- migrate


async def old_store(store: ObjectStore, root: Path) -> dict[str, bytes]:
    """Write ``root``'s files the v1 way: one object per chunk, a v1 tree
    manifest, a ref ``old``. Returns the files."""
    files = {p.name: p.read_bytes() for p in sorted(root.iterdir())}  # noqa: ASYNC240
    objects: dict[str, bytes] = {}
    entries = []
    for name, data in files.items():
        spans = Chunker(DEFAULT_PARAMS).cut_and_hash(data)
        for s in spans:
            objects[chunk_key(s.id)] = data[s.offset : s.offset + s.length]
        entries.append(
            {
                "p": name,
                "t": "file",
                "m": 0o644,
                "s": len(data),
                "h": id_to_bytes(hash_bytes(data)),
                "c": [[id_to_bytes(s.id), s.length] for s in spans],
            }
        )
    info = DEFAULT_PARAMS.info()
    manifest = pack(
        {
            "v": 1,
            "kind": "tree",
            "entries": entries,
            "chunker": {
                "name": info.name,
                "min": info.min_size,
                "avg": info.avg_size,
                "max": info.max_size,
            },
        }
    )
    manifest_id = hash_bytes(manifest)
    objects[f"manifests/{manifest_id}"] = manifest
    objects["refs/old"] = manifest_id.encode() + b"\n"
    for key, value in objects.items():
        await store.put(key, value)
    return files


async def test_migrate_moves_an_old_store_to_packs(object_store_url: str, tmp_path: Path) -> None:
    root = tree_of(tmp_path / "src", {"w.bin": random_bytes(3 * MiB, "w"), "c.txt": b"cfg\n"})
    async with Client.open(config_for(object_store_url, tmp_path / "cache"), peers=False) as c:
        await old_store(c.object_store, root)
        old_id = await c.catalog.resolve("old")
        assert (await c.verify("old")).ok  # v1 chunks still read (chunks/ layout)
        v1 = await c.pull("old", tmp_path / "v1")
        assert v1.files == 2
        migrated = await c.migrate()
        assert (migrated.refs, migrated.unreadable) == (1, ())
        assert migrated.chunks >= 3
        tree = await load_tree(c, "old")
        assert await c.catalog.resolve("old") != old_id
        assert all(ref.pack is not None for ref in tree.chunk_refs())
        assert (await c.verify("old")).ok
        swept = await collect(c.object_store, None, grace_seconds=0)
        assert (swept.swept_chunks, swept.swept_manifests) == (migrated.chunks, 1)
        assert [i async for i in c.object_store.list(CHUNKS)] == []
        pulled = await c.pull("old", tmp_path / "v2")
        assert pulled.files == 2
        assert (await c.migrate()).chunks == 0  # idempotent
    assert snapshot(tmp_path / "v2") == snapshot(root)


def test_cli_migrate_then_gc(object_store_url: str, tmp_path: Path) -> None:
    root = tree_of(tmp_path / "src", {"w.bin": random_bytes(2 * MiB, "cli"), "c.txt": b"x\n"})

    async def make_old() -> None:
        async with open_object_store(object_store_url) as store:
            await old_store(store, root)

    anyio.run(make_old)
    env = cli_env(object_store_url, tmp_path / "cache")
    migrated = run_cli(["migrate", "--json"], env)
    assert migrated.returncode == 0, migrated.stderr
    doc = json.loads(migrated.stdout)
    assert (doc["refs"], doc["unreadable"]) == (1, [])
    gc = run_cli(["gc", "--grace", "0s", "--json"], env)
    assert gc.returncode == 0, gc.stderr
    assert json.loads(gc.stdout)["swept_chunks"] == doc["chunks"]
    pulled = run_cli(["pull", "old", tmp_path / "dst"], env)
    assert pulled.returncode == 0, pulled.stderr
    assert snapshot(tmp_path / "dst") == snapshot(root)


async def test_migrate_rewrites_layer_and_image_manifests(client: Client) -> None:
    blob = random_bytes(2 * MiB, "layer")
    spans = Chunker(DEFAULT_PARAMS).cut_and_hash(blob)
    for s in spans:
        await client.object_store.put(chunk_key(s.id), blob[s.offset : s.offset + s.length])
    info = DEFAULT_PARAMS.info()
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    layer = pack(
        {
            "v": 1,
            "kind": "layer",
            "digest": digest,
            "media_type": "x",
            "size": len(blob),
            "chunker": {
                "name": info.name,
                "min": info.min_size,
                "avg": info.avg_size,
                "max": info.max_size,
            },
            "chunks": [[id_to_bytes(s.id), s.length] for s in spans],
        }
    )
    image = pack(
        {
            "v": 1,
            "kind": "image",
            "manifest": b"{}",
            "media_type": "m",
            "config": b"{}",
            "layers": [[digest, id_to_bytes(hash_bytes(layer))]],
            "tags": ["v1"],
        }
    )
    for data in (layer, image):
        await client.object_store.put(f"manifests/{hash_bytes(data)}", data)
    await client.object_store.put("refs/images/old", hash_bytes(image).encode() + b"\n")

    migrated = await client.migrate()
    assert (migrated.refs, migrated.chunks) == (1, len(spans))
    image_id = await client.catalog.resolve("images/old")
    assert image_id != hash_bytes(image)
    layers = [m async for _, m in client.catalog.walk(image_id) if isinstance(m, Layer)]
    assert len(layers) == 1
    assert all(c.pack is not None for c in layers[0].chunks)
    got: dict[ChunkId, bytes] = {}

    async def sink(ref: ChunkRef, data: ChunkData) -> None:
        got[ref.id] = bytes(data)

    assert await client.origin.fetch(layers[0].chunks, sink) == []
    assert b"".join(got[c.id] for c in layers[0].chunks) == blob
    assert (await client.verify("images/old")).ok


# --------------------------------------------------------------------------- gc


async def test_gc_sweeps_packs_nobody_names(client: Client, tmp_path: Path) -> None:
    a = tree_of(tmp_path / "a", {"x.bin": random_bytes(3 * MiB, "x")})
    b = tree_of(tmp_path / "b", {"y.bin": random_bytes(3 * MiB, "y")})
    await client.push(a, "a")
    await client.push(b, "b")
    packs_a = {c.pack for c in (await load_tree(client, "a")).chunk_refs()}
    kept = await collect(client.object_store, None, grace_seconds=0)
    assert kept.swept_packs == 0
    await client.catalog.delete_ref("a")
    young = await collect(client.object_store, None, grace_seconds=3600)
    assert young.swept_packs == 0  # within the grace period
    swept = await collect(client.object_store, None, grace_seconds=0)
    assert swept.swept_packs == len(packs_a)
    listing = await list_packs(client.object_store)
    assert not packs_a & (set(listing.packs) | set(listing.indexes))
    groups_a = {group_of(p) for p in packs_a if p is not None}
    assert not groups_a & set(listing.groups)  # its group index went with its packs
    assert (await client.verify("b")).ok


async def test_gc_repacks_sparse_packs_and_keeps_every_ref_valid(
    client: Client, tmp_path: Path
) -> None:
    client.packs = PackConfig(target_bytes=8 * MiB)
    files = {f"f{i}.bin": random_bytes(MiB + i, f"f{i}") for i in range(4)}
    await client.push(tree_of(tmp_path / "all", files), "all")
    await client.push(tree_of(tmp_path / "one", {"f0.bin": files["f0.bin"]}), "one")
    (old_pack,) = {c.pack for c in (await load_tree(client, "one")).chunk_refs()}
    await client.catalog.delete_ref("all")  # "one" names a quarter of the pack
    dry = await collect(client.object_store, None, grace_seconds=0, dry_run=True)
    assert (dry.would_repack, dry.repacked_packs) == (1, 0)
    gc = await collect(client.object_store, None, grace_seconds=0, repack_below=0.5)
    assert (gc.repacked_packs, gc.refs_rewritten) == (1, 1)
    assert gc.repacked_bytes == len(files["f0.bin"])
    tree = await load_tree(client, "one")
    assert old_pack not in {c.pack for c in tree.chunk_refs()}
    assert (await client.verify("one")).ok
    listing = await list_packs(client.object_store)
    assert old_pack in listing.retired  # swept by the next gc, not this one
    again = await collect(client.object_store, None, grace_seconds=0)
    assert again.swept_packs == 1
    assert old_pack not in (await list_packs(client.object_store)).packs
    pulled = await client.pull("one", tmp_path / "dst")
    assert (tmp_path / "dst" / "f0.bin").read_bytes() == files["f0.bin"]
    assert pulled.files == 1


async def test_concurrent_push_and_gc_never_break_a_ref(client: Client, tmp_path: Path) -> None:
    """Pushes that keep changing their trees race gc runs that sweep and repack
    (grace 0, repack below 90%): afterwards every ref verifies and pulls."""
    roots = [tmp_path / f"src{i}" for i in range(2)]
    shared = random_bytes(2 * MiB, "shared")

    async def pusher(i: int) -> None:
        for step in range(3):
            tree_of(roots[i], {"shared.bin": shared, "own.bin": random_bytes(MiB, f"{i}-{step}")})
            await client.push(roots[i], f"r{i}")

    async def collector() -> None:
        for _ in range(3):
            await collect(client.object_store, None, grace_seconds=0, repack_below=0.9)
            await anyio.sleep(0.05)

    async with anyio.create_task_group() as tg:
        tg.start_soon(pusher, 0)
        tg.start_soon(pusher, 1)
        tg.start_soon(collector)
    await collect(client.object_store, None, grace_seconds=0, repack_below=0.9)
    for i in range(2):
        assert (await client.verify(f"r{i}")).ok
        await client.pull(f"r{i}", tmp_path / f"dst{i}")
        assert snapshot(tmp_path / f"dst{i}") == snapshot(roots[i])
    assert os.listdir(tmp_path / "dst0")
