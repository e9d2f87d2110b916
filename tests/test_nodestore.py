"""The node store: loose chunks and whole files by content, one LRU.

Loose chunks keep what the old chunk cache did (atomic writes, accounting across
restarts, LRU eviction between watermarks, pins, corrupt copies dropped on read).
Whole files add: written once at chunk offsets, read-only, chunks served from
them by offset and verified, changed files detected and never used, files not
covered by a ``sync`` dropped after a crash, the limit enforced at open.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import random_bytes

from blobstore import nodestore
from blobstore.config import CacheConfig
from blobstore.errors import ChunkMissing, Corrupt, CorruptChunk
from blobstore.ids import ChunkId, hash_bytes
from blobstore.manifest import ChunkRef
from blobstore.manifest import chunks_key as file_key
from blobstore.nodestore import NodeStore
from blobstore.seeds import Seed
from blobstore.source import ChunkData, ChunkStore

pytestmark = pytest.mark.anyio

KIB = 1 << 10


def chunk(i: int, size: int = 10 * KIB) -> tuple[ChunkId, bytes]:
    data = random_bytes(size, f"chunk-{i}")
    return hash_bytes(data), data


def split(data: bytes, size: int) -> list[tuple[ChunkRef, bytes, int]]:
    """(ref, bytes, offset) of each ``size``-byte piece of ``data``."""
    out = []
    for offset in range(0, len(data), size):
        piece = data[offset : offset + size]
        out.append((ChunkRef(hash_bytes(piece), len(piece)), piece, offset))
    return out


async def add_file(
    store: NodeStore, data: bytes, piece: int = 8 * KIB
) -> tuple[ChunkId, Path, list[ChunkRef]]:
    """Assemble ``data`` in the store, pieces written out of order from threads."""
    parts = split(data, piece)
    refs = [ref for ref, _, _ in parts]
    key = file_key(refs)
    writer = store.begin_file(key, len(data))
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda p: writer.write(p[1], p[2]), reversed(parts)))
    return key, await writer.commit(refs), refs


def stray_files(root: Path) -> list[str]:
    """Files that are neither loose chunks, store files, nor the store's own."""
    own = {"index.sqlite", "index.sqlite-wal", "index.sqlite-shm", "lock", ".lock"}
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file()
        and p.name not in own
        and not (len(p.parent.name) == 2 and p.name.startswith(p.parent.name))
    )


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def run_and_crash(root: Path, tests: str) -> None:
    subprocess.run(
        [sys.executable, "-c", _CRASHING_WRITER, str(root), tests],
        check=True,
        env={**os.environ, "PYTHONPATH": tests},
    )


def loose_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.glob("??/*"))


# ---------------------------------------------------------------------- loose chunks


async def test_put_get_has_and_layout(tmp_path: Path) -> None:
    async with NodeStore(CacheConfig(tmp_path / "c")) as store:
        assert isinstance(store, ChunkStore)
        cid, data = chunk(1)
        with pytest.raises(ChunkMissing):
            await store.get(cid)
        await store.put(cid, data)
        await store.put(cid, data)  # idempotent
        assert await store.get(cid) == data
        assert await store.has([cid, chunk(2)[0]]) == {cid}
        assert store.used_bytes == len(data)
        assert len(store) == 1
        # sharded final name, nothing else
        assert loose_files(tmp_path / "c") == [f"{cid[:2]}/{cid}"]
        assert stray_files(tmp_path / "c") == []


async def test_writes_are_atomic_no_temp_files_visible(tmp_path: Path) -> None:
    root = tmp_path / "c"
    async with NodeStore(CacheConfig(root)) as store:
        for i in range(20):
            await store.put(*chunk(i))
        assert stray_files(root) == []
    assert list((root / "tmp").iterdir()) == []  # a closed store leaves no temp dir


