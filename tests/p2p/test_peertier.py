"""The peer tier over in-process servers: ranking, fallback, hedging, down-marking."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import anyio
import pytest
from test_server import FakeCache, blob

from blobstore.errors import ChunkMissing
from blobstore.ids import ChunkId
from blobstore.manifest import ChunkRef
from blobstore.source import ChunkData, Undelivered
from p2p import messages, placement
from p2p.client import Identity
from p2p.liveness import PeerDirectory, Timing
from p2p.metrics import Metrics
from p2p.peertier import PeerTier, TierTuning
from p2p.provider import ChunkProvider
from p2p.server import PeerServer, ServerIdentity

pytestmark = pytest.mark.anyio

FAST = Timing(interval=0.1, timeout=1.0, backoff_min=0.05, backoff_max=0.5)


class StallingCache(FakeCache):
    """Holds its chunks but never answers (until released)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def get(self, chunk_id: ChunkId) -> bytes:
        await self.release.wait()
        return await super().get(chunk_id)


@asynccontextmanager
async def peers(
    *caches: FakeCache,
    corrupt: int | None = None,
    first: int = 0,
    named: list[str] | None = None,
) -> AsyncIterator[list[str]]:
    """Serve each cache as node ``n<i>``; yield their addresses. Their pongs name
    the addresses in ``named``."""
    async with AsyncExitStack() as stack:
        tg = await stack.enter_async_context(asyncio.TaskGroup())
        addresses = []
        for i, cache in enumerate(caches, start=first):
            provider = ChunkProvider(cache, None, lambda _: False, Metrics(), tg)  # type: ignore[arg-type]
            me = ServerIdentity(f"n{i}", "r", None, corrupt_for_tests=(i == corrupt))
            port = await stack.enter_async_context(
                PeerServer(me, provider, Metrics(), peers=lambda: list(named or ())).serving(
                    "127.0.0.1", 0
                )
            )
            addresses.append(f"127.0.0.1:{port}")
        yield addresses


@asynccontextmanager
async def tier(addresses: list[str], tuning: TierTuning | None = None) -> AsyncIterator[PeerTier]:
    async with PeerDirectory(Identity("client", "r"), FAST) as directory:
        for address in addresses:
            directory.add(address, "static")
        await directory.checked.wait()
        yield PeerTier(directory, tuning or TierTuning())


async def test_misses_and_lies_fall_through_to_a_peer_that_has_it() -> None:
    chunk_id, data = blob(1)
    holder, liar, empty = FakeCache(), FakeCache(), FakeCache()
    holder.chunks[chunk_id] = data
    liar.chunks[chunk_id] = data
    # Make the liar (n1) and the empty peer (n2) rank before the holder (n0).
    async with peers(holder, liar, empty, corrupt=1) as addrs, tier(addrs) as t:
        order = placement.rank(["n0", "n1", "n2"], chunk_id)
        assert await t.get(chunk_id) == data
        if order.index("n1") < order.index("n0"):
            assert t.stats["corrupt"] == 1
        absent, _ = blob(2)
        with pytest.raises(ChunkMissing):
            await t.get(absent)


async def test_slow_peer_is_hedged() -> None:
    chunk_id, data = blob(3)
    slow, fast = StallingCache(), FakeCache()
    slow.chunks[chunk_id] = fast.chunks[chunk_id] = data
    caches: list[FakeCache] = [slow, fast]
    # node n0 is the stalling one; order them so it is asked first.
    if placement.rank(["n0", "n1"], chunk_id)[0] != "n0":
        caches.reverse()
    async with peers(*caches) as addrs, tier(addrs, TierTuning(hedge_min=0.05)) as t:
        assert await t.get(chunk_id) == data
        assert t.stats["hedges"] >= 1
        slow.release.set()


async def test_dead_peer_is_marked_down_and_skipped() -> None:
    chunk_id, data = blob(4)
    async with AsyncExitStack() as stack:
        a, b = FakeCache(), FakeCache()
        a.chunks[chunk_id] = b.chunks[chunk_id] = data
        addrs_b = await stack.enter_async_context(peers(b, first=1))
        async with peers(a) as addrs_a:
            t = await stack.enter_async_context(tier([*addrs_a, *addrs_b]))
            assert len(t._directory.live()) == 2
        # peer a is gone: its connection broke, so it is no longer live
        with anyio.fail_after(10):
            while len(t._directory.live()) != 1:  # noqa: ASYNC110 - polling a test condition
                await asyncio.sleep(0.01)
        assert await t.get(chunk_id) == data


async def _until(predicate: Callable[[], bool]) -> None:
    with anyio.fail_after(10):
        while not predicate():  # noqa: ASYNC110 - polling a test condition
            await asyncio.sleep(0.01)


async def test_one_seed_names_the_region_and_dead_names_are_forgotten() -> None:
    named: list[str] = []
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    async with (
        peers(FakeCache(), FakeCache(), FakeCache(), named=named) as addrs,
        PeerDirectory(Identity("client", "r"), FAST) as directory,
    ):
        named[:] = [*addrs[1:], dead]
        directory.add(addrs[0], "static")
        await _until(lambda: {p.node for p in directory.live()} == {"n0", "n1", "n2"})
        sources = {p.address: p.source for p in directory.all()}
        assert sources == {
            addrs[0]: "static",
            addrs[1]: "gossip",
            addrs[2]: "gossip",
            dead: "gossip",
        }
        # Heard first-hand (mDNS, say), a gossiped peer is no longer forgettable.
        directory.add(addrs[1], "mdns")
        assert {p.address: p.source for p in directory.all()}[addrs[1]] == "mdns"
        # Nobody names the dead address any more: after a few failed checks it is gone.
        named.remove(dead)
        await _until(lambda: dead not in {p.address for p in directory.all()})
        assert {p.node for p in directory.live()} == {"n0", "n1", "n2"}


