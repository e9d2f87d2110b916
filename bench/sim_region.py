"""Discrete-event simulation of a region: the REAL peer code on a simulated network and clock.

    .venv/bin/python bench/sim_region.py [--nodes 1000] [--size 20G] [--unit 64M] [--scenario a]

What runs for real (imported from p2p/, unchanged): ``PeerDirectory`` (liveness checks,
backoff, gossip intake and its caps), ``PeerTier.fetch`` (rendezvous ordering, per-peer
windows, hedging, fall-through, give-up), ``ChunkProvider`` (cache lookups, home-only
single-flight read-through), ``placement`` (rendezvous) and ``messages.pong``/``peers_field``
(what a pong lists and how it is checked). Only the sockets are simulated: ``open_connection``
(liveness.py's dialler) is replaced by a ``SimConnection`` whose ``get``/``ping`` go through
the simulated network to the target node's real ``ChunkProvider``; ``PeerServer``'s framing
is not run (its daemon-wide lookup budget and its connection cap are modelled).
The node store and the object store are simulated (a set of ids and FIFO-served links).

The clock is virtual: ``VirtualLoop`` is an asyncio event loop whose ``time()`` jumps to the
next timer when nothing is ready, and ``time.monotonic`` in liveness.py/peertier.py reads it
(those modules are handed a stand-in ``time`` module), so asyncio timeouts, hedging delays,
ping intervals and backoffs all run in simulated seconds.

Network model: each node has one uplink and one downlink (``--nic`` bytes/s each), each a FIFO
queue; a transfer is queued on the sender's uplink and the receiver's downlink and is through
when both have carried it (plus half an RTT each way) -- the links are not coupled, which is
optimistic for a node fed by many senders at once but has no convoys. The object store answers
after ``--origin-latency`` and serves through one shared link of ``--origin-bw`` (FIFO).
Disk writes are FIFO per node at ``--disk``. A killed node stops answering silently (a host
that died: no RST, connects time out).

A transfer unit is a span of ``--unit`` bytes standing for a run of real ~1 MiB chunks:
1,000 nodes x 20 GiB in 1 MiB chunks would be 20 M deliveries (hours of Python); in 64 MiB
spans it is 320 k. Placement figures that depend on granularity (home balance, homes moved
by churn) are also computed with the real ``placement`` over real-sized chunk ids.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import math
import os
import random
import selectors
import statistics
import sys
import time
import types
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from blobstore.config import parse_size  # noqa: E402
from blobstore.errors import ChunkMissing, CorruptChunk, PeerUnavailable  # noqa: E402
from blobstore.ids import ChunkId  # noqa: E402
from blobstore.manifest import ChunkRef  # noqa: E402
from p2p import liveness, messages, peertier, placement  # noqa: E402
from p2p.client import Identity, SelfConnection  # noqa: E402
from p2p.homeblocks import HomeBlocks  # noqa: E402
from p2p.liveness import Peer, PeerDirectory, Timing  # noqa: E402
from p2p.metrics import Metrics  # noqa: E402
from p2p.peertier import PeerTier, TierTuning  # noqa: E402
from p2p.provider import ChunkProvider  # noqa: E402
from p2p.server import ServerLimits  # noqa: E402

# ---------------------------------------------------------------------- virtual clock


class _Deadlock(RuntimeError):
    pass


class _JumpingSelector(selectors.DefaultSelector):
    """Never sleeps: a wait for the next timer advances the virtual clock instead."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            raise _Deadlock("nothing scheduled and nothing ready: the simulation is stuck")
        if timeout > 0:
            self.now += timeout
        return super().select(0)


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._clock = _JumpingSelector()
        super().__init__(self._clock)
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self._clock.now


def _virtual_time_module(loop: VirtualLoop) -> types.ModuleType:
    fake = types.ModuleType("time")
    fake.monotonic = loop.time  # type: ignore[attr-defined]
    return fake


# ---------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class NetConfig:
    nic: float = 25e9 / 8
    """Bytes per second, each of uplink and downlink (25 Gbit/s)."""
    rtt: float = 0.0005
    disk: float = 2e9
    origin_latency: float = 0.03
    origin_bw: float = 12.5e9
    """Aggregate object-store bandwidth for the region (100 Gbit/s)."""


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    nodes: int
    start_rate: float = 0.0
    """Nodes started per second (0: all at once)."""
    kill_fraction: float = 0.0
    join_fraction: float = 0.0
    churn_at: float = 0.5
    """Kill/join when this fraction of the pull has been delivered on average."""
    slow_homes: int = 0
    liars: int = 0
    split: bool = False
    gossip_seed: bool = False
    warmup: float = 0.0
    """Seconds a node's daemon runs before its pull starts."""


# ---------------------------------------------------------------------- simulated world


class SimData:
    """A chunk's stand-in: its id, its length, and whether its bytes are the right ones."""

    __slots__ = ("chunk_id", "good", "size")

    def __init__(self, chunk_id: ChunkId, size: int, good: bool = True) -> None:
        self.chunk_id, self.size, self.good = chunk_id, size, good

    def __len__(self) -> int:
        return self.size


