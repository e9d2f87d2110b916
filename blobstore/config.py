"""Typed, frozen configuration. Built once (CLI or ``Config.from_env``) and
passed into constructors; nothing reads the environment behind your back."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, get_args
from urllib.parse import urlsplit

from .errors import ConfigError
from .hostport import peer_address

RACY_WINDOW_NS = 2_000_000_000
"""Files changed less than this before a push began are not recorded in its push
index (push.py explains why); here so a pull need not import push.py for it."""
FRESH_NS = 3600 * 1_000_000_000
"""How long after a LIST (or a push) last saw the packs a push index names a no-op
push trusts that they still exist (see push.py)."""
DEFAULT_CACHE_BYTES = 50 << 30
MIN_CACHE_BYTES = 1 << 20
"""A smaller cache cannot hold even one chunk: ``--cache-size 50`` meant 50G, not 50 bytes."""
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtp]i?b?|b)?", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str, *, minimum: int = 0, what: str = "size") -> int:
    """Parse ``10G``, ``512MiB``, ``1.5T``, ``1000`` into bytes. Units are binary
    (K = 1024, G = 2**30, with or without ``i``/``B``); a bare number is bytes.

    Raises ConfigError, in one line: not a size, or below ``minimum`` (a bare
    number below it is almost surely a missing unit, so the hint says so).
    """
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise ConfigError(f"{what} {text!r} is not a size (try 10G or 512M)")
    unit = (m.group(2) or "").lower()[:1]
    size = int(float(m.group(1)) * _UNITS[unit])
    if size < minimum:
        missing_unit = not m.group(2) and 0 < float(m.group(1)) <= 1 << 16
        hint = f": did you mean {m.group(1)}G?" if missing_unit else ""
        raise ConfigError(
            f"{what} {text.strip()!r} is {size} bytes, below the {_human(minimum)} minimum{hint}"
        )
    return size


def _human(size: int) -> str:
    for unit in "PTGMK":
        if size >= _UNITS[unit.lower()] and size % _UNITS[unit.lower()] == 0:
            return f"{size // _UNITS[unit.lower()]}{unit}"
    return f"{size}B"


@dataclass(frozen=True, slots=True)
class CacheConfig:
    dir: Path
    max_bytes: int = DEFAULT_CACHE_BYTES
    high_watermark: float = 0.95
    """Evict when the cache grows above this fraction of max_bytes ..."""
    low_watermark: float = 0.80
    """... down to this fraction."""

    def __post_init__(self) -> None:
        if not 0 < self.low_watermark <= self.high_watermark <= 1:
            raise ConfigError("cache watermarks must satisfy 0 < low <= high <= 1")
        if self.max_bytes <= 0:
            raise ConfigError("cache size must be positive")


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for mutual TLS between peers: this node's certificate chain and
    key, and the CA that signs every cluster member's certificate."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def parse(cls, cert: str, key: str, ca: str) -> TlsFiles | None:
        """None if no file is named. Raises ConfigError unless all three are."""
        if not (cert or key or ca):
            return None
        if not (cert and key and ca):
            raise ConfigError(
                "mutual TLS needs all of --tls-cert, --tls-key and --tls-ca "
                "(env BLOBSTORE_TLS_CERT, BLOBSTORE_TLS_KEY, BLOBSTORE_TLS_CA)"
            )
        return cls(Path(cert).expanduser(), Path(key).expanduser(), Path(ca).expanduser())


@dataclass(frozen=True, slots=True)
class PeerConfig:
    mode: str = "auto"
    """``auto`` (zeroconf), ``none``, or ``static``."""
    static: tuple[str, ...] = ()
    """``host:port`` entries when mode is ``static``."""
    token: bytes | None = None
    tls: TlsFiles | None = None
    """Mutual TLS for the peer wire and the daemon's HTTP side; None: plain TCP."""

    @classmethod
    def parse(cls, text: str, token: bytes | None = None) -> PeerConfig:
        text = text.strip()
        if text in ("auto", "none", ""):
            return cls(mode=text or "none", token=token)
        peers = tuple(p.strip() for p in text.split(",") if p.strip())
        for p in peers:
            peer_address(p)  # raises ConfigError
        return cls(mode="static", static=peers, token=token)


AddressingStyle = Literal["auto", "path", "virtual"]
ADDRESSING_STYLES: tuple[str, ...] = get_args(AddressingStyle)
_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


