"""A guard that fails a test when blocking I/O runs on the event loop.

Built on blockbuster (the guard python-zeroconf and others use): while it is
active, a blocking call (file read/write, ``os.stat``/``rename``/``listdir``..., a
blocking socket, ``time.sleep``, a contended lock, sqlite) made on a thread that
runs an event loop raises ``blockbuster.BlockingError`` when an ``async def`` of
``blobstore`` or ``p2p`` led to it. Worker threads (``anyio.to_thread``) may
block: that is where blocking work belongs. Test code may block too: a test's
own steps (calling a synchronous API directly), and the hooks and fakes it hands
to the code under test (an attacker swapping a directory mid-pull is meant to
run right there).

Besides blockbuster's list it catches name resolution (``socket.getaddrinfo``:
a blocking DNS lookup), ``os.open``, ``os.fsync``, ``os.pread``/``os.pwrite`` and
``os.lstat``.

``BLOCKING_GUARD=off`` turns it off (to compare); ``BLOCKING_KNOWN=off`` drops
the KNOWN list (to re-check it). ``BLOCKING_SURVEY=FILE`` lets every blocking
call through and appends one line per call to FILE (the call and our frames),
so one run lists every finding.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from blockbuster import BlockBuster, BlockBusterFunction

SCANNED = ["blobstore", "p2p"]
_REPO = Path(__file__).resolve().parent.parent
_OURS = tuple(str(_REPO / package) + os.sep for package in SCANNED)
_TESTS = str(_REPO / "tests") + os.sep

# Blocking that is fine on the loop: (file suffix, functions, why). A frame of one
# of these functions anywhere on the stack lets the call through.
ALLOWED: list[tuple[str, set[str], str]] = [
    (
        "<frozen importlib._bootstrap>",
        {"_find_and_load"},
        "a lazy import reads the module's files once per process",
    ),
    (
        "logging/__init__.py",
        {"emit", "flush"},
        "a log record is a short buffered write every asyncio program makes on its loop;"
        " moving it to a thread would reorder lines",
    ),
    (
        "blobstore/plugins.py",
        {"_load_plugins"},
        "finds and imports the plugins once per process (cached), at start-up: an import",
    ),
    (
        "blobstore/config.py",
        {"read_token"},
        "the peer token file, read once when the configuration is built at start-up",
    ),
    (
        "blobstore/materialize.py",
        {"_boot"},
        "reads /proc/sys/kernel/random/boot_id: procfs, in memory, no disk",
    ),
    (
        "p2p/metrics.py",
        {"_version"},
        "the package's version from its metadata, once per daemon start (like an import)",
    ),
]

# Found by this guard and not fixed yet: each names whose file it is. Listed so
# the guard holds for everything else; remove a line when its finding is fixed.
KNOWN: list[tuple[str, set[str], str]] = [
    (
        "blobstore/nodestore.py",
        {"open_file", "_refresh"},
        "lead: lstat of a node-store file and sqlite queries (_refresh) on the loop",
    ),
    ("blobstore/seeds.py", {"still_there"}, "lead: lstat of a seed's file on the loop"),
]

_EXTRA = (
    "socket.getaddrinfo",
    "socket.gethostbyname",
    "socket.gethostbyaddr",
    "os.open",
    "os.fsync",
    "os.fdatasync",
    "os.pread",
    "os.pwrite",
    "os.lstat",
)


_ASYNC = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR | inspect.CO_ITERABLE_COROUTINE


def _tests_choice(skip: int) -> bool:
    """Whether test code, not ours, put this call on the loop: a test frame comes
    before any ``async def`` of blobstore/p2p (a test calling a synchronous API
    such as ``FileWriter.write`` directly, or a hook a test handed in)."""
    frame: FrameType | None = sys._getframe(skip)
    while frame is not None:
        code = frame.f_code
        if code.co_filename.startswith(_TESTS):
            return True
        if code.co_flags & _ASYNC and code.co_filename.startswith(_OURS):
            return False
        frame = frame.f_back
    return False


def _our_frames(skip: int) -> list[str]:
    frames: list[str] = []
    frame: FrameType | None = sys._getframe(skip)
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(_OURS) or len(frames) < 2:  # and where it blocked
            rel = os.path.relpath(filename, _REPO)
            frames.append(f"{rel}:{frame.f_lineno}:{frame.f_code.co_name}")
        frame = frame.f_back
    return frames


def _predicate(name: str, function: BlockBusterFunction) -> Callable[..., bool]:
    """blockbuster's own exemption (non-blocking fds and sockets, stdout...), or
    the nearest caller of ours is a test; in survey mode, record and allow."""
    exempt = function.can_block_predicate
    survey = os.environ.get("BLOCKING_SURVEY")
    allowed = [(suffix, set(functions)) for suffix, functions in function.can_block_functions]

    def predicate(*args: Any, **kwargs: Any) -> bool:
        if exempt(*args, **kwargs) or _tests_choice(2):
            return True
        if survey:
            frames = _our_frames(2)
            if frames and not _allowed(allowed):
                with open(survey, "a", encoding="utf-8") as f:
                    f.write(f"{name} <- {' <- '.join(frames[:5])}\n")
            return True
        return False

    return predicate


def _allowed(places: list[tuple[str, set[str]]]) -> bool:
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        for suffix, functions in places:
            if frame.f_code.co_name in functions and filename.endswith(suffix):
                return True
        frame = frame.f_back
    return False


@contextmanager
def blocking_guard() -> Iterator[BlockBuster]:
    """Active for the ``with`` body: blocking calls on the loop raise BlockingError."""
    buster = BlockBuster(scanned_modules=SCANNED)
    if os.environ.get("BLOCKING_GUARD") == "off":  # to measure what the guard costs
        yield buster
        return
    for name in _EXTRA:
        buster.functions[name] = BlockBusterFunction(None, name, scanned_modules=SCANNED)
    known = [] if os.environ.get("BLOCKING_KNOWN") == "off" else KNOWN  # to re-check them
    for name, function in buster.functions.items():
        for suffix, functions, _ in ALLOWED + known:
            function.can_block_in(suffix, functions)
        function.can_block_predicate = _predicate(name, function)
    buster.activate()
    try:
        yield buster
    finally:
        buster.deactivate()
