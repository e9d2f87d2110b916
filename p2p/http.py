"""The daemon's ops side over HTTP (aiohttp): health, metrics, debug reads."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from blobstore.errors import PeerUnavailable
from blobstore.ids import is_id

from .liveness import PeerDirectory
from .metrics import Metrics
from .provider import ChunkProvider


def make_app(
    node: str, region: str, metrics: Metrics, provider: ChunkProvider, directory: PeerDirectory
) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "node": node, "region": region,
                                  "peers": len(directory.live())})

    async def metrics_page(request: web.Request) -> web.Response:
        return web.Response(text=metrics.render(), content_type="text/plain",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def peers(request: web.Request) -> web.Response:
        return web.json_response([p.describe() for p in directory.all()])

    async def chunk(request: web.Request) -> web.Response:
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


@asynccontextmanager
async def http_serving(app: web.Application, host: str, port: int) -> AsyncIterator[int]:
    """Serve ``app``; yield the bound port. Raises PeerUnavailable if it cannot listen."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise PeerUnavailable(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()