async def test_temp_files_of_dead_writers_cleaned_at_open(tmp_path: Path) -> None:
    root = tmp_path / "c"
    async with NodeStore(CacheConfig(root)) as store:
        cid, data = chunk(1)
        await store.put(cid, data)
    # The old cache layout's temp files, and a dead process's temp dir (its lock is free).
    (root / "tmp" / f"{chunk(2)[0]}.deadbeef").write_bytes(b"half a chu")
    dead = root / "tmp" / "4242.deadbeef"
    dead.mkdir()
    (dead / ".lock").touch()
    (dead / ("f" * 64)).write_bytes(b"partial file")
    async with NodeStore(CacheConfig(root)) as store:
        assert [p.name for p in (root / "tmp").iterdir()] == [store._tmp.name]
        assert len(store) == 1
        assert store.used_bytes == len(data)


async def test_a_live_stores_temp_files_survive_another_opening(tmp_path: Path) -> None:
    root = tmp_path / "c"
    data = random_bytes(20 * KIB, "live")
    async with NodeStore(CacheConfig(root)) as first:
        parts = split(data, 8 * KIB)
        writer = first.begin_file(file_key([r for r, _, _ in parts]), len(data))
        writer.write(parts[0][1], 0)
        key, path, _ = await add_file(first, random_bytes(30 * KIB, "unsynced"))
        async with NodeStore(CacheConfig(root)) as second:
            assert writer.tmp.exists()  # not a dead writer's: its owner holds the lock
            assert path.exists()  # committed, not synced yet, but its owner is alive
            assert second.open_file(key) is None  # not trusted before a sync
        await first.sync()
        async with NodeStore(CacheConfig(root)) as third:
            assert third.open_file(key) == path  # synced: adopted from the index
        await writer.abort()
        assert not writer.tmp.exists()


async def test_a_daemon_sees_the_files_a_pull_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nodestore, "REFRESH_SECONDS", 0.0)
    root = tmp_path / "c"
    data = random_bytes(40 * KIB, "shared")
    async with NodeStore(CacheConfig(root)) as daemon_store:
        async with NodeStore(CacheConfig(root)) as pull_store:
            key, path, refs = await add_file(pull_store, data)
            assert not daemon_store.contains(refs[0].id)  # not trusted before a sync
            await pull_store.sync()
        assert daemon_store.contains(refs[0].id)
        assert await daemon_store.has(r.id for r in refs) == {r.id for r in refs}
        assert await daemon_store.get(refs[2].id) == data[16 * KIB : 24 * KIB]
        assert daemon_store.used_bytes == len(data)
        assert daemon_store.open_file(key) == path


async def test_size_accounting_survives_reopen(tmp_path: Path) -> None:
    root = tmp_path / "c"
    sizes = [1, 10 * KIB, 300 * KIB, 7]
    async with NodeStore(CacheConfig(root)) as store:
        for i, size in enumerate(sizes):
            await store.put(*chunk(i, size))
        key, _, _ = await add_file(store, random_bytes(100 * KIB, "file"))
        used = store.used_bytes
    assert used == sum(sizes) + 100 * KIB
    # stray files that are not chunks are ignored by the scan
    (root / "ab").mkdir(exist_ok=True)
    (root / "ab" / "not-a-chunk").write_bytes(b"zzz")
    (root / "README").write_bytes(b"hello")
    async with NodeStore(CacheConfig(root)) as store:
        assert store.used_bytes == used
        assert len(store) == len(sizes) + 1
        for i, size in enumerate(sizes):
            cid, data = chunk(i, size)
            assert await store.get(cid) == data
        assert store.open_file(key) is not None


