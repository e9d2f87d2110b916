"""Extension points found through the ``blobstore.plugins`` entry-point group.

The core never imports ``p2p``; the ``p2p`` package registers a plugin that
adds CLI commands (``daemon``, ``peers``) and a peer tier for pulls.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .config import Config
    from .nodestore import NodeStore
    from .source import ChunkSource

PeerTierFactory = Callable[
    ["Config", "NodeStore"], AbstractAsyncContextManager["ChunkSource | None"]
]


class Plugin(Protocol):
    name: str

    def add_commands(self, subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        """Register sub-commands; each sets ``func`` (async, takes (args, config), returns int)."""
        ...

    def peer_tier(
        self, config: Config, cache: NodeStore
    ) -> AbstractAsyncContextManager[ChunkSource | None]:
        """Yield a ChunkSource for the peer tier (or None when peers are off)."""
        ...


def load_plugins() -> list[Plugin]:
    """Every installed plugin, in name order."""
    found: list[Plugin] = []
    for ep in sorted(entry_points(group="blobstore.plugins"), key=lambda e: e.name):
        try:
            found.append(ep.load())
        except Exception as exc:  # a broken plugin must not take the core CLI down
            logging.getLogger(__name__).warning("plugin %s failed to load: %s", ep.name, exc)
    return found
