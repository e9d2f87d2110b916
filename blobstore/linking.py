"""Placing files into a pull's destination, safely and cheaply.

``DestDir`` is the destination opened once (``O_DIRECTORY``); every path below
it is reached component by component through directory file descriptors with
``O_NOFOLLOW`` (``dir_fd=``/``follow_symlinks=False`` for mkdir, open, unlink,
rename, readlink). Nothing is ever done through a path string checked earlier,
so a directory swapped for a symlink while a pull runs cannot send a write or
a chmod outside the destination: the swap is seen at the next ``openat`` (a
symlink or file standing where a directory belongs is replaced by a directory,
inside the destination), and a directory fd already held keeps pointing at the
directory it was opened on.

``Placer`` puts a finished file (the node store's copy) under a name in such a
directory, always through a temp name and an atomic rename:

- ``reflink``: ``ioctl(FICLONE)`` — shares extents, microseconds per file
  (XFS with reflink=1, btrfs, bcachefs). Fails when the filesystem cannot.
- ``copy``: small files by ``copy_file_range`` (one syscall; ``sendfile``
  across filesystems where the kernel refuses), big ones by ``pread`` and
  ``pwrite`` through a 256 KiB buffer, in two threads from 64 MiB: faster than
  the kernel's page-by-page splice (``copy_fd``).
- ``hardlink``: ``link()``: no bytes at all, but the destination file *is* the
  store's file. It is made read-only; a writer that ignores that (root does)
  changes the node's copy — the node store sees the changed ctime and never
  serves it, and the next pull re-checks the file. Special bits and the write
  bits are dropped; every hardlinked name of one content shares one mode.
- ``auto``: reflink where the filesystem supports it, copy otherwise
  (remembered per (source device, destination device) pair).

Names are cut by bytes, never characters: a temp name stays within NAME_MAX
(255 bytes) whatever the final name's encoding.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Literal, get_args

from .atomic import is_tmp_name, tmp_name
from .errors import BadInput, ConfigError, SourceGone, UnsafePath

LinkMode = Literal["auto", "reflink", "hardlink", "copy"]
LINK_MODES: tuple[str, ...] = get_args(LinkMode)
_FICLONE = 0x40049409
_NOT_CLONABLE = frozenset(
    {errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EXDEV, errno.ENOSYS, errno.EPERM}
)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FDS = 256
"""Directory fds kept open per pull (a tree with more directories re-opens
the rest from their nearest open ancestor, still one ``openat`` per level)."""


def parse_link_mode(text: str) -> LinkMode:
    """``auto|reflink|hardlink|copy``. Raises ConfigError."""
    value = text.strip().lower()
    if value not in LINK_MODES:
        raise ConfigError(f"not a link mode: {text!r} (choose {'|'.join(LINK_MODES)})")
    return value  # type: ignore[return-value]


class DestDir:
    """A pull destination held open; paths below it resolved through dir fds.

    Thread-safe: workers of one pull share it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path) -> DestDir:
        """Create ``path`` (parents too) and open it. Following a symlink here is
        fine: the caller named it. Raises BadInput."""
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileExistsError as exc:
            raise BadInput(f"not a directory: {path}") from exc
        except NotADirectoryError as exc:
            raise BadInput(f"not a directory: {path}") from exc
        except OSError as exc:
            raise BadInput(f"cannot create {path}: {exc.strerror}") from exc
        return cls(path, fd)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    def dir_fd(self, rel_dir: str) -> int:
        """The fd of directory ``rel_dir`` ("" is the root), creating it and any
        missing parent; a symlink or file in the way (inside DEST) is replaced.
        The fd stays owned by this object, which may close it at its next
        ``dir_fd`` call: use it only until then, from one thread at a time
        (``own_dir_fd`` otherwise)."""
        with self._lock:
            return self._dir_fd(rel_dir)

    def own_dir_fd(self, rel_dir: str) -> int:
        """Like ``dir_fd``, but a duplicate the caller owns (and closes): it stays
        valid whatever this object closes meanwhile."""
        with self._lock:
            return os.dup(self._dir_fd(rel_dir))

    def _dir_fd(self, rel_dir: str) -> int:
        if not rel_dir:
            return self.fd
        fd = self._fds.get(rel_dir)
        if fd is not None:
            self._fds.move_to_end(rel_dir)
            return fd
        parts = rel_dir.split("/")
        start, parent = 0, self.fd
        for i in range(len(parts) - 1, 0, -1):  # nearest open ancestor
            cached = self._fds.get("/".join(parts[:i]))
            if cached is not None:
                start, parent = i, cached
                break
        for i in range(start, len(parts)):
            fd = _open_subdir(parent, parts[i])
            self._remember("/".join(parts[: i + 1]), fd)
            parent = fd
        return parent

    def _remember(self, rel: str, fd: int) -> None:
        old = self._fds.pop(rel, None)
        if old is not None:
            os.close(old)
        self._fds[rel] = fd
        while len(self._fds) > _DIR_FDS:
            # The oldest: never the directory just opened (the walk goes on
            # from it); a caller needing an fd for longer holds a dup.
            _, victim = self._fds.popitem(last=False)
            os.close(victim)

    def remove_tmp_leftovers(self, dir_fd: int) -> int:
        """Unlink temp files a killed pull left in this directory. Call only
        while holding the destination lock (no live pull owns them)."""
        removed = 0
        for name in os.listdir(dir_fd):
            if is_tmp_name(name):
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.unlink(name, dir_fd=dir_fd)
                    removed += 1
        return removed


