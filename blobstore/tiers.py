"""The tier list: local -> peers -> origin, as a composition of ChunkSources.

``TieredSource`` asks each source in order; whatever came from farther away
is written back into the local cache. Concurrent requests for one chunk share
one fetch (single-flight). Bytes served are counted per tier name.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import anyio

from .errors import ChunkMissing, Corrupt, NotFound, Unavailable
from .ids import ChunkId
from .source import ChunkData, ChunkSource, ChunkStore, Sink, fetch_each

if TYPE_CHECKING:
    from .manifest import ChunkRef

log = logging.getLogger(__name__)


class _Flight:
    __slots__ = ("data", "done", "error")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.data: ChunkData | None = None
        self.error: BaseException | None = None


class TieredSource:
    """A ChunkSource trying ``sources`` in order, caching into ``cache``."""

    name = "tiered"

    def __init__(self, sources: Sequence[ChunkSource], cache: ChunkStore | None = None) -> None:
        self.sources = list(sources)
        self.cache = cache
        self.bytes_from: Counter[str] = Counter({s.name: 0 for s in self.sources})
        self._flights: dict[ChunkId, _Flight] = {}
        self.cache_failures = 0
        """Chunks served but not written back (cache disk full or failing)."""

    async def get(self, chunk_id: ChunkId) -> ChunkData:
        """Raises ChunkMissing if no tier holds it, or the last Unavailable if
        a tier that might have held it could not answer."""
        while (flight := self._flights.get(chunk_id)) is not None:
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            if flight.data is not None:
                return flight.data
            # the leader was cancelled: fetch again ourselves
        flight = self._flights[chunk_id] = _Flight()
        try:
            flight.data = await self._fetch(chunk_id)
            return flight.data
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[chunk_id]
            flight.done.set()

    async def _fetch(self, chunk_id: ChunkId) -> ChunkData:
        unavailable: Unavailable | None = None
        corrupt: Corrupt | None = None
        for source in self.sources:
            try:
                data = await source.get(chunk_id)
            except NotFound:
                continue
            except Corrupt as exc:
                if source is not self.sources[-1]:
                    log.warning("%s: %s; trying the next tier", source.name, exc)
                corrupt = exc
                continue
            except Unavailable as exc:
                log.info("%s unavailable: %s", source.name, exc)
                unavailable = exc
                continue
            self.bytes_from[source.name] += len(data)
            if self.cache is not None and source is not self.cache:
                try:
                    await self.cache.put(chunk_id, data)
                except Unavailable as exc:  # a full cache must not fail the pull
                    self.cache_failures += 1
                    if self.cache_failures == 1:  # once, not once per chunk
                        log.warning("not caching fetched chunks: %s", exc)
            return data
        if unavailable is not None:
            raise unavailable
        if corrupt is not None:  # say "corrupt", not "not found", when that is the reason
            raise corrupt
        raise ChunkMissing(chunk_id, "any tier")

    async def fetch(self, refs: Sequence[ChunkRef], sink: Sink) -> list[ChunkRef]:
        return await fetch_each(self.get, refs, sink)

    async def has(self, chunk_ids: Iterable[ChunkId]) -> set[ChunkId]:
        wanted = set(chunk_ids)
        found: set[ChunkId] = set()
        for source in self.sources:
            if not wanted - found:
                break
            found |= await source.has(wanted - found)
        return found
