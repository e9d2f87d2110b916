"""blobstore.atomic: replace a file whole or not at all, leaving no temp file."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from blobstore.atomic import (
    NAME_MAX,
    areplacing,
    is_tmp_name,
    replacing,
    tmp_name,
    write_atomic,
    write_atomic_async,
    write_atomic_at,
)


def _umask() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise AssertionError("no Umask line in /proc/self/status")


def test_write_replaces_content_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "doc.json"
    target.write_text("old")
    write_atomic(target, "new ✓")
    write_atomic(tmp_path / "raw", memoryview(b"\x00\x01" * 5000))
    assert target.read_text(encoding="utf-8") == "new ✓"
    assert (tmp_path / "raw").read_bytes() == b"\x00\x01" * 5000
    assert sorted(os.listdir(tmp_path)) == ["doc.json", "raw"]


def test_new_file_gets_the_umask_narrowed_mode(tmp_path: Path) -> None:
    write_atomic(tmp_path / "a", b"x")
    write_atomic(tmp_path / "b", b"x", mode=0o600, fsync=True)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o600 & ~_umask()


def test_parents_are_created_only_when_asked(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "x" / "y", b"1")
    write_atomic(tmp_path / "x" / "y", b"1", parents=True)
    assert (tmp_path / "x" / "y").read_bytes() == b"1"


def test_failed_rename_keeps_the_old_entry_and_removes_the_temp(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "inside").write_text("kept")
    with pytest.raises(IsADirectoryError):
        write_atomic(tmp_path / "taken", b"file over a directory")
    assert (tmp_path / "taken" / "inside").read_text() == "kept"
    assert os.listdir(tmp_path) == ["taken"]


def test_write_at_a_directory_fd(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        write_atomic_at(fd, "name", b"via fd", fsync=True)
        write_atomic_at(fd, "name", b"again")
    finally:
        os.close(fd)
    assert (tmp_path / "name").read_bytes() == b"again"
    assert os.listdir(tmp_path) == ["name"]


def test_replacing_renames_on_success_and_removes_on_error(tmp_path: Path) -> None:
    target = tmp_path / "out.tar"
    target.write_bytes(b"previous")

    def failing_writer() -> None:
        with replacing(target) as tmp:
            assert is_tmp_name(tmp.name)
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError):
        failing_writer()
    assert target.read_bytes() == b"previous"
    with replacing(target, fsync=True) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole"
    assert os.listdir(tmp_path) == ["out.tar"]


def test_tmp_names_are_cut_by_bytes_and_unique() -> None:
    long_name = "模" * 80 + "é" * 60  # 360 bytes of UTF-8: longer than NAME_MAX
    names = {tmp_name(long_name) for _ in range(100)}
    assert len(names) == 100
    for name in names:
        encoded = name.encode("utf-8")  # the cut never splits a character
        assert len(encoded) <= NAME_MAX
        assert name.startswith(".模")
        assert is_tmp_name(name)
    assert not is_tmp_name("ordinary.blobstore-tmp")


@pytest.mark.anyio
async def test_async_write(tmp_path: Path) -> None:
    await write_atomic_async(tmp_path / "d" / "f", b"async", parents=True, fsync=True)
    assert (tmp_path / "d" / "f").read_bytes() == b"async"
    assert os.listdir(tmp_path / "d") == ["f"]


@pytest.mark.anyio
async def test_areplacing_a_directory(tmp_path: Path) -> None:
    out = tmp_path / "layout"
    async with areplacing(out, directory=True) as tmp:
        (tmp / "index.json").write_text("{}")
    assert (out / "index.json").read_text() == "{}"
    assert (out.stat().st_mode & 0o777) == 0o777 & ~_umask()

    other = tmp_path / "failed"

    async def failing_export() -> None:
        async with areplacing(other, directory=True) as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "blob").write_bytes(b"x")
            raise ValueError("bad layer")

    with pytest.raises(ValueError, match="bad layer"):
        await failing_export()
    assert sorted(os.listdir(tmp_path)) == ["layout"]


@pytest.mark.anyio
async def test_areplacing_cancelled_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "cancelled"
    with anyio.CancelScope() as scope:
        async with areplacing(out) as tmp:
            tmp.write_bytes(b"partial")
            scope.cancel()
            await anyio.sleep(1)  # the cancellation lands here
    assert scope.cancelled_caught
    assert os.listdir(tmp_path) == []
