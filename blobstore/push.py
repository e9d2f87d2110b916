"""push: snapshot a directory tree into the object store.

Order matters for crash safety: packs (and their indexes) first, then the
manifest, then the ref. A crash at any point leaves at worst unreferenced
objects (gc sweeps them), never a ref to something missing.

Dedup needs no request per chunk: the writer's ``StoreIndex`` (pack indexes,
cached locally) says where chunks already are. The manifest and the ref are
two PUTs: a push that uploaded a chunk made a tree no ref names yet (its pack
is new); one that uploaded none first GETs the ref, and writes nothing if the
ref already names the tree (and a HEAD finds the manifest).

Files are not read again when nothing says they changed: ``PushIndex`` (git's
index, for push) keeps, per pushed root in the node's cache dir, every file's
stat (size, mtime_ns, ino, ctime_ns, dev) and the chunk list it was pushed as.
A file whose stat matches exactly reuses its chunk list, each chunk located
again through the writer's ``StoreIndex`` (a chunk whose pack the LIST no
longer shows, or that verify found bad, sends the file back to be read).

Racily clean files (git's rule, applied to ctime too): an entry is recorded only
if its mtime and ctime are older than ``window`` before the push began (the
time taken before the tree was scanned). Why that suffices: a write to the file
after we read it (so after the push began, at real time t >= T0) stamps ctime,
and mtime unless restored with utime, from the filesystem's clock, which lags
real time by less than a tick; so the new ctime is >= T0 - tick. A recorded
ctime < T0 - window (window >= tick + clock skew) therefore cannot equal it, and
the stat no longer matches. ``RACY_WINDOW_NS`` is 2 s: coarse kernel clocks tick
in <= 10 ms, FAT keeps 2 s mtimes, and it leaves room for a file server's clock
a little off ours. Entries inside the window are simply not recorded: the next
push reads those files (as git re-hashes racily clean entries).

A push that finds every file in the push index and the ref already naming the
resulting tree (``push_unchanged``) takes no lease and writes nothing: it costs
one request, a GET of the ref. Files the index does not vouch for but that the
last push saw with the size they have now (touched, rewritten with the same
bytes, racily clean; up to ``UNCHANGED_READ_MAX``) are read, cut and looked up
in the ref's manifest (one more GET) before deciding: if the tree is still the
ref's, nothing is written either. A new file or a changed size goes the full
way at once (no extra request).

Why the ref alone suffices: gc never sweeps a pack a live manifest names, and
when it repacks one it moves the ref to a new manifest (so the ref no longer
equals our tree and the push takes the full path, whose LIST shows the pack
retired). A pack can only vanish under a ref
that still names it by damage outside blobstore (a hand deletion, a bucket
lifecycle rule), like a chunk that rots; two nets catch that: a location
``verify`` found bad (the node's known-bad list, no request) sends the push down
the full path, which uploads those chunks again; and the push index is trusted
only while *fresh* (``FRESH_NS``, 1 h, after a LIST or a push last saw its
packs): after that a no-op push LISTs ``packs/`` once, and a pack of the tree
missing from the LIST sends it down the full path too.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from .atomic import TMP_MARK, write_atomic
from .catalog import Catalog, check_ref
from .chunker import Chunker, ChunkerParams
from .config import FRESH_NS, RACY_WINDOW_NS
from .errors import BadInput, Corrupt, InvalidManifest, NotFound, os_error, single_errors
from .ids import ChunkId, hash_bytes, is_id
from .manifest import ChunkerInfo, ChunkRef, Entry, Image, Tree, chunks_key, encode
from .objectstore import ObjectStore, manifest_key
from .packs import BadLocation, IndexCache, list_packs, relocate_refs
from .parallel import for_each
from .progress import FileProgress
from .source import ChunkSource

if TYPE_CHECKING:
    from .ingest import Ingestor
    from .materialize import Progress

log = logging.getLogger(__name__)

COMPLETE_MARKER_PREFIX = ".blobstore-complete"
"""Names of the runner's completeness markers (runner.marker_name)."""


