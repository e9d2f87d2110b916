"""Thin asyncio shell around the framing core: a connection that carries frames.

``FrameStream`` is an ``asyncio.BufferedProtocol``: the kernel copies payload
bytes straight into the chunk's buffer, and sending is one ``writelines`` of
header + payload. Socket errors are translated to PeerUnavailable here.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import ssl
import struct
import sys
import termios
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from blobstore.errors import AuthError, PeerUnavailable, ProtocolError
from blobstore.resource import AsyncResource

from .framing import DEFAULT_LIMITS, Frame, FrameDecoder, Limits, encode

_MAX_QUEUED_FRAMES = 64
"""Received frames not yet taken by ``recv()``: reading stops above this or above
``Limits.max_queued`` bytes."""
_SIOCOUTQ: int | None = getattr(termios, "TIOCOUTQ", None) if sys.platform == "linux" else None
"""ioctl: a TCP socket's bytes in its send queue, unsent or unacknowledged (Linux)."""
WRITE_HIGH_WATER = 8 << 20
"""Default bytes buffered for sending before ``drain()`` waits."""


class FrameStream(asyncio.BufferedProtocol, AsyncResource):
    """One TCP connection: ``await recv()`` frames, ``send()`` + ``await drain()``;
    ``aclose()`` sends what is buffered, then closes (``abort()``: at once)."""

    def __init__(
        self,
        limits: Limits = DEFAULT_LIMITS,
        name: str = "peer",
        write_high_water: int = WRITE_HIGH_WATER,
    ) -> None:
        """``limits`` bound what is received; frames sent obey the protocol's own limits."""
        self.name = name
        self.limits = limits
        self._decoder = FrameDecoder(limits)
        self._frames: deque[Frame] = deque()
        self._queued_bytes = 0
        self._write_high_water = write_high_water
        self.write_blocked_since: float | None = None
        """When sending last stopped (the peer is not reading), while it stays stopped."""
        self.received_at = 0.0
        """When bytes last arrived (time.monotonic): a peer whose answers are still
        arriving is alive, however long its pong waits behind them (liveness)."""
        self._transport: asyncio.Transport | None = None
        self._error: Exception | None = None
        self._recv_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._made: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # ------------------------------------------------------------------ protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they quack alike.
        self._transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=self._write_high_water)  # type: ignore[attr-defined]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self._made.done():
            self._made.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.received_at = time.monotonic()
        try:
            frames = self._decoder.buffer_updated(nbytes)
        except ProtocolError as exc:
            self._fail(exc)
            if self._transport is not None:
                self._transport.abort()
            return
        if frames:
            self._frames.extend(frames)
            self._queued_bytes += sum(f.wire_size for f in frames)
            self._wake_reader()
            too_many = len(self._frames) > _MAX_QUEUED_FRAMES
            if (
                self._transport
                and not self._read_paused
                and (too_many or self._queued_bytes > self.limits.max_queued)
            ):
                self._read_paused = True
                self._transport.pause_reading()

    def eof_received(self) -> bool:
        self._fail(PeerUnavailable(f"{self.name} closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self._fail(PeerUnavailable(f"connection to {self.name} lost{reason}"))
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        if not self._lost.done():
            self._lost.set_result(None)
        if not self._made.done():
            self._made.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True
        self.write_blocked_since = time.monotonic()

    def resume_writing(self) -> None:
        self._write_paused = False
        self.write_blocked_since = None
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # ------------------------------------------------------------------ API

    @property
    def closed(self) -> bool:
        return self._error is not None

    async def connected(self) -> None:
        """Wait until the connection is made (over TLS: after its handshake).

        Raises PeerUnavailable if it was lost first."""
        await asyncio.shield(self._made)
        if self._transport is None or self._error is not None:
            raise self._error or PeerUnavailable(f"{self.name} is not connected")

    def extra_info(self, name: str) -> Any:
        """The transport's ``get_extra_info(name)`` ("sockname", "peername", "peercert")."""
        return None if self._transport is None else self._transport.get_extra_info(name)

    async def recv(self) -> Frame:
        """The next frame. Raises PeerUnavailable at the end, ProtocolError on garbage."""
        while not self._frames:
            if self._error is not None:
                raise self._error
            self._recv_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._recv_waiter
            finally:
                self._recv_waiter = None
        frame = self._frames.popleft()
        self._queued_bytes -= frame.wire_size
        if (
            self._read_paused
            and self._transport
            and len(self._frames) <= _MAX_QUEUED_FRAMES // 2
            and self._queued_bytes <= self.limits.max_queued // 2
        ):
            self._read_paused = False
            self._transport.resume_reading()
        return frame

    def set_limits(self, limits: Limits) -> None:
        """Bound the frames received from now on (a server loosens them after auth)."""
        self.limits = limits
        self._decoder.limits = limits

    def send(self, header: dict[str, Any], payload: bytes | bytearray | memoryview = b"") -> None:
        """Queue one frame for sending. Raises PeerUnavailable if the connection is gone."""
        if self._error is not None or self._transport is None:
            raise self._error or PeerUnavailable(f"{self.name} is not connected")
        head = encode(header, len(payload))
        if payload:
            parts: Sequence[bytes | bytearray | memoryview] = (head, payload)
            self._transport.writelines(parts)
        else:
            self._transport.write(head)

    def write_buffer_size(self) -> int:
        """Bytes sent but not yet delivered: in this process's buffer and, on Linux, in
        the kernel's send queue. The kernel's share moves as the peer reads (its window
        opens); this process's alone stood still for seconds while MBs of kernel
        buffers drained to a slow reader."""
        if self._transport is None:
            return 0
        size = self._transport.get_write_buffer_size()
        sock = self._transport.get_extra_info("socket")
        if sock is not None and _SIOCOUTQ is not None:
            with contextlib.suppress(OSError, ValueError):
                size += struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQ, bytes(4)))[0]
        return size

    async def drain(self) -> None:
        """Wait while the send buffer is above its high-water mark."""
        if self._error is not None:
            raise self._error
        if not self._write_paused:
            return
        self._drain_waiter = asyncio.get_running_loop().create_future()
        try:
            await self._drain_waiter
        finally:
            self._drain_waiter = None
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        """Close once what is queued is sent, without waiting for it (a frame or two
        that fit the kernel's buffer: nothing stays behind in this process)."""
        if self._transport is not None:
            self._transport.close()

    async def aclose(self) -> None:
        if self._transport is not None:
            self._transport.close()
            await asyncio.shield(self._lost)

    def _fail(self, exc: Exception) -> None:
        if self._error is None:
            self._error = exc
        self._wake_reader()

    def _wake_reader(self) -> None:
        if self._recv_waiter is not None and not self._recv_waiter.done():
            self._recv_waiter.set_result(None)


async def connect(
    host: str,
    port: int,
    limits: Limits = DEFAULT_LIMITS,
    connect_timeout: float = 5.0,
    tls: ssl.SSLContext | None = None,
) -> FrameStream:
    """Open a frame connection (over TLS if ``tls`` is given).

    Raises PeerUnavailable if it cannot be made in time, AuthError if the peer's
    TLS certificate does not verify."""
    loop = asyncio.get_running_loop()
    name = f"{host}:{port}"
    tls_args: dict[str, Any] = (
        {"ssl": tls, "server_hostname": host, "ssl_handshake_timeout": connect_timeout}
        if tls is not None
        else {}
    )
    try:
        async with asyncio.timeout(connect_timeout):
            _, proto = await loop.create_connection(
                lambda: FrameStream(limits, name), host, port, **tls_args
            )
    except ssl.SSLCertVerificationError as exc:
        raise AuthError(f"TLS certificate of {name} refused: {exc.verify_message}") from exc
    except (OSError, TimeoutError) as exc:
        raise PeerUnavailable(f"cannot connect to {name}: {exc or 'timed out'}") from exc
    return proto
