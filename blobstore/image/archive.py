"""Safe, read-only access to an image source: a tar archive or a layout directory.

Nothing is ever extracted. A tar is scanned once (headers only) and members are
read in place by offset, so a layer is ingested straight out of the archive.
Member names are checked before anything else: absolute names, ``..``,
devices, sparse files and duplicates are refused. Symlinks and hard links are
followed only *inside* the archive, to a regular member (``docker save`` and
skopeo write ``<id>/layer.tar -> ../<digest>.tar``); any other link is refused.
A layout directory may contain no symlinks at all below its root.

Synchronous (runs in a worker thread); raises ``BadImage`` / ``UnsafeMember``.
"""

from __future__ import annotations

import os
import posixpath
import stat
import tarfile
from dataclasses import dataclass
from typing import Protocol

from .errors import BadImage, UnsafeMember

MAX_MEMBERS = 100_000
_MAX_LINK_HOPS = 8


@dataclass(frozen=True, slots=True)
class Extent:
    """Where a member's bytes sit on disk."""

    path: str
    offset: int
    size: int


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
    try:
        fd = os.open(ext.path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            data = os.pread(fd, size, ext.offset + offset)
        finally:
            os.close(fd)
    except OSError as exc:
        raise BadImage(f"cannot read {ext.path}: {exc.strerror}") from exc
    if len(data) != size:
        raise BadImage(f"{ext.path} is truncated")
    return data


class TarArchive:
    """An uncompressed tar (``docker save`` output, or an OCI layout in a tar)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.entries: list[TarEntry] = []
        self._links: dict[str, str] = {}
        self._regular: dict[str, TarEntry] = {}
        self.end_offset = 0
        self.file_size = 0
        self._scan()

    def _scan(self) -> None:
        try:
            self.file_size = os.stat(self.path).st_size
            with open(self.path, "rb") as f:
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
        return Extent(self.path, entry.data_offset, entry.size)

    def read_raw(self, start: int, end: int) -> bytes:
        return pread_exact(Extent(self.path, 0, self.file_size), start, end - start)


def _normalize_link(target: str, name: str, path: str) -> str:
    norm = posixpath.normpath(target)
    if norm.startswith("/") or norm == ".." or norm.startswith("../") or "\x00" in norm:
        raise UnsafeMember(f"{path}: link {name!r} points outside the archive")
    return norm


class DirArchive:
    """An OCI image layout directory; no symlinks allowed below its root."""

    def __init__(self, path: str) -> None:
        self.path = os.path.realpath(path)

    def _lookup(self, name: str) -> os.stat_result | None:
        current = self.path
        st: os.stat_result | None = None
        for part in clean_name(name).split("/"):
            current = os.path.join(current, part)
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise BadImage(f"cannot read {current}: {exc.strerror}") from exc
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeMember(f"{current} is a symlink; refusing to follow it")
        return st

    def has(self, name: str) -> bool:
        return self._lookup(name) is not None

    def extent(self, name: str) -> Extent:
        st = self._lookup(name)
        if st is None:
            raise BadImage(f"{self.path}: missing {name!r}")
        if not stat.S_ISREG(st.st_mode):
            raise BadImage(f"{self.path}: {name!r} is not a regular file")
        return Extent(os.path.join(self.path, clean_name(name)), 0, st.st_size)


def open_archive(path: str) -> TarArchive | DirArchive:
    """Open ``path`` as a layout directory or a tar archive. Raises BadImage."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise BadImage(f"cannot open {path}: {exc.strerror}") from exc
    if stat.S_ISDIR(st.st_mode):
        return DirArchive(path)
    if stat.S_ISREG(st.st_mode):
        return TarArchive(path)
    raise BadImage(f"{path} is neither a directory nor a file")
