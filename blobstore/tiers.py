"""The tier list: local -> peers -> origin, as a composition of ChunkSources.

``get`` asks each source in order for one chunk; whatever came from farther
away is written back into the local cache (a daemon serving its peers).
``fetch`` hands all refs to the first source, what it could not deliver to the
next, and so on; each chunk goes straight to the caller's sink, which is the
node's copy (no cache write-back). Concurrent requests for one chunk share one
fetch (single-flight), between ``get``s and ``fetch``es alike. Bytes served
are counted per tier name, and told to a ``TierObserver`` with the time each
chunk cost (blobstore/metrics.py turns that into Prometheus metrics).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Protocol

import anyio

from .errors import BlobstoreError, ChunkMissing, Corrupt, NotFound, Unavailable
from .ids import ChunkId
from .source import (
    ChunkData,
    ChunkSource,
    ChunkStore,
    Sink,
    SplitSink,
    Undelivered,
)

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from .manifest import ChunkRef

log = logging.getLogger(__name__)


class TierObserver(Protocol):
    """Told what the tiers deliver. Called on the event loop, once per chunk: keep it cheap."""

    def delivered(self, tier: str, size: int, seconds: float | None) -> None:
        """``tier`` delivered ``size`` bytes; ``seconds`` the chunk cost there (a get's
        duration, or the wait since the tier's previous chunk in a batch), None for
        further copies of a chunk already delivered (a chunk wanted twice)."""

    def failed(self, tier: str, reason: str) -> None:
        """``tier`` could not deliver a chunk it might have had: "unavailable", "corrupt"."""

    def pulled(self, placed_bytes: int, seconds: float) -> None:
        """A pull completed in ``seconds``; ``placed_bytes`` came from the node's own
        copies without a tier (whole files linked or copied from the node store)."""


_observer: TierObserver | None = None


def report_to(observer: TierObserver | None) -> None:
    """Make every TieredSource in this process, existing or new, report to ``observer``
    (None: to nobody). blobstore.metrics.enable is the usual caller."""
    global _observer
    _observer = observer


class _Flight:
    """One chunk being fetched; others wanting it wait here. Finished with
    ``data``, or ``error`` (shared with the waiters), or neither (the leader
    was cancelled or could not deliver it: waiters then fetch it themselves).
    The event is made only when someone waits, so a fetch can hold a flight
    for each of its chunks cheaply."""

    __slots__ = ("_event", "by_fetch", "data", "error", "finished")

    def __init__(self, *, by_fetch: bool = False) -> None:
        self._event: anyio.Event | None = None
        self.data: ChunkData | None = None
        self.error: BaseException | None = None
        self.finished = False
        self.by_fetch = by_fetch
        """Led by a ``fetch``: it keeps ``data`` only for waiters already there."""

    @property
    def waited_on(self) -> bool:
        return self._event is not None

    async def wait(self) -> None:
        if not self.finished:
            if self._event is None:
                self._event = anyio.Event()
            await self._event.wait()

    def finish(self) -> None:
        self.finished = True
        if self._event is not None:
            self._event.set()


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
            await flight.wait()
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
            flight.finish()

    async def _fetch(self, chunk_id: ChunkId) -> ChunkData:
        unavailable: Unavailable | None = None
        corrupt: Corrupt | None = None
        for source in self.sources:
            started = time.monotonic()
            try:
                data = await source.get(chunk_id)
            except NotFound:
                continue
            except Corrupt as exc:
                if source is not self.sources[-1]:
                    log.warning("%s: %s; trying the next tier", source.name, exc)
                corrupt = exc
                _tell_failed(source.name, "corrupt")
                continue
            except Unavailable as exc:
                log.info("%s unavailable: %s", source.name, exc)
                unavailable = exc
                _tell_failed(source.name, "unavailable")
                continue
            self.bytes_from[source.name] += len(data)
            if _observer is not None:
                _observer.delivered(source.name, len(data), time.monotonic() - started)
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
        """Deliver every ref to ``sink``, each chunk from the nearest tier that
        delivers it. A chunk wanted by several refs is fetched once and handed
        to each (the extra copies count as the nearest tier's bytes: they are
        the node's own copy, as the cache hits they used to be). A chunk a
        ``get`` is fetching is waited for, not fetched again, and a ``get`` for
        a chunk this fetch is fetching waits for it. (Two fetches wanting one
        chunk each read it: waiting would hold one fetch's chunks in memory
        until the other reached them.)

        Returns ``[]``. Raises what ``sink`` raises; for a chunk no tier
        delivered, the last Unavailable a tier gave for it, else its Corrupt,
        else ChunkMissing (the errors ``get`` raises).
        """
        wanted: dict[ChunkId, list[ChunkRef]] = {}
        for ref in refs:
            wanted.setdefault(ref.id, []).append(ref)
        joined: dict[ChunkId, _Flight] = {}
        owned: dict[ChunkId, _Flight] = {}
        ours: list[ChunkId] = []
        for chunk_id in wanted:
            flight = self._flights.get(chunk_id)
            if flight is None:
                owned[chunk_id] = self._flights[chunk_id] = _Flight(by_fetch=True)
            elif not flight.by_fetch:
                joined[chunk_id] = flight
                continue
            ours.append(chunk_id)
        try:
            await _TierPass(self, wanted, ours, owned, sink).run()
        finally:
            for chunk_id, flight in owned.items():  # left: not delivered
                if self._flights.get(chunk_id) is flight:
                    del self._flights[chunk_id]
                flight.finish()  # its waiters fetch it themselves
        again: list[ChunkRef] = []
        for chunk_id, flight in joined.items():
            await flight.wait()
            if flight.data is None:
                again += wanted[chunk_id]
                continue
            for ref in wanted[chunk_id]:
                await sink(ref, flight.data)
        if again:
            await self.fetch(again, sink)
        return []

    def pulled(self, placed_bytes: int, seconds: float) -> None:
        """Tell the observer a pull through these tiers completed (see TierObserver)."""
        if _observer is not None:
            _observer.pulled(placed_bytes, seconds)

    async def has(self, chunk_ids: Iterable[ChunkId]) -> set[ChunkId]:
        wanted = set(chunk_ids)
        found: set[ChunkId] = set()
        for source in self.sources:
            if not wanted - found:
                break
            found |= await source.has(wanted - found)
        return found


class _TierPass:
    """One ``TieredSource.fetch``: the sources in order, each given what the
    ones before it could not deliver."""

    def __init__(
        self,
        tiers: TieredSource,
        wanted: dict[ChunkId, list[ChunkRef]],
        ours: list[ChunkId],
        owned: dict[ChunkId, _Flight],
        sink: Sink,
    ) -> None:
        self.tiers = tiers
        self.wanted = wanted
        self.order = ours
        self.ours = set(ours)
        self.owned = owned
        """Our flights not yet delivered (a delivered one is dropped at once:
        holding them all would hold every chunk of the fetch)."""
        self.sink = sink
        self.delivered: set[ChunkId] = set()
        self.unavailable: dict[ChunkId, Unavailable] = {}
        self.corrupt: dict[ChunkId, Corrupt] = {}

    async def run(self) -> None:
        pending = [self.wanted[chunk_id][0] for chunk_id in self.order]
        sources = self.tiers.sources
        for source in sources:
            if not pending:
                return
            try:
                left = await source.fetch(pending, self._sink_for(source.name))
            except Unavailable as exc:  # the whole source: nothing more from it
                log.info("%s unavailable: %s", source.name, exc)
                for ref in pending:
                    self.unavailable[ref.id] = exc
                    _tell_failed(source.name, "unavailable")
            else:
                self._note_reasons(source, left, last=source is sources[-1])
            # Whatever was not delivered, whether returned or not (a wrong size).
            pending = [ref for ref in pending if ref.id not in self.delivered]
        if pending:
            raise self._error_for(pending[0].id)

    def _sink_for(self, tier: str) -> Sink:
        """The sink ``tier`` delivers to: counts, hands flights over, passes on
        to ours — in two halves when ours is split (source.SplitSink)."""
        previous = time.monotonic()  # when the tier was asked, then its last delivery
        sink = self.sink

        def accepted(ref: ChunkRef, size: int) -> list[ChunkRef] | None:
            """The refs wanting ``ref``'s chunk, counted as delivered by
            ``tier``; None when it was not asked for, delivered already or has
            the wrong size (then marked corrupt)."""
            nonlocal previous
            chunk_id = ref.id
            if chunk_id in self.delivered or chunk_id not in self.ours:
                return None  # delivered twice, or never asked for
            refs = self.wanted[chunk_id]
            if size != ref.size:
                self.corrupt[chunk_id] = Corrupt(
                    f"chunk {chunk_id} has {size} bytes, the manifest says {ref.size}"
                )
                _tell_failed(tier, "corrupt")
                return None
            self.delivered.add(chunk_id)
            bytes_from = self.tiers.bytes_from
            bytes_from[tier] += size
            if len(refs) > 1:
                bytes_from[self.tiers.sources[0].name] += size * (len(refs) - 1)
            if _observer is not None:
                now = time.monotonic()
                _observer.delivered(tier, size, now - previous)
                previous = now
                if len(refs) > 1:
                    _observer.delivered(self.tiers.sources[0].name, size * (len(refs) - 1), None)
            return refs

        def land(chunk_id: ChunkId, data: ChunkData | None) -> None:
            flight = self.owned.pop(chunk_id, None)
            if flight is not None:
                if flight.waited_on and data is not None:  # a get waits: hand it the bytes
                    flight.data = data
                del self.tiers._flights[chunk_id]
                flight.finish()

        if not isinstance(sink, SplitSink):

            async def deliver(ref: ChunkRef, data: ChunkData) -> None:
                refs = accepted(ref, len(data))
                if refs is None:
                    return
                land(ref.id, data)
                for each in refs:
                    await sink(each, data)

            return deliver

        early, late = sink.early, sink.late

        def early_for_tier(ref: ChunkRef, data: ChunkData) -> None:
            # In a worker thread, before ``late_for_tier``: its checks first.
            chunk_id = ref.id
            if chunk_id in self.ours and chunk_id not in self.delivered and len(data) == ref.size:
                flight = self.owned.get(chunk_id)
                if flight is not None and flight.waited_on:
                    # A get waits for it (rare). Set here, where the bytes still
                    # are; a get that starts waiting after this fetches it itself.
                    flight.data = data
                for each in self.wanted[chunk_id]:
                    early(each, data)

        async def late_for_tier(ref: ChunkRef, size: int) -> None:
            refs = accepted(ref, size)
            if refs is None:
                return
            land(ref.id, None)
            for each in refs:
                await late(each, size)

        return SplitSink(early_for_tier, late_for_tier)

    def _note_reasons(self, source: ChunkSource, left: list[ChunkRef], *, last: bool) -> None:
        reasons = left.reasons if isinstance(left, Undelivered) else {}
        logged = False
        for ref in left:
            reason = reasons.get(ref.id)
            if isinstance(reason, Unavailable):
                self.unavailable[ref.id] = reason
                _tell_failed(source.name, "unavailable")
                if not logged:
                    log.info("%s unavailable: %s", source.name, reason)
                    logged = True
            elif isinstance(reason, Corrupt):
                self.corrupt[ref.id] = reason
                _tell_failed(source.name, "corrupt")
                if not last:
                    log.warning("%s: %s; trying the next tier", source.name, reason)

    def _error_for(self, chunk_id: ChunkId) -> BlobstoreError:
        # "might have had it" beats "corrupt" beats "not found", as in ``get``
        if chunk_id in self.unavailable:
            return self.unavailable[chunk_id]
        if chunk_id in self.corrupt:
            return self.corrupt[chunk_id]
        return ChunkMissing(chunk_id, "any tier")


def _tell_failed(tier: str, reason: str) -> None:
    if _observer is not None:
        _observer.failed(tier, reason)


class OpenedOnUse:
    """A ChunkSource opened when first asked for anything, not before: the
    peer tier of a pull that finds every chunk on the node is never opened
    (``--peers auto`` costs zeroconf's import, ~70 ms, and discovery).

    ``opener`` is the tier's async context manager (yielding None: no tier,
    then nothing is ever delivered). It is entered and exited by one task in
    ``task_group``, whatever task first uses it, so a tier holding a task group
    of its own is closed by the task that opened it; ``close()`` lets it go.
    An error opening it is logged and the tier treated as unavailable, as a
    tier that cannot answer would be.
    """

    def __init__(
        self,
        name: str,
        opener: Callable[[], AbstractAsyncContextManager[ChunkSource | None]],
        task_group: TaskGroup,
    ) -> None:
        self.name = name
        self._opener = opener
        self._task_group = task_group
        self._opened: anyio.Event | None = None
        self._closing = anyio.Event()
        self._source: ChunkSource | None = None
        self._error: Unavailable | None = None

    @property
    def opened(self) -> bool:
        """Whether anything asked for the tier yet (it is open or opening)."""
        return self._opened is not None

    async def _open(self) -> ChunkSource | None:
        """The tier, opened by the first caller. Raises Unavailable."""
        if self._opened is None:
            self._opened = anyio.Event()
            self._task_group.start_soon(self._hold, self._opened)
        await self._opened.wait()
        if self._error is not None:
            raise self._error
        return self._source

    async def _hold(self, opened: anyio.Event) -> None:
        try:
            async with self._opener() as source:
                self._source = source
                opened.set()
                await self._closing.wait()
        except Exception as exc:
            if opened.is_set():
                raise  # closing it failed: as it would have at the client's close
            log.warning("%s tier cannot be opened: %s", self.name, exc)
            self._error = Unavailable(f"{self.name} tier cannot be opened: {exc}")
        finally:
            opened.set()

    def close(self) -> None:
        """Let the tier close (its task exits it)."""
        self._closing.set()

    async def get(self, chunk_id: ChunkId) -> ChunkData:
        source = await self._open()
        if source is None:
            raise ChunkMissing(chunk_id, self.name)
        return await source.get(chunk_id)

    async def has(self, chunk_ids: Iterable[ChunkId]) -> set[ChunkId]:
        source = await self._open()
        return set() if source is None else await source.has(chunk_ids)

    async def fetch(self, refs: Sequence[ChunkRef], sink: Sink) -> list[ChunkRef]:
        try:
            source = await self._open()
        except Unavailable as exc:
            left = Undelivered()
            for ref in refs:
                left.add(ref, exc)
            return left
        return list(refs) if source is None else await source.fetch(refs, sink)
