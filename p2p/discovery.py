"""Zeroconf (mDNS): announce this daemon and find same-region peers.

Service ``_blobstore._tcp.local.``; TXT ``region``, ``node``, ``version``,
``port``. mDNS only *finds* peers; whether they are alive is liveness.py's job.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import ifaddr
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from .liveness import PeerDirectory
from .messages import VERSION

log = logging.getLogger(__name__)

SERVICE_TYPE = "_blobstore._tcp.local."


def _txt(info: AsyncServiceInfo, key: str) -> str:
    raw = info.properties.get(key.encode())
    return raw.decode(errors="replace") if isinstance(raw, bytes) else ""


def _addresses(host: str) -> list[str]:
    """Addresses to announce: the listen address, or every non-loopback IPv4 one."""
    if host not in ("", "0.0.0.0", "::"):
        return [socket.gethostbyname(host)]
    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback:
                found.append(ip.ip)
    return found or ["127.0.0.1"]


def _service_name(node: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in node)[:60]
    return f"{safe}.{SERVICE_TYPE}"


@asynccontextmanager
async def zeroconf_session(
    node: str, region: str, host: str, port: int | None, directory: PeerDirectory | None
) -> AsyncIterator[AsyncZeroconf]:
    """Announce (when ``port`` is set) and browse (when ``directory`` is set) until exit.

    Unregistering on exit sends the goodbye packets, so peers drop us at once.
    """
    azc = AsyncZeroconf()
    info: AsyncServiceInfo | None = None
    try:
        if port is not None:
            addresses = _addresses(host)
            info = AsyncServiceInfo(
                SERVICE_TYPE,
                _service_name(node),
                port=port,
                parsed_addresses=addresses,
                properties={
                    "region": region,
                    "node": node,
                    "version": str(VERSION),
                    "port": str(port),
                },
                server=f"{_service_name(node).split('.')[0]}.local.",
            )
            # Both calls return a task that must itself be awaited.
            await (await azc.async_register_service(info, allow_name_change=True))
            log.info("announced %s on %s port %d", node, ",".join(addresses), port)
        async with asyncio.TaskGroup() as tg:
            browser = None
            if directory is not None:
                browser = _Browser(azc, node, region, directory)
                tg.create_task(browser.resolve_loop())
            try:
                yield azc
            finally:
                if browser is not None:
                    await browser.aclose()
    finally:
        if info is not None:
            await (await azc.async_unregister_service(info))
        await azc.async_close()


class _Browser:
    """Feeds resolved same-region services into the directory."""

    def __init__(self, azc: AsyncZeroconf, node: str, region: str, directory: PeerDirectory):
        self._azc = azc
        self._node = node
        self._region = region
        self._directory = directory
        self._queue: asyncio.Queue[tuple[str, ServiceStateChange] | None] = asyncio.Queue()
        self._addresses: dict[str, list[str]] = {}
        self._browser = AsyncServiceBrowser(azc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        self._queue.put_nowait((name, state_change))

    async def resolve_loop(self) -> None:
        while (item := await self._queue.get()) is not None:
            try:
                await self._handle(*item)
            except Exception:  # one odd announcement must not stop discovery
                log.exception("cannot handle mDNS record %s", item[0])

    async def _handle(self, name: str, change: ServiceStateChange) -> None:
        if change is ServiceStateChange.Removed:
            for address in self._addresses.pop(name, []):
                self._directory.remove(address)
            return
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._azc.zeroconf, 3000):
            log.debug("could not resolve %s", name)
            return
        node, region = _txt(info, "node"), _txt(info, "region")
        if node == self._node:
            return
        if region != self._region:
            log.info("ignoring %s: region %r is not ours (%r)", node, region, self._region)
            return
        addresses = [f"{ip}:{info.port}" for ip in info.parsed_addresses(version=_V4)]
        self._addresses[name] = addresses
        for address in addresses:
            self._directory.add(address, "mdns", node, region)

    async def aclose(self) -> None:
        await self._browser.async_cancel()
        self._queue.put_nowait(None)


_V4 = IPVersion.V4Only
