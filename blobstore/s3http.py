"""Signed S3 requests sent from worker threads over http.client (blocking code:
call it in a worker thread). The async side, deadlines and error messages are
``s3store``'s.

Why not botocore: importing aiobotocore (~0.23 s) and creating a client (~0.12 s,
the S3 service model) cost more than a whole no-op push, and every request
spent ~1.7 ms of Python in botocore. Here a request is a few dict entries, one
HMAC chain (sigv4.py) and http.client.

Retries follow botocore's "standard" mode: up to ``max_attempts`` for
throttling codes, transient codes and HTTP 500/502/503/504, and for a
connection dropped before the answer; a jittered exponential backoff
(``rand() * min(scale * 2**(attempt-1), 20)`` s, scale 1 for throttling and
0.05 otherwise). A refused or timed-out connect, or a server silent for
``read_timeout``, is tried ``connect_attempts`` times only, so a dead endpoint
fails in seconds. A connection kept alive that the server closed meanwhile is
replaced at once, without counting an attempt.
"""

from __future__ import annotations

import hashlib
import http.client
import random
import re
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import ip_address
from urllib.parse import urlsplit

from . import sigv4
from .errors import Aborted as Aborted
from .errors import CutShort as CutShort
from .errors import NetworkError as NetworkError
from .errors import S3Error as S3Error
from .errors import TooLarge as TooLarge
from .httpranges import HttpRanges, RangeBody, printable, shut_down_socket
from .s3profile import CredentialSource

_THROTTLING = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "PriorRequestNotComplete",
        "EC2ThrottledException",
    }
)
_TRANSIENT = frozenset({"RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete"})
_TRANSIENT_STATUS = frozenset({500, 502, 503, 504})
_MAX_BACKOFF = 20.0
_ERROR_BODY = 64 << 10
"""Bytes of an error response read for its code and message."""
_CODE = re.compile(rb"<Code>([^<]{1,128})</Code>")
_MESSAGE = re.compile(rb"<Message>([^<]{0,1000})</Message>")
_BUCKET_DNS = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")


