"""A runner's start-up with the blobstore runner API.

Real use (store, cache and peers from BLOBSTORE_* variables):

    python examples/runner_startup.py --ref apps/llama/data --dest /data/models/llama \
        --cache-ref apps/llama/inductor/A100 --cache-dest /data/inductor-caches/A100

Demo (no arguments): builds a throw-away file:// store, pushes a fake model,
then shows a cold start, a warm start and a synchronized compile cache.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import anyio

from blobstore.runner import download_model_weights, locality, open_client
from blobstore.syncdir import synchronized_directory


def show(ref: str, done: int, total: int) -> None:
    if not sys.stderr.isatty():
        return
    pct = 100 * done / total if total else 100.0
    print(f"\r  {ref}: {pct:5.1f}% of {total:,} bytes", end="", file=sys.stderr, flush=True)


async def start(ref: str, dest: Path, cache_ref: str | None, cache_dest: Path | None) -> None:
    async with open_client() as client:
        # A scheduler would call this on candidate nodes and prefer the warm ones.
        loc = await locality(client, ref)
        print(
            f"locality of {ref}: {loc.local_fraction:.0%} on this node, "
            f"{loc.region_fraction:.0%} in the region"
        )

        # config.json and tokenizer files land first, weights last; no-op when complete.
        got = await download_model_weights(client, ref, dest, progress=show)
        if got.pulled and sys.stderr.isatty():
            print(file=sys.stderr)
        if got.pulled and got.pull is not None:
            tiers = ", ".join(f"{k} {v:,} B" for k, v in got.pull.from_tier.items() if v)
            print(f"pulled {ref} into {dest} ({tiers})")
        else:
            print(f"{dest} already holds {ref} @ {got.manifest[:12]}; nothing to pull")

        if cache_ref and cache_dest:
            # Compiled kernels: pulled now, new ones pushed (and merged) on exit.
            async with synchronized_directory(client, cache_ref, cache_dest) as session:
                print(f"compile cache {cache_ref}: base {str(session.base_id)[:12]}")
                (cache_dest / f"kernel-{os.getpid()}.bin").write_bytes(os.urandom(4096))
            assert session.result is not None
            print(
                f"compile cache pushed: {session.result.pushed}, "
                f"changed files: {session.result.changed_files}"
            )


async def demo() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ.update(
            BLOBSTORE_STORE=(root / "store").as_uri(),
            BLOBSTORE_CACHE=str(root / "cache"),
            BLOBSTORE_PEERS="none",
        )
        model = root / "build"
        (model / "tokenizer").mkdir(parents=True)
        (model / "config.json").write_text('{"hidden_size": 4096}')
        (model / "tokenizer" / "tokenizer.json").write_text('{"model": "bpe"}')
        (model / "model.safetensors").write_bytes(os.urandom(8 << 20))
        async with open_client() as client:
            await client.push(model, "apps/demo/data")
        for label in ("cold start", "warm start"):
            print(f"--- {label}")
            await start(
                "apps/demo/data",
                root / "data" / "model",
                "apps/demo/inductor",
                root / "data" / "inductor",
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ref")
    ap.add_argument("--dest", type=Path)
    ap.add_argument("--cache-ref")
    ap.add_argument("--cache-dest", type=Path)
    args = ap.parse_args()
    if args.ref is None:
        anyio.run(demo)
    elif args.dest is None:
        ap.error("--dest is required with --ref")
    else:
        anyio.run(start, args.ref, args.dest, args.cache_ref, args.cache_dest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
