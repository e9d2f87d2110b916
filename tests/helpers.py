"""Shared test data builders and CLI helpers.

``random_bytes`` is BLAKE3's extendable output: deterministic, incompressible
and ~4x faster than ``os.urandom`` here, so gigabyte trees build in seconds.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
import blake3
import msgpack

from blobstore.ids import hash_bytes
from blobstore.objectstore import manifest_key, ref_key
from blobstore.stores import open_object_store

BLOBSTORE = str(Path(sys.executable).parent / "blobstore")
TMP_MARK = ".blobstore-tmp-"


def random_bytes(size: int, seed: int | str = 0) -> bytes:
    """``size`` pseudo-random bytes, the same for the same seed."""
    return blake3.blake3(str(seed).encode()).digest(length=size)


def write(path: Path, data: bytes, mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mode is not None:
        path.chmod(mode)
    return path


def make_tree(root: Path, seed: int = 0) -> Path:
    """A small tree with every kind of entry: a multi-chunk file, nested dirs,
    an empty file, an empty dir, symlinks, executable and read-only modes."""
    write(root / "weights.bin", random_bytes(9 << 20, f"{seed}-w"))
    write(root / "config.json", b'{"layers": 32}\n', 0o640)
    write(root / "bin" / "run.sh", b"#!/bin/sh\necho hi\n", 0o755)
    write(root / "deep" / "er" / "est" / "leaf.txt", random_bytes(1000, f"{seed}-l"))
    write(root / "readonly.txt", b"do not touch\n", 0o444)
    write(root / "empty.txt", b"")
    (root / "empty-dir").mkdir()
    (root / "empty-dir" / "nested-empty").mkdir()
    os.symlink("deep/er/est/leaf.txt", root / "link-to-leaf")
    os.symlink("deep/er", root / "link-to-dir")
    os.symlink("/nonexistent/target", root / "dangling")
    return root


def make_big_tree(root: Path, total: int, seed: int = 0) -> int:
    """A tree of about ``total`` bytes: a few big files (one a shifted copy of
    another, so content is partly duplicated) and many small files (some of them
    identical). Returns the exact byte count."""
    big_share = total * 3 // 4
    n_big = 3
    unique_big = big_share // (n_big + 1)
    written = 0
    for i in range(n_big):
        data = random_bytes(unique_big, f"{seed}-big-{i}")
        write(root / "models" / f"shard-{i}.bin", data)
        written += len(data)
        if i == 0:  # a copy with 4 KiB inserted at the front: CDC re-syncs after a chunk
            with open(root / "models" / "shard-0-v2.bin", "wb") as f:
                f.write(random_bytes(4096, f"{seed}-insert"))
                f.write(data)
            written += 4096 + len(data)
        del data
    small_total = total - written
    size = 192 << 10
    pool = random_bytes(size * 64, f"{seed}-small")
    i = 0
    while small_total > 0:
        n = min(size - (i * 4099) % (size // 2), small_total)
        start = (i * 7919) % (len(pool) - n)
        if i % 5 == 0:  # every fifth small file repeats an earlier one's bytes
            start = 0
        write(root / "cache" / f"d{i % 37:02d}" / f"f{i:05d}.bin", pool[start : start + n])
        small_total -= n
        written += n
        i += 1
    return written


def snapshot(root: Path) -> dict[str, tuple[str, int, str]]:
    """``{relpath: (kind, mode, blake3-of-content | link target)}`` without following links."""
    out: dict[str, tuple[str, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", 0, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", mode, "")
            else:
                h = blake3.blake3(max_threads=blake3.blake3.AUTO)
                if st.st_size:
                    h.update_mmap(path)
                out[rel] = ("file", mode, h.hexdigest())
    return out


def listing(root: Path) -> list[str]:
    """Every path under ``root`` (links not followed), sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def temp_leftovers(root: Path) -> list[str]:
    return [p for p in listing(root) if TMP_MARK in p or "/.tmp-" in f"/{p}"]


# --------------------------------------------------------------------------- CLI


def cli_env(store: str, cache: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment (AWS_* included) plus blobstore settings, peers off."""
    env = dict(os.environ)
    env.update(BLOBSTORE_STORE=store, BLOBSTORE_CACHE=str(cache), BLOBSTORE_PEERS="none")
    env.update(extra or {})
    return env


def run_cli(
    args: Sequence[str | Path], env: Mapping[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BLOBSTORE, *map(str, args)],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def error_lines(stderr: str) -> list[str]:
    """The non-empty lines of stderr."""
    return [ln for ln in stderr.splitlines() if ln]


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 1, exactly one ``blobstore: error:`` line mentioning ``needles``, no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("blobstore: error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- manifests


def pack(obj: object) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def put_objects(store_url: str, objects: Mapping[str, bytes]) -> None:
    """Write raw objects into a store (from synchronous tests)."""

    async def main() -> None:
        async with open_object_store(store_url) as store:
            for key, data in objects.items():
                await store.put(key, data)

    anyio.run(main)


def get_object(store_url: str, key: str) -> bytes:
    async def main() -> bytes:
        async with open_object_store(store_url) as store:
            return await store.get(key)

    return anyio.run(main)


def store_raw_manifest(store_url: str, data: bytes, ref: str) -> str:
    """Store raw manifest bytes under their true id and point ``ref`` at them."""
    manifest_id = hash_bytes(data)
    put_objects(
        store_url, {manifest_key(manifest_id): data, ref_key(ref): manifest_id.encode() + b"\n"}
    )
    return manifest_id
