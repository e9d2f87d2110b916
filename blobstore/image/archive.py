"""Safe, read-only access to an image source: a tar archive or a layout directory.

Nothing is ever extracted. A tar is scanned once (headers only) and members are
read in place by offset, so a layer is ingested straight out of the archive.
Member names are checked before anything else: absolute names, ``..``,
devices, sparse files and duplicates are refused. Symlinks and hard links are
followed only *inside* the archive, to a regular member (``docker save`` and
skopeo write ``<id>/layer.tar -> ../<digest>.tar``); any other link is refused.
A layout directory may contain no symlinks at all below its root.

Every file is opened exactly once and then read only through that descriptor
(an ``Extent`` carries it): the tar itself, or each blob of a layout, opened
relative to the layout's directory descriptor with ``O_NOFOLLOW`` at every
component and checked to be a regular file. Swapping a blob for a symlink (or
the archive for another file) after it was checked changes nothing that is
read. An archive owns its descriptors: use it as a context manager.

Synchronous (runs in a worker thread); raises ``BadImage`` / ``UnsafeMember``.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
import tarfile
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from ..errors import BadImage, UnsafeMember

MAX_MEMBERS = 100_000
_MAX_LINK_HOPS = 8


_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
"""O_NONBLOCK: a FIFO swapped in never blocks the open (it is then refused)."""
_DIR_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_DIRECTORY


@dataclass(frozen=True, slots=True)
class Extent:
    """Where a member's bytes sit: ``size`` bytes at ``offset`` of the open file ``fd``."""

    path: str
    """For messages (and as an identity of the member within one archive)."""
    offset: int
    size: int
    fd: int
    """Owned by the archive; read it with ``pread`` (its file offset is not ours)."""


@dataclass(frozen=True, slots=True)
class TarEntry:
    """One tar member as it appears in the archive, for byte-exact rebuilds."""

    name: str
    header_offset: int
    data_offset: int
    size: int
    regular: bool


class ImageArchive(Protocol):
    path: str

    def has(self, name: str) -> bool: ...

    def extent(self, name: str) -> Extent:
        """Where member ``name`` (links resolved) lies. Raises BadImage if absent."""
        ...

    def close(self) -> None: ...


class _Closing:
    """Context-manager shape shared by both archives."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> _Closing:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def clean_name(name: str) -> str:
    """Normalize an archive member name; raise UnsafeMember if it could escape."""
    if not name or "\x00" in name or name.startswith("/") or "\\" in name:
        raise UnsafeMember(f"unsafe archive member name {name[:120]!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts and name.strip("/.") == "":
        return "."
    if any(p == ".." for p in parts):
        raise UnsafeMember(f"unsafe archive member name {name[:120]!r}")
    return "/".join(parts)


def read_member(archive: ImageArchive, name: str, limit: int) -> bytes:
    """Read a small member whole, refusing it (before reading) if over ``limit``."""
    ext = archive.extent(name)
    if ext.size > limit:
        raise BadImage(f"{name} is too large ({ext.size} bytes, limit {limit})")
    return pread_exact(ext, 0, ext.size)


def pread_exact(ext: Extent, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` within ``ext``, from its open descriptor."""
    parts: list[bytes] = []
    done = 0
    try:
        while done < size:
            part = os.pread(ext.fd, size - done, ext.offset + offset + done)
            if not part:
                raise BadImage(f"{ext.path} is truncated")
            parts.append(part)
            done += len(part)
    except OSError as exc:
        raise BadImage(f"cannot read {ext.path}: {exc.strerror}") from exc
    return b"".join(parts)


