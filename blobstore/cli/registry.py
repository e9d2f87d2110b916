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
import gc
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ..client import Client
    from ..config import Config

Run = Callable[[argparse.Namespace, "Config"], Awaitable[int]]
"""What every sub-command finally is: parsed arguments and config in, exit status out."""
ClientRun = Callable[[argparse.Namespace, "Client"], Awaitable[int]]
"""A built-in command's body: it gets an open Client."""


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    return None


def _no_check(args: argparse.Namespace) -> None:
    return None


# Plain classes, not dataclasses: every command's start-up imports these, and a
# dataclass costs ~0.3 ms to create.


class Command:
    """One built-in sub-command.

    ``arguments`` adds the command's own arguments (importing what their defaults
    need); ``peers``: whether the Client opens the peer tier (commands that fetch
    chunks); ``lazy_store``: open the object store when first used, not before the
    command runs; ``check`` returns a usage problem argparse cannot see (options
    that go together), reported like argparse's own, exit status 2; ``log_level``
    is the level without --log-level/-v (a long-running service says more).
    """

    __slots__ = (
        "arguments",
        "check",
        "description",
        "help",
        "lazy_store",
        "log_level",
        "name",
        "peers",
        "run",
        "usage",
    )

    def __init__(
        self,
        name: str,
        help: str,
        run: ClientRun,
        arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments,
        *,
        peers: bool = False,
        lazy_store: bool = False,
        check: Callable[[argparse.Namespace], str | None] = _no_check,
        description: str | None = None,
        usage: str | None = None,
        log_level: int = logging.WARNING,
    ) -> None:
        self.name = name
        self.help = help
        self.run = run
        self.arguments = arguments
        self.peers = peers
        self.lazy_store = lazy_store
        self.check = check
        self.description = description
        self.usage = usage
        self.log_level = log_level


class Group:
    """A command with sub-commands (``image import``)."""

    __slots__ = ("commands", "description", "help", "name")

    def __init__(
        self, name: str, help: str, commands: tuple[Command, ...], *, description: str | None = None
    ) -> None:
        self.name = name
        self.help = help
        self.commands = commands
        self.description = description


class GlobalOption:
    """An option accepted before the command and after it."""

    __slots__ = ("action", "choices", "flags", "help", "metavar")

    def __init__(
        self,
        flags: tuple[str, ...],
        help: str,
        metavar: str | None = None,
        *,
        action: Literal["store", "count", "store_true"] = "store",
        choices: tuple[str, ...] | None = None,
    ) -> None:
        self.flags = flags
        self.help = help
        self.metavar = metavar
        self.action = action
        self.choices = choices

    @property
    def takes_value(self) -> bool:
        return self.action == "store"


def add_global_options(
    parser: argparse.ArgumentParser, options: Sequence[GlobalOption], *, suppress: bool
) -> None:
    """``options`` in a "global options" group. With ``suppress`` (a sub-command's
    copy) they default to SUPPRESS, so a value given before the command stays."""
    group = parser.add_argument_group("global options")
    for o in options:
        empty: object = {"store": None, "count": 0, "store_true": False}[o.action]
        default = argparse.SUPPRESS if suppress else empty
        if o.action == "store":
            group.add_argument(
                *o.flags, metavar=o.metavar, choices=o.choices, default=default, help=o.help
            )
        else:
            group.add_argument(*o.flags, action=o.action, default=default, help=o.help)


class Commands:
    """Adds sub-commands, each with the global options, to a parser.

    The hook a plugin's ``add_commands(commands)`` receives (see
    blobstore.plugins.Plugin).
    """

    def __init__(
        self, parser: argparse.ArgumentParser, common: argparse.ArgumentParser, dest: str
    ) -> None:
        """Sub-commands of ``parser`` (their name in ``args.<dest>``); ``common``
        holds the global options each of them also accepts."""
        self._subparsers = parser.add_subparsers(dest=dest, metavar="COMMAND", required=True)
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
        check: Callable[[argparse.Namespace], str | None] = _no_check,
    ) -> argparse.ArgumentParser:
        """A new sub-command ``name`` calling ``run(args, config)``; add its arguments
        to the parser returned. ``log_level``: the level without --log-level/-v
        (a service wants INFO: its start and stop); ``check``: see Command."""
        parser = self._subparsers.add_parser(
            name,
            help=help,
            description=description or help,
            usage=usage,
            parents=[self._common],
        )
        parser.set_defaults(
            run=run, default_log_level=log_level, check_usage=UsageCheck(parser, check)
        )
        return parser

    def group(self, name: str, help: str, *, description: str | None = None) -> Commands:
        """A sub-command with sub-commands of its own; add them to the Commands returned."""
        parser = self._subparsers.add_parser(
            name, help=help, description=description or help, parents=[self._common]
        )
        return Commands(parser, self._common, f"{name}_command")

    def add_builtin(self, command: Command | Group) -> None:
        """A built-in command (or group): its run gets a Client."""
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
            check=command.check,
        )
        command.arguments(parser)


class UsageCheck:
    """Runs a command's ``check`` after parsing; a problem exits 2 with the
    command's usage line, as argparse's own errors do."""

    __slots__ = ("check", "parser")

    def __init__(
        self, parser: argparse.ArgumentParser, check: Callable[[argparse.Namespace], str | None]
    ) -> None:
        self.parser = parser
        self.check = check

    def __call__(self, args: argparse.Namespace) -> None:
        problem = self.check(args)
        if problem:
            self.parser.error(problem)


class WithClient:
    """A built-in command as a Run: opens the Client (with or without peers) for it."""

    __slots__ = ("lazy_store", "peers", "run")

    def __init__(self, run: ClientRun, peers: bool, lazy_store: bool = False) -> None:
        self.run = run
        self.peers = peers
        self.lazy_store = lazy_store

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WithClient) and (self.run, self.peers, self.lazy_store) == (
            other.run,
            other.peers,
            other.lazy_store,
        )

    def __hash__(self) -> int:
        return hash((self.run, self.peers, self.lazy_store))

    async def __call__(self, args: argparse.Namespace, config: Config) -> int:
        from ..client import Client

        async with Client.open(config, peers=self.peers, lazy_store=self.lazy_store) as client:
            start_up_done()
            return await self.run(args, client)


_collector_paused: list[bool] = []
"""Holds True while the collector is paused by pause_collector (one process-wide switch)."""


def pause_collector() -> None:
    """Pause the cyclic collector for a command's start-up (the console script's
    run; not for callers of cli.main, whose collector is theirs)."""
    if gc.isenabled():
        gc.disable()
        _collector_paused.append(True)


def start_up_done() -> None:
    """Resume the collector pause_collector paused, with every object so far frozen:
    they are modules, classes and the opened client, which later collections need
    not walk again. Running commands call it when their work begins (WithClient
    once the client is open, every other one before it starts)."""
    if _collector_paused:
        _collector_paused.clear()
        gc.freeze()
        gc.enable()


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document")
