"""/metrics on live daemons, parsed with prometheus_client's own parsers; the pull-side
metrics of pulls in the same process; the Grafana dashboard against a live scrape."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import anyio
import pytest
from daemons import Daemon, cluster
from helpers import make_big_tree, snapshot
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from pulling import pull

from blobstore import metrics as blobstore_metrics
from blobstore.catalog import Catalog
from blobstore.client import Client
from blobstore.config import CacheConfig, Config, PeerConfig
from blobstore.errors import Unavailable
from blobstore.ids import ChunkId, hash_bytes
from blobstore.manifest import ChunkRef
from blobstore.source import ChunkData, Sink
from blobstore.stores import open_object_store
from blobstore.tiers import TieredSource
from p2p.metrics import Metrics

pytestmark = pytest.mark.anyio

DOCS = Path(__file__).parents[2] / "docs"
DASHBOARD = DOCS / "grafana-dashboard.json"
ALERTS = DOCS / "prometheus-alerts.yml"
ALERT_TESTS = Path(__file__).with_name("prometheus-alerts-test.yml")
DATA_BYTES = 6 << 20


@pytest.fixture
async def pushed(tmp_path: Path) -> tuple[str, Path]:
    """A file store holding ref ``apps/m``; returns (store url, source dir)."""
    store = (tmp_path / "store").as_uri()
    src = tmp_path / "src"
    make_big_tree(src, DATA_BYTES, seed=11)
    async with Client.open(_config(store, tmp_path / "pusher"), peers=False) as client:
        await client.push(src, "apps/m")
    return store, src


def _config(store: str, cache: Path) -> Config:
    return Config(store, CacheConfig(cache), "default", PeerConfig.parse("none", None))


def scrape(d: Daemon, accept: str | None = None) -> tuple[str, str]:
    """(content type, body) of the daemon's /metrics."""
    request = urllib.request.Request(f"http://{d.http}/metrics")
    if accept is not None:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=10) as resp:
        return resp.headers["Content-Type"], resp.read().decode()


def families(text: str) -> dict[str, Metric]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def family_of(found: dict[str, Metric], sample: str) -> str | None:
    """The parsed family a sample (or query) name belongs to, if any."""
    for suffix in ("", "_total", "_bucket", "_count", "_sum", "_info"):
        name = sample.removesuffix(suffix) if suffix else sample
        if name in found:
            return name
    return None


def value(found: dict[str, Metric], sample: str, **labels: str) -> float:
    """The one sample named ``sample`` with ``labels`` (others may have more labels)."""
    family = family_of(found, sample)
    assert family is not None, f"{sample} not scraped"
    values = [
        s.value
        for s in found[family].samples
        if s.name == sample and labels.items() <= s.labels.items()
    ]
    assert len(values) == 1, (sample, labels, found[family].samples)
    return values[0]


async def _unique_bytes(store: str, ref: str) -> int:
    async with open_object_store(store) as objects:
        catalog = Catalog(objects)
        tree = await catalog.load_tree(await catalog.resolve(ref))
    return sum({c.id: c.size for c in tree.chunk_refs()}.values())