class TarArchive(_Closing):
    """An uncompressed tar (``docker save`` output, or an OCI layout in a tar).

    Takes ownership of ``fd``, the archive opened once by ``open_archive``."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.entries: list[TarEntry] = []
        self._links: dict[str, str] = {}
        self._regular: dict[str, TarEntry] = {}
        self.end_offset = 0
        self.file_size = 0
        self._scan()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _scan(self) -> None:
        try:
            self.file_size = os.fstat(self.fd).st_size
            with open(self.fd, "rb", closefd=False) as f:
                head = f.read(6)
                if head.startswith(b"\x1f\x8b") or head.startswith(b"\x28\xb5\x2f\xfd"):
                    raise BadImage(f"{self.path} is compressed; decompress it first")
                f.seek(0)
                with tarfile.open(fileobj=f, mode="r:") as tf:
                    while (member := tf.next()) is not None:
                        self._add(member)
                        if len(self.entries) > MAX_MEMBERS:
                            raise BadImage(f"{self.path}: more than {MAX_MEMBERS} members")
                    self.end_offset = tf.offset
        except (tarfile.TarError, EOFError, UnicodeError) as exc:
            raise BadImage(f"{self.path} is not a readable tar archive ({exc})") from exc
        except OSError as exc:
            raise BadImage(f"cannot read {self.path}: {exc.strerror}") from exc
        if not self.entries:
            raise BadImage(f"{self.path} is empty or not a tar archive")

    def _add(self, member: tarfile.TarInfo) -> None:
        name = clean_name(member.name)
        seen = name in self._regular or name in self._links
        if seen and not member.isdir():
            raise BadImage(f"{self.path}: duplicate member {name!r}")
        if member.issparse() or not (
            member.isreg() or member.isdir() or member.issym() or member.islnk()
        ):
            raise BadImage(f"{self.path}: unsupported member type for {name!r}")
        if member.offset_data + member.size > self.file_size:
            raise BadImage(f"{self.path} is truncated (member {name!r} runs past the end)")
        entry = TarEntry(name, member.offset, member.offset_data, member.size, member.isreg())
        self.entries.append(entry)
        if member.isreg():
            self._regular[name] = entry
        elif member.issym():
            if member.linkname.startswith("/"):
                raise UnsafeMember(f"{self.path}: symlink {name!r} points outside the archive")
            self._links[name] = posixpath.join(posixpath.dirname(name), member.linkname)
        elif member.islnk():
            self._links[name] = member.linkname

    def resolve(self, name: str) -> str:
        """The regular member ``name`` stands for, following in-archive links."""
        current = clean_name(name)
        for _ in range(_MAX_LINK_HOPS):
            if current in self._regular:
                return current
            target = self._links.get(current)
            if target is None:
                raise BadImage(f"{self.path}: missing member {name!r}")
            current = _normalize_link(target, name, self.path)
        raise UnsafeMember(f"{self.path}: too many links resolving {name!r}")

    def has(self, name: str) -> bool:
        name = clean_name(name)
        return name in self._regular or name in self._links

    def extent(self, name: str) -> Extent:
        entry = self._regular[self.resolve(name)]
        return Extent(self.path, entry.data_offset, entry.size, self.fd)

    def read_raw(self, start: int, end: int) -> bytes:
        return pread_exact(Extent(self.path, 0, self.file_size, self.fd), start, end - start)


def _normalize_link(target: str, name: str, path: str) -> str:
    norm = posixpath.normpath(target)
    if norm.startswith("/") or norm == ".." or norm.startswith("../") or "\x00" in norm:
        raise UnsafeMember(f"{path}: link {name!r} points outside the archive")
    return norm


class DirArchive(_Closing):
    """An OCI image layout directory; no symlinks allowed below its root.

    Takes ownership of ``fd``, the directory opened once by ``open_archive``;
    each member is opened once, relative to it, and kept open until ``close``."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        self._members: dict[str, Extent | None] = {}

    def close(self) -> None:
        for ext in self._members.values():
            if ext is not None:
                os.close(ext.fd)
        self._members.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _member(self, name: str) -> Extent | None:
        """The open member ``name``, or None if it does not exist."""
        name = clean_name(name)
        if name not in self._members:
            self._members[name] = self._open(name)
        return self._members[name]

    def _open(self, name: str) -> Extent | None:
        where = os.path.join(self.path, name)
        *dirs, leaf = name.split("/")
        opened: list[int] = []
        try:
            parent = self.fd
            for part in dirs:
                parent = _open_at(part, _DIR_FLAGS, parent, where)
                if parent < 0:
                    return None
                opened.append(parent)
            # Checked before opening too: never open a device or a FIFO.
            _check_regular(os.stat(leaf, dir_fd=parent, follow_symlinks=False), where)
            fd = _open_at(leaf, _READ_FLAGS, parent, where)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BadImage(f"cannot read {where}: {exc.strerror}") from exc
        finally:
            for dir_fd in opened:
                os.close(dir_fd)
        if fd < 0:
            return None
        try:
            st = os.fstat(fd)
            _check_regular(st, where)  # what was opened, whatever the name points to now
        except BaseException:
            os.close(fd)
            raise
        return Extent(where, 0, st.st_size, fd)

    def has(self, name: str) -> bool:
        return self._member(name) is not None

    def extent(self, name: str) -> Extent:
        ext = self._member(name)
        if ext is None:
            raise BadImage(f"{self.path}: missing {name!r}")
        return ext


def _open_at(name: str, flags: int, dir_fd: int, where: str) -> int:
    """``openat(dir_fd, name)`` without following a symlink; -1 if absent."""
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        return -1
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_symlink(name, dir_fd):
            raise UnsafeMember(f"{where} is a symlink; refusing to follow it") from exc
        if exc.errno == errno.ENOTDIR:
            raise BadImage(f"{where}: a path component is not a directory") from exc
        raise


def _is_symlink(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _check_regular(st: os.stat_result, where: str) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeMember(f"{where} is a symlink; refusing to follow it")
    if not stat.S_ISREG(st.st_mode):
        raise BadImage(f"{where} is not a regular file")


def open_archive(path: str) -> TarArchive | DirArchive:
    """Open ``path`` (once) as a layout directory or a tar archive. Raises BadImage.

    ``path`` itself may be a symlink (the caller named it); nothing below it may."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise BadImage(f"cannot open {path}: {exc.strerror}") from exc
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            return DirArchive(os.path.realpath(path), fd)
        if stat.S_ISREG(mode):
            return TarArchive(path, fd)
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    raise BadImage(f"{path} is neither a directory nor a file")
