"""Attacks on peer authentication and the ops HTTP side, with real daemon processes.

The attacker holds no cluster token. It gets a daemon or a pulling client to
connect to it (here: it is in their static peer list; mDNS, gossip or binding
127.0.0.1:7411 first lead to the same connection) and relays the handshake
to a daemon, hoping to be served chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import ssl
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
from certs import make_ca, make_leaf
from daemons import daemon, wait_until
from helpers import cli_env, make_tree, run_cli
from s3server import free_ports

from blobstore.errors import AuthError, ChunkMissing, PeerUnavailable
from blobstore.ids import ChunkId, hash_bytes, id_to_bytes
from blobstore.objectstore import chunk_key
from p2p.client import Identity, open_connection
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
    proc = run_cli(
        ["push", make_tree(tmp_path / "src"), "apps/demo"], cli_env(url, tmp_path / "pusher-cache")
    )
    assert proc.returncode == 0, proc.stderr
    # Small files are one chunk each, whatever the store's layout (loose or packed).
    small = (
        p.read_bytes()
        for p in sorted((tmp_path / "src").rglob("*"))
        if p.is_file() and not p.is_symlink() and 0 < p.stat().st_size < 2048
    )
    chunks = {hash_bytes(data): data for data in small}
    assert chunks
    for chunk_id, data in chunks.items():  # also loose, so a daemon reads them by id alone
        path = tmp_path / "store" / chunk_key(chunk_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
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
    with daemon(
        store.url,
        tmp_path / "cache",
        listen="127.0.0.1:0",
        peers="none",
        args=["--token-file", str(token_file)],
    ) as d:
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
        # The home reads the chunk's whole 32 MiB block of its pack (p2p/homeblocks.py):
        # one fetch per chunk the block carries, so at least this one.
        assert d.metrics()["blobstore_peer_origin_fetches_total"] >= 1
        status, _ = _http_get(url)  # cached now: still refused without the token
        assert status == 401


def _non_loopback_address() -> str:
    """An address of this machine that is not loopback (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
            address = str(probe.getsockname()[0])
        except OSError:
            address = ""
    if not address or address.startswith(("0.", "127.")):
        if os.environ.get("CI"):
            pytest.fail("CI must run this test: no non-loopback IPv4 address")
        pytest.skip("needs a non-loopback IPv4 address")
    return address


def test_http_bearer_token_is_refused_in_clear_off_loopback(
    store: Store, tmp_path: Path, token_file: Path
) -> None:
    chunk_id = next(iter(store.chunks))
    address = _non_loopback_address()
    with daemon(
        store.url,
        tmp_path / "cache",
        listen=f"{address}:0",
        peers="none",
        args=["--token-file", str(token_file)],
    ) as d:
        bearer = {"Authorization": f"Bearer {TOKEN.decode()}"}
        status, body = _http_get(f"http://{d.http}/chunks/{chunk_id}", bearer)
        assert status == 403, body
        assert b"TLS" in body
        assert d.metrics()["blobstore_peer_origin_fetches_total"] == 0


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
        with daemon(
            store.url,
            tmp_path / "victim",
            listen=victim_listen,
            peers=relay_addr,
            node="victim",
            args=["--token-file", str(token_file)],
        ) as victim:
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
            daemon(
                store.url, tmp_path / "b", listen=listen_b, peers="none", node="b", args=args
            ) as b,
            daemon(
                store.url,
                tmp_path / "a",
                listen="127.0.0.1:0",
                peers=relay_addr,
                node="a",
                args=args,
            ),
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
        with daemon(
            store.url,
            tmp_path / "d",
            listen="127.0.0.1:0",
            peers="none",
            node="d",
            args=["--token-file", str(token_file)],
        ) as d:
            relay.target = d.listen
            env = cli_env(
                store.url,
                tmp_path / "puller",
                {"BLOBSTORE_PEERS": relay_addr, "BLOBSTORE_TOKEN_FILE": str(token_file)},
            )
            proc = await asyncio.to_thread(
                run_cli, ["pull", "apps/demo", tmp_path / "out", "--json"], env
            )
            assert proc.returncode == 0, proc.stderr
            await _wait_attempts(relay, 1)
            assert relay.stolen == []
            assert "ready" not in relay.answers
            assert d.metrics()["blobstore_peer_chunks_served_total"] == 0


async def test_token_holders_still_serve_each_other(
    store: Store, tmp_path: Path, token_file: Path
) -> None:
    args = ["--token-file", str(token_file)]
    with daemon(
        store.url, tmp_path / "d", listen="127.0.0.1:0", peers="none", node="d", args=args
    ) as d:
        assert await _fetch(d.listen, store, Identity("puller", "default", TOKEN)) == store.chunks
        assert d.metrics()["blobstore_peer_chunks_served_total"] == len(store.chunks)
        assert d.metrics()["blobstore_peer_auth_failures_total"] == 0


async def _fetch(address: str, store: Store, me: Identity) -> dict[ChunkId, bytes]:
    """The chunks of ``store`` the daemon at ``address`` serves (held, or home for), as a
    pull's peer tier asks for them."""
    conn = await open_connection(address, me)
    async with asyncio.TaskGroup() as tg:
        reader = tg.create_task(conn.read_loop())
        got = await asyncio.gather(*(conn.get(c) for c in store.chunks), return_exceptions=True)
        reader.cancel()
    await conn.aclose()
    for answer in got:
        if isinstance(answer, BaseException) and not isinstance(answer, ChunkMissing):
            raise answer
    return {
        c: bytes(a)
        for c, a in zip(store.chunks, got, strict=True)
        if not isinstance(a, BaseException)
    }


# --------------------------------------------------------------------------- mutual TLS


@dataclass
class Pki:
    ca: Path
    node: tuple[Path, Path]
    """(cert, key) signed by ``ca``: every daemon and pull of the cluster uses it here."""
    rogue: tuple[Path, Path]
    """(cert, key) signed by another CA."""

    def env(self, pair: tuple[Path, Path] | None = None) -> dict[str, str]:
        cert, key = pair or self.node
        return {
            "BLOBSTORE_TLS_CERT": str(cert),
            "BLOBSTORE_TLS_KEY": str(key),
            "BLOBSTORE_TLS_CA": str(self.ca),
        }

    def client_context(self, pair: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.check_hostname = False
        if pair is not None:
            ctx.load_cert_chain(*pair)
        return ctx


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A throwaway cluster CA, one node certificate, and a rogue CA's certificate."""
    if shutil.which("openssl") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the TLS tests: needs the openssl command")
        pytest.skip("needs the openssl command to make test certificates")
    root = tmp_path / "pki"
    root.mkdir()
    ca = make_ca(root, "cluster-ca")
    rogue_ca = make_ca(root, "rogue-ca")
    return Pki(ca[0], make_leaf(root, "node", ca), make_leaf(root, "rogue", rogue_ca))


def _https_get(
    url: str, ctx: ssl.SSLContext, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=ctx) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _tls_args(pki: Pki, pair: tuple[Path, Path] | None = None) -> list[str]:
    cert, key = pair or pki.node
    return ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(pki.ca)]


async def test_tls_peers_serve_each_other_with_the_token(
    store: Store, tmp_path: Path, token_file: Path, pki: Pki
) -> None:
    ports = free_ports(2)
    listens = [f"127.0.0.1:{p}" for p in ports]
    args = [*_tls_args(pki), "--token-file", str(token_file)]
    ctx = pki.client_context(pki.node)
    with (
        daemon(
            store.url,
            tmp_path / "c0",
            listen=listens[0],
            peers=",".join(listens),
            node="tls-0",
            args=args,
        ) as d0,
        daemon(
            store.url,
            tmp_path / "c1",
            listen=listens[1],
            peers=",".join(listens),
            node="tls-1",
            args=args,
        ) as d1,
    ):

        def both_see_each_other() -> bool:
            return all(
                json.loads(_https_get(f"https://{d.http}/healthz", ctx)[1])["peers"] == 1
                for d in (d0, d1)
            )

        wait_until(both_see_each_other, "TLS daemons to see each other")
        member = Identity("puller", "default", TOKEN, pki.client_context(pki.node))
        served = {}
        for d in (d0, d1):  # each chunk from its home daemon, read through from the store
            served.update(await _fetch(d.listen, store, member))
        assert served == store.chunks
        for d in (d0, d1):
            metrics = _https_get(f"https://{d.http}/metrics", ctx)[1].decode()
            assert "blobstore_peer_auth_failures_total 0" in metrics


async def test_tls_refuses_clients_without_a_cluster_certificate(
    store: Store, tmp_path: Path, pki: Pki
) -> None:
    chunk_id, data = next(iter(store.chunks.items()))
    with daemon(
        store.url,
        tmp_path / "d",
        listen="127.0.0.1:0",
        peers="none",
        node="tls-d",
        args=_tls_args(pki),
    ) as d:
        good = pki.client_context(pki.node)
        rogue = pki.client_context(pki.rogue)
        # The wire: a rogue certificate, or none, or plain TCP, gets no connection.
        for ctx in (rogue, pki.client_context()):
            # (TLS 1.3: the server's verdict arrives after our side's handshake, as an alert)
            with pytest.raises((PeerUnavailable, AuthError)):
                await open_connection(d.listen, Identity("intruder", "default", None, ctx), 2)
        with pytest.raises(PeerUnavailable):
            await open_connection(d.listen, Identity("intruder", "default"), 2)
        # A client whose CA does not sign the daemon refuses the daemon.
        wrong_ca = ssl.create_default_context(cafile=str(pki.rogue[0]))
        wrong_ca.check_hostname = False
        wrong_ca.load_cert_chain(*pki.rogue)
        with pytest.raises(AuthError):
            await open_connection(d.listen, Identity("x", "default", None, wrong_ca))
        conn = await open_connection(d.listen, Identity("member", "default", None, good))
        assert conn.node == "tls-d"  # hello -> auth -> ready done over TLS
        await conn.aclose()
        # HTTPS: ops pages without a client certificate; chunks only with one.
        url = f"https://{d.http}"
        assert _https_get(f"{url}/healthz", pki.client_context())[0] == 200
        assert _https_get(f"{url}/chunks/{chunk_id}", pki.client_context())[0] == 401
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # (reset: TLS 1.3)
            _https_get(f"{url}/chunks/{chunk_id}", rogue)
        assert _https_get(f"{url}/chunks/{chunk_id}", good) == (200, data)
        # A pull with a rogue certificate gets nothing from the daemon, and still completes.
        env = cli_env(
            store.url, tmp_path / "puller", {"BLOBSTORE_PEERS": d.listen, **pki.env(pki.rogue)}
        )
        proc = await asyncio.to_thread(
            run_cli, ["pull", "apps/demo", tmp_path / "out", "--json"], env
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["from"]["peer"] == 0
        metrics = _https_get(f"{url}/metrics", good)[1].decode()
        assert "blobstore_peer_chunks_served_total 0" in metrics


def test_tls_options_must_come_together(tmp_path: Path, pki: Pki) -> None:
    env = cli_env(
        (tmp_path / "store").as_uri(), tmp_path / "cache", {"BLOBSTORE_TLS_CERT": str(pki.node[0])}
    )
    proc = run_cli(["peers"], env)
    assert proc.returncode == 1
    assert "needs all of --tls-cert, --tls-key and --tls-ca" in proc.stderr
    proc = run_cli(
        [
            "peers",
            "--peers",
            "127.0.0.1:1",
            "--tls-cert",
            str(pki.node[0]),
            "--tls-key",
            str(pki.rogue[1]),
            "--tls-ca",
            str(pki.ca),
        ],
        env,
    )
    assert proc.returncode == 1
    assert "cannot load TLS certificate" in proc.stderr
