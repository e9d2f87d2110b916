"""Span reads from pack objects: the planner, the cutter, and ``OriginSource.fetch``
against real stores (a directory and SeaweedFS S3), packs built by the test."""

from __future__ import annotations

import json
import os
import random
import sys
import textwrap
from collections.abc import AsyncGenerator, Collection
from pathlib import Path

import anyio
import pytest
from fakes import Collect
from helpers import random_bytes
from s3proxy import CountingProxy, Fault
from s3server import SeaweedS3Server

from blobstore.config import S3Config
from blobstore.errors import (
    ChunkMissing,
    CorruptChunk,
    DiskFull,
    ObjectMissing,
    StoreUnavailable,
)
from blobstore.ids import ChunkId, hash_bytes
from blobstore.locator import PackLocator
from blobstore.manifest import ChunkRef
from blobstore.objectstore import ObjectInfo, ObjectStore, index_key, pack_key
from blobstore.origin import OriginSource, SpanTuning
from blobstore.packs import encode_index
from blobstore.s3store import S3ObjectStore
from blobstore.source import ChunkData, SplitSink, Undelivered
from blobstore.spans import SpanCutter, plan_spans
from blobstore.stores import LazyObjectStore, open_object_store, parse_s3_url

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parent.parent
PACK = ChunkId("ab" * 32)
OTHER = ChunkId("cd" * 32)


def ref(offset: int, size: int, pack: ChunkId = PACK, seed: object = None) -> ChunkRef:
    return ChunkRef(hash_bytes(f"{pack}{offset}{seed}".encode()), size, pack, offset)


def build_pack(
    sizes: list[int], gap: int = 0, seed: str = "p"
) -> tuple[ChunkId, bytes, list[ChunkRef]]:
    """A pack of chunks of ``sizes`` with ``gap`` unrelated bytes between them."""
    parts: list[bytes] = []
    refs: list[ChunkRef] = []
    offset = 0
    chunks = [random_bytes(size, f"{seed}-{i}") for i, size in enumerate(sizes)]
    pack_id = hash_bytes(b"".join(chunks))
    for data in chunks:
        refs.append(ChunkRef(hash_bytes(data), len(data), pack_id, offset))
        parts.append(data + b"\xee" * gap)
        offset += len(data) + gap
    return pack_id, b"".join(parts), refs


# -- planning ---------------------------------------------------------------------


def test_neighbours_coalesce_and_gaps_or_size_split() -> None:
    a, b, c = ref(0, 100), ref(100, 100), ref(250, 100)  # b->c: gap of 50
    far = ref(10_000, 100)
    spans = plan_spans([far, c, a, b], max_gap=50, max_span=1000)
    assert [(s.offset, s.length, s.refs) for s in spans] == [
        (0, 350, [a, b, c]),
        (10_000, 100, [far]),
    ]
    assert len(plan_spans([a, b, c], max_gap=49, max_span=1000)) == 2
    # max_span caps a span; a chunk bigger than the cap is read alone
    assert [s.refs for s in plan_spans([a, b, c], max_gap=50, max_span=200)] == [[a, b], [c]]
    huge = ref(400, 5000)
    assert [s.refs for s in plan_spans([c, huge], max_gap=50, max_span=1000)] == [[c], [huge]]


def test_packs_are_planned_in_order_of_first_appearance() -> None:
    x, y, z = ref(0, 10, OTHER), ref(0, 10), ref(10, 10, OTHER)
    spans = plan_spans([x, y, z], max_gap=0, max_span=100)
    assert [(s.pack, s.refs) for s in spans] == [(OTHER, [x, z]), (PACK, [y])]


def test_same_chunk_twice_is_read_once_and_overlaps_never_share_a_span() -> None:
    a = ref(0, 100)
    twin = ChunkRef(a.id, a.size, a.pack, a.offset)
    liar = ref(50, 100, seed="liar")  # claims bytes inside a
    spans = plan_spans([a, twin, liar], max_gap=1000, max_span=1000)
    assert [[len(p.refs) for p in s.pieces] for s in spans] == [[2], [1]]
    assert spans[1].refs == [liar]
    with pytest.raises(ValueError, match="no pack"):
        plan_spans([ChunkRef(a.id, 1)], max_gap=0, max_span=1)


