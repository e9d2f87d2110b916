"""Fuzzing the two decoders that take bytes from outside (issue 10, "Done when").

``p2p.framing.FrameDecoder`` reads whatever a peer (or anyone who can connect)
sends; ``blobstore.manifest.decode`` reads whatever the object store holds.
Whatever the bytes -- random, valid ones mutated, truncated, fed in odd pieces --
only typed errors may come out (ProtocolError / InvalidManifest / UnsafePath, all
BlobstoreError), never another exception, and memory stays bounded by the limits,
not by what a header claims (the bound p2p/framing.py states: one header's
scratch, the eager part of a payload, twice the payload bytes that arrived).

Valid inputs are built through the public codecs (``framing.encode``, the manifest
dataclasses and ``manifest.encode``), so the tests follow a codec change (v2 and
later manifests) without being edited. Each test is bounded (a few hundred
examples, seconds).
"""

from __future__ import annotations

import itertools
import random
import tracemalloc
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore.errors import AuthError, BlobstoreError, InvalidManifest, ProtocolError, UnsafePath
from blobstore.ids import id_from_bytes
from blobstore.manifest import (
    MAX_CHUNK_BYTES,
    MAX_PACK_BYTES,
    ChunkerInfo,
    ChunkRef,
    Entry,
    Image,
    ImageLayer,
    Layer,
    Manifest,
    Tree,
    decode,
    encode,
)
from p2p import messages
from p2p.framing import (
    DEFAULT_LIMITS,
    HANDSHAKE_LIMITS,
    PREFIX,
    REQUEST_LIMITS,
    SCRATCH_BYTES,
    Frame,
    FrameDecoder,
    Limits,
)
from p2p.framing import encode as encode_frame

SMALL_LIMITS = Limits(max_header=1 << 10, max_payload=4 << 10, max_ids=8, eager_payload=1 << 10)

E = TypeVar("E", bound=BaseException)

FUZZ = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,  # the same examples every run: CI is never flaky, a failure repeats
    database=None,  # and nothing is written into the work tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------- values

_INT64 = st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    _INT64,
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.binary(max_size=40),
)
MSGPACK_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=8), inner, max_size=6)
    ),
    max_leaves=20,
)
"""Anything msgpack can carry with string map keys (what the decoders accept)."""


def one_line(exc: E) -> E:
    assert "\n" not in str(exc), str(exc)
    return exc


def mutate(data: bytes, ops: list[tuple[int, int, bytes]]) -> bytes:
    """Apply byte-level edits: (0: flip, 1: truncate, 2: insert, 3: delete a span)."""
    buf = bytearray(data)
    for kind, pos, extra in ops:
        at = pos % (len(buf) + 1)
        if kind == 0 and at < len(buf):
            buf[at] ^= extra[0] if extra and extra[0] else 0xFF
        elif kind == 1:
            del buf[at:]
        elif kind == 2:
            buf[at:at] = extra
        elif kind == 3:
            del buf[at : at + 1 + len(extra)]
    return bytes(buf)


EDITS = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=9)),
    min_size=1,
    max_size=4,
)


# --------------------------------------------------------------------------- frames


def feed_in_pieces(decoder: FrameDecoder, data: bytes, cuts: list[int]) -> list[Frame]:
    """Feed ``data`` split at ``cuts``, through the same get_buffer/buffer_updated
    path a socket uses (``feed``)."""
    frames: list[Frame] = []
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for start, end in itertools.pairwise(points):
        frames.extend(decoder.feed(data[start:end]))
    return frames


def decode_frames(data: bytes, cuts: list[int], limits: Limits) -> list[Frame] | ProtocolError:
    decoder = FrameDecoder(limits)
    try:
        frames = feed_in_pieces(decoder, data, cuts)
    except ProtocolError as exc:  # the one error a peer's bytes may cause
        return one_line(exc)
    for frame in frames:
        assert isinstance(frame.header, dict)
        assert len(frame.payload) == frame.header.get("n", 0) <= limits.max_payload
    return frames


