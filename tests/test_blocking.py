"""The blocking-I/O guard (tests/blocking.py, autouse in conftest): it fails
blocking calls that an ``async def`` of blobstore/p2p makes on the event loop, on
asyncio and on uvloop (what the CLI runs), and lets worker threads and test code
block.

The probe is compiled with a file name inside ``blobstore/`` so the guard takes
it for core code; nothing is written there.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from blockbuster import BlockingError

import blobstore

PROBE_FILE = str(Path(blobstore.__file__).parent / "_guard_probe.py")
PROBE_SOURCE = """
import os, socket, time
from pathlib import Path

import anyio.to_thread


def blocking(kind, path):  # a synchronous helper of the core
    if kind == "sleep":
        time.sleep(0)
    elif kind == "read":
        Path(path).read_bytes()
    elif kind == "lstat":
        os.lstat(path)
    elif kind == "listdir":
        os.listdir(os.path.dirname(path))
    elif kind == "getaddrinfo":
        socket.getaddrinfo("localhost", 80)


async def probe(kind, path):
    blocking(kind, path)


async def read_in_thread(path):
    return await anyio.to_thread.run_sync(Path(path).read_bytes)


async def call_hook(hook):
    return hook()
"""


def probes() -> dict[str, Callable[..., Awaitable[Any]]]:
    namespace: dict[str, Any] = {}
    exec(compile(PROBE_SOURCE, PROBE_FILE, "exec"), namespace)
    return {name: namespace[name] for name in ("probe", "read_in_thread", "call_hook")}


def run(body: Callable[[], Awaitable[None]], uvloop: bool) -> None:
    anyio.run(body, backend="asyncio", backend_options={"use_uvloop": uvloop})


LOOPS = [pytest.param(False, id="asyncio"), pytest.param(True, id="uvloop")]


@pytest.mark.parametrize("uvloop", LOOPS)
@pytest.mark.parametrize("kind", ["sleep", "read", "lstat", "listdir", "getaddrinfo"])
def test_blocking_in_core_async_code_fails(tmp_path: Path, uvloop: bool, kind: str) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    probe = probes()["probe"]

    async def main() -> None:
        with pytest.raises(BlockingError, match="Blocking call to"):
            await probe(kind, str(path))

    run(main, uvloop)


@pytest.mark.parametrize("uvloop", LOOPS)
def test_worker_threads_and_test_hooks_may_block(tmp_path: Path, uvloop: bool) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"data")
    found = probes()

    def hook() -> bytes:  # test code handed to the core: the test's choice
        return path.read_bytes()

    async def main() -> None:
        assert await found["read_in_thread"](str(path)) == b"data"
        assert await found["call_hook"](hook) == b"data"
        assert path.read_bytes() == b"data"  # the test's own step, on the loop

    run(main, uvloop)


def test_every_allowed_or_known_place_exists_and_says_why() -> None:
    """The lists do not rot: each entry of ours names functions its file defines."""
    import ast

    from blocking import ALLOWED, KNOWN

    root = Path(blobstore.__file__).parent.parent
    for suffix, functions, why in ALLOWED + KNOWN:
        assert len(why) > 20, suffix
        if suffix.startswith(("blobstore/", "p2p/")):
            tree = ast.parse((root / suffix).read_text())
            defined = {
                node.name
                for node in ast.walk(tree)
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            }
            assert functions <= defined, (suffix, functions - defined)
