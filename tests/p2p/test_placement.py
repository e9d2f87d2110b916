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


REGION = [f"n{i:03d}" for i in range(40)]


def test_servers_start_with_the_chunk_home_and_every_node_agrees() -> None:
    for c in CHUNKS[:50]:
        servers = placement.servers(REGION, c)
        assert len(servers) == placement.SPREAD == len(set(servers))
        assert servers[0] == placement.home(REGION, c)
        assert servers == placement.servers(list(reversed(REGION)), c)
        assert servers == placement.rank(REGION, c)[: placement.SPREAD]


def test_requesters_spread_evenly_over_a_chunks_servers() -> None:
    salts = range(0, 1 << 40, (1 << 40) // 1600)
    for c in CHUNKS[:20]:
        picks = [placement.pick(salt, c, placement.SPREAD) for salt in salts]
        assert picks == [placement.pick(salt, c, placement.SPREAD) for salt in salts]
        counts = [picks.count(i) for i in range(placement.SPREAD)]
        assert min(counts) > len(picks) / placement.SPREAD / 2


def test_a_chunks_home_and_its_servers_read_it_through_and_no_one_else() -> None:
    block = "ab" * 8  # a packed chunk is placed by its block, served by its id
    for c in CHUNKS[:50]:
        readers = {n for n in REGION if placement.reads_through(REGION, n, c, block)}
        assert readers == {placement.home(REGION, block), *placement.servers(REGION, c)}


def test_a_small_region_has_no_servers() -> None:
    # Every node would serve every chunk, and read it through from its home.
    small = REGION[: placement.SPREAD]
    assert not placement.spreads(len(small))
    assert placement.spreads(len(small) + 1)
    for c in CHUNKS[:50]:
        readers = [n for n in small if placement.reads_through(small, n, c, c)]
        assert readers == [placement.home(small, c)]


def test_ranking_by_precomputed_keys_is_the_same_ranking() -> None:
    keys = [placement.node_key(n) for n in REGION]
    for c in CHUNKS[:50]:
        top = placement.top_keyed(REGION, keys, placement.chunk_key(c), placement.SPREAD)
        assert top == placement.servers(REGION, c)


def test_packed_ranking_is_the_same_ranking() -> None:
    # Ranking mixes every node's key in one big-integer lane each; its answers must be
    # top_keyed's, for the small path (every score sorted) and the thresholded one.
    for size in (1, 3, 40, 1000):
        nodes = [f"m{i:04d}" for i in range(size)]
        keys = [placement.node_key(n) for n in nodes]
        ranking = placement.Ranking(nodes, keys)
        for c in CHUNKS[:40]:
            key = placement.chunk_key(c)
            assert ranking.scores(key) == [placement.keyed_score(n, key) for n in nodes]
            for count in (1, 3, placement.SPREAD):
                assert ranking.top(key, count) == placement.top_keyed(nodes, keys, key, count)
    assert placement.Ranking([], []).top(1, 3) == []
