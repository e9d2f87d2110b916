"""pull: materialize a tree manifest into a directory.

Per file, cheapest first:
1. **Already there**: the destination file matches the pull marker (its size,
   mtime_ns, inode, ctime_ns and content key, as the last pull recorded them;
   see the durability policy) -> kept on one ``stat``. A file the marker does not vouch
   for but of the right size is checked chunk by chunk against the manifest
   (read, never rewritten, when it is intact).
2. **In the node store** (``store.open_file(file_key)``) -> placed by the link
   mode (linking.py: reflink, hardlink or an in-kernel copy), 256 files per
   worker hop, hops in ``_PLACE_THREADS`` threads at once.
3. **Otherwise** assembled: in the node store when there is one
   (``begin_file``; the tier list's ``fetch`` delivers each verified chunk to a
   sink that pwrites it at every offset where it occurs, so each pulled byte is
   written once), committed, then placed; without a node store, straight into
   a temp file beside its final name, renamed into place.
   In ``auto`` mode where the node store cannot clone into DEST (probed once:
   another filesystem, or one without FICLONE such as ext4 or tmpfs), a copy in
   the store would cost a second write of every byte: files are assembled
   straight in DEST instead and the store adopts them as **seeds** (seeds.py:
   read, never owned; deleting DEST's file deletes the node's copy). Step 2
   then also places from seeds (a copy, the seed's identity checked before and
   after). ``copy`` mode keeps a node-owned copy.
The whole-file check is the chunks verified on arrival: nothing is read back.

Every step inside the destination goes through directory fds (linking.DestDir).
Two pulls into one destination take turns (``flock`` on the destination), so
the second one finds the first one's work and keeps it.

**Durability policy.** No fsync per file, and no waiting for write-back at
all on a warm pull. Files are written to temp names and renamed into place;
the marker records each file's (size, mtime_ns, ino, ctime_ns, nlink) as
stat'ed right after it was placed or checked, with the kernel's boot id and,
per file, whether its bytes are known to be on disk ("durable"):
- A record is durable when a ``syncfs`` of the destination's filesystem ran
  after the file was written (the node store's ``sync()`` after a pull that
  committed files, when it shares the destination's filesystem), or when the
  file was checked chunk by chunk and its ctime predates the current boot
  (its bytes came back from the disk).
- A record that is not durable vouches for its file only during the boot it
  was written in. Losing power is a reboot: the boot id changes, the next
  pull trusts none of those records and checks each such file chunk by chunk
  (a torn one — zeroes, short — is repaired; an intact one becomes durable).
  XFS and ext4 usually bring a torn new file back empty, which the size in
  the record already catches (tests/test_linkmodes.py crashes an XFS for
  real); the boot id covers a file whose size survived and whose data did not.
- SIGKILL at any moment loses no page cache: every final name holds a whole
  file (renames are atomic; temp files are removed by the next pull), and
  the marker, replaced atomically, describes what is there.
A stat can only vouch for a file while its (ino, ctime) is unchanged: any
write, chmod or rename moves the ctime. The one thing no stat can see is an
in-place write by someone else whose data reached the disk while its inode
update did not; blobstore never writes in place. The runner's completeness
marker carries the boot id too, so a runner never starts on a torn file.
The marker lives beside the node store (``state_dir``), keyed by the
destination's device and inode, so the destination holds only the tree.

Memory: chunks in flight are bounded by the sources' concurrency; files
assembled at once by ``_WINDOW_FILES``/``_WINDOW_BYTES`` (windows in the order
of the files' places in the store's packs, see ``_windows``); open fds by the
files partly written (a file's fds close as its last byte lands).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import anyio

from .atomic import TMP_MARK, tmp_name
from .errors import ChunkMissing, Corrupt, DiskFull, SourceGone, Unavailable, os_error
from .ids import ChunkId, hash_bytes
from .linking import (
    DestDir,
    LinkMode,
    Placer,
    clone_fd,
    file_mode,
    keepable,
    open_tmp,
    replace_into,
    special_bits_dropped,
    split,
    unlink_quietly,
)
from .manifest import ChunkRef, Entry, Tree, file_key
from .marker import (
    Record,
    boot,
    load_marker,
    marker_path,
    read_marker,
    record,
    vouched,
    write_marker,
)
from .parallel import for_each
from .progress import FileProgress
from .pwrite import PREALLOCATE_MIN, preallocate, pwrite_all
from .seeds import Seed
from .source import ChunkData, ChunkSource, SplitSink

log = logging.getLogger(__name__)
T = TypeVar("T")

Progress = Callable[[int, int], None]
"""Called with (bytes done, bytes total)."""

_HOP_FILES = 256
"""Files handled per worker-thread hop (check, place, finish): one hop per
file cost more than the work itself for thousands of small files."""
_WINDOW_FILES = 16384
_WINDOW_BYTES = 1 << 30
"""Files assembled per fetch window (one ``source.fetch``). Windows follow the
files' places in the store's packs, so a window reads a run of packs front to
back (~one ranged GET per span) instead of a little of every pack. Bounds the
temp files waiting for their commit, not memory (the source bounds chunks in
flight) nor open fds (a file's fds are closed as its last byte lands)."""
_LOCK_POLL = 0.05
_PLACE_THREADS = min(8, max(2, os.cpu_count() or 2))
_STORE_RESERVE = 64 << 20
"""Free space left on the node store's disk when deciding what it can hold."""

__all__ = [
    "TMP_MARK",
    "FileStore",
    "FileWriter",
    "Progress",
    "PullStats",
    "boot_id",
    "default_priority",
    "materialize",
    "read_marker",
]


class FileWriter(Protocol):
    """A file being assembled in the node store."""

    def write(self, data: ChunkData, offset: int) -> None: ...
    async def commit(self, chunks: Sequence[ChunkRef]) -> Path: ...
    async def abort(self) -> None: ...


class FileStore(Protocol):
    """What a pull needs of the node store (blobstore.nodestore.NodeStore)."""

    root: Path

    def open_file(self, key: ChunkId) -> Path | None: ...
    def begin_file(self, key: ChunkId, size: int) -> FileWriter: ...
    async def sync(self) -> None: ...
    def open_seed(self, key: ChunkId) -> Seed | None: ...
    def adopt_seeds(self, seeds: Iterable[Seed]) -> None: ...


@dataclass(slots=True)
class PullStats:
    files: int = 0
    bytes: int = 0
    kept_files: int = 0
    """Files already present and identical, left untouched."""
    checked_files: int = 0
    """Of those, files the marker did not vouch for, verified chunk by chunk."""
    placed_bytes: int = 0
    """Bytes placed from the node store's whole files (counted as local)."""
    seconds: float = 0.0
    link_modes: dict[str, int] = field(default_factory=dict)


def default_priority(entry: Entry) -> Any:
    """Small files first (config, tokenizer), then big weights."""
    return entry.size


class _Item:
    """One manifest file and where it goes."""

    __slots__ = ("entry", "key", "mode", "name", "parent")

    def __init__(self, entry: Entry, mode: int) -> None:
        self.entry = entry
        self.parent, self.name = split(entry.path)
        self.key = file_key(entry)
        self.mode = mode


async def materialize(
    tree: Tree,
    dest: Path | DestDir,
    source: ChunkSource,
    *,
    store: FileStore | None = None,
    link_mode: LinkMode = "auto",
    keep_special_modes: bool = False,
    state_dir: Path | None = None,
    concurrency: int = 16,
    progress: Progress | None = None,
    priority: Callable[[Entry], Any] = default_priority,
) -> PullStats:
    """Write ``tree`` into ``dest`` (a path, or a DestDir opened by the caller, which
    this then owns and closes: the node agent's, opened by its client). Raises
    BadInput/UnsafePath, Unavailable or NotFound/Corrupt (a chunk could not be
    fetched), DiskFull."""
    del concurrency  # the sources bound their own concurrency
    started = time.monotonic()
    if isinstance(dest, DestDir):
        root = dest
    else:
        root = await anyio.to_thread.run_sync(DestDir.open, Path(dest))
    try:
        await _lock(root)
        pull = _Pull(
            tree, root, source, store, link_mode, keep_special_modes, state_dir, progress, priority
        )
        try:
            await pull.run()
        except OSError as exc:
            raise os_error(exc, f"cannot write into {root.path}") from exc
    finally:
        await anyio.to_thread.run_sync(root.close)  # closing the fd drops the lock
    pull.stats.seconds = time.monotonic() - started
    return pull.stats


async def _lock(root: DestDir) -> None:
    """Take the destination's lock, waiting for another pull into it."""
    waited = False
    while True:
        try:
            fcntl.flock(root.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if not waited:
                log.info("waiting for another pull into %s", root.path)
                waited = True
        except OSError as exc:  # a filesystem without flock: go on unlocked
            log.info(
                "cannot lock %s (%s); not guarding against concurrent pulls",
                root.path,
                exc.strerror,
            )
            return
        await anyio.sleep(_LOCK_POLL)


class _Pull:
    """State of one pull (see the module docstring for the steps)."""

    def __init__(
        self,
        tree: Tree,
        root: DestDir,
        source: ChunkSource,
        store: FileStore | None,
        link_mode: LinkMode,
        keep_special: bool,
        state_dir: Path | None,
        progress: Progress | None,
        priority: Callable[[Entry], Any],
    ) -> None:
        self.tree = tree
        self.root = root
        self.source = source
        self.store = store
        self.placer = Placer(link_mode)
        self.keep_special = keep_special
        self.progress = progress
        # A runtime-checkable Protocol's isinstance inspects every attribute:
        # asked once here, not per report (~18 us a call, 1,000 calls per GiB).
        self.progress_files = progress.files if isinstance(progress, FileProgress) else None
        files = sorted((e for e in tree.entries if e.kind == "file"), key=priority)
        self.items = [_Item(e, special_bits_dropped(e.mode, keep_special)) for e in files]
        self.stats = PullStats(files=len(files), bytes=sum(e.size for e in files))
        self.done = 0
        self.marker_path = None if state_dir is None else marker_path(state_dir, os.fstat(root.fd))
        self.old: dict[str, Record] = {}
        self.records: dict[str, Record] = {}
        self.changed = False
        """Anything written or checked that the marker did not vouch for."""
        self.store_full = False
        """The node store's disk has no room: files go straight into DEST."""
        self.committed = False
        """Files were committed to the node store (it must sync them)."""
        self.seeding = False
        """auto mode where the node store cannot clone into DEST: files are
        assembled in DEST and adopted by the store as seeds (seeds.py)."""
        self.seeds: list[Seed] = []
        self.dest_abs = ""
        self.boot, self.boot_time_ns = _boot()
        self._done_lock = threading.Lock()
        self.from_seed: dict[int, Seed] = {}
        """Items placed from a seed, by id(item): copied, its identity checked."""

    def _advance(self, n: int, *, placed: bool = False) -> None:
        """Count ``n`` more bytes done (from any thread; reported by ``_report``);
        ``placed``: from the node store's files."""
        with self._done_lock:
            self.done += n
            if placed:
                self.stats.placed_bytes += n

    def _report(self) -> None:
        """Call the progress callback — on the event loop only."""
        if self.progress is not None:
            if self.progress_files is not None:  # every file recorded is in place
                self.progress_files(len(self.records), len(self.items))
            self.progress(self.done, self.stats.bytes)

    async def run(self) -> None:
        run = anyio.to_thread.run_sync
        kept: dict[str, Record] = {}
        if self.marker_path is not None:
            self.old = await run(load_marker, self.marker_path, self.boot)
            # Records of files this tree does not name (another model under the
            # same root, or paths a selection left out) stay: re-pulling that
            # one is then a stat per file too, not a hash.
            named = {e.path for e in self.tree.entries}
            kept = {p: r for p, r in self.old.items() if p not in named}
        dirs = [e for e in self.tree.entries if e.kind == "dir"]
        await run(self._make_dirs, dirs)
        self.dest_abs = await run(os.path.abspath, self.root.path)
        if self.store is not None and self.placer.mode == "auto":
            self.seeding = not await run(_can_clone, self.store.root, self.root.fd)
        need: list[_Item] = []
        for batch in _chunked(self.items, _HOP_FILES):
            need += await run(self._check, batch)
            self._report()
        empty = [i for i in need if i.entry.size == 0]
        for batch in _chunked(empty, _HOP_FILES):
            await run(self._create_empty, batch)
        need = [i for i in need if i.entry.size > 0]
        if self.store is not None:
            need = await self._place_from_store(need)
        for window in _windows(need, _pack_order(self.tree.entries)):
            seeded = len(self.seeds)
            await self._assemble(window)
            self._report()  # the window's files are in place: the file count moves
            if self.store is not None and len(self.seeds) > seeded:
                # Later windows then read the chunks they share with these files
                # from the node (local tier), not from peers or the store again.
                self.store.adopt_seeds(self.seeds[seeded:])
        links = [e for e in self.tree.entries if e.kind == "symlink"]
        for some_links in _chunked(links, _HOP_FILES):
            await run(self._make_symlinks, some_links)
        await run(self._dir_modes, dirs)
        self.stats.link_modes = dict(self.placer.used)
        if self.seeds:
            self.stats.link_modes["seeded"] = len(self.seeds)
        if self.store is not None and self.seeds and not self.committed:
            self.store.adopt_seeds(self.seeds)
            await self.store.sync()  # only the seeds' rows: no syncfs without files
        if self.committed and self.store is not None:
            if self.seeds:
                self.store.adopt_seeds(self.seeds)
            await self.store.sync()  # the store's own durability (its index rows)
            if await run(_same_filesystem, self.store.root, self.root.fd):
                for record in (*self.records.values(), *kept.values()):
                    record[6] = 1  # that syncfs covered all of DEST too
                self.changed = True
        records = {**kept, **self.records}
        if self.marker_path is not None and (self.changed or self.old != records):
            dest = await run(os.path.abspath, self.root.path)
            await run(write_marker, self.marker_path, dest, self.boot, records)

    # ------------------------------------------------------------------ dirs

    def _make_dirs(self, dirs: list[Entry]) -> None:
        """Create every directory (and parents of files); remove temp files a
        killed pull left in them (we hold the lock: no live pull owns them)."""
        wanted = {""} | {e.path for e in dirs} | {i.parent for i in self.items}
        for rel in sorted(wanted):
            self.root.remove_tmp_leftovers(self.root.dir_fd(rel))

    def _dir_modes(self, dirs: list[Entry]) -> None:
        # Deepest first: a read-only directory must not block its children.
        for entry in sorted(dirs, key=lambda e: -e.path.count("/")):
            fd = self.root.dir_fd(entry.path)
            mode = special_bits_dropped(entry.mode, self.keep_special)
            if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
                os.fchmod(fd, mode)

    # ------------------------------------------------------------------ files already there

    def _check(self, items: list[_Item]) -> list[_Item]:
        """Keep what is already right; return the items that need writing."""
        need = []
        for item in items:
            dfd = self.root.dir_fd(item.parent)
            try:
                st = os.stat(item.name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                need.append(item)
                continue
            if not keepable(st, item.entry.size, self.placer.mode):
                need.append(item)  # (replace_into refuses to replace a directory)
                continue
            old = self.old.get(item.entry.path)
            checked = False
            if old is not None and vouched(old, st, item.key):
                durable = old[6]
            else:
                if not _chunks_match(dfd, item.name, item.entry):
                    need.append(item)
                    continue
                self.stats.checked_files += 1
                checked = True
                # unchanged since before this boot: the bytes just read came from disk
                durable = int(st.st_ctime_ns < self.boot_time_ns)
            st = self._fix_mode(dfd, item, st)
            self.records[item.entry.path] = record(st, item.key, durable)
            if checked and self.seeding:  # verified just now (e.g. after a reboot)
                self.seeds.append(
                    Seed.of(
                        item.key,
                        os.path.join(self.dest_abs, item.entry.path),
                        st,
                        _offsets(item.entry.chunks),
                        self.boot,
                        durable=bool(durable),
                    )
                )
            self.stats.kept_files += 1
            self._advance(item.entry.size)
        return need

    def _fix_mode(self, dfd: int, item: _Item, st: os.stat_result) -> os.stat_result:
        mode = stat.S_IMODE(st.st_mode)
        want = file_mode(item.mode, st)
        if mode == want:
            return st
        fd = os.open(item.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            os.fchmod(fd, want)
            self.changed = True
            return os.fstat(fd)
        finally:
            os.close(fd)

    def _create_empty(self, items: list[_Item]) -> None:
        for item in items:
            dfd = self.root.dir_fd(item.parent)
            tmp, fd = open_tmp(dfd, item.name)
            self._commit_tmp(dfd, tmp, item, fd)

    def _commit_tmp(self, dfd: int, tmp: str, item: _Item, fd: int) -> None:
        """Set the mode of temp file ``tmp`` (open as ``fd``, closed here), rename
        it into place and record it."""
        try:
            os.fchmod(fd, item.mode)
            replace_into(dfd, tmp, item.name)
            st = os.fstat(fd)  # after the rename: it moves the ctime
        except BaseException:
            unlink_quietly(dfd, tmp)
            raise
        finally:
            os.close(fd)
        self.changed = True
        self.records[item.entry.path] = record(st, item.key)

    # ------------------------------------------------------------------ node store

    async def _place_from_store(self, items: list[_Item]) -> list[_Item]:
        """Place every item the node store holds; return the rest."""
        assert self.store is not None
        missing: list[_Item] = []
        found: list[tuple[_Item, Path]] = []
        seeded: list[tuple[_Item, Path]] = []
        for item in items:
            path = self.store.open_file(item.key)
            if path is not None:
                found.append((item, path))
                continue
            seed = self.store.open_seed(item.key) if self.seeding else None
            if seed is None:
                missing.append(item)
            else:
                self.from_seed[id(item)] = seed
                seeded.append((item, Path(seed.path)))
        return missing + await self._place_all(found + seeded, cached=True)

    async def _place_all(self, found: list[tuple[_Item, Path]], *, cached: bool) -> list[_Item]:
        """Place items from their store paths, batches in ``_PLACE_THREADS``
        worker threads at once (file creation on ext4 blocks on the journal:
        two threads placed the stdlib 3-4x faster than one). Returns the items
        whose store file vanished meanwhile."""
        gone: list[_Item] = []

        async def hop(batch: list[tuple[_Item, Path]]) -> None:
            gone.extend(await anyio.to_thread.run_sync(self._place, batch, cached))
            self._report()

        await for_each(_chunked(found, _HOP_FILES), hop, _PLACE_THREADS)
        return gone

    def _place(self, batch: list[tuple[_Item, Path]], cached: bool) -> list[_Item]:
        """Place each item (runs in several threads at once: each holds its own
        directory fds). Returns those whose store file vanished."""
        gone = []
        batch.sort(key=lambda pair: pair[0].parent)
        parent, dfd = None, -1
        try:
            for item, path in batch:
                if item.parent != parent:
                    if dfd >= 0:
                        os.close(dfd)
                        dfd = -1
                    dfd, parent = self.root.own_dir_fd(item.parent), item.parent
                seed = self.from_seed.get(id(item))
                try:
                    st = self.placer.place(
                        path,
                        dfd,
                        item.name,
                        item.mode,
                        item.entry.size,
                        None if seed is None else seed.matches,
                    )
                except SourceGone:
                    gone.append(item)
                    continue
                self.changed = True
                self.records[item.entry.path] = record(st, item.key)
                if cached:
                    self._advance(item.entry.size, placed=True)
        finally:
            if dfd >= 0:
                os.close(dfd)
        return gone

    async def _assemble(self, items: list[_Item]) -> None:
        """Fetch ``items`` in one round: into the node store (one writer per
        distinct content, then placed) as far as its disk has room, the rest
        straight into temp files in DEST."""
        done_before = self.done
        try:
            room = [] if self.seeding else await anyio.to_thread.run_sync(self._store_room, items)
            await self._assemble_round(items, room)
        except DiskFull as exc:  # raised by the node store: its disk filled meanwhile
            self._store_full(exc)
            with self._done_lock:
                self.done = done_before
            await self._assemble_round(items, [])

    def _store_room(self, items: list[_Item]) -> list[_Item]:
        """The items the node store's disk has room for (no store: none). In a
        worker thread: a statvfs."""
        if self.store is None or self.store_full:
            return []
        try:
            st = os.statvfs(self.store.root)
        except OSError:
            return items
        room = st.f_bavail * st.f_frsize - _STORE_RESERVE
        fits: list[_Item] = []
        seen: set[ChunkId] = set()
        for item in items:
            if item.key not in seen:
                if item.entry.size > room:
                    continue
                room -= item.entry.size
                seen.add(item.key)
            fits.append(item)
        if len(fits) < len(items):
            self._store_full(DiskFull(f"no space left for the cache in {self.store.root}"))
        return fits

    def _store_full(self, exc: DiskFull) -> None:
        if not self.store_full:
            log.warning("%s: writing files straight into the destination", exc)
        self.store_full = True

    async def _assemble_round(self, items: list[_Item], in_store: list[_Item]) -> None:
        by_key: dict[ChunkId, list[_Item]] = {}
        for item in in_store:
            by_key.setdefault(item.key, []).append(item)
        stored = {id(item) for item in in_store}
        direct = [_DestFile(self.root, item) for item in items if id(item) not in stored]
        writers: dict[ChunkId, FileWriter] = {}
        try:
            if by_key:
                assert self.store is not None
                for key, same in by_key.items():
                    writers[key] = self.store.begin_file(key, same[0].entry.size)
            targets: list[tuple[_Target, Entry]] = [
                (writers[key], same[0].entry) for key, same in by_key.items()
            ]
            targets += [(t, t.item.entry) for t in direct]
            await self._fetch_into(targets, [len(s) for s in by_key.values()] + [1] * len(direct))
            placed: list[tuple[_Item, Path]] = []
            for key in list(writers):
                self.committed = True
                path = await writers.pop(key).commit(by_key[key][0].entry.chunks)
                placed += [(item, path) for item in by_key[key]]
            gone = await self._place_all(placed, cached=False)
            if gone:  # committed a moment ago: evicted or changed since
                raise Unavailable(
                    f"{gone[0].entry.path}: the node store lost the file "
                    "just assembled (store too small for this pull?)"
                )
            for some in _chunked(direct, _HOP_FILES):
                await anyio.to_thread.run_sync(self._finish_in_dest, some)
            if self.seeding:
                self.seeds += [
                    Seed.of(
                        t.item.key,
                        os.path.join(self.dest_abs, t.item.entry.path),
                        t.stat,
                        _offsets(t.item.entry.chunks),
                        self.boot,
                        durable=False,
                    )
                    for t in direct
                    if t.stat is not None
                ]
        finally:
            with anyio.CancelScope(shield=True):
                for writer in writers.values():
                    await writer.abort()
                await anyio.to_thread.run_sync(_discard, direct)

    def _finish_in_dest(self, targets: list[_DestFile]) -> None:
        for t in targets:
            if t.fd >= 0:  # an fd still open: a write failed or never completed it
                fd, t.fd = t.fd, -1
                os.close(fd)
            dfd = t.dir()
            try:
                if t.fd != _COMPLETE:
                    raise Corrupt(
                        f"{t.item.entry.path}: assembled {t.filled} bytes, the "
                        f"manifest says {t.item.entry.size}"
                    )
                tmp, t.tmp = t.tmp, ""
                try:
                    size = os.stat(tmp, dir_fd=dfd, follow_symlinks=False).st_size
                    if size != t.item.entry.size:
                        raise Corrupt(
                            f"{t.item.entry.path}: assembled {size} bytes, the "
                            f"manifest says {t.item.entry.size}"
                        )
                    replace_into(dfd, tmp, t.item.name)
                    # after the rename: it moves the ctime
                    st = os.stat(t.item.name, dir_fd=dfd, follow_symlinks=False)
                except BaseException:
                    unlink_quietly(dfd, tmp)
                    raise
            finally:
                os.close(dfd)
            self.changed = True
            self.records[t.item.entry.path] = record(st, t.item.key)
            t.stat = st

    # ------------------------------------------------------------------ fetching

    async def _fetch_into(
        self, targets: Sequence[tuple[_Target, Entry]], copies: Sequence[int]
    ) -> None:
        """Fetch each distinct chunk of ``targets`` once through the tiers and
        write it at every offset where it occurs. ``copies`` counts the files
        each target stands for (progress)."""
        places: dict[ChunkId, list[tuple[_Target, int, int]]] = {}
        refs: list[ChunkRef] = []
        for (target, entry), n in zip(targets, copies, strict=True):
            offset = 0
            for ref in entry.chunks:
                at = places.get(ref.id)
                if at is None:
                    at = places[ref.id] = []
                    refs.append(ref)
                at.append((target, offset, n))
                offset += ref.size
        writes = _Writes({ref.id for ref in refs})

        def write(ref: ChunkRef, data: ChunkData) -> None:
            # In a worker thread, often the one that verified the chunk.
            if len(data) != ref.size or not writes.claim(ref.id):
                return  # a wrong size is raised by ``report``; twice: written already
            try:
                at = places[ref.id]
                _write_at(at, data)
                self.changed = True
                copies = sum(n for _, _, n in at)
                self._advance(len(data))
                # Every further copy (the chunk again in this file or another, or
                # identical files) came from the node, not from the tier: count it local.
                self._advance(len(data) * (copies - 1), placed=True)
            except BaseException as exc:
                writes.failed(exc)
                raise
            finally:
                writes.done()

        async def report(ref: ChunkRef, size: int) -> None:
            if size != ref.size:
                raise Corrupt(f"chunk {ref.id} has {size} bytes, the manifest says {ref.size}")
            self._report()

        sink = SplitSink(write, report)
        try:
            undelivered = await self.source.fetch(refs, sink)
            for ref in undelivered:
                if ref.id in writes.pending:  # ask once more, for the data or the precise error
                    data = await self.source.get(ref.id)
                    await sink(ref, data)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await writes.settle(raising=False)
            raise
        await writes.settle()
        if writes.pending:
            raise ChunkMissing(next(iter(writes.pending)), "any tier")

    # ------------------------------------------------------------------ symlinks

    def _make_symlinks(self, entries: list[Entry]) -> None:
        for entry in entries:
            assert entry.target is not None
            parent, name = split(entry.path)
            dfd = self.root.dir_fd(parent)
            with contextlib.suppress(OSError):
                if os.readlink(name, dir_fd=dfd) == entry.target:
                    continue
            tmp = tmp_name(name)
            os.symlink(entry.target, tmp, dir_fd=dfd)
            try:
                replace_into(dfd, tmp, name)
            except BaseException:
                unlink_quietly(dfd, tmp)
                raise
            self.changed = True


class _Writes:
    """The chunks a fetch still has to write, claimed by the worker threads
    that write them (each exactly once). ``settle`` waits for claimed writes
    still running -- a read abandoned at its deadline may write late -- and
    raises the first error one of them hit."""

    __slots__ = ("_error", "_lock", "_running", "pending")

    def __init__(self, pending: set[ChunkId]) -> None:
        self.pending = pending
        self._lock = threading.Lock()
        self._running = 0
        self._error: BaseException | None = None

    def claim(self, chunk_id: ChunkId) -> bool:
        with self._lock:
            if chunk_id not in self.pending:
                return False
            self.pending.discard(chunk_id)
            self._running += 1
            return True

    def done(self) -> None:
        with self._lock:
            self._running -= 1

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = exc

    async def settle(self, *, raising: bool = True) -> None:
        # Polled: the writers are worker threads, and setting an anyio.Event
        # from them would cost a hop to the loop per chunk. Rare: only after a
        # read was abandoned mid-write.
        while self._running:  # noqa: ASYNC110
            await anyio.sleep(_SETTLE_POLL)
        if raising and self._error is not None:
            raise self._error


_SETTLE_POLL = 0.005


class _Target(Protocol):
    def write(self, data: ChunkData, offset: int) -> None: ...


class _DestFile:
    """A file assembled straight into a temp file in the destination. Its fds
    (the file's and a dup of its directory's) are opened by the first write and
    closed, the mode set, as soon as its last byte is written: a window of
    thousands of files holds fds only for the few partly written."""

    __slots__ = (
        "busy",
        "dir_fd",
        "fd",
        "filled",
        "item",
        "lock",
        "root",
        "stat",
        "tmp",
        "write_lock",
    )

    def __init__(self, root: DestDir, item: _Item) -> None:
        self.root = root
        self.item = item
        self.dir_fd = -1
        self.fd = -1
        """-1: not opened yet; _COMPLETE: written whole and closed."""
        self.tmp = ""
        self.filled = 0
        self.busy = 0
        self.lock = threading.Lock()
        self.write_lock = threading.Lock()
        self.stat: os.stat_result | None = None
        """Its stat once renamed into place."""

    def write(self, data: ChunkData, offset: int) -> None:
        with self.lock:
            if self.fd == -1:  # opened by the first write, in a worker thread
                self.dir_fd = self.root.own_dir_fd(self.item.parent)
                self.tmp, self.fd = open_tmp(self.dir_fd, self.item.name)
                if self.item.entry.size >= PREALLOCATE_MIN:
                    preallocate(self.fd, self.item.entry.size)
            fd = self.fd
            self.busy += 1
        done = False
        try:
            pwrite_all(fd, data, offset, self.write_lock)
            done = True
        finally:
            with self.lock:
                self.busy -= 1
                if done:
                    self.filled += len(data)
                if self.filled >= self.item.entry.size and self.busy == 0 and self.fd >= 0:
                    self._close_whole()

    def _close_whole(self) -> None:
        fd, self.fd = self.fd, _COMPLETE
        dir_fd, self.dir_fd = self.dir_fd, -1
        try:
            os.fchmod(fd, self.item.mode)
        finally:
            os.close(fd)
            os.close(dir_fd)

    def dir(self) -> int:
        """An fd of the file's directory, owned by the caller."""
        return os.dup(self.dir_fd) if self.dir_fd >= 0 else self.root.own_dir_fd(self.item.parent)


_COMPLETE = -2


def _discard(targets: list[_DestFile]) -> None:
    for t in targets:
        if t.fd >= 0:
            os.close(t.fd)
        t.fd = -1
        if t.tmp:
            with contextlib.suppress(OSError):
                dfd = t.dir()
                unlink_quietly(dfd, t.tmp)
                os.close(dfd)
            t.tmp = ""
        if t.dir_fd >= 0:
            os.close(t.dir_fd)
            t.dir_fd = -1


def _write_at(places: list[tuple[_Target, int, int]], data: ChunkData) -> None:
    for target, offset, _ in places:
        target.write(data, offset)


def _chunks_match(dir_fd: int, name: str, entry: Entry) -> bool:
    """Whether the file holds exactly the entry's chunks (each read and hashed)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        offset = 0
        for ref in entry.chunks:
            data = os.pread(fd, ref.size, offset)
            if len(data) != ref.size or hash_bytes(data) != ref.id:
                return False
            offset += ref.size
        return os.fstat(fd).st_size == offset
    finally:
        os.close(fd)


def _chunked(items: Sequence[T], n: int) -> Iterable[list[T]]:
    for start in range(0, len(items), n):
        yield list(items[start : start + n])


def _pack_order(entries: Sequence[Entry]) -> dict[ChunkId, int]:
    """Each pack's rank by first use in manifest order (the order a push wrote
    them: pack ids are random)."""
    order: dict[ChunkId, int] = {}
    for entry in entries:
        for ref in entry.chunks:
            if ref.pack is not None and ref.pack not in order:
                order[ref.pack] = len(order)
    return order


def _windows(items: list[_Item], packs: dict[ChunkId, int]) -> Iterable[list[_Item]]:
    """``items`` (in priority order) cut into fetch windows by their place in
    the store: files sorted by (pack rank, offset) of their first chunk, cut
    at ``_WINDOW_FILES``/``_WINDOW_BYTES``; each window handed back in
    priority order (its spans then start with the packs of the files wanted
    first). Files without packs (v1 manifests) keep their priority order, last.

    Why place beats priority: a window of the 128 smallest files read a little
    of every pack (314 GETs per GiB for the stdlib tree); in store order a
    window is a run of packs (one GET per span). The runner waits for the whole
    pull anyway, so small-files-first bought little."""
    rank = {id(item): n for n, item in enumerate(items)}
    unplaced = len(packs)

    def place(item: _Item) -> tuple[int, int]:
        first = item.entry.chunks[0]
        if first.pack is None:
            return unplaced, rank[id(item)]
        return packs.get(first.pack, unplaced), first.offset

    window: list[_Item] = []
    size = 0
    for item in sorted(items, key=place):
        window.append(item)
        size += item.entry.size
        if len(window) >= _WINDOW_FILES or size >= _WINDOW_BYTES:
            yield sorted(window, key=lambda i: rank[id(i)])
            window, size = [], 0
    if window:
        yield sorted(window, key=lambda i: rank[id(i)])


# --------------------------------------------------------------------------- durability


def _boot() -> tuple[str, int]:
    """marker.boot (tests replace this one to simulate a reboot)."""
    return boot()


def boot_id() -> str:
    """The kernel's id of this boot ("" if unknown): a marker written without
    waiting for write-back vouches for files only while it is unchanged."""
    return _boot()[0]


def _can_clone(store_root: Path, dest_fd: int) -> bool:
    """Whether files of the node store can be cloned into DEST: one filesystem,
    and it clones (probed with two one-byte temp files in DEST)."""
    if not _same_filesystem(store_root, dest_fd):
        return False
    a, afd = open_tmp(dest_fd, "clone-probe")
    try:
        os.write(afd, b"x")
        # FICLONE needs a readable source: a write-only one fails with EBADF,
        # which made every probe say "no" (auto seeded on XFS too).
        rfd = os.open(a, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dest_fd)
        b, bfd = open_tmp(dest_fd, "clone-probe")
        try:
            return clone_fd(rfd, bfd)
        except OSError:
            return False
        finally:
            os.close(rfd)
            os.close(bfd)
            unlink_quietly(dest_fd, b)
    finally:
        os.close(afd)
        unlink_quietly(dest_fd, a)


def _offsets(chunks: Sequence[ChunkRef]) -> tuple[tuple[ChunkId, int, int], ...]:
    out = []
    offset = 0
    for ref in chunks:
        out.append((ref.id, offset, ref.size))
        offset += ref.size
    return tuple(out)


def _same_filesystem(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_dev == os.fstat(fd).st_dev
    except OSError:
        return False
