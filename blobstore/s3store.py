"""``S3ObjectStore``: the object store in an S3 bucket (``s3://bucket/prefix``).

Requests are signed here (sigv4.py) and sent by worker threads over
http.client (s3http.py), not through aiobotocore: a CLI run on an s3:// store
starts doing useful work in a few tens of milliseconds instead of ~0.35 s of
importing aiobotocore and loading botocore's S3 model, and a request costs a
few dozen microseconds of Python instead of ~1.7 ms. botocore is imported only
where its credential chain is needed (assume-role, SSO, instance metadata...:
s3profile.py) or for FIPS/dual-stack/accelerate endpoint names.

Endpoint, profile, region and addressing style come in as a ``config.S3Config``
(resolved from options and the AWS_* environment in one place); s3profile.py
completes it from the profile as the AWS CLI does: credentials, region,
``endpoint_url`` (also in a ``services`` section) unless ``use_profile_endpoint``
is off, ``s3.addressing_style`` and ``ca_bundle``. HTTP(S)_PROXY/NO_PROXY are
honoured (for proxied endpoints spans are read through the loop, not threads).

Why the requests are made the way they are:

- Retries as botocore's "standard" mode (5 attempts, jittered backoff) for
  throttling and 5xx, but a refused or timed-out *connect* is tried twice only,
  so an unreachable endpoint is reported in a few seconds (s3http.py).
- Payload signing off by default (``UNSIGNED-PAYLOAD``): bodies of
  content-addressed keys are verified with BLAKE3 on every read; on plain http
  a man in the middle could still alter a ref, so pass ``sign_payload=True`` on
  untrusted networks (the SHA-256 is then computed in the worker thread).
- An overall deadline per request (``request_deadline`` + size /
  ``min_bytes_per_second``, default 120 s + 1 s per 64 KiB): ``read_timeout`` only
  bounds the silence between two packets, so a body trickling at 2 KiB/s would
  otherwise never end. A GET learns the size from its response headers and
  extends its deadline then. At the deadline the loop shuts the request's socket,
  so the worker thread ends at once.
- A response body cut short is a TruncatedResponse (a StoreUnavailable), and
  ``get`` repeats the request up to ``_BODY_ATTEMPTS`` times first.
- Whatever the server sends, memory stays bounded: ``get`` refuses a body over
  ``max_object_size`` (by its Content-Length before reading, or as it arrives
  when chunked), a LIST page over 16 MiB or with a DTD is refused, and a ranged
  answer must start where asked (Content-Range) and is never read past what was
  asked. Nothing follows a redirect but ``open``'s region redirect (once, to a
  region name, AWS only), so a signed request only goes to the endpoint.
- A conditional PUT repeated (its answer lost, a 5xx) may find its own first
  write: a refused condition is then checked against the object's bytes.

``put_if`` uses S3 conditional writes (``If-None-Match: *`` to create, ``If-Match:
<etag>`` to replace); AWS S3 and SeaweedFS (tested, 4.x) honour both atomically.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TypeVar
from urllib.parse import unquote_plus, urlsplit

import anyio

from . import httpranges
from .config import S3Config
from .errors import (
    Aborted,
    BadInput,
    BucketElsewhere,
    ConfigError,
    Conflict,
    CutShort,
    NetworkError,
    ObjectMissing,
    S3Error,
    StoreUnavailable,
    TooLarge,
    TruncatedResponse,
)
from .objectstore import ObjectInfo, validate_key, validate_prefix
from .parallel import for_each
from .resource import AsyncResource
from .s3http import Call, Response, S3Http
from .s3profile import DEFAULT_REGION, ResolvedS3, StaticCredentials, read_profile

__all__ = ["DEFAULT_REGION", "ResolvedS3", "S3ObjectStore", "read_profile"]

T = TypeVar("T")

# Parallel HEADs of one exists_many call; below the connection pool size.
_HEAD_CONCURRENCY = 48

CONNECT_ATTEMPTS = 2
"""Attempts for a request whose TCP connect fails or whose server stays silent
for ``read_timeout`` (throttling/5xx get ``max_attempts``): a dead endpoint
must fail in well under a minute, not after five full timeouts."""
_BODY_ATTEMPTS = 3
"""Requests ``get`` makes for an object whose body keeps being cut short."""
DEFAULT_REQUEST_DEADLINE = 120.0
DEFAULT_MIN_BYTES_PER_SECOND = 64 << 10
_PRESIGNED_SECONDS = 3600
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_CONFLICT_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict"})
_RANGE_PAST_END_CODES = frozenset({"InvalidRange", "416"})
_RANGE_BLOCK = 1 << 20
"""Largest block ``get_range`` yields."""
DEFAULT_MAX_OBJECT_SIZE = 512 << 20
"""Largest object ``get`` reads (the largest manifest, manifest.MAX_MANIFEST_BYTES):
a server must not make a ref's GET hold gigabytes, nor stretch its deadline
with a Content-Length it never sends."""
_MAX_LISTING_PAGE = 16 << 20
"""A ListObjectsV2 page of 1,000 keys of 1 KiB, URL-encoded, is under 4 MiB."""
_REGION = re.compile(r"[a-z]{2}(-[a-z0-9]{1,20}){1,4}")
"""An AWS region name: a redirect's region becomes part of a host name."""