async def test_eviction_high_to_low_watermark_in_lru_order(tmp_path: Path) -> None:
    size = 10 * KIB
    config = CacheConfig(tmp_path / "c", max_bytes=100 * KIB, high_watermark=0.9, low_watermark=0.5)
    async with NodeStore(config) as store:
        ids = []
        for i in range(9):  # 90 KiB: at the high watermark, not above
            cid, data = chunk(i, size)
            await store.put(cid, data)
            ids.append(cid)
        assert store.used_bytes == 90 * KIB
        assert len(store) == 9
        await store.get(ids[0])  # a hit makes chunk 0 the most recently used
        await store.put(ids[1], chunk(1, size)[1])  # so does putting an existing chunk
        cid, data = chunk(9, size)
        await store.put(cid, data)  # 100 KiB > 90 KiB: evict down to 50 KiB
        ids.append(cid)
        assert store.used_bytes == 50 * KIB
        assert store.evicted_bytes == 50 * KIB
        survivors = await store.has(ids)
        # least recently used first: 2..6 go; 7, 8, 0, 1, 9 stay
        assert survivors == {ids[i] for i in (7, 8, 0, 1, 9)}
        assert len(loose_files(tmp_path / "c")) == 5


async def test_whole_files_are_eviction_units_in_the_same_lru(tmp_path: Path) -> None:
    config = CacheConfig(tmp_path / "c", max_bytes=100 * KIB, high_watermark=0.9, low_watermark=0.5)
    async with NodeStore(config) as store:
        old_key, old_path, old_refs = await add_file(store, random_bytes(30 * KIB, "old"))
        cid, data = chunk(1, 20 * KIB)
        await store.put(cid, data)
        new_key, new_path, _ = await add_file(store, random_bytes(30 * KIB, "new"))
        assert store.used_bytes == 80 * KIB
        assert store.open_file(old_key) == old_path  # old file: now most recent
        # 15 KiB more: 95 KiB > 90 KiB; down to 50 KiB, oldest first: the chunk, then new
        await add_file(store, random_bytes(15 * KIB, "third"))
        assert store.used_bytes == 45 * KIB
        assert not store.contains(cid)
        assert store.open_file(new_key) is None
        assert not new_path.exists()
        assert store.open_file(old_key) == old_path
        assert all(store.contains(r.id) for r in old_refs)


async def test_lru_order_of_files_survives_reopen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nodestore, "TOUCH_SECONDS", 0.0)
    root = tmp_path / "c"
    async with NodeStore(CacheConfig(root)) as store:
        key_a, path_a, _ = await add_file(store, random_bytes(20 * KIB, "lru-a"))
        key_b, _, _ = await add_file(store, random_bytes(20 * KIB, "lru-b"))
        assert store.open_file(key_a) == path_a  # a is now the most recently used
    async with NodeStore(CacheConfig(root)) as store:
        await store.evict(target=20 * KIB)
        assert store.open_file(key_b) is None
        assert store.open_file(key_a) == path_a


async def test_eviction_never_removes_another_stores_newer_copy(tmp_path: Path) -> None:
    root = tmp_path / "c"
    data = random_bytes(20 * KIB, "twice")
    async with NodeStore(CacheConfig(root)) as first, NodeStore(CacheConfig(root)) as second:
        key, path, _ = await add_file(first, data)
        await first.sync()
        old_ino = path.stat().st_ino
        again, _, _ = await add_file(second, data)  # the same file, assembled again
        assert again == key
        assert path.stat().st_ino != old_ino
        await first.evict(target=0)  # first's copy is gone from the path already
        assert path.read_bytes() == data
        assert second.open_file(key) == path
        assert first.open_file(key) is None  # second's copy is not synced: not trusted


async def test_lru_order_survives_reopen(tmp_path: Path) -> None:
    root = tmp_path / "c"
    ids = []
    async with NodeStore(CacheConfig(root)) as store:
        for i in range(4):
            cid, data = chunk(i)
            await store.put(cid, data)
            ids.append(cid)
    for age, cid in zip((400, 300, 200, 100), ids, strict=True):  # 0 oldest ... 3 newest
        path = root / cid[:2] / cid
        os.utime(path, (path.stat().st_atime, path.stat().st_mtime - age))
    async with NodeStore(CacheConfig(root)) as store:
        await store.get(ids[0])  # a read refreshes the file's mtime, too
    async with NodeStore(CacheConfig(root, max_bytes=100 * KIB)) as store:
        await store.evict(target=20 * KIB)
        assert await store.has(ids) == {ids[3], ids[0]}


