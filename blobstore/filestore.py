"""``FileObjectStore``: the object store in a local directory (``file:///dir``).

Layout: key ``a/b/c`` is the file ``<root>/a/b/c``. Writes are atomic
(``atomic.write_atomic``): a temp file ``.c.blobstore-tmp-<random>`` in the
key's directory is written, fsynced and renamed over the final name, then the
directory is fsynced. Names starting with ``.``
are never keys (``validate_key`` refuses them), so temp and lock files are
never listed; a writer killed mid-write leaves its temp file behind, and
``remove_stale_temp`` (run by gc) deletes those older than ``TEMP_MAX_AGE``.
``put_if`` serialises writers of one key with ``fcntl.flock`` on
``<root>/.locks/<hash of key>``, which also holds across processes on one host
(not across hosts on NFS). Plain ``put`` does not take that lock.

All file I/O runs in worker threads so the event loop stays responsive.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection
from functools import partial
from pathlib import Path
from typing import NoReturn, TypeVar

import anyio.to_thread
import blake3

from .atomic import is_tmp_name, write_atomic
from .errors import Conflict, ObjectMissing, StoreUnavailable, os_error
from .objectstore import ObjectInfo, validate_key, validate_prefix
from .resource import AsyncResource

T = TypeVar("T")

_OLD_TMP_PREFIX = ".tmp-"
"""How temp files were named before ``atomic.tmp_name``: still cleaned up."""
TEMP_MAX_AGE = 3600.0
"""A temp file this old belongs to a dead writer: a live one renames its file
within seconds (deleting a live one would only fail that write, never corrupt)."""
_LOCK_DIR = ".locks"
_MISSING_ERRNOS = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR)
_RANGE_BLOCK = 1 << 20
"""Bytes per ``pread`` (and per worker-thread hop) of ``get_range``."""


class FileObjectStore(AsyncResource):
    """An ``ObjectStore`` in the directory ``root``.

    Every method raises StoreUnavailable for I/O errors, DiskFull when the disk
    (or quota) is full, and BadInput for a malformed key.
    """

    def __init__(self, root: Path, *, create: bool = True) -> None:
        self.root = Path(root).absolute()
        self.url = self.root.as_uri()
        self._create = create

    async def open(self) -> None:
        """Check (or create) the root directory. Raises StoreUnavailable, DiskFull."""
        await self._run(self._open_sync, "open")

    async def aclose(self) -> None:
        """Nothing to release: every operation opens and closes its own files."""

    def __repr__(self) -> str:
        return f"FileObjectStore({str(self.root)!r})"

    # -- ObjectStore ---------------------------------------------------------

    async def get(self, key: str) -> bytes:
        """Return the object's bytes. Raises ObjectMissing, StoreUnavailable, BadInput."""
        path = self._path(key)
        return await self._run(path.read_bytes, "read", key, missing_ok=False)

    async def put(self, key: str, data: bytes | bytearray) -> None:
        """Write atomically. Raises DiskFull, StoreUnavailable, BadInput."""
        path = self._path(key)
        await self._run(lambda: _write_atomic(path, data), "write", key)

    async def put_if(self, key: str, data: bytes, expected: bytes | None) -> None:
        """Write only if the current bytes equal ``expected`` (``None``: key absent).

        Raises Conflict if they do not, DiskFull, StoreUnavailable, BadInput.
        """
        path = self._path(key)
        lock_path = self.root / _LOCK_DIR / blake3.blake3(key.encode()).hexdigest()
        swapped = await self._run(
            lambda: _compare_and_swap(path, lock_path, data, expected), "write", key
        )
        if not swapped:
            state = "exists" if expected is None else "changed"
            raise Conflict(f"object {key} {state} in {self.url}; conditional write refused")

    async def get_range(self, key: str, offset: int, length: int) -> AsyncGenerator[bytes, None]:
        """Stream ``length`` bytes from ``offset`` in blocks (one ``pread`` per block,
        in a worker thread). Stops early where the file ends.
        Raises ObjectMissing, StoreUnavailable, BadInput."""
        path = self._path(key)
        if length <= 0:
            return
        fd = await self._run(partial(open_object_fd, path), "read", key, missing_ok=False)
        try:
            position, end = offset, offset + length
            while position < end:
                size = min(_RANGE_BLOCK, end - position)
                block = await self._run(
                    partial(os.pread, fd, size, position), "read", key, missing_ok=False
                )
                if not block:
                    return
                yield block
                position += len(block)
        finally:
            os.close(fd)

    async def exists(self, key: str) -> bool:
        """True if the key holds an object. Raises StoreUnavailable, BadInput."""
        path = self._path(key)
        return await self._run(lambda: _is_file(path), "stat", key)

    async def exists_many(self, keys: Collection[str]) -> set[str]:
        """The keys that hold objects, stat'ed in one worker-thread call.

        Raises StoreUnavailable, BadInput.
        """
        paths = [(key, self._path(key)) for key in keys]
        return await self._run(lambda: {k for k, p in paths if _is_file(p)}, "stat")

    async def delete(self, key: str) -> None:
        """Delete the object; a missing key is not an error. Raises StoreUnavailable."""
        path = self._path(key)
        await self._run(lambda: _unlink_missing_ok(path), "delete", key)

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """Yield every object whose key starts with ``prefix`` (order unspecified).

        Raises StoreUnavailable, BadInput.
        """
        validate_prefix(prefix)
        start = prefix.rpartition("/")[0]
        pending = [start]
        while pending:
            rel_dir = pending.pop()
            files, subdirs = await self._run(partial(_scan, self.root, rel_dir), "list", rel_dir)
            for info in files:
                if info.key.startswith(prefix):
                    yield info
            for sub in subdirs:
                # Descend only where keys can still match the prefix.
                if sub.startswith(prefix) or prefix.startswith(sub + "/"):
                    pending.append(sub)

    async def remove_stale_temp(self, max_age: float = TEMP_MAX_AGE) -> tuple[int, int]:
        """Delete temp files of killed writers older than ``max_age`` seconds;
        returns (files, bytes). Raises StoreUnavailable."""
        return await self._run(partial(_remove_stale_temp, self.root, max_age), "clean up")

    # -- helpers -------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def _open_sync(self) -> None:
        if self._create:
            self.root.mkdir(parents=True, exist_ok=True)
        if not self.root.is_dir():
            raise StoreUnavailable(f"file store {self.root} is not a directory")

    async def _run(
        self, func: Callable[[], T], op: str, key: str = "", *, missing_ok: bool = True
    ) -> T:
        try:
            return await anyio.to_thread.run_sync(func)
        except OSError as exc:
            _translate(exc, op, key, self.url, missing_ok=missing_ok)


