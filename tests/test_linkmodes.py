"""Link modes for real: reflinks on an XFS loop mount (root and mkfs.xfs; CI
installs xfsprogs and runs as root), hardlinks that are read-only and whose
changes are caught, copies elsewhere, and the errors when a mode cannot work."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    assert_one_line_error,
    cli_env,
    make_tree,
    random_bytes,
    run_cli,
    snapshot,
    temp_leftovers,
    write,
)

from blobstore import linking
from blobstore.client import Client
from blobstore.config import CacheConfig, Config, PeerConfig
from blobstore.errors import NotFound
from blobstore.manifest import Tree, file_key


def _need(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI must be able to run this: {reason}")
    pytest.skip(reason)


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh 512 MiB XFS (reflink=1) on a loop device, unmounted afterwards."""
    if os.geteuid() != 0:
        _need("mounting a loop device needs root")
    if shutil.which("mkfs.xfs") is None:
        _need("mkfs.xfs is missing (apt-get install xfsprogs)")
    image = tmp_path / "xfs.img"
    mount = tmp_path / "xfs"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(512 << 20)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        image.unlink(missing_ok=True)


def shared_extents(path: Path) -> bool:
    """Whether ``filefrag`` reports every extent of ``path`` as shared."""
    out = subprocess.run(
        ["filefrag", "-v", str(path)], capture_output=True, text=True, check=True
    ).stdout
    rows = [ln for ln in out.splitlines() if ln.strip()[:1].isdigit() and ":" in ln]
    return bool(rows) and all("shared" in ln for ln in rows)


def push(tmp_path: Path, store: str) -> Path:
    src = make_tree(tmp_path / "src")
    proc = run_cli(["push", src, "t"], cli_env(store, tmp_path / "push-cache"))
    assert proc.returncode == 0, proc.stderr
    return src


def test_reflink_on_xfs_shares_extents(tmp_path: Path, xfs: Path) -> None:
    store = (tmp_path / "store").as_uri()
    src = push(tmp_path, store)
    env = cli_env(store, xfs / "node" / "cache")
    first = run_cli(["pull", "--link-mode", "reflink", "t", xfs / "a"], env)
    assert first.returncode == 0, first.stderr
    again = run_cli(["pull", "--link-mode", "reflink", "t", xfs / "b"], env)  # from the store
    assert again.returncode == 0, again.stderr
    for dst in (xfs / "a", xfs / "b"):
        assert snapshot(dst) == snapshot(src)
        assert shared_extents(dst / "weights.bin")  # a clone of the store's copy
        assert (dst / "weights.bin").stat().st_nlink == 1
        assert temp_leftovers(dst) == []
    # a clone is a separate file: writing it leaves the store's copy intact
    (xfs / "a" / "weights.bin").write_bytes(b"mine now")
    third = run_cli(["pull", "--link-mode", "auto", "t", xfs / "c"], env)
    assert third.returncode == 0, third.stderr
    assert snapshot(xfs / "c") == snapshot(src)
    assert shared_extents(xfs / "c" / "weights.bin")  # auto clones where it can
    # a cold auto pull there too: assembled in the (new) node store, then cloned
    cold_env = cli_env(store, xfs / "node2" / "cache")
    cold = run_cli(["pull", "--link-mode", "auto", "t", xfs / "d"], cold_env)
    assert cold.returncode == 0, cold.stderr
    assert snapshot(xfs / "d") == snapshot(src)
    assert shared_extents(xfs / "d" / "weights.bin")
    assert list((xfs / "node2" / "cache" / "files").rglob("*.*")) == []  # no temp left
    assert any(p.is_file() for p in (xfs / "node2" / "cache" / "files").rglob("*"))


