"""What a set of refs share: logical vs stored bytes, pairwise sharing, savings.

``compute`` is a pure function over ``{ref: Tree}``; ``load_trees`` is the thin
async shell that reads manifests through a Catalog. Layers and images are
viewed as trees (one pseudo-file per layer blob) so the same report covers
Docker images.

Definitions (all byte counts are sums of chunk sizes):

- *logical*: what a ref's files add up to, duplicates included.
- *unique*: bytes of the distinct chunks a ref holds (what storing it alone costs).
- *exclusive*: bytes of the distinct chunks no other ref holds (what deleting it frees).
- *attributed*: each distinct chunk's size divided among the refs holding it, so the
  attributed bytes of all refs add up to the stored total.
- *saved* (per ref): logical - attributed; these add up to the overall saving.
- *shared(a, b)*: bytes of the distinct chunks both ``a`` and ``b`` hold; ``shared(a, a)``
  is ``unique(a)``.
- *refcount* of a chunk (histogram): how many of the refs hold it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

from .errors import BadInput
from .ids import ChunkId
from .manifest import ChunkerInfo, Entry, Image, Layer, Manifest, Tree, expect_kind
from .progress import human_bytes

T = TypeVar("T")

DEFAULT_TOP_FILES = 20
_IMAGE_CHUNKER = ChunkerInfo("image-layers", 1, 1, 1)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class RefStats:
    ref: str
    files: int
    logical_bytes: int
    unique_bytes: int
    exclusive_bytes: int
    attributed_bytes: int
    chunks: int
    """Distinct chunks held by this ref."""

    @property
    def saved_bytes(self) -> int:
        return self.logical_bytes - self.attributed_bytes


@dataclass(frozen=True, slots=True)
class FileShare:
    """One file content (identical copies grouped) and how much of it is held elsewhere."""

    size: int
    shared_bytes: int
    """Bytes of its distinct chunks that some other file (any ref) also holds."""
    locations: tuple[tuple[str, str], ...]
    """Every (ref, path) holding exactly this content."""
    shared_with: tuple[str, ...]
    """Refs, other than those in ``locations``, that hold some of its chunks."""


@dataclass(frozen=True, slots=True)
class HistogramBin:
    refcount: int
    chunks: int
    bytes: int


@dataclass(frozen=True, slots=True)
class DedupReport:
    refs: tuple[RefStats, ...]
    shared: tuple[tuple[int, ...], ...]
    """``shared[i][j]``: bytes of distinct chunks both refs ``i`` and ``j`` hold."""
    logical_bytes: int
    stored_bytes: int
    """Bytes of the distinct chunks of all refs together."""
    chunks: int
    top_files: tuple[FileShare, ...]
    histogram: tuple[HistogramBin, ...]

    @property
    def saved_bytes(self) -> int:
        return self.logical_bytes - self.stored_bytes

    @property
    def ratio(self) -> float:
        """Logical / stored (1.0 means nothing is shared)."""
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else 1.0

    def shared_bytes(self, a: str, b: str) -> int:
        names = [r.ref for r in self.refs]
        try:
            return self.shared[names.index(a)][names.index(b)]
        except ValueError:
            raise BadInput(f"ref {a!r} or {b!r} is not in this report") from None

    def to_json(self) -> dict[str, Any]:
        names = [r.ref for r in self.refs]
        return {
            "refs": [asdict(r) | {"saved_bytes": r.saved_bytes} for r in self.refs],
            "shared": {
                a: {b: self.shared[i][j] for j, b in enumerate(names)} for i, a in enumerate(names)
            },
            "logical_bytes": self.logical_bytes,
            "stored_bytes": self.stored_bytes,
            "saved_bytes": self.saved_bytes,
            "ratio": round(self.ratio, 4),
            "chunks": self.chunks,
            "top_files": [
                {
                    "size": f.size,
                    "shared_bytes": f.shared_bytes,
                    "locations": [{"ref": r, "path": p} for r, p in f.locations],
                    "shared_with": list(f.shared_with),
                }
                for f in self.top_files
            ],
            "histogram": [asdict(b) for b in self.histogram],
        }


# --------------------------------------------------------------------------- computation


def compute(trees: Mapping[str, Tree], *, top_files: int = DEFAULT_TOP_FILES) -> DedupReport:
    """Compute the dedup report of ``trees`` (ref name -> tree). Pure; memory is
    proportional to the number of distinct chunks and files, never to bytes."""
    names = list(trees)
    n = len(names)
    sizes: dict[ChunkId, int] = {}
    holders: dict[ChunkId, int] = {}  # bitmask of ref indexes
    placements: dict[ChunkId, int] = {}  # distinct file contents holding the chunk
    contents: dict[tuple[ChunkId, ...], _Content] = {}
    logical = [0] * n
    files = [0] * n

    for i, name in enumerate(names):
        bit = 1 << i
        for entry in trees[name].entries:
            if entry.kind != "file":
                continue
            files[i] += 1
            logical[i] += entry.size
            key = tuple(c.id for c in entry.chunks)
            content = contents.get(key)
            if content is None:
                content = contents[key] = _Content(entry.size)
                for c in _first_by(entry.chunks, lambda c: c.id):
                    sizes[c.id] = c.size
                    placements[c.id] = placements.get(c.id, 0) + 1
            content.locations.append((name, entry.path))
            content.refs |= bit
            for c in entry.chunks:
                holders[c.id] = holders.get(c.id, 0) | bit

    unique = [0] * n
    exclusive = [0] * n
    attributed = [0.0] * n
    chunk_counts = [0] * n
    shared = [[0] * n for _ in range(n)]
    bins: dict[int, list[int]] = {}
    for cid, mask in holders.items():
        size = sizes[cid]
        members = [i for i in range(n) if mask >> i & 1]
        for i in members:
            unique[i] += size
            chunk_counts[i] += 1
            attributed[i] += size / len(members)
            for j in members:
                shared[i][j] += size
        if len(members) == 1:
            exclusive[members[0]] += size
        b = bins.setdefault(len(members), [0, 0])
        b[0] += 1
        b[1] += size

    refs = tuple(
        RefStats(
            ref=names[i],
            files=files[i],
            logical_bytes=logical[i],
            unique_bytes=unique[i],
            exclusive_bytes=exclusive[i],
            attributed_bytes=round(attributed[i]),
            chunks=chunk_counts[i],
        )
        for i in range(n)
    )
    return DedupReport(
        refs=refs,
        shared=tuple(tuple(row) for row in shared),
        logical_bytes=sum(logical),
        stored_bytes=sum(sizes.values()),
        chunks=len(sizes),
        top_files=_top_files(contents, sizes, holders, placements, names, top_files),
        histogram=tuple(HistogramBin(k, v[0], v[1]) for k, v in sorted(bins.items())),
    )


class _Content:
    __slots__ = ("locations", "refs", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.locations: list[tuple[str, str]] = []
        self.refs = 0


def _first_by(items: Iterable[T], key: Callable[[T], Hashable]) -> Iterator[T]:
    """``items`` without those whose key an earlier item had."""
    seen: set[Hashable] = set()
    for item in items:
        k = key(item)
        if k not in seen:
            seen.add(k)
            yield item


def _top_files(
    contents: Mapping[tuple[ChunkId, ...], _Content],
    sizes: Mapping[ChunkId, int],
    holders: Mapping[ChunkId, int],
    placements: Mapping[ChunkId, int],
    names: Sequence[str],
    limit: int,
) -> tuple[FileShare, ...]:
    rows: list[FileShare] = []
    for key, content in contents.items():
        copies = len(content.locations)
        shared_bytes = 0
        others = 0
        for cid in set(key):
            if copies > 1 or placements[cid] > 1:
                shared_bytes += sizes[cid]
            others |= holders[cid] & ~content.refs
        if shared_bytes == 0:
            continue
        rows.append(
            FileShare(
                size=content.size,
                shared_bytes=shared_bytes,
                locations=tuple(content.locations),
                shared_with=tuple(names[i] for i in range(len(names)) if others >> i & 1),
            )
        )
    # Rank by how many shared bytes the copies hold together.
    rows.sort(key=lambda f: (f.shared_bytes * len(f.locations), f.size), reverse=True)
    return tuple(rows[:limit])


# --------------------------------------------------------------------------- manifests


class _ManifestLoader(Protocol):
    async def load(self, manifest_id: ChunkId) -> Manifest: ...


async def as_tree(manifest: Manifest, catalog: _ManifestLoader) -> Tree:
    """View any manifest as a tree: a layer is one file named by its digest, an
    image one file per layer (its layer manifests are loaded through ``catalog``)."""
    if isinstance(manifest, Tree):
        return manifest
    if isinstance(manifest, Layer):
        return Tree(manifest.chunker, (_layer_entry(manifest),))
    if isinstance(manifest, Image):
        layers = []
        for layer_ref in manifest.layers:
            layer = await catalog.load(layer_ref.manifest)
            layers.append(expect_kind(layer, Layer, f"image layer {layer_ref.digest}"))
        chunker = layers[0].chunker if layers else _IMAGE_CHUNKER
        entries = _first_by((_layer_entry(lay) for lay in layers), lambda e: e.path)
        return Tree(chunker, tuple(entries))
    raise BadInput(f"cannot report on a {type(manifest).__name__}")


def _layer_entry(layer: Layer) -> Entry:
    name = "layers/" + layer.digest.replace(":", "-")
    return Entry(name, "file", 0o644, layer.size, None, layer.chunks)


class _Catalog(_ManifestLoader, Protocol):
    async def resolve(self, ref: str) -> ChunkId: ...
    async def list_refs(self, prefix: str) -> list[str]: ...


async def load_trees(
    catalog: _Catalog, refs: Sequence[str] = (), prefix: str | None = None
) -> dict[str, Tree]:
    """Resolve ``refs`` (plus every ref under ``prefix``) and load them as trees.

    Raises RefNotFound for an unknown ref, BadInput when nothing is selected,
    Unavailable when the store cannot be read."""
    names = list(dict.fromkeys(refs))
    if prefix is not None:
        names += [r for r in await catalog.list_refs(prefix) if r not in names]
    if not names:
        raise BadInput("no refs selected (give REF… or --prefix)")
    trees: dict[str, Tree] = {}
    for name in names:
        manifest = await catalog.load(await catalog.resolve(name))
        trees[name] = await as_tree(manifest, catalog)
    return trees


# --------------------------------------------------------------------------- text output


def render_table(report: DedupReport) -> str:
    """A plain-text report for terminals."""
    out: list[str] = []
    width = max([len(r.ref) for r in report.refs] + [3])
    head = f"{'ref':<{width}}  {'files':>7}  {'logical':>11}  {'unique':>11}  "
    out.append(head + f"{'exclusive':>11}  {'saved':>11}")
    for r in report.refs:
        out.append(
            f"{r.ref:<{width}}  {r.files:>7}  {human_bytes(r.logical_bytes):>11}  "
            f"{human_bytes(r.unique_bytes):>11}  {human_bytes(r.exclusive_bytes):>11}  "
            f"{human_bytes(r.saved_bytes):>11}"
        )
    out.append("")
    out.append(
        f"total: {human_bytes(report.logical_bytes)} logical, "
        f"{human_bytes(report.stored_bytes)} stored in {report.chunks} chunks, "
        f"{human_bytes(report.saved_bytes)} saved ({report.ratio:.2f}x)"
    )
    if len(report.refs) > 1:
        out += ["", "shared bytes between refs:"]
        for i, a in enumerate(report.refs):
            for j in range(i + 1, len(report.refs)):
                b = report.refs[j]
                if report.shared[i][j]:
                    out.append(f"  {a.ref} <-> {b.ref}: {human_bytes(report.shared[i][j])}")
    if report.top_files:
        out += ["", "files that share the most:"]
        for f in report.top_files:
            where = ", ".join(f"{r}:{p}" for r, p in f.locations[:3])
            if len(f.locations) > 3:
                where += f" (+{len(f.locations) - 3} more)"
            out.append(f"  {human_bytes(f.shared_bytes):>11} of {human_bytes(f.size)}  {where}")
    out += ["", "chunk refcount (refs holding a chunk):"]
    for hb in report.histogram:
        out.append(f"  {hb.refcount:>3}: {hb.chunks:>8} chunks  {human_bytes(hb.bytes):>11}")
    return "\n".join(out) + "\n"


__all__ = [
    "DedupReport",
    "FileShare",
    "HistogramBin",
    "RefStats",
    "as_tree",
    "compute",
    "load_trees",
    "render_table",
]
