"""pull --include/--exclude (huggingface_hub's allow/ignore_patterns) and
pull --delete (mirror), through the real CLI on a file store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import cli_env, listing, run_cli, write


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return cli_env((tmp_path / "store").as_uri(), tmp_path / "cache")


@pytest.fixture
def model(tmp_path: Path, env: dict[str, str]) -> str:
    root = tmp_path / "model"
    write(root / "config.json", b"{}\n")
    write(root / "tokenizer.json", b"[]\n")
    write(root / "model.safetensors", b"w" * 5000)
    write(root / "onnx" / "model.onnx", b"o" * 3000)
    write(root / "onnx" / "sub" / "extra.bin", b"x" * 100)
    write(root / "README.md", b"# model\n")
    assert run_cli(["push", root, "models/m"], env).returncode == 0
    return "models/m"


def pull(env: dict[str, str], *args: str | Path) -> dict[str, object]:
    done = run_cli(["pull", *args, "--json"], env)
    assert done.returncode == 0, done.stderr
    doc: dict[str, object] = json.loads(done.stdout)
    return doc


def files(root: Path) -> list[str]:
    return sorted(p for p in listing(root) if (root / p).is_file())


def test_include_and_exclude(env: dict[str, str], model: str, tmp_path: Path) -> None:
    out = tmp_path / "a"
    doc = pull(env, model, out, "--include", "*.json", "--include", "onnx/", "--exclude", "*.bin")
    assert files(out) == ["config.json", "onnx/model.onnx", "tokenizer.json"]
    assert not (out / "onnx" / "sub").exists()  # emptied by the patterns: not created
    assert (doc["files"], doc["bytes"]) == (3, 3 + 3 + 3000)

    only = tmp_path / "b"
    pull(env, model, only, "--exclude", "onnx/", "--exclude", "*.md")
    assert files(only) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert not (only / "onnx").exists()

    # A selection of nothing is a mistake worth one line, and writes nothing.
    none = run_cli(["pull", model, tmp_path / "c", "--include", "*.gguf"], env)
    assert none.returncode == 1
    assert (
        none.stderr
        == f"blobstore: error: no path of {model} matches the include/exclude patterns\n"
    )
    assert not (tmp_path / "c").exists()


def test_delete_mirrors_and_never_follows_symlinks(
    env: dict[str, str], model: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    pull(env, model, out)
    outside = tmp_path / "outside"
    write(outside / "precious", b"keep me\n")
    write(out / "stale.txt", b"old\n")
    write(out / "old-dir" / "deep" / "f", b"old\n")
    write(out / "onnx" / "leftover.onnx", b"old\n")
    os.symlink(outside, out / "link-to-outside")
    os.symlink(outside / "precious", out / "onnx" / "link-to-file")

    # Without --delete nothing extra goes.
    assert pull(env, model, out)["deleted"] == 0
    assert (out / "stale.txt").exists()

    doc = pull(env, model, out, "--delete")
    assert doc["deleted"] == 7  # 2 files, 2 links, old-dir/deep/f and its 2 dirs
    assert files(out) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "onnx/model.onnx",
        "onnx/sub/extra.bin",
        "tokenizer.json",
    ]
    assert (outside / "precious").read_bytes() == b"keep me\n"  # links removed, not followed

    # DIR itself may be a symlink (the user named it), as for the pull
    os.symlink(out, tmp_path / "via-link")
    write(out / "stale-again", b"old\n")
    assert pull(env, model, tmp_path / "via-link", "--delete")["deleted"] == 1
    assert not (out / "stale-again").exists()


def test_delete_with_patterns_only_touches_what_they_select(
    env: dict[str, str], model: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    write(out / "mine.bin", b"not from the model\n")
    write(out / "old.json", b"{}\n")
    write(out / "logs" / "run.json", b"{}\n")
    write(out / "logs" / "run.txt", b"keep\n")
    doc = pull(env, model, out, "--include", "*.json", "--delete")
    # old.json and logs/run.json go; logs/ stays: it still holds run.txt
    assert doc["deleted"] == 2
    assert files(out) == ["config.json", "logs/run.txt", "mine.bin", "tokenizer.json"]


def test_delete_waits_for_a_pull_writing_into_the_destination(tmp_path: Path) -> None:
    """A pull in flight holds the destination's flock; its temp files are not in
    our tree and must survive until it is done."""
    import fcntl
    import threading

    from blobstore.manifest import ChunkerInfo, Tree
    from blobstore.prune import prune

    dest = tmp_path / "dest"
    write(dest / ".in-flight.tmp", b"another pull's temp file")
    holder = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    removed: list[str] = []
    worker = threading.Thread(
        target=lambda: removed.extend(prune(dest, Tree(ChunkerInfo("x", 1, 2, 4), ())).removed)
    )
    worker.start()
    try:
        worker.join(0.5)
        assert (dest / ".in-flight.tmp").exists()  # not while the other pull runs
    finally:
        os.close(holder)  # that pull ends
    worker.join(30)
    assert removed == [".in-flight.tmp"]
