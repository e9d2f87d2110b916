"""``push`` and ``pull``: the commands every node runs."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BlobstoreError, ConfigError
from ..linking import LinkMode, parse_link_mode
from ..progress import human_bytes
from .output import document, emit, emitted, progress_line, quiet
from .registry import Command, add_json_flag

if TYPE_CHECKING:
    from ..agent import Declined
    from ..client import Client
    from ..config import Config
    from ..repull import PullResult

log = logging.getLogger("blobstore")


def _push_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path)
    p.add_argument("ref")
    add_json_flag(p)


async def run_push(args: argparse.Namespace, client: Client) -> int:
    bar = progress_line(args, "push")
    try:
        r = await client.push(args.dir, args.ref, progress=bar)
    finally:
        bar.close()
    for path in r.skipped:
        log.warning("skipped special file %s", path)
    emit(
        args,
        document(r),
        f"pushed {r.ref} -> {r.manifest[:16]}: {r.files} files, "
        f"{human_bytes(r.bytes)}, {r.chunks} chunks, uploaded {r.new_chunks} "
        f"({human_bytes(r.new_bytes)}) in {r.seconds:.2f}s",
    )
    return 0


def add_pull_options(p: argparse.ArgumentParser) -> None:
    """--link-mode and --keep-special-modes, for every command that pulls."""
    p.add_argument(
        "--link-mode",
        metavar="auto|reflink|hardlink|copy",
        default=None,
        help="how files get from the node store into DIR: auto clones where the "
        "filesystem can and copies otherwise; hardlink shares the node's copy "
        "(files made read-only; never write into them) (env BLOBSTORE_LINK_MODE)",
    )
    p.add_argument(
        "--keep-special-modes",
        action="store_true",
        help="keep setuid/setgid/sticky bits from the manifest (dropped by default)",
    )


def link_mode_of(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> LinkMode:
    """The --link-mode option, else BLOBSTORE_LINK_MODE (of ``env``, default
    os.environ), else auto. Raises ConfigError."""
    env = os.environ if env is None else env
    return parse_link_mode(
        getattr(args, "link_mode", None) or env.get("BLOBSTORE_LINK_MODE") or "auto"
    )


def _pull_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ref", help="a ref, or a manifest id (a unique prefix of one will do)")
    p.add_argument("dir", type=Path)
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="PATTERN",
        help="pull only paths matching this glob (repeatable; '*' matches '/' too; "
        "'dir/' is everything below dir), as huggingface_hub's allow_patterns",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="skip paths matching this glob (repeatable; wins over --include)",
    )
    p.add_argument(
        "--delete",
        action="store_true",
        help="mirror: remove what DIR holds beyond REF (among the paths the patterns "
        "select; symlinks in DIR are removed, never followed)",
    )
    add_json_flag(p)
    add_pull_options(p)
    p.set_defaults(before_loop=pull_before_loop)


def pull_before_loop(
    args: argparse.Namespace, make_config: Callable[[argparse.Namespace], Config]
) -> int | None:
    """A re-pull into a DIR that is already up to date, from a ``file://`` store,
    done without this process's event loop, node store and tiers (repull.py: ~1/3
    of the command's start-up). None: run the pull here. (A pull the node's
    daemon can run never gets here: agent.py hands it over first.)"""
    if args.delete:
        return None
    try:
        config = make_config(args)
        link_mode = link_mode_of(args)
    except BlobstoreError:
        return None  # the real pull reports it
    from ..stores import parse_file_url, url_scheme

    if url_scheme(config.store_url) == "s3":
        return None
    try:
        store_root = parse_file_url(config.store_url)
    except BlobstoreError:
        return None
    from ..marker import state_dir_of
    from ..repull import pull_in_place

    r = pull_in_place(
        store_root,
        state_dir_of(config.cache.dir),
        args.ref,
        args.dir,
        link_mode=link_mode,
        keep_special_modes=args.keep_special_modes,
        include=args.include,
        exclude=args.exclude,
    )
    if r is None:
        return None
    _report_pull(args, r)
    return 0


_PATH_SETTINGS = (
    ("cache", "BLOBSTORE_CACHE"),
    ("token_file", "BLOBSTORE_TOKEN_FILE"),
    ("tls_cert", "BLOBSTORE_TLS_CERT"),
    ("tls_key", "BLOBSTORE_TLS_KEY"),
    ("tls_ca", "BLOBSTORE_TLS_CA"),
)
"""Settings that name files, which the node agent finds from the client's directory."""


