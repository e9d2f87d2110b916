"""Rendezvous (highest-random-weight) hashing: which peers are home for a chunk,
and which serve it.

Every node ranks the same live peers the same way for a chunk, so requests for
one chunk converge on one home peer, and a peer leaving only moves the chunks
it was home for.

The home (ranked by ``home_key``: a packed chunk's block) is the one peer that
reads the chunk from the store. The chunk's ``SPREAD`` servers (the top of its
ranking by chunk id) are the peers requesters ask: each requester picks one of
them by a hash of its own salt and the chunk, and a server reads the chunk
through from the home. One home per chunk uploads each chunk to every node: with
~20 chunks per home at 1,000 nodes, bytes uploaded per node are Poisson-like and
the busiest home uploads ~1.8x the mean (7-8x with 32 MiB blocks, 0.64 blocks
per node). With k servers per chunk a node serves ~k x 20 chunk-slots of N/k
uploads each, so the spread shrinks like 1/sqrt(k x chunks per node); the home
adds k uploads per chunk of its blocks (see ``SPREAD``).

A score is a 64-bit mix of the node's key (BLAKE2b of its id, computed once per
node) and the chunk id's first 8 bytes (already a BLAKE3 hash). Ranking a chunk
costs one multiply-xorshift per peer instead of one keyed BLAKE2b: with 1,000
peers a 20 GiB pull ranks ~20,000 chunks, which took ~26 s of CPU with BLAKE2b
per pair (bench/sim_region.py found it) and takes ~4 s this way.
"""

from __future__ import annotations

import array
import hashlib
import heapq
import sys
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Generic, TypeVar

from blobstore.manifest import ChunkRef

_MASK = (1 << 64) - 1
T = TypeVar("T")

HOME_BLOCK = 32 << 20
"""Packed chunks are placed by block of their pack, not one by one: every chunk
starting in one HOME_BLOCK-aligned block of a pack has the same home, so the home
reads the block with one ranged GET (the origin's span size, SpanTuning.max_span).
Per chunk, each of N homes got every N-th chunk and read each with a GET of its own."""


SPREAD = 16
"""Servers per chunk. Upload max/mean at 1,000 nodes x 20,480 chunks of ~1 MiB in
32 MiB blocks (``bench/sim_region.py``'s placement figures, two seeds): 1 (the home
serves all) 6.3-7.8; 4: 1.35-1.38; 8: 1.28-1.29; 16: 1.18-1.20; 32: 1.19-1.22.
Analytically: a node serves X ~ Poisson(C k / N) chunks to N/k requesters each, so
max/mean ~ 1 + 3.2 sqrt(N / (C k)) (3.2: the largest of 1,000 normal draws), plus
the home's k copies of each chunk of its blocks (up to 4 blocks of 32 chunks at
1,000 nodes: 4 x 32 x k / 20,480 of the mean, 10% at k = 16), which is what stops
a bigger k from helping."""


@lru_cache(maxsize=1 << 16)
def node_key(node_id: str) -> int:
    """The node's 64-bit placement key (bounded cache: a region has far fewer nodes)."""
    digest = hashlib.blake2b(node_id.encode(), digest_size=8, person=b"bs-place").digest()
    return int.from_bytes(digest, "big")


def chunk_key(chunk_id: str) -> int:
    """The chunk's 64-bit key: the first 16 hex digits of its id (uniform: ids are hashes).
    An id that is not hex (tests may use names) is hashed instead."""
    try:
        return int(chunk_id[:16], 16)
    except ValueError:
        return int.from_bytes(hashlib.blake2b(chunk_id.encode(), digest_size=8).digest(), "big")


_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _mix(x: int) -> int:
    """splitmix64's finalizer: a bijection of 64 bits, each output bit depending on all input."""
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK
    return x ^ (x >> 31)


def home_key(ref: ChunkRef) -> str:
    """The key a chunk is placed by: its block, ``<pack>/<offset // HOME_BLOCK>``
    (hashed to 16 hex digits), for a packed ref; its id for an unpacked one."""
    if ref.pack is None:
        return ref.id
    block = f"{ref.pack}/{ref.offset // HOME_BLOCK}".encode()
    return hashlib.blake2b(block, digest_size=8, person=b"bs-block").hexdigest()


def score(node_id: str, chunk_id: str) -> int:
    return _mix(node_key(node_id) ^ chunk_key(chunk_id))


def keyed_score(node_id: str, key: int) -> int:
    """``score`` with the chunk's key already computed (``chunk_key``): ranking one
    chunk over 1,000 peers parses its id once, not 1,000 times."""
    return _mix(node_key(node_id) ^ key)


def rank(node_ids: Iterable[str], chunk_id: str) -> list[str]:
    """Node ids ordered from most to least preferred home for ``chunk_id``."""
    key = chunk_key(chunk_id)
    return sorted(node_ids, key=lambda node: (_mix(node_key(node) ^ key), node), reverse=True)


_PACKED_FROM = 64
"""Regions from this size rank with a cached ``ranking`` (a smaller one is cheap as is)."""


def home(node_ids: Sequence[str], chunk_id: str) -> str | None:
    """The single home node of ``chunk_id`` among ``node_ids`` (None if empty)."""
    if not node_ids:
        return None
    key = chunk_key(chunk_id)
    if len(node_ids) >= _PACKED_FROM:  # a daemon's check, once per chunk asked
        return ranking(tuple(node_ids)).top(key, 1)[0]
    return max(node_ids, key=lambda node: (_mix(node_key(node) ^ key), node))