def _local_only(name: str) -> bool:
    """Local bookkeeping that is never published: the runner's completeness
    markers and temp files of a pull in progress."""
    return (name.startswith(COMPLETE_MARKER_PREFIX) and name.endswith(".json")) or TMP_MARK in name


@dataclass(frozen=True, slots=True)
class PushResult:
    ref: str
    manifest: ChunkId
    files: int
    bytes: int
    chunks: int
    new_chunks: int
    new_bytes: int
    seconds: float
    skipped: tuple[str, ...] = ()
    """Special files (sockets, devices, fifos) that were not stored."""
    reused_files: int = 0
    """Files whose chunk list came from the push index (not read)."""
    read_bytes: int = 0
    """File bytes read and chunked by this push."""


StatKey = tuple[int, int, int, int, int]
"""(size, mtime_ns, ino, ctime_ns, dev) of a file: what says it did not change."""


@dataclass(frozen=True, slots=True)
class _Scan:
    entries: list[Entry]
    files: list[tuple[str, int, int]]  # (relpath, mode, size)
    skipped: list[str]
    stats: dict[str, StatKey] = field(default_factory=dict)
    started_ns: int = 0
    """Wall clock (ns) taken before the walk: the push index's racy reference."""
    root: Path | None = None


def scan_tree(root: Path) -> _Scan:
    """Walk ``root`` without following symlinks. Raises BadInput, OSError."""
    started_ns = time.time_ns()
    entries: list[Entry] = []
    files: list[tuple[str, int, int]] = []
    stats: dict[str, StatKey] = {}
    skipped: list[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(root / rel if rel else root) as it:
            for de in it:
                if _local_only(de.name):
                    continue
                path = f"{rel}/{de.name}" if rel else de.name
                try:
                    path.encode("utf-8")
                except UnicodeEncodeError:
                    raise BadInput(f"file name is not valid UTF-8: {path!r}") from None
                st = de.stat(follow_symlinks=False)
                mode = stat.S_IMODE(st.st_mode)
                if stat.S_ISDIR(st.st_mode):
                    entries.append(Entry(path, "dir", mode))
                    stack.append(path)
                elif stat.S_ISLNK(st.st_mode):
                    entries.append(Entry(path, "symlink", mode, target=os.readlink(de.path)))
                elif stat.S_ISREG(st.st_mode):
                    files.append((path, mode, st.st_size))
                    stats[path] = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_dev)
                else:
                    skipped.append(path)
    return _Scan(entries, files, skipped, stats, started_ns, root)


async def scan_root(root: Path) -> _Scan:
    """``scan_tree`` off the event loop. Raises BadInput (not a directory, unreadable)."""
    if not await anyio.to_thread.run_sync(root.is_dir):
        raise BadInput(f"not a directory: {root}")
    try:
        return await anyio.to_thread.run_sync(scan_tree, root)
    except OSError as exc:
        raise os_error(exc, f"cannot read {root}", user_path=True) from exc


_PUSH_INDEX_FORMAT = 1