async def test_a_live_scrape_parses_and_adds_up(pushed: tuple[str, Path], tmp_path: Path) -> None:
    store, src = pushed
    registry = CollectorRegistry()
    blobstore_metrics.enable(registry)  # the test process's pull reports here
    try:
        with cluster(store, tmp_path, 2) as daemons:
            peers = ",".join(d.listen for d in daemons)
            outcome = await pull(store, tmp_path / "c1", peers, "apps/m", tmp_path / "o1")
            assert snapshot(tmp_path / "o1") == snapshot(src)
            scraped = [scrape(d) for d in daemons]
            negotiated = scrape(daemons[0], "application/openmetrics-text; version=1.0.0")
    finally:
        blobstore_metrics.disable()

    for content_type, _ in scraped:
        assert content_type.startswith("text/plain; version=")
        assert "charset=utf-8" in content_type
    found = [families(text) for _, text in scraped]

    # Bytes per tier, from the pull's side: exactly what the tiers delivered.
    pulled = families(_text(registry))
    for tier in ("local", "peer", "origin"):
        assert value(pulled, "blobstore_pull_bytes_total", tier=tier) == outcome.from_tier[tier]
    assert outcome.from_tier["peer"] > 0
    assert value(pulled, "blobstore_pull_chunk_seconds_count", tier="peer") > 0

    # The daemons' side: they served at least what the pull took from peers, and read
    # each unique byte from the object store once (the homes' read-throughs).
    served = sum(value(f, "blobstore_peer_bytes_served_total") for f in found)
    assert served >= outcome.from_tier["peer"]
    origin = sum(value(f, "blobstore_peer_origin_bytes_total") for f in found)
    assert origin == await _unique_bytes(store, "apps/m")
    read_through = sum(
        value(f, "blobstore_peer_request_seconds_count", tier="origin") for f in found
    )
    assert read_through == sum(value(f, "blobstore_peer_origin_fetches_total") for f in found)

    for f in found:
        assert f["blobstore_peer_request_seconds"].type == "histogram"
        for tier in ("local", "origin", "missing"):  # +Inf bucket == count, per tier
            count = value(f, "blobstore_peer_request_seconds_count", tier=tier)
            inf = value(f, "blobstore_peer_request_seconds_bucket", tier=tier, le="+Inf")
            assert inf == count
        assert value(f, "blobstore_peer_peers_by_state", state="up") == 1
        assert value(f, "blobstore_peer_connections") >= 0
        assert value(f, "blobstore_peer_in_flight") == 0
        assert value(f, "blobstore_cache_capacity_bytes") == CacheConfig(tmp_path).max_bytes
        assert value(f, "blobstore_cache_evicted_bytes_total") == 0
        assert value(f, "process_resident_memory_bytes") > 0
        assert value(f, "process_cpu_seconds_total") > 0
        family = family_of(f, "blobstore_build_info")
        assert family is not None
        build = f[family].samples[0]
        assert build.name == "blobstore_build_info"
        assert build.labels["version"]
        # the registry of pulls run in the daemon's process is the same one
        assert value(f, "blobstore_pull_bytes_total", tier="origin") == 0
    assert sum(value(f, "blobstore_cache_used_bytes") for f in found) >= origin

    content_type, text = negotiated
    assert content_type.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")
    strict = {f.name: f for f in openmetrics_families(text)}  # type: ignore[no-untyped-call]
    assert strict["blobstore_peer_bytes_served"].type == "counter"


def _text(registry: CollectorRegistry) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


async def test_a_pull_in_the_daemon_process_feeds_the_daemons_registry(
    pushed: tuple[str, Path], tmp_path: Path
) -> None:
    """What the daemon wires (Metrics.include_node): its node store's gauges and the
    pulls of its process on one registry; nothing once it is undone."""
    store, _ = pushed
    metrics = Metrics()
    async with Client.open(_config(store, tmp_path / "node"), peers=False) as client:
        undo = metrics.include_node(client.cache)
        try:
            first = await client.pull("apps/m", tmp_path / "o1", link_mode="copy")
            second = await client.pull("apps/m", tmp_path / "o2", link_mode="copy")
            found = families(await anyio.to_thread.run_sync(metrics.render))
            used = client.cache.used_bytes
        finally:
            undo()
        await client.pull("apps/m", tmp_path / "o3", link_mode="copy")  # not counted
    assert first.from_tier["origin"] == first.bytes > 0
    assert second.from_tier["local"] == second.bytes
    for tier in ("local", "origin"):
        want = first.from_tier.get(tier, 0) + second.from_tier.get(tier, 0)
        assert value(found, "blobstore_pull_bytes_total", tier=tier) == want
    assert value(found, "blobstore_pulls_total") == 2
    assert value(found, "blobstore_pull_seconds_count") == 2
    assert value(found, "blobstore_pull_chunk_seconds_count", tier="origin") > 0
    assert value(found, "blobstore_cache_used_bytes") == used > 0
    after = families(await anyio.to_thread.run_sync(metrics.render))
    assert "blobstore_cache_used_bytes" not in after  # the node store collector is gone
    assert value(after, "blobstore_pulls_total") == 2


