"""The ``blobstore`` command line: the one place that wires config into objects.

Exit status: 0 success, 1 a failure explained in one line on stderr, 2 usage.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from .config import Config
from .errors import BadInput, BlobstoreError, ConfigError, single_errors
from .linking import LinkMode, parse_link_mode
from .manifest import Image, Layer, Tree
from .plugins import load_plugins
from .progress import ProgressLine, human_bytes

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("blobstore")

# Core modules that contribute sub-commands with ``add_commands(subparsers)``.
_COMMAND_MODULES = (
    "blobstore.image.commands",
    "blobstore.dedup",
    "blobstore.syncdir",
    "blobstore.runner",
    "blobstore.leases",
)
_CORE_COMMANDS = frozenset({"push", "pull", "ls", "show", "verify", "migrate", "gc"})

Command = Callable[[argparse.Namespace, Any], Awaitable[int]]


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    d: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {"default": None}
    g = parser.add_argument_group("global options")
    g.add_argument(
        "--store",
        metavar="URL",
        help="object store: s3://bucket/prefix or "
        "file:///dir (env BLOBSTORE_STORE; default: a file store in the data dir)",
        **d,
    )
    g.add_argument("--cache", metavar="DIR", help="local chunk cache (env BLOBSTORE_CACHE)", **d)
    g.add_argument(
        "--cache-size",
        metavar="SIZE",
        help="cache byte limit, e.g. 50G (env BLOBSTORE_CACHE_SIZE)",
        **d,
    )
    g.add_argument("--region", metavar="NAME", help="region (env BLOBSTORE_REGION)", **d)
    g.add_argument(
        "--peers",
        metavar="auto|none|HOST:PORT[,...]",
        help="peer discovery (env BLOBSTORE_PEERS; default auto)",
        **d,
    )
    g.add_argument(
        "--token-file",
        metavar="FILE",
        help="cluster token for peers (env BLOBSTORE_TOKEN_FILE)",
        **d,
    )
    g.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="this node's certificate for mutual TLS "
        "with peers; needs --tls-key and --tls-ca (env BLOBSTORE_TLS_CERT)",
        **d,
    )
    g.add_argument("--tls-key", metavar="PEM", help="its private key (env BLOBSTORE_TLS_KEY)", **d)
    g.add_argument(
        "--tls-ca",
        metavar="PEM",
        help="the CA that signs every peer's certificate (env BLOBSTORE_TLS_CA)",
        **d,
    )
    g.add_argument(
        "-v",
        "--verbose",
        action="count",
        **({"default": argparse.SUPPRESS} if suppress else {"default": 0}),
        help="more logging",
    )


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; for a ``command`` defined here (see named_command),
    only what parsing it needs: its arguments parse the same, and the command
    modules, plugins and what they import (image tooling, the p2p plugin, gc.py)
    stay unloaded."""
    only = command if command in _CORE_COMMANDS else None
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    parser = argparse.ArgumentParser(
        prog="blobstore",
        description="Content-addressed blob store with peer-to-peer fetching.",
    )
    _global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parser.set_defaults(_wants="client", _parents=[common])

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common])

    p = add("push", "chunk DIR, upload what the store lacks, point REF at it")
    p.add_argument("dir", type=Path)
    p.add_argument("ref")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_push, _wants="client_nopeers")

    p = add("pull", "materialize REF into DIR through local cache, peers, object store")
    p.add_argument("ref")
    p.add_argument("dir", type=Path)
    p.add_argument("--json", action="store_true")
    add_pull_options(p)
    p.set_defaults(func=cmd_pull)

    p = add("ls", "list refs")
    p.add_argument("prefix", nargs="?", default="")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls, _wants="client_nopeers")

    p = add("show", "describe the manifest REF points at")
    p.add_argument("ref")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show, _wants="client_nopeers")

    p = add("verify", "fetch and check every chunk of REF in the object store")
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
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify, _wants="client_nopeers")

    p = add("migrate", "move an old store's per-chunk objects into packs, refs onto v2 manifests")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_migrate, _wants="client_nopeers")

    if only in (None, "gc"):  # its defaults live in gc.py, which no other command needs
        from .gc import DEFAULT_GRACE_SECONDS, DEFAULT_REPACK_BELOW

        p = add("gc", "evict the cache to its limits; sweep unreferenced objects")
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
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_gc, _wants="client_nopeers")
    if only is not None:
        return parser

    for module_name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        before = set(sub.choices)
        module.add_commands(sub)
        for name in set(sub.choices) - before:
            _adopt(sub.choices[name], common, "client")
    for plugin in load_plugins():
        before = set(sub.choices)
        plugin.add_commands(sub)
        for name in set(sub.choices) - before:
            _adopt(sub.choices[name], common, "config")
    return parser


