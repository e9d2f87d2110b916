"""Progress: the meter's smoothing and ETA, the terminal line, tqdm-compatible
classes, per-chunk reports from push and pull, and the CLI's line in a pty."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fakes import FakeTqdm
from helpers import BLOBSTORE, cli_env, random_bytes, write

from blobstore.client import Client
from blobstore.config import CacheConfig, Config, PeerConfig
from blobstore.progress import (
    FileProgress,
    Meter,
    ProgressLine,
    TqdmProgress,
    human_duration,
)

MIB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """A FileProgress that keeps every report."""

    def __init__(self) -> None:
        self.bytes: list[tuple[int, int]] = []
        self.file_counts: list[tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.bytes.append((done, total))

    def files(self, done: int, total: int) -> None:
        self.file_counts.append((done, total))


def test_meter_smooths_speed_and_estimates_time_left() -> None:
    clock = Clock()
    meter = Meter(clock)
    meter.update(0, 1000 * MIB)
    assert meter.eta is None  # nothing moved yet: unknown, not infinite
    clock.now += 1
    meter.update(100 * MIB, 1000 * MIB)
    assert meter.rate == pytest.approx(100 * MIB)
    assert meter.eta == pytest.approx(9.0)
    clock.now += 0.01  # reports closer than a sample are folded into the next one
    meter.update(101 * MIB, 1000 * MIB)
    assert meter.rate == pytest.approx(100 * MIB)
    clock.now += 1  # one stalled second does not zero the speed ...
    meter.update(101 * MIB, 1000 * MIB)
    assert 50 * MIB < meter.rate < 100 * MIB
    for _ in range(20):  # ... a long stall does
        clock.now += 1
        meter.update(101 * MIB, 1000 * MIB)
    assert meter.rate < MIB
    meter.update(1000 * MIB, 1000 * MIB)
    assert meter.eta == 0.0
    assert meter.fraction == 1.0


def test_line_shows_percent_counts_speed_and_eta() -> None:
    clock = Clock()
    out = io.StringIO()
    line = ProgressLine("push", stream=out, enabled=True, clock=clock)
    assert isinstance(line, FileProgress)
    line.files(0, 3)
    clock.now += 2
    line(50 * MIB, 200 * MIB)
    text = line.render(200)
    assert "push" in text
    assert " 25.0%" in text
    assert "50.0 MiB/200.0 MiB" in text
    assert "0/3 files" in text
    assert "25.0 MiB/s" in text
    assert "ETA 0:06" in text
    assert len(line.render(40)) <= 40  # cut to a narrow terminal
    clock.now += 2
    line(200 * MIB, 200 * MIB)
    finished = line.render(200)
    assert "50.0 MiB/s" in finished  # done: the whole run's average, 200 MiB in 4 s
    assert "ETA" not in finished
    line.close()
    assert out.getvalue().endswith("\n")
    assert human_duration(3723) == "1:02:03"


def test_line_is_silent_when_not_a_terminal() -> None:
    out = io.StringIO()
    line = ProgressLine("pull", stream=out)
    line(1, 2)
    line.close()
    assert out.getvalue() == ""


def test_tqdm_class_gets_hf_arguments_and_increments() -> None:
    FakeTqdm.made.clear()
    progress = TqdmProgress(FakeTqdm, "apps/x")
    progress(0, 10)
    progress(4, 10)
    progress.files(1, 2)
    progress(10, 10)
    progress.close()
    (bar,) = FakeTqdm.made
    assert (bar.total, bar.unit, bar.unit_scale, bar.desc) == (10, "B", True, "apps/x")
    assert bar.n == 10
    assert bar.updates == 2
    assert bar.closed
    assert bar.postfix == "1/2 files"


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    config = Config(
        store_url=(tmp_path / "store").as_uri(),
        cache=CacheConfig(tmp_path / "cache"),
        peers=PeerConfig(mode="none"),
    )
    async with Client.open(config, peers=False) as c:
        yield c


@pytest.mark.anyio
async def test_push_and_pull_report_within_a_big_file(client: Client, tmp_path: Path) -> None:
    src = tmp_path / "src"
    size = 80 * MIB  # streamed (over 16 MiB): reported per batch of chunks
    write(src / "big.bin", random_bytes(size, "big"))
    write(src / "small.txt", b"x" * 100)
    pushed = Recorder()
    await client.push(src, "p", progress=pushed)
    total = size + 100
    assert pushed.bytes[-1] == (total, total)
    before_end = {done for done, _ in pushed.bytes if done < size}
    assert len(before_end) >= 2  # the big file moved the line before it ended
    assert pushed.file_counts[0] == (0, 2)
    assert pushed.file_counts[-1] == (2, 2)

    pulled = Recorder()
    await client.pull("p", tmp_path / "dst", progress=pulled, link_mode="copy")
    assert pulled.bytes[-1] == (total, total)
    assert len({done for done, _ in pulled.bytes if 0 < done < total}) >= 3  # per chunk
    assert pulled.file_counts[-1] == (2, 2)


class StoredAtFull:
    """Counts the packs in a file:// store when the line first reads 100%."""

    def __init__(self, packs: Path) -> None:
        self.packs = packs
        self.at_full: int | None = None

    def __call__(self, done: int, total: int) -> None:
        if done >= total and self.at_full is None:
            self.at_full = sum(1 for p in self.packs.rglob("*") if p.is_file())