async def test_pinned_chunks_and_files_are_never_evicted(tmp_path: Path) -> None:
    config = CacheConfig(tmp_path / "c", max_bytes=50 * KIB, high_watermark=1.0, low_watermark=0.2)
    async with NodeStore(config) as store:
        pinned = [chunk(i) for i in range(3)]
        with store.pinned([cid for cid, _ in pinned]):
            for cid, data in pinned:
                await store.put(cid, data)
            for i in range(3, 10):  # way over the limit; only unpinned chunks may go
                await store.put(*chunk(i))
            assert {cid for cid, _ in pinned} <= await store.has(cid for cid, _ in pinned)
            await store.evict(target=0)
            assert len(store) == 3
            assert store.used_bytes == 30 * KIB
        # nested pins count: still pinned while one holder remains
        with store.pinned([pinned[0][0]]), store.pinned([pinned[0][0]]):
            pass
        await store.evict(target=0)  # pins released: now they can go
        assert len(store) == 0
        assert store.used_bytes == 0
        assert loose_files(tmp_path / "c") == []

        _, path_a, refs_a = await add_file(store, random_bytes(20 * KIB, "a"))
        key_b, path_b, _ = await add_file(store, random_bytes(20 * KIB, "b"))
        with store.pinned([refs_a[1].id]), store.pinned_files([key_b]):
            await store.evict(target=0)  # a holds a pinned chunk, b is a pinned file
            assert path_a.exists()
            assert path_b.exists()
            assert store.used_bytes == 40 * KIB
        await store.evict(target=0)
        assert not path_a.exists()
        assert not path_b.exists()
        assert store.used_bytes == 0


async def test_corrupt_loose_chunk_is_dropped_not_served(tmp_path: Path) -> None:
    root = tmp_path / "c"
    async with NodeStore(CacheConfig(root)) as store:
        cid, data = chunk(1)
        await store.put(cid, data)
        path = store.path_of(cid)
        damaged = bytearray(data)
        damaged[100] ^= 0xFF
        path.write_bytes(bytes(damaged))
        with pytest.raises(CorruptChunk, match=f"{cid} is corrupt in local cache"):
            await store.get(cid)
        assert not path.exists()
        assert not store.contains(cid)
        assert store.used_bytes == 0
        with pytest.raises(ChunkMissing):
            await store.get(cid)
        await store.put(cid, data)  # a fresh copy can be stored again
        assert await store.get(cid) == data


async def test_truncated_and_vanished_loose_chunks(tmp_path: Path) -> None:
    async with NodeStore(CacheConfig(tmp_path / "c")) as store:
        (a, da), (b, db) = chunk(1), chunk(2)
        await store.put(a, da)
        await store.put(b, db)
        store.path_of(a).write_bytes(da[:5])  # torn by a power loss
        with pytest.raises(CorruptChunk):
            await store.get(a)
        store.path_of(b).unlink()  # removed behind our back
        with pytest.raises(ChunkMissing):
            await store.get(b)
        assert len(store) == 0
        assert store.used_bytes == 0


async def test_empty_chunk_and_empty_file(tmp_path: Path) -> None:
    async with NodeStore(CacheConfig(tmp_path / "c")) as store:
        cid = hash_bytes(b"")
        await store.put(cid, b"")
        assert await store.get(cid) == b""
        key = file_key([])
        path = await store.begin_file(key, 0).commit([])
        assert path.read_bytes() == b""
        assert store.open_file(key) == path


# ---------------------------------------------------------------------- whole files


