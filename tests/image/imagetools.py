"""Build real images with umoci and skopeo (no Docker daemon), for tests."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
from pathlib import Path


def run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc.stdout


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (1_700_000_000, 1_700_000_000))
    return root


class Umoci:
    """One OCI image layout directory, grown with ``umoci new/insert/tag``."""

    def __init__(self, layout: Path) -> None:
        self.layout = layout
        run("umoci", "init", "--layout", str(layout))

    def new(self, tag: str) -> None:
        run("umoci", "new", "--image", f"{self.layout}:{tag}")

    def tag(self, src: str, dst: str) -> None:
        run("umoci", "tag", "--image", f"{self.layout}:{src}", dst)

    def insert(self, tag: str, source: Path, target: str = "/") -> None:
        """Add one layer holding ``source`` (a file or a directory) at ``target``."""
        run("umoci", "insert", "--rootless", "--image", f"{self.layout}:{tag}", str(source), target)


def skopeo_copy(src: str, dst: str, *flags: str) -> None:
    run("skopeo", "copy", "--quiet", *flags, src, dst)


def skopeo_inspect(target: str) -> dict[str, object]:
    raw: dict[str, object] = json.loads(run("skopeo", "inspect", target))
    return raw


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return "sha256:" + h.hexdigest()


def check_layout_blobs(layout: Path) -> int:
    """Assert every blob of an OCI layout hashes to its name; return the count."""
    blobs = sorted((layout / "blobs" / "sha256").iterdir())
    for blob in blobs:
        assert sha256_file(blob) == "sha256:" + blob.name, blob
    return len(blobs)


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)
