"""Back-pressure in the asyncio shell around the framing core (p2p/wire.py): a
reader that falls behind stops the socket's reading, a sender whose peer does not
read waits in ``drain()``. A fake transport records what the stream asks of it;
one test runs the same over a real loopback connection."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import anyio
import pytest

from blobstore.errors import PeerUnavailable
from p2p.framing import DEFAULT_LIMITS, Limits, encode
from p2p.wire import _MAX_QUEUED_FRAMES, FrameStream, connect

pytestmark = pytest.mark.anyio


class FakeTransport:
    """What FrameStream calls on a transport, recorded."""

    def __init__(self, stream: FrameStream) -> None:
        self.stream = stream
        self.reading = True
        self.pauses = 0
        self.sent: list[bytes] = []
        self.high_water: int | None = None

    def set_write_buffer_limits(self, high: int) -> None:
        self.high_water = high

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def pause_reading(self) -> None:
        assert self.reading, "paused twice"
        self.reading = False
        self.pauses += 1

    def resume_reading(self) -> None:
        assert not self.reading, "resumed while reading"
        self.reading = True

    def write(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    def writelines(self, parts: Iterable[bytes]) -> None:
        self.sent.append(b"".join(bytes(p) for p in parts))

    def abort(self) -> None:
        self.stream.connection_lost(None)


def connected(limits: Limits = DEFAULT_LIMITS) -> tuple[FrameStream, FakeTransport]:
    stream = FrameStream(limits, "fake", write_high_water=1000)
    transport = FakeTransport(stream)
    stream.connection_made(transport)  # type: ignore[arg-type]
    return stream, transport


def arrive(stream: FrameStream, data: bytes) -> None:
    """Hand ``data`` to the stream the way the event loop does: into its buffers."""
    while data:
        buf = stream.get_buffer(-1)
        n = min(len(buf), len(data))
        buf[:n] = data[:n]
        stream.buffer_updated(n)
        data = data[n:]


def frame(payload: bytes = b"") -> bytes:
    return encode({"t": "chunk"}, len(payload)) + payload


async def test_reading_stops_above_the_frame_count_and_resumes_at_half() -> None:
    stream, transport = connected()
    assert transport.high_water == 1000
    arrive(stream, frame() * _MAX_QUEUED_FRAMES)
    assert transport.reading  # at the limit, not above it
    arrive(stream, frame())
    assert not transport.reading
    while transport.pauses and not transport.reading:
        await stream.recv()
    queued = len(stream._frames)
    assert queued == _MAX_QUEUED_FRAMES // 2  # resumed once the reader took half
    for _ in range(queued):
        await stream.recv()
    assert transport.reading
    assert transport.pauses == 1


async def test_reading_stops_above_the_queued_bytes_and_resumes_at_half() -> None:
    stream, transport = connected(Limits(max_queued=10_000))
    arrive(stream, frame(bytes(4000)) * 2)
    assert transport.reading
    arrive(stream, frame(bytes(4000)))  # 12,000 bytes wait for the reader
    assert not transport.reading
    await stream.recv()
    assert not transport.reading  # 8,000 still queued: above half of the limit
    await stream.recv()
    assert transport.reading  # 4,000: at most half
    payload = (await stream.recv()).payload
    assert payload == bytes(4000)


async def test_drain_waits_while_the_peer_does_not_read() -> None:
    stream, _ = connected()
    await stream.drain()  # nothing buffered: no wait
    assert stream.write_blocked_since is None
    stream.pause_writing()  # the transport's buffer went above its high-water mark
    assert stream.write_blocked_since is not None
    waiting = asyncio.ensure_future(stream.drain())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiting.done()
    stream.resume_writing()
    await waiting
    assert stream.write_blocked_since is None


async def test_a_connection_lost_while_draining_raises() -> None:
    stream, transport = connected()
    stream.pause_writing()
    waiting = asyncio.ensure_future(stream.drain())
    await asyncio.sleep(0)
    transport.abort()
    with pytest.raises(PeerUnavailable, match="lost"):
        await waiting
    with pytest.raises(PeerUnavailable):
        stream.send({"t": "ping"})
    with pytest.raises(PeerUnavailable):
        await stream.recv()


async def test_a_sender_waits_for_a_real_peer_that_does_not_read() -> None:
    """Over loopback: the receiver stops reading once it holds ``max_queued`` bytes,
    the kernel's buffers fill, and the sender's ``drain()`` waits until the receiver
    takes its frames."""
    received: asyncio.Queue[FrameStream] = asyncio.Queue()
    payload = bytes(1 << 20)

    def factory() -> FrameStream:
        stream = FrameStream(Limits(max_queued=2 << 20), "receiver")
        received.put_nowait(stream)
        return stream

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        sender = await connect("127.0.0.1", port)
        receiver = await received.get()
        sent = 0
        with anyio.fail_after(20):
            while sender.write_blocked_since is None:  # the kernel's buffers are full too
                sender.send({"t": "chunk"}, payload)
                sent += 1
                await asyncio.sleep(0)  # the receiver reads meanwhile, up to its limit
        assert receiver._read_paused
        waiting = asyncio.ensure_future(sender.drain())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not waiting.done()  # it waits for the receiver
        with anyio.fail_after(20):
            for _ in range(sent):
                assert (await receiver.recv()).payload == payload
            await waiting
        assert sender.write_blocked_since is None
        sender.abort()
        receiver.abort()
