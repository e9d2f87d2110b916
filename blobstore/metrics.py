"""Pull-side and node-store metrics for Prometheus (prometheus_client).

Nothing here runs unless asked: the CLI's push and pull never import this module
(it imports prometheus_client, tests/test_startup.py guards that). A process that
exposes metrics -- the peer daemon, or an application using the runner API --
calls ``enable(registry)``; from then on every pull in the process (every
``TieredSource``) reports the bytes and time each chunk cost, per tier, to that
registry::

    import prometheus_client
    from blobstore import metrics

    metrics.enable()                        # the default registry
    prometheus_client.start_http_server(9100)

Metric names and what to alert on: docs/metrics.md.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from . import tiers

if TYPE_CHECKING:
    from collections.abc import Iterator

    from prometheus_client.metrics_core import Metric

    from .nodestore import NodeStore

CHUNK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
"""Seconds; a node-store chunk takes well under a millisecond, an S3 GET tens of ms."""
PULL_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
"""Seconds for a whole pull: from an up-to-date tree to tens of GiB from the store."""


class PullMetrics:
    """A ``tiers.TierObserver`` that counts into Prometheus metrics on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.bytes = Counter(
            "blobstore_pull_bytes",
            "Bytes pulls got, by the tier that delivered them (local: the node's own "
            "copies, peer: regional daemons, origin: the object store).",
            ["tier"],
            registry=registry,
        )
        self.chunk_seconds = Histogram(
            "blobstore_pull_chunk_seconds",
            "Time each chunk cost a pull on the tier that delivered it: a single get's "
            "duration, or in a batched fetch the wait since that tier's previous chunk "
            "(for the first, since the tier was asked).",
            ["tier"],
            buckets=CHUNK_BUCKETS,
            registry=registry,
        )
        self.tier_errors = Counter(
            "blobstore_pull_tier_errors",
            "Chunks a tier could not deliver for a reason other than not holding them "
            "(unavailable, corrupt); the next tier was asked.",
            ["tier", "reason"],
            registry=registry,
        )
        self.pulls = Counter("blobstore_pulls", "Pulls completed.", registry=registry)
        self.pull_seconds = Histogram(
            "blobstore_pull_seconds",
            "Wall time of completed pulls.",
            buckets=PULL_BUCKETS,
            registry=registry,
        )
        self._per_tier: dict[str, tuple[Counter, Histogram]] = {}
        """Each tier's children, looked up once (``labels()`` costs more than the count)."""
        for tier in ("local", "peer", "origin"):  # present at 0 before the first pull
            self._tier(tier)

    def _tier(self, tier: str) -> tuple[Counter, Histogram]:
        found = self._per_tier.get(tier)
        if found is None:
            found = self._per_tier[tier] = (
                self.bytes.labels(tier),
                self.chunk_seconds.labels(tier),
            )
        return found

    def delivered(self, tier: str, size: int, seconds: float | None) -> None:
        nbytes, chunk_seconds = self._tier(tier)
        nbytes.inc(size)
        if seconds is not None:
            chunk_seconds.observe(seconds)

    def failed(self, tier: str, reason: str) -> None:
        self.tier_errors.labels(tier, reason).inc()

    def pulled(self, placed_bytes: int, seconds: float) -> None:
        if placed_bytes:
            self._tier("local")[0].inc(placed_bytes)
        self.pulls.inc()
        self.pull_seconds.observe(seconds)


_enabled: weakref.WeakKeyDictionary[CollectorRegistry, PullMetrics] = weakref.WeakKeyDictionary()


def enable(registry: CollectorRegistry = REGISTRY) -> PullMetrics:
    """Report every pull in this process to ``registry`` (idempotent per registry; a
    later call with another registry moves the reports there). Returns the metrics."""
    no_created_series()
    found = _enabled.get(registry)
    if found is None:
        found = _enabled[registry] = PullMetrics(registry)
    tiers.report_to(found)
    return found


def no_created_series() -> None:
    """Turn off prometheus_client's ``*_created`` series, process-wide: the text format
    shows each as one more gauge per counter and histogram, that no query here uses."""
    disable_created_metrics()  # type: ignore[no-untyped-call]  # (untyped upstream)


def disable() -> None:
    """Stop reporting pulls (the metrics already registered stay, frozen)."""
    tiers.report_to(None)


class NodeStoreCollector(Collector):
    """The node store's size, limit and evictions, read at each scrape."""

    def __init__(self, store: NodeStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        store = self.store
        config = store.config
        yield GaugeMetricFamily(
            "blobstore_cache_used_bytes",
            "Bytes the node store holds (whole files and loose chunks; seeds in "
            "destinations are not counted).",
            value=store.used_bytes,
        )
        yield GaugeMetricFamily(
            "blobstore_cache_capacity_bytes",
            "The node store's size limit (--cache-size).",
            value=config.max_bytes,
        )
        yield GaugeMetricFamily(
            "blobstore_cache_high_watermark_bytes",
            "Above this the node store evicts least-recently-used data, down to the low watermark.",
            value=int(config.high_watermark * config.max_bytes),
        )
        yield CounterMetricFamily(
            "blobstore_cache_evicted_bytes",
            "Bytes evicted from the node store by this process.",
            value=store.evicted_bytes,
        )


def watch_node_store(store: NodeStore, registry: CollectorRegistry = REGISTRY) -> Collector:
    """Expose ``store``'s gauges on ``registry``; returns the collector (to unregister)."""
    collector = NodeStoreCollector(store)
    registry.register(collector)
    return collector