class PushIndex:
    """What each file of one pushed root was pushed as, by stat (module docstring).

    One JSON file, replaced atomically after a successful push. Every method
    does file I/O: call them in a worker thread. An unreadable or damaged
    index is just empty (every file is read)."""

    def __init__(
        self, path: Path, window_ns: int = RACY_WINDOW_NS, fresh_ns: int = FRESH_NS
    ) -> None:
        self.path = path
        self.window_ns = window_ns
        self.fresh_ns = fresh_ns
        self._loaded: dict[str, tuple[StatKey, tuple[ChunkRef, ...]]] | None = None
        self._checked_ns = 0
        """When the packs it names were last seen in the store (wall clock, ns)."""
        self._racy: dict[str, int] = {}
        """Sizes of files pushed last time but not recorded (racily clean)."""

    @classmethod
    def for_root(
        cls,
        cache_dir: Path,
        store_url: str,
        root: Path,
        chunker: ChunkerParams,
        window_ns: int = RACY_WINDOW_NS,
        fresh_ns: int = FRESH_NS,
    ) -> PushIndex:
        """The index of ``root`` pushed to ``store_url`` with ``chunker``."""
        what = json.dumps([store_url, os.path.realpath(root), repr(chunker.info())])
        name = hash_bytes(what.encode())[:24]
        return cls(Path(cache_dir) / ".push-index" / name, window_ns, fresh_ns)

    def load(self) -> dict[str, tuple[StatKey, tuple[ChunkRef, ...]]]:
        """What the file holds (read once per instance; ``save`` replaces it)."""
        if self._loaded is None:
            self._loaded = self._read()
        return self._loaded

    def _read(self) -> dict[str, tuple[StatKey, tuple[ChunkRef, ...]]]:
        try:
            doc = json.loads(self.path.read_bytes())
            if doc.get("format") != _PUSH_INDEX_FORMAT:
                return {}
            checked = doc.get("checked_ns", 0)  # absent in files of earlier versions
            self._checked_ns = checked if isinstance(checked, int) else 0
            racy = doc.get("racy", {})
            self._racy = {str(p): int(n) for p, n in racy.items()} if isinstance(racy, dict) else {}
            out: dict[str, tuple[StatKey, tuple[ChunkRef, ...]]] = {}
            for path, (size, mtime, ino, ctime, dev, chunks) in doc["files"].items():
                refs = tuple(
                    ChunkRef(ChunkId(c), int(n), ChunkId(p), int(o)) for c, n, p, o in chunks
                )
                if all(is_id(r.id) and r.pack is not None and is_id(r.pack) for r in refs):
                    key = (int(size), int(mtime), int(ino), int(ctime), int(dev))
                    out[str(path)] = (key, refs)
            return out
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            if not isinstance(exc, FileNotFoundError):
                log.info("ignoring the push index %s: %s", self.path, exc)
            return {}

    @property
    def checked_ns(self) -> int:
        """When a LIST or a push last saw the packs it names (0: never)."""
        self.load()
        return self._checked_ns

    def fresh(self) -> bool:
        """Whether the packs it names were seen in the store less than
        ``fresh_ns`` ago (by the push that wrote it or a no-op push's LIST)."""
        self.load()
        return 0 <= time.time_ns() - self._checked_ns < self.fresh_ns

    def hits(self, scan: _Scan) -> dict[str, tuple[ChunkRef, ...]]:
        """Files of ``scan`` whose stat matches their record exactly."""
        recorded = self.load()
        out = {}
        for path, key in scan.stats.items():
            got = recorded.get(path)
            if got is not None and got[0] == key:
                out[path] = got[1]
        return out

    def may_be_unchanged(self, scan: _Scan, paths: list[str]) -> bool:
        """Whether each of ``paths`` (files of ``scan`` it has no hit for) was
        pushed last time with the size it has now (so it may hold the same
        bytes: touched, rewritten the same, racily clean); False for a new file
        or one whose size changed (it surely changed)."""
        recorded = self.load()
        for path in paths:
            size = scan.stats[path][0]
            got = recorded.get(path)
            if (got[0][0] if got is not None else self._racy.get(path)) != size:
                return False
        return True

    def save(
        self, scan: _Scan, files: dict[str, tuple[ChunkRef, ...]], checked_ns: int | None = None
    ) -> None:
        """Record ``files`` (path -> chunk list, all in packs seen in the store
        at ``checked_ns``, by default when ``scan`` began) as scanned, leaving
        out racily clean ones. Never raises: it is only a cache."""
        limit = scan.started_ns - self.window_ns
        kept = {
            path: (key, refs)
            for path, refs in files.items()
            if (key := scan.stats.get(path)) is not None
            and max(key[1], key[3]) < limit
            and all(c.pack is not None for c in refs)
        }
        racy = {
            path: key[0]
            for path in files
            if path not in kept and (key := scan.stats.get(path)) is not None
        }
        self._write(kept, racy, scan.started_ns if checked_ns is None else checked_ns)

    def _write(
        self,
        files: dict[str, tuple[StatKey, tuple[ChunkRef, ...]]],
        racy: dict[str, int],
        checked: int,
    ) -> None:
        doc = {
            "format": _PUSH_INDEX_FORMAT,
            "checked_ns": checked,
            "racy": racy,
            "files": {
                path: [*key, [[c.id, c.size, c.pack, c.offset] for c in refs]]
                for path, (key, refs) in files.items()
            },
        }
        self._loaded = None
        try:
            write_atomic(self.path, json.dumps(doc, separators=(",", ":")), parents=True)
        except OSError as exc:  # a full disk: the next push reads the files again
            log.info("cannot write the push index %s: %s", self.path, exc.strerror)