@pytest.mark.parametrize("seed", range(5))
def test_cutter_rebuilds_every_chunk_from_any_block_sizes(seed: int) -> None:
    sizes = [random.Random(seed).randrange(1, 5000) for _ in range(30)]
    _, data, refs = build_pack(sizes, gap=7)
    (span,) = plan_spans(refs, max_gap=7, max_span=1 << 30)
    blocks = random.Random(seed)
    cutter = SpanCutter(span)
    out: list[tuple[ChunkRef, bytes]] = []
    stream = data[span.offset : span.offset + span.length] + b"trailing bytes are ignored"
    pos = 0
    while pos < len(stream):
        step = blocks.choice([1, 3, 100, 4999, 20_000])
        for piece, chunk in cutter.feed(stream[pos : pos + step]):
            out.extend((r, bytes(chunk)) for r in piece.refs)
        pos += step
    assert [r for r, _ in out] == refs
    assert all(hash_bytes(chunk) == r.id for r, chunk in out)
    assert not cutter.pending
    assert cutter.remaining() is None


def test_cutter_resumes_from_the_first_chunk_not_cut() -> None:
    _, data, refs = build_pack([100, 100, 100])
    (span,) = plan_spans(refs, max_gap=0, max_span=1000)
    cutter = SpanCutter(span)
    assert [p.refs for p, _ in cutter.feed(data[:150])] == [(refs[0],)]  # half of the 2nd
    rest = cutter.remaining()
    assert rest is not None
    assert (rest.offset, rest.length, rest.refs) == (100, 200, refs[1:])
    done = cutter.feed(data[100:300])
    assert [p.refs for p, _ in done] == [(refs[1],), (refs[2],)]
    assert [bytes(chunk) for _, chunk in done] == [data[100:200], data[200:300]]


# -- ObjectStore.get_range ----------------------------------------------------------


async def test_get_range_streams_the_asked_bytes(object_store_url: str) -> None:
    data = random_bytes(3 << 20, "range")
    async with open_object_store(object_store_url) as store:
        await store.put("packs/ab/x", data)

        async def read(offset: int, length: int) -> bytes:
            return b"".join([b async for b in store.get_range("packs/ab/x", offset, length)])

        assert await read(5, (2 << 20) + 3) == data[5 : (2 << 20) + 8]
        assert await read(len(data) - 10, 100) == data[-10:]  # stops where the object ends
        assert await read(len(data) + 10, 100) == b""
        assert await read(7, 0) == b""
        with pytest.raises(ObjectMissing):
            await _drain(store.get_range("packs/ab/y", 0, 10))
        with pytest.raises(ObjectMissing):
            await _drain(store.get_range("packs/ab", 0, 10))  # a "directory" is not an object


async def _drain(blocks: AsyncGenerator[bytes, None]) -> None:
    async for _ in blocks:
        pass


# -- OriginSource.fetch against real stores ----------------------------------------


async def test_fetch_reads_each_span_with_one_ranged_get(object_store_url: str) -> None:
    p1, d1, r1 = build_pack([300 << 10, 5000, 700 << 10, 1], gap=0, seed="a")
    p2, d2, r2 = build_pack([2000] * 10, gap=3000, seed="b")  # gaps too big to coalesce
    async with open_object_store(object_store_url) as store:
        await store.put(pack_key(p1), d1)
        await store.put(pack_key(p2), d2)
        origin = OriginSource(store, tuning=SpanTuning(max_gap=1000))
        sink = Collect()
        wanted = [*r1, *r2, r1[1]]  # r1[1] twice: delivered twice, read once
        left = await origin.fetch(wanted, sink)
        assert left == []
        assert sink.got == {r: random_bytes(r.size, s) for r, s in _seeds(r1, "a", r2, "b")}
        assert sink.calls == len(wanted)
        assert origin.requests == 1 + 10
        # a subset of a pack reads only what it needs
        origin.requests = 0
        sink = Collect()
        assert await origin.fetch([r1[2], r1[0]], sink) == []
        assert set(sink.got) == {r1[0], r1[2]}
        assert origin.requests == 2  # r1[1] (5000 B) is a gap above max_gap


def _seeds(*args: object) -> list[tuple[ChunkRef, str]]:
    out: list[tuple[ChunkRef, str]] = []
    for refs, seed in zip(args[::2], args[1::2], strict=True):
        assert isinstance(refs, list)
        assert isinstance(seed, str)
        out += [(r, f"{seed}-{i}") for i, r in enumerate(refs)]
    return out