def named_command(argv: Sequence[str]) -> str | None:
    """The core command ``argv`` plainly names after global options, else None (then
    the whole parser is built: --help, a contributed command, a usage error)."""
    options = argparse.ArgumentParser(add_help=False)
    _global_options(options, suppress=True)
    takes_value = {s: a.nargs != 0 for a in options._actions for s in a.option_strings}
    tokens = iter(argv)
    for token in tokens:
        option, has_value, _ = token.partition("=")
        if option not in takes_value:
            return token if token in _CORE_COMMANDS else None
        if takes_value[option] and not has_value:
            next(tokens, None)
    return None


def add_pull_options(p: argparse.ArgumentParser) -> None:
    """--link-mode and --keep-special-modes, for every command that pulls."""
    p.add_argument(
        "--link-mode",
        metavar="auto|reflink|hardlink|copy",
        default=None,
        help="how files get from the node store into DIR: auto clones where the "
        "filesystem can and copies otherwise; hardlink shares the node's copy "
        "(files made read-only; never write into them) (env BLOBSTORE_LINK_MODE)",
    )
    p.add_argument(
        "--keep-special-modes",
        action="store_true",
        help="keep setuid/setgid/sticky bits from the manifest (dropped by default)",
    )


def link_mode_of(args: argparse.Namespace) -> LinkMode:
    """The --link-mode option, else BLOBSTORE_LINK_MODE, else auto. Raises ConfigError."""
    return parse_link_mode(
        getattr(args, "link_mode", None) or os.environ.get("BLOBSTORE_LINK_MODE") or "auto"
    )


def _adopt(p: argparse.ArgumentParser, common: argparse.ArgumentParser, wants: str) -> None:
    """Give a contributed sub-command the global options and how to call it."""
    existing = {a.dest for a in p._actions}
    for action in common._actions:
        if action.dest not in existing and action.option_strings:
            p._add_action(action)
    if p.get_default("_wants") is None:  # a module may say it needs no peers
        p.set_defaults(_wants=wants)
    # nested command groups (``image import``)
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _adopt(child, common, wants)


# --------------------------------------------------------------------------- commands


def _emit(args: argparse.Namespace, doc: Any, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(doc, indent=2, sort_keys=False))
    else:
        print(text)


async def cmd_push(args: argparse.Namespace, client: Client) -> int:
    bar = ProgressLine("push")
    try:
        r = await client.push(args.dir, args.ref, progress=bar)
    finally:
        bar.close()
    doc = {
        "ref": r.ref,
        "manifest": r.manifest,
        "files": r.files,
        "bytes": r.bytes,
        "chunks": r.chunks,
        "new_chunks": r.new_chunks,
        "new_bytes": r.new_bytes,
        "seconds": round(r.seconds, 3),
        "skipped": list(r.skipped),
        "reused_files": r.reused_files,
        "read_bytes": r.read_bytes,
    }
    for path in r.skipped:
        log.warning("skipped special file %s", path)
    _emit(
        args,
        doc,
        f"pushed {r.ref} -> {r.manifest[:16]}: {r.files} files, "
        f"{human_bytes(r.bytes)}, {r.chunks} chunks, uploaded {r.new_chunks} "
        f"({human_bytes(r.new_bytes)}) in {r.seconds:.2f}s",
    )
    return 0


async def cmd_pull(args: argparse.Namespace, client: Client) -> int:
    bar = ProgressLine("pull", tiers=lambda: client.source.bytes_from)
    try:
        r = await client.pull(
            args.ref,
            args.dir,
            progress=bar,
            link_mode=link_mode_of(args),
            keep_special_modes=args.keep_special_modes,
        )
    finally:
        bar.close()
    doc = r.to_json()
    tiers = ", ".join(f"{k} {human_bytes(v)}" for k, v in doc["from"].items())
    _emit(
        args,
        doc,
        f"pulled {r.ref} -> {args.dir}: {r.files} files, {human_bytes(r.bytes)} "
        f"in {r.seconds:.2f}s ({r.kept_files} already up to date; from {tiers})",
    )
    return 0


async def cmd_ls(args: argparse.Namespace, client: Client) -> int:
    refs = await client.catalog.read_refs(args.prefix)
    rows = [{"ref": r.name, "manifest": r.manifest, "problem": r.problem} for r in refs]
    for r in refs:
        if r.problem:
            log.warning("ref %r %s", r.name, r.problem)
    _emit(args, rows, "\n".join(f"{(r.manifest or '(broken)')[:16]:16}  {r.name}" for r in refs))
    return 0


async def cmd_show(args: argparse.Namespace, client: Client) -> int:
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
    _emit(args, doc, text)
    return 0


async def _image_doc(client: Client, ref: str, manifest: Image) -> dict[str, Any]:
    try:
        sharing = importlib.import_module("blobstore.image.sharing")
    except ModuleNotFoundError:
        return {"layers": [layer.digest for layer in manifest.layers]}
    result: dict[str, Any] = (await sharing.image_sharing(client.catalog, ref)).to_json()
    return result


