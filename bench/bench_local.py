"""Local pulls (issue 9): warm pull, re-pull and link modes against cp, and the
disk bytes each pull writes.

    .venv/bin/python bench/bench_local.py [--size 1G] [--rounds 3] [--no-xfs]
                                          [--tree DIR] [--workdir DIR]
                                          [--only cold] [--data file|tree]

Two data sets: one big random file (``--size``) and a source tree (default: the
Python stdlib of this interpreter, site-packages left out: ~7,700 files). Each
is pushed into a ``file://`` store, pulled once cold (every byte from the store)
and then measured, medians of ``--rounds`` rounds in alternating order:

- ``cp -r store objects`` vs ``pull auto (cold)`` and ``pull copy (cold)``: a
  pull into a new directory with a new, empty node store (auto seeds on
  ext4/tmpfs: each byte written once; copy writes the store's copy too), and
  ``runner API (cold)``: the same auto pull by ``download_model_weights`` in a
  new interpreter (in-process: the call alone);
- ``cp -r`` and ``cp -r && sync``: the copy floors;
- ``pull copy (warm)``: ``blobstore pull --link-mode copy`` into a new directory,
  every file in the node store (ends with its one syncfs);
- ``re-pull (up to date)``: the same pull into the directory just pulled;
- on an XFS loop mount (root; ``--no-xfs`` to skip): ``cp -r --reflink=always``
  vs ``pull --link-mode reflink`` and ``cp -al`` vs ``pull --link-mode hardlink``,
  with the node store on the same XFS.

Rows marked ``agent`` run the same CLI pull with the node's ``blobstore daemon``
running on that node store (started untimed; a fresh one per cold run): the CLI
hands the pull to it (blobstore/agent.py), so the row has no import or set-up
cost beyond the interpreter's (~10 ms) and the client's (~4 ms). Every other row sets
``BLOBSTORE_AGENT=off``: the CLI pulls in its own process.

Disk bytes written come from ``/proc/self/io`` (``write_bytes`` minus
``cancelled_write_bytes``; a reaped child's counts are added to its parent's),
for the cold pull and each warm pull: bytes written per byte pulled. Times are
wall clock of the CLI process (interpreter start-up included, ~0.3 s).
``--only cold`` runs just the cold rows of each data set (the cold pulls
beside ``cp -r store objects``); ``--data`` keeps one data set.
``sync`` runs before each timed step. JSON goes to bench/out/.

A tree's outputs are moved aside between steps and deleted at the end, not
deleted at once: on ext4 without a journal (this VM's root filesystem) creating
an inode within 60 s (up to 360 s) of deleting many others scans every recently
freed inode of its group (``recently_deleted``: 49% of a cold tree pull's
samples under ``perf``), and each step would pay for the 15,000 inodes the one
before freed (cold tree pull 0.69 s in a round's first step, 2.8-3.4 s in the
others). Deletions by anything else in the minutes before still slow the tree's
rows: run it a few minutes after the last big deletion, and read the per-run
numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

from helpers import random_bytes  # noqa: E402
from nodeagent import node_daemon  # noqa: E402

from blobstore.config import parse_size  # noqa: E402

BLOBSTORE = str(Path(sys.executable).parent / "blobstore")
STDLIB = Path(os.__file__).parent


DAEMONS: list[int] = []
"""Pids of the node daemons running for the agent rows (their writes are the pull's)."""


def disk_written() -> int:
    """Bytes this process, its reaped children and the running node daemons caused
    to be written to storage."""
    total = 0
    for proc in ["self", *map(str, DAEMONS)]:
        io = Path(f"/proc/{proc}/io").read_text().splitlines()
        fields = dict(line.split(": ") for line in io)
        total += int(fields["write_bytes"]) - int(fields["cancelled_write_bytes"])
    return total


def run(args: list[str], env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def timed(step: Callable[[], Any]) -> tuple[float, int, float | None]:
    """(seconds, disk bytes written, the pull's own seconds if it is a pull) of
    ``step``, after a sync. (Free memory is not touched first, as bench_s3.py
    does: here each step frees what the one before wrote and starts at once, and
    touching made our 256 KiB writes meet cold memory in 2 of 8 runs, cp in none.)"""
    os.sync()
    written = disk_written()
    started = time.perf_counter()
    inner = step()
    seconds = time.perf_counter() - started
    os.sync()  # count the step's delayed write-back, not just what it forced
    return seconds, disk_written() - written, inner


def same_fs(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


class Bench:
    def __init__(self, work: Path, store_dir: Path, cache: Path, rounds: int) -> None:
        self.work = work
        self.env = dict(
            os.environ,
            BLOBSTORE_STORE=store_dir.as_uri(),
            BLOBSTORE_CACHE=str(cache),
            BLOBSTORE_PEERS="none",
            BLOBSTORE_AGENT="off",  # (the agent rows turn it on)
        )
        self.rounds = rounds
        self.rows: list[dict[str, Any]] = []
        self._n = 0
        self.trash = work / "trash"
        """Where a tree's outputs go between steps (see ``cleanup`` in
        bench_dataset), emptied at the end."""
        self.trash.mkdir(exist_ok=True)

    def daemon(self, stack: ExitStack, cache: Path | None = None) -> None:
        """The node's daemon on ``cache`` (default: this bench's node store) until
        ``stack`` closes, for the agent rows."""
        env = self.env if cache is None else dict(self.env, BLOBSTORE_CACHE=str(cache))
        pid = stack.enter_context(node_daemon(env)).pid
        DAEMONS.append(pid)
        stack.callback(DAEMONS.remove, pid)

    def fresh(self, base: Path) -> Path:
        self._n += 1
        return base / f"out-{self._n}"

    def pull(
        self,
        ref: str,
        dst: Path,
        mode: str = "copy",
        cache: Path | None = None,
        agent: bool = False,
    ) -> float:
        """Pull through the CLI; returns the pull's own seconds (``--json``: the
        materialize step, without interpreter start-up and manifest loading).
        ``cache``: another node store (a cold one). ``agent``: the CLI hands the
        pull to the daemon running on that node store (``daemon``)."""
        env = self.env if cache is None else dict(self.env, BLOBSTORE_CACHE=str(cache))
        if agent:
            env = dict(env, BLOBSTORE_AGENT="auto")
        out = run([BLOBSTORE, "pull", "--json", "--link-mode", mode, ref, str(dst)], env)
        seconds: float = json.loads(out)["seconds"]
        return seconds

    def runner_pull(self, ref: str, dst: Path, cache: Path) -> float:
        """A cold pull through the runner API (``download_model_weights`` in a new
        interpreter, node store ``cache``); returns the call's own seconds."""
        script = (
            "import asyncio, sys, time\n"
            "from blobstore.runner import download_model_weights, open_client\n"
            "async def main():\n"
            "    async with open_client() as client:\n"
            "        t = time.perf_counter()\n"
            "        await download_model_weights(client, sys.argv[1], sys.argv[2])\n"
            "        print(time.perf_counter() - t)\n"
            "asyncio.run(main())\n"
        )
        env = dict(self.env, BLOBSTORE_CACHE=str(cache))
        return float(run([sys.executable, "-c", script, ref, str(dst)], env))

    def measure(
        self,
        data: str,
        nbytes: int,
        steps: dict[str, Callable[[], Any]],
        cleanup: Callable[[], None],
    ) -> None:
        """Run every step ``rounds`` times, alternating the order; keep medians."""
        times: dict[str, list[float]] = {name: [] for name in steps}
        inner: dict[str, list[float]] = {name: [] for name in steps}
        written: dict[str, list[int]] = {name: [] for name in steps}
        names = list(steps)
        for r in range(self.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                seconds, wrote, pull_seconds = timed(steps[name])
                times[name].append(seconds)
                written[name].append(wrote)
                if isinstance(pull_seconds, float):  # cp's steps return its output
                    inner[name].append(pull_seconds)
                cleanup()
        for name in names:
            self.rows.append(
                {
                    "data": data,
                    "step": name,
                    "bytes": nbytes,
                    "seconds": statistics.median(times[name]),
                    "all_seconds": times[name],
                    "pull_seconds": statistics.median(inner[name]) if inner[name] else None,
                    "all_pull_seconds": inner[name],
                    "written_per_byte": statistics.median(written[name]) / nbytes,
                }
            )


def bench_dataset(b: Bench, data: str, src: Path, xfs: Path | None, cold_only: bool) -> None:
    ref = f"bench/{data.replace(' ', '-')}"
    nbytes = tree_bytes(src)
    run([BLOBSTORE, "push", str(src), ref], b.env)
    out = b.work / f"out-{data}"
    out.mkdir()
    made: list[Path] = []

    def into(make: Callable[[Path], Any]) -> Callable[[], Any]:
        def step() -> Any:
            dst = b.fresh(out)
            made.append(dst)
            return make(dst)

        return step

    def cleanup() -> None:
        while made:
            gone = made.pop()
            if data == "tree" and gone.exists() and same_fs(gone, b.trash):
                gone.rename(b.trash / gone.name)
            else:
                shutil.rmtree(gone, ignore_errors=True)

    def cold_runner() -> Any:
        dst = b.fresh(out)
        cache = dst.with_name(dst.name + "-cache")
        made.extend([dst, cache])
        return b.runner_pull(ref, dst, cache)

    def cold_pull(mode: str, agents: list[Path] | None = None) -> Callable[[], Any]:
        """A pull into a new DEST with a new (empty) node store; ``agents``: node
        stores with their daemon started (untimed), one taken per run."""

        def step() -> Any:
            dst = b.fresh(out)
            cache = agents.pop() if agents else dst.with_name(dst.name + "-cache")
            made.extend([dst, cache])
            return b.pull(ref, dst, mode, cache=cache, agent=agents is not None)

        return step

    store = Path(b.env["BLOBSTORE_STORE"].removeprefix("file://"))
    with ExitStack() as daemons:
        agents = [b.work / f"agent-cache-{data}-{i}" for i in range(b.rounds)]
        for cache in agents:
            b.daemon(daemons, cache)
        b.measure(
            data,
            nbytes,
            {
                "cp -r store objects": into(lambda d: run(["cp", "-r", str(store), str(d)])),
                "pull auto (cold)": cold_pull("auto"),
                "pull auto (cold, agent)": cold_pull("auto", agents),
                "runner API (cold)": cold_runner,
                "pull copy (cold)": cold_pull("copy"),
            },
            cleanup,
        )
    if cold_only:
        shutil.rmtree(out)
        return
    cold = out / "cold"
    b.pull(ref, cold)  # fills the node store for the warm steps (copy mode)

    def cp_sync(dst: Path) -> None:
        run(["cp", "-r", str(src), str(dst)])
        os.sync()

    with ExitStack() as daemons:
        b.daemon(daemons)
        b.measure(
            data,
            nbytes,
            {
                "cp -r": into(lambda d: run(["cp", "-r", str(src), str(d)])),
                "cp -r && sync": into(cp_sync),
                "pull copy (warm)": into(lambda d: b.pull(ref, d)),
                "pull copy (warm, agent)": into(lambda d: b.pull(ref, d, agent=True)),
                "re-pull (up to date)": lambda: b.pull(ref, cold),
            },
            cleanup,
        )
    shutil.rmtree(out)
    if xfs is None:
        return
    xsrc = xfs / f"src-{data}"
    run(["cp", "-r", str(src), str(xsrc)])
    xb = Bench(
        b.work,
        Path(b.env["BLOBSTORE_STORE"].removeprefix("file://")),
        xfs / "node" / "cache",
        b.rounds,
    )
    xout = xfs / f"out-{data}"
    xout.mkdir()
    seconds, wrote, inner = timed(lambda: xb.pull(ref, xout / "cold", "reflink"))
    b.rows.append(
        {
            "data": data,
            "step": "xfs: pull reflink (cold)",
            "bytes": nbytes,
            "seconds": seconds,
            "pull_seconds": inner,
            "written_per_byte": wrote / nbytes,
        }
    )
    shutil.rmtree(xout / "cold")

    def xinto(make: Callable[[Path], Any]) -> Callable[[], Any]:
        def step() -> Any:
            dst = xb.fresh(xout)
            made.append(dst)
            return make(dst)

        return step

    with ExitStack() as daemons:
        xb.daemon(daemons)
        xb.measure(
            data,
            nbytes,
            {
                "xfs: cp -r": xinto(
                    lambda d: run(["cp", "-r", "--reflink=never", str(xsrc), str(d)])
                ),
                "xfs: cp -r --reflink=always": xinto(
                    lambda d: run(["cp", "-r", "--reflink=always", str(xsrc), str(d)])
                ),
                "xfs: pull reflink (warm)": xinto(lambda d: xb.pull(ref, d, "reflink")),
                "xfs: pull reflink (warm, agent)": xinto(
                    lambda d: xb.pull(ref, d, "reflink", agent=True)
                ),
                "xfs: cp -al": xinto(lambda d: run(["cp", "-al", str(xsrc), str(d)])),
                "xfs: pull hardlink (warm)": xinto(lambda d: xb.pull(ref, d, "hardlink")),
            },
            cleanup,
        )
    b.rows += xb.rows
    shutil.rmtree(xout)
    shutil.rmtree(xsrc)


def mount_xfs(work: Path, size: int) -> Path | None:
    if os.geteuid() != 0 or shutil.which("mkfs.xfs") is None:
        print("skipping XFS: needs root and mkfs.xfs", file=sys.stderr)
        return None
    image, mount = work / "xfs.img", work / "xfs"
    with open(image, "wb") as f:
        f.truncate(size)
    run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)])
    mount.mkdir()
    run(["mount", "-o", "loop", str(image), str(mount)])
    return mount


def report(rows: list[dict[str, Any]]) -> None:
    """Ratios are baseline time / our time (>1: faster than the baseline). For
    pulls, "in-process" is the pull's own time (what the runner API pays)."""
    floors = {(r["data"], r["step"]): r["seconds"] for r in rows}
    print(
        f"{'data':<7} {'step':<28} {'seconds':>8} {'×cp -r':>7} {'×cp+sync':>8} "
        f"{'in-process':>10} {'×cp -r':>7} {'written/B':>9}"
    )
    for r in rows:
        xfs = r["step"].startswith("xfs:")
        cp = floors.get((r["data"], "xfs: cp -r" if xfs else "cp -r"))
        cps = floors.get((r["data"], "cp -r && sync"))
        if "(cold" in r["step"] and not xfs:  # cold pulls: against copying the store
            cp = floors.get((r["data"], "cp -r store objects"))
        ratio = f"{cp / r['seconds']:7.2f}" if cp else " " * 7
        ratio_sync = f"{cps / r['seconds']:8.2f}" if cps and not xfs else " " * 8
        inner = r.get("pull_seconds")
        inner_s = f"{inner:10.3f}" if inner else " " * 10
        inner_r = f"{cp / inner:7.2f}" if inner and cp else " " * 7
        print(
            f"{r['data']:<7} {r['step']:<28} {r['seconds']:8.3f} {ratio} {ratio_sync} "
            f"{inner_s} {inner_r} {r['written_per_byte']:9.2f}"
        )
    print("per run, in the order run (in-process seconds in brackets):")
    for r in rows:
        if len(r.get("all_seconds", ())) > 1:
            runs = " ".join(f"{s:.3f}" for s in r["all_seconds"])
            inner_runs = " ".join(f"{s:.3f}" for s in r.get("all_pull_seconds") or ())
            print(
                f"  {r['data']:<7} {r['step']:<28} {runs}"
                + (f" [{inner_runs}]" if inner_runs else "")
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1G", help="the big file's size (default 1G)")
    parser.add_argument("--tree", type=Path, default=STDLIB, help="source tree to copy in")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-xfs", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--only", choices=["cold"], help="only the cold pulls (no XFS)")
    parser.add_argument("--data", choices=["file", "tree"], help="only this data set")
    args = parser.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="bench-local-", dir=args.workdir) as tmp:
        work = Path(tmp)
        big = work / "src-big"
        big.mkdir()
        with open(big / "weights.bin", "wb") as f:
            for i in range(0, size, 64 << 20):
                f.write(random_bytes(min(64 << 20, size - i), f"bench-{i}"))
        tree = work / "src-tree"
        shutil.copytree(
            args.tree, tree, symlinks=True, ignore=shutil.ignore_patterns("site-packages")
        )
        cold_only = args.only == "cold"
        xfs = None if args.no_xfs or cold_only else mount_xfs(work, 4 * size + (4 << 30))
        # One store per data set: "cp -r store objects" copies that data set's packs only.
        b = Bench(work, work / "store-big", work / "node" / "cache", args.rounds)
        tb = Bench(work, work / "store-tree", work / "node" / "cache", args.rounds)
        try:
            if args.data != "tree":
                bench_dataset(b, "1 file", big, xfs, cold_only)
            if args.data != "file":
                bench_dataset(tb, "tree", tree, xfs, cold_only)
            b.rows += tb.rows
        finally:
            if xfs is not None:
                subprocess.run(["umount", "-l", str(xfs)], check=False)
        report(b.rows)
        shutil.rmtree(b.trash, ignore_errors=True)
        out = HERE / "out" / f"bench_local-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.parent.mkdir(exist_ok=True)
        files = sum(1 for p in tree.rglob("*") if p.is_file())
        out.write_text(json.dumps({"size": size, "tree_files": files, "rows": b.rows}, indent=2))
        print(f"tree: {files} files; JSON: {out}")


if __name__ == "__main__":
    main()
