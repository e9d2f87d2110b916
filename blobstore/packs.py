"""Packs: many chunks in one object, so the object store sees few, big requests.

A push writes its *new* chunks, in file order, into packs of about
``PackConfig.target_bytes``: a pack is the raw concatenation of its chunks
(``packs/<id[0:2]>/<id>``). Manifests (v2) name every chunk's pack and offset,
so a pull needs no index; indexes are for push dedup and gc, read in bulk.

Indexes come in two layouts, both read:

- a **group index** (written since; one per push): the packs a writer seals
  between two ``flush`` calls (at most ``PackConfig.index_every`` of them) form
  a *group*. Their ids share a random 56-hex-digit group id and differ in the
  last 8 digits (the pack's number in the group), and one object
  ``packs/<g[0:2]>/<g>.index`` lists ``(chunk id, pack number, offset,
  length)`` for all of them. So a push costs one index PUT, not one per pack,
  and the LIST alone still says which index covers a pack (its id's prefix).
- a **pack index** (``<pack id>.index``, one per pack, written by earlier
  versions): ``(chunk id, offset, length)`` of one pack.

Pack ids are random, not a hash of the content: two writers never produce the
same pack key, so a pack is written exactly once and never overwritten (nor
deleted by a gc that listed an older pack of the same name). An index carries
its pack (group) id and a BLAKE3 of itself, so a damaged index is detected;
chunk bytes are verified against their ids whenever they are read.

Write order (the crash rule): the packs of a group, then its index, then
(after ``PackWriter.flush``) the manifests naming them, then the ref. A crash
leaves at worst packs without an index or packs nobody names; gc sweeps both.
A group is closed every ``index_every`` packs too, so a crash in a long push
loses the dedup of at most that many packs (the retry uploads them again).

Memory: one pack being filled plus ``uploads`` packs in flight, i.e. about
``(uploads + 1) x target_bytes``.

Dedup without a HEAD per chunk: ``StoreIndex.load`` LISTs ``packs/`` once (one
request per ~1,000 keys), fetches only the indexes not already in the local
``IndexCache`` (under the cache dir; kept per pack whatever the layout, so a
group index is read once and split), drops cached indexes of packs that are
gone, and maps chunk id -> a location in a pack that exists. Chunks that
``verify`` found bad at a location are listed in the cache's ``bad`` file and
never reused from there (they are uploaded again into a new pack).
"""

from __future__ import annotations

import logging
import os
import secrets
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import blake3

from .atomic import is_tmp_name, write_atomic
from .catalog import Catalog
from .chunker import Span
from .errors import (
    BadInput,
    Conflict,
    Corrupt,
    NotFound,
    ObjectMissing,
    single_errors,
)
from .ids import ChunkId, hash_bytes, id_from_bytes, id_to_bytes, is_id
from .manifest import (
    MAX_CHUNK_BYTES,
    MAX_PACK_BYTES,
    ChunkRef,
    Image,
    ImageLayer,
    Layer,
    Manifest,
)
from .objectstore import INDEX_SUFFIX, PACKS, ObjectInfo, ObjectStore, index_key, pack_key
from .parallel import for_each

log = logging.getLogger(__name__)

DEFAULT_PACK_BYTES = 48 << 20
"""Chosen by measurement: pushing 1 GiB (random) to SeaweedFS on this 2-core box,
medians of 3, requests counted at the wire:

    pack   uploads  push    requests  peak RSS
    16 MiB    3     12.9 s    144     205 MiB
    32 MiB    3     14.4 s     76     289 MiB
    48 MiB    3      8.8 s     54     323 MiB
    48 MiB    2      6.7 s     54     277 MiB
    64 MiB    3      7.4 s     44     386 MiB
    64 MiB    2      7.7 s     44     320 MiB

Times are noisy (a shared machine; 48-64 MiB ran 6-9 s in every round); 16 and
32 MiB break the budget of 64 requests per GiB pushed (a pack and its index
each cost a PUT), 48 and 64 MiB meet it, and 48 MiB x 2 uploads holds least.
(Measured with an index per pack; with one group index per push the 48 MiB
push of 1 GiB is 30 requests, not 54, and 32 MiB would now fit too.)"""


