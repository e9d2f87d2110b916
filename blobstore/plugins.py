"""Extension points found through the ``blobstore.plugins`` entry-point group.

The core never imports ``p2p``; the ``p2p`` package registers a plugin that
adds CLI commands (``daemon``, ``peers``) through the typed hook
``blobstore.cli.registry.Commands`` and a peer tier for pulls. A plugin that
fails to import is named in a warning and left out; a built-in command is never
looked up this way.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .cli.registry import Commands
    from .config import Config
    from .nodestore import NodeStore
    from .source import ChunkSource

GROUP = "blobstore.plugins"

PeerTierFactory = Callable[
    ["Config", "NodeStore"], AbstractAsyncContextManager["ChunkSource | None"]
]


class Plugin(Protocol):
    name: str

    def add_commands(self, commands: Commands) -> None:
        """Add sub-commands with ``commands.add(name, help, run)`` (``run`` is async,
        takes (args, config), returns the exit status) and give each its arguments."""
        ...

    def peer_tier(
        self, config: Config, cache: NodeStore
    ) -> AbstractAsyncContextManager[ChunkSource | None]:
        """Yield a ChunkSource for the peer tier (or None when peers are off)."""
        ...


def load_plugins() -> list[Plugin]:
    """Every installed plugin, in name order. Found and imported once per process
    (the CLI's parser and ``Client.open`` both ask)."""
    return list(_load_plugins())


@functools.cache
def _load_plugins() -> tuple[Plugin, ...]:
    found: list[Plugin] = []
    for name, value in sorted(entry_points(GROUP)):
        try:
            found.append(_load(value))
        except Exception as exc:  # a broken plugin must not take the core CLI down
            logging.getLogger(__name__).warning("plugin %s failed to load: %s", name, exc)
    return tuple(found)


def entry_points(group: str) -> list[tuple[str, str]]:
    """(name, ``module:attr``) of each entry point in ``group``.

    Reads ``*.dist-info``/``*.egg-info`` ``entry_points.txt`` in the ``sys.path``
    directories as importlib.metadata does (the first distribution of a name on the
    path wins), without importing importlib.metadata and building every
    distribution's metadata: that is ~10 ms of every command's start-up. Falls back
    to importlib.metadata when ``sys.path`` holds a zip archive.
    """
    if any(os.path.isfile(entry) for entry in sys.path):
        from importlib import metadata

        return [(ep.name, ep.value) for ep in metadata.entry_points(group=group)]
    found: list[tuple[str, str]] = []
    seen: set[str] = set()
    for info in _distribution_dirs():
        name = _normalized(info.rsplit(os.sep, 1)[-1])
        if name in seen:
            continue
        seen.add(name)
        try:
            with open(os.path.join(info, "entry_points.txt"), encoding="utf-8") as f:
                text = f.read()
        except OSError:
            continue
        found.extend(_section(text, group))
    return found


def _distribution_dirs() -> Iterator[str]:
    for entry in sys.path:
        root = entry or "."
        try:
            names = os.listdir(root)
        except OSError:
            continue
        for name in names:
            if name.endswith((".dist-info", ".egg-info")):
                yield os.path.join(root, name)


def _normalized(dirname: str) -> str:
    """``Foo.Bar-1.0.dist-info`` -> ``foo_bar``, as importlib.metadata keys distributions."""
    stem = dirname.rsplit(".", 1)[0]
    return re.sub(r"[-_.]+", "_", stem.partition("-")[0]).lower()


def _section(text: str, group: str) -> Iterator[tuple[str, str]]:
    """The ``name = value`` lines of ``[group]`` in an entry_points.txt."""
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1].strip()
        elif current == group and "=" in line:
            name, _, value = line.partition("=")
            yield name.strip(), value.strip()


def _load(value: str) -> Plugin:
    """Import ``module:attr.path`` (extras in ``[...]`` ignored, as EntryPoint.load does)."""
    module_name, _, attrs = value.split("[", 1)[0].strip().partition(":")
    obj = importlib.import_module(module_name.strip())
    for attr in filter(None, attrs.strip().split(".")):
        obj = getattr(obj, attr)
    plugin: Plugin = obj
    return plugin
