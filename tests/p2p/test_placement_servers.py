"""A node asked as one of a chunk's servers while its own view makes it the chunk's
home (its view lags the asker's: a rolling start) answers from its cache only; the
home the asker sees reads the store. The flag travels per id on the get request."""

from __future__ import annotations

import asyncio

import pytest

from blobstore.errors import ProtocolError
from blobstore.ids import ChunkId, hash_bytes
from p2p import messages
from p2p.metrics import Metrics
from p2p.provider import ChunkProvider

pytestmark = pytest.mark.anyio

IDS = [ChunkId(hash_bytes(str(i).encode())) for i in range(3)]


def test_the_server_flag_travels_per_id_and_only_when_set() -> None:
    assert "srv" not in messages.get(IDS, [False, False, False])
    header = messages.get(IDS, [False, True, False])
    assert messages.as_server_field(header, 3) == [False, True, False]
    assert messages.as_server_field(messages.get(IDS), 3) == [False] * 3  # older clients
    for bad in ([True], [1, 0, 0], "yes"):
        with pytest.raises(ProtocolError):
            messages.as_server_field({**header, "srv": bad}, 3)


class _Cache:
    def __init__(self) -> None:
        self.held: dict[ChunkId, bytes] = {}

    def contains(self, chunk_id: ChunkId) -> bool:
        return chunk_id in self.held

    async def get(self, chunk_id: ChunkId) -> bytes:
        return self.held[chunk_id]

    async def put(self, chunk_id: ChunkId, data: bytes) -> None:
        self.held[chunk_id] = data


class _HomeRead:
    """A ReadThrough whose daemon takes itself for every chunk's home."""

    def __init__(self) -> None:
        self.reads = 0

    async def read(self, chunk_id: ChunkId) -> tuple[bytes, str]:
        self.reads += 1
        return b"chunk", "origin"

    async def homes(self, chunk_id: ChunkId) -> bool:
        return True

    def reading(self, chunk_id: ChunkId) -> bool:
        return False


async def test_a_home_asked_as_a_server_answers_from_its_cache_only() -> None:
    cache, origin = _Cache(), _HomeRead()
    async with asyncio.TaskGroup() as tg:
        provider = ChunkProvider(cache, origin, lambda _: True, Metrics(), tg)  # type: ignore[arg-type]
        assert await provider.lookup(IDS[0], as_server=True) == (None, "")
        assert origin.reads == 0  # the home the asker sees reads the store, not this node
        assert await provider.lookup(IDS[0]) == (b"chunk", "origin")  # asked as its home
        assert await provider.lookup(IDS[0], as_server=True) == (b"chunk", "local")
    assert origin.reads == 1
