"""The node's local chunk cache: sharded files, atomic writes, LRU eviction.

Layout: ``<dir>/<id[0:2]>/<id>``; temp files live in ``<dir>/tmp`` and are
renamed into place, so a crash never leaves a half chunk under a final name.
Every read is verified: a corrupt file is dropped and reported as
``CorruptChunk`` so the tier list fetches the chunk again — never served.

Sizes are rebuilt from disk when the cache opens (LRU order from mtimes, which
hits refresh), so accounting survives restarts. Index bookkeeping happens on
the event loop; file I/O runs in worker threads.
"""

from __future__ import annotations

import errno
import logging
import os
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import anyio

from .config import CacheConfig
from .errors import ChunkMissing, CorruptChunk, DiskFull, Unavailable
from .ids import ChunkId, hash_bytes, is_id
from .manifest import ChunkRef
from .resource import AsyncResource
from .source import ChunkData, Sink, fetch_each

log = logging.getLogger(__name__)

TOUCH_SECONDS = 60.0


class LocalCache(AsyncResource):
    """A ``ChunkStore`` on local disk with a byte limit and LRU eviction."""

    name = "local"

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.root = Path(config.dir)
        self._tmp = self.root / "tmp"
        self._index: OrderedDict[ChunkId, int] = OrderedDict()  # oldest first
        self._touched: dict[ChunkId, float] = {}  # mtime we last gave each file
        self._pins: Counter[ChunkId] = Counter()
        self.used_bytes = 0
        self.evicted_bytes = 0

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Create the directory and rebuild the index from disk.

        Raises Unavailable if the directory cannot be created or read.
        """
        try:
            entries = await anyio.to_thread.run_sync(self._scan)
        except OSError as exc:
            raise Unavailable(f"cannot open cache {self.root}: {exc.strerror}") from exc
        entries.sort(key=lambda e: e[2])
        for chunk_id, size, mtime in entries:
            self._index[chunk_id] = size
            self._touched[chunk_id] = mtime
        self.used_bytes = sum(size for _, size, _ in entries)

    def _scan(self) -> list[tuple[ChunkId, int, float]]:
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(exist_ok=True)
        for leftover in self._tmp.iterdir():  # temp files of a crashed writer
            leftover.unlink(missing_ok=True)
        found: list[tuple[ChunkId, int, float]] = []
        with os.scandir(self.root) as shards:
            for shard in shards:
                if len(shard.name) != 2 or not shard.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(shard.path) as files:
                    for f in files:
                        if is_id(f.name) and f.name.startswith(shard.name):
                            st = f.stat(follow_symlinks=False)
                            found.append((ChunkId(f.name), st.st_size, st.st_mtime))
        return found

    # ------------------------------------------------------------------ ChunkStore

    def path_of(self, chunk_id: ChunkId) -> Path:
        return self.root / chunk_id[:2] / chunk_id

    def contains(self, chunk_id: ChunkId) -> bool:
        return chunk_id in self._index

    async def has(self, chunk_ids: Iterable[ChunkId]) -> set[ChunkId]:
        return {c for c in chunk_ids if c in self._index}

    async def fetch(self, refs: Sequence[ChunkRef], sink: Sink) -> list[ChunkRef]:
        return await fetch_each(self.get, refs, sink)

    async def get(self, chunk_id: ChunkId) -> ChunkData:
        """Return the verified chunk. Raises ChunkMissing, or CorruptChunk after
        dropping a damaged file."""
        if chunk_id not in self._index:
            raise ChunkMissing(chunk_id, "local cache")
        path = self.path_of(chunk_id)
        # Refreshing the mtime (the LRU order a restart sees) dirties the inode;
        # doing it on every hit cost a journal write per chunk served. The
        # in-memory order is exact; the on-disk one is exact to TOUCH_SECONDS.
        now = time.time()
        touch = now - self._touched.get(chunk_id, 0.0) > TOUCH_SECONDS
        try:
            data, actual = await anyio.to_thread.run_sync(_read_and_hash, path, touch)
        except FileNotFoundError:
            self._forget(chunk_id)
            raise ChunkMissing(chunk_id, "local cache") from None
        except OSError as exc:
            raise Unavailable(f"cannot read cached chunk {chunk_id}: {exc.strerror}") from exc
        if actual != chunk_id:
            log.warning("dropping corrupt cached chunk %s", chunk_id)
            self._forget(chunk_id)
            await anyio.to_thread.run_sync(_unlink, path)
            raise CorruptChunk(chunk_id, "local cache", actual)
        self._index.move_to_end(chunk_id)
        if touch:
            self._touched[chunk_id] = now
        return data

    async def put(self, chunk_id: ChunkId, data: ChunkData) -> None:
        """Store a verified chunk. Raises DiskFull (after evicting what it can)."""
        if chunk_id in self._index:
            self._index.move_to_end(chunk_id)
            return
        try:
            await anyio.to_thread.run_sync(self._write, chunk_id, data)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                await self.evict(target=self.used_bytes // 2)
                raise DiskFull(f"no space left for the cache in {self.root}") from exc
            raise Unavailable(f"cannot write cache {self.root}: {exc.strerror}") from exc
        if chunk_id not in self._index:
            self._index[chunk_id] = len(data)
            self._touched[chunk_id] = time.time()
            self.used_bytes += len(data)
        if self.used_bytes > self.config.high_watermark * self.config.max_bytes:
            await self.evict()

    def _write(self, chunk_id: ChunkId, data: ChunkData) -> None:
        # No fsync: every read is verified, so a chunk torn by a power loss is
        # detected and refetched. The rename keeps half files off final names.
        final = self.path_of(chunk_id)
        tmp = self._tmp / f"{chunk_id}.{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.replace(tmp, final)
        except FileNotFoundError:
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------------ eviction

    @contextmanager
    def pinned(self, chunk_ids: Iterable[ChunkId]) -> Iterator[None]:
        """Chunks of an in-progress pull: never evicted while the block runs."""
        ids = list(chunk_ids)
        self._pins.update(ids)
        try:
            yield
        finally:
            self._pins.subtract(ids)
            self._pins += Counter()  # drop zero counts

    async def evict(self, target: int | None = None) -> int:
        """Evict least-recently-used, unpinned chunks until ``used_bytes`` is at
        most ``target`` (default: the low watermark). Returns bytes freed."""
        if target is None:
            target = int(self.config.low_watermark * self.config.max_bytes)
        victims: list[ChunkId] = []
        freed = 0
        for chunk_id, size in self._index.items():
            if self.used_bytes - freed <= target:
                break
            if self._pins[chunk_id] > 0:
                continue
            victims.append(chunk_id)
            freed += size
        for chunk_id in victims:
            self._forget(chunk_id)
        self.evicted_bytes += freed
        paths = [self.path_of(c) for c in victims]
        await anyio.to_thread.run_sync(_unlink_all, paths)
        return freed

    def _forget(self, chunk_id: ChunkId) -> None:
        size = self._index.pop(chunk_id, None)
        self._touched.pop(chunk_id, None)
        if size is not None:
            self.used_bytes -= size

    def __len__(self) -> int:
        return len(self._index)


def _read_and_hash(path: Path, touch: bool) -> tuple[bytes, ChunkId]:
    with open(path, "rb") as f:
        data = f.read()
        if touch:
            os.utime(f.fileno())  # LRU order survives restarts
    return data, hash_bytes(data)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def _unlink_all(paths: list[Path]) -> None:
    for p in paths:
        p.unlink(missing_ok=True)
