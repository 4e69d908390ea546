"""Scheduling: placement (a policy's choice among the candidates, refined by prefix affinity), and
the settling step that puts displaced and waiting tasks on free slots, oldest first.

Every entry point of the core first applies its event (which may make instances ineligible and
displace tasks, but never places anything), then calls `settle` once: that is the second phase of
loss handling, so a lost task is never re-placed onto a sibling instance that is about to be lost
in the same event, and one loss costs a task exactly one attempt.
"""

from __future__ import annotations

from exo_master.core.affinity import AffinityIndex
from exo_master.core.candidates import Candidates
from exo_master.core.config import CoreConfig
from exo_master.core.events import Step, TaskPlaced
from exo_master.core.lifecycle import Fail, Place, TaskRecord
from exo_master.core.placement import Policy
from exo_master.core.pool import InstancePool, score
from exo_master.core.queue import QueueKey
from exo_master.core.records import InstanceRecord
from exo_master.core.tasks import TaskBook
from exo_master.core.work import prompt_chars
from protocol.ids import InstanceId, ModelId
from protocol.messages import AssignTask

_NOWHERE: frozenset[InstanceId] = frozenset()


def assign_message(task: TaskRecord) -> AssignTask:
    assert task.instance_id is not None and task.node_id is not None
    return AssignTask(
        task_id=task.task_id, node_id=task.node_id, instance_id=task.instance_id, params=task.params
    )


def make_affinity(config: CoreConfig) -> AffinityIndex | None:
    """The prefix-affinity index, when the policy can use one. Only the score-ranking policies can
    prefer a prefix holder without giving up their rule; state-only stays the plain baseline."""
    if config.prefix_affinity and config.policy in ("least-work", "least-loaded", "power-of-two"):
        return AffinityIndex(config.affinity_entries)
    return None


