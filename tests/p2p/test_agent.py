"""The node agent (blobstore/agent.py, p2p/agentserver.py): CLI pulls handed to a
real daemon on the same node store, over its unix socket; what the daemon refuses
(another store, region, user or view of the destination, malformed requests), and
what happens when the daemon dies mid-pull or the CLI is interrupted."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import msgpack
import pytest
from daemons import BLOBSTORE, Daemon, daemon, wait_until
from helpers import cli_env, make_tree, random_bytes, run_cli, snapshot, write
from s3proxy import CountingProxy, Fault
from s3server import SeaweedS3Server, free_ports

from blobstore import agent
from blobstore.agent import Declined, Exit

REF = "apps/a"
Snapshot = dict[str, tuple[str, int, str]]
SlowS3 = tuple[str, dict[str, str], CountingProxy, Snapshot]
"""The ``slow_s3`` fixture: store URL, env, proxy, the tree's snapshot."""


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI requires it: {reason}")
    pytest.skip(reason)


@pytest.fixture
def store(tmp_path: Path) -> tuple[str, Snapshot]:
    """A file:// store holding REF (make_tree), and the tree's snapshot."""
    url = (tmp_path / "store").as_uri()
    src = make_tree(tmp_path / "src")
    proc = run_cli(["push", src, REF], cli_env(url, tmp_path / "push-cache"))
    assert proc.returncode == 0, proc.stderr
    return url, snapshot(src)


@contextmanager
def node_daemon(store: str, cache: Path, env: dict[str, str] | None = None) -> Iterator[Daemon]:
    with daemon(store, cache, listen=f"127.0.0.1:{free_ports(1)[0]}", peers="none", env=env) as d:
        yield d


def agent_pulls(d: Daemon) -> list[str]:
    return [ln for ln in d.log_text().splitlines() if "agent pull of" in ln]


def test_a_cli_pull_is_run_by_the_nodes_daemon(tmp_path: Path, store: tuple[str, Snapshot]) -> None:
    url, expected = store
    cache = tmp_path / "cache"
    with node_daemon(url, cache) as d:
        env = cli_env(url, cache)
        cold = run_cli(["pull", REF, tmp_path / "out", "--json"], env)
        assert cold.returncode == 0, cold.stderr
        assert snapshot(tmp_path / "out") == expected
        assert json.loads(cold.stdout)["from"]["origin"] > 0
        warm = run_cli(["pull", REF, tmp_path / "deep" / "new" / "out2", "--json"], env)
        assert warm.returncode == 0, warm.stderr
        assert snapshot(tmp_path / "deep" / "new" / "out2") == expected
        doc = json.loads(warm.stdout)
        assert doc["from"]["origin"] == 0
        assert doc["from"]["local"] == doc["bytes"]
        # the daemon did both (its log names them), and the CLI said nothing else
        assert len(agent_pulls(d)) == 2, d.log_text()
        assert cold.stderr == warm.stderr == ""
        # a pull error is the daemon's error, as one line, and makes no DIR
        missing = run_cli(["pull", "apps/none", tmp_path / "none"], env)
        assert missing.returncode == 1
        assert missing.stderr.startswith("blobstore: error:")
        assert "apps/none" in missing.stderr
        assert len(missing.stderr.splitlines()) == 1
        assert not (tmp_path / "none").exists()
        assert len(agent_pulls(d)) == 3
        assert d.proc.poll() is None
        counted = d.metrics()
        assert counted['blobstore_agent_pulls_total{result="done"}'] == 2
        assert counted['blobstore_agent_pulls_total{result="failed"}'] == 1


