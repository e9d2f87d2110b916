"""Leases: gc and writers never break each other (the reused-old-chunk race)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import anyio
import pytest
from helpers import BLOBSTORE, assert_one_line_error, cli_env, random_bytes, run_cli, write
from test_gc import HOUR, age_file_store, config_for, keys, two_trees

from blobstore.client import Client
from blobstore.errors import StoreUnavailable
from blobstore.filestore import FileObjectStore
from blobstore.gc import collect
from blobstore.leases import GC_KEY, WRITER_PREFIX, Leases, LeaseTiming
from blobstore.objectstore import ObjectInfo
from blobstore.push import PushResult

pytestmark = pytest.mark.anyio

FAST = LeaseTiming(gc_ttl=5.0, gc_refresh=0.05, poll=0.01)


async def test_gc_sweeps_nothing_while_a_writer_holds_a_lease(tmp_path: Path) -> None:
    async with Client.open(config_for(f"file://{tmp_path / 'store'}", tmp_path / "c")) as client:
        await two_trees(client, tmp_path)
        age_file_store(tmp_path / "store", 2 * HOUR)
        before = await keys(client.object_store, "")
        async with client.writing():
            busy = await collect(client.object_store, None, grace_seconds=HOUR)
        assert busy.skipped_for_writers == 1
        assert (busy.swept_chunks, busy.swept_manifests) == (0, 0)
        assert await keys(client.object_store, "") == before  # whatever the chunk layout
        free = await collect(client.object_store, None, grace_seconds=HOUR)
        assert free.skipped_for_writers == 0
        assert free.swept_manifests == 1  # drop's; its chunks with it (loose or packed)
        assert await keys(client.object_store, "") < before
        assert await keys(client.object_store, "leases/") == set()  # both leases released


async def test_writer_waits_while_gc_runs(tmp_path: Path) -> None:
    async with Client.open(config_for(f"file://{tmp_path / 'store'}", tmp_path / "c")) as client:
        leases = Leases(client.object_store, FAST)
        events: list[str] = []

        async def writer() -> None:
            async with leases.writing():
                events.append("writer in")

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                async with leases.collecting() as writers:
                    assert writers == 0
                    tg.start_soon(writer)
                    while not await keys(client.object_store, WRITER_PREFIX):  # noqa: ASYNC110
                        await anyio.sleep(0.005)
                    assert events == []  # it announced itself, and waits for this gc
                    events.append("gc done")
        assert events == ["gc done", "writer in"]


async def test_stale_leases_expire(tmp_path: Path) -> None:
    """A crashed writer or gc does not block the other side forever."""
    root = tmp_path / "store"
    async with Client.open(config_for(f"file://{root}", tmp_path / "c")) as client:
        store = client.object_store
        await store.put(f"{WRITER_PREFIX}crashed", b"x")
        await store.put(GC_KEY, b"x")
        old = time.time() - 2 * 24 * HOUR
        for key in (f"{WRITER_PREFIX}crashed", GC_KEY):
            os.utime(root / key, (old, old))
        leases = Leases(store, FAST)
        with anyio.fail_after(5):
            async with leases.writing():
                pass
        async with leases.collecting() as writers:
            assert writers == 0


async def _orphan_and_its_twin(client: Client, tmp_path: Path) -> Path:
    """Push a tree and drop its ref, so its chunks are old and unreferenced (grace < 0
    below: everything unreferenced counts as old); return a tree of the same content,
    which a push will reuse them for."""
    data = random_bytes(3 << 20, "orphan")
    write(tmp_path / "a" / "w.bin", data)
    await client.push(tmp_path / "a", "a")
    await client.catalog.delete_ref("a")
    write(tmp_path / "b" / "w.bin", data)
    return tmp_path / "b"


async def test_gc_sweeps_nothing_while_a_writer_reuses_an_old_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race, forced: the writer has reused the orphan's chunks and is about to
    write its ref when a whole gc runs. Its lease makes gc sweep nothing."""
    async with Client.open(config_for(f"file://{tmp_path / 'store'}", tmp_path / "c")) as client:
        twin = await _orphan_and_its_twin(client, tmp_path)
        store = client.object_store
        at_ref, go_on = anyio.Event(), anyio.Event()
        put = store.put

        async def pausing_put(key: str, data: bytes, *args: object, **kwargs: object) -> None:
            if key.startswith("refs/b"):  # chunks reused, manifest written: the ref is next
                at_ref.set()
                await go_on.wait()
            await put(key, data, *args, **kwargs)

        monkeypatch.setattr(store, "put", pausing_put)
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                pushes: list[PushResult] = []
                tg.start_soon(lambda: _append(pushes, client.push(twin, "b")))
                await at_ref.wait()
                swept = await collect(store, None, grace_seconds=-HOUR)
                go_on.set()
        assert pushes[0].new_chunks == 0  # it did reuse them
        assert swept.skipped_for_writers == 1
        assert (swept.swept_packs, swept.swept_chunks) == (0, 0)
        verified = await client.verify("b")
        assert verified.ok, (verified.missing, verified.corrupt)


