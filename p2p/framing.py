"""The pure framing core of the peer wire protocol: bytes in, frames out.

A frame is ``u32 header length (big endian) | msgpack map | payload``; the map's
``n`` field (default 0) is the payload length. No I/O happens here: the
decoder follows the shape of ``asyncio.BufferedProtocol`` (``get_buffer`` /
``buffer_updated``) so a socket can read a chunk's payload straight into the
buffer that becomes the chunk -- no intermediate copies -- and tests can drive
it with plain bytes and no event loop.
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
_SCRATCH_BYTES = 256 << 10


@dataclass(frozen=True, slots=True)
class Limits:
    max_header: int = MAX_HEADER_BYTES
    max_payload: int = MAX_PAYLOAD_BYTES
    max_ids: int = MAX_IDS_PER_REQUEST


DEFAULT_LIMITS = Limits()


@dataclass(slots=True)
class Frame:
    header: dict[str, Any]
    payload: bytearray

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
    returns the frames completed by those ``n`` bytes.
    """

    __slots__ = ("_end", "_filled", "_header", "_limits", "_payload", "_scratch", "_start")

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._scratch = bytearray(max(_SCRATCH_BYTES, limits.max_header + PREFIX.size))
        self._start = 0
        self._end = 0
        self._header: dict[str, Any] | None = None
        self._payload: bytearray | None = None
        self._filled = 0

    def get_buffer(self) -> memoryview:
        """Where the next bytes read from the connection must go."""
        if self._payload is not None:
            # Payload bytes land directly in the chunk's own buffer, and never past it.
            return memoryview(self._payload)[self._filled :]
        if self._end == len(self._scratch):
            # Compact: move the partial header to the front.
            pending = self._end - self._start
            self._scratch[:pending] = self._scratch[self._start : self._end]
            self._start, self._end = 0, pending
        return memoryview(self._scratch)[self._end :]

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        if self._payload is not None:
            self._filled += nbytes
            if self._filled < len(self._payload):
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

    def _finish_payload(self) -> Frame:
        assert self._header is not None
        assert self._payload is not None
        frame = Frame(self._header, self._payload)
        self._header, self._payload, self._filled = None, None, 0
        return frame

    def _parse_scratch(self) -> list[Frame]:
        frames: list[Frame] = []
        while self._end - self._start >= PREFIX.size:
            (hlen,) = PREFIX.unpack_from(self._scratch, self._start)
            if hlen > self._limits.max_header or hlen == 0:
                raise ProtocolError(f"frame header of {hlen} bytes is out of bounds")
            if self._end - self._start < PREFIX.size + hlen:
                break
            hstart = self._start + PREFIX.size
            header = _unpack_header(memoryview(self._scratch)[hstart : hstart + hlen])
            self._start = hstart + hlen
            size = header.get("n", 0)
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ProtocolError("frame payload length is not a count")
            if size > self._limits.max_payload:
                raise ProtocolError(f"frame payload of {size} bytes exceeds the limit")
            payload = bytearray(size)
            have = min(size, self._end - self._start)
            payload[:have] = memoryview(self._scratch)[self._start : self._start + have]
            self._start += have
            if have == size:
                frames.append(Frame(header, payload))
                continue
            # The scratch is drained; the rest of the payload is read in place.
            self._header, self._payload, self._filled = header, payload, have
            self._start = self._end = 0
            return frames
        if self._start == self._end:
            self._start = self._end = 0
        return frames


def _unpack_header(raw: memoryview) -> dict[str, Any]:
    try:
        header = msgpack.unpackb(raw, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"frame header is not valid msgpack ({type(exc).__name__})") from exc
    if not isinstance(header, dict):
        raise ProtocolError("frame header is not a map")
    return header