async def test_corrupt_chunk_in_a_span_is_undelivered_alone(object_store_url: str) -> None:
    pack_id, data, refs = build_pack([400 << 10, 100, 400 << 10, 100], seed="c")
    bad = bytearray(data)
    bad[refs[2].offset + 17] ^= 1  # a flipped bit in the third chunk
    async with open_object_store(object_store_url) as store:
        await store.put(pack_key(pack_id), bytes(bad))
        origin = OriginSource(store)
        sink = Collect()
        left = await origin.fetch(refs, sink)
        assert left == [refs[2]]
        assert isinstance(left, Undelivered)
        assert isinstance(left.reasons[refs[2].id], CorruptChunk)
        assert set(sink.got) == {refs[0], refs[1], refs[3]}
        assert origin.requests == 1


async def test_missing_or_short_pack_and_v1_refs(object_store_url: str) -> None:
    pack_id, data, refs = build_pack([1000, 2000, 3000], seed="d")
    loose_data = random_bytes(300 << 10, "loose")
    loose = ChunkRef(hash_bytes(loose_data), len(loose_data))  # a v1 ref: its own object
    gone = ChunkRef(hash_bytes(b"gone"), 4)
    absent_pack = ref(0, 10, OTHER)
    async with open_object_store(object_store_url) as store:
        await store.put(pack_key(pack_id), data[:2500])  # ends inside the 2nd chunk
        await OriginSource(store).put(loose.id, loose_data)
        origin = OriginSource(store)
        sink = Collect()
        left = await origin.fetch([*refs, loose, gone, absent_pack], sink)
        assert isinstance(left, Undelivered)
        assert sorted(left, key=str) == sorted([refs[1], refs[2], gone, absent_pack], key=str)
        assert sink.got == {refs[0]: data[:1000], loose: loose_data}
        assert isinstance(left.reasons[refs[2].id], CorruptChunk)
        assert "shorter than its manifest" in str(left.reasons[refs[1].id])
        assert isinstance(left.reasons[gone.id], ChunkMissing)
        assert isinstance(left.reasons[absent_pack.id], ChunkMissing)


class BreakingStore:
    """A real store whose ranged reads break after ``after`` bytes, ``times`` times."""

    def __init__(self, store: ObjectStore, after: int, times: int) -> None:
        self.store = store
        self.url = store.url
        self.after = after
        self.times = times
        self.reads: list[tuple[int, int]] = []

    async def get_range(self, key: str, offset: int, length: int) -> AsyncGenerator[bytes, None]:
        self.reads.append((offset, length))
        sent = 0
        async for block in self.store.get_range(key, offset, length):
            if self.times and sent + len(block) > self.after:
                self.times -= 1
                yield block[: self.after - sent]
                raise StoreUnavailable("connection reset mid-body")
            sent += len(block)
            yield block

    async def get(self, key: str) -> bytes:
        return await self.store.get(key)

    async def exists_many(self, keys: Collection[str]) -> set[str]:
        return await self.store.exists_many(keys)

    async def put(self, key: str, data: bytes | bytearray) -> None:
        await self.store.put(key, data)

    async def put_if(self, key: str, data: bytes, expected: bytes | None) -> None:
        await self.store.put_if(key, data, expected)

    async def exists(self, key: str) -> bool:
        return await self.store.exists(key)

    async def delete(self, key: str) -> None:
        await self.store.delete(key)

    def list(self, prefix: str) -> AsyncGenerator[ObjectInfo, None]:
        raise NotImplementedError

    async def aclose(self) -> None:
        await self.store.aclose()


