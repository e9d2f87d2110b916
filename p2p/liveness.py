"""The peers a node knows, whether each is alive, and one connection to each.

Liveness comes from our own checks, never from mDNS TTLs (which keep a crashed
peer listed for ~19 minutes): a broken connection marks a peer down at once,
a peer with requests outstanding is pinged when quiet for ``interval``, an idle
one at most ``checks_per_second`` pings a second across the directory, and a
down peer is retried with exponential backoff.

Membership comes from a static list, mDNS, the node's own daemon, and gossip:
every pong lists a sample of the live peers its sender sees, and unknown ones are added
(source "gossip"). So one reachable daemon is enough to find the whole region,
and a gossiped peer that keeps failing is forgotten again.

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
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Self

from anyio import AsyncContextManagerMixin

from blobstore.errors import (
    AuthError,
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
    """Ping a peer that has been quiet this long."""
    timeout: float = 3.0
    """Connect/handshake/ping deadline."""
    backoff_min: float = 0.25
    backoff_max: float = 30.0
    forget_after: int = 5
    """Failed checks in a row after which a gossiped peer that once answered is dropped."""
    checks_per_second: float = 100.0
    """Checks of idle peers a directory makes per second at most: with more peers than
    ``interval`` x this, an idle peer is pinged less often (1,000 peers: every 10 s), so
    liveness costs a bounded rate whatever the region's size (every second each, it was
    ~1,000 pings a second per daemon). A peer with requests outstanding is still checked
    every ``interval``: a dead one is dropped within ``interval`` + ``timeout``."""


MAX_GOSSIP_PEERS = 2048
"""Default cap on the peers a directory keeps from gossip alone: above a region's size
(a cap below it, 256 before, left each node of a 1,000-node gossip-only region with a
different quarter of the peers, so nodes disagreed on homes), still a bound (~1 MiB)."""


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


class PeerDirectory(AsyncContextManagerMixin):
    """Known peers and their liveness. Use as an async context manager."""

    def __init__(
        self, me: Identity, timing: Timing | None = None, max_gossip_peers: int = MAX_GOSSIP_PEERS
    ) -> None:
        self.me = me
        self.timing = timing or Timing()
        self.max_gossip_peers = max_gossip_peers
        self._peers: dict[str, Peer] = {}
        self._gossiped = 0
        """How many of ``_peers`` are known from gossip alone."""
        self._gossip_full_logged = False
        self._shunned: dict[str, float] = {}
        """Gossiped addresses excluded lately (foreign, refusing): not re-added until then."""
        self._wake = asyncio.Event()
        self.serving_port: int | None = None
        """The port this node's daemon serves on (a daemon's directory): pings name it,
        so the peers it checks learn it (messages.ping)."""
        self._checking: dict[Peer, asyncio.Task[None]] = {}
        """Checks under way, by peer."""
        self._tg: asyncio.TaskGroup | None = None
        self.checked = asyncio.Event()
        """Set after every known peer has been checked at least once."""
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
            self._wake.set()
            self.checked.clear()
        else:
            if peer.source == "gossip" and source != "gossip":
                peer.source = source  # heard first-hand now: no longer forgettable
                self._gossiped -= 1
            if peer.status == "down":
                peer.retry_at = 0.0  # re-announced: worth trying now
                self._wake.set()

    def remove(self, address: str) -> None:
        peer = self._peers.pop(address, None)
        if peer is not None:
            if peer.source == "gossip":
                self._gossiped -= 1
            self._drop_connection(peer)
            log.info("peer %s (%s) left", peer.node or "?", address)

    def all(self) -> list[Peer]:
        return list(self._peers.values())

    def live(self) -> list[Peer]:
        """Peers that are up, in our region, and not us (one entry per node)."""
        by_node: dict[str, Peer] = {}
        for p in self._peers.values():
            if p.up and p.conn is not None:
                by_node.setdefault(p.node, p)
        return list(by_node.values())

    def connection(self, peer: Peer) -> PeerConnection:
        """Raises PeerUnavailable if the peer is not connected."""
        conn = peer.conn
        if not peer.up or conn is None or conn.closed:
            raise PeerUnavailable(f"peer {peer.address} is down")
        return conn

    # ------------------------------------------------------------------ state changes

    def mark_ok(self, peer: Peer) -> None:
        peer.last_ok = time.monotonic()

    def mark_down(self, peer: Peer, reason: str) -> None:
        if peer.up:
            log.warning("peer %s (%s) is down: %s", peer.node, peer.address, reason)
        peer.up = False
        peer.status = "down"
        peer.failures += 1
        if peer.source == "gossip" and (
            not peer.verified or peer.failures >= self.timing.forget_after
        ):
            self.remove(peer.address)  # whoever named it will name it again if it returns
            return
        delay = min(self.timing.backoff_max, self.timing.backoff_min * 2 ** (peer.failures - 1))
        peer.retry_at = time.monotonic() + delay
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
        peer.up = False
        peer.status = status
        peer.retry_at = time.monotonic() + self.timing.backoff_max
        self._drop_connection(peer)

    def _drop_connection(self, peer: Peer) -> None:
        if peer.conn is not None:
            peer.conn.stream.abort()
            peer.conn = None

    # ------------------------------------------------------------------ checking

    async def _monitor_loop(self) -> None:
        assert self._tg is not None
        while True:
            now = time.monotonic()
            busy = self.timing.interval
            idle = max(busy, len(self._peers) / self.timing.checks_per_second)
            due = [
                p
                for p in self._peers.values()
                if now >= p.retry_at
                and p not in self._checking
                and (
                    not p.up
                    or now - p.last_ok >= (busy if p.conn is not None and p.conn.pending else idle)
                )
            ]
            # Each check runs on its own: one peer that died silently holds up only its
            # own check for ``timeout``, not the checks of every other peer (waiting for
            # the whole round dropped peers killed together one round after another:
            # 6.2 s instead of interval + timeout, bench/sim_region.py scenario c).
            for peer in due:
                task = self._tg.create_task(self._check(peer))
                self._checking[peer] = task
                task.add_done_callback(functools.partial(self._checked, peer))
            if all(p.status != "new" for p in self._peers.values()):
                self.checked.set()
            self._wake.clear()
            try:
                async with asyncio.timeout(self.timing.interval / 4):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _checked(self, peer: Peer, _task: asyncio.Task[None]) -> None:
        del self._checking[peer]
        self._wake.set()

    async def _check(self, peer: Peer) -> None:
        try:
            async with asyncio.timeout(self.timing.timeout):
                conn = await self._connect(peer)
                pong = await conn.ping(self.serving_port)
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
        except (PeerUnavailable, ProtocolError, TimeoutError, OSError) as exc:
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
            named = messages.peers_field(pong)
        except ProtocolError as exc:
            self.mark_down(peer, str(exc))
            return
        for address in named:
            if address not in self._peers:
                self.add(address, "gossip")
        if not peer.up:
            log.info("peer %s (%s) is up", peer.node, peer.address)
            self.peer_up.set()
        peer.up, peer.status, peer.failures, peer.verified = True, "up", 0, True
        peer.last_ok = time.monotonic()

    async def _connect(self, peer: Peer) -> PeerConnection:
        if peer.conn is not None and not peer.conn.closed:
            return peer.conn
        conn = await open_connection(peer.address, self.me, self.timing.timeout)
        peer.conn, peer.node, peer.region = conn, conn.node, conn.region
        assert self._tg is not None
        self._tg.create_task(self._read(peer, conn))
        return conn

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
