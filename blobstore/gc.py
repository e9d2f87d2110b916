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

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from .catalog import Catalog
from .chunker import Span
from .errors import InvalidManifest, ObjectMissing
from .filestore import FileObjectStore
from .ids import ChunkId, is_id
from .leases import Leases
from .manifest import ChunkRef, Image
from .nodestore import NodeStore
from .objectstore import CHUNKS, MANIFESTS, PACKS, ObjectInfo, ObjectStore
from .origin import OriginSource
from .packs import (
    PackConfig,
    PackListing,
    PackWriter,
    group_of,
    is_group_id,
    list_packs,
    relocate_refs,
    retired_key,
)
from .parallel import for_each
from .source import ChunkData

log = logging.getLogger(__name__)

DEFAULT_GRACE_SECONDS = 6 * 3600
DEFAULT_REPACK_BELOW = 0.5
"""Repack a pack when less than this fraction of its bytes is live (see below)."""


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
    swept_packs: int = 0
    repacked_packs: int = 0
    """Sparse packs whose live chunks were moved into new packs (now retired)."""
    repacked_bytes: int = 0
    refs_rewritten: int = 0
    """Refs moved onto manifests naming the new copies."""
    would_repack: int = 0
    """Dry run: packs that would be repacked."""


async def mark(
    catalog: Catalog, bad_refs: list[str] | None = None
) -> tuple[int, set[ChunkId], set[ChunkId]]:
    """(ref count, live manifest ids, live per-chunk object ids (``chunks/``)).

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
                    problems.append(
                        f"ref {ref.name!r} reaches manifest {current}, which is {damaged[current]}"
                    )
                continue
            manifests.add(current)  # even if damaged: repairable, never swept under a ref
            try:
                manifest = await catalog.load_if_intact(current)
            except ObjectMissing:
                manifest, damaged[current] = None, "missing"
            if manifest is None:
                damaged.setdefault(current, "corrupt")
                problems.append(
                    f"ref {ref.name!r} reaches manifest {current}, which is {damaged[current]}"
                )
                continue
            if isinstance(manifest, Image):
                pending.extend(layer.manifest for layer in manifest.layers)
            else:
                # per-chunk objects only: a packed chunk lives as long as its pack
                chunks.update(c.id for c in manifest.chunk_refs() if c.pack is None)
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
    repack_below: float = DEFAULT_REPACK_BELOW,
    packs: PackConfig | None = None,
    before_sweep: Callable[[], Awaitable[None]] | None = None,
) -> GcResult:
    """Run a full gc. Raises Unavailable, InvalidManifest (then nothing is swept).

    ``before_sweep`` is awaited under the gc lease once the sweep is decided, just
    before anything is deleted: tests start a writer there to force the race that
    leases.py closes (a writer that starts then must wait for this gc)."""
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
    listing = await list_packs(store)
    usage = await pack_usage(catalog, live_manifests)
    candidates += [(i.key, i.size) for i in pack_sweep_keys(listing, usage, cutoff)]
    sparse = sparse_packs(listing, usage, cutoff, repack_below)
    repacked: RepackResult | None = None
    skipped_for_writers = 0
    async with Leases(store).collecting() as writers:
        if writers:
            # A writer may be reusing one of these chunks for a ref we have not
            # seen yet: sweep nothing this time (see leases.py).
            skipped_for_writers, candidates, sparse = writers, [], []
        elif candidates or sparse:
            # Refs written by writers that finished before we took our lease.
            _, again_manifests, again_chunks = await mark(catalog, [])
            live = again_manifests | again_chunks
            usage = await pack_usage(catalog, again_manifests)
            named_groups = {group_of(p) for p in usage}
            candidates = [
                (k, s)
                for k, s in candidates
                if k.rsplit("/", 1)[-1] not in live
                and pack_of(k) not in usage
                and group_index_of(k) not in named_groups
            ]
            sparse = [p for p in sparse if p in usage]
            if before_sweep is not None:
                await before_sweep()
            if sparse and not dry_run:
                repacked = await repack(store, sparse, usage, packs or PackConfig())
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
        swept_packs=sum(1 for k, _ in candidates if k.startswith(PACKS) and is_id(k[-64:])),
        swept_bytes=sum(s for _, s in candidates),
        dry_run=dry_run,
        skipped_for_writers=skipped_for_writers,
        bad_refs=tuple(bad_refs),
        stale_temp_files=stale_temp,
        repacked_packs=repacked.packs if repacked else 0,
        repacked_bytes=repacked.moved_bytes if repacked else 0,
        refs_rewritten=repacked.refs_rewritten if repacked else 0,
        would_repack=len(sparse) if dry_run else 0,
    )


# --------------------------------------------------------------------------- packs
#
# Packs are swept whole and only once no live manifest names them: manifests are
# immutable and name (pack, offset), so a pack a live manifest names is needed,
# whatever else it holds. Repacking a sparse pack therefore cannot just copy its
# live chunks: it (1) copies them into new packs (pack, then index), (2) writes a
# new manifest for every live manifest that names a moved chunk (an image gets a
# new image manifest naming its new layer manifests), (3) moves each ref to its
# new manifest with compare-and-swap (a ref that moved meanwhile keeps naming the
# old pack, which then simply stays), and (4) marks the old pack retired. A retired
# pack is never offered to writers for dedup (packs.StoreIndex), and is swept by a
# later gc, once no live manifest names it and the marker is older than the grace
# period: a pull that loaded the old manifest just before the swap has that long
# to finish. A group index (packs.py) goes once no pack of its group is left.
# All of it runs under the gc lease with no writer active (leases.py),
# so no push can reuse a chunk from a pack being retired; every ref stays valid at
# every moment: it names either the old manifest (old pack still there) or the new
# one (new packs stored before the manifest was written).

PackUsage = dict[ChunkId, dict[int, ChunkRef]]
"""pack id -> offset -> the live chunk there."""


@dataclass(frozen=True, slots=True)
class RepackResult:
    packs: int
    moved_bytes: int
    refs_rewritten: int
    refs_moved_meanwhile: int


async def pack_usage(catalog: Catalog, manifest_ids: Iterable[ChunkId]) -> PackUsage:
    """Which chunks of which packs the live manifests name. A manifest that is
    missing or damaged names nothing we can see (mark reported it).
    Raises Unavailable, InvalidManifest (intact but undecodable)."""
    usage: PackUsage = {}

    async def one(manifest_id: ChunkId) -> None:
        try:
            manifest = await catalog.load_if_intact(manifest_id)
        except ObjectMissing:
            return
        if manifest is None or isinstance(manifest, Image):
            return
        for ref in manifest.chunk_refs():
            if ref.pack is not None:
                usage.setdefault(ref.pack, {})[ref.offset] = ref

    await for_each(list(manifest_ids), one, 16)
    return usage


def pack_sweep_keys(listing: PackListing, usage: PackUsage, cutoff: float) -> list[ObjectInfo]:
    """Objects of packs no live manifest names, old enough: the pack (its own
    age, or its retired marker's), its index and marker; lone indexes and
    markers; a group index once no pack of its group is left (or kept)."""
    out: list[ObjectInfo] = []
    kept_groups: set[str] = set()
    for pack, info in listing.packs.items():
        retired = listing.retired.get(pack)
        if pack in usage or (retired or info).mtime >= cutoff:
            kept_groups.add(group_of(pack))
            continue
        out.append(info)
        out += [x for x in (listing.indexes.get(pack), retired) if x is not None]
    for extra in (listing.indexes, listing.retired):
        out += [i for p, i in extra.items() if p not in listing.packs and i.mtime < cutoff]
    out += [
        info
        for group, info in listing.groups.items()
        if group not in kept_groups and info.mtime < cutoff
    ]
    return out


def sparse_packs(
    listing: PackListing, usage: PackUsage, cutoff: float, below: float
) -> list[ChunkId]:
    """Named packs worth repacking: less than ``below`` of their bytes live (or
    retired yet still named, by a ref that moved while they were repacked)."""
    out = []
    for pack, refs in usage.items():
        info = listing.packs.get(pack)
        if info is None or info.mtime >= cutoff:
            continue
        live = sum(r.size for r in refs.values())
        if pack in listing.retired or live < below * info.size:
            out.append(pack)
    return out


async def repack(
    store: ObjectStore, packs: list[ChunkId], usage: PackUsage, config: PackConfig
) -> RepackResult:
    """Move the live chunks of ``packs`` into new packs and every ref onto
    manifests naming the new copies; retire the packs emptied. Call under the
    gc lease with no writers. Raises Unavailable."""
    catalog = Catalog(store)
    origin = OriginSource(store)
    moved: dict[tuple[ChunkId, int], ChunkRef] = {}
    moved_bytes = 0
    emptied: list[ChunkId] = []
    async with PackWriter.open(store, config) as writer:
        for pack in packs:
            refs = sorted(usage[pack].values(), key=lambda r: r.offset)
            got = await _read_live(origin, refs)  # verified; a bad chunk stays where it is
            for ref in refs:
                data = got.pop(ref.offset, None)
                if data is not None:
                    (new,) = await writer.add_bytes(bytes(data), [Span(0, ref.size, ref.id)])
                    moved[(pack, ref.offset)] = new
                    moved_bytes += ref.size
            if all((pack, r.offset) in moved for r in refs):
                emptied.append(pack)
        await writer.flush()

    def where(ref: ChunkRef) -> ChunkRef | None:
        new = moved.get((ref.pack, ref.offset)) if ref.pack is not None else None
        return new if new is not None and new.id == ref.id else None

    rewritten, conflicts = await relocate_refs(catalog, where)
    for pack in emptied:
        await store.put(retired_key(pack), f"{time.time():.0f}\n".encode())
    return RepackResult(len(emptied), moved_bytes, rewritten, conflicts)


async def _read_live(origin: OriginSource, refs: list[ChunkRef]) -> dict[int, ChunkData]:
    """The chunks of one pack that can be read intact, by offset (memory: the
    pack's live bytes, under ``repack_below`` x its size)."""
    got: dict[int, ChunkData] = {}

    async def keep(ref: ChunkRef, data: ChunkData) -> None:
        got[ref.offset] = data

    await origin.fetch(refs, keep)
    return got


def group_index_of(key: str) -> str | None:
    """The group whose index ``key`` is, if it is a group index."""
    if not key.startswith(PACKS):
        return None
    stem = key.rsplit("/", 1)[-1].partition(".")[0]
    return stem if is_group_id(stem) else None


def pack_of(key: str) -> ChunkId | None:
    """The pack a ``packs/`` key belongs to (pack, index or marker)."""
    if not key.startswith(PACKS):
        return None
    name = key.rsplit("/", 1)[-1].partition(".")[0]
    return ChunkId(name) if is_id(name) else None


__all__ = ["GcResult", "RepackResult", "collect", "mark", "pack_usage", "repack"]
