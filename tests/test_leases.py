"""Leases: gc and writers never break each other (the reused-old-chunk race)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import pytest
from helpers import random_bytes, write
from test_gc import HOUR, age_file_store, config_for, keys, two_trees

from blobstore.client import Client
from blobstore.gc import collect
from blobstore.leases import GC_KEY, WRITER_PREFIX, Leases, LeaseTiming
from blobstore.objectstore import CHUNKS, chunk_key

pytestmark = pytest.mark.anyio

FAST = LeaseTiming(gc_ttl=5.0, gc_refresh=0.05, poll=0.01)


async def test_gc_sweeps_nothing_while_a_writer_holds_a_lease(tmp_path: Path) -> None:
    async with Client.open(config_for(f"file://{tmp_path / 'store'}", tmp_path / "c")) as client:
        _, dropped = await two_trees(client, tmp_path)
        age_file_store(tmp_path / "store", 2 * HOUR)
        async with client.writing():
            busy = await collect(client.object_store, None, grace_seconds=HOUR)
        assert busy.skipped_for_writers == 1
        assert busy.swept_chunks == 0
        assert {chunk_key(c) for c in dropped} <= await keys(client.object_store, CHUNKS)
        free = await collect(client.object_store, None, grace_seconds=HOUR)
        assert free.skipped_for_writers == 0
        assert free.swept_chunks == len(dropped)
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
                    await anyio.sleep(0.3)  # the writer polls and must still be waiting
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


async def test_reused_old_chunk_survives_a_concurrent_gc(object_store_url: str,
                                                        tmp_path: Path) -> None:
    """The race itself: a push reuses an old unreferenced chunk while gc runs."""
    async with Client.open(config_for(object_store_url, tmp_path / "c")) as client:
        data = random_bytes(3 << 20, "orphan")
        write(tmp_path / "a" / "w.bin", data)
        await client.push(tmp_path / "a", "a")
        await client.catalog.delete_ref("a")  # its chunks are now unreferenced
        write(tmp_path / "b" / "w.bin", data)  # same content: a push of b reuses them
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.push, tmp_path / "b", "b")
            # grace < 0: every unreferenced object counts as old
            tg.start_soon(lambda: collect(client.object_store, None, grace_seconds=-HOUR))
        verified = await client.verify("b")
        assert verified.ok, (verified.missing, verified.corrupt)
