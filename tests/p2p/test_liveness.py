"""The peer directory's bounds: a connection pool, news of deaths and joins, hearsay.

Real in-process peer servers on loopback (tests/p2p/test_server.py's FakeCache); the
region-size figures (pings per daemon, convergence) are in tests/test_sim.py.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
from test_server import FakeCache, until

from p2p import messages
from p2p.client import Identity
from p2p.liveness import Peer, PeerDirectory, Timing
from p2p.metrics import Metrics
from p2p.provider import ChunkProvider
from p2p.server import PeerServer, ServerIdentity

pytestmark = pytest.mark.anyio

FAST = Timing(interval=0.1, timeout=1.0, backoff_min=0.05, backoff_max=0.5)


@asynccontextmanager
async def servers(count: int, heard: list[list[messages.News]]) -> AsyncIterator[list[str]]:
    """``count`` peer servers (nodes n0, n1, ...); the news their pings bring goes to ``heard``."""
    async with AsyncExitStack() as stack:
        tg = await stack.enter_async_context(asyncio.TaskGroup())
        addresses = []
        for i in range(count):
            provider = ChunkProvider(FakeCache(), None, lambda _: False, Metrics(), tg)  # type: ignore[arg-type]
            server = PeerServer(
                ServerIdentity(f"n{i}", "r", None),
                provider,
                Metrics(),
                hear=lambda news, _member: heard.append(news),
            )
            port = await stack.enter_async_context(server.serving("127.0.0.1", 0))
            addresses.append(f"127.0.0.1:{port}")
        yield addresses


async def test_connections_are_pooled_within_the_bound_and_opened_on_demand() -> None:
    heard: list[list[messages.News]] = []
    async with (
        servers(5, heard) as addresses,
        PeerDirectory(Identity("me", "r"), FAST, max_connections=2) as directory,
    ):
        for address in addresses:
            directory.add(address, "static")
        await directory.checked.wait()
        await until(lambda: len(directory.live()) == 5)
        # Every peer was checked, yet no more than two connections stay open.
        await until(lambda: len(directory._pool) <= 2)
        assert sum(p.conn is not None for p in directory.all()) == len(directory._pool)
        unpooled = next(p for p in directory.live() if p.conn is None)
        conn = await directory.connect(unpooled)  # live without a connection: dial it
        assert conn is unpooled.conn
        assert not conn.closed
        assert await conn.ping() == {"t": "pong", "node": unpooled.node, "region": "r", "peers": []}
        assert len(directory._pool) <= 2
        assert len(directory.live()) == 5  # closing an idle connection is not a death


def _peer(directory: PeerDirectory, address: str, node: str) -> Peer:
    directory.add(address, "static")
    peer = directory._peers[address]
    directory._heard_up(peer, node)
    return peer


async def test_a_pulls_news_of_a_death_is_checked_and_only_a_failed_check_marks_down() -> None:
    # SWIM's suspicion: a pull's news of a death makes the node check the peer at once;
    # the peer that answers stays up (a pull that timed out at a busy peer must not take
    # it out of every daemon's view), the dead one goes down and the death is passed on.
    heard: list[list[messages.News]] = []
    quiet_timing = Timing(interval=60.0, timeout=1.0, backoff_min=0.05, backoff_max=0.5)
    with socket.socket() as closed:  # a port nobody listens on: connections refused
        closed.bind(("127.0.0.1", 0))
        dead_address = f"127.0.0.1:{closed.getsockname()[1]}"
    async with (
        servers(1, heard) as (alive_address,),
        PeerDirectory(Identity("me", "r"), quiet_timing) as directory,
    ):
        directory.add(alive_address, "static")
        await until(lambda: len(directory.live()) == 1)
        alive = directory._peers[alive_address]
        dead = _peer(directory, dead_address, "a")  # taken as up from hearsay, never checked
        alive.last_ok -= 10.0  # the news is fresher than our last word from either
        directory.hear(
            [
                messages.News(dead_address, "a", False, 2.0),
                messages.News(alive_address, alive.node, False, 2.0),
                messages.News("10.0.0.3:7411", "me", False, 0.0),  # about us: we know better
            ],
            member=False,
        )
        assert dead.up  # not on hearsay alone: checked first
        assert alive.up
        await until(lambda: not dead.up)
        assert dead.status == "down"
        await until(lambda: alive not in directory._checking)
        assert alive.up
        # Our own failed check is passed on as our news (the peer that answered is not).
        assert [(n.address, n.alive) for n in directory._fresh_news()] == [(dead_address, False)]
        # News of it coming back, from before it was seen down, changes nothing; after, it does.
        directory.hear([messages.News(dead_address, "a", True, 30.0)])
        assert not dead.up
        directory.hear([messages.News(dead_address, "a", True, 0.0)])
        assert dead.up
        # News older than news_ttl is not even checked.
        directory.hear(
            [messages.News(alive_address, alive.node, False, quiet_timing.news_ttl + 1)],
            member=False,
        )
        assert alive not in directory._checking


def test_a_daemons_news_of_a_death_applies_unless_the_peer_answered_since() -> None:
    directory = PeerDirectory(Identity("me", "r"), FAST)
    quiet = _peer(directory, "10.0.0.1:7411", "a")
    answered = _peer(directory, "10.0.0.2:7411", "b")
    directory.mark_ok(answered)  # it answered just now: fresher than news 2 s old
    directory.hear(
        [
            messages.News("10.0.0.1:7411", "a", False, 2.0),
            messages.News("10.0.0.2:7411", "b", False, 2.0),
            messages.News("10.0.0.3:7411", "me", False, 0.0),  # about us: we know better
        ]
    )
    assert not quiet.up
    assert quiet.status == "down"
    assert answered.up
    # The death is passed on with its age (not restarted: news dies out after news_ttl).
    (passed,) = directory._fresh_news()
    assert (passed.address, passed.alive) == ("10.0.0.1:7411", False)
    assert passed.age >= 2.0
    # News of it coming back, from before it was seen down, changes nothing; after, it does.
    directory.hear([messages.News("10.0.0.1:7411", "a", True, 3.0)])
    assert not quiet.up
    directory.hear([messages.News("10.0.0.1:7411", "a", True, 0.5)])
    assert quiet.up
    # News older than news_ttl is ignored.
    directory.hear([messages.News("10.0.0.2:7411", "b", False, FAST.news_ttl + 1)])
    assert answered.up


def test_hearsay_names_peers_alive_and_is_bounded_by_the_gossip_cap() -> None:
    directory = PeerDirectory(Identity("me", "r"), FAST, max_gossip_peers=2)
    first_hand = directory._peers
    directory.add("10.0.0.9:7411", "static")
    members = [(f"10.0.0.{i}:7411", f"n{i}") for i in range(1, 6)] + [("10.0.0.9:7411", "n9")]
    directory._take_in(members, [])
    live = {p.address: p.node for p in directory.live()}
    assert live == {"10.0.0.1:7411": "n1", "10.0.0.2:7411": "n2", "10.0.0.9:7411": "n9"}
    assert {p.address: p.source for p in first_hand.values()}["10.0.0.1:7411"] == "gossip"
    # A hearsay peer that fails is forgotten at once (it never answered us).
    directory.mark_down(first_hand["10.0.0.1:7411"], "refused")
    assert "10.0.0.1:7411" not in first_hand


async def test_a_death_seen_first_hand_rides_on_the_next_pings() -> None:
    heard: list[list[messages.News]] = []
    async with (
        servers(3, heard) as addresses,
        PeerDirectory(Identity("me", "r"), FAST) as directory,
    ):
        for address in addresses:
            directory.add(address, "static")
        await until(lambda: len(directory.live()) == 3)
        victim = directory.live()[0]
        directory.mark_down(victim, "request timed out")
        # Pushed at once to the peers in use, then carried by the pings after.
        await until(
            lambda: any(n.address == victim.address and not n.alive for news in heard for n in news)
        )
