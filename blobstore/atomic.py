"""Replacing a file so readers see the old content or the new, never a half.

Every writer goes the same way: the new content is written to a temp name in
the final name's directory (so the rename stays on one filesystem), and only a
complete temp file is renamed over the final name. Any failure, cancellation
included, removes the temp file.

- ``tmp_name(name)`` / ``is_tmp_name(name)``: the one temp-name scheme,
  ``.<name cut to 100 bytes>.blobstore-tmp-<12 hex>``. It is cut by bytes on a
  UTF-8 boundary, so it stays within NAME_MAX (255 bytes) whatever the final
  name; it starts with a dot (never an object-store key) and carries
  ``TMP_MARK``, so scans and cleanups recognise every writer's leftovers.
- ``write_atomic(path, data)``: bytes or text to ``path``.
  ``write_atomic_at(dir_fd, name, data)``: the same inside a directory held
  open (no path string is resolved again).
  ``write_atomic_async(path, data)``: ``write_atomic`` in a worker thread.
- ``replacing(path)`` / ``areplacing(path)``: for content written by other
  code (a tar stream, a whole directory): yields the new, empty temp path;
  renames it over ``path`` when the block ends normally, removes it otherwise.

Options: ``fsync=True`` makes the result durable (the file is fsynced before
the rename, the directory after it); without it a power loss may leave the old
content or an empty file, never a torn one that looks whole. ``mode`` is the
new file's mode before the umask (``0o666`` as for any ordinary file; the
kernel applies the umask, so nobody has to read it). ``parents=True`` creates
missing parent directories.

Everything here raises OSError; callers translate it with
``errors.os_error`` into the error their caller expects.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path

# anyio is imported by the async helpers when they run: the CLI's re-pull
# (repull.py) uses the sync ones without starting an event loop.

Data = bytes | bytearray | memoryview | str
"""What the ``write_atomic`` functions take; text is written as UTF-8."""

TMP_MARK = ".blobstore-tmp-"
NAME_MAX = 255
_PREFIX_BYTES = 100
_FILE_MODE = 0o666
_DIR_MODE = 0o777
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def tmp_name(name: str) -> str:
    """A unique hidden temp name to stand beside ``name`` (at most 136 bytes)."""
    # The prefix is only a hint for humans: dropping a cut (or undecodable)
    # character is fine, a name over NAME_MAX is not.
    prefix = os.fsencode(name)[:_PREFIX_BYTES].decode("utf-8", "ignore")
    return f".{prefix}{TMP_MARK}{os.urandom(6).hex()}"  # (uuid4().hex[:12] loaded platform)


def is_tmp_name(name: str) -> bool:
    """Whether ``name`` was made by ``tmp_name`` (a writer's temp file)."""
    return TMP_MARK in name


def write_atomic(
    path: Path,
    data: Data,
    *,
    fsync: bool = False,
    mode: int = _FILE_MODE,
    parents: bool = False,
) -> None:
    """Replace ``path`` by a file holding ``data``. Raises OSError."""
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, _DIR_FLAGS)
    try:
        write_atomic_at(fd, path.name, data, fsync=fsync, mode=mode)
    finally:
        os.close(fd)


def write_atomic_at(
    dir_fd: int, name: str, data: Data, *, fsync: bool = False, mode: int = _FILE_MODE
) -> None:
    """Replace ``name`` in the directory open as ``dir_fd`` by a file holding
    ``data``. Raises OSError."""
    tmp = tmp_name(name)
    fd = os.open(tmp, _CREATE, mode, dir_fd=dir_fd)
    try:
        try:
            _write_all(fd, data.encode() if isinstance(data, str) else data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    if fsync:
        os.fsync(dir_fd)


async def write_atomic_async(
    path: Path,
    data: Data,
    *,
    fsync: bool = False,
    mode: int = _FILE_MODE,
    parents: bool = False,
) -> None:
    """``write_atomic`` in a worker thread (it runs to its end even if the
    caller is cancelled meanwhile: no half-done state). Raises OSError."""
    import anyio.to_thread

    write = partial(write_atomic, path, data, fsync=fsync, mode=mode, parents=parents)
    await anyio.to_thread.run_sync(write)


@contextmanager
def replacing(
    path: Path,
    *,
    directory: bool = False,
    fsync: bool = False,
    mode: int | None = None,
    parents: bool = False,
) -> Iterator[Path]:
    """Yield a new empty temp file (or directory) beside ``path``; rename it
    over ``path`` when the block ends normally, remove it otherwise.

    A directory replaces only a missing or empty directory (rename(2) rules).
    ``fsync`` syncs a file's data (a directory's content is the writer's job)
    and then the parent directory. Raises OSError."""
    tmp = _create(path, directory, mode, parents)
    try:
        yield tmp
        _commit(tmp, path, fsync=fsync)
    except BaseException:
        _discard(tmp)
        raise


@asynccontextmanager
async def areplacing(
    path: Path,
    *,
    directory: bool = False,
    fsync: bool = False,
    mode: int | None = None,
    parents: bool = False,
) -> AsyncIterator[Path]:
    """``replacing`` for async code: creating, renaming and removing run in a
    worker thread; the removal runs even when the block is cancelled.
    Raises OSError."""
    import anyio.to_thread

    tmp = await anyio.to_thread.run_sync(partial(_create, path, directory, mode, parents))
    try:
        yield tmp
        await anyio.to_thread.run_sync(partial(_commit, tmp, path, fsync=fsync))
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_discard, tmp)
        raise


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def _create(path: Path, directory: bool, mode: int | None, parents: bool) -> Path:
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(tmp_name(path.name))
    if directory:
        os.mkdir(tmp, _DIR_MODE if mode is None else mode)
    else:
        os.close(os.open(tmp, _CREATE, _FILE_MODE if mode is None else mode))
    return tmp


def _commit(tmp: Path, path: Path, *, fsync: bool) -> None:
    if fsync and not tmp.is_dir():
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, path)
    if fsync:
        fd = os.open(path.parent, _DIR_FLAGS)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _discard(tmp: Path) -> None:
    """Remove a temp file or directory; never raises (a failed write's own
    error is the one to report)."""
    try:
        st = tmp.lstat()
    except OSError:
        return
    if stat.S_ISDIR(st.st_mode):
        import shutil  # here: bz2 and lzma come with it

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            tmp.unlink()


__all__ = [
    "NAME_MAX",
    "TMP_MARK",
    "Data",
    "areplacing",
    "is_tmp_name",
    "replacing",
    "tmp_name",
    "write_atomic",
    "write_atomic_async",
    "write_atomic_at",
]
