"""The daemon's side of the peer protocol: handshake, then answer requests.

Per connection, a reader starts a lookup for every requested id as soon as the
request arrives (bounded), and a writer sends the answers strictly in request
order -- so a slow read-through for one chunk does not stop the lookups of the
chunks behind it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from blobstore.errors import AuthError, BlobstoreError, PeerUnavailable, ProtocolError
from blobstore.ids import ChunkId
from blobstore.source import ChunkData

from . import messages
from .framing import DEFAULT_LIMITS, Limits
from .metrics import Metrics
from .provider import ChunkProvider
from .wire import FrameStream

log = logging.getLogger(__name__)

_LOOKUPS_PER_CONNECTION = 32
_LOOKUPS_PER_DAEMON = 96
"""Chunks being looked up or waiting to be sent, across all connections: bounds memory
(~96 x chunk size) however many nodes connect at once."""
_HANDSHAKE_TIMEOUT = 10.0
_STALLED_CLIENT_TIMEOUT = 30.0
"""A client that reads nothing for this long is dropped, freeing its share of the budget."""


@dataclass(frozen=True, slots=True)
class ServerIdentity:
    node: str
    region: str
    token: bytes | None
    corrupt_for_tests: bool = False
    """Flip a byte of every payload sent: lets tests prove clients verify."""
    tls: ssl.SSLContext | None = None
    """Serve over mutual TLS with this context (p2p.tls); None: plain TCP."""


Answer = Awaitable[tuple[ChunkData | None, str]] | dict[str, object]
"""A lookup to await, or a header ready to send."""


class PeerServer:
    """Serves ``provider``'s chunks on a TCP port, inside ``task_group``."""

    def __init__(
        self,
        me: ServerIdentity,
        provider: ChunkProvider,
        metrics: Metrics,
        limits: Limits = DEFAULT_LIMITS,
        peers: Callable[[], list[str]] = list,
    ) -> None:
        """``peers`` gives the addresses of the live peers this daemon sees; pongs list them."""
        self._me = me
        self._peers = peers
        self._provider = provider
        self._metrics = metrics
        self._limits = limits
        self._streams: set[FrameStream] = set()
        self._budget = asyncio.Semaphore(_LOOKUPS_PER_DAEMON)

    @asynccontextmanager
    async def serving(
        self, host: str, port: int, sock: socket.socket | None = None
    ) -> AsyncIterator[int]:
        """Listen on host:port (port 0 picks one), or on ``sock`` if given (already
        bound: the caller learns the port before serving); yield the bound port."""
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as tg:

            def factory() -> FrameStream:
                stream = FrameStream(self._limits, "client")
                tg.create_task(self._serve_connection(stream))
                return stream

            try:
                tls = self._me.tls
                tls_timeout = _HANDSHAKE_TIMEOUT if tls else None
                if sock is not None:
                    server = await loop.create_server(
                        factory, sock=sock, ssl=tls, ssl_handshake_timeout=tls_timeout)
                else:
                    server = await loop.create_server(
                        factory, host, port, reuse_address=True, ssl=tls,
                        ssl_handshake_timeout=tls_timeout)
            except OSError as exc:
                raise PeerUnavailable(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
            try:
                yield server.sockets[0].getsockname()[1]
            finally:
                server.close()
                for stream in list(self._streams):
                    stream.abort()
                await server.wait_closed()

    async def _serve_connection(self, stream: FrameStream) -> None:
        self._streams.add(stream)
        self._metrics.connections += 1
        try:
            await self._handshake(stream)
            await self._serve_requests(stream)
        except AuthError as exc:
            self._metrics.auth_failures += 1
            log.warning("refused peer %s: %s", stream.name, exc)
        except (PeerUnavailable, ProtocolError) as exc:
            log.info("connection %s ended: %s", stream.name, exc)
        except Exception:  # one bad connection must never take the daemon down
            log.exception("connection %s failed", stream.name)
        finally:
            self._metrics.connections -= 1
            self._streams.discard(stream)
            stream.abort()

    async def _handshake(self, stream: FrameStream) -> None:
        """hello -> auth -> ready (docs/protocol.md). Raises AuthError, ProtocolError,
        PeerUnavailable."""
        me = self._me
        try:
            async with asyncio.timeout(_HANDSHAKE_TIMEOUT):
                await stream.connected()  # over TLS: once its handshake is done
                nonce = messages.new_nonce()
                stream.send(messages.hello(me.node, me.region, nonce))
                auth = messages.expect(await stream.recv(), "auth")
        except TimeoutError as exc:
            raise PeerUnavailable("handshake timed out") from exc
        client_node = messages.text_field(auth, "node")
        who = f"{client_node} ({stream.name})"
        stream.name = who
        try:
            messages.version_field(auth)
        except ProtocolError as exc:
            stream.send(messages.error("version", str(exc)))
            raise
        here = messages.endpoint(stream.extra_info("sockname"))
        transcript = messages.Transcript(
            server_node=me.node, client_node=client_node, region=me.region,
            server_endpoint="" if me.tls else here,
            server_nonce=nonce, client_nonce=messages.nonce_field(auth),
        )
        try:
            if client_node == me.node:
                # A reflection, or two nodes sharing an id: either way not a peer.
                raise AuthError(f"{who} claims this node's id {me.node!r}")
            messages.check_proof(me.token, transcript, messages.CLIENT, auth.get("mac"), who)
        except AuthError as exc:
            stream.send(messages.error("auth", "peer authentication failed"))
            reached = auth.get("to")
            if me.token is None or me.tls or not isinstance(reached, str) or reached == here:
                raise
            raise AuthError(f"{who} reached {reached[:300]!r}, but this is {here!r}: a relay, "
                            "or NAT between peers (run peers over TLS then)") from exc
        if messages.text_field(auth, "region") != me.region:
            stream.send(messages.error("region", f"this peer serves region {me.region!r}"))
            raise ProtocolError(f"{who} is in another region")
        stream.send(messages.ready(messages.proof(me.token, transcript, messages.SERVER)))

    async def _serve_requests(self, stream: FrameStream) -> None:
        answers: asyncio.Queue[Answer | None] = asyncio.Queue(_LOOKUPS_PER_CONNECTION)
        try:
            async with asyncio.TaskGroup() as tg:
                writer = tg.create_task(self._write_answers(stream, answers))
                reader = tg.create_task(self._read_requests(stream, answers, tg))
                # If the writer stops (peer gone), the reader may wait on a full queue forever.
                writer.add_done_callback(lambda _: reader.cancel())
        finally:
            while not answers.empty():  # lookups nobody will send: return their budget
                if isinstance(answers.get_nowait(), asyncio.Task):
                    self._budget.release()

    async def _read_requests(
        self, stream: FrameStream, answers: asyncio.Queue[Answer | None], tg: asyncio.TaskGroup
    ) -> None:
        try:
            while True:
                frame = await stream.recv()
                if frame.kind == "get":
                    for chunk_id in messages.ids_field(frame.header, self._limits):
                        await self._budget.acquire()
                        lookup = tg.create_task(self._lookup(chunk_id))
                        try:
                            await answers.put(lookup)
                        except BaseException:
                            lookup.cancel()
                            self._budget.release()
                            raise
                elif frame.kind == "has":
                    ids = messages.ids_field(frame.header, self._limits)
                    await answers.put(messages.have(self._provider.holds(ids)))
                elif frame.kind == "ping":
                    pong = messages.pong(self._me.node, self._me.region, self._peers())
                    await answers.put(pong)
                else:
                    raise ProtocolError(f"unexpected {frame.kind!r} request")
        except ProtocolError as exc:
            log.warning("dropping %s: %s", stream.name, exc)
            stream.abort()
        except PeerUnavailable:
            pass  # client hung up: answer what is queued, then stop
        await answers.put(None)

    async def _lookup(self, chunk_id: ChunkId) -> tuple[ChunkData | None, str]:
        try:
            return await self._provider.lookup(chunk_id)
        except BlobstoreError as exc:
            log.warning("cannot serve %s: %s", chunk_id[:16], exc)
            return None, ""

    async def _write_answers(
        self, stream: FrameStream, answers: asyncio.Queue[Answer | None]
    ) -> None:
        try:
            await self._write_loop(stream, answers)
        except PeerUnavailable as exc:
            log.info("stopped answering %s: %s", stream.name, exc)

    async def _write_loop(
        self, stream: FrameStream, answers: asyncio.Queue[Answer | None]
    ) -> None:
        while (item := await answers.get()) is not None:
            if isinstance(item, dict):
                stream.send(item)
                continue
            self._metrics.in_flight += 1
            try:
                await self._send_answer(stream, item)
            finally:
                self._metrics.in_flight -= 1
                self._budget.release()

    async def _send_answer(
        self, stream: FrameStream, lookup: Awaitable[tuple[ChunkData | None, str]]
    ) -> None:
        data, tier = await lookup
        if data is None:
            self._metrics.misses += 1
            stream.send(messages.MISSING)
        else:
            self._count(data, tier)
            if self._me.corrupt_for_tests:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            stream.send(messages.CHUNK, data)
        try:
            async with asyncio.timeout(_STALLED_CLIENT_TIMEOUT):
                await stream.drain()
        except TimeoutError as exc:
            raise PeerUnavailable("client stopped reading") from exc

    def _count(self, data: ChunkData, tier: str) -> None:
        m = self._metrics
        m.chunks_served += 1
        m.bytes_served += len(data)
        m.tier_bytes[tier] = m.tier_bytes.get(tier, 0) + len(data)
        if tier == "local":
            m.hits += 1
