"""Usage errors exit 2 everywhere; ``ls | head`` is not an error; --quiet; gc --cache-only."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
from helpers import BLOBSTORE, cli_env, error_lines, run_cli, write

from blobstore import cli


@pytest.mark.parametrize(
    "argv",
    [
        ["verify", "r", "--from", "d"],  # --from goes with --repair
        ["verify", "r", "--repair"],  # and --repair needs --from
        ["sync", "r", "d", "--json"],  # options after DIR belong to the command
        ["gc", "--grace", "soon"],
        ["gc", "--repack-below", "2"],
        ["gc", "--cache-only", "--repack-below", "0.5"],
        ["gc", "--cache-only", "--grace", "1h"],
        ["rm"],
        ["cp", "only-one"],
        ["ls", "a", "b"],
        ["pull", "r", "d", "--include"],
        ["--log-format", "xml", "ls"],
        ["--log-level", "loud", "ls"],
        ["image"],
        ["image", "export", "r", "out", "--format", "zip"],
        ["dedup-report", "--format", "pdf"],
        ["daemon", "--no-such-flag"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "usage: blobstore" in err
    assert "error:" in err.splitlines()[-1]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return cli_env((tmp_path / "store").as_uri(), tmp_path / "cache")


def test_a_closed_stdout_is_not_an_error(env: dict[str, str], tmp_path: Path) -> None:
    """``blobstore ls | head -1``: the reader left; no error line, status 0."""
    write(tmp_path / "src" / "f", b"x")
    for i in range(3):
        assert run_cli(["push", tmp_path / "src", f"r{i}"], env).returncode == 0
    # ls (the event loop), a pull, and the same pull again (up to date: answered
    # before the event loop, as are pulls the node's daemon runs)
    for args in (["ls", "-l"], ["pull", "r0", tmp_path / "out"], ["pull", "r0", tmp_path / "out"]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before we write a byte
        try:
            done = subprocess.run(
                [BLOBSTORE, *map(str, args)],
                env=env,
                stdout=write_end,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
                check=False,
            )
        finally:
            os.close(write_end)
        assert (done.returncode, done.stderr) == (0, ""), args


def test_quiet(env: dict[str, str], tmp_path: Path) -> None:
    write(tmp_path / "src" / "f", b"x")
    push = run_cli(["-q", "push", tmp_path / "src", "r"], env)
    assert (push.returncode, push.stdout, push.stderr) == (0, "", "")
    pull = run_cli(["pull", "--quiet", "r", tmp_path / "out"], env)
    assert (pull.returncode, pull.stdout, pull.stderr) == (0, "", "")
    assert (tmp_path / "out" / "f").read_bytes() == b"x"
    # --json is asked for explicitly: still printed
    assert json.loads(run_cli(["ls", "-q", "--json"], env).stdout)[0]["ref"] == "r"
    # errors are never quiet
    failed = run_cli(["-q", "pull", "nope", tmp_path / "x"], env)
    assert failed.returncode == 1
    assert error_lines(failed.stderr) == ["blobstore: error: ref 'nope' not found"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_gc_cache_only_evicts_without_the_store(env: dict[str, str], tmp_path: Path) -> None:
    write(tmp_path / "src" / "big", os.urandom(3 << 20))
    assert run_cli(["push", tmp_path / "src", "r"], env).returncode == 0
    # hardlink: the node cache keeps the pulled file (a file store's pull copies
    # straight from its packs otherwise)
    pull = run_cli(["pull", "r", tmp_path / "out", "--link-mode", "hardlink"], env)
    assert pull.returncode == 0, pull.stderr
    # A store nobody answers at, and a cache limit below what the cache holds.
    offline = {
        **env,
        "BLOBSTORE_STORE": "s3://bucket/prefix",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "BLOBSTORE_CACHE_SIZE": "1M",
    }
    dry = run_cli(
        ["gc", "--cache-only", "--dry-run", "--json"], {**offline, "BLOBSTORE_CACHE_SIZE": "1G"}
    )
    assert dry.returncode == 0, dry.stderr
    before = json.loads(dry.stdout)
    assert before["cache_evicted_bytes"] == 0
    assert before["cache_bytes"] >= 3 << 20
    done = run_cli(["gc", "--cache-only", "--json"], offline)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["cache_evicted_bytes"] >= 2 << 20
    assert doc["cache_bytes"] <= 1 << 20
    # the store was never needed; a whole gc does need it
    assert run_cli(["gc"], offline).returncode == 1
