"""What a daemon counts, and its Prometheus registry (prometheus_client).

The server and provider bump plain integers on ``Metrics`` (cheap, no locks: one
event loop); ``DaemonCollector`` reads them at each scrape. Histograms
(time to answer a chunk request, per tier) are prometheus_client's own. The
registry also carries build info, ``process_*``/``python_*`` and, wired by the
daemon, the node store's gauges and the pull-side metrics of any pull run in
the daemon's process (blobstore/metrics.py). Names: docs/metrics.md.
"""

from __future__ import annotations

import asyncio
import platform
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Histogram,
    Info,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from blobstore import metrics as blobstore_metrics

if TYPE_CHECKING:
    from blobstore.nodestore import NodeStore

REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
"""Seconds: a chunk from the node store is sub-millisecond, a read-through tens of ms."""
REQUEST_TIERS = ("local", "origin", "missing")


@dataclass(slots=True, eq=False)
class Metrics:
    bytes_served: int = 0
    chunks_served: int = 0
    hits: int = 0
    """Chunks answered from the local cache."""
    misses: int = 0
    """Chunks answered 'missing'."""
    origin_fetches: int = 0
    """Read-throughs to the object store (one per chunk however many waited)."""
    origin_bytes: int = 0
    """Bytes those read-throughs got from the object store."""
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
    agent_pulls: Counter[str] = field(default_factory=Counter)
    """Pulls of this node's CLI the node agent took, by outcome: "done", "failed",
    "cancelled" (its client left), "declined" (another setting, busy, another view)."""
    peers: Callable[[], int] = lambda: 0
    known_peers: Callable[[], int] = lambda: 0
    """Peers in the directory, live or not (gossip-learned ones are capped)."""
    peer_statuses: Callable[[], Iterable[str]] = tuple
    """The status of each peer in the directory: new, up, down, refused, foreign, self."""
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    """Everything /metrics shows; the daemon adds the node store and pull metrics."""
    peer_view: tuple[int, int, Counter[str]] = field(init=False, default=(0, 0, Counter()))
    """peers(), known_peers() and the statuses counted, as last read on the loop."""
    request_seconds: Histogram = field(init=False)
    """blobstore_peer_request_seconds, by tier."""
    _request_children: dict[str, Histogram] = field(init=False)
    """The request histogram's child per tier (``labels()`` costs more than ``observe``)."""

    def __post_init__(self) -> None:
        blobstore_metrics.no_created_series()
        registry = self.registry
        registry.register(DaemonCollector(self))
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            # the same collectors as the default registry's, on this one too
            registry.register(standard)
        Info("blobstore_build", "The daemon's version.", registry=registry).info(
            {"version": _version(), "python": platform.python_version()}
        )
        self.request_seconds = request_seconds = Histogram(
            "blobstore_peer_request_seconds",
            "Time to find a chunk a peer asked for, by where it was found (local: node "
            "store, origin: read through from the object store, missing: answered "
            "missing).",
            ["tier"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self._request_children = {tier: request_seconds.labels(tier) for tier in REQUEST_TIERS}

    def include_node(self, store: NodeStore) -> Callable[[], None]:
        """Show ``store``'s gauges here, and the pulls run in this process
        (blobstore.metrics.enable); returns the undo (for an exit stack)."""
        collector = blobstore_metrics.watch_node_store(store, self.registry)
        blobstore_metrics.enable(self.registry)

        def undo() -> None:
            blobstore_metrics.disable()
            self.registry.unregister(collector)

        return undo

    def answered(self, tier: str, seconds: float) -> None:
        """A chunk request was answered from ``tier`` ("" = missing) in ``seconds``."""
        tier = tier or "missing"
        child = self._request_children.get(tier)
        if child is None:  # a tier name the provider did not give before
            child = self._request_children[tier] = self.request_seconds.labels(tier)
        child.observe(seconds)

    async def scrape(self, accept: str = "") -> tuple[bytes, str]:
        """The registry rendered for a scrape with ``accept`` (Prometheus text, or
        OpenMetrics when asked for); returns (body, content type). The peer directory
        is read here, on the loop that changes it; the rendering runs in a worker
        thread (``process_*`` reads /proc; the rest reads integers and
        prometheus_client's locked values)."""
        self._look_at_peers()
        return await asyncio.to_thread(self._encode, accept)

    def render(self) -> str:
        """The Prometheus text format, rendered on the calling thread (tests, logs)."""
        self._look_at_peers()
        return self._encode("")[0].decode()

    def _look_at_peers(self) -> None:
        self.peer_view = (self.peers(), self.known_peers(), Counter(self.peer_statuses()))

    def _encode(self, accept: str) -> tuple[bytes, str]:
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type


class DaemonCollector(Collector):
    """``Metrics``' plain counters as metric families, read at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics

        def counter(name: str, help_: str, value: int) -> CounterMetricFamily:
            return CounterMetricFamily(f"blobstore_peer_{name}", help_, value=value)

        def gauge(name: str, help_: str, value: int) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"blobstore_peer_{name}", help_, value=value)

        def by(
            family: CounterMetricFamily | GaugeMetricFamily, values: Mapping[str, int]
        ) -> Metric:
            for key, value in sorted(values.items()):
                family.add_metric([key], value)
            return family

        yield counter("bytes_served", "Chunk bytes sent to peers.", m.bytes_served)
        yield counter("chunks_served", "Chunks sent to peers.", m.chunks_served)
        yield by(
            CounterMetricFamily(
                "blobstore_peer_tier_bytes",
                "Bytes served, by the tier they came from.",
                labels=["tier"],
            ),
            m.tier_bytes,
        )
        yield counter("hits", "Chunks found in the local cache.", m.hits)
        yield counter("misses", "Chunks answered as missing.", m.misses)
        yield counter(
            "origin_fetches", "Read-through fetches from the object store.", m.origin_fetches
        )
        yield counter("origin_bytes", "Bytes read through from the object store.", m.origin_bytes)
        yield counter("corrupt_dropped", "Corrupt cached chunks dropped.", m.corrupt_dropped)
        yield counter("auth_failures", "Connections refused for a wrong token.", m.auth_failures)
        yield by(
            CounterMetricFamily(
                "blobstore_peer_connections_dropped",
                "Connections closed by the daemon's limits, by reason.",
                labels=["reason"],
            ),
            m.dropped,
        )
        yield gauge("in_flight", "Chunk requests being answered.", m.in_flight)
        yield gauge(
            "lookups_pending",
            "Chunk answers holding the lookup budget (looked up or waiting to be sent).",
            m.lookups,
        )
        yield gauge("connections", "Open peer connections.", m.connections)
        live, known, by_state = m.peer_view
        yield gauge("peers", "Live same-region peers seen.", live)
        yield gauge("known_peers", "Peers known, live or not.", known)
        yield by(
            GaugeMetricFamily(
                "blobstore_peer_peers_by_state",
                "Peers in the directory by state (up, down, new, refused, foreign, self).",
                labels=["state"],
            ),
            {"up": 0, "down": 0, "new": 0} | by_state,
        )
        yield by(
            CounterMetricFamily(
                "blobstore_agent_pulls",
                "Pulls of this node's CLI the node agent took, by outcome (done, failed, "
                "cancelled: its client left, declined: the CLI pulled in its own process).",
                labels=["result"],
            ),
            {"done": 0, "failed": 0, "cancelled": 0, "declined": 0} | m.agent_pulls,
        )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("blobstore")
    except PackageNotFoundError:
        return "unknown"
