"""The pull writer: safe against a changing destination (issue 10 items 8, 10, 11,
19), cheap re-pulls by a crash-safe marker, and crash/power-loss recovery."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path

import anyio
import msgpack
import pytest
from helpers import (
    BLOBSTORE,
    cli_env,
    listing,
    make_tree,
    random_bytes,
    run_cli,
    snapshot,
    temp_leftovers,
    write,
)

from blobstore.chunker import DEFAULT_PARAMS, Chunker
from blobstore.client import Client
from blobstore.config import CacheConfig, Config, PeerConfig
from blobstore.errors import DiskFull
from blobstore.ids import ChunkId, hash_bytes, id_to_bytes
from blobstore.manifest import ChunkRef, Tree
from blobstore.materialize import _Writes, materialize, read_marker
from blobstore.objectstore import chunk_key, manifest_key, ref_key
from blobstore.runner import download_model_weights, is_marker
from blobstore.source import ChunkData, ChunkSource, Sink

pytestmark = pytest.mark.anyio


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return (tmp_path / "store").as_uri()


@pytest.fixture
async def client(store_url: str, tmp_path: Path) -> AsyncIterator[Client]:
    config = Config(
        store_url=store_url,
        cache=CacheConfig(tmp_path / "node" / "cache"),
        peers=PeerConfig(mode="none"),
    )
    async with Client.open(config, peers=False) as c:
        yield c


async def pull_tree(client: Client, ref: str, dest: Path, **kw: object) -> Tree:
    _, tree = await client.load(ref)
    assert isinstance(tree, Tree)
    await client.pull_tree(ref, ChunkId("0" * 64), tree, dest, **kw)  # type: ignore[arg-type]
    return tree


class SwappingSource:
    """The tier list, plus an attacker: before the first chunk is fetched, each
    directory in ``swaps`` inside DEST is moved aside and replaced by a symlink
    to ``victim`` (what a local user who can write DEST can do mid-pull)."""

    name = "tiered"

    def __init__(self, inner: ChunkSource, dest: Path, swaps: Sequence[str], victim: Path) -> None:
        self.inner = inner
        self.dest = dest
        self.swaps = swaps
        self.victim = victim
        self.swapped = False

    def _swap(self) -> None:
        if self.swapped:
            return
        self.swapped = True
        for rel in self.swaps:
            os.rename(self.dest / rel, self.dest / f"{rel}-moved-aside")
            os.symlink(self.victim, self.dest / rel)

    async def get(self, chunk_id: ChunkId) -> ChunkData:
        self._swap()
        return await self.inner.get(chunk_id)

    async def has(self, chunk_ids: Iterable[ChunkId]) -> set[ChunkId]:
        return await self.inner.has(chunk_ids)

    async def fetch(self, refs: Sequence[ChunkRef], sink: Sink) -> list[ChunkRef]:
        self._swap()
        return await self.inner.fetch(refs, sink)


# --------------------------------------------------------------------------- issue 10 item 8


async def test_dir_swapped_for_symlink_mid_pull_never_writes_outside(
    client: Client, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    for d in ("models", "models/shards", "tok"):
        for i in range(3):
            write(src / d / f"f{i}.bin", random_bytes(3000 + i, f"{d}{i}"))
        (src / d).chmod(0o777)
    await client.push(src, "t")
    _, tree = await client.load("t")
    assert isinstance(tree, Tree)
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    victim.chmod(0o700)
    (victim / "secret").write_bytes(b"root only")
    dst = tmp_path / "dst"
    source = SwappingSource(client.source, dst, ["models/shards", "tok"], victim)
    await materialize(tree, dst, source)
    assert source.swapped
    assert listing(victim) == ["secret"]  # nothing written through the symlinks
    assert (victim / "secret").read_bytes() == b"root only"
    assert victim.stat().st_mode & 0o7777 == 0o700  # and no chmod through them
    # the next pull puts a real directory back where the symlink is
    await materialize(tree, dst, client.source)
    assert not (dst / "tok").is_symlink()
    assert not (dst / "models" / "shards").is_symlink()
    got = {k: v for k, v in snapshot(dst).items() if "-moved-aside" not in k}
    assert got == snapshot(src)
    assert listing(victim) == ["secret"]


# --------------------------------------------------------------------------- issue 10 item 10


async def test_special_mode_bits_dropped_unless_asked(client: Client, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "bin" / "tool", b"#!/bin/sh\n", 0o4755)
    write(src / "bin" / "grouped", b"#!/bin/sh\n", 0o2755)
    (src / "shared").mkdir()
    (src / "shared").chmod(0o1777)
    (src / "bin").chmod(0o2775)
    await client.push(src, "t")
    assert snapshot(src)["bin/tool"][1] == 0o4755  # the manifest does carry them
    plain = tmp_path / "plain"
    await client.pull("t", plain)
    assert (plain / "bin" / "tool").stat().st_mode & 0o7777 == 0o755
    assert (plain / "bin" / "grouped").stat().st_mode & 0o7777 == 0o755
    assert (plain / "shared").stat().st_mode & 0o7777 == 0o777
    assert (plain / "bin").stat().st_mode & 0o7777 == 0o775
    kept = tmp_path / "kept"
    await client.pull("t", kept, keep_special_modes=True)
    assert snapshot(kept) == snapshot(src)


def test_cli_keep_special_modes(store_url: str, tmp_path: Path) -> None:
    env = cli_env(store_url, tmp_path / "cache")
    write(tmp_path / "src" / "suid", b"x", 0o4711)
    assert run_cli(["push", tmp_path / "src", "t"], env).returncode == 0
    assert run_cli(["pull", "t", tmp_path / "a"], env).returncode == 0
    assert (tmp_path / "a" / "suid").stat().st_mode & 0o7777 == 0o711
    proc = run_cli(["pull", "--keep-special-modes", "t", tmp_path / "b"], env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "b" / "suid").stat().st_mode & 0o7777 == 0o4711


# --------------------------------------------------------------------------- issue 10 item 11


async def test_long_utf8_names_pull(client: Client, tmp_path: Path) -> None:
    long_name = "模" * 80  # 240 bytes in UTF-8: legal (NAME_MAX is 255 bytes)
    assert len(long_name.encode()) == 240
    src = tmp_path / "src"
    write(src / long_name, random_bytes(5000, "long"))
    write(src / ("é" * 120) / "inner.bin", b"nested")
    os.symlink(long_name, src / ("ß" * 120))
    await client.push(src, "t")
    await client.pull("t", tmp_path / "dst")
    assert snapshot(tmp_path / "dst") == snapshot(src)
    assert temp_leftovers(tmp_path / "dst") == []


# --------------------------------------------------------------------------- issue 10 item 19


def many_dirs_tree(root: Path, dirs: int = 300) -> Path:
    for i in range(dirs):
        write(root / f"d{i % 17}" / f"sub{i}" / "leaf" / "f.txt", f"file {i}\n".encode())
    write(root / "big.bin", random_bytes(12 << 20, "big"))
    return root


def test_two_pulls_into_one_dest_at_once(store_url: str, tmp_path: Path) -> None:
    src = many_dirs_tree(tmp_path / "src")
    env = cli_env(store_url, tmp_path / "cache")
    assert run_cli(["push", src, "t"], env).returncode == 0
    for attempt in range(2):
        dst = tmp_path / f"dst{attempt}"
        procs = [
            subprocess.Popen(
                [BLOBSTORE, "pull", "t", str(dst)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
        assert snapshot(dst) == snapshot(src)
        assert temp_leftovers(dst) == []


# --------------------------------------------------------------------------- re-pull by marker


async def test_repull_trusts_marker_and_catches_changes_it_cannot_see_by_size_and_mtime(
    client: Client, tmp_path: Path
) -> None:
    src = make_tree(tmp_path / "src")
    await client.push(src, "t")
    _, tree = await client.load("t")
    assert isinstance(tree, Tree)
    dst = tmp_path / "dst"
    state = client.pull_state_dir
    first = await materialize(tree, dst, client.source, state_dir=state)
    assert (first.kept_files, first.checked_files) == (0, 0)
    again = await materialize(tree, dst, client.source, state_dir=state)
    assert again.kept_files == again.files == 6
    assert again.checked_files == 0  # a stat each, nothing read
    # same size, mtime put back: only the ctime (and the marker) can tell
    leaf = dst / "deep" / "er" / "est" / "leaf.txt"
    st = leaf.stat()
    data = bytearray(leaf.read_bytes())
    data[10] ^= 0xFF
    leaf.write_bytes(bytes(data))
    os.utime(leaf, ns=(st.st_atime_ns, st.st_mtime_ns))
    third = await materialize(tree, dst, client.source, state_dir=state)
    assert third.kept_files == 5
    assert snapshot(dst) == snapshot(src)
    # the marker is outside the destination: dst holds the tree and nothing else
    assert listing(dst) == listing(src)
    assert list(state.iterdir())


async def test_two_trees_under_one_root_each_repull_by_stat(client: Client, tmp_path: Path) -> None:
    """Two models pulled into one root: pulling B keeps A's records, so
    re-pulling A is a stat per file again, not a read of every file."""
    a_src, b_src = tmp_path / "a", tmp_path / "b"
    write(a_src / "model-a" / "weights.bin", random_bytes(300_000, "a"))
    write(a_src / "model-a" / "config.json", b"{}")
    write(b_src / "model-b" / "weights.bin", random_bytes(200_000, "b"))
    await client.push(a_src, "a")
    await client.push(b_src, "b")
    trees = {}
    for name in ("a", "b"):
        _, tree = await client.load(name)
        assert isinstance(tree, Tree)
        trees[name] = tree
    root, state = tmp_path / "data", client.pull_state_dir
    await materialize(trees["a"], root, client.source, state_dir=state)
    await materialize(trees["b"], root, client.source, state_dir=state)
    again = await materialize(trees["a"], root, client.source, state_dir=state)
    assert (again.kept_files, again.checked_files) == (2, 0)
    b_again = await materialize(trees["b"], root, client.source, state_dir=state)
    assert (b_again.kept_files, b_again.checked_files) == (1, 0)
    # a changed file of A is still caught after B's pull carried A's record
    weights = root / "model-a" / "weights.bin"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[5] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    fixed = await materialize(trees["a"], root, client.source, state_dir=state)
    assert fixed.kept_files == 1
    assert (root / "model-a" / "weights.bin").read_bytes() == random_bytes(300_000, "a")


async def test_marker_is_compressed_an_old_plain_one_still_vouches_garbage_never(
    client: Client, tmp_path: Path
) -> None:
    src = make_tree(tmp_path / "src")
    await client.push(src, "t")
    _, tree = await client.load("t")
    assert isinstance(tree, Tree)
    dst, state = tmp_path / "dst", client.pull_state_dir
    await materialize(tree, dst, client.source, state_dir=state)
    (marker,) = state.iterdir()
    doc = read_marker(marker)
    assert not marker.read_bytes().startswith(b"{")  # zlib, not plain JSON
    marker.write_text(json.dumps(doc))  # as earlier versions wrote it
    again = await materialize(tree, dst, client.source, state_dir=state)
    assert (again.kept_files, again.checked_files) == (6, 0)
    marker.write_bytes(b"\x78\x01 not zlib at all")
    checked = await materialize(tree, dst, client.source, state_dir=state)
    assert (checked.kept_files, checked.checked_files) == (6, 6)
    assert snapshot(dst) == snapshot(src)


async def test_without_marker_intact_files_are_checked_and_kept(
    client: Client, tmp_path: Path
) -> None:
    src = make_tree(tmp_path / "src")
    await client.push(src, "t")
    _, tree = await client.load("t")
    assert isinstance(tree, Tree)
    dst = tmp_path / "dst"
    await materialize(tree, dst, client.source)  # no state_dir: no marker
    again = await materialize(tree, dst, client.source, state_dir=tmp_path / "state")
    assert again.kept_files == again.checked_files == 6
    third = await materialize(tree, dst, client.source, state_dir=tmp_path / "state")
    assert (third.kept_files, third.checked_files) == (6, 0)


# --------------------------------------------------------------------------- crashes


def crash_tree(root: Path) -> Path:
    write(root / "weights.bin", random_bytes(48 << 20, "crash-w"))
    write(root / "weights-2.bin", random_bytes(24 << 20, "crash-w2"))
    for i in range(400):
        write(root / f"small/{i % 20}/{i}.txt", random_bytes(200 + i * 37, f"s{i}"))
    return root


def whole_or_absent(dst: Path, good: dict[str, tuple[str, int, str]]) -> None:
    """Every final name in ``dst`` holds a whole, correct file (temp names aside)."""
    for rel, (kind, _, digest) in snapshot(dst).items():
        if kind == "file" and "blobstore-tmp" not in rel:
            assert digest == good[rel][2], f"torn file under a final name: {rel}"


@pytest.mark.parametrize("mode", ["copy", "auto"])
def test_sigkill_at_random_moments_then_pull_repairs(
    store_url: str, tmp_path: Path, mode: str
) -> None:
    """copy: node store + DEST; auto (no reflink here): each file written once in
    DEST and adopted as a seed, so a kill can land between the write and the
    adoption."""
    src = crash_tree(tmp_path / "src")
    good = snapshot(src)
    env = cli_env(store_url, tmp_path / "push-cache")
    assert run_cli(["push", src, "t"], env).returncode == 0
    rng = random.Random(os.environ.get("CRASH_SEED", "9"))
    dst = tmp_path / "dst"
    caught = 0
    for attempt in range(12):
        if caught >= 4:
            break
        # a cold cache each time, so the pull is long enough to be caught mid-way
        node = cli_env(store_url, tmp_path / f"cache{attempt}")
        proc = subprocess.Popen(
            [BLOBSTORE, "pull", "t", str(dst), "--link-mode", mode],
            env=node,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Start the clock when the pull opens its (fresh) node store: interpreter
        # start-up varies with the machine's load. Then kill it a random moment later.
        while proc.poll() is None and not (tmp_path / f"cache{attempt}").exists():
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.15))
        caught += proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        whole_or_absent(dst, good)
    assert caught  # pulls were killed while they ran (12 tries: timing is the machine's)
    done = run_cli(["pull", "--json", "t", dst], cli_env(store_url, tmp_path / "cache-final"))
    assert done.returncode == 0, done.stderr
    assert snapshot(dst) == good
    assert temp_leftovers(dst) == []


def lose_unsynced_writes(paths: Iterable[Path]) -> None:
    """Power loss, the documented equivalent: what was renamed into place but
    not yet written back comes back torn — here half zeroes, a quarter missing."""
    for path in paths:
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.write(b"\0" * (size // 2))
            f.truncate(size * 3 // 4)


def reboot(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a power loss also is: a new boot (new boot id, booted just now)."""
    booted = (f"rebooted-{time.time_ns()}", time.time_ns())
    monkeypatch.setattr("blobstore.materialize._boot", lambda: booted)


