"""The peer daemon of a node: wires cache, object store, server, discovery,
liveness and the HTTP ops side together, and runs until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass, field, replace
from functools import partial

from blobstore.config import Config, PeerConfig
from blobstore.errors import PeerUnavailable, Unavailable
from blobstore.hostport import listen_address
from blobstore.ids import ChunkId
from blobstore.locator import PackLocator
from blobstore.nodestore import NodeStore
from blobstore.origin import OriginSource
from blobstore.packs import IndexCache
from blobstore.source import ChunkSource
from blobstore.stores import open_object_store

from . import placement
from .agentserver import AgentServer
from .client import Identity
from .discovery import zeroconf_session
from .homeblocks import HomeBlocks
from .http import http_serving, make_app
from .liveness import PeerDirectory, Timing
from .metrics import Metrics
from .peertier import PeerTier
from .provider import ChunkProvider
from .server import PeerServer, ServerIdentity, ServerLimits
from .tls import TlsContexts, load_contexts

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DaemonOptions:
    listen: str
    http: str | None = None
    node: str | None = None
    timing: Timing = field(default_factory=Timing)
    corrupt_for_tests: bool = False
    limits: ServerLimits = field(default_factory=ServerLimits)


async def run_daemon(config: Config, opts: DaemonOptions) -> int:
    """Serve until SIGTERM/SIGINT. Raises ConfigError, Unavailable on start-up failures."""
    host, port = listen_address(opts.listen, "--listen")
    http_addr = listen_address(opts.http, "--http") if opts.http else None
    stop = asyncio.Event()
    on_second_signal: list[Callable[[], None]] = []
    """A second SIGTERM/SIGINT stops without waiting for answers in flight."""

    def on_signal() -> None:
        if stop.is_set():
            for hurry in on_second_signal:
                hurry()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        async with AsyncExitStack() as stack:
            tls: TlsContexts | None = None
            if config.peers.tls is not None:
                tls = await asyncio.to_thread(load_contexts, config.peers.tls)
            store = await stack.enter_async_context(open_object_store(config.store_url, config.s3))
            cache = await stack.enter_async_context(NodeStore(config.cache))
            # The port is only known after binding, and the node id defaults to it.
            server_tg = await stack.enter_async_context(asyncio.TaskGroup())
            metrics = Metrics()
            stack.callback(metrics.include_node(cache))  # node store gauges, in-process pulls
            node_box: list[str] = [opts.node or ""]
            client_tls = tls.client if tls else None
            me = Identity(node_box[0] or "pending", config.region, config.peers.token, client_tls)
            directory = PeerDirectory(me, opts.timing, opts.limits.max_gossip_peers)

            async def is_home(chunk_id: ChunkId) -> bool:
                # Placed as requesters place it: by its block when a pack holds it.
                key: str = chunk_id
                with contextlib.suppress(Unavailable):
                    where = await origin.locator.locate(chunk_id)
                    if where is not None:
                        key = placement.home_key(where)
                nodes = [p.node for p in directory.live()] + [node_box[0]]
                # Its home reads the store, its servers the home (HomeBlocks.read).
                return placement.reads_through(nodes, node_box[0], chunk_id, key)

            origin = OriginSource(
                store,
                locator=PackLocator(  # this node's cached pack indexes
                    store, IndexCache.for_store(config.cache.dir, store.url)
                ),
            )
            # A home reads through by block: its next-ranked peers first (they may hold
            # it), then the store, one ranged GET per block.
            handoff = HomeBlocks(cache, PeerTier(directory), origin, server_tg, metrics)
            provider = ChunkProvider(cache, handoff, is_home, metrics, server_tg)
            # Bind first to learn the port, so node id and handshakes agree from the start.
            try:
                # (in a thread: a host name is resolved, which blocks)
                sock = await asyncio.to_thread(socket.create_server, (host, port))
            except OSError as exc:
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                raise PeerUnavailable(f"cannot listen on {host}:{port}: {reason}") from exc
            stack.callback(sock.close)
            bound = sock.getsockname()[1]
            node = opts.node or f"{socket.gethostname()}:{bound}"
            node_box[0] = node
            directory.me = Identity(node, config.region, config.peers.token, client_tls)
            directory.serving_port = bound
            server = PeerServer(
                ServerIdentity(
                    node,
                    config.region,
                    config.peers.token,
                    opts.corrupt_for_tests,
                    tls.wire_server if tls else None,
                ),
                provider,
                metrics,
                limits=opts.limits,
                peers=directory.gossip,  # a sample of live peers, and news
                learn=lambda address: directory.add(address, "gossip"),
                hear=directory.hear,  # deaths and joins, riding on pings
            )
            await stack.enter_async_context(server.serving(host, bound, sock))
            on_second_signal.append(server.hurry)
            await stack.enter_async_context(directory)
            agent_server = AgentServer(
                config,
                store,
                cache,
                None
                if config.peers.mode == "none"
                else partial(_agent_peers, config, host, bound, directory),
                opts.limits.agent_pulls,
                metrics,
            )
            await stack.enter_async_context(agent_server.serving())
            metrics.peers = lambda: len(directory.live())
            metrics.known_peers = lambda: len(directory.all())
            metrics.peer_statuses = lambda: [p.status for p in directory.all()]
            http_port = None
            if http_addr is not None:
                app = make_app(
                    node,
                    config.region,
                    metrics,
                    provider,
                    directory,
                    config.peers.token,
                    tls is not None,
                )
                http_port = await stack.enter_async_context(
                    http_serving(
                        app,
                        *http_addr,
                        tls.http if tls else None,
                        shutdown_timeout=opts.limits.drain_timeout,
                    )
                )
            if config.peers.mode == "static":
                for address in config.peers.static:
                    directory.add(address, "static")
            elif config.peers.mode == "auto":
                await stack.enter_async_context(
                    zeroconf_session(node, config.region, host, bound, directory)
                )
            ready = {
                "event": "ready",
                "node": node,
                "region": config.region,
                "listen": f"{host}:{bound}",
                "tls": tls is not None,
                "http": f"{http_addr[0]}:{http_port}" if http_addr else None,
                "agent": agent_server.path,
            }
            print(json.dumps(ready), flush=True)
            log.info("daemon %s serving region %r on %s:%d", node, config.region, host, bound)
            await stop.wait()
            log.info("daemon %s stopping", node)
            # Answers already asked for go out (up to drain_timeout) while discovery
            # says goodbye and the HTTP side finishes its own requests.
            server.drain()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    sys.stdout.flush()
    return 0


def _agent_peers(
    config: Config, host: str, port: int, directory: PeerDirectory
) -> AbstractAsyncContextManager[ChunkSource | None]:
    """The peer tier of a pull the node agent runs: as a CLI pull's on this node, with
    this daemon (asked first for the chunks it is home for, so the region still reads
    each block once) and the peers it sees live as its static list."""
    from .pulltier import pull_peer_tier

    me = "127.0.0.1" if host in ("", "0.0.0.0") else "[::1]" if host == "::" else host
    here = f"[{me}]:{port}" if ":" in me and not me.startswith("[") else f"{me}:{port}"
    static = (here, *(p.address for p in directory.live()))
    peers = PeerConfig(mode="static", static=static, token=config.peers.token, tls=config.peers.tls)
    return pull_peer_tier(replace(config, peers=peers))