def test_a_pull_from_the_clients_directory_prints_what_the_cli_prints(
    tmp_path: Path, store: tuple[str, Snapshot]
) -> None:
    """DIR and --cache relative to the client's directory; the same summary line as
    a pull in the CLI's own process, nothing with --quiet."""
    url, expected = store
    with node_daemon(url, tmp_path / "cache") as d:
        env = cli_env(url, tmp_path / "elsewhere")  # (--cache wins)

        def pull(*argv: str, **extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [BLOBSTORE, "--cache", "cache", "pull", REF, *argv],
                cwd=tmp_path,
                env={**env, **extra},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )

        handed = pull("out")
        assert handed.returncode == 0, handed.stderr
        assert snapshot(tmp_path / "out") == expected
        assert len(agent_pulls(d)) == 1
        here = pull("out-2", BLOBSTORE_AGENT="off")
        assert here.returncode == 0, here.stderr
        assert len(agent_pulls(d)) == 1
        # the same words, but for DIR, the time and the sources
        assert handed.stdout.split(" in ")[0] == here.stdout.split(" in ")[0].replace("-2", "")
        quiet = pull("out-3", "-q")
        assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
        assert len(agent_pulls(d)) == 2


def test_a_pull_handed_over_loads_neither_the_cli_nor_an_event_loop(
    tmp_path: Path, store: tuple[str, Snapshot]
) -> None:
    """The console script's client of the agent imports only what it uses."""
    url, expected = store
    cache = tmp_path / "cache"
    heavy = ["argparse", "asyncio", "blobstore.cli", "blobstore.config", "socket", "typing"]
    probe = (
        "import atexit, json, sys\n"
        f"names = {heavy!r}\n"
        "atexit.register(lambda: print(json.dumps([n for n in names if n in sys.modules])))\n"
        f"sys.argv = ['blobstore', 'pull', {REF!r}, {str(tmp_path / 'out')!r}, '-q']\n"
        "from blobstore.__main__ import run\n"
        "run()\n"
    )
    with node_daemon(url, cache) as d:
        done = subprocess.run(
            [sys.executable, "-c", probe],
            env=cli_env(url, cache),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.splitlines()[-1]) == []
        assert len(agent_pulls(d)) == 1
    assert snapshot(tmp_path / "out") == expected


