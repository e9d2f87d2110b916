"""Several real daemons on loopback with static peers: pulls, failures, lies, regions."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import urllib.error
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import anyio
import pytest
from daemons import Daemon, cluster, daemon, wait_until
from helpers import cli_env, make_big_tree, run_cli, snapshot
from pulling import pull

from blobstore.catalog import Catalog
from blobstore.hostport import split_hostport
from blobstore.ids import ChunkId, hash_bytes
from blobstore.stores import open_object_store
from p2p import placement
from p2p.client import Identity, open_connection

pytestmark = pytest.mark.anyio

DATA_BYTES = 48 << 20


@pytest.fixture
def pushed(tmp_path: Path) -> tuple[str, Path]:
    """A file store holding ref ``apps/demo``; returns (store url, source dir)."""
    store = (tmp_path / "store").as_uri()
    src = tmp_path / "src"
    make_big_tree(src, DATA_BYTES, seed=7)
    proc = run_cli(["push", src, "apps/demo"], cli_env(store, tmp_path / "pusher-cache"))
    assert proc.returncode == 0, proc.stderr
    return store, src


def _peers(daemons: list) -> str:  # type: ignore[type-arg]
    return ",".join(d.listen for d in daemons)


def _total(daemons: list, metric: str) -> float:  # type: ignore[type-arg]
    return float(sum(d.metrics()[f"blobstore_peer_{metric}"] for d in daemons))


async def _chunk_count(store: str, ref: str) -> int:
    """Unique chunks of ``ref`` (what the origin must send a region once)."""
    async with open_object_store(store) as objects:
        catalog = Catalog(objects)
        tree = await catalog.load_tree(await catalog.resolve(ref))
    return len({c.id for c in tree.chunk_refs()})


async def _homes(store: str, ref: str, nodes: list[str]) -> set[str]:
    """The nodes home for some chunk of ``ref`` (placed by block of their pack)."""
    async with open_object_store(store) as objects:
        catalog = Catalog(objects)
        tree = await catalog.load_tree(await catalog.resolve(ref))
    return {placement.home(nodes, placement.home_key(c)) or "" for c in tree.chunk_refs()}


async def test_pull_comes_from_peers_and_origin_is_read_once(
    pushed: tuple[str, Path], tmp_path: Path
) -> None:
    store, src = pushed
    with cluster(store, tmp_path, 3) as daemons:
        first = await pull(store, tmp_path / "c1", _peers(daemons), "apps/demo", tmp_path / "o1")
        assert snapshot(tmp_path / "o1") == snapshot(src)
        # (the tree repeats some content: those chunks come from the local cache)
        assert first.from_tier["peer"] > 0
        assert first.from_tier["origin"] == 0
        # Each chunk was read through by its home peer only.
        unique = await _chunk_count(store, "apps/demo")
        assert _total(daemons, "origin_fetches_total") == unique
        # Chunks were served by their home peers, and only by them.
        served = {d.node for d in daemons if d.metrics()["blobstore_peer_chunks_served_total"]}
        assert served == await _homes(store, "apps/demo", [d.node for d in daemons])

        proc = run_cli(
            ["pull", "apps/demo", tmp_path / "o2", "--json"],
            cli_env(store, tmp_path / "c2", {"BLOBSTORE_PEERS": _peers(daemons)}),
        )
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["from"]["peer"] > 0
        assert doc["from"]["origin"] == 0
        assert snapshot(tmp_path / "o2") == snapshot(src)
        assert _total(daemons, "origin_fetches_total") == unique  # second node: all cached


async def test_one_seed_address_finds_the_whole_region(
    pushed: tuple[str, Path], tmp_path: Path
) -> None:
    store, src = pushed
    with cluster(store, tmp_path, 3) as daemons:
        env = cli_env(store, tmp_path / "c1", {"BLOBSTORE_PEERS": daemons[0].listen})
        proc = run_cli(["peers", "--json"], env)
        assert proc.returncode == 0, proc.stderr
        rows = json.loads(proc.stdout)["peers"]
        assert {(p["node"], p["source"]) for p in rows} == {
            ("default-node-0", "static"),
            ("default-node-1", "gossip"),
            ("default-node-2", "gossip"),
        }
        proc = run_cli(["pull", "apps/demo", tmp_path / "o1", "--json"], env)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["from"]["origin"] == 0
        assert snapshot(tmp_path / "o1") == snapshot(src)
        # Chunks went to their home peers, not all to the seed.
        served = {d.node for d in daemons if d.metrics()["blobstore_peer_chunks_served_total"]}
        assert served == await _homes(store, "apps/demo", [d.node for d in daemons])


async def test_daemon_killed_mid_pull(pushed: tuple[str, Path], tmp_path: Path) -> None:
    store, src = pushed
    with cluster(store, tmp_path, 3) as daemons:
        victim = daemons[1]

        def kill_after(n: int) -> None:
            if n == 5:
                os.kill(victim.proc.pid, signal.SIGKILL)

        outcome = await pull(
            store, tmp_path / "c1", _peers(daemons), "apps/demo", tmp_path / "o", after=kill_after
        )
        assert victim.proc.wait(10) == -signal.SIGKILL
        assert snapshot(tmp_path / "o") == snapshot(src)
        assert outcome.from_tier["peer"] > 0
        # The survivors noticed, independently of mDNS.
        wait_until(
            lambda: all(d.health()["peers"] == 1 for d in (daemons[0], daemons[2])),
            "survivors to drop the dead peer",
        )


async def test_corrupted_cache_files_are_detected(pushed: tuple[str, Path], tmp_path: Path) -> None:
    store, src = pushed
    with cluster(store, tmp_path, 2) as daemons:
        await pull(store, tmp_path / "c1", _peers(daemons), "apps/demo", tmp_path / "o1")
        flipped = 0
        for d in daemons:
            for f in d.cache.rglob("*"):
                if f.is_file() and len(f.name) == 64:
                    data = bytearray(f.read_bytes())
                    data[len(data) // 2] ^= 0xFF
                    f.write_bytes(bytes(data))
                    flipped += 1
        assert flipped > 0
        await pull(store, tmp_path / "c2", _peers(daemons), "apps/demo", tmp_path / "o2")
        assert snapshot(tmp_path / "o2") == snapshot(src)
        assert _total(daemons, "corrupt_dropped_total") > 0


async def test_lying_peer_is_detected_and_pull_stays_correct(
    pushed: tuple[str, Path], tmp_path: Path
) -> None:
    store, src = pushed
    homes = await _homes(store, "apps/demo", [f"default-node-{i}" for i in range(3)])
    liar = next(i for i in range(3) if f"default-node-{i}" in homes)  # it must serve to lie
    with cluster(store, tmp_path, 3, args_for={liar: ["--corrupt-for-tests"]}) as daemons:
        outcome = await pull(store, tmp_path / "c1", _peers(daemons), "apps/demo", tmp_path / "o")
        assert snapshot(tmp_path / "o") == snapshot(src)
        assert outcome.tier_stats["corrupt"] > 0


async def test_node_in_another_region_is_ignored(pushed: tuple[str, Path], tmp_path: Path) -> None:
    store, src = pushed
    with (
        daemon(
            store,
            tmp_path / "far-cache",
            listen="127.0.0.1:0",
            peers="none",
            region="far",
            node="far-node",
        ) as far,
        cluster(store, tmp_path, 2, extra_peers=[far.listen]) as daemons,
    ):
        env = cli_env(store, tmp_path / "c0", {"BLOBSTORE_PEERS": _peers([*daemons, far])})
        proc = run_cli(["peers", "--json", "--all"], env)
        assert proc.returncode == 0, proc.stderr
        seen = {p["node"]: p["status"] for p in json.loads(proc.stdout)["peers"]}
        assert seen == {"default-node-0": "up", "default-node-1": "up", "far-node": "foreign"}
        live = json.loads(run_cli(["peers", "--json"], env).stdout)["peers"]
        assert {p["node"] for p in live} == {"default-node-0", "default-node-1"}

        await pull(store, tmp_path / "c1", _peers([*daemons, far]), "apps/demo", tmp_path / "o")
        assert snapshot(tmp_path / "o") == snapshot(src)
        assert far.metrics()["blobstore_peer_chunks_served_total"] == 0
        assert all(d.health()["peers"] == 1 for d in daemons)  # they ignore it too


async def test_token_mismatch_is_refused(pushed: tuple[str, Path], tmp_path: Path) -> None:
    store, src = pushed
    good, bad = tmp_path / "good.token", tmp_path / "bad.token"
    good.write_text("cluster-secret\n")
    bad.write_text("not-the-secret\n")
    with cluster(store, tmp_path, 2, env={"BLOBSTORE_TOKEN_FILE": str(good)}) as daemons:
        outcome = await pull(
            store,
            tmp_path / "c1",
            _peers(daemons),
            "apps/demo",
            tmp_path / "o1",
            token=b"cluster-secret",
        )
        assert outcome.from_tier["peer"] > 0
        outcome = await pull(
            store,
            tmp_path / "c2",
            _peers(daemons),
            "apps/demo",
            tmp_path / "o2",
            token=b"not-the-secret",
        )
        assert outcome.from_tier["peer"] == 0
        assert snapshot(tmp_path / "o2") == snapshot(src)
        wait_until(lambda: "token mismatch" in daemons[0].log_text(), "the refusal to be logged")
        assert daemons[0].metrics()["blobstore_peer_auth_failures_total"] > 0


async def test_http_ops_side_and_clean_sigterm(pushed: tuple[str, Path], tmp_path: Path) -> None:
    store, _ = pushed
    with cluster(store, tmp_path, 2) as daemons:
        await pull(store, tmp_path / "c1", _peers(daemons), "apps/demo", tmp_path / "o1")
        d = daemons[0]
        health = d.health()
        assert health["ok"] is True
        assert health["node"] == "default-node-0"
        text = d.get("/metrics").decode()
        assert "# TYPE blobstore_peer_bytes_served_total counter" in text
        # (the cache holds other files named by id too: pack indexes)
        chunk_ids = set(await _chunks(store, "apps/demo"))
        holder, held = next(
            (daemon, f.name)
            for daemon in daemons
            for f in daemon.cache.rglob("*")
            if f.is_file() and f.name in chunk_ids
        )
        body = holder.get(f"/chunks/{held}")
        assert hash_bytes(body) == held
        with pytest.raises(urllib.error.HTTPError) as err:
            d.get("/chunks/" + "0" * 64)
        assert err.value.code == 404
        err.value.close()
        assert d.stop(signal.SIGTERM) == 0
        assert "Traceback" not in d.log_text()


def test_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = run_cli(
            ["daemon", "--listen", f"127.0.0.1:{port}", "--peers", "none"],
            cli_env((tmp_path / "store").as_uri(), tmp_path / "cache"),
        )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"blobstore: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


async def _chunks(store: str, ref: str) -> dict[ChunkId, int]:
    """``ref``'s unique chunk ids and sizes."""
    async with open_object_store(store) as objects:
        catalog = Catalog(objects)
        tree = await catalog.load_tree(await catalog.resolve(ref))
    return {c.id: c.size for c in tree.chunk_refs()}


