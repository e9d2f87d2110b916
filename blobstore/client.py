"""The client: one node's view of blobstore, wiring config into objects.

``async with Client.open(config) as client`` opens the object store and the local
cache, and composes the tier list local -> peers -> origin; the peer tier (a
plugin's) is opened when a pull first lacks a chunk (tiers.OpenedOnUse).
push/pull/verify are thin calls over it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from .catalog import Catalog
from .config import FRESH_NS, RACY_WINDOW_NS, Config
from .errors import BadInput, Corrupt, Unavailable
from .ids import ChunkId
from .linking import DestDir, LinkMode
from .manifest import ChunkRef, Entry, Image, Manifest, Tree, file_key
from .marker import state_dir_of
from .nodestore import NodeStore
from .objectstore import ObjectStore
from .origin import OriginSource
from .plugins import load_plugins
from .repull import PullResult
from .source import ChunkData, ChunkSource
from .stores import LazyObjectStore, open_object_store
from .tiers import OpenedOnUse, TieredSource

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    # Only pushes need these (and only pulls materialize): each command imports
    # its own half inside the method, so a pull does not load the chunker, the
    # pack writer and the lease code, nor a push the materializer.
    from .ingest import Ingestor
    from .locator import PackLocator
    from .materialize import Progress
    from .packs import IndexCache, PackConfig
    from .push import MigrateResult, PushResult, RepairResult

log = logging.getLogger(__name__)


class Client:
    """A node's handle on the store, cache and tiers. Use ``Client.open``."""

    def __init__(
        self,
        config: Config,
        object_store: ObjectStore,
        cache: NodeStore,
        peer: ChunkSource | None,
    ) -> None:
        self.config = config
        self.object_store = object_store
        self.cache = cache
        self.peer = peer
        # the node's cached pack indexes: a new process reads only indexes of new packs
        self.origin = OriginSource(object_store, make_locator=self._locator)
        self._packs: PackConfig | None = None
        self.racy_window_ns = RACY_WINDOW_NS
        """Files changed this recently before a push are read by the next one too."""
        self.push_index_fresh_ns = FRESH_NS
        """A no-op push LISTs the packs its push index names once it is this old."""
        self.catalog = Catalog(object_store)
        tiers: list[ChunkSource] = [cache] + ([peer] if peer is not None else []) + [self.origin]
        self.source = TieredSource(tiers, cache)

    @classmethod
    @asynccontextmanager
    async def open(
        cls, config: Config, *, peers: bool = True, lazy_store: bool = False
    ) -> AsyncIterator[Client]:
        """Open everything ``config`` names. With ``lazy_store``, a store that cannot
        be reached now is opened when first needed (stores.LazyObjectStore): a node
        can start, and use complete local copies, while its store is down.
        Raises ConfigError, Unavailable."""
        async with AsyncExitStack() as stack:
            store = await stack.enter_async_context(
                LazyObjectStore(config.store_url, config.s3)
                if lazy_store
                else open_object_store(config.store_url, config.s3)
            )
            cache = await stack.enter_async_context(NodeStore(config.cache))
            opener = None
            if peers and config.peers.mode != "none":
                opener = partial(_peer_tier, config, cache)
            yield await stack.enter_async_context(cls.sharing(config, store, cache, opener))

    @classmethod
    @asynccontextmanager
    async def sharing(
        cls,
        config: Config,
        store: ObjectStore,
        cache: NodeStore,
        peers: Callable[[], AbstractAsyncContextManager[ChunkSource | None]] | None,
    ) -> AsyncIterator[Client]:
        """A client over a store and a node store its caller opened and closes (a
        daemon's, for the pulls of its node agent), with the peer tier ``peers``
        opens, on the first chunk the node lacks (tiers.OpenedOnUse): a pull that
        finds everything local loads neither p2p nor zeroconf."""
        async with AsyncExitStack() as stack:
            peer: ChunkSource | None = None
            if peers is not None:
                task_group = await stack.enter_async_context(_task_group())
                lazy = OpenedOnUse("peer", peers, task_group)
                stack.callback(lazy.close)
                peer = lazy
            yield cls(config, store, cache, peer)

    @asynccontextmanager
    async def writing(self) -> AsyncIterator[Ingestor]:
        """An Ingestor under a writer lease (see leases.py): pack chunks and
        write manifests and refs inside this block, so gc cannot sweep a pack
        the writer decided to reuse. What the store holds is learnt once, from
        the pack indexes (LIST + the local index cache, see packs.py); call
        ``ingestor.flush()`` before saving a manifest."""
        from .chunker import DEFAULT_PARAMS
        from .ingest import Ingestor
        from .leases import Leases
        from .packs import PackWriter, StoreIndex

        async with Leases(self.object_store).writing():
            cache = self.index_cache
            index = await StoreIndex.load(self.object_store, cache, self.packs)

            async def sealed(pack: ChunkId, refs: tuple[ChunkRef, ...], data: bytes) -> None:
                index.add_pack(pack, refs)
                await anyio.to_thread.run_sync(cache.write, pack, data)

            async with PackWriter.open(self.object_store, self.packs, sealed) as writer:
                yield Ingestor(writer, index, DEFAULT_PARAMS)

    @property
    def packs(self) -> PackConfig:
        """How pushes pack chunks (target size, uploads in flight)."""
        if self._packs is None:
            from .packs import PackConfig

            self._packs = PackConfig()
        return self._packs

    @packs.setter
    def packs(self, packs: PackConfig) -> None:
        self._packs = packs

    def _locator(self) -> PackLocator:
        """The origin's reads by id (made when first needed: pulls never are)."""
        from .locator import PackLocator

        return PackLocator(self.object_store, self.index_cache)

    @property
    def index_cache(self) -> IndexCache:
        """This node's copies of the store's pack indexes and its known-bad list."""
        from .packs import IndexCache

        return IndexCache.for_store(self.config.cache.dir, self.object_store.url)

    async def push(
        self, root: Path, ref: str | None, *, progress: Progress | None = None
    ) -> PushResult:
        """Snapshot ``root`` into the store and point ``ref`` at it. Files whose
        stat matches the node's push index of ``root`` are not read; a push with
        nothing to do makes one request and takes no lease (push.py)."""
        from .chunker import DEFAULT_PARAMS
        from .push import PushIndex, push_tree, push_unchanged, scan_root

        root = Path(root)
        scan = await scan_root(root)
        push_index = await anyio.to_thread.run_sync(  # realpath: lstat of each component
            PushIndex.for_root,
            self.config.cache.dir,
            self.object_store.url,
            root,
            DEFAULT_PARAMS,
            self.racy_window_ns,
            self.push_index_fresh_ns,
        )
        if ref is not None:
            done = await push_unchanged(
                scan,
                ref,
                self.catalog,
                self.object_store,
                self.index_cache,
                push_index,
                DEFAULT_PARAMS,
            )
            if done is not None:
                return done
        async with self.writing() as ingestor:
            return await push_tree(
                root,
                ref,
                self.catalog,
                ingestor,
                progress=progress,
                scan=scan,
                push_index=push_index,
            )

    async def load(self, ref_or_id: str) -> tuple[ChunkId, Manifest]:
        manifest_id = await self.catalog.resolve_or_id(ref_or_id)
        return manifest_id, await self.catalog.load(manifest_id)

    async def pull(
        self,
        ref: str,
        dest: Path | DestDir,
        *,
        progress: Progress | None = None,
        priority: Callable[[Entry], Any] | None = None,
        link_mode: LinkMode = "auto",
        keep_special_modes: bool = False,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        delete: bool = False,
    ) -> PullResult:
        """Materialize ``ref`` (a ref, a manifest id or a unique prefix of one) into
        ``dest`` through the tiers (see pull_tree): only the paths ``include``
        selects (all when empty) and ``exclude`` does not (blobstore.patterns).
        With ``delete``, what ``dest`` holds beyond that is removed afterwards
        (among the paths the patterns select: blobstore.prune). Raises what
        pull_tree raises, and BadInput when the patterns select nothing. ``dest``
        may be a DestDir (then this owns it), except with ``delete``."""
        if delete and isinstance(dest, DestDir):
            raise BadInput("a pull with delete needs its destination as a path")
        manifest_id = await self.catalog.resolve_or_id(ref)
        tree = await self.catalog.load_tree(manifest_id)
        if include or exclude:
            from .patterns import select

            whole, tree = tree, select(tree, include, exclude)
            if whole.entries and not tree.entries:
                raise BadInput(f"no path of {ref} matches the include/exclude patterns")
        result = await self.pull_tree(
            ref,
            manifest_id,
            tree,
            dest,
            progress=progress,
            priority=priority,
            link_mode=link_mode,
            keep_special_modes=keep_special_modes,
        )
        if not delete:
            return result
        from .patterns import Selection
        from .prune import prune

        where = dest.path if isinstance(dest, DestDir) else Path(dest)  # (a path: see above)
        pruned = await anyio.to_thread.run_sync(prune, where, tree, Selection(include, exclude))
        for path in pruned.removed:
            log.info("deleted %s", path)
        return replace(result, deleted=len(pruned.removed))

    async def pull_tree(
        self,
        ref: str,
        manifest_id: ChunkId,
        tree: Tree,
        dest: Path | DestDir,
        *,
        progress: Progress | None = None,
        priority: Callable[[Entry], Any] | None = None,
        link_mode: LinkMode = "auto",
        keep_special_modes: bool = False,
    ) -> PullResult:
        """Materialize ``tree`` into ``dest``: files already there are kept (on a
        stat, when this node's pull marker vouches for them), the rest placed
        from the node store by ``link_mode`` (auto|reflink|hardlink|copy) or
        fetched through the tiers. setuid/setgid/sticky bits are dropped unless
        ``keep_special_modes``. Raises BadInput/UnsafePath, NotFound, Corrupt,
        Unavailable, DiskFull. ``priority`` orders the files (default:
        materialize.default_priority)."""
        from .materialize import default_priority, materialize

        before = dict(self.source.bytes_from)
        await self._probe_peers(tree)
        keys = [file_key(e) for e in tree.entries if e.kind == "file" and e.size]
        with self.cache.pinned(c.id for c in tree.chunk_refs()), self.cache.pinned_files(keys):
            stats = await materialize(
                tree,
                dest if isinstance(dest, DestDir) else Path(dest),
                self.source,
                store=self.cache,
                concurrency=self.config.concurrency,
                progress=progress,
                priority=priority or default_priority,
                link_mode=link_mode,
                keep_special_modes=keep_special_modes,
                state_dir=self.pull_state_dir,
            )
        tiers = {k: v - before.get(k, 0) for k, v in self.source.bytes_from.items()}
        tiers["local"] = tiers.get("local", 0) + stats.placed_bytes
        self.source.pulled(stats.placed_bytes, stats.seconds)  # metrics, when enabled
        return PullResult(
            ref, manifest_id, stats.files, stats.bytes, stats.kept_files, stats.seconds, tiers
        )

    @property
    def pull_state_dir(self) -> Path:
        """Where pull markers live (beside the node store, not in destinations)."""
        return state_dir_of(self.config.cache.dir)

    async def _probe_peers(self, tree: Tree) -> None:
        """Ask the peers which of the chunks we lack they hold, so the peer tier
        prefers peers that already have them (a peer with the whole manifest
        ranks first for every chunk). Best effort: a failure only loses ranking."""
        if self.peer is None:
            return
        wanted = {c.id for c in tree.chunk_refs() if not self.cache.contains(c.id)}
        if wanted:
            try:
                await self.peer.has(wanted)
            except Unavailable as exc:
                log.info("peer probe failed: %s", exc)

    async def verify(self, ref: str) -> VerifyResult:
        """Check every chunk of ``ref`` in the object store (read and hashed; packed
        chunks in coalesced ranged reads). Chunks found missing or corrupt are added
        to this node's known-bad list, so pushes never reuse them from there.
        Raises NotFound, InvalidManifest, Unavailable (nothing could be checked)."""
        started = time.monotonic()
        manifest_id = await self.catalog.resolve_or_id(ref)
        refs: dict[tuple[ChunkId, ChunkId | None, int], ChunkRef] = {}
        async for _, manifest in self.catalog.walk(manifest_id):
            if not isinstance(manifest, Image):
                for c in manifest.chunk_refs():
                    refs.setdefault((c.id, c.pack, c.offset), c)

        async def sink(ref: ChunkRef, data: ChunkData) -> None:
            """The origin verified the bytes; nothing to keep."""

        undelivered = await self.origin.fetch(list(refs.values()), sink)
        reasons = getattr(undelivered, "reasons", {})
        missing: list[ChunkRef] = []
        corrupt: list[ChunkRef] = []
        for r in undelivered:
            reason = reasons.get(r.id)
            if isinstance(reason, Unavailable):
                raise reason
            (corrupt if isinstance(reason, Corrupt) else missing).append(r)
        bad = tuple(missing + corrupt)
        if bad:
            await anyio.to_thread.run_sync(self.index_cache.add_bad, [(r.id, r.pack) for r in bad])
        return VerifyResult(
            ref,
            manifest_id,
            len({c.id for c in refs.values()}),
            sorted({r.id for r in missing}),
            sorted({r.id for r in corrupt}),
            time.monotonic() - started,
            bad,
        )

    async def repair(self, ref: str, source: Path) -> RepairResult:
        """Verify ``ref``; if chunks are bad, pack them again from the files in
        ``source`` (a copy of the tree) and point ``ref`` (compare-and-swap) at a
        tree naming the new copies. Raises BadInput (an image, or not a
        directory), Conflict (the ref moved), NotFound, Unavailable."""
        from .push import RepairResult, repair_tree

        checked = await self.verify(ref)
        if checked.ok:
            return RepairResult(ref, checked.manifest, checked.manifest, 0, ())
        bad = {(r.id, r.pack) for r in checked.bad}
        async with self.writing() as ingestor:
            return await repair_tree(
                self.catalog, ref, checked.manifest, bad, Path(source), ingestor
            )

    async def migrate(self) -> MigrateResult:
        """Move this (old) store's per-chunk objects into packs and its refs onto
        v2 manifests (push.migrate_store), under a writer lease. Raises Unavailable."""
        from .push import migrate_store

        async with self.writing() as ingestor:
            return await migrate_store(self.catalog, self.origin, ingestor)


