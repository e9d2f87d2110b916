"""``locality REF…``: how warm this node and its region are for each ref."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .output import document, emit
from .registry import Command, add_json_flag

if TYPE_CHECKING:
    from ..client import Client


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("refs", nargs="+", metavar="REF")
    add_json_flag(p)


async def run_locality(args: argparse.Namespace, client: Client) -> int:
    """Raises BlobstoreError subclasses."""
    from ..runner import locality

    found = [await locality(client, ref) for ref in args.refs]
    lines = []
    for loc in found:
        region = f"{loc.region_fraction:6.1%}" if loc.peers_checked else "  (no peers)"
        lines.append(f"{loc.local_fraction:6.1%} local  {region} region  {loc.ref}")
    emit(args, document(found), "\n".join(lines))
    return 0


LOCALITY = Command(
    "locality",
    "fraction of each REF's bytes in the local cache and in the region",
    run_locality,
    _arguments,
    peers=True,
    description="For each REF: the fraction of its distinct chunk bytes held in this "
    "node's cache and by the region's live peers (a scheduler prefers warm nodes).",
)
COMMANDS = (LOCALITY,)