class Scheduler:
    def __init__(
        self,
        config: CoreConfig,
        book: TaskBook,
        candidates: Candidates,
        policy: Policy,
        affinity: AffinityIndex | None,
    ) -> None:
        self.config = config
        self.book = book
        self.candidates = candidates
        self.policy = policy
        self.stats = book.stats
        self.affinity = affinity

    # ---- placement ------------------------------------------------------------------------------

    def place(self, task: TaskRecord, step: Step) -> bool:
        """Bind a queued task to the instance the policy chooses; False when every one is full."""
        pool = self.candidates.pools.get((task.model, task.kind))
        if pool is None or not pool.members:
            return False
        avoid = frozenset({task.lost_on}) if task.lost_on is not None else _NOWHERE
        chars = prompt_chars(task.params)
        inst = self.policy.choose(pool, self.candidates, avoid, chars)
        if inst is None and avoid:
            # better the same instance than none
            inst = self.policy.choose(pool, self.candidates, _NOWHERE, chars)
        if inst is None:
            return False
        if self.affinity is not None and task.prefixes:
            inst = self._prefer_prefix_holder(task, pool, inst, avoid, chars)
        load_before = self.candidates.load(inst)
        self.candidates.unreported.add(inst.instance_id, task.task_id, self.candidates.estimate(inst, chars))
        self.book.advance(task, Place(inst), step)
        if self.affinity is not None and task.prefixes:
            self.affinity.remember(task.prefixes, inst.instance_id)
        self.stats.placements += 1
        step.emit(
            TaskPlaced(
                task_id=task.task_id,
                instance_id=inst.instance_id,
                node_id=inst.node_id,
                policy=self.policy.name,
                attempt=task.attempts,
                load_before=load_before,
                waited=step.now - task.submitted_at,
            )
        )
        step.emit(assign_message(task))
        return True

    def _prefer_prefix_holder(
        self,
        task: TaskRecord,
        pool: InstancePool,
        chosen: InstanceRecord,
        avoid: frozenset[InstanceId],
        chars: int,
    ) -> InstanceRecord:
        """The instance holding the longest prefix of the chat, if it scores no worse than the
        policy's choice (plus the slack); otherwise the choice. With slack 0 this only breaks ties,
        so a burst over equal instances stays within ceil(N/k) on each. Under placement by work the
        holder must also be within one short request of the choice's estimated wait."""
        assert self.affinity is not None
        chain = task.prefixes
        length, holders = self.affinity.holders(chain[self.affinity.conversation_start(chain) :])
        if not length:
            return chosen
        self.stats.affinity_lookups += 1
        best: InstanceRecord | None = None
        best_score = score(self.candidates.load(chosen), chosen.capacity) + self.config.affinity_slack
        by_work = self.policy.name == "least-work"
        wait_limit = (
            self.candidates.first_token_wait(chosen, chars) + self.candidates.short_wait(chosen)
            if by_work
            else 0.0
        )
        for iid in holders:
            inst = pool.members.get(iid)
            if inst is None or iid in avoid or inst is chosen:
                continue
            load = self.candidates.load(inst)
            if load < inst.max_concurrency and (s := score(load, inst.capacity)) <= best_score:
                if by_work and self.candidates.first_token_wait(inst, chars) > wait_limit:
                    continue
                best, best_score = inst, s
        if best is None:
            if chosen.instance_id in holders:
                self.stats.affinity_hits += 1
            return chosen
        self.stats.affinity_hits += 1
        # The policy may have taken `chosen` off its heap: put it back, unchanged.
        self.candidates.reindex(chosen)
        return best

    def settle(self, step: Step) -> None:
        """Second phase of every event: displaced tasks go back in line by age (or fail when their
        tries are spent), free slots serve the oldest waiting task of the kinds they take, and
        queues nobody can serve any more fail. Nearly free when nothing waits (the common case)."""
        candidates = self.candidates
        if self.book.displaced:
            for task in self.book.take_displaced():
                if task.attempts >= self.config.max_attempts:
                    message = f"task not accepted after {task.attempts} attempts (last: {task.lost_reason})"
                    self.book.advance(task, Fail(message, unavailable=True), step)
                    continue
                self.book.requeue(task, step.now)
                candidates.woken.add(task.model)
                candidates.touched.add(task.model)
        if candidates.woken:
            if self.book.queues.waiting:
                # Placing only changes its own model's instances: nothing woken here is missed.
                for model in sorted(candidates.woken):
                    self._drain(model, step)
            candidates.woken.clear()
        if candidates.touched:
            if self.book.queues.waiting:
                for model in sorted(candidates.touched):
                    self._fail_stranded(model, step)
            candidates.touched.clear()

    def expire_waiting(self, step: Step) -> None:
        """Fail requests that waited `queue_timeout` for a slot: never wait forever."""
        waiting = self.book.queues.waiting
        if not waiting:
            return
        now, limit = step.now, self.config.queue_timeout
        for task_id in [t for t in waiting if now - self.book.live[t].queued_at >= limit]:
            task = self.book.live[task_id]
            self.stats.queue_timeouts += 1
            message = (
                f"waited {now - task.queued_at:.0f} s for a free slot on model {task.model!r} "
                f"(the master's --queue-timeout is {limit:g} s); retry later or add instances"
            )
            self.book.advance(task, Fail(message, unavailable=True), step)

    def _drain(self, model: ModelId, step: Step) -> None:
        """Place waiting tasks of `model` while any can be placed, oldest first across kinds."""
        queues = self.book.queues
        blocked: set[QueueKey] = set()
        while True:
            heads = [
                (head[1], key, head[0])
                for key in queues.keys_of(model)
                if key not in blocked and (head := queues.peek(key)) is not None
            ]
            if not heads:
                return
            _, key, task_id = min(heads)
            if not self.place(self.book.live[task_id], step):
                blocked.add(key)

    def _fail_stranded(self, model: ModelId, step: Step) -> None:
        queues = self.book.queues
        for key in queues.keys_of(model):
            if self.candidates.has_live_candidate(key):
                continue
            for task_id in queues.tasks(key):
                task = self.book.live[task_id]
                message = f"no live instance of model {model!r} is left"
                if task.lost_reason is not None:
                    message = f"{task.lost_reason}; {message}"
                self.book.advance(task, Fail(message, unavailable=True), step)
