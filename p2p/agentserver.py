"""The daemon's side of the node agent (blobstore/agent.py): CLI pulls of this
node, run in the daemon's process with its node store and store connections.
The command line is parsed by the CLI's own parser (cli/transfer.AgentPull), in
the client's environment and directory; what it prints is sent back as text.

Bounds: ``agent_pulls`` pulls at once (another is declined, and its CLI pulls
in its own process); at most ``_WAITING`` connections that have not sent their
request, each for at most ``_REQUEST_TIMEOUT``; one message of at most
``agent.MAX_MESSAGE`` read per connection; progress never queued.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
import stat
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from blobstore import agent
from blobstore.cli.transfer import AgentPull
from blobstore.client import Client
from blobstore.config import Config
from blobstore.errors import BlobstoreError, ProtocolError, os_error
from blobstore.linking import DestDir
from blobstore.nodestore import NodeStore
from blobstore.objectstore import ObjectStore
from blobstore.source import ChunkSource

from .metrics import Metrics

log = logging.getLogger(__name__)

_WAITING = 16
_REQUEST_TIMEOUT = 5.0
_SEND_TIMEOUT = 5.0

PeerOpener = Callable[[], AbstractAsyncContextManager[ChunkSource | None]]


class AgentServer:
    """Serves ``agent.sock`` in ``config``'s node store directory while ``serving``."""

    def __init__(
        self,
        config: Config,
        store: ObjectStore,
        cache: NodeStore,
        peers: PeerOpener | None,
        max_pulls: int,
        metrics: Metrics,
    ) -> None:
        self._config = config
        self._store = store
        self._cache = cache
        self._peers = peers
        self._pulls = asyncio.Semaphore(max_pulls)
        self._counts = metrics.agent_pulls
        self._waiting = 0
        self._connections: set[asyncio.Task[None]] = set()
        self._own = node_settings(config)
        self.path: str | None = None
        """The socket, while it serves."""

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """Bind the socket (replacing one a dead daemon left) and serve until exit."""
        try:
            sock = await asyncio.to_thread(self._bind)
        except OSError as exc:  # the daemon still serves its peers
            log.warning("no node agent: cannot bind %s: %s", agent.SOCKET_NAME, exc)
            yield
            return
        self.path = agent.socket_path(self._config.cache.dir)
        try:
            async with asyncio.TaskGroup() as tg:
                accepting = tg.create_task(self._accept(sock, tg))
                try:
                    yield
                finally:
                    accepting.cancel()
                    for task in self._connections:  # pulls in flight end with the daemon
                        task.cancel()
        finally:
            sock.close()
            self.path = None
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self._unbind)

    def _bind(self) -> socket.socket:
        dir_fd = os.open(self._config.cache.dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(agent.SOCKET_NAME, dir_fd=dir_fd)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            old_umask = os.umask(0o177)  # (the uid check is the guard; this hides it too)
            try:
                sock.bind(agent.short_path(dir_fd, path=os.fspath(self._config.cache.dir)))
            finally:
                os.umask(old_umask)
            sock.listen(64)
            sock.setblocking(False)
            self._bound = os.stat(agent.SOCKET_NAME, dir_fd=dir_fd).st_ino
            return sock
        finally:
            os.close(dir_fd)

    def _unbind(self) -> None:
        """Remove the socket, unless another daemon replaced it meanwhile."""
        path = agent.socket_path(self._config.cache.dir)
        if os.stat(path).st_ino == self._bound:
            os.unlink(path)

    async def _accept(self, sock: socket.socket, tg: asyncio.TaskGroup) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(sock)
            conn.setblocking(False)
            if self._waiting >= _WAITING:
                conn.close()
                continue
            self._waiting += 1
            task = tg.create_task(self._serve(conn))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, conn: socket.socket) -> None:
        fd = -1
        try:
            with conn:
                try:
                    # Read first, whoever it is: a socket closed with a message unread
                    # resets, and the client would never see why it was declined.
                    async with asyncio.timeout(_REQUEST_TIMEOUT):
                        req, fd = await _request(conn)
                finally:
                    self._waiting -= 1
                # In a thread: parsing may read a token file, and resolving paths stats.
                job, why = await asyncio.to_thread(self._job, conn, req, fd)
                if job is None or self._pulls.locked():
                    self._counts["declined"] += 1
                    await _send(conn, {"t": "decline", "reason": why or "busy"})
                    return
                root, fd = DestDir(Path(job.dest), fd), -1  # (it closes the fd now)
                try:
                    async with self._pulls:
                        await _send(conn, {"t": "start"})
                        await self._run(conn, job, root, progress=req.tty and job.progress)
                finally:
                    root.close()
        except (ProtocolError, TimeoutError, OSError) as exc:
            log.info("agent connection dropped: %s", exc or type(exc).__name__)
        except Exception:  # one client's pull never takes the daemon down
            log.exception("agent connection failed")
        finally:
            if fd >= 0:
                os.close(fd)

    def _job(self, conn: socket.socket, req: Request, fd: int) -> tuple[AgentPull | None, str]:
        """The pull ``req`` asks for, or None and why the daemon declines it."""
        if agent.peer_uid(conn) != os.geteuid():
            return None, "another user"  # (before anything is done with what it sent)
        try:
            job = AgentPull.parse(req.argv, req.env, req.cwd)
        except BlobstoreError as exc:
            return None, str(exc)
        theirs = node_settings(job.config)
        for name, own in self._own.items():
            if theirs[name] != own:
                return None, f"another {name} than the daemon's"
        why = check_dest(job.dest, fd)
        return (None, why) if why is not None else (job, "")

    async def _run(
        self, conn: socket.socket, job: AgentPull, root: DestDir, progress: bool
    ) -> None:
        """The pull, cancelled when the client goes away; its answer sent."""
        started = time.monotonic()
        counter = _Progress()
        ref = job.args.ref
        async with asyncio.TaskGroup() as tg:
            pulling = tg.create_task(self._pull(job, root, counter))
            gone = tg.create_task(_gone(conn))
            sender = tg.create_task(counter.send(conn)) if progress else None
            await asyncio.wait([pulling, gone], return_when=asyncio.FIRST_COMPLETED)
            if sender is not None:
                sender.cancel()
            if not pulling.done():
                pulling.cancel()
                self._counts["cancelled"] += 1
                log.info("agent pull of %s into %s cancelled: its client left", ref, job.dest)
                return
            gone.cancel()
        answer = pulling.result()
        self._counts["done" if answer["code"] == 0 else "failed"] += 1
        log.info(
            "agent pull of %s into %s: %s in %.2fs",
            ref,
            job.dest,
            "done" if answer["code"] == 0 else answer["err"].strip(),
            time.monotonic() - started,
        )
        await _send(conn, answer)

    async def _pull(self, job: AgentPull, root: DestDir, progress: _Progress) -> dict[str, Any]:
        """The pull's ``exit`` message: what the CLI prints, and its status."""
        args = job.args
        try:
            peers = self._peers if job.config.peers.mode != "none" else None
            async with Client.sharing(self._config, self._store, self._cache, peers) as c:
                progress.tiers = c.source.bytes_from
                r = await c.pull(
                    args.ref,
                    root,
                    progress=progress,
                    link_mode=job.link_mode,
                    keep_special_modes=args.keep_special_modes,
                    include=args.include,
                    exclude=args.exclude,
                )
        except BlobstoreError as exc:
            return _failed(str(exc))
        except OSError as exc:
            return _failed(str(os_error(exc, f"pull of {args.ref} failed")))
        except Exception as exc:  # a bug: the client still gets one line, the log the rest
            log.exception("agent pull of %s failed", args.ref)
            return _failed(f"the node agent failed: {exc!r}")
        return {"t": "exit", "code": 0, "out": job.report(r), "err": ""}


