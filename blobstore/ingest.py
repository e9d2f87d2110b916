"""Turning bytes on disk into chunks in the object store.

A worker thread cuts and hashes the file (streamed, bounded memory) and hands
batches of spans to the event loop through a bounded stream; the loop asks the
store which chunks it lacks (in parallel) and uploads only those, re-reading
their bytes with ``pread`` (the page cache still holds them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.from_thread
import blake3
from anyio.streams.memory import MemoryObjectSendStream

from .chunker import DEFAULT_PARAMS, Chunker, ChunkerParams, Span
from .errors import BadInput, single_errors
from .ids import ChunkId, hash_bytes
from .manifest import ChunkRef
from .source import ChunkStore

_BATCH = 32


@dataclass(frozen=True, slots=True)
class Ingested:
    chunks: tuple[ChunkRef, ...]
    size: int
    digest: ChunkId
    """Whole-content BLAKE3."""


@dataclass(slots=True)
class IngestStats:
    chunks: int = 0
    new_chunks: int = 0
    new_bytes: int = 0
    bytes: int = 0
    known: set[ChunkId] = field(default_factory=set)
    """Chunks known to be in the store (uploaded or found) during this run."""
    found: set[ChunkId] = field(default_factory=set)
    """Chunks the store already held (not uploaded by this run)."""


class _Window:
    """A file-like view of ``length`` bytes at ``offset`` (a tar member in place)."""

    __slots__ = ("_f", "_left")

    def __init__(self, f: object, left: int) -> None:
        self._f = f
        self._left = left

    def readinto(self, buf: memoryview) -> int:
        if self._left <= 0:
            return 0
        view = memoryview(buf)[: min(len(buf), self._left)]
        n: int = self._f.readinto(view)  # type: ignore[attr-defined]
        self._left -= n
        return n


class Ingestor:
    """Uploads content to ``store`` (an origin ChunkStore), only what it lacks."""

    def __init__(
        self, store: ChunkStore, params: ChunkerParams = DEFAULT_PARAMS, concurrency: int = 16
    ) -> None:
        self.store = store
        self.params = params
        self.stats = IngestStats()
        self._limit = anyio.Semaphore(concurrency)

    async def ingest_file(self, path: str, offset: int = 0, length: int | None = None) -> Ingested:
        """Chunk ``path`` (or ``length`` bytes of it at ``offset``) and upload
        missing chunks. Raises OSError (callers translate), Unavailable."""
        send, receive = anyio.create_memory_object_stream[list[Span]](4)
        spans: list[Span] = []
        digest: list[ChunkId] = []
        with single_errors():
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._cut_worker, path, offset, length, send, digest)
                async with receive:
                    async for batch in receive:
                        spans.extend(batch)
                        await self._upload_missing(tg, path, offset, batch)
        self.stats.bytes += sum(s.length for s in spans)
        return Ingested(
            tuple(ChunkRef(s.id, s.length) for s in spans), sum(s.length for s in spans), digest[0]
        )

    async def _cut_worker(
        self,
        path: str,
        offset: int,
        length: int | None,
        send: MemoryObjectSendStream[list[Span]],
        digest: list[ChunkId],
    ) -> None:
        async with send:
            digest.append(
                await anyio.to_thread.run_sync(self._cut, path, offset, length, send)
            )

    def _cut(
        self, path: str, offset: int, length: int | None, send: MemoryObjectSendStream[list[Span]]
    ) -> ChunkId:
        cdc = Chunker(self.params)._cdc
        whole = blake3.blake3()
        batch: list[Span] = []
        pos = 0
        with open(path, "rb", buffering=0) as f:
            reader: Any = f
            if offset or length is not None:
                f.seek(offset)
                reader = _Window(f, length if length is not None else 1 << 62)
            for chunk in cdc.cut_stream(reader):
                whole.update(chunk.data)
                batch.append(Span(pos, chunk.length, hash_bytes(chunk.data)))
                pos += chunk.length
                if len(batch) >= _BATCH:
                    anyio.from_thread.run(send.send, batch)
                    batch = []
        if batch:
            anyio.from_thread.run(send.send, batch)
        return ChunkId(whole.hexdigest())

    async def _upload_missing(
        self, tg: anyio.abc.TaskGroup, path: str, base: int, batch: list[Span]
    ) -> None:
        stats = self.stats
        stats.chunks += len(batch)
        fresh = {s.id for s in batch} - stats.known
        if not fresh:
            return
        present = await self.store.has(fresh)
        stats.known |= present
        stats.found |= present
        for span in batch:
            if span.id in stats.known:
                continue
            stats.known.add(span.id)  # claim it so a duplicate span is not uploaded twice
            await self._limit.acquire()  # back-pressure: bounded uploads in flight
            tg.start_soon(self._upload, path, base + span.offset, span)

    async def _upload(self, path: str, offset: int, span: Span) -> None:
        try:
            data = await anyio.to_thread.run_sync(_pread_verified, path, offset, span)
            await self.store.put(span.id, data)
            self.stats.new_chunks += 1
            self.stats.new_bytes += span.length
        finally:
            self._limit.release()


def _pread_verified(path: str, offset: int, span: Span) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, span.length, offset)
    finally:
        os.close(fd)
    if hash_bytes(data) != span.id:
        raise BadInput(f"{path} changed while it was being pushed")
    return data
