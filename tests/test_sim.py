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
    assert run("b", 16, handoff=False).origin > 2 * UNIQUE  # what it did before


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


@pytest.mark.parametrize("nodes", [10, 100])
def test_placement_spreads_homes_and_a_leaving_node_moves_its_own(nodes: int) -> None:
    figures = placement_figures(nodes, 20000, seed=5)
    assert figures["moved_times_n"] <= 1.5
    assert figures["home_max_mean"] <= 1.3