class Link:
    """A FIFO-served pipe of ``rate`` bytes/s."""

    __slots__ = ("free_at", "rate")

    def __init__(self, rate: float) -> None:
        self.rate, self.free_at = rate, 0.0

    def reserve(self, now: float, size: int) -> float:
        """Queue ``size`` bytes behind what the link already carries; when they are through."""
        self.free_at = max(now, self.free_at) + size / self.rate
        return self.free_at


class World:
    def __init__(self, cfg: NetConfig, loop: VirtualLoop) -> None:
        self.cfg = cfg
        self.loop = loop
        self.nodes: dict[str, SimNode] = {}
        self.by_address: dict[str, SimNode] = {}
        self.origin_link = Link(cfg.origin_bw)
        self.origin_reads: Counter[ChunkId] = Counter()
        self.sizes: dict[ChunkId, int] = {}
        self.located: dict[ChunkId, ChunkRef] = {}
        """Where the store holds each chunk, as a daemon's PackLocator finds it: a packed
        chunk is placed by its block (placement.home_key) and read through by block."""
        self.gossip_bytes: Counter[str] = Counter()
        self.pings = 0
        self.counting = False

    async def until(self, done: Callable[[], bool], deadline: float = math.inf) -> None:
        """Check ``done`` every 50 simulated ms until it holds or ``deadline`` passes."""
        while True:
            if done() or self.loop.time() >= deadline:
                return
            await asyncio.sleep(0.05)

    def reachable(self, a: SimNode, b: SimNode) -> bool:
        return b.alive and a.side == b.side

    async def transfer(self, src: SimNode, dst: SimNode, size: int) -> None:
        now = self.loop.time()
        src.uploaded += size
        end = max(src.up.reserve(now, size), dst.down.reserve(now, size))
        await asyncio.sleep(end - now + self.cfg.rtt / 2)

    async def origin_get(self, node: SimNode, chunk_id: ChunkId) -> SimData:
        await asyncio.sleep(self.cfg.origin_latency)
        size = self.sizes[chunk_id]
        now = self.loop.time()
        self.origin_reads[chunk_id] += 1
        end = max(self.origin_link.reserve(now, size), node.down.reserve(now, size))
        await asyncio.sleep(end - now)
        return SimData(chunk_id, size)


class SimStore:
    """The node store: which chunks a node holds; writes take disk time."""

    def __init__(self, node: SimNode) -> None:
        self.node = node
        self.held: set[ChunkId] = set()
        self.disk = Link(node.world.cfg.disk)

    def contains(self, chunk_id: ChunkId) -> bool:
        return chunk_id in self.held

    async def get(self, chunk_id: ChunkId) -> SimData:
        return SimData(chunk_id, self.node.world.sizes[chunk_id])

    async def put(self, chunk_id: ChunkId, data: object) -> None:
        size = len(cast(SimData, data))
        now = self.node.world.loop.time()
        self.disk.free_at = max(now, self.disk.free_at) + size / self.disk.rate
        self.held.add(chunk_id)  # in the node store from now on (writes are buffered)
        await asyncio.sleep(self.disk.free_at - now)


class SimOrigin:
    """The object store as one node's read-through sees it."""

    def __init__(self, node: SimNode) -> None:
        self.node = node
        self.locator = self

    async def get(self, chunk_id: ChunkId) -> SimData:
        return await self.node.world.origin_get(self.node, chunk_id)

    async def fetch(self, refs: Sequence[ChunkRef], sink: Any) -> list[ChunkRef]:
        """A home's block read (p2p/homeblocks.py): the chunks one after another."""
        for ref in refs:
            await sink(ref, await self.get(ref.id))
        return []

    # What HomeBlocks asks of OriginSource.locator (PackLocator), from the pulled refs.
    async def locate(self, chunk_id: ChunkId) -> ChunkRef | None:
        return self.node.world.located.get(chunk_id)

    async def refs_between(self, pack: ChunkId, start: int, end: int) -> list[ChunkRef]:
        refs = self.node.world.located.values()
        return sorted(
            (r for r in refs if r.pack == pack and start <= r.offset < end), key=lambda r: r.offset
        )


class _Stream:
    __slots__ = ("conn", "received_at")

    def __init__(self, conn: SimConnection) -> None:
        self.conn = conn
        self.received_at = 0.0
        """When the last answer arrived (wire.FrameStream's: a busy peer is not dead)."""

    def abort(self) -> None:
        self.conn.close(PeerUnavailable(f"connection to {self.conn.address} closed"))


def _sim_verify(chunk_id: ChunkId, data: Any, where: str = "") -> None:
    """What the real BLAKE3 check finds for a SimData (the peer tier's ``verify``)."""
    if not data.good:
        raise CorruptChunk(chunk_id, where, "0" * 64)


async def _sim_verify_off_loop(chunk_id: ChunkId, data: Any, where: str = "") -> None:
    _sim_verify(chunk_id, data, where)


