"""Object-store faults end in one typed error, in bounded time, with nothing left running.

Real SeaweedFS behind the fault-injecting proxy (tests/s3proxy.py): a body cut
short, a body trickling at 2 KiB/s, an upload reset half way; and a bad
``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import assert_one_line_error, cli_env, random_bytes, run_cli
from s3proxy import CountingProxy, Fault
from s3server import ACCESS_KEY, REGION, SECRET_KEY, SeaweedS3Server

from blobstore.config import S3Config
from blobstore.errors import ConfigError, StoreUnavailable
from blobstore.s3store import S3ObjectStore
from blobstore.stores import open_object_store, parse_s3_url

pytestmark = pytest.mark.anyio

KEY = "chunks/ab/object"


@asynccontextmanager
async def proxied_store(
    s3: SeaweedS3Server, **options: Any
) -> AsyncIterator[tuple[S3ObjectStore, CountingProxy]]:
    bucket, prefix = parse_s3_url(s3.bucket_url())
    async with CountingProxy.to_endpoint(s3.endpoint) as proxy:
        proxy.http = True  # faults armed later apply to pooled connections too
        async with S3ObjectStore(
            bucket, prefix, S3Config.from_env(endpoint_url=proxy.endpoint), **options
        ) as store:
            yield store, proxy


@asynccontextmanager
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Collect what the event loop would log ("Task exception was never retrieved")."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        yield seen
        gc.collect()  # an unretrieved task exception is reported when the task is freed
        await anyio.sleep(0.2)
        gc.collect()
    finally:
        loop.set_exception_handler(previous)


@pytest.mark.s3
async def test_truncated_body_is_retried_then_one_line(s3_env: SeaweedS3Server) -> None:
    data = random_bytes(300 << 10, "truncated")
    async with proxied_store(s3_env) as (store, proxy):
        await store.put(KEY, data)
        once = proxy.arm(Fault("truncate", "GET", KEY, at=1000, times=1))
        assert await store.get(KEY) == data  # a GET is safe to repeat
        assert once.hits == 1
        always = proxy.arm(Fault("truncate", "GET", KEY, at=1000))
        with pytest.raises(StoreUnavailable, match="cut short") as info:
            await store.get(KEY)
        assert always.hits >= 2
        assert "\n" not in str(info.value)


@pytest.mark.s3
async def test_trickling_body_hits_the_request_deadline(s3_env: SeaweedS3Server) -> None:
    """2 KiB/s would take ~1 min for this body; the deadline is 1 s + size at 256 KiB/s."""
    data = random_bytes(128 << 10, "slow")
    options = {"request_deadline": 1.0, "min_bytes_per_second": 256 << 10}
    async with proxied_store(s3_env, **options) as (store, proxy):
        await store.put(KEY, data)
        proxy.arm(Fault("trickle", "GET", KEY, rate=2048))
        with anyio.fail_after(60):  # a watchdog only: without a deadline this hangs
            with pytest.raises(StoreUnavailable, match="deadline") as info:
                await store.get(KEY)
        assert "\n" not in str(info.value)
        with anyio.fail_after(60):  # the streaming ranged read has the same bound
            with pytest.raises(StoreUnavailable, match="deadline"):
                async for _block in store.get_range(KEY, 1000, len(data) - 1000):
                    pass
        for i in range(40):
            await store.put(f"refs/r{i:02d}", b"x")
        proxy.arm(Fault("trickle", "GET", "list-type", rate=2048))  # ~8 KB of listing
        with anyio.fail_after(60), pytest.raises(StoreUnavailable, match="list refs/"):
            _ = [info async for info in store.list("refs/")]
        proxy.disarm()
        assert await store.get(KEY) == data  # the store is still usable
        assert len([info async for info in store.list("refs/")]) == 40
        assert b"".join([b async for b in store.get_range(KEY, 10, 100)]) == data[10:110]


@pytest.mark.s3
async def test_bytearray_body_streams_and_is_retried(s3_env: SeaweedS3Server) -> None:
    """A pack buffer (bytearray) is streamed without a copy, and rewound when an
    upload is reset and botocore repeats it."""
    data = bytearray(random_bytes(3 << 20, "buffer"))
    async with proxied_store(s3_env) as (store, proxy):
        once = proxy.arm(Fault("cut_upload", "PUT", KEY, at=100 << 10, times=1))
        await store.put(KEY, data)
        assert once.hits == 1
        assert await store.get(KEY) == data


@pytest.mark.s3
async def test_interrupted_upload_leaves_no_orphan_task(s3_env: SeaweedS3Server) -> None:
    data = random_bytes(2 << 20, "upload")
    async with loop_errors() as seen:
        async with proxied_store(s3_env) as (store, proxy):
            cut = proxy.arm(Fault("cut_upload", "PUT", KEY, at=64 << 10))
            with pytest.raises(StoreUnavailable) as info:
                await store.put(KEY, data)
            assert cut.hits >= 1
            assert "\n" not in str(info.value)
            proxy.disarm()
            await store.put(KEY, data)
            assert await store.get(KEY) == data
    assert seen == []


@pytest.mark.s3
async def test_upload_past_its_deadline_is_cancelled_cleanly(s3_env: SeaweedS3Server) -> None:
    """The deadline cancels a PUT whose body the server stopped reading: one error,
    no orphan task, and the store still works."""
    data = random_bytes(8 << 20, "stalled")
    options = {"request_deadline": 1.0, "min_bytes_per_second": 16 << 20}
    async with loop_errors() as seen:
        async with proxied_store(s3_env, **options) as (store, proxy):
            proxy.arm(Fault("stall_upload", "PUT", KEY, at=256 << 10))
            with anyio.fail_after(60), pytest.raises(StoreUnavailable, match="deadline"):
                await store.put(KEY, data)
            proxy.disarm()
            await store.put(KEY, data)
            assert await store.get(KEY) == data
    assert seen == []


@pytest.mark.s3
def test_cli_push_through_a_cut_connection_is_one_line(
    s3_server: SeaweedS3Server, tmp_path: Path
) -> None:
    """A real process: no traceback, no "Task exception was never retrieved"."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "w.bin").write_bytes(random_bytes(3 << 20, "cli-cut"))
    with CountingProxy.to_endpoint(s3_server.endpoint).in_thread() as proxy:
        proxy.arm(Fault("cut_upload", "PUT", at=32 << 10))  # chunks or packs
        env = cli_env(
            s3_server.bucket_url(),
            tmp_path / "cache",
            {**s3_server.client_env(), "AWS_ENDPOINT_URL": proxy.endpoint},
        )
        proc = run_cli(["push", tmp_path / "src", "t"], env)
    assert "Task exception" not in proc.stderr
    assert_one_line_error(proc)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("AWS_ENDPOINT_URL", ""),
        ("AWS_ENDPOINT_URL", "localhost:9000"),
        ("AWS_ENDPOINT_URL", "ftp://host"),
        ("AWS_ENDPOINT_URL_S3", "  "),
        ("AWS_ENDPOINT_URL", "http://"),
    ],
)
def test_bad_endpoint_variable_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    for var in list(os.environ):
        if var.startswith("AWS_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name) as info:
        open_object_store("s3://bucket")  # refused before anything is opened
    assert "http://" in str(info.value)  # says what is expected
    assert "\n" not in str(info.value)


def test_cli_bad_endpoint_variable_is_one_line(tmp_path: Path) -> None:
    env = cli_env(
        "s3://some-bucket/p",
        tmp_path / "cache",
        {
            "AWS_ENDPOINT_URL": "localhost:9000",
            "AWS_ACCESS_KEY_ID": "x",
            "AWS_SECRET_ACCESS_KEY": "y",
        },
    )
    assert_one_line_error(run_cli(["ls"], env), "AWS_ENDPOINT_URL", "localhost:9000")


@pytest.mark.s3
def test_cli_endpoint_url_and_profile(s3_server: SeaweedS3Server, tmp_path: Path) -> None:
    """--profile picks the credentials and settings of a profile in a temp
    AWS_CONFIG_FILE; --endpoint-url (before or after the command) wins over the
    profile's dead endpoint_url; an unknown profile is one error line."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = tmp_path / "aws-config"
    config.write_text(
        f"[profile sw]\nregion = {REGION}\nendpoint_url = {dead}\n"
        "s3 =\n    addressing_style = path\n"
    )
    credentials = tmp_path / "aws-credentials"
    credentials.write_text(
        f"[sw]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    )
    env = cli_env(s3_server.bucket_url(), tmp_path / "cache")
    env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(config), AWS_SHARED_CREDENTIALS_FILE=str(credentials))
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"through a profile")
    endpoint = ["--endpoint-url", s3_server.endpoint]
    pushed = run_cli(["--profile", "sw", *endpoint, "push", src, "t"], env)
    assert pushed.returncode == 0, pushed.stderr
    listed = run_cli(["ls", "--profile", "sw", *endpoint], env)
    assert listed.returncode == 0, listed.stderr
    assert "t" in listed.stdout.split()
    assert_one_line_error(run_cli(["--profile", "nope", "ls"], env), "nope")
    assert_one_line_error(run_cli(["--endpoint-url", "localhost:1", "ls"], env), "--endpoint-url")
