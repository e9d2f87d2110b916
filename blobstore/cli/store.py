"""``verify``, ``migrate`` and ``gc``: looking after the object store and the cache."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BadInput, ConfigError
from ..progress import human_bytes
from .output import document, emit, error, fail
from .registry import Command, add_json_flag

if TYPE_CHECKING:
    from ..client import Client

log = logging.getLogger("blobstore")


def _verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ref")
    p.add_argument(
        "--repair",
        action="store_true",
        help="pack bad chunks again from --from DIR and move REF onto them",
    )
    p.add_argument(
        "--from",
        dest="source",
        type=Path,
        metavar="DIR",
        help="a copy of REF's tree to repair from (with --repair)",
    )
    add_json_flag(p)


async def run_verify(args: argparse.Namespace, client: Client) -> int:
    if args.source is not None and not args.repair:
        raise BadInput("--from DIR goes with --repair")
    if args.repair:
        return await _repair(args, client)
    r = await client.verify(args.ref)
    doc = document(r, ok=r.ok)
    if r.ok:
        emit(args, doc, f"{r.ref}: all {r.chunks} chunks present and intact")
        return 0
    return fail(
        args,
        doc,
        f"{r.ref}: {len(r.missing)} chunks missing, {len(r.corrupt)} corrupt of {r.chunks}",
    )


async def _repair(args: argparse.Namespace, client: Client) -> int:
    if args.source is None:
        raise BadInput("verify --repair needs --from DIR (a copy of the tree), or push it again")
    r = await client.repair(args.ref, args.source)
    doc = document(r, ok=r.ok)
    if r.ok:
        done = f"repaired {r.repaired} chunks, now {r.manifest}"
        emit(args, doc, f"{r.ref}: " + (done if r.repaired else "all chunks present and intact"))
        return 0
    return fail(
        args,
        doc,
        f"{r.ref}: {len(r.unrepaired)} bad chunks not found in "
        f"{args.source} (repaired {r.repaired})",
    )


async def run_migrate(args: argparse.Namespace, client: Client) -> int:
    r = await client.migrate()
    meanwhile = (
        f"; {r.refs_moved_meanwhile} refs moved meanwhile (run again)"
        if r.refs_moved_meanwhile
        else ""
    )
    emit(
        args,
        document(r),
        f"packed {r.chunks} chunks ({human_bytes(r.bytes)}), moved {r.refs} refs "
        f"onto v2 manifests{meanwhile}",
    )
    if r.unreadable:
        return error(
            f"{len(r.unreadable)} chunks missing or corrupt, left where "
            f"they were (first: {r.unreadable[0]})",
        )
    return 0


def parse_duration(text: str) -> float:
    """Seconds in ``30``, ``30s``, ``30m``, ``6h``, ``2d``. Raises ConfigError."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd]?)", text.strip())
    if not m:
        raise ConfigError(f"not a duration: {text!r} (try 30m or 6h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _gc_arguments(p: argparse.ArgumentParser) -> None:
    from ..gc import DEFAULT_GRACE_SECONDS, DEFAULT_REPACK_BELOW

    p.add_argument(
        "--grace",
        default=f"{DEFAULT_GRACE_SECONDS}s",
        metavar="DURATION",
        help="only sweep objects older than this (e.g. 30m, 6h; default 6h)",
    )
    p.add_argument("--dry-run", action="store_true")
    p.add_argument(
        "--repack-below",
        type=float,
        default=DEFAULT_REPACK_BELOW,
        metavar="FRACTION",
        help="repack packs with less than this fraction "
        f"live (default {DEFAULT_REPACK_BELOW}; 0 never repacks)",
    )
    add_json_flag(p)


async def run_gc(args: argparse.Namespace, client: Client) -> int:
    from ..gc import collect

    if not 0 <= args.repack_below <= 1:
        raise BadInput("--repack-below is a fraction between 0 and 1")
    r = await collect(
        client.object_store,
        client.cache,
        grace_seconds=parse_duration(args.grace),
        dry_run=args.dry_run,
        repack_below=args.repack_below,
    )
    for problem in r.bad_refs:
        log.warning("%s; kept everything it still reaches", problem)
    verb = "would sweep" if r.dry_run else "swept"
    emit(
        args,
        document(r),
        f"cache: evicted {human_bytes(r.cache_evicted_bytes)}, holds "
        f"{human_bytes(r.cache_bytes)}; store: {r.refs} refs, {verb} {r.swept_packs} packs, "
        f"{r.swept_chunks} chunks and {r.swept_manifests} manifests "
        f"({human_bytes(r.swept_bytes)})"
        + (
            f"; repacked {r.repacked_packs} packs ({human_bytes(r.repacked_bytes)} moved, "
            f"{r.refs_rewritten} refs rewritten)"
            if r.repacked_packs
            else ""
        )
        + (f"; would repack {r.would_repack} packs" if r.would_repack else "")
        + (
            f"; {r.skipped_for_writers} writers active, sweep skipped (blobstore leases)"
            if r.skipped_for_writers
            else ""
        )
        + (f"; {len(r.bad_refs)} bad refs (see warnings)" if r.bad_refs else "")
        + (f"; removed {r.stale_temp_files} stale temp files" if r.stale_temp_files else ""),
    )
    return 0


VERIFY = Command(
    "verify",
    "fetch and check every chunk of REF in the object store",
    run_verify,
    _verify_arguments,
)
MIGRATE = Command(
    "migrate",
    "move an old store's per-chunk objects into packs, refs onto v2 manifests",
    run_migrate,
    add_json_flag,
)
GC = Command(
    "gc", "evict the cache to its limits; sweep unreferenced objects", run_gc, _gc_arguments
)
COMMANDS = (VERIFY, MIGRATE, GC)
