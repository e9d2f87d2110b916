"""OriginSource.fetch grows its spans to ``big_span`` on an object store when the
fetch is big enough to keep every span in flight busy (a pack is then one GET);
small fetches and ``file://`` stores keep ``max_span``."""

from __future__ import annotations

import pytest
from fakes import Collect
from helpers import random_bytes
from test_spans import build_pack

from blobstore.objectstore import pack_key
from blobstore.origin import OriginSource, SpanTuning
from blobstore.stores import open_object_store

pytestmark = pytest.mark.anyio

CHUNK = 100 << 10
TUNING = SpanTuning(max_span=2 * CHUNK, big_span=4 * CHUNK, spans_in_flight=2)


async def test_a_big_fetch_reads_a_pack_per_get_from_an_object_store(
    object_store_url: str,
) -> None:
    p1, d1, r1 = build_pack([CHUNK] * 4, seed="big-a")
    p2, d2, r2 = build_pack([CHUNK] * 4, seed="big-b")
    async with open_object_store(object_store_url) as store:
        await store.put(pack_key(p1), d1)
        await store.put(pack_key(p2), d2)
        origin = OriginSource(store, tuning=TUNING)
        sink = Collect()
        # 8 chunks: 2 spans in flight x big_span of bytes, so spans may grow
        assert await origin.fetch([*r1, *r2], sink) == []
        expected = {r: random_bytes(CHUNK, f"big-a-{i}") for i, r in enumerate(r1)}
        expected |= {r: random_bytes(CHUNK, f"big-b-{i}") for i, r in enumerate(r2)}
        assert sink.got == expected
        file_store = object_store_url.startswith("file:")
        assert origin.requests == (4 if file_store else 2)  # max_span on disk, a pack per GET
        # half as much: too little to keep 2 big spans busy, so max_span again
        origin.requests = 0
        sink = Collect()
        assert await origin.fetch(r1, sink) == []
        assert set(sink.got) == set(r1)
        assert origin.requests == 2
