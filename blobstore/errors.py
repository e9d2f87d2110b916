"""Every exception blobstore raises on purpose, grouped by what the caller does next.

- ``NotFound``     -> try the next source, or tell the user the name is unknown.
- ``Corrupt``      -> discard what was received and fetch it elsewhere.
- ``Unavailable``  -> fail over / retry later (network, server, disk trouble).
- ``BadInput``     -> tell the user; nothing was changed.
- ``AuthError``    -> stop talking to that peer (or fix the token).
- ``Conflict``     -> someone else moved the thing: re-read and retry, or give up.

Each class has exactly one parent, so no error belongs to two groups.
Foreign exceptions are translated at the boundary with ``raise ... from exc``:
``os_error`` / ``os_errors`` for OSError (here), botocore in ``s3store``,
sockets in ``p2p``. A user never sees a raw traceback for a predictable
failure; every message is one line.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, overload


class BlobstoreError(Exception):
    """Base class of every error blobstore raises on purpose."""


# --- NotFound: try the next source ------------------------------------------------


class NotFound(BlobstoreError):
    """The thing asked for does not exist in this source."""


class ChunkMissing(NotFound):
    """A chunk is not held by this source."""

    def __init__(self, chunk_id: str, where: str = "") -> None:
        self.chunk_id = chunk_id
        super().__init__(f"chunk {chunk_id} not found" + (f" in {where}" if where else ""))


class ObjectMissing(NotFound):
    """An object-store key does not exist."""

    def __init__(self, key: str, where: str = "") -> None:
        self.key = key
        super().__init__(f"object {key} not found" + (f" in {where}" if where else ""))


class RefNotFound(NotFound):
    """A ref name points nowhere."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"ref {name!r} not found")


class SeedChanged(NotFound):
    """A seed file (a pulled file the node store reads chunks from) is gone or is
    no longer the file that was adopted: forget the seed, read elsewhere."""


class SourceGone(NotFound):
    """The node-store file to place vanished (evicted, or dropped as changed):
    fetch the content again."""


# --- Corrupt: discard and fetch elsewhere -----------------------------------------


class Corrupt(BlobstoreError):
    """Bytes do not match their content address (or cannot be decoded)."""


class CorruptChunk(Corrupt):
    """A chunk's bytes do not hash to its id."""

    def __init__(self, chunk_id: str, where: str = "", actual: str | None = None) -> None:
        self.chunk_id = chunk_id
        msg = f"chunk {chunk_id} is corrupt"
        if where:
            msg += f" in {where}"
        if actual:
            msg += f" (hashes to {actual[:16]}…)"
        super().__init__(msg)


class ProtocolError(Corrupt):
    """A peer sent a malformed frame."""


# --- Unavailable: fail over or retry later ----------------------------------------


class Unavailable(BlobstoreError):
    """A source cannot answer right now: network, server or disk trouble."""


class StoreUnavailable(Unavailable):
    """The object store could not be reached or answered with an error."""


class TruncatedResponse(StoreUnavailable):
    """A response body ended before its Content-Length (safe to repeat a GET)."""


class PeerUnavailable(Unavailable):
    """A peer could not be reached, timed out or broke the protocol."""


class PeerBusy(PeerUnavailable):
    """The peer answered that it is at its connection cap: alive, just full. Ask
    another; never take it for dead (nor tell the region it is)."""


class WrongRegion(PeerUnavailable):
    """The peer serves another region; it must not be used."""

    def __init__(self, address: str, node: str, region: str) -> None:
        self.node = node
        self.region = region
        super().__init__(f"peer {address} ({node}) is in region {region!r}")


class SelfConnection(PeerUnavailable):
    """The peer is this very node (it found its own address)."""

    def __init__(self, address: str) -> None:
        super().__init__(f"peer {address} is this node")


class DiskFull(Unavailable):
    """A local disk (or quota) has no room left."""


# --- BadInput: tell the user, nothing changed -------------------------------------


class BadInput(BlobstoreError):
    """The user (or a file the user pointed at) gave input we refuse."""


class InvalidManifest(BadInput):
    """A manifest cannot be decoded, fails validation, or is not of the kind
    expected (a layer where a tree was asked for). Refetching the same
    content-addressed bytes elsewhere would not help."""


class UnsafePath(BadInput):
    """A path would escape its destination directory."""


class InvalidRef(BadInput):
    """A ref name is malformed."""


class ConfigError(BadInput):
    """Configuration (options, environment, URLs) is invalid."""


