"""The peer tier over in-process servers: ranking, fallback, hedging, down-marking."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import cast

import pytest
from fakes import Collect
from test_server import FakeCache, blob, until

from blobstore.errors import ChunkMissing
from blobstore.ids import ChunkId, hash_bytes, verify, verify_off_loop
from blobstore.manifest import ChunkRef
from blobstore.source import ChunkData, Sink, SplitSink, Undelivered
from p2p import client, messages, peertier, placement
from p2p.client import Identity
from p2p.liveness import Peer, PeerDirectory, Timing
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


def ranked_first(node: str, nodes: list[str]) -> tuple[ChunkId, bytes]:
    """A blob whose home (first in the ranking) among ``nodes`` is ``node``."""
    for i in range(256):
        chunk_id, data = blob(i)
        if placement.rank(nodes, chunk_id)[0] == node:
            return chunk_id, data
    raise AssertionError(f"no blob ranks {node} first")


def flipped(data: bytes) -> bytes:
    """What a server with ``corrupt_for_tests`` sends for ``data``."""
    return bytes([data[0] ^ 0xFF]) + data[1:]


def without_verification(monkeypatch: pytest.MonkeyPatch, genuine: dict[ChunkId, bytes]) -> None:
    """Make the client take a liar's bytes for ``genuine``'s chunks as genuine, as a
    missing check would. Tests run once like this to prove that their liar is asked."""
    lies = {hash_bytes(flipped(data)): chunk_id for chunk_id, data in genuine.items()}
    check = verify_off_loop

    check_now = verify

    async def trusting(
        chunk_id: str, data: bytes | bytearray | memoryview, where: str = ""
    ) -> None:
        if lies.get(hash_bytes(data)) != chunk_id:
            await check(chunk_id, data, where)

    def trusting_now(chunk_id: str, data: bytes | bytearray | memoryview, where: str = "") -> None:
        if lies.get(hash_bytes(data)) != chunk_id:
            check_now(chunk_id, data, where)

    # (wherever the bytes are checked: the connection's get, the tier's own hop)
    monkeypatch.setattr(client, "verify_off_loop", trusting)
    monkeypatch.setattr(peertier, "verify_off_loop", trusting)
    monkeypatch.setattr(peertier, "verify", trusting_now)


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
async def test_a_lying_home_peer_is_caught_and_the_next_one_delivers(
    verify: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunk_id, data = ranked_first("n1", ["n0", "n1", "n2"])
    holder, liar, empty = FakeCache(), FakeCache(), FakeCache()
    holder.chunks[chunk_id] = data
    liar.chunks[chunk_id] = data
    if not verify:
        without_verification(monkeypatch, {chunk_id: data})
    # n1, the liar, is the chunk's home: it is asked first.
    async with peers(holder, liar, empty, corrupt=1) as addrs, tier(addrs) as t:
        got = await t.get(chunk_id)
        if not verify:  # the liar's flipped byte gets through: the check is what stops it
            assert got == flipped(data)
            return
        assert got == data
        assert t.stats["corrupt"] == 1
        absent, _ = blob(2, 1000)
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
        await until(lambda: len(t._directory.live()) == 1)
        assert await t.get(chunk_id) == data


async def test_one_seed_names_the_region_and_dead_names_are_forgotten() -> None:
    named: list[str] = []
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    async with (
        peers(FakeCache(), FakeCache(), FakeCache(), named=named) as addrs,
        PeerDirectory(Identity("client", "r"), FAST) as directory,
    ):
        heard: list[tuple[str, str]] = []
        add = directory.add

        def recording_add(address: str, source: str, node: str = "", region: str = "") -> None:
            heard.append((address, source))
            add(address, source, node, region)

        directory.add = recording_add  # type: ignore[method-assign]

        def all_answered_since(moment: float) -> bool:
            return all(p.last_ok > moment for p in directory.live())

        named[:] = [*addrs[1:], dead]
        directory.add(addrs[0], "static")
        await until(lambda: {p.node for p in directory.live()} == {"n0", "n1", "n2"})
        sources = {p.address: p.source for p in directory.all() if p.address != dead}
        assert sources == {addrs[0]: "static", addrs[1]: "gossip", addrs[2]: "gossip"}
        # The dead address is hearsay that never answered: it is dropped at its first
        # failed check and comes back with each pong that names it.
        await until(lambda: (dead, "gossip") in heard)
        # Heard first-hand (mDNS, say), a gossiped peer is no longer forgettable.
        directory.add(addrs[1], "mdns")
        assert {p.address: p.source for p in directory.all()}[addrs[1]] == "mdns"
        # Nobody names the dead address any more: once every peer has answered since,
        # it is gone and stays gone.
        named.remove(dead)
        since = time.monotonic()
        await until(lambda: all_answered_since(since))
        await until(lambda: dead not in {p.address for p in directory.all()})
        heard.clear()
        since = time.monotonic()
        await until(lambda: all_answered_since(since))
        assert dead not in {p.address for p in directory.all()}
        assert (dead, "gossip") not in heard
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
        for _ in range(20):  # loop iterations, not time: the fetch can run meanwhile
            await asyncio.sleep(0)
        assert not fetch.done()  # no peer known yet, but discovery has not had its chance
        directory.add(addrs[0], "static")
        await directory.checked.wait()
        settled.set_result(None)
        assert await fetch == data
        assert t.stats["hits"] == 1


# -- fetch: many refs, grouped by peer, many ids per request -------------------------


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

    def counting_get(ids: list[ChunkId], as_server: list[bool] | None = None) -> dict[str, object]:
        requests.append(len(ids))
        return real_get(ids, as_server)

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


@pytest.mark.parametrize("split", [False, True], ids=["sink", "split-sink"])
@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
async def test_fetch_survives_a_lying_peer_and_hedges_a_stalled_one(
    verify: bool, split: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Into a plain sink, and into a SplitSink whose early half takes each chunk in
    the worker thread that verified it (its late half once per chunk)."""
    wanted = refs_for(60)
    homes = {ref: placement.rank(["n0", "n1", "n2"], ref.id)[0] for ref, _ in wanted}
    lied_to = {ref for ref, home in homes.items() if home == "n0"}
    assert lied_to  # both paths run: the liar is asked first for some chunks...
    assert any(home == "n1" for home in homes.values())  # ...the staller for others
    liar, stalled, good = FakeCache(), StallingCache(), FakeCache()
    for cache in (liar, stalled, good):
        cache.chunks.update({ref.id: data for ref, data in wanted})
    if not verify:
        without_verification(monkeypatch, {ref.id: data for ref, data in wanted})
    async with (
        peers(liar, stalled, good, corrupt=0) as addrs,
        tier(addrs, TierTuning(hedge_min=0.05, hedge_max=0.2)) as t,
    ):
        collect = Collect()
        got: dict[ChunkRef, bytes] = collect.got
        late: list[ChunkRef] = []
        sink: Sink = collect
        if split:
            claim = threading.Lock()

            def early(ref: ChunkRef, data: ChunkData) -> None:
                assert threading.current_thread() is not threading.main_thread()
                with claim:  # the first delivery is kept, as materialize claims it
                    got.setdefault(ref, bytes(data))

            async def counted(ref: ChunkRef, size: int) -> None:
                assert size == ref.size
                late.append(ref)

            sink = SplitSink(early, counted)
        assert await t.fetch([ref for ref, _ in wanted], sink) == []
        stalled.release.set()
        if split:
            assert sorted(late, key=lambda r: r.id) == sorted(got, key=lambda r: r.id)
            assert len(late) == len(wanted)
        if not verify:  # the liar, asked first for its chunks, gets its bytes through
            assert any(got[ref] == flipped(data) for ref, data in wanted if ref in lied_to)
            return
        assert got == dict(wanted)  # every byte verified: the liar's never got through
        assert t.stats["corrupt"] >= 1
        assert t.stats["hedges"] >= 1


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