LIMITS = st.sampled_from([DEFAULT_LIMITS, HANDSHAKE_LIMITS, REQUEST_LIMITS, SMALL_LIMITS])
CUTS = st.lists(st.integers(0, 1 << 16), max_size=8)
HEADERS = st.dictionaries(
    st.text(max_size=6).filter(lambda k: k != "n"),
    st.one_of(_SCALARS, st.lists(_SCALARS, max_size=4)),  # what messages carry; cheap to draw
    max_size=4,
)
FRAMES = st.lists(st.tuples(HEADERS, st.binary(max_size=2000)), min_size=1, max_size=3)


def wire(frames: list[tuple[dict[str, Any], bytes]]) -> bytes:
    return b"".join(encode_frame(h, len(p)) + p for h, p in frames)


@FUZZ
@given(data=st.binary(max_size=4096), cuts=CUTS, limits=LIMITS)
def test_frame_decoder_random_bytes(data: bytes, cuts: list[int], limits: Limits) -> None:
    decode_frames(data, cuts, limits)


@FUZZ
@given(frames=FRAMES, cuts=CUTS)
def test_frame_decoder_round_trips_in_any_pieces(
    frames: list[tuple[dict[str, Any], bytes]], cuts: list[int]
) -> None:
    got = decode_frames(wire(frames), cuts, DEFAULT_LIMITS)
    assert not isinstance(got, ProtocolError), got
    assert [({k: v for k, v in f.header.items() if k != "n"}, bytes(f.payload)) for f in got] == [
        (h, p) for h, p in frames
    ]


@FUZZ
@given(frames=FRAMES, edits=EDITS, cuts=CUTS, limits=LIMITS)
def test_frame_decoder_mutated_frames(
    frames: list[tuple[dict[str, Any], bytes]],
    edits: list[tuple[int, int, bytes]],
    cuts: list[int],
    limits: Limits,
) -> None:
    decode_frames(mutate(wire(frames), edits), cuts, limits)


@FUZZ
@given(
    header=HEADERS,
    declared=st.one_of(_INT64, st.floats(allow_nan=False), st.text(max_size=4), st.none()),
    cuts=CUTS,
    limits=LIMITS,
)
def test_frame_decoder_lying_payload_length(
    header: dict[str, Any], declared: Any, cuts: list[int], limits: Limits
) -> None:
    """A header whose ``n`` is anything at all, followed by fewer bytes than it says."""
    packed = msgpack.packb({**header, "n": declared}, use_bin_type=True)
    data = PREFIX.pack(len(packed)) + packed + b"x" * 100
    got = decode_frames(data, cuts, limits)
    if isinstance(declared, int) and not isinstance(declared, bool):
        if not 0 <= declared <= limits.max_payload:
            assert isinstance(got, ProtocolError)
    else:
        assert isinstance(got, ProtocolError)  # not a count: refused, whatever follows


@pytest.mark.parametrize("limits", [DEFAULT_LIMITS, HANDSHAKE_LIMITS, REQUEST_LIMITS, SMALL_LIMITS])
def test_frame_header_length_is_bounded_before_it_arrives(limits: Limits) -> None:
    """A prefix claiming a header beyond the limit is refused at once."""
    for claimed in (limits.max_header + 1, 1 << 31, (1 << 32) - 1, 0):
        with pytest.raises(ProtocolError, match="out of bounds"):
            FrameDecoder(limits).feed(PREFIX.pack(claimed))


def test_frame_payload_beyond_the_limit_is_refused_before_it_arrives() -> None:
    for limits in (HANDSHAKE_LIMITS, REQUEST_LIMITS, DEFAULT_LIMITS):
        header = msgpack.packb({"t": "chunk", "n": limits.max_payload + 1})
        with pytest.raises(ProtocolError, match="exceeds the limit"):
            FrameDecoder(limits).feed(PREFIX.pack(len(header)) + header)


# --------------------------------------------------------------------------- manifests

CHUNK_IDS = st.binary(min_size=32, max_size=32).map(id_from_bytes)
SIZES = st.integers(1, MAX_CHUNK_BYTES)


@st.composite
def chunk_refs(draw: st.DrawFn) -> ChunkRef:
    size = draw(SIZES)
    if draw(st.booleans()):
        return ChunkRef(draw(CHUNK_IDS), size)  # per-chunk (v1-style) location
    offset = draw(st.integers(0, MAX_PACK_BYTES - size))
    return ChunkRef(draw(CHUNK_IDS), size, draw(CHUNK_IDS), offset)


