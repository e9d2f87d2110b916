"""``leases``: show writer and gc leases; clear stale ones."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .output import emit
from .registry import Command, add_json_flag

if TYPE_CHECKING:
    from ..client import Client
    from ..leases import LeaseInfo


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clear-stale", action="store_true", help="delete every lapsed lease")
    p.add_argument(
        "--clear",
        nargs="+",
        metavar="NAME",
        default=None,
        help="delete these leases, live or not (only if their holder is dead)",
    )
    add_json_flag(p)


async def run_leases(args: argparse.Namespace, client: Client) -> int:
    """Raises NotFound, Unavailable."""
    from ..leases import Leases

    leases = Leases(client.object_store)
    cleared: list[LeaseInfo] = []
    if args.clear_stale:
        cleared += await leases.clear(None)
    if args.clear:
        cleared += await leases.clear(args.clear)
    rows = await leases.entries()
    lines = [f"cleared {i.name} ({i.kind}, {i.holder or '?'})" for i in cleared]
    lines += [
        f"{i.name:48}  {i.kind:6}  {'live' if i.live else 'stale':5}  age {i.age:7.0f} s  "
        f"ttl {i.ttl:.0f} s  {i.holder}"
        for i in rows
    ]
    doc = {"leases": [_row(i) for i in rows], "cleared": [_row(i) for i in cleared]}
    emit(args, doc, "\n".join(lines) or "no leases")
    return 0


def _row(info: LeaseInfo) -> dict[str, object]:
    return {
        "name": info.name,
        "kind": info.kind,
        "holder": info.holder,
        "age": round(info.age, 1),
        "ttl": info.ttl,
        "live": info.live,
    }


LEASES = Command(
    "leases",
    "show writer and gc leases; clear stale ones",
    run_leases,
    _arguments,
    description="Show the leases in the store (a writer lease makes gc skip its sweep). "
    "A lease lapses 2 minutes after its holder stops refreshing it; leases of "
    "older versions after 24 h: clear one with --clear NAME once you know its "
    "holder (host, pid) is gone.",
)
COMMANDS = (LEASES,)
