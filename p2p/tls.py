"""Mutual TLS contexts for the peer wire and the daemon's HTTP side (stdlib ssl).

The cluster CA is the trust boundary: any certificate it signed is a cluster
member, whatever address it is reached at (peers are found by mDNS and gossip,
as bare IP:PORT), so host names are not checked. TLS 1.2 or newer only.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from blobstore.config import TlsFiles
from blobstore.errors import ConfigError


@dataclass(frozen=True, slots=True)
class TlsContexts:
    wire_server: ssl.SSLContext
    """Daemon side of the peer wire: a client certificate signed by the CA is required."""
    client: ssl.SSLContext
    """Dialing peers (daemons and pulls): presents our certificate, requires theirs."""
    http: ssl.SSLContext
    """The ops HTTP side: client certificates are verified when presented, so probes
    without one still read /healthz and /metrics; /chunks/<id> requires one."""


def load_contexts(files: TlsFiles) -> TlsContexts:
    """Build all three contexts (blocking file reads). Raises ConfigError."""
    return TlsContexts(
        _context(files, ssl.Purpose.CLIENT_AUTH, ssl.CERT_REQUIRED),
        _context(files, ssl.Purpose.SERVER_AUTH, ssl.CERT_REQUIRED),
        _context(files, ssl.Purpose.CLIENT_AUTH, ssl.CERT_OPTIONAL),
    )


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """The context a pulling node dials peers with (blocking). Raises ConfigError."""
    return _context(files, ssl.Purpose.SERVER_AUTH, ssl.CERT_REQUIRED)


def _context(files: TlsFiles, purpose: ssl.Purpose, verify: ssl.VerifyMode) -> ssl.SSLContext:
    serving = purpose is ssl.Purpose.CLIENT_AUTH
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if serving else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = verify
    try:
        ctx.load_cert_chain(files.cert, files.key)
    except OSError as exc:  # ssl.SSLError included
        raise ConfigError(
            f"cannot load TLS certificate {files.cert} with key {files.key}: {_reason(exc)}"
        ) from exc
    try:
        ctx.load_verify_locations(cafile=files.ca)
    except OSError as exc:
        raise ConfigError(f"cannot load TLS CA {files.ca}: {_reason(exc)}") from exc
    return ctx


def _reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc)
