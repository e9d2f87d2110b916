"""The start-up API a runner calls before it serves: open a client, pull refs
into ``/data``-style directories (small and listed files first, optionally only
the files ``allow_patterns``/``ignore_patterns`` select), skip pulls that are
already complete, and tell a scheduler how warm this node is. Everything is
async; ``BlockingClient`` is the same API for code that is not.

Completeness check (``download_model_weights``): after a successful pull we
write a marker in the destination, ``.blobstore-complete-<key>.json``, one per
selection (the ref or manifest id as given, and the patterns), so several
models or parts of a model under one root each keep their own. It records the
manifest id and every selected file's size and mtime (ns). A later call
resolves the ref (one small read) and, if it still points at that manifest
and every recorded file still has its size and mtime, returns without
touching a byte. The marker is removed before a pull starts, so a crash
mid-pull never looks complete; it holds the boot id, because a pull does not
wait for write-back: after a reboot (a power loss may have torn files) the
pull runs again, and checks what it cannot vouch for. When the store cannot
be reached but the marker checks out, the local copy is used (a runner that
can serve should serve).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread

from .atomic import write_atomic
from .client import Client, PullResult
from .config import Config
from .dedup import as_tree
from .errors import BadInput, StoreUnavailable, Unavailable, os_error
from .ids import ChunkId, hash_bytes
from .linking import LinkMode
from .manifest import Entry, Tree, expect_kind
from .materialize import boot_id
from .patterns import select
from .progress import TqdmProgress
from .push import COMPLETE_MARKER_PREFIX

log = logging.getLogger(__name__)

MARKER_PREFIX = COMPLETE_MARKER_PREFIX
"""Every completeness marker's name starts with it (push and sync never publish them)."""
MARKER = f"{MARKER_PREFIX}.json"
"""The single marker of earlier versions: removed when a new one is written."""
_MARKER_VERSION = 2

DEFAULT_FIRST: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "*.json",
    "*.txt",
    "*.model",
)
"""Patterns pulled before anything else, in this order (then smallest first)."""

RefProgress = Callable[[str, int, int], None]
"""Called with (ref, bytes done, bytes total) while a ref is pulled."""

Patterns = str | Sequence[str] | None
"""huggingface_hub's form: one glob, a list of globs, or None (patterns.py)."""


# --------------------------------------------------------------------------- opening


@asynccontextmanager
async def open_client(
    config: Config | None = None,
    *,
    env: Mapping[str, str] | None = None,
    peers: bool = True,
    **overrides: str | None,
) -> AsyncIterator[Client]:
    """Open a Client from ``config``, or from ``BLOBSTORE_*`` variables (``env``,
    default ``os.environ``) with ``overrides`` (store, cache, region, peers,
    token_file, cache_size) winning.

    An object store that cannot be reached does not stop the client from
    opening: it is opened when something first needs it, so
    ``download_model_weights`` can still use a complete local copy (the
    offline fallback); whatever needs the store raises StoreUnavailable then.
    Raises ConfigError, Unavailable."""
    if config is None:
        config = Config.from_env(env, **overrides)
    elif overrides or env is not None:
        raise BadInput("give either a Config or env/overrides, not both")
    async with Client.open(config, peers=peers, lazy_store=True) as client:
        yield client


# --------------------------------------------------------------------------- priority


def priority_order(first: Sequence[str] = DEFAULT_FIRST) -> Callable[[Entry], tuple[int, int]]:
    """A pull priority: files matching a pattern of ``first`` (matched against the
    whole path and the base name; earlier patterns first), then every other file,
    smallest first within each group."""
    patterns = tuple(first)

    def key(entry: Entry) -> tuple[int, int]:
        base = entry.path.rsplit("/", 1)[-1]
        for rank, pattern in enumerate(patterns):
            if fnmatch.fnmatchcase(entry.path, pattern) or fnmatch.fnmatchcase(base, pattern):
                return rank, entry.size
        return len(patterns), entry.size

    return key


# --------------------------------------------------------------------------- resolving


