"""A home's read-through by block: one store read per block of a pack, not one
per chunk.

Packed chunks are placed by block (placement.home_key: every chunk starting in
one HOME_BLOCK of a pack has one home), so a home asked for one chunk of a block
will be asked for its neighbours too, by every node pulling it. The first ask
starts one read of the whole block (single-flight per block): the chunks the
pack's index places there that the node store lacks, read with one
``OriginSource.fetch`` (one ranged GET per span) -- unless the peers ranked
next for the block hold the asked chunk (a node that just joined took over
their blocks): then they are asked for the rest too, and the store only for
what they lack. Each chunk goes into the node store as it arrives, and to whoever
waits for it; only those chunks are held in memory. An ask for a chunk the
block read does not carry (the index disagrees, or it started later) is read
by id, as before: peers ranked next for the chunk, then the store.

A daemon that is not the chunk's home but one of its servers (placement.servers:
requesters spread their asks over a chunk's servers) reads the chunk through
from its home -- the home and the peers ranked next for its block, never the
store: a chunk keeps one reader of the store, and the home's block read serves
the servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from blobstore.errors import BlobstoreError, ChunkMissing, CorruptChunk, NotFound, Unavailable
from blobstore.ids import ChunkId
from blobstore.source import ChunkData

from .metrics import Metrics
from .peertier import PeerTier
from .placement import HOME_BLOCK, home_key
from .provider import HandoffSource

if TYPE_CHECKING:
    from blobstore.manifest import ChunkRef
    from blobstore.nodestore import NodeStore
    from blobstore.origin import OriginSource
    from blobstore.source import ChunkSource, Sink

log = logging.getLogger(__name__)

_Block = tuple[ChunkId, int]
"""(pack, offset // HOME_BLOCK)."""


class _Flight:
    """One block being read: what it carries, what arrived, who waits."""

    __slots__ = ("arrived", "carries", "finished", "planned", "waiters")

    def __init__(self, carries: set[ChunkId]) -> None:
        self.carries = carries
        self.planned = asyncio.Event()
        """Set once ``carries`` names every chunk the read will bring."""
        self.finished = False
        self.arrived: set[ChunkId] = set()
        self.waiters: dict[ChunkId, asyncio.Future[ChunkData | None]] = {}


class HomeBlocks:
    """The read-through source of a daemon (``read``): as a chunk's home, whole
    blocks from the store into ``cache``; as one of its servers, the chunk from
    its home. Block reads run in ``task_group``."""

    name = "origin"

    def __init__(
        self,
        cache: NodeStore,
        peers: ChunkSource,
        origin: OriginSource,
        task_group: asyncio.TaskGroup,
        metrics: Metrics,
        handoff_timeout: float = 2.0,
        relay_timeout: float = 10.0,
    ) -> None:
        """``metrics``: every chunk read from the store is counted here (the
        provider counts none for a ReadThrough), one per chunk read; chunks read
        through from the home are not.
        ``handoff_timeout``: how long a block read waits on the peers before it
        reads what they have not delivered from the store (a peer busy with its
        own block reads must not hold this one, nor the askers waiting on it).
        ``relay_timeout``: how long a server waits on the chunk's home.
        ``peers``: a PeerTier over the daemon's directory (it says whether the
        daemon is a chunk's home, and is asked by home only); any other source
        makes this daemon every chunk's home."""
        self._handoff_timeout = handoff_timeout
        self._relay_timeout = relay_timeout
        self._cache = cache
        self._metrics = metrics
        self._is_home: Callable[[str], bool] = lambda key: True
        self._settled: Callable[[], bool] = lambda: True
        self._home: ChunkSource = peers
        if isinstance(peers, PeerTier):
            self._is_home = peers.is_home
            self._settled = peers.sees_region
            self._home = peers.homes_only()
            # The peers ranked next may be the chunk's servers: asked for a chunk they
            # lack, they would read it through from this home, which waits on them.
            # So servers are asked only for what they hold or are reading from the
            # store themselves (``reading``: as a home in a view that lags this one).
            peers = peers.homes_only(held_only=True)
        self._peers = peers
        self._origin = origin
        self._by_id = HandoffSource(peers, origin, metrics=metrics)
        self._by_id_reading: set[ChunkId] = set()
        self._tg = task_group
        self._flights: dict[_Block, _Flight] = {}
        self.blocks_read = 0
        self.relayed = 0
        """Chunks read through from their home, as one of their servers."""

    async def read(self, chunk_id: ChunkId) -> tuple[ChunkData, str]:
        """The chunk and where it came from: "origin" when this daemon is its home
        (read with its block when the store's indexes place it in a pack; store
        reads are counted in ``metrics``), "peer" when it is one of its servers
        (from its home). Raises ChunkMissing, CorruptChunk, Unavailable."""
        try:
            where = await self._origin.locator.locate(chunk_id)
        except Unavailable:
            where = None
        if self._is_home(home_key(where) if where is not None else chunk_id):
            return await self._home_read(chunk_id, where), "origin"
        if not self._settled():  # its home may not be the one the asker sees
            raise ChunkMissing(chunk_id, "this server (its view of the region is not settled)")
        return await self._relay(chunk_id, where), "peer"

    async def homes(self, chunk_id: ChunkId) -> bool:
        """Whether this daemon takes itself for the chunk's home (by its block when a
        pack holds it)."""
        return self._is_home(await self._placed_by(chunk_id))

    async def _placed_by(self, chunk_id: ChunkId) -> str:
        try:
            where = await self._origin.locator.locate(chunk_id)
        except Unavailable:
            where = None
        return home_key(where) if where is not None else chunk_id

    async def get(self, chunk_id: ChunkId) -> ChunkData:
        """The chunk (``read`` without the tier)."""
        data, _tier = await self.read(chunk_id)
        return data

    async def _relay(self, chunk_id: ChunkId, where: ChunkRef | None) -> ChunkData:
        """A server's read: the chunk's home, then the peers ranked next for it (one
        of them is home once the first is gone), never the store."""
        self.relayed += 1
        got: list[ChunkData] = []

        async def keep(ref: ChunkRef, data: ChunkData) -> None:
            got.append(data)

        # Bounded: two servers whose views of the region disagree could each take
        # the other for the home and wait on each other.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._relay_timeout):
                if where is None:
                    return await self._home.get(chunk_id)
                await self._home.fetch([where], keep)
        if not got:  # the asker moves on to its next peer (the home is among them)
            raise ChunkMissing(chunk_id, "its home")
        return got[0]

    async def _home_read(self, chunk_id: ChunkId, where: ChunkRef | None) -> ChunkData:
        if where is None or where.pack is None:
            return await self._read_by_id(chunk_id)
        block = (where.pack, where.offset // HOME_BLOCK)
        flight = self._flights.get(block)
        if flight is None and self._cache.contains(chunk_id):
            # Its block was read since the caller looked.
            with contextlib.suppress(NotFound, CorruptChunk):
                return await self._cache.get(chunk_id)
            flight = self._flights.get(block)
        if flight is None:
            flight = _Flight({chunk_id})
            flight.waiters[chunk_id] = asyncio.get_running_loop().create_future()
            self._flights[block] = flight
            self._tg.create_task(self._read_block(block, where, flight))
        if chunk_id not in flight.carries:
            await flight.planned.wait()
        data: ChunkData | None = None
        if chunk_id in flight.arrived:
            try:
                data = await self._cache.get(chunk_id)
            except (NotFound, CorruptChunk):
                data = None
        elif chunk_id in flight.carries and not flight.finished:
            waiter = flight.waiters.get(chunk_id)
            if waiter is None:
                waiter = flight.waiters[chunk_id] = asyncio.get_running_loop().create_future()
            data = await asyncio.shield(waiter)
        if data is None:
            return await self._read_by_id(chunk_id)
        return data

    async def _read_by_id(self, chunk_id: ChunkId) -> ChunkData:
        self._by_id_reading.add(chunk_id)
        try:
            return await self._by_id.get(chunk_id)
        finally:
            self._by_id_reading.discard(chunk_id)

    def reading(self, chunk_id: ChunkId) -> bool:
        """Whether this daemon is reading ``chunk_id`` as its home (from the peers
        ranked next or the store): a home that asks it waits for it, so the store
        is read once even while two nodes' views of the region disagree."""
        return chunk_id in self._by_id_reading or any(
            chunk_id in flight.carries and not flight.finished for flight in self._flights.values()
        )

    async def _read_block(self, block: _Block, asked: ChunkRef, flight: _Flight) -> None:
        pack, number = block
        try:
            refs = await self._origin.locator.refs_between(
                pack, number * HOME_BLOCK, (number + 1) * HOME_BLOCK
            )
            wanted = [r for r in refs if r.id == asked.id or not self._cache.contains(r.id)]
            if not any(r.id == asked.id for r in wanted):
                wanted.append(asked)  # located in an index since reloaded: read it anyway
            flight.carries.update(r.id for r in wanted)
            flight.planned.set()
            self.blocks_read += 1

            async def arrived(ref: ChunkRef, data: ChunkData, from_store: bool) -> None:
                try:
                    await self._cache.put(ref.id, data)
                except Unavailable as exc:
                    log.warning("cannot keep chunk %s: %s", ref.id[:16], exc)
                flight.arrived.add(ref.id)
                if from_store:
                    self._metrics.origin_fetches += 1
                    self._metrics.origin_bytes += len(data)
                waiter = flight.waiters.pop(ref.id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(data)

            async def from_peer(ref: ChunkRef, data: ChunkData) -> None:
                await arrived(ref, data, from_store=False)

            async def from_store(ref: ChunkRef, data: ChunkData) -> None:
                await arrived(ref, data, from_store=True)

            # The peers ranked next for the block are asked for the asked chunk first:
            # one that holds it (home a moment ago) likely holds the block. Asking them
            # for the whole block in every case made homes wait on each other's lookup
            # budgets in a cold herd (4 daemons, 256 MiB: S3 sent 1.9x unique).
            rest = [r for r in wanted if r.id != asked.id]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._handoff_timeout):
                    if not await self._peers.fetch([asked], from_peer):
                        await self._peers.fetch(rest, from_peer)
            left = [r for r in wanted if r.id not in flight.arrived]
            await self._origin.fetch(left, from_store)
        except BlobstoreError as exc:
            log.warning("read-through of block %d of pack %s failed: %s", number, pack[:16], exc)
        finally:
            flight.finished = True
            flight.planned.set()
            del self._flights[block]
            for waiter in flight.waiters.values():
                if not waiter.done():
                    waiter.set_result(None)  # its asker reads the chunk by id

    async def has(self, chunk_ids: Iterable[ChunkId]) -> set[ChunkId]:
        return await self._origin.has(chunk_ids)

    async def fetch(self, refs: Sequence[ChunkRef], sink: Sink) -> list[ChunkRef]:
        """The store's batch path (a home reads through with ``get``)."""
        return await self._origin.fetch(refs, sink)
