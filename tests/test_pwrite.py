"""pwrite.pwrite_all: every byte lands, in calls of at most PWRITE_SLICE bytes
(big writes make the kernel allocate big page-cache folios: see its docstring);
pwrite.preallocate: a file's blocks reserved before its writes, its size kept."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from blobstore.pwrite import PWRITE_SLICE, preallocate, pwrite_all


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes handed to each os.pwrite (the real one does the writing)."""
    sizes: list[int] = []
    real = os.pwrite

    def recorded(fd: int, data: memoryview, offset: int) -> int:
        sizes.append(len(data))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", recorded)
    return sizes


def test_a_chunk_is_written_whole_in_slices(tmp_path: Path, calls: list[int]) -> None:
    data = os.urandom(4 * PWRITE_SLICE + 12345)
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"head")
        pwrite_all(fd, data, 4, threading.Lock())
    finally:
        os.close(fd)
    assert path.read_bytes() == b"head" + data
    assert calls == [PWRITE_SLICE] * 4 + [12345]


def test_short_writes_are_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwrite

    def short(fd: int, data: memoryview, offset: int) -> int:
        return real(fd, data[: max(1, len(data) // 3)], offset)  # pwrite may write less

    monkeypatch.setattr(os, "pwrite", short)
    data = os.urandom(PWRITE_SLICE + 999)
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        pwrite_all(fd, data, 0, threading.Lock())
        pwrite_all(fd, b"", 7, threading.Lock())  # nothing to write: no call, no change
    finally:
        os.close(fd)
    assert path.read_bytes() == data


def test_preallocate_reserves_the_blocks_keeps_the_size_and_writes_nothing_twice(
    tmp_path: Path,
) -> None:
    size = 3 * PWRITE_SLICE + 4321
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        preallocate(fd, size)
        st = os.fstat(fd)
        if st.st_blocks == 0 and not os.environ.get("CI"):
            pytest.skip(f"{tmp_path} cannot allocate blocks ahead (fallocate)")
        assert st.st_size == 0  # a file cut short still looks short
        assert st.st_blocks * 512 >= size
        assert path.read_bytes() == b""
        data = os.urandom(size)
        pwrite_all(fd, data, 0, threading.Lock())
        st = os.fstat(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == data
    assert st.st_size == size
    assert st.st_blocks * 512 < size + (64 << 10)  # the reserved blocks took the bytes


def test_preallocate_where_it_cannot_is_a_no_op(tmp_path: Path) -> None:
    """No support (a pipe here: ESPIPE), a bad fd, no space: the writes that
    follow fail or succeed as they would have; nothing is raised."""
    read, written = os.pipe()
    try:
        preallocate(written, 1 << 20)
        os.write(written, b"still a pipe")
        assert os.read(read, 100) == b"still a pipe"
    finally:
        os.close(read)
        os.close(written)
    preallocate(written, 1 << 20)  # closed: EBADF
    fd = os.open(tmp_path / "huge", os.O_RDWR | os.O_CREAT)
    try:
        preallocate(fd, 1 << 62)  # far more than any disk: EFBIG or ENOSPC
        assert os.fstat(fd).st_size == 0
    finally:
        os.close(fd)
