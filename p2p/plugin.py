"""The p2p plugin: ``daemon`` and ``peers`` commands and the peer tier for pulls."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from blobstore.cli.registry import Commands
    from blobstore.config import Config
    from blobstore.nodestore import NodeStore
    from blobstore.source import ChunkSource

    from .daemon import DaemonOptions
    from .liveness import PeerDirectory

from .pulltier import DEFAULT_PORT, HEALTH_INTERVAL_ENV

# The peer client, directory and discovery are imported where a command or a pull
# uses them: the CLI loads this plugin to list its commands (``blobstore --help``).

DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_PORT}"


async def settle(directory: PeerDirectory, mdns_wait: float, deadline: float) -> None:
    """Wait until discovery had ``mdns_wait`` seconds and every found peer was checked."""
    if mdns_wait > 0:
        await asyncio.sleep(mdns_wait)
    try:
        async with asyncio.timeout(deadline):
            await directory.checked.wait()
    except TimeoutError:
        pass


class P2PPlugin:
    name = "p2p"

    def add_commands(self, commands: Commands) -> None:
        p = commands.add(
            "daemon",
            "the peer daemon of a node",
            _cmd_daemon,
            description="Serve this node's cache to same-region peers; home chunks read "
            "through to the object store.",
            log_level=logging.INFO,  # an operator wants its start and stop in the log
        )
        p.add_argument(
            "--listen",
            metavar="HOST:PORT",
            help=f"peer protocol address (env BLOBSTORE_LISTEN; default {DEFAULT_LISTEN}; "
            "port 0 picks one)",
        )
        p.add_argument(
            "--http",
            metavar="HOST:PORT",
            help="ops HTTP address: /healthz, /metrics, /chunks/<id> (env BLOBSTORE_HTTP; "
            "HTTPS with --tls-cert; chunk reads need the token or a client certificate, "
            "see docs/security.md)",
        )
        p.add_argument(
            "--node-id", help="stable node name (env BLOBSTORE_NODE_ID; default HOSTNAME:PORT)"
        )
        p.add_argument(
            "--health-interval",
            type=_seconds,
            metavar="SECONDS",
            help="ping quiet peers this often (env BLOBSTORE_HEALTH_INTERVAL; default 1)",
        )
        p.add_argument(
            "--limit",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="change one of the daemon's limits (connections, timeouts, "
            "budgets; see docs/security.md, Memory bounds); repeatable; env "
            "BLOBSTORE_LIMITS holds NAME=VALUE[,NAME=VALUE...], a flag wins",
        )
        p.add_argument("--corrupt-for-tests", action="store_true", help=argparse.SUPPRESS)

        p = commands.add(
            "peers",
            "list the live peers this node sees",
            _cmd_peers,
            description="Discover and check this region's peers.",
        )
        p.add_argument("--json", action="store_true")
        p.add_argument(
            "--wait",
            type=float,
            default=2.0,
            metavar="SECONDS",
            help="how long to listen for mDNS announcements (default 2)",
        )
        p.add_argument("--all", action="store_true", help="also list down/ignored peers")

    def peer_tier(
        self, config: Config, cache: NodeStore
    ) -> AbstractAsyncContextManager[ChunkSource | None]:
        from .pulltier import pull_peer_tier

        return pull_peer_tier(config)


DAEMON_ENV = {
    "listen": "BLOBSTORE_LISTEN",
    "http": "BLOBSTORE_HTTP",
    "node_id": "BLOBSTORE_NODE_ID",
    "health_interval": HEALTH_INTERVAL_ENV,
    "limit": "BLOBSTORE_LIMITS",
}
"""The environment variable behind each daemon flag (the global options have theirs
in blobstore.config): a container or unit file can configure the daemon with env only."""


def daemon_options(args: argparse.Namespace, env: Mapping[str, str]) -> DaemonOptions:
    """The daemon's options from its flags, else ``BLOBSTORE_*`` variables, else defaults.

    Raises ConfigError for a value that does not parse (one line naming the flag or
    variable).
    """
    from blobstore.errors import ConfigError
    from blobstore.hostport import listen_address

    from .daemon import DaemonOptions
    from .liveness import Timing
    from .server import ServerLimits

    def pick(name: str) -> tuple[str | None, str]:
        """The value and where it came from (the flag, or the variable)."""
        value: object = getattr(args, name)
        if value is not None:
            return str(value), "--" + name.replace("_", "-")
        return env.get(DAEMON_ENV[name], "").strip() or None, DAEMON_ENV[name]

    listen, listen_from = pick("listen")
    http, http_from = pick("http")
    for address, source in ((listen, listen_from), (http, http_from)):
        if address is not None:
            listen_address(address, source)  # refused here, naming where it came from
    interval_text, interval_from = pick("health_interval")
    try:
        interval = float(interval_text or "1")
    except ValueError:
        interval = -1.0
    if not interval > 0:  # also refuses nan
        raise ConfigError(f"bad {interval_from} {interval_text!r}: expected seconds > 0")
    env_limits = [item for item in env.get(DAEMON_ENV["limit"], "").split(",") if item.strip()]
    try:
        ServerLimits.parse(env_limits)
    except ConfigError as exc:
        raise ConfigError(f"{DAEMON_ENV['limit']}: {exc}") from None
    return DaemonOptions(
        listen or DEFAULT_LISTEN,
        http,
        pick("node_id")[0],
        Timing(interval=interval, timeout=max(1.0, 3 * interval)),
        args.corrupt_for_tests,
        limits=ServerLimits.parse([*env_limits, *args.limit]),
    )


def _seconds(text: str) -> float:
    """argparse type of --health-interval: a bad value is a usage error (exit 2)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0")
    return value


async def _cmd_daemon(args: argparse.Namespace, config: Config) -> int:
    from .daemon import run_daemon

    return await run_daemon(config, daemon_options(args, os.environ))


async def _cmd_peers(args: argparse.Namespace, config: Config) -> int:
    from .pulltier import open_directory

    async with open_directory(config) as directory:
        await settle(directory, args.wait if config.peers.mode == "auto" else 0, 5.0)
        peers = directory.all() if args.all else directory.live()
        rows = sorted((p.describe() for p in peers), key=lambda r: str(r["node"]))
    from blobstore.cli.output import emit

    lines = [f"{r['node']}\t{r['address']}\t{r['status']}\t{r['source']}" for r in rows]
    emit(
        args,
        {"region": config.region, "peers": rows},
        "\n".join(lines) or f"no live peers in region {config.region!r}",
    )
    return 0


PLUGIN = P2PPlugin()
