"""The pure framing core: no event loop, just bytes."""

from __future__ import annotations

import random

import msgpack
import pytest

from blobstore.errors import ProtocolError
from p2p.framing import (
    EAGER_PAYLOAD_BYTES,
    HANDSHAKE_LIMITS,
    MAX_HEADER_BYTES,
    MAX_PAYLOAD_BYTES,
    PREFIX,
    REQUEST_LIMITS,
    SCRATCH_BYTES,
    FrameDecoder,
    Limits,
    encode,
)


def _frames(*items: tuple[dict[str, object], bytes]) -> bytes:
    return b"".join(encode(h, len(p)) + p for h, p in items)


def test_round_trip_many_frames_in_one_read() -> None:
    wire = _frames(({"t": "a"}, b""), ({"t": "chunk"}, b"x" * 1000), ({"t": "b"}, b"yz"))
    frames = FrameDecoder().feed(wire)
    assert [f.kind for f in frames] == ["a", "chunk", "b"]
    assert frames[1].payload == b"x" * 1000
    assert frames[2].payload == b"yz"


@pytest.mark.parametrize("step", [1, 3, 7, 4096])
def test_any_split_of_the_stream_decodes_the_same(step: int) -> None:
    payload = bytes(range(256)) * 40
    wire = _frames(({"t": "chunk"}, payload), ({"t": "missing"}, b""), ({"t": "chunk"}, b"q"))
    decoder = FrameDecoder()
    frames = []
    for i in range(0, len(wire), step):
        frames += decoder.feed(wire[i : i + step])
    assert [(f.kind, bytes(f.payload)) for f in frames] == [
        ("chunk", payload),
        ("missing", b""),
        ("chunk", b"q"),
    ]
    assert decoder.idle


def test_payload_is_read_in_place_and_never_past_its_end() -> None:
    decoder = FrameDecoder()
    head = encode({"t": "chunk"}, 10)
    assert decoder.feed(head) == []
    buf = decoder.get_buffer()
    assert len(buf) == 10  # the socket cannot read into the next frame
    buf[:10] = b"0123456789"
    (frame,) = decoder.buffer_updated(10)
    assert frame.payload == b"0123456789"


def test_oversized_header_is_refused_before_reading_it() -> None:
    decoder = FrameDecoder(Limits(max_header=100))
    with pytest.raises(ProtocolError, match="out of bounds"):
        decoder.feed(PREFIX.pack(101))


def test_oversized_payload_is_refused() -> None:
    raw = msgpack.packb({"t": "chunk", "n": 1 << 40})
    with pytest.raises(ProtocolError, match="exceeds"):
        FrameDecoder().feed(PREFIX.pack(len(raw)) + raw)


def test_encoder_refuses_what_the_decoder_would() -> None:
    with pytest.raises(ProtocolError):
        encode({"t": "chunk"}, 1 << 40)
    with pytest.raises(ProtocolError):
        encode({"t": "x", "pad": b"x" * 300}, 0, Limits(max_header=100))


