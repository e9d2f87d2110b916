"""What a daemon answers for a chunk: its cache, or -- if it is the chunk's home
peer or one of its servers -- a read-through, single-flight per chunk (a home
reads the store, a server the home: p2p/homeblocks.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from blobstore.errors import ChunkMissing, CorruptChunk, NotFound, Unavailable
from blobstore.ids import ChunkId
from blobstore.source import ChunkData

from .metrics import Metrics

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from blobstore.manifest import ChunkRef
    from blobstore.nodestore import NodeStore
    from blobstore.source import ChunkSource, Sink

log = logging.getLogger(__name__)


@runtime_checkable
class ReadThrough(Protocol):
    """A read-through that says where each chunk came from and counts its own
    store reads in the daemon's metrics (HomeBlocks)."""

    async def read(self, chunk_id: ChunkId) -> tuple[ChunkData, str]:
        """The chunk and its tier: "origin" (the store) or "peer" (its home).
        Raises ChunkMissing, CorruptChunk, Unavailable."""
        ...

    async def homes(self, chunk_id: ChunkId) -> bool:
        """Whether this daemon takes itself for the chunk's home (it reads the store)."""
        ...

    def reading(self, chunk_id: ChunkId) -> bool:
        """Whether it is reading ``chunk_id`` as its home right now."""
        ...


class ChunkProvider:
    """Answers chunk lookups for the server. Fetch tasks live in ``task_group``."""

    def __init__(
        self,
        cache: NodeStore,
        origin: ChunkSource | None,
        is_home: Callable[[ChunkId], bool | Awaitable[bool]],
        metrics: Metrics,
        task_group: asyncio.TaskGroup,
    ) -> None:
        self._cache = cache
        self._origin = origin
        self._is_home = is_home
        self._metrics = metrics
        self._tg = task_group
        self._fetching: dict[ChunkId, asyncio.Task[tuple[ChunkData | None, str]]] = {}

    def holds(self, chunk_ids: list[ChunkId]) -> list[bool]:
        """Held, or being read from the store as its home: a home asking the peers
        ranked next before it reads the store waits for such a read, not a second."""
        origin = self._origin
        reading = origin.reading if isinstance(origin, ReadThrough) else None
        return [self._cache.contains(c) or (reading is not None and reading(c)) for c in chunk_ids]

    async def lookup(
        self, chunk_id: ChunkId, as_server: bool = False
    ) -> tuple[ChunkData | None, str]:
        """The chunk's bytes and the tier they came from, or (None, "") if we answer missing.
        ``as_server``: the asker takes this daemon for one of the chunk's servers, not
        its home; if this daemon takes itself for the home, their views of the region
        differ and it answers from its cache only (see ``_find``)."""
        started = time.monotonic()
        data, tier = await self._find(chunk_id, as_server)
        self._metrics.answered(tier if data is not None else "", time.monotonic() - started)
        return data, tier

    async def _find(self, chunk_id: ChunkId, as_server: bool) -> tuple[ChunkData | None, str]:
        if self._cache.contains(chunk_id):
            try:
                return await self._cache.get(chunk_id), "local"
            except CorruptChunk as exc:
                # NodeStore already dropped the bad copy; fall through as if absent.
                self._metrics.corrupt_dropped += 1
                log.warning("%s", exc)
            except NotFound:
                pass  # evicted in between
        if self._origin is None:
            return None, ""
        home = self._is_home(chunk_id)  # a daemon's check locates the chunk: awaitable
        if not (home if isinstance(home, bool) else await home):
            return None, ""
        origin = self._origin
        if as_server and isinstance(origin, ReadThrough) and await origin.homes(chunk_id):
            # Asked as a server by a node that sees another home: this daemon's view
            # lags (a rolling start: it does not see the joiner that is home now).
            # Reading the store here would be the chunk's second store read; the
            # asker asks its next server, then the home it sees (sim, rolling start
            # 50/s, 40 nodes: 1.06-1.13x unique before).
            log.debug("asked as a server for %s, which this node homes", chunk_id[:16])
            return None, ""
        task = self._fetching.get(chunk_id)
        if task is None:
            task = self._tg.create_task(self._read_through(chunk_id))
            self._fetching[chunk_id] = task
        # Shielded: a requester going away must not cancel the fetch others wait on.
        return await asyncio.shield(task)

    async def _read_through(self, chunk_id: ChunkId) -> tuple[ChunkData | None, str]:
        try:
            if self._cache.contains(chunk_id):  # another path cached it meanwhile
                try:
                    return await self._cache.get(chunk_id), "local"
                except (NotFound, CorruptChunk):
                    pass
            origin = self._origin
            assert origin is not None
            counted = not isinstance(origin, ReadThrough)
            if counted:
                self._metrics.origin_fetches += 1
            try:
                if isinstance(origin, ReadThrough):
                    data, tier = await origin.read(chunk_id)
                else:
                    data, tier = await origin.get(chunk_id), "origin"
                if counted:
                    self._metrics.origin_bytes += len(data)
            except ChunkMissing:
                return None, ""
            except (Unavailable, CorruptChunk) as exc:
                log.warning("read-through of %s failed: %s", chunk_id[:16], exc)
                return None, ""
            try:
                await self._cache.put(chunk_id, data)
            except Unavailable as exc:
                log.warning("cannot keep chunk %s: %s", chunk_id[:16], exc)
            return data, tier
        finally:
            del self._fetching[chunk_id]


class HandoffSource:
    """A home's read-through: ask the peers ranked next for the chunk (``peers``, a
    PeerTier over the daemon's directory, which never lists the daemon itself), then
    ``origin``. A node that just joined (rolling start, replacement) becomes home for
    chunks its neighbours were home for a moment ago and already hold; reading them
    from the store again sent 4.2x the unique bytes to the store in a 50-a-second
    rolling start (bench/sim_region.py, scenario b). No loop: a peer that does not
    consider itself home answers from its cache or 'missing'."""

    name = "origin"

    def __init__(
        self,
        peers: ChunkSource,
        origin: ChunkSource,
        timeout: float = 2.0,
        metrics: Metrics | None = None,
    ) -> None:
        """``timeout``: how long the peers may take before the store is read. In a cold
        herd every peer's lookup budget is taken by askers whose homes are reading
        through, and homes asking each other waited for the 30 s request timeout (sim,
        100 nodes at once: 73 of 100 unfinished after 60 s, the store read 47x).
        ``metrics``: where reads from the store are counted (None: the caller counts)."""
        self._peers = peers
        self._origin = origin
        self._timeout = timeout
        self._metrics = metrics

    async def get(self, chunk_id: ChunkId) -> ChunkData:
        """Raises what ``origin.get`` raises."""
        try:
            async with asyncio.timeout(self._timeout):
                return await self._peers.get(chunk_id)
        except (ChunkMissing, Unavailable, TimeoutError):
            pass
        if self._metrics is not None:
            self._metrics.origin_fetches += 1
        data = await self._origin.get(chunk_id)
        if self._metrics is not None:
            self._metrics.origin_bytes += len(data)
        return data

    async def has(self, chunk_ids: Iterable[ChunkId]) -> set[ChunkId]:
        return await self._origin.has(chunk_ids)

    async def fetch(self, refs: Sequence[ChunkRef], sink: Sink) -> list[ChunkRef]:
        """The store's batch path (the provider reads through chunk by chunk, with ``get``)."""
        return await self._origin.fetch(refs, sink)