def _failed(message: str) -> dict[str, Any]:
    """The ``exit`` message of a failed pull: the CLI's one error line."""
    return {"t": "exit", "code": 1, "out": "", "err": f"blobstore: error: {message}\n"}


def node_settings(config: Config) -> dict[str, Any]:
    """What a request's config must share with the daemon's own: the store, the node
    store (resolved), the region and the S3 settings (the same bucket through
    another endpoint is another store)."""
    return {
        "store": config.store_url,
        "cache": os.path.realpath(config.cache.dir),
        "region": config.region,
        "s3": tuple(f"{f.name}={getattr(config.s3, f.name)!r}" for f in fields(config.s3)),
    }


def check_dest(path: str, fd: int) -> str | None:
    """Why the daemon cannot pull into ``fd`` as ``path`` (None: it can): the fd must
    be a directory that ``path`` names in this process's view as well."""
    if not os.path.isabs(path):
        return f"not an absolute path: {path}"
    try:
        st_fd = os.fstat(fd)
        st_path = os.stat(path)
    except OSError as exc:
        return f"destination not visible to the node agent: {exc.strerror}"
    if not stat.S_ISDIR(st_fd.st_mode):
        return "the destination sent is not a directory"
    if (st_fd.st_dev, st_fd.st_ino) != (st_path.st_dev, st_path.st_ino):
        return "the destination is another directory in the node agent's view"
    return None


