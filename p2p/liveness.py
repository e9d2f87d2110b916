"""The peers a node knows, whether each is alive, and a bounded pool of connections.

Liveness comes from our own checks, never from mDNS TTLs (which keep a crashed
peer listed for ~19 minutes), and its cost per daemon is bounded whatever the
region's size (SWIM-style, bench/sim_region.py and docs/scale.md):

- a peer with requests outstanding is pinged when quiet for ``interval``, and a
  failed request or a broken connection marks it down at once: a peer this node
  uses is dropped within ``interval`` + ``timeout`` of dying;
- idle peers are probed round-robin, ``probes_per_interval`` of them per interval
  (at 1,000 nodes a full mesh of checks was 1,000 directories x 1,000 peers);
- first checks of new peers and retries of down ones (exponential backoff) take at
  most ``checks_per_second``;
- connections are opened on demand (``connect``) and at most ``max_connections``
  are kept, the least recently used idle one closed first.

Membership comes from a static list, mDNS, the node's own daemon, and gossip: every
pong lists a sample of the live peers its sender sees (with their node ids: taken
as alive without a check of our own) and recent news -- peers seen first-hand to go
down or come up, with how long ago. News spreads by riding on pings and pongs, and
is applied only when fresher than this node's own evidence (a peer we heard from
after it was reported dead stays up) -- except a pull's news of a death (a pull
is not a member: its ping names no serving port), which only makes this node check
the peer at once: a request timing out at a busy peer is not a death.
So one reachable daemon is enough to find the whole region, a death seen by one node
reaches the others within a few probe rounds, and a gossiped peer that keeps failing
is forgotten again.

Gossip is hearsay, so it is bounded: at most ``max_gossip_peers`` gossiped peers
are kept (first-hand ones -- static, mDNS, local -- are never displaced by them;
addresses named once the table is full are ignored), a gossiped peer that fails
before it ever answered is forgotten at its first failure (and one that answered
once, after ``forget_after`` failures), and a gossiped peer excluded as foreign
or refusing is forgotten too -- and not taken from gossip again for ``backoff_max``
(a bounded list), so a misconfigured neighbour is not re-dialled at every pong.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Self

from anyio import AsyncContextManagerMixin

from blobstore.errors import (
    AuthError,
    PeerBusy,
    PeerUnavailable,
    ProtocolError,
    SelfConnection,
    WrongRegion,
)

from . import messages
from .client import Identity, PeerConnection, open_connection

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Timing:
    interval: float = 1.0
    """Ping a peer with requests outstanding that has been quiet this long."""
    timeout: float = 3.0
    """Connect/handshake/ping deadline."""
    backoff_min: float = 0.25
    backoff_max: float = 30.0
    forget_after: int = 5
    """Failed checks in a row after which a gossiped peer that once answered is dropped."""
    checks_per_second: float = 100.0
    """First checks of new peers and retries of down ones, per second at most."""
    probes_per_interval: float = 8.0
    """Idle live peers probed per ``interval``, round-robin: the cost of liveness per
    daemon whatever the region's size (8 pings a second; it was up to 100, and every
    peer every second before that). A death is usually seen first by a node that was
    asking the peer, and reaches the others as news on pongs."""
    news_ttl: float = 10.0
    """Seconds a piece of news (a peer gone down or come up) rides on pongs."""


MAX_GOSSIP_PEERS = 2048
"""Default cap on the peers a directory keeps from gossip alone: above a region's size
(a cap below it, 256 before, left each node of a 1,000-node gossip-only region with a
different quarter of the peers, so nodes disagreed on homes), still a bound (~1 MiB)."""
MAX_CONNECTIONS = 64
"""Default number of peer connections a directory keeps open (idle ones beyond it are
closed, least recently used first). One to every live peer was a million connections
in a region of 1,000 (bench/sim_region.py)."""
PUSH_TO = 16
"""Peers a directory passes a death it saw itself on to at once (its most recently used)."""
MAX_NEWS = 64
"""News a directory keeps to pass on, at most (the oldest is dropped first)."""
_EXCLUDED = ("self", "foreign", "refused")


@dataclass(slots=True, eq=False)
class Peer:
    address: str
    source: str
    """"static", "mdns", "local" (this node's daemon) or "gossip" (named by a peer)."""
    node: str = ""
    region: str = ""
    up: bool = False
    status: str = "new"
    failures: int = 0
    retry_at: float = 0.0
    last_ok: float = 0.0
    last_failed: float = 0.0
    verified: bool = False
    """It answered a check at least once."""
    conn: PeerConnection | None = field(default=None, repr=False)

    def describe(self) -> dict[str, object]:
        return {
            "address": self.address,
            "node": self.node,
            "region": self.region,
            "up": self.up,
            "status": self.status,
            "source": self.source,
        }


@dataclass(slots=True)
class _News:
    node: str
    alive: bool
    at: float
    """When it was seen first-hand, on this node's clock."""


class PeerDirectory(AsyncContextManagerMixin):
    """Known peers and their liveness. Use as an async context manager."""

    def __init__(
        self,
        me: Identity,
        timing: Timing | None = None,
        max_gossip_peers: int = MAX_GOSSIP_PEERS,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.me = me
        self.timing = timing or Timing()
        self.max_gossip_peers = max_gossip_peers
        self.max_connections = max_connections
        self._peers: dict[str, Peer] = {}
        self._gossiped = 0
        """How many of ``_peers`` are known from gossip alone."""
        self._gossip_full_logged = False
        self._shunned: dict[str, float] = {}
        """Gossiped addresses excluded lately (foreign, refusing): not re-added until then."""
        self._not_up: dict[Peer, None] = {}
        """Peers that are not up (new, down, excluded): the ones first checks and retries
        look at, so a round of the monitor costs what is due, not the region's size."""
        self._live: list[Peer] | None = None
        """``live()``, until a peer's state changes."""
        self.version = 0
        """Changes whenever ``live()`` may have: what is derived from it (a home check
        over the live peers) can be kept until then."""
        self._pool: dict[Peer, None] = {}
        """Peers with an open connection, least recently used first."""
        self._dials: dict[Peer, asyncio.Future[PeerConnection | Exception]] = {}
        """Dials under way (run by the first task that asked), by peer."""
        self._rotation: list[Peer] = []
        self._rotation_at = 0
        self._news: dict[str, _News] = {}
        self._wake = asyncio.Event()
        self.serving_port: int | None = None
        """The port this node's daemon serves on (a daemon's directory): pings name it,
        so the peers it checks learn it (messages.ping)."""
        self._checking: dict[Peer, asyncio.Task[None]] = {}
        """Checks under way, by peer."""
        self._check_started: dict[Peer, float] = {}
        self._tg: asyncio.TaskGroup | None = None
        self.checked = asyncio.Event()
        """Set once no known peer is new: each was checked, or named alive by a peer."""
        self.peer_up = asyncio.Event()
        """Set once any peer has come up."""

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncIterator[Self]:
        """Checks and connection readers run in a task group held for the block (a
        bug in one cancels the block and is raised); the block's own error is raised
        as it is, once they have stopped."""
        raised: BaseException | None = None
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            monitor = tg.create_task(self._monitor_loop())
            try:
                yield self
            except BaseException as exc:
                raised = exc
            finally:
                monitor.cancel()
                for task in self._checking.values():
                    task.cancel()
                for peer in self._peers.values():
                    self._drop_connection(peer)  # ends its reader
                self._tg = None
        if raised is not None:
            raise raised

    # ------------------------------------------------------------------ membership

    def add(self, address: str, source: str, node: str = "", region: str = "") -> None:
        peer = self._peers.get(address)
        if peer is None:
            if source == "gossip":
                if self._shunned.get(address, 0.0) > time.monotonic():
                    return
                if self._gossiped >= self.max_gossip_peers:
                    if not self._gossip_full_logged:
                        self._gossip_full_logged = True
                        log.warning(
                            "keeping no more than %d peers learned from gossip",
                            self.max_gossip_peers,
                        )
                    return
                self._gossiped += 1
            peer = self._peers[address] = Peer(address, source, node, region)
            self._not_up[peer] = None
            self._wake.set()
            self.checked.clear()
        else:
            if peer.source == "gossip" and source != "gossip":
                peer.source = source  # heard first-hand now: no longer forgettable
                self._gossiped -= 1
            if peer.status in ("new", "down", "busy"):
                # Re-announced (a pinger names itself, mDNS again): worth trying now. A
                # check under way for a while began before this news -- a dial to a node
                # still starting hangs for ``timeout`` -- so it is called off for a fresh one.
                since = self._check_started.get(peer)
                if since is not None and time.monotonic() - since >= self.timing.interval / 2:
                    self._call_off(peer)
                peer.retry_at = 0.0
                self._wake.set()

    def remove(self, address: str) -> None:
        peer = self._peers.pop(address, None)
        if peer is not None:
            if peer.source == "gossip":
                self._gossiped -= 1
            self._drop_connection(peer)
            self._not_up.pop(peer, None)
            self._changed()
            log.info("peer %s (%s) left", peer.node or "?", address)

    def all(self) -> list[Peer]:
        return list(self._peers.values())

    def live(self) -> list[Peer]:
        """Peers that are up, in our region, and not us (one entry per node)."""
        if self._live is None:
            by_node: dict[str, Peer] = {}
            for p in self._peers.values():
                if p.up:
                    by_node.setdefault(p.node, p)
            self._live = list(by_node.values())
        return list(self._live)

    def gossip(self) -> messages.Gossip:
        """What this node's pongs say: a sample of its live peers and recent news."""
        live = self._live if self._live is not None else self.live()
        sample = (
            live
            if len(live) <= messages.GOSSIP_SAMPLE
            else random.sample(live, messages.GOSSIP_SAMPLE)
        )
        return messages.Gossip([(p.address, p.node) for p in sample], self._fresh_news())

    def connection(self, peer: Peer) -> PeerConnection:
        """The peer's open connection. Raises PeerUnavailable if there is none."""
        conn = peer.conn
        if not peer.up or conn is None or conn.closed:
            raise PeerUnavailable(f"peer {peer.address} is down")
        return conn

    async def connect(self, peer: Peer) -> PeerConnection:
        """A connection to a live ``peer``, opened if the pool has none (the caller marks
        the peer down when this fails). Raises PeerUnavailable."""
        if not peer.up:
            raise PeerUnavailable(f"peer {peer.address} is down")
        try:
            async with asyncio.timeout(self.timing.timeout):
                return await self._open(peer)
        except SelfConnection as exc:
            self._exclude(peer, "self", "it is this node")
            raise PeerUnavailable(f"peer {peer.address} is this node") from exc
        except WrongRegion as exc:
            self._exclude(peer, "foreign", str(exc))
            raise PeerUnavailable(str(exc)) from exc
        except AuthError as exc:
            self._exclude(peer, "refused", str(exc))
            raise PeerUnavailable(str(exc)) from exc
        except (ProtocolError, TimeoutError, OSError) as exc:
            raise PeerUnavailable(f"peer {peer.address}: {exc or type(exc).__name__}") from exc

    # ------------------------------------------------------------------ state changes

    def mark_ok(self, peer: Peer) -> None:
        peer.last_ok = time.monotonic()

    def mark_down(self, peer: Peer, reason: str, spread: bool = True) -> None:
        """``spread``: pass the death on as news (not when it is news we were told)."""
        if self._peers.get(peer.address) is not peer:
            return  # forgotten meanwhile
        now = time.monotonic()
        if peer.up:
            log.warning("peer %s (%s) is down: %s", peer.node, peer.address, reason)
            if spread and peer.node:
                self._remember(peer.address, _News(peer.node, False, now))
                self._drop_connection(peer)  # (not among those pushed to)
                self._push()
        self._set_up(peer, False)
        peer.status = "down"
        peer.failures += 1
        peer.last_failed = now
        if peer.source == "gossip" and (
            not peer.verified or peer.failures >= self.timing.forget_after
        ):
            self.remove(peer.address)  # whoever named it will name it again if it returns
            return
        delay = min(self.timing.backoff_max, self.timing.backoff_min * 2 ** (peer.failures - 1))
        peer.retry_at = now + delay
        self._drop_connection(peer)

    def _exclude(self, peer: Peer, status: str, reason: str) -> None:
        if peer.source == "gossip" and status != "self":
            log.info("forgetting gossiped peer %s: %s", peer.address, reason)
            self.remove(peer.address)  # hearsay that does not hold costs no room
            if len(self._shunned) >= self.max_gossip_peers:
                del self._shunned[next(iter(self._shunned))]  # the oldest
            self._shunned[peer.address] = time.monotonic() + self.timing.backoff_max
            return
        if peer.status != status:
            level = logging.DEBUG if status == "self" else logging.WARNING
            log.log(level, "ignoring peer %s: %s", peer.address, reason)
        self._set_up(peer, False)
        peer.status = status
        peer.retry_at = time.monotonic() + self.timing.backoff_max
        self._drop_connection(peer)

    def _set_up(self, peer: Peer, up: bool) -> None:
        if peer.up != up:
            peer.up = up
            self._changed()
            if up:
                self._not_up.pop(peer, None)
            elif self._peers.get(peer.address) is peer:
                self._not_up[peer] = None

    def _changed(self) -> None:
        """The live peers may have changed."""
        self._live = None
        self.version += 1

    def _drop_connection(self, peer: Peer) -> None:
        self._pool.pop(peer, None)
        if peer.conn is not None:
            peer.conn.stream.abort()
            peer.conn = None

    # ------------------------------------------------------------------ news

    def _remember(self, address: str, news: _News) -> None:
        known = self._news.pop(address, None)
        if known is not None and known.at > news.at:
            news = known
        if len(self._news) >= MAX_NEWS:
            del self._news[next(iter(self._news))]  # the oldest
        self._news[address] = news

    def _fresh_news(self) -> list[messages.News]:
        """The news to pass on, with its age."""
        if not self._news:
            return []
        now = time.monotonic()
        self._expire_news(now)
        return [
            messages.News(address, n.node, n.alive, now - n.at) for address, n in self._news.items()
        ]

    def _push(self) -> None:
        """Pass fresh news at once to the peers this node talks to most lately (with a
        check each: pings carry news). A requester that saw a peer die asks that peer's
        chunks of the next-ranked peers right away; this ping reaches them first, on
        the same connection, so they know they are home now (without it, each answered
        'missing' and the chunk went to the store from every requester; sim scenario c)."""
        if self._tg is None:
            return
        for peer in list(self._pool)[-PUSH_TO:]:
            if peer.up and peer not in self._checking:
                self._start_check(peer)

    def _expire_news(self, now: float) -> None:
        while self._news:
            address, news = next(iter(self._news.items()))
            if now - news.at < self.timing.news_ttl:
                break
            del self._news[address]

    def _call_off(self, peer: Peer) -> None:
        """Cancel the check and dial of a peer that is not up (news made them stale)."""
        for pending in (self._checking.get(peer), self._dials.get(peer)):
            if pending is not None:
                pending.cancel()

    def _heard_up(self, peer: Peer, node: str, at: float = 0.0) -> None:
        """A peer another daemon sees alive (``at``: when, if the news says): up, without
        a check of our own. A check or dial of it under way began before this news (it
        was not up): it is called off, so a dial that began while the peer was still
        starting (a timeout later) neither holds its first requests nor marks it down."""
        self._call_off(peer)
        peer.last_ok = max(peer.last_ok, at)
        if peer.node != node:
            peer.node = node
            self._changed()
        peer.status = "up"
        peer.retry_at = 0.0
        self._set_up(peer, True)
        self.peer_up.set()

    def hear(self, news: list[messages.News], member: bool = True) -> None:
        """Take in the news a ping brought (PeerServer's ``hear``); ``member``: the
        pinger serves (a daemon), not a pull."""
        self._take_in([], news, member)

    def _take_in(
        self, members: list[tuple[str, str]], news: list[messages.News], member: bool = True
    ) -> None:
        """Take in a pong's sample of live peers and its news (``member``: from a daemon:
        pongs always are)."""
        for address, node in members:
            if node == self.me.node:
                continue
            peer = self._peers.get(address)
            if peer is None:
                self.add(address, "gossip", node)
                peer = self._peers.get(address)
                if peer is not None and node:
                    self._heard_up(peer, node)
            elif peer.status == "new" and node:
                self._heard_up(peer, node)  # (a down one waits for its retry or news)
        now = time.monotonic()
        for item in news:
            at = now - item.age
            if item.node == self.me.node or now - at >= self.timing.news_ttl:
                continue
            peer = self._peers.get(item.address)
            if item.alive:
                if peer is None:
                    self.add(item.address, "gossip", item.node)
                    peer = self._peers.get(item.address)
                    if peer is None:
                        continue
                if not peer.up and peer.status in ("new", "down", "busy") and at > peer.last_failed:
                    self._heard_up(peer, item.node, at)
                    self._remember(item.address, _News(item.node, True, at))
            elif peer is not None and peer.up and peer.node == item.node and at > peer.last_ok:
                if member:
                    self.mark_down(peer, "reported down by a peer", spread=False)
                    peer.last_failed = at  # (when it was seen down, for fresher news to win)
                    self._remember(item.address, _News(item.node, False, at))
                else:
                    self._suspect(peer)

    def _suspect(self, peer: Peer) -> None:
        """A pull's news that a live peer died: check it at once (SWIM's suspicion);
        only our own failed check marks it down and passes it on. A pull marks a peer
        down when one of its requests fails or times out, which a loaded box or a busy
        home makes happen to live peers; taken on trust, one pull had every daemon it
        pinged drop that home and move its blocks, which then read the store (the
        flaky tests/p2p/test_region.py: origin 1.7x). A daemon's news stays news:
        its deaths come from its own checks (pongs go ahead of queued answers, and a
        peer still delivering is busy, not dead), and waiting for every node's own
        check put a killed peer's last ask at 9.1 s p99 in a 1,000-node region
        (bench/sim_region.py scenario c; 5 s is the bound)."""
        if self._tg is not None and peer not in self._checking:
            self._start_check(peer)

    # ------------------------------------------------------------------ checking

    async def _monitor_loop(self) -> None:
        timing = self.timing
        tick = timing.interval / 4
        probe_credit = 0.0
        check_credit = max(1.0, timing.checks_per_second * tick)  # the first round at once
        last = time.monotonic()
        while True:
            now = time.monotonic()
            elapsed, last = now - last, now
            probe_credit = min(
                timing.probes_per_interval,
                probe_credit + elapsed * timing.probes_per_interval / timing.interval,
            )
            check_credit = min(
                max(1.0, timing.checks_per_second * tick),
                check_credit + elapsed * timing.checks_per_second,
            )
            # Peers in use: a request outstanding and nothing heard for an interval.
            for peer in list(self._pool):
                conn = peer.conn
                if (
                    peer.up
                    and conn is not None
                    and conn.pending
                    and now - max(peer.last_ok, conn.stream.received_at) >= timing.interval
                    and peer not in self._checking
                ):
                    self._start_check(peer)
            # New peers and down ones whose backoff is over, at a bounded rate.
            if self._not_up and check_credit >= 1:
                due = [p for p in self._not_up if now >= p.retry_at and p not in self._checking]
                # New peers in random order: every node has the same static list, and
                # checking it in list order, each learnt from its pongs only what it had
                # checked itself (the same first peers as everyone); retries oldest first.
                random.shuffle(due)
                due.sort(key=lambda p: p.retry_at)
                for peer in due[: int(check_credit)]:
                    self._start_check(peer)
                    check_credit -= 1
            # Idle live peers, a few an interval, round-robin over a shuffled list.
            while probe_credit >= 1:
                idle = self._next_to_probe()
                if idle is None:
                    break
                probe_credit -= 1
                if idle not in self._checking and now - idle.last_ok >= timing.interval:
                    self._start_check(idle)
            if not any(p.status == "new" for p in self._not_up):
                self.checked.set()
            self._wake.clear()
            try:
                async with asyncio.timeout(tick):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _next_to_probe(self) -> Peer | None:
        """The next live peer in a shuffled round (a new round once one is through)."""
        for _ in range(2):
            while self._rotation_at < len(self._rotation):
                peer = self._rotation[self._rotation_at]
                self._rotation_at += 1
                if peer.up:
                    return peer
            self._rotation, self._rotation_at = self.live(), 0
            random.shuffle(self._rotation)
        return None

    def _start_check(self, peer: Peer) -> None:
        # Each check runs on its own: one peer that died silently holds up only its
        # own check for ``timeout``, not the checks of every other peer (waiting for
        # the whole round dropped peers killed together one round after another:
        # 6.2 s instead of interval + timeout, bench/sim_region.py scenario c).
        assert self._tg is not None
        task = self._tg.create_task(self._check(peer))
        self._checking[peer] = task
        self._check_started[peer] = time.monotonic()
        task.add_done_callback(functools.partial(self._checked, peer))

    def _checked(self, peer: Peer, _task: asyncio.Task[None]) -> None:
        del self._checking[peer]
        del self._check_started[peer]
        if not self.checked.is_set():
            self._wake.set()  # (settling: ``checked`` at once; later, the next round will do)

    async def _check(self, peer: Peer) -> None:
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timing.timeout):
                conn = await self._open(peer)
                pong = await conn.ping(self.serving_port, self._fresh_news())
        except TimeoutError as exc:
            # Answers still arriving: the pong waits behind them in the socket buffers
            # (MBs on a slow reader), the peer is busy, not dead (bench_region.py).
            busy = peer.conn is not None and peer.conn.stream.received_at > started
            if not busy:
                self.mark_down(peer, str(exc) or type(exc).__name__)
            return
        except SelfConnection:
            self._exclude(peer, "self", "it is this node")
            return
        except WrongRegion as exc:
            peer.node, peer.region = exc.node, exc.region
            self._exclude(peer, "foreign", str(exc))
            return
        except AuthError as exc:
            self._exclude(peer, "refused", str(exc))
            return
        except PeerBusy:
            # It answered: alive, at its connection cap. Not down and no news of a
            # death; a peer not yet up is "busy" (settled, like a down one, for
            # ``checked``) and tried again after the shortest backoff.
            if not peer.up:
                peer.status = "busy"
                peer.retry_at = time.monotonic() + self.timing.backoff_min
            return
        except (PeerUnavailable, ProtocolError, OSError) as exc:
            self.mark_down(peer, str(exc) or type(exc).__name__)
            return
        except Exception as exc:  # a bug in one check must not stop liveness for all
            log.exception("checking peer %s failed", peer.address)
            self.mark_down(peer, type(exc).__name__)
            return
        if pong.get("node") == self.me.node:
            self._exclude(peer, "self", "it is this node")
            return
        try:
            members = messages.members_field(pong, self._peers)
            news = messages.news_field(pong)
        except ProtocolError as exc:
            self.mark_down(peer, str(exc))
            return
        if self._peers.get(peer.address) is not peer:
            return  # forgotten while it was checked
        now = time.monotonic()
        if not peer.up:
            log.info("peer %s (%s) is up", peer.node, peer.address)
            self.peer_up.set()
            if peer.status != "new":  # back: news (a new one is news to nobody yet)
                self._remember(peer.address, _News(peer.node, True, now))
        peer.status, peer.failures, peer.verified = "up", 0, True
        peer.last_ok = now
        self._set_up(peer, True)
        self._take_in(members, news)

    async def _open(self, peer: Peer) -> PeerConnection:
        """The peer's pooled connection, or a new one (one dial at a time per peer).
        Raises what ``open_connection`` raises."""
        conn = peer.conn
        if conn is not None and not conn.closed:
            self._pool.pop(peer, None)
            self._pool[peer] = None  # most recently used
            return conn
        shared = self._dials.get(peer)
        if shared is not None:  # another task dials it: wait for that dial
            try:
                result = await asyncio.shield(shared)  # (a waiter cancelled leaves it be)
            except asyncio.CancelledError:
                if shared.cancelled():  # called off (news that it is up: dial afresh)
                    raise PeerUnavailable(f"dialling {peer.address} was called off") from None
                raise
        else:
            shared = self._dials[peer] = asyncio.get_running_loop().create_future()
            outcome: PeerConnection | Exception | None = None
            try:
                outcome = result = await self._dial(peer)
            finally:
                if self._dials.get(peer) is shared:
                    del self._dials[peer]
                if not shared.done():
                    if outcome is None:
                        shared.cancel()
                    else:
                        shared.set_result(outcome)
        if isinstance(result, Exception):
            raise result
        return result

    async def _dial(self, peer: Peer) -> PeerConnection | Exception:
        """A new connection (pooled), or the exception that stopped it (returned: waiters
        on a shared dial raise it each)."""
        try:
            async with asyncio.timeout(self.timing.timeout):
                conn = await open_connection(peer.address, self.me, self.timing.timeout)
        except Exception as exc:
            return exc
        if self._peers.get(peer.address) is not peer:
            conn.stream.abort()
            return PeerUnavailable(f"peer {peer.address} was forgotten")
        if peer.node != conn.node:
            self._changed()
        peer.conn, peer.node, peer.region = conn, conn.node, conn.region
        self._pool[peer] = None
        self._trim_pool(keep=peer)
        assert self._tg is not None
        self._tg.create_task(self._read(peer, conn))
        return conn

    def _trim_pool(self, keep: Peer) -> None:
        """Close idle connections, least recently used first, down to ``max_connections``
        (ones with requests outstanding or a check under way stay)."""
        excess = len(self._pool) - self.max_connections
        if excess <= 0:
            return
        for peer in list(self._pool):
            conn = peer.conn
            if (
                peer is not keep
                and conn is not None
                and not conn.pending
                and peer not in self._checking
            ):
                self._drop_connection(peer)
                excess -= 1
                if excess == 0:
                    return

    async def _read(self, peer: Peer, conn: PeerConnection) -> None:
        await conn.read_loop()
        if peer.conn is conn and peer.address in self._peers:
            self.mark_down(peer, "connection lost")


@asynccontextmanager
async def static_directory(
    me: Identity, addresses: tuple[str, ...], timing: Timing | None = None
) -> AsyncIterator[PeerDirectory]:
    async with PeerDirectory(me, timing) as directory:
        for address in addresses:
            directory.add(address, "static")
        yield directory