async def test_directory_block_errors_come_out_as_they_are() -> None:
    """The directory's task group spans the block, yet the block's own error is
    raised unwrapped (a pull's one-line errors pass through it)."""
    wrong = ChunkMissing("0" * 64, "test")
    directory = PeerDirectory(Identity("client", "r"), FAST)
    with pytest.raises(ChunkMissing) as caught:
        async with directory:
            raise wrong
    assert caught.value is wrong
    async with directory as again:  # closed cleanly: it can be used again
        assert again is directory


async def test_has_asks_every_peer_and_ranks_holders_first() -> None:
    (x, data_x), (y, data_y), (z, _) = blob(11), blob(12), blob(13)
    a, b = FakeCache(), FakeCache()
    a.chunks[x], b.chunks[y] = data_x, data_y
    async with peers(a, b) as addrs, tier(addrs) as t:
        assert await t.has([x, y, z, x]) == {x, y}
        live = t._directory.live()
        assert t._order(x, live)[0][0].node == "n0"  # whatever rendezvous would say
        assert t._order(y, live)[0][0].node == "n1"


class CountingCache(FakeCache):
    """Counts the chunks it hands out."""

    def __init__(self) -> None:
        super().__init__()
        self.served = 0

    async def get(self, chunk_id: ChunkId) -> bytes:
        self.served += 1
        return await super().get(chunk_id)


