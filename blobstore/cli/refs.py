"""``ls`` and ``show``: what the store's refs point at."""

from __future__ import annotations

import argparse
import json
import logging
from typing import TYPE_CHECKING, Any

from ..catalog import check_ref
from ..errors import InvalidManifest, NotFound, RefNotFound
from ..ids import ChunkId
from ..manifest import Image, Layer, Manifest, Tree
from ..parallel import for_each
from ..progress import human_bytes
from .output import emit
from .registry import Command, add_json_flag

if TYPE_CHECKING:
    from ..client import Client

log = logging.getLogger("blobstore")


def _ls_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prefix", nargs="?", default="")
    p.add_argument(
        "-l",
        "--long",
        action="store_true",
        help="also kind, size, files (layers for an image) and when the ref was last set",
    )
    add_json_flag(p)


async def run_ls(args: argparse.Namespace, client: Client) -> int:
    refs = await client.catalog.read_refs(args.prefix)
    for r in refs:
        if r.problem:
            log.warning("ref %r %s", r.name, r.problem)
    if not args.long:
        short = [{"ref": r.name, "manifest": r.manifest, "problem": r.problem} for r in refs]
        text = "\n".join(f"{(r.manifest or '(broken)')[:16]:16}  {r.name}" for r in refs)
        emit(args, short, text)
        return 0
    from datetime import UTC, datetime

    summaries = await _summaries(client, {r.manifest for r in refs if r.problem is None})
    rows: list[dict[str, str | int | None]] = []
    lines = []
    for r in refs:
        summary = summaries.get(r.manifest) if r.manifest and r.problem is None else None
        modified = datetime.fromtimestamp(r.modified, UTC) if r.modified is not None else None
        rows.append(
            {
                "ref": r.name,
                "manifest": r.manifest,
                "problem": r.problem,
                "modified": modified.isoformat(timespec="seconds") if modified else None,
                **(summary.to_json() if summary else {"kind": None}),
            }
        )
        when = modified.astimezone().strftime("%Y-%m-%d %H:%M") if modified else "?"
        if summary is None:
            lines.append(f"{'?':6} {'':>10} {'':>8}  {when}  {'(broken)':16}  {r.name}")
            continue
        count = f"{summary.layers} layers" if summary.kind == "image" else str(summary.files)
        lines.append(
            f"{summary.kind:6} {human_bytes(summary.bytes):>10} {count:>8}  {when}  "
            f"{(r.manifest or '')[:16]:16}  {r.name}"
        )
    emit(args, rows, "\n".join(lines))
    return 0


class _Summary:
    """What ``ls -l`` shows of a manifest (a plain class: ``ls`` imports it)."""

    __slots__ = ("bytes", "files", "kind", "layers")

    def __init__(self, kind: str, size: int, files: int | None, layers: int | None) -> None:
        self.kind = kind
        self.bytes = size
        self.files = files
        self.layers = layers

    def to_json(self) -> dict[str, str | int | None]:
        return {"kind": self.kind, "bytes": self.bytes, "files": self.files, "layers": self.layers}


_SUMMARY_READS = 16


async def _summaries(client: Client, manifest_ids: set[ChunkId | None]) -> dict[ChunkId, _Summary]:
    """Kind, size and file count of each manifest (an image's size from its OCI
    manifest, so its layers are not read). A manifest that cannot be read is left
    out (ls -l shows it as broken; ``verify`` says why)."""
    found: dict[ChunkId, _Summary] = {}

    async def read(manifest_id: ChunkId | None) -> None:
        if manifest_id is None:
            return
        try:
            manifest = await client.catalog.load(manifest_id)
        except (NotFound, InvalidManifest) as exc:
            log.warning("manifest %s: %s", manifest_id, exc)
            return
        found[manifest_id] = _summary(manifest)

    await for_each(manifest_ids, read, _SUMMARY_READS)
    return found


def _summary(manifest: Manifest) -> _Summary:
    if isinstance(manifest, Tree):
        files = sum(1 for e in manifest.entries if e.kind == "file")
        return _Summary("tree", manifest.size, files, None)
    if isinstance(manifest, Layer):
        return _Summary("layer", manifest.size, None, None)
    try:
        declared = json.loads(manifest.manifest_json).get("layers", [])
        size = sum(int(layer.get("size", 0)) for layer in declared)
    except (ValueError, TypeError, AttributeError):
        size = 0  # not our format to police here: import checked it
    return _Summary("image", size, None, len(manifest.layers))


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


def _rm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("refs", nargs="+", metavar="REF")
    add_json_flag(p)


async def run_rm(args: argparse.Namespace, client: Client) -> int:
    """Delete refs (all named must exist: a typo removes nothing). The data stays
    until ``gc`` finds it unreferenced past its grace period. Raises RefNotFound,
    InvalidRef."""
    found = [(ref, await client.catalog.resolve(ref)) for ref in dict.fromkeys(args.refs)]
    for ref, _ in found:
        await client.catalog.delete_ref(ref)
    doc = {"removed": [{"ref": ref, "manifest": manifest} for ref, manifest in found]}
    emit(args, doc, "\n".join(f"removed {ref} (was {m[:16]})" for ref, m in found))
    return 0


def _cp_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="REF", help="a ref, a manifest id or a unique prefix of one")
    p.add_argument("target", metavar="NEWREF")
    add_json_flag(p)


async def run_cp(args: argparse.Namespace, client: Client) -> int:
    """Point NEWREF at what REF points at (a tag: no data is copied). Replaces
    NEWREF if it exists, as ``docker tag`` does. Raises RefNotFound, InvalidRef,
    BadInput."""
    check_ref(args.target)
    manifest_id = await client.catalog.resolve_or_id(args.source)
    try:
        previous: ChunkId | None = await client.catalog.resolve(args.target)
    except RefNotFound:
        previous = None
    await client.catalog.set_ref(args.target, manifest_id)
    replaced = f" (was {previous[:16]})" if previous and previous != manifest_id else ""
    emit(
        args,
        {"ref": args.target, "manifest": manifest_id, "source": args.source, "replaced": previous},
        f"{args.target} -> {manifest_id[:16]}{replaced}",
    )
    return 0


LS = Command("ls", "list refs", run_ls, _ls_arguments)
RM = Command(
    "rm",
    "delete refs (gc then reclaims what nothing else references)",
    run_rm,
    _rm_arguments,
)
CP = Command(
    "cp",
    "point NEWREF at REF's manifest (a tag; no data copied)",
    run_cp,
    _cp_arguments,
)
SHOW = Command("show", "describe the manifest REF points at", run_show, _show_arguments)
COMMANDS = (LS, SHOW, RM, CP)