class SimConnection:
    """What liveness.py and peertier.py use of a ``PeerConnection``, over the simulated net."""

    __slots__ = ("_ended", "_waiting", "client", "closed", "server", "stream")
    region = "sim"

    def __init__(self, client: SimNode, server: SimNode) -> None:
        self.client, self.server = client, server
        self.stream = _Stream(self)
        self.closed = False
        self._ended: asyncio.Future[None] = client.world.loop.create_future()
        self._waiting: set[asyncio.Future[Any]] = set()
        server.inbound += 1

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def node(self) -> str:
        return self.server.name

    @property
    def pending(self) -> int:
        return len(self._waiting)

    def close(self, exc: Exception) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.inbound -= 1
        for fut in self._waiting:
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()
        self._waiting.clear()
        if not self._ended.done():  # (cancelled with its reader's task)
            self._ended.set_result(None)

    def read_loop(self) -> asyncio.Future[None]:
        return self._ended  # awaited by liveness.py like the real coroutine

    async def _call(self, work: Callable[[asyncio.Future[Any]], Any]) -> Any:
        if self.closed:
            raise PeerUnavailable(f"connection to {self.address} closed")
        fut: asyncio.Future[Any] = self.client.world.loop.create_future()
        self._waiting.add(fut)
        server = self.server
        if (
            server.alive
            and server.tg is not None
            and self.client.world.reachable(self.client, server)
        ):
            try:
                server.tg.create_task(work(fut))
            except RuntimeError:  # its node is stopping (killed): as a dead one, no answer
                work(fut).close()
        try:
            answer = await fut
        except (ChunkMissing, CorruptChunk):
            self.stream.received_at = self.client.world.loop.time()
            raise
        finally:
            self._waiting.discard(fut)
        self.stream.received_at = self.client.world.loop.time()
        return answer

    async def get(self, chunk_id: ChunkId, as_server: bool = False) -> SimData:
        data = await self.get_unverified(chunk_id, as_server)
        _sim_verify(chunk_id, data, f"peer {self.address}")
        return data

    async def get_unverified(self, chunk_id: ChunkId, as_server: bool = False) -> SimData:
        return cast(
            SimData,
            await self._call(lambda fut: self.server.serve(self, chunk_id, fut, as_server)),
        )

    async def ping(
        self, port: int | None = None, news: list[messages.News] | None = None
    ) -> dict[str, Any]:
        header = messages.ping(port, news or ())
        return cast(
            dict[str, Any], await self._call(lambda fut: self.server.pong(self, header, fut))
        )

    async def has(self, chunk_ids: list[ChunkId]) -> list[bool]:
        return [c in self.server.store.held for c in chunk_ids]


class SimNode:
    def __init__(self, world: World, index: int, cfg: NetConfig, name: str = "") -> None:
        self.world = world
        self.name = name or f"n{index:04d}"
        self.address = f"10.{index // 250}.{index % 250}.1:7070"
        self.up, self.down = Link(cfg.nic), Link(cfg.nic)
        self.alive = False
        self.side = 0
        self.slow = 1.0
        self.liar = False
        self.uploaded = 0
        self.inbound = 0
        """Connections open to this node's server (ServerLimits.max_connections caps them)."""
        self.store = SimStore(self)
        self.directory: PeerDirectory | None = None
        self.provider: ChunkProvider | None = None
        self.tg: asyncio.TaskGroup | None = None
        self.task: asyncio.Task[None] | None = None
        self.budget = asyncio.Semaphore(96)  # ServerLimits.lookups_per_daemon
        self.started = self.done_at = 0.0
        self.delivered = 0
        self.bad = 0
        self.homes: dict[ChunkId, bool] = {}
        self.homes_version = -1
        self.first_asked_dead: dict[str, float] = {}
        self.last_asked_dead: dict[str, float] = {}

    async def serve(
        self,
        conn: SimConnection,
        chunk_id: ChunkId,
        fut: asyncio.Future[Any],
        as_server: bool = False,
    ) -> None:
        world = self.world
        await asyncio.sleep(world.cfg.rtt / 2)
        if not conn.client.alive:
            return
        async with self.budget:
            assert self.provider is not None
            data, _tier = await self.provider.lookup(chunk_id, as_server)
        if data is None:
            await asyncio.sleep(world.cfg.rtt / 2)
            if not fut.done():
                fut.set_exception(ChunkMissing(chunk_id, f"peer {self.address}"))
            return
        sized = cast(SimData, data)
        size = sized.size
        if self.slow != 1.0:
            await asyncio.sleep(size / self.up.rate * (self.slow - 1))
        await world.transfer(self, conn.client, size)
        if not fut.done():
            fut.set_result(SimData(chunk_id, size, good=not self.liar))

    async def pong(
        self, conn: SimConnection, ping: dict[str, Any], fut: asyncio.Future[Any]
    ) -> None:
        assert self.directory is not None
        # Taken in before the half RTT, not after: frames on one connection arrive in
        # the order they were sent, and a get sent after this ping (a re-ask after a
        # death the ping brings news of) is looked up after its own half RTT.
        member = messages.port_field(ping) is not None
        if member:  # as PeerServer's learn -> daemon.py
            self.directory.add(conn.client.address, "gossip")
        self.directory.hear(messages.news_field(ping), member)  # as PeerServer's hear
        await asyncio.sleep(self.world.cfg.rtt / 2)
        header = messages.pong(self.name, "sim", self.directory.gossip())
        world = self.world
        if world.counting:  # (the quiet window after the pulls)
            world.pings += 1
            world.gossip_bytes[self.name] += _pong_bytes(ping) + _pong_bytes(header)
        world.loop.call_later(world.cfg.rtt / 2, _answer, fut, header)  # on its way back

    def is_home(self, chunk_id: ChunkId) -> bool:
        """``daemon.py``'s check, kept until the directory's live peers change: it ranks
        every live peer, 0.3 ms per lookup at 1,000 nodes, which was most of the wall
        time of a 1,000-node run (the decision is the same)."""
        assert self.directory is not None
        if self.homes_version != self.directory.version:
            self.homes.clear()
            self.homes_version = self.directory.version
        answer = self.homes.get(chunk_id)
        if answer is None:
            answer = self.homes[chunk_id] = self._is_home(chunk_id)
        return answer

    def _is_home(self, chunk_id: ChunkId) -> bool:
        assert self.directory is not None
        nodes = [p.node for p in self.directory.live()] + [self.name]
        where = self.world.located.get(chunk_id)
        key = placement.home_key(where) if where is not None else chunk_id
        return placement.reads_through(nodes, self.name, chunk_id, key)  # home or server


