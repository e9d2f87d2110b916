"""The ``blobstore`` command line: the one place that wires config into objects.

One module per command group (transfer, refs, store, image, sync, dedup,
locality, leases) declares its commands; this module builds the parser
(importing only the group a command names) and runs the command (running.py).
Plugins add theirs through the same typed hook
(:class:`~blobstore.cli.registry.Commands`).

Exit status: 0 success, 1 a failure explained in one line on stderr, 2 usage.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..logs import FORMATS, LEVELS
from .registry import (
    Command,
    Commands,
    GlobalOption,
    Group,
    add_global_options,
    pause_collector,
)
from .version import VersionAction

if TYPE_CHECKING:
    from ..agent import Declined
    from ..config import Config

Builtins = tuple[Command | Group, ...]

# Each command group's module is imported only when its commands are wanted:
# ``blobstore pull`` loads cli/transfer.py, not the other groups (every ms of
# start-up counts). tests/test_startup.py checks the names against the modules.


def _transfer() -> Builtins:
    from . import transfer

    return transfer.COMMANDS


def _refs() -> Builtins:
    from . import refs

    return refs.COMMANDS


def _store() -> Builtins:
    from . import store

    return store.COMMANDS


def _image() -> Builtins:
    from . import image

    return image.COMMANDS


def _sync() -> Builtins:
    from . import sync

    return sync.COMMANDS


def _dedup() -> Builtins:
    from . import dedup

    return dedup.COMMANDS


def _locality() -> Builtins:
    from . import locality

    return locality.COMMANDS


def _leases() -> Builtins:
    from . import leases

    return leases.COMMANDS


GROUPS: tuple[tuple[tuple[str, ...], Callable[[], Builtins]], ...] = (
    (("push", "pull"), _transfer),
    (("ls", "show", "rm", "cp"), _refs),
    (("verify", "migrate", "gc"), _store),
    (("image",), _image),
    (("sync",), _sync),
    (("dedup-report",), _dedup),
    (("locality",), _locality),
    (("leases",), _leases),
)
"""The built-in commands, in --help order, with the group module declaring them."""
_GROUP_OF = {name: load for names, load in GROUPS for name in names}


GLOBAL_OPTIONS = (
    GlobalOption(
        ("--store",),
        "object store: s3://bucket/prefix or file:///dir "
        "(env BLOBSTORE_STORE; default: a file store in the data dir)",
        "URL",
    ),
    GlobalOption(
        ("--endpoint-url",),
        "S3 endpoint of an s3:// store (env AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL; "
        "default: the profile's endpoint_url, else AWS)",
        "URL",
    ),
    GlobalOption(
        ("--profile",),
        "AWS profile for an s3:// store: credentials, region, endpoint_url, "
        "s3.addressing_style (env AWS_PROFILE)",
        "NAME",
    ),
    GlobalOption(("--cache",), "local chunk cache (env BLOBSTORE_CACHE)", "DIR"),
    GlobalOption(
        ("--cache-size",), "cache byte limit, e.g. 50G (env BLOBSTORE_CACHE_SIZE)", "SIZE"
    ),
    GlobalOption(("--region",), "region (env BLOBSTORE_REGION)", "NAME"),
    GlobalOption(
        ("--peers",),
        "peer discovery (env BLOBSTORE_PEERS; default auto)",
        "auto|none|HOST:PORT[,...]",
    ),
    GlobalOption(("--token-file",), "cluster token for peers (env BLOBSTORE_TOKEN_FILE)", "FILE"),
    GlobalOption(
        ("--tls-cert",),
        "this node's certificate for mutual TLS with peers; needs --tls-key and --tls-ca "
        "(env BLOBSTORE_TLS_CERT)",
        "PEM",
    ),
    GlobalOption(("--tls-key",), "its private key (env BLOBSTORE_TLS_KEY)", "PEM"),
    GlobalOption(
        ("--tls-ca",), "the CA that signs every peer's certificate (env BLOBSTORE_TLS_CA)", "PEM"
    ),
    GlobalOption(("-v", "--verbose"), "more logging (-v info, -vv debug)", action="count"),
    GlobalOption(
        ("-q", "--quiet"),
        "no progress, no summary line, only errors (--json output still printed)",
        action="store_true",
    ),
    GlobalOption(
        ("--log-level",),
        "debug|info|warning|error (env BLOBSTORE_LOG_LEVEL; default warning, info for the daemon)",
        "LEVEL",
        choices=LEVELS,
    ),
    GlobalOption(
        ("--log-format",),
        "log lines as text or one JSON object per line (env BLOBSTORE_LOG_FORMAT)",
        "text|json",
        choices=FORMATS,
    ),
)
_TAKES_VALUE = {flag: o.takes_value for o in GLOBAL_OPTIONS for flag in o.flags}


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, with the terminal width found without ``shutil``: argparse builds a
    formatter for every add_argument, and shutil's import loads bz2 and lzma
    (``blobstore --version`` would pay ~2 ms for them)."""

    def __init__(self, prog: str, **kwargs: Any) -> None:
        if kwargs.get("width") is None:
            kwargs["width"] = _terminal_columns() - 2
        super().__init__(prog, **kwargs)


