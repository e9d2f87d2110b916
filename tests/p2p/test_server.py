"""Server + client in one loop, with in-memory fakes for the cache and the origin."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager

import anyio
import pytest

from blobstore.errors import AuthError, ChunkMissing, CorruptChunk, WrongRegion
from blobstore.ids import ChunkId, hash_bytes
from p2p import messages
from p2p.client import Identity, PeerConnection, open_connection
from p2p.metrics import Metrics
from p2p.provider import ChunkProvider
from p2p.server import PeerServer, ServerIdentity, ServerLimits

pytestmark = pytest.mark.anyio


class FakeCache:
    name = "local"

    def __init__(self) -> None:
        self.chunks: dict[ChunkId, bytes] = {}

    def contains(self, chunk_id: ChunkId) -> bool:
        return chunk_id in self.chunks

    async def get(self, chunk_id: ChunkId) -> bytes:
        if chunk_id not in self.chunks:
            raise ChunkMissing(chunk_id)
        return self.chunks[chunk_id]

    async def put(self, chunk_id: ChunkId, data: bytes) -> None:
        self.chunks[chunk_id] = data

    async def has(self, chunk_ids: Iterable[ChunkId]) -> set[ChunkId]:
        return {c for c in chunk_ids if c in self.chunks}


class SlowOrigin(FakeCache):
    name = "origin"

    def __init__(self) -> None:
        super().__init__()
        self.fetches = 0
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def get(self, chunk_id: ChunkId) -> bytes:
        self.fetches += 1
        self.started.set()
        await self.gate.wait()
        return await super().get(chunk_id)


async def until(condition: Callable[[], bool]) -> None:
    """Wait until ``condition()`` holds (checked every few ms); fail after 10 s."""
    with anyio.fail_after(10):
        while not condition():  # noqa: ASYNC110 - polling a test condition
            await asyncio.sleep(0.005)


def blob(i: int, size: int = 100_000) -> tuple[ChunkId, bytes]:
    data = bytes([i % 256]) * size
    return hash_bytes(data), data


@asynccontextmanager
async def a_server(
    cache: FakeCache,
    origin: FakeCache | None,
    home: bool = True,
    token: bytes | None = None,
    limits: ServerLimits | None = None,
) -> AsyncIterator[tuple[PeerServer, int, Metrics]]:
    """A real server on loopback over ``cache`` (``origin``: where a home reads through)."""
    metrics = Metrics()
    async with asyncio.TaskGroup() as tg:
        provider = ChunkProvider(cache, origin, lambda _: home, metrics, tg)  # type: ignore[arg-type]
        server = PeerServer(ServerIdentity("srv", "r1", token), provider, metrics, limits)
        async with server.serving("127.0.0.1", 0) as port:
            yield server, port, metrics


@asynccontextmanager
async def serving(
    cache: FakeCache,
    origin: FakeCache | None,
    home: bool = True,
    token: bytes | None = None,
) -> AsyncIterator[tuple[int, Metrics]]:
    async with a_server(cache, origin, home, token) as (_, port, metrics):
        yield port, metrics


@asynccontextmanager
async def connected(port: int, token: bytes | None = None) -> AsyncIterator[PeerConnection]:
    conn = await open_connection(f"127.0.0.1:{port}", Identity("cli", "r1", token))
    async with asyncio.TaskGroup() as tg:
        reader = tg.create_task(conn.read_loop())
        try:
            yield conn
        finally:
            reader.cancel()


async def test_get_has_ping_pipelined() -> None:
    cache = FakeCache()
    chunks = dict(blob(i) for i in range(20))
    cache.chunks.update(chunks)
    absent, _ = blob(99)
    async with serving(cache, None, home=False) as (port, metrics), connected(port) as conn:
        got = await asyncio.gather(*(conn.get(c) for c in chunks))
        assert got == list(chunks.values())
        with pytest.raises(ChunkMissing):
            await conn.get(absent)  # not home, not held: "missing", never forwarded
        assert await conn.has([*list(chunks)[:3], absent]) == [True, True, True, False]
        assert (await conn.ping())["node"] == "srv"
    assert metrics.chunks_served == 20
    assert metrics.misses == 1


async def test_home_reads_through_once_however_many_ask() -> None:
    origin = SlowOrigin()
    chunk_id, data = blob(7)
    origin.chunks[chunk_id] = data
    cache = FakeCache()
    async with serving(cache, origin) as (port, metrics):
        async with connected(port) as a, connected(port) as b:
            waiting = [asyncio.ensure_future(c.get(chunk_id)) for c in (a, b, a, b)]
            await origin.started.wait()
            # All four lookups started: each joins the flight in its first step, which
            # runs before the origin's answer can come back.
            await until(lambda: metrics.lookups == 4)
            origin.gate.set()
            assert await asyncio.gather(*waiting) == [data] * 4
    assert origin.fetches == 1
    assert metrics.origin_fetches == 1
    assert cache.chunks[chunk_id] == data  # kept


async def test_token_mismatch_and_wrong_region_are_refused() -> None:
    async with serving(FakeCache(), None, token=b"right") as (port, metrics):
        with pytest.raises(AuthError):
            await open_connection(f"127.0.0.1:{port}", Identity("cli", "r1", b"wrong"))
        with pytest.raises(AuthError):
            await open_connection(f"127.0.0.1:{port}", Identity("cli", "r1", None))
        with pytest.raises(WrongRegion):
            await open_connection(f"127.0.0.1:{port}", Identity("cli", "r2", b"right"))
        async with connected(port, b"right") as conn:
            assert (await conn.ping())["region"] == "r1"
    assert metrics.auth_failures == 2


async def test_lying_server_is_caught_by_the_client() -> None:
    cache = FakeCache()
    chunk_id, data = blob(3)
    cache.chunks[chunk_id] = data
    metrics = Metrics()
    async with asyncio.TaskGroup() as tg:
        provider = ChunkProvider(cache, None, lambda _: False, metrics, tg)  # type: ignore[arg-type]
        server = PeerServer(
            ServerIdentity("srv", "r1", None, corrupt_for_tests=True), provider, metrics
        )
        async with server.serving("127.0.0.1", 0) as port, connected(port) as conn:
            with pytest.raises(CorruptChunk):
                await conn.get(chunk_id)


async def test_budget_is_returned_when_a_client_vanishes_mid_request() -> None:
    cache = FakeCache()
    chunks = dict(blob(i, 1_000_000) for i in range(40))
    cache.chunks.update(chunks)
    metrics = Metrics()
    async with asyncio.TaskGroup() as tg:
        provider = ChunkProvider(cache, None, lambda _: False, metrics, tg)  # type: ignore[arg-type]
        server = PeerServer(ServerIdentity("srv", "r1", None), provider, metrics)
        full = server._budget._value
        async with server.serving("127.0.0.1", 0) as port:
            for _ in range(3):
                conn = await open_connection(f"127.0.0.1:{port}", Identity("cli", "r1"))
                for chunk_id in list(chunks) * 5:
                    conn._queue_get(chunk_id)
                await until(lambda: server._budget._value < full)  # serving it: mid-request
                conn.stream.abort()
            await until(lambda: not metrics.connections)
            assert server._budget._value == full
            async with connected(port) as conn:  # still serving
                assert await conn.get(next(iter(chunks))) == next(iter(chunks.values()))


async def test_a_ping_is_answered_ahead_of_a_slow_read_through() -> None:
    # A busy home's requesters ping it; in request order the pong waited for the
    # read-throughs asked before it, and a ping timeout took the home for dead.
    origin = SlowOrigin()
    chunk_id, data = blob(5)
    origin.chunks[chunk_id] = data
    async with serving(FakeCache(), origin) as (port, _), connected(port) as conn:
        slow = asyncio.ensure_future(conn.get(chunk_id))
        await origin.started.wait()
        assert (await conn.ping())["node"] == "srv"
        assert not slow.done()
        origin.gate.set()
        assert await slow == data
        assert not conn._pings
        assert not conn._waiting


async def test_an_older_clients_ping_is_answered_in_order() -> None:
    # A client that does not ask for early pongs matches answers to requests by order.
    origin = SlowOrigin()
    chunk_id, data = blob(6)
    origin.chunks[chunk_id] = data
    async with serving(FakeCache(), origin) as (port, _), connected(port) as conn:
        slow = asyncio.ensure_future(conn.get(chunk_id))
        await origin.started.wait()
        pong = asyncio.ensure_future(conn._request(messages.ping()))
        await asyncio.sleep(0.05)  # the pong is not sent while the chunk before it waits
        assert not pong.done()
        origin.gate.set()
        assert await slow == data
        header = messages.expect(await pong, "pong")
        assert header["node"] == "srv"
        assert not messages.early_field(header)
