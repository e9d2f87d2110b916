"""The object store seen as a verified ``ChunkStore`` (the "origin" tier).

``fetch`` reads packed chunks (manifest v2: ``ChunkRef.pack`` set) in spans:
neighbouring chunks of a pack are coalesced (spans.py) into one ranged GET, many
spans in flight, and each chunk is verified and handed to the sink as soon as
its last byte arrives, so memory holds a few chunks per span, never a span.
A span whose stream breaks is resumed from its first undelivered chunk; a
corrupt chunk is returned undelivered without failing its neighbours. Refs
without a pack (v1 manifests) are read one object per chunk. A ``file://``
store's packs are read chunk by chunk with ``pread`` (one copy, read and
verified in one worker-thread hop) instead of as 1 MiB blocks cut and joined
again: a cold 1 GiB fetch 0.43 s -> 0.26 s, CPU 0.42 s -> 0.26 s (medians of 3).

``get`` (by id alone: a home peer's read-through, image export) finds a packed
chunk through ``PackLocator`` (the store's pack indexes, loaded once and
reloaded on a miss at most every ``refresh`` seconds) and reads it with one
ranged GET; ids it does not know are read from the per-chunk layout.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass

import anyio

from .errors import (
    BlobstoreError,
    ChunkMissing,
    Corrupt,
    CorruptChunk,
    NotFound,
    ObjectMissing,
    StoreUnavailable,
    Unavailable,
)
from .filestore import FileObjectStore, open_object_fd
from .ids import ChunkId, verify
from .locator import PackLocator
from .manifest import ChunkRef
from .objectstore import ObjectStore, chunk_key, pack_key
from .parallel import for_each
from .source import ChunkData, Sink, Undelivered
from .spans import Piece, Span, SpanCutter, join, plan_spans

log = logging.getLogger(__name__)

# Verifying a chunk takes ~0.25 ms/MiB; only large ones are worth a thread hop.
_THREAD_VERIFY_MIN = 256 << 10
_FILE_BATCH = 1 << 20
"""Bytes of small neighbouring chunks a ``file://`` span reads and verifies in
one worker-thread hop (a larger chunk takes a hop of its own)."""


@dataclass(frozen=True, slots=True)
class SpanTuning:
    """How ``OriginSource.fetch`` reads packs (defaults measured: bench/README.md)."""

    max_span: int = 32 << 20
    """Largest ranged GET (one chunk larger than this is read alone). Measured on
    SeaweedFS, 1 GiB in 32 MiB packs, 8 in flight: 16 MiB spans 0.71-0.74 GB/s
    and 81 GETs; 32 MiB 0.82-0.90 GB/s and 33 GETs (one per pack); 64 MiB no
    faster. Memory does not depend on it: spans stream."""
    max_gap: int = 256 << 10
    """Unwanted bytes between two wanted chunks still read in one GET rather
    than split into two (costs at most 25% extra bytes at ~1 MiB chunks)."""
    spans_in_flight: int = 8
    """Ranged GETs streaming at once (4: 0.44-0.81 GB/s, 8: 0.82-0.90, 16: no
    faster, +30 MiB RSS). Memory is about spans_in_flight x 2 chunks (one being
    filled, one being verified and sunk)."""
    loose_in_flight: int = 32
    """Per-chunk GETs at once for refs without a pack (v1 manifests)."""
    attempts: int = 3
    """Reads in a row that deliver nothing before a span is given up (S3
    retries a failed request itself; this resumes a body cut off midway, from
    its first undelivered chunk, as long as each read makes progress)."""
    retry_delay: float = 0.2


class OriginSource:
    """Chunks in the global object store. Every byte read is verified."""

    name = "origin"

    def __init__(
        self,
        store: ObjectStore,
        concurrency: int = 64,
        tuning: SpanTuning = SpanTuning(),
        locator: PackLocator | None = None,
    ) -> None:
        self.store = store
        self.tuning = tuning
        self.locator = locator if locator is not None else PackLocator(store)
        self._limit = anyio.Semaphore(concurrency)
        self.requests = 0
        """Ranged GETs issued by ``fetch`` (a resumed span counts again)."""

    async def get(self, chunk_id: ChunkId) -> ChunkData:
        """The chunk, from its pack (located by id) or its own object.

        Raises ChunkMissing, CorruptChunk, StoreUnavailable."""
        where = await self.locator.locate(chunk_id)
        if where is not None:
            got: list[ChunkData] = []

            async def keep(_: ChunkRef, data: ChunkData) -> None:
                got.append(data)

            left = await self.fetch([where], keep)
            if got:
                return got[0]
            reason = left.reasons.get(chunk_id) if isinstance(left, Undelivered) else None
            if reason is not None and not isinstance(reason, NotFound):
                raise reason
            # The pack is gone (gc moved the chunk): try the per-chunk layout.
        return await self._get_object(chunk_id)

    async def _get_object(self, chunk_id: ChunkId) -> ChunkData:
        async with self._limit:
            try:
                data = await self.store.get(chunk_key(chunk_id))
            except ObjectMissing:
                raise ChunkMissing(chunk_id, "object store") from None
        await verify_off_loop(chunk_id, data, "object store")
        return data

    async def has(self, chunk_ids: Iterable[ChunkId]) -> set[ChunkId]:
        """Which of ``chunk_ids`` the store holds: located in a pack, or their
        own objects checked in bulk."""
        wanted = list(chunk_ids)
        found = {c for c in wanted if await self.locator.locate(c) is not None}
        keys = {chunk_key(c): c for c in wanted if c not in found}
        return found | {keys[k] for k in await self.store.exists_many(keys.keys())}

    async def fetch(self, refs: Sequence[ChunkRef], sink: Sink) -> list[ChunkRef]:
        """Deliver ``refs`` to ``sink``, packed ones in spans; return the rest
        (an ``Undelivered`` naming ChunkMissing, CorruptChunk or StoreUnavailable
        per chunk). Raises what ``sink`` raises, and BadInput/ConfigError."""
        undelivered = Undelivered()
        loose = [r for r in refs if r.pack is None]
        tuning = self.tuning
        spans = plan_spans(
            (r for r in refs if r.pack is not None),
            max_gap=tuning.max_gap,
            max_span=tuning.max_span,
        )

        async def read_span(span: Span) -> None:
            await self._read_span(span, sink, undelivered)

        async def read_loose(ref: ChunkRef) -> None:
            try:
                data = await self._get_object(ref.id)
            except (NotFound, Corrupt, StoreUnavailable) as exc:
                undelivered.add(ref, exc)
                return
            if len(data) != ref.size:
                undelivered.add(ref, CorruptChunk(ref.id, f"object store (size {len(data)})"))
                return
            await _sink_call(sink, ref, data)

        try:
            async with anyio.create_task_group() as tg:
                if spans:
                    tg.start_soon(for_each, spans, read_span, tuning.spans_in_flight)
                if loose:
                    tg.start_soon(for_each, loose, read_loose, tuning.loose_in_flight)
        except BaseExceptionGroup as group:
            raise _first_leaf(group) from None
        return undelivered

    async def _read_span(self, span: Span, sink: Sink, undelivered: Undelivered) -> None:
        if isinstance(self.store, FileObjectStore):
            await self._read_file_span(self.store, span, sink, undelivered)
            return
        key = pack_key(span.pack)
        cutter = SpanCutter(span)
        failures = 0
        while (rest := cutter.remaining()) is not None:
            try:
                self.requests += 1
                stream = self.store.get_range(key, rest.offset, rest.length)
                async with aclosing(stream) as blocks:
                    async for block in blocks:
                        for piece, parts in cutter.feed_parts(block):
                            await self._deliver(piece, parts, sink, undelivered)
            except ObjectMissing:
                for ref in _refs(cutter.pending):
                    undelivered.add(ref, ChunkMissing(ref.id, "object store"))
                return
            except StoreUnavailable as exc:
                # Attempts in a row that delivered nothing: a body cut off after
                # some chunks made progress and is simply resumed.
                failures = 1 if len(cutter.pending) < len(rest.pieces) else failures + 1
                if failures >= self.tuning.attempts:
                    for ref in _refs(cutter.pending):
                        undelivered.add(ref, exc)
                    return
                log.info(
                    "reading pack %s again from offset %d: %s",
                    span.pack[:16],
                    cutter.pending[0].offset,
                    exc,
                )
                await anyio.sleep(self.tuning.retry_delay * failures)
                continue
            if cutter.pending:  # the pack ended before the manifest said it would
                where = f"object store (pack {span.pack[:16]}… is shorter than its manifest says)"
                for ref in _refs(cutter.pending):
                    undelivered.add(ref, CorruptChunk(ref.id, where))
            return

    async def _read_file_span(
        self, store: FileObjectStore, span: Span, sink: Sink, undelivered: Undelivered
    ) -> None:
        """A ``file://`` pack: each chunk read straight into its own buffer and
        verified in the same worker-thread hop (small neighbours share one), with
        no 1 MiB blocks to cut and copy again. A local file is not retried: its
        errors are final for this fetch (the tier list reports them)."""
        key = pack_key(span.pack)
        self.requests += 1
        pieces = span.pieces
        try:
            fd = await anyio.to_thread.run_sync(open_object_fd, store.root / key)
        except OSError as exc:
            _undeliver(pieces, _file_error(exc, key, store.url), undelivered)
            return
        try:
            start = 0
            while start < len(pieces):
                stop = _batch_end(pieces, start)
                try:
                    got = await anyio.to_thread.run_sync(_pread_verified, fd, pieces[start:stop])
                except OSError as exc:
                    _undeliver(pieces[start:], _file_error(exc, key, store.url), undelivered)
                    return
                for piece, data in zip(pieces[start:stop], got, strict=False):
                    if isinstance(data, CorruptChunk):
                        _undeliver((piece,), data, undelivered)
                        continue
                    for ref in piece.refs:
                        await _sink_call(sink, ref, data)
                if len(got) < stop - start:  # the pack ended before the manifest said
                    where = f"object store (pack {span.pack[:16]}… is shorter than its"
                    where += " manifest says)"
                    for ref in _refs(pieces[start + len(got) :]):
                        undelivered.add(ref, CorruptChunk(ref.id, where))
                    return
                start = stop
        finally:
            os.close(fd)

    async def _deliver(
        self, piece: Piece, parts: list[memoryview], sink: Sink, undelivered: Undelivered
    ) -> None:
        """Join the piece's slices and verify them, in one worker-thread hop for
        a big piece (the join's copy off the loop too), then sink it."""
        chunk_id = piece.refs[0].id
        try:
            if piece.size >= _THREAD_VERIFY_MIN:
                data = await anyio.to_thread.run_sync(_join_verified, chunk_id, parts)
            else:
                data = _join_verified(chunk_id, parts)
        except CorruptChunk as exc:  # reported by the caller (the tier list)
            for ref in piece.refs:
                undelivered.add(ref, exc)
            return
        for ref in piece.refs:
            await _sink_call(sink, ref, data)

    async def put(self, chunk_id: ChunkId, data: ChunkData) -> None:
        async with self._limit:
            await self.store.put(chunk_key(chunk_id), data)


class _SinkFailed(Exception):
    """Carries what the sink raised past the read loop, so that a sink's own
    Unavailable (a full disk) is never mistaken for a broken S3 stream."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


async def _sink_call(sink: Sink, ref: ChunkRef, data: ChunkData) -> None:
    try:
        await sink(ref, data)
    except anyio.get_cancelled_exc_class():
        raise
    except Exception as exc:
        raise _SinkFailed(exc) from exc


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception to raise for a failed task group: the sink's own error
    first, then a blobstore error, then anything."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(reversed(exc.exceptions))
        else:
            leaves.append(exc)
    for leaf in leaves:
        if isinstance(leaf, _SinkFailed):
            return leaf.original
    for kind in (BlobstoreError, Exception):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return leaves[0]


def _refs(pieces: Iterable[Piece]) -> Iterator[ChunkRef]:
    for piece in pieces:
        yield from piece.refs


def _batch_end(pieces: Sequence[Piece], start: int) -> int:
    """End of the run of pieces from ``start`` read in one worker-thread hop:
    at most ``_FILE_BATCH`` bytes, or one piece."""
    stop, total = start + 1, pieces[start].size
    while stop < len(pieces) and total + pieces[stop].size <= _FILE_BATCH:
        total += pieces[stop].size
        stop += 1
    return stop


def _pread_verified(fd: int, pieces: Sequence[Piece]) -> list[bytes | CorruptChunk]:
    """Each piece's bytes read from ``fd`` and verified (or why not), in order;
    the list stops short where the file ends. Raises OSError."""
    got: list[bytes | CorruptChunk] = []
    for piece in pieces:
        data = os.pread(fd, piece.size, piece.offset)  # one copy, no zero-filled buffer
        while len(data) < piece.size:  # a short read: rare, but allowed
            more = os.pread(fd, piece.size - len(data), piece.offset + len(data))
            if not more:
                return got
            data += more
        try:
            verify(piece.refs[0].id, data, "object store")
        except CorruptChunk as exc:
            got.append(exc)
        else:
            got.append(data)
    return got


def _file_error(exc: OSError, key: str, where: str) -> BlobstoreError:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
        return ObjectMissing(key, where)
    return StoreUnavailable(f"cannot read {key} in {where}: {exc.strerror or type(exc).__name__}")


def _undeliver(pieces: Iterable[Piece], reason: BlobstoreError, undelivered: Undelivered) -> None:
    for ref in _refs(pieces):
        if isinstance(reason, ObjectMissing):
            undelivered.add(ref, ChunkMissing(ref.id, "object store"))
        else:
            undelivered.add(ref, reason)


def _join_verified(chunk_id: ChunkId, parts: list[memoryview]) -> bytes:
    """The piece's bytes, verified. Raises CorruptChunk."""
    data = join(parts)
    verify(chunk_id, data, "object store")
    return data


async def verify_off_loop(chunk_id: ChunkId, data: ChunkData, where: str) -> None:
    """``ids.verify`` in a worker thread for big buffers. Raises CorruptChunk."""
    if len(data) >= _THREAD_VERIFY_MIN:
        await anyio.to_thread.run_sync(verify, chunk_id, data, where)
    else:
        verify(chunk_id, data, where)


__all__ = ["OriginSource", "PackLocator", "SpanTuning", "Unavailable", "verify_off_loop"]
