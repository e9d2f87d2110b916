"""The peer tier: a ChunkSource ("peer") backed by the region's peer daemons.

For each chunk, live peers are ordered by rendezvous hashing (peers known to
hold it first): one of the chunk's ``spread`` servers (placement.servers; which
one is picked by this tier's salt), the next server, then the chunk's home (the
one peer that reads it from the store, and that the servers read it through
from). The first is asked, a slow answer is hedged by asking the next, and any
miss, error or corrupt answer falls through to the next peer. When all fail,
ChunkMissing sends the tier list on to the object store.

``fetch`` does the same for many refs at once: each ref goes to the queue of
its first-ranked peer, and one worker per peer keeps up to ``fetch_window``
chunks requested, topping up in batches (refills issued in one loop iteration
share one many-id request on the connection). A miss or failure moves the ref
to its next peer's queue; a peer that answers nothing for the hedge delay has
its outstanding chunks asked of their next peers too.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import anyio.to_thread

from blobstore.errors import (
    AuthError,
    BlobstoreError,
    ChunkMissing,
    CorruptChunk,
    PeerBusy,
    PeerUnavailable,
    ProtocolError,
    single_errors,
)
from blobstore.ids import ChunkId, verify, verify_off_loop
from blobstore.manifest import ChunkRef
from blobstore.source import ChunkData, Sink, SplitSink, Undelivered

from . import placement
from .framing import MAX_IDS_PER_REQUEST
from .liveness import Peer, PeerDirectory

log = logging.getLogger(__name__)
Then = Callable[[ChunkData], None]
"""Takes a chunk's verified bytes in the worker thread that verified them."""

_MAX_REMEMBERED_IDS = 1 << 20
_EXCLUDED = frozenset({"self", "foreign", "refused"})
"""Statuses of directory entries that are not peers (liveness._exclude)."""