def marker_of(client: Client, dest: Path) -> dict[str, list[object]]:
    st = dest.stat()
    marker = client.pull_state_dir / f"{st.st_dev:x}-{st.st_ino:x}.json"
    files: dict[str, list[object]] = read_marker(marker)["files"]
    return files


async def test_power_loss_after_a_warm_pull_is_repaired(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A warm pull of v2 over v1 places two files from the node store and does
    not wait for their write-back; then the power goes. Those files come back
    torn under their final names, and the marker written in the old boot no
    longer vouches for them: the next pull checks and repairs exactly them.
    (copy mode: the node store owns a copy and its syncfs covers DEST; auto
    mode on ext4 seeds instead, see test_linkmodes.py.)"""
    src = make_tree(tmp_path / "src")
    await client.push(src, "t1")
    write(src / "weights.bin", random_bytes(9 << 20, "v2"))
    write(src / "config.json", b'{"layers": 48}\n', 0o640)
    await client.push(src, "t2")
    await client.pull(
        "t2", tmp_path / "elsewhere", link_mode="copy"
    )  # the node store holds v2's files
    dst = tmp_path / "dst"
    await client.pull("t1", dst, link_mode="copy")  # cold: the store's syncfs covered dst too
    assert all(record[6] == 1 for record in marker_of(client, dst).values())
    warm = await client.pull("t2", dst, link_mode="copy")
    assert warm.from_tier["origin"] == 0
    marker = marker_of(client, dst)
    assert {p for p, record in marker.items() if record[6] == 0} == {"weights.bin", "config.json"}
    reboot(monkeypatch)
    lose_unsynced_writes([dst / "weights.bin", dst / "config.json"])
    result = await client.pull("t2", dst, link_mode="copy")
    assert result.kept_files == result.files - 2
    assert snapshot(dst) == snapshot(src)


async def test_after_a_reboot_intact_files_are_checked_once(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_tree(tmp_path / "src")
    await client.push(src, "t")
    _, tree = await client.load("t")
    assert isinstance(tree, Tree)
    await client.pull("t", tmp_path / "warmup")
    dst = tmp_path / "dst"
    state = client.pull_state_dir
    placed = await materialize(tree, dst, client.source, store=client.cache, state_dir=state)
    assert placed.placed_bytes == placed.bytes  # every file from the node store
    same_boot = await materialize(tree, dst, client.source, store=client.cache, state_dir=state)
    assert (same_boot.kept_files, same_boot.checked_files) == (6, 0)
    reboot(monkeypatch)
    after = await materialize(tree, dst, client.source, store=client.cache, state_dir=state)
    assert (after.kept_files, after.checked_files) == (6, 6)  # read back from disk once ...
    again = await materialize(tree, dst, client.source, store=client.cache, state_dir=state)
    assert (again.kept_files, again.checked_files) == (6, 0)  # ... and durable since


async def test_concurrent_in_process_pulls_take_turns(client: Client, tmp_path: Path) -> None:
    src = many_dirs_tree(tmp_path / "src", dirs=60)
    await client.push(src, "t")
    dst = tmp_path / "dst"
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(pull_tree, client, "t", dst)
    assert snapshot(dst) == snapshot(src)


async def test_runner_after_power_loss_never_starts_on_a_torn_file(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_tree(tmp_path / "src")
    await client.push(src, "t")
    await client.pull("t", tmp_path / "warmup")
    dst = tmp_path / "data"
    first = await download_model_weights(client, "t", dst)  # warm: no write-back waited for
    assert first.pulled
    assert not (await download_model_weights(client, "t", dst)).pulled  # same boot: complete
    reboot(monkeypatch)
    lose_unsynced_writes([dst / "weights.bin"])
    after = await download_model_weights(client, "t", dst)
    assert after.pulled  # the completeness marker is from another boot: not trusted
    assert {k: v for k, v in snapshot(dst).items() if not is_marker(k)} == snapshot(src)


async def test_v1_manifest_pulls_and_repulls(client: Client, tmp_path: Path) -> None:
    """An old store: one object per chunk, a v1 tree (digest = BLAKE3 of the
    bytes). It pulls, fills the node store and re-pulls on a stat."""
    data = random_bytes(5 << 20, "v1")
    spans = Chunker(DEFAULT_PARAMS).cut_and_hash(data)
    assert len(spans) > 1
    for s in spans:
        await client.object_store.put(chunk_key(s.id), data[s.offset : s.offset + s.length])
    info = DEFAULT_PARAMS.info()
    entry = {
        "p": "w.bin",
        "t": "file",
        "m": 0o640,
        "s": len(data),
        "h": id_to_bytes(hash_bytes(data)),
        "c": [[id_to_bytes(s.id), s.length] for s in spans],
    }
    raw = msgpack.packb(
        {
            "v": 1,
            "kind": "tree",
            "entries": [entry],
            "chunker": {
                "name": info.name,
                "min": info.min_size,
                "avg": info.avg_size,
                "max": info.max_size,
            },
        },
        use_bin_type=True,
    )
    await client.object_store.put(manifest_key(hash_bytes(raw)), raw)
    await client.object_store.put(ref_key("old"), hash_bytes(raw).encode() + b"\n")
    first = await client.pull("old", tmp_path / "a")
    assert (tmp_path / "a" / "w.bin").read_bytes() == data
    assert (tmp_path / "a" / "w.bin").stat().st_mode & 0o777 == 0o640
    assert first.from_tier["origin"] == len(data)
    again = await client.pull("old", tmp_path / "a")
    assert again.kept_files == 1
    other = await client.pull("old", tmp_path / "b")
    assert (other.from_tier["local"], other.from_tier["origin"]) == (len(data), 0)
    assert (tmp_path / "b" / "w.bin").read_bytes() == data


# --------------------------------------------------------------------------- requests


async def test_cold_pull_reads_each_pack_in_few_gets(tmp_path: Path) -> None:
    """Files of mixed sizes (small ones interleaved with big ones in push
    order): fetch windows follow the packs, so the origin reads each pack with
    ~one ranged GET, not a little of every pack per round of small files."""
    from blobstore.packs import PackConfig

    src = tmp_path / "src"
    rng = random.Random(7)
    for n in range(400):
        size = rng.choice([300, 4_000, 20_000, 600_000])
        write(src / f"d{n % 7}" / f"f{n:03}", random_bytes(size, seed=n))
    config = Config(
        store_url=(tmp_path / "store").as_uri(),
        cache=CacheConfig(tmp_path / "pusher"),
        peers=PeerConfig(mode="none"),
    )
    async with Client.open(config, peers=False) as pusher:
        pusher.packs = PackConfig(target_bytes=4 << 20)
        await pusher.push(src, "mixed")
        _, tree = await pusher.load("mixed")
    assert isinstance(tree, Tree)
    packs = {ref.pack for ref in tree.chunk_refs()}
    assert len(packs) >= 10
    config = Config(
        store_url=(tmp_path / "store").as_uri(),
        cache=CacheConfig(tmp_path / "puller"),
        peers=PeerConfig(mode="none"),
    )
    async with Client.open(config, peers=False) as puller:
        await puller.pull("mixed", tmp_path / "dst")
        gets = puller.origin.requests
    assert snapshot(tmp_path / "dst") == snapshot(src)
    assert gets <= len(packs) + 2, (gets, len(packs))


async def test_chunk_writes_are_claimed_once_and_settled_before_files_are_used() -> None:
    """The bookkeeping behind SplitSink writes (materialize._Writes): a chunk is
    claimed by one writer only; ``settle`` waits for a write still running in a
    thread (a read abandoned at its deadline may write late) and raises what a
    late write hit."""
    a, b = hash_bytes(b"a"), hash_bytes(b"b")
    writes = _Writes({a, b})
    assert writes.claim(a) is True
    assert writes.claim(a) is False  # delivered again: written already
    release = threading.Event()

    def late_writer() -> None:
        release.wait()
        writes.done()

    thread = threading.Thread(target=late_writer)
    thread.start()
    with anyio.move_on_after(0.05) as scope:
        await writes.settle()  # still running: waits
    assert scope.cancelled_caught
    release.set()
    await writes.settle()
    thread.join()
    assert writes.pending == {b}
    assert writes.claim(b) is True
    writes.failed(DiskFull("no space left"))
    writes.done()
    await writes.settle(raising=False)
    with pytest.raises(DiskFull):
        await writes.settle()


# --------------------------------------------------------------------------- cold pulls


def flip_bit(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        flipped = bytes([f.read(1)[0] ^ 1])
        f.seek(offset)
        f.write(flipped)


async def test_cold_pull_of_a_corrupt_pack_refetches_the_chunk_or_leaves_no_file(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big file is assembled in DEST with its blocks reserved first
    (pwrite.preallocate): a chunk whose pack bytes are wrong is fetched from
    the next tier and the file comes out whole, each byte's block allocated
    once; with no other tier the pull fails and leaves no file under the
    final name, no temp file, no reserved blocks."""
    import shutil

    from blobstore import materialize as materialize_module
    from blobstore import pwrite
    from blobstore.origin import OriginSource
    from blobstore.stores import open_object_store
    from blobstore.tiers import TieredSource

    reserved: list[int] = []

    def preallocate(fd: int, size: int) -> None:
        reserved.append(size)
        real_preallocate(fd, size)

    real_preallocate = pwrite.preallocate  # (materialize's own name for it is patched)
    monkeypatch.setattr(materialize_module, "preallocate", preallocate)

    src = tmp_path / "src"
    data = random_bytes(6 << 20, "cold-corrupt")
    write(src / "weights.bin", data)
    await client.push(src, "w")
    _, tree = await client.load("w")
    assert isinstance(tree, Tree)
    refs = list(tree.chunk_refs())
    assert len(refs) >= 3
    good_store = tmp_path / "good-store"
    shutil.copytree(tmp_path / "store", good_store)
    bad = refs[len(refs) // 2]
    assert bad.pack is not None
    flip_bit(tmp_path / "store" / "packs" / bad.pack[:2] / bad.pack, bad.offset + 1000)
    async with (
        open_object_store((tmp_path / "store").as_uri()) as corrupt,
        open_object_store(good_store.as_uri()) as good,
    ):
        dst = tmp_path / "dst"
        two = TieredSource([OriginSource(corrupt), OriginSource(good)])
        await materialize(tree, dst, two)
        assert (dst / "weights.bin").read_bytes() == data
        assert reserved == [len(data)]
        assert two.bytes_from["origin"] == len(data)  # the one chunk again, from the good store
        blocks = (dst / "weights.bin").stat().st_blocks * 512
        assert len(data) <= blocks < len(data) * 1.1
        lone = tmp_path / "lone"
        with pytest.raises(Exception, match=bad.id[:16]) as failed:
            await materialize(tree, lone, TieredSource([OriginSource(corrupt)]))
        assert "corrupt" in str(failed.value).lower()
        assert listing(lone) == []