async def test_a_big_region_spreads_each_chunk_over_its_servers() -> None:
    # 20 peers (more than placement.SPREAD): each chunk is asked of one of its 16
    # servers, picked by the tier's salt, not always of its home.
    wanted = refs_for(64)
    caches = [CountingCache() for _ in range(placement.SPREAD + 4)]
    for cache in caches:
        cache.chunks.update({ref.id: data for ref, data in wanted})
    async with peers(*caches) as addrs, tier(addrs, TierTuning(hedge_min=5.0)) as t:
        live = t._directory.live()
        nodes = [p.node for p in live]
        tiers = [PeerTier(t._directory, TierTuning(hedge_min=5.0)) for _ in range(8)]
        for each in tiers:
            sink = Collect()
            assert await each.fetch([ref for ref, _ in wanted], sink) == []
            assert sink.got == dict(wanted)
            for ref, _ in wanted:  # what it asked first: the server its salt picks
                servers = placement.servers(nodes, ref.id)
                first = servers[placement.pick(each._salt, ref.id, len(servers))]
                assert each._order(ref.id, live)[0][0].node == first
        served = [cache.served for cache in caches]
        assert sum(served) == 8 * len(wanted)
        homes = {placement.home(nodes, ref.id) for ref, _ in wanted}
        assert sum(1 for s in served if s) > len(homes)  # not only the homes served
        # Without servers (spread 1) only the homes serve.
        for cache in caches:
            cache.served = 0
        assert (
            await PeerTier(t._directory, TierTuning(spread=1)).fetch(
                [ref for ref, _ in wanted], Collect()
            )
            == []
        )
        by_node = dict(zip([f"n{i}" for i in range(len(caches))], caches, strict=True))
        assert {node for node, cache in by_node.items() if cache.served} == homes


def test_a_chunks_order_is_a_picked_server_the_next_one_and_its_home() -> None:
    live = [Peer(f"10.0.0.{i}:7070", "static", f"n{i}", up=True) for i in range(40)]
    nodes = [p.node for p in live]
    block = ChunkRef(ChunkId("ab" * 32), 1, ChunkId("cd" * 32), 0)
    home = placement.home(nodes, placement.home_key(block))
    for i in range(50):
        chunk_id, _ = blob(i)
        t = PeerTier(cast(PeerDirectory, None))
        t._spreading = True
        ranked, serving = t._order(chunk_id, live, placement.home_key(block))
        order = [p.node for p in ranked]
        servers = placement.servers(nodes, chunk_id)
        first = placement.pick(t._salt, chunk_id, len(servers))
        homes = placement.rank(nodes, placement.home_key(block))  # the next home if needed
        expected = [servers[first], servers[(first + 1) % len(servers)], *homes]
        assert order == list(dict.fromkeys(expected))[:3]
        assert home in order  # the store's one reader stays among the asked
        # The picked servers are asked as servers, the home as the home.
        assert {p.node for p in serving} == set(expected[:2]) - {home}
