"""Open an ``ObjectStore`` from its URL (the key rules are in objectstore.py).

Accepted forms, and nothing else:

- ``s3://bucket`` or ``s3://bucket/prefix``: endpoint, profile and region
  from a ``config.S3Config`` (by default ``S3Config.from_env()``: the AWS
  conventions), credentials as the AWS CLI finds them (s3profile.py);
- ``file:///abs/dir`` (also ``file://localhost/abs/dir``): a directory, created
  if missing;
- an explicit path to a directory: ``/abs/dir``, ``./rel/dir``, ``../rel/dir``,
  ``~/dir`` (or ``~user/dir``), ``.`` or ``..``.

Everything else is a ConfigError naming the likely fix, because a typo must
never silently become a new directory that a push then fills: other schemes
(``http://…``), ``file://relative/dir`` (in a URL the first component is a
host), a first component that looks like a scheme (``s3:/bucket/x``,
``s3:bucket``, ``file:/dir`` — "did you mean s3://bucket/x?"), and a bare
relative path (``bucket/x``: write ``./bucket/x`` or ``s3://bucket/x``). A
directory whose name has a colon is still reachable as ``./s3:x``.
Schemes are case-insensitive (``S3://bucket`` is ``s3://bucket``).

``LazyObjectStore`` opens a store on first use when it cannot be opened at
once, for a node that must start while its store is down (the runner's
offline fallback: a complete local copy needs no store).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Collection
from contextlib import AbstractAsyncContextManager, AsyncExitStack, aclosing
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from .config import S3Config
from .errors import BadInput, ConfigError, StoreUnavailable
from .objectstore import validate_key
from .resource import AsyncResource

if TYPE_CHECKING:
    from .objectstore import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

# S3 bucket naming rules (lowercase, 3-63 chars, no leading/trailing dot or dash).
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_URL_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_SCHEME_LIKE_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):/*(.*)", re.DOTALL)
"""A first path component such as ``s3:`` or ``http:`` (a URL with a typo)."""
_TYPO_SCHEMES = ("s3", "file")
"""``s3//bucket`` or ``file//dir``: a URL missing its colon."""
_EXPLICIT_PATH = ("/", "./", "../", "~")


def open_object_store(
    url: str, s3: S3Config | None = None
) -> AbstractAsyncContextManager[ObjectStore]:
    """Return an async context manager yielding the store at ``url``; an S3
    store is configured by ``s3`` (None: ``S3Config.from_env()``).

    Raises ConfigError for a malformed or unsupported URL or S3 setting (at
    once, before anything is touched); entering the S3 store raises
    StoreUnavailable when the endpoint or bucket cannot be reached.
    """
    text = url.strip()
    if not text:
        raise ConfigError("empty object store URL (use s3://bucket/prefix, file:///dir or ./dir)")
    if url_scheme(text) == "s3":
        bucket, prefix = parse_s3_url(text)
        from .s3store import S3ObjectStore  # http.client and ssl only when needed

        return S3ObjectStore(bucket, prefix, S3Config.from_env() if s3 is None else s3)
    from .filestore import FileObjectStore

    return FileObjectStore(parse_file_url(text), create=True)


def url_scheme(url: str) -> str | None:
    """The lowercased scheme of ``scheme://…``, or None for anything else."""
    match = _URL_SCHEME_RE.match(url)
    return match.group(1).lower() if match else None


def parse_s3_url(url: str) -> tuple[str, str]:
    """Split ``s3://bucket/prefix`` into (bucket, prefix without slashes). Raises ConfigError."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or parts.query or parts.fragment:
        raise ConfigError(f"not an s3 URL: {url!r} (expected s3://bucket/prefix)")
    bucket = parts.netloc
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise ConfigError(f"bad S3 bucket name {bucket!r} in {url!r}")
    prefix = parts.path.strip("/")
    if prefix:
        try:
            validate_key(prefix)
        except BadInput as exc:
            raise ConfigError(f"bad S3 prefix in {url!r}: {exc}") from exc
    return bucket, prefix


def parse_file_url(url: str) -> Path:
    """Turn ``file:///dir`` or an explicit path into an absolute Path. Raises ConfigError."""
    scheme = url_scheme(url)
    if scheme == "file":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(
                f"file URL must hold an absolute path: {url!r} (try file:///{parts.netloc}…)"
            )
        if parts.query or parts.fragment:
            raise ConfigError(f"file URL must not have a query or fragment: {url!r}")
        path = Path(unquote(parts.path))
        if not path.is_absolute():
            raise ConfigError(f"file URL must hold an absolute path: {url!r}")
        return path
    if scheme is not None:
        raise ConfigError(
            f"unsupported object store URL scheme {scheme!r} in {url!r} "
            "(use s3://bucket/prefix, file:///abs/dir or a path like ./dir)"
        )
    if url.startswith(_EXPLICIT_PATH) or url in (".", ".."):
        return Path(url).expanduser().absolute()
    raise ConfigError(_not_a_store(url))


