"""The pull marker: what the last pull into a destination left there, by stat.

One marker per destination, beside the node store (``state_dir``), keyed by
the destination's device and inode. It records, per file, ``[size, mtime_ns,
ino, ctime_ns, file key, nlink, durable]`` as stat'ed right after the file was
placed or checked, and the boot id it was written in: a record that is not
durable vouches for its file only within that boot (materialize.py's
durability policy). Zlib-compressed JSON; a plain JSON marker, as earlier
versions wrote, still reads.

Kept light (no event loop, no sqlite): a re-pull that finds everything in
place (repull.py) reads it before anything else is imported.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import zlib
from pathlib import Path
from typing import Any

from .atomic import write_atomic
from .ids import ChunkId

log = logging.getLogger("blobstore.materialize")

MARKER_VERSION = 2
_MARKER_LEVEL = 1
"""zlib level of pull markers (level 1: 3.3x smaller, faster than 2-3 here)."""

Record = list[Any]
"""[size, mtime_ns, ino, ctime_ns, file key, nlink, durable] of a file the
marker vouches for (durable: 1 if its bytes are known to be on disk)."""


@functools.cache
def boot() -> tuple[str, int]:
    """(this boot's id, when it began in ns since the epoch); ("", 0) if unknown,
    which makes no record trusted across what might have been a reboot. Read
    once per process."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return boot_id, int(line.split()[1]) * 1_000_000_000
    except (OSError, ValueError):
        pass
    return "", 0


def state_dir_of(cache_dir: Path) -> Path:
    """Where pull markers live: beside the node store, not in destinations."""
    return Path(cache_dir).parent / "pulls"


def record(st: os.stat_result, key: ChunkId, durable: int = 0) -> Record:
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, key, st.st_nlink, durable]


def vouched(old: Record | None, st: os.stat_result, key: ChunkId) -> bool:
    """Whether the marker's record still vouches for the file ``st`` describes.
    A hardlinked (read-only) file's ctime also moves when another pull links
    or unlinks the node's copy: accepted when only the link count changed,
    as the node store does."""
    if old is None:
        return False
    new = record(st, key)
    if old[:6] == new[:6]:
        return True
    return old[:3] == new[:3] and old[4] == key and old[5] != new[5] and st.st_mode & 0o222 == 0


def marker_path(state_dir: Path, dest: os.stat_result) -> Path:
    """The marker of the destination directory ``dest`` (its stat)."""
    return state_dir / f"{dest.st_dev:x}-{dest.st_ino:x}.json"


def read_marker(path: Path) -> Any:
    """A marker's document. Raises OSError, ValueError."""
    raw = path.read_bytes()
    if not raw.startswith(b"{"):
        try:
            raw = zlib.decompress(raw)
        except zlib.error as exc:
            raise ValueError(f"not a pull marker: {exc}") from exc
    return json.loads(raw)


def load_marker(path: Path, boot: str) -> dict[str, Record]:
    """The records that still vouch: all of them in the boot that wrote the
    marker, only the durable ones after a reboot."""
    try:
        doc = read_marker(path)
        if doc.get("version") != MARKER_VERSION or not isinstance(doc["files"], dict):
            return {}
        same_boot = bool(boot) and doc.get("boot") == boot
        return {
            p: r
            for p, r in doc["files"].items()
            if isinstance(r, list) and len(r) == 7 and (same_boot or r[6] == 1)
        }
    except (OSError, ValueError, KeyError, AttributeError):
        return {}


def write_marker(path: Path, dest: str, boot: str, records: dict[str, Record]) -> None:
    """Atomically replace the marker. Not fsynced: losing it only costs the
    next pull a check of each file. Compressed: the stdlib tree's marker is
    1.35 MB of JSON, 0.41 MB at zlib level 1 (~9 ms; ~11 ms to read back) —
    a cold pull of that tree wrote 5% of its own size in markers and index rows."""
    doc = {"version": MARKER_VERSION, "dest": dest, "boot": boot, "files": records}
    try:
        data = zlib.compress(json.dumps(doc, separators=(",", ":")).encode(), _MARKER_LEVEL)
        write_atomic(path, data, parents=True)
    except OSError as exc:  # the pull itself succeeded: warn, do not fail it
        log.warning("cannot record the pull of %s in %s: %s", dest, path, exc.strerror)
