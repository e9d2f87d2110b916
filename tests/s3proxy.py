"""A counting TCP proxy to put in front of the S3 server (plain http).

It measures S3 egress at the store side: ``bytes_to_client`` is every byte the
server sent back, i.e. response bodies *plus* HTTP status lines and headers
(~300 bytes per request against SeaweedFS). Counting whole streams keeps the
proxy protocol-agnostic; a budget such as "S3 sent <= 1.05 x unique bytes" has
ample room for that overhead with ~1 MiB chunks.

    async with CountingProxy.to_endpoint(s3.endpoint) as proxy:    # inside an event loop
        store = S3ObjectStore(bucket, endpoint_url=proxy.endpoint)
    with CountingProxy.to_endpoint(s3.endpoint).in_thread() as proxy:  # from sync code
        ...
    proxy.bytes_to_client, proxy.bytes_to_server, proxy.connections
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Self
from urllib.parse import urlsplit

from blobstore.resource import AsyncResource

_BUFFER = 256 * 1024


class CountingProxy(AsyncResource):
    def __init__(self, upstream_host: str, upstream_port: int, listen_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.listen_host = listen_host
        self.port = 0
        self.bytes_to_client = 0
        self.bytes_to_server = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def to_endpoint(cls, endpoint: str) -> CountingProxy:
        """A proxy for ``http://host:port``."""
        parts = urlsplit(endpoint)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"need an http://host:port endpoint, got {endpoint!r}")
        return cls(parts.hostname, parts.port)

    @property
    def endpoint(self) -> str:
        return f"http://{self.listen_host}:{self.port}"

    def reset(self) -> None:
        """Zero the counters (e.g. after uploading test data)."""
        self.bytes_to_client = self.bytes_to_server = self.connections = 0

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.listen_host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    @contextlib.contextmanager
    def in_thread(self) -> Iterator[Self]:
        """Run the proxy on its own event loop in a daemon thread (for sync callers)."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="s3proxy", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.__aenter__(), loop).result(timeout=10)
            try:
                yield self
            finally:
                asyncio.run_coroutine_threadsafe(self.aclose(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(
                self._pump(client_r, server_w, to_client=False),
                self._pump(server_r, client_w, to_client=True),
            )
        finally:
            for writer in (client_w, server_w):
                writer.close()
                with contextlib.suppress(OSError, asyncio.CancelledError):
                    await writer.wait_closed()
            self._tasks.discard(task)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, to_client: bool
    ) -> None:
        try:
            while data := await reader.read(_BUFFER):
                if to_client:
                    self.bytes_to_client += len(data)
                else:
                    self.bytes_to_server += len(data)
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            writer.close()  # a reset on one side ends both directions