class Call:
    """One request's handle for the event loop: ``abort`` (any thread) makes the
    worker thread stop at once, its connection closed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._aborted = threading.Event()
        self.resent = False
        """A later attempt was sent after one that may have reached the server."""
        self.on_length: Callable[[int], None] | None = None
        """Told the body's length before it is read (the loop extends its deadline)."""

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    def abort(self) -> None:
        self._aborted.set()
        with self._lock:
            sock = self._sock
        shut_down_socket(sock)

    def attach(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._sock = conn.sock
        if self.aborted:
            self.abort()

    def detach(self) -> None:
        """The request is done with its connection (back in the pool): ``abort``
        must not touch it any more."""
        with self._lock:
            self._sock = None

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds`` unless aborted. Raises Aborted."""
        if self._aborted.wait(seconds):
            raise Aborted


@dataclass(slots=True)
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes = b""
    stream: RangeBody | None = field(default=None, repr=False)


class S3Http:
    """Requests to one bucket at one endpoint. Thread-safe."""

    def __init__(
        self,
        pool: HttpRanges,
        endpoint: str,
        bucket: str,
        region: str,
        addressing_style: str,
        credentials: CredentialSource,
        *,
        proxy: str | None = None,
        sign_payload: bool = False,
        max_attempts: int = 5,
        connect_attempts: int = 2,
        max_body: int = 512 << 20,
    ) -> None:
        """``max_body``: the largest body read whole (``request``'s default)."""
        self.pool = pool
        self.max_body = max_body
        self.bucket = bucket
        self.region = region
        self.credentials = credentials
        self._sign_payload = sign_payload
        self._max_attempts = max_attempts
        self._connect_attempts = connect_attempts
        self._proxy = proxy
        parts = urlsplit(endpoint)
        self.scheme = parts.scheme
        host = parts.hostname or ""
        self._path_prefix = parts.path.rstrip("/")
        virtual = addressing_style == "virtual" or (
            addressing_style == "auto" and _BUCKET_DNS.fullmatch(bucket) is not None
        )
        if virtual and not _is_ip(host):
            self._host, self._base = f"{bucket}.{host}", self._path_prefix
        else:
            self._host, self._base = host, f"{self._path_prefix}/{bucket}"
        self._port = parts.port
        self.host_header = sigv4.host_header(self.scheme, self._host, self._port)
        self.endpoint = endpoint

    def path(self, key: str | None) -> str:
        """The quoted request path of ``key`` (None: the bucket)."""
        if key is None:
            return sigv4.quote_path(self._base or "/")
        return sigv4.quote_path(f"{self._base}/{key}")

    def url(self, path: str, query: str = "") -> str:
        url = f"{self.scheme}://{self.host_header}{path}"
        return f"{url}?{query}" if query else url

    def presigned_get(self, key: str, expires: int) -> str:
        """A GET URL of ``key`` valid ``expires`` seconds (may block: credentials)."""
        path = self.path(key)
        query = sigv4.presign_query(
            self.credentials.current(), self.region, "GET", path, self.host_header, expires
        )
        return self.url(path, query)

    def request(
        self,
        call: Call,
        method: str,
        key: str | None,
        *,
        params: Iterable[tuple[str, str]] = (),
        headers: Mapping[str, str] | None = None,
        body: bytes | bytearray | memoryview = b"",
        stream: bool = False,
        max_body: int | None = None,
    ) -> Response:
        """Send one request with retries; the body read whole, at most ``max_body``
        bytes (None: ``self.max_body``), or with ``stream`` left to read as
        ``Response.stream`` for a successful answer. ``call.resent`` tells
        afterwards whether the request may have reached the server more than
        once. Raises S3Error, NetworkError, CutShort, TooLarge, Aborted,
        ConfigError (credentials)."""
        limit = self.max_body if max_body is None else max_body
        path = self.path(key)
        query = sigv4.canonical_query(params)
        target = path if not query else f"{path}?{query}"
        if self._proxy is not None and self.scheme == "http":
            target = self.url(path, query)  # absolute form, for the proxy
        payload = sigv4.UNSIGNED_PAYLOAD
        if self._sign_payload:  # hashed here, in the worker thread
            payload = hashlib.sha256(body).hexdigest()
        connect_failures = 0
        attempt = 0
        tried = False
        while True:
            attempt += 1
            if call.aborted:
                raise Aborted
            call.resent = tried
            tried = True
            signed = sigv4.sign_headers(
                self.credentials.current(),
                self.region,
                method,
                path,
                query,
                {"host": self.host_header, **(headers or {})},
                payload,
            )
            signed["Content-Length"] = str(len(body))
            if self._proxy is not None and self.scheme == "http":
                signed.update(self.pool.proxy_headers)  # unsigned: the proxy drops it
            fresh, conn = self.pool.connection(self.scheme, self._host, self._port)
            connected = False
            try:
                if conn.sock is None:
                    conn.connect()
                connected = True
                call.attach(conn)  # before sending: a stalled upload must be abortable
                conn.request(method, target, body=body or None, headers=signed)
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if call.aborted:
                    raise Aborted from exc
                if not fresh and _closed_by_peer(exc):
                    attempt -= 1  # a stale keep-alive connection: not the server's fault
                    continue
                if _connect_failure(exc, connected):
                    connect_failures += 1
                    if connect_failures >= self._connect_attempts:
                        raise NetworkError(_reason(exc)) from exc
                elif attempt >= self._max_attempts:
                    raise NetworkError(_reason(exc)) from exc
                call.wait(_backoff(attempt, throttled=False))
                continue
            status = response.status
            if 200 <= status < 300 or status == 304:
                if stream:
                    return Response(
                        status,
                        _headers(response),
                        stream=RangeBody(self.pool, conn, response, key or ""),
                    )
                if response.length is not None and response.length > limit:
                    response.close()  # never read: a lying length must not cost memory or time
                    conn.close()
                    raise TooLarge(f"{response.length} bytes, more than {limit}")
                if call.on_length is not None:
                    call.on_length(response.length or 0)
                data = _read_all(response, conn, call, limit)
                call.detach()
                self.pool.release_if_clean(conn, response)
                return Response(status, _headers(response), data)
            try:
                detail = response.read(_ERROR_BODY)
            except (OSError, http.client.HTTPException):
                detail = b""
            # A whole error body (a HEAD's 404 has none) leaves the connection
            # reusable: exists() on absent keys must not reconnect every time.
            call.detach()
            self.pool.release_if_clean(conn, response)
            code, message = _error(status, detail)
            region = response.getheader("x-amz-bucket-region")
            retry = code in _THROTTLING or code in _TRANSIENT or status in _TRANSIENT_STATUS
            if not retry or attempt >= self._max_attempts:
                raise S3Error(status, code, message, region)
            call.wait(_backoff(attempt, throttled=code in _THROTTLING))


def _read_all(
    response: http.client.HTTPResponse,
    conn: http.client.HTTPConnection,
    call: Call,
    limit: int,
) -> bytes:
    """The whole body (its Content-Length already checked against ``limit``); a
    body without one (chunked, or up to the connection's end) is read in pieces
    and refused once it passes ``limit``."""
    try:
        if response.length is not None:
            return response.read()
        pieces, total = [], 0
        while piece := response.read(1 << 20):
            total += len(piece)
            if total > limit:
                response.close()
                conn.close()
                raise TooLarge(f"more than {limit} bytes")
            pieces.append(piece)
        return b"".join(pieces)
    except (OSError, http.client.HTTPException) as exc:
        response.close()
        conn.close()
        if call.aborted:
            raise Aborted from exc
        raise CutShort(_reason(exc)) from exc


def _headers(response: http.client.HTTPResponse) -> dict[str, str]:
    return {k.lower(): v for k, v in response.getheaders()}


def _error(status: int, detail: bytes) -> tuple[str, str]:
    code = _CODE.search(detail)
    message = _MESSAGE.search(detail)
    name = printable(code.group(1).decode("utf-8", "replace")) if code else str(status)
    text = printable(message.group(1).decode("utf-8", "replace")) if message else ""
    if not code and not text:
        text = http.client.responses.get(status, "")
    return name, text


def _backoff(attempt: int, *, throttled: bool) -> float:
    scale = 1.0 if throttled else 0.05
    return random.random() * min(scale * 2.0 ** (attempt - 1), _MAX_BACKOFF)


def _closed_by_peer(exc: BaseException) -> bool:
    return isinstance(exc, http.client.RemoteDisconnected | ConnectionResetError | BrokenPipeError)


def _connect_failure(exc: BaseException, connected: bool) -> bool:
    """Refused, unresolvable, or silent (a timeout): the endpoint looks dead.
    (``connected`` is taken before the connection is closed: after, every
    error looked like a failed connect and got ``connect_attempts`` only.)"""
    return isinstance(exc, ConnectionRefusedError | TimeoutError | socket.gaierror) or (
        not connected and isinstance(exc, OSError) and not _closed_by_peer(exc)
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:200]


def _is_ip(host: str) -> bool:
    try:
        ip_address(host)
    except ValueError:
        return False
    return True