@dataclass(frozen=True, slots=True)
class PackConfig:
    target_bytes: int = DEFAULT_PACK_BYTES
    """A pack is sealed when the next chunk would take it past this size."""
    uploads: int = 2
    """Sealed packs uploading at once (memory: (uploads + 1) x target_bytes)."""
    index_fetches: int = 16
    """Index GETs at once when the local index cache is cold."""
    index_every: int = 32
    """Packs per group index at most (a long push writes one every ~1.5 GiB, so
    a crash loses the dedup of at most that much; see the module docstring)."""

    def __post_init__(self) -> None:
        if not 1 << 20 <= self.target_bytes <= MAX_PACK_BYTES // 2:
            raise BadInput("pack size must be between 1 MiB and 2 GiB")
        if self.uploads < 1 or self.index_fetches < 1:
            raise BadInput("pack upload and index fetch concurrency must be at least 1")
        if not 1 <= self.index_every <= _MAX_GROUP_PACKS:
            raise BadInput(f"packs per index must be between 1 and {_MAX_GROUP_PACKS}")


def new_pack_id() -> ChunkId:
    """A pack id outside any group (the pack-index layout)."""
    return ChunkId(secrets.token_hex(32))


GROUP_HEX = 56
"""Hex digits of a group id: the first 56 of each of its packs' ids."""
_MAX_GROUP_PACKS = 1 << 16