def test_explicit_reflink_where_the_filesystem_cannot(tmp_path: Path, xfs: Path) -> None:
    store = (tmp_path / "store").as_uri()
    push(tmp_path, store)
    env = cli_env(store, tmp_path / "cache")  # the store on tmp_path's filesystem
    warm = run_cli(["pull", "t", tmp_path / "warm"], env)
    assert warm.returncode == 0, warm.stderr
    proc = run_cli(["pull", "--link-mode", "reflink", "t", xfs / "dst"], env)  # across devices
    assert_one_line_error(proc, "reflink", "cannot clone")
    proc = run_cli(["pull", "--link-mode", "hardlink", "t", xfs / "dst"], env)
    assert_one_line_error(proc, "hardlink", "cannot link")
    assert temp_leftovers(xfs / "dst") == []
    # auto falls back to copying
    auto = run_cli(["pull", "t", xfs / "dst"], {**env, "BLOBSTORE_LINK_MODE": "auto"})
    assert auto.returncode == 0, auto.stderr
    assert not shared_extents(xfs / "dst" / "weights.bin")


def test_bad_link_mode_is_one_line(tmp_path: Path) -> None:
    store = (tmp_path / "store").as_uri()
    push(tmp_path, store)
    env = cli_env(store, tmp_path / "cache")
    assert_one_line_error(
        run_cli(["pull", "--link-mode", "symlink", "t", tmp_path / "d"], env),
        "link mode",
        "symlink",
    )
    assert_one_line_error(
        run_cli(["pull", "t", tmp_path / "d"], {**env, "BLOBSTORE_LINK_MODE": "clone"}), "link mode"
    )


def scribble(path: Path) -> None:
    """Write into a file in place, as a runner fine-tuning its weights would."""
    with open(path, "r+b") as f:
        f.write(b"fine-tuned in place")


def config_for(tmp_path: Path) -> Config:
    return Config(
        store_url=(tmp_path / "store").as_uri(),
        cache=CacheConfig(tmp_path / "node" / "cache"),
        peers=PeerConfig(mode="none"),
    )


