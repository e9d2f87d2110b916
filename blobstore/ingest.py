"""Turning bytes on disk into chunks in packs in the object store.

A worker thread cuts and hashes the file (streamed, bounded memory) and hands
batches of spans to the event loop through a bounded stream; the loop looks
each chunk up in the ``StoreIndex`` (what the store's packs hold, loaded once
per writer, see packs.py) and hands the new ones to the ``PackWriter``, which
re-reads their bytes with ``pread`` (the page cache still holds them),
verifies them, and packs them in file order. No request per chunk: a chunk
the store holds is referenced where it is.

A file's digest is ``chunks_key`` of its chunk list (manifest v2), so there is
no whole-file hash pass. Call ``flush`` before writing a manifest that names
the chunks (packs and indexes first, then the manifest, then the ref).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.from_thread
from anyio.streams.memory import MemoryObjectSendStream

from .chunker import DEFAULT_PARAMS, Chunker, ChunkerParams, Span
from .errors import BadInput, single_errors
from .ids import ChunkId, hash_bytes
from .manifest import ChunkRef, chunks_key
from .packs import PackWriter, StoreIndex

_BATCH = 32
# Files up to this size are read whole and cut in one thread call: the
# streaming machinery costs ~1 ms per file, which dominates trees of small files.
_WHOLE_FILE_MAX = 16 << 20


@dataclass(frozen=True, slots=True)
class Ingested:
    chunks: tuple[ChunkRef, ...]
    """Every chunk, located in a pack (v2)."""
    size: int
    digest: ChunkId
    """``chunks_key(chunks)``: the v2 file digest."""


@dataclass(slots=True)
class IngestStats:
    chunks: int = 0
    new_chunks: int = 0
    new_bytes: int = 0
    bytes: int = 0


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
    """Packs content into the store, only chunks ``index`` does not locate.

    ``writer`` must be open (``async with``) for as long as the ingestor is used.
    """

    def __init__(
        self, writer: PackWriter, index: StoreIndex, params: ChunkerParams = DEFAULT_PARAMS
    ) -> None:
        self.writer = writer
        self.index = index
        self.params = params
        self.stats = IngestStats()
        self._placed: dict[ChunkId, ChunkRef] = {}
        self._claims: dict[ChunkId, anyio.Event] = {}

    async def ingest_file(
        self,
        path: str | int,
        offset: int = 0,
        length: int | None = None,
        *,
        on_bytes: Callable[[int], None] | None = None,
    ) -> Ingested:
        """Chunk ``path`` (or ``length`` bytes of it at ``offset``) and pack the
        chunks the store lacks. ``path`` may be an open file descriptor: it is
        read as it is (never re-opened by name nor closed; its file offset moves).
        ``on_bytes(n)`` is called on the event loop as each batch of chunks is
        placed (progress within a big file). Raises OSError (callers
        translate), BadInput (file changed), Unavailable."""
        small = await anyio.to_thread.run_sync(self._cut_small, path, offset, length)
        if small is not None:
            data, spans = small
            refs = await self._place(spans, lambda new: self.writer.add_bytes(data, new))
            if on_bytes is not None:
                on_bytes(len(data))
            return self._done(refs)
        send, receive = anyio.create_memory_object_stream[list[Span]](4)
        refs = []
        with single_errors():
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._cut_worker, path, offset, length, send)
                async with receive:
                    async for batch in receive:
                        refs += await self._place(
                            batch, lambda new: self.writer.add_file(path, offset, new)
                        )
                        if on_bytes is not None:
                            on_bytes(sum(span.length for span in batch))
        return self._done(refs)

    async def ingest_chunk(self, chunk_id: ChunkId, data: bytes) -> ChunkRef:
        """Pack one chunk (already verified against ``chunk_id``) unless the store
        holds it; return where it is. Raises Unavailable."""
        span = Span(0, len(data), chunk_id)
        (ref,) = await self._place([span], lambda new: self.writer.add_bytes(data, new))
        return ref

    async def flush(self) -> None:
        """Store every pack written so far (and its index). Raises Unavailable."""
        await self.writer.flush()

    @property
    def unstored_bytes(self) -> int:
        """Bytes of new chunks packed but not yet in the store (their pack is
        filling or uploading): what a push's progress still owes."""
        return max(self.stats.new_bytes - self.writer.bytes, 0)

    def locate(self, chunk_id: ChunkId) -> ChunkRef | None:
        """Where the store (or this run's packs) holds ``chunk_id``."""
        return self.index.locate(chunk_id) or self._placed.get(chunk_id)

    def _done(self, refs: list[ChunkRef]) -> Ingested:
        size = sum(r.size for r in refs)
        self.stats.bytes += size
        return Ingested(tuple(refs), size, chunks_key(refs))

    async def _place(self, spans: list[Span], add: _Add) -> list[ChunkRef]:
        """Locate every span; pack the ones nobody holds or is packing (claiming
        them, so two files with the same chunk pack it once)."""
        self.stats.chunks += len(spans)
        mine: list[Span] = []
        waits: list[anyio.Event] = []
        for span in spans:
            if self.locate(span.id) is not None:
                continue
            claim = self._claims.get(span.id)
            if claim is None:
                self._claims[span.id] = anyio.Event()
                mine.append(span)
            else:
                waits.append(claim)
        if mine:
            try:
                for ref in await add(mine):
                    self._placed[ref.id] = ref
                    self.stats.new_chunks += 1
                    self.stats.new_bytes += ref.size
            finally:
                for span in mine:
                    if (claim := self._claims.pop(span.id, None)) is not None:
                        claim.set()
        for claim in waits:
            await claim.wait()
        out = []
        for span in spans:
            found = self.locate(span.id)
            if found is None:  # the run that claimed it failed (and raises)
                raise BadInput(f"chunk {span.id} could not be packed")
            out.append(found)
        return out

    async def _cut_worker(
        self,
        path: str | int,
        offset: int,
        length: int | None,
        send: MemoryObjectSendStream[list[Span]],
    ) -> None:
        async with send:
            await anyio.to_thread.run_sync(self._cut, path, offset, length, send)

    def _cut_small(
        self, path: str | int, offset: int, length: int | None
    ) -> tuple[bytes, list[Span]] | None:
        """Read and cut a small file (or window) whole; None if it is too big."""
        with open(path, "rb", buffering=0, closefd=isinstance(path, str)) as f:
            size = os.fstat(f.fileno()).st_size - offset if length is None else length
            if size > _WHOLE_FILE_MAX:
                return None
            data = os.pread(f.fileno(), size, offset)
        if len(data) != size:
            raise BadInput(f"{path} is shorter than expected (truncated?)")
        return data, Chunker(self.params).cut_and_hash(data)

    def _cut(
        self,
        path: str | int,
        offset: int,
        length: int | None,
        send: MemoryObjectSendStream[list[Span]],
    ) -> None:
        cdc = Chunker(self.params)._cdc
        batch: list[Span] = []
        pos = 0
        with open(path, "rb", buffering=0, closefd=isinstance(path, str)) as f:
            reader: Any = f
            if offset or length is not None:
                f.seek(offset)
                reader = _Window(f, length if length is not None else 1 << 62)
            for chunk in cdc.cut_stream(reader):
                batch.append(Span(pos, chunk.length, hash_bytes(chunk.data)))
                pos += chunk.length
                if len(batch) >= _BATCH:
                    anyio.from_thread.run(send.send, batch)
                    batch = []
        if batch:
            anyio.from_thread.run(send.send, batch)
        if length is not None and pos != length:
            raise BadInput(f"{path} is shorter than expected (truncated?)")


_Add = Callable[[list[Span]], Awaitable[list[ChunkRef]]]
