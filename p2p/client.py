"""One client connection to one peer daemon: handshake, then pipelined requests.

Every request is answered in order, one frame per asked id, so the connection
keeps a FIFO of futures and one reader task settles them. ``get`` calls made in
the same loop iteration are coalesced into one many-id request.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from dataclasses import dataclass

from blobstore.errors import (
    AuthError,
    ChunkMissing,
    PeerUnavailable,
    ProtocolError,
    SelfConnection,
    WrongRegion,
)
from blobstore.hostport import split_hostport
from blobstore.ids import ChunkId, verify_off_loop
from blobstore.resource import AsyncResource
from blobstore.source import ChunkData

from . import messages
from .framing import Frame
from .wire import FrameStream, connect

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Identity:
    node: str
    region: str
    token: bytes | None = None
    tls: ssl.SSLContext | None = None
    """Dial peers over mutual TLS with this context (p2p.tls); None: plain TCP."""


class PeerConnection(AsyncResource):
    """A handshaken connection. Use ``open_connection``; run ``read_loop`` in a task
    group; ``async with`` (or ``aclose``) closes it."""

    def __init__(self, stream: FrameStream, address: str, node: str, region: str) -> None:
        self.stream = stream
        self.address = address
        self.node = node
        self.region = region
        self._waiting: deque[asyncio.Future[Frame]] = deque()
        self._pings: deque[asyncio.Future[Frame]] = deque()
        """Pings waiting for a pong, also in ``_waiting``: a server answers them early
        (messages.EARLY), ahead of the chunks asked before them, or in order."""
        self._batch: list[ChunkId] = []
        self._batch_servers: list[bool] = []
        self._batch_futures: list[asyncio.Future[Frame]] = []
        self._flush_scheduled = False

    @property
    def closed(self) -> bool:
        return self.stream.closed

    @property
    def pending(self) -> int:
        return len(self._waiting) + len(self._batch)

    async def read_loop(self) -> None:
        """Settle waiting futures with answers, in order, until the connection ends."""
        try:
            while True:
                frame = await self.stream.recv()
                if frame.kind == "pong" and messages.early_field(frame.header):
                    if not self._pings:
                        raise ProtocolError(f"{self.address} sent an unrequested early pong")
                    fut = self._pings.popleft()
                    self._waiting.remove(fut)
                else:
                    if not self._waiting:
                        raise ProtocolError(f"{self.address} sent an unrequested {frame.kind!r}")
                    fut = self._waiting.popleft()
                    if self._pings and fut is self._pings[0]:
                        self._pings.popleft()  # answered in order (an older server)
                if not fut.done():
                    fut.set_result(frame)
        except (PeerUnavailable, ProtocolError) as exc:
            self._fail_all(exc)
            self.stream.abort()
        except asyncio.CancelledError:
            self._fail_all(PeerUnavailable(f"connection to {self.address} closed"))
            self.stream.abort()
            raise

    async def get(self, chunk_id: ChunkId, as_server: bool = False) -> ChunkData:
        """Fetch and verify one chunk. ``as_server``: asked as one of the chunk's
        servers, not as its home (messages.get).

        Raises ChunkMissing, CorruptChunk, PeerUnavailable, ProtocolError.
        """
        payload = await self.get_unverified(chunk_id, as_server)
        await verify_off_loop(chunk_id, payload, f"peer {self.address}")
        return payload

    async def get_unverified(self, chunk_id: ChunkId, as_server: bool = False) -> ChunkData:
        """``get`` without the check of the bytes against ``chunk_id``, for a caller
        that verifies them before any use (PeerTier: in the worker thread that also
        writes them). Raises ChunkMissing, PeerUnavailable, ProtocolError."""
        frame = await self._queue_get(chunk_id, as_server)
        if frame.kind == "missing":
            raise ChunkMissing(chunk_id, f"peer {self.address}")
        messages.expect(frame, "chunk")
        return frame.payload

    async def has(self, chunk_ids: list[ChunkId]) -> list[bool]:
        """Which of ``chunk_ids`` the peer holds. Raises PeerUnavailable, ProtocolError."""
        if not chunk_ids:
            return []
        frame = await self._request(messages.has(chunk_ids))
        return messages.have_flags(frame, len(chunk_ids))

    async def ping(
        self, port: int | None = None, news: list[messages.News] | None = None
    ) -> dict[str, object]:
        """``port``: where this node's daemon serves; ``news``: membership news to pass
        on (see messages.ping)."""
        fut = self._request(messages.ping(port, news or (), early=True))
        self._pings.append(fut)
        pong = messages.expect(await fut, "pong")
        pong.pop(messages.EARLY, None)  # how it travelled, not what it says
        return pong

    def _request(self, header: dict[str, object]) -> asyncio.Future[Frame]:
        self._flush()
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self.stream.send(header)
        self._waiting.append(fut)
        return fut

    def _queue_get(self, chunk_id: ChunkId, as_server: bool = False) -> asyncio.Future[Frame]:
        if self.stream.closed:
            self.stream.send({})  # raises the connection's error
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._batch.append(chunk_id)
        self._batch_servers.append(as_server)
        self._batch_futures.append(fut)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._batch:
            return
        ids, servers, futures = self._batch, self._batch_servers, self._batch_futures
        self._batch, self._batch_servers, self._batch_futures = [], [], []
        try:
            self.stream.send(messages.get(ids, servers))
        except PeerUnavailable as exc:
            for fut in futures:
                if not fut.done():
                    fut.set_exception(exc)
            return
        self._waiting.extend(futures)

    def _fail_all(self, exc: Exception) -> None:
        for fut in [*self._waiting, *self._batch_futures]:
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved: a cancelled caller must not leave a warning
        self._waiting.clear()
        self._pings.clear()
        self._batch.clear()
        self._batch_servers.clear()
        self._batch_futures.clear()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def open_connection(
    address: str, me: Identity, handshake_timeout: float = 5.0
) -> PeerConnection:
    """Connect and authenticate (docs/protocol.md, Handshake).

    Raises PeerUnavailable, SelfConnection, WrongRegion, AuthError, ProtocolError.
    """
    parsed = split_hostport(address)
    if parsed is None:
        raise PeerUnavailable(f"not a HOST:PORT address: {address!r}")
    host, port = parsed
    stream = await connect(host, port, connect_timeout=handshake_timeout, tls=me.tls)
    try:
        async with asyncio.timeout(handshake_timeout):
            hello = messages.expect(await stream.recv(), "hello")
            messages.version_field(hello)
            node = messages.text_field(hello, "node")
            region = messages.text_field(hello, "region")
            if region != me.region:
                raise WrongRegion(address, node, region)
            if node == me.node:
                # Also what a reflection looks like: our own challenge shown back to us.
                raise SelfConnection(address)
            reached = messages.endpoint(stream.extra_info("peername"))
            transcript = messages.Transcript(
                server_node=node,
                client_node=me.node,
                region=me.region,
                server_endpoint="" if me.tls else reached,
                server_nonce=messages.nonce_field(hello),
                client_nonce=messages.new_nonce(),
            )
            stream.send(
                messages.auth(
                    me.node,
                    me.region,
                    transcript.client_nonce,
                    messages.proof(me.token, transcript, messages.CLIENT),
                    reached,
                )
            )
            ready = messages.expect(await stream.recv(), "ready")
            messages.check_proof(
                me.token, transcript, messages.SERVER, ready.get("mac"), f"peer {address}"
            )
    except TimeoutError as exc:
        stream.abort()
        raise PeerUnavailable(f"handshake with {address} timed out") from exc
    except (PeerUnavailable, ProtocolError, AuthError, asyncio.CancelledError):
        # (cancelled: a caller's deadline; the socket would stay open until collected,
        # and the server wait out its handshake timeout: 153 in one 24-daemon bench run)
        stream.abort()
        raise
    return PeerConnection(stream, address, node, region)