@pytest.mark.parametrize(
    "raw",
    [
        b"\xc1",
        msgpack.packb([1, 2]),
        msgpack.packb({"t": "x", "n": -1}),
        msgpack.packb({"t": "x", "n": "7"}),
    ],
)
def test_garbage_headers_are_protocol_errors(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(PREFIX.pack(len(raw)) + raw)


def test_zero_length_header_is_refused() -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(PREFIX.pack(0))


# ---------------------------------------------------------------------- memory bounds


def test_a_declared_payload_is_not_allocated_before_it_arrives() -> None:
    decoder = FrameDecoder()
    assert decoder.allocated == 0  # nothing until the first bytes come
    assert decoder.feed(encode({"t": "chunk"}, MAX_PAYLOAD_BYTES)) == []
    assert decoder.allocated <= SCRATCH_BYTES + EAGER_PAYLOAD_BYTES
    # It grows with what arrives, doubling: never past twice what came.
    data = random.Random(1).randbytes(3 * EAGER_PAYLOAD_BYTES + 5)
    decoder.feed(data)
    assert decoder.allocated <= SCRATCH_BYTES + 2 * len(data)


@pytest.mark.parametrize(
    "size", [0, 1, SCRATCH_BYTES, EAGER_PAYLOAD_BYTES, 3 * EAGER_PAYLOAD_BYTES + 7]
)
@pytest.mark.parametrize("step", [4093, 1 << 20])
def test_payloads_of_any_size_decode_in_any_reads(size: int, step: int) -> None:
    payload = random.Random(size).randbytes(size)
    wire = _frames(({"t": "chunk"}, payload), ({"t": "missing"}, b""))
    decoder = FrameDecoder()
    frames = []
    for i in range(0, len(wire), step):
        frames += decoder.feed(wire[i : i + step])
    assert [(f.kind, bytes(f.payload)) for f in frames] == [("chunk", payload), ("missing", b"")]
    assert frames[0].wire_size == len(wire) - len(encode({"t": "missing"}))
    assert decoder.idle
    assert decoder.allocated <= SCRATCH_BYTES  # back to the small scratch between frames


def test_a_big_header_grows_the_scratch_only_while_it_arrives() -> None:
    ids = [bytes(32)] * 4096
    wire = encode({"t": "get", "ids": ids}) + encode({"t": "ping"})
    decoder = FrameDecoder()
    frames = []
    for i in range(0, len(wire), 1000):
        frames += decoder.feed(wire[i : i + 1000])
        assert decoder.allocated <= MAX_HEADER_BYTES + PREFIX.size
    assert [f.kind for f in frames] == ["get", "ping"]
    assert decoder.allocated <= SCRATCH_BYTES


def test_handshake_and_request_limits_refuse_payloads() -> None:
    for limits in (HANDSHAKE_LIMITS, REQUEST_LIMITS):
        with pytest.raises(ProtocolError, match="exceeds"):
            FrameDecoder(limits).feed(encode({"t": "get"}, 1))
    with pytest.raises(ProtocolError, match="out of bounds"):
        FrameDecoder(HANDSHAKE_LIMITS).feed(PREFIX.pack(HANDSHAKE_LIMITS.max_header + 1))
    decoder = FrameDecoder(HANDSHAKE_LIMITS)  # limits change between frames
    assert decoder.feed(encode({"t": "auth"}))[0].kind == "auth"
    decoder.limits = REQUEST_LIMITS
    assert decoder.feed(encode({"t": "get", "ids": [bytes(32)] * 1000}))[0].kind == "get"


def test_fuzzed_streams_end_in_frames_or_protocol_errors_with_bounded_memory() -> None:
    """Mutated valid streams and random bytes: only ProtocolError, and never more memory
    than the limits allow (a bounded random loop; seeds make failures reproducible)."""
    limits = Limits(max_header=4096, max_payload=1 << 20, eager_payload=64 << 10)
    valid = _frames(
        ({"t": "chunk"}, b"x" * 70_000),
        ({"t": "get", "ids": [b"i" * 32] * 50}, b""),
        ({"t": "ping"}, b""),
    )
    for seed in range(400):
        rng = random.Random(seed)
        if seed % 4 == 0:
            wire = rng.randbytes(rng.randrange(1, 3000))
        else:
            mutated = bytearray(valid)
            for _ in range(rng.randrange(1, 8)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            wire = bytes(mutated[: rng.randrange(1, len(mutated) + 1)])
        decoder = FrameDecoder(limits)
        received = 0
        try:
            for i in range(0, len(wire), step := rng.randrange(1, 5000)):
                decoder.feed(wire[i : i + step])
                received += len(wire[i : i + step])
                assert decoder.allocated <= (
                    max(SCRATCH_BYTES, limits.max_header + PREFIX.size)
                    + max(limits.eager_payload, 2 * received)
                ), seed
        except ProtocolError:
            pass
