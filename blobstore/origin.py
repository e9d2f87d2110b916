"""The object store seen as a verified ``ChunkStore`` (the "origin" tier).

``fetch`` reads packed chunks (manifest v2: ``ChunkRef.pack`` set) in spans:
neighbouring chunks of a pack are coalesced (spans.py) into one ranged GET, many
spans in flight, and each chunk is verified and handed to the sink as soon as
its last byte arrives, so memory holds a few chunks per span, never a span.
A span whose stream breaks is resumed from its first undelivered chunk; a
corrupt chunk is returned undelivered without failing its neighbours. Refs
without a pack (v1 manifests) are read one object per chunk. Worker threads
read the spans of a ``file://`` store (``pread``) and of S3 (httpranges.py:
pre-signed ranged GETs read by http.client), each chunk into its own buffer and
verified in the same hop, a batch of chunks per hop; a ``SplitSink``'s blocking
half takes each verified chunk in that same thread (a pull writes it to its
file there: no second hop per chunk), and the event loop only does the sink's
bookkeeping. Other stores (and S3 behind a proxy) stream
blocks through ``ObjectStore.get_range`` on the loop, cut by ``SpanCutter``.

``get`` (by id alone: a home peer's read-through, image export) finds a packed
chunk through ``PackLocator`` (the store's pack indexes, loaded once and
reloaded on a miss at most every ``refresh`` seconds) and reads it with one
ranged GET; ids it does not know are read from the per-chunk layout.
"""

from __future__ import annotations

import errno
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

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
from .ids import VERIFY_IN_THREAD_MIN, ChunkId, verify, verify_off_loop
from .manifest import ChunkRef
from .objectstore import ObjectStore, chunk_key, pack_key
from .parallel import for_each
from .source import ChunkData, Early, Sink, SplitSink, Undelivered
from .spans import Piece, Span, SpanCutter, join, plan_spans
from .stores import LazyObjectStore

if TYPE_CHECKING:
    from .locator import PackLocator

log = logging.getLogger(__name__)

_FILE_BATCH = 1 << 20
"""Bytes of neighbouring chunks a span read by threads reads and verifies in one
worker-thread hop (a larger chunk takes a hop of its own): memory per span in
flight, against one loop round trip per hop."""
_EARLY_BATCH = 8 << 20
"""The same into a ``SplitSink``, whose early half takes each chunk's bytes in
the thread (memory per span: one chunk). A hop costs the loop and the GIL
handoffs ~0.1 ms: 1 MiB hops with 8 spans in flight cost ~0.13 CPU s per GiB
more than 64 MiB hops (pread + BLAKE3 + pwrite driven by anyio, measured)."""