class UnsafeMember(UnsafePath):
    """An image archive's member name or link would escape the archive."""


class BadImage(BadInput):
    """An image archive or layout is malformed, truncated or refused."""


class DigestMismatch(BadImage):
    """Bytes do not hash to the sha256 digest they are named by."""

    def __init__(self, what: str, expected: str, actual: str) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(f"{what}: sha256 mismatch (expected {expected}, got {actual})")


# --- the rest ---------------------------------------------------------------------


class AuthError(BlobstoreError):
    """A peer refused our token, or sent a wrong one."""


class Conflict(BlobstoreError):
    """A conditional update lost a race (someone else moved the ref)."""


# --- OSError at the boundary ------------------------------------------------------

_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_BAD_PATH = frozenset(
    {
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ELOOP,
        errno.ENAMETOOLONG,
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.EEXIST,
        errno.ENOTEMPTY,
        errno.EXDEV,
    }
)
"""Errnos that say the path itself is wrong (missing, not allowed, wrong type),
as opposed to the disk or the system having trouble."""


@overload
def os_error(
    exc: OSError,
    doing: str,
    *,
    user_path: Literal[False] = False,
    unavailable: type[Unavailable] = Unavailable,
) -> Unavailable: ...


@overload
def os_error(
    exc: OSError,
    doing: str,
    *,
    user_path: bool,
    unavailable: type[Unavailable] = Unavailable,
) -> BlobstoreError: ...


def os_error(
    exc: OSError,
    doing: str,
    *,
    user_path: bool = False,
    unavailable: type[Unavailable] = Unavailable,
) -> BlobstoreError:
    """The blobstore error for ``exc`` met while ``doing`` (e.g. ``"cannot write
    /x"``), for ``raise os_error(exc, ...) from exc``:

    - ``DiskFull`` for ENOSPC and EDQUOT;
    - ``BadInput`` when the path came from the user (``user_path``) and the
      errno says the path itself is wrong (missing, not a directory, no
      permission, read-only, ...);
    - ``unavailable`` (``Unavailable`` or a subclass) otherwise.

    The message is ``"<doing>: <strerror>"``, plus the file name when
    ``doing`` does not already hold it."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is not None and str(exc.filename) not in doing:
        reason += f" ({exc.filename})"
    message = f"{doing}: {reason}"
    if exc.errno in _DISK_FULL:
        return DiskFull(message)
    if user_path and exc.errno in _BAD_PATH:
        return BadInput(message)
    return unavailable(message)


@contextmanager
def os_errors(
    doing: str, *, user_path: bool = False, unavailable: type[Unavailable] = Unavailable
) -> Iterator[None]:
    """Translate an OSError raised in the block with ``os_error``."""
    try:
        yield
    except OSError as exc:
        raise os_error(exc, doing, user_path=user_path, unavailable=unavailable) from exc


# --- S3 transport signals ----------------------------------------------------------
# Raised by the request path (s3http.py) and caught in s3store.py, which turns each into
# the type a caller sees (ObjectMissing, Conflict, ConfigError, StoreUnavailable...). They
# are StoreUnavailable themselves, so one that escaped would still read as one line.


class S3Error(StoreUnavailable):
    """S3 answered with an error (after retries)."""

    def __init__(self, status: int, code: str, message: str, region: str | None) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.status, self.code, self.message, self.region = status, code, message, region


class NetworkError(StoreUnavailable):
    """The endpoint could not be reached or stopped answering (after retries)."""


class CutShort(StoreUnavailable):
    """A response body ended before its Content-Length."""


class TooLarge(StoreUnavailable):
    """A response body is larger than the request allows (``max_body``)."""


class Aborted(StoreUnavailable):
    """``Call.abort`` was called (the loop's deadline, or a cancellation)."""


class BucketElsewhere(StoreUnavailable):
    """The bucket answered from another region (its ``x-amz-bucket-region``)."""

    def __init__(self, region: str, error: StoreUnavailable) -> None:
        super().__init__(region)
        self.region, self.error = region, error


# --- task groups ------------------------------------------------------------------


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


@contextmanager
def single_errors() -> Iterator[None]:
    """Re-raise a task group's ExceptionGroup as its first meaningful error.

    Parallel workers often fail together for one cause; callers want one
    exception (and users one line), not a group of identical ones.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        for kind in (BlobstoreError, OSError, Exception, BaseException):
            for exc in leaves:
                if isinstance(exc, kind):
                    raise exc from group
        raise
