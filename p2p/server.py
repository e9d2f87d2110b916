"""The daemon's side of the peer protocol: handshake, then answer requests.

Per connection, a reader starts a lookup for every requested id as soon as the
request arrives (bounded), and a writer sends the answers strictly in request
order -- so a slow read-through for one chunk does not stop the lookups of the
chunks behind it.

One bad client must never hurt the others: ``ServerLimits`` caps connections
(in all and per remote address), the time to authenticate and to stay idle, the
answers one connection may have pending (its reader stops while they are
unsent: back-pressure down to TCP) and its share of the daemon-wide lookup
budget; a client that stops reading is dropped -- soon when others wait for that
budget. docs/security.md (Memory bounds) turns these into bytes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields, replace

from blobstore.errors import (
    AuthError,
    BlobstoreError,
    ConfigError,
    PeerUnavailable,
    ProtocolError,
)
from blobstore.ids import ChunkId
from blobstore.source import ChunkData

from . import messages
from .framing import HANDSHAKE_LIMITS, REQUEST_LIMITS, Frame
from .metrics import Metrics
from .provider import ChunkProvider
from .wire import FrameStream

log = logging.getLogger(__name__)

_CAP_WARNING_INTERVAL = 10.0
_MIN_WRITE_BUFFER = 64 << 10
"""A connection's write buffer however many share ``write_buffers`` (a chunk is written
whole anyway: its writer then waits for the buffer to drop below this)."""
_RECEIVE_SIDE = REQUEST_LIMITS.max_header + 5 * REQUEST_LIMITS.max_queued + (64 << 10)
"""An authenticated connection's receive side at worst: a request header arriving, the
requests queued (decoded: ~5x their wire bytes, ids as Python objects) and its pending
pongs (16 of ~1 KiB for a client that asks them in order; early ones are not held)."""


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What one daemon spends on the clients it serves; docs/security.md turns it into bytes.

    Set any field with ``blobstore daemon --limit NAME=VALUE`` (``ServerLimits.parse``).
    """

    max_connections: int = 2048
    """Open peer connections, authenticated or not; more are closed as they are accepted.
    Inbound connections follow use: a directory keeps at most 64 (liveness.py), so a
    daemon gets ~64 per directory (a node's daemon and its pulls) on average, but a seed
    or a popular home is dialled by nearly every node's daemon and pull: ~2 per node in a
    region of 1,000 (256 refused a full mesh above ~250 nodes). Memory, not the count, is
    bounded: see ``write_buffers`` and ``memory_bound``."""
    max_connections_per_ip: int = 32
    """Of those, from one remote address."""
    handshake_timeout: float = 10.0
    """A connection that has not authenticated within this is closed."""
    idle_timeout: float = 300.0
    """An authenticated connection that asks nothing for this long, with nothing left to
    send, is closed (peers ping every second; a pull's connections ask all the time)."""
    stall_timeout: float = 30.0
    """A client that reads none of its answers for this long is dropped."""
    stall_grace: float = 1.0
    """...and after only this long when another client waits for the lookup budget."""
    lookups_per_connection: int = 16
    """Answers one connection may have pending (looked up, or waiting to be sent); its
    requests are not read further until they drop below."""
    lookups_per_daemon: int = 96
    """Chunk lookups pending across all connections: x the largest chunk, the bound on
    chunk bytes held for sending."""
    write_buffer: int = 2 << 20
    """Bytes queued on one connection's socket before its writer waits (at most its
    share of ``write_buffers``)."""
    write_buffers: int = 512 << 20
    """Bytes queued on sockets across all connections: each connection's share is
    ``write_buffers / max_connections``, at most ``write_buffer`` and at least 64 KiB
    (256 KiB at the defaults), so raising ``max_connections`` does not raise the bound."""
    max_gossip_peers: int = 256
    """Peers learned from gossip that the daemon keeps (first-hand ones are not capped)."""
    agent_pulls: int = 4
    """Pulls of this node's CLI the node agent runs at once (``<cache>/agent.sock``,
    blobstore/agent.py); another is declined and runs in its own process. Each holds
    what a pull holds (``concurrency`` chunks in flight)."""
    drain_timeout: float = 10.0
    """On SIGTERM: seconds the answers already asked for get to be sent (no new
    connections or requests are taken meanwhile); connections still busy then are closed."""

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                raise ConfigError(f"limit {f.name} must be positive")
        if self.lookups_per_connection > self.lookups_per_daemon:
            raise ConfigError("limit lookups_per_connection exceeds lookups_per_daemon")

    @property
    def connection_write_buffer(self) -> int:
        """One connection's share of ``write_buffers`` (see there)."""
        share = self.write_buffers // self.max_connections
        return min(self.write_buffer, max(_MIN_WRITE_BUFFER, share))

    def memory_bound(self, chunk: int = 4 << 20) -> int:
        """Bytes the server may hold above the process's base in the worst case, every
        connection authenticated and misbehaving (docs/security.md, Memory bounds):
        ``lookups_per_daemon`` chunks of ``chunk`` bytes, each connection's write buffer
        (plus one chunk beyond it while its lookup holds the budget: counted above) and
        its receive side (a request header arriving, the requests queued and decoded,
        the answers it may have pending)."""
        per_connection = self.connection_write_buffer + _RECEIVE_SIDE
        return self.lookups_per_daemon * chunk + self.max_connections * per_connection

    @classmethod
    def parse(cls, overrides: Iterable[str]) -> ServerLimits:
        """The defaults with ``NAME=VALUE`` overrides applied.

        Raises ConfigError for an unknown name or a value that is not a positive number.
        """
        limits = cls()
        known = {f.name for f in fields(cls)}
        for item in overrides:
            name, sep, text = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in known:
                raise ConfigError(
                    f"bad --limit {item!r}: expected NAME=VALUE, NAME one of "
                    + ", ".join(sorted(known))
                )
            kind = type(getattr(limits, name))
            try:
                value = kind(text)
            except ValueError:
                what = f"{text!r} is not {kind.__name__}"
                raise ConfigError(f"bad --limit {item!r}: {what}") from None
            limits = replace(limits, **{name: value})
        return limits


