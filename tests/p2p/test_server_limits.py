"""ServerLimits at region scale: how many connections a daemon takes by default, and
what they may cost (docs/security.md, Memory bounds)."""

from __future__ import annotations

import pytest
from test_server import FakeCache, a_server, blob, connected, serving, until

from p2p.client import Identity, open_connection
from p2p.liveness import Timing
from p2p.pulltier import _pull_timing
from p2p.server import ServerLimits

pytestmark = pytest.mark.anyio

GiB = 1 << 30


def test_the_default_takes_a_popular_peer_of_a_1000_node_region_within_a_bound() -> None:
    limits = ServerLimits()
    # A seed or a popular home is dialled by each node's daemon and a pull: 2 per node.
    assert limits.max_connections >= 2 * 1000
    assert limits.max_connections * limits.connection_write_buffer <= limits.write_buffers
    assert limits.memory_bound() <= 2.25 * GiB
    # More connections share the same write buffers: only the receive side grows.
    more = ServerLimits(max_connections=4 * limits.max_connections)
    assert more.max_connections * more.connection_write_buffer <= more.write_buffers
    assert more.connection_write_buffer < limits.connection_write_buffer
    # A small daemon keeps the whole per-connection buffer.
    assert ServerLimits(max_connections=64).connection_write_buffer == limits.write_buffer


async def test_each_connection_buffers_only_its_share() -> None:
    # Clients that ask and never read: what the server queues for each stays within the
    # connection's share of write_buffers (plus the chunk being written), not write_buffer.
    limits = ServerLimits(max_connections=64, write_buffers=4 << 20, stall_timeout=60)
    share = limits.connection_write_buffer
    assert share == 64 << 10
    cache = FakeCache()
    chunks = dict(blob(i, 100_000) for i in range(24))
    cache.chunks.update(chunks)
    async with a_server(cache, None, home=False, limits=limits) as (server, port, metrics):
        clients = [
            await open_connection(f"127.0.0.1:{port}", Identity(f"cli{i}", "r1")) for i in range(3)
        ]
        for conn in clients:
            conn.stream._transport.pause_reading()  # type: ignore[union-attr]
            for chunk_id in list(chunks) * 20:  # ~48 MB: more than the kernel buffers
                conn._queue_get(chunk_id)
        streams = list(server._streams)
        # Each writer stops once its socket (kernel buffers full) and its buffer fill.
        await until(
            lambda: (
                all(s.write_blocked_since is not None for s in streams)
                and metrics.in_flight == len(streams)
            )
        )
        for stream in streams:
            transport = stream._transport
            assert transport is not None
            assert transport.get_write_buffer_limits()[1] == share
            assert transport.get_write_buffer_size() <= share + 100_100
        for conn in clients:
            conn.stream.abort()


async def test_a_connection_knows_when_bytes_last_arrived() -> None:
    # Liveness reads it: a peer whose answers are still arriving is busy, not dead,
    # however long its pong waits behind them in the socket buffers.
    cache = FakeCache()
    chunk_id, data = blob(1)
    cache.chunks[chunk_id] = data
    async with serving(cache, None, home=False) as (port, _), connected(port) as conn:
        before = conn.stream.received_at
        assert await conn.get(chunk_id) == data
        assert conn.stream.received_at > before


def test_a_pull_takes_the_daemons_liveness_interval_from_the_environment() -> None:
    assert _pull_timing({"BLOBSTORE_HEALTH_INTERVAL": "2"}) == Timing(interval=2, timeout=6)
    assert _pull_timing({"BLOBSTORE_HEALTH_INTERVAL": "0.1"}).timeout == 1.0
    for unset in ({}, {"BLOBSTORE_HEALTH_INTERVAL": "soon"}, {"BLOBSTORE_HEALTH_INTERVAL": "-1"}):
        assert _pull_timing(unset) == Timing()
