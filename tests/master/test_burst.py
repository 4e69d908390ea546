"""The burst property (PR 2143): N requests decided before any worker confirms one must still spread
evenly over equal instances, because the ledger counts each assignment the instant it is made."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protocol.ids import InstanceId
from tests.master.cluster import (
    ALL_KINDS,
    accept,
    burst,
    cluster,
    finish,
    instance_of,
    per_instance,
    placement_of,
    submit,
)

bursts = st.integers(1, 512)
instance_counts = st.integers(1, 16)


@settings(max_examples=60, derandomize=True)
@given(n=bursts, k=instance_counts)
@example(n=512, k=16)
@example(n=511, k=16)
@example(n=1, k=16)
def test_least_loaded_splits_an_unconfirmed_burst_evenly(n: int, k: int) -> None:
    core = cluster(k)
    counts = per_instance(burst(core, n))
    assert max(counts.values()) == math.ceil(n / k)
    assert min(counts.get(instance_of(i), 0) for i in range(k)) == n // k
    core.check_invariants()


@pytest.mark.parametrize("policy", ["least-work", "least-loaded", "round-robin"])
def test_every_prefix_of_every_burst_up_to_512_on_up_to_16_instances_is_even(policy: str) -> None:
    """Exhaustive over the whole (N, k) range: placements are sequential, so checking after each one
    of a 512-request burst covers every N for that k."""
    for k in range(1, 17):
        core = cluster(k, policy=policy)
        counts: Counter[InstanceId] = Counter()
        highest = 0
        for n, p in enumerate(burst(core, 512), start=1):
            counts[p.instance_id] += 1
            highest = max(highest, counts[p.instance_id])
            assert highest == math.ceil(n / k), (policy, k, n)


@settings(max_examples=30, derandomize=True)
@given(n=bursts, k=instance_counts)
def test_state_only_reproduces_the_bug_whole_burst_on_the_first_instance(n: int, k: int) -> None:
    core = cluster(k, policy="state-only")
    counts = per_instance(burst(core, n))
    assert counts == {instance_of(0): n}


@settings(max_examples=30, derandomize=True)
@given(n=bursts, k=instance_counts)
def test_round_robin_splits_an_unconfirmed_burst_evenly(n: int, k: int) -> None:
    counts = per_instance(burst(cluster(k, policy="round-robin"), n))
    assert max(counts.values()) == math.ceil(n / k)


@settings(max_examples=30, derandomize=True)
@given(n=bursts, seed=st.integers(0, 2**32 - 1))
def test_power_of_two_with_two_instances_splits_a_burst_evenly(n: int, seed: int) -> None:
    counts = per_instance(burst(cluster(2, policy="power-of-two", seed=seed), n))
    assert max(counts.values()) == math.ceil(n / 2)


@settings(max_examples=30, derandomize=True)
@given(n=bursts, k=st.integers(3, 16), seed=st.integers(0, 2**32 - 1))
def test_power_of_two_with_more_instances_stays_within_a_few_tasks_of_even(n: int, k: int, seed: int) -> None:
    # Two random choices do not guarantee ceil(N/k) once k > 2: the excess over the mean is
    # O(log log k) with high probability (at most 3 in 400 trials up to k = 16, N = 256).
    counts = per_instance(burst(cluster(k, policy="power-of-two", seed=seed), n))
    assert max(counts.values()) <= math.ceil(n / k) + 3


def test_power_of_two_is_not_exactly_even_for_more_than_two_instances() -> None:
    """Documents the limit above: some seed puts a second task on an instance while another is idle."""
    uneven = 0
    for seed in range(20):
        counts = per_instance(burst(cluster(3, policy="power-of-two", seed=seed), 3))
        uneven += max(counts.values()) > 1
    assert uneven > 0


@settings(max_examples=20, derandomize=True)
@given(n=st.integers(1, 200), k=instance_counts, seed=st.integers(0, 2**32 - 1))
def test_random_policy_is_deterministic_for_a_seed(n: int, k: int, seed: int) -> None:
    first = [p.instance_id for p in burst(cluster(k, policy="random", seed=seed), n)]
    again = [p.instance_id for p in burst(cluster(k, policy="random", seed=seed), n)]
    assert first == again


def test_random_policy_differs_between_seeds() -> None:
    runs = {tuple(p.instance_id for p in burst(cluster(8, policy="random", seed=s), 64)) for s in range(4)}
    assert len(runs) == 4


@settings(max_examples=40, derandomize=True)
@given(first=bursts, second=bursts, k=instance_counts)
def test_after_a_finished_burst_the_next_burst_is_balanced_again(first: int, second: int, k: int) -> None:
    core = cluster(k)
    placed = burst(core, first, prefix="a")
    for p in placed:
        accept(core, p, now=1.0)
    for p in placed:
        finish(core, p, now=2.0)
    assert all(core.load(inst) == 0 for inst in core.state.instances.values())
    counts = per_instance(burst(core, second, prefix="b", now=3.0))
    assert max(counts.values()) == math.ceil(second / k)
    core.check_invariants()


@settings(max_examples=40, derandomize=True)
@given(first=bursts, second=bursts, k=instance_counts)
def test_confirmed_and_pending_tasks_weigh_the_same(first: int, second: int, k: int) -> None:
    core = cluster(k)
    for p in burst(core, first, prefix="a"):
        accept(core, p, now=1.0)  # the first burst is now counted by the state, not the ledger
    burst(core, second, prefix="b", now=2.0)
    assert max(core.load(inst) for inst in core.state.instances.values()) == math.ceil((first + second) / k)
    core.check_invariants()


@settings(max_examples=40, derandomize=True)
@given(n=st.integers(1, 40), k=instance_counts, rounds=st.integers(2, 6))
def test_ties_rotate_across_bursts_so_totals_stay_even(n: int, k: int, rounds: int) -> None:
    """Bursts of n that each finish before the next: the instances skipped by one burst go first
    in the next, so over all rounds no instance gets more than one task above any other.

    Without prefix affinity: every request here is the same chat, and affinity would rightly send
    it back to where it is cached (within a burst it never costs balance: see test_affinity)."""
    core = cluster(k, prefix_affinity=False)
    total = per_instance([])
    for r in range(rounds):
        placed = burst(core, n, prefix=f"r{r}-", now=float(r))
        total.update(per_instance(placed))
        for p in placed:
            accept(core, p, now=float(r))
            finish(core, p, now=float(r))
    counts = [total.get(instance_of(i), 0) for i in range(k)]
    assert max(counts) - min(counts) <= 1


def test_ties_rotate_instead_of_favouring_list_order() -> None:
    core = cluster(5, prefix_affinity=False)  # the same chat each time: affinity would keep it home
    visited = []
    for i in range(10):  # one request at a time, each finished before the next: always a 5-way tie
        p = placement_of(submit(core, f"t{i}", now=float(i)))
        assert p is not None and p.load_before == 0
        visited.append(p.instance_id)
        accept(core, p, now=float(i))
        finish(core, p, now=float(i))
    assert visited[:5] == visited[5:]
    assert sorted(visited[:5]) == [instance_of(i) for i in range(5)]


@settings(max_examples=40, derandomize=True)
@given(n=bursts, k=instance_counts)
def test_every_task_kind_shares_one_balanced_path(n: int, k: int) -> None:
    core = cluster(k)
    placements = burst(core, n, kinds=ALL_KINDS)
    assert {p.instance_id for p in placements} <= {instance_of(i) for i in range(k)}
    assert max(per_instance(placements).values()) == math.ceil(n / k)
    kinds = {core.book.live[p.task_id].kind for p in placements}
    assert kinds == set(ALL_KINDS[: min(n, 3)])
    core.check_invariants()


def test_load_before_reports_what_the_policy_saw() -> None:
    core = cluster(2)
    assert [p.load_before for p in burst(core, 6)] == [0, 0, 1, 1, 2, 2]
