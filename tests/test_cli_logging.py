"""--log-level, --log-format text|json, -v; the daemon logs its start and stop at INFO."""

from __future__ import annotations

import io
import json
import logging
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import BLOBSTORE, cli_env, run_cli, write

from blobstore.errors import ConfigError
from blobstore.logs import configure


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_carry_level_logger_message_extras_and_tracebacks() -> None:
    out = io.StringIO()
    assert configure(fmt="json", level="debug", stream=out) == logging.DEBUG
    log = logging.getLogger("blobstore.test")
    log.info("pulled %s", "ref", extra={"bytes": 42})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["level"] == "info"
    assert first["logger"] == "blobstore.test"
    assert first["msg"] == "pulled ref"
    assert first["bytes"] == 42
    assert first["ts"].endswith("Z")
    assert second["level"] == "error"
    assert "ValueError: boom" in second["exc"]


@pytest.mark.usefixtures("restore_logging")
def test_levels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BLOBSTORE_LOG_LEVEL", raising=False)
    assert configure() == logging.WARNING
    assert configure(verbose=1) == logging.INFO
    assert configure(verbose=5) == logging.DEBUG
    assert configure(default=logging.INFO) == logging.INFO  # the daemon's
    assert configure(default=logging.INFO, verbose=1) == logging.INFO  # -v: at least INFO
    assert configure(level="error", verbose=2) == logging.ERROR  # named wins
    monkeypatch.setenv("BLOBSTORE_LOG_LEVEL", "debug")
    assert configure() == logging.DEBUG
    assert configure(level="warning") == logging.WARNING  # the flag wins over env
    # a second call replaces its handler: one line per record, not two
    out = io.StringIO()
    configure(stream=io.StringIO())
    configure(stream=out)
    logging.getLogger("blobstore.x").warning("once")
    assert out.getvalue() == "blobstore: WARNING: once\n"
    monkeypatch.setenv("BLOBSTORE_LOG_FORMAT", "yaml")
    with pytest.raises(ConfigError, match="log format"):
        configure()


def test_cli_log_flags(tmp_path: Path) -> None:
    env = cli_env((tmp_path / "store").as_uri(), tmp_path / "cache")
    write(tmp_path / "src" / "f", b"x")
    quiet = run_cli(["push", tmp_path / "src", "r"], env)
    assert quiet.stderr == ""
    verbose = run_cli(["--log-format", "json", "push", "-v", tmp_path / "src", "s"], env)
    assert verbose.returncode == 0, verbose.stderr
    lines = [json.loads(line) for line in verbose.stderr.splitlines()]
    assert lines
    assert {line["level"] for line in lines} <= {"info", "warning"}
    assert all(line["logger"].startswith("blobstore") for line in lines)
    bad = run_cli(["ls"], {**env, "BLOBSTORE_LOG_LEVEL": "chatty"})
    assert bad.returncode == 1
    assert bad.stderr.startswith("blobstore: error: unknown log level 'chatty'")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_daemon_logs_start_and_stop_at_info(fmt: str, tmp_path: Path) -> None:
    env = cli_env((tmp_path / "store").as_uri(), tmp_path / "cache")
    proc = subprocess.Popen(
        [BLOBSTORE, "--log-format", fmt, "daemon", "--listen", "127.0.0.1:0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "ready"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    lines = err.splitlines()
    if fmt == "json":
        records = [json.loads(line) for line in lines]
        infos = [r["msg"] for r in records if r["level"] == "info"]
    else:
        infos = [line.removeprefix("blobstore: INFO: ") for line in lines if "INFO:" in line]
    assert any("serving region 'default'" in msg for msg in infos), err
    assert any(msg.endswith("stopping") for msg in infos), err
