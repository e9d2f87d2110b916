"""Stream a layer's bytes out of the tiers, in order, in bounded memory.

Chunks are fetched ahead through ``source.fetch`` (verified by the source),
at most ``window`` at a time (~window x 4 MiB of memory), and handed in order
to a sink that runs in a worker thread. The sha256 of the blob is computed on
the way (in the same worker thread) and checked against the layer's digest.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from typing import BinaryIO

import anyio

from blobstore.source import ChunkData

from ..errors import BadImage, DigestMismatch
from ..ids import ChunkId
from ..manifest import ChunkRef
from ..source import ChunkSource
from ..source import Sink as RefSink

WINDOW = 8

Sink = Callable[[ChunkData], None]
"""Receives the blob's bytes in order; runs in a worker thread."""


async def copy_chunks(
    source: ChunkSource, chunks: tuple[ChunkRef, ...], sink: Sink, window: int = WINDOW
) -> None:
    """Feed every chunk's bytes, in order, to ``sink``.

    Raises what ``source.get`` raises (NotFound, Corrupt, Unavailable) and what
    ``sink`` raises.
    """
    if not chunks:
        return
    slots: list[ChunkData | None] = [None] * len(chunks)
    ready = [anyio.Event() for _ in chunks]
    room = anyio.Semaphore(window)

    async def fetch(i: int, chunk: ChunkRef) -> None:
        async def keep(ref: ChunkRef, data: ChunkData) -> None:
            slots[i] = data

        # fetch, not get: a packed chunk is found by its (pack, offset)
        if await source.fetch([chunk], keep) or slots[i] is None:
            slots[i] = await source.get(chunk.id)  # for the precise error
        ready[i].set()

    async def feed() -> None:
        for i in range(len(chunks)):
            await ready[i].wait()
            data, slots[i] = slots[i], None
            assert data is not None
            await anyio.to_thread.run_sync(sink, data)
            room.release()

    async with anyio.create_task_group() as tg:
        tg.start_soon(feed)
        for i, chunk in enumerate(chunks):
            await room.acquire()
            tg.start_soon(fetch, i, chunk)


class HashingWriter:
    """A sink that writes to a file and hashes what it wrote (sha256)."""

    def __init__(self, out: BinaryIO | None) -> None:
        self.out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def __call__(self, data: ChunkData) -> None:
        self.sha.update(data)
        self.size += len(data)
        if self.out is not None:
            self.out.write(data)

    def check(self, what: str, digest: str, size: int | None = None) -> None:
        """Raise DigestMismatch if the bytes seen do not match ``digest`` (and ``size``)."""
        actual = "sha256:" + self.sha.hexdigest()
        if actual != digest or (size is not None and size != self.size):
            raise DigestMismatch(what, digest, f"{actual} ({self.size} bytes)")


class MeteredSource:
    """A ChunkSource wrapper that reports the bytes it hands out (for progress)."""

    def __init__(self, inner: ChunkSource, report: Callable[[int], None]) -> None:
        self.inner = inner
        self.name = inner.name
        self.report = report

    async def get(self, chunk_id: ChunkId) -> ChunkData:
        data = await self.inner.get(chunk_id)
        self.report(len(data))
        return data

    async def fetch(self, refs: Sequence[ChunkRef], sink: RefSink) -> list[ChunkRef]:
        async def metered(ref: ChunkRef, data: ChunkData) -> None:
            self.report(len(data))
            await sink(ref, data)

        return await self.inner.fetch(refs, metered)

    async def has(self, chunk_ids: Iterable[ChunkId]) -> set[ChunkId]:
        return await self.inner.has(chunk_ids)


def file_sha256(fd: int, offset: int, size: int) -> str:
    """sha256 of ``size`` bytes at ``offset`` of the open file ``fd``, streamed with
    ``pread`` (the file offset is left alone). Raises OSError, BadImage (the file
    ends first)."""
    sha = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    done = 0
    while done < size:
        n = os.preadv(fd, [view[: min(size - done, len(buf))]], offset + done)
        if not n:
            raise BadImage(f"truncated: {size - done} of {size} bytes missing")
        sha.update(view[:n])
        done += n
    return "sha256:" + sha.hexdigest()
