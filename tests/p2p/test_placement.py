from __future__ import annotations

from blobstore.ids import hash_bytes
from p2p import placement

NODES = [f"node-{i}" for i in range(5)]
CHUNKS = [hash_bytes(str(i).encode()) for i in range(2000)]


def test_every_node_agrees_and_load_spreads() -> None:
    homes = [placement.home(NODES, c) for c in CHUNKS]
    assert homes == [placement.home(list(reversed(NODES)), c) for c in CHUNKS]
    counts = {n: homes.count(n) for n in NODES}
    assert min(counts.values()) > len(CHUNKS) / len(NODES) / 2


def test_a_leaving_node_only_moves_its_own_chunks() -> None:
    before = {c: placement.home(NODES, c) for c in CHUNKS}
    after = {c: placement.home(NODES[1:], c) for c in CHUNKS}
    moved = [c for c in CHUNKS if before[c] != after[c]]
    assert moved
    assert all(before[c] == "node-0" for c in moved)


def test_rank_starts_with_home() -> None:
    for c in CHUNKS[:50]:
        assert placement.rank(NODES, c)[0] == placement.home(NODES, c)
    assert placement.home([], CHUNKS[0]) is None
