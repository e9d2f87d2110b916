"""``ls`` and ``show``: what the store's refs point at."""

from __future__ import annotations

import argparse
import json
import logging
from typing import TYPE_CHECKING, Any

from ..manifest import Image, Layer, Tree
from ..progress import human_bytes
from .output import emit
from .registry import Command, add_json_flag

if TYPE_CHECKING:
    from ..client import Client

log = logging.getLogger("blobstore")


def _ls_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prefix", nargs="?", default="")
    add_json_flag(p)


async def run_ls(args: argparse.Namespace, client: Client) -> int:
    refs = await client.catalog.read_refs(args.prefix)
    rows = [{"ref": r.name, "manifest": r.manifest, "problem": r.problem} for r in refs]
    for r in refs:
        if r.problem:
            log.warning("ref %r %s", r.name, r.problem)
    emit(args, rows, "\n".join(f"{(r.manifest or '(broken)')[:16]:16}  {r.name}" for r in refs))
    return 0


def _show_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ref")
    add_json_flag(p)


async def run_show(args: argparse.Namespace, client: Client) -> int:
    manifest_id, manifest = await client.load(args.ref)
    doc: dict[str, Any] = {"ref": args.ref, "manifest": manifest_id, "kind": manifest.kind}
    if isinstance(manifest, Tree | Layer):
        refs = list(manifest.chunk_refs())
        unique = {c.id: c.size for c in refs}
        doc.update(
            bytes=sum(c.size for c in refs),
            chunks=len(refs),
            unique_chunks=len(unique),
            unique_bytes=sum(unique.values()),
            chunker={
                "name": manifest.chunker.name,
                "min": manifest.chunker.min_size,
                "avg": manifest.chunker.avg_size,
                "max": manifest.chunker.max_size,
            },
        )
    if isinstance(manifest, Tree):
        kinds = [e.kind for e in manifest.entries]
        doc.update(
            files=kinds.count("file"), dirs=kinds.count("dir"), symlinks=kinds.count("symlink")
        )
        biggest = sorted((e for e in manifest.entries if e.kind == "file"), key=lambda e: -e.size)[
            :10
        ]
        doc["largest_files"] = [{"path": e.path, "bytes": e.size} for e in biggest]
        text = (
            f"{args.ref}: tree {manifest_id}\n  {doc['files']} files, {doc['dirs']} dirs, "
            f"{doc['symlinks']} symlinks, {human_bytes(doc['bytes'])} "
            f"({human_bytes(doc['unique_bytes'])} unique) in {doc['chunks']} chunks\n"
            + "\n".join(f"  {human_bytes(e.size):>10}  {e.path}" for e in biggest)
        )
    elif isinstance(manifest, Layer):
        doc.update(digest=manifest.digest, media_type=manifest.media_type)
        text = f"{args.ref}: layer {manifest.digest} {human_bytes(manifest.size)}"
    else:
        doc.update(await _image_doc(client, args.ref, manifest))
        text = json.dumps(doc, indent=2)
    emit(args, doc, text)
    return 0


async def _image_doc(client: Client, ref: str, manifest: Image) -> dict[str, Any]:
    from ..image.sharing import image_sharing

    result: dict[str, Any] = (await image_sharing(client.catalog, ref)).to_json()
    return result


LS = Command("ls", "list refs", run_ls, _ls_arguments)
SHOW = Command("show", "describe the manifest REF points at", run_show, _show_arguments)
COMMANDS = (LS, SHOW)