def _tree_of(scan: _Scan, files: dict[str, tuple[ChunkRef, ...]], chunker: ChunkerInfo) -> Tree:
    """The tree of ``scan`` with each file's chunk list from ``files``."""
    entries = list(scan.entries)
    entries += [
        Entry(path, "file", mode, size, chunks_key(files[path]), files[path])
        for path, mode, size in scan.files
    ]
    return Tree(chunker, tuple(sorted(entries, key=lambda e: e.path)))


UNCHANGED_READ_MAX = 64 << 20
"""Bytes of files the push index does not vouch for (changed stat, racily clean)
that a push reads to find out whether it has anything to write at all; with
more, it goes the full way at once."""
_UNCHANGED_FILE_MAX = 16 << 20


async def push_unchanged(
    scan: _Scan,
    ref: str,
    catalog: Catalog,
    store: ObjectStore,
    index_cache: IndexCache,
    push_index: PushIndex,
    chunker: ChunkerParams,
) -> PushResult | None:
    """The push of ``scan`` if it has nothing to write: ``ref`` already names
    the tree its files make, with no location verify found bad, and (unless the
    push index is fresh) every pack of it in one LIST. Files the push index
    vouches for are not read; the others, if pushed last time with the size
    they have now (at most ``UNCHANGED_READ_MAX`` bytes: touched, rewritten
    with the same bytes, racily clean), are read, cut and located in the ref's
    manifest (one more GET); a new file or a changed size goes the full way at
    once. One request when every file matches
    and the index is fresh; no lease, no writes. None if anything is different
    (push the full way). Raises StoreUnavailable."""
    check_ref(ref)
    files = await anyio.to_thread.run_sync(push_index.hits, scan)
    misses = [(path, size) for path, _, size in scan.files if path not in files]
    root = scan.root
    if misses and (
        root is None
        or sum(size for _, size in misses) > UNCHANGED_READ_MAX
        or any(size > _UNCHANGED_FILE_MAX for _, size in misses)
        or not await anyio.to_thread.run_sync(
            push_index.may_be_unchanged, scan, [path for path, _ in misses]
        )
    ):
        return None
    try:
        named = await catalog.resolve(ref)
    except (NotFound, InvalidManifest):
        return None
    if misses and root is not None:
        read = await _locate_in(catalog, named, root, misses, chunker)
        if read is None:
            return None
        files |= read
    tree = _tree_of(scan, files, chunker.info())
    new_id = hash_bytes(encode(tree))
    if named != new_id:
        return None
    refs = list(tree.chunk_refs())
    bad = await anyio.to_thread.run_sync(index_cache.read_bad)
    if any((r.id, r.pack) in bad for r in refs):
        return None
    checked = await anyio.to_thread.run_sync(lambda: push_index.checked_ns)
    if not await anyio.to_thread.run_sync(push_index.fresh):
        with single_errors():
            usable = (await list_packs(store)).usable
        if any(r.pack not in usable for r in refs):
            return None
        checked = time.time_ns()
    if misses or checked != push_index.checked_ns:
        await anyio.to_thread.run_sync(push_index.save, scan, files, checked)
    return PushResult(
        ref=ref,
        manifest=new_id,
        files=len(scan.files),
        bytes=sum(size for _, _, size in scan.files),
        chunks=len(refs),
        new_chunks=0,
        new_bytes=0,
        seconds=(time.time_ns() - scan.started_ns) / 1e9,
        skipped=tuple(scan.skipped),
        reused_files=len(scan.files) - len(misses),
        read_bytes=sum(size for _, size in misses),
    )


