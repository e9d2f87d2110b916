"""``sync REF DIR [-- CMD…]``: pull, run a command, push what changed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from ..errors import BadInput
from .output import document, emit, progress_line, quiet
from .registry import Command, add_json_flag

if TYPE_CHECKING:
    from ..client import Client


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ref", metavar="REF")
    p.add_argument("dir", metavar="DIR", type=Path)
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD", help="command to run")
    p.add_argument("--push-on-failure", action="store_true", help="push even if CMD fails")
    add_json_flag(p)


def _usage(args: argparse.Namespace) -> str | None:
    if args.cmd and args.cmd[0].startswith("-") and args.cmd[0] != "--":
        return f"put {args.cmd[0]} before REF DIR (everything after DIR is the command)"
    return None


async def run_sync(args: argparse.Namespace, client: Client) -> int:
    """Exits with CMD's status. Raises BlobstoreError subclasses."""
    from ..syncdir import sync_pull, sync_push

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    bar = progress_line(args, "pull", tiers=lambda: client.source.bytes_from)
    try:
        session = await sync_pull(client, args.ref, args.dir, progress=bar)
    finally:
        bar.close()
    status = 0
    if cmd:
        try:
            proc = await anyio.run_process(cmd, stdin=None, stdout=None, stderr=None, check=False)
        except OSError as exc:
            raise BadInput(f"cannot run {cmd[0]}: {exc.strerror}") from exc
        status = proc.returncode
    if status != 0 and not args.push_on_failure:
        print(f"blobstore: {cmd[0]} exited with {status}; not pushing", file=sys.stderr)
        return status
    bar = progress_line(args, "push")
    try:
        r = await sync_push(client, session, progress=bar)
    finally:
        bar.close()
    emit(args, document(r, status=status), "")
    if r.pushed and not args.json and not quiet(args):
        how = " (merged with another runner)" if r.merged else ""
        print(
            f"synced {r.ref} -> {r.manifest}: {r.changed_files} changed files{how}", file=sys.stderr
        )
    return status


SYNC = Command(
    "sync",
    "pull REF into DIR, run CMD, push what changed (merging with other runners)",
    run_sync,
    _arguments,
    peers=True,
    check=_usage,
    usage="blobstore sync [OPTIONS] REF DIR [-- CMD ARG…]",
    description="Pull REF into DIR, run CMD (if given) and push what changed, moving "
    "REF with compare-and-swap and merging with concurrent pushes. Without CMD: pull "
    "then push. Exits with CMD's status; pushes only if CMD succeeded (unless "
    "--push-on-failure). Like docker run, options go before REF: everything after "
    "DIR is the command.",
)
COMMANDS = (SYNC,)