@dataclass(frozen=True, slots=True)
class TierTuning:
    per_peer: int = 16
    """Chunk requests in flight to one peer."""
    request_timeout: float = 30.0
    hedge_min: float = 0.05
    hedge_max: float = 2.0
    fetch_window: int = 32
    """Chunks one ``fetch`` keeps requested from one peer (memory: at most this
    many received chunks per peer wait for the sink)."""
    peers_per_chunk: int = 3
    """Peers asked for one chunk before it goes to the object store: its home, the
    next one (home once the first is gone) and one more. Walking the whole ranking
    cost one 'missing' round trip per peer in the region for every hedged or
    missing chunk (1,000 nodes: ~1,000 requests per chunk; bench/sim_region.py)."""
    spread: int = placement.SPREAD
    """Servers one chunk is asked of across the region (placement.SPREAD); 1: the
    home first, then the peers ranked next for it (how a server asks the home, and
    a home the peers that were home before it: ``homes_only``)."""
    held_only: bool = False
    """Ask a peer that is one of the chunk's servers for it only after it said it
    holds it (one ``has`` first): how a home asks the peers that were home before
    it. A server asked for a chunk it lacks reads it through from its home -- the
    asking home, which waits on it (until the hand-off timeout: a 2 s stall per
    block in a small region, where every peer serves every chunk). Other peers are
    asked as before: one that is reading the chunk itself (its view of the region
    made it home) answers once it has it, so the store is read once."""


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
        self._ranked: _Ranked | None = None
        """The live peers last ranked (packed for ranking) and their homes per key."""
        self._spreading = False
        """Asking servers (``spread`` > 1 and the view has settled), set per call."""
        self._salt = random.getrandbits(64)
        """Picks this tier's server per chunk: requesters spread evenly over them."""
        self.stats = {"hits": 0, "misses": 0, "corrupt": 0, "errors": 0, "hedges": 0, "busy": 0}

    async def get(self, chunk_id: ChunkId) -> ChunkData:
        """Fetch a verified chunk from a peer. Raises ChunkMissing when no peer delivers it."""
        await self._discovered()
        self._spreading = False  # one chunk: its home (the bulk path is ``fetch``)
        order, _ = self._order(chunk_id, self._directory.live())
        if self._tuning.held_only:
            order = await self._holding(order, [chunk_id])
        queue = deque(order)
        if not queue:
            raise ChunkMissing(chunk_id, "peers (none live)")
        data: ChunkData | None = None
        with single_errors():
            async with asyncio.TaskGroup() as tg:
                attempts: list[asyncio.Task[ChunkData | None]] = []
                while data is None:
                    running = [task for task in attempts if not task.done()]
                    if not running:
                        if not queue:
                            break
                        running.append(tg.create_task(self._try(queue.popleft(), chunk_id)))
                        attempts.append(running[-1])
                    hedge = self._hedge_delay() if queue else None
                    done, _ = await asyncio.wait(
                        running, timeout=hedge, return_when=asyncio.FIRST_COMPLETED
                    )
                    if not done:  # slow: ask the next peer too, keep waiting for both
                        self.stats["hedges"] += 1
                        attempts.append(tg.create_task(self._try(queue.popleft(), chunk_id)))
                    data = next((d for t in done if (d := t.result()) is not None), None)
                for task in attempts:
                    task.cancel()  # the other attempts, once one delivered
        if data is None:
            self.stats["misses"] += 1
            raise ChunkMissing(chunk_id, "peers")
        self.stats["hits"] += 1
        return data

    async def fetch(self, refs: Sequence[ChunkRef], sink: Sink) -> list[ChunkRef]:
        """Deliver what the peers hold, verified, to ``sink``; return the rest
        (an ``Undelivered``: ChunkMissing, CorruptChunk or PeerUnavailable per
        chunk). Raises only what ``sink`` raises."""
        await self._discovered()
        live = self._directory.live()
        batch = _BatchFetch(self, sink)
        if not live:
            for ref in refs:
                batch.left.add(ref, ChunkMissing(ref.id, "peers (none live)"))
            return batch.left
        with single_errors():
            async with asyncio.TaskGroup() as tg:
                batch.task_group = tg
                self._spreading = placement.spreads(len(live), self._tuning.spread)
                self._spreading = self._spreading and self.sees_region()
                ranked = [self._order(ref.id, live, placement.home_key(ref)) for ref in refs]
                orders = [order for order, _ in ranked]
                if self._tuning.held_only:
                    orders = await self._holding_each(orders, [ref.id for ref in refs])
                for ref, order, (_, serving) in zip(refs, orders, ranked, strict=True):
                    batch.route(_Want(ref, order, serving))
        return batch.left

    async def _holding(self, order: list[Peer], ids: list[ChunkId]) -> list[Peer]:
        """``order`` without the servers of ``ids[0]`` that say they lack it."""
        (kept,) = await self._holding_each([order], ids)
        return kept

    async def _holding_each(self, orders: list[list[Peer]], ids: list[ChunkId]) -> list[list[Peer]]:
        """Each of ``orders`` (the peers ranked for ``ids[i]``) without the chunk's
        servers that say they lack it: one ``has`` to each server named, for its ids."""
        me = self._directory.me.node
        nodes = [p.node for p in self._directory.live()] + [me]
        if not placement.spreads(len(nodes)):
            return orders  # no servers: a peer asked answers from its cache or as home
        serving = [set(placement.servers(nodes, chunk_id, placement.SPREAD)) for chunk_id in ids]
        wanted: dict[Peer, list[ChunkId]] = {}
        for order, chunk_id, servers in zip(orders, ids, serving, strict=True):
            for peer in order:
                if peer.node in servers:
                    wanted.setdefault(peer, []).append(chunk_id)
        async with asyncio.TaskGroup() as tg:
            probes = {
                peer: tg.create_task(self._probe(peer, asked)) for peer, asked in wanted.items()
            }
        held = {peer: probe.result() for peer, probe in probes.items()}
        return [
            [peer for peer in order if peer not in held or chunk_id in held[peer]]
            for order, chunk_id in zip(orders, ids, strict=True)
        ]

    async def has(self, chunk_ids: Iterable[ChunkId]) -> set[ChunkId]:
        """Ask every live peer which of ``chunk_ids`` it holds; remember it for ranking."""
        ids = list(dict.fromkeys(chunk_ids))
        await self._discovered()
        peers = self._directory.live()
        with single_errors():
            async with asyncio.TaskGroup() as tg:
                probes = [tg.create_task(self._probe(p, ids)) for p in peers]
        found: set[ChunkId] = set()
        for peer, held in zip(peers, (probe.result() for probe in probes), strict=True):
            if len(held) <= _MAX_REMEMBERED_IDS:
                self._held[peer.node] = held
            found |= held
        return found

    def homes_only(self, held_only: bool = False) -> PeerTier:
        """This tier's peers, asked by home only (``spread`` 1): a server reads a
        chunk through from its home with it (through servers, its ask would go to
        other servers), and a home asks the peers that were home before it
        (``held_only``: only those that hold the chunk)."""
        tuning = replace(self._tuning, spread=1, held_only=held_only)
        return PeerTier(self._directory, tuning, self._settled)

    def is_home(self, key: str) -> bool:
        """Whether this daemon (the directory's own node) is home for ``key``
        (placement.home_key) among the peers it sees live."""
        me = self._directory.me.node
        return placement.home([p.node for p in self._directory.live()] + [me], key) == me

    def sees_region(self) -> bool:
        """Whether this directory's view of the region has settled: every peer it
        knows of is up (checked, or named alive by a peer), answered a check once,
        failed ``forget_after`` checks without ever answering (absent), or is
        excluded. While a listed peer is not seen yet
        (a rolling start), nodes see different regions and place chunks differently.
        Then a server does not read through (it could take another peer for the
        home than its askers do, and both homes read the store), and a requester
        asks homes, not servers: a node asked as a server while its directory saw
        no peer yet took itself for every chunk's home (sim, 16 nodes started 50/s:
        4.5x unique; 1.00x with both rules)."""
        absent = self._directory.timing.forget_after
        return all(
            p.up or p.verified or p.failures >= absent or p.status in _EXCLUDED
            for p in self._directory.all()
        )

    async def _discovered(self) -> None:
        if self._settled is not None and not self._settled.done():
            await asyncio.wait([self._settled])  # never raises, even if it was cancelled

    def _order(
        self, chunk_id: ChunkId, peers: list[Peer], home_key: str = ""
    ) -> tuple[list[Peer], frozenset[Peer]]:
        """Peers holding ``chunk_id`` first, then by rendezvous on ``home_key``
        (placement.home_key: a packed chunk's block; default the chunk id); and those
        of them asked as one of the chunk's servers, not as its home (``_ask``)."""
        count, spread = self._tuning.peers_per_chunk, self._tuning.spread
        placed = placement.chunk_key(home_key or chunk_id)
        ranked = self._ranking(peers)
        spreading = self._spreading and bool(peers)
        keyed = placement.chunk_key(chunk_id)
        servers: list[Peer] = []
        homes: list[Peer] | None = None
        if any(chunk_id in held for held in self._held.values()):

            def key(peer: Peer) -> tuple[bool, int]:
                holds = chunk_id in self._held.get(peer.node, ())
                return holds, placement.keyed_score(peer.node, placed)

            homes = heapq.nlargest(count, peers, key=key)
        else:  # the chunks of one block share their homes
            homes = ranked.homes.get(placed)
        if homes is None:
            if spreading and keyed == placed:  # placed by its id: one ranking for both
                servers = ranked.ranking.top(keyed, max(count, spread))
                homes, servers = servers[:count], servers[:spread]
            else:
                homes = ranked.ranking.top(placed, count)
            if len(ranked.homes) >= 4096:
                ranked.homes.clear()
            ranked.homes[placed] = homes
        if not spreading:
            return list(homes), _NONE
        servers = servers or ranked.ranking.top(keyed, spread)
        first = placement.pick(self._salt, chunk_id, len(servers))
        picked = [servers[first], servers[(first + 1) % len(servers)]]
        holders = [p for p in homes if chunk_id in self._held.get(p.node, ())]
        # The home stays in the list: a server that cannot reach it answers missing,
        # and the chunk must still have one reader of the store.
        order = list(dict.fromkeys([*holders, *picked, *homes]))
        return order[:count], frozenset(picked).difference(homes[:1])

    def _ranking(self, peers: list[Peer]) -> _Ranked:
        """``peers`` packed for ranking, kept while the live peers stay the same
        (``peers`` is a copy of ``live()``, a new list every call; peers compare by
        identity, so comparing the lists is cheap)."""
        ranked = self._ranked
        if ranked is None or not (ranked.peers is peers or ranked.peers == peers):
            keys = [placement.node_key(p.node) for p in peers]
            ranked = self._ranked = _Ranked(peers, placement.Ranking(peers, keys))
        return ranked

    def _hedge_delay(self) -> float:
        return min(self._tuning.hedge_max, max(self._tuning.hedge_min, 4 * self._latency))

    async def _try(self, peer: Peer, chunk_id: ChunkId) -> ChunkData | None:
        """One peer's verified answer, or None when it has none (missing, corrupt, down)."""
        slots = self._slots.setdefault(peer.node, asyncio.Semaphore(self._tuning.per_peer))
        async with slots:
            try:
                return await self._ask(peer, chunk_id)  # (one chunk: asked as its home)
            except (ChunkMissing, CorruptChunk, PeerUnavailable):
                return None

    async def _ask(
        self, peer: Peer, chunk_id: ChunkId, as_server: bool = False, early: Then | None = None
    ) -> ChunkData:
        """The chunk from ``peer``, verified. ``as_server``: ``peer`` is asked as one of
        the chunk's servers, not as the home this node sees (a peer whose view makes it
        the home then answers from its cache only: its view lags this one's, and the home
        this node sees reads the store). ``early``: called with the verified bytes in
        the worker thread that verified them (a SplitSink's early half: one hop per
        chunk, not two); what it raises is raised."""
        started = time.monotonic()
        try:
            conn = await self._directory.connect(peer)
            async with asyncio.timeout(self._tuning.request_timeout):
                if as_server:
                    data = await conn.get_unverified(chunk_id, as_server=True)
                else:
                    data = await conn.get_unverified(chunk_id)
            answered = time.monotonic()
            # Outside the request's timeout: writing the bytes is this node's time.
            where = f"peer {peer.address}"
            if early is None:
                await verify_off_loop(chunk_id, data, where)
            else:
                await anyio.to_thread.run_sync(_verified, chunk_id, data, where, early)
        except ChunkMissing:
            raise
        except CorruptChunk as exc:
            self.stats["corrupt"] += 1
            log.warning("%s; trying elsewhere", exc)
            self._directory.mark_down(peer, "served a corrupt chunk")
            raise
        except PeerBusy:  # at its connection cap: another holder is asked, it stays up
            self.stats["busy"] += 1
            raise
        except (PeerUnavailable, ProtocolError, AuthError, TimeoutError) as exc:
            self.stats["errors"] += 1
            self._directory.mark_down(peer, str(exc) or type(exc).__name__)
            raise PeerUnavailable(f"peer {peer.address}: {exc}") from exc
        self._directory.mark_ok(peer)
        self._latency = 0.9 * self._latency + 0.1 * (answered - started)
        return data

    async def _probe(self, peer: Peer, ids: list[ChunkId]) -> set[ChunkId]:
        held: set[ChunkId] = set()
        try:
            conn = await self._directory.connect(peer)
            for start in range(0, len(ids), MAX_IDS_PER_REQUEST):
                part = ids[start : start + MAX_IDS_PER_REQUEST]
                async with asyncio.timeout(self._tuning.request_timeout):
                    flags = await conn.has(part)
                held.update(i for i, flag in zip(part, flags, strict=True) if flag)
        except PeerBusy:
            self.stats["busy"] += 1
        except (PeerUnavailable, ProtocolError, TimeoutError) as exc:
            self._directory.mark_down(peer, str(exc) or type(exc).__name__)
        return held