CHUNKS = st.lists(chunk_refs(), max_size=4).map(tuple)
CHUNKERS = st.builds(
    ChunkerInfo,
    st.text(min_size=1, max_size=12),
    SIZES,
    SIZES,
    SIZES,
)
NAMES = st.text(
    st.characters(codec="utf-8", exclude_characters="/\x00"),
    min_size=1,
    max_size=12,
).filter(lambda n: n not in (".", ".."))
MODES = st.integers(0, 0o7777)
SHA256 = st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex())


@st.composite
def entries(draw: st.DrawFn, path: str) -> Entry:
    kind = draw(st.sampled_from(["file", "dir", "symlink"]))
    mode = draw(MODES)
    if kind == "file":
        chunks = draw(CHUNKS)
        return Entry(path, "file", mode, sum(c.size for c in chunks), None, chunks)
    if kind == "symlink":
        target = draw(
            st.text(
                st.characters(codec="utf-8", exclude_characters="\x00"),
                min_size=1,
            )
        )
        return Entry(path, "symlink", mode, target=target)
    return Entry(path, "dir", mode)


@st.composite
def trees(draw: st.DrawFn) -> Tree:
    names = draw(st.lists(NAMES, unique=True, max_size=5))
    found = [draw(entries(name)) for name in names]
    if draw(st.booleans()):  # a directory with children, so nested paths are covered
        parent = draw(NAMES.filter(lambda n: n not in names))
        found.append(Entry(parent, "dir", 0o755))
        kids = draw(st.lists(NAMES, unique=True, max_size=3))
        found += [draw(entries(f"{parent}/{kid}")) for kid in kids]
    return Tree(draw(CHUNKERS), tuple(found))


@st.composite
def layers(draw: st.DrawFn) -> Layer:
    chunks = draw(CHUNKS)
    return Layer(
        draw(SHA256),
        draw(st.text(max_size=60)),
        sum(c.size for c in chunks),
        draw(CHUNKERS),
        chunks,
    )


IMAGES = st.builds(
    Image,
    st.binary(max_size=300),
    st.text(max_size=60),
    st.binary(max_size=300),
    st.lists(st.builds(ImageLayer, SHA256, CHUNK_IDS), max_size=4).map(tuple),
    st.lists(st.text(max_size=20), max_size=3).map(tuple),
    st.binary(max_size=100),
)
MANIFESTS: st.SearchStrategy[Manifest] = st.one_of(trees(), layers(), IMAGES)
MANIFEST_ERRORS = (InvalidManifest, UnsafePath)


def decode_typed(data: bytes) -> Manifest | BlobstoreError:
    """Decode; a refusal must be a typed one-line error. Whatever decodes must
    encode again and decode to the same thing (no half-valid manifest slips in)."""
    try:
        manifest = decode(data)
    except MANIFEST_ERRORS as exc:
        return one_line(exc)
    again = encode(manifest)
    assert encode(decode(again)) == again
    return manifest


@FUZZ
@given(manifest=MANIFESTS)
def test_manifest_round_trip_is_canonical(manifest: Manifest) -> None:
    data = encode(manifest)
    decoded = decode(data)
    assert decoded.kind == manifest.kind
    assert encode(decoded) == data


@FUZZ
@given(data=st.binary(max_size=2048))
def test_manifest_decoder_random_bytes(data: bytes) -> None:
    decode_typed(data)


@FUZZ
@given(manifest=MANIFESTS, edits=EDITS)
def test_manifest_decoder_mutated_bytes(
    manifest: Manifest, edits: list[tuple[int, int, bytes]]
) -> None:
    decode_typed(mutate(encode(manifest), edits))


@FUZZ
@given(manifest=MANIFESTS, cut=st.integers(0, 1 << 16))
def test_manifest_decoder_truncated(manifest: Manifest, cut: int) -> None:
    data = encode(manifest)
    short = data[: cut % len(data)]
    assert isinstance(decode_typed(short), MANIFEST_ERRORS)  # a strict prefix never decodes


def _containers(obj: Any, out: list[Any]) -> list[Any]:
    if isinstance(obj, dict | list):
        out.append(obj)
        for value in obj.values() if isinstance(obj, dict) else obj:
            _containers(value, out)
    return out


