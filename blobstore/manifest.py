"""Manifests: immutable, versioned, msgpack-encoded, content-addressed records.

Pure codec: ``encode`` returns canonical bytes, ``decode`` validates every
field and raises ``InvalidManifest`` (one line) on anything unexpected. The id
of a manifest is the BLAKE3 of its canonical encoding.

Versions (``decode`` reads both, ``encode`` writes v2):

- v1: a chunk is ``[id, size]`` and lives in its own object (``chunks/``); a
  file's ``digest`` is the BLAKE3 of its bytes.
- v2: a chunk is ``[id, size, pack, offset]``: where it lives (a pack object,
  see packs.py), so a pull needs no lookups. ``[id, size]`` is still allowed
  and means the per-chunk layout (an entry carried over from a v1 manifest,
  e.g. by sync, until ``blobstore migrate`` moves it). A file's ``digest`` is
  ``file_key(entry)``: BLAKE3 over its chunk list (ids and sizes), as Xet
  does: chunks are verified as they arrive, so checking the file costs no
  second pass over its bytes. The encoder derives it, the decoder checks it.

Kinds:
- ``Tree``:  a directory snapshot (files, dirs, symlinks).
- ``Layer``: an OCI/Docker layer blob (sha256 digest, media type, chunks).
- ``Image``: an image manifest + config (raw JSON bytes, so digests hold) and
  the layer manifests it uses.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import blake3
import msgpack

from .errors import InvalidManifest, UnsafePath
from .ids import ChunkId, id_from_bytes, id_to_bytes

VERSION = 2
"""The version ``encode`` writes."""
READ_VERSIONS = (1, 2)
MAX_MANIFEST_BYTES = 512 << 20
MAX_PATH_BYTES = 4096
MAX_CHUNK_BYTES = 64 << 20
MAX_PACK_BYTES = 1 << 32
"""No chunk may end beyond this offset of its pack (packs are tens of MiB)."""
_FILE_KEY_DOMAIN = b"blobstore file v2\x00"
_SHA256_RE = re.compile(r"sha256:[0-9a-f]{64}")

EntryKind = Literal["file", "dir", "symlink"]


@dataclass(frozen=True, slots=True)
class ChunkRef:
    id: ChunkId
    size: int
    pack: ChunkId | None = None
    """Pack object holding the chunk (manifest v2), or None: look it up (v1 manifests)."""
    offset: int = 0
    """Byte offset of the chunk inside ``pack``."""


@dataclass(frozen=True, slots=True)
class ChunkerInfo:
    """Which chunker cut the data, so it can change without breaking old data."""

    name: str
    min_size: int
    avg_size: int
    max_size: int


@dataclass(frozen=True, slots=True)
class Entry:
    path: str
    """Relative POSIX path, no ``.``/``..`` components."""
    kind: EntryKind
    mode: int
    """Permission bits (``0o7777`` mask)."""
    size: int = 0
    digest: ChunkId | None = None
    """Files only: ``file_key(entry)`` in v2 manifests, the BLAKE3 of the
    file's bytes in v1 ones (``file_key`` works for both)."""
    chunks: tuple[ChunkRef, ...] = ()
    target: str | None = None
    """Symlink target (symlinks only)."""


@dataclass(frozen=True, slots=True)
class Tree:
    chunker: ChunkerInfo
    entries: tuple[Entry, ...]
    kind: Literal["tree"] = field(default="tree", init=False)

    @property
    def size(self) -> int:
        return sum(e.size for e in self.entries)

    def chunk_refs(self) -> Iterator[ChunkRef]:
        for entry in self.entries:
            yield from entry.chunks


@dataclass(frozen=True, slots=True)
class Layer:
    digest: str
    """``sha256:<hex>`` of the blob bytes, as OCI names it."""
    media_type: str
    size: int
    chunker: ChunkerInfo
    chunks: tuple[ChunkRef, ...]
    kind: Literal["layer"] = field(default="layer", init=False)

    def chunk_refs(self) -> Iterator[ChunkRef]:
        yield from self.chunks