_NONE: frozenset[Peer] = frozenset()


class _Ranked:
    """A membership packed for ranking (placement.Ranking), and homes found over it."""

    __slots__ = ("homes", "peers", "ranking")

    def __init__(self, peers: list[Peer], ranking: placement.Ranking[Peer]) -> None:
        self.peers = peers
        self.ranking = ranking
        self.homes: dict[int, list[Peer]] = {}
        """Homes per placement key (the chunks of one block share theirs)."""


class _Want:
    """One ref on its way from the peers: the peers not asked yet, in rank order."""

    __slots__ = (
        "asking",
        "done",
        "hedged",
        "peers",
        "reason",
        "ref",
        "reranked",
        "serving",
        "winner",
    )

    def __init__(self, ref: ChunkRef, peers: list[Peer], serving: frozenset[Peer]) -> None:
        self.ref = ref
        self.peers = peers
        self.serving = serving
        """The peers asked as the chunk's servers, not as its home."""
        self.asking = 0
        """Attempts queued or running (two while hedged)."""
        self.done = False
        self.winner: asyncio.Task[None] | None = None
        """The attempt that delivered (its sink call must never be cancelled)."""
        self.hedged = False
        self.reason: BlobstoreError | None = None
        self.reranked = False
        """Ranked again among the peers live now, after one of its peers went down."""


