"""Bounded FIFO wait queues at the master, one per (model, task kind).

A request waits here when every candidate instance is at max_concurrency; it is bound to an
instance only when a slot frees (late binding), so it goes to whichever instance frees first
instead of being committed early to one that may stay busy.
"""

from __future__ import annotations

from collections import OrderedDict

from protocol.ids import ModelId, TaskId
from protocol.messages import TaskKind

QueueKey = tuple[ModelId, TaskKind]


class WaitQueues:
    def __init__(self, limit: int) -> None:
        assert limit >= 0
        self.limit = limit
        self._queues: dict[QueueKey, OrderedDict[TaskId, float]] = {}
        self._key_of: dict[TaskId, QueueKey] = {}

    def __len__(self) -> int:
        return len(self._key_of)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._key_of

    def depth(self, key: QueueKey) -> int:
        q = self._queues.get(key)
        return len(q) if q else 0

    def depth_for_model(self, model: ModelId) -> int:
        return sum(len(q) for (m, _), q in self._queues.items() if m == model)

    def queue_keys(self) -> list[QueueKey]:
        return list(self._queues)

    def push(self, key: QueueKey, task_id: TaskId, now: float) -> int | None:
        """Append; return the 1-based position, or None when the queue is full."""
        q = self._queues.setdefault(key, OrderedDict())
        if len(q) >= self.limit:
            if not q:
                del self._queues[key]
            return None
        q[task_id] = now
        self._key_of[task_id] = key
        return len(q)

    def push_front(self, key: QueueKey, task_id: TaskId, enqueued_at: float) -> None:
        """Put a task back at the head (re-placement after a loss); ignores the bound."""
        q = self._queues.setdefault(key, OrderedDict())
        q[task_id] = enqueued_at
        q.move_to_end(task_id, last=False)
        self._key_of[task_id] = key

    def peek(self, key: QueueKey) -> tuple[TaskId, float] | None:
        q = self._queues.get(key)
        if not q:
            return None
        return next(iter(q.items()))

    def remove(self, task_id: TaskId) -> float | None:
        """Remove a task wherever it waits; return when it was enqueued."""
        key = self._key_of.pop(task_id, None)
        if key is None:
            return None
        q = self._queues[key]
        enqueued_at = q.pop(task_id)
        if not q:
            del self._queues[key]
        return enqueued_at

    def tasks(self, key: QueueKey) -> list[TaskId]:
        return list(self._queues.get(key, ()))