@dataclass(frozen=True, slots=True)
class ImageLayer:
    digest: str
    manifest: ChunkId
    """Id of the Layer manifest holding this blob."""


@dataclass(frozen=True, slots=True)
class Image:
    manifest_json: bytes
    """The image manifest exactly as imported (its sha256 is the image digest)."""
    manifest_media_type: str
    config_json: bytes
    layers: tuple[ImageLayer, ...]
    tags: tuple[str, ...] = ()
    layout: bytes = b""
    """Opaque record (owned by ``blobstore.image.layout``) of the archive the image
    came from, so export can rebuild it byte for byte; empty when there is none.
    Encoded only when non-empty, so older image manifests keep their ids."""
    kind: Literal["image"] = field(default="image", init=False)


Manifest = Tree | Layer | Image
M = TypeVar("M", Tree, Layer, Image)
_KIND_NAMES: dict[type[Manifest], str] = {Tree: "a tree", Layer: "a layer", Image: "an image"}


def expect_kind(manifest: Manifest, kind: type[M], what: str) -> M:
    """``manifest`` if it is a ``kind``; raises InvalidManifest otherwise, one
    wording for every caller: ``"<what> is a layer, not a tree"``."""
    if isinstance(manifest, kind):
        return manifest
    raise InvalidManifest(f"{what} is {_KIND_NAMES[type(manifest)]}, not {_KIND_NAMES[kind]}")


# --------------------------------------------------------------------------- paths


def check_relpath(path: str) -> str:
    """Validate a manifest path. Raises UnsafePath for anything that could escape."""
    if not isinstance(path, str) or not path:
        raise UnsafePath("empty path in manifest")
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise UnsafePath(f"path too long in manifest: {path[:80]!r}…")
    if "\x00" in path:
        raise UnsafePath(f"NUL byte in manifest path {path!r}")
    if path.startswith("/"):
        raise UnsafePath(f"absolute path in manifest: {path!r}")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise UnsafePath(f"unsafe path in manifest: {path!r}")
    return path


# --------------------------------------------------------------------------- encode


def _chunker_obj(c: ChunkerInfo) -> dict[str, Any]:
    return {"name": c.name, "min": c.min_size, "avg": c.avg_size, "max": c.max_size}


def _chunk_obj(c: ChunkRef) -> list[Any]:
    if c.pack is None:
        return [id_to_bytes(c.id), c.size]
    return [id_to_bytes(c.id), c.size, id_to_bytes(c.pack), c.offset]


def _chunks_obj(chunks: tuple[ChunkRef, ...]) -> list[list[Any]]:
    return [_chunk_obj(c) for c in chunks]


def _entry_obj(e: Entry) -> dict[str, Any]:
    obj: dict[str, Any] = {"p": e.path, "t": e.kind, "m": e.mode}
    if e.kind == "file":
        obj["s"] = e.size
        obj["h"] = id_to_bytes(file_key(e))
        obj["c"] = _chunks_obj(e.chunks)
    elif e.kind == "symlink":
        obj["l"] = e.target
    return obj


def encode(manifest: Manifest) -> bytes:
    """Canonical v2 msgpack encoding (sorted keys, bin type for ids). A file's
    digest is written as ``file_key(entry)``, whatever ``entry.digest`` holds."""
    body: dict[str, Any] = {"v": VERSION, "kind": manifest.kind}
    if isinstance(manifest, Tree):
        body["chunker"] = _chunker_obj(manifest.chunker)
        body["entries"] = [_entry_obj(e) for e in sorted(manifest.entries, key=lambda e: e.path)]
    elif isinstance(manifest, Layer):
        body.update(
            digest=manifest.digest,
            media_type=manifest.media_type,
            size=manifest.size,
            chunker=_chunker_obj(manifest.chunker),
            chunks=_chunks_obj(manifest.chunks),
        )
    else:
        body.update(
            manifest=manifest.manifest_json,
            media_type=manifest.manifest_media_type,
            config=manifest.config_json,
            layers=[[lay.digest, id_to_bytes(lay.manifest)] for lay in manifest.layers],
            tags=list(manifest.tags),
        )
        if manifest.layout:
            body["layout"] = manifest.layout
    packed: bytes = msgpack.packb(_sorted(body), use_bin_type=True)
    return packed


