"""How a sub-command is declared and added to the parser.

Each ``blobstore/cli/<group>.py`` declares its commands as :class:`Command`
values (name, help, arguments, run); the parser adds them with the global
options through :class:`Commands`, the same typed hook plugins get. A command's
``run`` is stored with ``set_defaults(run=...)`` and called with the parsed
arguments and the :class:`~blobstore.config.Config`.

Command modules stay light: what a command needs beyond argparse is imported
inside its ``arguments``/``run`` functions, so ``blobstore pull`` does not load
the image tooling, gc or the p2p plugin (tests/test_startup.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..client import Client
    from ..config import Config

Run = Callable[[argparse.Namespace, "Config"], Awaitable[int]]
"""What every sub-command finally is: parsed arguments and config in, exit status out."""
ClientRun = Callable[[argparse.Namespace, "Client"], Awaitable[int]]
"""A built-in command's body: it gets an open Client."""


@dataclass(frozen=True, slots=True)
class Command:
    """One built-in sub-command."""

    name: str
    help: str
    run: ClientRun
    arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    """Adds the command's own arguments (imports what their defaults need)."""
    peers: bool = False
    """Whether the Client opens the peer tier (only commands that fetch chunks)."""
    description: str | None = None
    usage: str | None = None


@dataclass(frozen=True, slots=True)
class Group:
    """A command with sub-commands (``image import``)."""

    name: str
    help: str
    commands: tuple[Command, ...]
    description: str | None = None


@dataclass(frozen=True, slots=True)
class GlobalOption:
    flags: tuple[str, ...]
    help: str
    metavar: str | None = None
    counts: bool = False
    """``-v -v``: a counter, takes no value."""

    @property
    def takes_value(self) -> bool:
        return not self.counts


class Commands:
    """Adds sub-commands, each with the global options, to a parser.

    The hook a plugin's ``add_commands(commands)`` receives (see
    blobstore.plugins.Plugin).
    """

    def __init__(
        self,
        subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
        common: argparse.ArgumentParser,
    ) -> None:
        self._subparsers = subparsers
        self._common = common

    def add(
        self,
        name: str,
        help: str,
        run: Run,
        *,
        description: str | None = None,
        usage: str | None = None,
    ) -> argparse.ArgumentParser:
        """A new sub-command ``name`` calling ``run(args, config)``; add its arguments
        to the parser returned."""
        parser = self._subparsers.add_parser(
            name,
            help=help,
            description=description or help,
            usage=usage,
            parents=[self._common],
        )
        parser.set_defaults(run=run)
        return parser

    def group(self, name: str, help: str, *, description: str | None = None) -> Commands:
        """A sub-command with sub-commands of its own; add them to the Commands returned."""
        parser = self._subparsers.add_parser(
            name, help=help, description=description or help, parents=[self._common]
        )
        sub = parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)
        return Commands(sub, self._common)

    def add_builtin(self, command: Command | Group) -> None:
        if isinstance(command, Group):
            children = self.group(command.name, command.help, description=command.description)
            for child in command.commands:
                children.add_builtin(child)
            return
        parser = self.add(
            command.name,
            command.help,
            WithClient(command.run, command.peers),
            description=command.description,
            usage=command.usage,
        )
        command.arguments(parser)


@dataclass(frozen=True, slots=True)
class WithClient:
    """A built-in command as a Run: opens the Client (with or without peers) for it."""

    run: ClientRun
    peers: bool

    async def __call__(self, args: argparse.Namespace, config: Config) -> int:
        from ..client import Client

        async with Client.open(config, peers=self.peers) as client:
            return await self.run(args, client)


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def find(commands: Sequence[Command | Group], name: str) -> Command | Group | None:
    return next((c for c in commands if c.name == name), None)
