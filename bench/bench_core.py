"""Push/pull throughput against ``cp -r`` and a single-pass BLAKE3 + copy, in one run.

    .venv/bin/python bench/bench_core.py [--size 2G] [--no-s3] [--workdir DIR]

One data set (a few big files, many small ones, partly duplicated; the generator
of tests/helpers.py) is measured side by side:

- ``cp -r``: the copy floor every pull is compared with;
- ``b3copy``: read each file, BLAKE3 it, write it to another dir (one pass, one core);
- ``push``/``pull`` through the CLI against a ``file://`` store and, when the
  ``weed`` binary is found, a SeaweedFS S3 store. Pulls start with an empty cache
  (every byte from the store), then once more from a warm cache into a new dir.

Everything reads from a warm page cache; ``sync`` runs before each timed step so
one step's write-back is not billed to the next. Prints a table and writes JSON
to bench/out/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

from helpers import make_big_tree  # noqa: E402
from s3server import SeaweedS3Server, find_weed  # noqa: E402

from blobstore.config import parse_size  # noqa: E402

BLOBSTORE = str(Path(sys.executable).parent / "blobstore")
BUF = 8 << 20


def timed(step: Callable[[], Any]) -> tuple[float, Any]:
    os.sync()
    started = time.perf_counter()
    result = step()
    return time.perf_counter() - started, result


def cp_r(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)


def b3copy(src: Path, dst: Path) -> None:
    """Read every file once, hash it with BLAKE3 and write it elsewhere."""
    buf = bytearray(BUF)
    view = memoryview(buf)
    for dirpath, _, files in os.walk(src):
        out_dir = dst / Path(dirpath).relative_to(src)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in files:
            h = blake3.blake3()
            with (
                open(Path(dirpath) / name, "rb", buffering=0) as fin,
                open(out_dir / name, "wb", buffering=0) as fout,
            ):
                while n := fin.readinto(buf):
                    h.update(view[:n])
                    fout.write(view[:n])
            h.hexdigest()


def cli(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run(
        [BLOBSTORE, *args, "--json"], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"blobstore {' '.join(args)} failed: {proc.stderr.strip()}")
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def rm(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def bench_store(
    name: str,
    url: str,
    src: Path,
    work: Path,
    extra_env: dict[str, str],
    rows: list[dict[str, Any]],
    size: int,
) -> None:
    cache = work / f"cache-{name}"
    env = {
        **os.environ,
        **extra_env,
        "BLOBSTORE_STORE": url,
        "BLOBSTORE_CACHE": str(cache),
        "BLOBSTORE_PEERS": "none",
    }
    secs, doc = timed(lambda: cli(["push", str(src), "bench/tree"], env))
    rows.append(row(f"push {name}", size, secs, new_bytes=doc["new_bytes"]))
    secs, doc = timed(lambda: cli(["push", str(src), "bench/tree"], env))
    rows.append(row(f"push {name} (again, 0 new)", size, secs, new_bytes=doc["new_bytes"]))
    rm(cache)
    dst = work / f"pull-{name}"
    secs, doc = timed(lambda: cli(["pull", "bench/tree", str(dst)], env))
    rows.append(row(f"pull {name} (cold cache)", size, secs, tiers=doc["from"]))
    rm(dst)
    secs, doc = timed(lambda: cli(["pull", "bench/tree", str(dst)], env))
    rows.append(row(f"pull {name} (warm cache)", size, secs, tiers=doc["from"]))
    rm(dst)
    rm(cache)


def row(label: str, size: int, secs: float, **extra: Any) -> dict[str, Any]:
    return {"step": label, "seconds": round(secs, 3), "gbps": round(size / secs / 1e9, 3), **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2G", help="data set size (default 2G)")
    parser.add_argument("--no-s3", action="store_true", help="skip the SeaweedFS S3 store")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="scratch directory (default: a temp dir, removed afterwards)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args()
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="bench-core-", dir=args.workdir))
    rows: list[dict[str, Any]] = []
    try:
        src = work / "src"
        gen_secs, _ = timed(lambda: make_big_tree(src, size))
        print(f"generated {size / 1e9:.2f} GB in {gen_secs:.1f}s under {work}", flush=True)

        secs, _ = timed(lambda: cp_r(src, work / "cp"))
        rows.append(row("cp -r", size, secs))
        rm(work / "cp")
        secs, _ = timed(lambda: b3copy(src, work / "b3"))
        rows.append(row("b3copy (read+blake3+write)", size, secs))
        rm(work / "b3")

        bench_store("file", (work / "store").as_uri(), src, work, {}, rows, size)
        rm(work / "store")
        weed = find_weed()
        if weed and not args.no_s3:
            with SeaweedS3Server.start(work / "weed", weed) as s3:
                bench_store("s3", s3.bucket_url(), src, work, s3.client_env(), rows, size)
        elif not args.no_s3:
            print("weed not found: S3 rows skipped", flush=True)
    finally:
        rm(work)

    cp = next(r["gbps"] for r in rows if r["step"] == "cp -r")
    b3 = next(r["gbps"] for r in rows if r["step"].startswith("b3copy"))
    print(f"\n{'step':34} {'seconds':>8} {'GB/s':>7} {'/cp':>6} {'/b3copy':>8}")
    for r in rows:
        r["vs_cp"] = round(r["gbps"] / cp, 3)
        r["vs_b3copy"] = round(r["gbps"] / b3, 3)
        print(
            f"{r['step']:34} {r['seconds']:8.2f} {r['gbps']:7.3f} {r['vs_cp']:6.2f} "
            f"{r['vs_b3copy']:8.2f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out / f"bench_core-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "size": size,
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "machine": platform.machine(),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
