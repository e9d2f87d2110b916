"""Benchmark: pull a ref from 3 peer daemons vs from S3 only vs a raw asyncio TCP copy.

    .venv/bin/python bench/bench_peers.py [--size 2G] [--no-s3]

All in one run, on loopback: SeaweedFS S3 (``weed``, else a file:// store),
three ``blobstore daemon`` processes with static peers, and:

- ``s3-only pull``      : ``blobstore pull --peers none`` into an empty cache
- ``peers pull``        : ``blobstore pull`` with warm daemons, empty local cache
- ``s3 fetch``          : the origin tier alone (fetch + verify every chunk, no disk writes)
- ``peer fetch``        : the peer tier alone (fetch + verify every chunk, no disk writes)
- ``raw tcp``           : the same bytes over one minimal uvloop stream (no framing, no hashing)

Aims (issue #3): peer fetch >= 0.7 x raw TCP and >= 3 x S3. The end-to-end pulls are
printed too; on a small machine they are bound by writing files and the cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "p2p")]

from daemons import cluster  # noqa: E402
from helpers import cli_env, random_bytes, run_cli  # noqa: E402
from s3server import SeaweedS3Server, find_weed  # noqa: E402

from blobstore.catalog import Catalog  # noqa: E402
from blobstore.config import CacheConfig, Config, PeerConfig, parse_size  # noqa: E402
from blobstore.ids import ChunkId  # noqa: E402
from blobstore.nodestore import NodeStore  # noqa: E402
from blobstore.origin import OriginSource  # noqa: E402
from blobstore.source import ChunkSource  # noqa: E402
from blobstore.stores import open_object_store  # noqa: E402
from p2p.peertier import PeerTier  # noqa: E402
from p2p.plugin import PLUGIN  # noqa: E402

GB = 1e9


def make_data(root: Path, size: int) -> None:
    root.mkdir(parents=True)
    per_file = 256 << 20
    for i in range(0, size, per_file):
        (root / f"part-{i // per_file:03d}.bin").write_bytes(
            random_bytes(min(per_file, size - i), f"bench-{i}")
        )


def timed_pull(store: str, cache: Path, peers: str, dest: Path, env: dict[str, str]) -> dict:
    shutil.rmtree(dest, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    env = cli_env(store, cache, {**env, "BLOBSTORE_PEERS": peers})
    started = time.perf_counter()
    proc = run_cli(["pull", "bench/data", dest, "--json"], env, timeout=1800)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"pull failed: {proc.stderr}")
    doc = json.loads(proc.stdout)
    doc["wall"] = elapsed
    return doc


async def fetch_all(source: ChunkSource, ids: list[ChunkId], concurrency: int) -> tuple[int, float]:
    """Get (and verify) every chunk from ``source``, no disk writes; return (bytes, seconds)."""
    queue = iter(ids)
    total = 0

    async def worker() -> None:
        nonlocal total
        for chunk_id in queue:
            data = await source.get(chunk_id)  # (not `total += len(await ...)`: that
            total += len(data)  # reads `total` before the await and loses updates)

    started = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    return total, time.perf_counter() - started


async def tier_fetch(store: str, peers: str, cache: Path, concurrency: int) -> tuple[int, float]:
    """Fetch every chunk of the ref through the peer tier, or the origin when ``peers`` is none."""
    config = Config(store, CacheConfig(cache), peers=PeerConfig.parse(peers))
    async with open_object_store(store) as object_store, NodeStore(config.cache) as local:
        tree = await Catalog(object_store).load_tree(
            await Catalog(object_store).resolve_or_id("bench/data")
        )
        ids = list(dict.fromkeys(c.id for c in tree.chunk_refs()))
        if peers == "none":
            return await fetch_all(OriginSource(object_store), ids, concurrency)
        async with PLUGIN.peer_tier(config, local) as tier:
            assert isinstance(tier, PeerTier)
            return await fetch_all(tier, ids, concurrency)


async def raw_tcp(files: list[Path]) -> tuple[int, float]:
    """Send the files' bytes over one asyncio stream; the reader discards them."""
    payload = [f.read_bytes() for f in files]
    total = sum(len(p) for p in payload)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for p in payload:
            writer.write(p)
            await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=4 << 20)
    got = 0
    while chunk := await reader.read(4 << 20):
        got += len(chunk)
    elapsed = time.perf_counter() - started
    writer.close()
    server.close()
    await server.wait_closed()
    assert got == total
    return total, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2G")
    parser.add_argument("--no-s3", action="store_true", help="use a file:// store")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    size = parse_size(args.size)
    import uvloop

    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    try:
        with ExitStack() as stack:
            env: dict[str, str] = {}
            weed = None if args.no_s3 else find_weed()
            if weed:
                s3 = stack.enter_context(SeaweedS3Server.start(work / "weed", weed))
                env = s3.client_env()
                os.environ.update(env)
                store = s3.bucket_url("bench")
            else:
                store = (work / "store").as_uri()
            print(f"store: {store}  size: {size / GB:.2f} GB", flush=True)
            make_data(work / "src", size)
            proc = run_cli(
                ["push", work / "src", "bench/data"], cli_env(store, work / "pc", env), timeout=1800
            )
            if proc.returncode != 0:
                raise SystemExit(proc.stderr)
            origin = timed_pull(store, work / "c-origin", "none", work / "out", env)
            s3_bytes, s3_s = uvloop.run(tier_fetch(store, "none", work / "c-f", args.concurrency))
            daemons = stack.enter_context(cluster(store, work, 3, env=env))
            peers = ",".join(d.listen for d in daemons)
            timed_pull(store, work / "c-warm", peers, work / "out", env)  # warms the homes
            warm = timed_pull(store, work / "c-peers", peers, work / "out", env)
            fetched, fetch_s = uvloop.run(tier_fetch(store, peers, work / "c-f", args.concurrency))
            raw_bytes, raw_s = uvloop.run(raw_tcp(sorted((work / "out").iterdir())))
        rates = {
            "s3-only pull": origin["bytes"] / origin["wall"] / GB,
            "peers pull": warm["bytes"] / warm["wall"] / GB,
            "s3 fetch": s3_bytes / s3_s / GB,
            "peer fetch": fetched / fetch_s / GB,
            "raw tcp": raw_bytes / raw_s / GB,
        }
        for name, rate in rates.items():
            print(f"{name:>14}: {rate:6.2f} GB/s")
        print(f"peers pull from: {warm['from']}")
        ratio = rates["peer fetch"] / rates["raw tcp"]
        print(f"peer fetch / raw tcp      = {ratio:.2f}  (aim >= 0.7)")
        print(
            f"peer fetch / s3 fetch     = {rates['peer fetch'] / rates['s3 fetch']:.2f}  (aim >= 3)"
        )
        print(
            f"peers pull / s3-only pull = {rates['peers pull'] / rates['s3-only pull']:.2f}  "
            "(end to end: includes writing files and the local cache)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