async def test_whole_file_written_once_read_only_and_served_by_offset(tmp_path: Path) -> None:
    data = random_bytes(100 * KIB + 123, "whole")
    async with NodeStore(CacheConfig(tmp_path / "c")) as store:
        key, path, refs = await add_file(store, data)
        assert path == store.file_path(key)
        assert path.read_bytes() == data
        assert stat.S_IMODE(path.stat().st_mode) == 0o444
        assert store.open_file(key) == path
        assert store.used_bytes == len(data)
        assert len(store) == 1
        assert loose_files(tmp_path / "c") == []  # its chunks are not stored twice
        assert await store.has(r.id for r in refs) == {r.id for r in refs}
        for ref, piece, _ in split(data, 8 * KIB):
            assert await store.get(ref.id) == piece

        delivered: dict[ChunkId, ChunkData] = {}

        async def sink(ref: ChunkRef, chunk_data: ChunkData) -> None:
            delivered[ref.id] = chunk_data

        other = ChunkRef(chunk(9)[0], 10 * KIB)
        assert await store.fetch([*refs, other], sink) == [other]
        assert set(delivered) == {r.id for r in refs}
        assert stray_files(tmp_path / "c") == []


async def test_loose_copies_go_once_a_synced_file_holds_them(tmp_path: Path) -> None:
    data = random_bytes(24 * KIB, "loose-then-file")
    parts = split(data, 8 * KIB)
    async with NodeStore(CacheConfig(tmp_path / "c")) as store:
        for ref, piece, _ in parts[:2]:
            await store.put(ref.id, piece)  # a daemon's read-through
        pinned = parts[1][0].id
        with store.pinned([pinned]):
            await add_file(store, data)
            assert len(loose_files(tmp_path / "c")) == 2  # not durable yet: keep them
            await store.sync()
        assert loose_files(tmp_path / "c") == [f"{pinned[:2]}/{pinned}"]  # pinned stays
        assert store.used_bytes == len(data) + 8 * KIB
        for ref, piece, _ in parts:
            assert await store.get(ref.id) == piece


async def test_commit_refuses_an_incomplete_file_and_abort_cleans_up(tmp_path: Path) -> None:
    data = random_bytes(40 * KIB, "incomplete")
    parts = split(data, 8 * KIB)
    refs = [r for r, _, _ in parts]
    async with NodeStore(CacheConfig(tmp_path / "c")) as store:
        writer = store.begin_file(file_key(refs), len(data))
        for _, piece, offset in parts[:-1]:
            writer.write(piece, offset)
        with pytest.raises(Corrupt, match="bytes from 32768 on were not written"):
            await writer.commit(refs)
        assert not writer.tmp.exists()
        assert store.open_file(file_key(refs)) is None
        writer = store.begin_file(file_key(refs), len(data))  # a hole in the middle
        writer.write(data[: 8 * KIB], 0)
        writer.write(data[16 * KIB :], 16 * KIB)
        with pytest.raises(Corrupt, match="bytes from 8192 on"):
            await writer.commit(refs)
        writer = store.begin_file(file_key(refs), len(data))  # spans of several chunks
        writer.write(data[16 * KIB :], 16 * KIB)
        writer.write(data[: 20 * KIB], 0)
        assert (await writer.commit(refs)).read_bytes() == data
        writer = store.begin_file(file_key(refs), len(data))
        writer.write(parts[0][1], 0)
        assert writer.tmp.exists()
        await writer.abort()
        assert not writer.tmp.exists()
        assert store.used_bytes == len(data)  # the one whole file
        assert stray_files(tmp_path / "c") == []


async def test_commit_files_commits_a_batch_in_one_go(tmp_path: Path) -> None:
    async with NodeStore(CacheConfig(tmp_path / "c")) as store:
        datas = [random_bytes(3 * KIB + i, f"small-{i}") for i in range(20)]
        items = []
        for data in datas:
            refs = [ChunkRef(hash_bytes(data), len(data))]
            writer = store.begin_file(file_key(refs), len(data))
            writer.write(data, 0)
            items.append((writer, refs))
        paths = await store.commit_files(items)
        assert [p.read_bytes() for p in paths] == datas
        assert store.used_bytes == sum(map(len, datas))
        assert [store.open_file(file_key(refs)) for _, refs in items] == paths

        good, bad = random_bytes(1000, "good"), random_bytes(1000, "bad")
        good_refs = [ChunkRef(hash_bytes(good), 1000)]
        bad_refs = [ChunkRef(hash_bytes(bad), 1000)]
        good_writer = store.begin_file(file_key(good_refs), 1000)
        good_writer.write(good, 0)
        bad_writer = store.begin_file(file_key(bad_refs), 1000)  # never written
        with pytest.raises(Corrupt, match="were not written"):
            await store.commit_files([(bad_writer, bad_refs), (good_writer, good_refs)])
        assert store.open_file(file_key(good_refs)) is not None  # the rest committed
        assert store.open_file(file_key(bad_refs)) is None
        assert stray_files(tmp_path / "c") == []