class S3ObjectStore(AsyncResource):
    """An ``ObjectStore`` in ``bucket`` under ``prefix``. Use as ``async with``.

    Every method raises StoreUnavailable when S3 cannot be reached or answers
    with an error (including a missing bucket), and BadInput for a bad key.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        settings: S3Config | None = None,
        *,
        create_bucket: bool = False,
        sign_payload: bool = False,
        max_pool_connections: int = 64,
        connect_timeout: float = 2.5,
        read_timeout: float = 20.0,
        max_attempts: int = 5,
        request_deadline: float = DEFAULT_REQUEST_DEADLINE,
        min_bytes_per_second: float = DEFAULT_MIN_BYTES_PER_SECOND,
        max_object_size: int = DEFAULT_MAX_OBJECT_SIZE,
    ) -> None:
        """``settings`` None: AWS defaults (``S3Config()``). ``max_pool_connections``
        bounds the requests in flight (each holds a worker thread) and the idle
        connections kept alive; ``max_object_size`` the bytes one ``get`` holds."""
        self._max_object_size = max_object_size
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.settings = S3Config() if settings is None else settings
        self.endpoint = self.settings.endpoint_url
        self.addressing_style: str | None = self.settings.addressing_style
        self._request_deadline = request_deadline
        self._min_rate = min_bytes_per_second
        self._region = self.settings.region or DEFAULT_REGION
        self._create_bucket = create_bucket
        self._sign_payload = sign_payload
        self._max_attempts = max_attempts
        self._timeouts = (connect_timeout, read_timeout)
        self._idle_connections = max_pool_connections
        self._http: S3Http | None = None
        self._threaded = False
        self._limiter: anyio.CapacityLimiter | None = None
        """Worker threads this store's requests may hold at once: its own, so
        that requests never wait behind other thread work (span reads, disk)."""

    def __repr__(self) -> str:
        return f"S3ObjectStore({self.url!r}, endpoint={self.endpoint!r})"

    async def aclose(self) -> None:
        """Close the HTTP connection pool. Idempotent."""
        http, self._http = self._http, None
        if http is not None:
            http.pool.close()

    async def open(self) -> None:
        """Read the profile and check the bucket (creating it if ``create_bucket``).

        Raises StoreUnavailable (endpoint unreachable, bucket missing, access
        denied) or ConfigError (unknown profile, no credentials).
        """
        self._limiter = anyio.CapacityLimiter(self._idle_connections)
        profile = await anyio.to_thread.run_sync(read_profile, self.settings)
        endpoint, style = profile.endpoint_url, profile.addressing_style
        if endpoint is None and profile.botocore_endpoint:
            endpoint, style = await anyio.to_thread.run_sync(
                _botocore_endpoint, self.settings, profile, self.bucket
            )
        self._connect(profile, profile.region, endpoint, style)
        try:
            await self._ensure_bucket()
        except BucketElsewhere as moved:
            if endpoint is not None or not _REGION.fullmatch(moved.region):
                # A custom endpoint's region is the user's business, and a region
                # that is not one must not name the host the credentials go to.
                raise moved.error from None
            # As botocore's redirector: the bucket is elsewhere; ask there, once.
            self._connect(profile, moved.region, None, style)
            try:
                await self._ensure_bucket()
            except BucketElsewhere as again:
                raise again.error from None

    def _connect(self, profile: ResolvedS3, region: str, endpoint: str | None, style: str) -> None:
        if self._http is not None:
            self._http.pool.close()
        self._region = region
        self.addressing_style = style
        self.endpoint = endpoint or _aws_endpoint(region)
        proxy = httpranges.proxy_for(self.endpoint)
        connect, read = self._timeouts
        try:
            context = httpranges.tls_context(self.endpoint, profile.ca_bundle)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(
                f"CA bundle {profile.ca_bundle} (AWS_CA_BUNDLE or the profile's ca_bundle) "
                f"cannot be used: {_one_line(getattr(exc, 'strerror', None) or str(exc))}"
            ) from exc
        pool = httpranges.HttpRanges(
            self.url,
            connect_timeout=connect,
            read_timeout=read,
            context=context,
            proxy=proxy,
            idle_connections=self._idle_connections,
        )
        self._http = S3Http(
            pool,
            self.endpoint,
            self.bucket,
            region,
            style,
            profile.credentials,
            proxy=proxy,
            sign_payload=self._sign_payload,
            max_attempts=self._max_attempts,
            connect_attempts=CONNECT_ATTEMPTS,
            max_body=self._max_object_size,
        )
        # Spans read by threads skip proxies (a pre-signed URL, no proxy logic there).
        self._threaded = proxy is None

    async def _ensure_bucket(self) -> None:
        http = self._live
        try:
            with self._translate("check bucket", wrong_region=True):
                await self._run("check bucket", "", lambda c: http.request(c, "HEAD", None))
            return
        except ObjectMissing:
            if not self._create_bucket:
                raise StoreUnavailable(
                    f"bucket {self.bucket} does not exist at {self.endpoint}"
                ) from None
        body = b""
        if self._region != DEFAULT_REGION:
            body = (
                "<CreateBucketConfiguration><LocationConstraint>"
                f"{self._region}</LocationConstraint></CreateBucketConfiguration>"
            ).encode()
        try:
            with self._translate("create bucket"):
                await self._run(
                    "create bucket", "", lambda c: http.request(c, "PUT", None, body=body)
                )
        except StoreUnavailable as exc:
            if not isinstance(exc.__cause__, S3Error) or exc.__cause__.code not in (
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            ):
                raise

    # -- ObjectStore ---------------------------------------------------------

    async def get(self, key: str) -> bytes:
        """Return the object's bytes. Raises ObjectMissing, StoreUnavailable, BadInput."""
        data, _etag = await self._get(key)
        return data

    async def put(self, key: str, data: bytes | bytearray) -> None:
        """Write the object (S3 PUTs are atomic). Raises StoreUnavailable, BadInput."""
        full, http = self._key(key), self._live
        with self._translate("write", key):
            await self._run(
                "write", key, lambda c: http.request(c, "PUT", full, body=data), len(data)
            )

    async def put_if(self, key: str, data: bytes, expected: bytes | None) -> None:
        """Write only if the current bytes equal ``expected`` (``None``: key absent).

        Replacing reads the object and its ETag, compares the bytes, then writes
        with ``If-Match: <etag>``, so a writer that slipped in between loses.
        Raises Conflict, StoreUnavailable, BadInput.
        """
        full, http = self._key(key), self._live
        if expected is None:
            conditions = {"If-None-Match": "*"}
        else:
            try:
                current, etag = await self._get(key)
            except ObjectMissing:
                raise Conflict(f"object {key} is missing in {self.url}; expected a value") from None
            if current != expected:
                raise Conflict(f"object {key} changed in {self.url}; conditional write refused")
            conditions = {"If-Match": etag}
        calls: list[Call] = []

        def write(call: Call) -> Response:
            calls.append(call)
            return http.request(call, "PUT", full, body=data, headers=conditions)

        try:
            with self._translate("write", key):
                await self._run("write", key, write, len(data))
        except Conflict:
            # A repeated PUT (an answer lost, a 5xx) fails its condition on our
            # own first write: the write is ours if the object holds our bytes.
            if calls and calls[-1].resent and await self._holds(key, data):
                return
            state = "exists" if expected is None else "changed"
            raise Conflict(
                f"object {key} {state} in {self.url}; conditional write refused"
            ) from None

    async def _holds(self, key: str, data: bytes) -> bool:
        try:
            current, _etag = await self._get(key)
        except ObjectMissing:
            return False
        return current == data

    async def get_range(self, key: str, offset: int, length: int) -> AsyncGenerator[bytes, None]:
        """Stream ``length`` bytes from ``offset`` with one ranged GET, in blocks as
        they arrive (nothing buffers the whole range). Stops early where the object
        ends. Raises ObjectMissing, StoreUnavailable (also mid-stream), BadInput."""
        full, http = self._key(key), self._live
        if length <= 0:
            return
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        try:
            with self._translate("read", key):
                response = await self._run(
                    "read",
                    key,
                    lambda c: http.request(c, "GET", full, headers=headers, stream=True),
                )
        except StoreUnavailable as exc:
            cause = exc.__cause__
            if isinstance(cause, S3Error) and cause.code in _RANGE_PAST_END_CODES:
                return
            raise
        body = response.stream
        assert body is not None
        # The body's deadline counts only time spent waiting for the server (a
        # cancel scope must not span a yield, and a slow consumer is not its fault).
        budget = self.read_budget(length)
        left = length  # a 200 (the whole object) or a lying length: no more than asked
        try:
            httpranges.check_range_start(response.status, response.headers, offset, key)
            while left:
                started = anyio.current_time()
                with anyio.move_on_after(budget) as scope:
                    block = await anyio.to_thread.run_sync(
                        _read_block, body, left, abandon_on_cancel=True, limiter=self._limiter
                    )
                if scope.cancelled_caught:
                    body.abort()
                    raise self._too_slow("read", key)
                budget -= anyio.current_time() - started
                if not block:
                    break
                left -= len(block)
                yield block
        finally:
            body.close()

    async def threaded_ranges(self, key: str) -> httpranges.PresignedObject | None:
        """Ranges of ``key`` for worker threads to read themselves (see
        httpranges.py: a cold pull's bytes then skip the event loop), through a
        URL pre-signed for an hour; None where that path does not apply (a
        proxy). Errors come as from ``get_range``; ``read_budget`` and
        ``too_slow`` give the same deadline."""
        http = self._live
        if not self._threaded:
            return None
        full = self._key(key)
        with self._translate("sign", key):
            if isinstance(http.credentials, StaticCredentials):
                url = http.presigned_get(full, _PRESIGNED_SECONDS)  # no I/O: HMACs only
            else:
                url = await anyio.to_thread.run_sync(http.presigned_get, full, _PRESIGNED_SECONDS)
        return httpranges.PresignedObject(http.pool, url, key, self._request_deadline)

    def read_budget(self, length: int) -> float:
        """Seconds a read of ``length`` bytes may wait for S3 in all."""
        return self._request_deadline + length / self._min_rate

    def too_slow(self, op: str, key: str) -> StoreUnavailable:
        return self._too_slow(op, key)

    async def exists(self, key: str) -> bool:
        """True if the key holds an object. Raises StoreUnavailable, BadInput."""
        full, http = self._key(key), self._live
        try:
            with self._translate("stat", key):
                await self._run("stat", key, lambda c: http.request(c, "HEAD", full))
        except ObjectMissing:
            return False
        return True

    async def exists_many(self, keys: Collection[str]) -> set[str]:
        """The keys that hold objects: parallel HEADs, bounded by the pool size.

        Raises StoreUnavailable, BadInput.
        """
        found: set[str] = set()

        async def check(key: str) -> None:
            if await self.exists(key):
                found.add(key)

        await for_each(keys, check, _HEAD_CONCURRENCY)
        return found

    async def delete(self, key: str) -> None:
        """Delete the object; a missing key is not an error. Raises StoreUnavailable."""
        full, http = self._key(key), self._live
        try:
            with self._translate("delete", key):
                await self._run("delete", key, lambda c: http.request(c, "DELETE", full))
        except ObjectMissing:
            pass

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """Yield every object whose key starts with ``prefix``, in key order. Names
        that are not keys (``refs/apps/``, the zero-byte "folders" S3 consoles make)
        are skipped: no back-end can read them. Raises StoreUnavailable, BadInput.
        """
        validate_prefix(prefix)
        http = self._live
        strip = len(self.prefix) + 1 if self.prefix else 0
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        token: str | None = ""
        while token is not None:
            params = [("list-type", "2"), ("prefix", full_prefix), ("encoding-type", "url")]
            if token:
                params.append(("continuation-token", token))

            def page(call: Call, params: list[tuple[str, str]] = params) -> _Page:
                response = http.request(
                    call, "GET", None, params=params, max_body=_MAX_LISTING_PAGE
                )
                return _parse_listing(response)

            with self._translate("list", prefix):  # a deadline per page: never across a yield
                infos, following = await self._run("list", prefix, page)
            if following is not None and following == token:
                raise StoreUnavailable(
                    f"S3 list {prefix} in {self.url}: the server repeats its continuation token"
                )
            token = following
            for key, size, mtime in infos:
                key = key[strip:]
                if _is_key(key):  # not "refs/apps/": a folder marker made by an S3 console
                    yield ObjectInfo(key, size, mtime)

    # -- helpers -------------------------------------------------------------

    @property
    def _live(self) -> S3Http:
        if self._http is None:
            raise StoreUnavailable(f"{self.url} is not open (use 'async with')")
        return self._http

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    async def _get(self, key: str) -> tuple[bytes, str]:
        full, http = self._key(key), self._live
        for attempt in range(1, _BODY_ATTEMPTS + 1):
            try:
                with self._translate("read", key):
                    response = await self._run("read", key, lambda c: http.request(c, "GET", full))
                return response.body, response.headers.get("etag", "")
            except TruncatedResponse:
                if attempt == _BODY_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    async def _run(self, op: str, key: str, work: Callable[[Call], T], size: int = 0) -> T:
        """``work`` in a worker thread, bounded by the request's deadline
        (``request_deadline`` plus ``size``, and a body's size once its headers
        name it, at ``min_bytes_per_second``): at the deadline, or when cancelled,
        its socket is shut and the thread left to end. Raises StoreUnavailable
        (the deadline) and what ``work`` raises."""
        call = Call()
        scope = anyio.CancelScope(
            deadline=anyio.current_time() + self._request_deadline + size / self._min_rate
        )

        def extend(length: int) -> None:
            scope.deadline += length / self._min_rate

        call.on_length = lambda length: anyio.from_thread.run_sync(extend, length)
        finished = False
        try:
            with scope:
                result = await anyio.to_thread.run_sync(
                    work, call, abandon_on_cancel=True, limiter=self._limiter
                )
                finished = True
        except anyio.get_cancelled_exc_class():
            call.abort()  # cancelled from outside: the thread must not go on
            raise
        if not finished:  # the deadline (an error from the thread is no reason:
            call.abort()  # its connection may be back in the pool, in use again)
            raise self._too_slow(op, key)
        return result

    def _too_slow(self, op: str, key: str) -> StoreUnavailable:
        return StoreUnavailable(
            f"S3 {op} {key} at {self.endpoint} did not finish within its deadline "
            f"({self._request_deadline:.0f} s + 1 s per {self._min_rate / 1024:.0f} KiB)"
        )

    @contextmanager
    def _translate(self, op: str, key: str = "", *, wrong_region: bool = False) -> Iterator[None]:
        """Turn s3http's exceptions into blobstore errors (one line each)."""
        what = f"{op} {key}".strip()
        try:
            yield
        except S3Error as exc:
            code = exc.code
            if code in _MISSING_CODES:
                raise ObjectMissing(key or self.bucket, self.url) from exc
            if code in _CONFLICT_CODES:
                raise Conflict(f"{what} in {self.url}: conditional write refused ({code})") from exc
            if code == "NoSuchBucket":
                raise StoreUnavailable(
                    f"bucket {self.bucket} does not exist at {self.endpoint}"
                ) from exc
            error = StoreUnavailable(
                f"S3 error {code} on {what} in {self.url}: {_one_line(exc.message)}"
            )
            error.__cause__ = exc
            if wrong_region and exc.region and exc.region != self._region:
                raise BucketElsewhere(exc.region, error) from exc
            raise error from exc
        except TooLarge as exc:
            raise StoreUnavailable(
                f"S3 {what} in {self.url}: the response is too large ({exc}; "
                "max_object_size bounds what one request may hold)"
            ) from exc
        except CutShort as exc:
            raise TruncatedResponse(
                f"S3 {what}: response body cut short by {self.endpoint}: {exc}"
            ) from exc
        except NetworkError as exc:
            raise StoreUnavailable(
                f"cannot reach S3 endpoint {self.endpoint} ({op}): {exc}"
            ) from exc
        except Aborted as exc:
            raise self._too_slow(op, key) from exc


