"""``image import|export|layer|show``: Docker/OCI images."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..progress import human_bytes
from .output import document, emit, progress_line
from .registry import Command, Group, add_json_flag

if TYPE_CHECKING:
    from ..client import Client
    from ..image.sharing import ImageSharing


def _import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="docker save tar, OCI layout dir or OCI tar")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--tag", help="which image, when SRC holds several")
    add_json_flag(p)


async def run_import(args: argparse.Namespace, client: Client) -> int:
    from ..image.importer import import_into

    bar = progress_line(args, "import")
    try:
        r = await import_into(client, args.src, args.ref, tag=args.tag, progress=bar)
    finally:
        bar.close()
    emit(
        args,
        document(r),
        f"{r.ref} -> {r.manifest} ({r.digest}): {r.layers} layers, "
        f"{human_bytes(r.bytes)}, {human_bytes(r.new_bytes)} new",
    )
    return 0


def _export_arguments(p: argparse.ArgumentParser) -> None:
    from ..image.exporter import FORMATS

    p.add_argument("ref", metavar="REF")
    p.add_argument("out", metavar="OUT", type=Path)
    p.add_argument("--format", choices=FORMATS, default="docker-archive")


async def run_export(args: argparse.Namespace, client: Client) -> int:
    from ..image.exporter import export_image

    bar = progress_line(args, "export", tiers=lambda: client.source.bytes_from)
    try:
        stored = await export_image(
            client.catalog, client.source, args.ref, args.out, args.format, progress=bar
        )
    finally:
        bar.close()
    emit(
        args,
        None,
        f"{args.out}: {args.format}, {len(stored.layers)} layers, image {stored.digest}",
    )
    return 0


def _layer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ref", metavar="REF")
    p.add_argument("digest", metavar="DIGEST", help="sha256:<hex> (or just <hex>)")
    p.add_argument("out", metavar="OUT", type=Path)


async def run_layer(args: argparse.Namespace, client: Client) -> int:
    from ..image.exporter import export_layer

    size = await export_layer(client.catalog, client.source, args.ref, args.digest, args.out)
    emit(args, None, f"{args.out}: {human_bytes(size)}")
    return 0


def _show_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ref", metavar="REF")
    p.add_argument("--prefix", default="", help="compare only with refs under this prefix")
    add_json_flag(p)


async def run_show(args: argparse.Namespace, client: Client) -> int:
    from ..image.sharing import image_sharing

    sharing = await image_sharing(client.catalog, args.ref, args.prefix)
    emit(args, document(sharing), format_sharing(sharing).rstrip("\n"))
    return 0


def format_sharing(s: ImageSharing) -> str:
    lines = [
        f"image {s.ref}  {s.digest}",
        f"manifest {s.manifest}" + (f"  tags: {', '.join(s.tags)}" if s.tags else ""),
        f"layers: {len(s.layers)}, {human_bytes(s.bytes)}; "
        f"shared whole layers: {human_bytes(s.shared_layer_bytes)}; "
        f"shared chunks: {human_bytes(s.shared_chunk_bytes)} of {human_bytes(s.stored_bytes)}",
    ]
    for layer in s.layers:
        who = ", ".join(layer.shared_with[:3]) + (" …" if len(layer.shared_with) > 3 else "")
        kind = layer.media_type.rsplit(".", 1)[-1]
        shared = f"  shared with {who}" if who else ""
        lines.append(f"  {layer.digest[:19]}  {human_bytes(layer.size):>10}  {kind}{shared}")
    return "\n".join(lines) + "\n"


IMAGE = Group(
    "image",
    "Docker/OCI images",
    (
        Command(
            "import",
            "import a docker save archive or an OCI layout",
            run_import,
            _import_arguments,
        ),
        Command(
            "export",
            "rebuild a docker-archive tar or an OCI layout dir",
            run_export,
            _export_arguments,
            peers=True,
        ),
        Command(
            "layer", "write one layer blob of an image", run_layer, _layer_arguments, peers=True
        ),
        Command(
            "show",
            "an image's layers and what it shares with other images",
            run_show,
            _show_arguments,
        ),
    ),
    description="Import, export and inspect images.",
)
COMMANDS = (IMAGE,)
