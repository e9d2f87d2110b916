"""The local chunk cache: atomic writes, accounting across restarts, LRU
eviction between watermarks, pins, and corrupt files dropped on read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import random_bytes

from blobstore.config import CacheConfig
from blobstore.errors import ChunkMissing, CorruptChunk
from blobstore.ids import ChunkId, hash_bytes
from blobstore.local import LocalCache
from blobstore.source import ChunkStore

pytestmark = pytest.mark.anyio

KIB = 1 << 10


def chunk(i: int, size: int = 10 * KIB) -> tuple[ChunkId, bytes]:
    data = random_bytes(size, f"chunk-{i}")
    return hash_bytes(data), data


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


async def test_put_get_has_and_layout(tmp_path: Path) -> None:
    async with LocalCache(CacheConfig(tmp_path / "c")) as cache:
        assert isinstance(cache, ChunkStore)
        cid, data = chunk(1)
        with pytest.raises(ChunkMissing):
            await cache.get(cid)
        await cache.put(cid, data)
        await cache.put(cid, data)  # idempotent
        assert await cache.get(cid) == data
        assert await cache.has([cid, chunk(2)[0]]) == {cid}
        assert cache.used_bytes == len(data)
        assert len(cache) == 1
        # sharded final name, nothing left in tmp/
        assert files_under(tmp_path / "c") == [f"{cid[:2]}/{cid}"]


async def test_writes_are_atomic_no_temp_files_visible(tmp_path: Path) -> None:
    root = tmp_path / "c"
    async with LocalCache(CacheConfig(root)) as cache:
        for i in range(20):
            await cache.put(*chunk(i))
        assert list((root / "tmp").iterdir()) == []
        assert all(not name.startswith("tmp/") for name in files_under(root))


async def test_crashed_writer_temp_files_cleaned_at_open(tmp_path: Path) -> None:
    root = tmp_path / "c"
    async with LocalCache(CacheConfig(root)) as cache:
        cid, data = chunk(1)
        await cache.put(cid, data)
    # A writer killed between write and rename leaves its temp file behind.
    (root / "tmp" / f"{chunk(2)[0]}.deadbeef").write_bytes(b"half a chu")
    (root / "tmp" / "junk").write_bytes(b"x")
    async with LocalCache(CacheConfig(root)) as cache:
        assert list((root / "tmp").iterdir()) == []
        assert len(cache) == 1
        assert cache.used_bytes == len(data)


async def test_size_accounting_survives_reopen(tmp_path: Path) -> None:
    root = tmp_path / "c"
    sizes = [1, 10 * KIB, 300 * KIB, 7]
    async with LocalCache(CacheConfig(root)) as cache:
        for i, size in enumerate(sizes):
            await cache.put(*chunk(i, size))
        used = cache.used_bytes
    assert used == sum(sizes)
    # stray files that are not chunks are ignored by the scan
    (root / "ab").mkdir(exist_ok=True)
    (root / "ab" / "not-a-chunk").write_bytes(b"zzz")
    (root / "README").write_bytes(b"hello")
    async with LocalCache(CacheConfig(root)) as cache:
        assert cache.used_bytes == used
        assert len(cache) == len(sizes)
        for i, size in enumerate(sizes):
            cid, data = chunk(i, size)
            assert await cache.get(cid) == data


async def test_eviction_high_to_low_watermark_in_lru_order(tmp_path: Path) -> None:
    size = 10 * KIB
    config = CacheConfig(tmp_path / "c", max_bytes=100 * KIB, high_watermark=0.9,
                         low_watermark=0.5)
    async with LocalCache(config) as cache:
        ids = []
        for i in range(9):  # 90 KiB: at the high watermark, not above
            cid, data = chunk(i, size)
            await cache.put(cid, data)
            ids.append(cid)
        assert cache.used_bytes == 90 * KIB
        assert len(cache) == 9
        await cache.get(ids[0])  # a hit makes chunk 0 the most recently used
        await cache.put(ids[1], chunk(1, size)[1])  # so does putting an existing chunk
        cid, data = chunk(9, size)
        await cache.put(cid, data)  # 100 KiB > 90 KiB: evict down to 50 KiB
        ids.append(cid)
        assert cache.used_bytes == 50 * KIB
        assert cache.evicted_bytes == 50 * KIB
        survivors = await cache.has(ids)
        # least recently used first: 2..6 go; 7, 8, 0, 1, 9 stay
        assert survivors == {ids[i] for i in (7, 8, 0, 1, 9)}
        assert len(files_under(tmp_path / "c")) == 5


async def test_lru_order_survives_reopen(tmp_path: Path) -> None:
    root = tmp_path / "c"
    ids = []
    async with LocalCache(CacheConfig(root)) as cache:
        for i in range(4):
            cid, data = chunk(i)
            await cache.put(cid, data)
            ids.append(cid)
    for age, cid in zip((400, 300, 200, 100), ids, strict=True):  # 0 oldest ... 3 newest
        path = root / cid[:2] / cid
        os.utime(path, (path.stat().st_atime, path.stat().st_mtime - age))
    async with LocalCache(CacheConfig(root)) as cache:
        await cache.get(ids[0])  # a read refreshes the file's mtime, too
    async with LocalCache(CacheConfig(root, max_bytes=100 * KIB)) as cache:
        await cache.evict(target=20 * KIB)
        assert await cache.has(ids) == {ids[3], ids[0]}


async def test_pinned_chunks_are_never_evicted(tmp_path: Path) -> None:
    config = CacheConfig(tmp_path / "c", max_bytes=50 * KIB, high_watermark=1.0,
                         low_watermark=0.2)
    async with LocalCache(config) as cache:
        pinned = [chunk(i) for i in range(3)]
        with cache.pinned([cid for cid, _ in pinned]):
            for cid, data in pinned:
                await cache.put(cid, data)
            for i in range(3, 10):  # way over the limit; only unpinned chunks may go
                await cache.put(*chunk(i))
            assert {cid for cid, _ in pinned} <= await cache.has(cid for cid, _ in pinned)
            await cache.evict(target=0)
            assert len(cache) == 3
            assert cache.used_bytes == 30 * KIB
        # nested pins count: still pinned while one holder remains
        with cache.pinned([pinned[0][0]]), cache.pinned([pinned[0][0]]):
            pass
        await cache.evict(target=0)  # pins released: now they can go
        assert len(cache) == 0
        assert cache.used_bytes == 0
        assert files_under(tmp_path / "c") == []


async def test_corrupt_cached_chunk_is_dropped_not_served(tmp_path: Path) -> None:
    root = tmp_path / "c"
    async with LocalCache(CacheConfig(root)) as cache:
        cid, data = chunk(1)
        await cache.put(cid, data)
        path = cache.path_of(cid)
        damaged = bytearray(data)
        damaged[100] ^= 0xFF
        path.write_bytes(bytes(damaged))
        with pytest.raises(CorruptChunk, match=f"{cid} is corrupt in local cache"):
            await cache.get(cid)
        assert not path.exists()
        assert not cache.contains(cid)
        assert cache.used_bytes == 0
        with pytest.raises(ChunkMissing):
            await cache.get(cid)
        await cache.put(cid, data)  # a fresh copy can be stored again
        assert await cache.get(cid) == data


async def test_truncated_and_vanished_cached_chunks(tmp_path: Path) -> None:
    async with LocalCache(CacheConfig(tmp_path / "c")) as cache:
        (a, da), (b, db) = chunk(1), chunk(2)
        await cache.put(a, da)
        await cache.put(b, db)
        cache.path_of(a).write_bytes(da[:5])  # torn by a power loss
        with pytest.raises(CorruptChunk):
            await cache.get(a)
        cache.path_of(b).unlink()  # removed behind our back
        with pytest.raises(ChunkMissing):
            await cache.get(b)
        assert len(cache) == 0
        assert cache.used_bytes == 0


async def test_empty_chunk(tmp_path: Path) -> None:
    async with LocalCache(CacheConfig(tmp_path / "c")) as cache:
        cid = hash_bytes(b"")
        await cache.put(cid, b"")
        assert await cache.get(cid) == b""