async def _answering(d: Daemon) -> bool:
    """Whether ``d`` has begun sending chunks."""
    metrics = await asyncio.to_thread(d.metrics)
    return metrics["blobstore_peer_chunks_served_total"] > 0


async def _refused(address: str) -> bool:
    """Whether a new connection to ``address`` is refused (else it is closed again)."""
    host, port = split_hostport(address) or ("", 0)
    try:
        _, writer = await asyncio.open_connection(host, port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def _eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    try:
        with anyio.fail_after(20):
            while not await check():  # noqa: ASYNC110 - polling another process
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def test_sigterm_finishes_answers_in_flight_then_exits_0(
    pushed: tuple[str, Path], tmp_path: Path
) -> None:
    """SIGTERM: no new connection is taken, but every chunk already asked for is
    sent (and verifies) before the daemon closes the connection and exits 0."""
    store, _ = pushed
    sizes = await _chunks(store, "apps/demo")
    asked = [*sizes, *sizes]  # ~2 x 48 MiB: far more than the socket buffers hold
    with daemon(store, tmp_path / "d", listen="127.0.0.1:0", peers="none") as d:
        conn = await open_connection(d.listen, Identity("probe", "default"))
        async with asyncio.TaskGroup() as tg:
            # One request for all of them; nothing is read yet, so the daemon is
            # soon blocked sending, with most answers still to go.
            gets = [tg.create_task(conn.get(chunk_id)) for chunk_id in asked]
            await _eventually(lambda: _answering(d), "answers under way")
            d.proc.send_signal(signal.SIGTERM)
            await _eventually(lambda: _refused(d.listen), "the listener to close")
            tg.create_task(conn.read_loop())
        assert [len(task.result()) for task in gets] == [sizes[c] for c in asked]  # verified
        assert d.proc.wait(30) == 0
        log = d.log_text()
        assert "finishing" in log
        assert "unsent" not in log
        assert "Traceback" not in log
        await conn.aclose()


@pytest.mark.parametrize(
    ("drain_timeout", "signals"), [(0.5, 1), (600, 2)], ids=["at-the-bound", "second-signal"]
)
async def test_sigterm_is_not_held_up_by_a_client_that_never_reads(
    drain_timeout: float, signals: int, pushed: tuple[str, Path], tmp_path: Path
) -> None:
    """Answers no one reads are dropped after ``drain_timeout``, or at once on a
    second SIGTERM; the daemon still exits 0."""
    store, _ = pushed
    sizes = await _chunks(store, "apps/demo")
    args = ["--limit", f"drain_timeout={drain_timeout}"]
    with daemon(store, tmp_path / "d", listen="127.0.0.1:0", peers="none", args=args) as d:
        conn = await open_connection(d.listen, Identity("probe", "default"))
        # Asked, never read (no read loop): the biggest chunk, 16 times (the answers a
        # connection may have pending). What can leave the daemon meanwhile is kept
        # well below that: the client stops reading after 64 KiB (and one frame), and
        # its kernel buffer is fixed small (loopback's grows to tcp_rmem's 32 MiB here:
        # CI once took all 16 answers within the drain's 0.5 s). That leaves the
        # daemon's send buffer (tcp_wmem, 4 MiB) and one chunk in flight.
        conn.stream.set_limits(replace(conn.stream.limits, max_queued=64 << 10))
        raw = conn.stream.extra_info("socket")
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        biggest = max(sizes, key=lambda c: sizes[c])
        assert 16 * sizes[biggest] > 24 << 20
        try:
            for _ in range(16):
                conn._queue_get(biggest)
            await _eventually(lambda: _answering(d), "answers under way")
            d.proc.send_signal(signal.SIGTERM)
            if signals == 2:
                await _eventually(
                    lambda: asyncio.to_thread(lambda: "finishing" in d.log_text()), "the drain"
                )
                d.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(d.proc.wait, 30) == 0
            assert "answers unsent" in d.log_text()
        finally:
            conn.stream.abort()