async def test_broken_stream_resumes_at_first_undelivered_chunk(tmp_path: Path) -> None:
    pack_id, data, refs = build_pack([1000] * 5, seed="e")
    async with open_object_store((tmp_path / "s").as_uri()) as real:
        await real.put(pack_key(pack_id), data)
        store = BreakingStore(real, after=2500, times=1)
        origin = OriginSource(store, tuning=SpanTuning(retry_delay=0))
        sink = Collect()
        assert await origin.fetch(refs, sink) == []
        assert set(sink.got) == set(refs)
        assert sink.calls == 5  # nothing delivered twice
        assert store.reads == [(0, 5000), (2000, 3000)]
        # breaking after every 1.5 chunks still makes progress: resumed to the end
        store = BreakingStore(real, after=1500, times=99)
        origin = OriginSource(store, tuning=SpanTuning(retry_delay=0, attempts=3))
        assert await origin.fetch(refs, Collect()) == []
        # breaking inside the first chunk, 3 times in a row: reported unavailable
        store = BreakingStore(real, after=500, times=99)
        origin = OriginSource(store, tuning=SpanTuning(retry_delay=0, attempts=3))
        left = await origin.fetch(refs, Collect())
        assert isinstance(left, Undelivered)
        assert left == refs
        assert len(store.reads) == 3
        assert isinstance(left.reasons[refs[4].id], StoreUnavailable)


async def test_file_store_reads_small_chunks_in_batches_and_each_is_verified(
    tmp_path: Path,
) -> None:
    """A file:// pack is read chunk by chunk into each chunk's own buffer, small
    neighbours several to a worker-thread hop: a corrupt one in a later batch is
    undelivered alone; a pack that is a directory is a missing pack."""
    pack_id, data, refs = build_pack([10 << 10] * 300, gap=7, seed="b")  # 3 MiB: 3 batches
    bad = bytearray(data)
    bad[refs[200].offset + 5] ^= 1
    async with open_object_store((tmp_path / "s").as_uri()) as store:
        await store.put(pack_key(pack_id), bytes(bad))
        origin = OriginSource(store)
        sink = Collect()
        left = await origin.fetch(refs, sink)
        assert left == [refs[200]]
        assert isinstance(left, Undelivered)
        assert isinstance(left.reasons[refs[200].id], CorruptChunk)
        assert sink.got == {r: data[r.offset : r.offset + r.size] for r in refs if r != refs[200]}
        assert origin.requests == 1
        (tmp_path / "s" / pack_key(OTHER)).mkdir(parents=True)
        elsewhere = ref(0, 10, OTHER)
        left = await origin.fetch([elsewhere], sink)
        assert left == [elsewhere]
        assert isinstance(left, Undelivered)
        assert isinstance(left.reasons[elsewhere.id], ChunkMissing)


@pytest.mark.s3
async def test_s3_body_cut_short_is_resumed_from_the_first_undelivered_chunk(
    s3_env: SeaweedS3Server,
) -> None:
    """Real SeaweedFS behind the fault proxy: the first ranged GET of the pack
    is cut after 1.5 chunks; the span is read again from the second chunk."""
    pack_id, data, refs = build_pack([300 << 10] * 4, seed="cut")
    bucket, prefix = parse_s3_url(s3_env.bucket_url())
    async with CountingProxy.to_endpoint(s3_env.endpoint) as proxy:
        proxy.http = True
        async with S3ObjectStore(
            bucket, prefix, S3Config.from_env(endpoint_url=proxy.endpoint)
        ) as store:
            await store.put(pack_key(pack_id), data)
            cut = proxy.arm(Fault("truncate", "GET", pack_id, at=450 << 10, times=1))
            origin = OriginSource(store, tuning=SpanTuning(retry_delay=0))
            sink = Collect()
            proxy.reset()
            assert await origin.fetch(refs, sink) == []
            assert sink.got == {r: data[r.offset : r.offset + r.size] for r in refs}
            assert sink.calls == len(refs)
            assert cut.hits == 1
            assert origin.requests == 2
            assert proxy.requests["GET"] == 2
            # Cut every time, but each read delivers a chunk more: it gets there.
            proxy.disarm()
            proxy.arm(Fault("truncate", "GET", pack_id, at=450 << 10))
            sink = Collect()
            assert (
                await OriginSource(store, tuning=SpanTuning(retry_delay=0)).fetch(refs, sink) == []
            )
            assert sink.calls == len(refs)
            # Cut before the first chunk ends, every time: reported unavailable, in one line.
            proxy.disarm()
            proxy.arm(Fault("truncate", "GET", pack_id, at=100 << 10))
            origin = OriginSource(store, tuning=SpanTuning(retry_delay=0, attempts=3))
            left = await origin.fetch(refs, Collect())
            assert left == refs
            assert origin.requests == 3
            assert isinstance(left, Undelivered)
            reason = left.reasons[refs[0].id]
            assert isinstance(reason, StoreUnavailable)
            assert "\n" not in str(reason)


