"""Attacks on peer authentication and the ops HTTP side, with real daemon processes.

The attacker holds no cluster token. It gets a daemon or a pulling client to
connect to it (here: it is in their static peer list; mDNS, gossip or binding
127.0.0.1:7411 first lead to the same connection) and relays the handshake
to a daemon, hoping to be served chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
from daemons import daemon, wait_until
from helpers import cli_env, make_tree, run_cli
from s3server import free_ports

from blobstore.ids import ChunkId, hash_bytes, id_to_bytes
from p2p.framing import encode

pytestmark = pytest.mark.anyio

TOKEN = b"cluster-secret-token"


@dataclass
class Store:
    url: str
    chunks: dict[ChunkId, bytes]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """A file store holding ref ``apps/demo`` (a few chunks)."""
    url = (tmp_path / "store").as_uri()
    proc = run_cli(["push", make_tree(tmp_path / "src"), "apps/demo"],
                   cli_env(url, tmp_path / "pusher-cache"))
    assert proc.returncode == 0, proc.stderr
    chunks = {}
    for path in (tmp_path / "store" / "chunks").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert hash_bytes(data) == path.name
            chunks[path.name] = data
    assert chunks
    return Store(url, chunks)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_bytes(TOKEN + b"\n")
    return path


def _http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# --------------------------------------------------------------------------- HTTP side


def test_http_chunks_need_the_token(store: Store, tmp_path: Path, token_file: Path) -> None:
    chunk_id, data = next(iter(store.chunks.items()))
    with daemon(store.url, tmp_path / "cache", listen="127.0.0.1:0", peers="none",
                args=["--token-file", str(token_file)]) as d:
        url = f"http://{d.http}/chunks/{chunk_id}"
        # Anyone: refused, and nothing is read through from the object store.
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic eA=="}):
            status, body = _http_get(url, headers)
            assert status == 401, (headers, body[:100])
            assert body != data
        assert d.metrics()["blobstore_peer_origin_fetches_total"] == 0
        # Ops pages stay open.
        assert d.health()["ok"] is True
        assert "blobstore_peer_auth_failures_total" in d.get("/metrics").decode()
        # The token holder (on loopback) reads it: through from the store, then cached.
        bearer = {"Authorization": f"Bearer {TOKEN.decode()}"}
        assert _http_get(url, bearer) == (200, data)
        assert d.metrics()["blobstore_peer_origin_fetches_total"] == 1
        status, _ = _http_get(url)  # cached now: still refused without the token
        assert status == 401


def test_http_chunks_without_a_token_stay_open(store: Store, tmp_path: Path) -> None:
    chunk_id, data = next(iter(store.chunks.items()))
    with daemon(store.url, tmp_path / "cache", listen="127.0.0.1:0", peers="none") as d:
        assert _http_get(f"http://{d.http}/chunks/{chunk_id}") == (200, data)


# --------------------------------------------------------------------------- wire: relays


async def _read_frame(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes]:
    (size,) = struct.unpack(">I", await reader.readexactly(4))
    header: dict[str, Any] = msgpack.unpackb(await reader.readexactly(size))
    return header, await reader.readexactly(int(header.get("n", 0)))


def _send_frame(writer: asyncio.StreamWriter, header: dict[str, Any]) -> None:
    writer.write(encode(header))


@dataclass
class Relay:
    """A peer without the token. Whoever connects to it (a victim, as a client) is
    shown the challenge of ``target``; the victim's proof is forwarded to ``target``
    as the relay's own, and on success the relay asks ``target`` for ``wanted``."""

    target: str
    wanted: ChunkId
    rename: str | None = None
    """Name the target's hello after this node instead (so the victim does not see itself)."""
    finished: int = 0
    stolen: list[bytes] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)

    async def handle(self, victim_r: asyncio.StreamReader, victim_w: asyncio.StreamWriter) -> None:
        host, _, port = self.target.rpartition(":")
        try:
            target_r, target_w = await asyncio.open_connection(host, int(port))
        except OSError:
            victim_w.close()
            self.finished += 1
            return
        try:
            async with asyncio.timeout(5):
                hello, _ = await _read_frame(target_r)
                if self.rename:
                    hello = {**hello, "node": self.rename}
                _send_frame(victim_w, hello)
                auth, _ = await _read_frame(victim_r)
                _send_frame(target_w, auth)
                answer, _ = await _read_frame(target_r)
                self.answers.append(str(answer.get("t")))
                if answer.get("t") != "ready":
                    return
                _send_frame(target_w, {"t": "get", "ids": [id_to_bytes(self.wanted)]})
                frame, payload = await _read_frame(target_r)
                if frame.get("t") == "chunk":
                    self.stolen.append(payload)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            self.answers.append("closed")
        finally:
            self.finished += 1
            for w in (victim_w, target_w):
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()