def _terminal_columns() -> int:
    """shutil.get_terminal_size().columns: $COLUMNS, else stdout's terminal, else 80."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, plugins included; for a built-in ``command`` (see
    named_command), only that command: its arguments parse the same, and neither
    the other commands' modules nor the plugins are loaded."""
    common = argparse.ArgumentParser(add_help=False, formatter_class=_HelpFormatter)
    add_global_options(common, GLOBAL_OPTIONS, suppress=True)
    parser = argparse.ArgumentParser(
        prog="blobstore",
        description="Content-addressed blob store with peer-to-peer fetching.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action=VersionAction)
    add_global_options(parser, GLOBAL_OPTIONS, suppress=False)
    if command == "--version":  # it exits while parsing: no command needs to exist
        return parser
    commands = Commands(parser, common, "command")
    if command in _GROUP_OF:
        commands.add_builtin(next(c for c in _GROUP_OF[command]() if c.name == command))
        return parser
    for _, load in GROUPS:
        for builtin in load():
            commands.add_builtin(builtin)
    from ..plugins import load_plugins

    for plugin in load_plugins():
        plugin.add_commands(commands)
    return parser


def named_command(argv: Sequence[str]) -> str | None:
    """The built-in command ``argv`` plainly names after global options, else None
    (then the whole parser is built: --help, a plugin's command, a usage error);
    ``--version`` when that comes first (argparse acts on it there and exits)."""
    tokens = iter(argv)
    for token in tokens:
        if token == "--version":
            return token
        option, has_value, _ = token.partition("=")
        if option not in _TAKES_VALUE:
            return token if token in _GROUP_OF else None
        if _TAKES_VALUE[option] and not has_value:
            next(tokens, None)
    return None


def make_config(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Config:
    """The config the options ``args`` and ``env`` (default os.environ) give."""
    from ..config import Config

    return Config.from_env(
        env,
        store=getattr(args, "store", None),
        cache=getattr(args, "cache", None),
        cache_size=getattr(args, "cache_size", None),
        region=getattr(args, "region", None),
        peers=getattr(args, "peers", None),
        token_file=getattr(args, "token_file", None),
        tls_cert=getattr(args, "tls_cert", None),
        tls_key=getattr(args, "tls_key", None),
        tls_ca=getattr(args, "tls_ca", None),
        endpoint_url=getattr(args, "endpoint_url", None),
        profile=getattr(args, "profile", None),
    )


def main(argv: Sequence[str] | None = None, declined: Declined | None = None) -> int:
    """Run the command line ``argv``; ``declined``: why the node agent did not run it
    (agent.run_pull, logged by a pull)."""
    if argv is None:
        argv = sys.argv[1:]
    args = build_parser(named_command(argv)).parse_args(argv)
    args.check_usage(args)  # exits 2, as argparse does, on options that don't go together
    args.agent_declined = declined
    before_loop = getattr(args, "before_loop", None)
    if before_loop is not None:  # a command that may be done without the event loop
        try:
            done: int | None = before_loop(args, make_config)
            sys.stdout.flush()  # here, so a closed pipe is caught below
        except BrokenPipeError:  # as run_command: the reader has what it wanted
            from .output import silence_stdout

            silence_stdout()
            return 0
        if done is not None:
            return done
    from .running import run_command  # anyio and the event loop: not for --help/--version

    return run_command(args, make_config)


def run(declined: Declined | None = None) -> None:
    """The console script. Python's cyclic collector is paused while the command
    starts: importing ~270 modules allocates hundreds of thousands of objects (none
    of them garbage), which at the default threshold is ~60 collections, ~10% of a
    no-op pull's CPU. It resumes, with the start-up objects frozen out of later
    collections, when the command's work begins (registry.start_up_done).
    Everything left is frozen before exiting: the interpreter's last collection
    then walks nothing (it took ~30 ms of a ~160 ms re-pull at load ~15, whose
    start-up objects were never frozen)."""
    pause_collector()
    code = main(declined=declined)
    gc.freeze()
    sys.exit(code)


__all__ = ["GROUPS", "build_parser", "main", "make_config", "named_command", "run"]
