"""Bounded FIFO wait queues at the master, one per (model, task kind).

A request waits here when every candidate instance is at max_concurrency; it is bound to an
instance only when a slot frees (late binding), so it goes to whichever instance frees first
instead of being committed early to one that may stay busy.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict

from protocol.ids import ModelId, TaskId
from protocol.messages import TaskKind

QueueKey = tuple[ModelId, TaskKind]


class WaitQueues:
    def __init__(self, limit: int) -> None:
        assert limit >= 0
        self.limit = limit
        self._queues: dict[QueueKey, OrderedDict[TaskId, int]] = {}
        self.waiting: dict[TaskId, QueueKey] = {}  # every waiting task -> its queue (read-only outside)

    def __len__(self) -> int:
        return len(self.waiting)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self.waiting

    def depth(self, key: QueueKey) -> int:
        q = self._queues.get(key)
        return len(q) if q else 0

    def depth_for_model(self, model: ModelId) -> int:
        return sum(len(q) for (m, _), q in self._queues.items() if m == model)

    def queue_keys(self) -> list[QueueKey]:
        return list(self._queues)

    def keys_of(self, model: ModelId) -> list[QueueKey]:
        return [key for key in self._queues if key[0] == model]

    def push(self, key: QueueKey, task_id: TaskId, admission: int) -> int | None:
        """Append; return the 1-based position, or None when the queue is full.

        `admission` is the request's admission number (increasing), so a queue is ordered by age."""
        q = self._queues.setdefault(key, OrderedDict())
        if len(q) >= self.limit:
            if not q:
                del self._queues[key]
            return None
        q[task_id] = admission
        self.waiting[task_id] = key
        return len(q)

    def requeue(self, key: QueueKey, task_id: TaskId, admission: int) -> None:
        """Put back a task that lost its instance, in line by age (it usually goes first); ignores
        the bound, since the request was already admitted. O(queue) on this rare path."""
        q = self._queues.setdefault(key, OrderedDict())
        self.waiting[task_id] = key
        if not q or admission > next(reversed(q.values())):
            q[task_id] = admission
            return
        entries = list(q.items())
        at = bisect.bisect_left([n for _, n in entries], admission)
        entries.insert(at, (task_id, admission))
        self._queues[key] = OrderedDict(entries)

    def peek(self, key: QueueKey) -> tuple[TaskId, int] | None:
        q = self._queues.get(key)
        if not q:
            return None
        return next(iter(q.items()))

    def remove(self, task_id: TaskId) -> int | None:
        """Remove a task wherever it waits; return when it was enqueued."""
        key = self.waiting.pop(task_id, None)
        if key is None:
            return None
        q = self._queues[key]
        enqueued_at = q.pop(task_id)
        if not q:
            del self._queues[key]
        return enqueued_at

    def tasks(self, key: QueueKey) -> list[TaskId]:
        return list(self._queues.get(key, ()))
