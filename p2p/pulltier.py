"""The peer tier of one pull: its own directory of the region's peers (the static
list, or this node's daemon and zeroconf), opened for the pull and closed with it.
Used by embedded pulls (the p2p plugin) and by the node agent's (p2p/daemon.py)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from blobstore.config import Config
    from blobstore.source import ChunkSource

    from .liveness import PeerDirectory, Timing

DEFAULT_PORT = 7411
HEALTH_INTERVAL_ENV = "BLOBSTORE_HEALTH_INTERVAL"
LOCAL_DAEMON = f"127.0.0.1:{DEFAULT_PORT}"
"""Where ``--peers auto`` looks for this node's own daemon: it answers at once and
names the region's live peers, so a pull need not wait for mDNS."""
_FIRST_PEER_WAIT = 1.0
"""How long a pull's first peer request waits for a first peer (local daemon or mDNS)."""
_MDNS_SETTLE = 0.3


@asynccontextmanager
async def open_directory(
    config: Config, timing: Timing | None = None
) -> AsyncIterator[PeerDirectory]:
    """A directory of this region's peers, fed by the static list or zeroconf."""
    from .client import Identity
    from .liveness import PeerDirectory, Timing

    tls = None
    if config.peers.tls is not None and config.peers.mode != "none":
        from .tls import client_context

        tls = await asyncio.to_thread(client_context, config.peers.tls)
    me = Identity(
        f"client-{socket.gethostname()}-{os.getpid()}", config.region, config.peers.token, tls
    )
    async with AsyncExitStack() as stack:
        directory = await stack.enter_async_context(PeerDirectory(me, timing or Timing()))
        if config.peers.mode == "static":
            for address in config.peers.static:
                directory.add(address, "static")
        elif config.peers.mode == "auto":
            from .discovery import zeroconf_session

            directory.add(LOCAL_DAEMON, "local")
            await stack.enter_async_context(
                zeroconf_session(me.node, config.region, "", None, directory)
            )
        yield directory


@asynccontextmanager
async def pull_peer_tier(config: Config) -> AsyncIterator[ChunkSource | None]:
    """The peer tier of one pull (embedded, or run by the node agent), with its own
    directory of ``config``'s peers, closed with the pull."""
    if config.peers.mode == "none":
        yield None
        return
    from .peertier import PeerTier

    timing = _pull_timing(os.environ)
    async with open_directory(config, timing) as directory, asyncio.TaskGroup() as tg:
        # Discovery runs while the pull looks in the local cache; the tier waits for
        # it only when a chunk is first asked of peers, so a warm pull never waits.
        settled = tg.create_task(_settle_for_pull(directory, config.peers.mode, timing))
        yield PeerTier(directory, settled=settled)
        settled.cancel()


def _pull_timing(env: Mapping[str, str]) -> Timing:
    """A pull's liveness timing: the daemon's (``BLOBSTORE_HEALTH_INTERVAL``, timeout 3x
    it) when that is set to seconds > 0, else the default. A host too busy to answer a
    check within 3 s (bench/bench_region.py: 40 processes on 2 cores) sets it for both."""
    from .liveness import Timing

    try:
        interval = float(env.get(HEALTH_INTERVAL_ENV, ""))
    except ValueError:
        return Timing()
    return Timing(interval=interval, timeout=max(1.0, 3 * interval)) if interval > 0 else Timing()


async def _settle_for_pull(directory: PeerDirectory, mode: str, timing: Timing) -> None:
    try:
        async with asyncio.timeout(_FIRST_PEER_WAIT if mode == "auto" else timing.timeout):
            if mode == "auto":
                await directory.peer_up.wait()
                if not any(p.source == "local" for p in directory.live()):
                    # One mDNS answer usually brings every peer; give the rest a moment.
                    await asyncio.sleep(_MDNS_SETTLE)
            # Peers named in pongs (the local daemon's, a seed's) are checked too.
            await directory.checked.wait()
    except TimeoutError:
        pass
