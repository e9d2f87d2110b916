"""The pure framing core of the peer wire protocol: bytes in, frames out.

A frame is ``u32 header length (big endian) | msgpack map | payload``; the map's
``n`` field (default 0) is the payload length. No I/O happens here: the
decoder follows the shape of ``asyncio.BufferedProtocol`` (``get_buffer`` /
``buffer_updated``) so a socket can read a chunk's payload straight into the
buffer that becomes the chunk -- no intermediate copies -- and tests can drive
it with plain bytes and no event loop.

Memory is spent only on bytes that arrived: a declared length is a promise, not
an allocation. The scratch buffer starts small and grows to a header only while
that header arrives; a payload buffer is allocated up front only up to
``Limits.eager_payload`` (the largest chunk the chunker makes by default) and
beyond that grows, doubling, as bytes arrive. A decoder's memory is at most
``max(scratch, max_header + 4) + 2 x (payload bytes received so far)``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from blobstore.errors import ProtocolError

PREFIX = struct.Struct(">I")
MAX_HEADER_BYTES = 256 << 10
"""A header carries at most a request's id list (4096 x 32 bytes) plus change."""
MAX_PAYLOAD_BYTES = 64 << 20
"""Matches the largest chunk a manifest may name."""
MAX_IDS_PER_REQUEST = 4096
EAGER_PAYLOAD_BYTES = 4 << 20
"""Payloads up to this size are read in place with no copy (the chunker's default
maximum chunk); longer ones grow as their bytes arrive."""
SCRATCH_BYTES = 16 << 10
"""The scratch a connection keeps between frames; it grows only for a big header."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What a receiver accepts; a frame beyond them is a ProtocolError."""

    max_header: int = MAX_HEADER_BYTES
    max_payload: int = MAX_PAYLOAD_BYTES
    max_ids: int = MAX_IDS_PER_REQUEST
    eager_payload: int = EAGER_PAYLOAD_BYTES
    max_queued: int = 16 << 20
    """Bytes of received frames a connection holds for its reader; reading stops above."""


DEFAULT_LIMITS = Limits()
"""The protocol's hard limits: what any frame may be, and what a client accepts."""
HANDSHAKE_LIMITS = Limits(max_header=8 << 10, max_payload=0, max_ids=0, max_queued=16 << 10)
"""What a server accepts before the peer is authenticated: small headers, no payload."""
REQUEST_LIMITS = Limits(max_payload=0, max_queued=64 << 10)
"""What a server accepts from an authenticated client: requests carry no payload, and
64 KiB of them queue at most (a requester has at most 32 ids of ~1 KiB gets outstanding
per peer; 256 KiB before, ~1.2 MiB decoded per connection, x 2,048 connections)."""


@dataclass(slots=True)
class Frame:
    header: dict[str, Any]
    payload: bytearray
    wire_size: int = 0
    """Bytes the frame took on the wire (0 when built in memory)."""

    @property
    def kind(self) -> str:
        kind = self.header.get("t")
        return kind if isinstance(kind, str) else ""