@dataclass(frozen=True, slots=True)
class Request:
    """A client's request (agent.request): its command line, environment, working
    directory, and whether its stderr is a terminal."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str
    tty: bool

    @classmethod
    def decode(cls, doc: Mapping[str, Any]) -> Request:
        """Raises ProtocolError on anything but a well-formed request of this version."""
        if doc.get("t") != "pull" or doc.get("v") != agent.VERSION:
            raise ProtocolError(f"not a pull request of version {agent.VERSION}")
        argv, env, cwd, tty = (doc.get(k) for k in ("argv", "env", "cwd", "tty"))
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise ProtocolError("agent request: argv is not a list of strings")
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise ProtocolError("agent request: env is not a map of strings")
        if not isinstance(cwd, str) or not os.path.isabs(cwd):
            raise ProtocolError("agent request: cwd is not an absolute path")
        if not isinstance(tty, bool):
            raise ProtocolError("agent request: tty is not a bool")
        return cls(tuple(argv), env, cwd, tty)


class _Progress:
    """A pull's latest progress (a FileProgress), sent every PROGRESS_INTERVAL when
    it changed and the socket takes it at once."""

    def __init__(self) -> None:
        self.done = self.total = self.files_done = self.files_total = 0
        self.tiers: dict[str, int] = {}

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total

    def files(self, done: int, total: int) -> None:
        self.files_done, self.files_total = done, total

    async def send(self, conn: socket.socket) -> None:
        last: tuple[int, ...] = ()
        while True:
            await asyncio.sleep(agent.PROGRESS_INTERVAL)
            now = (self.done, self.total, self.files_done, self.files_total)
            if now == last:
                continue
            doc = {
                "t": "progress",
                "done": self.done,
                "total": self.total,
                "files_done": self.files_done,
                "files_total": self.files_total,
                "tiers": dict(self.tiers),
            }
            try:
                conn.send(agent.pack(doc), socket.MSG_DONTWAIT)
                last = now
            except BlockingIOError:  # never queued: the next one goes instead
                pass
            except OSError:  # gone: _gone sees it
                return


async def _gone(conn: socket.socket) -> None:
    """Returns when the client closed its end (Ctrl-C) or sent anything more."""
    with contextlib.suppress(OSError):
        await asyncio.get_running_loop().sock_recv(conn, 1)


async def _request(conn: socket.socket) -> tuple[Request, int]:
    """The request and the fd sent with it. Raises ProtocolError."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            data, ancdata, flags, _ = conn.recvmsg(agent.MAX_MESSAGE, socket.CMSG_SPACE(4 * 4))
            break
        except BlockingIOError:
            await _readable(loop, conn)
    fds = array.array("i")
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ProtocolError("agent request too large")
        if len(fds) != 1:
            raise ProtocolError(f"agent request came with {len(fds)} fds, not 1")
        if not data:
            raise ProtocolError("agent client closed before its request")
        try:
            req = Request.decode(agent.unpack(data))
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return req, fds[0]


async def _readable(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(conn.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(conn.fileno())


async def _send(conn: socket.socket, doc: dict[str, Any]) -> None:
    async with asyncio.timeout(_SEND_TIMEOUT):
        await asyncio.get_running_loop().sock_sendall(conn, agent.pack(doc))
