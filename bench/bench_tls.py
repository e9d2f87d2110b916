"""Benchmark: chunk throughput peer -> client over plain TCP vs mutual TLS, on loopback.

    .venv/bin/python bench/bench_tls.py [--size 256M] [--chunk 4M] [--rounds 3]

Two peer servers run in child processes (the daemon's PeerServer, serving chunks held in
memory, so the store and the disk stay out of the measurement): one on plain TCP, one over
mutual TLS with a throwaway CA (made with the ``openssl`` command). Both with the cluster
token. The client is this process: the pull's own code (``open_connection`` + pipelined
``get``, every chunk verified against its BLAKE3 id). Rounds alternate plain/TLS so both
see the same machine load; the table shows the median of the rounds and the TLS/plain ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "p2p")]

from helpers import random_bytes  # noqa: E402

from blobstore.config import TlsFiles, parse_size  # noqa: E402
from blobstore.ids import ChunkId, hash_bytes  # noqa: E402
from p2p.client import Identity, open_connection  # noqa: E402
from p2p.metrics import Metrics  # noqa: E402
from p2p.server import PeerServer, ServerIdentity  # noqa: E402
from p2p.tls import client_context, load_contexts  # noqa: E402

TOKEN = b"bench-token"
WINDOW = 16
"""Chunks in flight per connection, as a pull keeps them."""


def make_chunks(size: int, chunk: int) -> dict[ChunkId, bytes]:
    blobs = (random_bytes(chunk, f"tls-bench-{i}") for i in range(max(1, size // chunk)))
    return {hash_bytes(b): b for b in blobs}


class MemoryProvider:
    """The provider interface PeerServer uses, over chunks held in memory."""

    def __init__(self, chunks: dict[ChunkId, bytes]) -> None:
        self.chunks = chunks

    async def lookup(self, chunk_id: ChunkId) -> tuple[bytes | None, str]:
        return self.chunks.get(chunk_id), "local"

    def holds(self, ids: list[ChunkId]) -> list[bool]:
        return [i in self.chunks for i in ids]


async def serve(tls_files: TlsFiles | None, size: int, chunk: int) -> None:
    tls = load_contexts(tls_files).wire_server if tls_files else None
    provider = MemoryProvider(make_chunks(size, chunk))
    server = PeerServer(
        ServerIdentity("bench-server", "bench", TOKEN, tls=tls), provider, Metrics()
    )  # type: ignore[arg-type]
    async with server.serving("127.0.0.1", 0) as port:
        print(json.dumps({"port": port}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def fetch_all(address: str, ids: list[ChunkId], me: Identity) -> float:
    conn = await open_connection(address, me)
    async with asyncio.TaskGroup() as tg:
        reader = tg.create_task(conn.read_loop())
        start = time.perf_counter()
        for i in range(0, len(ids), WINDOW):
            await asyncio.gather(*(conn.get(c) for c in ids[i : i + WINDOW]))
        elapsed = time.perf_counter() - start
        reader.cancel()
    await conn.aclose()
    return elapsed


def make_pki(root: Path) -> TlsFiles:
    def openssl(*args: str | Path) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        root / "ca.key",
        "-out",
        root / "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=bench-ca",
    )
    (root / "ext").write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n")
    openssl(
        "req",
        *ec,
        "-keyout",
        root / "node.key",
        "-out",
        root / "node.csr",
        "-subj",
        "/CN=bench-node",
    )
    openssl(
        "x509",
        "-req",
        "-in",
        root / "node.csr",
        "-CA",
        root / "ca.crt",
        "-CAkey",
        root / "ca.key",
        "-CAcreateserial",
        "-out",
        root / "node.crt",
        "-days",
        "1",
        "-extfile",
        root / "ext",
    )
    return TlsFiles(root / "node.crt", root / "node.key", root / "ca.crt")


def start_server(
    args: argparse.Namespace, tls: TlsFiles | None
) -> tuple[subprocess.Popen[str], str]:
    cmd = [
        sys.executable,
        __file__,
        "--serve",
        "--size",
        str(args.size),
        "--chunk",
        str(args.chunk),
    ]
    if tls:
        cmd += ["--tls", str(tls.cert), str(tls.key), str(tls.ca)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = json.loads(proc.stdout.readline())["port"]
    return proc, f"127.0.0.1:{port}"


async def bench(args: argparse.Namespace) -> None:
    ids = list(make_chunks(args.size, args.chunk))
    total = len(ids) * args.chunk
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        tls = make_pki(Path(tmp))
        client_tls = client_context(tls)
        servers = {"plain tcp": start_server(args, None), "mutual tls": start_server(args, tls)}
        identities = {
            "plain tcp": Identity("bench-client", "bench", TOKEN),
            "mutual tls": Identity("bench-client", "bench", TOKEN, client_tls),
        }
        times: dict[str, list[float]] = {name: [] for name in servers}
        try:
            for name, (_, address) in servers.items():  # warm-up: connections, caches
                await fetch_all(address, ids[:WINDOW], identities[name])
            for _ in range(args.rounds):
                for name, (_, address) in servers.items():
                    times[name].append(await fetch_all(address, ids, identities[name]))
        finally:
            for proc, _ in servers.values():
                assert proc.stdin is not None
                proc.stdin.close()
                proc.wait(10)
    median = {name: statistics.median(t) for name, t in times.items()}
    base = total / median["plain tcp"]
    print(
        f"{len(ids)} chunks x {args.chunk >> 20} MiB = {total / 2**20:.0f} MiB per round, "
        f"{args.rounds} rounds alternating, {WINDOW} chunks in flight, every chunk verified"
    )
    print(f"{'transport':<12} {'median s':>9} {'GB/s':>7} {'vs plain':>9}   rounds (s)")
    for name, secs in median.items():
        rate = total / secs
        rounds = " ".join(f"{t:.3f}" for t in times[name])
        print(f"{name:<12} {secs:>9.3f} {rate / 1e9:>7.2f} {rate / base:>8.2f}x   {rounds}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("256M"))
    parser.add_argument("--chunk", type=parse_size, default=parse_size("4M"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tls", nargs=3, metavar=("CERT", "KEY", "CA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        files = TlsFiles(*map(Path, args.tls)) if args.tls else None
        uvloop.run(serve(files, args.size, args.chunk))
    else:
        uvloop.run(bench(args))


if __name__ == "__main__":
    main()