@dataclass(frozen=True, slots=True)
class SpanTuning:
    """How ``OriginSource.fetch`` reads packs (defaults measured: bench/README.md)."""

    max_span: int = 32 << 20
    """Largest ranged GET (one chunk larger than this is read alone). Measured on
    SeaweedFS, 1 GiB in 32 MiB packs, 8 in flight: 16 MiB spans 0.71-0.74 GB/s
    and 81 GETs; 32 MiB 0.82-0.90 GB/s and 33 GETs (one per pack); 64 MiB no
    faster. Memory does not depend on it: spans stream."""
    big_span: int = 64 << 20
    """Largest ranged GET of an object store (not ``file://``) when the fetch
    holds at least ``spans_in_flight`` such spans of packed bytes: a 48 MiB pack
    is then one GET, not a 32 MiB and a 16 MiB one (1 GiB: 22 GETs, was 44),
    while smaller fetches (a home's 32 MiB block, a tree of small files) keep
    ``max_span`` and their spans in flight. Half the requests (each one a round
    trip, a signature and, on AWS, a bill); SeaweedFS's CPU serving a cold 1 GiB
    pull and the pull's time did not move beyond this 2-core box's noise."""
    max_gap: int = 256 << 10
    """Unwanted bytes between two wanted chunks still read in one GET rather
    than split into two (costs at most 25% extra bytes at ~1 MiB chunks)."""
    spans_in_flight: int = 8
    """Ranged GETs streaming at once (4: 0.44-0.81 GB/s, 8: 0.82-0.90, 16: no
    faster, +30 MiB RSS). Memory is about spans_in_flight x 2 chunks (one being
    filled, one being verified and sunk)."""
    file_spans_in_flight: int = 3
    """The same for a ``file://`` store, whose spans are ``pread`` by threads
    that also verify each chunk and write it (a pull's ``SplitSink``): the
    writes of one file take turns (pwrite.pwrite_all), so more threads only
    queue for that lock and take the core that reading and hashing need. Cold
    1 GiB pull, in-process, alternating: 8 in flight 0.354 s, 4 0.326 s, 3
    0.311 s, 2 0.317 s (``cp -r`` of the packs 0.23 s)."""
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
        *,
        make_locator: Callable[[], PackLocator] | None = None,
    ) -> None:
        """``locator``: how reads by id find packed chunks; or ``make_locator``,
        called when one is first needed (default: a PackLocator of ``store``
        without a node cache)."""
        self.store = store
        self.tuning = tuning
        self._locator = locator
        self._make_locator = make_locator
        self._limit = anyio.Semaphore(concurrency)
        self.requests = 0
        """Ranged GETs issued by ``fetch`` (a resumed span counts again)."""

    @property
    def locator(self) -> PackLocator:
        """Where packs hold chunks, for reads by id; made on first use: a pull
        knows every chunk's place from its manifest, so it never loads the pack
        index code (nor the chunker under it)."""
        if self._locator is None:
            if self._make_locator is not None:
                self._locator = self._make_locator()
            else:
                from .locator import PackLocator

                self._locator = PackLocator(self.store)
        return self._locator

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
        packed = [r for r in refs if r.pack is not None]
        store = await self._backing() if packed else self.store
        max_span = tuning.max_span
        in_flight = tuning.spans_in_flight
        if isinstance(store, FileObjectStore):
            in_flight = tuning.file_spans_in_flight
        elif sum(r.size for r in packed) >= in_flight * tuning.big_span:
            max_span = max(max_span, tuning.big_span)  # requests cost; preads do not
        spans = plan_spans(packed, max_gap=tuning.max_gap, max_span=max_span)

        async def read_span(span: Span) -> None:
            await self._read_span(store, span, sink, undelivered)

        async def read_loose(ref: ChunkRef) -> None:
            try:
                data = await self._get_object(ref.id)
            except (NotFound, Corrupt, StoreUnavailable) as exc:
                undelivered.add(ref, exc)
                return
            if len(data) != ref.size:
                undelivered.add(ref, CorruptChunk(ref.id, f"object store (size {len(data)})"))
                return
            await sink(ref, data)

        try:
            async with anyio.create_task_group() as tg:
                if spans:
                    tg.start_soon(for_each, spans, read_span, in_flight)
                if loose:
                    tg.start_soon(for_each, loose, read_loose, tuning.loose_in_flight)
        except BaseExceptionGroup as group:
            raise _first_leaf(group) from None
        return undelivered

    async def _backing(self) -> ObjectStore:
        """The store whose packs are read: a lazily opened one (the runner API's)
        once open, so its ``file://`` or S3 fast path is taken; while it cannot be
        opened, the wrapper itself (each read then fails as the store does)."""
        store = self.store
        if isinstance(store, LazyObjectStore):
            try:
                return await store.opened()
            except StoreUnavailable:
                pass
        return store

    async def _read_span(
        self, store: ObjectStore, span: Span, sink: Sink, undelivered: Undelivered
    ) -> None:
        key = pack_key(span.pack)
        if isinstance(store, FileObjectStore):
            opener: RangeOpener = _FileOpener(store.root / key, key, store.url)
            await self._read_span_in_threads(span, opener, None, sink, undelivered)
            return
        if isinstance(store, ThreadedRangeStore):
            threaded = await store.threaded_ranges(key)
            if threaded is not None:
                await self._read_span_in_threads(span, threaded, store, sink, undelivered)
                return
        await self._read_streamed_span(span, sink, undelivered)

    async def _read_streamed_span(self, span: Span, sink: Sink, undelivered: Undelivered) -> None:
        """A span read as blocks on the event loop (``ObjectStore.get_range``):
        stores without a threaded path (a proxy in between, test doubles)."""
        key = pack_key(span.pack)
        cutter = SpanCutter(span)
        failures = 0
        while (rest := cutter.remaining()) is not None:
            self.requests += 1
            stream = self.store.get_range(key, rest.offset, rest.length)
            broke: StoreUnavailable | None = None
            async with aclosing(stream) as blocks:
                while True:
                    # Only the store's own errors are caught: what the sink
                    # raises (a full disk) goes up as it is.
                    try:
                        block = await anext(blocks)
                    except StopAsyncIteration:
                        break
                    except ObjectMissing as missing:
                        _undeliver(cutter.pending, missing, undelivered)
                        return
                    except StoreUnavailable as exc:
                        broke = exc
                        break
                    for piece, parts in cutter.feed_parts(block):
                        await self._deliver(piece, parts, sink, undelivered)
            if broke is None:
                if cutter.pending:  # the pack ended before the manifest said it would
                    _shorter(span, cutter.pending, undelivered)
                return
            # Attempts in a row that delivered nothing: a body cut off after
            # some chunks made progress is simply resumed.
            failures = 1 if len(cutter.pending) < len(rest.pieces) else failures + 1
            if not await self._again(span, cutter.pending, failures, broke, undelivered):
                return

    async def _read_span_in_threads(
        self,
        span: Span,
        opener: RangeOpener,
        deadlines: ThreadedRangeStore | None,
        sink: Sink,
        undelivered: Undelivered,
    ) -> None:
        """A span read by worker threads straight into each chunk's buffer and
        verified there, a batch of chunks per hop (``file://`` packs with
        ``pread``, S3 with httpranges.py); the loop only hands verified chunks
        to the sink. An S3 body that breaks is resumed from its first
        undelivered chunk; a local file's errors are final (``deadlines`` is
        None). ``deadlines`` bounds the time spent waiting for S3 per request,
        not the time the sink takes."""
        pending = span.pieces
        failures = 0
        while pending:
            offset = pending[0].offset
            length = pending[-1].end - offset
            self.requests += 1
            try:
                body = await anyio.to_thread.run_sync(opener.open, offset, length)
            except ObjectMissing as missing:
                _undeliver(pending, missing, undelivered)
                return
            except StoreUnavailable as unavailable:
                body, error = None, unavailable
                failures += 1
            else:
                if body is None:  # the range starts past the pack's end
                    _shorter(span, pending, undelivered)
                    return
                try:
                    left, broke = await self._read_body(
                        span, body, pending, deadlines, sink, undelivered
                    )
                finally:
                    body.close()
                if broke is None:
                    if left:  # the pack ended before the manifest said
                        _shorter(span, left, undelivered)
                    return
                failures = 1 if len(left) < len(pending) else failures + 1
                pending, error = left, broke
            if deadlines is None:  # a local file: its errors are final
                _undeliver(pending, error, undelivered)
                return
            if not await self._again(span, pending, failures, error, undelivered):
                return

    async def _read_body(
        self,
        span: Span,
        body: RangeBody,
        pending: tuple[Piece, ...],
        deadlines: ThreadedRangeStore | None,
        sink: Sink,
        undelivered: Undelivered,
    ) -> tuple[tuple[Piece, ...], StoreUnavailable | None]:
        """Read ``pending`` from ``body`` batch by batch, sinking each verified
        chunk: the pieces not read (where the body ended, or broke) and why it
        broke (None: it ended). Raises what the sink raises."""
        budget = math.inf if deadlines is None else deadlines.read_budget(body.length)
        position = pending[0].offset
        early = sink.early if isinstance(sink, SplitSink) else None
        batch_bytes = _EARLY_BATCH if early is not None else _FILE_BATCH
        while pending:
            batch = pending[: _batch_end(pending, 0, batch_bytes)]
            started = anyio.current_time()
            with anyio.move_on_after(budget) as scope:
                got, broke = await anyio.to_thread.run_sync(
                    _read_verified, body, position, batch, early, abandon_on_cancel=True
                )
            if scope.cancelled_caught:
                body.abort()
                assert deadlines is not None
                got, broke = [], deadlines.too_slow("read", pack_key(span.pack))
            budget -= anyio.current_time() - started
            for piece, data in zip(batch, got, strict=False):
                if isinstance(data, CorruptChunk):
                    _undeliver((piece,), data, undelivered)
                elif isinstance(data, int):  # the sink's early half took the bytes
                    assert isinstance(sink, SplitSink)
                    for ref in piece.refs:
                        await sink.late(ref, data)
                else:
                    for ref in piece.refs:
                        await sink(ref, data)
            if got:
                position = batch[len(got) - 1].end
                pending = pending[len(got) :]
            if broke is not None or len(got) < len(batch):
                return pending, broke
        return pending, None

    async def _again(
        self,
        span: Span,
        pending: Sequence[Piece],
        failures: int,
        exc: StoreUnavailable,
        undelivered: Undelivered,
    ) -> bool:
        """After a failed read of ``span``: wait and say True to read its
        ``pending`` pieces again, or give them up (False) after ``attempts``
        failures in a row."""
        if failures >= self.tuning.attempts:
            for ref in _refs(pending):
                undelivered.add(ref, exc)
            return False
        log.info("reading pack %s again from offset %d: %s", span.pack[:16], pending[0].offset, exc)
        await anyio.sleep(self.tuning.retry_delay * failures)
        return True

    async def _deliver(
        self, piece: Piece, parts: list[memoryview], sink: Sink, undelivered: Undelivered
    ) -> None:
        """Join the piece's slices and verify them, in one worker-thread hop for
        a big piece (the join's copy off the loop too), then sink it."""
        early = sink.early if isinstance(sink, SplitSink) else None
        try:
            if piece.size >= VERIFY_IN_THREAD_MIN or early is not None:
                data = await anyio.to_thread.run_sync(_join_verified, piece, parts, early)
            else:
                data = _join_verified(piece, parts, None)
        except CorruptChunk as exc:  # reported by the caller (the tier list)
            for ref in piece.refs:
                undelivered.add(ref, exc)
            return
        for ref in piece.refs:
            if isinstance(sink, SplitSink):
                await sink.late(ref, len(data))
            else:
                await sink(ref, data)

    async def put(self, chunk_id: ChunkId, data: ChunkData) -> None:
        async with self._limit:
            await self.store.put(chunk_key(chunk_id), data)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception to raise for a failed task group (what a sink raised: no
    read error escapes a span): a blobstore error first, then anything."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(reversed(exc.exceptions))
        else:
            leaves.append(exc)
    for kind in (BlobstoreError, Exception):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return leaves[0]