def special_bits_dropped(mode: int, keep: bool) -> int:
    """setuid, setgid and sticky are dropped unless asked for (as tar does
    for a non-root user): a manifest must not make setuid binaries on a node."""
    return mode & 0o7777 if keep else mode & 0o777


def keepable(st: os.stat_result, size: int, mode: LinkMode) -> bool:
    """A file already at a pull's path may be kept (if its content is right): a
    regular file of the size wanted, and not the node's copy linked in unless this
    pull links too (it wants its own copy)."""
    return (
        stat.S_ISREG(st.st_mode) and st.st_size == size and (st.st_nlink == 1 or mode == "hardlink")
    )


def file_mode(mode: int, st: os.stat_result) -> int:
    """The mode a placed file gets: hardlinked ones (the node's copy) read-only."""
    return mode & 0o555 if st.st_nlink > 1 else mode


def split(rel: str) -> tuple[str, str]:
    """(parent dir, name) of a manifest path."""
    parent, _, name = rel.rpartition("/")
    return parent, name


def _open_subdir(parent: int, name: str) -> int:
    for _ in range(8):  # another pull may be replacing the same entry
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            pass
        except (NotADirectoryError, OSError) as exc:
            if isinstance(exc, NotADirectoryError) or exc.errno == errno.ELOOP:
                # a file or symlink inside DEST where a directory belongs
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=parent)
            else:
                raise
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=parent)
    raise UnsafePath(f"{name}: keeps changing while the pull creates it")


def replace_into(dir_fd: int, tmp: str, name: str) -> None:
    """Rename ``tmp`` over ``name`` in one directory. Raises UnsafePath if a
    directory stands there (a manifest file never replaces a directory)."""
    try:
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except IsADirectoryError as exc:  # rename(2) never replaces a dir by a non-dir
        raise UnsafePath(
            f"{name}: a directory stands where the manifest has a file or symlink"
        ) from exc


def open_tmp(dir_fd: int, name: str) -> tuple[str, int]:
    """Create a new temp file for ``name``: (temp name, writable fd)."""
    tmp = tmp_name(name)
    fd = os.open(
        tmp,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=dir_fd,
    )
    return tmp, fd


def unlink_quietly(dir_fd: int, name: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=dir_fd)


_COPY_SLICE = 256 << 10
"""Bytes per ``pread``/``pwrite`` of a copy: the buffer stays in the CPU's
cache, and ext4 sizes the new file's page-cache folios by the write (bigger
writes made the writer compact memory on a fragmented box, nodestore.py)."""
_SPLIT_COPY = 64 << 20
"""Files at least this big are copied by ``_COPY_THREADS`` threads, each its
own range: the ``pread`` half of each copy runs in parallel (the ``pwrite``
half takes the inode's lock)."""
_COPY_THREADS = 2
_KERNEL_COPY = 1 << 20
"""Files smaller than this go through ``copy_file_range`` (one syscall, no
user-space buffer); bigger ones through the buffer. Measured on ext4 (Linux
6.18, 1 GiB, medians of 3): ``cp`` 0.289 s, ``copy_file_range`` 0.283 s
(splice, page by page), ``pread``+``pwrite`` through 256 KiB 0.260 s, the
same in two threads 0.181 s."""


def copy_fd(src: int, dst: int, size: int) -> None:
    """Copy ``size`` bytes from ``src`` to ``dst`` (both at offset 0; ``dst``
    new and empty). Copies through the buffer reserve ``dst``'s blocks first
    (pwrite.preallocate): 1 GiB from the page cache on ext4, 7 alternating
    runs, 0.168 -> 0.106 s (``cp`` 0.260 s)."""
    if size < _KERNEL_COPY:
        _kernel_copy(src, dst, size)
        return
    from .pwrite import preallocate  # (a module attribute: tests patch it)

    preallocate(dst, size)
    if size < _SPLIT_COPY:
        _buffer_copy(src, dst, 0, size)
    else:
        os.ftruncate(dst, size)  # the threads' writes land past each other's ends
        ranges = [
            (i * size // _COPY_THREADS, (i + 1) * size // _COPY_THREADS)
            for i in range(_COPY_THREADS)
        ]
        errors: list[BaseException] = []

        def run(start: int, end: int) -> None:
            try:
                _buffer_copy(src, dst, start, end)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=r, daemon=True) for r in ranges[1:]]
        for thread in threads:
            thread.start()
        run(*ranges[0])
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]


