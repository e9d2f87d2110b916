"""``push`` and ``pull``: the commands every node runs."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BlobstoreError
from ..linking import LinkMode, parse_link_mode
from ..progress import human_bytes
from .output import document, emit, error, progress_line
from .registry import Command, add_json_flag

if TYPE_CHECKING:
    from ..client import Client
    from ..config import Config
    from ..repull import PullResult

log = logging.getLogger("blobstore")
AGENT_ENV = "BLOBSTORE_AGENT"
"""``off``: pulls never go to the node's daemon."""


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


def link_mode_of(args: argparse.Namespace) -> LinkMode:
    """The --link-mode option, else BLOBSTORE_LINK_MODE, else auto. Raises ConfigError."""
    return parse_link_mode(
        getattr(args, "link_mode", None) or os.environ.get("BLOBSTORE_LINK_MODE") or "auto"
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
    """A pull done without this process's event loop, node store and tiers: a re-pull
    into a DIR that is already up to date, from a ``file://`` store (repull.py:
    ~1/3 of the command's start-up), or a pull handed to the node's daemon
    (agent.py: ~0.07 s of imports and connections). None: run the pull here."""
    try:
        config = make_config(args)
        link_mode = link_mode_of(args)
    except BlobstoreError:
        return None  # the real pull reports it
    r = None if args.delete else _up_to_date(args, config, link_mode)
    if r is None:
        try:
            r = _through_agent(args, config, link_mode)
        except BlobstoreError as exc:
            return error(str(exc))
        except KeyboardInterrupt:  # (the daemon sees the socket close and stops)
            print("blobstore: interrupted", file=sys.stderr)
            return 130
    if r is None:
        return None
    _report_pull(args, r)
    return 0


def _up_to_date(args: argparse.Namespace, config: Config, link_mode: LinkMode) -> PullResult | None:
    from ..stores import parse_file_url, url_scheme

    if url_scheme(config.store_url) == "s3":
        return None
    try:
        store_root = parse_file_url(config.store_url)
    except BlobstoreError:
        return None
    from ..marker import state_dir_of
    from ..repull import pull_in_place

    return pull_in_place(
        store_root,
        state_dir_of(config.cache.dir),
        args.ref,
        args.dir,
        link_mode=link_mode,
        keep_special_modes=args.keep_special_modes,
        include=args.include,
        exclude=args.exclude,
    )


def _through_agent(
    args: argparse.Namespace, config: Config, link_mode: LinkMode
) -> PullResult | None:
    """The pull done by this node's daemon (agent.py), or None: no daemon runs on
    this node store, it declined, or it went away (``args.agent_declined`` says
    why). Not for ``--delete``, nor with BLOBSTORE_AGENT=off.
    Raises what the daemon's pull raised."""
    if args.delete or os.environ.get(AGENT_ENV) == "off":
        return None
    from .. import agent
    from ..linking import DestDir

    tiers: dict[str, int] = {}
    bar = progress_line(args, "pull", tiers=lambda: tiers)

    def on_progress(doc: Mapping[str, Any]) -> None:
        tiers.update(doc.get("tiers") or {})
        bar(int(doc.get("done", 0)), int(doc.get("total", 0)))
        bar.files(int(doc.get("files_done", 0)), int(doc.get("files_total", 0)))

    dest = Path(args.dir)
    request = agent.request_for(
        config,
        args.ref,
        dest,
        link_mode=link_mode,
        keep_special_modes=args.keep_special_modes,
        include=args.include,
        exclude=args.exclude,
        progress=bar.enabled,
    )
    conn = agent.connect(request.cache)
    if isinstance(conn, agent.Declined):
        bar.close()
        args.agent_declined = conn
        return None
    answer: PullResult | agent.Declined | None = None
    with conn:
        created = not dest.exists()
        root = DestDir.open(dest)
        try:
            answer = agent.pull(conn, request, root.fd, on_progress)
        finally:
            bar.close()
            root.close()
            if created and (answer is None or isinstance(answer, agent.Declined)):
                with contextlib.suppress(OSError):  # as a pull here would leave it
                    dest.rmdir()
    if isinstance(answer, agent.Declined):
        args.agent_declined = answer
        return None
    return answer


async def run_pull(args: argparse.Namespace, client: Client) -> int:
    declined = getattr(args, "agent_declined", None)
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
    doc = document(r)
    tiers = ", ".join(f"{k} {human_bytes(v)}" for k, v in doc["from"].items())
    emit(
        args,
        doc,
        f"pulled {r.ref} -> {args.dir}: {r.files} files, {human_bytes(r.bytes)} "
        f"in {r.seconds:.2f}s ({r.kept_files} already up to date; from {tiers})"
        + (f"; deleted {r.deleted} paths" if r.deleted else ""),
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
