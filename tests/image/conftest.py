"""Fixtures for image tests: a client over a ``file://`` store, and the image tools.

umoci and skopeo build real images (no Docker daemon). Without them the tests
that need them are skipped, except under CI (``CI`` set) where a missing tool
is a failure.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from blobstore.client import Client
from blobstore.config import CacheConfig, Config, PeerConfig


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        reason = f"{name} not installed (apt-get install -y {name})"
        if os.environ.get("CI"):
            pytest.fail(f"CI requires {name}: {reason}")
        pytest.skip(reason)
    return path


@pytest.fixture
def umoci() -> str:
    return require_tool("umoci")


@pytest.fixture
def skopeo() -> str:
    return require_tool("skopeo")


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(
        store_url=(tmp_path / "store").as_uri(),
        cache=CacheConfig(tmp_path / "cache"),
        peers=PeerConfig(mode="none"),
    )


@pytest.fixture
async def client(config: Config) -> AsyncIterator[Client]:
    async with Client.open(config, peers=False) as c:
        yield c
