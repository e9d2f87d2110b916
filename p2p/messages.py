"""The vocabulary of the peer protocol: building and checking frame headers.

Pure functions; see docs/protocol.md for the conversation they make up.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import secrets
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Any

from blobstore.errors import AuthError, PeerBusy, ProtocolError
from blobstore.hostport import split_hostport
from blobstore.ids import ChunkId, id_from_bytes, id_to_bytes

from .framing import DEFAULT_LIMITS, Frame, Limits

VERSION = 2
"""v2 binds both nonces, the role, both node ids, the region and the endpoint into
each proof (v1 proved one nonce the same way in both directions: reflectable)."""
_PROOF_CONTEXT = b"blobstore-p2p-v2 handshake\x00"
CLIENT = b"client"
SERVER = b"server"


def new_nonce() -> bytes:
    return secrets.token_bytes(16)


@dataclass(frozen=True, slots=True)
class Transcript:
    """Everything both sides' proofs are bound to; both sides build the same one."""

    server_node: str
    client_node: str
    region: str
    server_endpoint: str
    """``HOST:PORT`` where the client reached the server, as each side sees it
    (client: peer address; server: local address). A relay sees other ones.
    Empty over TLS, where the certificates authenticate the channel."""
    server_nonce: bytes
    client_nonce: bytes

    def message(self, role: bytes) -> bytes:
        """The MAC input for ``role``'s proof: context, role, then length-prefixed fields."""
        fields = (
            role,
            self.server_node.encode(),
            self.client_node.encode(),
            self.region.encode(),
            self.server_endpoint.encode(),
            self.server_nonce,
            self.client_nonce,
        )
        return _PROOF_CONTEXT + b"".join(len(f).to_bytes(4, "big") + f for f in fields)


def proof(token: bytes | None, transcript: Transcript, role: bytes) -> bytes | None:
    """``role``'s proof of holding the cluster token, for this handshake only."""
    if token is None:
        return None
    return hmac.new(token, transcript.message(role), hashlib.sha256).digest()


def check_proof(
    token: bytes | None, transcript: Transcript, role: bytes, got: Any, who: str
) -> None:
    """Raise AuthError unless ``got`` is ``role``'s proof of ``transcript`` (with a token)."""
    if token is None:
        return
    want = proof(token, transcript, role)
    assert want is not None
    if not isinstance(got, bytes) or not hmac.compare_digest(want, got):
        raise AuthError(f"cluster token mismatch with {who}")


def endpoint(sockaddr: Any) -> str:
    """``HOST:PORT`` of a socket address; IPv4-mapped IPv6 addresses read as IPv4."""
    if not isinstance(sockaddr, tuple) or len(sockaddr) < 2:
        return ""
    host, port = str(sockaddr[0]), int(sockaddr[1])
    host = host.removeprefix("::ffff:") if "." in host else host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def version_field(header: dict[str, Any]) -> None:
    """Raise ProtocolError unless the peer speaks our protocol version."""
    version = header.get("v")
    if version != VERSION:
        raise ProtocolError(
            f"peer speaks protocol v{version}, this node v{VERSION}: "
            "upgrade both to the same release"
        )


def hello(node: str, region: str, nonce: bytes) -> dict[str, Any]:
    return {"t": "hello", "v": VERSION, "node": node, "region": region, "nonce": nonce}


def auth(node: str, region: str, nonce: bytes, mac: bytes | None, reached: str) -> dict[str, Any]:
    """``reached``: where the client reached the server (for the server's error message;
    the proof binds the server's own view of it)."""
    return {
        "t": "auth",
        "v": VERSION,
        "node": node,
        "region": region,
        "nonce": nonce,
        "mac": mac,
        "to": reached,
    }


def ready(mac: bytes | None) -> dict[str, Any]:
    return {"t": "ready", "mac": mac}


def error(code: str, message: str) -> dict[str, Any]:
    return {"t": "error", "code": code, "msg": message}


def get(ids: list[ChunkId], as_server: list[bool] | None = None) -> dict[str, Any]:
    """``as_server[i]``: ``ids[i]`` is asked of the peer as one of the chunk's servers,
    not as the home the asker sees (sent only when one is; see ``as_server_field``)."""
    header: dict[str, Any] = {"t": "get", "ids": [id_to_bytes(i) for i in ids]}
    if as_server and any(as_server):
        header["srv"] = as_server
    return header