async def test_a_file_changed_behind_our_back_is_never_used(tmp_path: Path) -> None:
    async with NodeStore(CacheConfig(tmp_path / "c")) as store:
        key, path, refs = await add_file(store, random_bytes(30 * KIB, "changed"))
        linked = tmp_path / "dest-copy"
        os.link(path, linked)  # a pull placing it by hardlink: still good
        assert store.open_file(key) == path
        assert await store.get(refs[0].id)
        await store.sync()
    async with NodeStore(CacheConfig(tmp_path / "c")) as store:
        assert store.open_file(key) == path  # and after a restart
        # a runner writes into its hardlinked copy (same inode)
        linked.chmod(0o644)
        overwrite(linked, 0, b"tuned!")
        assert store.open_file(key) is None  # detected, dropped
        assert not path.exists()
        assert linked.read_bytes()[:6] == b"tuned!"  # the runner's copy is left alone
        assert not store.contains(refs[0].id)
        with pytest.raises(ChunkMissing):
            await store.get(refs[0].id)
        assert store.used_bytes == 0

        key, path, refs = await add_file(store, random_bytes(30 * KIB, "changed-2"))
        path.chmod(0o644)  # a mode change alone is a change too
        with pytest.raises(ChunkMissing):
            await store.get(refs[0].id)  # never served
        assert not path.exists()


async def test_bit_rot_in_a_store_file_is_caught_on_read(tmp_path: Path) -> None:
    root = tmp_path / "c"
    async with NodeStore(CacheConfig(root)) as store:
        key, path, refs = await add_file(store, random_bytes(30 * KIB, "rot"))
    # Flip a byte, then make the index agree with the new stat: bit rot on the
    # medium changes no metadata, so only verifying the bytes can catch it.
    path.chmod(0o644)
    overwrite(path, 9 * KIB, b"\xff")
    path.chmod(0o444)
    st = path.stat()
    with sqlite3.connect(root / "index.sqlite") as db:
        db.execute(
            "UPDATE files SET mtime_ns = ?, ctime_ns = ? WHERE key = ?",
            (st.st_mtime_ns, st.st_ctime_ns, key),
        )
    db.close()
    async with NodeStore(CacheConfig(root)) as store:
        assert await store.get(refs[0].id)  # the first chunk is intact
        with pytest.raises(CorruptChunk, match="in local cache"):
            await store.get(refs[1].id)
        assert not path.exists()  # the whole file is dropped
        assert not store.contains(refs[0].id)
        assert store.used_bytes == 0


_CRASHING_WRITER = """
import os, sys, anyio
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from test_nodestore import add_file
from helpers import random_bytes
from blobstore.config import CacheConfig
from blobstore import nodestore
from blobstore.nodestore import NodeStore
from blobstore.seeds import Seed

async def main():
    store = NodeStore(CacheConfig(Path(sys.argv[1])))
    await store.open()
    await add_file(store, random_bytes(50 * 1024, "synced"))
    await store.sync()
    await add_file(store, random_bytes(60 * 1024, "unsynced"))
    w = store.begin_file("e" * 64, 1000)
    w.write(b"x" * 100, 0)
    os._exit(0)  # a crash: no sync, no cleanup

anyio.run(main)
"""


