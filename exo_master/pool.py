"""Candidate index for one (model, task kind): the instances a request of that kind may go to.

It keeps the eligible instances (live node, subscribed, status ready, kind supported) in
registration order for the scanning policies, and a lazily invalidated min-heap keyed on the
projected completion score `(load + 1) / capacity` for least-loaded, so that the default decision
costs O(log k) instead of a scan of all k instances. An instance's heap entry carries a stamp; any
change to the instance bumps the stamp and pushes a fresh entry, which makes older entries stale.
Among equal scores the entry with the older stamp wins: the instance that has waited longest at
that load goes first, a rotation that never favours list order.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from exo_master.state import InstanceView
from protocol.ids import InstanceId

HeapEntry = tuple[float, int, InstanceId]


class InstancePool:
    def __init__(self) -> None:
        self.members: dict[InstanceId, InstanceView] = {}
        self.cursor = 0  # for round-robin
        self._heap: list[HeapEntry] = []
        self._stamps: dict[InstanceId, int] = {}
        self._clock = 0

    def __len__(self) -> int:
        return len(self.members)

    def update(self, inst: InstanceView, eligible: bool, load: int) -> None:
        """Record an instance's current eligibility and load (confirmed + pending)."""
        iid = inst.instance_id
        self._clock += 1
        if not eligible:
            if self.members.pop(iid, None) is not None:
                del self._stamps[iid]
            return
        self.members[iid] = inst
        self._stamps[iid] = self._clock
        if load < inst.max_concurrency:
            heapq.heappush(self._heap, ((load + 1) / inst.capacity, self._clock, iid))
        if len(self._heap) > 4 * len(self.members) + 64:
            self._compact()

    def pop_best(self, exclude: frozenset[InstanceId] = frozenset()) -> InstanceView | None:
        """Remove and return the instance with the lowest projected score that has a free slot.

        The caller must `update` the returned instance afterwards (its load changed).
        """
        skipped: list[HeapEntry] = []
        found: InstanceView | None = None
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

    def ordered(self) -> Iterator[InstanceView]:
        return iter(self.members.values())

    def _compact(self) -> None:
        self._heap = [e for e in self._heap if self._stamps.get(e[2]) == e[1]]
        heapq.heapify(self._heap)
