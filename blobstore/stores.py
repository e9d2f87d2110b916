"""Open an ``ObjectStore`` from its URL, and the key rules every back-end shares.

Accepted URLs:

- ``file:///abs/dir`` (also ``file://localhost/abs/dir``), or a bare path
  (``/abs/dir``, ``./rel/dir``, ``~/dir``): a directory, created if missing;
- ``s3://bucket`` or ``s3://bucket/prefix``: endpoint, credentials and region
  follow the AWS conventions (``AWS_ENDPOINT_URL``, keys, ``AWS_PROFILE``,
  ``AWS_REGION``, default ``us-east-1``).

``file://relative/dir`` is refused: in a URL the first component is a host.
"""

from __future__ import annotations

import re
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from .errors import BadInput, ConfigError

if TYPE_CHECKING:
    from .objectstore import ObjectStore

MAX_KEY_BYTES = 1024
# S3 bucket naming rules (lowercase, 3-63 chars, no leading/trailing dot or dash).
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_URL_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def validate_key(key: str) -> str:
    """Check an object key and return it unchanged.

    Keys are relative ``/``-separated paths: not empty, no empty, ``.`` or ``..``
    segments, no segment starting with ``.`` (those names are reserved for the
    file store's temp and lock files), no backslash or NUL, at most 1 KiB.
    Raises BadInput.
    """
    if not isinstance(key, str) or not key:
        raise BadInput("object key must be a non-empty string")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise BadInput(f"object key too long: {key[:60]!r}…")
    if "\\" in key or "\x00" in key:
        raise BadInput(f"object key contains a backslash or NUL: {key!r}")
    if any(not part or part.startswith(".") for part in key.split("/")):
        raise BadInput(f"object key must be a relative path without ., .. or hidden parts: {key!r}")
    return key


def validate_prefix(prefix: str) -> str:
    """Check a listing prefix (empty, or a key prefix). Raises BadInput."""
    if prefix == "":
        return prefix
    # A prefix may stop mid-segment or after a "/"; validate it as if completed.
    validate_key(prefix + "x" if prefix.endswith("/") else prefix)
    return prefix


def open_object_store(url: str) -> AbstractAsyncContextManager[ObjectStore]:
    """Return an async context manager yielding the store at ``url``.

    Raises ConfigError for a malformed or unsupported URL; entering the S3 store
    raises StoreUnavailable when the endpoint or bucket cannot be reached.
    """
    text = url.strip()
    if not text:
        raise ConfigError("empty object store URL")
    if text.startswith("s3://"):
        bucket, prefix = parse_s3_url(text)
        from .s3store import S3ObjectStore  # aiobotocore is only imported when needed

        return S3ObjectStore(bucket, prefix)
    from .filestore import FileObjectStore

    return FileObjectStore(parse_file_url(text), create=True)


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
    """Turn ``file:///dir`` or a bare path into an absolute Path. Raises ConfigError."""
    if url.startswith("file://"):
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
    if _URL_SCHEME_RE.match(url) or url.startswith("file:"):
        scheme = url.split(":", 1)[0]
        raise ConfigError(f"unsupported object store URL scheme {scheme!r} (use file:// or s3://)")
    return Path(url).expanduser().absolute()