def _translate(exc: OSError, op: str, key: str, where: str, *, missing_ok: bool) -> NoReturn:
    if not missing_ok and exc.errno in _MISSING_ERRNOS:
        raise ObjectMissing(key, where) from exc
    raise os_error(
        exc, f"cannot {op} {key or '/'} in {where}", unavailable=StoreUnavailable
    ) from exc


def _write_atomic(path: Path, data: bytes | bytearray) -> None:
    write_atomic(path, data, fsync=True, parents=True)


def _compare_and_swap(path: Path, lock_path: Path, data: bytes, expected: bytes | None) -> bool:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed
        try:
            current: bytes | None = path.read_bytes()
        except OSError as exc:
            if exc.errno not in _MISSING_ERRNOS:
                raise
            current = None
        if current != expected:
            return False
        _write_atomic(path, data)
        return True
    finally:
        os.close(fd)


def _scan(root: Path, rel_dir: str) -> tuple[list[ObjectInfo], list[str]]:
    files: list[ObjectInfo] = []
    subdirs: list[str] = []
    base = f"{rel_dir}/" if rel_dir else ""
    try:
        entries = list(os.scandir(root / rel_dir))
    except OSError as exc:
        if exc.errno in _MISSING_ERRNOS:
            return files, subdirs
        raise
    for entry in entries:
        if entry.name.startswith("."):
            continue  # temp files, the lock dir, anything that cannot be a key
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # deleted while we listed
        if stat.S_ISDIR(st.st_mode):
            subdirs.append(base + entry.name)
        elif stat.S_ISREG(st.st_mode):
            files.append(ObjectInfo(base + entry.name, st.st_size, st.st_mtime))
    return files, subdirs


def open_object_fd(path: Path) -> int:
    """Open an object file for reading; a directory is not an object (IsADirectoryError)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    if stat.S_ISDIR(os.fstat(fd).st_mode):  # a "directory" is not an object
        os.close(fd)
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
    return fd


def _remove_stale_temp(root: Path, max_age: float) -> tuple[int, int]:
    cutoff = time.time() - max_age
    files = size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root) and _LOCK_DIR in dirnames:
            dirnames.remove(_LOCK_DIR)
        for name in filenames:
            if not (is_tmp_name(name) or name.startswith(_OLD_TMP_PREFIX)):
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
                if st.st_mtime < cutoff and stat.S_ISREG(st.st_mode):
                    os.unlink(path)
                    files, size = files + 1, size + st.st_size
            except FileNotFoundError:
                continue  # renamed or removed meanwhile
    return files, size


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError as exc:
        if exc.errno in _MISSING_ERRNOS:
            return False
        raise


def _unlink_missing_ok(path: Path) -> None:
    try:
        path.unlink()
    except OSError as exc:
        if exc.errno not in _MISSING_ERRNOS:
            raise
