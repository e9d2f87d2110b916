from __future__ import annotations

import pytest

from blobstore.errors import AuthError, ProtocolError
from blobstore.ids import hash_bytes
from p2p import messages
from p2p.framing import Frame, Limits


def _transcript(**changes: object) -> messages.Transcript:
    fields: dict[str, object] = {
        "server_node": "srv",
        "client_node": "cli",
        "region": "r1",
        "server_endpoint": "10.0.0.1:7411",
        "server_nonce": b"s" * 16,
        "client_nonce": b"c" * 16,
    }
    fields.update(changes)
    return messages.Transcript(**fields)  # type: ignore[arg-type]


def test_proof_binds_token_role_nodes_region_endpoint_and_both_nonces() -> None:
    t = _transcript()
    proof = messages.proof(b"secret", t, messages.CLIENT)
    messages.check_proof(b"secret", t, messages.CLIENT, proof, "x")
    with pytest.raises(AuthError, match="token mismatch"):
        messages.check_proof(b"other", t, messages.CLIENT, proof, "x")
    with pytest.raises(AuthError):  # a client's proof never passes as the server's
        messages.check_proof(b"secret", t, messages.SERVER, proof, "x")
    for change in (
        {"server_node": "cli", "client_node": "srv"},
        {"client_node": "evil"},
        {"server_node": "evil"},
        {"region": "r2"},
        {"server_endpoint": "10.0.0.9:1"},
        {"server_nonce": b"x" * 16},
        {"client_nonce": b"x" * 16},
    ):
        with pytest.raises(AuthError):
            messages.check_proof(b"secret", _transcript(**change), messages.CLIENT, proof, "x")
    # Fields are length-prefixed: moving bytes from one field into the next changes the proof.
    shifted = _transcript(server_node="srvc", client_node="li")
    assert messages.proof(b"secret", shifted, messages.CLIENT) != proof
    with pytest.raises(AuthError):
        messages.check_proof(b"secret", t, messages.CLIENT, None, "x")
    messages.check_proof(None, t, messages.CLIENT, None, "x")  # no token: open cluster


def test_endpoint_normalizes_socket_addresses() -> None:
    assert messages.endpoint(("127.0.0.1", 7411)) == "127.0.0.1:7411"
    assert messages.endpoint(("::ffff:10.0.0.2", 7411, 0, 0)) == "10.0.0.2:7411"
    assert messages.endpoint(("fe80::1", 7411, 0, 2)) == "[fe80::1]:7411"
    assert messages.endpoint(None) == ""


def test_other_protocol_versions_are_refused() -> None:
    messages.version_field(messages.hello("n", "r", b"n" * 16))
    with pytest.raises(ProtocolError, match="v1"):
        messages.version_field({"t": "hello", "v": 1})


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
    for bad in (
        "10.0.0.2",
        ["x"],
        [7411],
        ["h:0"],
        ["h:99999"],
        [":1"],
        ["a" * 300 + ":1"],
        ["h:1"] * (messages.MAX_GOSSIP_PEERS + 1),
    ):
        with pytest.raises(ProtocolError):
            messages.peers_field({"t": "pong", "peers": bad})


def test_pongs_name_node_ids_and_pings_and_pongs_carry_news() -> None:
    died = messages.News("10.0.0.3:7411", "n3", False, 1.5)
    gossip = messages.Gossip([("10.0.0.2:7411", "n2")], [died])
    pong = messages.pong("n", "r", gossip)
    assert messages.members_field(pong) == [("10.0.0.2:7411", "n2")]
    assert messages.news_field(pong) == [died]
    ping = messages.ping(7411, [died])
    assert messages.port_field(ping) == 7411
    assert messages.news_field(ping) == [died]
    assert messages.news_field(messages.ping()) == []  # a pull's ping, an older daemon's
    # An older daemon's pong lists addresses only: no node ids to trust.
    assert messages.members_field({"peers": ["10.0.0.2:7411"]}) == [("10.0.0.2:7411", "")]
    many = [messages.News(f"10.0.1.{i}:7411", f"n{i}", True, 0.0) for i in range(100)]
    assert len(messages.news_field(messages.ping(None, many))) == messages.MAX_NEWS
    for bad in (
        {"peers": ["10.0.0.2:7411"], "nodes": ["n2", "n3"]},
        {"peers": ["10.0.0.2:7411"], "nodes": [7]},
    ):
        with pytest.raises(ProtocolError):
            messages.members_field(bad)
    for bad_news in (
        "x",
        [["10.0.0.2:7411", "n2", True]],
        [["10.0.0.2", "n2", True, 0]],
        [["10.0.0.2:7411", "n2", "yes", 0]],
        [["10.0.0.2:7411", "n2", True, -1]],
        [["10.0.0.2:7411", "n2", True, True]],
        [["10.0.0.2:7411", "n2", True, 0]] * (messages.MAX_NEWS + 1),
    ):
        with pytest.raises(ProtocolError):
            messages.news_field({"news": bad_news})
