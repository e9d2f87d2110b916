"""S3 spans read by worker threads (blobstore/httpranges.py) over HTTPS: a
TLS front (a throwaway CA) before SeaweedFS, as real S3 endpoints are."""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketStream
from anyio.streams.tls import TLSListener, TLSStream
from certs import make_ca, make_leaf
from helpers import random_bytes
from s3proxy import CountingProxy
from s3server import SeaweedS3Server

from blobstore import httpranges
from blobstore.config import S3Config
from blobstore.errors import StoreUnavailable
from blobstore.ids import hash_bytes
from blobstore.manifest import ChunkRef
from blobstore.objectstore import pack_key
from blobstore.origin import OriginSource
from blobstore.s3store import S3ObjectStore
from blobstore.source import ChunkData
from blobstore.stores import parse_s3_url

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def tls_front(upstream: tuple[str, int], cert: Path, key: Path) -> AsyncIterator[int]:
    """A TLS-terminating TCP proxy on 127.0.0.1 to ``upstream``; yields its port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    listener = TLSListener(
        await anyio.create_tcp_listener(local_host="127.0.0.1"), context, standard_compatible=False
    )

    async def pump(source: TLSStream | SocketStream, sink: TLSStream | SocketStream) -> None:
        try:
            async for data in source:
                await sink.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, ssl.SSLError, OSError):
            pass

    async def handle(client: TLSStream) -> None:
        async with client, await anyio.connect_tcp(*upstream) as server:
            async with anyio.create_task_group() as tg:
                tg.start_soon(pump, server, client)
                await pump(client, server)
                tg.cancel_scope.cancel()

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield listener.listener.extra(SocketAttribute.local_port)
        tg.cancel_scope.cancel()


@pytest.mark.s3
async def test_spans_over_https_are_read_by_threads_and_checked_against_the_ca(
    s3_env: SeaweedS3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = make_ca(tmp_path, "ca")
    leaf = make_leaf(tmp_path, "s3", ca)
    chunks = [random_bytes(300 << 10, f"tls-{i}") for i in range(6)]
    pack = b"".join(chunks)
    pack_id = hash_bytes(pack)
    refs, offset = [], 0
    for data in chunks:
        refs.append(ChunkRef(hash_bytes(data), len(data), pack_id, offset))
        offset += len(data)
    host, port = s3_env.endpoint.removeprefix("http://").split(":")
    bucket, prefix = parse_s3_url(s3_env.bucket_url())
    monkeypatch.setenv("AWS_CA_BUNDLE", str(ca[0]))  # every request trusts it
    async with tls_front((host, int(port)), *leaf) as front:
        endpoint = f"https://127.0.0.1:{front}"
        async with S3ObjectStore(bucket, prefix, S3Config.from_env(endpoint_url=endpoint)) as store:
            await store.put(pack_key(pack_id), pack)
            ranges = await store.threaded_ranges(pack_key(pack_id))
            assert ranges is not None
            got: dict[ChunkRef, bytes] = {}

            async def sink(ref: ChunkRef, data: ChunkData) -> None:
                got[ref] = bytes(data)

            origin = OriginSource(store)
            assert await origin.fetch(refs, sink) == []
            assert got == {r: chunks[i] for i, r in enumerate(refs)}
            assert origin.requests == 1  # one ranged GET for the whole pack
            url = store._live.presigned_get(f"{prefix}/{pack_key(pack_id)}", 60)
        # A pool that does not trust the throwaway CA refuses the endpoint, in one line.
        untrusting = httpranges.for_endpoint(
            "s3://test", endpoint, connect_timeout=2, read_timeout=5, ca_bundle=None
        )
        assert untrusting is not None
        with pytest.raises(StoreUnavailable, match="certificate") as info:
            await anyio.to_thread.run_sync(untrusting.open, url, "k", 0, 100)
        assert "\n" not in str(info.value)
        untrusting.close()


@pytest.mark.s3
async def test_requests_go_through_an_http_proxy(
    s3_env: SeaweedS3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY: every request is sent to the proxy in absolute form (the
    counting proxy forwards to SeaweedFS, which serves absolute targets), and
    spans take the loop's path; NO_PROXY naming the host bypasses it."""
    bucket, prefix = parse_s3_url(s3_env.bucket_url())
    data = random_bytes(200 << 10, "proxied")
    async with CountingProxy.to_endpoint(s3_env.endpoint) as proxy:
        proxy.http = True
        monkeypatch.setenv("HTTP_PROXY", proxy.endpoint)
        monkeypatch.setenv("NO_PROXY", "example.com")
        async with S3ObjectStore(bucket, prefix, S3Config.from_env()) as store:
            await store.put("packs/ab/p", data)
            assert await store.get("packs/ab/p") == data
            assert b"".join([b async for b in store.get_range("packs/ab/p", 5, 100)]) == data[5:105]
            assert await store.threaded_ranges("packs/ab/p") is None
        assert proxy.requests["PUT"] == 1
        assert proxy.requests["GET"] == 2
        proxy.reset()
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        async with S3ObjectStore(bucket, prefix, S3Config.from_env()) as store:
            assert await store.get("packs/ab/p") == data
            assert await store.threaded_ranges("packs/ab/p") is not None
        assert proxy.connections == 0


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"HTTP_PROXY": "http://p:3128"},
        {"http_proxy": "p:3128", "HTTP_PROXY": "http://other:1"},
        {"HTTPS_PROXY": "http://p:3128"},
        {"HTTP_PROXY": "http://p:3128", "NO_PROXY": "*"},
        {"HTTP_PROXY": "http://p:3128", "no_proxy": "s3.example.com"},
        {"HTTP_PROXY": "http://p:3128", "NO_PROXY": ".example.com, other"},
        {"HTTP_PROXY": "http://p:3128", "NO_PROXY": "example.com:9000"},
        {"HTTP_PROXY": "http://p:3128", "NO_PROXY": "example.com:8333"},
        {"HTTP_PROXY": "http://p:3128", "NO_PROXY": "ample.com"},
        {"HTTP_PROXY": "http://p:3128", "REQUEST_METHOD": "GET"},
    ],
)
@pytest.mark.parametrize(
    "endpoint", ["http://s3.example.com:8333", "https://s3.example.com", "http://127.0.0.1:1"]
)
def test_proxy_choice_is_urllib_s(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], endpoint: str
) -> None:
    import urllib.request

    for name in list(os.environ):
        if name.lower().endswith("_proxy") or name == "REQUEST_METHOD":
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parts = urlsplit(endpoint)
    expected = urllib.request.getproxies().get(parts.scheme)
    if expected and urllib.request.proxy_bypass(parts.netloc):
        expected = None
    if expected and "://" not in expected:
        expected = f"http://{expected}"
    assert httpranges.proxy_for(endpoint) == expected