async def _locate_in(
    catalog: Catalog,
    manifest_id: ChunkId,
    root: Path,
    files: list[tuple[str, int]],
    chunker: ChunkerParams,
) -> dict[str, tuple[ChunkRef, ...]] | None:
    """Chunk lists of ``files`` (relpath, size as scanned) with every chunk
    located where tree ``manifest_id`` holds it; None if a file has a chunk that
    tree lacks, changed size, or cannot be read (the full way says why)."""
    try:
        manifest = await catalog.load(manifest_id)
    except (NotFound, InvalidManifest):
        return None
    if not isinstance(manifest, Tree):
        return None
    where = {c.id: c for c in manifest.chunk_refs() if c.pack is not None}

    def cut() -> dict[str, tuple[ChunkRef, ...]] | None:
        cutter = Chunker(chunker)
        out: dict[str, tuple[ChunkRef, ...]] = {}
        for path, size in files:
            try:
                data = (root / path).read_bytes()
            except OSError:
                return None
            if len(data) != size:
                return None
            refs = [where.get(span.id) for span in cutter.cut_and_hash(data)]
            if any(r is None for r in refs):
                return None
            out[path] = tuple(r for r in refs if r is not None)
        return out

    return await anyio.to_thread.run_sync(cut)


async def push_tree(
    root: Path,
    ref: str | None,
    catalog: Catalog,
    ingestor: Ingestor,
    *,
    progress: Progress | None = None,
    file_concurrency: int = 4,
    scan: _Scan | None = None,
    push_index: PushIndex | None = None,
) -> PushResult:
    """Push ``root`` and point ``ref`` at the new tree manifest (if given).
    ``scan`` is ``root`` scanned already; files matching ``push_index`` are not
    read if their chunks are all still in the store, and the index is rewritten
    once the ref is set.

    Raises BadInput (not a directory, bad names), Unavailable (store), DiskFull.
    """
    if ref is not None:
        check_ref(ref)
    if scan is None:
        scan = await scan_root(root)

    new_before = ingestor.stats.new_chunks
    known: dict[str, tuple[ChunkRef, ...]] = {}
    if push_index is not None:
        hits = await anyio.to_thread.run_sync(push_index.hits, scan)
        for refs in hits.values():
            ingestor.index.add(refs)
        for path, refs in hits.items():
            located = [ingestor.locate(r.id) for r in refs]
            if all(r is not None for r in located) and all(  # same chunks, still present
                r is not None and r.size == c.size for r, c in zip(located, refs, strict=True)
            ):
                known[path] = tuple(r for r in located if r is not None)
    todo = [(path, mode, size) for path, mode, size in scan.files if path not in known]
    big_first = sorted(todo, key=lambda f: -f[2])  # the longest jobs start first
    entries = await ingest_files(
        root,
        [(path, mode) for path, mode, _ in big_first],
        ingestor,
        progress=progress,
        total=sum(size for _, _, size in todo),
        file_concurrency=file_concurrency,
    )
    files = known | {e.path: e.chunks for e in entries}
    tree = _tree_of(scan, files, ingestor.params.info())
    new_id = hash_bytes(encode(tree))
    if ref is None:
        await catalog.save(tree, check=False)
    elif ingestor.stats.new_chunks > new_before or not await _names(catalog, ref, new_id):
        # A tree with a chunk just uploaded names a pack just written: no ref names it yet.
        await catalog.publish(tree, ref)
    if push_index is not None:
        await anyio.to_thread.run_sync(push_index.save, scan, files)
    stats = ingestor.stats
    return PushResult(
        ref=ref or "",
        manifest=new_id,
        files=len(scan.files),
        bytes=sum(size for _, _, size in scan.files),
        chunks=sum(len(e.chunks) for e in tree.entries),
        new_chunks=stats.new_chunks,
        new_bytes=stats.new_bytes,
        seconds=(time.time_ns() - scan.started_ns) / 1e9,
        skipped=tuple(scan.skipped),
        reused_files=len(known),
        read_bytes=stats.bytes,
    )


