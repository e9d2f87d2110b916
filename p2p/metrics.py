"""Counters a daemon keeps, rendered in the Prometheus text format."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class Metrics:
    bytes_served: int = 0
    chunks_served: int = 0
    hits: int = 0
    """Chunks answered from the local cache."""
    misses: int = 0
    """Chunks answered 'missing'."""
    origin_fetches: int = 0
    """Read-throughs to the object store (one per chunk however many waited)."""
    tier_bytes: dict[str, int] = field(default_factory=lambda: {"local": 0, "origin": 0})
    """Bytes served, by where this daemon found them."""
    corrupt_dropped: int = 0
    in_flight: int = 0
    lookups: int = 0
    """Units of the daemon-wide lookup budget in use (ServerLimits.lookups_per_daemon)."""
    connections: int = 0
    auth_failures: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    """Connections the daemon closed to protect the others, by reason: "connection_cap",
    "handshake_timeout", "idle", "stalled"."""
    peers: Callable[[], int] = lambda: 0
    known_peers: Callable[[], int] = lambda: 0
    """Peers in the directory, live or not (gossip-learned ones are capped)."""

    def render(self) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, int]]) -> None:
            lines.append(f"# HELP blobstore_peer_{name} {help_}")
            lines.append(f"# TYPE blobstore_peer_{name} {kind}")
            lines.extend(f"blobstore_peer_{name}{labels} {value}" for labels, value in samples)

        metric(
            "bytes_served_total", "counter", "Chunk bytes sent to peers.", [("", self.bytes_served)]
        )
        metric(
            "chunks_served_total", "counter", "Chunks sent to peers.", [("", self.chunks_served)]
        )
        metric(
            "tier_bytes_total",
            "counter",
            "Bytes served, by the tier they came from.",
            [(f'{{tier="{t}"}}', v) for t, v in sorted(self.tier_bytes.items())],
        )
        metric("hits_total", "counter", "Chunks found in the local cache.", [("", self.hits)])
        metric("misses_total", "counter", "Chunks answered as missing.", [("", self.misses)])
        metric(
            "origin_fetches_total",
            "counter",
            "Read-through fetches from the object store.",
            [("", self.origin_fetches)],
        )
        metric(
            "corrupt_dropped_total",
            "counter",
            "Corrupt cached chunks dropped.",
            [("", self.corrupt_dropped)],
        )
        metric(
            "auth_failures_total",
            "counter",
            "Connections refused for a wrong token.",
            [("", self.auth_failures)],
        )
        metric(
            "connections_dropped_total",
            "counter",
            "Connections closed by the daemon's limits, by reason.",
            [(f'{{reason="{r}"}}', v) for r, v in sorted(self.dropped.items())],
        )
        metric("in_flight", "gauge", "Chunk requests being answered.", [("", self.in_flight)])
        metric(
            "lookups_pending",
            "gauge",
            "Chunk answers holding the lookup budget (looked up or waiting to be sent).",
            [("", self.lookups)],
        )
        metric("connections", "gauge", "Open peer connections.", [("", self.connections)])
        metric("peers", "gauge", "Live same-region peers seen.", [("", self.peers())])
        metric("known_peers", "gauge", "Peers known, live or not.", [("", self.known_peers())])
        return "\n".join(lines) + "\n"
