"""The node agent: a ``blobstore pull`` command handed to this node's daemon.

A ``blobstore pull`` run in its own process spends ~0.05-0.09 s starting: the
interpreter, ~240 modules (argparse, asyncio, anyio, the S3 client), the node
store's sqlite and the store connections. The node's ``blobstore daemon`` has
all of that loaded and open, so the console script (``blobstore/__main__.py``)
first looks for the daemon's socket and, when one answers, hands it the
command line and prints what comes back, as ``dfget`` does with dfdaemon and
the docker CLI with dockerd. This module is that client, so it imports only
what it uses (``os``, ``sys``, ``_socket``, msgpack: ~3 ms, where ``socket``
alone costs ~6 ms of enums and selectors): the pull costs the interpreter's
start and one round trip.

The wire (this module: the client and the messages; ``p2p/agentserver.py`` is
the daemon's side, which parses the command line with the CLI's own parser):

- ``<cache>/agent.sock``, an ``AF_UNIX`` ``SOCK_SEQPACKET`` socket (one
  message per send, so no framing), mode 0600, bound by the daemon.
- Each side checks the other's uid (``SO_PEERCRED``) is its own: the daemon
  writes the destination with its own uid, so it serves only that uid, and a
  client sends its command line and environment to no one else.
- The client sends one request, a msgpack map ``{t: "pull", v, argv, env, cwd,
  tty}`` (its arguments after the program name, the ``BLOBSTORE_*`` and S3
  settings of its environment, its working directory and whether stderr is a
  terminal), with the destination
  directory's fd (``SCM_RIGHTS``), created and opened by the client in its own
  mount namespace. The daemon works only through that fd and takes the
  request only if DIR names that same directory in its view too (pull markers
  and seeds record paths), and if the store, node store, region and S3
  settings the command line and environment give are its own.
- The daemon answers ``start`` or ``decline`` (then the CLI runs in its own
  process, as without a daemon), then ``progress`` messages at most every
  0.1 s (only to a terminal, never queued: one the socket cannot take at once
  is dropped), then ``exit`` with the status and the text the CLI prints on
  stdout and stderr. The client closing the socket (Ctrl-C) cancels the pull.

Only a plain ``pull REF DIR`` with the options in ``_PULL_OPTIONS`` and
``_GLOBAL_OPTIONS`` is handed over (``--delete`` prunes by path, ``--help``
prints): anything else runs in the CLI's own process. A daemon that dies
mid-pull leaves the CLI to finish in its own process (the files already placed
are kept by the next pull's checks).
"""

from __future__ import annotations

import _socket  # (not socket: see above)
import os
import sys

import msgpack

TYPE_CHECKING = False  # (not typing's: its import costs ~2 ms; mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any

SOCKET_NAME = "agent.sock"
VERSION = 2
MAX_MESSAGE = 64 << 10
"""Largest message either side takes (a request with its environment, an answer):
SOCK_SEQPACKET cuts a longer one, which is then refused."""
PROGRESS_INTERVAL = 0.1
AGENT_ENV = "BLOBSTORE_AGENT"
"""``off``: pulls never go to the node's daemon."""
_SUN_PATH = 108

_GLOBAL_OPTIONS = {
    **dict.fromkeys(
        (
            "--store",
            "--endpoint-url",
            "--profile",
            "--cache",
            "--cache-size",
            "--region",
            "--peers",
            "--token-file",
            "--tls-cert",
            "--tls-key",
            "--tls-ca",
            "--log-level",
            "--log-format",
        ),
        True,
    ),
    **dict.fromkeys(("-v", "--verbose", "-q", "--quiet"), False),
}
"""The CLI's global options, by whether they take a value (tests/test_agent_words.py
checks them against the parser)."""
_PULL_OPTIONS = {
    **dict.fromkeys(("--include", "--exclude", "--link-mode"), True),
    **dict.fromkeys(("--json", "--keep-special-modes"), False),
}
"""The ``pull`` options a handed-over pull may use (not ``--delete``, ``--help``)."""


