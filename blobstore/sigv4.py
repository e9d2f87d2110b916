"""AWS Signature Version 4 for S3: a pure core (strings in, headers out, no I/O).

Why our own and not botocore's signer or awscrt's: botocore's ``auth`` module
pulls in ``botocore`` (~0.12 s of imports, measured) and awscrt is a native
wheel of several MB for what is ~100 lines of ``hashlib``/``hmac``. The output
is checked byte for byte against botocore's ``S3SigV4Auth`` and
``S3SigV4QueryAuth`` on many requests (tests/test_sigv4.py).

S3's flavour of SigV4: the canonical URI is the path as sent (no
normalisation, no double encoding), and the payload hash is sent in
``x-amz-content-sha256`` (``UNSIGNED-PAYLOAD`` when the body is not hashed).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

from .errors import ConfigError

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_ALGORITHM = "AWS4-HMAC-SHA256"
_UNSIGNED_HEADERS = frozenset({"user-agent", "content-length", "expect", "connection"})
"""Headers sent but never signed (proxies and http.client may change them)."""
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True, slots=True)
class Credentials:
    access_key: str
    secret_key: str = ""
    token: str | None = None

    def __post_init__(self) -> None:
        # The key and the token travel in headers: a stray newline or space (a
        # file read with its line end) would make http.client raise an error
        # that quotes the whole value. Refused here, naming neither.
        for name, value in (("access key id", self.access_key), ("session token", self.token)):
            if value and not _HEADER_SAFE.fullmatch(value):
                raise ConfigError(
                    f"the AWS {name} holds a space, a control or a non-ASCII character"
                    " (a line end copied with it?)"
                )

    def __repr__(self) -> str:  # never print a secret
        return f"Credentials({self.access_key!r}, token={'yes' if self.token else 'no'})"


def quote_path(path: str) -> str:
    """A key's path as S3 expects it on the wire and in the canonical request."""
    return quote(path, safe="/~")


def canonical_query(params: Iterable[tuple[str, str]]) -> str:
    """``a=1&b=2``: names and values percent-encoded (RFC 3986), sorted."""
    pairs = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in params)
    return "&".join(f"{k}={v}" for k, v in pairs)


def host_header(scheme: str, host: str, port: int | None) -> str:
    """The Host header: the port only when it is not the scheme's default."""
    default = 443 if scheme == "https" else 80
    return host if port in (None, default) else f"{host}:{port}"


def timestamp(now: datetime | None = None) -> str:
    """``20261127T221343Z`` (UTC)."""
    return (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")


def sign_headers(
    credentials: Credentials,
    region: str,
    method: str,
    path: str,
    query: str,
    headers: Mapping[str, str],
    payload_hash: str = UNSIGNED_PAYLOAD,
    amz_date: str | None = None,
    service: str = "s3",
) -> dict[str, str]:
    """``headers`` (which must hold ``host``) plus the signature headers:
    x-amz-date, x-amz-content-sha256, x-amz-security-token, Authorization.
    ``path`` is quoted (``quote_path``), ``query`` canonical (``canonical_query``)."""
    amz_date = amz_date or timestamp()
    signed = {k.lower(): v for k, v in headers.items()}
    signed["x-amz-date"] = amz_date
    signed["x-amz-content-sha256"] = payload_hash
    if credentials.token:
        signed["x-amz-security-token"] = credentials.token
    names = sorted(k for k in signed if k not in _UNSIGNED_HEADERS)
    canonical = "\n".join(
        [
            method,
            path,
            query,
            "".join(f"{k}:{' '.join(signed[k].split())}\n" for k in names),
            ";".join(names),
            payload_hash,
        ]
    )
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    signature = _signature(credentials.secret_key, scope, amz_date, canonical)
    signed["Authorization"] = (
        f"{_ALGORITHM} Credential={credentials.access_key}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return signed


def presign_query(
    credentials: Credentials,
    region: str,
    method: str,
    path: str,
    host: str,
    expires: int,
    params: Iterable[tuple[str, str]] = (),
    amz_date: str | None = None,
    service: str = "s3",
) -> str:
    """The query string of a pre-signed URL (only ``host`` signed, payload unsigned)."""
    amz_date = amz_date or timestamp()
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    auth = [
        ("X-Amz-Algorithm", _ALGORITHM),
        ("X-Amz-Credential", f"{credentials.access_key}/{scope}"),
        ("X-Amz-Date", amz_date),
        ("X-Amz-Expires", str(expires)),
        ("X-Amz-SignedHeaders", "host"),
    ]
    if credentials.token:
        auth.append(("X-Amz-Security-Token", credentials.token))
    query = canonical_query([*params, *auth])
    canonical = "\n".join([method, path, query, f"host:{host}\n", "host", UNSIGNED_PAYLOAD])
    return (
        f"{query}&X-Amz-Signature={_signature(credentials.secret_key, scope, amz_date, canonical)}"
    )


def _signature(secret: str, scope: str, amz_date: str, canonical: str) -> str:
    to_sign = "\n".join(
        [_ALGORITHM, amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = _signing_key(secret, scope)
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def _signing_key(secret: str, scope: str) -> bytes:
    date, region, service, _ = scope.split("/")
    key = f"AWS4{secret}".encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key
