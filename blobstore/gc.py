"""gc: evict the local cache to its limits and sweep unreferenced objects.

Mark: every ref's manifest, the manifests it names (an image's layers) and
their chunks. Sweep: chunks and manifests nobody reaches *and* older than a
grace period. A concurrent push uploads its chunks, then the manifest, then
the ref, all within the grace period, so it is never broken; a writer that
reuses an old chunk is protected by the lease handshake in leases.py (gc
sweeps nothing while writers run; writers wait while gc sweeps). Refs are
marked again under the gc lease, to catch refs written while we listed.

A bad ref does not stop gc: one holding garbage, one naming a missing manifest,
or one whose manifest (or an image's layer manifest) is corrupt — its bytes do
not match its id on two reads — is reported in ``bad_refs``, and everything it
still reaches is kept. What stops the sweep (an exception, nothing deleted): the
store being unavailable, and a manifest whose bytes are intact but do not decode
(a newer format we cannot follow must never have its chunks swept).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .catalog import Catalog
from .errors import InvalidManifest, ObjectMissing
from .filestore import FileObjectStore
from .ids import ChunkId, is_id
from .leases import Leases
from .manifest import Image
from .nodestore import NodeStore
from .objectstore import CHUNKS, MANIFESTS, ObjectStore
from .parallel import for_each

DEFAULT_GRACE_SECONDS = 6 * 3600


@dataclass(frozen=True, slots=True)
class GcResult:
    cache_evicted_bytes: int
    cache_bytes: int
    refs: int
    live_manifests: int
    live_chunks: int
    swept_manifests: int
    swept_chunks: int
    swept_bytes: int
    dry_run: bool
    skipped_for_writers: int = 0
    """Writers (push, import, sync) were running, so nothing was swept."""
    bad_refs: tuple[str, ...] = ()
    """One line per ref that could not be followed (see the module docstring)."""
    stale_temp_files: int = 0
    """Temp files of killed writers a file store removed (older than an hour)."""


async def mark(
    catalog: Catalog, bad_refs: list[str] | None = None
) -> tuple[int, set[ChunkId], set[ChunkId]]:
    """(ref count, live manifest ids, live chunk ids).

    A bad ref (see the module docstring) is appended to ``bad_refs`` and what it
    still reaches is marked; without a list it raises InvalidManifest/NotFound
    instead. Raises Unavailable, and InvalidManifest for an intact manifest that
    does not decode."""
    manifests: set[ChunkId] = set()
    chunks: set[ChunkId] = set()
    refs = await catalog.read_refs(check_manifests=False)
    problems: list[str] = []
    damaged: dict[ChunkId, str] = {}  # manifest id -> "missing" / "corrupt"
    for ref in refs:
        if ref.manifest is None:
            problems.append(f"ref {ref.name!r} {ref.problem}")
            continue
        pending = [ref.manifest]
        while pending:
            current = pending.pop()
            if current in manifests:
                if current in damaged:
                    problems.append(f"ref {ref.name!r} reaches manifest {current}, which is "
                                    f"{damaged[current]}")
                continue
            manifests.add(current)  # even if damaged: repairable, never swept under a ref
            try:
                manifest = await catalog.load_if_intact(current)
            except ObjectMissing:
                manifest, damaged[current] = None, "missing"
            if manifest is None:
                damaged.setdefault(current, "corrupt")
                problems.append(f"ref {ref.name!r} reaches manifest {current}, which is "
                                f"{damaged[current]}")
                continue
            if isinstance(manifest, Image):
                pending.extend(layer.manifest for layer in manifest.layers)
            else:
                chunks.update(c.id for c in manifest.chunk_refs())
    if problems and bad_refs is None:
        raise InvalidManifest(problems[0])
    if bad_refs is not None:
        bad_refs.extend(problems)
    return len(refs), manifests, chunks


async def collect(
    store: ObjectStore,
    cache: NodeStore | None,
    *,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    dry_run: bool = False,
) -> GcResult:
    """Run a full gc. Raises Unavailable, InvalidManifest (then nothing is swept)."""
    evicted = await cache.evict() if cache is not None and not dry_run else 0
    stale_temp = 0
    if isinstance(store, FileObjectStore) and not dry_run:
        stale_temp, _ = await store.remove_stale_temp()
    catalog = Catalog(store)
    bad_refs: list[str] = []
    ref_count, live_manifests, live_chunks = await mark(catalog, bad_refs)
    cutoff = time.time() - grace_seconds
    candidates: list[tuple[str, int]] = []
    async for info in store.list(MANIFESTS):
        name = info.key.rsplit("/", 1)[-1]
        if info.mtime < cutoff and is_id(name) and name not in live_manifests:
            candidates.append((info.key, info.size))
    async for info in store.list(CHUNKS):
        name = info.key.rsplit("/", 1)[-1]
        if info.mtime < cutoff and is_id(name) and name not in live_chunks:
            candidates.append((info.key, info.size))
    skipped_for_writers = 0
    async with Leases(store).collecting() as writers:
        if writers:
            # A writer may be reusing one of these chunks for a ref we have not
            # seen yet: sweep nothing this time (see leases.py).
            skipped_for_writers, candidates = writers, []
        elif candidates:
            # Refs written by writers that finished before we took our lease.
            _, again_manifests, again_chunks = await mark(catalog, [])
            live = again_manifests | again_chunks
            candidates = [(k, s) for k, s in candidates if k.rsplit("/", 1)[-1] not in live]
        if not dry_run:
            await for_each([key for key, _ in candidates], store.delete, 32)
    return GcResult(
        cache_evicted_bytes=evicted,
        cache_bytes=cache.used_bytes if cache is not None else 0,
        refs=ref_count,
        live_manifests=len(live_manifests),
        live_chunks=len(live_chunks),
        swept_manifests=sum(1 for k, _ in candidates if k.startswith(MANIFESTS)),
        swept_chunks=sum(1 for k, _ in candidates if k.startswith(CHUNKS)),
        swept_bytes=sum(s for _, s in candidates),
        dry_run=dry_run,
        skipped_for_writers=skipped_for_writers,
        bad_refs=tuple(bad_refs),
        stale_temp_files=stale_temp,
    )


__all__ = ["GcResult", "collect", "mark"]