def encode(header: dict[str, Any], payload_len: int = 0, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Encode a frame's prefix and header; the caller sends ``payload_len`` bytes after it.

    Raises ProtocolError if the header or payload would break the limits.
    """
    if payload_len:
        if payload_len > limits.max_payload:
            raise ProtocolError(f"payload of {payload_len} bytes exceeds the frame limit")
        header = {**header, "n": payload_len}
    packed: bytes = msgpack.packb(header, use_bin_type=True)
    if len(packed) > limits.max_header:
        raise ProtocolError(f"header of {len(packed)} bytes exceeds the frame limit")
    return PREFIX.pack(len(packed)) + packed


class FrameDecoder:
    """Incremental frame decoder with hard limits; raises ProtocolError on bad input.

    Usage: write into ``get_buffer()``, then call ``buffer_updated(n)``, which
    returns the frames completed by those ``n`` bytes. ``limits`` may be replaced
    between frames (a server tightens them until the peer is authenticated).
    """

    __slots__ = (
        "_end",
        "_filled",
        "_header",
        "_header_size",
        "_payload",
        "_scratch",
        "_size",
        "_start",
        "limits",
    )

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._scratch = bytearray()  # allocated when the first bytes arrive
        self._start = 0
        self._end = 0
        self._header: dict[str, Any] | None = None
        self._header_size = 0
        self._payload: bytearray | None = None
        self._size = 0
        """The pending payload's declared length; ``_payload`` may be shorter yet."""
        self._filled = 0

    @property
    def allocated(self) -> int:
        """Bytes of buffer this decoder holds right now."""
        return len(self._scratch) + (len(self._payload) if self._payload is not None else 0)

    def get_buffer(self) -> memoryview:
        """Where the next bytes read from the connection must go."""
        if self._payload is not None:
            if self._filled == len(self._payload):
                self._grow_payload()
            # Payload bytes land directly in the chunk's own buffer, and never past it.
            return memoryview(self._payload)[self._filled :]
        if not self._scratch:
            self._scratch = bytearray(SCRATCH_BYTES)
        elif self._end == len(self._scratch):
            self._make_room()
        return memoryview(self._scratch)[self._end :]

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        if self._payload is not None:
            self._filled += nbytes
            if self._filled < self._size:
                return []
            return [self._finish_payload()]
        self._end += nbytes
        return self._parse_scratch()

    def feed(self, data: bytes) -> list[Frame]:
        """Convenience for tests and non-buffered transports: copy ``data`` in."""
        frames: list[Frame] = []
        view = memoryview(data)
        while view:
            buf = self.get_buffer()
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            frames.extend(self.buffer_updated(n))
        return frames

    @property
    def idle(self) -> bool:
        """True between frames (a clean place for the connection to end)."""
        return self._payload is None and self._start == self._end

    def _make_room(self) -> None:
        # The scratch is full of one partial frame (a header, or a header and the start
        # of its payload). New buffers replace old ones -- never resized in place: the
        # transport may still hold a view of the old one.
        pending = self._end - self._start
        need = SCRATCH_BYTES
        if pending >= PREFIX.size:
            (hlen,) = PREFIX.unpack_from(self._scratch, self._start)
            need = max(need, PREFIX.size + min(hlen, self.limits.max_header))
        if need > len(self._scratch):
            scratch = bytearray(need)
            scratch[:pending] = self._scratch[self._start : self._end]
            self._scratch = scratch
        else:
            self._scratch[:pending] = self._scratch[self._start : self._end]
        self._start, self._end = 0, pending

    def _grow_payload(self) -> None:
        assert self._payload is not None
        grown = bytearray(min(self._size, max(2 * len(self._payload), SCRATCH_BYTES)))
        grown[: self._filled] = self._payload
        self._payload = grown

    def _finish_payload(self) -> Frame:
        assert self._header is not None
        assert self._payload is not None
        frame = Frame(self._header, self._payload, self._header_size + self._size)
        self._header, self._payload, self._filled, self._size = None, None, 0, 0
        return frame

    def _parse_scratch(self) -> list[Frame]:
        frames: list[Frame] = []
        limits = self.limits
        while self._end - self._start >= PREFIX.size:
            (hlen,) = PREFIX.unpack_from(self._scratch, self._start)
            if hlen > limits.max_header or hlen == 0:
                raise ProtocolError(f"frame header of {hlen} bytes is out of bounds")
            if self._end - self._start < PREFIX.size + hlen:
                break
            hstart = self._start + PREFIX.size
            header = _unpack_header(memoryview(self._scratch)[hstart : hstart + hlen])
            self._start = hstart + hlen
            size = header.get("n", 0)
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ProtocolError("frame payload length is not a count")
            if size > limits.max_payload:
                raise ProtocolError(f"frame payload of {size} bytes exceeds the limit")
            have = min(size, self._end - self._start)
            # Allocate what is here, or up to the eager size: never the declared size
            # of a long payload before its bytes arrive.
            payload = bytearray(min(size, max(have, limits.eager_payload)))
            payload[:have] = memoryview(self._scratch)[self._start : self._start + have]
            self._start += have
            if have == size:
                frames.append(Frame(header, payload, PREFIX.size + hlen + size))
                continue
            # The scratch is drained; the rest of the payload is read in place.
            self._header, self._payload, self._filled = header, payload, have
            self._header_size, self._size = PREFIX.size + hlen, size
            self._start = self._end = 0
            self._shrink_scratch()
            return frames
        if self._start == self._end:
            self._start = self._end = 0
            self._shrink_scratch()
        return frames

    def _shrink_scratch(self) -> None:
        if len(self._scratch) > SCRATCH_BYTES:
            self._scratch = bytearray(SCRATCH_BYTES)


def _unpack_header(raw: memoryview) -> dict[str, Any]:
    try:
        header = msgpack.unpackb(raw, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"frame header is not valid msgpack ({type(exc).__name__})") from exc
    if not isinstance(header, dict):
        raise ProtocolError("frame header is not a map")
    return header
