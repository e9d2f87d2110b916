"""bench/sim_region.py: the real peer code (directory, peer tier, provider, placement)
on a simulated network and a virtual clock, small enough for the suite.

Figures are in simulated seconds and exact byte counts, the same on every run and
machine: asserting them is asserting what the code decides, not how fast it runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from p2p import liveness

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from sim_region import SCENARIOS, Result, Scenario, model_set, placement_figures, simulate

REFS = model_set(192 << 20, 8 << 20, seed=3)
UNIQUE = sum(r.size for r in REFS)


def run(key: str, nodes: int, **options: Any) -> Result:  # simulate's overrides
    result = simulate(SCENARIOS[key](nodes), REFS, max_time=120.0, **options)
    assert result.incomplete == 0, "a node did not finish its pull"
    assert result.bad == 0, "a node took bytes that were not the chunk's"
    return result


def test_a_herd_reads_each_chunk_from_the_store_once() -> None:
    result = run("a", 16)
    assert result.origin == UNIQUE
    assert len(result.times) == 16


def test_a_rolling_start_reads_from_the_store_once() -> None:
    # Each joining home reads through its next-ranked peers (HandoffSource) first.
    assert run("b", 16).origin <= 1.05 * UNIQUE
    # What it did before, where homes move under pulls: nodes now see a joiner at once
    # (it names itself in its pings, peers name it in their pongs), so at 50 nodes a
    # second the region is whole before the first pull; at one a second it is not.
    slow = Scenario("b", "rolling start 1/s", 16, start_rate=1.0)
    assert simulate(slow, REFS, max_time=120.0).origin <= 1.05 * UNIQUE
    assert simulate(slow, REFS, max_time=120.0, handoff=False).origin > 2 * UNIQUE


def test_a_server_whose_view_lags_does_not_read_the_store() -> None:
    # In a rolling start some nodes do not see the joiners yet; asked as one of a
    # chunk's servers, such a node took itself for the home and read the store too
    # (40 nodes at 50/s: 1.08x). Asks now say "as a server", and it answers missing.
    assert run("b", 40).origin == UNIQUE


def test_killed_peers_are_dropped_fast_and_every_node_completes() -> None:
    result = run("c", 20)
    # The killed homes' share (10%) is read once more by the new homes, and a home
    # whose hand-off asked a killed peer reads the store after 2 s (HandoffSource).
    assert result.origin <= 1.2 * UNIQUE
    assert result.dead_dropped, "no node noticed the killed peers"
    interval, timeout = 1.0, 3.0
    assert max(result.dead_dropped) <= interval + timeout + 0.5


def test_lying_homes_cost_no_bad_bytes_and_slow_ones_no_store_reads() -> None:
    run("d", 12)  # a liar's chunks come from elsewhere (docs/scale.md: at a store cost)
    slow = simulate(Scenario("d", "slow homes", 12, slow_homes=2), REFS, max_time=120.0)
    assert slow.incomplete == 0
    assert slow.origin <= 1.05 * UNIQUE


def test_split_halves_each_read_the_set_once() -> None:
    assert run("e", 12).origin == 2 * UNIQUE


def test_gossip_from_one_seed_finds_the_region() -> None:
    result = run("f", 16)
    assert result.origin <= 1.1 * UNIQUE


def test_liveness_costs_each_daemon_the_same_whatever_the_region_size() -> None:
    # Idle peers are probed a few an interval, not all of them: pings (and the gossip
    # they carry) per daemon stay flat as the region grows, and so do its connections.
    small, large = run("a", 12), run("a", 48)
    assert large.extra["pings_per_node_s"] <= 1.5 * small.extra["pings_per_node_s"]
    assert large.extra["pings_per_node_s"] <= 2 * liveness.Timing().probes_per_interval
    # A pong names at most GOSSIP_SAMPLE peers: ~1 KiB, whatever the region's size.
    assert large.gossip_rate / large.extra["pings_per_node_s"] <= 2048
    assert large.extra["max_pool"] <= liveness.MAX_CONNECTIONS


def test_a_death_is_news_to_every_node_within_seconds() -> None:
    # Nodes not asking a killed peer hear of it from those that were (news on pings and
    # pongs) instead of each finding out with a check of its own.
    result = run("c", 40)
    assert len(result.dead_dropped) >= 40 - 4  # every node that saw them up dropped them
    assert max(result.dead_asked) <= 5.0


@pytest.mark.parametrize("nodes", [10, 100])
def test_placement_spreads_homes_and_a_leaving_node_moves_its_own(nodes: int) -> None:
    # (placement_figures checks, by re-ranking, that a node leaving moves its own homes.)
    figures = placement_figures(nodes, 20000, seed=5)
    assert figures["moved_times_n"] == pytest.approx(1.0)  # over every node leaving
    assert figures["moved_worst_times_n"] == figures["home_max_mean"] <= 1.3
