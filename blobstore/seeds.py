"""Seeds: files outside the node store that it reads from but never owns.

Where the node store and a pull's destination cannot share extents (ext4,
tmpfs, two filesystems), keeping a node-owned copy of every pulled file costs
a second write of every byte. In ``auto`` link mode a pull then assembles each
file straight in the destination and the node store *adopts* it as a seed
(desync's idea): it records the file's path, its identity (dev, ino, size,
mtime_ns, ctime_ns) and its chunk list, and from then on

- serves the file's chunks to peers and to later pulls, each read through an
  fd opened with ``O_NOFOLLOW`` whose ``fstat`` must match the identity, and
  each chunk verified against its id (a changed seed is forgotten, never
  served);
- places the file into another destination by copy, checking the seed's
  identity before and after the copy (a write meanwhile moves its ctime);
- never deletes it, never evicts it, never counts it in ``used_bytes``: it is
  the user's file. Deleting or changing it only makes the store forget it.

What a user gives up: the node keeps no copy of its own of a seeded file, so
deleting the destination deletes the node's copy too, and the next pull of that
content fetches it again (from peers or the object store). ``--link-mode copy``
keeps an independent node-owned copy (two writes per byte) for those who want
one.

Crash safety: a seed is recorded with the boot it was adopted in. Its bytes
were not fsynced, so after a reboot (a power loss) a seed not known durable is
dropped: its data may be torn while its stat survived. Within one boot the page
cache is the truth and a renamed file is whole. The next pull into that
destination checks such files chunk by chunk (the pull marker's rule) and adopts
the intact ones again, durable this time (their bytes came back from the disk).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .errors import SeedChanged
from .ids import ID_BYTES, ChunkId, id_from_bytes, id_to_bytes, parse_id

TABLE = "seeds2"
SCHEMA = f"""CREATE TABLE IF NOT EXISTS {TABLE} (
    key BLOB PRIMARY KEY, path TEXT NOT NULL, dev INTEGER NOT NULL, ino INTEGER NOT NULL,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
    boot NOT NULL, durable INTEGER NOT NULL, chunks BLOB NOT NULL)"""
"""Rows are compact: a cold pull of the stdlib tree adopts ~5,600 seeds and the
index is written twice (WAL, then checkpoint). Keys are 32 raw bytes (in the
table and again in its key index), a boot id that is a UUID is its 16 bytes, a
one-chunk file's chunk list is that chunk's id: ~230 bytes a row where the
first layout (table ``seeds``: hex text; still read, see ``from_old_row``) took
~330."""
COLUMNS = "key, path, dev, ino, size, mtime_ns, ctime_ns, boot, durable, chunks"
OLD_TABLE = "seeds"

SeedRow = tuple[bytes, str, int, int, int, int, int, bytes | str, int, bytes]


@dataclass(frozen=True, slots=True)
class Seed:
    """A destination file the node store may read ``key``'s chunks from."""

    key: ChunkId
    path: str
    """Absolute path of the file."""
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    boot: str
    durable: bool
    chunks: tuple[tuple[ChunkId, int, int], ...]
    """(chunk id, offset, size) of every chunk, in file order."""

    @classmethod
    def of(
        cls,
        key: ChunkId,
        path: str,
        st: os.stat_result,
        chunks: tuple[tuple[ChunkId, int, int], ...],
        boot: str,
        durable: bool,
    ) -> Seed:
        return cls(
            key,
            path,
            st.st_dev,
            st.st_ino,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
            boot,
            durable,
            chunks,
        )

    def matches(self, st: os.stat_result) -> bool:
        """Whether ``st`` is still the adopted file, unchanged."""
        return stat.S_ISREG(st.st_mode) and (
            st.st_dev,
            st.st_ino,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
        ) == (self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns)

    def row(self) -> SeedRow:
        if len(self.chunks) == 1:
            blob = id_to_bytes(self.chunks[0][0])  # its size is the file's
        else:
            blob = encode_chunk_rows(self.chunks)
        return (
            key_param(self.key),
            self.path,
            self.dev,
            self.ino,
            self.size,
            self.mtime_ns,
            self.ctime_ns,
            _boot_param(self.boot),
            int(self.durable),
            blob,
        )

    @classmethod
    def from_row(cls, row: SeedRow) -> Seed:
        """A seed from a ``TABLE`` row. Raises BadInput, ValueError."""
        key, path, dev, ino, size, mtime_ns, ctime_ns, boot, durable, blob = row
        if not isinstance(key, bytes):
            raise ValueError("seed key is not bytes")
        if len(blob) == ID_BYTES:
            chunks: tuple[tuple[ChunkId, int, int], ...] = ((id_from_bytes(blob), 0, size),)
        else:
            chunks = decode_chunk_rows(blob)
        return cls(
            id_from_bytes(key),
            path,
            dev,
            ino,
            size,
            mtime_ns,
            ctime_ns,
            _uuid_text(boot) if isinstance(boot, bytes) else boot,
            bool(durable),
            chunks,
        )

    @classmethod
    def from_old_row(cls, row: tuple[Any, ...]) -> Seed:
        """A seed from a row of ``OLD_TABLE`` (hex key, text boot, 40 bytes per
        chunk). Raises BadInput, ValueError."""
        key, path, dev, ino, size, mtime_ns, ctime_ns, boot, durable, blob = row
        return cls(
            parse_id(key),
            path,
            dev,
            ino,
            size,
            mtime_ns,
            ctime_ns,
            boot,
            bool(durable),
            decode_chunk_rows(blob),
        )


