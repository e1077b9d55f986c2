"""Load (issue 9): one coordinator process, many agents on loopback, every agent in every round.

The agents are light agents (tests/load_harness.py: the real agent code with numpy training)
in threads of the test process; the coordinator is a real ``fedwarden serve`` process with a
84-weight model. Default: 50 agents for 5 rounds. ``FEDWARDEN_HEAVY=1``: 200 agents for 20
rounds (the figures in RELIABILITY.md; ``-s`` prints them).
"""

from __future__ import annotations

import json
import os

import pytest

from tests.load_harness import run_load

HEAVY = os.environ.get("FEDWARDEN_HEAVY") == "1"


@pytest.mark.integration
@pytest.mark.parametrize(
    "agents, rounds",
    [
        pytest.param(50, 5, id="50-agents"),
        pytest.param(
            200,
            20,
            id="200-agents",
            marks=pytest.mark.skipif(not HEAVY, reason="set FEDWARDEN_HEAVY=1"),
        ),
    ],
)
def test_one_coordinator_serves_every_agent_every_round(tmp_path, agents, rounds):
    figures = run_load(tmp_path, agents, rounds)
    print(json.dumps(figures, indent=2))
    assert figures["rounds"] == list(range(1, rounds + 1))  # each round once, none lost
    assert figures["admitted"] == [agents] * rounds
    assert figures["coordinator_exit"] == 0
    assert figures["agents_exit_0"] == agents, figures["agent_problems"]
    assert figures["connections_held_max"] == agents  # one connection per agent, all held
    assert figures["accuracy"] >= 0.8
    rss = figures["coordinator_rss_mb"]
    assert rss["end"] - rss["after_round_1"] < 50, rss  # memory stays bounded across rounds
    assert figures["round_latency_s"]["p99"] < 30