@pytest.mark.anyio
async def test_hardlink_is_read_only_and_a_write_through_it_is_never_served(
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    write(src / "model.bin", random_bytes(6 << 20, "hl"))
    write(src / "run.sh", b"#!/bin/sh\n", 0o755)
    async with Client.open(config_for(tmp_path), peers=False) as client:
        await client.push(src, "t")
        _, tree = await client.load("t")
        assert isinstance(tree, Tree)
        model = next(e for e in tree.entries if e.path == "model.bin")
        dst = tmp_path / "dst"
        await client.pull("t", dst, link_mode="hardlink")
        placed = dst / "model.bin"
        store_copy = client.cache.file_path(file_key(model))
        assert placed.stat().st_ino == store_copy.stat().st_ino  # the node's copy itself
        assert placed.stat().st_mode & 0o777 == 0o444
        assert (dst / "run.sh").stat().st_mode & 0o777 == 0o555
        assert snapshot(dst)["model.bin"][2] == snapshot(src)["model.bin"][2]
        again = await client.pull("t", dst, link_mode="hardlink")
        assert again.kept_files == 2  # kept on a stat
        # a runner (root ignores the read-only mode) writes into its copy
        scribble(placed)
        # never served: not to a peer ...
        with pytest.raises(NotFound):
            await client.cache.get(model.chunks[0].id)
        assert client.cache.open_file(file_key(model)) is None
        # ... nor linked into another destination, nor kept in this one
        other = await client.pull("t", tmp_path / "other", link_mode="hardlink")
        assert other.from_tier["origin"] == model.size
        repaired = await client.pull("t", dst, link_mode="hardlink")
        assert repaired.kept_files == 1
    for d in (dst, tmp_path / "other"):
        assert {k: v[2] for k, v in snapshot(d).items()} == {
            k: v[2] for k, v in snapshot(src).items()
        }


def remount_after_crash(mount: Path, image: Path) -> None:
    """Shut the filesystem down as a power loss would (``xfs_io -x -c
    "shutdown -f"``, as xfstests' crash tests do: the log reaches the disk,
    dirty data pages never do), then mount it again. Files renamed into place
    come back under their final names, torn (XFS shows them empty)."""
    subprocess.run(["xfs_io", "-x", "-c", "shutdown -f", str(mount)], check=True)
    subprocess.run(["umount", str(mount)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)


@pytest.mark.anyio
async def test_real_loss_of_unwritten_data_on_xfs_is_repaired(
    tmp_path: Path, xfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A warm pull into XFS does not wait for write-back; then the machine
    loses power: the filesystem is shut down without flushing, recovered, and
    the machine comes back with a new boot id. The next pull ends identical."""
    src = make_tree(tmp_path / "src")
    for i in range(20):
        write(src / "more" / f"{i}.bin", random_bytes(300_000 + i, f"more{i}"))
    async with Client.open(config_for(tmp_path), peers=False) as client:
        await client.push(src, "t")
        await client.pull("t", tmp_path / "warmup")  # the node store (on ext4) is warm
        dst = xfs / "dst"
        await client.pull("t", dst)
        assert snapshot(dst) == snapshot(src)
        remount_after_crash(xfs, tmp_path / "xfs.img")
        after_crash = snapshot(dst) if dst.exists() else {}
        torn = [p for p, v in snapshot(src).items() if p in after_crash and after_crash[p] != v]
        assert torn  # torn files under their final names
        booted = (f"rebooted-{os.getpid()}", time.time_ns())
        monkeypatch.setattr("blobstore.materialize._boot", lambda: booted)
        await client.pull("t", dst)
    assert snapshot(dst) == snapshot(src)


@pytest.mark.anyio
async def test_copy_mode_makes_independent_files(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    async with Client.open(config_for(tmp_path), peers=False) as client:
        await client.push(src, "t")
        await client.pull("t", tmp_path / "a", link_mode="copy")
        again = await client.pull("t", tmp_path / "b", link_mode="copy")
        assert again.from_tier["local"] == again.bytes  # from the node store's files
    for d in ("a", "b"):
        assert snapshot(tmp_path / d) == snapshot(src)
        assert (tmp_path / d / "weights.bin").stat().st_nlink == 1


def _clones(store: Path, dest: Path) -> bool:
    if os.stat(store).st_dev != os.stat(dest).st_dev:
        return False
    (dest / "probe").write_bytes(b"x")
    return (
        subprocess.run(
            ["cp", "--reflink=always", dest / "probe", dest / "probe2"],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )


def _scribble_in_place(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(b"\0" * 4096)


@pytest.mark.anyio
async def test_auto_without_clones_writes_once_and_seeds_from_dest(tmp_path: Path) -> None:
    """auto on a filesystem that cannot clone (ext4/tmpfs here): a cold pull
    assembles files in DEST only (the node store writes none) and adopts them
    as seeds; a second DEST is copied from the seed; a changed seed is never
    used (the pull repairs from the object store); chunks served from a seed
    are verified."""
    src = make_tree(tmp_path / "src")
    async with Client.open(config_for(tmp_path), peers=False) as client:
        await client.push(src, "t")
    async with Client.open(config_for(tmp_path), peers=False) as client:
        if _clones(client.cache.root, tmp_path):
            pytest.skip("this filesystem clones: auto reflinks instead of seeding")
        cold = await client.pull("t", tmp_path / "a")
        assert cold.from_tier["origin"] == cold.bytes
        assert list((client.cache.root / "files").glob("??/*")) == []  # written once: in DEST
        assert client.cache.used_bytes == 0  # seeds are the user's, never counted
        again = await client.pull("t", tmp_path / "b")
        assert again.from_tier["local"] == again.bytes  # copied from the seeds in a/
        assert snapshot(tmp_path / "b") == snapshot(src)
        _, tree = await client.load("t")
        assert isinstance(tree, Tree)
        weights = next(e for e in tree.entries if e.path == "weights.bin")
        first = weights.chunks[0]
        assert (
            await client.cache.get(first.id) == (src / "weights.bin").read_bytes()[: first.size]
        )  # served from a seed, verified
        shutil.rmtree(tmp_path / "b")
        # Change the seed in a/ (in place, same size): it must never be used again.
        _scribble_in_place(tmp_path / "a" / "weights.bin")
        fresh = await client.pull("t", tmp_path / "c")
        assert fresh.from_tier["origin"] > 0
        assert snapshot(tmp_path / "c") == snapshot(src)
    async with Client.open(config_for(tmp_path), peers=False) as client:
        repaired = await client.pull("t", tmp_path / "a")
        assert snapshot(tmp_path / "a") == snapshot(src)
        assert repaired.files - repaired.kept_files == 1
        (tmp_path / "a" / "config.json").unlink()
        gone = await client.pull("t", tmp_path / "d")  # the deleted seed is forgotten
        assert snapshot(tmp_path / "d") == snapshot(src)
        assert gone.from_tier["origin"] > 0


@pytest.mark.anyio
async def test_after_a_reboot_seeds_are_rechecked_then_adopted_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_tree(tmp_path / "src")
    async with Client.open(config_for(tmp_path), peers=False) as client:
        await client.push(src, "t")
        if _clones(client.cache.root, tmp_path):
            pytest.skip("this filesystem clones: auto reflinks instead of seeding")
        await client.pull("t", tmp_path / "a")
    booted = (f"rebooted-{time.time_ns()}", time.time_ns())
    monkeypatch.setattr("blobstore.materialize._boot", lambda: booted)
    monkeypatch.setattr("blobstore.nodestore.boot", lambda: booted)
    async with Client.open(config_for(tmp_path), peers=False) as client:
        elsewhere = await client.pull("t", tmp_path / "b")
        assert elsewhere.from_tier["origin"] == elsewhere.bytes  # unsynced seeds: dropped
        again = await client.pull("t", tmp_path / "a")  # checked chunk by chunk, kept
        assert again.kept_files == again.files
    async with Client.open(config_for(tmp_path), peers=False) as client:
        shutil.rmtree(tmp_path / "b")
        local = await client.pull("t", tmp_path / "b")
        assert local.from_tier["origin"] == 0  # a/ (or b/) seeds the node again
        assert snapshot(tmp_path / "b") == snapshot(src)


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, (1 << 20) + 7, (64 << 20) + 4093])
def test_copy_fd_copies_every_size_exactly(
    tmp_path: Path, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kernel copy below 1 MiB, one buffer above, two threads from 64 MiB: the
    same bytes whichever path a size takes (odd sizes end mid-buffer); the
    buffered copies reserve the file's blocks first, and allocate each once."""
    from blobstore import pwrite

    reserved: list[int] = []
    real_preallocate = pwrite.preallocate

    def preallocate(fd: int, size: int) -> None:
        reserved.append(size)
        real_preallocate(fd, size)

    monkeypatch.setattr(pwrite, "preallocate", preallocate)
    data = os.urandom(min(size, 1 << 20)) * (size // (1 << 20) + 1)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(data[:size])
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        linking.copy_fd(sfd, dfd, size)
    finally:
        os.close(sfd)
        os.close(dfd)
    assert dst.stat().st_size == size
    assert dst.read_bytes() == data[:size]
    assert reserved == ([size] if size >= 1 << 20 else [])
    assert dst.stat().st_blocks * 512 < size + (64 << 10)


@pytest.mark.parametrize("size", [1 << 19, 8 << 20, 80 << 20])
def test_copy_fd_of_a_source_cut_short_is_an_error(tmp_path: Path, size: int) -> None:
    """A node-store file shorter than its record (truncated under the pull) is
    an EIO from every copy path, the split one's second thread included."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"x" * (size // 2))
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with pytest.raises(OSError, match="source ended") as info:
            linking.copy_fd(sfd, dfd, size)
        assert info.value.errno == errno.EIO
    finally:
        os.close(sfd)
        os.close(dfd)
