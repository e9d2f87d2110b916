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
# Files up to this size are read whole and cut in one thread call: the
# streaming machinery costs ~1 ms per file, which dominates trees of small files.
_WHOLE_FILE_MAX = 16 << 20


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

    async def ingest_file(
        self, path: str | int, offset: int = 0, length: int | None = None
    ) -> Ingested:
        """Chunk ``path`` (or ``length`` bytes of it at ``offset``) and upload
        missing chunks. ``path`` may be an open file descriptor: it is read as
        it is (never re-opened by name nor closed; its file offset moves).
        Raises OSError (callers translate), Unavailable."""
        small = await anyio.to_thread.run_sync(self._cut_small, path, offset, length)
        if small is not None:
            return await self._ingest_buffer(*small)
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
        path: str | int,
        offset: int,
        length: int | None,
        send: MemoryObjectSendStream[list[Span]],
        digest: list[ChunkId],
    ) -> None:
        async with send:
            digest.append(
                await anyio.to_thread.run_sync(self._cut, path, offset, length, send)
            )

    def _cut_small(
        self, path: str | int, offset: int, length: int | None
    ) -> tuple[bytes, list[Span], ChunkId] | None:
        """Read and cut a small file (or window) whole; None if it is too big."""
        with open(path, "rb", buffering=0, closefd=isinstance(path, str)) as f:
            size = os.fstat(f.fileno()).st_size - offset if length is None else length
            if size > _WHOLE_FILE_MAX:
                return None
            data = os.pread(f.fileno(), size, offset)
        if len(data) != size:
            raise BadInput(f"{path} is shorter than expected (truncated?)")
        return data, Chunker(self.params).cut_and_hash(data), hash_bytes(data)

    async def _ingest_buffer(self, data: bytes, spans: list[Span], digest: ChunkId) -> Ingested:
        view = memoryview(data)
        with single_errors():
            async with anyio.create_task_group() as tg:
                for span in await self._claim_missing(spans):
                    await self._limit.acquire()
                    chunk = bytes(view[span.offset : span.offset + span.length])
                    tg.start_soon(self._put, span, chunk)
        self.stats.bytes += len(data)
        return Ingested(tuple(ChunkRef(s.id, s.length) for s in spans), len(data), digest)

    async def _claim_missing(self, batch: list[Span]) -> list[Span]:
        """Spans whose chunks the store lacks and no other upload of this run
        has claimed; claims them."""
        stats = self.stats
        stats.chunks += len(batch)
        fresh = {s.id for s in batch} - stats.known
        if fresh:
            present = await self.store.has(fresh)
            stats.known |= present
        claimed = []
        for span in batch:
            if span.id not in stats.known:
                stats.known.add(span.id)  # so a duplicate span is not uploaded twice
                claimed.append(span)
        return claimed

    async def _put(self, span: Span, data: bytes) -> None:
        try:
            await self.store.put(span.id, data)
            self.stats.new_chunks += 1
            self.stats.new_bytes += span.length
        finally:
            self._limit.release()

    def _cut(
        self,
        path: str | int,
        offset: int,
        length: int | None,
        send: MemoryObjectSendStream[list[Span]],
    ) -> ChunkId:
        cdc = Chunker(self.params)._cdc
        whole = blake3.blake3()
        batch: list[Span] = []
        pos = 0
        with open(path, "rb", buffering=0, closefd=isinstance(path, str)) as f:
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
        self, tg: anyio.abc.TaskGroup, path: str | int, base: int, batch: list[Span]
    ) -> None:
        for span in await self._claim_missing(batch):
            await self._limit.acquire()  # back-pressure: bounded uploads in flight
            tg.start_soon(self._upload, path, base + span.offset, span)

    async def _upload(self, path: str | int, offset: int, span: Span) -> None:
        try:
            data = await anyio.to_thread.run_sync(_pread_verified, path, offset, span)
        except BaseException:
            self._limit.release()
            raise
        await self._put(span, data)


def _pread_verified(path: str | int, offset: int, span: Span) -> bytes:
    fd = path if isinstance(path, int) else os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, span.length, offset)
    finally:
        if isinstance(path, str):
            os.close(fd)
    if hash_bytes(data) != span.id:
        raise BadInput(f"{path} changed while it was being pushed")
    return data
