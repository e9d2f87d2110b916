"""The node store: whole files by content plus loose chunks, one LRU, written once.

Layout under ``CacheConfig.dir``:

- ``files/<key[0:2]>/<key>``: whole files keyed by ``manifest.file_key``, written
  once by a ``FileWriter`` (chunks ``pwrite`` at their offsets as they arrive),
  read-only (0444). A pull places them into its destination by reflink, hardlink
  or copy; peers are served chunks from them by (file, offset).
- ``<id[0:2]>/<id>``: loose chunks (a daemon's read-through for its peers). This
  is the old cache layout, so an existing cache keeps its chunks. Once a durable
  whole file holds a chunk, its loose copy is dropped: each byte is kept once.
- ``tmp/<pid>.<rand>/``: the temp files of one open store, guarded by an flock on
  its ``.lock``; a directory whose lock is free belonged to a dead process and is
  removed when a store opens. A failed write removes its temp file at once.
- ``index.sqlite``: the whole files whose bytes are known durable, with the
  (size, ino, mtime_ns, ctime_ns, nlink) recorded for each and its chunk list.
- Seeds (seeds.py): files *outside* the store, in pull destinations, adopted by
  an ``auto`` pull where the store cannot clone into DEST (``adopt_seeds``; rows in
  the ``seeds`` table). Chunks are read from them (identity-checked, verified)
  like from whole files, but they are never evicted, deleted or counted in
  ``used_bytes``, and are forgotten when their stat changes or after a reboot.

Why a small sqlite database (WAL) and not an append-only journal or a scan: a
whole file's chunk list (needed to serve its chunks by offset) cannot be
recovered from its bytes, so it must be recorded somewhere; sqlite commits many
rows atomically (one transaction per ``sync``, not per file), lets the daemon and
pulls of one node share the index, and deletes rows without a compaction step,
which a journal would need. Loose chunks need no index: every read of one is
verified, and a scan at open rebuilds them (LRU order from mtimes).

Crash safety with one fsync per pull, not per file: ``FileWriter.commit``
renames the file into place and indexes it in memory only. ``sync()`` stats the
files committed since the last sync, runs one ``syncfs`` on the store's
filesystem, then writes their rows (recording those stats) in one transaction
(not synced itself: losing it to a power loss only loses those rows). On open,
a file is trusted only if its row exists and it still matches the row. A file
without a row was committed by a process that died before syncing (its bytes
may be torn by a power loss): it is deleted. A clean ``aclose`` syncs, so only
crashes cost re-fetches.

A file changed behind our back (a runner writing into a hardlinked copy) shows in
its mtime, size, inode or ctime and is dropped on its next use: never served,
never linked again. One ctime change is expected and accepted: adding or removing
a hard link (a pull placing the file by hardlink, or a user deleting that copy)
moves the ctime and the link count, nothing else; a file whose link count changed
while its size, inode and mtime did not and which is still read-only is re-recorded.
Chunks served from files are verified on every read anyway.

Several processes may open one store (the daemon and the pulls of a node). Each
keeps its own in-memory view and adopts the files others synced (``open_file`` of
a key it does not know, and a miss, which checks the index at most once a second).
The recovery above runs only when no other process has the store open (an flock),
and a file is unlinked only if it is still the inode we recorded, so one process
never deletes what another just wrote. Byte accounting is per process: two
processes may together overshoot the limit until one of them evicts.

Sizes: ``used_bytes`` counts loose chunks and whole files (not temp files being
assembled). Eviction runs whenever it passes the high watermark, and when the
store opens. On ENOSPC a write removes its temp file, evicts what it needed plus
an eighth (at most half the store) and raises DiskFull; the store keeps serving.

Index bookkeeping happens on the event loop; file I/O runs in worker threads,
except the single lstat of ``open_file`` (cheaper than the hop), and
``commit_files`` finishes a batch of writers in one hop.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sqlite3
import stat
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from .config import CacheConfig
from .errors import (
    BadInput,
    ChunkMissing,
    Corrupt,
    CorruptChunk,
    SeedChanged,
    Unavailable,
    os_error,
)
from .ids import ChunkId, hash_bytes, is_id, verify
from .manifest import ChunkRef
from .marker import boot
from .pwrite import PREALLOCATE_MIN, libc, preallocate, pwrite_all
from .resource import AsyncResource
from .seeds import COLUMNS as _SEED_COLUMNS
from .seeds import OLD_TABLE as _OLD_SEEDS
from .seeds import SCHEMA as _SEED_SCHEMA
from .seeds import TABLE as _SEEDS
from .seeds import (
    Seed,
    decode_chunk_rows,
    encode_chunk_rows,
    key_param,
    read_chunk,
    still_there,
)
from .source import ChunkData, Sink, fetch_each

log = logging.getLogger(__name__)

TOUCH_SECONDS = 60.0
"""How stale the on-disk LRU time of a unit may get (refreshing it costs a write)."""
REFRESH_SECONDS = 1.0
"""How often a store looks for files other processes synced (a daemon serving
what the node's pulls placed)."""

_FILE = "f"
_LOOSE = "c"
_Unit = tuple[str, ChunkId]
"""An eviction unit: a loose chunk (``_LOOSE``, id) or a whole file (``_FILE``, key)."""

_SCHEMA = """CREATE TABLE IF NOT EXISTS files (
    key TEXT PRIMARY KEY, size INTEGER NOT NULL, ino INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, nlink INTEGER NOT NULL,
    used REAL NOT NULL, chunks BLOB NOT NULL)"""
_COLUMNS = "key, size, ino, mtime_ns, ctime_ns, nlink, used, chunks"
_INSERT_SEED = f"INSERT OR {{how}} INTO {_SEEDS} ({_SEED_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)"


@dataclass(slots=True)
class _File:
    """A whole file in the store, as recorded when it was committed or synced."""

    key: ChunkId
    size: int
    ino: int
    mtime_ns: int
    ctime_ns: int
    nlink: int
    used: float
    chunks: tuple[tuple[ChunkId, int, int], ...]
    """(chunk id, offset, size) of every chunk, in file order."""

    def check(self, st: os.stat_result) -> bool | None:
        """True: unchanged. None: only its link count (and so its ctime) moved;
        the caller re-records it. False: changed, never to be used again."""
        if not stat.S_ISREG(st.st_mode) or (st.st_ino, st.st_size, st.st_mtime_ns) != (
            self.ino,
            self.size,
            self.mtime_ns,
        ):
            return False
        if st.st_ctime_ns == self.ctime_ns:
            return True
        if st.st_nlink != self.nlink and (st.st_mode & 0o222) == 0:
            return None
        return False

    def record(self, st: os.stat_result) -> None:
        self.ino, self.size = st.st_ino, st.st_size
        self.mtime_ns, self.ctime_ns, self.nlink = st.st_mtime_ns, st.st_ctime_ns, st.st_nlink

    def row(self) -> tuple[str, int, int, int, int, int, float, bytes]:
        blob = encode_chunk_rows(self.chunks)
        return (
            self.key,
            self.size,
            self.ino,
            self.mtime_ns,
            self.ctime_ns,
            self.nlink,
            self.used,
            blob,
        )

    @classmethod
    def from_row(cls, row: tuple[str, int, int, int, int, int, float, bytes]) -> _File:
        key, size, ino, mtime_ns, ctime_ns, nlink, used, blob = row
        return cls(
            ChunkId(key), size, ino, mtime_ns, ctime_ns, nlink, used, decode_chunk_rows(blob)
        )


@dataclass(slots=True)
class _Loaded:
    """What ``open`` found on disk."""

    files: list[_File]
    loose: list[tuple[ChunkId, int, float]]


class NodeStore(AsyncResource):
    """A ``ChunkStore`` of loose chunks and whole files on local disk, with a
    byte limit, LRU eviction and pins. Replaces the old chunk-only cache."""

    name = "local"

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.root = Path(config.dir)
        self.used_bytes = 0
        self.evicted_bytes = 0
        self._files_dir = self.root / "files"
        self._tmp = self.root / "tmp" / f"{os.getpid()}.{os.urandom(4).hex()}"
        self._lru: OrderedDict[_Unit, int] = OrderedDict()  # oldest first; value: bytes
        self._touched: dict[ChunkId, float] = {}  # mtime we last gave each loose chunk
        self._files: dict[ChunkId, _File] = {}
        self._in_files: dict[ChunkId, dict[ChunkId, tuple[int, int]]] = {}
        """chunk id -> {file key: (offset, size)}."""
        self._pins: Counter[ChunkId] = Counter()
        self._file_pins: Counter[ChunkId] = Counter()
        self._unsynced: set[ChunkId] = set()
        self._rows_dirty: set[ChunkId] = set()  # synced files whose row changed
        self._rows_dead: set[ChunkId] = set()
        self._writers: set[FileWriter] = set()
        self._seeds: dict[ChunkId, Seed] = {}
        """Destination files adopted as seeds (seeds.py): read, never owned."""
        self._in_seeds: dict[ChunkId, dict[ChunkId, tuple[int, int]]] = {}
        self._seeds_unsynced: set[ChunkId] = set()
        self._seeds_dead: set[ChunkId] = set()
        self._seen_seed_rowid = 0
        self.boot = boot()[0]
        self._db: sqlite3.Connection | None = None
        """Written from worker threads, under ``_db_lock``."""
        self._reader: sqlite3.Connection | None = None
        """Read on the event loop only."""
        self._seen_rowid = 0
        self._data_version: int | None = None
        self._refreshed_at = 0.0
        self._db_lock = threading.Lock()
        self._lock_fds: list[int] = []
        self._tmp_locked = False

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Create or recover the store, then enforce its size limit.

        Raises Unavailable if the directory or its index cannot be opened.
        """
        try:
            loaded = await anyio.to_thread.run_sync(self._open_sync)
        except (OSError, sqlite3.Error) as exc:
            raise Unavailable(f"cannot open cache {self.root}: {_reason(exc)}") from exc
        units: list[tuple[float, _Unit, int]] = []
        for rec in loaded.files:
            self._index_file(rec)
            units.append((rec.used, (_FILE, rec.key), rec.size))
        for chunk_id, size, mtime in loaded.loose:
            self._touched[chunk_id] = mtime
            units.append((mtime, (_LOOSE, chunk_id), size))
        units.sort(key=lambda u: u[0])
        for _, unit, size in units:
            self._lru[unit] = size
        self.used_bytes = sum(size for _, _, size in units)
        if self.used_bytes > self._high_bytes:
            await self.evict()
        try:
            await anyio.to_thread.run_sync(self._make_tmp)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise os_error(exc, f"cannot open cache {self.root}") from exc
            # A full disk must not keep the store from opening: make room, once.
            await self._make_room(0)
            try:
                await anyio.to_thread.run_sync(self._make_tmp)
            except OSError as again:
                raise _translate(again, self.root) from again

    def _make_tmp(self) -> None:
        """Our own temp dir, locked for as long as the store is open."""
        self._tmp.mkdir(parents=True, exist_ok=True)
        if not self._tmp_locked:
            self._lock_fds.append(_lock(self._tmp / ".lock", fcntl.LOCK_EX))
            self._tmp_locked = True

    def _open_sync(self) -> _Loaded:
        self._files_dir.mkdir(parents=True, exist_ok=True)
        # The store lock first: exclusive (we are alone, so we recover) or shared.
        store_lock = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._lock_fds.append(store_lock)
        try:
            fcntl.flock(store_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except BlockingIOError:
            fcntl.flock(store_lock, fcntl.LOCK_SH)  # waits out another's recovery
            alone = False
        (self.root / "tmp").mkdir(exist_ok=True)
        _clean_tmp(self.root / "tmp", self._tmp.name, alone)
        try:
            files = self._open_index(alone)
        except sqlite3.DatabaseError as exc:
            if not alone:
                raise
            # The index is only a cache of what files/ holds: start a new one
            # (its files are then dropped as unsynced) rather than refuse to open.
            log.warning(
                "cache index %s unreadable (%s): starting a new one",
                self.root / "index.sqlite",
                exc,
            )
            self._close_db()
            for suffix in ("", "-wal", "-shm"):
                _remove(self.root / f"index.sqlite{suffix}")
            files = self._open_index(alone)
        self._reader = sqlite3.connect(self.root / "index.sqlite", check_same_thread=False)
        (self._data_version,) = self._reader.execute("PRAGMA data_version").fetchone()
        if alone:
            fcntl.flock(store_lock, fcntl.LOCK_SH)  # recovery done: others may join
        return _Loaded(files, _scan_loose(self.root))

    def _open_index(self, alone: bool) -> list[_File]:
        db = sqlite3.connect(self.root / "index.sqlite", check_same_thread=False)
        self._db = db
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit does not fsync (checkpoints still do; WAL stays
        # consistent). Losing the last commits to a power loss is safe: a files
        # row is written only after the syncfs that made its file durable, and
        # a file without its row is deleted at open; seeds rows vouch only
        # within their boot anyway. Each fsync here forced an ext4 journal
        # commit that waited for the write-back of whatever the pull (or a
        # server beside it) had just written.
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(_SCHEMA)
        db.execute(_SEED_SCHEMA)
        self._move_old_seeds()
        self._load_seeds()
        return self._load_files(alone)

    def _move_old_seeds(self) -> None:
        """Rows of the first seeds table (hex text) into the compact one."""
        assert self._db is not None
        db = self._db
        if db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (_OLD_SEEDS,)
        ).fetchone():
            rows = []
            for row in db.execute(f"SELECT {_SEED_COLUMNS} FROM {_OLD_SEEDS}"):
                try:
                    rows.append(Seed.from_old_row(tuple(row)).row())
                except (BadInput, ValueError, TypeError):
                    continue  # not ours to read: forgotten
            with self._db_lock, db:
                db.executemany(
                    _INSERT_SEED.format(how="IGNORE"),
                    rows,
                )
                db.execute(f"DROP TABLE {_OLD_SEEDS}")

    def _load_seeds(self) -> None:
        """Seeds still there and unchanged; from another boot, only durable ones.
        The rest are forgotten (their rows deleted, their files left alone)."""
        assert self._db is not None
        dead: list[tuple[int]] = []
        for rowid, *row in self._db.execute(f"SELECT rowid, {_SEED_COLUMNS} FROM {_SEEDS}"):
            self._seen_seed_rowid = max(self._seen_seed_rowid, rowid)
            try:
                seed = Seed.from_row(tuple(row))
            except (BadInput, ValueError, TypeError):
                dead.append((rowid,))
                continue
            if ((self.boot and seed.boot == self.boot) or seed.durable) and still_there(seed):
                self._index_seed(seed)
            else:
                dead.append((rowid,))
        if dead:
            with self._db_lock, self._db:
                self._db.executemany(f"DELETE FROM {_SEEDS} WHERE rowid = ?", dead)

    def _close_db(self) -> None:
        if self._db is not None:
            with self._db_lock:
                self._db.close()
            self._db = None

    def _load_files(self, alone: bool) -> list[_File]:
        """Trusted files: rows whose file still matches. Alone, delete the rest
        (and any file without a row: committed but never synced)."""
        assert self._db is not None
        trusted: list[_File] = []
        untrusted: list[str] = []
        for rowid, *row in self._db.execute(f"SELECT rowid, {_COLUMNS} FROM files"):
            self._seen_rowid = max(self._seen_rowid, rowid)
            rec = _File.from_row(tuple(row))
            try:
                st = os.lstat(self.file_path(rec.key))
            except FileNotFoundError:
                untrusted.append(rec.key)
                continue
            verdict = rec.check(st)
            if verdict is False:
                untrusted.append(rec.key)
                continue
            if verdict is None:
                rec.record(st)
                self._rows_dirty.add(rec.key)
            trusted.append(rec)
        if alone:
            with self._db:
                self._db.executemany("DELETE FROM files WHERE key = ?", [(k,) for k in untrusted])
            keep = {rec.key for rec in trusted}
            with os.scandir(self._files_dir) as shards:
                for shard in shards:
                    if not shard.is_dir(follow_symlinks=False):
                        continue
                    with os.scandir(shard.path) as entries:
                        for entry in entries:
                            if entry.name not in keep and not entry.is_dir(follow_symlinks=False):
                                log.info("dropping unsynced store file %s", entry.name)
                                _remove(entry.path)
        return trusted

    async def aclose(self) -> None:
        """Sync what was committed, remove our temp files, release the index."""
        if self._db is None:
            await anyio.to_thread.run_sync(self._release)
            return
        with anyio.CancelScope(shield=True):
            try:
                await self.sync()
            except Unavailable as exc:
                log.warning("cache not synced at close: %s", exc)
            for writer in list(self._writers):
                await writer.abort()
            await anyio.to_thread.run_sync(self._release)

    def _release(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._close_db()
        _remove_flat_dir(self._tmp)
        for fd in self._lock_fds:
            os.close(fd)
        self._lock_fds.clear()

    # ------------------------------------------------------------------ ChunkStore

    def path_of(self, chunk_id: ChunkId) -> Path:
        """Where the loose copy of ``chunk_id`` lives."""
        return self.root / chunk_id[:2] / chunk_id

    def file_path(self, key: ChunkId) -> Path:
        return self._files_dir / key[:2] / key

    def contains(self, chunk_id: ChunkId) -> bool:
        if (
            (_LOOSE, chunk_id) in self._lru
            or chunk_id in self._in_files
            or chunk_id in self._in_seeds
        ):
            return True
        self._refresh()
        return chunk_id in self._in_files or chunk_id in self._in_seeds

    def _refresh(self) -> None:
        """Adopt the files other processes synced since we last looked, at most
        once per REFRESH_SECONDS and only when the index changed. Their rows are
        trusted as they stand: every use stats the file (and verifies chunks)."""
        now = time.monotonic()
        if self._reader is None or now - self._refreshed_at < REFRESH_SECONDS:
            return
        self._refreshed_at = now
        try:
            (version,) = self._reader.execute("PRAGMA data_version").fetchone()
            if version == self._data_version:
                return
            self._data_version = version
            rows = self._reader.execute(
                f"SELECT rowid, {_COLUMNS} FROM files WHERE rowid > ?", (self._seen_rowid,)
            ).fetchall()
            seed_rows = self._reader.execute(
                f"SELECT rowid, {_SEED_COLUMNS} FROM {_SEEDS} WHERE rowid > ?",
                (self._seen_seed_rowid,),
            ).fetchall()
        except sqlite3.Error as exc:
            log.info("cannot read the cache index: %s", exc)
            return
        for rowid, *seed_row in seed_rows:
            self._seen_seed_rowid = max(self._seen_seed_rowid, rowid)
            try:
                seed = Seed.from_row(tuple(seed_row))
            except (BadInput, ValueError, TypeError):
                continue
            if seed.key not in self._seeds and seed.key not in self._seeds_dead:
                self._index_seed(seed)
        for rowid, *row in rows:
            self._seen_rowid = max(self._seen_rowid, rowid)
            rec = _File.from_row(tuple(row))
            if rec.key in self._files or rec.key in self._rows_dead:
                continue  # ours, or one we just evicted
            self._index_file(rec)
            self._lru[(_FILE, rec.key)] = rec.size
            self.used_bytes += rec.size

    async def has(self, chunk_ids: Iterable[ChunkId]) -> set[ChunkId]:
        return {c for c in chunk_ids if self.contains(c)}

    async def fetch(self, refs: Sequence[ChunkRef], sink: Sink) -> list[ChunkRef]:
        held: list[ChunkRef] = []
        missing: list[ChunkRef] = []
        for ref in refs:
            (held if self.contains(ref.id) else missing).append(ref)
        return missing + await fetch_each(self.get, held, sink)

    async def get(self, chunk_id: ChunkId) -> ChunkData:
        """Return the verified chunk, from a loose copy or a whole file. Raises
        ChunkMissing, or CorruptChunk after dropping the damaged copy."""
        if (_LOOSE, chunk_id) in self._lru:
            with contextlib.suppress(ChunkMissing):
                return await self._get_loose(chunk_id)
        if chunk_id not in self._in_files and chunk_id not in self._in_seeds:
            self._refresh()  # another process may have dropped the loose copy for a file
        corrupt: CorruptChunk | None = None
        for key, (offset, size) in list(self._in_files.get(chunk_id, {}).items()):
            rec = self._files.get(key)
            if rec is None:
                continue
            path = self.file_path(key)
            try:
                data, st, actual = await anyio.to_thread.run_sync(
                    _pread_and_hash, path, offset, size
                )
            except FileNotFoundError:
                self._forget((_FILE, key))
                continue
            except OSError as exc:
                raise Unavailable(f"cannot read {path}: {exc.strerror}") from exc
            if not self._still_good(rec, st):
                await self._drop_file(rec)
                continue
            if actual != chunk_id:
                log.warning("dropping corrupt store file %s (chunk %s)", key, chunk_id)
                await self._drop_file(rec)
                corrupt = CorruptChunk(chunk_id, "local cache", actual)
                continue  # another file may hold a good copy
            self._use(rec)
            return data
        for key, (offset, size) in list(self._in_seeds.get(chunk_id, {}).items()):
            seed = self._seeds.get(key)
            if seed is None:
                continue
            try:
                data = await anyio.to_thread.run_sync(read_chunk, seed, offset, size)
                await anyio.to_thread.run_sync(verify, chunk_id, data, f"seed {seed.path}")
            except SeedChanged:
                self.forget_seed(key)
                continue
            except CorruptChunk as exc:  # changed without its stat showing it
                log.warning("forgetting seed %s: %s", seed.path, exc)
                self.forget_seed(key)
                corrupt = exc
                continue
            return data
        if corrupt is not None:
            raise corrupt
        raise ChunkMissing(chunk_id, "local cache")

    async def _get_loose(self, chunk_id: ChunkId) -> ChunkData:
        path = self.path_of(chunk_id)
        # Refreshing the mtime (the LRU order a restart sees) dirties the inode;
        # doing it on every hit cost a journal write per chunk served. The
        # in-memory order is exact; the on-disk one is exact to TOUCH_SECONDS.
        now = time.time()
        touch = now - self._touched.get(chunk_id, 0.0) > TOUCH_SECONDS
        try:
            data, actual = await anyio.to_thread.run_sync(_read_and_hash, path, touch)
        except FileNotFoundError:
            self._forget((_LOOSE, chunk_id))
            raise ChunkMissing(chunk_id, "local cache") from None
        except OSError as exc:
            raise Unavailable(f"cannot read cached chunk {chunk_id}: {exc.strerror}") from exc
        if actual != chunk_id:
            log.warning("dropping corrupt cached chunk %s", chunk_id)
            self._forget((_LOOSE, chunk_id))
            await anyio.to_thread.run_sync(_remove, path)
            raise CorruptChunk(chunk_id, "local cache", actual)
        if (_LOOSE, chunk_id) in self._lru:  # not evicted while we read
            self._lru.move_to_end((_LOOSE, chunk_id))
            if touch:
                self._touched[chunk_id] = now
        return data

    async def put(self, chunk_id: ChunkId, data: ChunkData) -> None:
        """Keep a verified chunk as a loose copy. Raises DiskFull (after evicting
        some), Unavailable."""
        if (_LOOSE, chunk_id) in self._lru:
            self._lru.move_to_end((_LOOSE, chunk_id))
            return
        if chunk_id in self._in_files:
            for key in self._in_files[chunk_id]:
                self._use(self._files[key])
            return
        try:
            await anyio.to_thread.run_sync(self._write_loose, chunk_id, data)
        except OSError as exc:
            raise await self._write_failed(exc, len(data)) from exc
        if (_LOOSE, chunk_id) not in self._lru:
            self._lru[(_LOOSE, chunk_id)] = len(data)
            self._touched[chunk_id] = time.time()
            self.used_bytes += len(data)
        if self.used_bytes > self._high_bytes:
            await self.evict()

    def _write_loose(self, chunk_id: ChunkId, data: ChunkData) -> None:
        # No fsync: every read is verified, so a chunk torn by a power loss is
        # detected and refetched. The rename keeps half files off final names.
        final = self.path_of(chunk_id)
        tmp = self._tmp / f"{chunk_id}.{os.urandom(4).hex()}"
        try:
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

    async def _write_failed(self, exc: OSError, size: int) -> Unavailable:
        """The error to raise for a failed write, after making room on a full disk."""
        if exc.errno == errno.ENOSPC:
            await self._make_room(size)
        return _translate(exc, self.root)

    async def _make_room(self, size: int) -> None:
        """After ENOSPC: evict the failed write's size plus an eighth of what we
        hold, at most half of it, so the next write may fit while the store keeps
        most of what it serves (halving on every failure, with temp files left
        behind, emptied a daemon's cache)."""
        used = self.used_bytes
        await self.evict(target=used - min(size + used // 8, used // 2))

    # ------------------------------------------------------------------ whole files

    def open_file(self, key: ChunkId) -> Path | None:
        """The committed, unchanged store file for ``key`` (refreshed in LRU), or
        None if absent or changed (a changed one is dropped). Raises Unavailable.

        Synchronous on purpose: a pull asks this once per file, and one lstat of
        a hot inode costs far less than the thread hop an ``await`` would take.
        """
        rec = self._files.get(key)
        path = self.file_path(key)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if rec is not None:
                self._forget((_FILE, key))
            return None
        except OSError as exc:
            raise Unavailable(f"cannot read {path}: {exc.strerror}") from exc
        if rec is None:  # another process may have committed and synced it
            rec = self._adopt(key, st)
            if rec is None:
                return None
            self._index_file(rec)
            self._lru[(_FILE, key)] = rec.size
            self.used_bytes += rec.size
        if not self._still_good(rec, st):
            self._forget((_FILE, key))
            log.warning("dropping store file %s: changed on disk", key)
            _remove_if_inode(path, rec.ino)
            return None
        self._use(rec)
        return path

    def _adopt(self, key: ChunkId, st: os.stat_result) -> _File | None:
        """The row another process synced for ``key``, if it matches ``st``.
        Reads through its own connection: WAL readers never wait for a writer."""
        if self._reader is None:
            return None
        try:
            row = self._reader.execute(
                f"SELECT {_COLUMNS} FROM files WHERE key = ?", (key,)
            ).fetchone()
        except sqlite3.Error as exc:
            log.info("cannot read the cache index: %s", exc)
            return None
        if row is None:
            return None
        rec = _File.from_row(row)
        return rec if rec.check(st) is True else None

    # ------------------------------------------------------------------ seeds

    def adopt_seeds(self, seeds: Iterable[Seed]) -> None:
        """Read ``seeds`` (destination files, see seeds.py) from now on; their
        rows are written by the next ``sync``."""
        for seed in seeds:
            self.forget_seed(seed.key)
            self._seeds_dead.discard(seed.key)
            self._index_seed(seed)
            self._seeds_unsynced.add(seed.key)

    def open_seed(self, key: ChunkId) -> Seed | None:
        """A seed holding ``key`` whose path still names the adopted file (one
        lstat), or None; a changed one is forgotten. The caller checks the
        identity again on the fd it opens (``seeds.open_checked``)."""
        seed = self._seeds.get(key)
        if seed is None:
            self._refresh()
            seed = self._seeds.get(key)
        if seed is None:
            return None
        if not still_there(seed):
            self.forget_seed(key)
            return None
        return seed

    def forget_seed(self, key: ChunkId) -> None:
        seed = self._seeds.pop(key, None)
        if seed is None:
            return
        for chunk_id, _, _ in seed.chunks:
            where = self._in_seeds.get(chunk_id)
            if where is not None:
                where.pop(key, None)
                if not where:
                    del self._in_seeds[chunk_id]
        if key in self._seeds_unsynced:
            self._seeds_unsynced.discard(key)
        else:
            self._seeds_dead.add(key)

    def _index_seed(self, seed: Seed) -> None:
        self._seeds[seed.key] = seed
        for chunk_id, offset, size in seed.chunks:
            self._in_seeds.setdefault(chunk_id, {})[seed.key] = (offset, size)

    def begin_file(self, key: ChunkId, size: int) -> FileWriter:
        """A temp file inside the store to assemble ``key`` in (see FileWriter)."""
        writer = FileWriter(self, key, size, self._tmp / f"{key}.{os.urandom(4).hex()}")
        self._writers.add(writer)
        return writer

    async def sync(self) -> None:
        """Make committed files durable: one syncfs on the store's filesystem,
        then the index rows that say they are good. Raises Unavailable."""
        pending = [self._files[k] for k in self._unsynced if k in self._files]
        if pending:
            try:
                stats = await anyio.to_thread.run_sync(
                    _stat_all, [self.file_path(rec.key) for rec in pending]
                )
                for rec, st in zip(pending, stats, strict=True):
                    if st is None or not self._still_good(rec, st):
                        await self._drop_file(rec)
                await anyio.to_thread.run_sync(_syncfs, self.root)
            except OSError as exc:
                raise Unavailable(f"cannot sync cache {self.root}: {_reason(exc)}") from exc
            # Files dropped or evicted meanwhile get no row.
            pending = [rec for rec in pending if self._files.get(rec.key) is rec]
            self._unsynced.difference_update(rec.key for rec in pending)
        rows = [self._files[k].row() for k in self._rows_dirty if k in self._files]
        rows += [rec.row() for rec in pending]
        dead = [(str(k),) for k in self._rows_dead]
        seed_rows = [self._seeds[k].row() for k in self._seeds_unsynced if k in self._seeds]
        dead_seeds = [(key_param(k),) for k in self._seeds_dead]
        self._rows_dirty.clear()
        self._rows_dead.clear()
        self._seeds_unsynced.clear()
        self._seeds_dead.clear()
        if rows or dead or seed_rows or dead_seeds:
            try:
                await anyio.to_thread.run_sync(self._write_rows, rows, dead, seed_rows, dead_seeds)
            except sqlite3.Error as exc:
                raise Unavailable(f"cannot write cache index: {exc}") from exc
        # Loose copies of chunks a durable file now holds are bytes stored twice
        # (a daemon's read-through, then a pull of the same file): drop them.
        twice = dict.fromkeys(
            unit
            for rec in pending
            for chunk_id, _, _ in rec.chunks
            if (unit := (_LOOSE, chunk_id)) in self._lru and not self._is_pinned(unit)
        )
        if twice:
            for unit in twice:
                self._forget(unit)
            doomed: list[tuple[Path, int | None]] = [
                (self.path_of(chunk_id), None) for _, chunk_id in twice
            ]
            await anyio.to_thread.run_sync(_remove_all, doomed)

    def _write_rows(
        self,
        rows: list[tuple[str, int, int, int, int, int, float, bytes]],
        dead: list[tuple[str]],
        seed_rows: Sequence[tuple[object, ...]] = (),
        dead_seeds: Sequence[tuple[bytes]] = (),
    ) -> None:
        with self._db_lock:
            if self._db is None:
                return
            with self._db:
                self._db.executemany("DELETE FROM files WHERE key = ?", dead)
                self._db.executemany(
                    f"INSERT OR REPLACE INTO files ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)", rows
                )
                self._db.executemany(f"DELETE FROM {_SEEDS} WHERE key = ?", dead_seeds)
                self._db.executemany(
                    _INSERT_SEED.format(how="REPLACE"),
                    seed_rows,
                )

    async def commit_files(
        self, items: Sequence[tuple[FileWriter, Sequence[ChunkRef]]]
    ) -> list[Path]:
        """``FileWriter.commit`` for many writers in one worker-thread hop: a tree
        of thousands of small files is otherwise bound by one hop per file.
        Every writer ends committed or aborted; returns the store paths in order,
        or raises the first failure (as ``commit`` would) once the others are
        committed."""

        def finish_all() -> list[os.stat_result | Exception]:
            out: list[os.stat_result | Exception] = []
            for writer, chunks in items:
                try:
                    if writer._error is not None:
                        raise writer._error
                    writer._check_whole(chunks)
                    out.append(writer._finish(self.file_path(writer.key)))
                except Exception as exc:  # reported below, after the rest are done
                    out.append(exc)
            return out

        results = await anyio.to_thread.run_sync(finish_all)
        paths: list[Path] = []
        failure: Exception | None = None
        for (writer, chunks), result in zip(items, results, strict=True):
            if isinstance(result, Exception):
                if isinstance(result, OSError):
                    writer._error = writer._error or result  # abort makes room after ENOSPC
                with anyio.CancelScope(shield=True):
                    await writer.abort()
                if failure is None:
                    failure = (
                        _translate(result, self.root) if isinstance(result, OSError) else result
                    )
                continue
            writer._index(result, chunks)
            paths.append(self.file_path(writer.key))
        if self.used_bytes > self._high_bytes:
            await self.evict(keep={writer.key for writer, _ in items})
        if failure is not None:
            raise failure
        return paths

    @contextlib.contextmanager
    def pinned_files(self, keys: Iterable[ChunkId]) -> Iterator[None]:
        """Whole files a pull is placing: never evicted while the block runs."""
        with _pinning(self._file_pins, keys):
            yield

    def _committed(self, rec: _File) -> None:
        """Index a file a writer just renamed into place (replacing any older copy)."""
        if rec.key in self._files:
            self._forget((_FILE, rec.key))  # its path now holds the new inode
        self._index_file(rec)
        self._lru[(_FILE, rec.key)] = rec.size
        self.used_bytes += rec.size
        self._unsynced.add(rec.key)

    def _index_file(self, rec: _File) -> None:
        self._files[rec.key] = rec
        for chunk_id, offset, size in rec.chunks:
            self._in_files.setdefault(chunk_id, {})[rec.key] = (offset, size)

    def _still_good(self, rec: _File, st: os.stat_result) -> bool:
        verdict = rec.check(st)
        if verdict is None:
            rec.record(st)
            if rec.key not in self._unsynced:
                self._rows_dirty.add(rec.key)
        return verdict is not False

    def _use(self, rec: _File) -> None:
        if self._files.get(rec.key) is not rec:
            return  # evicted or replaced while the caller awaited
        self._lru.move_to_end((_FILE, rec.key))
        now = time.time()
        if now - rec.used > TOUCH_SECONDS:
            rec.used = now
            if rec.key not in self._unsynced:
                self._rows_dirty.add(rec.key)

    async def _drop_file(self, rec: _File) -> None:
        log.warning("dropping store file %s: changed or damaged on disk", rec.key)
        self._forget((_FILE, rec.key))
        await anyio.to_thread.run_sync(_remove_if_inode, self.file_path(rec.key), rec.ino)

    # ------------------------------------------------------------------ eviction

    @contextlib.contextmanager
    def pinned(self, chunk_ids: Iterable[ChunkId]) -> Iterator[None]:
        """Chunks of an in-progress pull: never evicted (nor the files holding
        them) while the block runs."""
        with _pinning(self._pins, chunk_ids):
            yield

    def _is_pinned(self, unit: _Unit) -> bool:
        kind, ident = unit
        if kind == _LOOSE:
            return self._pins[ident] > 0
        if self._file_pins[ident] > 0:
            return True
        return bool(self._pins) and any(self._pins[c] > 0 for c, _, _ in self._files[ident].chunks)

    async def evict(self, target: int | None = None, *, keep: Collection[ChunkId] = ()) -> int:
        """Evict least-recently-used, unpinned loose chunks and whole files until
        ``used_bytes`` is at most ``target`` (default: the low watermark).
        ``keep`` names files not to evict (those being committed). Returns
        bytes freed."""
        if target is None:
            target = int(self.config.low_watermark * self.config.max_bytes)
        victims: list[_Unit] = []
        freed = 0
        for unit, size in self._lru.items():
            if self.used_bytes - freed <= target:
                break
            if (unit[0] == _FILE and unit[1] in keep) or self._is_pinned(unit):
                continue
            victims.append(unit)
            freed += size
        doomed: list[tuple[Path, int | None]] = []
        for unit in victims:
            kind, ident = unit
            if kind == _FILE:
                doomed.append((self.file_path(ident), self._files[ident].ino))
            else:
                doomed.append((self.path_of(ident), None))
            self._forget(unit)
        self.evicted_bytes += freed
        await anyio.to_thread.run_sync(_remove_all, doomed)
        return freed

    def _forget(self, unit: _Unit) -> None:
        size = self._lru.pop(unit, None)
        if size is not None:
            self.used_bytes -= size
        kind, ident = unit
        if kind == _LOOSE:
            self._touched.pop(ident, None)
            return
        rec = self._files.pop(ident, None)
        if rec is None:
            return
        for chunk_id, _, _ in rec.chunks:
            where = self._in_files.get(chunk_id)
            if where is not None:
                where.pop(ident, None)
                if not where:
                    del self._in_files[chunk_id]
        if ident in self._unsynced:
            self._unsynced.discard(ident)
        else:
            self._rows_dead.add(ident)
        self._rows_dirty.discard(ident)

    @property
    def _high_bytes(self) -> float:
        return self.config.high_watermark * self.config.max_bytes

    def __len__(self) -> int:
        """Eviction units held: loose chunks plus whole files."""
        return len(self._lru)


class FileWriter:
    """One whole file being assembled inside the store.

    ``write`` may be called from several worker threads at once (each chunk at
    its offset); then exactly one of ``commit`` or ``abort`` on the event loop.
    """

    def __init__(self, store: NodeStore, key: ChunkId, size: int, tmp: Path) -> None:
        self.tmp = tmp
        self.key = key
        self.size = size
        self._store = store
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._fd = -1
        """-1: not created yet; -2: closed; _WHOLE: every byte written, closed."""
        self._written: dict[int, int] = {}  # offset -> bytes
        self._filled = 0
        self._busy = 0
        self._error: OSError | None = None

    def write(self, data: ChunkData, offset: int) -> None:
        """pwrite ``data`` at ``offset``; the first call creates the temp file,
        the one that completes it makes it read-only and closes it (a pull's
        window of thousands of files holds fds only for those partly written).
        Raises DiskFull (the temp file is removed at once) or Unavailable."""
        try:
            with self._lock:
                if self._error is not None:
                    raise self._error
                if self._fd == -1:
                    self._fd = os.open(self.tmp, _CREATE, 0o600)
                    if self.size >= PREALLOCATE_MIN:
                        preallocate(self._fd, self.size)
                fd = self._fd
                self._busy += 1
            try:
                pwrite_all(fd, data, offset, self._write_lock)
            finally:
                with self._lock:
                    self._busy -= 1
        except OSError as exc:
            with self._lock:
                if self._error is None:
                    self._error = exc
                    if self._fd >= 0:
                        # Free the blocks now; the fd is closed by abort, once no
                        # other thread can still be writing through it.
                        with contextlib.suppress(OSError):
                            os.ftruncate(self._fd, 0)
                    with contextlib.suppress(OSError):
                        os.unlink(self.tmp)
            raise _translate(exc, self._store.root) from exc
        with self._lock:
            before = self._written.get(offset, 0)
            if len(data) > before:
                self._written[offset] = len(data)
                self._filled += len(data) - before
            if self._filled >= self.size and self._busy == 0 and self._fd >= 0:
                fd, self._fd = self._fd, _WHOLE
                try:
                    os.fchmod(fd, 0o444)
                finally:
                    os.close(fd)

    async def commit(self, chunks: Sequence[ChunkRef]) -> Path:
        """Check the file is whole, make it read-only, rename it into place and
        index its chunks (this may evict others). Returns the store path.

        Raises Corrupt if a chunk was not written or the size is wrong, DiskFull
        or Unavailable; the temp file is gone in every case.
        """
        store = self._store
        final = store.file_path(self.key)
        try:
            if self._error is not None:
                raise self._error
            self._check_whole(chunks)
            st = await anyio.to_thread.run_sync(self._finish, final)
        except OSError as exc:
            self._error = self._error or exc  # abort evicts after a full disk
            with anyio.CancelScope(shield=True):
                await self.abort()
            raise _translate(exc, store.root) from exc
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.abort()
            raise
        self._index(st, chunks)
        if store.used_bytes > store._high_bytes:
            await store.evict(keep=(self.key,))
        return final

    def _index(self, st: os.stat_result, chunks: Sequence[ChunkRef]) -> None:
        self._store._writers.discard(self)
        offsets = []
        offset = 0
        for ref in chunks:
            offsets.append((ref.id, offset, ref.size))
            offset += ref.size
        rec = _File(self.key, 0, 0, 0, 0, 0, time.time(), tuple(offsets))
        rec.record(st)
        self._store._committed(rec)

    def _check_whole(self, chunks: Sequence[ChunkRef]) -> None:
        """Every byte was written (in chunks or in larger spans, in any order):
        a hole would read as zeros under a name that promises the chunks."""
        total = sum(ref.size for ref in chunks)
        if total != self.size:
            raise Corrupt(
                f"store file {self.key}: chunks sum to {total} bytes, expected {self.size}"
            )
        covered = 0
        for offset, length in sorted(self._written.items()):
            if offset > covered:
                break
            covered = max(covered, offset + length)
        if covered < self.size:
            raise Corrupt(f"store file {self.key}: bytes from {covered} on were not written")

    def _finish(self, final: Path) -> os.stat_result:
        with self._lock:
            if self._fd == -1:  # an empty file: nothing was written
                self._fd = os.open(self.tmp, _CREATE, 0o600)
            fd = self._fd
        if fd == _WHOLE:  # closed read-only by its last write
            size = os.lstat(self.tmp).st_size
        else:
            size = os.fstat(fd).st_size
        if size != self.size:
            raise Corrupt(f"store file {self.key} has {size} bytes, expected {self.size}")
        if fd != _WHOLE:
            os.fchmod(fd, 0o444)
        self._close()
        try:
            os.replace(self.tmp, final)
        except FileNotFoundError:
            final.parent.mkdir(exist_ok=True)
            os.replace(self.tmp, final)
        return os.lstat(final)

    def _close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -2
        if fd >= 0:
            os.close(fd)

    async def abort(self) -> None:
        """Remove the temp file (and, after a full disk, evict some)."""
        self._store._writers.discard(self)

        def cleanup() -> None:
            self._close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)

        await anyio.to_thread.run_sync(cleanup)
        if self._error is not None and self._error.errno == errno.ENOSPC:
            self._error = OSError(errno.ECANCELED, "aborted")  # make room once, not per call
            await self._store._make_room(self.size)


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_WHOLE = -3


@contextlib.contextmanager
def _pinning(pins: Counter[ChunkId], ids: Iterable[ChunkId]) -> Iterator[None]:
    held = list(ids)
    pins.update(held)
    try:
        yield
    finally:
        pins.subtract(held)
        for ident in held:
            if pins[ident] <= 0:
                pins.pop(ident, None)


def _translate(exc: OSError, root: Path) -> Unavailable:
    return os_error(exc, f"cannot write cache {root}")


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def _lock(path: Path, how: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    fcntl.flock(fd, how)
    return fd


def _clean_tmp(tmp: Path, mine: str, alone: bool) -> None:
    """Remove temp dirs of dead processes (their lock is free); alone, also
    loose temp files of the old cache layout."""
    with os.scandir(tmp) as entries:
        leftovers = [e for e in entries if e.name != mine]
    for entry in leftovers:
        if not entry.is_dir(follow_symlinks=False):
            if alone:
                _remove(entry.path)
            continue
        try:
            fd = os.open(os.path.join(entry.path, ".lock"), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = -1  # a writer dies before creating its lock only if it died at once
        try:
            if fd >= 0:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live store owns it
        finally:
            if fd >= 0:
                os.close(fd)
        if fd >= 0 or alone:
            import shutil  # rare: a dead process's directory

            shutil.rmtree(entry.path, ignore_errors=True)


def _remove_flat_dir(path: Path) -> None:
    """Remove this store's own temp directory (files only, never a subdirectory)
    without importing shutil (zlib, bz2, lzma: ~1.7 ms). The CLI loads it anyway
    (argparse's help formatter); an embedded pull through the runner API does not."""
    with contextlib.suppress(OSError), os.scandir(path) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
    with contextlib.suppress(OSError):
        os.rmdir(path)


def _scan_loose(root: Path) -> list[tuple[ChunkId, int, float]]:
    found: list[tuple[ChunkId, int, float]] = []
    with os.scandir(root) as shards:
        for shard in shards:
            if len(shard.name) != 2 or not shard.is_dir(follow_symlinks=False):
                continue
            with os.scandir(shard.path) as files:
                for f in files:
                    if is_id(f.name) and f.name.startswith(shard.name):
                        st = f.stat(follow_symlinks=False)
                        found.append((ChunkId(f.name), st.st_size, st.st_mtime))
    return found


def _read_and_hash(path: Path, touch: bool) -> tuple[bytes, ChunkId]:
    with open(path, "rb") as f:
        data = f.read()
        if touch:
            os.utime(f.fileno())  # LRU order survives restarts
    return data, hash_bytes(data)


def _pread_and_hash(path: Path, offset: int, size: int) -> tuple[bytes, os.stat_result, ChunkId]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        parts = []
        done = 0
        while done < size:
            part = os.pread(fd, size - done, offset + done)
            if not part:
                break  # truncated: the hash below says so
            parts.append(part)
            done += len(part)
    finally:
        os.close(fd)
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    return data, st, hash_bytes(data)


def _stat_all(paths: list[Path]) -> list[os.stat_result | None]:
    out: list[os.stat_result | None] = []
    for path in paths:
        try:
            out.append(os.lstat(path))
        except FileNotFoundError:
            out.append(None)
    return out


def _remove(path: str | Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _remove_if_inode(path: Path, ino: int | None) -> None:
    """Unlink ``path`` unless it now names another inode (another process's
    newer copy, renamed over ours)."""
    try:
        if ino is None or os.lstat(path).st_ino == ino:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_all(paths: list[tuple[Path, int | None]]) -> None:
    for path, ino in paths:
        _remove_if_inode(path, ino)


boot()


def _syncfs(path: Path) -> None:
    """Flush every dirty page of the filesystem holding ``path`` (one call per
    pull instead of one fsync per file)."""
    syncfs = getattr(libc(), "syncfs", None)
    if syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if syncfs(fd) != 0:
            import ctypes

            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)
