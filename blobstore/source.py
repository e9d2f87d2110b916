"""The small protocols every tier implements.

A ``ChunkSource`` answers ``get``, ``has`` and ``fetch``; a ``ChunkStore`` adds
``put``. The local node store, peers, the object store and test fakes all
satisfy them, and the tier order local -> peers -> origin is a list of sources
(see tiers.py).

``get`` moves one chunk (a peer daemon answering a request). ``fetch`` moves
many: the source delivers each verified chunk it can to a *sink* as it arrives
(any order, several at once) and returns the refs it could not deliver, which
the tier list then asks the next source for. Pulls use ``fetch``: it lets the
origin coalesce neighbouring chunks of a pack into one ranged read, and lets
the caller write each chunk straight to its final place (each byte written
once) instead of handing buffers back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import anyio.to_thread

from .errors import BlobstoreError, Corrupt, NotFound, Unavailable
from .ids import ChunkId
from .parallel import for_each

if TYPE_CHECKING:
    from .manifest import ChunkRef

ChunkData = bytes | bytearray
"""Chunk bytes as a source hands them out (a peer's receive buffer is a
bytearray; copying it into ``bytes`` would cost a pass over every byte).
Consumers must not mutate it: single-flight shares one buffer."""

Sink = Callable[["ChunkRef", ChunkData], Awaitable[None]]
"""Receives one verified chunk. May be awaited concurrently for different refs;
its back-pressure (awaiting) bounds how many chunks a source holds in memory.
An exception it raises aborts the whole fetch."""


Early = Callable[["ChunkRef", ChunkData], None]
"""A ``SplitSink``'s blocking half."""
Late = Callable[["ChunkRef", int], Awaitable[None]]
"""A ``SplitSink``'s loop half: the ref and the size of the chunk ``early`` took."""


class SplitSink:
    """A sink in two halves, so that a source which verifies chunks in worker
    threads can hand each one on in the same thread (no second hop per chunk)
    and drop its bytes there:

    - ``early(ref, data)``: blocking and thread-safe; takes the verified chunk
      in the worker thread that verified it (writes it to its place). It may
      be called more than once for a chunk (a read resumed after a deadline),
      from several threads at once, and — from a thread abandoned at a
      deadline — even after the source's ``fetch`` returned: it must claim
      each chunk once, and its owner must wait for claimed writes before
      using them (materialize.py does).
    - ``late(ref, size)``: on the event loop, afterwards, for every chunk the
      source delivers (bookkeeping, progress); the bytes are not kept for it,
      so a source holds one chunk per thread, not a batch.

    A source that knows about it calls ``early`` then awaits ``late``; any
    other source just awaits the sink, which runs both (``early`` in a worker
    thread). Errors ``early`` raises abort the fetch like a sink's."""

    __slots__ = ("early", "late")

    def __init__(self, early: Early, late: Late) -> None:
        self.early = early
        self.late = late

    async def __call__(self, ref: ChunkRef, data: ChunkData) -> None:
        await anyio.to_thread.run_sync(self.early, ref, data)
        await self.late(ref, len(data))


class Undelivered(list["ChunkRef"]):
    """What ``fetch`` may return: the undelivered refs, plus why where known
    (``reasons[id]`` is the NotFound, Corrupt or Unavailable a ``get`` would
    have raised), so the tier list reports "corrupt" or "unavailable", not
    "not found", when that is the cause."""

    __slots__ = ("reasons",)

    def __init__(self, refs: Iterable[ChunkRef] = ()) -> None:
        super().__init__(refs)
        self.reasons: dict[ChunkId, BlobstoreError] = {}

    def add(self, ref: ChunkRef, reason: BlobstoreError | None = None) -> None:
        self.append(ref)
        if reason is not None:
            self.reasons[ref.id] = reason


@runtime_checkable
class ChunkSource(Protocol):
    """Somewhere chunks can be read from."""

    name: str
    """Tier label used in statistics: "local", "peer" or "origin"."""

    async def get(self, chunk_id: ChunkId) -> ChunkData:
        """Return the chunk's bytes, verified against ``chunk_id``.

        Raises ChunkMissing if the source does not hold it, CorruptChunk if the
        bytes it holds are wrong, Unavailable if it cannot answer now.
        """
        ...

    async def has(self, chunk_ids: Iterable[ChunkId]) -> set[ChunkId]:
        """Return the subset of ``chunk_ids`` this source holds (best effort)."""
        ...

    async def fetch(self, refs: Sequence[ChunkRef], sink: Sink) -> list[ChunkRef]:
        """Deliver every ref this source can, verified, to ``sink``; return the
        refs it could not (missing, corrupt or unavailable here).

        Raises only what ``sink`` raises, or Unavailable when the source as a
        whole cannot be used (the caller then treats every undelivered ref as
        not delivered).
        """
        ...


@runtime_checkable
class ChunkStore(ChunkSource, Protocol):
    """A chunk source that can also store chunks."""

    async def put(self, chunk_id: ChunkId, data: ChunkData) -> None:
        """Store ``data`` under ``chunk_id`` (the caller has verified it).

        Idempotent. Raises Unavailable (DiskFull included) on failure.
        """
        ...


async def fetch_each(
    get: Callable[[ChunkId], Awaitable[ChunkData]],
    refs: Sequence[ChunkRef],
    sink: Sink,
    concurrency: int = 16,
) -> list[ChunkRef]:
    """``fetch`` for a source that only knows ``get``: one chunk at a time per
    worker, ``concurrency`` workers. NotFound/Unavailable (Corrupt included)
    leave a ref undelivered; a sink failure propagates."""
    undelivered = Undelivered()

    async def one(ref: ChunkRef) -> None:
        try:
            data = await get(ref.id)
        except (NotFound, Corrupt, Unavailable) as exc:
            undelivered.add(ref, exc)
            return
        if len(data) != ref.size:
            undelivered.add(ref, Corrupt(f"chunk {ref.id} has {len(data)} bytes, not {ref.size}"))
            return
        await sink(ref, data)

    await for_each(refs, one, concurrency)
    return undelivered
