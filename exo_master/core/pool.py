"""Candidate index for one (model, task kind): the instances a request of that kind may go to.

It keeps the eligible instances in registration order for the scanning policies, and a lazily
invalidated min-heap keyed on the projected completion score for least-loaded, so that the default
decision costs O(log k) instead of a scan of all k instances. An instance's heap entry carries a
stamp; any update bumps the stamp and pushes a fresh entry, which makes older entries stale. The
core updates an instance only when its load or eligibility changed (a heartbeat that restates the
same instance pushes nothing), so the heap does not grow with heartbeat volume. Among equal scores
the entry with the older stamp wins: the instance that has waited longest at that load goes first,
a rotation that never favours list order.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from exo_master.core.records import InstanceRecord
from protocol.ids import InstanceId

HeapEntry = tuple[float, int, InstanceId]


def score(load: int, capacity: float) -> float:
    """Projected completion if one more task is added. Greedy on (load + 1) / capacity is the
    earliest-finish rule, which splits equal tasks optimally across unequal instances."""
    return (load + 1) / capacity


class InstancePool:
    def __init__(self) -> None:
        self.members: dict[InstanceId, InstanceRecord] = {}
        self.cursor = 0  # for round-robin
        self._heap: list[HeapEntry] = []
        self._stamps: dict[InstanceId, int] = {}
        self._clock = 0

    def __len__(self) -> int:
        return len(self.members)

    def update(self, inst: InstanceRecord, eligible: bool, load: int) -> None:
        """Record an instance's current eligibility and load (confirmed + pending)."""
        iid = inst.instance_id
        if not eligible:
            if self.members.pop(iid, None) is not None:
                del self._stamps[iid]
            return
        self._clock += 1
        self.members[iid] = inst
        self._stamps[iid] = self._clock
        if load < inst.max_concurrency:  # a full instance has no entry: it is not offered
            heapq.heappush(self._heap, (score(load, inst.capacity), self._clock, iid))
        if len(self._heap) > 4 * len(self.members) + 64:
            self._compact()

    def pop_best(self, exclude: frozenset[InstanceId] = frozenset()) -> InstanceRecord | None:
        """Remove and return the instance with the lowest projected score that has a free slot.

        The caller must change the returned instance's load and `update` it (its entry is gone).
        """
        skipped: list[HeapEntry] = []
        found: InstanceRecord | None = None
        while self._heap:
            entry = heapq.heappop(self._heap)
            _, stamp, iid = entry
            if self._stamps.get(iid) != stamp:
                continue  # stale
            if iid in exclude:
                skipped.append(entry)
                continue
            found = self.members[iid]
            break
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return found

    def stamp(self, iid: InstanceId) -> int:
        """When the member was last updated: older first is the rotation among equals."""
        return self._stamps[iid]

    def ordered(self) -> Iterator[InstanceRecord]:
        return iter(self.members.values())

    def offered(self) -> dict[InstanceId, float]:
        """Each member's live heap score (members that are full have none): for checks and tests."""
        return {iid: s for s, stamp, iid in self._heap if self._stamps.get(iid) == stamp}

    def _compact(self) -> None:
        self._heap = [e for e in self._heap if self._stamps.get(e[2]) == e[1]]
        heapq.heapify(self._heap)
