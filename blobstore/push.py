"""push: snapshot a directory tree into the object store.

Order matters for crash safety: chunks first, then the manifest, then the
ref. A crash at any point leaves at worst unreferenced objects (gc sweeps
them), never a ref to something missing.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import anyio

from .catalog import Catalog, check_ref
from .errors import BadInput, DiskFull, single_errors
from .ids import ChunkId
from .ingest import Ingestor
from .manifest import Entry, Tree
from .materialize import TMP_MARK, Progress

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

    entries = list(scan.entries)
    big_first = sorted(scan.files, key=lambda f: -f[2])  # the longest jobs start first
    entries += await ingest_files(
        root, [(path, mode) for path, mode, _ in big_first], ingestor, progress=progress,
        total=sum(size for _, _, size in scan.files), file_concurrency=file_concurrency,
    )
    tree = Tree(ingestor.params.info(), tuple(sorted(entries, key=lambda e: e.path)))
    manifest_id = await catalog.save(tree)
    if ref is not None:
        await catalog.set_ref(ref, manifest_id)
    stats = ingestor.stats
    return PushResult(
        ref=ref or "",
        manifest=manifest_id,
        files=len(scan.files),
        bytes=sum(size for _, _, size in scan.files),
        chunks=sum(len(e.chunks) for e in tree.entries),
        new_chunks=stats.new_chunks,
        new_bytes=stats.new_bytes,
        seconds=time.monotonic() - started,
        skipped=tuple(scan.skipped),
    )


async def ingest_files(
    root: Path,
    files: list[tuple[str, int]],
    ingestor: Ingestor,
    *,
    progress: Progress | None = None,
    total: int = 0,
    file_concurrency: int = 4,
) -> list[Entry]:
    """Ingest ``(relpath, mode)`` files under ``root`` (a few at a time; each
    file's chunks upload in parallel) and return their entries.

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
    return entries