@FUZZ
@given(manifest=MANIFESTS, data=st.data())
def test_manifest_decoder_mutated_fields(manifest: Manifest, data: st.DataObject) -> None:
    """Structure-aware: valid msgpack whose fields are replaced, dropped or added,
    so the mutations reach the validation of every field, not just the parser."""
    obj = msgpack.unpackb(encode(manifest), raw=False)
    for _ in range(data.draw(st.integers(1, 3))):
        target = data.draw(st.sampled_from(_containers(obj, [])))
        action = data.draw(st.sampled_from(["replace", "drop", "add"]))
        if isinstance(target, dict):
            keys = sorted(target)
            if action == "add" or not keys:
                target[data.draw(st.text(max_size=8))] = data.draw(MSGPACK_VALUES)
            elif action == "drop":
                del target[data.draw(st.sampled_from(keys))]
            else:
                target[data.draw(st.sampled_from(keys))] = data.draw(MSGPACK_VALUES)
        elif action == "add" or not target:
            target.append(data.draw(MSGPACK_VALUES))
        else:
            i = data.draw(st.integers(0, len(target) - 1))
            if action == "drop":
                del target[i]
            else:
                target[i] = data.draw(MSGPACK_VALUES)
    decode_typed(msgpack.packb(obj, use_bin_type=True))


