"""The tier list (local -> peers -> origin) and the verified origin source."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from fakes import Collect, FakeSource
from helpers import random_bytes

from blobstore.config import CacheConfig
from blobstore.errors import (
    ChunkMissing,
    Corrupt,
    CorruptChunk,
    PeerUnavailable,
    StoreUnavailable,
    Unavailable,
)
from blobstore.ids import ChunkId, hash_bytes
from blobstore.manifest import ChunkRef
from blobstore.nodestore import NodeStore
from blobstore.objectstore import chunk_key, pack_key
from blobstore.origin import OriginSource
from blobstore.source import ChunkData, SplitSink
from blobstore.stores import open_object_store
from blobstore.tiers import OpenedOnUse, TieredSource

pytestmark = pytest.mark.anyio


def chunk(i: int, size: int = 4096) -> tuple[ChunkId, bytes]:
    data = random_bytes(size, f"tier-{i}")
    return hash_bytes(data), data


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
        results.append(bytes(await tiers.get(cid)))

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


# -- fetch: many refs through the tiers, each chunk to the caller's sink -------------


def refs_of(*chunks: tuple[ChunkId, bytes]) -> list[ChunkRef]:
    return [ChunkRef(cid, len(data)) for cid, data in chunks]


async def test_fetch_hands_each_tier_what_the_nearer_ones_could_not_deliver() -> None:
    (a, da), (b, db), (c, dc) = chunk(1), chunk(2), chunk(3, 5000)
    local = FakeSource("local", {a: da})
    peer = FakeSource("peer", {b: db})
    origin = FakeSource("origin", {b: db, c: dc})
    tiers = TieredSource([local, peer, origin], local)
    ra, rb, rc = refs_of((a, da), (b, db), (c, dc))
    sink = Collect()
    assert await tiers.fetch([ra, rb, rc, ra], sink) == []
    assert sorted(sink.delivered, key=str) == sorted(
        [(ra, da), (rb, db), (rc, dc), (ra, da)], key=str
    )
    assert local.fetches == [[a, b, c]]  # a chunk wanted twice is asked for once
    assert peer.fetches == [[b, c]]
    assert origin.fetches == [[c]]
    # the second copy of a is the node's own copy: counted as local, as a cache hit was
    assert tiers.bytes_from == {"local": 2 * len(da), "peer": len(db), "origin": len(dc)}
    assert local.chunks == {a: da}  # no write-back: the sink's write is the node's copy


async def test_fetch_reports_what_get_would_when_no_tier_delivers() -> None:
    (a, da), (b, _), (c, dc) = chunk(1), chunk(2), chunk(3)
    ra, rb, rc = refs_of((a, da), (b, b"x"), (c, dc))
    origin = FakeSource("origin", {a: da, b: b"x"})
    origin.lies.add(b)
    tiers = TieredSource([FakeSource("local"), origin])
    sink = Collect()
    with pytest.raises(ChunkMissing, match=f"{c} not found in any tier"):
        await tiers.fetch([ra, rc], sink)
    assert sink.delivered == [(ra, da)]  # the rest is delivered before the error
    with pytest.raises(CorruptChunk, match=b):
        await tiers.fetch([rb], Collect())
    peer = FakeSource("peer")
    peer.down = True  # every chunk unavailable there
    tiers = TieredSource([FakeSource("local"), peer, origin])
    with pytest.raises(PeerUnavailable):  # "might have had it" beats "not found"
        await tiers.fetch([rc], Collect())
    peer.down, peer.whole_down = False, True  # the peer tier as a whole fails
    sink = Collect()
    with pytest.raises(PeerUnavailable):
        await tiers.fetch([ra, rc], sink)
    assert sink.delivered == [(ra, da)]  # the origin still delivered what it had
    assert origin.fetches[-1] == [a, c]


async def test_fetch_retries_a_chunk_of_the_wrong_size_farther_away() -> None:
    cid, data = chunk(1)
    (ref,) = refs_of((cid, data))
    liar = FakeSource("peer", {cid: data + b"!"})  # the right id, a wrong length
    origin = FakeSource("origin", {cid: data})
    tiers = TieredSource([FakeSource("local"), liar, origin])
    sink = Collect()
    await tiers.fetch([ref], sink)
    assert sink.delivered == [(ref, data)]
    assert origin.fetches == [[cid]]
    with pytest.raises(Corrupt, match="manifest says"):
        await TieredSource([liar]).fetch([ref], Collect())


async def test_fetch_and_get_share_one_flight_per_chunk() -> None:
    (a, da), (b, db) = chunk(1), chunk(2)
    ra, rb = refs_of((a, da), (b, db))
    origin = FakeSource("origin", {a: da, b: db})
    origin.gate = anyio.Event()
    tiers = TieredSource([FakeSource("local"), origin])
    sink = Collect()
    got: list[bytes] = []

    async def get(chunk_id: ChunkId) -> None:
        got.append(bytes(await tiers.get(chunk_id)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(get, a)  # a get in flight before the fetch: the fetch waits for it
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(tiers.fetch, [ra, rb], sink)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(get, b)  # a get during the fetch waits for the fetch
        await anyio.wait_all_tasks_blocked()
        origin.gate.set()
    assert origin.gets == [a]
    assert origin.fetches == [[b]]
    assert sorted(got) == sorted([da, db])
    assert sorted(sink.delivered, key=str) == sorted([(ra, da), (rb, db)], key=str)
    assert tiers.bytes_from["origin"] == len(da) + len(db)
    assert not tiers._flights


class FailsFirstGet(FakeSource):
    async def get(self, chunk_id: ChunkId) -> bytes:
        data = await super().get(chunk_id)
        if len(self.gets) == 1:
            raise PeerUnavailable("first get fails")
        return data


async def test_fetch_waiting_on_a_failed_get_fetches_itself() -> None:
    cid, data = chunk(1)
    (ref,) = refs_of((cid, data))
    flaky = FailsFirstGet("origin", {cid: data})
    flaky.gate = anyio.Event()
    tiers = TieredSource([flaky])
    sink = Collect()

    async def failing_get() -> None:
        with pytest.raises(PeerUnavailable):
            await tiers.get(cid)

    async with anyio.create_task_group() as tg:
        tg.start_soon(failing_get)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(tiers.fetch, [ref], sink)
        await anyio.wait_all_tasks_blocked()
        flaky.gate.set()
    assert sink.delivered == [(ref, data)]
    assert flaky.fetches == [[cid]]


async def test_fetch_through_real_tiers_reads_packs_and_skips_what_is_local(
    object_store_url: str, tmp_path: Path
) -> None:
    chunks = [chunk(i, 300_000 + i) for i in range(6)]  # > max_gap each
    pack_id = hash_bytes(b"pack")
    refs, offset = [], 0
    for cid, data in chunks:
        refs.append(ChunkRef(cid, len(data), pack_id, offset))
        offset += len(data)
    async with (
        open_object_store(object_store_url) as store,
        NodeStore(CacheConfig(tmp_path / "cache")) as cache,
    ):
        await store.put(pack_key(pack_id), b"".join(d for _, d in chunks))
        await cache.put(*chunks[2])
        origin = OriginSource(store)
        tiers = TieredSource([cache, origin], cache)
        sink = Collect()
        assert await tiers.fetch(refs, sink) == []
        expected = zip(refs, (d for _, d in chunks), strict=True)
        assert sorted(sink.delivered, key=str) == sorted(expected, key=str)
        assert tiers.bytes_from == {
            "local": len(chunks[2][1]),
            "origin": sum(len(d) for _, d in chunks) - len(chunks[2][1]),
        }
        assert origin.requests == 2  # two spans: the local chunk splits the pack


async def test_split_sink_through_real_tiers_each_chunk_once_and_gets_still_served(
    object_store_url: str, tmp_path: Path
) -> None:
    """Through the tier list, a SplitSink's early half takes each chunk once
    (local ones in a worker thread too), its late half gets each ref with the
    chunk's size; a get for a chunk the fetch is reading is served either way."""
    import threading

    chunks = [chunk(i, 300_000 + i) for i in range(6)]
    pack_id = hash_bytes(b"split-pack")
    refs, offset = [], 0
    for cid, data in chunks:
        refs.append(ChunkRef(cid, len(data), pack_id, offset))
        offset += len(data)
    early: list[tuple[ChunkRef, bytes]] = []
    late: list[tuple[ChunkRef, int]] = []
    loop_thread = threading.get_ident()
    lock = threading.Lock()

    def write(r: ChunkRef, data: ChunkData) -> None:
        assert threading.get_ident() != loop_thread
        with lock:
            early.append((r, bytes(data)))

    async def after(r: ChunkRef, size: int) -> None:
        late.append((r, size))

    async with (
        open_object_store(object_store_url) as store,
        NodeStore(CacheConfig(tmp_path / "cache")) as cache,
    ):
        await store.put(pack_key(pack_id), b"".join(d for _, d in chunks))
        await cache.put(*chunks[2])
        tiers = TieredSource([cache, OriginSource(store)], cache)
        got: list[bytes] = []

        async def get(chunk_id: ChunkId) -> None:
            got.append(bytes(await tiers.get(chunk_id)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(tiers.fetch, refs, SplitSink(write, after))
            tg.start_soon(get, chunks[4][0])
        assert got == [chunks[4][1]]
        expected = [(r, d) for r, (_, d) in zip(refs, chunks, strict=True)]
        assert sorted(early, key=str) == sorted(expected, key=str)
        assert sorted(late, key=str) == sorted(((r, r.size) for r in refs), key=str)
        assert not tiers._flights


class Opener:
    """A tier's context manager that records which task entered and exited it."""

    def __init__(self, source: FakeSource | None, fail: bool = False) -> None:
        self.source = source
        self.fail = fail
        self.tasks: list[object] = []

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[FakeSource | None]:
        self.tasks.append(anyio.get_current_task().id)
        if self.fail:
            raise OSError("cannot reach the local daemon")
        try:
            yield self.source
        finally:
            self.tasks.append(anyio.get_current_task().id)


async def test_a_tier_opened_on_use_is_opened_by_the_first_request_only() -> None:
    (a, da), (b, db) = chunk(1), chunk(2)
    opener = Opener(FakeSource("peer", {a: da}))
    async with anyio.create_task_group() as tg:
        peer = OpenedOnUse("peer", opener, tg)
        tiers = TieredSource([FakeSource("local", {b: db}), peer, FakeSource("origin")])
        assert await tiers.get(b) == db
        sink = Collect()
        assert await tiers.fetch([ChunkRef(b, len(db))], sink) == []
        assert not peer.opened  # every chunk was local
        assert opener.tasks == []
        assert await tiers.get(a) == da
        assert peer.opened
        assert len(opener.tasks) == 1
        assert await peer.has([a, b]) == {a}
        peer.close()
    assert len(opener.tasks) == 2
    assert opener.tasks[0] == opener.tasks[1]  # opened and closed by one task


async def test_a_tier_that_cannot_open_is_unavailable_and_one_with_none_holds_nothing() -> None:
    (a, da) = chunk(1)
    async with anyio.create_task_group() as tg:
        broken = OpenedOnUse("peer", Opener(None, fail=True), tg)
        tiers = TieredSource([FakeSource("local"), broken, FakeSource("origin", {a: da})])
        sink = Collect()
        assert await tiers.fetch([ChunkRef(a, len(da))], sink) == []
        assert sink.got == {ChunkRef(a, len(da)): da}  # the origin had it
        with pytest.raises(Unavailable, match="cannot reach the local daemon"):
            await broken.get(a)
        nothing = OpenedOnUse("peer", Opener(None), tg)
        with pytest.raises(ChunkMissing):
            await nothing.get(a)
        assert await nothing.has([a]) == set()
        assert await nothing.fetch([ChunkRef(a, len(da))], sink) == [ChunkRef(a, len(da))]
        nothing.close()
