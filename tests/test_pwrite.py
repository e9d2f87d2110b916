"""nodestore.pwrite_all: every byte lands, in calls of at most PWRITE_SLICE bytes
(big writes make the kernel allocate big page-cache folios: see its docstring)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from blobstore.nodestore import PWRITE_SLICE, pwrite_all


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