async def cmd_verify(args: argparse.Namespace, client: Client) -> int:
    if args.source is not None and not args.repair:
        raise BadInput("--from DIR goes with --repair")
    if args.repair:
        return await _repair(args, client)
    r = await client.verify(args.ref)
    doc = {
        "ref": r.ref,
        "manifest": r.manifest,
        "chunks": r.chunks,
        "missing": r.missing,
        "corrupt": r.corrupt,
        "ok": r.ok,
        "seconds": round(r.seconds, 3),
    }
    if r.ok:
        _emit(args, doc, f"{r.ref}: all {r.chunks} chunks present and intact")
        return 0
    return _emit_failure(
        args,
        doc,
        f"{r.ref}: {len(r.missing)} chunks missing, {len(r.corrupt)} corrupt of {r.chunks}",
    )


async def _repair(args: argparse.Namespace, client: Client) -> int:
    if args.source is None:
        raise BadInput("verify --repair needs --from DIR (a copy of the tree), or push it again")
    r = await client.repair(args.ref, args.source)
    doc = {
        "ref": r.ref,
        "old_manifest": r.old_manifest,
        "manifest": r.manifest,
        "repaired": r.repaired,
        "unrepaired": list(r.unrepaired),
        "ok": r.ok,
    }
    if r.ok:
        _emit(
            args,
            doc,
            f"{r.ref}: "
            + (
                f"repaired {r.repaired} chunks, now {r.manifest}"
                if r.repaired
                else "all chunks present and intact"
            ),
        )
        return 0
    return _emit_failure(
        args,
        doc,
        f"{r.ref}: {len(r.unrepaired)} bad chunks not found in "
        f"{args.source} (repaired {r.repaired})",
    )


def _emit_failure(args: argparse.Namespace, doc: dict[str, Any], message: str) -> int:
    """The JSON document (with --json) on stdout, one error line on stderr; exit status 1."""
    if getattr(args, "json", False):
        print(json.dumps(doc, indent=2))
    print(f"blobstore: error: {message}", file=sys.stderr)
    return 1


async def cmd_migrate(args: argparse.Namespace, client: Client) -> int:
    r = await client.migrate()
    doc = {
        "refs": r.refs,
        "refs_moved_meanwhile": r.refs_moved_meanwhile,
        "chunks": r.chunks,
        "bytes": r.bytes,
        "unreadable": list(r.unreadable),
    }
    _emit(
        args,
        doc,
        f"packed {r.chunks} chunks ({human_bytes(r.bytes)}), moved {r.refs} refs "
        "onto v2 manifests"
        + (
            f"; {r.refs_moved_meanwhile} refs moved meanwhile (run again)"
            if r.refs_moved_meanwhile
            else ""
        ),
    )
    if r.unreadable:
        print(
            f"blobstore: error: {len(r.unreadable)} chunks missing or corrupt, left where "
            f"they were (first: {r.unreadable[0]})",
            file=sys.stderr,
        )
        return 1
    return 0


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd]?)", text.strip())
    if not m:
        raise ConfigError(f"not a duration: {text!r} (try 30m or 6h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


async def cmd_gc(args: argparse.Namespace, client: Client) -> int:
    from .gc import collect

    if not 0 <= args.repack_below <= 1:
        raise BadInput("--repack-below is a fraction between 0 and 1")
    r = await collect(
        client.object_store,
        client.cache,
        grace_seconds=parse_duration(args.grace),
        dry_run=args.dry_run,
        repack_below=args.repack_below,
    )
    doc = {k: getattr(r, k) for k in r.__dataclass_fields__}
    for problem in r.bad_refs:
        log.warning("%s; kept everything it still reaches", problem)
    verb = "would sweep" if r.dry_run else "swept"
    _emit(
        args,
        doc,
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


# --------------------------------------------------------------------------- main


def make_config(args: argparse.Namespace) -> Config:
    return Config.from_env(
        store=getattr(args, "store", None),
        cache=getattr(args, "cache", None),
        cache_size=getattr(args, "cache_size", None),
        region=getattr(args, "region", None),
        peers=getattr(args, "peers", None),
        token_file=getattr(args, "token_file", None),
        tls_cert=getattr(args, "tls_cert", None),
        tls_key=getattr(args, "tls_key", None),
        tls_ca=getattr(args, "tls_ca", None),
    )


async def _run(args: argparse.Namespace) -> int:
    config = make_config(args)
    func: Command = args.func
    if args._wants == "config":
        return await func(args, config)
    from .client import Client

    async with Client.open(config, peers=args._wants == "client") as client:
        return await func(args, client)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(named_command(argv))
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(getattr(args, "verbose", 0) or 0, 2)
    logging.basicConfig(level=level, format="blobstore: %(levelname)s: %(message)s")
    try:
        with single_errors():  # whatever task group it escaped from: one line
            code: int = anyio.run(_run, args, backend_options={"use_uvloop": True})
    except BlobstoreError as exc:
        print(f"blobstore: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"blobstore: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("blobstore: interrupted", file=sys.stderr)
        return 130
    return code


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