@pytest.mark.parametrize(
    "bomb",
    [
        b"\xdd\xff\xff\xff\xff",  # an array claiming 2**32-1 items
        b"\xdf\xff\xff\xff\xff",  # a map claiming 2**32-1 pairs
        b"\xdb\xff\xff\xff\xff",  # a string claiming 4 GiB
        b"\xc6\xff\xff\xff\xff",  # a binary claiming 4 GiB
        b"\x91" * 100_000,  # nesting 100,000 deep
        b"\x81\xa1v\x02\x81\xa4kind" + b"\x91" * 50_000,
    ],
)
def test_manifest_decoder_claims_cost_no_memory(bomb: bytes) -> None:
    """What a manifest claims is not allocated: memory follows the bytes that exist."""
    tracemalloc.start()
    try:
        with pytest.raises(MANIFEST_ERRORS):
            decode(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * len(bomb) + (1 << 20)


def test_seeded_random_loop_covers_both_decoders() -> None:
    """A bounded, seeded loop beside hypothesis (same each run): random-length
    garbage and splices of valid encodings into both decoders."""
    rng = random.Random(20261127)
    valid_frame = encode_frame({"t": "get", "ids": [b"\x01" * 32]}, 5) + b"hello"
    valid_manifest = encode(Tree(ChunkerInfo("fastcdc", 1, 2, 3), (Entry("a", "dir", 0o755),)))
    checks: list[Callable[[bytes], object]] = [
        lambda b: decode_frames(b, [rng.randrange(len(b) + 1)], DEFAULT_LIMITS),
        decode_typed,
    ]
    for seed_input in (valid_frame, valid_manifest):
        for _ in range(300):
            cut = rng.randrange(len(seed_input) + 1)
            junk = rng.randbytes(rng.randrange(0, 64))
            sample = seed_input[:cut] + junk + seed_input[cut:]
            for check in checks:
                check(sample)


# --------------------------------------------------------------------------- frame memory


def decoder_peak(data: bytes, cuts: list[int], limits: Limits) -> int:
    """Peak bytes traced while one decoder takes ``data`` (frames it returns included)."""
    tracemalloc.start()
    try:
        decode_frames(data, cuts, limits)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def frame_memory_bound(limits: Limits, received: int) -> int:
    """What p2p/framing.py promises: scratch for one header, the eager part of a payload,
    and at most twice the payload bytes that arrived (growth by doubling)."""
    scratch = max(SCRATCH_BYTES, limits.max_header + PREFIX.size)
    return scratch + limits.eager_payload + 2 * received + (64 << 10)


@settings(FUZZ, max_examples=200)
@given(frames=FRAMES, edits=EDITS, cuts=CUTS, limits=LIMITS, claim=st.integers(0, 1 << 32))
def test_frame_decoder_memory_follows_bytes_not_claims(
    frames: list[tuple[dict[str, Any], bytes]],
    edits: list[tuple[int, int, bytes]],
    cuts: list[int],
    limits: Limits,
    claim: int,
) -> None:
    """Mutated frames, one of them claiming any payload length: memory stays within
    the bound for the bytes that were sent, whatever the headers say."""
    header, payload = frames[0]
    packed = msgpack.packb({**header, "n": claim}, use_bin_type=True)
    data = PREFIX.pack(len(packed)) + packed + payload + mutate(wire(frames), edits)
    assert decoder_peak(data, cuts, limits) <= frame_memory_bound(limits, len(data))


def test_big_payload_claims_cost_the_eager_part_only() -> None:
    """Issue 10 item 3: a ~60-byte header declaring a 64 MiB payload allocated 64 MiB
    before a payload byte arrived (six of them: +385 MiB). Now each costs at most the
    eager part of a payload."""
    header = encode_frame({"t": "chunk", "id": b"\x00" * 32}, DEFAULT_LIMITS.max_payload)
    assert len(header) < 80
    tracemalloc.start()
    try:
        decoders = [FrameDecoder(DEFAULT_LIMITS) for _ in range(6)]
        for decoder in decoders:
            assert decoder.feed(header) == []
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 6 * frame_memory_bound(DEFAULT_LIMITS, 0) < DEFAULT_LIMITS.max_payload


def test_trickled_payload_grows_with_the_bytes_that_came() -> None:
    header = encode_frame({"t": "chunk"}, DEFAULT_LIMITS.max_payload)
    piece = b"x" * (64 << 10)
    received = 12 << 20  # past the eager part, so the payload has to grow
    tracemalloc.start()
    try:
        decoder = FrameDecoder(DEFAULT_LIMITS)
        assert decoder.feed(header) == []
        for _ in range(received // len(piece)):
            assert decoder.feed(piece) == []
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= frame_memory_bound(DEFAULT_LIMITS, received)


# --------------------------------------------------------------------------- messages

MESSAGE_KEYS = ["t", "v", "node", "region", "nonce", "mac", "to", "ids", "bits", "code", "msg"]
ADDRESSES = st.builds(
    "{}:{}".format,
    st.text(max_size=8),
    st.text(st.characters(whitelist_categories=("Nd", "No")), max_size=6),  # ², ١٢, ...
)
MESSAGE_VALUES = st.one_of(
    MSGPACK_VALUES,
    st.lists(st.binary(min_size=31, max_size=33), max_size=5),
    st.sampled_from(["hello", "auth", "ready", "error", "have", "pong", "get", "has"]),
)
MESSAGE_HEADERS = st.fixed_dictionaries(
    {},
    optional={
        **dict.fromkeys(MESSAGE_KEYS, MESSAGE_VALUES),
        "peers": st.one_of(st.lists(ADDRESSES, max_size=4), MSGPACK_VALUES),
    },
)


@FUZZ
@given(
    header=MESSAGE_HEADERS,
    kind=st.sampled_from(["hello", "auth", "ready", "have", "pong", "chunk"]),
    count=st.integers(0, 40),
)
def test_message_fields_refuse_any_header_in_one_line(
    header: dict[str, Any], kind: str, count: int
) -> None:
    """What a peer's header holds goes through these checks before it is used: each
    either returns a value or raises ProtocolError / AuthError, in one line."""
    frame = Frame(header, bytearray())
    checks: list[Callable[[], object]] = [
        lambda: messages.version_field(header),
        lambda: messages.peers_field(header),
        lambda: messages.text_field(header, "node"),
        lambda: messages.nonce_field(header),
        lambda: messages.ids_field(header),
        lambda: messages.have_flags(frame, count),
        lambda: messages.expect(frame, kind),
    ]
    for check in checks:
        try:
            check()
        except (ProtocolError, AuthError) as exc:
            one_line(exc)


@pytest.mark.parametrize("port", ["²", "١٢", "1²", "６５"])
def test_gossiped_address_with_non_ascii_digits_is_refused(port: str) -> None:
    with pytest.raises(ProtocolError, match="malformed address"):
        messages.peers_field({"peers": [f"10.0.0.1:{port}"]})


def test_peer_error_text_cannot_add_lines() -> None:
    frame = Frame(
        {"t": "error", "code": "auth", "msg": "no\nblobstore: error: forged\x1b[2J"}, bytearray()
    )
    with pytest.raises(AuthError) as info:
        messages.expect(frame, "ready")
    assert "\n" not in str(info.value)
    assert "\x1b" not in str(info.value)
