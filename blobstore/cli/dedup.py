"""``dedup-report``: what refs share (table, JSON or an HTML page)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BadInput, os_error
from .output import document
from .registry import Command

if TYPE_CHECKING:
    from ..client import Client


def _arguments(p: argparse.ArgumentParser) -> None:
    from ..dedup import DEFAULT_TOP_FILES

    p.add_argument("refs", nargs="*", metavar="REF")
    p.add_argument("--prefix", help="also include every ref whose name starts with this")
    p.add_argument("--format", choices=("table", "json", "html"), default=None)
    p.add_argument("--json", action="store_true", help="same as --format json")
    p.add_argument("--out", type=Path, help="write the report here (default: stdout)")
    p.add_argument("--top", type=int, default=DEFAULT_TOP_FILES, help="files to list")
    p.add_argument("--title", default="blobstore dedup report", help="HTML title")


async def run_dedup_report(args: argparse.Namespace, client: Client) -> int:
    """Raises BlobstoreError subclasses."""
    from ..atomic import write_atomic_async
    from ..dedup import compute, load_trees, render_table

    fmt = "json" if args.json else (args.format or "table")
    if args.json and args.format not in (None, "json"):
        raise BadInput("--json contradicts --format " + args.format)
    trees = await load_trees(client.catalog, args.refs, args.prefix)
    report = compute(trees, top_files=args.top)
    if fmt == "json":
        text = json.dumps(document(report), indent=2) + "\n"
    elif fmt == "html":
        from ..report_html import render_html

        text = render_html(report, title=args.title)
    else:
        text = render_table(report)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    try:
        await write_atomic_async(args.out, text)
    except OSError as exc:
        raise os_error(exc, f"cannot write {args.out}", user_path=True) from exc
    return 0


DEDUP_REPORT = Command(
    "dedup-report",
    "what refs share: logical vs stored bytes, pairwise sharing",
    run_dedup_report,
    _arguments,
    description="Report what REFs (and every ref under --prefix) share.",
)
COMMANDS = (DEDUP_REPORT,)