class _Session:
    """One authenticated connection's answer queue and what it holds."""

    __slots__ = (
        "answers",
        "buffered",
        "dropped",
        "held",
        "pending",
        "read_at",
        "reader",
        "slots",
        "stream",
        "waiting",
    )

    def __init__(self, stream: FrameStream, limits: ServerLimits) -> None:
        self.stream = stream
        self.answers: asyncio.Queue[Answer | None] = asyncio.Queue()  # bounded by ``slots``
        self.slots = asyncio.Semaphore(limits.lookups_per_connection)
        self.pending = 0
        """Answers queued or being sent."""
        self.held = 0
        """Units of the daemon's lookup budget this connection holds."""
        self.dropped = False
        self.reader: asyncio.Task[None] | None = None
        self.waiting = False
        """The reader waits for the next request (none is half answered)."""
        self.buffered = sys.maxsize
        """Bytes unsent at the last look for stallers (none yet: any count is less)."""
        self.read_at = 0.0
        """When a look for stallers last found fewer bytes unsent: the client reads."""


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
        limits: ServerLimits | None = None,
        peers: Callable[[], list[str] | messages.Gossip] = list,
        learn: Callable[[str], None] = lambda address: None,
        hear: Callable[[list[messages.News], bool], None] = lambda news, member: None,
    ) -> None:
        """``peers`` gives the addresses of the live peers this daemon sees (or its
        directory's ``Gossip``: a sample with node ids, and news); pongs list them.
        ``learn`` is told where an authenticated pinger serves (its address, the port its
        ping names)."""
        self._me = me
        self._peers = peers
        self._learn = learn
        self._hear = hear
        """Told the membership news an authenticated ping carries (liveness.py)."""
        self._provider = provider
        self._metrics = metrics
        self._limits = limits = limits or ServerLimits()
        self._streams: set[FrameStream] = set()
        """Every open connection, authenticated or not."""
        self._per_host: Counter[str] = Counter()
        self._sessions: set[_Session] = set()
        self._budget = asyncio.Semaphore(limits.lookups_per_daemon)
        self._cap_warned = 0.0
        self._listener: asyncio.Server | None = None
        self._draining = False
        self._drain_deadline = 0.0
        self._drained = asyncio.Event()
        """Set once draining has no connection left, or when told to hurry."""

    @asynccontextmanager
    async def serving(
        self, host: str, port: int, sock: socket.socket | None = None
    ) -> AsyncIterator[int]:
        """Listen on host:port (port 0 picks one), or on ``sock`` if given (already
        bound: the caller learns the port before serving); yield the bound port.
        Leaving closes every connection at once, or after ``drain()`` waits for the
        answers already asked for (up to ``drain_timeout``)."""
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as tg:

            def factory() -> FrameStream:
                # Until it authenticates, a client may send only small frames.
                stream = FrameStream(
                    HANDSHAKE_LIMITS, "client", self._limits.connection_write_buffer
                )
                tg.create_task(self._serve_connection(stream))
                return stream

            try:
                tls = self._me.tls
                tls_timeout = self._limits.handshake_timeout if tls else None
                if sock is not None:
                    server = await loop.create_server(
                        factory, sock=sock, ssl=tls, ssl_handshake_timeout=tls_timeout
                    )
                else:
                    server = await loop.create_server(
                        factory,
                        host,
                        port,
                        reuse_address=True,
                        ssl=tls,
                        ssl_handshake_timeout=tls_timeout,
                    )
            except OSError as exc:
                raise PeerUnavailable(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
            self._listener = server
            graceful = False
            try:
                yield server.sockets[0].getsockname()[1]
                graceful = True
            finally:
                if graceful and self._draining:  # else (errors, tests) close at once
                    await self._finish()
                server.close()
                for stream in list(self._streams):
                    stream.abort()
                await server.wait_closed()

    def drain(self) -> None:
        """Start a graceful stop (SIGTERM): take no new connections nor requests, send
        the answers already asked for, closing each connection once it has its answers.
        Leaving ``serving`` waits for that up to ``drain_timeout`` from now."""
        if self._draining:
            return
        self._draining = True
        self._drain_deadline = asyncio.get_running_loop().time() + self._limits.drain_timeout
        if self._listener is not None:
            self._listener.close()
        serving = {session.stream for session in self._sessions}
        for stream in self._streams - serving:
            stream.abort()  # still in its handshake: it has asked nothing
        for session in self._sessions:
            if session.waiting and session.reader is not None:
                session.reader.cancel()  # (a reader amid a request finishes it, then stops)
        if not self._streams:
            self._drained.set()
            return
        log.info(
            "finishing %d answers on %d connections (up to %g s)",
            sum(session.pending for session in self._sessions),
            len(self._streams),
            self._limits.drain_timeout,
        )

    def hurry(self) -> None:
        """Stop waiting for answers to be sent: close every connection now."""
        self._drained.set()

    async def _finish(self) -> None:
        """After ``drain``: wait until every connection has closed, or until its deadline
        (or ``hurry``); the rest are then closed as they are."""
        try:
            async with asyncio.timeout_at(self._drain_deadline):
                await self._drained.wait()
        except TimeoutError:
            pass
        if self._streams:
            log.warning(
                "closing %d connections with %d answers unsent",
                len(self._streams),
                sum(session.pending for session in self._sessions),
            )

    async def _serve_connection(self, stream: FrameStream) -> None:
        try:
            await stream.connected()  # (this task starts before the transport is there)
        except (PeerUnavailable, ProtocolError):
            stream.abort()
            return
        if self._draining:
            stream.abort()
            return
        if len(self._streams) >= self._limits.max_connections:
            self._refuse(stream, f"{self._limits.max_connections} connections open")
            return
        self._streams.add(stream)
        host = ""
        try:
            host = _remote_host(stream)
            self._per_host[host] += 1
            if self._per_host[host] > self._limits.max_connections_per_ip:
                self._refuse(
                    stream, f"{self._limits.max_connections_per_ip} connections open from {host}"
                )
                return
            self._metrics.connections += 1
            try:
                try:
                    async with asyncio.timeout(self._limits.handshake_timeout):
                        await self._handshake(stream)
                except TimeoutError as exc:
                    self._metrics.dropped["handshake_timeout"] += 1
                    raise PeerUnavailable("handshake timed out") from exc
                stream.set_limits(REQUEST_LIMITS)
                await self._serve_requests(stream)
            finally:
                self._metrics.connections -= 1
        except AuthError as exc:
            self._metrics.auth_failures += 1
            log.warning("refused peer %s: %s", stream.name, exc)
        except (PeerUnavailable, ProtocolError) as exc:
            log.info("connection %s ended: %s", stream.name, exc)
        except Exception:  # one bad connection must never take the daemon down
            log.exception("connection %s failed", stream.name)
        finally:
            self._streams.discard(stream)
            if host:
                self._per_host[host] -= 1
                if not self._per_host[host]:
                    del self._per_host[host]
            stream.abort()
            if self._draining and not self._streams:
                self._drained.set()

    def _refuse(self, stream: FrameStream, why: str) -> None:
        """Close a connection over the caps at once; it never got a buffer. It is
        told first, in one small frame (``error``, code ``busy``), so that its
        node asks another peer instead of taking this one for dead (an older
        client reads a protocol error, as it read the closed connection)."""
        try:
            stream.send(messages.error("busy", why))
        except PeerUnavailable:
            stream.abort()
        else:
            stream.close()
        self._metrics.dropped["connection_cap"] += 1
        now = time.monotonic()
        if now - self._cap_warned >= _CAP_WARNING_INTERVAL:  # a flood logs one line a while
            self._cap_warned = now
            log.warning("refusing connections: %s", why)

    async def _handshake(self, stream: FrameStream) -> None:
        """hello -> auth -> ready (docs/protocol.md). Raises AuthError, ProtocolError,
        PeerUnavailable."""
        me = self._me
        try:
            async with asyncio.timeout(self._limits.handshake_timeout):
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
            server_node=me.node,
            client_node=client_node,
            region=me.region,
            server_endpoint="" if me.tls else here,
            server_nonce=nonce,
            client_nonce=messages.nonce_field(auth),
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
            raise AuthError(
                f"{who} reached {reached[:300]!r}, but this is {here!r}: a relay, "
                "or NAT between peers (run peers over TLS then)"
            ) from exc
        if messages.text_field(auth, "region") != me.region:
            stream.send(messages.error("region", f"this peer serves region {me.region!r}"))
            raise ProtocolError(f"{who} is in another region")
        stream.send(messages.ready(messages.proof(me.token, transcript, messages.SERVER)))

    async def _serve_requests(self, stream: FrameStream) -> None:
        session = _Session(stream, self._limits)
        self._sessions.add(session)
        try:
            async with asyncio.TaskGroup() as tg:
                writer = tg.create_task(self._write_answers(session))
                reader = session.reader = tg.create_task(self._read_requests(session, tg))
                # If the writer stops (peer gone), nothing more will be sent: stop reading.
                writer.add_done_callback(lambda _: reader.cancel())
            if self._draining:
                await stream.aclose()  # the answers still buffered go out first
        finally:
            self._sessions.discard(session)
            self._discard_answers(session)

    async def _read_requests(self, session: _Session, tg: asyncio.TaskGroup) -> None:
        stream = session.stream
        try:
            while not self._draining:  # a request read is answered whole, even when draining
                session.waiting = True
                try:
                    frame = await self._next_request(session)
                finally:
                    session.waiting = False
                if frame.kind == "get":
                    ids = messages.ids_field(frame.header, REQUEST_LIMITS)
                    servers = messages.as_server_field(frame.header, len(ids))
                    for chunk_id, as_server in zip(ids, servers, strict=True):
                        await session.slots.acquire()
                        await self._acquire_budget(session)
                        lookup = self._lookup(chunk_id, as_server)
                        self._answer(session, tg.create_task(lookup))
                elif frame.kind == "has":
                    ids = messages.ids_field(frame.header, REQUEST_LIMITS)
                    await session.slots.acquire()
                    self._answer(session, messages.have(self._provider.holds(ids)))
                elif frame.kind == "ping":
                    port = messages.port_field(frame.header)
                    if port is not None:
                        self._learn(messages.endpoint((_remote_host(stream), port)))
                    self._hear(messages.news_field(frame.header), port is not None)
                    pong = messages.pong(self._me.node, self._me.region, self._peers())
                    if messages.early_field(frame.header):
                        await self._send_early(stream, pong)
                    else:  # an older client matches answers to requests by order
                        await session.slots.acquire()
                        self._answer(session, pong)
                else:
                    raise ProtocolError(f"unexpected {frame.kind!r} request")
        except ProtocolError as exc:
            log.warning("dropping %s: %s", stream.name, exc)
            stream.abort()
        except PeerUnavailable:
            pass  # client hung up or idle: answer what is queued, then stop
        finally:
            session.answers.put_nowait(None)  # (also when cancelled: drain, writer gone)

    async def _send_early(self, stream: FrameStream, pong: dict[str, object]) -> None:
        """Send a pong at once, ahead of the answers queued before it (a frame is written
        whole, so it never splits one). In order, a ping waited behind up to
        ``lookups_per_connection`` chunks, read-throughs among them (a relay may take 10 s),
        and a busy home's requesters took it for dead after their 3 s ping timeout: 20
        daemons + 16 pulls on a loaded box read the store ~20x unique. Still bounded: a
        client that reads nothing gets no pong until its unread answers drop below
        ``write_buffer``, and its requests wait meanwhile."""
        await self._drain(stream)
        stream.send({**pong, messages.EARLY: True})

    def _answer(self, session: _Session, answer: Answer) -> None:
        """Queue an answer; the caller holds one of the session's slots for it."""
        session.pending += 1
        session.answers.put_nowait(answer)

    async def _next_request(self, session: _Session) -> Frame:
        """The next request; raises PeerUnavailable once the client has been idle too long."""
        while True:
            try:
                async with asyncio.timeout(self._limits.idle_timeout):
                    return await session.stream.recv()
            except TimeoutError:
                if session.pending:
                    continue  # still sending it answers: a slow reader, not an idle one
                self._metrics.dropped["idle"] += 1
                raise PeerUnavailable(f"idle for {self._limits.idle_timeout:g} s") from None

    async def _acquire_budget(self, session: _Session) -> None:
        """One unit of the daemon's lookup budget. While it is used up and a client that
        reads its answers waits, the client that has read nothing for longest (at least
        ``stall_grace``) is dropped, freeing what it holds; one per ``stall_grace``."""
        while self._budget.locked():
            if session.stream.write_blocked_since is None:  # a staller waits its turn
                self._evict_stalled()
            try:
                async with asyncio.timeout(self._limits.stall_grace):
                    await self._budget.acquire()
                break
            except TimeoutError:
                continue
        else:
            await self._budget.acquire()
        session.held += 1
        self._metrics.lookups += 1

    def _release_budget(self, session: _Session) -> None:
        session.held -= 1
        self._metrics.lookups -= 1
        self._budget.release()

    def _evict_stalled(self) -> None:
        """Drop the client that has read nothing for longest, if that is ``stall_grace``.

        Read nothing, not read slowly: a client whose unsent bytes dropped since the last
        look reads. Its writer being stopped (bytes above ``write_buffer``) was taken for
        a stall, and pulls on a loaded box, reading a few hundred KB/s per peer, were
        dropped while reading (bench_region.py, 16 daemons: 18 drops, each pull's
        chunks then read from the store)."""
        now = time.monotonic()
        stalled = []
        for session in self._sessions:
            since = session.stream.write_blocked_since
            if not session.held or session.dropped or since is None:
                continue
            buffered = session.stream.write_buffer_size()
            if buffered < session.buffered:
                session.read_at = now
            session.buffered = buffered
            quiet_since = max(since, session.read_at)
            if now - quiet_since >= self._limits.stall_grace:
                stalled.append((quiet_since, session))
        if not stalled:
            return
        since, session = min(stalled, key=lambda pair: pair[0])
        log.warning(
            "dropping %s: it has read nothing for %.1f s while other clients wait",
            session.stream.name,
            now - since,
        )
        self._metrics.dropped["stalled"] += 1
        session.dropped = True
        session.stream.abort()

    async def _lookup(self, chunk_id: ChunkId, as_server: bool) -> tuple[ChunkData | None, str]:
        try:
            return await self._provider.lookup(chunk_id, as_server)
        except BlobstoreError as exc:
            log.warning("cannot serve %s: %s", chunk_id[:16], exc)
            return None, ""

    async def _write_answers(self, session: _Session) -> None:
        try:
            await self._write_loop(session)
        except PeerUnavailable as exc:
            log.info("stopped answering %s: %s", session.stream.name, exc)
        finally:
            self._discard_answers(session)

    def _discard_answers(self, session: _Session) -> None:
        """Drop the answers nobody will send. A lookup returns its budget when it ends, not
        before: the budget bounds lookups running, not only answers waiting."""
        while not session.answers.empty():
            item = session.answers.get_nowait()
            if isinstance(item, asyncio.Task):
                if item.done():
                    self._release_budget(session)
                else:
                    item.add_done_callback(lambda _: self._release_budget(session))

    async def _write_loop(self, session: _Session) -> None:
        stream = session.stream
        while (item := await session.answers.get()) is not None:
            try:
                if isinstance(item, dict):
                    stream.send(item)
                    await self._drain(stream)
                    continue
                self._metrics.in_flight += 1
                try:
                    await self._send_answer(stream, item)
                finally:
                    self._metrics.in_flight -= 1
                    self._release_budget(session)
            finally:
                session.pending -= 1
                session.slots.release()

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
        await self._drain(stream)

    async def _drain(self, stream: FrameStream) -> None:
        """Wait while the client's unread answers fill the socket buffer; drop it if it
        reads none for ``stall_timeout``."""
        try:
            async with asyncio.timeout(self._limits.stall_timeout):
                await stream.drain()
        except TimeoutError as exc:
            self._metrics.dropped["stalled"] += 1
            raise PeerUnavailable("client stopped reading") from exc

    def _count(self, data: ChunkData, tier: str) -> None:
        m = self._metrics
        m.chunks_served += 1
        m.bytes_served += len(data)
        m.tier_bytes[tier] = m.tier_bytes.get(tier, 0) + len(data)
        if tier == "local":
            m.hits += 1


def _remote_host(stream: FrameStream) -> str:
    peer = stream.extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "?"