@pytest.mark.s3
async def test_s3_spans_trickling_end_at_their_deadline_and_a_proxy_uses_the_loop_path(
    s3_env: SeaweedS3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker threads read S3 spans (httpranges.py); a body trickling at 2 KiB/s
    still ends at the request's deadline, as the loop's streamed read does, and
    the store stays usable. With HTTP_PROXY set the spans go through botocore
    (which honours proxies), and arrive the same."""
    pack_id, data, refs = build_pack([300 << 10] * 4, seed="trickle")
    bucket, prefix = parse_s3_url(s3_env.bucket_url())
    async with CountingProxy.to_endpoint(s3_env.endpoint) as proxy:
        proxy.http = True
        async with S3ObjectStore(
            bucket,
            prefix,
            S3Config.from_env(endpoint_url=proxy.endpoint),
            request_deadline=1.0,
            min_bytes_per_second=1 << 20,
        ) as store:
            await store.put(pack_key(pack_id), data)
            assert await store.threaded_ranges(pack_key(pack_id)) is not None
            proxy.arm(Fault("trickle", "GET", pack_id, rate=2048))
            origin = OriginSource(store, tuning=SpanTuning(retry_delay=0, attempts=2))
            with anyio.fail_after(60):  # a watchdog only: without a deadline this hangs
                left = await origin.fetch(refs, Collect())
            assert left == refs
            assert isinstance(left, Undelivered)
            reason = left.reasons[refs[0].id]
            assert isinstance(reason, StoreUnavailable)
            assert "deadline" in str(reason)
            assert "\n" not in str(reason)
            proxy.disarm()
            sink = Collect()
            assert await OriginSource(store).fetch(refs, sink) == []
            assert sink.got == {r: data[r.offset : r.offset + r.size] for r in refs}
    monkeypatch.setenv("HTTP_PROXY", s3_env.endpoint)  # SeaweedFS is no proxy: unused
    monkeypatch.setenv("NO_PROXY", "")
    async with S3ObjectStore(bucket, prefix, S3Config.from_env()) as store:
        assert await store.threaded_ranges(pack_key(pack_id)) is None


async def test_sink_failure_aborts_the_fetch_and_is_not_retried(tmp_path: Path) -> None:
    pack_id, data, refs = build_pack([1000] * 3, seed="f")
    calls = 0

    async def full_disk(r: ChunkRef, chunk: ChunkData) -> None:
        nonlocal calls
        calls += 1
        raise DiskFull("no space left on the sink's disk")

    async with open_object_store((tmp_path / "s").as_uri()) as store:
        await store.put(pack_key(pack_id), data)
        origin = OriginSource(store)
        with pytest.raises(DiskFull, match="sink's disk"):
            await origin.fetch(refs, full_disk)
        assert calls == 1
        assert origin.requests == 1


async def test_split_sink_gets_each_chunk_in_the_verifying_thread_then_on_the_loop(
    tmp_path: Path,
) -> None:
    """A SplitSink's blocking half takes each verified chunk in the worker thread
    that read it (no second hop), its late half then runs on the loop, for
    every delivered ref; a corrupt chunk reaches neither half; what the early
    half raises aborts the fetch."""
    import threading

    pack_id, data, refs = build_pack([300 << 10] * 6, seed="split")
    bad = bytearray(data)
    bad[refs[3].offset] ^= 1
    loop_thread = threading.get_ident()
    early: dict[ChunkRef, tuple[bytes, int]] = {}
    late: list[ChunkRef] = []

    def write(r: ChunkRef, chunk: ChunkData) -> None:
        early[r] = (bytes(chunk), threading.get_ident())

    async def after(r: ChunkRef, size: int) -> None:
        assert r in early, "the late half runs after the early half"
        assert size == r.size
        late.append(r)

    async with open_object_store((tmp_path / "s").as_uri()) as store:
        await store.put(pack_key(pack_id), bytes(bad))
        origin = OriginSource(store)
        left = await origin.fetch(refs, SplitSink(write, after))
        assert left == [refs[3]]
        good = [r for r in refs if r != refs[3]]
        assert {r: chunk for r, (chunk, _) in early.items()} == {
            r: data[r.offset : r.offset + r.size] for r in good
        }
        assert all(thread != loop_thread for _, thread in early.values())
        assert sorted(late, key=lambda r: r.offset) == good

        def full(r: ChunkRef, chunk: ChunkData) -> None:
            raise DiskFull("no space left on the sink's disk")

        with pytest.raises(DiskFull, match="sink's disk"):
            await origin.fetch(good, SplitSink(full, after))


async def test_a_file_store_reads_file_spans_in_flight_spans_at_once(tmp_path: Path) -> None:
    """The threads that read, verify and write a file:// store's spans number
    ``file_spans_in_flight`` (their writes to one file take turns: more would
    only queue), whatever ``spans_in_flight`` says for S3. The first chunks
    to arrive are held until a third thread joins them, or for a second."""
    import threading

    pack_id, data, refs = build_pack([64 << 10] * 12, seed="inflight")
    tuning = SpanTuning(max_span=128 << 10, spans_in_flight=8, file_spans_in_flight=2)
    changed = threading.Condition()
    inside, most, held = 0, 0, True
    got: dict[ChunkRef, bytes] = {}

    def write(r: ChunkRef, chunk: ChunkData) -> None:
        nonlocal inside, most, held
        with changed:
            got[r] = bytes(chunk)
            inside += 1
            most = max(most, inside)
            changed.notify_all()
            if held and not changed.wait_for(lambda: inside > 2 or not held, timeout=1.0):
                held = False  # nobody else came: let them all go
                changed.notify_all()
            inside -= 1

    async def after(r: ChunkRef, size: int) -> None:
        pass

    async with open_object_store((tmp_path / "s").as_uri()) as store:
        await store.put(pack_key(pack_id), data)
        origin = OriginSource(store, tuning=tuning)
        assert await origin.fetch(refs, SplitSink(write, after)) == []
    assert got == {r: data[r.offset : r.offset + r.size] for r in refs}
    assert origin.requests == 6  # 6 spans of 2 chunks
    assert most == 2


async def test_a_lazily_opened_store_is_read_by_its_own_fast_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner API opens its store lazily (stores.LazyObjectStore); once open,
    its packs are read by the wrapped store's threaded path, not streamed
    through the wrapper (which made the runner's cold pulls ~2x slower)."""
    pack_id, data, refs = build_pack([64 << 10] * 4, seed="lazy")
    async with LazyObjectStore((tmp_path / "s").as_uri()) as lazy:
        await lazy.put(pack_key(pack_id), data)

        def streamed(*_: object) -> None:
            raise AssertionError("the span went through the wrapper")

        monkeypatch.setattr(lazy, "get_range", streamed)
        collect = Collect()
        assert await OriginSource(lazy).fetch(refs, collect) == []
    assert collect.got == {r: data[r.offset : r.offset + r.size] for r in refs}


# -- memory: a big pull holds a few chunks, never a span or the file ----------------

_RSS_CHUNK = 1 << 20
_RSS_PACK = ChunkId("ef" * 32)


def _rss_chunk(base: bytearray, i: int) -> bytes:
    base[:8] = i.to_bytes(8, "little")
    return bytes(base)


_RSS_CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    from blobstore.ids import hash_bytes
    from blobstore.manifest import ChunkRef
    from blobstore.origin import OriginSource
    from blobstore.stores import open_object_store
    from blobstore.tiers import TieredSource

    url, total, pack = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    CHUNK = 1 << 20
    base = bytearray(bytes.fromhex(sys.argv[4]) * (CHUNK // 32))

    def chunk(i):
        base[:8] = i.to_bytes(8, "little")
        return bytes(base)

    def peak_kib():  # this image's own peak (ru_maxrss would include the parent's, from fork)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

    async def main():
        async with open_object_store(url) as store:
            count = total // CHUNK
            refs = [ChunkRef(hash_bytes(chunk(i)), CHUNK, pack, i * CHUNK) for i in range(count)]
            got = 0
            async def discard(ref, data):
                nonlocal got
                got += len(data)
            origin = OriginSource(store)
            before = peak_kib()
            left = await TieredSource([origin]).fetch(refs, discard)  # as a pull does
            peak = peak_kib()
            print(json.dumps({"before_kib": before, "peak_kib": peak, "got": got,
                              "left": len(left), "requests": origin.requests}))

    asyncio.run(main())
    """
)


@pytest.mark.slow
async def test_fetch_of_a_large_file_holds_a_few_chunks(
    object_store_url: str, tmp_path: Path
) -> None:
    """A child process fetches, through the tier list as a pull does, a pack
    bigger than the RSS budget (768 MiB from a directory, 320 MiB from S3: the
    test uploads it in one PUT) into a sink that drops it; its peak RSS stays
    far below the budget."""
    s3 = object_store_url.startswith("s3:")
    total = (320 if s3 else 768) << 20
    seed = random_bytes(32, "rss")
    base = bytearray(seed * (_RSS_CHUNK // 32))
    key = pack_key(_RSS_PACK)
    async with open_object_store(object_store_url) as store:
        if s3:
            await store.put(key, b"".join(_rss_chunk(base, i) for i in range(total >> 20)))
        else:  # written chunk by chunk: the test holds no copy either
            path = tmp_path / "store" / key
            path.parent.mkdir(parents=True)
            with path.open("wb") as f:
                for i in range(total >> 20):
                    f.write(_rss_chunk(base, i))
    proc = await anyio.run_process(
        [sys.executable, "-c", _RSS_CHILD, object_store_url, str(total), _RSS_PACK, seed.hex()],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    result = json.loads(proc.stdout)
    assert result["got"] == total
    assert result["left"] == 0
    assert result["requests"] == total // SpanTuning().max_span
    grown_mib = (result["peak_kib"] - result["before_kib"]) / 1024
    assert result["peak_kib"] / 1024 <= 256, result
    # 8 spans in flight x (one chunk filling + one being verified): ~16 MiB, not 32 MiB spans
    assert grown_mib <= 64, result


# -- get by id alone: a home peer's read-through finds packed chunks -----------------


async def test_get_by_id_finds_packed_chunks_through_the_pack_indexes(
    object_store_url: str,
) -> None:
    pack_id, data, refs = build_pack([300 << 10, 1000, 2000], seed="g")
    later_id, later_data, later_refs = build_pack([4000], seed="h")
    loose_data = random_bytes(5000, "v1")
    loose = ChunkRef(hash_bytes(loose_data), len(loose_data))
    async with open_object_store(object_store_url) as store:
        await store.put(pack_key(pack_id), data)
        await store.put(index_key(pack_id), encode_index(pack_id, refs))
        origin = OriginSource(store, locator=PackLocator(store, refresh=0))
        await origin.put(loose.id, loose_data)  # the per-chunk layout still reads
        assert await origin.get(refs[1].id) == data[refs[1].offset : refs[1].offset + refs[1].size]
        assert await origin.get(refs[0].id) == data[: refs[0].size]
        assert await origin.get(loose.id) == loose_data
        assert origin.requests == 2  # one ranged GET per packed chunk, never the whole pack
        # a pack pushed after the index was loaded is found on a miss
        await store.put(pack_key(later_id), later_data)
        await store.put(index_key(later_id), encode_index(later_id, later_refs))
        assert await origin.get(later_refs[0].id) == later_data
        assert await origin.has([refs[2].id, later_refs[0].id, loose.id, OTHER]) == {
            refs[2].id,
            later_refs[0].id,
            loose.id,
        }
        with pytest.raises(ChunkMissing):
            await origin.get(OTHER)
        # a flipped bit in the pack is reported as corrupt, not as missing
        bad = bytearray(data)
        bad[refs[2].offset] ^= 1
        await store.put(pack_key(pack_id), bytes(bad))
        with pytest.raises(CorruptChunk, match=refs[2].id):
            await origin.get(refs[2].id)


async def test_locator_reloads_at_most_once_per_refresh(tmp_path: Path) -> None:
    pack_id, data, refs = build_pack([1000, 2000], seed="i")
    async with open_object_store((tmp_path / "s").as_uri()) as store:
        await store.put(pack_key(pack_id), data)
        await store.put(index_key(pack_id), encode_index(pack_id, refs))
        locator = PackLocator(store, refresh=3600)
        assert await locator.locate(refs[1].id) == refs[1]
        assert await locator.locate(OTHER) is None
        assert await locator.locate(PACK) is None
        assert (locator.loads, locator.index_fetches) == (1, 1)
        # a reload reads only indexes it has not seen (kept in memory without a cache)
        locator.refresh = 0
        assert await locator.locate(OTHER) is None
        assert (locator.loads, locator.index_fetches) == (2, 1)
        assert await locator.locate(refs[0].id) == refs[0]
