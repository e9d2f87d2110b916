"""Where a pack holds a chunk, for reads by chunk id alone.

A pull knows every chunk's place from its manifest; a home peer asked for a
chunk id (its read-through), or anything else reading by id, does not.
``PackLocator`` answers from the store's pack indexes (``packs.StoreIndex``):
loaded on first use, and reloaded on an unknown id at most once per
``refresh`` seconds, since a push may have added packs.
"""

from __future__ import annotations

import bisect
import contextlib
import time
from collections.abc import Iterable
from pathlib import Path

import anyio

from .errors import Corrupt
from .ids import ChunkId
from .manifest import ChunkRef
from .objectstore import ObjectStore
from .packs import BadLocation, IndexCache, StoreIndex, decode_index

_PACKS_KEPT = 1024
"""Pack indexes ``refs_between`` keeps decoded (~100 bytes per chunk)."""


class _MemoryIndexCache(IndexCache):
    """Pack indexes kept in memory between reloads, when no node cache is given:
    a reload then reads only the indexes of packs new since the last one."""

    def __init__(self) -> None:
        super().__init__(Path("/nonexistent"))
        self._indexes: dict[ChunkId, tuple[ChunkRef, ...]] = {}
        self._bad: set[BadLocation] = set()

    def read(self, pack_id: ChunkId) -> tuple[ChunkRef, ...] | None:
        return self._indexes.get(pack_id)

    def write(self, pack_id: ChunkId, index: bytes) -> None:
        with contextlib.suppress(Corrupt):  # StoreIndex checked it already
            self._indexes[pack_id] = decode_index(pack_id, index)

    def prune(self, keep: Iterable[ChunkId]) -> None:
        wanted = set(keep)
        self._indexes = {p: refs for p, refs in self._indexes.items() if p in wanted}

    def read_bad(self) -> set[BadLocation]:
        return set(self._bad)

    def add_bad(self, locations: Iterable[BadLocation]) -> None:
        self._bad |= set(locations)


class PackLocator:
    """chunk id -> where a pack holds it, from the store's pack indexes, for
    reads by id alone. Loaded on first use (a LIST of ``packs/`` plus the
    indexes ``cache`` lacks; without a cache they are kept in memory); an
    unknown id reloads it at most once per ``refresh`` seconds (a push may
    have added packs since)."""

    def __init__(
        self, store: ObjectStore, cache: IndexCache | None = None, refresh: float = 30.0
    ) -> None:
        self.store = store
        self.cache = cache if cache is not None else _MemoryIndexCache()
        self.refresh = refresh
        self._index: StoreIndex | None = None
        self._loaded_at = 0.0
        self._lock = anyio.Lock()
        self._packs: dict[ChunkId, tuple[ChunkRef, ...]] = {}
        """Pack indexes ``refs_between`` read, by offset (forgotten at each reload)."""
        self.loads = 0
        self.index_fetches = 0
        """Index objects read from the store, over all loads."""

    async def locate(self, chunk_id: ChunkId) -> ChunkRef | None:
        """Raises StoreUnavailable (the indexes could not be read)."""
        index = self._index
        if index is not None:
            found = index.locate(chunk_id)
            if found is not None or time.monotonic() - self._loaded_at < self.refresh:
                return found
        async with self._lock:
            if self._index is index:  # nobody reloaded while we waited
                self._index = await StoreIndex.load(self.store, self.cache)
                self._packs = {}
                self._loaded_at = time.monotonic()
                self.loads += 1
                self.index_fetches += self._index.index_fetches
        return self._index.locate(chunk_id) if self._index is not None else None

    async def refs_between(self, pack_id: ChunkId, start: int, end: int) -> list[ChunkRef]:
        """The chunks ``pack_id``'s index places at offsets in [start, end), by
        offset (a home reading a block of a pack). Empty when the pack is not
        among the indexes loaded."""
        refs = self._packs.get(pack_id)
        if refs is None:
            if self._index is None or pack_id not in self._index.packs:
                return []
            read = await anyio.to_thread.run_sync(self.cache.read, pack_id)
            refs = tuple(sorted(read or (), key=lambda ref: ref.offset))
            if len(self._packs) >= _PACKS_KEPT:
                self._packs.clear()
            self._packs[pack_id] = refs
        first = bisect.bisect_left(refs, start, key=lambda ref: ref.offset)
        last = bisect.bisect_left(refs, end, key=lambda ref: ref.offset)
        return list(refs[first:last])