class _PullView:
    """The pull's view of the peers: its daemon's directory plus that daemon itself.

    A real pull opens its own directory over the same static list and the node's local
    daemon; sharing the daemon's one halves the simulated liveness traffic."""

    def __init__(self, node: SimNode) -> None:
        assert node.directory is not None
        self._directory = node.directory
        self._local = Peer(node.address, "local", node.name, "sim", up=True, status="up")
        self._local.conn = cast(Any, SimConnection(node, node))

    def live(self) -> list[Peer]:
        return [*self._directory.live(), self._local]

    def all(self) -> list[Peer]:  # PeerTier.sees_region
        return self._directory.all()

    @property
    def timing(self) -> Timing:
        return self._directory.timing

    async def connect(self, peer: Peer) -> Any:
        if peer is self._local:
            return peer.conn
        return await self._directory.connect(peer)

    def mark_ok(self, peer: Peer) -> None:
        if peer is not self._local:
            self._directory.mark_ok(peer)

    def mark_down(self, peer: Peer, reason: str) -> None:
        if peer is not self._local:
            self._directory.mark_down(peer, reason)


def _answer(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _pong_bytes(header: dict[str, Any]) -> int:
    """A ping's or pong's size on the wire, about (msgpack: a few bytes a field)."""
    size = 24 + len(header.get("node", "")) + len(header.get("region", ""))
    size += sum(len(a) + 1 for a in header.get("peers", ()))
    size += sum(len(n) + 1 for n in header.get("nodes", ()))
    size += sum(len(a) + len(n) + 8 for a, n, _alive, _age in header.get("news", ()))
    return size


# ---------------------------------------------------------------------- one run


@dataclass
class Result:
    scenario: Scenario
    unit: int
    unique: int
    origin: int
    uploads: list[int]
    times: list[float]
    incomplete: int
    bad: int
    dead_asked: list[float]
    moved: float | None
    convergence: float | None
    gossip_rate: float
    membership_bytes: int
    wall: float
    """Seconds of wall time, and of this process's CPU time (``cpu``), for the run."""
    hedges: int
    tier_errors: int
    asks_per_unit: float
    dead_dropped: list[float]
    """Per node: seconds from the kill until its directory had dropped every killed peer."""
    extra: dict[str, Any] = field(default_factory=dict)
    cpu: float = 0.0


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def model_set(total: int, unit: int, seed: int) -> list[ChunkRef]:
    rng = random.Random(seed)
    refs = []
    left = total
    while left > 0:
        size = min(unit, left)
        refs.append(ChunkRef(ChunkId(rng.randbytes(32).hex()), size))
        left -= size
    return refs


async def _run(
    scn: Scenario, cfg: NetConfig, refs: list[ChunkRef], args: argparse.Namespace
) -> Result:
    loop = cast(VirtualLoop, asyncio.get_running_loop())
    world = World(cfg, loop)
    for ref in refs:
        world.sizes[ref.id] = ref.size
        world.located.setdefault(ref.id, ref)
    total_nodes = scn.nodes + int(scn.nodes * scn.join_fraction)
    names = list(args.names or ()) + [""] * total_nodes
    nodes = [SimNode(world, i, cfg, names[i]) for i in range(total_nodes)]
    for n in nodes:
        world.nodes[n.name] = n
        world.by_address[n.address] = n
    first = nodes[: scn.nodes]
    joiners = nodes[scn.nodes :]
    timing = Timing(interval=args.interval, timeout=args.timeout)

    async def dial(address: str, me: Identity, handshake_timeout: float = 5.0) -> SimConnection:
        client, server = world.nodes[me.node], world.by_address.get(address)
        if server is None or not world.reachable(client, server):
            await asyncio.sleep(handshake_timeout)  # SYN unanswered
            raise PeerUnavailable(f"connect to {address} timed out")
        await asyncio.sleep(1.5 * cfg.rtt)
        if server is client:
            raise SelfConnection(address)
        if server.inbound >= args.max_connections:  # PeerServer closes it on accept
            raise PeerUnavailable(f"{address} closed the connection")
        return SimConnection(client, server)

    liveness.open_connection = dial  # type: ignore[assignment]

    rng = random.Random(args.seed)
    for liar in rng.sample(first, scn.liars):
        liar.liar = True
    for slow in rng.sample([n for n in first if not n.liar], scn.slow_homes):
        slow.slow = 10.0
    if scn.split:
        for i, n in enumerate(nodes):
            n.side = i % 2
    if scn.gossip_seed:
        seeds = {n.name: [first[0].address] for n in nodes}
    else:
        seeds = {n.name: [m.address for m in nodes] for n in nodes}

    all_started = asyncio.Event()

    async def node_main(node: SimNode, pull: bool) -> None:
        node.alive = True
        directory = PeerDirectory(Identity(node.name, "sim"), timing, args.max_gossip)
        node.directory = directory
        directory.serving_port = 7070  # as daemon.py sets it
        async with directory, asyncio.TaskGroup() as tg:
            node.tg = tg
            # As daemon.py wires it: a home reads through by block, its next-ranked peers
            # first, then the store.
            origin: Any = SimOrigin(node)
            if args.handoff:
                origin = HomeBlocks(
                    cast(Any, node.store), PeerTier(directory), origin, tg, Metrics()
                )
            node.provider = ChunkProvider(
                cast(Any, node.store), origin, node.is_home, Metrics(), tg
            )
            for address in seeds[node.name]:
                directory.add(address, "static")
            if not pull:
                await asyncio.Event().wait()
            await asyncio.sleep(scn.warmup)
            await settle(directory)
            node.started = loop.time()
            tier = PeerTier(cast(Any, _PullView(node)), replace(TierTuning(), **args.tuning))
            await pull_all(node, tier)
            node.done_at = loop.time()
            await asyncio.Event().wait()  # keeps serving

    async def settle(directory: PeerDirectory) -> None:
        # What plugin._settle_for_pull does for a static list: every peer checked once.
        try:
            async with asyncio.timeout(args.timeout + 1):
                await directory.checked.wait()
        except TimeoutError:
            pass

    async def pull_all(node: SimNode, tier: PeerTier) -> None:
        async def sink(ref: ChunkRef, data: Any) -> None:
            if not isinstance(data, SimData) or data.chunk_id != ref.id or not data.good:
                node.bad += 1
            node.delivered += ref.size
            await node.store.put(ref.id, data)

        for start in range(0, len(refs), args.window):
            window = []
            for ref in refs[start : start + args.window]:
                if node.store.contains(ref.id):  # the tier list's local source answers first
                    node.delivered += ref.size
                else:
                    window.append(ref)
            left = await tier.fetch(window, cast(Any, sink))
            for ref in left:  # the tier list's next source: the object store
                await sink(ref, await world.origin_get(node, ref.id))
        node.hedges = tier.stats["hedges"]  # type: ignore[attr-defined]
        node.errors = tier.stats["errors"]  # type: ignore[attr-defined]

    # Who asks a dead peer, and until when: wrap the tier's ask (the real one still runs).
    real_ask = PeerTier._ask
    asks = [0]

    async def watched_ask(
        self: PeerTier, peer: Peer, chunk_id: ChunkId, as_server: bool = False, early: Any = None
    ) -> Any:
        asks[0] += 1
        target = world.nodes.get(peer.node)
        dead = target is not None and not target.alive and target.done_at < 0
        if dead and peer.up and isinstance(self._directory, _PullView):  # a request is sent
            asker = cast(_PullView, self._directory)._local.node
            me = world.nodes[asker]
            me.first_asked_dead.setdefault(peer.node, loop.time())
            me.last_asked_dead[peer.node] = loop.time()
        return await real_ask(self, peer, chunk_id, as_server, early)

    PeerTier._ask = watched_ask  # type: ignore[method-assign]

    # When each node's directory drops a killed peer (the real mark_down still runs).
    real_mark_down = PeerDirectory.mark_down
    dropped: dict[tuple[str, str], float] = {}

    def watched_mark_down(
        self: PeerDirectory, peer: Peer, reason: str, spread: bool = True
    ) -> None:
        target = world.nodes.get(peer.node)
        if target is not None and target.done_at < 0 and peer.up:
            dropped.setdefault((self.me.node, peer.node), loop.time())
        real_mark_down(self, peer, reason, spread)

    PeerDirectory.mark_down = watched_mark_down  # type: ignore[method-assign]

    max_pool = [0]

    async def sample_pools() -> None:
        # The largest connection pool any directory holds, once a simulated second;
        # with --progress, where the run stands (stderr).
        unique = sum(r.size for r in refs)
        while True:
            for node in nodes:
                if node.directory is not None:
                    max_pool[0] = max(max_pool[0], len(node.directory._pool))
            if args.progress:
                share = statistics.fmean(n.delivered for n in nodes) / unique
                print(
                    f"  [{scn.key}] t={loop.time():.0f} s: delivered {share:.0%}, "
                    f"{sum(1 for n in nodes if n.done_at > 0)} done; "
                    f"wall {time.perf_counter() - wall:.0f} s, CPU {time.process_time():.0f} s, "
                    f"gc {_GC_SECONDS[0]:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
            await asyncio.sleep(1.0)

    wall = time.perf_counter()
    cpu = time.process_time()
    killed: list[SimNode] = []
    kill_time = 0.0
    async with asyncio.TaskGroup() as tg:
        sampler = tg.create_task(sample_pools())
        for i, node in enumerate(first):
            if scn.start_rate:
                await asyncio.sleep(max(0.0, i / scn.start_rate - loop.time()))
            pulls = not args.pullers or i < args.pullers
            node.task = tg.create_task(node_main(node, pulls))
            if not pulls:
                node.done_at = math.inf  # serves only
        all_started.set()
        if scn.kill_fraction or scn.join_fraction:
            goal = scn.churn_at * len(refs) and scn.churn_at * sum(r.size for r in refs)
            await world.until(lambda: statistics.fmean(n.delivered for n in first) >= goal)
            kill_time = loop.time()
            killed = rng.sample(first[1:], int(scn.nodes * scn.kill_fraction))
            for node in killed:
                node.alive = False
                node.done_at = -1.0
                assert node.task is not None
                node.task.cancel()
            for node in joiners:
                node.task = tg.create_task(node_main(node, True))
        pullers = [n for n in nodes if n not in killed]
        serving = pullers
        deadline = loop.time() + args.max_time
        await world.until(lambda: all(n.done_at > 0 for n in pullers), deadline)
        convergence = None
        if scn.gossip_seed:
            # Converged: every node sees every other one (up to the gossip cap); given
            # 30 simulated seconds after the pulls at most.
            target = min(len(pullers) - 1, args.max_gossip)

            def converged() -> bool:
                return all(n.directory and len(n.directory.live()) >= target for n in pullers)

            await world.until(converged, min(deadline, loop.time() + 30.0))
            if converged():
                convergence = loop.time()
        # Gossip rate: pong bytes over a quiet 5 s window after the pulls.
        world.gossip_bytes.clear()
        world.pings = 0
        world.counting = True
        quiet_from = loop.time()
        await asyncio.sleep(5.0)
        world.counting = False
        quiet = loop.time() - quiet_from
        gossip_rate = sum(world.gossip_bytes.values()) / len(pullers) / quiet
        ping_rate = world.pings / len(pullers) / quiet
        membership = _membership_bytes(pullers)
        sampler.cancel()
        for node in nodes:
            if node.task is not None:
                node.task.cancel()
    PeerDirectory.mark_down = real_mark_down  # type: ignore[method-assign]
    unique = sum(r.size for r in refs)
    by_node: dict[str, float] = {}
    for (me, _dead), at in dropped.items():
        by_node[me] = max(by_node.get(me, 0.0), at - kill_time)
    dead_asked = [
        max(n.last_asked_dead.values()) - kill_time for n in pullers if n.last_asked_dead
    ] + [0.0] * sum(1 for n in pullers if not n.last_asked_dead and killed)
    return Result(
        scenario=scn,
        unit=refs[0].size,
        unique=unique,
        origin=sum(world.sizes[c] * k for c, k in world.origin_reads.items()),
        uploads=[n.uploaded for n in serving],
        times=[n.done_at - n.started for n in pullers if 0 < n.done_at < math.inf],
        incomplete=sum(1 for n in pullers if n.done_at <= 0),
        bad=sum(n.bad for n in pullers),
        dead_asked=dead_asked,
        moved=None,
        convergence=None if convergence is None else convergence,
        gossip_rate=gossip_rate,
        membership_bytes=membership,
        wall=time.perf_counter() - wall,
        cpu=time.process_time() - cpu,
        hedges=sum(getattr(n, "hedges", 0) for n in pullers),
        tier_errors=sum(getattr(n, "errors", 0) for n in pullers),
        asks_per_unit=asks[0] / (len(refs) * len(pullers)),
        dead_dropped=list(by_node.values()),
        extra={"max_pool": max_pool[0], "pings_per_node_s": ping_rate},
    )


def _membership_bytes(nodes: list[SimNode]) -> int:
    """The largest directory's membership state: its peer table, each ``Peer`` and the
    strings it holds, and the shunned list (connections are the transport's, not counted)."""
    worst = 0
    for node in nodes:
        directory = node.directory
        if directory is None:
            continue
        table = directory._peers
        size = sys.getsizeof(table) + sys.getsizeof(directory._shunned)
        for address, peer in table.items():
            size += sys.getsizeof(address) + sys.getsizeof(peer)
            size += sys.getsizeof(peer.node) + sys.getsizeof(peer.status) + 3 * 24
        worst = max(worst, size)
    return worst


# ---------------------------------------------------------------------- placement, real chunk sizes


def placement_figures(nodes: int, chunks: int, seed: int, block: int = 1) -> dict[str, float]:
    """Home balance and homes moved by one node leaving, with real ``placement`` over
    ``chunks`` real-sized (~1 MiB) chunk ids among ``nodes`` nodes, placed ``block``
    chunks at a time (1: by chunk id; 32: by 32 MiB pack block, placement.home_key).

    ``moved_times_n``: the fraction of chunk homes that move when a node leaves, times
    N, averaged over every node leaving -- each node leaving moves its own homes and
    no others (checked by re-ranking without it, for ``checked`` nodes: three random
    ones and the busiest), so the average is exactly 1/N; ``moved_worst_times_n``:
    the same for the busiest home, the worst node to lose."""
    rng = random.Random(seed)
    names = [f"n{i:04d}" for i in range(nodes)]
    keys = [placement.chunk_key(rng.randbytes(32).hex()) for _ in range(-(-chunks // block))]
    weights = [min(block, chunks - i * block) for i in range(len(keys))]
    ranking = placement.ranking(tuple(names))
    homes = [ranking.top(key, 1)[0] for key in keys]
    load: Counter[str] = Counter()
    for home, weight in zip(homes, weights, strict=True):
        load[home] += weight
    busiest = max(names, key=lambda n: load[n])
    moved: dict[str, int] = {}
    for gone in [*rng.sample(names, 3), busiest]:
        rest = placement.ranking(tuple(n for n in names if n != gone))
        moved[gone] = sum(
            weight
            for key, home, weight in zip(keys, homes, weights, strict=True)
            if rest.top(key, 1)[0] != home
        )
        assert moved[gone] == load[gone], "a node leaving moved homes it did not hold"
    return {
        "home_max_mean": load[busiest] / (chunks / nodes),
        "moved_times_n": statistics.fmean(load[n] for n in names) / chunks * nodes,
        "moved_random_times_n": statistics.fmean(moved[n] for n in moved) / chunks * nodes,
        "moved_worst_times_n": moved[busiest] / chunks * nodes,
    }


def upload_figures(
    nodes: int, chunks: int, seed: int, spread: int = placement.SPREAD, block: int = 32
) -> dict[str, float]:
    """Peer upload max/mean when all ``nodes`` pull ``chunks`` ~1 MiB chunks at once
    (scenario a), at real granularity, with the real ``placement``: each block of
    ``block`` chunks (HOME_BLOCK / 1 MiB) has one home, which uploads each chunk to
    the chunk's servers (placement.servers); each node takes each chunk from the
    server its salt picks (placement.pick, as PeerTier orders). Without servers
    (``spread`` 1, or a region too small) the home uploads each chunk to every node."""
    rng = random.Random(seed)
    names = [f"n{i:04d}" for i in range(nodes)]
    salts = [rng.getrandbits(64) for _ in names]
    load: Counter[str] = Counter()
    for start in range(0, chunks, block):
        home = placement.home(names, rng.randbytes(8).hex())
        assert home is not None
        for _ in range(min(block, chunks - start)):
            chunk = rng.randbytes(32).hex()
            if not placement.spreads(nodes, spread):
                load[home] += nodes
                continue
            servers = placement.servers(names, chunk, spread)
            load[home] += sum(1 for s in servers if s != home)
            picked = Counter(placement.pick(salt, chunk, len(servers)) for salt in salts)
            for index, count in picked.items():
                load[servers[index]] += count
    values = [load[n] for n in names]
    return {"upload_max_mean": max(values) / statistics.fmean(values)}


# ---------------------------------------------------------------------- report


def _converged(r: Result) -> str:
    """When every node's directory saw the region (gossip scenario only)."""
    if not r.scenario.gossip_seed:
        return "-"
    return "never" if r.convergence is None else f"{r.convergence:.1f}"


def _fmt(values: list[float]) -> str:
    return f"{_pct(values, 0.99):.1f}" if values else "-"


def table(results: list[Result]) -> str:
    head = (
        "| scenario | nodes | origin/unique | upload max/mean | p50 s | p99 s | max s "
        "| incomplete | bad bytes | dead asked p99 s | dead dropped p99 s "
        "| converged s | gossip B/node/s | membership B "
        "| asks/unit | hedges | wall s | CPU s |"
    )
    lines = [head, "|" + "---|" * 18]
    for r in results:
        up = [u for u in r.uploads]
        mean = statistics.fmean(up) or 1
        lines.append(
            f"| {r.scenario.key}: {r.scenario.title} | {len(r.uploads)} "
            f"| {r.origin / r.unique:.3f} | "
            f"{max(up) / mean:.2f} | {_pct(r.times, 0.5):.1f} | {_pct(r.times, 0.99):.1f} | "
            f"{max(r.times, default=float('nan')):.1f} | {r.incomplete} | {r.bad} | "
            f"{_fmt(r.dead_asked)} | {_fmt(r.dead_dropped)} | {_converged(r)} "
            f"| {r.gossip_rate:.0f} | "
            f"{r.membership_bytes} | {r.asks_per_unit:.2f} | {r.hedges} | {r.wall:.0f} "
            f"| {r.cpu:.0f} |"
        )
    return "\n".join(lines)


SCENARIOS: dict[str, Callable[[int], Scenario]] = {
    "a": lambda n: Scenario("a", "all start at once", n),
    "b": lambda n: Scenario("b", "rolling start 50/s", n, start_rate=50.0),
    "c": lambda n: Scenario("c", "10% killed, 10% join", n, kill_fraction=0.1, join_fraction=0.1),
    "d": lambda n: Scenario(
        "d", "slow homes (1/10) + liars", n, slow_homes=max(1, n // 100), liars=max(1, n // 100)
    ),
    "e": lambda n: Scenario("e", "split in two halves", n, split=True),
    "f": lambda n: Scenario(
        "f",
        "one seed, gossip, 5% churn, pulls 10 s after start",
        n,
        gossip_seed=True,
        kill_fraction=0.05,
        join_fraction=0.05,
        warmup=10.0,
    ),
}


def simulate(
    scn: Scenario, refs: list[ChunkRef], net: NetConfig | None = None, **overrides: Any
) -> Result:
    """Run ``scn`` over ``refs`` on a fresh virtual-clock loop; ``overrides`` set the
    command line's options by their dest names (``names``: node ids to use)."""
    args = _parser().parse_args([])
    args.names = None
    for key, value in overrides.items():
        setattr(args, key, value)
    _finish_args(args)
    random.seed(args.seed)  # pong samples: the same run twice (set order still varies)
    loop = VirtualLoop()
    fake_time = _virtual_time_module(loop)
    saved = liveness.time, peertier.time, liveness.open_connection, PeerTier._ask
    saved_checks = peertier.verify, peertier.verify_off_loop
    # The tier checks what peers send (SimData: its ``good`` flag, no BLAKE3, no thread).
    peertier.verify, peertier.verify_off_loop = _sim_verify, _sim_verify_off_loop  # type: ignore[assignment]
    liveness.time = fake_time  # type: ignore[attr-defined]
    peertier.time = fake_time  # type: ignore[attr-defined]
    # One cached ranking per daemon's view (a daemon keeps 8: one region, one view).
    saved_ranking = placement.ranking
    placement.ranking = functools.lru_cache(maxsize=4096)(placement.ranking.__wrapped__)  # type: ignore[misc]
    thresholds = gc.get_threshold()
    if not os.environ.get("SIM_GC_DEFAULT"):
        # The cyclic collector's full passes over ~10^7 live objects (1,000 directories,
        # their peers and tasks) took ~80% of a 1,000-node run's CPU (py-spy: samples
        # in allocations, Timeout.__init__ and asyncio.wait's set); young passes are
        # enough for the run's short-lived cycles.
        gc.collect()
        gc.freeze()
        gc.set_threshold(
            *(int(x) for x in os.environ.get("SIM_GC", "1000000,1000,1000").split(","))
        )
    if args.progress:
        gc.callbacks.append(_gc_timer)
    try:
        return loop.run_until_complete(_run(scn, net or NetConfig(), refs, args))
    finally:
        placement.ranking = saved_ranking  # type: ignore[misc]
        gc.set_threshold(*thresholds)
        gc.unfreeze()
        if _gc_timer in gc.callbacks:
            gc.callbacks.remove(_gc_timer)
        liveness.time, peertier.time, liveness.open_connection, PeerTier._ask = saved  # type: ignore[misc]
        peertier.verify, peertier.verify_off_loop = saved_checks
        loop.close()


_GC_SECONDS = [0.0, 0.0]
"""CPU seconds in the cyclic collector so far, and when the current pass started."""


def _gc_timer(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _GC_SECONDS[1] = time.process_time()
    else:
        _GC_SECONDS[0] += time.process_time() - _GC_SECONDS[1]


def _finish_args(args: argparse.Namespace) -> None:
    args.tuning = {}
    if args.peers_per_chunk:
        args.tuning["peers_per_chunk"] = args.peers_per_chunk
    if args.spread:
        args.tuning["spread"] = args.spread


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--size", default="20G")
    ap.add_argument("--unit", default="64M")
    ap.add_argument("--scenario", default="a", help="letters among abcdef, e.g. 'ac'")
    ap.add_argument("--window", type=int, default=64, help="refs per PeerTier.fetch call")
    ap.add_argument("--interval", type=float, default=1.0, help="liveness ping interval, s")
    ap.add_argument("--timeout", type=float, default=3.0, help="liveness timeout, s")
    ap.add_argument("--max-gossip", type=int, default=liveness.MAX_GOSSIP_PEERS)
    ap.add_argument("--max-time", type=float, default=900.0, help="simulated seconds")
    ap.add_argument(
        "--max-connections",
        type=int,
        default=ServerLimits().max_connections,
        help="connections a daemon accepts (ServerLimits.max_connections)",
    )
    ap.add_argument(
        "--no-handoff",
        dest="handoff",
        action="store_false",
        help="homes read through from the store only, chunk by chunk (before HomeBlocks)",
    )
    ap.add_argument("--pullers", type=int, default=0, help="nodes that pull (0: all)")
    ap.add_argument("--progress", action="store_true", help="a line per simulated second (stderr)")
    ap.add_argument("--placement-chunks", type=int, default=20480)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--spread", type=int, default=0, help="TierTuning.spread, servers per chunk (0: default)"
    )
    ap.add_argument(
        "--peers-per-chunk", type=int, default=0, help="TierTuning.peers_per_chunk (0: default)"
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    refs = model_set(parse_size(args.size), parse_size(args.unit), args.seed)
    results = []
    for key in args.scenario:
        scn = SCENARIOS[key](args.nodes)
        options = {k: v for k, v in vars(args).items() if k not in ("scenario", "nodes")}
        result = simulate(scn, refs, **options)
        results.append(result)
        print(table([result]), flush=True)
    print()
    print(table(results))
    for block in (1, placement.HOME_BLOCK >> 20):
        figures = placement_figures(args.nodes, args.placement_chunks, args.seed, block)
        print(
            f"placement at ~1 MiB granularity ({args.placement_chunks} chunks, {args.nodes} "
            f"nodes, {block} chunk(s) per home key): home bytes max/mean "
            f"{figures['home_max_mean']:.2f}; one node leaving moves, times N: "
            f"{figures['moved_times_n']:.2f} on average over nodes (ideal 1), "
            f"{figures['moved_worst_times_n']:.2f} for the busiest home"
        )
    for spread in (1, placement.SPREAD):
        upload = upload_figures(args.nodes, args.placement_chunks, args.seed, spread)
        print(
            f"peer upload max/mean at ~1 MiB granularity, all nodes pulling at once, "
            f"{spread} server(s) per chunk: {upload['upload_max_mean']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
