"""push and pull through a real store (file:// and SeaweedFS S3), in process and via the CLI."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import (
    assert_one_line_error,
    cli_env,
    get_object,
    listing,
    make_tree,
    put_objects,
    random_bytes,
    run_cli,
    snapshot,
    temp_leftovers,
    write,
)

from blobstore.chunker import DEFAULT_PARAMS
from blobstore.client import Client
from blobstore.config import CacheConfig, Config, PeerConfig
from blobstore.errors import BadInput, ChunkMissing, CorruptChunk, InvalidRef, RefNotFound
from blobstore.ids import hash_bytes
from blobstore.manifest import ChunkRef, Tree, decode, file_key
from blobstore.objectstore import ObjectStore, pack_key

pytestmark = pytest.mark.anyio


def config_for(store_url: str, cache: Path) -> Config:
    return Config(store_url=store_url, cache=CacheConfig(cache), peers=PeerConfig(mode="none"))


@pytest.fixture
async def client(object_store_url: str, tmp_path: Path) -> AsyncIterator[Client]:
    async with Client.open(config_for(object_store_url, tmp_path / "cache"), peers=False) as c:
        yield c


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "src")


async def test_round_trip_keeps_modes_empty_files_dirs_and_symlinks(
    client: Client, src: Path, tmp_path: Path
) -> None:
    pushed = await client.push(src, "apps/demo/data")
    assert pushed.files == 6
    assert pushed.new_chunks == pushed.chunks > 6  # the 9 MiB file has several chunks
    pulled = await client.pull("apps/demo/data", tmp_path / "dst")
    assert pulled.manifest == pushed.manifest
    assert pulled.files == 6
    assert pulled.bytes == pushed.bytes
    assert pulled.kept_files == 0
    assert snapshot(tmp_path / "dst") == snapshot(src)
    dst = tmp_path / "dst"
    assert (dst / "bin" / "run.sh").stat().st_mode & 0o777 == 0o755
    assert (dst / "readonly.txt").stat().st_mode & 0o777 == 0o444
    assert (dst / "empty.txt").read_bytes() == b""
    assert (dst / "empty-dir" / "nested-empty").is_dir()
    assert os.readlink(dst / "dangling") == "/nonexistent/target"
    assert temp_leftovers(dst) == []
    # pulled by manifest id, too
    again = await client.pull(pushed.manifest, tmp_path / "dst2")
    assert snapshot(tmp_path / "dst2") == snapshot(src)
    assert again.from_tier["local"] == again.bytes  # the first pull filled the cache
    assert again.from_tier["origin"] == 0


async def test_manifest_records_chunker_and_file_key(client: Client, src: Path) -> None:
    pushed = await client.push(src, "t")
    _, tree = await client.load("t")
    assert isinstance(tree, Tree)
    assert tree.chunker == DEFAULT_PARAMS.info()
    weights = next(e for e in tree.entries if e.path == "weights.bin")
    assert weights.digest == file_key(weights)  # v2: the digest is over the chunk list
    assert sum(c.size for c in weights.chunks) == weights.size == 9 << 20
    data, pos = (src / "weights.bin").read_bytes(), 0
    for c in weights.chunks:
        assert hash_bytes(data[pos : pos + c.size]) == c.id
        pos += c.size
    assert pushed.chunks == sum(len(e.chunks) for e in tree.entries)


async def test_second_push_uploads_nothing(client: Client, src: Path) -> None:
    first = await client.push(src, "t")
    second = await client.push(src, "t")
    assert second.manifest == first.manifest
    assert (second.new_chunks, second.new_bytes) == (0, 0)
    assert second.chunks == first.chunks


async def test_edit_near_start_uploads_only_changed_chunks(client: Client, src: Path) -> None:
    first = await client.push(src, "t")
    weights = src / "weights.bin"
    data = weights.read_bytes()
    weights.write_bytes(data[:500] + b"patched" + data[500:])
    second = await client.push(src, "t")
    assert second.manifest != first.manifest
    assert 1 <= second.new_chunks <= 2
    assert second.new_bytes < 4 << 20


async def test_duplicate_content_is_stored_once(client: Client, tmp_path: Path) -> None:
    blob = random_bytes(3 << 20, "dup")
    for name in ("a", "b", "c/d"):
        write(tmp_path / "src" / name, blob)
    pushed = await client.push(tmp_path / "src", "t")
    assert pushed.new_bytes == len(blob)
    assert pushed.bytes == 3 * len(blob)


async def test_unchanged_files_are_kept(client: Client, src: Path, tmp_path: Path) -> None:
    await client.push(src, "t")
    dst = tmp_path / "dst"
    first = await client.pull("t", dst)
    assert first.kept_files == 0
    again = await client.pull("t", dst)
    assert again.kept_files == again.files == 6
    assert sum(again.from_tier.values()) == 0  # nothing fetched
    (dst / "config.json").write_bytes(b"changed locally")
    (dst / "weights.bin").unlink()
    (dst / "extra.txt").write_bytes(b"mine")  # not in the manifest: left alone
    third = await client.pull("t", dst)
    assert third.kept_files == 4
    assert snapshot(dst) == {**snapshot(src), "extra.txt": snapshot(dst)["extra.txt"]}


async def test_symlink_in_dest_is_replaced_not_followed(
    client: Client, src: Path, tmp_path: Path
) -> None:
    await client.push(src, "t")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_bytes(b"precious")
    dst = tmp_path / "dst"
    dst.mkdir()
    os.symlink(outside, dst / "deep")  # the manifest needs deep/ to be a directory
    os.symlink(outside, dst / "bin")
    os.symlink(outside / "victim.txt", dst / "config.json")  # ... and config.json a file
    os.symlink(outside, dst / "empty-dir")
    before = {p: (outside / p).read_bytes() for p in listing(outside)}
    await client.pull("t", dst)
    assert {p: (outside / p).read_bytes() for p in listing(outside)} == before
    assert snapshot(dst) == snapshot(src)
    assert not (dst / "deep").is_symlink()
    assert not (dst / "config.json").is_symlink()


async def test_corrupt_store_object_fails_clean(client: Client, src: Path, tmp_path: Path) -> None:
    await client.push(src, "t")
    _, tree = await client.load("t")
    assert isinstance(tree, Tree)
    weights = next(e for e in tree.entries if e.path == "weights.bin")
    bad = weights.chunks[1].id
    await damage(client.object_store, weights.chunks[1])
    dst = tmp_path / "dst"
    with pytest.raises(CorruptChunk, match=bad):
        await client.pull("t", dst)
    assert not (dst / "weights.bin").exists()
    assert temp_leftovers(dst) == []
    good = snapshot(src)
    for path, entry in snapshot(dst).items():  # whatever was finished is complete
        if entry[0] == "file":
            assert entry[2] == good[path][2], path
    assert not await client.cache.has([bad])


async def test_missing_chunk_in_store(client: Client, src: Path, tmp_path: Path) -> None:
    await client.push(src, "t")
    _, tree = await client.load("t")
    assert isinstance(tree, Tree)
    leaf = next(e for e in tree.entries if e.path.endswith("leaf.txt"))
    pack = leaf.chunks[0].pack
    assert pack is not None
    await client.object_store.delete(pack_key(pack))
    with pytest.raises(ChunkMissing) as info:
        await client.pull("t", tmp_path / "dst")
    assert info.value.chunk_id in {c.id for c in tree.chunk_refs() if c.pack == pack}
    assert temp_leftovers(tmp_path / "dst") == []
    assert not (tmp_path / "dst" / leaf.path).exists()


async def test_bad_push_and_pull_input(client: Client, src: Path, tmp_path: Path) -> None:
    with pytest.raises(RefNotFound, match="'nope'"):
        await client.pull("nope", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    with pytest.raises(InvalidRef):
        await client.push(src, "../escape")
    with pytest.raises(BadInput, match="not a directory"):
        await client.push(src / "config.json", "t")
    with pytest.raises(BadInput, match="not a directory"):
        await client.push(tmp_path / "missing", "t")
    await client.push(src, "t")
    with pytest.raises(BadInput):
        await client.pull("t", src / "config.json")  # destination is a file


# --------------------------------------------------------------------------- via the CLI


def test_cli_corrupt_store_object_one_line_error(
    object_store_url: str, tmp_path: Path, src: Path
) -> None:
    env = cli_env(object_store_url, tmp_path / "cache")
    pushed = json.loads(run_cli(["push", src, "t", "--json"], env).stdout)
    show = json.loads(run_cli(["show", "t", "--json"], env).stdout)
    assert show["manifest"] == pushed["manifest"]
    manifest = get_object(object_store_url, f"manifests/{pushed['manifest']}")
    first = _chunks(manifest, "weights.bin")[0]
    assert first.pack is not None
    pack = bytearray(get_object(object_store_url, pack_key(first.pack)))
    pack[first.offset : first.offset + 10] = b"evil bytes"
    put_objects(object_store_url, {pack_key(first.pack): bytes(pack)})
    proc = run_cli(["pull", "t", tmp_path / "dst"], env)
    assert_one_line_error(proc, "corrupt", first.id)
    assert not (tmp_path / "dst" / "weights.bin").exists()
    assert temp_leftovers(tmp_path / "dst") == []


def test_cli_corrupt_cache_chunk_refetched(
    object_store_url: str, tmp_path: Path, src: Path
) -> None:
    env = cli_env(object_store_url, tmp_path / "cache")
    assert run_cli(["push", src, "t"], env).returncode == 0
    # copy mode: the node store owns whole files (auto on ext4/tmpfs seeds from d1)
    first = json.loads(
        run_cli(["pull", "t", tmp_path / "d1", "--json", "--link-mode", "copy"], env).stdout
    )
    assert first["from"]["origin"] == first["bytes"]
    cached = sorted((tmp_path / "cache").glob("files/??/*"))  # the node store's whole files
    victim = max(cached, key=lambda p: p.stat().st_size)
    size = victim.stat().st_size
    victim.chmod(0o644)  # store files are read-only
    victim.write_bytes(b"\x00" * size)
    proc = run_cli(["pull", "t", tmp_path / "d2", "--json", "--link-mode", "copy"], env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    second = json.loads(proc.stdout)
    assert second["from"] == {"local": second["bytes"] - size, "peer": 0, "origin": size}
    assert snapshot(tmp_path / "d2") == snapshot(src)  # the bad copy was never served
    assert victim.read_bytes() != b"\x00" * size  # healed


def _chunks(manifest_bytes: bytes, path: str) -> tuple[ChunkRef, ...]:
    tree = decode(manifest_bytes)
    assert isinstance(tree, Tree)
    return next(e for e in tree.entries if e.path == path).chunks


async def damage(store: ObjectStore, ref: ChunkRef, data: bytes = b"garbage") -> None:
    """Overwrite ``ref``'s bytes inside its pack (the pack keeps its size)."""
    assert ref.pack is not None
    pack = bytearray(await store.get(pack_key(ref.pack)))
    pack[ref.offset : ref.offset + ref.size] = (data * ref.size)[: ref.size]
    await store.put(pack_key(ref.pack), bytes(pack))
