"""Conformance tests for every ``ObjectStore`` back-end (file and real SeaweedFS S3)."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import anyio
import pytest
from s3server import ACCESS_KEY, REGION, SECRET_KEY, SeaweedS3Server

from blobstore.atomic import tmp_name
from blobstore.config import S3Config
from blobstore.errors import (
    BadInput,
    ConfigError,
    Conflict,
    ObjectMissing,
    StoreUnavailable,
)
from blobstore.filestore import FileObjectStore
from blobstore.objectstore import ObjectStore
from blobstore.s3store import S3ObjectStore, read_profile
from blobstore.stores import open_object_store, parse_file_url, parse_s3_url

pytestmark = pytest.mark.anyio

# SeaweedFS queues conditional writes on one key with ~1 s steps, so keep the race small.
RACERS = 8
BAD_KEYS = ["", "/abs", "a/../b", "..", "a//b", "a/", "./a", "a/.hidden", "a\\b", "a\x00b"]


async def _keys(store: ObjectStore, prefix: str) -> list[str]:
    return sorted([info.key async for info in store.list(prefix)])


async def test_put_get_exists_delete(object_store_url: str) -> None:
    async with open_object_store(object_store_url) as store:
        assert not await store.exists("refs/a")
        await store.put("refs/a", b"one")
        assert await store.exists("refs/a")
        assert await store.get("refs/a") == b"one"
        await store.put("refs/a", b"two")  # overwrite
        assert await store.get("refs/a") == b"two"
        await store.put("empty", b"")
        assert await store.get("empty") == b""
        await store.delete("refs/a")
        assert not await store.exists("refs/a")
        await store.delete("refs/a")  # deleting a missing key is fine


async def test_missing_key_raises_object_missing(object_store_url: str) -> None:
    async with open_object_store(object_store_url) as store:
        with pytest.raises(ObjectMissing, match="nothere"):
            await store.get("chunks/ab/nothere")
        await store.put("dir/file", b"x")
        with pytest.raises(ObjectMissing):
            await store.get("dir")  # a "directory" is not an object


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_bad_key_raises_bad_input(object_store_url: str, key: str) -> None:
    async with open_object_store(object_store_url) as store:
        with pytest.raises(BadInput):
            await store.put(key, b"x")
        with pytest.raises(BadInput):
            await store.get(key)


async def test_list_prefixes_and_sizes(object_store_url: str) -> None:
    async with open_object_store(object_store_url) as store:
        keys = [
            "chunks/ab/ab01",
            "chunks/ab/ab02",
            "chunks/cd/cd01",
            "manifests/m1",
            "refs/apps/x/data",
            "refs/apps/y",
            "refs/apple",
        ]
        for i, key in enumerate(keys):
            await store.put(key, b"z" * i)
        assert await _keys(store, "") == sorted(keys)
        assert await _keys(store, "chunks/") == keys[:3]
        assert await _keys(store, "chunks/ab/") == keys[:2]
        assert await _keys(store, "refs/app") == ["refs/apple", "refs/apps/x/data", "refs/apps/y"]
        assert await _keys(store, "refs/apps/") == ["refs/apps/x/data", "refs/apps/y"]
        assert await _keys(store, "nothing/") == []
        infos = {info.key: info async for info in store.list("")}
        assert infos["refs/apps/y"].size == 5
        assert abs(infos["refs/apps/y"].mtime - time.time()) < 300


async def test_put_if_create_replace_conflict(object_store_url: str) -> None:
    async with open_object_store(object_store_url) as store:
        await store.put_if("refs/r", b"v1", None)
        with pytest.raises(Conflict):
            await store.put_if("refs/r", b"v2", None)
        with pytest.raises(Conflict):
            await store.put_if("refs/r", b"v2", b"wrong")
        await store.put_if("refs/r", b"v2", b"v1")
        assert await store.get("refs/r") == b"v2"
        with pytest.raises(Conflict):
            await store.put_if("refs/missing", b"v", b"v0")


async def test_concurrent_put_if_exactly_one_wins(object_store_url: str) -> None:
    async with open_object_store(object_store_url) as store:
        for expected in (None, b"base"):
            key = f"refs/race-{expected!r}"
            if expected is not None:
                await store.put(key, expected)
            winners: list[bytes] = []
            losers: list[bytes] = []

            async def contend(
                value: bytes,
                key: str = key,
                expected: bytes | None = expected,
                winners: list[bytes] = winners,
                losers: list[bytes] = losers,
            ) -> None:
                try:
                    await store.put_if(key, value, expected)
                    winners.append(value)
                except Conflict:
                    losers.append(value)

            async with anyio.create_task_group() as tg:
                for i in range(RACERS):
                    tg.start_soon(contend, f"writer-{i}".encode())
            assert len(winners) == 1, winners
            assert len(losers) == RACERS - 1
            assert await store.get(key) == winners[0]


async def test_large_object_and_many_concurrent_puts(object_store_url: str) -> None:
    big = os.urandom(16 << 20)
    async with open_object_store(object_store_url) as store:
        await store.put("chunks/bi/big", big)
        assert await store.get("chunks/bi/big") == big

        async def put_one(i: int) -> None:
            await store.put(f"chunks/{i % 256:02x}/obj-{i}", i.to_bytes(4, "big") * 1000)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for i in range(200):
                    tg.start_soon(put_one, i)
        listed = await _keys(store, "chunks/")
        assert len(listed) == 201
        assert await store.get("chunks/07/obj-7") == (7).to_bytes(4, "big") * 1000


async def test_file_store_never_lists_temp_files(tmp_path: Path) -> None:
    async with FileObjectStore(tmp_path / "s") as store:
        await store.put("refs/a", b"1")
        await store.put_if("refs/b", b"2", None)
        # A crash mid-write leaves a temp file behind; it must stay invisible.
        (tmp_path / "s" / "refs" / ".tmp-deadbeef").write_bytes(b"half")
        assert await _keys(store, "") == ["refs/a", "refs/b"]
        assert sorted(p.name for p in (tmp_path / "s" / "refs").iterdir()) == [
            ".tmp-deadbeef",
            "a",
            "b",
        ]


async def test_file_store_removes_only_old_temp_files(tmp_path: Path) -> None:
    """Temp files of killed writers, named by ``atomic.tmp_name`` or the older
    ``.tmp-<hex>`` scheme, are removed once old; young ones and keys stay."""
    root = tmp_path / "s"
    async with FileObjectStore(root) as store:
        await store.put("refs/a", b"1")
        old_new_style = root / "refs" / tmp_name("a")
        old_legacy = root / "refs" / ".tmp-0123abcd"
        young = root / "refs" / tmp_name("b")
        for path in (old_new_style, old_legacy, young):
            path.write_bytes(b"half")
        long_ago = time.time() - 7200
        for path in (old_new_style, old_legacy):
            os.utime(path, (long_ago, long_ago))
        assert await store.remove_stale_temp(3600) == (2, 8)
        assert sorted(p.name for p in (root / "refs").iterdir()) == sorted(["a", young.name])
        assert await store.get("refs/a") == b"1"


async def test_file_store_concurrent_processes_put_if(tmp_path: Path) -> None:
    """flock makes put_if safe across processes, not only across tasks."""
    root = tmp_path / "s"
    script = (
        "import anyio, sys\n"
        "from blobstore.filestore import FileObjectStore\n"
        "from blobstore.errors import Conflict\n"
        "async def main():\n"
        "    async with FileObjectStore(__import__('pathlib').Path(sys.argv[1])) as s:\n"
        "        try:\n"
        "            await s.put_if('refs/p', sys.argv[2].encode(), None)\n"
        "            print('won')\n"
        "        except Conflict:\n"
        "            print('lost')\n"
        "anyio.run(main)\n"
    )
    outputs: list[str] = []

    async def run(name: str) -> None:
        result = await anyio.run_process([sys.executable, "-c", script, str(root), name])
        outputs.append(result.stdout.decode().strip())

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(run, f"p{i}")
    assert sorted(outputs) == ["lost"] * 5 + ["won"]


async def test_file_store_disk_error_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StoreUnavailable) as info:
        async with FileObjectStore(tmp_path / "file" / "sub"):
            pass
    assert "\n" not in str(info.value)


@pytest.mark.s3
async def test_s3_unreachable_endpoint_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = S3ObjectStore(
        "bucket", settings=S3Config(f"http://127.0.0.1:{port}", region="us-east-1")
    )
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="cannot reach S3 endpoint") as info:
        async with store:
            pass
    assert time.monotonic() - started < 10
    assert "\n" not in str(info.value)
    assert f"127.0.0.1:{port}" in str(info.value)


@pytest.mark.s3
async def test_s3_missing_bucket_is_clear(s3_env: SeaweedS3Server) -> None:
    url = s3_env.bucket_url(create=False)
    bucket, _ = parse_s3_url(url)
    with pytest.raises(StoreUnavailable, match=f"bucket {bucket} does not exist"):
        async with open_object_store(url):
            pass
    async with S3ObjectStore(bucket, "p", S3Config.from_env(), create_bucket=True) as store:
        await store.put("k", b"v")
    async with open_object_store(url.replace("/prefix", "/p")) as store:
        assert await store.get("k") == b"v"
        assert await _keys(store, "") == ["k"]


@pytest.mark.s3
async def test_s3_store_requires_open(s3_env: SeaweedS3Server) -> None:
    store = S3ObjectStore("whatever")
    with pytest.raises(StoreUnavailable, match="not open"):
        await store.get("k")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "empty"),
        ("http://x/y", "unsupported"),
        ("file://relative/dir", "absolute path"),
        ("s3://", "bucket"),
        ("s3://Bad_Bucket/p", "bucket"),
        ("s3://bucket/a/../b", "prefix"),
    ],
)
def test_bad_urls_raise_config_error(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_object_store(url)


def test_url_parsing() -> None:
    assert parse_s3_url("s3://my-bucket/some/prefix/") == ("my-bucket", "some/prefix")
    assert parse_s3_url("s3://my-bucket") == ("my-bucket", "")
    assert parse_file_url("file:///var/x") == Path("/var/x")
    assert parse_file_url("file://localhost/var/x") == Path("/var/x")
    assert parse_file_url("./rel/dir") == Path.cwd() / "rel/dir"


def _aws_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, profile: str) -> None:
    """Only the AWS config and credentials files in ``tmp_path`` describe S3:
    profile ``sw`` (``profile`` adds its settings), no AWS_* variable left."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    config = tmp_path / "aws-config"
    config.write_text(f"[profile sw]\nregion = {REGION}\n{profile}")
    credentials = tmp_path / "aws-credentials"
    credentials.write_text(
        f"[sw]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))


@pytest.mark.s3
@pytest.mark.parametrize("style", ["path", "virtual", None])
async def test_s3_profile_endpoint_and_addressing_style(
    s3_server: SeaweedS3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    style: str | None,
) -> None:
    """A profile's endpoint_url and s3.addressing_style are honoured; without a
    style a custom endpoint gets path style (an IP endpoint is always
    addressed by path, so virtual still works against SeaweedFS)."""
    s3 = f"s3 =\n    addressing_style = {style}\n" if style else ""
    _aws_profile(tmp_path, monkeypatch, f"endpoint_url = {s3_server.endpoint}\n{s3}")
    url = s3_server.bucket_url()
    async with open_object_store(url, S3Config.from_env(profile="sw")) as store:
        assert isinstance(store, S3ObjectStore)
        assert store.endpoint == s3_server.endpoint
        assert store.addressing_style == (style or "path")
        await store.put("refs/a", b"1")
        assert await store.get("refs/a") == b"1"


@pytest.mark.s3
async def test_s3_ignore_configured_endpoint_urls(
    s3_server: SeaweedS3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true: neither AWS_ENDPOINT_URL nor the
    profile's endpoint_url counts, an explicit --endpoint-url still does."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    _aws_profile(tmp_path, monkeypatch, f"endpoint_url = {dead}\n")
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    ignored = S3Config.from_env(profile="sw")
    assert ignored.endpoint_url is None
    resolved = await anyio.to_thread.run_sync(read_profile, ignored)
    assert resolved.endpoint_url is None  # AWS itself, not the profile's
    assert resolved.addressing_style == "auto"
    explicit = S3Config.from_env(endpoint_url=s3_server.endpoint, profile="sw")
    async with open_object_store(s3_server.bucket_url(), explicit) as store:
        await store.put("refs/a", b"1")
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "false")
    assert S3Config.from_env(profile="sw").endpoint_url == dead


@pytest.mark.s3
@pytest.mark.parametrize(
    ("profile", "settings", "match"),
    [
        ("addressing_style = sideways", {}, "s3.addressing_style 'sideways'"),
        ("", {"profile": "nope"}, "nope"),
        ("endpoint_url = localhost:9000", {}, "endpoint_url of AWS profile sw"),
    ],
)
async def test_s3_bad_profile_is_one_config_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    profile: str,
    settings: dict[str, str],
    match: str,
) -> None:
    section = f"s3 =\n    {profile}\n" if profile.startswith("addressing") else f"{profile}\n"
    _aws_profile(tmp_path, monkeypatch, section)
    config = S3Config.from_env(profile=settings.get("profile", "sw"))
    with pytest.raises(ConfigError, match=match) as info:
        async with open_object_store("s3://bucket", config):
            pass
    assert "\n" not in str(info.value)
