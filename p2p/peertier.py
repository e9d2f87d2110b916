"""The peer tier: a ChunkSource ("peer") backed by the region's peer daemons.

For each chunk, live peers are ranked by rendezvous hashing (peers known to
hold it first); the first is asked, a slow answer is hedged by asking the next,
and any miss, error or corrupt answer falls through to the next peer. When all
fail, ChunkMissing sends the tier list on to the object store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from blobstore.errors import (
    AuthError,
    ChunkMissing,
    CorruptChunk,
    PeerUnavailable,
    ProtocolError,
)
from blobstore.ids import ChunkId
from blobstore.manifest import ChunkRef
from blobstore.source import ChunkData, Sink, fetch_each

from . import placement
from .framing import MAX_IDS_PER_REQUEST
from .liveness import Peer, PeerDirectory

log = logging.getLogger(__name__)

_MAX_REMEMBERED_IDS = 1 << 20


@dataclass(frozen=True, slots=True)
class TierTuning:
    per_peer: int = 16
    """Chunk requests in flight to one peer."""
    request_timeout: float = 30.0
    hedge_min: float = 0.05
    hedge_max: float = 2.0


class PeerTier:
    """ChunkSource over ``directory``'s live peers."""

    name = "peer"

    def __init__(
        self,
        directory: PeerDirectory,
        tuning: TierTuning = TierTuning(),
        settled: asyncio.Future[None] | None = None,
    ) -> None:
        """``settled`` completes when discovery has had its chance (see plugin.py);
        the first request of the pull waits for it."""
        self._directory = directory
        self._settled = settled
        self._tuning = tuning
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._held: dict[str, set[ChunkId]] = {}
        self._latency = 0.1
        self.stats = {"hits": 0, "misses": 0, "corrupt": 0, "errors": 0, "hedges": 0}

    async def get(self, chunk_id: ChunkId) -> ChunkData:
        """Fetch a verified chunk from a peer. Raises ChunkMissing when no peer delivers it."""
        await self._discovered()
        peers = self._order(chunk_id, self._directory.live())
        if not peers:
            raise ChunkMissing(chunk_id, "peers (none live)")
        pending: set[asyncio.Task[ChunkData]] = set()
        queue = list(peers)
        try:
            while queue or pending:
                if queue and not pending:
                    pending.add(asyncio.create_task(self._attempt(queue.pop(0), chunk_id)))
                hedge = self._hedge_delay() if queue else None
                done, _ = await asyncio.wait(
                    pending, timeout=hedge, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    self.stats["hedges"] += 1
                    pending.add(asyncio.create_task(self._attempt(queue.pop(0), chunk_id)))
                    continue
                for task in done:
                    pending.discard(task)
                    if task.exception() is None:
                        self.stats["hits"] += 1
                        return task.result()
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        self.stats["misses"] += 1
        raise ChunkMissing(chunk_id, "peers")

    async def fetch(self, refs: Sequence[ChunkRef], sink: Sink) -> list[ChunkRef]:
        return await fetch_each(self.get, refs, sink)

    async def has(self, chunk_ids: Iterable[ChunkId]) -> set[ChunkId]:
        """Ask every live peer which of ``chunk_ids`` it holds; remember it for ranking."""
        ids = list(dict.fromkeys(chunk_ids))
        await self._discovered()
        peers = self._directory.live()
        results = await asyncio.gather(*(self._probe(p, ids) for p in peers))
        found: set[ChunkId] = set()
        for peer, held in zip(peers, results, strict=True):
            if len(held) <= _MAX_REMEMBERED_IDS:
                self._held[peer.node] = held
            found |= held
        return found

    async def _discovered(self) -> None:
        if self._settled is not None and not self._settled.done():
            await asyncio.wait([self._settled])  # never raises, even if it was cancelled

    def _order(self, chunk_id: ChunkId, peers: list[Peer]) -> list[Peer]:
        def key(peer: Peer) -> tuple[bool, int]:
            holds = chunk_id in self._held.get(peer.node, ())
            return holds, placement.score(peer.node, chunk_id)

        return sorted(peers, key=key, reverse=True)

    def _hedge_delay(self) -> float:
        return min(self._tuning.hedge_max, max(self._tuning.hedge_min, 4 * self._latency))

    async def _attempt(self, peer: Peer, chunk_id: ChunkId) -> ChunkData:
        slots = self._slots.setdefault(peer.node, asyncio.Semaphore(self._tuning.per_peer))
        async with slots:
            started = time.monotonic()
            try:
                conn = self._directory.connection(peer)
                async with asyncio.timeout(self._tuning.request_timeout):
                    data = await conn.get(chunk_id)
            except ChunkMissing:
                raise
            except CorruptChunk as exc:
                self.stats["corrupt"] += 1
                log.warning("%s; trying elsewhere", exc)
                self._directory.mark_down(peer, "served a corrupt chunk")
                raise
            except (PeerUnavailable, ProtocolError, AuthError, TimeoutError) as exc:
                self.stats["errors"] += 1
                self._directory.mark_down(peer, str(exc) or type(exc).__name__)
                raise PeerUnavailable(f"peer {peer.address}: {exc}") from exc
        self._directory.mark_ok(peer)
        self._latency = 0.9 * self._latency + 0.1 * (time.monotonic() - started)
        return data

    async def _probe(self, peer: Peer, ids: list[ChunkId]) -> set[ChunkId]:
        held: set[ChunkId] = set()
        try:
            conn = self._directory.connection(peer)
            for start in range(0, len(ids), MAX_IDS_PER_REQUEST):
                part = ids[start : start + MAX_IDS_PER_REQUEST]
                async with asyncio.timeout(self._tuning.request_timeout):
                    flags = await conn.has(part)
                held.update(i for i, flag in zip(part, flags, strict=True) if flag)
        except (PeerUnavailable, ProtocolError, TimeoutError) as exc:
            self._directory.mark_down(peer, str(exc) or type(exc).__name__)
        return held
