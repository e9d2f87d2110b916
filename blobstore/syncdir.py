"""Synchronized directories: pull a directory's ref on enter, push what changed
on exit and move the ref atomically — like the platform's
``synchronized_inductor_cache()``.

Races: many runners may leave the block at once. Each one pushes its snapshot
(chunks and manifest; content-addressed, so concurrent uploads never clash),
then moves the ref with compare-and-swap from the id it last saw. When the
swap loses, it loads the winner's tree and merges by path, three ways against
the tree it pulled (the base), and tries again:

- a path only one side changed (added, modified or deleted) takes that change;
- both sides made the same change: taken once;
- one side deleted, the other modified: the modification is kept (nothing lost);
- both modified differently: ours (the later writer) wins, and the path is
  reported in ``SyncResult.conflicts``;
- a path that became a file on one side while the other side put entries below
  it: ours wins, the other side's entries are dropped and reported.

So runners racing to push never lose each other's new files. Files are never
re-read if their size, mtime and mode are what the pull left (only what
changed is hashed and uploaded).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from .chunker import DEFAULT_PARAMS
from .errors import Conflict, RefNotFound, os_error
from .ids import ChunkId
from .ingest import Ingestor
from .manifest import Entry, Tree
from .push import ingest_files, scan_tree

if TYPE_CHECKING:
    from .client import Client
    from .materialize import Progress

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 12
_FILE_CONCURRENCY = 4
_Stamp = tuple[int, int, int]  # size, mtime_ns, mode


# --------------------------------------------------------------------------- merge (pure)


@dataclass(frozen=True, slots=True)
class Merge:
    tree: Tree
    conflicts: tuple[str, ...]
    """Paths where ``ours`` overrode a different change of ``theirs``."""


def merge_trees(base: Tree | None, ours: Tree, theirs: Tree | None) -> Merge:
    """Three-way merge by path (rules in the module docstring). Pure."""
    b = _by_path(base)
    o = _by_path(ours)
    t = _by_path(theirs)
    merged: dict[str, Entry] = {}
    from_theirs: set[str] = set()
    conflicts: list[str] = []
    for path in sorted(b.keys() | o.keys() | t.keys()):
        eb, eo, et = b.get(path), o.get(path), t.get(path)
        if eo == et or et == eb:
            chosen = eo
        elif eo == eb:
            chosen = et
            from_theirs.add(path)
        elif eo is None:
            chosen = et  # we deleted, they changed: keep their change
            from_theirs.add(path)
        else:
            chosen = eo
            if et is not None:
                conflicts.append(path)
        if chosen is not None:
            merged[path] = chosen
    conflicts += _repair_nesting(merged, from_theirs)
    return Merge(Tree(ours.chunker, tuple(merged[p] for p in sorted(merged))), tuple(conflicts))


def _by_path(tree: Tree | None) -> dict[str, Entry]:
    return {} if tree is None else {e.path: e for e in tree.entries}


def _repair_nesting(merged: dict[str, Entry], from_theirs: set[str]) -> list[str]:
    """Drop entries so that no path lies below a file or symlink; the side
    that loses is theirs. Returns the dropped paths."""
    dropped: list[str] = []
    for path in sorted(merged):
        if path not in merged:
            continue
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            above = merged.get(parent)
            if above is None or above.kind == "dir":
                continue
            victim = parent if parent in from_theirs and path not in from_theirs else path
            if victim == parent:
                del merged[parent]
                dropped.append(parent)
            else:
                _drop_subtree(merged, path, dropped)
            break
    return dropped


def _drop_subtree(merged: dict[str, Entry], path: str, dropped: list[str]) -> None:
    for p in [p for p in merged if p == path or p.startswith(path + "/")]:
        del merged[p]
        dropped.append(p)


# --------------------------------------------------------------------------- session


@dataclass(frozen=True, slots=True)
class SyncResult:
    ref: str
    manifest: ChunkId | None
    """What the ref points at after the push (None if nothing was ever pushed)."""
    pushed: bool
    """False when nothing had changed."""
    changed_files: int
    """Files hashed because they were new or changed (others reused as pulled)."""
    attempts: int
    merged: bool
    """True if another runner moved the ref meanwhile and we merged."""
    conflicts: tuple[str, ...] = ()


@dataclass(slots=True)
class SyncSession:
    """State of one synchronized block."""

    ref: str
    directory: Path
    base_id: ChunkId | None
    base: Tree | None
    stamps: dict[str, _Stamp] = field(default_factory=dict)
    result: SyncResult | None = None
    """Set when the block exits and pushed (or found nothing to push)."""


@asynccontextmanager
async def synchronized_directory(
    client: Client,
    ref: str,
    directory: str | os.PathLike[str],
    *,
    push_on_error: bool = False,
) -> AsyncIterator[SyncSession]:
    """Pull ``ref`` into ``directory`` (a missing ref is an empty start), run
    the block, then push what changed and move the ref (merging with other
    runners). With ``push_on_error`` the push also happens when the block raises.

    Raises RefNotFound never (a new ref is created); Unavailable, DiskFull,
    BadInput; Conflict only if the ref keeps moving for MAX_ATTEMPTS tries."""
    session = await sync_pull(client, ref, directory)
    try:
        yield session
    except BaseException:
        if push_on_error:
            with anyio.CancelScope(shield=True):
                await sync_push(client, session)
        raise
    await sync_push(client, session)


async def sync_pull(
    client: Client,
    ref: str,
    directory: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
) -> SyncSession:
    """The entering half: pull ``ref`` (if it exists) and remember what was
    pulled. ``progress(done, total)`` hears the bytes (progress.py)."""
    path = Path(directory)
    try:
        base_id: ChunkId | None = await client.catalog.resolve(ref)
    except RefNotFound:
        base_id = None
    base: Tree | None = None
    if base_id is not None:
        base = await client.catalog.load_tree(base_id)
        await client.pull_tree(ref, base_id, base, path, progress=progress)
    else:
        try:
            await anyio.to_thread.run_sync(lambda: path.mkdir(parents=True, exist_ok=True))
        except OSError as exc:
            raise os_error(exc, f"cannot create {path}", user_path=True) from exc
    stamps = await anyio.to_thread.run_sync(_stamps, path, base)
    return SyncSession(ref, path, base_id, base, stamps)


async def sync_push(
    client: Client, session: SyncSession, *, progress: Progress | None = None
) -> SyncResult:
    """The leaving half: snapshot the directory (re-reading only changed files),
    then compare-and-swap the ref, merging on conflict (under a writer lease).
    ``progress(done, total)`` hears the bytes of the files re-read."""
    async with client.writing() as ingestor:
        return await _push_under_lease(client, session, ingestor, progress)


async def _push_under_lease(
    client: Client, session: SyncSession, ingestor: Ingestor, progress: Progress | None
) -> SyncResult:
    ours, changed = await _snapshot(session, ingestor, progress)
    if session.base is not None and ours == session.base:
        result = SyncResult(session.ref, session.base_id, False, 0, 0, False)
        session.result = result
        return result
    expected, theirs = session.base_id, session.base
    merged_any = False
    conflicts: tuple[str, ...] = ()
    for attempt in range(1, MAX_ATTEMPTS + 1):
        if expected == session.base_id or theirs is None:
            tree = ours  # nobody moved the ref, or it was deleted: nothing to merge
        else:
            merge = merge_trees(session.base, ours, theirs)
            tree, conflicts, merged_any = merge.tree, merge.conflicts, True
        new_id = await client.catalog.save(tree)
        if new_id == expected:
            break  # the ref already holds exactly this
        try:
            await client.catalog.swap_ref(session.ref, expected, new_id)
            break
        except Conflict:
            log.info("ref %s moved under us (attempt %d); merging", session.ref, attempt)
        try:
            expected = await client.catalog.resolve(session.ref)
            theirs = await client.catalog.load_tree(expected)
        except RefNotFound:
            expected, theirs = None, None
        await anyio.sleep(random.uniform(0, 0.01 * 2 ** min(attempt, 6)))
    else:
        raise Conflict(f"ref {session.ref!r} kept moving; gave up after {MAX_ATTEMPTS} merges")
    if conflicts:
        log.warning("sync %s: ours replaced their change of %s", session.ref, ", ".join(conflicts))
    result = SyncResult(session.ref, new_id, True, changed, attempt, merged_any, conflicts)
    session.result = result
    return result


def _stamps(root: Path, base: Tree | None) -> dict[str, _Stamp]:
    out: dict[str, _Stamp] = {}
    for entry in () if base is None else base.entries:
        if entry.kind == "file":
            try:
                st = os.lstat(root / entry.path)
            except OSError:
                continue
            out[entry.path] = (st.st_size, st.st_mtime_ns, st.st_mode & 0o7777)
    return out


async def _snapshot(
    session: SyncSession, ingestor: Ingestor, progress: Progress | None = None
) -> tuple[Tree, int]:
    """The directory as a tree; files unchanged since the pull reuse their base entry."""
    root = session.directory
    try:
        scan = await anyio.to_thread.run_sync(scan_tree, root)
        stats = await anyio.to_thread.run_sync(_stat_all, root, [f[0] for f in scan.files])
    except OSError as exc:
        raise os_error(exc, f"cannot read {root}", user_path=True) from exc
    base = _by_path(session.base)
    entries: list[Entry] = list(scan.entries)
    todo: list[tuple[str, int]] = []
    todo_bytes = 0
    for path, mode, size in scan.files:  # (scan_tree leaves out completeness markers)
        old = base.get(path)
        if old is not None and session.stamps.get(path) == stats[path]:
            entries.append(old)
        else:
            todo.append((path, mode))
            todo_bytes += size
    entries += await ingest_files(
        root,
        todo,
        ingestor,
        progress=progress,
        total=todo_bytes,
        file_concurrency=_FILE_CONCURRENCY,
    )
    chunker = session.base.chunker if session.base is not None else DEFAULT_PARAMS.info()
    if todo:
        chunker = ingestor.params.info()
    return Tree(chunker, tuple(sorted(entries, key=lambda e: e.path))), len(todo)


def _stat_all(root: Path, paths: Iterable[str]) -> dict[str, _Stamp]:
    out: dict[str, _Stamp] = {}
    for p in paths:
        st = os.lstat(root / p)
        out[p] = (st.st_size, st.st_mtime_ns, st.st_mode & 0o7777)
    return out


__all__ = [
    "MAX_ATTEMPTS",
    "Merge",
    "SyncResult",
    "SyncSession",
    "merge_trees",
    "sync_pull",
    "sync_push",
    "synchronized_directory",
]