def _refs(pieces: Iterable[Piece]) -> Iterator[ChunkRef]:
    for piece in pieces:
        yield from piece.refs


def _batch_end(pieces: Sequence[Piece], start: int, limit: int) -> int:
    """End of the run of pieces from ``start`` read in one worker-thread hop:
    at most ``limit`` bytes, or one piece."""
    stop, total = start + 1, pieces[start].size
    while stop < len(pieces) and total + pieces[stop].size <= limit:
        total += pieces[stop].size
        stop += 1
    return stop


class RangeBody(Protocol):
    """One range of an object, read in order by one worker thread at a time."""

    length: int

    def read(self, size: int) -> bytes | bytearray:
        """The next ``size`` bytes; fewer only where the object ends."""
        ...

    def skip(self, size: int) -> None: ...

    def abort(self) -> None:
        """Make a blocked ``read`` in another thread fail now."""
        ...

    def close(self) -> None: ...


class RangeOpener(Protocol):
    def open(self, offset: int, length: int) -> RangeBody | None:
        """Blocking. None when ``offset`` is past the object's end. Raises
        ObjectMissing, StoreUnavailable."""
        ...


@runtime_checkable
class ThreadedRangeStore(Protocol):
    """A store whose ranges worker threads can read themselves (S3)."""

    async def threaded_ranges(self, key: str) -> RangeOpener | None: ...

    def read_budget(self, length: int) -> float: ...

    def too_slow(self, op: str, key: str) -> StoreUnavailable: ...


