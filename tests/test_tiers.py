"""The tier list (local -> peers -> origin) and the verified origin source."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import anyio
import pytest
from helpers import random_bytes

from blobstore.config import CacheConfig
from blobstore.errors import (
    ChunkMissing,
    CorruptChunk,
    DiskFull,
    PeerUnavailable,
    StoreUnavailable,
)
from blobstore.ids import ChunkId, hash_bytes
from blobstore.nodestore import NodeStore
from blobstore.objectstore import chunk_key
from blobstore.origin import OriginSource
from blobstore.stores import open_object_store
from blobstore.tiers import TieredSource

pytestmark = pytest.mark.anyio


def chunk(i: int, size: int = 4096) -> tuple[ChunkId, bytes]:
    data = random_bytes(size, f"tier-{i}")
    return hash_bytes(data), data


class FakeSource:
    """A ChunkStore in memory that can lie, fail, or stall."""

    def __init__(self, name: str, chunks: dict[ChunkId, bytes] | None = None) -> None:
        self.name = name
        self.chunks = dict(chunks or {})
        self.lies: set[ChunkId] = set()
        self.down = False
        self.full = False
        self.gate: anyio.Event | None = None
        self.gets: list[ChunkId] = []

    async def get(self, chunk_id: ChunkId) -> bytes:
        self.gets.append(chunk_id)
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise PeerUnavailable(f"{self.name} is down")
        if chunk_id not in self.chunks:
            raise ChunkMissing(chunk_id, self.name)
        if chunk_id in self.lies:
            raise CorruptChunk(chunk_id, self.name)
        return self.chunks[chunk_id]

    async def has(self, chunk_ids: Iterable[ChunkId]) -> set[ChunkId]:
        return {c for c in chunk_ids if c in self.chunks}

    async def put(self, chunk_id: ChunkId, data: bytes) -> None:
        if self.full:
            raise DiskFull("cache disk full")
        self.chunks[chunk_id] = data


async def test_order_and_write_back_to_cache() -> None:
    (a, da), (b, db), (c, dc) = chunk(1), chunk(2), chunk(3)
    local = FakeSource("local", {a: da})
    peer = FakeSource("peer", {b: db})
    origin = FakeSource("origin", {b: db, c: dc})
    tiers = TieredSource([local, peer, origin], local)
    assert await tiers.get(a) == da
    assert await tiers.get(b) == db
    assert await tiers.get(c) == dc
    assert origin.gets == [c]  # b came from the nearer peer
    assert local.chunks == {a: da, b: db, c: dc}  # farther copies written back
    assert tiers.bytes_from == {"local": len(da), "peer": len(db), "origin": len(dc)}
    assert await tiers.get(c) == dc
    assert origin.gets == [c]  # now a local hit
    assert await tiers.has([a, b, c, chunk(4)[0]]) == {a, b, c}


async def test_missing_everywhere_is_chunk_missing() -> None:
    tiers = TieredSource([FakeSource("local"), FakeSource("origin")])
    with pytest.raises(ChunkMissing, match="any tier"):
        await tiers.get(chunk(1)[0])


async def test_lying_peer_costs_time_not_correctness() -> None:
    cid, data = chunk(1)
    local = FakeSource("local")
    peer = FakeSource("peer", {cid: b"lies"})
    peer.lies.add(cid)
    origin = FakeSource("origin", {cid: data})
    tiers = TieredSource([local, peer, origin], local)
    assert await tiers.get(cid) == data
    assert local.chunks[cid] == data


async def test_corrupt_everywhere_is_corrupt_chunk() -> None:
    cid, _ = chunk(1)
    origin = FakeSource("origin", {cid: b"x"})
    origin.lies.add(cid)
    tiers = TieredSource([FakeSource("local"), origin])
    with pytest.raises(CorruptChunk, match=cid):
        await tiers.get(cid)


async def test_unavailable_tier_is_skipped_and_reported_if_nothing_else_has_it() -> None:
    cid, data = chunk(1)
    peer = FakeSource("peer")
    peer.down = True
    tiers = TieredSource([FakeSource("local"), peer, FakeSource("origin", {cid: data})])
    assert await tiers.get(cid) == data
    missing = chunk(2)[0]
    with pytest.raises(PeerUnavailable):  # "might have had it" beats "not found"
        await tiers.get(missing)


async def test_full_cache_does_not_fail_the_fetch() -> None:
    cid, data = chunk(1)
    local = FakeSource("local")
    local.full = True
    tiers = TieredSource([local, FakeSource("origin", {cid: data})], local)
    assert await tiers.get(cid) == data


async def test_single_flight_one_origin_fetch_for_concurrent_requests() -> None:
    cid, data = chunk(1)
    origin = FakeSource("origin", {cid: data})
    origin.gate = anyio.Event()
    tiers = TieredSource([FakeSource("local"), origin])
    results: list[bytes] = []

    async def want() -> None:
        results.append(await tiers.get(cid))

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(want)
        await anyio.wait_all_tasks_blocked()
        origin.gate.set()
    assert results == [data] * 20
    assert origin.gets == [cid]
    assert tiers.bytes_from["origin"] == len(data)


async def test_single_flight_shares_errors_then_retries_fresh() -> None:
    cid, data = chunk(1)
    origin = FakeSource("origin", {cid: data})
    origin.down = True
    origin.gate = anyio.Event()
    tiers = TieredSource([origin])
    errors: list[BaseException] = []

    async def want() -> None:
        try:
            await tiers.get(cid)
        except PeerUnavailable as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(want)
        await anyio.wait_all_tasks_blocked()
        origin.gate.set()
    assert len(errors) == 5
    assert len(origin.gets) == 1
    origin.down = False
    assert await tiers.get(cid) == data  # a failed flight is not remembered


async def test_corrupt_local_chunk_refetched_transparently(tmp_path: Path) -> None:
    cid, data = chunk(1, 300 << 10)
    origin = FakeSource("origin", {cid: data})
    async with NodeStore(CacheConfig(tmp_path / "cache")) as cache:
        await cache.put(cid, data)
        cache.path_of(cid).write_bytes(b"\0" * len(data))  # bit rot on disk
        tiers = TieredSource([cache, origin], cache)
        assert await tiers.get(cid) == data
        assert origin.gets == [cid]
        assert cache.path_of(cid).read_bytes() == data  # healed
        assert tiers.bytes_from["origin"] == len(data)
        assert await tiers.get(cid) == data
        assert origin.gets == [cid]


async def test_origin_verifies_store_bytes(object_store_url: str) -> None:
    (good, dgood), (bad, _) = chunk(1, 300 << 10), chunk(2)
    async with open_object_store(object_store_url) as store:
        origin = OriginSource(store)
        await origin.put(good, dgood)
        await store.put(chunk_key(bad), b"not the right bytes")
        assert await origin.get(good) == dgood
        with pytest.raises(CorruptChunk, match=f"{bad} is corrupt in object store"):
            await origin.get(bad)
        with pytest.raises(ChunkMissing):
            await origin.get(chunk(3)[0])
        assert await origin.has([good, bad, chunk(3)[0]]) == {good, bad}


async def test_unreachable_store_is_store_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    with pytest.raises(StoreUnavailable):
        async with open_object_store(blocker.as_uri()):
            pass
