"""The small protocols every tier implements.

A ``ChunkSource`` answers ``get`` and ``has``; a ``ChunkStore`` adds ``put``.
The local cache, peers, the object store and test fakes all satisfy them, and
the tier order local -> peers -> origin is a list of sources (see tiers.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from .ids import ChunkId

ChunkData = bytes | bytearray
"""Chunk bytes as a source hands them out (a peer's receive buffer is a
bytearray; copying it into ``bytes`` would cost a pass over every byte).
Consumers must not mutate it: single-flight shares one buffer."""


@runtime_checkable
class ChunkSource(Protocol):
    """Somewhere chunks can be read from."""

    name: str
    """Tier label used in statistics: "local", "peer" or "origin"."""

    async def get(self, chunk_id: ChunkId) -> ChunkData:
        """Return the chunk's bytes, verified against ``chunk_id``.

        Raises ChunkMissing if the source does not hold it, CorruptChunk if the
        bytes it holds are wrong, Unavailable if it cannot answer now.
        """
        ...

    async def has(self, chunk_ids: Iterable[ChunkId]) -> set[ChunkId]:
        """Return the subset of ``chunk_ids`` this source holds (best effort)."""
        ...


@runtime_checkable
class ChunkStore(ChunkSource, Protocol):
    """A chunk source that can also store chunks."""

    async def put(self, chunk_id: ChunkId, data: ChunkData) -> None:
        """Store ``data`` under ``chunk_id`` (the caller has verified it).

        Idempotent. Raises Unavailable (DiskFull included) on failure.
        """
        ...