_Page = tuple[list[tuple[str, int, float]], str | None]


def _parse_listing(response: Response) -> _Page:
    """(key, size, mtime) of a ListObjectsV2 page, and the next page's token."""
    from xml.etree import ElementTree

    # S3 sends no DTD. Expat (2.4.1+) already bounds entity expansion and never
    # loads external entities; refusing any DTD leaves nothing to expand at all.
    if b"<!DOCTYPE" in response.body or b"<!ENTITY" in response.body:
        raise S3Error(response.status, "MalformedListing", "a DTD in a listing", None)
    try:
        root = ElementTree.fromstring(response.body)
    except ElementTree.ParseError as exc:
        raise S3Error(response.status, "MalformedListing", str(exc), None) from exc
    infos = []
    for entry in root.iterfind("{*}Contents"):
        name = unquote_plus(entry.findtext("{*}Key") or "")
        try:
            size = int(entry.findtext("{*}Size") or 0)
            modified = datetime.fromisoformat(
                entry.findtext("{*}LastModified") or "1970-01-01T00:00:00+00:00"
            )
        except ValueError as exc:
            raise S3Error(response.status, "MalformedListing", str(exc), None) from exc
        infos.append((name, size, modified.timestamp()))
    truncated = (root.findtext("{*}IsTruncated") or "").strip().lower() == "true"
    token = root.findtext("{*}NextContinuationToken") if truncated else None
    return infos, token or None