class _Down:
    """A tier that cannot be reached."""

    name = "peer"

    async def get(self, chunk_id: ChunkId) -> ChunkData:
        raise Unavailable("peer down")

    async def has(self, chunk_ids: object) -> set[ChunkId]:
        return set()

    async def fetch(self, refs: list[ChunkRef], sink: Sink) -> list[ChunkRef]:
        raise Unavailable("peer down")


class _Holds:
    name = "origin"

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def get(self, chunk_id: ChunkId) -> ChunkData:
        return self.data

    async def has(self, chunk_ids: object) -> set[ChunkId]:
        return set()

    async def fetch(self, refs: list[ChunkRef], sink: Sink) -> list[ChunkRef]:
        for ref in refs:
            await sink(ref, self.data)
        return []


async def test_a_tier_that_fails_is_counted_and_the_next_delivers() -> None:
    data = b"chunk bytes"
    chunk_id = hash_bytes(data)
    registry = CollectorRegistry()
    blobstore_metrics.enable(registry)
    try:
        tiers = TieredSource([_Down(), _Holds(data)])  # type: ignore[list-item]
        assert await tiers.get(chunk_id) == data

        async def drop(ref: ChunkRef, chunk: ChunkData) -> None:
            pass

        await tiers.fetch([ChunkRef(chunk_id, len(data))], drop)
    finally:
        blobstore_metrics.disable()
    found = families(_text(registry))
    assert value(found, "blobstore_pull_tier_errors_total", tier="peer", reason="unavailable") == 2
    assert value(found, "blobstore_pull_bytes_total", tier="origin") == 2 * len(data)
    assert value(found, "blobstore_pull_chunk_seconds_count", tier="origin") == 2


METRIC = re.compile(r"\b((?:blobstore|process|python)_[a-z_]+)\b")


def _dashboard_queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["title"]
    assert doc["uid"]
    assert doc["schemaVersion"] >= 36
    panels = [p for row in doc["panels"] for p in [row, *row.get("panels", [])]]
    assert len({p["id"] for p in panels}) == len(panels)
    taken: set[tuple[int, int]] = set()  # grid cells: panels must not overlap
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells
    queries = []
    for panel in panels:
        if panel.get("type") == "row":
            continue
        targets = panel.get("targets", [])
        assert targets, f"panel {panel.get('title')!r} has no query"
        assert panel["datasource"]["uid"] == "${datasource}"
        queries += [t["expr"] for t in targets]
    return queries


async def test_the_dashboard_and_alerts_query_only_metrics_a_live_daemon_exposes(
    pushed: tuple[str, Path], tmp_path: Path
) -> None:
    store, _ = pushed
    with cluster(store, tmp_path, 1) as (d,):
        text = scrape(d)[1]
    found = families(text)
    promtool = _promtool()
    if promtool is not None:  # Prometheus's own lint of the exposition: names, units, help
        lint = await anyio.run_process(
            [promtool, "check", "metrics"], input=text.encode(), check=False
        )
        assert lint.returncode == 0, (lint.stdout + lint.stderr).decode()
    queries = _dashboard_queries()
    for name in METRIC.findall(ALERTS.read_text()):  # the alerts read real series too
        assert family_of(found, name) is not None, f"{name} (in {ALERTS.name}) is not scraped"
    shown: set[str] = set()
    for query in queries:
        names = METRIC.findall(query)
        assert names, query
        for name in names:
            family = family_of(found, name)
            assert family is not None, f"{name} (in {query}) is not in a live scrape"
            shown.add(family)
    ours = {name for name in found if name.startswith("blobstore_")}
    assert ours - shown == set(), "metrics the dashboard does not show"


def _promtool() -> str | None:
    """Debian's ``prometheus`` package's promtool; CI installs it (.ci/run)."""
    found = shutil.which("promtool")
    if found is None and os.environ.get("CI"):
        pytest.fail("promtool is missing in CI (apt-get install prometheus)")
    return found


def test_the_alert_rules_load_and_fire_on_their_unit_tests() -> None:
    promtool = _promtool()
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    for command, path in (("check", ALERTS), ("test", ALERT_TESTS)):
        done = subprocess.run(
            [promtool, command, "rules", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
