"""Spans: neighbouring chunks of one pack, read with one ranged GET.

Pure core, no I/O. ``plan_spans`` groups refs by pack, sorts them by offset and
coalesces neighbours into spans (a gap of at most ``max_gap`` bytes is read and
thrown away; a span grows to at most ``max_span`` bytes unless one chunk alone
is larger). ``SpanCutter`` cuts the byte stream of a span, block by block as it
arrives, into its chunks, so nobody ever holds a whole span; after a broken
stream, ``remaining`` is the span still to read, starting at the first chunk
not cut yet.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .ids import ChunkId
from .manifest import ChunkRef


@dataclass(frozen=True, slots=True)
class Piece:
    """One chunk's bytes inside a span, wanted by one or more refs."""

    offset: int
    size: int
    refs: tuple[ChunkRef, ...]

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True, slots=True)
class Span:
    """Bytes ``offset .. offset+length`` of ``pack``, holding ``pieces`` in order."""

    pack: ChunkId
    offset: int
    length: int
    pieces: tuple[Piece, ...]

    @property
    def refs(self) -> list[ChunkRef]:
        return [ref for piece in self.pieces for ref in piece.refs]


def plan_spans(refs: Iterable[ChunkRef], *, max_gap: int, max_span: int) -> list[Span]:
    """Coalesce packed refs (``pack`` set) into spans, packs in order of first
    appearance (so a caller's priority order roughly holds), offsets ascending.

    Refs naming the same chunk at the same place share one piece. Pieces that
    overlap (a manifest naming two different chunks at one place) never share
    a span: each is read, and verified, on its own.
    """
    by_pack: dict[ChunkId, dict[tuple[int, int, ChunkId], list[ChunkRef]]] = {}
    for ref in refs:
        if ref.pack is None:
            raise ValueError(f"chunk {ref.id} has no pack")
        by_pack.setdefault(ref.pack, {}).setdefault((ref.offset, ref.size, ref.id), []).append(ref)
    spans: list[Span] = []
    for pack, places in by_pack.items():
        current: list[Piece] = []
        for (offset, size, _), group in sorted(places.items()):
            piece = Piece(offset, size, tuple(group))
            if current and _fits(current, piece, max_gap, max_span):
                current.append(piece)
                continue
            if current:
                spans.append(_span(pack, current))
            current = [piece]
        if current:
            spans.append(_span(pack, current))
    return spans


def _fits(current: list[Piece], piece: Piece, max_gap: int, max_span: int) -> bool:
    end = current[-1].end
    return end <= piece.offset <= end + max_gap and piece.end - current[0].offset <= max_span


def _span(pack: ChunkId, pieces: list[Piece]) -> Span:
    start = pieces[0].offset
    return Span(pack, start, pieces[-1].end - start, tuple(pieces))


class SpanCutter:
    """Cuts a span's byte stream into its pieces as blocks arrive.

    Holds at most one partly received piece (as slices of the blocks it came
    in, joined once complete: one copy, no zero-filled buffer); gap bytes are
    skipped. ``feed_parts`` hands the slices on unjoined (see ``join``).
    """

    __slots__ = ("_filled", "_next", "_parts", "_position", "span")

    def __init__(self, span: Span) -> None:
        self.span = span
        self._next = 0
        """Index of the first piece not cut yet."""
        self._position = span.offset
        """Pack offset of the next byte to be fed."""
        self._parts: list[memoryview] = []
        self._filled = 0

    @property
    def pending(self) -> tuple[Piece, ...]:
        """Pieces not cut yet (the one being filled included)."""
        return self.span.pieces[self._next :]

    def remaining(self) -> Span | None:
        """The span still to read, from the first piece not cut; None when done.
        Forgets a partly filled piece: it is read again whole."""
        pieces = self.pending
        if not pieces:
            return None
        self._parts, self._filled = [], 0
        self._position = pieces[0].offset
        return _span(self.span.pack, list(pieces))

    def feed(self, block: bytes | bytearray | memoryview) -> list[tuple[Piece, bytes]]:
        """Take the next bytes of the stream; return the pieces they complete.

        Bytes beyond the last piece are ignored.
        """
        return [(piece, join(parts)) for piece, parts in self.feed_parts(block)]

    def feed_parts(
        self, block: bytes | bytearray | memoryview
    ) -> list[tuple[Piece, list[memoryview]]]:
        """``feed`` without the join: each completed piece as the slices of the
        blocks it arrived in (``join`` makes its bytes), so that the copy can be
        made off the event loop. Bytes beyond the last piece are ignored."""
        done: list[tuple[Piece, list[memoryview]]] = []
        view = memoryview(block)
        pieces = self.span.pieces
        while view and self._next < len(pieces):
            piece = pieces[self._next]
            if self._position < piece.offset:  # a gap between pieces
                skip = min(len(view), piece.offset - self._position)
                view = view[skip:]
                self._position += skip
                continue
            taken = min(len(view), piece.size - self._filled)
            self._parts.append(view[:taken])
            self._filled += taken
            self._position += taken
            view = view[taken:]
            if self._filled < piece.size:
                break
            done.append((piece, self._parts))
            self._parts, self._filled = [], 0
            self._next += 1
        return done


def join(parts: list[memoryview]) -> bytes:
    """A piece's bytes from its slices: the block itself when the piece is a
    whole ``bytes`` block (no copy), else one copy (CPython drops the GIL while
    joining 1 MiB or more, so a worker thread's join runs beside the loop)."""
    if len(parts) == 1:
        whole = parts[0].obj
        if isinstance(whole, bytes) and len(whole) == parts[0].nbytes:
            return whole
    return b"".join(parts)
