"""One exception hierarchy for blobstore, grouped by what the caller does next.

- ``NotFound``     -> try the next source, or tell the user the name is unknown.
- ``Corrupt``      -> discard what was received and fetch it elsewhere.
- ``Unavailable``  -> fail over / retry later (network, server, disk trouble).
- ``BadInput``     -> tell the user; nothing was changed.

Foreign exceptions (OSError, botocore, socket) are translated at the boundary
with ``raise ... from exc`` so that a user never sees a raw traceback for a
predictable failure. Every message is one line.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class BlobstoreError(Exception):
    """Base class of every error blobstore raises on purpose."""


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


class Unavailable(BlobstoreError):
    """A source cannot answer right now: network, server or disk trouble."""


class StoreUnavailable(Unavailable):
    """The object store could not be reached or answered with an error."""


class PeerUnavailable(Unavailable):
    """A peer could not be reached, timed out or broke the protocol."""


class DiskFull(Unavailable):
    """A local disk has no room left."""


class BadInput(BlobstoreError):
    """The user (or a file the user pointed at) gave input we refuse."""


class InvalidManifest(BadInput, Corrupt):
    """A manifest cannot be decoded or fails validation."""


class UnsafePath(BadInput):
    """A path would escape its destination directory."""


class InvalidRef(BadInput):
    """A ref name is malformed."""


class ConfigError(BadInput):
    """Configuration (options, environment, URLs) is invalid."""


class ProtocolError(Corrupt):
    """A peer sent a malformed frame."""


class AuthError(BlobstoreError):
    """A peer refused our token, or sent a wrong one."""


class Conflict(BlobstoreError):
    """A conditional update lost a race (someone else moved the ref)."""


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
