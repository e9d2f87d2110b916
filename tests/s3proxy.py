"""A counting TCP proxy to put in front of the S3 server (plain http).

It measures S3 egress at the store side: ``bytes_to_client`` is every byte the
server sent back, i.e. response bodies *plus* HTTP status lines and headers
(~300 bytes per request against SeaweedFS). Counting whole streams keeps the
proxy protocol-agnostic; a budget such as "S3 sent <= 1.05 x unique bytes" has
ample room for that overhead with ~1 MiB chunks.

    async with CountingProxy.to_endpoint(s3.endpoint) as proxy:    # inside an event loop
        store = S3ObjectStore(bucket, settings=S3Config.from_env(endpoint_url=proxy.endpoint))
    with CountingProxy.to_endpoint(s3.endpoint).in_thread() as proxy:  # from sync code
        ...
    proxy.bytes_to_client, proxy.bytes_to_server, proxy.connections

It also injects faults into chosen HTTP exchanges (connections opened while a
fault is armed are parsed as HTTP/1.1; the others stay opaque byte pipes):

    proxy.arm(Fault("truncate", "GET", "/chunks/", at=1000, times=1))  # cut a body short
    proxy.arm(Fault("trickle", "GET", "/chunks/", rate=2048))         # 2 KiB/s body
    proxy.arm(Fault("cut_upload", "PUT", "/chunks/", at=64 << 10))    # reset mid-upload
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Self
from urllib.parse import urlsplit

from blobstore.resource import AsyncResource

_BUFFER = 256 * 1024
_HEADER_LIMIT = 1 << 20
_SLOW_DOWN_XML = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
_SLOW_DOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_SLOW_DOWN_XML), _SLOW_DOWN_XML)
)


@dataclass
class Fault:
    """One fault for requests whose method is ``method`` and whose target contains ``path``.

    - ``truncate``: forward the response headers and ``at`` body bytes, then close;
    - ``trickle``: forward the response body at ``rate`` bytes per second;
    - ``cut_upload``: forward the request headers and ``at`` body bytes, then close
      (only requests with a longer body);
    - ``reject_upload``: after ``at`` request body bytes, answer 503 SlowDown (as S3
      does mid-upload) and close, while the client may still be sending;
    - ``stall_upload``: after ``at`` request body bytes, stop reading (the client's
      writes block until it gives up).

    ``times`` is how many exchanges it hits (None: all); ``hits`` counts them.
    """

    kind: Literal["truncate", "trickle", "cut_upload", "reject_upload", "stall_upload"]
    method: str
    path: str = ""
    at: int = 0
    rate: int = 2048
    times: int | None = None
    hits: int = 0

    def take(self, method: str, target: str, body: int) -> bool:
        if method != self.method or self.path not in target:
            return False
        if self.kind.endswith("_upload") and body <= self.at:
            return False  # the upload would be complete: not an interrupted one
        if self.times is not None and self.hits >= self.times:
            return False
        self.hits += 1
        return True


class _Closed(Exception):
    """A fault closed the connection on purpose."""


class CountingProxy(AsyncResource):
    def __init__(self, upstream_host: str, upstream_port: int, listen_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.listen_host = listen_host
        self.port = 0
        self.bytes_to_client = 0
        self.bytes_to_server = 0
        self.connections = 0
        self.requests: Counter[str] = Counter()
        """HTTP requests by method (counted only in HTTP mode: ``http`` or a fault armed)."""
        self.exchanges: list[tuple[str, str]] = []
        """(method, target) of each HTTP request, in order (HTTP mode only)."""
        self.faults: list[Fault] = []
        self.http = False
        """Parse connections as HTTP/1.1 even with no fault armed (armed faults imply it)."""
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
        self.requests.clear()
        self.exchanges.clear()

    def arm(self, fault: Fault) -> Fault:
        """Apply ``fault`` to matching exchanges on connections opened from now on."""
        self.faults.append(fault)
        return fault

    def disarm(self) -> None:
        self.faults.clear()

    async def open(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.listen_host, 0, limit=_HEADER_LIMIT
        )
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
        # asyncio reports a connection task that ends cancelled as an error
        # ("Exception in callback StreamReaderProtocol..."): aclose ends it quietly.
        with contextlib.suppress(asyncio.CancelledError):
            await self._serve(task, client_r, client_w)

    async def _serve(
        self,
        task: asyncio.Task[None],
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
    ) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream, limit=_HEADER_LIMIT)
        except OSError:
            client_w.close()
            self._tasks.discard(task)
            return
        try:
            if self.http or self.faults:
                await self._http_exchanges(client_r, client_w, server_r, server_w)
            else:
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

    # -- fault injection (HTTP/1.1 aware) --------------------------------------

    async def _http_exchanges(
        self,
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        server_r: asyncio.StreamReader,
        server_w: asyncio.StreamWriter,
    ) -> None:
        requests: deque[tuple[str, str]] = deque()
        try:
            await asyncio.gather(
                self._requests(client_r, server_w, requests, client_w),
                self._responses(server_r, client_w, requests),
            )
        except (_Closed, OSError, asyncio.IncompleteReadError, ValueError):
            for writer in (client_w, server_w):
                writer.transport.abort()

    def _fault(self, kinds: tuple[str, ...], method: str, target: str, body: int) -> Fault | None:
        for fault in self.faults:
            if fault.kind in kinds and fault.take(method, target, body):
                return fault
        return None

    async def _requests(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        requests: deque[tuple[str, str]],
        client_w: asyncio.StreamWriter,
    ) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise
                if writer.can_write_eof():
                    writer.write_eof()
                return
            method, target, _ = head.split(b" ", 2)
            requests.append((method.decode(), target.decode()))
            self.requests[method.decode()] += 1
            self.exchanges.append((method.decode(), target.decode()))
            length = _content_length(head)
            fault = self._fault(
                ("cut_upload", "reject_upload", "stall_upload"),
                method.decode(),
                target.decode(),
                length,
            )
            await self._forward(writer, head, to_client=False)
            if fault is not None:
                await self._copy(reader, writer, min(fault.at, length), to_client=False)
                if fault.kind == "reject_upload":
                    await self._forward(client_w, _SLOW_DOWN, to_client=True)
                if fault.kind == "stall_upload":
                    await asyncio.Event().wait()  # until the proxy closes
                raise _Closed
            await self._copy(reader, writer, length, to_client=False)

    async def _responses(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        requests: deque[tuple[str, str]],
    ) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise
                writer.close()
                return
            status = int(head.split(b" ", 2)[1])
            if 100 <= status < 200:  # 100 Continue: the final response follows
                await self._forward(writer, head, to_client=True)
                continue
            method, target = requests.popleft() if requests else ("", "")
            length = 0 if method == "HEAD" or status in (204, 304) else _content_length(head)
            fault = self._fault(("truncate", "trickle"), method, target, length)
            await self._forward(writer, head, to_client=True)
            if fault is None:
                await self._copy(reader, writer, length, to_client=True)
            elif fault.kind == "truncate":
                await self._copy(reader, writer, min(fault.at, length), to_client=True)
                raise _Closed
            else:
                step = max(1, fault.rate // 10)
                while length > 0:
                    await self._copy(reader, writer, min(step, length), to_client=True)
                    length -= step
                    await asyncio.sleep(0.1)

    async def _forward(self, writer: asyncio.StreamWriter, data: bytes, *, to_client: bool) -> None:
        if to_client:
            self.bytes_to_client += len(data)
        else:
            self.bytes_to_server += len(data)
        writer.write(data)
        await writer.drain()

    async def _copy(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        length: int,
        *,
        to_client: bool,
    ) -> None:
        while length > 0:
            data = await reader.read(min(length, _BUFFER))
            if not data:
                raise asyncio.IncompleteReadError(b"", length)
            length -= len(data)
            await self._forward(writer, data, to_client=to_client)


def _content_length(head: bytes) -> int:
    """The body length an HTTP head announces; chunked bodies are not supported."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding" and b"chunked" in value.lower():
            raise ValueError("chunked HTTP bodies are not supported by the fault proxy")
        if name == b"content-length":
            return int(value.strip())
    return 0