@dataclass(frozen=True, slots=True)
class AgentPull:
    """A ``blobstore pull`` command line the node agent runs for a client on this
    node (agent.py): parsed by this CLI's own parser, with the client's
    environment and working directory."""

    args: argparse.Namespace
    config: Config
    link_mode: LinkMode
    dest: str
    """DIR, absolute (in the client's view)."""

    @classmethod
    def parse(cls, argv: Sequence[str], env: Mapping[str, str], cwd: str) -> AgentPull:
        """Raises ConfigError: not a pull this CLI would run as given (the client
        then runs it itself, and says why in its own words)."""
        from . import build_parser, make_config

        text = io.StringIO()
        try:  # (argparse prints and exits on a usage error)
            with contextlib.redirect_stderr(text), contextlib.redirect_stdout(text):
                args = build_parser("pull").parse_args(argv)
                args.check_usage(args)
        except SystemExit:
            raise ConfigError(f"not a pull command: {text.getvalue().strip()}") from None
        if getattr(args, "command", None) != "pull" or args.delete:
            raise ConfigError("not a pull the node agent runs")
        for name, var in _PATH_SETTINGS:
            value = getattr(args, name, None) or env.get(var)
            if value:
                setattr(args, name, os.path.join(cwd, os.path.expanduser(value)))
        config = make_config(args, env)
        return cls(args, config, link_mode_of(args, env), os.path.join(cwd, args.dir))

    @property
    def progress(self) -> bool:
        """Whether the client's status line is wanted (when stderr is a terminal)."""
        return not quiet(self.args)

    def report(self, r: PullResult) -> str:
        """What the CLI prints on stdout for ``r``."""
        return emitted(self.args, document(r), _pull_line(self.args, r))


async def run_pull(args: argparse.Namespace, client: Client) -> int:
    declined: Declined | None = getattr(args, "agent_declined", None)
    if declined is not None:
        if declined.started:
            log.warning("%s; pulling in this process", declined.reason)
        else:
            log.info("pulling in this process: %s", declined.reason)
    bar = progress_line(args, "pull", tiers=lambda: client.source.bytes_from)
    try:
        r = await client.pull(
            args.ref,
            args.dir,
            progress=bar,
            link_mode=link_mode_of(args),
            keep_special_modes=args.keep_special_modes,
            include=args.include,
            exclude=args.exclude,
            delete=args.delete,
        )
    finally:
        bar.close()
    _report_pull(args, r)
    return 0


def _report_pull(args: argparse.Namespace, r: PullResult) -> None:
    emit(args, document(r), _pull_line(args, r))


def _pull_line(args: argparse.Namespace, r: PullResult) -> str:
    tiers = ", ".join(f"{k} {human_bytes(v)}" for k, v in document(r)["from"].items())
    return (
        f"pulled {r.ref} -> {args.dir}: {r.files} files, {human_bytes(r.bytes)} "
        f"in {r.seconds:.2f}s ({r.kept_files} already up to date; from {tiers})"
        + (f"; deleted {r.deleted} paths" if r.deleted else "")
    )


PUSH = Command(
    "push",
    "chunk DIR, upload what the store lacks, point REF at it",
    run_push,
    _push_arguments,
)
PULL = Command(
    "pull",
    "materialize REF into DIR through local cache, peers, object store",
    run_pull,
    _pull_arguments,
    peers=True,
)
COMMANDS = (PUSH, PULL)
