"""Content addresses: BLAKE3-256, 64 lowercase hex characters in text."""

from __future__ import annotations

import re
from typing import NewType

import blake3

from .errors import BadInput, CorruptChunk

ChunkId = NewType("ChunkId", str)
"""BLAKE3-256 of a chunk's (or manifest's) bytes, as 64 lowercase hex chars."""

ID_BYTES = 32
_HEX_RE = re.compile(r"[0-9a-f]{64}")

# Above this size, BLAKE3's own threads beat one core (measured ~2x on 2 cores).
_THREADED_HASH_MIN = 8 << 20
VERIFY_IN_THREAD_MIN = 256 << 10
"""Buffers at least this big are hashed in a worker thread, not on the event
loop: BLAKE3 takes ~0.25 ms/MiB (and releases the GIL), a thread hop ~50 µs."""


def hash_bytes(data: bytes | bytearray | memoryview) -> ChunkId:
    """Return the content id of ``data``. Releases the GIL for large inputs."""
    threads = blake3.blake3.AUTO if len(data) >= _THREADED_HASH_MIN else 1
    return ChunkId(blake3.blake3(data, max_threads=threads).hexdigest())


def parse_id(text: str) -> ChunkId:
    """Validate a textual id. Raises BadInput if it is not 64 lowercase hex chars."""
    if not isinstance(text, str) or not _HEX_RE.fullmatch(text):
        raise BadInput(f"not a blobstore id: {str(text)[:80]!r}")
    return ChunkId(text)


def is_id(text: str) -> bool:
    """True if ``text`` is a well-formed id."""
    return isinstance(text, str) and _HEX_RE.fullmatch(text) is not None


def verify(chunk_id: str, data: bytes | bytearray | memoryview, where: str = "") -> None:
    """Check that ``data`` hashes to ``chunk_id``. Raises CorruptChunk otherwise."""
    actual = hash_bytes(data)
    if actual != chunk_id:
        raise CorruptChunk(chunk_id, where, actual)


async def verify_off_loop(
    chunk_id: str, data: bytes | bytearray | memoryview, where: str = ""
) -> None:
    """``verify`` in a worker thread for buffers of ``VERIFY_IN_THREAD_MIN``
    bytes or more, on the loop below that. Raises CorruptChunk."""
    if len(data) >= VERIFY_IN_THREAD_MIN:
        import anyio.to_thread  # here: the sync users of this module need no event loop

        await anyio.to_thread.run_sync(verify, chunk_id, data, where)
    else:
        verify(chunk_id, data, where)


def id_to_bytes(chunk_id: str) -> bytes:
    return bytes.fromhex(chunk_id)


def id_from_bytes(raw: bytes) -> ChunkId:
    if not isinstance(raw, bytes) or len(raw) != ID_BYTES:
        raise BadInput("an id must be 32 bytes")
    return ChunkId(raw.hex())