def _read_block(body: httpranges.RangeBody, left: int) -> bytes:
    size = min(_RANGE_BLOCK, body.remaining, left)
    return body.read(size) if size else b""


def _aws_endpoint(region: str) -> str:
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"https://s3.{region}.{suffix}"


def _botocore_endpoint(settings: S3Config, profile: ResolvedS3, bucket: str) -> tuple[str, str]:
    """(endpoint, addressing style) botocore's endpoint rules give ``bucket`` when
    FIPS, dual-stack or accelerate endpoints are configured (imports botocore)."""
    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config

    session = botocore.session.Session(profile=settings.profile)
    style = profile.addressing_style
    config = Config(signature_version=UNSIGNED, s3={"addressing_style": style})
    client = session.create_client("s3", region_name=profile.region, config=config)
    try:
        url = urlsplit(client.generate_presigned_url("head_bucket", Params={"Bucket": bucket}))
    except Exception as exc:  # botocore's endpoint rules refuse the combination
        raise ConfigError(f"S3 endpoint for bucket {bucket}: {_one_line(str(exc))}") from exc
    finally:
        client.close()
    host = url.netloc
    if host.startswith(f"{bucket}."):
        return f"{url.scheme}://{host[len(bucket) + 1 :]}", "virtual"
    return f"{url.scheme}://{host}", "path"


def _is_key(key: str) -> bool:
    try:
        validate_key(key)
    except BadInput:
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]
