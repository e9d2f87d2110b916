"""The ``blobstore image`` command group: import, export, layer, show.

``add_commands(subparsers)`` registers it; each sub-command's ``func`` is an
async ``(args, client) -> int``. Errors propagate as BlobstoreError subclasses
for the CLI to print as one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..progress import ProgressLine, human_bytes
from .exporter import FORMATS, export_image, export_layer
from .importer import import_into
from .sharing import ImageSharing, image_sharing

if TYPE_CHECKING:
    from ..client import Client


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``image`` and its sub-commands."""
    group = subparsers.add_parser(
        "image", help="Docker/OCI images", description="Import, export and inspect images."
    )
    sub = group.add_subparsers(dest="image_command", metavar="COMMAND", required=True)

    p = sub.add_parser("import", help="import a docker save archive or an OCI layout")
    p.add_argument("src", metavar="SRC", help="docker save tar, OCI layout dir or OCI tar")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--tag", help="which image, when SRC holds several")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=run_import, _wants="client_nopeers")  # writes to the store

    p = sub.add_parser("export", help="rebuild a docker-archive tar or an OCI layout dir")
    p.add_argument("ref", metavar="REF")
    p.add_argument("out", metavar="OUT", type=Path)
    p.add_argument("--format", choices=FORMATS, default="docker-archive")
    p.set_defaults(func=run_export)

    p = sub.add_parser("layer", help="write one layer blob of an image")
    p.add_argument("ref", metavar="REF")
    p.add_argument("digest", metavar="DIGEST", help="sha256:<hex> (or just <hex>)")
    p.add_argument("out", metavar="OUT", type=Path)
    p.set_defaults(func=run_layer)

    p = sub.add_parser("show", help="an image's layers and what it shares with other images")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--prefix", default="", help="compare only with refs under this prefix")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=run_show, _wants="client_nopeers")  # manifests only


async def run_import(args: argparse.Namespace, client: Client) -> int:
    bar = ProgressLine("import")
    try:
        result = await import_into(client, args.src, args.ref, tag=args.tag, progress=bar)
    finally:
        bar.close()
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(
            f"{result.ref} -> {result.manifest} ({result.digest}): {result.layers} layers, "
            f"{_human(result.bytes)}, {_human(result.new_bytes)} new"
        )
    return 0


async def run_export(args: argparse.Namespace, client: Client) -> int:
    bar = ProgressLine("export", tiers=lambda: client.source.bytes_from)
    try:
        stored = await export_image(
            client.catalog, client.source, args.ref, args.out, args.format, progress=bar
        )
    finally:
        bar.close()
    print(f"{args.out}: {args.format}, {len(stored.layers)} layers, image {stored.digest}")
    return 0


async def run_layer(args: argparse.Namespace, client: Client) -> int:
    size = await export_layer(client.catalog, client.source, args.ref, args.digest, args.out)
    print(f"{args.out}: {_human(size)}")
    return 0


async def run_show(args: argparse.Namespace, client: Client) -> int:
    sharing = await image_sharing(client.catalog, args.ref, args.prefix)
    if args.json:
        print(json.dumps(sharing.to_json()))
    else:
        sys.stdout.write(format_sharing(sharing))
    return 0


def format_sharing(s: ImageSharing) -> str:
    lines = [
        f"image {s.ref}  {s.digest}",
        f"manifest {s.manifest}" + (f"  tags: {', '.join(s.tags)}" if s.tags else ""),
        f"layers: {len(s.layers)}, {_human(s.bytes)}; "
        f"shared whole layers: {_human(s.shared_layer_bytes)}; "
        f"shared chunks: {_human(s.shared_chunk_bytes)} of {_human(s.stored_bytes)}",
    ]
    for layer in s.layers:
        who = ", ".join(layer.shared_with[:3]) + (" …" if len(layer.shared_with) > 3 else "")
        kind = layer.media_type.rsplit(".", 1)[-1]
        shared = f"  shared with {who}" if who else ""
        lines.append(f"  {layer.digest[:19]}  {_human(layer.size):>10}  {kind}{shared}")
    return "\n".join(lines) + "\n"


_human = human_bytes
