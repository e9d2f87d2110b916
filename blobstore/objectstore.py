"""The object store: the global backing store (S3 or a local directory).

Both back-ends share one key layout:

    packs/<id[0:2]>/<id>        pack: the raw concatenation of chunks (packs.py)
    packs/<id[0:2]>/<id>.index  its index: (chunk id, offset, length) per chunk
    chunks/<id[0:2]>/<id>       one chunk (the v1 layout; still read)
    manifests/<id>              encoded manifests
    refs/<name>                 a manifest id (text), the only mutable keys

Pack and index share a prefix so one LIST of ``packs/`` shows both.

Every back-end checks keys with ``validate_key``: relative ``/`` paths whose
parts never start with ``.`` (names the file store keeps for its temp and lock
files), at most ``MAX_KEY_BYTES``.

``ObjectStore`` is a raw key/value interface; ``OriginSource`` (origin.py)
turns it into a verified ``ChunkSource``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Collection
from dataclasses import dataclass
from typing import Protocol

from .errors import BadInput
from .ids import ChunkId

CHUNKS = "chunks/"
PACKS = "packs/"
INDEX_SUFFIX = ".index"
MANIFESTS = "manifests/"
REFS = "refs/"
MAX_KEY_BYTES = 1024


def chunk_key(chunk_id: ChunkId) -> str:
    return f"{CHUNKS}{chunk_id[:2]}/{chunk_id}"


def pack_key(pack_id: ChunkId) -> str:
    return f"{PACKS}{pack_id[:2]}/{pack_id}"


def index_key(pack_id: ChunkId) -> str:
    return f"{PACKS}{pack_id[:2]}/{pack_id}{INDEX_SUFFIX}"


def manifest_key(manifest_id: ChunkId) -> str:
    return f"{MANIFESTS}{manifest_id}"


def ref_key(name: str) -> str:
    return f"{REFS}{name}"


def validate_key(key: str) -> str:
    """Check an object key and return it unchanged.

    Keys are relative ``/``-separated paths: not empty, no empty, ``.`` or ``..``
    segments, no segment starting with ``.`` (those names are reserved for the
    file store's temp and lock files), no backslash or NUL, at most 1 KiB.
    Raises BadInput.
    """
    if not isinstance(key, str) or not key:
        raise BadInput("object key must be a non-empty string")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise BadInput(f"object key too long: {key[:60]!r}…")
    if "\\" in key or "\x00" in key:
        raise BadInput(f"object key contains a backslash or NUL: {key!r}")
    if any(not part or part.startswith(".") for part in key.split("/")):
        raise BadInput(f"object key must be a relative path without ., .. or hidden parts: {key!r}")
    return key


def validate_prefix(prefix: str) -> str:
    """Check a listing prefix (empty, or a key prefix). Raises BadInput."""
    if prefix == "":
        return prefix
    # A prefix may stop mid-segment or after a "/"; validate it as if completed.
    validate_key(prefix + "x" if prefix.endswith("/") else prefix)
    return prefix


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float
    """Seconds since the epoch of the last write."""


class ObjectStore(Protocol):
    """Raw keyed blobs. Implementations translate their errors at the boundary.

    All methods raise StoreUnavailable when the store cannot be reached or
    fails, and DiskFull when a local back-end runs out of space.
    """

    url: str

    async def get(self, key: str) -> bytes:
        """Return the object's bytes. Raises ObjectMissing if absent."""
        ...

    async def put(self, key: str, data: bytes | bytearray) -> None:
        """Write the object atomically (readers see old or new, never half)."""
        ...

    async def put_if(self, key: str, data: bytes, expected: bytes | None) -> None:
        """Compare-and-swap: write only if the current value is ``expected``
        (``None``: only if the key is absent). Raises Conflict otherwise."""
        ...

    def get_range(self, key: str, offset: int, length: int) -> AsyncGenerator[bytes, None]:
        """Stream bytes ``offset .. offset+length`` of the object as blocks, in
        order (one ranged read; block sizes are the back-end's). Stops early,
        without error, where the object ends. Close it (``aclosing``) when
        leaving before the end. Raises ObjectMissing if the key is absent."""
        ...

    async def exists(self, key: str) -> bool: ...

    async def exists_many(self, keys: Collection[str]) -> set[str]:
        """The subset of ``keys`` that hold objects, checked in bulk/in parallel."""
        ...

    async def delete(self, key: str) -> None:
        """Delete the object; deleting a missing key is not an error."""
        ...

    def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """Yield every object whose key starts with ``prefix``."""
        ...

    async def aclose(self) -> None: ...
