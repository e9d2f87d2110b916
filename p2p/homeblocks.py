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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from blobstore.errors import BlobstoreError, CorruptChunk, NotFound, Unavailable
from blobstore.ids import ChunkId
from blobstore.source import ChunkData

from .metrics import Metrics
from .placement import HOME_BLOCK
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
    """The read-through source of a home (``get``), reading whole blocks into
    ``cache``. Block reads run in ``task_group``."""

    name = "origin"

    def __init__(
        self,
        cache: NodeStore,
        peers: ChunkSource,
        origin: OriginSource,
        task_group: asyncio.TaskGroup,
        metrics: Metrics,
        handoff_timeout: float = 2.0,
    ) -> None:
        """``metrics``: chunks a block read brings from the store that nobody
        waits for are counted as origin fetches here (the provider counts the
        ones it asked for), so the count stays one per chunk read.
        ``handoff_timeout``: how long a block read waits on the peers before it
        reads what they have not delivered from the store (a peer busy with its
        own block reads must not hold this one, nor the askers waiting on it)."""
        self._handoff_timeout = handoff_timeout
        self._cache = cache
        self._metrics = metrics
        self._peers = peers
        self._origin = origin
        self._by_id = HandoffSource(peers, origin)
        self._tg = task_group
        self._flights: dict[_Block, _Flight] = {}
        self.blocks_read = 0

    async def get(self, chunk_id: ChunkId) -> ChunkData:
        """The chunk, read with its block when the store's indexes place it in a
        pack. Raises ChunkMissing, CorruptChunk, Unavailable (as ``origin.get``)."""
        try:
            where = await self._origin.locator.locate(chunk_id)
        except Unavailable:
            where = None
        if where is None or where.pack is None:
            return await self._by_id.get(chunk_id)
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
            return await self._by_id.get(chunk_id)
        return data

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
                waiter = flight.waiters.pop(ref.id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(data)
                elif from_store:
                    self._metrics.origin_fetches += 1
                    self._metrics.origin_bytes += len(data)

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