def _buffer_copy(src: int, dst: int, start: int, end: int) -> None:
    buf = memoryview(bytearray(min(_COPY_SLICE, end - start)))
    offset = start
    while offset < end:
        n = os.preadv(src, [buf[: end - offset]], offset)
        if n == 0:
            raise OSError(errno.EIO, f"source ended at byte {offset}, before {end}")
        view = buf[:n]
        while view:
            written = os.pwrite(dst, view, offset)
            view = view[written:]
            offset += written


def _kernel_copy(src: int, dst: int, size: int) -> None:
    """``copy_file_range``, or ``sendfile`` where the kernel refuses."""
    offset = 0
    use_sendfile = False
    while offset < size:
        want = min(size - offset, 1 << 30)
        if not use_sendfile:
            try:
                n = os.copy_file_range(src, dst, want, offset, offset)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                use_sendfile = True
                continue
        else:
            os.lseek(dst, offset, os.SEEK_SET)
            n = os.sendfile(dst, src, offset, want)
        if n == 0:
            raise OSError(errno.EIO, f"source ended after {offset} of {size} bytes")
        offset += n


def clone_fd(src: int, dst: int) -> bool:
    """FICLONE ``src`` into ``dst``; False when the filesystem cannot."""
    try:
        fcntl.ioctl(dst, _FICLONE, src)
    except OSError as exc:
        if exc.errno in _NOT_CLONABLE:
            return False
        raise
    return True


class Placer:
    """Puts node-store files into destination directories by ``mode``."""

    def __init__(self, mode: LinkMode) -> None:
        self.mode = mode
        self._can_clone: dict[tuple[int, int], bool] = {}
        self._devs: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self.used: dict[str, int] = {}
        """Files placed per method actually used (reflink, copy, hardlink)."""

    def place(
        self,
        src: Path,
        dir_fd: int,
        name: str,
        mode: int,
        size: int,
        expect: Callable[[os.stat_result], bool] | None = None,
    ) -> os.stat_result:
        """Make ``name`` in ``dir_fd`` hold ``src``'s ``size`` bytes with ``mode``;
        returns the placed file's stat, taken after the rename. ``expect``: a
        source the store does not own (a seed, seeds.py), never hardlinked, whose
        fd's ``fstat`` must pass ``expect`` before and after the copy. Raises
        BadInput when an explicit link mode is impossible here, SourceGone,
        UnsafePath, OSError. Eight syscalls for a copy, fewer for a clone or link."""
        if self.mode == "hardlink" and expect is None:
            return self._hardlink(src, dir_fd, name, mode)
        try:
            sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except (FileNotFoundError, OSError) as exc:
            if expect is None and not isinstance(exc, FileNotFoundError):
                raise
            raise SourceGone(str(src)) from exc
        try:
            if expect is not None and not expect(os.fstat(sfd)):
                raise SourceGone(str(src))
            tmp, dfd = open_tmp(dir_fd, name)
            try:
                how = self._fill(sfd, dfd, size)
                if expect is not None and not expect(os.fstat(sfd)):
                    raise SourceGone(f"{src} changed while it was copied")
                os.fchmod(dfd, mode)
                replace_into(dir_fd, tmp, name)
                st = os.fstat(dfd)  # after the rename: it moves the ctime
            except BaseException:
                unlink_quietly(dir_fd, tmp)
                raise
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
        self._count(how)
        return st

    def _fill(self, sfd: int, dfd: int, size: int) -> str:
        if self.mode in ("auto", "reflink") and size:
            if self._devs is None:  # the store's and DEST's filesystems, once per pull
                self._devs = (os.fstat(sfd).st_dev, os.fstat(dfd).st_dev)
            if self._can_clone.get(self._devs, True):
                if clone_fd(sfd, dfd):
                    self._can_clone[self._devs] = True
                    return "reflink"
                self._can_clone[self._devs] = False
            if self.mode == "reflink":
                raise BadInput(
                    "--link-mode reflink: the filesystem cannot clone files from "
                    "the node store into the destination (try auto or copy)"
                )
        copy_fd(sfd, dfd, size)
        return "copy"

    def _hardlink(self, src: Path, dir_fd: int, name: str, mode: int) -> os.stat_result:
        tmp = tmp_name(name)
        try:
            os.link(src, tmp, dst_dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError as exc:
            raise SourceGone(str(src)) from exc
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise BadInput(
                    f"--link-mode hardlink: cannot link from the node store into "
                    f"the destination ({exc.strerror}; try auto or copy)"
                ) from exc
            raise
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                read_only = mode & 0o555
                if stat.S_IMODE(os.fstat(fd).st_mode) != read_only:
                    os.fchmod(fd, read_only)
                replace_into(dir_fd, tmp, name)
                st = os.fstat(fd)
            finally:
                os.close(fd)
        except BaseException:
            unlink_quietly(dir_fd, tmp)
            raise
        self._count("hardlink")
        return st

    def _count(self, how: str) -> None:
        with self._lock:
            self.used[how] = self.used.get(how, 0) + 1