_HEX = re.compile(r"[0-9a-f]+")


def key_param(key: ChunkId) -> bytes:
    """How ``TABLE`` stores a seed's key (its primary key)."""
    return id_to_bytes(key)


def _boot_param(boot: str) -> bytes | str:
    """A boot id that is a UUID (the kernel's) as its 16 bytes; anything else
    (unknown: "", or a test's) as text. ``from_row`` tells them by type."""
    digits = boot.replace("-", "")
    if len(digits) != 32 or not _HEX.fullmatch(digits):
        return boot
    raw = bytes.fromhex(digits)
    return raw if _uuid_text(raw) == boot else boot


def _uuid_text(raw: bytes) -> str:
    """16 bytes in the kernel's boot id form, 8-4-4-4-12 lowercase hex (the
    uuid module would load platform, ~1.7 ms of every command's start-up)."""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def encode_chunk_rows(chunks: Iterable[tuple[ChunkId, int, int]]) -> bytes:
    """A file's (id, offset, size) chunk list as stored in the node store's index:
    32-byte id + 8-byte big-endian size per chunk (offsets follow from the sizes)."""
    return b"".join(id_to_bytes(c) + s.to_bytes(8, "big") for c, _, s in chunks)


def decode_chunk_rows(blob: bytes) -> tuple[tuple[ChunkId, int, int], ...]:
    """The inverse of ``encode_chunk_rows``."""
    chunks = []
    offset = 0
    for i in range(0, len(blob), 40):
        chunk_size = int.from_bytes(blob[i + 32 : i + 40], "big")
        chunks.append((id_from_bytes(blob[i : i + 32]), offset, chunk_size))
        offset += chunk_size
    return tuple(chunks)


def open_checked(seed: Seed) -> int:
    """An fd on the seed, opened without following a final symlink and checked
    by ``fstat`` identity. Raises SeedChanged."""
    try:
        fd = os.open(seed.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise SeedChanged(seed.path) from exc
    try:
        if not seed.matches(os.fstat(fd)):
            raise SeedChanged(seed.path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_chunk(seed: Seed, offset: int, size: int) -> bytes:
    """The ``size`` bytes at ``offset`` of the seed (unverified: the caller
    hashes them), the seed's identity checked before and after the read.
    Raises SeedChanged."""
    fd = open_checked(seed)
    try:
        parts = []
        done = 0
        while done < size:
            part = os.pread(fd, size - done, offset + done)
            if not part:
                break
            parts.append(part)
            done += len(part)
        if not seed.matches(os.fstat(fd)):
            raise SeedChanged(seed.path)
    finally:
        os.close(fd)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def still_there(seed: Seed) -> bool:
    """One ``lstat``: the seed's path still names the adopted file, unchanged."""
    try:
        return seed.matches(os.lstat(seed.path))
    except OSError:
        return False