def _sorted(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _sorted(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list):
        return [_sorted(v) for v in obj]
    return obj


def chunks_key(chunks: Iterable[ChunkRef]) -> ChunkId:
    """BLAKE3 over a chunk list (ids and sizes; locations do not count)."""
    h = blake3.blake3(_FILE_KEY_DOMAIN)
    for c in chunks:
        h.update(id_to_bytes(c.id))
        h.update(c.size.to_bytes(8, "little"))
    return ChunkId(h.hexdigest())


def file_key(entry: Entry) -> ChunkId:
    """The v2 file digest of ``entry``, computed from its chunk list, for a
    manifest of any version: two files have the same key iff they have the
    same chunks, i.e. the same bytes cut the same way."""
    return chunks_key(entry.chunks)


# --------------------------------------------------------------------------- decode


class _Reader:
    """Typed field access with one-line errors naming the field."""

    __slots__ = ("obj", "where")

    def __init__(self, obj: Any, where: str) -> None:
        if not isinstance(obj, dict):
            raise InvalidManifest(f"{where}: expected a map")
        self.obj = obj
        self.where = where

    def _get(self, key: str, types: type | tuple[type, ...], optional: bool = False) -> Any:
        if key not in self.obj:
            if optional:
                return None
            raise InvalidManifest(f"{self.where}: missing field {key!r}")
        val = self.obj[key]
        if optional and val is None:
            return None
        if not isinstance(val, types) or isinstance(val, bool):
            raise InvalidManifest(f"{self.where}: field {key!r} has the wrong type")
        return val

    def text(self, key: str, optional: bool = False) -> Any:
        return self._get(key, str, optional)

    def blob(self, key: str) -> bytes:
        val: bytes = self._get(key, bytes)
        return val

    def integer(self, key: str, lo: int = 0, hi: int = 1 << 62) -> int:
        val: int = self._get(key, int)
        if not lo <= val <= hi:
            raise InvalidManifest(f"{self.where}: field {key!r} out of range")
        return val

    def array(self, key: str) -> list[Any]:
        val: list[Any] = self._get(key, list)
        return val


def _id(raw: Any, where: str) -> ChunkId:
    if not isinstance(raw, bytes) or len(raw) != 32:
        raise InvalidManifest(f"{where}: bad id")
    return id_from_bytes(raw)


def _chunker(obj: Any) -> ChunkerInfo:
    r = _Reader(obj, "chunker")
    return ChunkerInfo(
        name=r.text("name"),
        min_size=r.integer("min", 1, MAX_CHUNK_BYTES),
        avg_size=r.integer("avg", 1, MAX_CHUNK_BYTES),
        max_size=r.integer("max", 1, MAX_CHUNK_BYTES),
    )


def _chunks(items: list[Any], where: str, version: int) -> tuple[ChunkRef, ...]:
    out = []
    shapes = (2, 4) if version >= 2 else (2,)
    for item in items:
        if not isinstance(item, list) or len(item) not in shapes:
            raise InvalidManifest(f"{where}: bad chunk entry")
        size = item[1]
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_CHUNK_BYTES:
            raise InvalidManifest(f"{where}: bad chunk size")
        if len(item) == 2:
            out.append(ChunkRef(_id(item[0], where), size))
            continue
        offset = item[3]
        if (
            not isinstance(offset, int)
            or isinstance(offset, bool)
            or not 0 <= offset <= MAX_PACK_BYTES - size
        ):
            raise InvalidManifest(f"{where}: bad chunk offset")
        out.append(ChunkRef(_id(item[0], where), size, _id(item[2], f"{where} pack"), offset))
    return tuple(out)


def _entry(obj: Any, version: int) -> Entry:
    r = _Reader(obj, "entry")
    path = check_relpath(r.text("p"))
    where = f"entry {path!r}"
    r.where = where
    kind = r.text("t")
    mode = r.integer("m", 0, 0o7777)
    if kind == "file":
        size = r.integer("s")
        raw_digest = r.obj.get("h")
        digest = _id(raw_digest, where) if raw_digest is not None else None
        chunks = _chunks(r.array("c"), where, version)
        if sum(c.size for c in chunks) != size:
            raise InvalidManifest(f"{where}: chunk sizes do not add up to the file size")
        if version >= 2 and digest != chunks_key(chunks):
            raise InvalidManifest(f"{where}: digest does not match the chunk list")
        return Entry(path, "file", mode, size, digest, chunks)
    if kind == "dir":
        return Entry(path, "dir", mode)
    if kind == "symlink":
        target = r.text("l")
        if not target or "\x00" in target or len(target) > MAX_PATH_BYTES:
            raise InvalidManifest(f"{where}: bad symlink target")
        return Entry(path, "symlink", mode, target=target)
    raise InvalidManifest(f"{where}: unknown entry type {kind!r}")


def _check_tree_paths(entries: tuple[Entry, ...]) -> None:
    """Refuse duplicate paths and paths that pass through a symlink or a file."""
    kinds: dict[str, EntryKind] = {}
    for e in entries:
        if e.path in kinds:
            raise InvalidManifest(f"duplicate path in manifest: {e.path!r}")
        kinds[e.path] = e.kind
    for e in entries:
        parts = e.path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            kind = kinds.get(parent)
            if kind == "symlink":
                raise UnsafePath(f"manifest path {e.path!r} goes through symlink {parent!r}")
            if kind == "file":
                raise InvalidManifest(f"manifest path {e.path!r} is below file {parent!r}")


def _sha256_digest(text: Any, where: str) -> str:
    if not isinstance(text, str) or not _SHA256_RE.fullmatch(text):
        raise InvalidManifest(f"{where}: bad sha256 digest")
    return text


def decode(data: bytes) -> Manifest:
    """Decode and validate a manifest. Raises InvalidManifest / UnsafePath."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise InvalidManifest("manifest too large")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise InvalidManifest(f"manifest is not valid msgpack ({type(exc).__name__})") from exc
    r = _Reader(obj, "manifest")
    version = r._get("v", int)
    if version not in READ_VERSIONS:
        raise InvalidManifest(
            f"unsupported manifest version {version} (this build reads "
            f"{', '.join(map(str, READ_VERSIONS))})"
        )
    kind = r.text("kind")
    if kind == "tree":
        entries = tuple(_entry(e, version) for e in r.array("entries"))
        _check_tree_paths(entries)
        return Tree(_chunker(r.obj.get("chunker")), entries)
    if kind == "layer":
        chunks = _chunks(r.array("chunks"), "layer", version)
        size = r.integer("size")
        if sum(c.size for c in chunks) != size:
            raise InvalidManifest("layer: chunk sizes do not add up to the blob size")
        return Layer(
            digest=_sha256_digest(r.text("digest"), "layer"),
            media_type=r.text("media_type"),
            size=size,
            chunker=_chunker(r.obj.get("chunker")),
            chunks=chunks,
        )
    if kind == "image":
        layers = []
        for item in r.array("layers"):
            if not isinstance(item, list) or len(item) != 2:
                raise InvalidManifest("image: bad layer entry")
            layers.append(ImageLayer(_sha256_digest(item[0], "image"), _id(item[1], "image")))
        tags = r.array("tags")
        if not all(isinstance(t, str) for t in tags):
            raise InvalidManifest("image: bad tag")
        layout = r.blob("layout") if "layout" in r.obj else b""
        return Image(
            manifest_json=r.blob("manifest"),
            manifest_media_type=r.text("media_type"),
            config_json=r.blob("config"),
            layers=tuple(layers),
            tags=tuple(tags),
            layout=layout,
        )
    raise InvalidManifest(f"unknown manifest kind {kind!r}")
