"""Content-defined chunking: boundaries follow content, sizes stay in bounds, ids are BLAKE3."""

from __future__ import annotations

import itertools

import blake3
from helpers import random_bytes

from blobstore.chunker import CHUNKER_NAME, DEFAULT_PARAMS, Chunker, ChunkerParams
from blobstore.ids import hash_bytes
from blobstore.manifest import ChunkerInfo

SMALL = ChunkerParams(min_size=16 << 10, avg_size=48 << 10, max_size=256 << 10)


def test_default_params_match_design() -> None:
    # DESIGN.md: ~1 MiB average, min 256 KiB, max 4 MiB (pyfastcdc's mean is avg + min).
    assert DEFAULT_PARAMS.min_size == 256 << 10
    assert DEFAULT_PARAMS.max_size == 4 << 20
    assert DEFAULT_PARAMS.avg_size + DEFAULT_PARAMS.min_size == 1 << 20
    assert DEFAULT_PARAMS.info() == ChunkerInfo(CHUNKER_NAME, 256 << 10, 768 << 10, 4 << 20)


def test_chunks_cover_input_exactly_and_sizes_in_bounds() -> None:
    data = random_bytes(40 << 20, "cover")
    spans = Chunker().cut_and_hash(data)
    assert spans[0].offset == 0
    for prev, cur in itertools.pairwise(spans):
        assert cur.offset == prev.offset + prev.length
    assert sum(s.length for s in spans) == len(data)
    for s in spans[:-1]:
        assert DEFAULT_PARAMS.min_size <= s.length <= DEFAULT_PARAMS.max_size
    assert 0 < spans[-1].length <= DEFAULT_PARAMS.max_size
    mean = len(data) / len(spans)
    assert (512 << 10) < mean < (2 << 20)  # ~1 MiB target


def test_ids_are_blake3_of_chunk_bytes() -> None:
    data = random_bytes(5 << 20, "ids")
    for s in Chunker().cut_and_hash(data):
        expected = blake3.blake3(data[s.offset : s.offset + s.length]).hexdigest()
        assert s.id == expected
        assert len(s.id) == 64


def test_hash_bytes_is_blake3_for_small_and_large_inputs() -> None:
    for size in (0, 1, 1 << 20, 9 << 20):  # 9 MiB takes the multi-threaded path
        data = random_bytes(size, size)
        assert hash_bytes(data) == blake3.blake3(data).hexdigest()


def test_insert_near_start_changes_only_first_chunks() -> None:
    data = random_bytes(32 << 20, "insert")
    before = Chunker().cut_and_hash(data)
    edited = data[:1000] + b"inserted bytes" + data[1000:]
    after = Chunker().cut_and_hash(edited)
    old_ids = [s.id for s in before]
    new_ids = [s.id for s in after]
    # Content-defined: after the edited chunk(s) the cut points re-synchronise.
    changed = [i for i in new_ids if i not in set(old_ids)]
    assert 1 <= len(changed) <= 2, (len(changed), len(new_ids))
    assert new_ids[len(changed) :] == old_ids[len(changed) :]
    # ... whereas fixed-size blocks would all shift.
    assert len(old_ids) > 10


def test_deterministic_and_params_matter() -> None:
    data = random_bytes(6 << 20, "det")
    a = [s.id for s in Chunker(SMALL).cut_and_hash(data)]
    b = [s.id for s in Chunker(SMALL).cut_and_hash(data)]
    assert a == b
    assert a != [s.id for s in Chunker().cut_and_hash(data)]
    for s in Chunker(SMALL).cut_and_hash(data)[:-1]:
        assert SMALL.min_size <= s.length <= SMALL.max_size


def test_empty_and_tiny_inputs() -> None:
    assert Chunker().cut_and_hash(b"") == []
    (span,) = Chunker().cut_and_hash(b"x")
    assert (span.offset, span.length, span.id) == (0, 1, hash_bytes(b"x"))


def test_highly_repetitive_input_is_cut_at_max_size() -> None:
    spans = Chunker().cut_and_hash(bytes(13 << 20))
    assert all(s.length <= DEFAULT_PARAMS.max_size for s in spans)
    assert len({s.id for s in spans[:-1]}) == 1  # identical chunks dedupe to one id
