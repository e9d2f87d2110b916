"""The daemon's side of the node agent (blobstore/agent.py): CLI pulls of this
node, run in the daemon's process with its node store and store connections.

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
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

from blobstore import agent
from blobstore.agent import PullRequest
from blobstore.client import Client
from blobstore.config import Config
from blobstore.errors import BlobstoreError, ProtocolError, os_error
from blobstore.linking import LINK_MODES, DestDir, parse_link_mode
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
        self._own = agent.node_settings(config)
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
        self.path = str(agent.socket_path(self._config.cache.dir))
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
        root: DestDir | None = None
        try:
            with conn:
                try:
                    # Read first, whoever it is: a socket closed with a message unread
                    # resets, and the client would never see why it was declined.
                    async with asyncio.timeout(_REQUEST_TIMEOUT):
                        req, fd = await _request(conn)
                    root = DestDir(Path(req.dest), fd)  # (closes the fd however this ends)
                finally:
                    self._waiting -= 1
                why = self._refusal(conn, req, fd)
                if why is not None or self._pulls.locked():
                    self._counts["declined"] += 1
                    await _send(conn, {"t": "decline", "reason": why or "busy"})
                    return
                async with self._pulls:
                    await _send(conn, {"t": "start"})
                    await self._run(conn, req, root)
        except (ProtocolError, TimeoutError, OSError) as exc:
            log.info("agent connection dropped: %s", exc or type(exc).__name__)
        except Exception:  # one client's pull never takes the daemon down
            log.exception("agent connection failed")
        finally:
            if root is not None:
                root.close()

    def _refusal(self, conn: socket.socket, req: PullRequest, fd: int) -> str | None:
        if agent.peer_uid(conn) != os.geteuid():
            return "another user"  # (before anything is done with what it sent)
        for name, own in self._own.items():
            if getattr(req, name) != own:
                return f"another {name} than the daemon's"
        if req.link_mode not in LINK_MODES:
            return f"not a link mode: {req.link_mode!r}"
        return agent.check_dest(req.dest, fd)

    async def _run(self, conn: socket.socket, req: PullRequest, root: DestDir) -> None:
        """The pull, cancelled when the client goes away; its answer sent."""
        started = time.monotonic()
        progress = _Progress()
        async with asyncio.TaskGroup() as tg:
            pulling = tg.create_task(self._pull(req, root, progress))
            gone = tg.create_task(_gone(conn))
            sender = tg.create_task(progress.send(conn)) if req.progress else None
            await asyncio.wait([pulling, gone], return_when=asyncio.FIRST_COMPLETED)
            if sender is not None:
                sender.cancel()
            if not pulling.done():
                pulling.cancel()
                self._counts["cancelled"] += 1
                log.info("agent pull of %s into %s cancelled: its client left", req.ref, req.dest)
                return
            gone.cancel()
        answer = pulling.result()
        self._counts["done" if answer["t"] == "done" else "failed"] += 1
        log.info(
            "agent pull of %s into %s: %s in %.2fs",
            req.ref,
            req.dest,
            "done" if answer["t"] == "done" else answer["message"],
            time.monotonic() - started,
        )
        await _send(conn, answer)

    async def _pull(self, req: PullRequest, root: DestDir, progress: _Progress) -> dict[str, Any]:
        try:
            peers = self._peers if req.peers else None
            async with Client.sharing(self._config, self._store, self._cache, peers) as c:
                progress.tiers = c.source.bytes_from
                r = await c.pull(
                    req.ref,
                    root,
                    progress=progress,
                    link_mode=parse_link_mode(req.link_mode),
                    keep_special_modes=req.keep_special_modes,
                    include=req.include,
                    exclude=req.exclude,
                )
        except BlobstoreError as exc:
            return {"t": "error", "kind": type(exc).__name__, "message": str(exc)}
        except OSError as exc:
            err = os_error(exc, f"pull of {req.ref} failed")
            return {"t": "error", "kind": type(err).__name__, "message": str(err)}
        except Exception as exc:  # a bug: the client still gets one line, the log the rest
            log.exception("agent pull of %s failed", req.ref)
            return {
                "t": "error",
                "kind": "BlobstoreError",
                "message": f"the node agent failed: {exc!r}",
            }
        return {"t": "done", "result": agent.result_doc(r)}


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


async def _request(conn: socket.socket) -> tuple[PullRequest, int]:
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
        req = PullRequest.decode(agent.unpack(data))
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