def _not_a_store(url: str) -> str:
    """The one-line refusal of a store that is neither a URL nor an explicit path."""
    first, _, rest = url.partition("/")
    typo = _SCHEME_LIKE_RE.fullmatch(first + "/" + rest) if ":" in first else None
    if typo is None and first.lower() in _TYPO_SCHEMES and rest.startswith("/"):
        typo = _SCHEME_LIKE_RE.fullmatch(f"{first}:{rest}")
    if typo is not None:
        scheme, tail = typo.group(1).lower(), typo.group(2)
        if scheme == "s3":
            hint = f"did you mean s3://{tail}?"
        elif scheme == "file":
            hint = f"did you mean file:///{tail}?"
        else:
            hint = "use s3://bucket/prefix or file:///abs/dir"
        return f"object store {url!r} looks like a mistyped URL: {hint} (a directory: ./{url})"
    return (
        f"object store {url!r} is neither a URL nor an explicit path: "
        f"write ./{url} for a directory here, or s3://{url} for a bucket"
    )


class LazyObjectStore(AsyncResource):
    """The store at ``url``, opened when first needed if it cannot be opened at once.

    Entering tries to open the store; when it is unreachable (StoreUnavailable)
    entering still succeeds, with a warning. Every operation then tries to open
    it again — at most once per ``retry_seconds``; in between it fails at once
    — and raises that StoreUnavailable until the store answers. A bad URL or
    configuration (ConfigError) still raises at once, when built or entered.
    """

    def __init__(self, url: str, s3: S3Config | None = None, retry_seconds: float = 5.0) -> None:
        self._s3 = S3Config.from_env() if s3 is None else s3
        open_object_store(url, self._s3)  # refuse a bad URL now, not on first use
        self.url = url
        self._retry_seconds = retry_seconds
        self._stack = AsyncExitStack()
        self._store: ObjectStore | None = None
        self._failure: StoreUnavailable | None = None
        self._next_try = 0.0
        import anyio  # here: parse_file_url's users (the CLI's re-pull) need no event loop

        self._lock = anyio.Lock()

    async def open(self) -> None:
        try:
            await self._ready()
        except StoreUnavailable as exc:
            log.warning("object store unreachable; it is opened when first needed: %s", exc)

    async def aclose(self) -> None:
        self._store = None
        await self._stack.aclose()

    async def opened(self) -> ObjectStore:
        """The open store itself (the origin reads a ``file://`` or S3 store's packs
        by its own fast paths, which a wrapper would hide). Raises StoreUnavailable
        (from this attempt or a recent one)."""
        return await self._ready()

    async def _ready(self) -> ObjectStore:
        """The open store. Raises StoreUnavailable (from this attempt or a recent one)."""
        if self._store is not None:
            return self._store
        async with self._lock:
            if self._store is not None:
                return self._store
            if self._failure is not None and time.monotonic() < self._next_try:
                raise StoreUnavailable(str(self._failure)) from self._failure
            stack = AsyncExitStack()
            try:
                store = await stack.enter_async_context(open_object_store(self.url, self._s3))
            except StoreUnavailable as exc:
                self._failure, self._next_try = exc, time.monotonic() + self._retry_seconds
                raise
            self._stack, self._store, self._failure = stack, store, None
            self.url = store.url
            return store

    async def get(self, key: str) -> bytes:
        return await (await self._ready()).get(key)

    async def put(self, key: str, data: bytes | bytearray) -> None:
        await (await self._ready()).put(key, data)

    async def put_if(self, key: str, data: bytes, expected: bytes | None) -> None:
        await (await self._ready()).put_if(key, data, expected)

    async def get_range(self, key: str, offset: int, length: int) -> AsyncGenerator[bytes, None]:
        store = await self._ready()
        async with aclosing(store.get_range(key, offset, length)) as blocks:
            async for block in blocks:
                yield block

    async def exists(self, key: str) -> bool:
        return await (await self._ready()).exists(key)

    async def exists_many(self, keys: Collection[str]) -> set[str]:
        return await (await self._ready()).exists_many(keys)

    async def delete(self, key: str) -> None:
        await (await self._ready()).delete(key)

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        async for info in (await self._ready()).list(prefix):
            yield info
