"""Manifest codec: round trips, canonical ids, and refusal of every malformed or
malicious manifest (InvalidManifest / UnsafePath) before anything is written."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from helpers import (
    assert_one_line_error,
    cli_env,
    listing,
    pack,
    put_objects,
    run_cli,
    store_raw_manifest,
)

from blobstore.chunker import DEFAULT_PARAMS
from blobstore.errors import BadInput, Corrupt, InvalidManifest, UnsafePath
from blobstore.ids import hash_bytes, id_to_bytes
from blobstore.manifest import (
    VERSION,
    ChunkRef,
    Entry,
    Image,
    ImageLayer,
    Layer,
    Tree,
    check_relpath,
    decode,
    encode,
    manifest_id,
)
from blobstore.objectstore import chunk_key

CONTENT = b"hello, world\n"
CONTENT_ID = hash_bytes(CONTENT)


def sample_tree() -> Tree:
    cid = hash_bytes(b"chunk")
    return Tree(
        DEFAULT_PARAMS.info(),
        (
            Entry("b/file", "file", 0o644, 5, hash_bytes(b"chunk"), (ChunkRef(cid, 5),)),
            Entry("a", "dir", 0o755),
            Entry("b", "dir", 0o700),
            Entry("b/empty", "file", 0o600, 0, hash_bytes(b""), ()),
            Entry("link", "symlink", 0o777, target="b/file"),
        ),
    )


def test_tree_round_trip_and_canonical_id() -> None:
    tree = sample_tree()
    data = encode(tree)
    back = decode(data)
    assert isinstance(back, Tree)
    assert back.chunker == DEFAULT_PARAMS.info()
    assert sorted(back.entries, key=lambda e: e.path) == sorted(tree.entries, key=lambda e: e.path)
    # Canonical: entry order does not change the bytes, so not the id either.
    shuffled = Tree(tree.chunker, tuple(reversed(tree.entries)))
    assert encode(shuffled) == data
    assert manifest_id(data) == hash_bytes(data)
    assert back.size == 5


def test_chunker_params_are_recorded() -> None:
    raw = msgpack.unpackb(encode(sample_tree()))
    assert raw["v"] == VERSION
    assert raw["chunker"] == {
        "name": "fastcdc2020-pyfastcdc",
        "min": DEFAULT_PARAMS.min_size,
        "avg": DEFAULT_PARAMS.avg_size,
        "max": DEFAULT_PARAMS.max_size,
    }


def test_layer_and_image_round_trip() -> None:
    cid = hash_bytes(b"x")
    layer = Layer("sha256:" + "ab" * 32, "application/vnd.oci.image.layer.v1.tar", 1,
                  DEFAULT_PARAMS.info(), (ChunkRef(cid, 1),))
    assert decode(encode(layer)) == layer
    image = Image(b'{"schemaVersion": 2}', "application/vnd.oci.image.manifest.v1+json",
                  b"{}", (ImageLayer("sha256:" + "cd" * 32, cid),), ("v1",))
    assert decode(encode(image)) == image


# --------------------------------------------------------------------------- bad input


def good_obj() -> dict[str, Any]:
    """A valid tree manifest as plain msgpack data, to be broken by each case."""
    return {
        "v": VERSION,
        "kind": "tree",
        "chunker": {"name": "fastcdc2020-pyfastcdc", "min": 1, "avg": 2, "max": 4},
        "entries": [
            {"p": "good.txt", "t": "file", "m": 0o644, "s": len(CONTENT),
             "h": id_to_bytes(CONTENT_ID), "c": [[id_to_bytes(CONTENT_ID), len(CONTENT)]]},
            {"p": "sub", "t": "dir", "m": 0o755},
        ],
    }


def _with_entry(entry: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    def mutate(obj: dict[str, Any]) -> None:
        obj["entries"].append(entry)

    return mutate


def _file(path: str) -> dict[str, Any]:
    return {"p": path, "t": "file", "m": 0o644, "s": len(CONTENT), "h": id_to_bytes(CONTENT_ID),
            "c": [[id_to_bytes(CONTENT_ID), len(CONTENT)]]}


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(obj: dict[str, Any]) -> None:
        obj[key] = value

    return mutate


def _set_entry(index: int, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(obj: dict[str, Any]) -> None:
        obj["entries"][index][key] = value

    return mutate


def _del(key: str) -> Callable[[dict[str, Any]], None]:
    def mutate(obj: dict[str, Any]) -> None:
        del obj[key]

    return mutate


# (id, mutation, error type, message fragment)
BAD_CASES: list[tuple[str, Callable[[dict[str, Any]], None], type[Exception], str]] = [
    ("wrong-version", _set("v", 2), InvalidManifest, "unsupported manifest version 2"),
    ("version-as-string", _set("v", "1"), InvalidManifest, "'v' has the wrong type"),
    ("missing-version", _del("v"), InvalidManifest, "missing field 'v'"),
    ("unknown-kind", _set("kind", "blob"), InvalidManifest, "unknown manifest kind"),
    ("entries-not-list", _set("entries", {"a": 1}), InvalidManifest, "wrong type"),
    ("chunker-missing", _del("chunker"), InvalidManifest, "chunker"),
    ("mode-as-string", _set_entry(0, "m", "0644"), InvalidManifest, "'m' has the wrong type"),
    ("mode-out-of-range", _set_entry(0, "m", 0o170000), InvalidManifest, "out of range"),
    ("size-as-bool", _set_entry(0, "s", True), InvalidManifest, "wrong type"),
    ("negative-size", _set_entry(0, "s", -1), InvalidManifest, "out of range"),
    ("path-as-bytes", _set_entry(0, "p", b"good.txt"), InvalidManifest, "wrong type"),
    ("short-chunk-id", _set_entry(0, "c", [[b"\x01" * 31, len(CONTENT)]]), InvalidManifest,
     "bad id"),
    ("chunk-sizes-do-not-add-up", _set_entry(0, "s", 999), InvalidManifest, "do not add up"),
    ("zero-size-chunk", _set_entry(0, "c", [[id_to_bytes(CONTENT_ID), 0]]), InvalidManifest,
     "bad chunk size"),
    ("entry-not-map", _with_entry(["x"]), InvalidManifest, "expected a map"),
    ("unknown-entry-type", _with_entry({"p": "fifo", "t": "fifo", "m": 0o644}), InvalidManifest,
     "unknown entry type"),
    ("duplicate-path", _with_entry(_file("good.txt")), InvalidManifest, "duplicate path"),
    ("dir-and-file-same-path", _with_entry({"p": "good.txt", "t": "dir", "m": 0o755}),
     InvalidManifest, "duplicate path"),
    ("dotdot", _with_entry(_file("../escape.txt")), UnsafePath, "unsafe path"),
    ("dotdot-inside", _with_entry(_file("sub/../../escape.txt")), UnsafePath, "unsafe path"),
    ("absolute", _with_entry(_file("/tmp/escape.txt")), UnsafePath, "absolute path"),
    ("dot-component", _with_entry(_file("./x")), UnsafePath, "unsafe path"),
    ("empty-component", _with_entry(_file("sub//x")), UnsafePath, "unsafe path"),
    ("nul-byte", _with_entry(_file("a\x00b")), UnsafePath, "NUL"),
    ("empty-path", _with_entry(_file("")), UnsafePath, "empty path"),
    ("through-symlink", lambda o: o["entries"].extend(
        [{"p": "ln", "t": "symlink", "m": 0o777, "l": "/tmp"}, _file("ln/escape.txt")]),
     UnsafePath, "goes through symlink"),
    ("below-a-file", _with_entry(_file("good.txt/child")), InvalidManifest, "below file"),
    ("symlink-empty-target", _with_entry({"p": "l", "t": "symlink", "m": 0o777, "l": ""}),
     InvalidManifest, "bad symlink target"),
]


def bad_manifest(mutate: Callable[[dict[str, Any]], None]) -> bytes:
    obj = copy.deepcopy(good_obj())
    mutate(obj)
    return pack(obj)


RAW_CASES: list[tuple[str, bytes, str]] = [
    ("truncated", pack(good_obj())[:-7], "not valid msgpack"),
    ("empty", b"", "not valid msgpack"),
    ("trailing-garbage", pack(good_obj()) + b"\x00", "not valid msgpack"),
    ("not-a-map", pack([1, "tree"]), "expected a map"),
    ("json", b'{"v": 1, "kind": "tree"}', "manifest"),
]


def test_good_obj_is_valid() -> None:
    tree = decode(pack(good_obj()))
    assert isinstance(tree, Tree)
    assert [e.path for e in tree.entries] == ["good.txt", "sub"]


@pytest.mark.parametrize(("mutate", "error", "match"),
                         [pytest.param(m, e, t, id=i) for i, m, e, t in BAD_CASES])
def test_decode_refuses(
    mutate: Callable[[dict[str, Any]], None], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match) as info:
        decode(bad_manifest(mutate))
    assert isinstance(info.value, BadInput)  # a user-facing error, nothing was changed
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("data", "match"), [pytest.param(d, m, id=i) for i, d, m in RAW_CASES])
def test_decode_refuses_raw(data: bytes, match: str) -> None:
    with pytest.raises(InvalidManifest, match=match) as info:
        decode(data)
    assert isinstance(info.value, Corrupt)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "path", ["..", "../x", "a/..", "a/../b", "/etc/passwd", "a//b", "a/./b", "", "a/", "x\x00y"]
)
def test_check_relpath_refuses(path: str) -> None:
    with pytest.raises(UnsafePath):
        check_relpath(path)


@pytest.mark.parametrize("path", ["a", "a/b/c", "..a", "a..", ".hidden", "a b/ü"])
def test_check_relpath_accepts(path: str) -> None:
    assert check_relpath(path) == path


# --------------------------------------------------------------------------- via the CLI

CLI_CASES = [
    pytest.param(bad_manifest(m), t, id=i)
    for i, m, _, t in BAD_CASES
    if i in ("wrong-version", "mode-as-string", "duplicate-path", "dotdot", "dotdot-inside",
             "absolute", "through-symlink", "nul-byte", "chunk-sizes-do-not-add-up")
] + [pytest.param(d, m, id=i) for i, d, m in RAW_CASES if i in ("truncated", "not-a-map")]


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    """A destination that already holds a file, inside an outer dir watched for escapes."""
    outer = tmp_path / "outer"
    (outer / "dest").mkdir(parents=True)
    (outer / "dest" / "existing.txt").write_bytes(b"keep me")
    return outer / "dest"


@pytest.mark.parametrize(("data", "match"), CLI_CASES)
def test_pull_of_malicious_manifest_writes_nothing(
    object_store_url: str, tmp_path: Path, dest: Path, data: bytes, match: str
) -> None:
    put_objects(object_store_url, {chunk_key(CONTENT_ID): CONTENT})  # the good file's chunk
    store_raw_manifest(object_store_url, data, "evil/tree")
    outer_before = listing(tmp_path / "outer")
    env = cli_env(object_store_url, tmp_path / "cache")
    proc = run_cli(["pull", "evil/tree", dest], env)
    assert_one_line_error(proc, match)
    assert listing(tmp_path / "outer") == outer_before
    assert (dest / "existing.txt").read_bytes() == b"keep me"
    assert not (tmp_path / "escape.txt").exists()
    assert not Path("/tmp/escape.txt").exists()


def test_corrupt_manifest_bytes_detected(object_store_url: str, tmp_path: Path) -> None:
    """A manifest whose bytes no longer match its id is refused (not decoded)."""
    good = pack(good_obj())
    manifest = store_raw_manifest(object_store_url, good, "t")
    put_objects(object_store_url, {f"manifests/{manifest}": good.replace(b"sub", b"sux")})
    proc = run_cli(["pull", "t", tmp_path / "dest"], cli_env(object_store_url, tmp_path / "c"))
    assert_one_line_error(proc, "corrupt")
    assert not (tmp_path / "dest").exists()

