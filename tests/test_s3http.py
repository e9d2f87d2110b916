"""Retries of the S3 request path (blobstore/s3http.py) as botocore's standard
mode: a throttled (503 SlowDown) upload is repeated and succeeds, one that stays
throttled ends in one line after ``max_attempts``; a kept-alive connection the
server closed is replaced without an error. Real SeaweedFS behind tests/s3proxy.py."""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import anyio
import pytest
from helpers import random_bytes
from s3proxy import CountingProxy, Fault
from s3server import SeaweedS3Server

from blobstore.config import S3Config
from blobstore.errors import StoreUnavailable
from blobstore.s3store import S3ObjectStore
from blobstore.stores import parse_s3_url

pytestmark = pytest.mark.anyio

KEY = "packs/ab/pack"


@asynccontextmanager
async def proxied(
    s3: SeaweedS3Server, **options: Any
) -> AsyncIterator[tuple[S3ObjectStore, CountingProxy]]:
    bucket, prefix = parse_s3_url(s3.bucket_url())
    async with CountingProxy.to_endpoint(s3.endpoint) as proxy:
        proxy.http = True
        settings = S3Config.from_env(endpoint_url=proxy.endpoint)
        async with S3ObjectStore(bucket, prefix, settings, **options) as store:
            yield store, proxy


@pytest.mark.s3
async def test_throttled_upload_is_retried(s3_env: SeaweedS3Server) -> None:
    data = random_bytes(1 << 20, "throttled")
    async with proxied(s3_env) as (store, proxy):
        twice = proxy.arm(Fault("reject_upload", "PUT", KEY, at=64 << 10, times=2))
        await store.put(KEY, data)
        assert twice.hits == 2
        assert await store.get(KEY) == data


@pytest.mark.s3
async def test_always_throttled_upload_is_one_line_after_max_attempts(
    s3_env: SeaweedS3Server,
) -> None:
    data = random_bytes(1 << 20, "always")
    async with proxied(s3_env, max_attempts=3) as (store, proxy):
        always = proxy.arm(Fault("reject_upload", "PUT", KEY, at=64 << 10))
        with anyio.fail_after(60), pytest.raises(StoreUnavailable) as info:
            await store.put(KEY, data)
        assert always.hits == 3
        assert "\n" not in str(info.value)
        assert KEY in str(info.value)
        proxy.disarm()
        await store.put(KEY, data)  # the store is still usable
        assert await store.get(KEY) == data


@pytest.mark.s3
async def test_requests_reuse_connections(s3_env: SeaweedS3Server) -> None:
    """Small requests one after another, found or not, share one kept-alive connection."""
    async with proxied(s3_env) as (store, proxy):
        opened = proxy.connections
        for i in range(20):
            await store.put(f"refs/r{i}", b"x")
            assert await store.exists(f"refs/r{i}")
            assert not await store.exists(f"refs/absent{i}")  # a 404 keeps it too
        assert len([info async for info in store.list("refs/")]) == 20
        assert proxy.connections - opened <= 1
        assert proxy.requests["PUT"] == 20
        assert proxy.requests["HEAD"] == 40 + 1  # and the bucket check at open


@pytest.mark.s3
async def test_signed_payloads_are_accepted(s3_env: SeaweedS3Server) -> None:
    """sign_payload=True: every body's SHA-256 is signed (SeaweedFS checks the
    signature over it, though not the hash against the body: tested here by hand)."""
    bucket, _ = parse_s3_url(s3_env.bucket_url(create=False))
    data = random_bytes(300 << 10, "signed")
    settings = S3Config.from_env()
    async with S3ObjectStore(bucket, "p", settings, create_bucket=True, sign_payload=True) as store:
        await store.put(KEY, data)
        await store.put_if("refs/a", b"1", None)
        await store.put_if("refs/a", b"2", b"1")
        assert await store.get(KEY) == data
        assert await store.get("refs/a") == b"2"
        assert [i.key async for i in store.list("")] == [KEY, "refs/a"]
        await store.delete(KEY)
        assert not await store.exists(KEY)


@pytest.mark.s3
async def test_keys_with_reserved_and_non_ascii_characters(s3_env: SeaweedS3Server) -> None:
    """Paths are quoted as signed and listed keys are URL-decoded (encoding-type=url)."""
    keys = [
        "refs/with space",
        "refs/plus+sign",
        "refs/pct%41",
        "refs/amp&eq=semi;colon:at@",
        "refs/tilde~star*quote'(paren)",
        "refs/ünïcødé/漢字",
        "refs/comma,dollar$bang!",
    ]
    bucket, prefix = parse_s3_url(s3_env.bucket_url())
    async with S3ObjectStore(bucket, prefix, S3Config.from_env()) as store:
        for i, key in enumerate(keys):
            await store.put(key, str(i).encode())
        for i, key in enumerate(keys):
            assert await store.get(key) == str(i).encode()
            assert await store.exists(key)
        assert sorted([info.key async for info in store.list("refs/")]) == sorted(keys)
        assert [info.key async for info in store.list("refs/plus+")] == ["refs/plus+sign"]
        await store.delete(keys[0])
        assert not await store.exists(keys[0])


class _RegionalBucket(http.server.BaseHTTPRequestHandler):
    """A bucket that lives in eu-west-1: a request signed for another region gets
    301 with ``x-amz-bucket-region``, as AWS answers (no network to AWS in tests)."""

    seen: ClassVar[list[tuple[str, str, str]]] = []

    def _answer(self) -> None:
        region = self.headers.get("Authorization", "").split("/")[2]
        self.seen.append((self.command, self.path, region))
        status = 200 if region == "eu-west-1" else 301
        self.send_response(status)
        self.send_header("x-amz-bucket-region", "eu-west-1")
        body = b"" if self.command == "HEAD" else b"ref-bytes"
        self.send_header("Content-Length", str(len(body) if status == 200 else 0))
        self.end_headers()
        if status == 200:
            self.wfile.write(body)

    do_HEAD = do_GET = _answer

    def log_message(self, *args: object) -> None:
        pass


async def test_a_bucket_in_another_region_is_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    """No endpoint configured (AWS): the bucket's region from the redirect is used
    for every request after the first, as botocore's redirector does."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RegionalBucket)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    regions: list[str] = []

    def fake_aws(region: str) -> str:
        regions.append(region)
        return f"http://127.0.0.1:{server.server_address[1]}"

    monkeypatch.setattr("blobstore.s3store._aws_endpoint", fake_aws)
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    try:
        settings = S3Config(region="us-east-1", addressing_style="path")
        async with S3ObjectStore("bucket", "p", settings) as store:
            assert await store.get("refs/a") == b"ref-bytes"
    finally:
        server.shutdown()
        server.server_close()
    assert regions == ["us-east-1", "eu-west-1"]
    assert _RegionalBucket.seen == [
        ("HEAD", "/bucket", "us-east-1"),
        ("HEAD", "/bucket", "eu-west-1"),
        ("GET", "/bucket/p/refs/a", "eu-west-1"),
    ]
