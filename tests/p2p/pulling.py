"""An in-process pull through local cache -> peer tier -> origin, for tests that
need to watch (or interfere with) the pull while it runs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from blobstore.catalog import Catalog
from blobstore.config import CacheConfig, Config, PeerConfig
from blobstore.ids import ChunkId
from blobstore.manifest import ChunkRef
from blobstore.materialize import materialize
from blobstore.nodestore import NodeStore
from blobstore.origin import OriginSource
from blobstore.source import ChunkData, Sink
from blobstore.stores import open_object_store
from blobstore.tiers import TieredSource
from p2p.peertier import PeerTier
from p2p.plugin import PLUGIN


class Watched:
    """The peer tier, calling ``after(n)`` after the n-th chunk it delivered."""

    name = "peer"

    def __init__(self, tier: PeerTier, after: Callable[[int], None]) -> None:
        self.tier = tier
        self.after = after
        self.count = 0

    async def get(self, chunk_id: ChunkId) -> ChunkData:
        data = await self.tier.get(chunk_id)
        self.count += 1
        self.after(self.count)
        return data

    async def has(self, chunk_ids: Iterable[ChunkId]) -> set[ChunkId]:
        return await self.tier.has(chunk_ids)

    async def fetch(self, refs: Sequence[ChunkRef], sink: Sink) -> list[ChunkRef]:
        async def counting(ref: ChunkRef, data: ChunkData) -> None:
            await sink(ref, data)
            self.count += 1
            self.after(self.count)

        return await self.tier.fetch(refs, counting)


@dataclass
class PullOutcome:
    from_tier: dict[str, int]
    tier_stats: dict[str, int]
    bytes: int


async def pull(
    store: str,
    cache: Path,
    peers: str,
    ref: str,
    dest: Path,
    *,
    region: str = "default",
    token: bytes | None = None,
    after: Callable[[int], None] | None = None,
) -> PullOutcome:
    config = Config(store, CacheConfig(cache), region, PeerConfig.parse(peers, token))
    async with (
        open_object_store(store) as object_store,
        NodeStore(config.cache) as local,
        PLUGIN.peer_tier(config, local) as tier,
    ):
        assert isinstance(tier, PeerTier)
        catalog = Catalog(object_store)
        tree = await catalog.load_tree(await catalog.resolve_or_id(ref))
        peer = Watched(tier, after or (lambda n: None))
        source = TieredSource([local, peer, OriginSource(object_store)], local)
        stats = await materialize(tree, dest, source, concurrency=16)
        return PullOutcome(dict(source.bytes_from), dict(tier.stats), stats.bytes)
