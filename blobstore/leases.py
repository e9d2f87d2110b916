"""Leases: how gc and writers (push, image import, sync) keep out of each other's way.

The race they close: a writer finds an old, unreferenced chunk already in the
store and reuses it instead of uploading it; gc, which has not seen the
writer's ref yet, sweeps that chunk; the writer's ref then points at a missing
object. (New uploads are protected by gc's grace period alone.)

Both sides announce themselves, then look for the other (write, then read):

- a writer puts ``leases/write-t<ttl>-<uuid>`` and then waits while a fresh
  ``leases/gc`` exists; only then does it ask the store what it already has;
- gc puts ``leases/gc``, then lists writer leases and sweeps only if there are
  none.

With read-after-write consistent stores (a directory, S3), at least one side
sees the other: either gc skips its sweep, or the writer waits until gc is done
and then sees the swept chunks as missing and uploads them again.

Both leases are short and kept alive by a heartbeat (re-put every ``refresh``
seconds) while their holder runs, so the lease of a killed process expires
within ``ttl`` (2 minutes): a killed push no longer blocks gc for a day. The
TTL is part of a writer lease's name, so whoever reads it knows when it lapses
without sharing configuration; writer leases without one (older versions) keep
the old 24 h. A holder that cannot refresh its lease for ``ttl - refresh``
seconds stops with StoreUnavailable rather than run unprotected.

Freshness is judged on the store's clock, not the local one: each side reads
back the modification time of the lease it just wrote, so hosts whose clocks
disagree still agree on which leases are alive.

A writer frozen (SIGSTOP, a suspended VM) for longer than the TTL loses its
protection; its heartbeat notices on waking and stops it, but a write already
under way at that moment is not recalled.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from .errors import NotFound, StoreUnavailable, Unavailable, single_errors
from .objectstore import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

LEASES = "leases/"
GC_KEY = LEASES + "gc"
WRITER_PREFIX = LEASES + "write-"
LEGACY_WRITER_TTL = 24 * 3600.0
"""TTL of a writer lease whose name carries none (written by older versions)."""
_TTL_IN_NAME = re.compile(r"write-t(\d+)-")
_RELEASE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    writer_ttl: float = 120.0
    writer_refresh: float = 30.0
    gc_ttl: float = 120.0
    gc_refresh: float = 30.0
    poll: float = 1.0


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """A lease as ``blobstore leases`` shows it."""

    key: str
    kind: str
    """``writer`` or ``gc``."""
    holder: str
    """Host and pid of the process that took it (as it wrote them)."""
    age: float
    """Seconds since it was last written (on the store's clock)."""
    ttl: float
    live: bool

    @property
    def name(self) -> str:
        """The key without the ``leases/`` prefix (what ``--clear`` takes)."""
        return self.key[len(LEASES) :]


class Leases:
    """Writer and gc leases in an object store."""

    def __init__(self, store: ObjectStore, timing: LeaseTiming | None = None) -> None:
        self.store = store
        self.timing = timing or LeaseTiming()
        self._skew: float | None = None
        """Store clock minus local clock, learnt from a lease we wrote."""
        self._put_at: dict[str, float] = {}
        """Local time each of our leases was first written (for ``_skew``)."""

    @asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        """Hold a writer lease (kept alive in the background); returns once no gc
        is running. Raises Unavailable (also when the lease cannot be kept)."""
        ttl = self.timing.writer_ttl
        key = f"{WRITER_PREFIX}t{max(1, round(ttl))}-{uuid.uuid4().hex}"
        body = _stamp()
        await self._put_first(key, body)
        try:
            with single_errors():
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._heartbeat, key, body, self.timing.writer_refresh, ttl)
                    try:
                        await self._wait_for_gc(key)
                        yield
                    finally:
                        tg.cancel_scope.cancel()
        finally:
            await self._release(key)

    @asynccontextmanager
    async def collecting(self) -> AsyncIterator[int]:
        """Hold the gc lease (kept alive in the background); yields how many live
        writers there are — sweep only if it is 0. Raises Unavailable."""
        body = _stamp()
        await self._put_first(GC_KEY, body)
        try:
            with single_errors():
                async with anyio.create_task_group() as tg:
                    tg.start_soon(
                        self._heartbeat, GC_KEY, body, self.timing.gc_refresh, self.timing.gc_ttl
                    )
                    try:
                        leases = await self._scan(GC_KEY)
                        yield sum(1 for info in leases if info.kind == "writer" and info.live)
                    finally:
                        tg.cancel_scope.cancel()
        finally:
            await self._release(GC_KEY)

    async def entries(self) -> list[LeaseInfo]:
        """Every lease in the store, oldest first. Raises Unavailable."""
        infos = await self._scan_all()
        return sorted(infos, key=lambda i: -i.age)

    async def clear(self, keys: list[str] | None = None) -> list[LeaseInfo]:
        """Delete the named leases (``leases/...`` keys or their last part), or every
        stale one when ``keys`` is None; returns what was deleted. A lease a running
        writer still holds comes back at its next heartbeat, but until then gc may
        sweep what that writer reuses: clear live leases only of processes known
        dead. Raises NotFound for a name that is not a lease, Unavailable."""
        infos = {info.key: info for info in await self._scan_all()}
        if keys is None:
            chosen = [info for info in infos.values() if not info.live]
        else:
            chosen = []
            for name in keys:
                key = name if name.startswith(LEASES) else LEASES + name
                if key not in infos:
                    raise NotFound(f"no lease {name!r} in {self.store.url} (see blobstore leases)")
                chosen.append(infos[key])
        for info in chosen:
            await self.store.delete(info.key)
        return chosen

    # -- helpers -------------------------------------------------------------

    async def _release(self, key: str) -> None:
        """Delete our lease, even when cancelled. If the store is failing, leave it to
        lapse (within its TTL) rather than hide the error that got us here."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(_RELEASE_TIMEOUT):
            try:
                await self.store.delete(key)
            except Unavailable as exc:
                log.warning("could not remove lease %s (it lapses on its own): %s", key, exc)

    async def _put_first(self, key: str, body: bytes) -> None:
        await self.store.put(key, body)
        self._put_at[key] = time.time()

    async def _heartbeat(self, key: str, body: bytes, every: float, ttl: float) -> None:
        """Re-put the lease every ``every`` seconds; give up (raise) once it may
        have lapsed, so the holder stops instead of running unprotected."""
        last_ok = anyio.current_time()
        while True:
            await anyio.sleep(every)
            if anyio.current_time() - last_ok > ttl:
                raise StoreUnavailable(
                    f"lease {key} lapsed (this process was stalled for over {ttl:.0f} s); stopping"
                )
            try:
                await self.store.put(key, body)
                last_ok = anyio.current_time()
            except StoreUnavailable as exc:
                if anyio.current_time() - last_ok + every > ttl:
                    raise StoreUnavailable(f"cannot keep lease {key} alive: {exc}") from exc
                log.warning("cannot refresh lease %s (will retry): %s", key, exc)

    async def _wait_for_gc(self, own: str) -> None:
        said = False
        while any(info.kind == "gc" and info.live for info in await self._scan(own)):
            if not said:
                log.warning("waiting for a gc of %s to finish", self.store.url)
                said = True
            await anyio.sleep(self.timing.poll)

    async def _scan_all(self) -> list[LeaseInfo]:
        """``_scan`` with holders, on the store's clock (read from a probe key)."""
        probe = f"{LEASES}clock-{uuid.uuid4().hex}"
        await self._put_first(probe, b"")
        try:
            return await self._scan(probe, holders=True)
        finally:
            await self._release(probe)

    async def _scan(self, own: str, *, holders: bool = False) -> list[LeaseInfo]:
        """Every lease with its state. The first scan that sees ``own`` (a lease
        this object wrote) learns the store's clock from its mtime; until then the
        local clock is used. The estimate errs towards "younger", the safe side."""
        found = [info async for info in self.store.list(LEASES)]
        if self._skew is None:
            for info in found:
                if info.key == own:
                    self._skew = info.mtime - self._put_at[own]
        now = time.time() + (self._skew or 0.0)
        held_by = {info.key: await self._holder(info.key) for info in found} if holders else {}
        result = []
        for info in found:
            kind, ttl = self._kind_and_ttl(info)
            if kind is None:
                continue
            age = max(0.0, now - info.mtime)
            result.append(
                LeaseInfo(info.key, kind, held_by.get(info.key, ""), age, ttl, age <= ttl)
            )
        return result

    def _kind_and_ttl(self, info: ObjectInfo) -> tuple[str | None, float]:
        if info.key == GC_KEY:
            return "gc", self.timing.gc_ttl
        if info.key.startswith(WRITER_PREFIX):
            match = _TTL_IN_NAME.match(info.key, len(LEASES))
            return "writer", float(match.group(1)) if match else LEGACY_WRITER_TTL
        return None, 0.0

    async def _holder(self, key: str) -> str:
        try:
            raw = await self.store.get(key)
        except NotFound:
            return "(gone)"
        try:
            doc = json.loads(raw)
            return f"{doc['host']} pid {doc['pid']}"
        except (ValueError, KeyError, TypeError):
            return raw.decode("utf-8", "replace").split(" ")[0].strip()  # older: "host time"


def _stamp() -> bytes:
    doc = {"host": socket.gethostname(), "pid": os.getpid(), "started": round(time.time())}
    return json.dumps(doc).encode() + b"\n"
