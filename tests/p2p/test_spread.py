"""Chunks served by their servers, not only their homes (placement.servers): the
simulated region (bench/sim_region.py, the real peer code on a virtual clock) and
the upload balance at real granularity.

Figures are simulated bytes and seconds, the same on every run: asserting them is
asserting what the code decides, not how fast it runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from sim_region import SCENARIOS, Result, model_set, simulate, upload_figures

from p2p import placement

REFS = model_set(192 << 20, 8 << 20, seed=3)
UNIQUE = sum(r.size for r in REFS)
NODES = 40  # more than placement.SPREAD: chunks have servers


def run(key: str, **options: Any) -> Result:  # simulate's overrides
    result = simulate(SCENARIOS[key](NODES), REFS, max_time=120.0, **options)
    assert result.incomplete == 0, "a node did not finish its pull"
    assert result.bad == 0, "a node took bytes that were not the chunk's"
    return result


def balance(result: Result) -> float:
    return max(result.uploads) / (sum(result.uploads) / len(result.uploads))


def test_servers_share_the_upload_and_the_store_is_read_once() -> None:
    spread = run("a")
    homes_only = run("a", spread=1)
    assert spread.origin == homes_only.origin == UNIQUE
    # 24 units over 40 nodes: a home uploads its units to every node; 16 servers
    # per unit share them (simulated: 5.00 -> 2.04).
    assert balance(spread) < balance(homes_only) / 2


def test_killed_servers_and_homes_cost_no_store_reads() -> None:
    # A server whose home died asks the next-ranked peers (one of them is home now),
    # never the store; a requester whose server died asks the next one, then the home.
    assert run("c").origin <= 1.05 * UNIQUE


@pytest.mark.parametrize("nodes", [40, 100])
def test_upload_balance_at_real_granularity(nodes: int) -> None:
    # 20 GiB of ~1 MiB chunks, 32 per home block. At 1,000 nodes (bench/sim_region.py,
    # 25 s): 6.3-9.4 with homes only, 1.19-1.22 with 16 servers per chunk (3 seeds).
    homes_only = upload_figures(nodes, 20480, seed=5, spread=1)["upload_max_mean"]
    spread = upload_figures(nodes, 20480, seed=5)["upload_max_mean"]
    assert placement.spreads(nodes)
    assert spread <= 1.25 < homes_only