def as_server_field(header: dict[str, Any], count: int) -> list[bool]:
    """Per id of a get, whether it was asked as a server (False for all when absent:
    older clients, and asks of a chunk's home)."""
    raw = header.get("srv")
    if raw is None:
        return [False] * count
    if not isinstance(raw, list) or len(raw) != count or not all(isinstance(b, bool) for b in raw):
        raise ProtocolError("field 'srv' malformed")
    return raw


def has(ids: list[ChunkId]) -> dict[str, Any]:
    return {"t": "has", "ids": [id_to_bytes(i) for i in ids]}


PING: dict[str, Any] = {"t": "ping"}


def ping(port: int | None = None, news: Sequence[News] = (), early: bool = False) -> dict[str, Any]:
    """A liveness check. ``port``: where the pinging daemon serves, on the address it
    pings from, so the pinged one can name it in its pongs (a pull serves nothing and
    sends none). Without it a seed learnt nobody: pongs name only peers the seed
    dialled itself, so a region that knew one seed address never found itself.
    ``news``: membership news, as pongs carry it (so news travels both ways).
    ``early``: the pinger takes a pong marked ``EARLY`` ahead of the answers it still
    waits for (a server that knows the flag sends it at once, not in request order)."""
    header = {"t": "ping", "port": port} if port else dict(PING)
    if news:
        header["news"] = _news_entries(news)
    if early:
        header[EARLY] = True
    return header


EARLY = "early"
"""On a ping: the pinger takes its pong out of order. On a pong: sent out of order."""


def early_field(header: dict[str, Any]) -> bool:
    """Whether a ping asks for, or a pong is, an early pong (absent: in order)."""
    return header.get(EARLY) is True


def port_field(header: dict[str, Any]) -> int | None:
    """The serving port a ping names (None if it names none)."""
    port = header.get("port")
    if port is None:
        return None
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ProtocolError("'port' must be a TCP port number")
    return port


MAX_GOSSIP_PEERS = 1024
"""Addresses a received pong may list (older daemons list every live peer)."""
GOSSIP_SAMPLE = 32
"""Addresses a pong lists: a fresh random sample of the live peers each time, so a pinger
learns the whole region within a few rounds while a pong stays under ~1 KiB whatever the
region's size. Listing every live peer made pongs ~20 KiB at 1,000 nodes, sent ~1,000
times a second by each daemon (bench/sim_region.py, docs/scale.md)."""
MAX_NEWS = 32
"""Membership news a pong carries at most (and a received pong may carry)."""


@dataclass(frozen=True, slots=True)
class News:
    """A peer seen to come up or go down, first-hand by someone, ``age`` seconds ago.

    Deaths and joins spread by riding on pongs (SWIM-style piggybacking): a receiver
    applies news only when it is fresher than its own first-hand evidence."""

    address: str
    node: str
    alive: bool
    age: float


@dataclass(frozen=True, slots=True)
class Gossip:
    """What a daemon's pongs say about the region: a sample of its live peers
    (address, node id) and recent news."""

    peers: list[tuple[str, str]]
    news: list[News]


def pong(node: str, region: str, peers: list[str] | Gossip) -> dict[str, Any]:
    """A ping's answer. ``peers``: the addresses of the live peers the daemon sees, or
    its ``Gossip`` (a sample with node ids, and news)."""
    if not isinstance(peers, Gossip):
        if len(peers) > GOSSIP_SAMPLE:
            peers = random.sample(peers, GOSSIP_SAMPLE)
        return {"t": "pong", "node": node, "region": region, "peers": peers}
    members = peers.peers
    if len(members) > GOSSIP_SAMPLE:
        members = random.sample(members, GOSSIP_SAMPLE)
    news = peers.news
    header: dict[str, Any] = {
        "t": "pong",
        "node": node,
        "region": region,
        "peers": [address for address, _ in members],
        "nodes": [member for _, member in members],
    }
    if news:
        header["news"] = _news_entries(news)
    return header


def _news_entries(news: Sequence[News]) -> list[list[Any]]:
    if len(news) > MAX_NEWS:
        news = random.sample(list(news), MAX_NEWS)
    return [[n.address, n.node, n.alive, round(n.age * 1000)] for n in news]


def peers_field(header: dict[str, Any], known: Container[str] = ()) -> list[str]:
    """The HOST:PORT addresses a pong lists (none if it lists none). Addresses in
    ``known`` (checked when they were first heard) are not parsed again."""
    raw = header.get("peers", [])
    if not isinstance(raw, list) or len(raw) > MAX_GOSSIP_PEERS:
        raise ProtocolError("'peers' must be a list of at most 1024 addresses")
    for address in raw:
        if not (isinstance(address, str) and address in known):
            _check_address(address, "peers")
    return list(dict.fromkeys(raw))  # each address once, in order


