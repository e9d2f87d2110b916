"""A re-pull that finds its destination up to date, answered without the event loop.

``blobstore pull REF DIR`` into a DIR the last pull left complete is a stat per
file (materialize.py: the pull marker vouches for each file). Through the CLI
that check took ~1 ms of a ~95 ms command: the rest was importing and opening
what a pull *might* need (the event loop, the node store's sqlite, the tiers).
:func:`pull_in_place` does only the check, synchronously, from a ``file://``
store: it reads the ref and the manifest (verified against its id), then, under
the destination's lock, makes the same checks as ``materialize`` for the case
where nothing needs doing — every file vouched for by the marker (same size,
mtime, inode, ctime, content key; a record from another boot only if durable),
its mode right, every symlink and directory as the manifest says, the marker
needing no update. Anything else, and any error, returns None and the caller
runs the real pull, which redoes (and reports) it all: this path never writes
a file, never trusts more than the marker does, and its answer is the one
the full pull would give. An S3 store always takes the full path (its ref
must be read over the network, where the start-up is not the cost).
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BlobstoreError
from .ids import ChunkId, hash_bytes, parse_id
from .linking import DestDir, LinkMode, file_mode, keepable, special_bits_dropped, split
from .manifest import Tree, decode, file_key
from .marker import Record, boot, load_marker, marker_path, record, vouched
from .objectstore import manifest_key, ref_key, validate_key

_FULL_ID = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class PullResult:
    ref: str
    manifest: ChunkId
    files: int
    bytes: int
    kept_files: int
    seconds: float
    from_tier: dict[str, int]
    """Bytes per tier: local, peer, origin."""
    deleted: int = 0
    """Paths ``pull --delete`` removed from the destination."""

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "manifest": self.manifest,
            "files": self.files,
            "bytes": self.bytes,
            "kept_files": self.kept_files,
            "seconds": round(self.seconds, 3),
            "from": {tier: self.from_tier.get(tier, 0) for tier in ("local", "peer", "origin")},
            "deleted": self.deleted,
        }


def pull_in_place(
    store_root: Path,
    state_dir: Path,
    ref: str,
    dest: Path,
    *,
    link_mode: LinkMode = "auto",
    keep_special_modes: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> PullResult | None:
    """The result of pulling ``ref`` from the file store at ``store_root`` into
    ``dest`` if ``dest`` is already up to date (nothing written), else None:
    run the real pull. Never raises for what the real pull would report."""
    started = time.monotonic()
    try:
        st = os.stat(dest)
        if not stat.S_ISDIR(st.st_mode) or not marker_path(state_dir, st).exists():
            return None  # (before reading the manifest: a pull into a new DIR)
        found = _tree(store_root, ref)
        if found is None:
            return None
        manifest_id, tree = found
        if include or exclude:
            from .patterns import select

            tree = select(tree, include, exclude)
            if not tree.entries:  # nothing selected: the real pull says why
                return None
        root = DestDir.open(Path(dest))
        try:
            if not _up_to_date(tree, root, state_dir, link_mode, keep_special_modes):
                return None
        finally:
            root.close()  # (drops the lock)
    except (BlobstoreError, OSError, ValueError):
        return None
    files = [e for e in tree.entries if e.kind == "file"]
    return PullResult(
        ref,
        manifest_id,
        len(files),
        sum(e.size for e in files),
        len(files),
        time.monotonic() - started,
        {},
    )


def _tree(store_root: Path, ref: str) -> tuple[ChunkId, Tree] | None:
    """The tree ``ref`` names (a ref, else a full manifest id), read and verified
    as Catalog does; None for anything else (a prefix, an image). Raises OSError,
    BlobstoreError."""
    try:
        raw = (store_root / validate_key(ref_key(ref))).read_bytes()
        manifest_id = parse_id(raw.decode("ascii").strip())
    except FileNotFoundError:
        if not _FULL_ID.fullmatch(ref):
            return None
        manifest_id = ChunkId(ref)
    data = (store_root / manifest_key(manifest_id)).read_bytes()
    if hash_bytes(data) != manifest_id:
        return None
    tree = decode(data)
    return (manifest_id, tree) if isinstance(tree, Tree) else None


def _up_to_date(
    tree: Tree, root: DestDir, state_dir: Path, link_mode: LinkMode, keep_special: bool
) -> bool:
    """materialize's checks, for the case where they all pass (see the module
    docstring), under the destination's lock (not waited for: a pull into it
    is running, so the real pull will wait)."""
    try:
        fcntl.flock(root.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        pass  # a filesystem without flock: materialize goes on unlocked too
    boot_id = boot()[0]
    old = load_marker(marker_path(state_dir, os.fstat(root.fd)), boot_id)
    if not old:
        return False
    files = [e for e in tree.entries if e.kind == "file"]
    dirs = [e for e in tree.entries if e.kind == "dir"]
    # As materialize: temp files a killed pull left are removed (we hold the lock).
    for rel in sorted({""} | {e.path for e in dirs} | {split(e.path)[0] for e in files}):
        root.remove_tmp_leftovers(root.dir_fd(rel))
    records: dict[str, Record] = {}
    for entry in files:
        parent, name = split(entry.path)
        try:
            st = os.stat(name, dir_fd=root.dir_fd(parent), follow_symlinks=False)
        except FileNotFoundError:
            return False
        key = file_key(entry)
        was = old.get(entry.path)
        if was is None or not keepable(st, entry.size, link_mode) or not vouched(was, st, key):
            return False
        if stat.S_IMODE(st.st_mode) != file_mode(
            special_bits_dropped(entry.mode, keep_special), st
        ):
            return False
        records[entry.path] = record(st, key, was[6])
    for entry in tree.entries:
        if entry.kind == "symlink":
            parent, name = split(entry.path)
            try:
                if os.readlink(name, dir_fd=root.dir_fd(parent)) != entry.target:
                    return False
            except OSError:
                return False
    for entry in dirs:
        mode = special_bits_dropped(entry.mode, keep_special)
        if stat.S_IMODE(os.fstat(root.dir_fd(entry.path)).st_mode) != mode:
            return False
    named = {e.path for e in tree.entries}
    unnamed = {p: r for p, r in old.items() if p not in named}
    return {**unnamed, **records} == old  # else the real pull rewrites the marker