def new_group_id() -> str:
    return secrets.token_hex(GROUP_HEX // 2)


def group_pack_id(group: str, number: int) -> ChunkId:
    """The id of pack ``number`` of ``group``."""
    return ChunkId(f"{group}{number:08x}")


def is_group_id(name: str) -> bool:
    return len(name) == GROUP_HEX and all(c in "0123456789abcdef" for c in name)


def group_of(pack_id: ChunkId) -> str:
    """The group a pack would belong to (whether or not a group index covers it)."""
    return pack_id[:GROUP_HEX]


def group_index_key(group: str) -> str:
    return f"{PACKS}{group[:2]}/{group}{INDEX_SUFFIX}"


# --------------------------------------------------------------------------- index codec

_MAGIC = b"BSPACKIX"
_FORMAT = 1
_HEADER = struct.Struct("<8sB32sI")  # magic, format, pack id, count
_ENTRY = struct.Struct("<32sQI")  # chunk id, offset, length
_SUM = 32


def encode_index(pack_id: ChunkId, refs: Sequence[ChunkRef]) -> bytes:
    """The index object of a pack holding ``refs`` (in pack order)."""
    parts = [_HEADER.pack(_MAGIC, _FORMAT, id_to_bytes(pack_id), len(refs))]
    parts += [_ENTRY.pack(id_to_bytes(r.id), r.offset, r.size) for r in refs]
    body = b"".join(parts)
    return body + blake3.blake3(body).digest()


def _checked_body(
    where: str, data: bytes, header: struct.Struct, expected: int
) -> tuple[bytes, tuple[Any, ...]]:
    """An index's body (checksum stripped) and its header fields after magic and
    format, once the length, checksum, magic and format hold. Raises Corrupt."""
    if len(data) < header.size + _SUM:
        raise Corrupt(f"{where} is truncated")
    body, checksum = data[:-_SUM], data[-_SUM:]
    if blake3.blake3(body).digest() != checksum:
        raise Corrupt(f"{where} is corrupt (checksum mismatch)")
    magic, fmt, *fields = header.unpack_from(body)
    if magic != _MAGIC or fmt != expected:
        raise Corrupt(f"{where} has an unknown format")
    return body, tuple(fields)


def decode_index(pack_id: ChunkId, data: bytes) -> tuple[ChunkRef, ...]:
    """Decode and check an index: checksum, pack id, chunks laid end to end
    from offset 0. Raises Corrupt (one line)."""
    where = f"pack index {pack_id[:16]}…"
    body, (raw_pack, count) = _checked_body(where, data, _HEADER, _FORMAT)
    if raw_pack != id_to_bytes(pack_id):
        raise Corrupt(f"{where} belongs to another pack")
    if len(body) != _HEADER.size + count * _ENTRY.size:
        raise Corrupt(f"{where} has the wrong length for {count} chunks")
    refs = []
    expected = 0
    for raw_id, offset, length in _ENTRY.iter_unpack(body[_HEADER.size :]):
        if offset != expected or not 0 < length <= MAX_CHUNK_BYTES:
            raise Corrupt(f"{where} has a bad chunk extent")
        expected += length
        refs.append(ChunkRef(id_from_bytes(raw_id), length, pack_id, offset))
    if expected > MAX_PACK_BYTES:
        raise Corrupt(f"{where} describes a pack that is too large")
    return tuple(refs)


_GROUP_FORMAT = 2
_GROUP_HEADER = struct.Struct("<8sB28sI")  # magic, format, group id, count
_GROUP_ENTRY = struct.Struct("<32sIQI")  # chunk id, pack number, offset, length


def encode_group_index(group: str, refs: Sequence[ChunkRef]) -> bytes:
    """The index object of ``group``: ``refs`` of its packs, each pack's chunks
    in pack order (packs in any order; they are sorted by number)."""
    numbered: list[tuple[int, ChunkRef]] = []
    for ref in refs:
        if ref.pack is None or group_of(ref.pack) != group:
            raise ValueError("every chunk of a group index must be in a pack of the group")
        numbered.append((int(ref.pack[GROUP_HEX:], 16), ref))
    numbered.sort(key=lambda nr: (nr[0], nr[1].offset))
    parts = [_GROUP_HEADER.pack(_MAGIC, _GROUP_FORMAT, bytes.fromhex(group), len(numbered))]
    parts += [_GROUP_ENTRY.pack(id_to_bytes(r.id), n, r.offset, r.size) for n, r in numbered]
    body = b"".join(parts)
    return body + blake3.blake3(body).digest()


def decode_group_index(group: str, data: bytes) -> dict[ChunkId, tuple[ChunkRef, ...]]:
    """Decode and check a group index: checksum, group id, each pack's chunks
    laid end to end from offset 0. Returns pack id -> its chunks in pack order.
    Raises Corrupt (one line)."""
    where = f"group index {group[:16]}…"
    body, (raw_group, count) = _checked_body(where, data, _GROUP_HEADER, _GROUP_FORMAT)
    if raw_group.hex() != group:
        raise Corrupt(f"{where} belongs to another group")
    if len(body) != _GROUP_HEADER.size + count * _GROUP_ENTRY.size:
        raise Corrupt(f"{where} has the wrong length for {count} chunks")
    packs: dict[ChunkId, list[ChunkRef]] = {}
    last = -1
    expected = 0
    for raw_id, number, offset, length in _GROUP_ENTRY.iter_unpack(body[_GROUP_HEADER.size :]):
        if number != last:
            if number < last:
                raise Corrupt(f"{where} lists its packs out of order")
            last, expected = number, 0
        if offset != expected or not 0 < length <= MAX_CHUNK_BYTES:
            raise Corrupt(f"{where} has a bad chunk extent")
        expected += length
        if expected > MAX_PACK_BYTES:
            raise Corrupt(f"{where} describes a pack that is too large")
        pack_id = group_pack_id(group, number)
        packs.setdefault(pack_id, []).append(
            ChunkRef(id_from_bytes(raw_id), length, pack_id, offset)
        )
    return {pack_id: tuple(refs) for pack_id, refs in packs.items()}


# --------------------------------------------------------------------------- writer


class _Group:
    """The packs a writer seals between two group indexes."""

    __slots__ = ("closed", "done", "id", "pending", "sealed")

    def __init__(self) -> None:
        self.id = new_group_id()
        self.sealed = 0
        self.pending = 0
        """Sealed packs still uploading."""
        self.closed = False
        """No more packs: the last upload (or ``flush``) writes the index."""
        self.done: list[tuple[ChunkId, tuple[ChunkRef, ...]]] = []

    def next_pack_id(self) -> ChunkId:
        return group_pack_id(self.id, self.sealed)


Sealed = Callable[[ChunkId, tuple[ChunkRef, ...], bytes], Awaitable[None]]
"""Called per pack once the pack and its group's index are stored: (pack id,
its chunks, the pack's own index in the pack-index layout, for caches)."""


class PackWriter:
    """Appends chunks to packs, uploads each sealed pack, and once a group of
    packs is stored (at ``flush``, or every ``index_every`` packs) its index.

    ``async with PackWriter.open(...)``: uploads run in the writer's task group; an
    upload failure cancels the block and is raised from it. Chunks are placed
    in the order ``add_*`` calls are made (one call's chunks stay together).
    Nothing is stored until a pack is sealed: call ``flush`` before writing a
    manifest that names its chunks.

    Chunk bytes are read straight into the pack's buffer (no buffer per chunk)
    and buffers are reused from pack to pack: ~1 MiB allocations churning through
    the allocator had kept ~150 MiB of freed memory resident per GiB pushed.
    """

    def __init__(
        self,
        store: ObjectStore,
        uploads: anyio.abc.TaskGroup,
        config: PackConfig = PackConfig(),
        on_sealed: Sealed | None = None,
    ) -> None:
        """Use ``PackWriter.open``: it owns the task group ``uploads`` run in."""
        self.store = store
        self.config = config
        self._on_sealed = on_sealed
        self._lock = anyio.Lock()
        self._slots = anyio.Semaphore(config.uploads)
        self._tg: anyio.abc.TaskGroup | None = uploads
        self._free: list[bytearray] = []
        self._group = _Group()
        self._pack = self._group.next_pack_id()
        self._buf = bytearray()
        self._used = 0
        self._refs: list[ChunkRef] = []
        self.packs = 0
        self.bytes = 0
        self.indexes = 0
        """Index objects written (one per group)."""

    @classmethod
    @asynccontextmanager
    async def open(
        cls, store: ObjectStore, config: PackConfig = PackConfig(), on_sealed: Sealed | None = None
    ) -> AsyncIterator[PackWriter]:
        """A writer for the block. Leaving it normally seals the last pack and waits
        for every upload; an error (the block's or an upload's) cancels the uploads
        and is raised (StoreUnavailable…)."""
        writer: PackWriter | None = None
        try:
            with single_errors():
                async with anyio.create_task_group() as uploads:
                    writer = cls(store, uploads, config, on_sealed)
                    yield writer
                    await writer.flush()
        finally:
            if writer is not None:
                writer._tg = None  # a late add raises instead of starting an orphan upload

    async def add_bytes(self, data: bytes | memoryview, spans: Sequence[Span]) -> list[ChunkRef]:
        """Place ``spans`` of ``data`` (their ids already computed from these bytes)."""
        view = memoryview(data)
        out: list[ChunkRef] = []
        async with self._lock:
            for span in spans:
                await self._make_room(span.length)
                with view[span.offset : span.offset + span.length] as chunk:
                    self._buf[self._used : self._used + span.length] = chunk
                out.append(self._placed(span))
        return out

    async def add_file(self, src: str | int, base: int, spans: Sequence[Span]) -> list[ChunkRef]:
        """Place ``spans`` read from ``src`` (a path or an open fd) at ``base +
        span.offset``, each verified against its id as it is read.
        Raises BadInput if the file changed, OSError."""
        out: list[ChunkRef] = []
        async with self._lock:
            i = 0
            while i < len(spans):
                await self._make_room(spans[i].length)
                room = memoryview(self._buf)[self._used :]
                try:
                    n = await anyio.to_thread.run_sync(_read_spans, src, base, spans[i:], room)
                finally:
                    room.release()  # or the buffer could not be resized when sealed
                for span in spans[i : i + n]:
                    out.append(self._placed(span))
                i += n
        return out

    async def flush(self) -> None:
        """Seal the pack being filled and wait until every sealed pack and the
        index of its group are stored. Raises what an upload raised
        (StoreUnavailable…)."""
        async with self._lock:
            await self._seal()
            group = self._group
            if group.sealed:
                self._close_group()
                if group.pending == 0:  # else its last upload writes the index
                    await self._write_index(group)
            for _ in range(self.config.uploads):
                await self._slots.acquire()
            for _ in range(self.config.uploads):
                self._slots.release()

    # -- helpers -------------------------------------------------------------

    def _placed(self, span: Span) -> ChunkRef:
        """Record a chunk whose bytes were just written at ``_used``."""
        ref = ChunkRef(span.id, span.length, self._pack, self._used)
        self._used += span.length
        self._refs.append(ref)
        return ref

    async def _make_room(self, length: int) -> None:
        """Make the buffer hold ``length`` more bytes, sealing the pack if full."""
        if self._used and self._used + length > self.config.target_bytes:
            await self._seal()
        if not self._buf:
            self._buf = self._free.pop() if self._free else bytearray()
        want = max(self.config.target_bytes, self._used + length)
        if len(self._buf) < want:  # a fresh or shrunk buffer (grows in place: mremap)
            try:
                self._buf.extend(bytes(want - len(self._buf)))
            except BufferError:  # the HTTP client still holds a view of it: let it go
                self._buf = bytearray(want)

    async def _seal(self) -> None:
        if not self._refs:
            return
        if self._tg is None:
            raise RuntimeError("PackWriter used outside 'async with PackWriter.open()'")
        pack, buf, refs, group = self._pack, self._buf, tuple(self._refs), self._group
        del buf[self._used :]  # the pack is exactly its chunks
        group.sealed += 1
        group.pending += 1
        if group.sealed >= self.config.index_every:
            self._close_group()
        self._pack, self._buf, self._used, self._refs = (
            self._group.next_pack_id(),
            bytearray(),
            0,
            [],
        )
        await self._slots.acquire()  # back-pressure: at most `uploads` packs in memory
        self._tg.start_soon(self._upload, group, pack, buf, refs)

    def _close_group(self) -> None:
        """Seal no more packs into the current group; the next pack starts a new one."""
        self._group.closed = True
        self._group = _Group()
        self._pack = self._group.next_pack_id()

    async def _upload(
        self, group: _Group, pack: ChunkId, buf: bytearray, refs: tuple[ChunkRef, ...]
    ) -> None:
        try:
            await self.store.put(pack_key(pack), buf)
            self.packs += 1
            self.bytes += len(buf)
            group.done.append((pack, refs))
            group.pending -= 1
            if group.closed and group.pending == 0:
                await self._write_index(group)
            if len(self._free) <= self.config.uploads:
                self._free.append(buf)
        finally:
            self._slots.release()

    async def _write_index(self, group: _Group) -> None:
        """Store the index of ``group`` (all its packs are stored), then tell ``on_sealed``."""
        done = sorted(group.done)
        index = encode_group_index(group.id, [r for _, refs in done for r in refs])
        await self.store.put(group_index_key(group.id), index)
        self.indexes += 1
        if self._on_sealed is not None:
            for pack, refs in done:
                await self._on_sealed(pack, refs, encode_index(pack, refs))


def _read_spans(src: str | int, base: int, spans: Sequence[Span], room: memoryview) -> int:
    """Read the leading spans that fit in ``room`` (at least one) into it, one
    after another, each verified against its id. Returns how many."""
    fd = src if isinstance(src, int) else os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    pos = n = 0
    try:
        for span in spans:
            if pos + span.length > len(room):
                break
            with room[pos : pos + span.length] as view:
                got = os.preadv(fd, [view], base + span.offset)
                if got != span.length or hash_bytes(view) != span.id:
                    raise BadInput(f"{src} changed while it was being pushed")
            pos += span.length
            n += 1
    finally:
        if not isinstance(src, int):
            os.close(fd)
    return n


# --------------------------------------------------------------------------- what the store holds


RETIRED_SUFFIX = ".retired"


def retired_key(pack_id: ChunkId) -> str:
    """A marker gc writes once it has moved a pack's live chunks elsewhere (gc.py)."""
    return pack_key(pack_id) + RETIRED_SUFFIX


@dataclass(frozen=True, slots=True)
class PackListing:
    """One LIST of ``packs/``: every pack, index and retired marker."""

    packs: dict[ChunkId, ObjectInfo]
    indexes: dict[ChunkId, ObjectInfo]
    """Pack indexes (one per pack: the earlier layout), by pack id."""
    retired: dict[ChunkId, ObjectInfo]
    groups: dict[str, ObjectInfo] = field(default_factory=dict)
    """Group indexes, by group id (see the module docstring)."""

    def indexed(self, pack_id: ChunkId) -> bool:
        """Whether an index that may cover ``pack_id`` exists (a group index
        covers a pack only if it lists it: StoreIndex.load checks)."""
        return pack_id in self.indexes or group_of(pack_id) in self.groups

    @property
    def usable(self) -> set[ChunkId]:
        """Packs a writer may reuse: present, indexed, not retired."""
        return {p for p in self.packs if self.indexed(p) and p not in self.retired}


async def list_packs(store: ObjectStore) -> PackListing:
    """LIST ``packs/`` (one request per ~1,000 keys). Raises StoreUnavailable."""
    found: dict[str, dict[ChunkId, ObjectInfo]] = {"": {}, INDEX_SUFFIX: {}, RETIRED_SUFFIX: {}}
    groups: dict[str, ObjectInfo] = {}
    async for info in store.list(PACKS):
        name = info.key.rsplit("/", 1)[-1]
        stem, dot, suffix = name.partition(".")
        if is_id(stem) and dot + suffix in found:
            found[dot + suffix][ChunkId(stem)] = info
        elif is_group_id(stem) and dot + suffix == INDEX_SUFFIX:
            groups[stem] = info
    return PackListing(found[""], found[INDEX_SUFFIX], found[RETIRED_SUFFIX], groups)


BadLocation = tuple[ChunkId, ChunkId | None]
"""(chunk id, pack id or None for the per-chunk layout) that verify found bad."""


class IndexCache:
    """Local copies of pack indexes of one store, and its known-bad list:
    ``<dir>/<pack id>`` and ``<dir>/bad``. Every method does file I/O: call
    them in a worker thread. A damaged or unreadable copy is just a miss."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def for_store(cls, cache_dir: Path, store_url: str) -> IndexCache:
        name = hash_bytes(store_url.encode())[:24]
        return cls(Path(cache_dir) / ".pack-indexes" / name)

    def read(self, pack_id: ChunkId) -> tuple[ChunkRef, ...] | None:
        try:
            return decode_index(pack_id, (self.root / pack_id).read_bytes())
        except (OSError, Corrupt):
            return None

    def write(self, pack_id: ChunkId, index: bytes) -> None:
        try:
            write_atomic(self.root / pack_id, index, parents=True)
        except OSError as exc:  # only a cache: the next push fetches it again
            log.info("cannot cache pack index %s: %s", pack_id, exc.strerror)

    def write_many(self, copies: Iterable[tuple[ChunkId, bytes]]) -> None:
        """``write`` each (pack id, pack index) pair."""
        for pack_id, index in copies:
            self.write(pack_id, index)

    def prune(self, keep: Iterable[ChunkId]) -> None:
        """Drop copies of packs that no longer exist (and stray temp files)."""
        wanted = set(keep)
        try:
            names = os.listdir(self.root)
        except OSError:
            return
        for name in names:
            if (
                (is_id(name) and name not in wanted)
                or is_tmp_name(name)
                or name.startswith(".tmp-")
            ):
                (self.root / name).unlink(missing_ok=True)

    def read_bad(self) -> set[BadLocation]:
        try:
            text = (self.root / "bad").read_text()
        except OSError:
            return set()
        bad: set[BadLocation] = set()
        for line in text.splitlines():
            chunk, _, pack = line.partition(" ")
            if is_id(chunk) and (is_id(pack) or pack == "-"):
                bad.add((ChunkId(chunk), ChunkId(pack) if pack != "-" else None))
        return bad

    def add_bad(self, locations: Iterable[BadLocation]) -> None:
        """Remember locations verify found bad. Raises OSError (this must stick)."""
        self._write_bad(self.read_bad() | set(locations))

    def forget_bad(self, packs: Iterable[ChunkId]) -> set[BadLocation]:
        """Keep only bad locations in per-chunk objects or in ``packs`` (those that
        still exist: a gone pack can never be offered again). Returns what is kept."""
        existing = set(packs)
        bad = self.read_bad()
        kept = {b for b in bad if b[1] is None or b[1] in existing}
        if kept != bad:
            try:
                self._write_bad(kept)
            except OSError as exc:
                log.info("cannot rewrite the known-bad list: %s", exc.strerror)
        return kept

    def _write_bad(self, bad: set[BadLocation]) -> None:
        text = "".join(f"{c} {p or '-'}\n" for c, p in sorted(bad, key=str))
        write_atomic(self.root / "bad", text, parents=True)


class StoreIndex:
    """chunk id -> where the store holds it, for push dedup. ``load`` builds it."""

    def __init__(self, packs: set[ChunkId], bad: set[BadLocation]) -> None:
        self.packs = packs
        """Packs that exist with their index (as listed when loaded, plus ours)."""
        self.bad = bad
        self._where: dict[ChunkId, ChunkRef] = {}
        self.index_fetches = 0

    @classmethod
    async def load(
        cls, store: ObjectStore, cache: IndexCache | None, config: PackConfig = PackConfig()
    ) -> StoreIndex:
        """LIST the packs, read the indexes not cached locally (a group index
        once for all its packs). A pack without an index (a crashed push), one
        its group's index does not list, a retired one (gc moved its chunks)
        and one with an unreadable index (logged) are never offered.
        Raises StoreUnavailable."""
        listing = await list_packs(store)
        live = sorted(listing.usable)
        bad: set[BadLocation] = set()
        if cache is not None:
            bad = await anyio.to_thread.run_sync(cache.forget_bad, listing.packs)
        index = cls(set(live), bad)
        cached: dict[ChunkId, tuple[ChunkRef, ...] | None] = {}
        if cache is not None:
            cached = await anyio.to_thread.run_sync(lambda: {p: cache.read(p) for p in live})
            await anyio.to_thread.run_sync(cache.prune, live)
        missing = [p for p in live if cached.get(p) is None]
        by_group: dict[str, list[ChunkId]] = {}
        for pack_id in missing:
            if pack_id not in listing.indexes:
                by_group.setdefault(group_of(pack_id), []).append(pack_id)

        async def fetch(pack_id: ChunkId) -> None:
            try:
                data = await store.get(index_key(pack_id))
                refs = decode_index(pack_id, data)
            except (ObjectMissing, Corrupt) as exc:
                log.warning("ignoring pack %s: %s", pack_id, exc)
                index.packs.discard(pack_id)
                return
            index.index_fetches += 1
            cached[pack_id] = refs
            if cache is not None:
                await anyio.to_thread.run_sync(cache.write, pack_id, data)

        async def fetch_group(group: str) -> None:
            wanted = by_group[group]
            try:
                found = decode_group_index(group, await store.get(group_index_key(group)))
            except (ObjectMissing, Corrupt) as exc:
                log.warning("ignoring %d packs of group %s: %s", len(wanted), group, exc)
                index.packs.difference_update(wanted)
                return
            index.index_fetches += 1
            for pack_id in wanted:  # a listed pack its index lacks is not ours to reuse
                cached[pack_id] = found.get(pack_id)
                if pack_id not in found:
                    index.packs.discard(pack_id)
            if cache is not None:
                copies = [(p, encode_index(p, found[p])) for p in wanted if p in found]
                await anyio.to_thread.run_sync(cache.write_many, copies)

        await for_each([p for p in missing if p in listing.indexes], fetch, config.index_fetches)
        await for_each(sorted(by_group), fetch_group, config.index_fetches)
        for pack_id in live:
            refs = cached.get(pack_id)
            if refs is not None:
                index.add(refs)
        return index

    def add(self, refs: Iterable[ChunkRef]) -> None:
        """Learn locations (a pack just written, or a previous manifest's chunks
        in packs known to exist). Bad locations and unknown packs are skipped."""
        for ref in refs:
            if (
                ref.pack is not None
                and ref.pack in self.packs
                and ref.id not in self._where
                and (ref.id, ref.pack) not in self.bad
            ):
                self._where[ref.id] = ref

    def distrust(self, locations: Iterable[BadLocation]) -> None:
        """Never offer these locations again (verify found them bad)."""
        for chunk_id, pack_id in locations:
            self.bad.add((chunk_id, pack_id))
            where = self._where.get(chunk_id)
            if where is not None and where.pack == pack_id:
                del self._where[chunk_id]

    def add_pack(self, pack_id: ChunkId, refs: Iterable[ChunkRef]) -> None:
        self.packs.add(pack_id)
        self.add(refs)

    def locate(self, chunk_id: ChunkId) -> ChunkRef | None:
        return self._where.get(chunk_id)

    def __len__(self) -> int:
        return len(self._where)


async def relocate_refs(
    catalog: Catalog, where: Callable[[ChunkRef], ChunkRef | None]
) -> tuple[int, int]:
    """Point every ref at a manifest whose chunks are where ``where`` says (None:
    where it is now): new manifests are written (an image's too, naming its new
    layer manifests), then each ref is moved with compare-and-swap, so a ref that
    moved meanwhile is left as it is. Call with every new copy already stored.
    Returns (refs moved, refs that moved meanwhile). Raises Unavailable."""
    memo: dict[ChunkId, ChunkId] = {}

    def moved(chunks: tuple[ChunkRef, ...]) -> tuple[ChunkRef, ...]:
        return tuple(where(c) or c for c in chunks)

    async def rewrite(manifest_id: ChunkId) -> ChunkId:
        if manifest_id in memo:
            return memo[manifest_id]
        manifest = await catalog.load(manifest_id)
        new: Manifest
        if isinstance(manifest, Image):
            layers = [
                ImageLayer(lay.digest, await rewrite(lay.manifest)) for lay in manifest.layers
            ]
            new = replace(manifest, layers=tuple(layers))
        elif isinstance(manifest, Layer):
            new = replace(manifest, chunks=moved(manifest.chunks))
        else:
            new = replace(
                manifest,
                entries=tuple(replace(e, chunks=moved(e.chunks)) for e in manifest.entries),
            )
        memo[manifest_id] = await catalog.save(new) if new != manifest else manifest_id
        return memo[manifest_id]

    relocated = conflicts = 0
    for name in await catalog.list_refs():
        try:
            old_id = await catalog.resolve(name)
            new_id = await rewrite(old_id)
        except (NotFound, BadInput) as exc:  # a bad ref (InvalidManifest is BadInput)
            log.warning("leaving ref %s as it is: %s", name, exc)
            continue
        if new_id == old_id:
            continue
        try:
            await catalog.swap_ref(name, old_id, new_id)
            relocated += 1
        except Conflict:
            conflicts += 1
    return relocated, conflicts


__all__ = [
    "DEFAULT_PACK_BYTES",
    "IndexCache",
    "PackConfig",
    "PackListing",
    "PackWriter",
    "StoreIndex",
    "decode_group_index",
    "decode_index",
    "encode_group_index",
    "encode_index",
    "group_index_key",
    "list_packs",
    "relocate_refs",
    "retired_key",
]
