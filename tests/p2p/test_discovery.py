"""mDNS discovery's own parts: addresses to announce, the bounded queue of changes."""

from __future__ import annotations

import pytest
from zeroconf import ServiceStateChange

from blobstore.errors import ConfigError
from p2p import discovery
from p2p.client import Identity
from p2p.liveness import PeerDirectory

pytestmark = pytest.mark.anyio


async def test_listen_host_is_resolved_off_the_loop() -> None:
    # (the autouse guard fails the test if the lookup ran on the event loop)
    assert await discovery._addresses("localhost") == ["127.0.0.1"]
    assert await discovery._addresses("127.0.0.2") == ["127.0.0.2"]
    every = await discovery._addresses("0.0.0.0")  # each interface's, loopback only if alone
    assert every
    assert all(address.count(".") == 3 for address in every)


async def test_unresolvable_listen_host_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"cannot resolve listen host 'no-such-host\.invalid'"):
        await discovery._addresses("no-such-host.invalid")


async def test_changes_wait_coalesced_per_name_and_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(discovery, "MAX_PENDING", 4)
    directory = PeerDirectory(Identity("me", "r"))
    browser = discovery._Browser(None, "me", "r", directory)  # type: ignore[arg-type]
    added, removed = ServiceStateChange.Added, ServiceStateChange.Removed
    for _ in range(3):  # a flapping service: one entry, its latest state
        browser._on_change(None, discovery.SERVICE_TYPE, "a", added)  # type: ignore[arg-type]
        browser._on_change(None, discovery.SERVICE_TYPE, "a", removed)  # type: ignore[arg-type]
    for i in range(10):
        browser._on_change(None, discovery.SERVICE_TYPE, f"n{i}", added)  # type: ignore[arg-type]
    assert browser._pending == {"a": removed, "n0": added, "n1": added, "n2": added}
    assert browser._dropped == 7
    browser._on_change(None, discovery.SERVICE_TYPE, "n0", removed)  # type: ignore[arg-type]
    assert browser._pending["n0"] is removed  # a waiting name is always updated