async def test_a_writer_arriving_while_gc_sweeps_waits_then_uploads_again(tmp_path: Path) -> None:
    """The race the other way round, forced: gc has found no writer and is about to
    sweep the orphan's pack when a push of the same content starts. The push waits
    for gc's lease to go, then finds the pack gone and uploads its chunks again."""
    async with Client.open(config_for(f"file://{tmp_path / 'store'}", tmp_path / "c")) as client:
        twin = await _orphan_and_its_twin(client, tmp_path)
        store = client.object_store
        pushes: list[PushResult] = []

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:

                async def writer_arrives() -> None:
                    tg.start_soon(lambda: _append(pushes, client.push(twin, "b")))
                    while not await keys(store, WRITER_PREFIX):  # noqa: ASYNC110 - another task
                        await anyio.sleep(0.01)
                    # The writer has announced itself and waits: our lease is live.

                swept = await collect(store, None, grace_seconds=-HOUR, before_sweep=writer_arrives)
                assert not pushes  # it waited for the sweep
        assert swept.skipped_for_writers == 0
        assert swept.swept_packs == 1  # the orphan's pack went...
        assert pushes[0].new_chunks > 0  # ...so the writer uploaded its chunks again
        verified = await client.verify("b")
        assert verified.ok, (verified.missing, verified.corrupt)


async def _append(results: list[PushResult], push: Awaitable[PushResult]) -> None:
    results.append(await push)


HEARTBEAT = LeaseTiming(writer_ttl=1.0, writer_refresh=0.05, gc_ttl=5.0, gc_refresh=0.05, poll=0.01)


async def test_a_running_writer_keeps_its_short_lease_alive(tmp_path: Path) -> None:
    """The lease lapses 1 s after its last refresh, yet a writer running for longer
    keeps it: its heartbeat re-puts it."""
    async with FileObjectStore(tmp_path / "store") as store:
        writer = Leases(store, HEARTBEAT)
        async with writer.writing():
            (lease,) = [info.key async for info in store.list(WRITER_PREFIX)]
            assert lease.startswith(f"{WRITER_PREFIX}t1-")  # the TTL travels in the name
            for _ in range(3):
                await anyio.sleep(0.6)  # 1.8 s in all, beyond the TTL
                async with Leases(store, HEARTBEAT).collecting() as writers:
                    assert writers == 1
        async with Leases(store, HEARTBEAT).collecting() as writers:
            assert writers == 0


async def test_a_lease_that_cannot_be_refreshed_stops_its_writer(tmp_path: Path) -> None:
    """A writer that can no longer keep its lease must not go on unprotected."""
    root = tmp_path / "store"

    async def write_forever(store: FileObjectStore) -> None:
        async with Leases(store, HEARTBEAT).writing():
            # Renamed away, not removed: a heartbeat writing into it meanwhile made
            # rmtree fail with "Directory not empty" (CI, a loaded box).
            root.rename(root.with_name("gone"))
            root.write_bytes(b"")  # the store's directory is now a file: puts fail
            await anyio.sleep(30)  # the heartbeat ends this within the 1 s TTL

    async with FileObjectStore(root) as store:
        with anyio.fail_after(20), pytest.raises(StoreUnavailable, match="cannot keep lease"):
            await write_forever(store)


class SlowClockStore(FileObjectStore):
    """A file store whose clock runs 10 minutes behind this host's: every mtime it
    reports is stamped by that clock (a clock skew cannot be made otherwise)."""

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        async for info in super().list(prefix):
            yield ObjectInfo(info.key, info.size, info.mtime - 600)


async def test_leases_are_judged_on_the_store_clock(tmp_path: Path) -> None:
    """A fresh writer lease is live although this host's clock is 10 min ahead of
    the store's (by the local clock it would look 10 min old, past its TTL)."""
    async with SlowClockStore(tmp_path / "store") as store:
        async with Leases(store).writing():
            async with Leases(store, FAST).collecting() as writers:
                assert writers == 1
            (entry,) = await Leases(store).entries()
            assert entry.live
            assert entry.age < 60


def _lease_files(root: Path) -> list[Path]:
    return sorted((root / "leases").glob("write-*")) if (root / "leases").exists() else []


