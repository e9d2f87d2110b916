"""The node agent: a CLI pull handed to this node's daemon over a unix socket.

A ``blobstore pull`` spends ~0.09 s starting: the interpreter, ~240 modules
(asyncio with ssl, anyio, the S3 client), the node store's sqlite and the S3
connections. The node's ``blobstore daemon`` has all of that open already, so
a pull that finds the daemon's socket sends it the request and prints what
comes back (as ``dfget`` does with dfdaemon and the docker CLI with dockerd).
The CLI then costs the interpreter and argparse; the pull itself is the same
``Client.pull``, run by the daemon with its node store, store connections and
view of the region.

The wire (this module: the client, which imports nothing asynchronous, and the
messages; ``p2p/agentserver.py`` is the daemon's side):

- ``<cache>/agent.sock``, an ``AF_UNIX`` ``SOCK_SEQPACKET`` socket (one
  message per send, so no framing), mode 0600, bound by the daemon.
- Each side checks the other's uid (``SO_PEERCRED``) is its own: the daemon
  writes the destination with its own uid, so it serves only that uid, and a
  client sends its destination to no one else (a socket left by another user).
- The client sends one request, a msgpack map, with the destination's
  directory fd (``SCM_RIGHTS``), opened by the client in its own mount
  namespace. The daemon works only through that fd (``DestDir``) and takes the
  request only if the path names the same directory in its view too (pull
  markers and seeds record paths), and if store, node store, region and S3
  settings are its own.
- The daemon answers ``start`` or ``decline`` (then the CLI pulls in its own
  process, as without a daemon), then ``progress`` messages at most every
  0.1 s (only when asked for, never queued: one the socket cannot take at once
  is dropped), then ``done`` with the result or ``error`` with its class and
  line. The client closing the socket (Ctrl-C) cancels the pull.

What a pull through the agent cannot do (``--delete``: the prune works by
path) it never asks; a daemon that dies mid-pull leaves the CLI to finish in
its own process (the files already placed are kept by the next pull's checks).
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from . import errors
from .errors import BlobstoreError, ProtocolError
from .repull import PullResult

if TYPE_CHECKING:
    from .config import Config

SOCKET_NAME = "agent.sock"
VERSION = 1
MAX_MESSAGE = 64 << 10
"""Largest message either side takes (a request with its patterns, a result):
SOCK_SEQPACKET cuts a longer one, which is then refused."""
PROGRESS_INTERVAL = 0.1
_UCRED = struct.Struct("3i")  # pid, uid, gid
_SUN_PATH = 108


@dataclass(frozen=True, slots=True)
class PullRequest:
    """What the CLI asks the daemon to pull, and the settings that must be the daemon's."""

    store: str
    cache: str
    """The node store's directory, resolved (realpath)."""
    region: str
    s3: tuple[str, ...]
    """The S3 settings, as ``node_settings`` writes them."""
    ref: str
    dest: str
    """The destination's absolute path (the fd sent with the request is what is used)."""
    link_mode: str = "auto"
    keep_special_modes: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    progress: bool = False
    """Send progress messages."""
    peers: bool = True
    """False (``--peers none``): the daemon's peers are not asked either."""

    def encode(self) -> bytes:
        return pack({"t": "pull", "v": VERSION, **asdict(self)})

    @classmethod
    def decode(cls, doc: Mapping[str, Any]) -> PullRequest:
        """Raises ProtocolError on anything but a well-formed request of this version."""
        if doc.get("t") != "pull" or doc.get("v") != VERSION:
            raise ProtocolError(f"not a pull request of version {VERSION}")
        values: dict[str, Any] = {}
        for f in fields(cls):  # (their types are strings: annotations are not evaluated)
            if f.name not in doc:
                if f.default is MISSING:
                    raise ProtocolError(f"agent request lacks {f.name!r}")
                continue
            value = doc[f.name]
            if f.type == "tuple[str, ...]":
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ProtocolError(f"agent request: {f.name} is not a list of strings")
                value = tuple(value)
            elif not isinstance(value, bool if f.type == "bool" else str):
                raise ProtocolError(f"agent request: {f.name} is not a {f.type}")
            values[f.name] = value
        return cls(**values)


def node_settings(config: Config) -> dict[str, Any]:
    """What a request must share with the daemon's own config (PullRequest's fields):
    the store, the node store (resolved), the region and the S3 settings (the same
    bucket through another endpoint is another store)."""
    return {
        "store": config.store_url,
        "cache": os.path.realpath(config.cache.dir),
        "region": config.region,
        "s3": tuple(f"{f.name}={getattr(config.s3, f.name)!r}" for f in fields(config.s3)),
    }


def socket_path(cache_dir: Path) -> Path:
    return cache_dir / SOCKET_NAME