@asynccontextmanager
async def _task_group() -> AsyncIterator[TaskGroup]:
    """A task group (holding the lazily opened peer tier) that lets an error of
    the client's user out as itself: anyio wraps even a lone one in an
    ExceptionGroup, and ``Client.open`` raised plain errors before it had one."""
    thrown: BaseException | None = None
    try:
        async with anyio.create_task_group() as task_group:
            try:
                yield task_group
            except BaseException as exc:
                thrown = exc
                raise
    except BaseExceptionGroup as group:
        if thrown is None or list(group.exceptions) != [thrown]:
            raise
    if thrown is not None:
        raise thrown


@asynccontextmanager
async def _peer_tier(config: Config, cache: NodeStore) -> AsyncIterator[ChunkSource | None]:
    """The first peer tier a plugin offers (None: no plugin offers one)."""
    async with AsyncExitStack() as stack:
        for plugin in load_plugins():
            peer = await stack.enter_async_context(plugin.peer_tier(config, cache))
            if peer is not None:
                yield peer
                return
        yield None


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ref: str
    manifest: ChunkId
    chunks: int
    missing: list[str]
    corrupt: list[str]
    seconds: float
    bad: tuple[ChunkRef, ...] = ()
    """Every bad location (missing or corrupt), for ``repair``."""

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupt


def __getattr__(name: str) -> Any:
    """``PushResult`` and ``RepairResult`` are push.py's, loaded when first asked for."""
    if name in ("PushResult", "RepairResult"):
        from . import push

        return getattr(push, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Client", "PullResult", "PushResult", "RepairResult", "Unavailable", "VerifyResult"]