def test_killed_push_lease_lapses_and_can_be_listed_and_cleared(tmp_path: Path) -> None:
    """SIGKILL a real push: its lease stays, `blobstore leases` shows who held it,
    gc skips its sweep only until the 2-minute TTL lapses, --clear-stale removes it."""
    root = tmp_path / "store"
    env = cli_env(root.as_uri(), tmp_path / "cache")
    write(tmp_path / "src" / "big.bin", random_bytes(256 << 20, "killed"))
    push = subprocess.Popen(
        [BLOBSTORE, "push", str(tmp_path / "src"), "big"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not _lease_files(root) and push.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert push.poll() is None, "the push ended before it could be killed"
        push.send_signal(signal.SIGKILL)
    finally:
        push.kill()
        push.wait()
    (lease,) = _lease_files(root)
    shown = json.loads(run_cli(["leases", "--json"], env).stdout)["leases"]
    assert [(r["name"], r["kind"], r["live"], r["ttl"]) for r in shown] == [
        (f"write-{lease.name[6:]}", "writer", True, 120)
    ]
    assert f"pid {push.pid}" in shown[0]["holder"]
    gc = run_cli(["gc", "--grace", "0s"], env)
    assert gc.returncode == 0, gc.stderr
    assert "1 writers active, sweep skipped (blobstore leases)" in gc.stdout
    old = time.time() - 180  # three minutes without a heartbeat
    os.utime(lease, (old, old))
    shown = json.loads(run_cli(["leases", "--json"], env).stdout)["leases"]
    assert [r["live"] for r in shown] == [False]
    gc = run_cli(["gc", "--json", "--grace", "0s"], env)
    assert json.loads(gc.stdout)["skipped_for_writers"] == 0
    cleared = run_cli(["leases", "--clear-stale"], env)
    assert cleared.returncode == 0, cleared.stderr
    assert f"cleared {lease.name}" in cleared.stdout
    assert _lease_files(root) == []


def test_cli_clears_a_named_live_lease(tmp_path: Path) -> None:
    """A lease of an older version lives 24 h: clear it by name once its holder is gone."""
    root = tmp_path / "store"
    env = cli_env(root.as_uri(), tmp_path / "cache")
    write(root / "leases" / "write-0123abcd", b"oldhost 1700000000\n")
    listed = run_cli(["leases"], env)
    assert listed.returncode == 0, listed.stderr
    assert "write-0123abcd" in listed.stdout
    assert "live" in listed.stdout
    assert "oldhost" in listed.stdout
    assert run_cli(["leases", "--clear-stale"], env).returncode == 0
    assert _lease_files(root) != []  # live: not stale
    missing = run_cli(["leases", "--clear", "write-nope"], env)
    assert_one_line_error(missing, "no lease 'write-nope'")
    assert run_cli(["leases", "--clear", "write-0123abcd"], env).returncode == 0
    assert _lease_files(root) == []
    assert "no leases" in run_cli(["leases"], env).stdout


def _temp_with_data(directory: Path) -> bool:
    for path in directory.glob(".*.blobstore-tmp-*"):
        try:
            if path.stat().st_size:
                return True
        except FileNotFoundError:
            continue  # renamed into place meanwhile
    return False


async def test_gc_removes_temp_files_of_killed_writes(tmp_path: Path) -> None:
    """SIGKILL a process in the middle of a file-store write: its temp file stays
    (invisible to list); gc removes it once it is older than an hour, and never a
    young one, which may belong to a write in progress."""
    root = tmp_path / "store"
    script = (
        "import anyio, pathlib, sys\n"
        "from blobstore.filestore import FileObjectStore\n"
        "async def main():\n"
        "    async with FileObjectStore(pathlib.Path(sys.argv[1])) as s:\n"
        "        for i in range(1000):\n"
        "            await s.put(f'chunks/ab/big{i}', bytes(256 << 20))\n"
        "anyio.run(main)\n"
    )
    async with await anyio.open_process([sys.executable, "-c", script, str(root)]) as writer:
        with anyio.fail_after(60):
            while True:  # until the write is under way
                if _temp_with_data(root / "chunks" / "ab"):
                    break
                await anyio.sleep(0.005)
        assert writer.returncode is None
        writer.send_signal(signal.SIGKILL)
        await writer.wait()
    killed = list((root / "chunks" / "ab").glob(".*.blobstore-tmp-*"))
    assert len(killed) == 1
    young = root / "refs" / ".tmp-inflight"
    write(young, b"a write in progress")
    async with FileObjectStore(root) as store:
        listed = [info.key async for info in store.list("")]
        assert not [key for key in listed if "/." in key]  # temp files are never keys
        first = await collect(store, None, grace_seconds=HOUR)
        assert first.stale_temp_files == 0  # both are young
        old = time.time() - 2 * HOUR
        os.utime(killed[0], (old, old))
        second = await collect(store, None, grace_seconds=HOUR)
        assert second.stale_temp_files == 1
        dry = await collect(store, None, grace_seconds=HOUR, dry_run=True)
        assert dry.stale_temp_files == 0
    assert not killed[0].exists()
    assert young.exists()
