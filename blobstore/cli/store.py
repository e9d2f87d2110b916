"""``verify``, ``migrate`` and ``gc``: looking after the object store and the cache."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError
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


def _verify_usage(args: argparse.Namespace) -> str | None:
    if args.source is not None and not args.repair:
        return "--from DIR goes with --repair"
    if args.repair and args.source is None:
        return "--repair needs --from DIR (a copy of the tree), or push it again"
    return None


async def run_verify(args: argparse.Namespace, client: Client) -> int:
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


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"not a fraction between 0 and 1: {text!r}")
    return value


def _gc_usage(args: argparse.Namespace) -> str | None:
    if args.cache_only and (args.repack_below is not None or args.grace is not None):
        return "--cache-only leaves the store alone: --grace and --repack-below don't apply"
    return None


def _gc_arguments(p: argparse.ArgumentParser) -> None:
    from ..gc import DEFAULT_REPACK_BELOW

    p.add_argument(
        "--grace",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="only sweep objects older than this (e.g. 30m, 6h; default 6h)",
    )
    p.add_argument("--dry-run", action="store_true")
    p.add_argument(
        "--cache-only",
        action="store_true",
        help="only evict this node's cache to its limits; leave the object store alone "
        "(it need not be reachable)",
    )
    p.add_argument(
        "--repack-below",
        type=_fraction,
        default=None,
        metavar="FRACTION",
        help="repack packs with less than this fraction "
        f"live (default {DEFAULT_REPACK_BELOW}; 0 never repacks)",
    )
    add_json_flag(p)


async def run_gc(args: argparse.Namespace, client: Client) -> int:
    from ..gc import DEFAULT_GRACE_SECONDS, DEFAULT_REPACK_BELOW, collect

    if args.cache_only:
        return await _gc_cache(args, client)
    r = await collect(
        client.object_store,
        client.cache,
        grace_seconds=DEFAULT_GRACE_SECONDS if args.grace is None else args.grace,
        dry_run=args.dry_run,
        repack_below=DEFAULT_REPACK_BELOW if args.repack_below is None else args.repack_below,
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


async def _gc_cache(args: argparse.Namespace, client: Client) -> int:
    """Evict the node cache down to its low watermark (nothing with --dry-run).
    Opening the cache already evicts down to the limit when it holds more (a
    lowered --cache-size): that counts as evicted too."""
    if not args.dry_run:
        await client.cache.evict()
    evicted = client.cache.evicted_bytes
    doc = {
        "cache_only": True,
        "dry_run": args.dry_run,
        "cache_evicted_bytes": evicted,
        "cache_bytes": client.cache.used_bytes,
    }
    emit(
        args,
        doc,
        f"cache: evicted {human_bytes(evicted)}, holds {human_bytes(client.cache.used_bytes)}",
    )
    return 0


VERIFY = Command(
    "verify",
    "fetch and check every chunk of REF in the object store",
    run_verify,
    _verify_arguments,
    check=_verify_usage,
)
MIGRATE = Command(
    "migrate",
    "move an old store's per-chunk objects into packs, refs onto v2 manifests",
    run_migrate,
    add_json_flag,
)
GC = Command(
    "gc",
    "evict the cache to its limits; sweep unreferenced objects",
    run_gc,
    _gc_arguments,
    lazy_store=True,  # --cache-only never touches the store
    check=_gc_usage,
)
COMMANDS = (VERIFY, MIGRATE, GC)
