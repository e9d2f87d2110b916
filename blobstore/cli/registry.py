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
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

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
    lazy_store: bool = False
    """Open the object store when first used, not before the command runs."""
    check: Callable[[argparse.Namespace], str | None] = lambda args: None
    """A usage problem argparse cannot see (options that go together), or None:
    reported like argparse's own, exit status 2."""
    description: str | None = None
    usage: str | None = None
    log_level: int = logging.WARNING
    """Logging level without --log-level/-v (a long-running service says more)."""


@dataclass(frozen=True, slots=True)
class Group:
    """A command with sub-commands (``image import``)."""

    name: str
    help: str
    commands: tuple[Command, ...]
    description: str | None = None


@dataclass(frozen=True, slots=True)
class GlobalOption:
    """An option accepted before the command and after it."""

    flags: tuple[str, ...]
    help: str
    metavar: str | None = None
    action: Literal["store", "count", "store_true"] = "store"
    choices: tuple[str, ...] | None = None

    @property
    def takes_value(self) -> bool:
        return self.action == "store"

    def add_to(self, group: argparse._ArgumentGroup, *, suppress: bool) -> None:
        """On a sub-command the default is SUPPRESS, so a value given before the
        command is not overwritten."""
        empty: object = {"store": None, "count": 0, "store_true": False}[self.action]
        default = argparse.SUPPRESS if suppress else empty
        if self.action == "store":
            group.add_argument(
                *self.flags,
                metavar=self.metavar,
                choices=self.choices,
                default=default,
                help=self.help,
            )
        else:
            group.add_argument(*self.flags, action=self.action, default=default, help=self.help)


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
        log_level: int = logging.WARNING,
    ) -> argparse.ArgumentParser:
        """A new sub-command ``name`` calling ``run(args, config)``; add its arguments
        to the parser returned. ``log_level``: the level without --log-level/-v
        (a service wants INFO: its start and stop)."""
        parser = self._subparsers.add_parser(
            name,
            help=help,
            description=description or help,
            usage=usage,
            parents=[self._common],
        )
        parser.set_defaults(
            run=run, default_log_level=log_level, check_usage=UsageCheck(parser, _no_check)
        )
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
            WithClient(command.run, command.peers, command.lazy_store),
            description=command.description,
            usage=command.usage,
            log_level=command.log_level,
        )
        parser.set_defaults(check_usage=UsageCheck(parser, command.check))
        command.arguments(parser)


def _no_check(args: argparse.Namespace) -> None:
    return None


@dataclass(frozen=True, slots=True, eq=False)
class UsageCheck:
    """Runs a command's ``check`` after parsing; a problem exits 2 with the
    command's usage line, as argparse's own errors do."""

    parser: argparse.ArgumentParser
    check: Callable[[argparse.Namespace], str | None]

    def __call__(self, args: argparse.Namespace) -> None:
        problem = self.check(args)
        if problem:
            self.parser.error(problem)


@dataclass(frozen=True, slots=True)
class WithClient:
    """A built-in command as a Run: opens the Client (with or without peers) for it."""

    run: ClientRun
    peers: bool
    lazy_store: bool = False

    async def __call__(self, args: argparse.Namespace, config: Config) -> int:
        from ..client import Client

        async with Client.open(config, peers=self.peers, lazy_store=self.lazy_store) as client:
            return await self.run(args, client)


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def find(commands: Sequence[Command | Group], name: str) -> Command | Group | None:
    return next((c for c in commands if c.name == name), None)