class _BatchFetch:
    """One ``PeerTier.fetch``: a queue and a worker per peer, wants moving from
    peer to peer until delivered or out of peers."""

    def __init__(self, tier: PeerTier, sink: Sink) -> None:
        self.tier = tier
        self.sink = sink
        self.left = Undelivered()
        self.task_group: asyncio.TaskGroup | None = None
        self.queues: dict[str, deque[_Want]] = {}
        self.wake: dict[str, asyncio.Event] = {}

    def route(self, want: _Want) -> None:
        """Queue ``want`` at its next peer, or give it up when none is left."""
        if (
            not want.peers
            and want.asking == 0
            and isinstance(want.reason, PeerUnavailable)
            and not want.reranked
        ):
            # A peer it was ranked to went down: rank once more among the live peers, so
            # the new home (which now sees the old one gone) is asked. Without it, a
            # chunk whose first peers died together went to the store from every node
            # (sim, 10% killed: 23 of 30 nodes read one chunk from the store).
            want.reranked = True
            want.peers, want.serving = self.tier._order(
                want.ref.id, self.tier._directory.live(), placement.home_key(want.ref)
            )
        if not want.peers:
            if want.asking == 0 and not want.done:
                self.tier.stats["misses"] += 1
                self.left.add(want.ref, want.reason or ChunkMissing(want.ref.id, "peers"))
            return
        peer = want.peers.pop(0)
        want.asking += 1
        self.queues.setdefault(peer.node, deque()).append(want)
        if peer.node in self.wake:
            self.wake[peer.node].set()
        else:
            assert self.task_group is not None
            self.wake[peer.node] = asyncio.Event()
            try:
                self.task_group.create_task(self._worker(peer))
            except RuntimeError:  # the fetch is being cancelled: nobody waits for it now
                del self.wake[peer.node]  # (an ask that ended as it was, re-routed; 1,000-node sim)

    async def _worker(self, peer: Peer) -> None:
        node = peer.node
        queue, wake = self.queues[node], self.wake[node]
        window = self.tier._tuning.fetch_window
        running: deque[tuple[_Want, asyncio.Task[None]]] = deque()
        async with asyncio.TaskGroup() as tg:
            while True:
                for want, task in running:
                    if want.done and task is not want.winner and not task.done():
                        task.cancel()  # its hedged twin delivered it
                if any(task.done() for _, task in running):
                    running = deque([item for item in running if not item[1].done()])
                # Top up in batches: what starts in one loop iteration is one request.
                if queue and len(running) <= window // 2:
                    while queue and len(running) < window:
                        want = queue.popleft()
                        running.append((want, tg.create_task(self._one(peer, want))))
                if not queue and not running:
                    del self.wake[node]  # before any await: a later route starts a new worker
                    return
                wake.clear()
                woken = tg.create_task(wake.wait())
                done, _ = await asyncio.wait(
                    [woken, *(task for _, task in running)],
                    timeout=self.tier._hedge_delay(),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                woken.cancel()
                if not done:
                    self._hedge(running)

    def _hedge(self, running: deque[tuple[_Want, asyncio.Task[None]]]) -> None:
        """The peer answered nothing for the hedge delay: ask the next peers for
        what it has outstanding too. The first ask stays: a home peer reading
        through from the store is slow, not wrong, and giving up on it would
        send the chunk to the store a second time."""
        for want, task in running:
            if not task.done() and not want.done and not want.hedged and want.peers:
                want.hedged = True
                self.tier.stats["hedges"] += 1
                self.route(want)

    async def _one(self, peer: Peer, want: _Want) -> None:
        ref = want.ref
        try:
            if want.done:  # a hedged twin delivered it meanwhile
                return
            split = self.sink if isinstance(self.sink, SplitSink) else None
            early = None
            if split is not None:

                def early(data: ChunkData) -> None:
                    if len(data) == ref.size:  # (a second delivery is the sink's to drop)
                        split.early(ref, data)

            try:
                data = await self.tier._ask(peer, ref.id, peer in want.serving, early)
            except (ChunkMissing, CorruptChunk, PeerUnavailable) as exc:
                if not isinstance(exc, ChunkMissing) or want.reason is None:
                    want.reason = exc
            else:
                if len(data) == ref.size and not want.done:
                    want.done = True
                    want.winner = asyncio.current_task()
                    self.tier.stats["hits"] += 1
                    if split is not None:
                        await split.late(ref, len(data))
                    else:
                        await self.sink(ref, data)
                elif len(data) != ref.size:
                    want.reason = CorruptChunk(ref.id, f"peer {peer.address} (wrong size)")
        finally:
            want.asking -= 1
        # Next peer when nothing else is asking, or when the other ask is one
        # already found slow (hedged): keep going down the list meanwhile.
        if not want.done and (want.asking == 0 or (want.hedged and want.peers)):
            self.route(want)


def _verified(chunk_id: ChunkId, data: ChunkData, where: str, early: Then) -> None:
    """Check ``data`` is ``chunk_id``'s bytes, then hand them to ``early`` (in this
    worker thread). Raises CorruptChunk, and what ``early`` raises."""
    verify(chunk_id, data, where)
    early(data)
