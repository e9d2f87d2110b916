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

from blobstore.errors import ConfigError
from blobstore.resource import AsyncResource

from .liveness import PeerDirectory
from .messages import VERSION

log = logging.getLogger(__name__)

SERVICE_TYPE = "_blobstore._tcp.local."
MAX_PENDING = 1024
"""Service names waiting to be resolved, at most (a region's peers fit many times)."""


def _txt(info: AsyncServiceInfo, key: str) -> str:
    raw = info.properties.get(key.encode())
    return raw.decode(errors="replace") if isinstance(raw, bytes) else ""


async def _addresses(host: str) -> list[str]:
    """Addresses to announce: the listen address, or every non-loopback IPv4 one.
    Raises ConfigError when the listen host does not resolve."""
    if host not in ("", "0.0.0.0", "::"):
        try:  # the resolver blocks: asyncio runs it in a worker thread
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, None, family=socket.AF_INET, type=socket.SOCK_STREAM
            )
        except socket.gaierror as exc:
            raise ConfigError(f"cannot resolve listen host {host!r}: {exc.strerror}") from exc
        return list(dict.fromkeys(str(info[4][0]) for info in infos))
    return await asyncio.to_thread(_interface_addresses)  # (netlink: blocking too)


def _interface_addresses() -> list[str]:
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
            addresses = await _addresses(host)
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
        if directory is None:
            yield azc
        else:
            async with (
                _Browser(azc, node, region, directory) as browser,
                asyncio.TaskGroup() as tg,
            ):
                tg.create_task(browser.resolve_loop())
                try:
                    yield azc
                finally:
                    browser.stop()
    finally:
        if info is not None:
            await (await azc.async_unregister_service(info))
        await azc.async_close()


class _Browser(AsyncResource):
    """Feeds resolved same-region services into the directory.

    Changes wait in a dict by service name, the latest per name: a flapping
    announcement is resolved once, and at most ``MAX_PENDING`` names wait (more
    are dropped with a warning: they come back with the next announcement)."""

    def __init__(self, azc: AsyncZeroconf, node: str, region: str, directory: PeerDirectory):
        self._azc = azc
        self._node = node
        self._region = region
        self._directory = directory
        self._pending: dict[str, ServiceStateChange] = {}
        self._wake = asyncio.Event()
        self._stopped = False
        self._dropped = 0
        self._addresses: dict[str, list[str]] = {}
        self._browser: AsyncServiceBrowser | None = None

    async def open(self) -> None:
        self._browser = AsyncServiceBrowser(
            self._azc.zeroconf, SERVICE_TYPE, handlers=[self._on_change]
        )

    async def aclose(self) -> None:
        self.stop()
        browser, self._browser = self._browser, None
        if browser is not None:
            await browser.async_cancel()

    def stop(self) -> None:
        """End ``resolve_loop`` (what is still pending is dropped)."""
        self._stopped = True
        self._wake.set()

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if name not in self._pending and len(self._pending) >= MAX_PENDING:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                log.warning(
                    "mDNS: %d announcements dropped (%d waiting)", self._dropped, MAX_PENDING
                )
            return
        self._pending[name] = state_change
        self._wake.set()

    async def resolve_loop(self) -> None:
        while not self._stopped:
            await self._wake.wait()
            self._wake.clear()
            while self._pending and not self._stopped:
                name = next(iter(self._pending))
                change = self._pending.pop(name)
                try:
                    await self._handle(name, change)
                except Exception:  # one odd announcement must not stop discovery
                    log.exception("cannot handle mDNS record %s", name)

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


_V4 = IPVersion.V4Only