def members_field(header: dict[str, Any], known: Container[str] = ()) -> list[tuple[str, str]]:
    """The (address, node id) pairs a pong lists; the node id is empty when the pong
    names none (a daemon of an older release lists addresses only)."""
    raw = header.get("peers", [])
    addresses = peers_field(header, known)
    nodes = header.get("nodes")
    if nodes is None or len(addresses) != len(raw):
        return [(address, "") for address in addresses]
    if not isinstance(nodes, list) or len(nodes) != len(raw):
        raise ProtocolError("'nodes' must name one node per listed peer")
    for node in nodes:
        if not isinstance(node, str) or len(node) > 256:
            raise ProtocolError("'nodes' lists a malformed node id")
    return list(zip(addresses, nodes, strict=True))


def news_field(header: dict[str, Any]) -> list[News]:
    """The membership news a pong carries (none if it carries none)."""
    raw = header.get("news", [])
    if not isinstance(raw, list) or len(raw) > MAX_NEWS:
        raise ProtocolError(f"'news' must be a list of at most {MAX_NEWS} entries")
    news = []
    for item in raw:
        if not isinstance(item, list) or len(item) != 4:
            raise ProtocolError("'news' lists a malformed entry")
        address, node, alive, age_ms = item
        _check_address(address, "news")
        if not isinstance(node, str) or len(node) > 256 or not isinstance(alive, bool):
            raise ProtocolError("'news' lists a malformed entry")
        if not isinstance(age_ms, int) or isinstance(age_ms, bool) or not 0 <= age_ms < 1 << 31:
            raise ProtocolError("'news' lists a malformed age")
        news.append(News(address, node, alive, age_ms / 1000))
    return news


def _check_address(address: Any, field_name: str) -> None:
    if not isinstance(address, str) or len(address) > 256:
        raise ProtocolError(f"'{field_name}' lists a malformed address")
    parsed = split_hostport(address)
    if parsed is None or not parsed[0]:
        raise ProtocolError(f"'{field_name}' lists a malformed address {address[:64]!r}")


MISSING: dict[str, Any] = {"t": "missing"}
CHUNK: dict[str, Any] = {"t": "chunk"}


def have(flags: list[bool]) -> dict[str, Any]:
    bits = bytearray((len(flags) + 7) // 8)
    for i, flag in enumerate(flags):
        if flag:
            bits[i >> 3] |= 1 << (i & 7)
    return {"t": "have", "bits": bytes(bits)}


def have_flags(frame: Frame, count: int) -> list[bool]:
    bits = expect(frame, "have").get("bits")
    if not isinstance(bits, bytes) or len(bits) != (count + 7) // 8:
        raise ProtocolError("'have' answer has the wrong size")
    return [bool(bits[i >> 3] & (1 << (i & 7))) for i in range(count)]


def expect(frame: Frame, kind: str) -> dict[str, Any]:
    """Return the header if the frame is a ``kind``; raise ProtocolError/AuthError otherwise."""
    if frame.kind == kind:
        return frame.header
    if frame.kind == "error":
        # A peer's text never adds lines or terminal escapes to our one-line errors.
        msg = "".join(c if c.isprintable() else " " for c in str(frame.header.get("msg", ""))[:200])
        if frame.header.get("code") == "auth":
            raise AuthError(f"peer refused us: {msg}")
        if frame.header.get("code") == "busy":
            raise PeerBusy(f"peer busy: {msg}")
        raise ProtocolError(f"peer error: {msg}")
    raise ProtocolError(f"expected a {kind!r} frame, got {frame.kind!r}")


def text_field(header: dict[str, Any], key: str, limit: int = 256) -> str:
    val = header.get(key)
    if not isinstance(val, str) or len(val) > limit:
        raise ProtocolError(f"field {key!r} missing or malformed")
    return val


def nonce_field(header: dict[str, Any]) -> bytes:
    val = header.get("nonce")
    if not isinstance(val, bytes) or not 8 <= len(val) <= 64:
        raise ProtocolError("handshake nonce missing or malformed")
    return val


def ids_field(header: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> list[ChunkId]:
    raw = header.get("ids")
    if not isinstance(raw, list) or len(raw) > limits.max_ids:
        raise ProtocolError(f"request must list at most {limits.max_ids} ids")
    try:
        return [id_from_bytes(r) for r in raw]
    except Exception as exc:
        raise ProtocolError("request lists a malformed id") from exc