class _FileOpener:
    """A ``file://`` pack opened per span (``RangeOpener``)."""

    def __init__(self, path: Path, key: str, where: str) -> None:
        self._path, self._key, self._where = path, key, where

    def open(self, offset: int, length: int) -> RangeBody:
        try:
            fd = open_object_fd(self._path)
        except OSError as exc:
            raise _file_error(exc, self._key, self._where) from exc
        return _FileBody(fd, offset, length, self._key, self._where)


class _FileBody:
    def __init__(self, fd: int, offset: int, length: int, key: str, where: str) -> None:
        self._fd, self._position, self.length = fd, offset, length
        self._key, self._where = key, where

    def read(self, size: int) -> bytes:
        try:
            data = os.pread(self._fd, size, self._position)  # one copy, no zero-filled buffer
            while 0 < len(data) < size:  # a short read: rare, but allowed
                more = os.pread(self._fd, size - len(data), self._position + len(data))
                if not more:
                    break
                data += more
        except OSError as exc:
            raise StoreUnavailable(
                f"cannot read {self._key} in {self._where}: {exc.strerror or type(exc).__name__}"
            ) from exc
        self._position += len(data)
        return data

    def skip(self, size: int) -> None:
        self._position += size

    def abort(self) -> None:
        pass

    def close(self) -> None:
        os.close(self._fd)


