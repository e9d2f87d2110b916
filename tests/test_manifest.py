"""Manifest codec: round trips, canonical ids, v1 still read, file keys, and
refusal of every malformed or malicious manifest (InvalidManifest / UnsafePath)
before anything is written."""

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
from blobstore.errors import BadInput, InvalidManifest, UnsafePath
from blobstore.ids import ChunkId, hash_bytes, id_to_bytes
from blobstore.manifest import (
    MAX_PACK_BYTES,
    VERSION,
    ChunkerInfo,
    ChunkRef,
    Entry,
    Image,
    ImageLayer,
    Layer,
    Tree,
    check_relpath,
    decode,
    encode,
    file_key,
)
from blobstore.objectstore import chunk_key

CONTENT = b"hello, world\n"
CONTENT_ID = hash_bytes(CONTENT)


PACK = hash_bytes(b"a pack")


def v2_file(path: str, mode: int, chunks: tuple[ChunkRef, ...]) -> Entry:
    entry = Entry(path, "file", mode, sum(c.size for c in chunks), None, chunks)
    return Entry(path, "file", mode, entry.size, file_key(entry), chunks)


def sample_tree() -> Tree:
    cid = hash_bytes(b"chunk")
    return Tree(
        DEFAULT_PARAMS.info(),
        (
            v2_file("b/file", 0o644, (ChunkRef(cid, 5, PACK, 0), ChunkRef(cid, 5, PACK, 0))),
            Entry("a", "dir", 0o755),
            Entry("b", "dir", 0o700),
            v2_file("b/empty", 0o600, ()),
            v2_file("b/loose", 0o600, (ChunkRef(cid, 5),)),  # still in the per-chunk layout
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
    assert back.size == 15


def test_file_key_is_over_the_chunk_list() -> None:
    a, b = hash_bytes(b"a"), hash_bytes(b"b")
    key = file_key(v2_file("f", 0o644, (ChunkRef(a, 1, PACK, 0), ChunkRef(b, 1, PACK, 1))))
    # Where the chunks live does not count; their ids, sizes and order do.
    assert key == file_key(v2_file("g", 0o600, (ChunkRef(a, 1), ChunkRef(b, 1))))
    assert key != file_key(v2_file("f", 0o644, (ChunkRef(b, 1), ChunkRef(a, 1))))
    assert key != file_key(v2_file("f", 0o644, (ChunkRef(a, 1),)))
    # Not the BLAKE3 of the bytes, nor of an empty input: a domain of its own.
    assert file_key(v2_file("e", 0o644, ())) != hash_bytes(b"")


def test_encode_derives_the_v2_digest() -> None:
    cid = hash_bytes(b"x")
    stale = Entry("f", "file", 0o644, 1, hash_bytes(b"x"), (ChunkRef(cid, 1, PACK, 7),))
    back = decode(encode(Tree(DEFAULT_PARAMS.info(), (stale,))))
    assert isinstance(back, Tree)
    assert back.entries[0].digest == file_key(stale)
    assert back.entries[0].chunks == (ChunkRef(cid, 1, PACK, 7),)


def test_v1_manifest_still_decodes() -> None:
    tree = decode(pack(good_obj()))
    assert isinstance(tree, Tree)
    good = tree.entries[0]
    assert good.digest == CONTENT_ID  # v1: the BLAKE3 of the bytes
    assert good.chunks == (ChunkRef(CONTENT_ID, len(CONTENT)),)
    assert good.chunks[0].pack is None  # v1 chunks live under chunks/
    assert file_key(good) != good.digest


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
    layer = Layer(
        "sha256:" + "ab" * 32,
        "application/vnd.oci.image.layer.v1.tar",
        1,
        DEFAULT_PARAMS.info(),
        (ChunkRef(cid, 1, PACK, 3),),
    )
    assert decode(encode(layer)) == layer
    image = Image(
        b'{"schemaVersion": 2}',
        "application/vnd.oci.image.manifest.v1+json",
        b"{}",
        (ImageLayer("sha256:" + "cd" * 32, cid),),
        ("v1",),
    )
    assert decode(encode(image)) == image


# --------------------------------------------------------------------------- bad input


def good_obj() -> dict[str, Any]:
    """A valid v1 tree manifest as plain msgpack data, to be broken by each case."""
    return {
        "v": 1,
        "kind": "tree",
        "chunker": {"name": "fastcdc2020-pyfastcdc", "min": 1, "avg": 2, "max": 4},
        "entries": [
            {
                "p": "good.txt",
                "t": "file",
                "m": 0o644,
                "s": len(CONTENT),
                "h": id_to_bytes(CONTENT_ID),
                "c": [[id_to_bytes(CONTENT_ID), len(CONTENT)]],
            },
            {"p": "sub", "t": "dir", "m": 0o755},
        ],
    }


def _with_entry(entry: object) -> Callable[[dict[str, Any]], None]:
    def mutate(obj: dict[str, Any]) -> None:
        obj["entries"].append(entry)

    return mutate


def _file(path: str) -> dict[str, Any]:
    return {
        "p": path,
        "t": "file",
        "m": 0o644,
        "s": len(CONTENT),
        "h": id_to_bytes(CONTENT_ID),
        "c": [[id_to_bytes(CONTENT_ID), len(CONTENT)]],
    }


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


_PACK_RAW = id_to_bytes(PACK)


def _c() -> list[Any]:
    return [id_to_bytes(CONTENT_ID), len(CONTENT)]


def _v2(
    chunks: list[list[Any]] | None = None, digest: bytes | str | None = "whole-file"
) -> Callable[[dict[str, Any]], None]:
    """Make the good manifest v2 (its file keeps the v1 whole-file digest unless
    ``digest`` says otherwise), with ``chunks`` as the good file's chunk list."""

    def mutate(obj: dict[str, Any]) -> None:
        obj["v"] = 2
        entry = obj["entries"][0]
        if chunks is not None:
            entry["c"] = chunks
            ok = v2_file("x", 0o644, (ChunkRef(CONTENT_ID, len(CONTENT)),))
            entry["h"] = id_to_bytes(file_key(ok))  # so only the chunk list is wrong
        if digest != "whole-file":
            entry["h"] = digest

    return mutate


# (id, mutation, error type, message fragment)
BAD_CASES: list[tuple[str, Callable[[dict[str, Any]], None], type[Exception], str]] = [
    ("wrong-version", _set("v", 3), InvalidManifest, "unsupported manifest version 3"),
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
    (
        "short-chunk-id",
        _set_entry(0, "c", [[b"\x01" * 31, len(CONTENT)]]),
        InvalidManifest,
        "bad id",
    ),
    ("chunk-sizes-do-not-add-up", _set_entry(0, "s", 999), InvalidManifest, "do not add up"),
    (
        "zero-size-chunk",
        _set_entry(0, "c", [[id_to_bytes(CONTENT_ID), 0]]),
        InvalidManifest,
        "bad chunk size",
    ),
    ("entry-not-map", _with_entry(["x"]), InvalidManifest, "expected a map"),
    (
        "unknown-entry-type",
        _with_entry({"p": "fifo", "t": "fifo", "m": 0o644}),
        InvalidManifest,
        "unknown entry type",
    ),
    ("duplicate-path", _with_entry(_file("good.txt")), InvalidManifest, "duplicate path"),
    (
        "dir-and-file-same-path",
        _with_entry({"p": "good.txt", "t": "dir", "m": 0o755}),
        InvalidManifest,
        "duplicate path",
    ),
    ("dotdot", _with_entry(_file("../escape.txt")), UnsafePath, "unsafe path"),
    ("dotdot-inside", _with_entry(_file("sub/../../escape.txt")), UnsafePath, "unsafe path"),
    ("absolute", _with_entry(_file("/tmp/escape.txt")), UnsafePath, "absolute path"),
    ("dot-component", _with_entry(_file("./x")), UnsafePath, "unsafe path"),
    ("empty-component", _with_entry(_file("sub//x")), UnsafePath, "unsafe path"),
    ("nul-byte", _with_entry(_file("a\x00b")), UnsafePath, "NUL"),
    ("empty-path", _with_entry(_file("")), UnsafePath, "empty path"),
    (
        "through-symlink",
        lambda o: o["entries"].extend(
            [{"p": "ln", "t": "symlink", "m": 0o777, "l": "/tmp"}, _file("ln/escape.txt")]
        ),
        UnsafePath,
        "goes through symlink",
    ),
    ("below-a-file", _with_entry(_file("good.txt/child")), InvalidManifest, "below file"),
    (
        "symlink-empty-target",
        _with_entry({"p": "l", "t": "symlink", "m": 0o777, "l": ""}),
        InvalidManifest,
        "bad symlink target",
    ),
    (
        "v1-located-chunk",
        _set_entry(0, "c", [[*_c(), _PACK_RAW, 0]]),
        InvalidManifest,
        "bad chunk entry",
    ),
    ("v2-whole-file-digest", _v2(), InvalidManifest, "digest does not match the chunk list"),
    ("v2-short-pack-id", _v2([[*_c(), b"\x01" * 31, 0]]), InvalidManifest, "pack: bad id"),
    ("v2-pack-id-as-text", _v2([[*_c(), "ab" * 32, 0]]), InvalidManifest, "pack: bad id"),
    ("v2-negative-offset", _v2([[*_c(), _PACK_RAW, -1]]), InvalidManifest, "bad chunk offset"),
    ("v2-offset-as-bool", _v2([[*_c(), _PACK_RAW, True]]), InvalidManifest, "bad chunk offset"),
    (
        "v2-offset-past-pack",
        _v2([[*_c(), _PACK_RAW, MAX_PACK_BYTES]]),
        InvalidManifest,
        "bad chunk offset",
    ),
    ("v2-three-fields", _v2([[*_c(), _PACK_RAW]]), InvalidManifest, "bad chunk entry"),
    ("v2-no-digest", _v2(digest=None), InvalidManifest, "digest does not match"),
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
    v2 = copy.deepcopy(good_obj())
    v2["v"] = VERSION
    v2["entries"][0]["c"] = [[*_c(), _PACK_RAW, 5]]
    v2["entries"][0]["h"] = id_to_bytes(file_key(tree.entries[0]))
    back = decode(pack(v2))
    assert isinstance(back, Tree)
    assert back.entries[0].chunks == (ChunkRef(CONTENT_ID, len(CONTENT), PACK, 5),)


@pytest.mark.parametrize(
    ("mutate", "error", "match"), [pytest.param(m, e, t, id=i) for i, m, e, t in BAD_CASES]
)
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
    assert isinstance(info.value, BadInput)  # the same bytes anywhere: tell the user
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
    if i
    in (
        "wrong-version",
        "mode-as-string",
        "duplicate-path",
        "dotdot",
        "dotdot-inside",
        "absolute",
        "through-symlink",
        "nul-byte",
        "chunk-sizes-do-not-add-up",
    )
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


# --------------------------------------------------------------------------- pinned bytes
# The encoding is the storage format: a change to these bytes changes every
# manifest id, so old refs stop matching new pushes. Change them only with a new
# VERSION (and keep reading the old one).


def unhex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


A, B, PINNED_PACK = ChunkId("a1" * 32), ChunkId("b2" * 32), ChunkId("c3" * 32)
PINNED_CHUNKER = ChunkerInfo("fastcdc2020-pyfastcdc", 256, 1024, 4096)
PINNED_CHUNKS = (ChunkRef(A, 100, PINNED_PACK, 0), ChunkRef(B, 200, PINNED_PACK, 100))
PINNED_FILE_KEY = "4c96ee42cd08baf35db787fc71953c580091ff3dfb73bca05c54b93c51129a60"
EMPTY_FILE_KEY = "84c399f0bd82fa866ef759a4b3c095c9eacf66d3ed3c33d327bcf82e57608d1c"

PINNED_TREE_V2 = unhex(
    """
    84a76368756e6b657284a3617667cd0400a36d6178cd1000a36d696ecd0100a46e616d65b566617374636463
    323032302d707966617374636463a7656e74726965739483a16dcd01eda170a464617461a174a364697286a1
    6390a168c42084c399f0bd82fa866ef759a4b3c095c9eacf66d3ed3c33d327bcf82e57608d1ca16dcd0180a1
    70aa646174612f656d707479a17300a174a466696c6586a1639294c420a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1
    a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a164c420c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3
    c3c3c3c3c3c3c3c30094c420b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2
    ccc8c420c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c364a168c4204c96ee
    42cd08baf35db787fc71953c580091ff3dfb73bca05c54b93c51129a60a16dcd01a4a170ad646174612f6669
    6c652e62696ea173cd012ca174a466696c6584a16cad646174612f66696c652e62696ea16dcd01ffa170a46c
    696e6ba174a773796d6c696e6ba46b696e64a474726565a17602
    """
)

PINNED_LAYER_V2 = unhex(
    """
    87a76368756e6b657284a3617667cd0400a36d6178cd1000a36d696ecd0100a46e616d65b566617374636463
    323032302d707966617374636463a66368756e6b739294c420a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1
    a1a1a1a1a1a1a1a1a1a1a1a1a164c420c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3
    c3c3c3c30094c420b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2ccc8c420
    c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c364a6646967657374d9477368
    613235363a643464346434643464346434643464346434643464346434643464346434643464346434643464
    34643464346434643464346434643464346434643464346434a46b696e64a56c61796572aa6d656469615f74
    797065d92b6170706c69636174696f6e2f766e642e6f63692e696d6167652e6c617965722e76312e7461722b
    677a6970a473697a65cd012ca17602
    """
)

PINNED_IMAGE_V2 = unhex(
    """
    87a6636f6e666967c40e7b226f73223a226c696e7578227da46b696e64a5696d616765a66c61796572739192
    d9477368613235363a6434643464346434643464346434643464346434643464346434643464346434643464
    3464346434643464346434643464346434643464346434643464346434c420e5e5e5e5e5e5e5e5e5e5e5e5e5
    e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5a86d616e6966657374c4137b22736368656d6156657273696f
    6e223a327daa6d656469615f74797065d92a6170706c69636174696f6e2f766e642e6f63692e696d6167652e
    6d616e69666573742e76312b6a736f6ea47461677391a66c6174657374a17602
    """
)

PINNED_TREE_V1 = unhex(
    """
    84a17601a46b696e64a474726565a76368756e6b657284a46e616d65b566617374636463323032302d707966
    617374636463a36d696ecd0100a3617667cd0400a36d6178cd1000a7656e74726965739286a170a5612e7478
    74a174a466696c65a16dcd01a4a173cd012ca168c420f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6
    f6f6f6f6f6f6f6f6f6f6a1639292c420a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1
    a1a1a1a16492c420b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2ccc883a1
    70a164a174a3646972a16dcd01ed
    """
)

PINNED_TREE_V1_AS_V2 = unhex(
    """
    84a76368756e6b657284a3617667cd0400a36d6178cd1000a36d696ecd0100a46e616d65b566617374636463
    323032302d707966617374636463a7656e74726965739286a1639292c420a1a1a1a1a1a1a1a1a1a1a1a1a1a1
    a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a16492c420b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2
    b2b2b2b2b2b2b2b2b2b2ccc8a168c4204c96ee42cd08baf35db787fc71953c580091ff3dfb73bca05c54b93c
    51129a60a16dcd01a4a170a5612e747874a173cd012ca174a466696c6583a16dcd01eda170a164a174a36469
    72a46b696e64a474726565a17602
    """
)


def pinned_tree() -> Tree:
    return Tree(
        PINNED_CHUNKER,
        (  # not in path order: encode sorts
            Entry("link", "symlink", 0o777, target="data/file.bin"),
            Entry("data/file.bin", "file", 0o644, 300, None, PINNED_CHUNKS),
            Entry("data", "dir", 0o755),
            Entry("data/empty", "file", 0o600),
        ),
    )


@pytest.mark.parametrize(
    ("manifest", "data", "expected_id"),
    [
        pytest.param(
            pinned_tree(),
            PINNED_TREE_V2,
            "10cd8e5794c0dc791f098bd85683f72f2b4ef5e452fc00d730e9539a6041fc3a",
            id="tree",
        ),
        pytest.param(
            Layer(
                "sha256:" + "d4" * 32,
                "application/vnd.oci.image.layer.v1.tar+gzip",
                300,
                PINNED_CHUNKER,
                PINNED_CHUNKS,
            ),
            PINNED_LAYER_V2,
            "43903487ff29566df7b941b0edd887fda6edd63923ab8487aa79ac0a2070b911",
            id="layer",
        ),
        pytest.param(
            Image(
                b'{"schemaVersion":2}',
                "application/vnd.oci.image.manifest.v1+json",
                b'{"os":"linux"}',
                (ImageLayer("sha256:" + "d4" * 32, ChunkId("e5" * 32)),),
                ("latest",),
            ),
            PINNED_IMAGE_V2,
            "c7757fffbb144494cb5158f129d77a1d4c749245d2445c8390d0bfd96c043cdb",
            id="image",
        ),
    ],
)
def test_v2_encoding_is_pinned(
    manifest: Tree | Layer | Image, data: bytes, expected_id: str
) -> None:
    assert encode(manifest) == data
    assert hash_bytes(data) == expected_id
    back = decode(data)
    assert encode(back) == data
    if isinstance(manifest, Tree):
        assert isinstance(back, Tree)
        by_path = {e.path: e for e in back.entries}
        assert by_path["data/file.bin"].digest == PINNED_FILE_KEY
        assert by_path["data/file.bin"].chunks == PINNED_CHUNKS
        assert by_path["data/empty"].digest == EMPTY_FILE_KEY
    else:
        assert back == manifest


def test_v1_bytes_still_decode_to_the_same_tree_and_re_encode_as_pinned_v2() -> None:
    """A v1 manifest as an old build wrote it (keys unsorted; the file digest is the
    BLAKE3 of its bytes; chunks without pack locations) keeps its id and contents."""
    assert hash_bytes(PINNED_TREE_V1) == (
        "455e3f86fc2d579f1c976b74cac9907f5311c667c692910be5c5a94175eb945b"
    )
    tree = decode(PINNED_TREE_V1)
    assert tree == Tree(
        PINNED_CHUNKER,
        (
            Entry(
                "a.txt",
                "file",
                0o644,
                300,
                ChunkId("f6" * 32),
                (ChunkRef(A, 100), ChunkRef(B, 200)),
            ),
            Entry("d", "dir", 0o755),
        ),
    )
    assert file_key(tree.entries[0]) == PINNED_FILE_KEY  # locations do not count
    v2 = encode(tree)
    assert v2 == PINNED_TREE_V1_AS_V2
    assert hash_bytes(v2) == "63bddb195d07b08df479e5c8718e12a8b15aa1a908e74df11f238d7b1eab0012"
