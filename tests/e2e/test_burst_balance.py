"""The original report, end to end: a burst of concurrent chat completions over equal instances."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter

import pytest

from tests.e2e.conftest import ClusterFactory
from tests.support.loadgen import burst, burst_responses, spread

pytestmark = pytest.mark.e2e


def test_16_over_2_instances_split_8_8_in_repeated_rounds(start_cluster: ClusterFactory) -> None:
    cluster = start_cluster(workers=2, sim_tokens_per_s=20)
    for _ in range(3):
        assert spread(asyncio.run(burst(cluster.api_url, 16))) == [8, 8]


def test_64_over_4_instances_split_16_each(start_cluster: ClusterFactory) -> None:
    cluster = start_cluster(workers=4, sim_tokens_per_s=20, max_concurrency=32)
    instances = asyncio.run(burst(cluster.api_url, 64))
    assert spread(instances) == [16, 16, 16, 16]
    assert len(set(instances)) == 4


def test_bursts_from_two_client_processes_at_once_stay_balanced(start_cluster: ClusterFactory) -> None:
    cluster = start_cluster(workers=2, sim_tokens_per_s=20)
    clients = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.support.loadgen", cluster.api_url, "8"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outputs = [client.communicate(timeout=60)[0] for client in clients]
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
    assert all(client.returncode == 0 for client in clients)
    instances = [i for out in outputs for i in json.loads(out)]
    assert sorted(Counter(instances).values()) == [8, 8]


def test_state_only_policy_reproduces_the_pile_up(start_cluster: ClusterFactory) -> None:
    # Workers confirm after a simulated delay, as the original master's event loop did: every
    # decision in the burst then sees node1=0, node2=0 and ties go to the first instance.
    cluster = start_cluster(
        workers=2, sim_tokens_per_s=20, policy="state-only", worker_args=["--sim-accept-delay", "0.5"]
    )
    counts = spread(asyncio.run(burst(cluster.api_url, 16)))
    assert counts[0] >= 14, counts


def test_least_loaded_stays_balanced_with_the_same_confirmation_delay(start_cluster: ClusterFactory) -> None:
    cluster = start_cluster(workers=2, sim_tokens_per_s=20, worker_args=["--sim-accept-delay", "0.5"])
    assert spread(asyncio.run(burst(cluster.api_url, 16))) == [8, 8]


def test_a_burst_sharing_a_held_prefix_still_splits_evenly(start_cluster: ClusterFactory) -> None:
    # One chat first, so one instance holds the conversation; then 16 follow-ups of that chat at
    # once. Prefix affinity wants them all on the holder; it may only break ties, so 8/8.
    cluster = start_cluster(workers=2, sim_tokens_per_s=20)
    chat = [{"role": "system", "content": "shared context " * 20}, {"role": "user", "content": "hi"}]
    first = asyncio.run(
        burst_responses(cluster.api_url, 1, {"model": "sim-model", "messages": chat, "max_tokens": 4})
    )[0]
    reply = first.json()["choices"][0]["message"]["content"]
    follow_up = [*chat, {"role": "assistant", "content": reply}, {"role": "user", "content": "more"}]
    body = {"model": "sim-model", "messages": follow_up, "max_tokens": 40}
    responses = asyncio.run(burst_responses(cluster.api_url, 16, body))
    assert spread([r.headers["x-exo-instance"] for r in responses]) == [8, 8]
    state = cluster.state()
    assert state is not None and state["prefix_affinity"] and state["affinity_lookups"] >= 16
