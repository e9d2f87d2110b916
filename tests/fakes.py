"""In-memory fakes at the core's interfaces, shared by the unit tests.

``FakeSource`` is a ChunkStore (get / has / put / fetch, plus the node store's
``contains``) that can lie, fail or stall on demand; ``Collect`` is a fetch sink
that keeps what it is given; ``FakeTqdm`` a progress bar class as
huggingface_hub's ``tqdm_class`` passes them. Integration tests use the real parts instead (file
and S3 stores, peer daemons).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import ClassVar

import anyio

from blobstore.errors import ChunkMissing, CorruptChunk, DiskFull, PeerUnavailable
from blobstore.ids import ChunkId
from blobstore.manifest import ChunkRef
from blobstore.source import ChunkData, Sink, Undelivered


class FakeSource:
    """A ChunkStore in memory that can lie, fail, or stall.

    ``lies``: ids answered with CorruptChunk; ``down``: every read raises
    PeerUnavailable; ``full``: ``put`` raises DiskFull;
    ``whole_down``: ``fetch`` fails for the whole batch;
    ``gate``: reads wait until it is set. ``gets`` and ``fetches`` record the
    calls, in order.
    """

    name = "local"

    def __init__(self, name: str | None = None, chunks: dict[ChunkId, bytes] | None = None) -> None:
        if name is not None:
            self.name = name
        self.chunks = dict(chunks or {})
        self.lies: set[ChunkId] = set()
        self.down = False
        self.full = False
        self.whole_down = False
        self.gate: anyio.Event | None = None
        self.gets: list[ChunkId] = []
        self.fetches: list[list[ChunkId]] = []

    def contains(self, chunk_id: ChunkId) -> bool:
        return chunk_id in self.chunks

    async def has(self, chunk_ids: Iterable[ChunkId]) -> set[ChunkId]:
        return {c for c in chunk_ids if c in self.chunks}

    async def put(self, chunk_id: ChunkId, data: ChunkData) -> None:
        if self.full:
            raise DiskFull(f"{self.name}: disk full")
        self.chunks[chunk_id] = bytes(data)

    async def get(self, chunk_id: ChunkId) -> bytes:
        self.gets.append(chunk_id)
        return await self._read(chunk_id)

    async def fetch(self, refs: Sequence[ChunkRef], sink: Sink) -> list[ChunkRef]:
        self.fetches.append([r.id for r in refs])
        if self.whole_down:
            raise PeerUnavailable(f"{self.name} is down")
        left = Undelivered()
        for ref in refs:
            try:
                data = await self._read(ref.id)
            except (ChunkMissing, CorruptChunk, PeerUnavailable) as exc:
                left.add(ref, exc)
                continue
            await sink(ref, data)
        return left

    async def _read(self, chunk_id: ChunkId) -> bytes:
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise PeerUnavailable(f"{self.name} is down")
        if chunk_id not in self.chunks:
            raise ChunkMissing(chunk_id, self.name)
        if chunk_id in self.lies:
            raise CorruptChunk(chunk_id, self.name)
        return self.chunks[chunk_id]


class Collect:
    """A fetch sink that keeps what it is given: ``delivered`` in order (repeats
    included), ``got`` the last bytes per ref, ``calls`` how many deliveries."""

    def __init__(self) -> None:
        self.delivered: list[tuple[ChunkRef, bytes]] = []
        self.got: dict[ChunkRef, bytes] = {}

    @property
    def calls(self) -> int:
        return len(self.delivered)

    async def __call__(self, ref: ChunkRef, data: ChunkData) -> None:
        self.delivered.append((ref, bytes(data)))
        self.got[ref] = bytes(data)


class FakeTqdm:
    """The tqdm surface huggingface_hub's ``tqdm_class`` convention uses."""

    made: ClassVar[list[FakeTqdm]] = []

    def __init__(self, *, total: int, unit: str, unit_scale: bool, desc: str) -> None:
        self.total, self.unit, self.unit_scale, self.desc = total, unit, unit_scale, desc
        self.n = 0
        self.updates = 0
        self.postfix = ""
        self.closed = False
        FakeTqdm.made.append(self)

    def update(self, n: int) -> None:
        assert not self.closed
        self.n += n
        self.updates += 1

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        self.closed = True
