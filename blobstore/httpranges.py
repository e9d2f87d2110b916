"""Ranged GETs read in worker threads: a span's bytes go from the socket straight
into each chunk's buffer while the GIL is released.

Why not aiohttp for these: on the event loop every ~256 KiB the socket delivers
costs Python-level callbacks, a join into 1 MiB blocks and another join into
chunks; profiled on a cold 1 GiB pull from SeaweedFS, the loop thread was the
bottleneck. Streaming 1 GiB of 32 MiB ranges (bench_s3.py --clients, 3 runs):
aiobotocore 0.41 CPU s, obstore 0.46, this 0.23, at the same speed. Here a
worker thread sends one request (a pre-signed URL, sigv4.py) and reads each
chunk's bytes whole: one copy per byte, in C. The same pool carries the
store's other requests (s3http.py).

A ``RangeBody`` is one response body, read in order by one thread at a time;
``abort`` may be called from any thread (the loop's deadline) and makes a
blocked read fail at once. Connections are kept alive in a small pool.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import ssl
import threading
import time
from base64 import b64encode
from collections.abc import Mapping
from urllib.parse import SplitResult, unquote, urlsplit

from .errors import ConfigError, ObjectMissing, StoreUnavailable

_IDLE_CONNECTIONS = 32
"""Idle keep-alive connections kept per pool (above the spans in flight)."""
_ERROR_BODY = 4096
"""Bytes of an error response read for its <Code>."""
_CODE = re.compile(rb"<Code>([^<]{1,64})</Code>")
_MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404"})


class HttpRanges:
    """Opens ranged GETs on pre-signed URLs of one endpoint; keeps connections
    alive between them. Thread-safe. ``where`` names the store in errors."""

    def __init__(
        self,
        where: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        context: ssl.SSLContext | None = None,
        proxy: str | None = None,
        idle_connections: int = _IDLE_CONNECTIONS,
    ) -> None:
        """``proxy``: ``http://[user:pass@]host:port`` every connection goes through
        (http: absolute request targets; https: a CONNECT tunnel)."""
        self.where = where
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._context = context
        self._proxy = urlsplit(proxy) if proxy else None
        self.proxy_headers: dict[str, str] = {}
        """Sent with every request through an http proxy (its credentials)."""
        if self._proxy is not None:
            if self._proxy.scheme != "http":  # http.client would speak plain HTTP to it
                raise ConfigError(
                    f"proxy {self._proxy.hostname}: only http:// proxies are supported "
                    "(an https:// endpoint is reached through a CONNECT tunnel all the same)"
                )
            if self._proxy.username is not None:
                self.proxy_headers["Proxy-Authorization"] = _basic(self._proxy)
        self._idle_limit = idle_connections
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False
        self._watchdog = _Watchdog()

    def open(
        self, url: str, key: str, offset: int, length: int, deadline: float | None = None
    ) -> RangeBody | None:
        """Send ``GET url`` for bytes ``offset .. offset+length`` (blocking: call
        in a worker thread). None when the range starts past the object's end.
        ``deadline``: seconds the server has to answer (its headers; a server
        trickling them a byte per ``read_timeout`` must not hold a thread).

        Raises ObjectMissing, StoreUnavailable (unreachable, an S3 error, 5xx)."""
        parts = urlsplit(url)
        target = f"{parts.path}?{parts.query}" if parts.query else parts.path
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        for attempt in (1, 2):
            _fresh, conn = self.connection(parts.scheme, parts.hostname or "", parts.port)
            watch = self._watchdog.watch(conn, deadline)
            try:
                conn.request("GET", target, headers=headers)
                response = conn.getresponse()
                self._watchdog.forget(watch)
                break
            except (OSError, http.client.HTTPException) as exc:
                self._watchdog.forget(watch)
                conn.close()
                if watch is not None and watch.fired:
                    raise StoreUnavailable(
                        f"S3 read {key} in {self.where}: no answer within {deadline:.0f} s"
                    ) from exc
                # A kept-alive connection the server has closed meanwhile fails
                # on first use: one fresh connection, then the error is real.
                if attempt == 2 or isinstance(exc, ConnectionRefusedError | TimeoutError):
                    raise StoreUnavailable(
                        f"cannot reach S3 endpoint {parts.hostname}:{parts.port} "
                        f"(read {key}): {_reason(exc)}"
                    ) from exc
        status = response.status
        if status in (200, 206):
            try:
                check_range_start(status, dict(response.getheaders()), offset, key)
                return RangeBody(self, conn, response, key)
            except StoreUnavailable:
                _close(conn, response)
                raise
        try:
            detail = response.read(_ERROR_BODY)
        except (OSError, http.client.HTTPException):
            detail = b""
        _close(conn, response)
        match = _CODE.search(detail)
        code = printable(match.group(1).decode("ascii", "replace")) if match else str(status)
        if status == 416 or code == "InvalidRange":
            return None
        if code == "NoSuchBucket":
            raise StoreUnavailable(f"bucket of {self.where} does not exist at {parts.netloc}")
        if status == 404 or code in _MISSING_CODES:
            raise ObjectMissing(key, self.where)
        raise StoreUnavailable(f"S3 error {code} on read {key} in {self.where} (HTTP {status})")

    def close(self) -> None:
        """Close idle connections; later releases close theirs."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def connection(
        self, scheme: str, host: str, port: int | None
    ) -> tuple[bool, http.client.HTTPConnection]:
        """(fresh, connection): an idle kept-alive one to ``host:port`` if any
        (``fresh`` False: the server may have closed it meanwhile), else a new one."""
        key = (scheme, host, port)
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if getattr(conn, "pool_key", None) == key:
                    return False, conn
                conn.close()
        conn = self._new_connection(scheme, host, port)
        conn.pool_key = key  # type: ignore[attr-defined]
        return True, conn

    def _new_connection(
        self, scheme: str, host: str, port: int | None
    ) -> http.client.HTTPConnection:
        proxy = self._proxy
        if proxy is not None:
            host_port = (proxy.hostname or "", proxy.port)
            tunnel = self.proxy_headers
        else:
            host_port = (host, port)
        if scheme == "https":
            context = self._context or ssl.create_default_context()
            conn: http.client.HTTPConnection = _Https(
                *host_port, self._connect_timeout, self._read_timeout, context
            )
            if proxy is not None:
                conn.set_tunnel(host, port, headers=tunnel)
            return conn
        return _Http(*host_port, self._connect_timeout, self._read_timeout)

    def release_if_clean(
        self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse
    ) -> None:
        """Keep ``conn`` for reuse if its response was read to the end, else close it."""
        if response.isclosed() and not response.will_close:
            self._release(conn)
        else:
            _close(conn, response)

    def _release(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._idle_limit:
                self._idle.append(conn)
                return
        conn.close()


class RangeBody:
    """The body of one ranged GET, read in order (``read``/``skip``); one thread
    at a time. ``close`` returns the connection to its pool when the body was
    read to its end, else closes it."""

    def __init__(
        self,
        pool: HttpRanges,
        conn: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
        key: str,
    ) -> None:
        self._pool = pool
        self._conn = conn
        self._response = response
        self._key = key
        length = response.length
        if length is None:  # chunked: the Content-Range says how much must come
            length = _range_length(response.getheader("content-range"))
        if length is None:  # a body that ends when the connection does: cut or not?
            _close(conn, response)
            raise StoreUnavailable(
                f"S3 read {key} in {pool.where}: the response has neither a Content-Length "
                "nor a Content-Range"
            )
        self.length = length
        """Bytes the body holds (its Content-Length or Content-Range)."""
        self._left = length
        self._aborted = False
        """Set by ``abort`` (the deadline): the connection is not reused."""
        self._broke = False

    @property
    def remaining(self) -> int:
        """Bytes of the body not read yet."""
        return self._left

    def read(self, size: int) -> bytes:
        """The next ``size`` bytes; fewer only where the body ends as its
        Content-Length (or Content-Range) says. Raises StoreUnavailable (cut
        short, timed out, aborted)."""
        size = min(size, self._left)
        if size <= 0:
            return b""
        try:
            # One allocation, filled from the socket in C with the GIL released
            # (readinto would need a zero-filled buffer first: +0.1 s/GiB).
            data = self._response.read(size)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise self._broken(exc) from exc
        if len(data) < size:  # the server promised more
            raise self._broken(None)
        self._left -= size
        return data

    def skip(self, size: int) -> None:
        """Read and drop ``size`` bytes (a gap between wanted chunks)."""
        while size > 0:
            got = len(self.read(min(size, 1 << 20)))
            if not got:
                return
            size -= got

    def abort(self) -> None:
        """Make a read blocked in another thread fail now (any thread)."""
        self._aborted = True
        _shut_down(self._conn)

    def close(self) -> None:
        clean = not (self._aborted or self._broke or self._left)
        if clean and self._response.isclosed() and not self._response.will_close:
            self._pool._release(self._conn)
        else:
            _close(self._conn, self._response)

    def _broken(self, exc: BaseException | None) -> StoreUnavailable:
        self._broke = True
        reason = "stopped at its deadline" if self._aborted else _reason(exc)
        return StoreUnavailable(
            f"S3 read {self._key}: response body cut short by {self._pool.where}: {reason}"
        )


class _Http(http.client.HTTPConnection):
    """Connects within ``connect_timeout``, then waits ``read_timeout`` per read."""

    def __init__(self, host: str, port: int | None, connect: float, read: float) -> None:
        super().__init__(host, port, timeout=connect)
        self._read_timeout = read
        self._create_connection = _create_connection

    def connect(self) -> None:
        super().connect()
        assert self.sock is not None
        self.sock.settimeout(self._read_timeout)


class _Https(http.client.HTTPSConnection):
    def __init__(
        self, host: str, port: int | None, connect: float, read: float, context: ssl.SSLContext
    ) -> None:
        super().__init__(host, port, timeout=connect, context=context)
        self._read_timeout = read
        self._create_connection = _create_connection

    def connect(self) -> None:
        super().connect()
        assert self.sock is not None
        self.sock.settimeout(self._read_timeout)


def _create_connection(
    address: tuple[str, int], timeout: float, source: tuple[str, int] | None = None
) -> socket.socket:
    """``socket.create_connection`` with an ASCII host passed as bytes: a str makes
    getaddrinfo load the idna codec first (~7-11 ms of every run, measured)."""
    host, port = address
    name: str | bytes = host.encode("ascii") if host.isascii() else host
    return socket.create_connection((name, port), timeout, source)  # type: ignore[arg-type]


def printable(text: str) -> str:
    """``text`` from a server, fit for an error line: whitespace runs made one
    space, other control characters (terminal escapes) made ``?``."""
    text = " ".join(text.split())
    return "".join(c if c.isprintable() else "?" for c in text)


def _close(conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
    """Close both: a response marked ``will_close`` holds the socket itself."""
    response.close()
    conn.close()


_CONTENT_RANGE = re.compile(r"bytes (\d{1,20})-(\d{1,20})/(?:\d{1,20}|\*)")


def check_range_start(status: int, headers: Mapping[str, str], offset: int, key: str) -> None:
    """A ranged GET's answer starts at ``offset``: a 206's Content-Range says so,
    a 200 (the Range ignored: the whole object) only when ``offset`` is 0.
    Raises StoreUnavailable."""
    if status != 206:
        if offset:
            raise StoreUnavailable(f"S3 read {key}: the server ignored the Range (HTTP {status})")
        return
    value = next((v for k, v in headers.items() if k.lower() == "content-range"), "")
    match = _CONTENT_RANGE.fullmatch(value.strip())
    if match is None or int(match.group(1)) != offset or int(match.group(2)) < offset:
        raise StoreUnavailable(
            f"S3 read {key}: asked for bytes from {offset}, got Content-Range {value[:80]!r}"
        )


def _range_length(value: str | None) -> int | None:
    match = _CONTENT_RANGE.fullmatch((value or "").strip())
    return None if match is None else int(match.group(2)) - int(match.group(1)) + 1


def _reason(exc: BaseException | None) -> str:
    if exc is None:
        return "the connection ended early"
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:200]


def for_endpoint(
    where: str,
    endpoint: str,
    *,
    connect_timeout: float,
    read_timeout: float,
    ca_bundle: str | bool | None = None,
) -> HttpRanges | None:
    """The pool for an S3 endpoint, or None where requests must go through a
    proxy (pre-signed ranges are read directly)."""
    if proxy_for(endpoint) is not None:
        return None
    return HttpRanges(
        where,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        context=tls_context(endpoint, ca_bundle),
    )


def proxy_for(endpoint: str, env: Mapping[str, str] | None = None) -> str | None:
    """The proxy ``<scheme>_proxy``/``no_proxy`` (either case, lowercase first) name
    for ``endpoint``, as urllib reads them, or None. Not urllib.request itself: its
    imports cost ~7 ms of every s3:// command."""
    env = os.environ if env is None else env
    parts = urlsplit(endpoint)
    name = f"{parts.scheme}_proxy"
    proxy = env.get(name) or env.get(name.upper())
    if not proxy or (parts.scheme == "http" and "REQUEST_METHOD" in env):  # CGI: httpoxy
        return None
    no_proxy = env.get("no_proxy") or env.get("NO_PROXY") or ""
    host = (parts.hostname or "").lower()
    for entry in (e.strip().lower().lstrip(".") for e in no_proxy.split(",")):
        if entry == "*":
            return None
        entry_host, _, entry_port = entry.partition(":")
        if entry_port and entry_port != str(parts.port or ""):
            continue
        if entry_host and (host == entry_host or host.endswith(f".{entry_host}")):
            return None
    return proxy if "://" in proxy else f"http://{proxy}"


def tls_context(endpoint: str, ca_bundle: str | bool | None) -> ssl.SSLContext | None:
    """The TLS context for an https endpoint: ``ca_bundle`` a CA file to trust,
    False for no verification (botocore's verify=False), None the system's."""
    if urlsplit(endpoint).scheme != "https":
        return None
    if ca_bundle is False:
        return ssl._create_unverified_context()
    return ssl.create_default_context(cafile=ca_bundle if isinstance(ca_bundle, str) else None)


class PresignedObject:
    """Ranges of one object through a pre-signed GET URL (origin.RangeOpener);
    each answer's headers due within ``deadline`` seconds."""

    def __init__(
        self, ranges: HttpRanges, url: str, key: str, deadline: float | None = None
    ) -> None:
        self._ranges, self._url, self._key, self._deadline = ranges, url, key, deadline

    def __repr__(self) -> str:  # the URL holds a signature and the session token
        return f"PresignedObject({self._key!r})"

    def open(self, offset: int, length: int) -> RangeBody | None:
        return self._ranges.open(self._url, self._key, offset, length, self._deadline)


class _Watch:
    __slots__ = ("conn", "due", "fired")

    def __init__(self, conn: http.client.HTTPConnection, due: float) -> None:
        self.conn, self.due, self.fired = conn, due, False


class _Watchdog:
    """Shuts the socket of a request whose answer is overdue: one thread per
    pool, alive while requests are watched, checking once per ``_TICK`` (a
    timer thread per request cost ~1 ms of CPU per range, measured)."""

    _TICK = 0.5

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: set[_Watch] = set()
        self._running = False

    def watch(self, conn: http.client.HTTPConnection, seconds: float | None) -> _Watch | None:
        if seconds is None:
            return None
        watch = _Watch(conn, time.monotonic() + seconds)
        with self._lock:
            self._watched.add(watch)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="httpranges-watchdog", daemon=True).start()
        return watch

    def forget(self, watch: _Watch | None) -> None:
        if watch is not None:
            with self._lock:
                self._watched.discard(watch)

    def _run(self) -> None:
        while True:
            time.sleep(self._TICK)
            now = time.monotonic()
            with self._lock:
                if not self._watched:
                    self._running = False
                    return
                overdue = [w for w in self._watched if w.due <= now]
                self._watched.difference_update(overdue)
            for watch in overdue:
                watch.fired = True
                _shut_down(watch.conn)


def _shut_down(conn: http.client.HTTPConnection) -> None:
    """Make a read blocked on ``conn`` in another thread fail now."""
    shut_down_socket(conn.sock)


def shut_down_socket(sock: socket.socket | None) -> None:
    """Make a read blocked on ``sock`` in another thread fail now (None: nothing)."""
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _basic(proxy: SplitResult) -> str:
    userinfo = f"{unquote(proxy.username or '')}:{unquote(proxy.password or '')}"
    return "Basic " + b64encode(userinfo.encode()).decode()
