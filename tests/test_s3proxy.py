"""The counting proxy: exact counts over plain TCP, and S3 egress through SeaweedFS."""

from __future__ import annotations

import asyncio
import os
import urllib.error
import urllib.request

import pytest
from s3proxy import CountingProxy
from s3server import SeaweedS3Server

from blobstore.config import S3Config
from blobstore.s3store import S3ObjectStore
from blobstore.stores import parse_s3_url

pytestmark = pytest.mark.anyio


async def test_counts_bytes_both_ways() -> None:
    payload = os.urandom(3 << 20)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        writer.write(payload)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with CountingProxy("127.0.0.1", port) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"hello")
            await writer.drain()
            received = await reader.read()
            writer.close()
            await writer.wait_closed()
            assert received == payload
            assert proxy.bytes_to_client == len(payload)
            assert proxy.bytes_to_server == 5
            assert proxy.connections == 1
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.s3
async def test_s3_egress_close_to_object_bytes(s3_env: SeaweedS3Server) -> None:
    bucket, prefix = parse_s3_url(s3_env.bucket_url())
    objects = {f"chunks/{i:02x}/c{i}": os.urandom(1 << 20) for i in range(8)}
    async with CountingProxy.to_endpoint(s3_env.endpoint) as proxy:
        async with S3ObjectStore(
            bucket, prefix, S3Config.from_env(endpoint_url=proxy.endpoint)
        ) as store:
            for key, data in objects.items():
                await store.put(key, data)
            assert proxy.bytes_to_server >= 8 << 20
            proxy.reset()
            for key, data in objects.items():
                assert await store.get(key) == data
        unique = sum(map(len, objects.values()))
        assert unique <= proxy.bytes_to_client <= 1.05 * unique


@pytest.mark.s3
def test_in_thread_for_sync_callers(s3_server: SeaweedS3Server) -> None:
    with CountingProxy.to_endpoint(s3_server.endpoint).in_thread() as proxy:
        try:
            urllib.request.urlopen(proxy.endpoint + "/", timeout=5).close()
        except urllib.error.HTTPError as exc:  # anonymous request: 403, still a response
            exc.close()
        assert proxy.bytes_to_client > 0
        assert proxy.connections == 1
