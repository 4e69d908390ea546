"""TaskBook: the live tasks and every count that depends on their status, changed in one place.

Each method is one row of the lifecycle table (`lifecycle.TRANSITIONS`) plus what that move does
to the counters: the pending ledger, the instances' confirmed sets, the wait queues, the AssignTask
re-send schedule, and the client's final answer. Whenever an instance's load changes, the book
calls `on_load_change(instance)` so the candidate pools are re-indexed; no caller can forget it.
A task whose attempt is lost is put aside as *displaced*; the scheduler puts it back in line by
age once the whole event has been applied (two-phase loss handling).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from exo_master.core.affinity import conversation_chain
from exo_master.core.config import CoreConfig, CoreStats
from exo_master.core.events import Effect, TaskCompleted, TaskErrored
from exo_master.core.ledger import PendingLedger
from exo_master.core.lifecycle import TaskRecord, TaskStatus, Trigger, advance
from exo_master.core.queue import WaitQueues
from exo_master.core.records import ClusterState, InstanceRecord
from protocol.ids import TaskId
from protocol.messages import FinishReason, TaskParams, TextGenerationParams, Usage

LoadListener = Callable[[InstanceRecord], None]


class TaskBook:
    def __init__(
        self,
        config: CoreConfig,
        state: ClusterState,
        stats: CoreStats,
        out: list[Effect],
        recent_limit: int = 2048,
    ) -> None:
        self.config = config
        self.state = state
        self.stats = stats
        self.out = out
        self.live: dict[TaskId, TaskRecord] = {}
        # Ended tasks, newest last, bounded: for display and for recognising late worker events.
        self.recent: OrderedDict[TaskId, TaskRecord] = OrderedDict()
        self.ledger = PendingLedger(config.ledger_ttl)
        self.queues = WaitQueues(config.queue_limit)
        # PENDING tasks -> when their AssignTask is next re-sent; ordered by that time.
        self.resend: OrderedDict[TaskId, float] = OrderedDict()
        self.displaced: list[TaskRecord] = []
        self.on_load_change: LoadListener = lambda inst: None
        self.on_bind: Callable[[TaskRecord], None] = lambda task: None
        self._recent_limit = recent_limit
        self._admitted = 0

    def get(self, task_id: TaskId) -> TaskRecord | None:
        return self.live.get(task_id) or self.recent.get(task_id)

    def load(self, inst: InstanceRecord) -> int:
        """Confirmed in flight (the instance's set) + pending (the ledger): the ledger's whole point."""
        return len(inst.confirmed) + self.ledger.pending(inst.instance_id)

    # ---- admission ------------------------------------------------------------------------------

    def admit(self, task_id: TaskId, params: TaskParams, now: float) -> TaskRecord:
        self._admitted += 1
        task = TaskRecord(task_id=task_id, params=params, submitted_at=now, admission=self._admitted)
        if self.config.prefix_affinity and isinstance(params, TextGenerationParams) and params.messages:
            task.prefixes, task.chat_hash = conversation_chain(params.messages)
        self.live[task_id] = task
        return task

    def withdraw(self, task: TaskRecord) -> None:
        """An admitted request was rejected before it was bound or queued: as if never admitted."""
        assert task.status is TaskStatus.QUEUED and task.attempts == 0 and task.task_id not in self.queues
        del self.live[task.task_id]

    def enqueue(self, task: TaskRecord, now: float) -> int | None:
        """Wait for a slot; the 1-based position, or None when the queue is full."""
        assert task.status is TaskStatus.QUEUED
        task.queued_at = now
        return self.queues.push((task.model, task.kind), task.task_id, task.admission)

    def requeue(self, task: TaskRecord, now: float) -> None:
        """Back in line by age after a lost attempt (past the bound: it was admitted already)."""
        assert task.status is TaskStatus.QUEUED
        task.queued_at = now
        self.queues.requeue((task.model, task.kind), task.task_id, task.admission)

    # ---- the moves ------------------------------------------------------------------------------

    def bind(self, task: TaskRecord, inst: InstanceRecord, now: float) -> None:
        advance(task, Trigger.PLACE)
        if task.task_id in self.queues.waiting:
            self.queues.remove(task.task_id)
        self.ledger.reserve(task.task_id, inst.instance_id, now)
        task.instance_id = inst.instance_id
        task.node_id = inst.node_id
        task.assigned_at = now
        task.attempts += 1
        task.next_chunk = 0
        self.on_bind(task)
        self.resend[task.task_id] = now + self.config.assign_resend
        self.on_load_change(inst)

    def confirm(self, task: TaskRecord) -> None:
        assert task.instance_id is not None
        advance(task, Trigger.CONFIRM)
        self.ledger.confirm(task.task_id)
        self.resend.pop(task.task_id, None)
        self.state.instances[task.instance_id].confirmed.add(task.task_id)
        # Load is unchanged (pending -1, confirmed +1): nothing to re-index.

    def unbind(self, task: TaskRecord, why: str) -> InstanceRecord | None:
        """The attempt is lost: free its slot and set the task aside for re-placement."""
        assert task.instance_id is not None
        was = task.status
        advance(task, Trigger.UNBIND)
        inst = self._release(task, was)
        task.lost_reason, task.lost_on = why, task.instance_id
        task.instance_id = task.node_id = None
        self.stats.replacements += 1
        self.displaced.append(task)
        if inst is not None:
            self.on_load_change(inst)
        return inst

    def finish(self, task: TaskRecord, now: float, reason: FinishReason, usage: Usage | None) -> None:
        task.finish_reason, task.usage = reason, usage
        self._end(task, Trigger.FINISH, now)
        self.out.append(TaskCompleted(task_id=task.task_id, finish_reason=reason, usage=usage or Usage()))

    def fail(
        self, task: TaskRecord, now: float, message: str, unavailable: bool = False, code: str | None = None
    ) -> None:
        """End the task without a result and tell its client why (503 when `unavailable`; `code`
        names a request error, such as context_length_exceeded)."""
        self._end(task, Trigger.FAIL, now, error=message)
        self.out.append(
            TaskErrored(task_id=task.task_id, message=message, unavailable=unavailable, code=code)
        )

    def cancel(self, task: TaskRecord, now: float, reason: str) -> None:
        self._end(task, Trigger.CANCEL, now, error=reason)
        # Whoever still waits on the task (not a client that went away) learns why it ended.
        self.out.append(TaskErrored(task_id=task.task_id, message=reason, cancelled=True))

    def take_displaced(self) -> list[TaskRecord]:
        """Tasks that lost their attempt since the last call and are still unbound, oldest first."""
        displaced, self.displaced = self.displaced, []
        alive = [t for t in displaced if t.status is TaskStatus.QUEUED and t.task_id in self.live]
        return sorted(alive, key=lambda t: t.admission)

    # ---- internals ------------------------------------------------------------------------------

    def _end(self, task: TaskRecord, trigger: Trigger, now: float, error: str | None = None) -> None:
        was = task.status
        status = advance(task, trigger)
        inst = self._release(task, was)
        task.error = error
        task.ended_at = now
        del self.live[task.task_id]
        self.recent[task.task_id] = task
        while len(self.recent) > self._recent_limit:
            self.recent.popitem(last=False)
        self.stats.finals[status] = self.stats.finals.get(status, 0) + 1
        if inst is not None:
            if status is TaskStatus.FINISHED:
                inst.completed += 1
            elif status is TaskStatus.FAILED:
                inst.failed += 1
            self.on_load_change(inst)

    def _release(self, task: TaskRecord, was: TaskStatus) -> InstanceRecord | None:
        """Drop the counts a task held in status `was`; return the instance whose load fell."""
        if was is TaskStatus.QUEUED:
            self.queues.remove(task.task_id)
            return None
        assert task.instance_id is not None
        inst = self.state.instances.get(task.instance_id)
        if was is TaskStatus.PENDING:
            self.ledger.release(task.task_id)  # idempotent: an expired entry is already gone
            self.resend.pop(task.task_id, None)
        else:
            assert inst is not None, f"running task {task.task_id} on unknown instance"
            inst.confirmed.discard(task.task_id)
        return inst