def _read_verified(
    body: RangeBody,
    position: int,
    pieces: Sequence[Piece],
    early: Early | None,
) -> tuple[list[bytes | bytearray | int | CorruptChunk], StoreUnavailable | None]:
    """Each piece's bytes read from ``body`` (now at pack offset ``position``)
    and verified (or why not), in order; the list stops short where the body
    ends, or where it broke (and why). With ``early`` (the sink's blocking
    half, source.SplitSink) each verified piece goes to it at once, in this
    thread, and only its size is kept."""
    got: list[bytes | bytearray | int | CorruptChunk] = []
    for piece in pieces:
        try:
            if piece.offset > position:
                body.skip(piece.offset - position)
            data = body.read(piece.size)
        except StoreUnavailable as exc:
            return got, exc
        if len(data) < piece.size:
            return got, None
        position = piece.end
        try:
            verify(piece.refs[0].id, data, "object store")
        except CorruptChunk as exc:
            got.append(exc)
            continue
        if early is None:
            got.append(data)
            continue
        for ref in piece.refs:
            early(ref, data)
        got.append(len(data))
    return got, None


def _shorter(span: Span, pieces: Iterable[Piece], undelivered: Undelivered) -> None:
    where = f"object store (pack {span.pack[:16]}… is shorter than its manifest says)"
    for ref in _refs(pieces):
        undelivered.add(ref, CorruptChunk(ref.id, where))


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


def _join_verified(piece: Piece, parts: list[memoryview], early: Early | None) -> bytes:
    """The piece's bytes, verified, and handed to ``early`` (source.SplitSink).
    Raises CorruptChunk."""
    data = join(parts)
    verify(piece.refs[0].id, data, "object store")
    if early is not None:
        for ref in piece.refs:
            early(ref, data)
    return data


__all__ = ["OriginSource", "PackLocator", "SpanTuning", "Unavailable", "verify_off_loop"]


def __getattr__(name: str) -> object:
    """``PackLocator`` (exported here too) is locator.py's, loaded when asked for."""
    if name == "PackLocator":
        from .locator import PackLocator

        return PackLocator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
