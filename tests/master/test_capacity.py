"""Capacity-aware placement: a burst over unequal instances finishes as early as possible.

The optimum is computed independently of the greedy rule the core uses: the earliest makespan T* is
the smallest T at which the instances can hold N tasks, sum(floor(T * cap_i)) >= N, and an optimal
split gives instance i between ceil(T* cap_i) - 1 and floor(T* cap_i) tasks.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.master.cluster import burst, cluster, instance_of

RATIOS = [(1, 2, 4), (4, 2, 1), (2, 4, 1)]


def optimal_makespan(n: int, caps: list[Fraction]) -> Fraction:
    """Smallest T with sum(floor(T * c)) >= n. T* is always some m / c (an instance's m-th task
    finishing), so search those candidates in order."""
    candidates = sorted({Fraction(m) / c for c in caps for m in range(1, n + 1)})
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(math.floor(candidates[mid] * c) for c in caps) >= n:
            hi = mid
        else:
            lo = mid + 1
    return candidates[lo]


def brute_force_makespan(n: int, caps: list[Fraction]) -> Fraction:
    best: Fraction | None = None
    for split in itertools.product(range(n + 1), repeat=len(caps) - 1):
        last = n - sum(split)
        if last < 0:
            continue
        span = max(Fraction(x) / c for x, c in zip((*split, last), caps, strict=True))
        best = span if best is None or span < best else best
    assert best is not None
    return best


def check_split(counts: list[int], caps: list[Fraction]) -> None:
    n = sum(counts)
    t_star = optimal_makespan(n, caps)
    assert max(Fraction(x) / c for x, c in zip(counts, caps, strict=True)) == t_star, (counts, caps)
    for x, c in zip(counts, caps, strict=True):
        assert math.ceil(t_star * c) - 1 <= x <= math.floor(t_star * c), (counts, caps, t_star)


def test_the_optimum_search_agrees_with_brute_force() -> None:
    for caps in ([1, 2, 4], [1, 1], [1, 3, 5], [2]):
        fcaps = [Fraction(c) for c in caps]
        for n in range(1, 25):
            assert optimal_makespan(n, fcaps) == brute_force_makespan(n, fcaps)


@pytest.mark.parametrize("ratio", RATIOS, ids=lambda r: ":".join(map(str, r)))
def test_every_burst_up_to_200_on_capacities_1_2_4_finishes_at_the_optimum(ratio: tuple[int, ...]) -> None:
    caps = [Fraction(c) for c in ratio]
    core = cluster(len(ratio), capacities=[float(c) for c in ratio])
    counts = [0] * len(ratio)
    index = {instance_of(i): i for i in range(len(ratio))}
    for p in burst(core, 200):  # every prefix of the burst is a burst of its own length
        counts[index[p.instance_id]] += 1
        check_split(counts, caps)
    assert sum(counts) == 200
    core.check_invariants()


def test_a_burst_of_seven_splits_one_two_four() -> None:
    core = cluster(3, capacities=[1.0, 2.0, 4.0])
    placed = [p.instance_id for p in burst(core, 7)]
    assert [placed.count(instance_of(i)) for i in range(3)] == [1, 2, 4]
    assert placed[0] == instance_of(2)  # the fastest instance finishes the first task soonest


@settings(max_examples=60, derandomize=True)
@given(
    ratio=st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0, 4.0]), min_size=1, max_size=6),
    n=st.integers(1, 200),
)
def test_any_capacity_mix_finishes_at_the_optimum(ratio: list[float], n: int) -> None:
    core = cluster(len(ratio), capacities=ratio)
    placed = [p.instance_id for p in burst(core, n)]
    counts = [placed.count(instance_of(i)) for i in range(len(ratio))]
    check_split(counts, [Fraction(c) for c in ratio])
    core.check_invariants()


def test_equal_capacities_scale_out_of_the_score() -> None:
    slow = [p.instance_id for p in burst(cluster(3, capacities=[0.5, 0.5, 0.5]), 30)]
    fast = [p.instance_id for p in burst(cluster(3, capacities=[8.0, 8.0, 8.0]), 30)]
    assert slow == fast