class Declined:
    """The command was not run by the daemon: run it here. ``started``: the daemon
    had begun the pull (and then went away)."""

    __slots__ = ("reason", "started")

    def __init__(self, reason: str, started: bool = False) -> None:
        self.reason, self.started = reason, started

    def __repr__(self) -> str:
        return f"Declined({self.reason!r}, started={self.started})"


class Exit:
    """What the daemon's run of the command printed, and its exit status."""

    __slots__ = ("code", "err", "out")

    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


def pull_words(argv: Sequence[str]) -> tuple[str | None, str] | None:
    """``--cache``'s value (None: not given) and DIR of a plain ``pull REF DIR``
    command line (``argv`` without the program name), else None: a command this
    client leaves to the CLI. The daemon parses ``argv`` again with the CLI's own
    parser; these words only find its socket and the directory to open."""
    cache: str | None = None
    positional: list[str] = []
    pulling = False
    words = iter(argv)
    for word in words:
        if word.startswith("-") and word != "-":
            name, has_value, value = word.partition("=")
            takes_value = _GLOBAL_OPTIONS.get(name)
            if takes_value is None and pulling:
                takes_value = _PULL_OPTIONS.get(name)
            if takes_value is None:
                if has_value or not _repeated_v(name):
                    return None  # --delete, --help, --, an abbreviation, a typo
                continue
            if not takes_value:
                if has_value:
                    return None
                continue
            if not has_value:
                value = next(words, "-")
                if value.startswith("-"):
                    return None  # argparse would take it for an option
            if name == "--cache":
                cache = value
        elif not pulling:
            if word != "pull":
                return None
            pulling = True
        else:
            positional.append(word)
    if not pulling or len(positional) != 2:
        return None
    return cache, positional[1]


def _repeated_v(name: str) -> bool:
    return len(name) > 2 and name[0] == "-" and set(name[1:]) == {"v"}


def node_store_dir(cache: str | None, env: Mapping[str, str]) -> str:
    """The node store a command with ``--cache cache`` and ``env`` uses (as
    config.Config.from_env finds it), resolved."""
    where = cache if cache is not None else env.get("BLOBSTORE_CACHE")
    if where is None:
        from .config import default_cache_dir  # (platformdirs: only on unset nodes)

        where = default_cache_dir()
    return os.path.realpath(os.path.expanduser(where))


def socket_path(cache_dir: str | os.PathLike[str]) -> str:
    return os.path.join(cache_dir, SOCKET_NAME)


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
    """Raises ValueError (not errors.ProtocolError: blobstore.errors and its typing
    imports cost ~13 ms, as much as the rest of this client)."""
    try:
        doc = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ValueError(f"malformed agent message: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("t"), str):
        raise ValueError("malformed agent message: not a map with a type")
    return doc


def peer_uid(sock: _socket.socket) -> int:
    """The uid of the process at the other end of a unix socket."""
    ucred = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)  # pid, uid, gid
    return int.from_bytes(ucred[4:8], sys.byteorder)


def connect(cache: str) -> _socket.socket | Declined:
    """A connection to the daemon of the node store ``cache`` (a realpath) that runs
    as this process's user, or a Declined: no daemon (the usual case, one failed
    ``connect``), a socket left by a dead one, or another user's."""
    try:
        dir_fd = os.open(cache, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        return Declined(f"no node store at {cache}: {exc.strerror}")
    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
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


_S3_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)
"""The AWS variables a command's config reads (config.S3Config.from_env): with every
``BLOBSTORE_*`` one, all of the environment a request carries (no credentials, no
PATH: the daemon needs only what decides the settings; tests/test_agent_words.py
checks the config comes out the same)."""


def settings_env(env: Mapping[str, str]) -> dict[str, str]:
    """The part of ``env`` a command's config and link mode come from."""
    return {k: v for k, v in env.items() if k.startswith("BLOBSTORE_") or k in _S3_ENV}