async def resolve(client: Client, ref_or_id: str) -> ChunkId:
    """The manifest id of a ref name, a manifest id, or a unique prefix of one
    (``Catalog.resolve_or_id``: at least 4 hex digits; a ref of that name wins).
    Raises RefNotFound, BadInput (a prefix of several ids), Unavailable."""
    return await client.catalog.resolve_or_id(ref_or_id)


def _patterns(patterns: Patterns) -> tuple[str, ...]:
    if patterns is None:
        return ()
    return (patterns,) if isinstance(patterns, str) else tuple(patterns)


def _selected(tree: Tree, ref: str, allow: tuple[str, ...], ignore: tuple[str, ...]) -> Tree:
    """The files of ``tree`` the patterns select. Raises BadInput when they
    select nothing of a tree that has files (a typo should not start a runner
    on an empty directory)."""
    chosen = select(tree, allow, ignore)
    if (allow or ignore) and not any(e.kind == "file" for e in chosen.entries):
        if any(e.kind == "file" for e in tree.entries):
            raise BadInput(
                f"no file of {ref} matches allow_patterns={list(allow)} "
                f"ignore_patterns={list(ignore)}"
            )
    return chosen


# --------------------------------------------------------------------------- progress


class _RefReporter:
    """One pull's progress, sent to a ``RefProgress`` and/or a tqdm-compatible bar."""

    def __init__(
        self, ref: str, progress: RefProgress | None, tqdm_class: Callable[..., Any] | None
    ) -> None:
        self.ref = ref
        self.progress = progress
        self.bar = TqdmProgress(tqdm_class, ref) if tqdm_class is not None else None

    def __call__(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(self.ref, done, total)
        if self.bar is not None:
            self.bar(done, total)

    def files(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.files(done, total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- pulling


async def pull_refs(
    client: Client,
    pulls: Mapping[str, str | os.PathLike[str]] | Sequence[tuple[str, str | os.PathLike[str]]],
    *,
    progress: RefProgress | None = None,
    tqdm_class: Callable[..., Any] | None = None,
    first: Sequence[str] = DEFAULT_FIRST,
    link_mode: LinkMode = "auto",
    allow_patterns: Patterns = None,
    ignore_patterns: Patterns = None,
) -> list[PullResult]:
    """Pull each ``(ref, directory)`` in order (the order is the priority between
    refs; within a ref, ``first`` patterns and small files come first), files
    placed from the node store by ``link_mode``. A ref may be a manifest id or
    a unique prefix of one; ``allow_patterns``/``ignore_patterns`` select files
    (patterns.py); ``tqdm_class`` gets one bar per ref.

    One ref at a time keeps memory bounded by one pull's chunks in flight while
    each pull still fetches many chunks in parallel. Raises RefNotFound,
    Unavailable, DiskFull, BadInput."""
    items = list(pulls.items()) if isinstance(pulls, Mapping) else list(pulls)
    allow, ignore = _patterns(allow_patterns), _patterns(ignore_patterns)
    results = []
    for ref, dest in items:
        manifest_id = await resolve(client, ref)
        tree = _selected(await _load_tree(client, manifest_id), ref, allow, ignore)
        reporter = _RefReporter(ref, progress, tqdm_class)
        try:
            results.append(
                await _pull(client, ref, manifest_id, tree, Path(dest), reporter, first, link_mode)
            )
        finally:
            reporter.close()
    return results


async def _pull(
    client: Client,
    ref: str,
    manifest_id: ChunkId,
    tree: Tree,
    dest: Path,
    reporter: _RefReporter,
    first: Sequence[str],
    link_mode: LinkMode = "auto",
) -> PullResult:
    return await client.pull_tree(
        ref,
        manifest_id,
        tree,
        dest,
        progress=reporter,
        priority=priority_order(first),
        link_mode=link_mode,
    )


async def _load_tree(client: Client, manifest_id: ChunkId) -> Tree:
    return expect_kind(await client.catalog.load(manifest_id), Tree, f"manifest {manifest_id}")


@dataclass(frozen=True, slots=True)
class WeightsResult:
    ref: str
    manifest: ChunkId
    path: Path
    pulled: bool
    """False when the local copy was already complete."""
    offline: bool = False
    """True when the store could not be asked and the local copy was used."""
    pull: PullResult | None = None


async def download_model_weights(
    client: Client,
    ref: str,
    dest: str | os.PathLike[str],
    *,
    progress: RefProgress | None = None,
    tqdm_class: Callable[..., Any] | None = None,
    first: Sequence[str] = DEFAULT_FIRST,
    link_mode: LinkMode = "auto",
    allow_patterns: Patterns = None,
    ignore_patterns: Patterns = None,
) -> WeightsResult:
    """Make ``dest`` hold ``ref`` (a ref name, a manifest id or a unique prefix
    of one), or the files of it ``allow_patterns``/``ignore_patterns`` select,
    pulling only if that selection is not already complete (see the module
    docstring for the check). Returns where the bytes are. ``link_mode``
    (auto|reflink|hardlink|copy) says how files come from the node store; with
    ``hardlink`` the files are read-only and must stay so. ``progress`` and
    ``tqdm_class`` (huggingface_hub's convention) hear the bytes as they land.

    Raises RefNotFound, Unavailable (store unreachable and no complete local
    copy), DiskFull, BadInput (also: patterns that select no file)."""
    path = Path(dest)
    allow, ignore = _patterns(allow_patterns), _patterns(ignore_patterns)
    name = marker_name(ref, allow, ignore)
    try:
        manifest_id = await resolve(client, ref)
    except Unavailable as exc:
        recorded = await anyio.to_thread.run_sync(_complete_marker, path / name, None)
        if recorded is None:
            kind = StoreUnavailable if isinstance(exc, StoreUnavailable) else Unavailable
            raise kind(f"{exc}; and {path} holds no complete copy of {ref}") from exc
        log.warning("store unreachable; using the complete local copy of %s in %s", ref, path)
        return WeightsResult(ref, recorded, path, pulled=False, offline=True)
    if await anyio.to_thread.run_sync(_complete_marker, path / name, manifest_id) is not None:
        return WeightsResult(ref, manifest_id, path, pulled=False)
    tree = _selected(await _load_tree(client, manifest_id), ref, allow, ignore)
    await anyio.to_thread.run_sync(_remove_marker, path / name)
    reporter = _RefReporter(ref, progress, tqdm_class)
    try:
        result = await _pull(client, ref, manifest_id, tree, path, reporter, first, link_mode)
    finally:
        reporter.close()
    doc = {"ref": ref, "allow_patterns": list(allow), "ignore_patterns": list(ignore)}
    await anyio.to_thread.run_sync(_write_marker, path, name, doc, manifest_id, tree)
    return WeightsResult(ref, manifest_id, path, pulled=True, pull=result)


# --------------------------------------------------------------------------- markers


def marker_name(ref: str, allow_patterns: Patterns = None, ignore_patterns: Patterns = None) -> str:
    """The completeness marker of one selection: ``ref`` as given and the
    patterns (their order does not matter)."""
    key = json.dumps([ref, sorted(_patterns(allow_patterns)), sorted(_patterns(ignore_patterns))])
    return f"{MARKER_PREFIX}-{hash_bytes(key.encode())[:16]}.json"


def is_marker(name: str) -> bool:
    """True for a completeness marker's file name (this version's or the old one)."""
    return name.startswith(MARKER_PREFIX) and name.endswith(".json")


def is_complete(
    dest: str | os.PathLike[str],
    manifest_id: ChunkId | None = None,
    *,
    ref: str | None = None,
    allow_patterns: Patterns = None,
    ignore_patterns: Patterns = None,
) -> bool:
    """True if ``dest`` holds a complete pull (of ``manifest_id``, if given): of
    the selection ``ref`` and the patterns name, or without ``ref`` of any."""
    root = Path(dest)
    if ref is not None:
        marker = root / marker_name(ref, allow_patterns, ignore_patterns)
        return _complete_marker(marker, manifest_id) is not None
    try:
        names = [n for n in os.listdir(root) if is_marker(n) and n != MARKER]
    except OSError:
        return False
    return any(_complete_marker(root / n, manifest_id) is not None for n in names)


def _complete_marker(marker: Path, manifest_id: ChunkId | None) -> ChunkId | None:
    """The manifest id ``marker`` records if every file it records is unchanged."""
    try:
        doc = json.loads(marker.read_text(encoding="utf-8"))
        if doc.get("version") != _MARKER_VERSION:
            return None
        recorded = ChunkId(doc["manifest"])
        if manifest_id is not None and recorded != manifest_id:
            return None
        if doc.get("boot") != boot_id():
            return None
        for rel, size, mtime_ns in doc["files"]:
            st = os.lstat(marker.parent / rel)
            if st.st_size != size or st.st_mtime_ns != mtime_ns:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return recorded


def _write_marker(
    dest: Path, name: str, selection: dict[str, Any], manifest_id: ChunkId, tree: Tree
) -> None:
    files: list[list[Any]] = []
    try:
        for entry in tree.entries:
            if entry.kind == "file":
                st = os.lstat(dest / entry.path)
                files.append([entry.path, st.st_size, st.st_mtime_ns])
        doc = {
            "version": _MARKER_VERSION,
            **selection,
            "manifest": manifest_id,
            "files": files,
            "boot": boot_id(),
        }
        write_atomic(dest / name, json.dumps(doc))
        (dest / MARKER).unlink(missing_ok=True)  # the old single marker: ours, stale
    except OSError as exc:
        raise os_error(exc, f"cannot write {dest / name}") from exc


def _remove_marker(marker: Path) -> None:
    try:
        marker.unlink(missing_ok=True)
    except OSError as exc:
        raise os_error(exc, f"cannot remove {marker}") from exc


# --------------------------------------------------------------------------- locality


@dataclass(frozen=True, slots=True)
class Locality:
    ref: str
    manifest: ChunkId
    total_bytes: int
    """Bytes of the ref's distinct chunks."""
    local_bytes: int
    region_bytes: int
    """Held on this node or by a live peer of the region (local included)."""
    peers_checked: bool
    """False when there is no peer tier (or it could not answer): region == local."""

    @property
    def local_fraction(self) -> float:
        return self.local_bytes / self.total_bytes if self.total_bytes else 1.0

    @property
    def region_fraction(self) -> float:
        return self.region_bytes / self.total_bytes if self.total_bytes else 1.0

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "manifest": self.manifest,
            "total_bytes": self.total_bytes,
            "local_bytes": self.local_bytes,
            "region_bytes": self.region_bytes,
            "local_fraction": round(self.local_fraction, 4),
            "region_fraction": round(self.region_fraction, 4),
            "peers_checked": self.peers_checked,
        }


async def locality(client: Client, ref: str) -> Locality:
    """How much of ``ref`` (its distinct chunks, by bytes) this node's cache and
    the region's peers hold, so a scheduler can prefer warm nodes. Trees, layers
    and images all work. Raises RefNotFound, Unavailable (object store)."""
    manifest_id = await resolve(client, ref)
    tree = await as_tree(await client.catalog.load(manifest_id), client.catalog)
    sizes = {c.id: c.size for c in tree.chunk_refs()}
    local = await client.cache.has(sizes)
    region = set(local)
    checked = False
    if client.peer is not None:
        try:
            region |= await client.peer.has(set(sizes) - local)
            checked = True
        except Unavailable as exc:
            log.warning("peers could not answer for %s: %s", ref, exc)
    return Locality(
        ref=ref,
        manifest=manifest_id,
        total_bytes=sum(sizes.values()),
        local_bytes=sum(sizes[c] for c in local),
        region_bytes=sum(sizes[c] for c in region),
        peers_checked=checked,
    )


# --------------------------------------------------------------------------- blocking


class BlockingClient:
    """The runner API for code that is not async. Use ``blocking_client()``.

    It runs its own event loop in a thread of its own (an anyio blocking
    portal) and the client lives there, so it never touches the caller's loop.
    Its methods block the calling thread; any number of threads may call them
    at once (pulls into different directories run concurrently; into one
    directory they take turns). Meant for plain code and worker threads
    (``anyio.to_thread.run_sync``, ``loop.run_in_executor``). Called from a
    coroutine it still works (no deadlock: its loop is its own) but holds that
    coroutine's loop for the whole call, as any blocking call would: await the
    async functions there instead."""

    def __init__(self, portal: anyio.from_thread.BlockingPortal, client: Client) -> None:
        self._portal = portal
        self.client = client
        """The async Client (for use on the portal's loop only)."""

    def _call(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self._portal.call(partial(func, self.client, *args, **kwargs))

    def download_model_weights(
        self, ref: str, dest: str | os.PathLike[str], **options: Any
    ) -> WeightsResult:
        """``download_model_weights(client, ref, dest, **options)``, blocking."""
        result: WeightsResult = self._call(download_model_weights, ref, dest, **options)
        return result

    def pull_refs(
        self,
        pulls: Mapping[str, str | os.PathLike[str]] | Sequence[tuple[str, str | os.PathLike[str]]],
        **options: Any,
    ) -> list[PullResult]:
        """``pull_refs(client, pulls, **options)``, blocking."""
        results: list[PullResult] = self._call(pull_refs, pulls, **options)
        return results

    def locality(self, ref: str) -> Locality:
        """``locality(client, ref)``, blocking."""
        found: Locality = self._call(locality, ref)
        return found

    def resolve(self, ref_or_id: str) -> ChunkId:
        """``resolve(client, ref_or_id)``, blocking."""
        manifest_id: ChunkId = self._call(resolve, ref_or_id)
        return manifest_id

    def synchronized_directory(
        self, ref: str, directory: str | os.PathLike[str], **options: Any
    ) -> AbstractContextManager[Any]:
        """``syncdir.synchronized_directory`` as a plain ``with`` block."""
        from .syncdir import synchronized_directory

        return self._portal.wrap_async_context_manager(
            synchronized_directory(self.client, ref, directory, **options)
        )


@contextmanager
def blocking_client(
    config: Config | None = None,
    *,
    env: Mapping[str, str] | None = None,
    peers: bool = True,
    **overrides: str | None,
) -> Iterator[BlockingClient]:
    """``open_client`` for code that is not async: ``with blocking_client() as c:
    c.download_model_weights(ref, "/data")``. Same arguments and errors as
    ``open_client``; see ``BlockingClient`` for where it may be called."""
    with anyio.from_thread.start_blocking_portal() as portal:
        opened = open_client(config, env=env, peers=peers, **overrides)
        with portal.wrap_async_context_manager(opened) as client:
            yield BlockingClient(portal, client)


def download(
    ref: str,
    dest: str | os.PathLike[str],
    *,
    config: Config | None = None,
    env: Mapping[str, str] | None = None,
    peers: bool = True,
    **options: Any,
) -> WeightsResult:
    """One blocking ``download_model_weights`` with a client opened for it from
    ``config`` or the ``BLOBSTORE_*`` environment (``snapshot_download``'s
    shape: ``download("apps/llama/data", "/data", allow_patterns="*.json")``).
    Raises what ``open_client`` and ``download_model_weights`` raise."""
    with blocking_client(config, env=env, peers=peers) as client:
        return client.download_model_weights(ref, dest, **options)


__all__ = [
    "DEFAULT_FIRST",
    "MARKER_PREFIX",
    "BlockingClient",
    "Locality",
    "Patterns",
    "RefProgress",
    "WeightsResult",
    "blocking_client",
    "download",
    "download_model_weights",
    "is_complete",
    "is_marker",
    "locality",
    "marker_name",
    "open_client",
    "priority_order",
    "pull_refs",
    "resolve",
]