@pytest.mark.anyio
async def test_push_reaches_100_only_once_its_packs_are_stored(
    client: Client, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    write(src / "a.bin", random_bytes(60 * MIB, "a"))  # two packs of 48 MiB at most
    write(src / "b.bin", random_bytes(30 * MIB, "b"))
    line = StoredAtFull(tmp_path / "store" / "packs")
    await client.push(src, "p", progress=line)
    stored = sum(1 for p in line.packs.rglob("*") if p.is_file())
    assert stored >= 3  # two packs and the push's index
    assert line.at_full == stored


def _run_in_pty(args: list[str], env: dict[str, str]) -> tuple[int, bytes, str]:
    """Run the CLI with stderr on a pseudo-terminal: (status, stdout, terminal text)."""
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [BLOBSTORE, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=child,
        env=env,
    )
    os.close(child)
    seen = b""
    try:
        while True:
            ready, _, _ = select.select([main], [], [], 120)
            if not ready:
                pytest.fail("the CLI wrote nothing on its terminal for 120 s")
            try:
                got = os.read(main, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not got:
                break
            seen += got
    finally:
        os.close(main)
        stdout, _ = proc.communicate(timeout=120)
    return proc.returncode, stdout, seen.decode(errors="replace")


def _pty_env(tmp_path: Path) -> dict[str, str]:
    env = cli_env((tmp_path / "store").as_uri(), tmp_path / "cache")
    env.update(BLOBSTORE_PROGRESS_INTERVAL="0", COLUMNS="160", TERM="xterm")
    return env


def _percents(text: str, label: str) -> list[float]:
    return [float(p) for p in re.findall(rf"{label} [^\r\n%]*?(\d+\.\d)%", text)]


def test_cli_progress_line_advances_in_a_pty(tmp_path: Path) -> None:
    """The real CLI on a pseudo-terminal draws several percentages before the push
    ends (every report drawn: BLOBSTORE_PROGRESS_INTERVAL=0; no timing assumed)."""
    src = tmp_path / "src"
    write(src / "big.bin", random_bytes(64 * MIB, "pty"))
    for i in range(6):  # each lands below half the total: drawn as it is (see ingest_files)
        write(src / f"part{i}.bin", random_bytes(MIB, f"part{i}"))
    status, stdout, text = _run_in_pty(["push", str(src), "apps/pty"], _pty_env(tmp_path))
    assert status == 0, text
    assert b"pushed apps/pty" in stdout
    percents = _percents(text, "push")
    assert percents[-1] == 100.0
    assert len({p for p in percents if 0 < p < 100}) >= 3, text
    assert percents == sorted(percents)  # it only moves forward
    assert "/7 files" in text
    assert "/s" in text
    assert "ETA" in text


def test_cli_sync_shows_pull_and_push_lines(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "cache.bin", random_bytes(24 * MIB, "sync"))
    env = _pty_env(tmp_path)
    assert _run_in_pty(["push", "--quiet", str(src), "caches/k"], env)[0] == 0
    make = "import pathlib,sys; pathlib.Path(sys.argv[1], 'new.so').write_bytes(b'k' * 5000)"
    work = str(tmp_path / "work")
    status, _, text = _run_in_pty(
        ["sync", "caches/k", work, "--", sys.executable, "-c", make, work], env
    )
    assert status == 0, text
    pulls = _percents(text, "pull")
    assert len({p for p in pulls if 0 < p < 100}) >= 2, text  # per chunk
    assert pulls[-1] == 100.0
    assert _percents(text, "push")[-1] == 100.0  # only new.so is read again
    assert "1/1 files" in text
