"""Content-defined chunking (FastCDC) and BLAKE3 ids. Pure and synchronous.

Cutting and hashing both release the GIL, so callers run ``cut_and_hash`` in
worker threads and both cores work.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pyfastcdc import FastCDC

from .ids import ChunkId, hash_bytes
from .manifest import ChunkerInfo

CHUNKER_NAME = "fastcdc2020-pyfastcdc"


@dataclass(frozen=True, slots=True)
class ChunkerParams:
    """FastCDC parameters. pyfastcdc's real mean is ``avg + min``."""

    min_size: int = 256 << 10
    avg_size: int = 768 << 10
    max_size: int = 4 << 20

    def info(self) -> ChunkerInfo:
        return ChunkerInfo(CHUNKER_NAME, self.min_size, self.avg_size, self.max_size)


DEFAULT_PARAMS = ChunkerParams()


@dataclass(frozen=True, slots=True)
class Span:
    offset: int
    length: int
    id: ChunkId


class Chunker:
    """Cuts buffers into content-defined chunks. Not thread-safe; make one per thread."""

    __slots__ = ("_cdc", "params")

    def __init__(self, params: ChunkerParams = DEFAULT_PARAMS) -> None:
        self.params = params
        self._cdc = FastCDC(
            avg_size=params.avg_size, min_size=params.min_size, max_size=params.max_size
        )

    def cut(self, buf: bytes | bytearray | memoryview) -> Iterator[tuple[int, int]]:
        """Yield (offset, length) of each chunk of ``buf``."""
        if len(buf) == 0:
            return
        for chunk in self._cdc.cut_buf(buf):
            yield chunk.offset, chunk.length

    def cut_and_hash(self, buf: bytes | bytearray | memoryview) -> list[Span]:
        """Cut ``buf`` and hash every chunk. Runs in a worker thread."""
        view = memoryview(buf)
        return [Span(off, ln, hash_bytes(view[off : off + ln])) for off, ln in self.cut(view)]