def short_path(dir_fd: int, name: str = SOCKET_NAME, path: str = "") -> str:
    """A name for ``name`` in the directory ``dir_fd`` (at ``path``) that fits
    ``sun_path`` (108 bytes): ``path/name`` when it does, else through this process's
    fd of the directory (which needs /proc)."""
    full = os.path.join(path, name) if path else ""
    if full and len(os.fsencode(full)) < _SUN_PATH:
        return full
    return f"/proc/self/fd/{dir_fd}/{name}"


def pack(doc: Mapping[str, Any]) -> bytes:
    return msgpack.packb(doc, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes) -> dict[str, Any]:
    """Raises ProtocolError."""
    try:
        doc = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ProtocolError(f"malformed agent message: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("t"), str):
        raise ProtocolError("malformed agent message: not a map with a type")
    return doc


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a unix socket."""
    _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return int(uid)


def result_doc(r: PullResult) -> dict[str, Any]:
    return {**asdict(r), "from_tier": dict(r.from_tier)}


def result_of(doc: Mapping[str, Any]) -> PullResult:
    """Raises ProtocolError."""
    try:
        r = PullResult(**doc)
    except TypeError as exc:
        raise ProtocolError(f"malformed agent result: {exc}") from None
    if not isinstance(r.from_tier, dict):
        raise ProtocolError("malformed agent result: from_tier is not a map")
    return r


def error_of(doc: Mapping[str, Any]) -> BlobstoreError:
    """The daemon's error as the class it raised (BlobstoreError when unknown here)."""
    message = str(doc.get("message", "the node's daemon failed the pull"))
    cls = getattr(errors, str(doc.get("kind", "")), None)
    if isinstance(cls, type) and issubclass(cls, BlobstoreError):
        try:
            return cls(message)
        except TypeError:  # a class that takes more than a message
            pass
    return BlobstoreError(message)


@dataclass(frozen=True, slots=True)
class Declined:
    """The pull was not done by the daemon: run it here. ``started``: the daemon had
    begun it (and then went away)."""

    reason: str
    started: bool = False


Progress = Callable[[Mapping[str, Any]], None]
"""Called with each progress message: done, total, files_done, files_total, tiers."""


def connect(cache: str) -> socket.socket | Declined:
    """A connection to the daemon of the node store ``cache`` (a realpath) that runs
    as this process's user, or a Declined: no daemon (the usual case, one failed
    ``connect``), a socket left by a dead one, or another user's."""
    try:
        dir_fd = os.open(cache, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        return Declined(f"no node store at {cache}: {exc.strerror}")
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(short_path(dir_fd, path=cache))
        except OSError as exc:
            sock.close()
            return Declined(f"no node agent: {exc.strerror}")
    except OSError as exc:
        return Declined(f"no unix socket: {exc.strerror}")
    finally:
        os.close(dir_fd)
    if peer_uid(sock) != os.geteuid():
        sock.close()
        return Declined("the node agent runs as another user")
    return sock


def pull(
    sock: socket.socket, request: PullRequest, dest_fd: int, on_progress: Progress | None = None
) -> PullResult | Declined:
    """Hand ``request`` to the daemon at ``sock`` (``connect``), sending ``dest_fd``
    (the caller keeps its own). A daemon that declines or goes away is a Declined.
    Raises what the daemon's pull raised (the class by name, from blobstore.errors),
    ProtocolError."""
    try:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", dest_fd))]
        sock.sendmsg([request.encode()], rights)
        return _answers(sock, on_progress)
    except OSError as exc:  # (connection reset: the daemon died)
        return Declined(f"the node agent went away: {exc.strerror}", started=True)


def _answers(sock: socket.socket, on_progress: Progress | None) -> PullResult | Declined:
    started = False
    while True:
        data = sock.recv(MAX_MESSAGE)
        if not data:
            return Declined("the node agent went away", started=started)
        doc = unpack(data)
        kind = doc["t"]
        if kind == "start":
            started = True
        elif kind == "decline":
            return Declined(str(doc.get("reason", "declined")))
        elif kind == "progress":
            if on_progress is not None:
                on_progress(doc)
        elif kind == "done":
            result = doc.get("result")
            if not isinstance(result, dict):
                raise ProtocolError("malformed agent message: done without a result")
            return result_of(result)
        elif kind == "error":
            raise error_of(doc)
        else:
            raise ProtocolError(f"unknown agent message {kind!r}")


def request_for(
    config: Config,
    ref: str,
    dest: Path,
    *,
    link_mode: str,
    keep_special_modes: bool,
    include: Sequence[str],
    exclude: Sequence[str],
    progress: bool,
) -> PullRequest:
    """The request a pull with ``config`` makes."""
    return PullRequest(
        **node_settings(config),
        ref=ref,
        dest=os.path.abspath(dest),
        link_mode=link_mode,
        keep_special_modes=keep_special_modes,
        include=tuple(include),
        exclude=tuple(exclude),
        progress=progress,
        peers=config.peers.mode != "none",
    )


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
