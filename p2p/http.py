"""The daemon's ops side over HTTP (aiohttp): health, metrics, peers, chunk reads.

``/healthz``, ``/metrics`` (Prometheus text, or OpenMetrics when the scraper asks
for it; docs/metrics.md) and ``/peers`` are open. ``/chunks/<id>`` hands out chunk
bytes (reading home chunks through from the object store), so it needs the same
credentials as the peer wire (docs/security.md): with a cluster token, the request
must carry ``Authorization: Bearer <token>`` and arrive over TLS or from loopback
(a bearer token must not cross a network in clear); with TLS configured, a client
certificate signed by the cluster CA. Without either, it stays open, as before.
"""

from __future__ import annotations

import hmac
import ipaddress
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from blobstore.errors import PeerUnavailable
from blobstore.ids import is_id

from .liveness import PeerDirectory
from .metrics import Metrics
from .provider import ChunkProvider


def make_app(
    node: str,
    region: str,
    metrics: Metrics,
    provider: ChunkProvider,
    directory: PeerDirectory,
    token: bytes | None = None,
    tls: bool = False,
) -> web.Application:
    """``token``: the cluster token chunk reads must present; ``tls``: served over mutual
    TLS (chunk reads then also need a verified client certificate)."""

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response(
            {"ok": True, "node": node, "region": region, "peers": len(directory.live())}
        )

    async def metrics_page(request: web.Request) -> web.Response:
        body, content_type = await metrics.scrape(request.headers.get("Accept", ""))
        return web.Response(
            body=body,
            headers={"Content-Type": content_type, "X-Content-Type-Options": "nosniff"},
        )

    async def peers(request: web.Request) -> web.Response:
        return web.json_response([p.describe() for p in directory.all()])

    async def chunk(request: web.Request) -> web.Response:
        try:
            _check_credentials(request, token, tls)
        except web.HTTPException:
            metrics.auth_failures += 1
            raise
        chunk_id = request.match_info["id"]
        if not is_id(chunk_id):
            raise web.HTTPBadRequest(text="not a chunk id\n")
        data, _ = await provider.lookup(chunk_id)  # type: ignore[arg-type]
        if data is None:
            raise web.HTTPNotFound(text="chunk not held here\n")
        return web.Response(body=data, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/peers", peers)
    app.router.add_get("/chunks/{id}", chunk)
    return app


def _check_credentials(request: web.Request, token: bytes | None, tls: bool) -> None:
    """Raise an HTTP 401/403 unless the request may read chunk bytes."""
    transport = request.transport
    if tls and not (transport is not None and transport.get_extra_info("peercert")):
        raise web.HTTPUnauthorized(
            text="chunk reads need a client certificate signed by the cluster CA\n"
        )
    if token is None:
        return
    if not tls and not _from_loopback(request):
        raise web.HTTPForbidden(
            text="chunk reads with a cluster token need TLS (--tls-cert) or loopback\n"
        )
    scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(credential.strip().encode(), token):
        raise web.HTTPUnauthorized(
            headers={"WWW-Authenticate": 'Bearer realm="blobstore"'},
            text="chunk reads need Authorization: Bearer <cluster token>\n",
        )


def _from_loopback(request: web.Request) -> bool:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    if not isinstance(peer, tuple) or not peer:
        return False
    try:
        address = ipaddress.ip_address(str(peer[0]).partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


@asynccontextmanager
async def http_serving(
    app: web.Application,
    host: str,
    port: int,
    tls: ssl.SSLContext | None = None,
    *,
    shutdown_timeout: float = 60.0,
) -> AsyncIterator[int]:
    """Serve ``app`` (over TLS with ``tls``); yield the bound port. Leaving waits up
    to ``shutdown_timeout`` for requests being answered.

    Raises PeerUnavailable if it cannot listen."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=tls)
        try:
            await site.start()
        except OSError as exc:
            raise PeerUnavailable(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()
