"""push: snapshot a directory tree into the object store.

Order matters for crash safety: packs (and their indexes) first, then the
manifest, then the ref. A crash at any point leaves at worst unreferenced
objects (gc sweeps them), never a ref to something missing.

Dedup needs no request per chunk: the writer's ``StoreIndex`` (pack indexes,
cached locally) and the ref's previous manifest say where chunks already are.
A push whose tree did not change rewrites nothing (the ref already names it).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from dataclasses import dataclass, replace
from pathlib import Path

import anyio

from .catalog import Catalog, check_ref
from .errors import BadInput, Corrupt, DiskFull, InvalidManifest, NotFound, single_errors
from .ids import ChunkId
from .ingest import Ingestor
from .manifest import Entry, Image, Tree, encode, manifest_id
from .materialize import TMP_MARK, Progress
from .packs import BadLocation, relocate_refs
from .parallel import for_each
from .source import ChunkSource

log = logging.getLogger(__name__)

# Local bookkeeping that must never be published: the runner's completeness
# marker (runner.MARKER) and temp files of a pull in progress.
_LOCAL_ONLY = frozenset({".blobstore-complete.json"})


def _local_only(name: str) -> bool:
    return name in _LOCAL_ONLY or TMP_MARK in name


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


@dataclass(frozen=True, slots=True)
class _Scan:
    entries: list[Entry]
    files: list[tuple[str, int, int]]  # (relpath, mode, size)
    skipped: list[str]


def scan_tree(root: Path) -> _Scan:
    """Walk ``root`` without following symlinks. Raises BadInput, OSError."""
    entries: list[Entry] = []
    files: list[tuple[str, int, int]] = []
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
                else:
                    skipped.append(path)
    return _Scan(entries, files, skipped)


async def push_tree(
    root: Path,
    ref: str | None,
    catalog: Catalog,
    ingestor: Ingestor,
    *,
    progress: Progress | None = None,
    file_concurrency: int = 4,
) -> PushResult:
    """Push ``root`` and point ``ref`` at the new tree manifest (if given).

    Raises BadInput (not a directory, bad names), Unavailable (store), DiskFull.
    """
    started = time.monotonic()
    if ref is not None:
        check_ref(ref)
    if not await anyio.to_thread.run_sync(root.is_dir):
        raise BadInput(f"not a directory: {root}")
    try:
        scan = await anyio.to_thread.run_sync(scan_tree, root)
    except OSError as exc:
        raise BadInput(f"cannot read {exc.filename or root}: {exc.strerror}") from exc

    previous = await _previous(catalog, ref, ingestor) if ref is not None else None
    entries = list(scan.entries)
    big_first = sorted(scan.files, key=lambda f: -f[2])  # the longest jobs start first
    entries += await ingest_files(
        root, [(path, mode) for path, mode, _ in big_first], ingestor, progress=progress,
        total=sum(size for _, _, size in scan.files), file_concurrency=file_concurrency,
    )
    tree = Tree(ingestor.params.info(), tuple(sorted(entries, key=lambda e: e.path)))
    new_id = manifest_id(encode(tree))
    if new_id != previous:  # else the ref already names exactly this tree
        await catalog.save(tree)
        if ref is not None:
            await catalog.set_ref(ref, new_id)
    stats = ingestor.stats
    return PushResult(
        ref=ref or "",
        manifest=new_id,
        files=len(scan.files),
        bytes=sum(size for _, _, size in scan.files),
        chunks=sum(len(e.chunks) for e in tree.entries),
        new_chunks=stats.new_chunks,
        new_bytes=stats.new_bytes,
        seconds=time.monotonic() - started,
        skipped=tuple(scan.skipped),
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
        return {c.id for c in manifest.chunk_refs()
                if (c.id, c.pack) in bad and ingestor.locate(c.id) is None}

    damaged = [e for e in manifest.entries if any((c.id, c.pack) in bad for c in e.chunks)]
    same_paths = await anyio.to_thread.run_sync(
        lambda: [(e.path, e.mode) for e in damaged if (source / e.path).is_file()]
    )
    await ingest_files(source, same_paths, ingestor)
    if wanted():
        try:
            scan = await anyio.to_thread.run_sync(scan_tree, source)
        except OSError as exc:
            raise BadInput(f"cannot read {exc.filename or source}: {exc.strerror}") from exc
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
    repaired = len({c.id for c in manifest.chunk_refs() if (c.id, c.pack) in bad}) - len(
        unrepaired
    )
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
    return MigrateResult(moved, meanwhile, stats.new_chunks, stats.new_bytes,
                         tuple(sorted(unreadable)))


_MIGRATE_WINDOW = 16
"""Per-chunk objects read at once by migrate (memory: 16 chunks)."""


async def _previous(catalog: Catalog, ref: str, ingestor: Ingestor) -> ChunkId | None:
    """The manifest ``ref`` names now, its chunks taught to the ingestor (those
    in packs that exist); None if there is none or it cannot be read."""
    try:
        previous = await catalog.resolve(ref)
        async for _, manifest in catalog.walk(previous):
            if isinstance(manifest, Tree):
                ingestor.index.add(manifest.chunk_refs())
    except (NotFound, InvalidManifest) as exc:
        log.info("not reusing the previous manifest of %s: %s", ref, exc)
        return None
    return previous


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

    Raises BadInput (unreadable file), DiskFull, Unavailable.
    """
    entries: list[Entry] = []
    limit = anyio.Semaphore(file_concurrency)
    done = 0

    async def one(path: str, mode: int) -> None:
        nonlocal done
        async with limit:
            try:
                got = await ingestor.ingest_file(str(root / path))
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise DiskFull(f"no space left while reading {path}") from exc
                raise BadInput(f"cannot read {path}: {exc.strerror}") from exc
        entries.append(Entry(path, "file", mode, got.size, got.digest, got.chunks))
        done += got.size
        if progress:
            progress(done, total)

    with single_errors():
        async with anyio.create_task_group() as tg:
            for path, mode in files:
                tg.start_soon(one, path, mode)
    await ingestor.flush()
    return entries