@dataclass(frozen=True, slots=True)
class S3Config:
    """How to reach S3, resolved once (``from_env``) and handed to the store,
    which reads no environment variable itself (botocore still finds the
    credentials and the profile's own settings, as the AWS CLI does)."""

    endpoint_url: str | None = None
    """``http(s)://host[:port]``; None: the profile's configured endpoint
    (``endpoint_url``, or its ``services`` section), else AWS."""
    profile: str | None = None
    """A profile of the AWS config and credentials files; None: the default."""
    region: str | None = None
    """None: the profile's region, else us-east-1."""
    addressing_style: AddressingStyle | None = None
    """None: the profile's ``s3.addressing_style``, else ``path`` for a custom
    endpoint (SeaweedFS, MinIO and 127.0.0.1 rarely have bucket DNS names) and
    ``auto`` for AWS."""
    use_profile_endpoint: bool = True
    """False (``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true``): only an explicit
    ``endpoint_url`` counts, never one configured in the profile."""

    def __post_init__(self) -> None:
        if self.endpoint_url is not None:
            check_endpoint_url(self.endpoint_url, "endpoint URL")
        if self.addressing_style is not None and self.addressing_style not in ADDRESSING_STYLES:
            raise ConfigError(
                f"S3 addressing style {self.addressing_style!r} is not one of "
                + "|".join(ADDRESSING_STYLES)
            )
        if self.profile is not None and not self.profile.strip():
            raise ConfigError("AWS profile name is empty")

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        endpoint_url: str | None = None,
        profile: str | None = None,
    ) -> S3Config:
        """The AWS conventions: ``endpoint_url`` (``--endpoint-url``) wins, then
        ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL`` (both ignored, like the
        profile's endpoint, when ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS`` is
        true); ``profile`` (``--profile``) wins over ``AWS_PROFILE``; region
        from ``AWS_REGION`` or ``AWS_DEFAULT_REGION``. Raises ConfigError."""
        env = os.environ if env is None else env
        ignore = _boolean(env, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")
        if endpoint_url is None and not ignore:
            for var in _ENDPOINT_VARS:
                if var in env:
                    endpoint_url = check_endpoint_url(env[var], var)
                    break
        elif endpoint_url is not None:
            endpoint_url = check_endpoint_url(endpoint_url, "--endpoint-url")
        if profile is None:
            profile = env.get("AWS_PROFILE") or None
        elif not profile.strip():
            raise ConfigError("--profile is empty: name a profile of the AWS config file")
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
        return cls(endpoint_url, profile, region, use_profile_endpoint=not ignore)


def check_endpoint_url(value: str, name: str) -> str:
    """``value`` stripped, if it is ``http(s)://host[:port]``. Raises ConfigError
    naming ``name`` (the option or variable it came from)."""
    expected = "expected http://host[:port] or https://host[:port]"
    if not value.strip():
        raise ConfigError(f"{name} is set but empty: unset it, or {expected}")
    try:
        parts = urlsplit(value.strip())
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        _ = parts.port  # raises ValueError for a bad port
    except ValueError:
        valid = False
    if not valid:
        raise ConfigError(f"{name}={value!r} is not an endpoint URL: {expected}")
    return value.strip()


def _boolean(env: Mapping[str, str], var: str) -> bool:
    """A true/false variable, as botocore reads it (unset: false). Raises ConfigError."""
    text = env.get(var, "").strip().lower()
    if text in ("", "false"):
        return False
    if text == "true":
        return True
    raise ConfigError(f"{var}={env[var]!r}: expected true or false")


@dataclass(frozen=True, slots=True)
class Config:
    store_url: str
    cache: CacheConfig
    region: str = "default"
    peers: PeerConfig = field(default_factory=PeerConfig)
    concurrency: int = 16
    """Chunks in flight per pull/push (bounds memory: ~concurrency x 4 MiB)."""
    s3: S3Config = field(default_factory=S3Config.from_env)
    """Used when ``store_url`` is ``s3://``. By default from the AWS_* variables,
    as boto3 and the AWS CLI do: a ``Config`` built in code reaches the same
    endpoint the CLI would (resolved here, once; the store reads no variable)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: str | None) -> Config:
        """Build from BLOBSTORE_* variables; non-None ``overrides`` win
        (keys: store, cache, region, peers, token_file, cache_size, tls_cert, tls_key,
        tls_ca, endpoint_url, profile). Raises ConfigError."""
        env = os.environ if env is None else env

        def pick(key: str, var: str, default: str | Callable[[], str]) -> str:
            val = overrides.get(key)
            if val is None:
                val = env.get(var)
            if val is None:  # a callable default is computed only when used
                return default() if callable(default) else default
            return val

        store = pick("store", "BLOBSTORE_STORE", default_store_url)
        cache_dir = Path(pick("cache", "BLOBSTORE_CACHE", default_cache_dir)).expanduser()
        cache_size = parse_size(
            pick("cache_size", "BLOBSTORE_CACHE_SIZE", "").strip() or str(DEFAULT_CACHE_BYTES),
            minimum=MIN_CACHE_BYTES,
            what="cache size",
        )
        region = pick("region", "BLOBSTORE_REGION", "default")
        token_file = pick("token_file", "BLOBSTORE_TOKEN_FILE", "")
        token = read_token(Path(token_file)) if token_file else None
        peers = PeerConfig.parse(pick("peers", "BLOBSTORE_PEERS", "auto"), token)
        tls = TlsFiles.parse(
            pick("tls_cert", "BLOBSTORE_TLS_CERT", ""),
            pick("tls_key", "BLOBSTORE_TLS_KEY", ""),
            pick("tls_ca", "BLOBSTORE_TLS_CA", ""),
        )
        if tls is not None:
            peers = replace(peers, tls=tls)
        s3 = S3Config.from_env(
            env, endpoint_url=overrides.get("endpoint_url"), profile=overrides.get("profile")
        )
        return cls(
            store_url=store,
            cache=CacheConfig(cache_dir, cache_size),
            region=region,
            peers=peers,
            s3=s3,
        )


# platformdirs is imported only when a default is needed: it loads tempfile,
# shutil, random and lzma (~5 ms), and a configured node never asks.
def default_store_url() -> str:
    import platformdirs

    return "file://" + str(Path(platformdirs.user_data_dir("blobstore")) / "store")


def default_cache_dir() -> str:
    import platformdirs

    return str(Path(platformdirs.user_cache_dir("blobstore")) / "chunks")


def read_token(path: Path) -> bytes:
    """Read a cluster token file. Raises ConfigError."""
    try:
        token = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read token file {path}: {exc.strerror}") from exc
    if not token:
        raise ConfigError(f"token file {path} is empty")
    return token