def top_keyed(items: Sequence[T], keys: Sequence[int], key: int, count: int) -> list[T]:
    """The ``count`` of ``items`` ranked first for ``key`` (``chunk_key``), given each
    item's ``node_key`` in ``keys``: ``rank`` without the per-item lookups and tuples
    (a requester ranks each chunk twice, by block and by id, over 1,000 peers)."""
    scores = map(_mix, (k ^ key for k in keys))
    scored = heapq.nlargest(count, zip(scores, range(len(keys)), strict=True))
    return [items[i] for _, i in scored]


class Ranking(Generic[T]):
    """``top_keyed`` for many chunks over one membership, about 4x cheaper per chunk.

    The node keys are packed once into one integer, 128 bits a lane, so the 64-bit
    mix of every node with a chunk's key is a dozen big-integer operations in C (a
    lane's product of two 64-bit values fits its 128 bits, and the shifts' spill
    into a neighbouring lane is masked off), not a Python call per node; then only
    the scores above a threshold that ~``2 x count + 16`` pass are sorted. At 1,000
    nodes a requester ranks every chunk of a pull over the whole region (its servers
    by chunk id, its homes by block): 0.33 ms per chunk with ``top_keyed`` was ~70%
    of the CPU of the 1,000-node simulation (and of a real daemon's ranking)."""

    __slots__ = ("_items", "_masks", "_ones", "_packed")

    def __init__(self, items: Sequence[T], keys: Sequence[int]) -> None:
        """``keys[i]``: the ``node_key`` of ``items[i]``."""
        count = len(items)
        self._items = list(items)
        self._ones = int.from_bytes((b"\x01" + bytes(15)) * count, "little")
        self._masks = _MASK * self._ones
        self._packed = int.from_bytes(
            b"".join(key.to_bytes(8, "little") + bytes(8) for key in keys), "little"
        )

    def __len__(self) -> int:
        return len(self._items)

    def scores(self, key: int) -> list[int]:
        """Every item's score for ``key``, in item order (``_mix(node_key ^ key)``)."""
        count, masks = len(self._items), self._masks
        x = self._packed ^ (key * self._ones)
        x = ((x ^ (x >> 30)) & masks) * _MIX1 & masks
        x = ((x ^ (x >> 27)) & masks) * _MIX2 & masks
        x = (x ^ (x >> 31)) & masks
        lanes = array.array("Q", x.to_bytes(16 * count, "little"))
        if sys.byteorder == "big":
            lanes.byteswap()
        return lanes[::2].tolist()

    def top(self, key: int, count: int) -> list[T]:
        """The ``count`` items ranked first for ``key``: ``top_keyed``'s answer."""
        items = self._items
        scores = self.scores(key)
        want = 2 * count + 16
        if want < len(items):
            # Scores are uniform over 64 bits: ~``want`` pass; too few, rank them all.
            floor = _MASK - (_MASK // len(items)) * want
            passed = [(s, i) for i, s in enumerate(scores) if s > floor]
            if len(passed) >= count:
                passed.sort(reverse=True)
                return [items[i] for _, i in passed[:count]]
        best = heapq.nlargest(count, zip(scores, range(len(items)), strict=True))
        return [items[i] for _, i in best]


@lru_cache(maxsize=8)
def ranking(node_ids: tuple[str, ...]) -> Ranking[str]:
    """The ``Ranking`` of a membership, kept for the next lookups over it (a daemon
    answers every chunk it is asked for over the same live peers until one changes)."""
    return Ranking(node_ids, [node_key(node) for node in node_ids])


def servers(node_ids: Iterable[str], chunk_id: str, spread: int = SPREAD) -> list[str]:
    """The ``spread`` peers that serve ``chunk_id`` to requesters, best first."""
    key = chunk_key(chunk_id)
    if isinstance(node_ids, Sequence) and len(node_ids) >= _PACKED_FROM:
        return ranking(tuple(node_ids)).top(key, spread)
    return heapq.nlargest(spread, node_ids, key=lambda node: (_mix(node_key(node) ^ key), node))


def pick(salt: int, chunk_id: str, count: int) -> int:
    """Which of ``count`` servers a requester with ``salt`` asks for ``chunk_id``:
    uniform over requesters, the same for one requester every time."""
    return _mix(salt ^ chunk_key(chunk_id)) % count


def reads_through(
    node_ids: Sequence[str], me: str, chunk_id: str, home_key: str, spread: int = SPREAD
) -> bool:
    """Whether ``me`` answers a miss of ``chunk_id`` by reading it: as its home
    (by ``home_key``: from the store) or as one of its servers (from the home).
    ``node_ids`` includes ``me``. Ranked with the membership's ``ranking`` (kept
    while the same ids are passed: a daemon checks this for every chunk it is asked)."""
    if not node_ids:
        return False
    ranked = ranking(tuple(node_ids))
    if ranked.top(chunk_key(home_key), 1) == [me]:
        return True
    return spreads(len(node_ids), spread) and me in ranked.top(chunk_key(chunk_id), spread)


def spreads(region: int, spread: int = SPREAD) -> bool:
    """Whether chunks are served by ``spread`` servers in a region of ``region``
    nodes: only when it has more nodes than that. In a smaller one every node
    would serve every chunk and read each through from its home, so any node
    whose view of the region lags (a peer marked down under load) takes itself
    for a home and reads the store: 10 real daemons on a loaded 2-core box read
    1.1-2.0x unique (tests/p2p/test_region.py), against 1.00x with homes only."""
    return spread > 1 and region > spread