def request(argv: Sequence[str], env: Mapping[str, str], cwd: str, tty: bool) -> bytes:
    """The request for the command line ``argv`` run in ``env`` and ``cwd``."""
    doc = {"argv": list(argv), "env": settings_env(env), "cwd": cwd, "tty": tty}
    return pack({"t": "pull", "v": VERSION, **doc})


def hand_over(
    sock: _socket.socket,
    message: bytes,
    dest_fd: int,
    on_progress: Callable[[Mapping[str, Any]], None] | None = None,
) -> Exit | Declined:
    """Send ``message`` (``request``) to the daemon at ``sock`` (``connect``) with
    ``dest_fd`` (the caller keeps its own); the command's Exit, or a Declined when
    the daemon declines, goes away or answers what is not the wire's."""
    started = False
    try:
        sock.sendmsg(
            [message],
            [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, dest_fd.to_bytes(4, sys.byteorder))],
        )
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
            elif kind == "exit":
                code, out, err = doc.get("code"), doc.get("out", ""), doc.get("err", "")
                if (
                    not isinstance(code, int)
                    or not isinstance(out, str)
                    or not isinstance(err, str)
                ):
                    raise ValueError("malformed agent message: exit")
                return Exit(code, out, err)
            else:
                raise ValueError(f"unknown agent message {kind!r}")
    except OSError as exc:  # (connection reset: the daemon died)
        return Declined(f"the node agent went away: {exc.strerror}", started=started)
    except ValueError as exc:  # (a message that is not the wire's)
        return Declined(str(exc), started=started)


def run_pull(argv: Sequence[str]) -> int | Declined:
    """The console script's first step: the pull ``argv`` names, run by this node's
    daemon, with what it printed printed here; its exit status, or a Declined
    (then the CLI runs in this process): not a plain pull, no daemon on its node
    store, BLOBSTORE_AGENT=off, a daemon that declined or went away."""
    env = os.environ
    if env.get(AGENT_ENV) == "off":
        return Declined(f"{AGENT_ENV}=off")
    words = pull_words(argv)
    if words is None:
        return Declined("not a pull the node agent runs")
    cache, dest = words
    sock = connect(node_store_dir(cache, env))
    if isinstance(sock, Declined):
        return sock
    try:
        created = not os.path.isdir(dest)
        try:
            os.makedirs(dest, exist_ok=True)
            dest_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:  # (the CLI reports it in its own words)
            return Declined(f"cannot open {dest}: {exc.strerror}")
        bar = _ProgressBar() if sys.stderr.isatty() else None
        answer: Exit | Declined = Declined("interrupted", started=True)
        try:
            try:
                message = request(argv, env, os.getcwd(), bar is not None)
            except ValueError:  # (msgpack: a name or value that is not UTF-8)
                return Declined("the command line or environment is not all UTF-8")
            if len(message) > MAX_MESSAGE:
                return Declined("the command line and environment exceed an agent message")
            answer = hand_over(sock, message, dest_fd, bar)
        finally:
            os.close(dest_fd)
            if bar is not None:
                bar.close()
            if created and (isinstance(answer, Declined) or answer.code != 0):
                try:  # as a pull here would leave it (when nothing was placed)
                    os.rmdir(dest)
                except OSError:
                    pass
    finally:
        sock.close()
    if isinstance(answer, Declined):
        return answer
    if answer.out:
        sys.stdout.write(answer.out)
    if answer.err:
        sys.stderr.write(answer.err)
    return answer.code


class _ProgressBar:
    """The CLI's status line (blobstore.progress, imported only for a terminal),
    fed by the daemon's progress messages."""

    def __init__(self) -> None:
        from .progress import ProgressLine

        self.tiers: dict[str, int] = {}
        self.line = ProgressLine("pull", tiers=lambda: self.tiers)

    def __call__(self, doc: Mapping[str, Any]) -> None:
        self.tiers.update(doc.get("tiers") or {})
        self.line(int(doc.get("done", 0)), int(doc.get("total", 0)))
        self.line.files(int(doc.get("files_done", 0)), int(doc.get("files_total", 0)))

    def close(self) -> None:
        self.line.close()
