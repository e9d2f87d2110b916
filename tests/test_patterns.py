"""blobstore.patterns.select: huggingface_hub allow/ignore_patterns semantics on a tree."""

from __future__ import annotations

import pytest

from blobstore.manifest import ChunkerInfo, Entry, Tree
from blobstore.patterns import select

CHUNKER = ChunkerInfo("fastcdc", 1, 2, 4)


def tree(*paths: str) -> Tree:
    """Entries from paths; a trailing "/" makes a directory."""
    return Tree(
        CHUNKER,
        tuple(
            Entry(p.rstrip("/"), "dir", 0o755) if p.endswith("/") else Entry(p, "file", 0o644)
            for p in paths
        ),
    )


def paths(t: Tree) -> list[str]:
    return [e.path for e in t.entries]


SAMPLE = tree(
    "config.json",
    "model.safetensors",
    "onnx/",
    "onnx/model.onnx",
    "onnx/sub/",
    "onnx/sub/weights.bin",
    "empty/",
    "README.md",
)


def test_no_patterns_is_the_same_tree() -> None:
    assert select(SAMPLE) is SAMPLE


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        (["*.json"], [], ["config.json"]),
        # "*" crosses "/" as in fnmatch (and huggingface_hub).
        (["*.bin"], [], ["onnx/", "onnx/sub/", "onnx/sub/weights.bin"]),
        # A trailing "/" selects the whole directory, the directory itself included.
        (["onnx/"], [], ["onnx/", "onnx/model.onnx", "onnx/sub/", "onnx/sub/weights.bin"]),
        (
            [],
            ["onnx/"],
            ["config.json", "model.safetensors", "empty/", "README.md"],
        ),
        # Exclude wins over include.
        (["onnx/"], ["*.bin"], ["onnx/", "onnx/model.onnx"]),
        (["*.json", "*.md"], [], ["config.json", "README.md"]),
        # An asked-for empty directory is kept.
        (["empty/"], [], ["empty/"]),
        # Case matters (POSIX paths).
        (["*.JSON"], [], []),
        (["nothing*"], [], []),
        # A pattern is matched against the whole path, not a component.
        (["model.onnx"], [], []),
    ],
)
def test_select(include: list[str], exclude: list[str], expected: list[str]) -> None:
    got = select(SAMPLE, include, exclude)
    kinds = {e.path: e.kind for e in SAMPLE.entries}
    assert [p + "/" if kinds[p] == "dir" else p for p in paths(got)] == expected
    assert got.chunker == SAMPLE.chunker


def test_symlinks_are_selected_like_files() -> None:
    t = Tree(
        CHUNKER,
        (
            Entry("a", "dir", 0o755),
            Entry("a/link", "symlink", 0o777, target="../x"),
            Entry("x", "file", 0o644),
        ),
    )
    assert paths(select(t, ["a/*"])) == ["a", "a/link"]
    # A directory whose contents are all filtered out is not created.
    assert paths(select(t, [], ["*link"])) == ["x"]