async def test_files_not_covered_by_a_sync_are_dropped_after_a_crash(tmp_path: Path) -> None:
    root = tmp_path / "c"
    tests = str(Path(__file__).parent)
    run_and_crash(root, tests)
    assert len(list((root / "files").rglob("*"))) == 4  # 2 shard dirs, 2 files
    synced = file_key([r for r, _, _ in split(random_bytes(50 * KIB, "synced"), 8 * KIB)])
    unsynced = next(p for p in (root / "files").rglob("*") if p.is_file() and p.name != synced)
    # What a power loss may leave of a file no sync covered: a torn one, under its name.
    os.truncate(unsynced, 20 * KIB)
    async with NodeStore(CacheConfig(root)) as store:
        assert store.used_bytes == 50 * KIB  # only the synced file is trusted
        assert len(store) == 1
        assert len([p for p in (root / "files").rglob("*") if p.is_file()]) == 1
        assert [p.name for p in (root / "tmp").iterdir()] == [store._tmp.name]
        assert store.open_file(synced) is not None
        assert not unsynced.exists()


async def test_an_unreadable_index_is_replaced_not_fatal(tmp_path: Path) -> None:
    root = tmp_path / "c"
    async with NodeStore(CacheConfig(root)) as store:
        cid, data = chunk(1)
        await store.put(cid, data)
        key, path, _ = await add_file(store, random_bytes(30 * KIB, "lost-index"))
    for name in ("index.sqlite-wal", "index.sqlite-shm"):
        (root / name).unlink(missing_ok=True)
    (root / "index.sqlite").write_bytes(b"not a database, " * 100)
    (root / "files" / "zz").mkdir()  # a stray directory is left alone
    async with NodeStore(CacheConfig(root)) as store:
        assert await store.get(cid) == data  # loose chunks need no index
        assert store.open_file(key) is None  # files are no longer vouched for: dropped
        assert not path.exists()
        assert store.used_bytes == len(data)
        await add_file(store, random_bytes(30 * KIB, "new-index"))
        await store.sync()
    assert (root / "files" / "zz").is_dir()


async def test_limit_enforced_when_the_store_opens(tmp_path: Path) -> None:
    root = tmp_path / "c"
    async with NodeStore(CacheConfig(root)) as store:
        for i in range(10):
            await store.put(*chunk(i))
        await add_file(store, random_bytes(50 * KIB, "f"))
    assert store.used_bytes == 150 * KIB
    config = CacheConfig(root, max_bytes=100 * KIB, high_watermark=0.9, low_watermark=0.5)
    async with NodeStore(config) as store:
        assert store.used_bytes <= 50 * KIB
        on_disk = sum(p.stat().st_size for p in root.glob("??/*"))
        on_disk += sum(p.stat().st_size for p in (root / "files").rglob("*") if p.is_file())
        assert on_disk == store.used_bytes


# --------------------------------------------------------------------------- seeds


def _seed_of(path: Path, data: bytes, boot: str, durable: bool) -> Seed:
    parts = split(data, 8 * KIB)
    refs = [ref for ref, _, _ in parts]
    path.write_bytes(data)
    return Seed.of(
        file_key(refs),
        str(path),
        os.stat(path),
        tuple((r.id, off, r.size) for r, _, off in parts),
        boot,
        durable,
    )


