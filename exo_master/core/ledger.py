"""The pending-assignment ledger: assignments made but not yet confirmed by their worker.

This is the fix for the burst pile-up. The master's state only learns of a task when the worker's
TaskAccepted arrives; until then every concurrent decision would see the same stale loads. The
ledger counts each assignment the instant it is made (Kubernetes' "assumed pod"): an entry lives
from the decision until the worker confirms it (then the state counts it), or it is cancelled,
finishes, fails, its instance is lost, or its TTL runs out (then the core re-places the task).

Pure: time is passed in. Every operation is O(1) except `expire` (O(expired entries)) and
`drop_instance` (O(entries of that instance)).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from protocol.ids import InstanceId, TaskId


@dataclass(frozen=True, slots=True)
class Reservation:
    task_id: TaskId
    instance_id: InstanceId
    reserved_at: float
    expires_at: float


@dataclass(slots=True)
class LedgerStats:
    reserved: int = 0
    confirmed: int = 0
    released: int = 0
    expired: int = 0


class PendingLedger:
    def __init__(self, ttl: float = 5.0) -> None:
        assert ttl > 0, "a ledger TTL must be positive"
        self.ttl = ttl
        # Insertion order is expiry order because the TTL is the same for every entry.
        self._by_task: OrderedDict[TaskId, Reservation] = OrderedDict()
        self._by_instance: dict[InstanceId, set[TaskId]] = {}
        self.stats = LedgerStats()

    def __len__(self) -> int:
        return len(self._by_task)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._by_task

    def get(self, task_id: TaskId) -> Reservation | None:
        return self._by_task.get(task_id)

    def pending(self, instance_id: InstanceId) -> int:
        tasks = self._by_instance.get(instance_id)
        return len(tasks) if tasks else 0

    def tasks_on(self, instance_id: InstanceId) -> list[TaskId]:
        return sorted(self._by_instance.get(instance_id, ()))

    def reserve(self, task_id: TaskId, instance_id: InstanceId, now: float) -> Reservation:
        assert task_id not in self._by_task, f"task {task_id} is already reserved"
        entry = Reservation(task_id, instance_id, now, now + self.ttl)
        self._by_task[task_id] = entry
        self._by_instance.setdefault(instance_id, set()).add(task_id)
        self.stats.reserved += 1
        return entry

    def confirm(self, task_id: TaskId) -> Reservation | None:
        """The worker accepted: the state counts the task from now on. Idempotent."""
        entry = self._remove(task_id)
        if entry is not None:
            self.stats.confirmed += 1
        return entry

    def release(self, task_id: TaskId) -> Reservation | None:
        """Cancelled, finished, failed or lost before confirmation. Idempotent."""
        entry = self._remove(task_id)
        if entry is not None:
            self.stats.released += 1
        return entry

    def expire(self, now: float) -> list[Reservation]:
        """Remove and return every entry whose TTL has run out, oldest first."""
        expired: list[Reservation] = []
        while self._by_task:
            entry = next(iter(self._by_task.values()))
            if entry.expires_at > now:
                break
            self._remove(entry.task_id)
            expired.append(entry)
        self.stats.expired += len(expired)
        return expired

    def drop_instance(self, instance_id: InstanceId) -> list[Reservation]:
        """Release every entry on an instance that is gone; return them for re-placement."""
        dropped = [self._by_task[t] for t in self.tasks_on(instance_id)]
        for entry in dropped:
            self.release(entry.task_id)
        return dropped

    def _remove(self, task_id: TaskId) -> Reservation | None:
        entry = self._by_task.pop(task_id, None)
        if entry is None:
            return None
        on_instance = self._by_instance[entry.instance_id]
        on_instance.discard(task_id)
        if not on_instance:
            del self._by_instance[entry.instance_id]
        return entry
