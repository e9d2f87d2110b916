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
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import SeedChanged
from .ids import ChunkId, id_from_bytes, id_to_bytes

SCHEMA = """CREATE TABLE IF NOT EXISTS seeds (
    key TEXT PRIMARY KEY, path TEXT NOT NULL, dev INTEGER NOT NULL, ino INTEGER NOT NULL,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
    boot TEXT NOT NULL, durable INTEGER NOT NULL, chunks BLOB NOT NULL)"""
COLUMNS = "key, path, dev, ino, size, mtime_ns, ctime_ns, boot, durable, chunks"

SeedRow = tuple[str, str, int, int, int, int, int, str, int, bytes]


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
        blob = encode_chunk_rows(self.chunks)
        return (
            self.key,
            self.path,
            self.dev,
            self.ino,
            self.size,
            self.mtime_ns,
            self.ctime_ns,
            self.boot,
            int(self.durable),
            blob,
        )

    @classmethod
    def from_row(cls, row: SeedRow) -> Seed:
        key, path, dev, ino, size, mtime_ns, ctime_ns, boot, durable, blob = row
        return cls(
            ChunkId(key),
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
