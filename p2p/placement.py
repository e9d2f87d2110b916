"""Rendezvous (highest-random-weight) hashing: which peers are home for a chunk.

Every node ranks the same live peers the same way for a chunk, so requests for
one chunk converge on one home peer, and a peer leaving only moves the chunks
it was home for.

A score is a 64-bit mix of the node's key (BLAKE2b of its id, computed once per
node) and the chunk id's first 8 bytes (already a BLAKE3 hash). Ranking a chunk
costs one multiply-xorshift per peer instead of one keyed BLAKE2b: with 1,000
peers a 20 GiB pull ranks ~20,000 chunks, which took ~26 s of CPU with BLAKE2b
per pair (bench/sim_region.py found it) and takes ~4 s this way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from functools import lru_cache

from blobstore.manifest import ChunkRef

_MASK = (1 << 64) - 1

HOME_BLOCK = 32 << 20
"""Packed chunks are placed by block of their pack, not one by one: every chunk
starting in one HOME_BLOCK-aligned block of a pack has the same home, so the home
reads the block with one ranged GET (the origin's span size, SpanTuning.max_span).
Per chunk, each of N homes got every N-th chunk and read each with a GET of its own."""


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


def _mix(x: int) -> int:
    """splitmix64's finalizer: a bijection of 64 bits, each output bit depending on all input."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
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


def rank(node_ids: Iterable[str], chunk_id: str) -> list[str]:
    """Node ids ordered from most to least preferred home for ``chunk_id``."""
    key = chunk_key(chunk_id)
    return sorted(node_ids, key=lambda node: (_mix(node_key(node) ^ key), node), reverse=True)


def home(node_ids: Sequence[str], chunk_id: str) -> str | None:
    """The single home node of ``chunk_id`` among ``node_ids`` (None if empty)."""
    if not node_ids:
        return None
    key = chunk_key(chunk_id)
    return max(node_ids, key=lambda node: (_mix(node_key(node) ^ key), node))