@dataclass(frozen=True, slots=True)
class RepairResult:
    ref: str
    old_manifest: ChunkId
    manifest: ChunkId
    """What ``ref`` names now (``old_manifest`` if nothing was bad)."""
    repaired: int
    """Bad chunks that now have a good copy the ref's tree names."""
    unrepaired: tuple[ChunkId, ...]
    """Bad chunks ``source`` did not hold (the ref still names the bad copy)."""

    @property
    def ok(self) -> bool:
        return not self.unrepaired


async def repair_tree(
    catalog: Catalog,
    ref: str,
    manifest_id: ChunkId,
    bad: set[BadLocation],
    source: Path,
    ingestor: Ingestor,
) -> RepairResult:
    """Pack again, from ``source``, the chunks of tree ``manifest_id`` stored at
    ``bad`` locations (the ingestor's index never offers those), then swap
    ``ref`` from ``manifest_id`` to a tree naming the new copies. Files at the
    same paths are read first; the whole of ``source`` only if that was not
    enough. Raises BadInput, Conflict (the ref moved meanwhile), Unavailable."""
    check_ref(ref)
    manifest = await catalog.load(manifest_id)
    if not isinstance(manifest, Tree):
        raise BadInput(
            f"{ref} is an {manifest.kind}: repair it by importing it again "
            "(a writer never reuses a chunk verify found bad)"
        )
    if not await anyio.to_thread.run_sync(source.is_dir):
        raise BadInput(f"not a directory: {source}")
    ingestor.index.distrust(bad)

    def wanted() -> set[ChunkId]:
        return {
            c.id
            for c in manifest.chunk_refs()
            if (c.id, c.pack) in bad and ingestor.locate(c.id) is None
        }

    damaged = [e for e in manifest.entries if any((c.id, c.pack) in bad for c in e.chunks)]
    same_paths = await anyio.to_thread.run_sync(
        lambda: [(e.path, e.mode) for e in damaged if (source / e.path).is_file()]
    )
    await ingest_files(source, same_paths, ingestor)
    if wanted():
        try:
            scan = await anyio.to_thread.run_sync(scan_tree, source)
        except OSError as exc:
            raise os_error(exc, f"cannot read {source}", user_path=True) from exc
        done = {p for p, _ in same_paths}
        await ingest_files(source, [(p, m) for p, m, _ in scan.files if p not in done], ingestor)
    entries = []
    for entry in manifest.entries:
        chunks = tuple(
            (ingestor.locate(c.id) or c) if (c.id, c.pack) in bad else c for c in entry.chunks
        )
        entries.append(replace(entry, chunks=chunks))
    tree = Tree(manifest.chunker, tuple(entries))
    unrepaired = tuple(sorted(wanted()))
    repaired = len({c.id for c in manifest.chunk_refs() if (c.id, c.pack) in bad}) - len(unrepaired)
    new_id = await catalog.save(tree)
    if new_id != manifest_id:
        await catalog.swap_ref(ref, manifest_id, new_id)
    return RepairResult(ref, manifest_id, new_id, repaired, unrepaired)


@dataclass(frozen=True, slots=True)
class MigrateResult:
    refs: int
    """Refs moved onto v2 manifests."""
    refs_moved_meanwhile: int
    """Refs that changed while we migrated (left as they are; run migrate again)."""
    chunks: int
    """Chunks moved from per-chunk objects into packs."""
    bytes: int
    unreadable: tuple[ChunkId, ...]
    """Per-chunk objects missing or corrupt: still named where they were."""


