"""Rendezvous (highest-random-weight) hashing: which peers are home for a chunk.

Every node ranks the same live peers the same way for a chunk, so requests for
one chunk converge on one home peer, and a peer leaving only moves the chunks
it was home for.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence


def score(node_id: str, chunk_id: str) -> int:
    digest = hashlib.blake2b(chunk_id.encode(), digest_size=8, key=node_id.encode()[:64]).digest()
    return int.from_bytes(digest, "big")


def rank(node_ids: Iterable[str], chunk_id: str) -> list[str]:
    """Node ids ordered from most to least preferred home for ``chunk_id``."""
    return sorted(node_ids, key=lambda node: (score(node, chunk_id), node), reverse=True)


def home(node_ids: Sequence[str], chunk_id: str) -> str | None:
    """The single home node of ``chunk_id`` among ``node_ids`` (None if empty)."""
    if not node_ids:
        return None
    return max(node_ids, key=lambda node: (score(node, chunk_id), node))