async def test_seeds_are_read_never_owned_and_dropped_after_a_reboot_unless_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = CacheConfig(tmp_path / "cache", max_bytes=1 << 20)
    fresh = _seed_of(tmp_path / "fresh.bin", random_bytes(40 * KIB, "a"), "boot-1", False)
    durable = _seed_of(tmp_path / "durable.bin", random_bytes(40 * KIB, "b"), "boot-1", True)
    monkeypatch.setattr(nodestore, "boot", lambda: ("boot-1", 0))
    async with NodeStore(config) as store:
        store.adopt_seeds([fresh, durable])
        assert store.used_bytes == 0  # the user's files: never counted ...
        await store.evict(0)
        assert store.open_seed(fresh.key) == fresh  # ... nor evicted
        first = fresh.chunks[0]
        assert await store.get(first[0]) == (tmp_path / "fresh.bin").read_bytes()[: first[2]]
    async with NodeStore(config) as store:  # same boot: both still trusted
        assert store.open_seed(fresh.key) == fresh
        assert store.open_seed(durable.key) == durable
    monkeypatch.setattr(nodestore, "boot", lambda: ("boot-2", 0))
    async with NodeStore(config) as store:  # after a reboot: only the durable one
        assert store.open_seed(fresh.key) is None
        assert store.contains(fresh.chunks[0][0]) is False
        assert store.open_seed(durable.key) == durable
        overwrite(tmp_path / "durable.bin", 0, b"changed")  # its stat moves: forgotten
        assert store.open_seed(durable.key) is None
        with pytest.raises(ChunkMissing):
            await store.get(durable.chunks[0][0])
    assert (tmp_path / "fresh.bin").exists()  # never deleted by the store
    assert (tmp_path / "durable.bin").exists()


def test_seed_rows_are_compact_and_read_back_whole() -> None:
    """Keys and UUID boot ids as raw bytes, a one-chunk file's chunk list as its
    chunk id; every row reads back as the seed it was."""
    kernel_boot = "0f8fad5b-d9cb-469f-a165-70867728950e"
    st = os.stat(__file__)
    one_id = hash_bytes(b"one")
    many = ((hash_bytes(b"a"), 0, 3), (hash_bytes(b"b"), 3, 4))
    for boot, chunks in ((kernel_boot, ((one_id, 0, st.st_size),)), ("", many), ("x-1", many)):
        seed = Seed.of(
            file_key([ChunkRef(c, s) for c, _, s in chunks]), __file__, st, chunks, boot, False
        )
        row = seed.row()
        assert len(row[0]) == 32
        assert Seed.from_row(row) == seed
    assert Seed.of(file_key([]), __file__, st, ((one_id, 0, st.st_size),), kernel_boot, True).row()[
        7
    ] == bytes.fromhex(kernel_boot.replace("-", ""))


async def test_seeds_in_the_first_table_layout_are_moved_and_still_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node store written by an earlier version (table ``seeds``, hex text)
    keeps its seeds: moved into the compact table at open, the old table dropped."""
    config = CacheConfig(tmp_path / "cache", max_bytes=1 << 20)
    seed = _seed_of(tmp_path / "seeded.bin", random_bytes(40 * KIB, "old"), "boot-1", False)
    monkeypatch.setattr(nodestore, "boot", lambda: ("boot-1", 0))
    async with NodeStore(config):
        pass  # creates the index
    db = sqlite3.connect(tmp_path / "cache" / "index.sqlite")
    with db:
        db.execute(
            """CREATE TABLE seeds (key TEXT PRIMARY KEY, path TEXT NOT NULL, dev INTEGER NOT NULL,
            ino INTEGER NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
            ctime_ns INTEGER NOT NULL, boot TEXT NOT NULL, durable INTEGER NOT NULL,
            chunks BLOB NOT NULL)"""
        )
        blob = b"".join(bytes.fromhex(c) + s.to_bytes(8, "big") for c, _, s in seed.chunks)
        row = (seed.key, seed.path, seed.dev, seed.ino, seed.size, seed.mtime_ns)
        row_rest = (seed.ctime_ns, seed.boot, 0, blob)
        db.execute(
            "INSERT INTO seeds VALUES (?,?,?,?,?,?,?,?,?,?)",
            row + row_rest,
        )
    db.close()
    async with NodeStore(config) as store:
        assert store.open_seed(seed.key) == seed
        first = seed.chunks[0]
        assert await store.get(first[0]) == (tmp_path / "seeded.bin").read_bytes()[: first[2]]
    db = sqlite3.connect(tmp_path / "cache" / "index.sqlite")
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    db.close()
    assert "seeds" not in tables