async def migrate_store(catalog: Catalog, origin: ChunkSource, ingestor: Ingestor) -> MigrateResult:
    """Move an old store to packs: every chunk a ref reaches through a manifest
    that names it as a per-chunk object (v1) is read (verified), packed in
    manifest order, and every ref moved, with compare-and-swap, onto v2
    manifests naming the packs (images: new layer manifests and a new image
    manifest). The per-chunk objects are left for gc to sweep. Idempotent.
    Raises Unavailable."""
    loose: dict[ChunkId, None] = {}
    for name in await catalog.list_refs():
        try:
            async for _, manifest in catalog.walk(await catalog.resolve(name)):
                if not isinstance(manifest, Image):
                    loose.update((c.id, None) for c in manifest.chunk_refs() if c.pack is None)
        except (NotFound, BadInput) as exc:
            log.warning("not migrating ref %s: %s", name, exc)
    unreadable: list[ChunkId] = []
    got: dict[ChunkId, bytes] = {}

    async def read(chunk_id: ChunkId) -> None:
        try:
            got[chunk_id] = bytes(await origin.get(chunk_id))
        except (NotFound, Corrupt) as exc:
            log.warning("cannot migrate chunk %s: %s", chunk_id, exc)
            unreadable.append(chunk_id)

    order = list(loose)
    for start in range(0, len(order), _MIGRATE_WINDOW):
        batch = order[start : start + _MIGRATE_WINDOW]
        await for_each(batch, read, _MIGRATE_WINDOW)
        for chunk_id in batch:  # packed in manifest order
            if chunk_id in got:
                await ingestor.ingest_chunk(chunk_id, got.pop(chunk_id))
    await ingestor.flush()
    moved, meanwhile = await relocate_refs(
        catalog, lambda c: ingestor.locate(c.id) if c.pack is None else None
    )
    stats = ingestor.stats
    return MigrateResult(
        moved, meanwhile, stats.new_chunks, stats.new_bytes, tuple(sorted(unreadable))
    )


_MIGRATE_WINDOW = 16
"""Per-chunk objects read at once by migrate (memory: 16 chunks)."""


async def _names(catalog: Catalog, ref: str, manifest_id: ChunkId) -> bool:
    """Whether ``ref`` names ``manifest_id`` already, and it is stored."""
    try:
        if await catalog.resolve(ref) != manifest_id:
            return False
    except (NotFound, InvalidManifest) as exc:
        log.info("not reusing the previous manifest of %s: %s", ref, exc)
        return False
    return await catalog.store.exists(manifest_key(manifest_id))


async def ingest_files(
    root: Path,
    files: list[tuple[str, int]],
    ingestor: Ingestor,
    *,
    progress: Progress | None = None,
    total: int = 0,
    file_concurrency: int = 4,
) -> list[Entry]:
    """Ingest ``(relpath, mode)`` files under ``root`` (a few at a time) and
    return their entries, once their packs are stored (manifest may follow).
    ``progress(bytes done, total)`` moves as each batch of chunks is packed,
    but never past what the packs still uploading leave (so the line reaches
    100% when the last pack is stored, and moves every ``_UPLOAD_POLL`` s
    while it waits for them); it hears file counts if it is a ``FileProgress``.

    Raises BadInput (unreadable file), DiskFull, Unavailable.
    """
    entries: list[Entry] = []
    limit = anyio.Semaphore(file_concurrency)
    done = reported = 0
    count_files = progress.files if isinstance(progress, FileProgress) else None

    def report() -> None:
        nonlocal reported
        if progress:
            whole = max(total, done)
            # never backwards: a new pack being sealed raises what is owed for a while
            reported = max(min(done, whole - ingestor.unstored_bytes), reported)
            progress(reported, whole)

    def advance(n: int) -> None:
        nonlocal done
        done += n
        report()

    async def one(path: str, mode: int) -> None:
        async with limit:
            try:
                got = await ingestor.ingest_file(str(root / path), on_bytes=advance)
            except OSError as exc:
                raise os_error(exc, f"cannot read {path}", user_path=True) from exc
        entries.append(Entry(path, "file", mode, got.size, got.digest, got.chunks))
        if count_files is not None:
            count_files(len(entries), len(files))

    if count_files is not None and files:
        count_files(0, len(files))
    with single_errors():
        async with anyio.create_task_group() as tg:
            for path, mode in files:
                tg.start_soon(one, path, mode)
        if progress:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_report_every, _UPLOAD_POLL, report)
                await ingestor.flush()
                tg.cancel_scope.cancel()
            report()
        else:
            await ingestor.flush()
    return entries


_UPLOAD_POLL = 0.1
"""Seconds between progress reports while a push waits for its last uploads."""


async def _report_every(seconds: float, report: Callable[[], None]) -> None:
    while True:
        await anyio.sleep(seconds)
        report()