def test_pulls_not_meant_for_the_daemon_run_in_their_own_process(
    tmp_path: Path, store: tuple[str, Snapshot]
) -> None:
    url, expected = store
    cache = tmp_path / "cache"
    with node_daemon(url, cache) as d:
        for i, extra in enumerate(
            [{"BLOBSTORE_REGION": "elsewhere"}, {"BLOBSTORE_AGENT": "off"}, {}]
        ):
            args: list[str | Path] = ["-v", "pull", REF, tmp_path / f"out-{i}"]
            if not extra:
                args.append("--delete")  # (prunes by path: never sent)
            proc = run_cli(args, cli_env(url, cache, extra))
            assert proc.returncode == 0, proc.stderr
            assert snapshot(tmp_path / f"out-{i}") == expected
        assert (
            "pulling in this process: another region"
            in run_cli(
                ["-v", "pull", REF, tmp_path / "out-3"],
                cli_env(url, cache, {"BLOBSTORE_REGION": "x"}),
            ).stderr
        )
        assert agent_pulls(d) == []
        # a store of the same bytes under another URL is another store
        other = (tmp_path / "store-link").as_uri()
        os.symlink(tmp_path / "store", tmp_path / "store-link")
        proc = run_cli(["-v", "pull", REF, tmp_path / "out-9"], cli_env(other, cache))
        assert proc.returncode == 0, proc.stderr
        assert "another store" in proc.stderr
        assert agent_pulls(d) == []
        # settings too big for one message are never sent either
        big = {"BLOBSTORE_NOTE": "x" * agent.MAX_MESSAGE}
        proc = run_cli(["-v", "pull", REF, tmp_path / "out-10"], cli_env(url, cache, big))
        assert proc.returncode == 0, proc.stderr
        assert "exceed an agent message" in proc.stderr
        assert snapshot(tmp_path / "out-10") == expected
        assert agent_pulls(d) == []
        # nor a command line that is not all UTF-8 (msgpack strings are): a DIR named so
        odd = tmp_path / b"out-\xff".decode(errors="surrogateescape")
        proc = subprocess.run(
            [BLOBSTORE, "-v", "pull", REF, str(odd)],
            env=cli_env(url, cache),
            capture_output=True,
            text=True,
            errors="surrogateescape",  # (the summary line names DIR)
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert "not all UTF-8" in proc.stderr
        assert snapshot(odd) == expected
        assert agent_pulls(d) == []
        # declined: the two regions and the other store (the rest never asked)
        assert d.metrics()['blobstore_agent_pulls_total{result="declined"}'] == 3


def test_a_socket_left_by_a_killed_daemon_is_passed_over_and_replaced(
    tmp_path: Path, store: tuple[str, Snapshot]
) -> None:
    url, expected = store
    cache = tmp_path / "cache"
    with node_daemon(url, cache) as d:
        d.stop(signal.SIGKILL)
    assert os.path.exists(agent.socket_path(cache))  # nobody removed it
    proc = run_cli(["-v", "pull", REF, tmp_path / "out"], cli_env(url, cache))
    assert proc.returncode == 0, proc.stderr
    assert "pulling in this process: no node agent" in proc.stderr
    assert snapshot(tmp_path / "out") == expected
    with node_daemon(url, cache) as d:
        proc = run_cli(["pull", REF, tmp_path / "out-2"], cli_env(url, cache))
        assert proc.returncode == 0, proc.stderr
        assert len(agent_pulls(d)) == 1
    assert not os.path.exists(agent.socket_path(cache))  # a clean stop removes it


def _request(
    url: str,
    cache: Path,
    dest: Path | str,
    env: dict[str, str] | None = None,
    *,
    cwd: Path | str = "/",
    tty: bool = False,
) -> bytes:
    """The request of ``blobstore pull REF dest`` run in ``cwd``."""
    return agent.request(["pull", REF, str(dest)], cli_env(url, cache, env), str(cwd), tty)


def _dir_fd(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def test_the_daemon_pulls_only_into_the_directory_the_path_names(
    tmp_path: Path, store: tuple[str, Snapshot]
) -> None:
    url, expected = store
    cache = tmp_path / "cache"
    (tmp_path / "a").mkdir()
    with node_daemon(url, cache) as d:
        elsewhere = _dir_fd(tmp_path / "b")
        for dest, cwd in [
            (tmp_path / "a", Path("/")),  # its path names another directory
            (Path("a"), tmp_path),  # so does DIR in the client's directory
        ]:
            conn = agent.connect(str(cache.resolve()))
            assert not isinstance(conn, Declined), conn
            try:
                answer = agent.hand_over(conn, _request(url, cache, dest, cwd=cwd), elsewhere)
            finally:
                conn.close()
            assert isinstance(answer, Declined)
            assert "another directory" in answer.reason
        os.close(elsewhere)
        assert os.listdir(tmp_path / "a") == os.listdir(tmp_path / "b") == []
        # the real thing: the fd of the directory DIR names, relative to the client's
        fd = _dir_fd(tmp_path / "a")
        conn = agent.connect(str(cache.resolve()))
        assert not isinstance(conn, Declined)
        try:
            answer = agent.hand_over(conn, _request(url, cache, "a", cwd=tmp_path), fd)
        finally:
            conn.close()
        os.close(fd)
        assert isinstance(answer, Exit), answer
        assert answer.code == 0
        files = sum(1 for kind, _, _ in expected.values() if kind == "file")
        assert answer.out.startswith(f"pulled {REF} -> a: {files} files")
        assert snapshot(tmp_path / "a") == expected
        assert len(agent_pulls(d)) == 1


def _raw(cache: Path, data: bytes, fds: list[int]) -> bytes:
    """Send one raw message (with ``fds``) to the agent; what comes back (b"": closed)."""
    conn = agent.connect(str(cache.resolve()))
    assert not isinstance(conn, Declined), conn
    with closing(conn):
        rights = [
            (
                socket.SOL_SOCKET,
                socket.SCM_RIGHTS,
                b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds),
            )
        ]
        conn.sendmsg([data], rights if fds else [])
        conn.settimeout(10)
        try:
            return conn.recv(agent.MAX_MESSAGE)
        except ConnectionResetError:
            return b""


def test_malformed_requests_are_dropped_and_the_daemon_serves_on(
    tmp_path: Path, store: tuple[str, Snapshot]
) -> None:
    url, expected = store
    cache = tmp_path / "cache"
    with node_daemon(url, cache) as d:
        fd = _dir_fd(tmp_path / "a")
        doc = agent.unpack(_request(url, cache, tmp_path / "a"))
        for data, fds in [
            (b"\xc1not msgpack", [fd]),
            (msgpack.packb([1, 2, 3]), [fd]),
            (msgpack.packb({**doc, "v": 99}), [fd]),
            (msgpack.packb({**doc, "argv": "pull x y"}), [fd]),
            (msgpack.packb({**doc, "env": {"A": 1}}), [fd]),
            (msgpack.packb({**doc, "cwd": "relative"}), [fd]),
            (msgpack.packb({k: v for k, v in doc.items() if k != "tty"}), [fd]),
            (msgpack.packb(doc), []),  # no destination fd
            (msgpack.packb(doc), [fd, fd]),  # two
            (msgpack.packb({**doc, "env": {"X": "x" * (64 << 10)}}), [fd]),  # too long
        ]:
            assert _raw(cache, data, fds) == b"", data[:40]
        os.close(fd)
        assert d.proc.poll() is None
        assert os.listdir(tmp_path / "a") == []
        proc = run_cli(["pull", REF, tmp_path / "out"], cli_env(url, cache))
        assert proc.returncode == 0, proc.stderr
        assert snapshot(tmp_path / "out") == expected
        assert len(agent_pulls(d)) == 1
        assert d.log_text().count("agent connection dropped") == 10


def _as_nobody(work: Callable[[Callable[[str], None]], None]) -> Iterator[str]:
    """Run ``work`` in a forked child that became uid/gid 65534; yields each line it
    reports (through ``work``'s argument) as it comes, until the child exits."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest from here, only os._exit
        os.close(r)
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)

            def report(line: str) -> None:
                os.write(w, line.encode() + b"\n")

            work(report)
            code = 0
        except BaseException as exc:
            os.write(w, f"error {exc!r}\n".encode())
        finally:
            os._exit(code)
    os.close(w)
    try:
        with os.fdopen(r) as reports:
            yield from (line.rstrip("\n") for line in reports)
    finally:
        os.waitpid(pid, 0)


def test_the_daemon_serves_only_its_own_user_and_the_cli_trusts_only_its_own(
    tmp_path: Path, store: tuple[str, Snapshot]
) -> None:
    if os.geteuid() != 0:
        _missing("needs root: runs a client and a socket as another user")
    url, _ = store
    cache = tmp_path / "cache"
    with node_daemon(url, cache) as d:
        sock_path = agent.socket_path(cache)
        assert os.stat(sock_path).st_mode & 0o777 == 0o600
        os.chmod(sock_path, 0o666)  # so another user can even connect: the uid check must hold
        os.chmod(cache, 0o755)
        request = _request(url, cache, Path("/tmp"))
        # (reached through an fd: pytest's base directory is root's alone)
        cache_fd = os.open(cache, os.O_PATH | os.O_DIRECTORY)

        def client(report: Callable[[str], None]) -> None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.connect(agent.short_path(cache_fd))
                fd = os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY)
                s.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fds(fd))])
                report(repr(agent.unpack(s.recv(agent.MAX_MESSAGE))))

        assert list(_as_nobody(client)) == [repr({"t": "decline", "reason": "another user"})]
        os.close(cache_fd)
        assert agent_pulls(d) == []

    # a socket another user bound where the daemon's would be: nothing is sent to it
    other = tmp_path / "other-cache"
    other.mkdir()
    os.chmod(other, 0o777)
    other_fd = os.open(other, os.O_PATH | os.O_DIRECTORY)

    def squatter(report: Callable[[str], None]) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.bind(agent.short_path(other_fd))
            s.listen(1)
            report("up")
            conn, _ = s.accept()
            conn.settimeout(5)
            try:
                report(f"got {len(conn.recv(65536))}")
            except OSError:
                report("nothing")

    reports = _as_nobody(squatter)
    assert next(reports) == "up"
    conn = agent.connect(str(other))
    assert isinstance(conn, Declined)
    assert "another user" in conn.reason
    assert list(reports) in (["nothing"], ["got 0"])
    os.close(other_fd)


def _fds(*fds: int) -> bytes:
    return b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)


@pytest.fixture
def slow_s3(s3_server: SeaweedS3Server, tmp_path: Path) -> Iterator[SlowS3]:
    """An S3 store holding REF (one 6 MiB file) behind a counting proxy, pack reads
    trickling at 256 KiB/s: store URL, env, proxy, the tree's snapshot."""
    url = s3_server.bucket_url("agent")
    src = tmp_path / "src"
    write(src / "weights.bin", random_bytes(6 << 20, "agent"))
    proc = run_cli(
        ["push", src, REF], cli_env(url, tmp_path / "push-cache", s3_server.client_env())
    )
    assert proc.returncode == 0, proc.stderr
    with CountingProxy.to_endpoint(s3_server.endpoint).in_thread() as proxy:
        proxy.http = True
        env = {**s3_server.client_env(), "AWS_ENDPOINT_URL": proxy.endpoint}
        proxy.arm(Fault("trickle", "GET", "/packs/", rate=256 << 10))
        yield url, env, proxy, snapshot(src)


def _pull_reading_the_store(
    url: str, cache: Path, env: dict[str, str], proxy: CountingProxy, out: Path
) -> subprocess.Popen[str]:
    """A CLI pull (--json) into ``out``, once the daemon's pull reads a pack."""
    pull = subprocess.Popen(
        [BLOBSTORE, "pull", REF, str(out), "--json"],
        env=cli_env(url, cache, env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(
        lambda: any(
            m == "GET" and "/packs/" in t and not t.endswith(".index")
            for m, t in list(proxy.exchanges)
        ),
        "the daemon's pull to read the store",
    )
    return pull


@pytest.mark.s3
def test_ctrl_c_on_the_cli_cancels_the_daemons_pull(
    tmp_path: Path,
    slow_s3: SlowS3,
) -> None:
    url, env, proxy, expected = slow_s3
    cache = tmp_path / "cache"
    with node_daemon(url, cache, env) as d:
        pull = _pull_reading_the_store(url, cache, env, proxy, tmp_path / "out")
        pull.send_signal(signal.SIGINT)
        _, err = pull.communicate(timeout=30)
        assert pull.returncode == 130, err
        assert "interrupted" in err
        wait_until(lambda: "cancelled: its client left" in d.log_text(), "the pull cancelled")
        assert not (tmp_path / "out" / "weights.bin").exists()
        proxy.disarm()
        proc = run_cli(["pull", REF, tmp_path / "out"], cli_env(url, cache, env), timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert snapshot(tmp_path / "out") == expected
        assert d.proc.poll() is None


@pytest.mark.s3
def test_a_daemon_dying_mid_pull_leaves_the_cli_to_finish(
    tmp_path: Path,
    slow_s3: SlowS3,
) -> None:
    url, env, proxy, expected = slow_s3
    cache = tmp_path / "cache"
    with node_daemon(url, cache, env) as d:
        pull = _pull_reading_the_store(url, cache, env, proxy, tmp_path / "out")
        proxy.disarm()
        d.stop(signal.SIGKILL)
        out, err = pull.communicate(timeout=60)
    assert pull.returncode == 0, err
    assert "the node agent went away" in err
    assert "pulling in this process" in err
    assert json.loads(out)["files"] == 1
    assert snapshot(tmp_path / "out") == expected


def test_a_node_store_whose_socket_path_is_too_long_for_unix_sockets_still_works(
    tmp_path: Path, store: tuple[str, Snapshot]
) -> None:
    url, expected = store
    cache = tmp_path / ("long-" * 20) / "cache"
    cache.parent.mkdir()
    assert len(os.fsencode(agent.socket_path(cache))) > 108
    with node_daemon(url, cache) as d:
        proc = run_cli(["pull", REF, tmp_path / "out"], cli_env(url, cache))
        assert proc.returncode == 0, proc.stderr
        assert snapshot(tmp_path / "out") == expected
        assert len(agent_pulls(d)) == 1


def test_the_daemons_pull_asks_its_peers_first(tmp_path: Path, store: tuple[str, Snapshot]) -> None:
    url, expected = store
    ports = free_ports(2)
    listen = [f"127.0.0.1:{p}" for p in ports]
    with (
        daemon(url, tmp_path / "cache-0", listen=listen[0], peers=listen[1]) as a,
        daemon(url, tmp_path / "cache-1", listen=listen[1], peers=listen[0]) as b,
    ):
        wait_until(lambda: a.health()["peers"] == b.health()["peers"] == 1, "peers to meet")
        for i, d in enumerate((a, b)):
            env = cli_env(url, d.cache, {"BLOBSTORE_PEERS": ",".join(listen)})
            proc = run_cli(["pull", REF, tmp_path / f"out-{i}", "--json"], env)
            assert proc.returncode == 0, proc.stderr
            assert snapshot(tmp_path / f"out-{i}") == expected
            assert len(agent_pulls(d)) == 1
            doc = json.loads(proc.stdout)
            # Each pull asks the region (its own daemon too): the home daemon of the
            # tree's one block reads it from the store for both, once.
            assert doc["from"]["origin"] == 0
            if d is a:  # cold everywhere: every byte came through a home daemon
                assert doc["from"]["peer"] == doc["bytes"]
        stores_reads = [x.metrics()["blobstore_peer_origin_bytes_total"] for x in (a, b)]
        assert sorted(stores_reads)[0] == 0


@pytest.mark.s3
def test_progress_comes_while_the_daemon_pulls_and_closing_cancels_it(
    tmp_path: Path,
    slow_s3: SlowS3,
) -> None:
    url, env, _, expected = slow_s3
    cache = tmp_path / "cache"
    with node_daemon(url, cache, env) as d:
        request = _request(url, cache, tmp_path / "out", env, tty=True)
        conn = agent.connect(os.path.realpath(cache))
        assert not isinstance(conn, Declined), conn
        fd = _dir_fd(tmp_path / "out")
        seen: list[dict[str, object]] = []
        with closing(conn):
            conn.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fds(fd))])
            conn.settimeout(30)
            while not seen:
                doc = agent.unpack(conn.recv(agent.MAX_MESSAGE))
                assert doc["t"] in ("start", "progress"), doc
                if doc["t"] == "progress":
                    seen.append(doc)
        os.close(fd)
        assert list(expected) == ["weights.bin"]
        assert seen[0]["total"] == 6 << 20
        assert seen[0]["files_total"] == 1
        wait_until(lambda: "cancelled: its client left" in d.log_text(), "the pull cancelled")
        assert os.listdir(tmp_path / "out") == []  # (its temp file is gone too)
        assert d.metrics()['blobstore_agent_pulls_total{result="cancelled"}'] == 1
