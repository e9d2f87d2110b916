"""Leases: how gc and writers (push, image import, sync) keep out of each other's way.

The race they close: a writer finds an old, unreferenced chunk already in the
store and reuses it instead of uploading it; gc, which has not seen the
writer's ref yet, sweeps that chunk; the writer's ref then points at a missing
object. (New uploads are protected by gc's grace period alone.)

Both sides announce themselves, then look for the other (write, then read):

- a writer puts ``leases/write-<uuid>`` and then waits while a fresh
  ``leases/gc`` exists; only then does it ask the store what it already has;
- gc puts ``leases/gc`` (refreshed while it runs), then lists writer leases and
  sweeps only if there are none.

With read-after-write consistent stores (a directory, S3), at least one side
sees the other: either gc skips its sweep, or the writer waits until gc is done
and then sees the swept chunks as missing and uploads them again.
Leases of crashed processes expire (writers after a day, gc after two minutes
without a refresh).
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from .objectstore import ObjectStore

log = logging.getLogger(__name__)

LEASES = "leases/"
GC_KEY = LEASES + "gc"
WRITER_PREFIX = LEASES + "write-"


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    writer_ttl: float = 24 * 3600
    gc_ttl: float = 120.0
    gc_refresh: float = 30.0
    poll: float = 1.0


class Leases:
    """Writer and gc leases in an object store."""

    def __init__(self, store: ObjectStore, timing: LeaseTiming | None = None) -> None:
        self.store = store
        self.timing = timing or LeaseTiming()

    @asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        """Hold a writer lease; returns once no gc is running. Raises Unavailable."""
        key = f"{WRITER_PREFIX}{uuid.uuid4().hex}"
        await self.store.put(key, _stamp())
        try:
            await self._wait_for_gc()
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await self.store.delete(key)

    @asynccontextmanager
    async def collecting(self) -> AsyncIterator[int]:
        """Hold the gc lease (refreshed in the background); yields how many live
        writers there are — sweep only if it is 0. Raises Unavailable."""
        await self.store.put(GC_KEY, _stamp())
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._refresh_gc)
                try:
                    yield await self._live(WRITER_PREFIX, self.timing.writer_ttl)
                finally:
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.store.delete(GC_KEY)

    async def _refresh_gc(self) -> None:
        while True:
            await anyio.sleep(self.timing.gc_refresh)
            await self.store.put(GC_KEY, _stamp())

    async def _wait_for_gc(self) -> None:
        said = False
        while await self._live(GC_KEY, self.timing.gc_ttl):
            if not said:
                log.warning("waiting for a gc of %s to finish", self.store.url)
                said = True
            await anyio.sleep(self.timing.poll)

    async def _live(self, prefix: str, ttl: float) -> int:
        cutoff = time.time() - ttl
        live = 0
        async for info in self.store.list(prefix):
            live += info.mtime >= cutoff
        return live


def _stamp() -> bytes:
    return f"{socket.gethostname()} {time.time():.0f}\n".encode()
