from __future__ import annotations

import pytest

from blobstore.errors import AuthError, ProtocolError
from blobstore.ids import hash_bytes
from p2p import messages
from p2p.framing import Frame, Limits


def test_mac_binds_token_and_nonce() -> None:
    nonce = messages.new_nonce()
    proof = messages.mac(b"secret", nonce)
    messages.check_mac(b"secret", nonce, proof, "x")
    with pytest.raises(AuthError, match="token mismatch"):
        messages.check_mac(b"other", nonce, proof, "x")
    with pytest.raises(AuthError):
        messages.check_mac(b"secret", messages.new_nonce(), proof, "x")
    with pytest.raises(AuthError):
        messages.check_mac(b"secret", nonce, None, "x")
    messages.check_mac(None, nonce, None, "x")  # no token configured: open cluster


def test_have_bitmap_round_trip() -> None:
    flags = [True, False, True, True, False, False, False, False, True]
    frame = Frame(messages.have(flags), bytearray())
    assert messages.have_flags(frame, len(flags)) == flags


def test_request_size_limit() -> None:
    ids = [hash_bytes(bytes([i])) for i in range(5)]
    assert messages.ids_field(messages.get(ids)) == ids
    with pytest.raises(ProtocolError):
        messages.ids_field(messages.get(ids), Limits(max_ids=4))
    with pytest.raises(ProtocolError):
        messages.ids_field({"ids": [b"short"]})


def test_error_frames_are_translated() -> None:
    with pytest.raises(AuthError):
        messages.expect(Frame(messages.error("auth", "no"), bytearray()), "ready")
    with pytest.raises(ProtocolError):
        messages.expect(Frame({"t": "pong"}, bytearray()), "ready")


def test_pong_names_peers_and_malformed_lists_are_refused() -> None:
    header = messages.pong("n", "r", ["10.0.0.2:7411", "[::1]:7411"])
    assert messages.peers_field(header) == ["10.0.0.2:7411", "[::1]:7411"]
    assert messages.peers_field({"t": "pong"}) == []  # an older daemon names nobody
    for bad in ("10.0.0.2", ["x"], [7411], ["h:0"], ["h:99999"], [":1"], ["a" * 300 + ":1"],
                ["h:1"] * (messages.MAX_GOSSIP_PEERS + 1)):
        with pytest.raises(ProtocolError):
            messages.peers_field({"t": "pong", "peers": bad})
