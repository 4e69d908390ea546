"""Placement policies: given the candidates for a request, pick one instance or none (all full).

One code path for every task kind: the pool already holds only instances that support the kind.
Policies read loads through `LoadView`, so they cannot tell a confirmed task from a pending one
unless they ask (only `state-only`, the reproduced bug, does).

`least-work` (the default) places by work, not by task count: a 4,000-token prompt is not "Hi".
For each instance with a free slot it estimates when this request would get its first token
(`LoadView.first_token_wait`, see work.py); every instance within one short request of the best
estimate is close enough, and among those the least-loaded rule decides (lowest (load + 1) /
capacity, ties to the instance that waited longest). So it never places on an instance whose
estimated wait exceeds the best by more than one short request, and for equal requests on equal
instances (equal estimates) it *is* least-loaded: a burst of N over k puts at most ceil(N/k) on any.
Why not the plain minimum estimate: estimates are a heartbeat old and built from a chars-per-token
guess, so small differences are noise; counting tasks among the close ones keeps decode batches
balanced too.
"""

from __future__ import annotations

import random
from typing import Protocol

from exo_master.core.pool import InstancePool, score
from exo_master.core.records import InstanceRecord
from protocol.ids import InstanceId


class LoadView(Protocol):
    def load(self, inst: InstanceRecord) -> int:
        """Confirmed in-flight (state) + pending (ledger)."""
        ...

    def confirmed(self, inst: InstanceRecord) -> int: ...

    def first_token_wait(self, inst: InstanceRecord, prompt_chars: int) -> float:
        """Estimated seconds until a request with this prompt would get its first token there."""
        ...

    def short_wait(self, inst: InstanceRecord) -> float:
        """One short request's prefill time there: the slack of placement by work."""
        ...


class Policy(Protocol):
    name: str

    def choose(
        self, pool: InstancePool, loads: LoadView, exclude: frozenset[InstanceId], prompt_chars: int = 0
    ) -> InstanceRecord | None: ...


def _has_slot(inst: InstanceRecord, load: int) -> bool:
    return load < inst.max_concurrency


def _free(pool: InstancePool, loads: LoadView, exclude: frozenset[InstanceId]) -> list[InstanceRecord]:
    return [i for i in pool.ordered() if i.instance_id not in exclude and _has_slot(i, loads.load(i))]


class LeastLoaded:
    """Default. Lowest (confirmed + pending + 1) / capacity; ties rotate. O(log k) per decision."""

    name = "least-loaded"

    def choose(
        self, pool: InstancePool, loads: LoadView, exclude: frozenset[InstanceId], prompt_chars: int = 0
    ) -> InstanceRecord | None:
        return pool.pop_best(exclude)


class LeastWork:
    """Default. Least-loaded among the instances whose estimated first-token wait is within one
    short request of the best (see the module docstring). O(k + tasks bound to them) per decision."""

    name = "least-work"

    def choose(
        self, pool: InstancePool, loads: LoadView, exclude: frozenset[InstanceId], prompt_chars: int = 0
    ) -> InstanceRecord | None:
        free = _free(pool, loads, exclude)
        if not free:
            return None
        waits = [loads.first_token_wait(inst, prompt_chars) for inst in free]
        best = min(range(len(free)), key=waits.__getitem__)
        limit = waits[best] + loads.short_wait(free[best])
        close = [inst for inst, wait in zip(free, waits, strict=True) if wait <= limit]
        return min(close, key=lambda i: (score(loads.load(i), i.capacity), pool.stamp(i.instance_id)))


class StateOnly:
    """The original bug, kept as a benchmark baseline: counts only confirmed tasks (ignores the
    ledger), and ties go to the first instance in list order."""

    name = "state-only"

    def choose(
        self, pool: InstancePool, loads: LoadView, exclude: frozenset[InstanceId], prompt_chars: int = 0
    ) -> InstanceRecord | None:
        best: InstanceRecord | None = None
        best_load = 0
        for inst in pool.ordered():
            confirmed = loads.confirmed(inst)
            if inst.instance_id in exclude or not _has_slot(inst, confirmed):
                continue
            if best is None or confirmed < best_load:
                best, best_load = inst, confirmed
        return best


class RoundRobin:
    """Next instance with a free slot after the pool's cursor, ignoring load. O(k) worst case."""

    name = "round-robin"

    def choose(
        self, pool: InstancePool, loads: LoadView, exclude: frozenset[InstanceId], prompt_chars: int = 0
    ) -> InstanceRecord | None:
        members = list(pool.ordered())
        n = len(members)
        for step in range(n):
            i = (pool.cursor + step) % n
            inst = members[i]
            if inst.instance_id not in exclude and _has_slot(inst, loads.load(inst)):
                pool.cursor = i + 1
                return inst
        return None


class RandomChoice:
    """Uniformly random instance with a free slot (seeded)."""

    name = "random"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(
        self, pool: InstancePool, loads: LoadView, exclude: frozenset[InstanceId], prompt_chars: int = 0
    ) -> InstanceRecord | None:
        free = _free(pool, loads, exclude)
        return self._rng.choice(free) if free else None


class PowerOfTwo:
    """Two random instances with free slots, the lower score wins (seeded)."""

    name = "power-of-two"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(
        self, pool: InstancePool, loads: LoadView, exclude: frozenset[InstanceId], prompt_chars: int = 0
    ) -> InstanceRecord | None:
        free = _free(pool, loads, exclude)
        if len(free) <= 1:
            return free[0] if free else None
        a, b = self._rng.sample(free, 2)
        return a if score(loads.load(a), a.capacity) <= score(loads.load(b), b.capacity) else b


POLICY_NAMES = ("least-work", "least-loaded", "state-only", "round-robin", "random", "power-of-two")


def make_policy(name: str, seed: int = 0) -> Policy:
    rng = random.Random(seed)
    match name:
        case "least-work":
            return LeastWork()
        case "least-loaded":
            return LeastLoaded()
        case "state-only":
            return StateOnly()
        case "round-robin":
            return RoundRobin()
        case "random":
            return RandomChoice(rng)
        case "power-of-two":
            return PowerOfTwo(rng)
    raise ValueError(f"unknown placement policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
