"""The object store seen as a verified ``ChunkStore`` (the "origin" tier)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import anyio

from .errors import ChunkMissing, ObjectMissing
from .ids import ChunkId, verify
from .manifest import ChunkRef
from .objectstore import ObjectStore, chunk_key
from .source import ChunkData, Sink, fetch_each

# Verifying a chunk takes ~0.25 ms/MiB; only large ones are worth a thread hop.
_THREAD_VERIFY_MIN = 256 << 10


class OriginSource:
    """Chunks in the global object store. Every byte read is verified."""

    name = "origin"

    def __init__(self, store: ObjectStore, concurrency: int = 64) -> None:
        self.store = store
        self._limit = anyio.Semaphore(concurrency)

    async def get(self, chunk_id: ChunkId) -> ChunkData:
        """Raises ChunkMissing, CorruptChunk, StoreUnavailable."""
        async with self._limit:
            try:
                data = await self.store.get(chunk_key(chunk_id))
            except ObjectMissing:
                raise ChunkMissing(chunk_id, "object store") from None
        await verify_off_loop(chunk_id, data, "object store")
        return data

    async def has(self, chunk_ids: Iterable[ChunkId]) -> set[ChunkId]:
        """Which of ``chunk_ids`` the store holds, checked in bulk."""
        keys = {chunk_key(c): c for c in chunk_ids}
        return {keys[k] for k in await self.store.exists_many(keys.keys())}

    async def fetch(self, refs: Sequence[ChunkRef], sink: Sink) -> list[ChunkRef]:
        return await fetch_each(self.get, refs, sink)

    async def put(self, chunk_id: ChunkId, data: ChunkData) -> None:
        async with self._limit:
            await self.store.put(chunk_key(chunk_id), data)


async def verify_off_loop(chunk_id: ChunkId, data: ChunkData, where: str) -> None:
    """``ids.verify`` in a worker thread for big buffers. Raises CorruptChunk."""
    if len(data) >= _THREAD_VERIFY_MIN:
        await anyio.to_thread.run_sync(verify, chunk_id, data, where)
    else:
        verify(chunk_id, data, where)
