"""The start-up API a runner calls before it serves: open a client, pull refs
into ``/data``-style directories (small and listed files first), skip pulls
that are already complete, and tell a scheduler how warm this node is.

Completeness check (``download_model_weights``): after a successful pull we
write ``.blobstore-complete.json`` in the destination, recording the manifest
id and every file's size and mtime (ns). A later call resolves the ref (one
small read) and, if it still points at that manifest and every recorded file
still has its size and mtime, returns without touching a byte. The marker is
removed before a pull starts, so a crash mid-pull never looks complete; it
holds the boot id, because a pull does not wait for write-back: after a
reboot (a power loss may have torn files) the pull runs again, and checks
what it cannot vouch for. When
the store cannot be reached but the marker checks out, the local copy is used
(a runner that can serve should serve).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from .client import Client, PullResult
from .config import Config
from .dedup import as_tree
from .errors import BadInput, StoreUnavailable, Unavailable
from .ids import ChunkId
from .linking import LinkMode
from .manifest import Entry, Tree
from .materialize import boot_id

log = logging.getLogger(__name__)

MARKER = ".blobstore-complete.json"
_MARKER_VERSION = 1

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


# --------------------------------------------------------------------------- pulling


async def pull_refs(
    client: Client,
    pulls: Mapping[str, str | os.PathLike[str]] | Sequence[tuple[str, str | os.PathLike[str]]],
    *,
    progress: RefProgress | None = None,
    first: Sequence[str] = DEFAULT_FIRST,
    link_mode: LinkMode = "auto",
) -> list[PullResult]:
    """Pull each ``(ref, directory)`` in order (the order is the priority between
    refs; within a ref, ``first`` patterns and small files come first), files
    placed from the node store by ``link_mode``.

    One ref at a time keeps memory bounded by one pull's chunks in flight while
    each pull still fetches many chunks in parallel. Raises RefNotFound,
    Unavailable, DiskFull, BadInput."""
    items = list(pulls.items()) if isinstance(pulls, Mapping) else list(pulls)
    results = []
    for ref, dest in items:
        manifest_id = await client.catalog.resolve_or_id(ref)
        tree = await _load_tree(client, manifest_id)
        results.append(
            await _pull(client, ref, manifest_id, tree, Path(dest), progress, first, link_mode)
        )
    return results


async def _pull(
    client: Client,
    ref: str,
    manifest_id: ChunkId,
    tree: Tree,
    dest: Path,
    progress: RefProgress | None,
    first: Sequence[str],
    link_mode: LinkMode = "auto",
) -> PullResult:
    def per_ref(done: int, total: int) -> None:
        if progress is not None:
            progress(ref, done, total)

    return await client.pull_tree(
        ref,
        manifest_id,
        tree,
        dest,
        progress=per_ref,
        priority=priority_order(first),
        link_mode=link_mode,
    )


async def _load_tree(client: Client, manifest_id: ChunkId) -> Tree:
    manifest = await client.catalog.load(manifest_id)
    if not isinstance(manifest, Tree):
        raise BadInput(f"manifest {manifest_id} is a {manifest.kind}; only trees can be pulled")
    return manifest


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
    first: Sequence[str] = DEFAULT_FIRST,
    link_mode: LinkMode = "auto",
) -> WeightsResult:
    """Make ``dest`` hold ``ref``, pulling only if it is not already complete
    (see the module docstring for the check). Returns where the bytes are.
    ``link_mode`` (auto|reflink|hardlink|copy) says how files come from the
    node store; with ``hardlink`` the files are read-only and must stay so.

    Raises RefNotFound, Unavailable (store unreachable and no complete local
    copy), DiskFull, BadInput."""
    path = Path(dest)
    try:
        manifest_id = await client.catalog.resolve_or_id(ref)
    except Unavailable as exc:
        recorded = await anyio.to_thread.run_sync(_complete_marker, path, None)
        if recorded is None:
            kind = StoreUnavailable if isinstance(exc, StoreUnavailable) else Unavailable
            raise kind(f"{exc}; and {path} holds no complete copy of {ref}") from exc
        log.warning("store unreachable; using the complete local copy of %s in %s", ref, path)
        return WeightsResult(ref, recorded, path, pulled=False, offline=True)
    if await anyio.to_thread.run_sync(_complete_marker, path, manifest_id) is not None:
        return WeightsResult(ref, manifest_id, path, pulled=False)
    tree = await _load_tree(client, manifest_id)
    await anyio.to_thread.run_sync(_remove_marker, path)
    result = await _pull(client, ref, manifest_id, tree, path, progress, first, link_mode)
    await anyio.to_thread.run_sync(_write_marker, path, ref, manifest_id, tree)
    return WeightsResult(ref, manifest_id, path, pulled=True, pull=result)


def is_complete(dest: str | os.PathLike[str], manifest_id: ChunkId | None = None) -> bool:
    """True if ``dest`` holds a complete pull (of ``manifest_id``, if given)."""
    return _complete_marker(Path(dest), manifest_id) is not None


def _complete_marker(dest: Path, manifest_id: ChunkId | None) -> ChunkId | None:
    """The manifest id recorded in ``dest`` if every recorded file is unchanged."""
    try:
        doc = json.loads((dest / MARKER).read_text(encoding="utf-8"))
        if doc.get("version") != _MARKER_VERSION:
            return None
        recorded = ChunkId(doc["manifest"])
        if manifest_id is not None and recorded != manifest_id:
            return None
        if doc.get("boot") != boot_id():
            return None
        for rel, size, mtime_ns in doc["files"]:
            st = os.lstat(dest / rel)
            if st.st_size != size or st.st_mtime_ns != mtime_ns:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return recorded


def _write_marker(dest: Path, ref: str, manifest_id: ChunkId, tree: Tree) -> None:
    files: list[list[Any]] = []
    for entry in tree.entries:
        if entry.kind == "file":
            st = os.lstat(dest / entry.path)
            files.append([entry.path, st.st_size, st.st_mtime_ns])
    doc = {
        "version": _MARKER_VERSION,
        "ref": ref,
        "manifest": manifest_id,
        "files": files,
        "boot": boot_id(),
    }
    tmp = dest / f".{MARKER}.{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(json.dumps(doc), encoding="utf-8")
        os.replace(tmp, dest / MARKER)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise Unavailable(f"cannot write {dest / MARKER}: {exc.strerror}") from exc


def _remove_marker(dest: Path) -> None:
    try:
        (dest / MARKER).unlink(missing_ok=True)
    except OSError as exc:
        raise Unavailable(f"cannot remove {dest / MARKER}: {exc.strerror}") from exc


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
    manifest_id = await client.catalog.resolve_or_id(ref)
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


__all__ = [
    "DEFAULT_FIRST",
    "MARKER",
    "Locality",
    "RefProgress",
    "WeightsResult",
    "download_model_weights",
    "is_complete",
    "locality",
    "open_client",
    "priority_order",
    "pull_refs",
]
