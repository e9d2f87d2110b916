"""Homes read through in blocks (p2p/homeblocks.py).

In process: a real ``file://`` store holding a pack and its index, a real node
store, a real ``OriginSource``; the peers are a fake source (blocks shrunk to
64 KiB). With daemons: four real daemons in front of SeaweedFS, four pulls of
the same ref at once. Each home reads the 32 MiB blocks of packs it is home for
with one ranged GET each (not one GET per chunk), and the region still reads
each byte from S3 about once. S3 requests are counted at the store side by the
counting proxy in HTTP mode. BLOBSTORE_HOME_SPANS_BYTES overrides the data size
of that test (default 256 MiB).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import pytest
from daemons import cluster
from fakes import FakeSource
from helpers import random_bytes, snapshot
from herd import pull_at_once, push_big_tree
from s3proxy import CountingProxy
from s3server import SeaweedS3Server

from blobstore.config import CacheConfig
from blobstore.ids import ChunkId, hash_bytes
from blobstore.manifest import ChunkRef
from blobstore.nodestore import NodeStore
from blobstore.objectstore import index_key, pack_key
from blobstore.origin import OriginSource
from blobstore.packs import encode_index
from blobstore.stores import open_object_store
from p2p import homeblocks, placement
from p2p.homeblocks import HomeBlocks
from p2p.metrics import Metrics

DATA_BYTES = int(os.environ.get("BLOBSTORE_HOME_SPANS_BYTES", 256 << 20))
NODES = 4
GIB = 1 << 30


def _kind(method: str, target: str) -> str:
    """What one S3 request read: "data" (a range of a pack), "index", or "other"."""
    path = urlsplit(target).path
    if method != "GET":
        return "other"
    if "/packs/" in path:
        return "index" if path.endswith(".index") else "data"
    return "other"


@dataclass
class Home:
    blocks: HomeBlocks
    origin: OriginSource
    cache: NodeStore
    peers: FakeSource
    refs: list[ChunkRef]
    chunks: dict[ChunkId, bytes]


@asynccontextmanager
async def home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, peers_hold: int = 0, handoff: float = 10.0
) -> AsyncIterator[Home]:
    """A home over a store with one pack of 20 chunks of 8 KiB in blocks of 64 KiB
    (three blocks: 8, 8 and 4 chunks); its peers hold the first ``peers_hold``."""
    monkeypatch.setattr(homeblocks, "HOME_BLOCK", 64 << 10)
    datas = [random_bytes(8 << 10, f"home-{i}") for i in range(20)]
    pack = hash_bytes(b"".join(datas))
    refs = [ChunkRef(hash_bytes(d), len(d), pack, i * (8 << 10)) for i, d in enumerate(datas)]
    chunks = {r.id: d for r, d in zip(refs, datas, strict=True)}
    async with (
        open_object_store((tmp_path / "store").as_uri()) as store,
        NodeStore(CacheConfig(tmp_path / "cache")) as cache,
        asyncio.TaskGroup() as tg,
    ):
        await store.put(pack_key(pack), b"".join(datas))
        await store.put(index_key(pack), encode_index(pack, refs))
        peers = FakeSource("peer", {r.id: chunks[r.id] for r in refs[:peers_hold]})
        origin = OriginSource(store)
        blocks = HomeBlocks(cache, peers, origin, tg, Metrics(), handoff_timeout=handoff)
        yield Home(blocks, origin, cache, peers, refs, chunks)


async def until(condition: Callable[[], bool]) -> None:
    """Wait until ``condition()`` holds (checked every ms); fail after 10 s."""
    with anyio.fail_after(10):
        while not condition():  # noqa: ASYNC110 - polling a test condition
            await anyio.sleep(0.001)


@pytest.mark.anyio
async def test_asks_for_a_block_share_one_read_and_fill_the_node_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with home(tmp_path, monkeypatch, peers_hold=2) as h:
        async with asyncio.TaskGroup() as tg:
            asks = [tg.create_task(h.blocks.get(r.id)) for r in h.refs]
        assert [bytes(a.result()) for a in asks] == [h.chunks[r.id] for r in h.refs]
        # One read per block: the peers asked for the chunk that started it (and for
        # the rest of the block only if they held that one: the first two chunks),
        # the rest with one ranged read of the pack.
        assert h.blocks.blocks_read == 3
        blocks = [{r.id for r in h.refs[start:end]} for start, end in ((0, 8), (8, 16), (16, 20))]
        firsts = [ids for ids in h.peers.fetches if len(ids) == 1]
        assert sorted(next(i for i, b in enumerate(blocks) if f[0] in b) for f in firsts) == [
            0,
            1,
            2,
        ]
        assert all(len(ids) == 1 or set(ids) < blocks[0] for ids in h.peers.fetches)
        assert h.origin.requests == 3
        assert all(h.cache.contains(r.id) for r in h.refs)
        # Asked again: the node store answers, nothing is read.
        assert bytes(await h.blocks.get(h.refs[5].id)) == h.chunks[h.refs[5].id]
        assert (h.blocks.blocks_read, h.origin.requests) == (3, 3)


@pytest.mark.anyio
async def test_a_chunk_its_block_read_does_not_carry_is_read_by_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with home(tmp_path, monkeypatch) as h:
        first, other = h.refs[0], h.refs[1]
        between = h.origin.locator.refs_between

        async def without_other(pack: ChunkId, start: int, end: int) -> list[ChunkRef]:
            return [r for r in await between(pack, start, end) if r != other]

        monkeypatch.setattr(h.origin.locator, "refs_between", without_other)
        h.peers.gate = anyio.Event()  # the block read waits at the peers
        async with asyncio.TaskGroup() as tg:
            ask_first = tg.create_task(h.blocks.get(first.id))
            await until(lambda: bool(h.peers.fetches))
            ask_other = tg.create_task(h.blocks.get(other.id))
            await until(lambda: other.id in h.peers.gets)  # by id: its peers first
            h.peers.gate.set()
        assert bytes(ask_first.result()) == h.chunks[first.id]
        assert bytes(ask_other.result()) == h.chunks[other.id]
        assert other.id not in h.peers.fetches[0]
        assert h.origin.requests == 2  # the block without it, then it alone


@pytest.mark.anyio
async def test_a_block_read_does_not_wait_long_on_busy_peers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with home(tmp_path, monkeypatch, peers_hold=20, handoff=0.05) as h:
        h.peers.gate = anyio.Event()  # the peers hold everything but never answer
        async with asyncio.TaskGroup() as tg:
            asks = [tg.create_task(h.blocks.get(r.id)) for r in h.refs[:8]]
        assert [bytes(a.result()) for a in asks] == [h.chunks[r.id] for r in h.refs[:8]]
        assert h.origin.requests == 1
        assert all(h.cache.contains(r.id) for r in h.refs[:8])


def test_packed_chunks_are_placed_by_block_of_their_pack() -> None:
    pack, other_pack = ChunkId("ab" * 32), ChunkId("cd" * 32)
    block = placement.HOME_BLOCK

    def key(offset: int, in_pack: ChunkId | None = pack) -> str:
        return placement.home_key(ChunkRef(hash_bytes(str(offset).encode()), 1, in_pack, offset))

    assert key(0) == key(block - 1) != key(block) == key(2 * block - 1)
    assert key(0) != key(0, other_pack)
    loose = ChunkRef(hash_bytes(b"loose"), 1)
    assert placement.home_key(loose) == loose.id
    nodes = [f"n{i}" for i in range(8)]
    assert len({placement.home(nodes, key(i * block)) for i in range(64)}) == len(nodes)


@pytest.mark.s3
@pytest.mark.slow
def test_homes_read_blocks_with_one_get_each(s3_server: SeaweedS3Server, tmp_path: Path) -> None:
    pushed = push_big_tree(s3_server, tmp_path, "homespans", DATA_BYTES, seed=23)
    store, unique, expected = pushed.store, pushed.unique, pushed.expected

    with CountingProxy.to_endpoint(s3_server.endpoint).in_thread() as proxy:
        proxy.http = True
        env = {**pushed.env, "AWS_ENDPOINT_URL": proxy.endpoint}
        with cluster(store, tmp_path, NODES, env=env) as daemons:
            proxy.reset()
            for doc, err in pull_at_once(store, tmp_path, daemons, env):
                print("pull from", doc["from"], err[-2000:])
                assert doc["from"]["peer"] > 0
            sent = proxy.bytes_to_client
            kinds = [_kind(method, target) for method, target in list(proxy.exchanges)]

    data_gets, index_gets, other = (kinds.count(k) for k in ("data", "index", "other"))
    per_gib = data_gets * GIB / unique
    print(
        f"S3 sent {sent / unique:.3f}x the {unique} unique bytes; ranged GETs of packs: "
        f"{data_gets} ({per_gib:.0f} per GiB); index GETs {index_gets}; other requests {other}"
    )
    for i in range(NODES):
        assert snapshot(tmp_path / f"out-{i}") == expected
    assert sent <= 1.05 * unique, f"S3 sent {sent} bytes for {unique} unique bytes"
    assert data_gets > 0
    # One GET per 32 MiB block (a block crossing a pack's end takes two): ~32-64 per GiB;
    # one GET per ~1 MiB chunk would be ~1,000.
    assert per_gib <= 128, f"{data_gets} ranged GETs for {unique} bytes"