@asynccontextmanager
async def relay_serving(relay: Relay) -> AsyncIterator[str]:
    port = free_ports(1)[0]
    server = await asyncio.start_server(relay.handle, "127.0.0.1", port)
    async with server:
        yield f"127.0.0.1:{port}"


async def _wait_attempts(relay: Relay, count: int) -> None:
    async with asyncio.timeout(20):
        while relay.finished < count:  # noqa: ASYNC110 - polling a test condition
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("rename", [None, "attacker-node"])
async def test_daemon_reflected_onto_itself_serves_nothing(
    store: Store, tmp_path: Path, token_file: Path, rename: str | None
) -> None:
    """The victim daemon dials the relay, which shows it the victim's own challenge."""
    chunk_id = next(iter(store.chunks))
    ports = free_ports(2)
    victim_listen = f"127.0.0.1:{ports[0]}"
    relay = Relay(victim_listen, chunk_id, rename)
    async with relay_serving(relay) as relay_addr:
        with daemon(store.url, tmp_path / "victim", listen=victim_listen, peers=relay_addr,
                    node="victim", args=["--token-file", str(token_file)]) as victim:
            # (shown its own id, the victim refuses at once and waits 30 s to retry)
            await _wait_attempts(relay, 2 if rename else 1)
            assert relay.stolen == []
            assert "ready" not in relay.answers
            assert victim.metrics()["blobstore_peer_chunks_served_total"] == 0


async def test_daemon_relayed_to_another_daemon_serves_nothing(
    store: Store, tmp_path: Path, token_file: Path
) -> None:
    """Daemon A dials the relay; the relay forwards B's challenge and A's proof."""
    chunk_id = next(iter(store.chunks))
    listen_b = f"127.0.0.1:{free_ports(1)[0]}"
    relay = Relay(listen_b, chunk_id)
    args = ["--token-file", str(token_file)]
    async with relay_serving(relay) as relay_addr:
        with (
            daemon(store.url, tmp_path / "b", listen=listen_b, peers="none", node="b",
                   args=args) as b,
            daemon(store.url, tmp_path / "a", listen="127.0.0.1:0", peers=relay_addr,
                   node="a", args=args),
        ):
            await _wait_attempts(relay, 2)
            assert relay.stolen == []
            assert "ready" not in relay.answers
            assert b.metrics()["blobstore_peer_chunks_served_total"] == 0
            assert b.metrics()["blobstore_peer_auth_failures_total"] >= 1


async def test_pulling_client_relayed_to_a_daemon_serves_nothing(
    store: Store, tmp_path: Path, token_file: Path
) -> None:
    """A pull (`--peers auto` would dial 127.0.0.1:7411; here a static list) dials the relay."""
    chunk_id = next(iter(store.chunks))
    relay = Relay("", chunk_id)
    async with relay_serving(relay) as relay_addr:
        with daemon(store.url, tmp_path / "d", listen="127.0.0.1:0", peers="none", node="d",
                    args=["--token-file", str(token_file)]) as d:
            relay.target = d.listen
            env = cli_env(store.url, tmp_path / "puller",
                          {"BLOBSTORE_PEERS": relay_addr, "BLOBSTORE_TOKEN_FILE": str(token_file)})
            proc = await asyncio.to_thread(
                run_cli, ["pull", "apps/demo", tmp_path / "out", "--json"], env)
            assert proc.returncode == 0, proc.stderr
            await _wait_attempts(relay, 1)
            assert relay.stolen == []
            assert "ready" not in relay.answers
            assert d.metrics()["blobstore_peer_chunks_served_total"] == 0


async def test_token_holders_still_serve_each_other(
    store: Store, tmp_path: Path, token_file: Path
) -> None:
    args = ["--token-file", str(token_file)]
    with daemon(store.url, tmp_path / "d", listen="127.0.0.1:0", peers="none", node="d",
                args=args) as d:
        env = cli_env(store.url, tmp_path / "puller",
                      {"BLOBSTORE_PEERS": d.listen, "BLOBSTORE_TOKEN_FILE": str(token_file)})
        proc = await asyncio.to_thread(
            run_cli, ["pull", "apps/demo", tmp_path / "out", "--json"], env)
        assert proc.returncode == 0, proc.stderr
        wait_until(lambda: d.metrics()["blobstore_peer_chunks_served_total"] > 0, "chunks served")
        assert d.metrics()["blobstore_peer_auth_failures_total"] == 0
