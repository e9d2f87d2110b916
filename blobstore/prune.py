"""``pull --delete``: remove what a destination holds beyond the tree pulled into it.

The walk goes through directory file descriptors opened with ``O_NOFOLLOW``
and removes names relative to them (``unlinkat``/``unlinkat(AT_REMOVEDIR)``),
so a symlink in the destination is removed as a link, never followed: a
symlink planted where a directory was cannot redirect the deletions outside
the destination. With include/exclude patterns only what they select is
removed (like rsync's filters protect excluded files): a pull of ``*.json``
with ``--delete`` does not remove the weights it did not pull. It holds the
destination's pull lock, so another pull's files in flight are never removed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInput, Unavailable
from .manifest import Tree
from .patterns import Selection

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LOCK_POLL = 0.05


@dataclass(slots=True)
class Pruned:
    removed: list[str] = field(default_factory=list)
    """Paths removed, relative to the destination (directories after their contents)."""


def prune(dest: Path, tree: Tree, selection: Selection | None = None) -> Pruned:
    """Remove every file and symlink below ``dest`` that ``tree`` does not name
    and ``selection`` (default: everything) selects, then each directory the tree
    does not name once empty (if the selection chose it or emptied it).
    Blocking: run it in a worker thread. Raises BadInput (``dest`` is not a
    directory), Unavailable (a removal failed)."""
    wanted = {e.path for e in tree.entries}
    selection = selection or Selection()
    done = Pruned()
    try:
        # dest itself may be a symlink: the caller named it (as linking.DestDir)
        root = os.open(dest, _DIR_FLAGS & ~os.O_NOFOLLOW)
    except OSError as exc:
        raise BadInput(f"cannot open {dest}: {exc.strerror}") from exc
    try:
        _lock(root)
        _prune_dir(root, "", wanted, selection, done)
    finally:
        os.close(root)  # drops the lock
    return done


def _lock(fd: int) -> None:
    """Wait for a pull writing into the destination (materialize takes the same
    ``flock``): its temp files are not in our tree, and must not be removed."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(_LOCK_POLL)
        except OSError:  # a filesystem without flock: as materialize, go on unlocked
            return


def _prune_dir(fd: int, rel: str, wanted: set[str], selection: Selection, done: Pruned) -> bool:
    """Prune the directory open as ``fd``; True when it is left empty."""
    empty = True
    with os.scandir(fd) as entries:
        names = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
    for name, is_dir in sorted(names):
        path = f"{rel}/{name}" if rel else name
        if is_dir:
            before = len(done.removed)
            sub_empty = _prune_subdir(fd, name, path, wanted, selection, done)
            emptied = len(done.removed) > before
            if (
                path not in wanted
                and sub_empty
                and (emptied or selection.chosen(path, is_dir=True))
            ):
                _remove(fd, name, path, directory=True)
                done.removed.append(path)
                continue
        elif path not in wanted and selection.chosen(path):
            _remove(fd, name, path, directory=False)
            done.removed.append(path)
            continue
        empty = False
    return empty


def _prune_subdir(
    parent: int, name: str, path: str, wanted: set[str], selection: Selection, done: Pruned
) -> bool:
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
            return False  # replaced meanwhile: leave it to the next pull
        raise Unavailable(f"cannot open {path}: {exc.strerror}") from exc
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            return False
        return _prune_dir(fd, path, wanted, selection, done)
    finally:
        os.close(fd)


def _remove(fd: int, name: str, path: str, *, directory: bool) -> None:
    try:
        if directory:
            os.rmdir(name, dir_fd=fd)
        else:
            os.unlink(name, dir_fd=fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise Unavailable(f"cannot remove {path}: {exc.strerror}") from exc
