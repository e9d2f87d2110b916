"""The pure framing core: no event loop, just bytes."""

from __future__ import annotations

import msgpack
import pytest

from blobstore.errors import ProtocolError
from p2p.framing import PREFIX, FrameDecoder, Limits, encode


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
        ("chunk", payload), ("missing", b""), ("chunk", b"q")
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
    "raw", [b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"t": "x", "n": -1}),
            msgpack.packb({"t": "x", "n": "7"})]
)
def test_garbage_headers_are_protocol_errors(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(PREFIX.pack(len(raw)) + raw)


def test_zero_length_header_is_refused() -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(PREFIX.pack(0))
