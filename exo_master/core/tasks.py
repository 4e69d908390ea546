"""TaskBook: the live tasks and every count that depends on their status.

It holds the counts (the pending ledger, the wait queues, the AssignTask re-send schedule, the
tasks displaced by the current event, the recently ended ones) and admits requests; every status
change goes through `advance`, whose row in `lifecycle.TRANSITIONS` says what it does to them. A
task whose attempt is lost is set aside as *displaced*; the scheduler puts it back in line by age
once the whole event has been applied (two-phase loss handling).
"""

from __future__ import annotations

from collections import OrderedDict

from exo_master.core.affinity import AffinityIndex, conversation_chain
from exo_master.core.candidates import Candidates
from exo_master.core.config import CoreConfig, CoreStats
from exo_master.core.events import Step
from exo_master.core.ledger import PendingLedger
from exo_master.core.lifecycle import Cause, TaskRecord, TaskStatus, advance
from exo_master.core.queue import WaitQueues
from exo_master.core.records import ClusterState, InstanceRecord
from protocol.ids import TaskId
from protocol.messages import TaskParams, TextGenerationParams


class TaskBook:
    def __init__(
        self,
        config: CoreConfig,
        state: ClusterState,
        stats: CoreStats,
        candidates: Candidates,
        affinity: AffinityIndex | None,
        recent_limit: int = 2048,
    ) -> None:
        self.config = config
        self.state = state
        self.stats = stats
        self.candidates = candidates
        self.ledger: PendingLedger = candidates.ledger
        self.live: dict[TaskId, TaskRecord] = {}
        candidates.live = self.live  # occupancy and work estimates ask whom a task belongs to
        # Ended tasks, newest last, bounded: for display and for recognising late worker events.
        self.recent: OrderedDict[TaskId, TaskRecord] = OrderedDict()
        self.queues = WaitQueues(config.queue_limit)
        # PENDING tasks -> when their AssignTask is next re-sent; ordered by that time.
        self.resend: OrderedDict[TaskId, float] = OrderedDict()
        self.displaced: list[TaskRecord] = []
        self._affinity = affinity
        self._recent_limit = recent_limit
        self._admitted = 0

    def get(self, task_id: TaskId) -> TaskRecord | None:
        return self.live.get(task_id) or self.recent.get(task_id)

    def load(self, inst: InstanceRecord) -> int:
        """The tasks placed on `inst` (without the engine's unowned work: `Candidates.load`)."""
        return self.candidates.placed(inst)

    # ---- admission ------------------------------------------------------------------------------

    def admit(self, task_id: TaskId, params: TaskParams, now: float) -> TaskRecord:
        self._admitted += 1
        task = TaskRecord(task_id=task_id, params=params, submitted_at=now, admission=self._admitted)
        # Only a chat placed with prefix affinity is hashed (its reply too: `start_attempt`).
        if self._affinity is not None and isinstance(params, TextGenerationParams) and params.messages:
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

    def advance(self, task: TaskRecord, cause: Cause, step: Step) -> TaskStatus:
        """Move `task` along its lifecycle table (`lifecycle.TRANSITIONS`): the only way in."""
        return advance(self, task, cause, step)

    def take_displaced(self) -> list[TaskRecord]:
        """Tasks that lost their attempt since the last call and are still unbound, oldest first."""
        displaced, self.displaced = self.displaced, []
        alive = [t for t in displaced if t.status is TaskStatus.QUEUED and t.task_id in self.live]
        return sorted(alive, key=lambda t: t.admission)

    def archive(self, task: TaskRecord) -> None:
        """A task reached a final status (a lifecycle effect): it joins the bounded recent list."""
        assert task.status.is_final
        del self.live[task.task_id]
        self.recent[task.task_id] = task
        while len(self.recent) > self._recent_limit:
            self.recent.popitem(last=False)