async def test_first_request_waits_for_discovery_to_settle() -> None:
    chunk_id, data = blob(5)
    cache = FakeCache()
    cache.chunks[chunk_id] = data
    async with (
        peers(cache) as addrs,
        PeerDirectory(Identity("client", "r"), FAST) as directory,
    ):
        settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        t = PeerTier(directory, settled=settled)
        fetch = asyncio.create_task(t.get(chunk_id))
        await asyncio.sleep(0.05)
        assert not fetch.done()  # no peer known yet, but discovery has not had its chance
        directory.add(addrs[0], "static")
        await directory.checked.wait()
        settled.set_result(None)
        assert await fetch == data
        assert t.stats["hits"] == 1


# -- fetch: many refs, grouped by peer, many ids per request -------------------------


class Collect:
    def __init__(self) -> None:
        self.got: dict[ChunkRef, bytes] = {}

    async def __call__(self, ref: ChunkRef, data: ChunkData) -> None:
        self.got[ref] = bytes(data)


def refs_for(count: int, size: int = 3000) -> list[tuple[ChunkRef, bytes]]:
    out = []
    for i in range(count):  # blob(i) repeats after 256; vary the size instead
        chunk_id, data = blob(i % 200, size + i // 200)
        out.append((ChunkRef(chunk_id, len(data)), data))
    return out


async def test_fetch_batches_ids_per_peer_and_falls_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    requests: list[int] = []
    real_get = messages.get

    def counting_get(ids: list[ChunkId]) -> dict[str, object]:
        requests.append(len(ids))
        return real_get(ids)

    monkeypatch.setattr(messages, "get", counting_get)
    wanted = refs_for(400)
    caches = [FakeCache(), FakeCache(), FakeCache()]
    rng = random.Random(7)
    held, absent = wanted[:380], wanted[380:]
    for ref, data in held:  # each chunk on one or two peers, none on the others
        for cache in rng.sample(caches, rng.choice([1, 2])):
            cache.chunks[ref.id] = data
    async with peers(*caches) as addrs, tier(addrs, TierTuning(hedge_min=5.0)) as t:
        sink = Collect()
        left = await t.fetch([ref for ref, _ in wanted], sink)
        assert sink.got == dict(held)
        assert isinstance(left, Undelivered)
        assert sorted(left, key=str) == sorted((ref for ref, _ in absent), key=str)
        assert all(isinstance(left.reasons[ref.id], ChunkMissing) for ref, _ in absent)
        assert t.stats["hits"] == len(held)
        # a miss at one peer is asked of the next: more asks than chunks, far fewer requests
        assert sum(requests) >= len(wanted)
        assert len(requests) * 8 <= sum(requests)


async def test_fetch_survives_a_lying_peer_and_hedges_a_stalled_one() -> None:
    wanted = refs_for(60)
    liar, stalled, good = FakeCache(), StallingCache(), FakeCache()
    for cache in (liar, stalled, good):
        cache.chunks.update({ref.id: data for ref, data in wanted})
    async with (
        peers(liar, stalled, good, corrupt=0) as addrs,
        tier(addrs, TierTuning(hedge_min=0.05, hedge_max=0.2)) as t,
    ):
        sink = Collect()
        assert await t.fetch([ref for ref, _ in wanted], sink) == []
        assert sink.got == dict(wanted)  # every byte verified: the liar's never got through
        ranked_first = {placement.rank(["n0", "n1", "n2"], ref.id)[0] for ref, _ in wanted}
        if "n0" in ranked_first:
            assert t.stats["corrupt"] >= 1
        if "n1" in ranked_first:
            assert t.stats["hedges"] >= 1
        stalled.release.set()


async def test_fetch_with_no_live_peer_returns_everything_missing() -> None:
    async with PeerDirectory(Identity("client", "r"), FAST) as directory:
        t = PeerTier(directory)
        wanted = [ref for ref, _ in refs_for(3)]
        left = await t.fetch(wanted, Collect())
        assert left == wanted
        assert isinstance(left, Undelivered)
        assert all("none live" in str(left.reasons[ref.id]) for ref in wanted)


async def test_fetch_never_cancels_a_sink_that_is_writing() -> None:
    """A hedged chunk delivered by the second peer while the first still stalls:
    the sink (slow, like a disk write) runs to the end for every chunk."""
    stalled, good = StallingCache(), FakeCache()
    wanted = [
        (ref, data) for ref, data in refs_for(40) if placement.rank(["n0", "n1"], ref.id)[0] == "n0"
    ][:8]
    for ref, data in wanted:
        stalled.chunks[ref.id] = good.chunks[ref.id] = data
    finished: list[ChunkRef] = []

    async def slow_sink(ref: ChunkRef, data: ChunkData) -> None:
        await asyncio.sleep(0.3)  # several hedge delays: the workers loop meanwhile
        finished.append(ref)

    async with (
        peers(stalled, good) as addrs,
        tier(addrs, TierTuning(hedge_min=0.02, hedge_max=0.05)) as t,
    ):
        assert await t.fetch([ref for ref, _ in wanted], slow_sink) == []
        assert sorted(finished, key=str) == sorted((ref for ref, _ in wanted), key=str)
        assert t.stats["hedges"] >= 1
        stalled.release.set()
