"""Scheduling: who may take work (the eligibility rule), the candidate pools, placement, and the
settling step that puts displaced and waiting tasks on free slots, oldest first.

Every entry point of the core first applies its event (which may make instances ineligible and
displace tasks, but never places anything), then calls `settle` once: that is the second phase of
loss handling, so a lost task is never re-placed onto a sibling instance that is about to be lost
in the same event, and one loss costs a task exactly one attempt.
"""

from __future__ import annotations

from exo_master.core.affinity import AffinityIndex
from exo_master.core.config import CoreConfig, CoreStats
from exo_master.core.events import Effect, TaskPlaced
from exo_master.core.lifecycle import TaskRecord
from exo_master.core.placement import Policy
from exo_master.core.pool import InstancePool, score
from exo_master.core.queue import QueueKey
from exo_master.core.records import ClusterState, InstanceRecord
from exo_master.core.tasks import TaskBook
from exo_master.core.work import (
    UnreportedWork,
    estimate_tokens,
    first_token_wait,
    prefill_rate,
    prompt_chars,
    short_request_wait,
)
from protocol.ids import InstanceId, ModelId, TaskId
from protocol.messages import AssignTask, InstanceStatus, InstanceWork, TaskKind

_NOWHERE: frozenset[InstanceId] = frozenset()


def assign_message(task: TaskRecord) -> AssignTask:
    assert task.instance_id is not None and task.node_id is not None
    return AssignTask(
        task_id=task.task_id, node_id=task.node_id, instance_id=task.instance_id, params=task.params
    )


class Scheduler:
    def __init__(
        self,
        config: CoreConfig,
        state: ClusterState,
        book: TaskBook,
        policy: Policy,
        stats: CoreStats,
        out: list[Effect],
    ) -> None:
        self.config = config
        self.state = state
        self.book = book
        self.policy = policy
        self.stats = stats
        self.out = out
        self.pools: dict[QueueKey, InstancePool] = {}
        # Only the score-ranking policies can prefer a prefix holder without giving up their rule;
        # state-only stays the plain baseline.
        self.affinity = (
            AffinityIndex(config.affinity_entries)
            if config.prefix_affinity and policy.name in ("least-work", "least-loaded", "power-of-two")
            else None
        )
        self.chars_per_token: dict[ModelId, float] = {}  # per model, from the workers' reports
        # Placement by work: the estimated prompts of tasks no heartbeat has listed yet.
        self._unreported = UnreportedWork()
        self._woken: set[ModelId] = set()  # models with an instance that has a free slot now
        self._touched: set[ModelId] = set()  # models whose instances changed eligibility or left
        book.on_load_change = self.reindex

    # ---- the rules, each stated once ------------------------------------------------------------

    def eligible(self, inst: InstanceRecord) -> bool:
        """May receive an AssignTask now: its node is alive and subscribed, it is ready and staying."""
        node = self.state.nodes.get(inst.node_id)
        return (
            node is not None
            and node.alive
            and node.subscribed
            and inst.status is InstanceStatus.READY
            and not inst.retired
        )

    def may_serve(self, inst: InstanceRecord, kind: TaskKind) -> bool:
        """Will take `kind` requests now or once it has loaded: worth waiting for."""
        return (
            kind in inst.kinds
            and inst.status is not InstanceStatus.FAILED
            and not inst.retired
            and self.state.node_alive(inst)
        )

    def has_live_candidate(self, key: QueueKey) -> bool:
        model, kind = key
        return any(self.may_serve(inst, kind) for inst in self.state.by_model.get(model, {}).values())

    def load(self, inst: InstanceRecord) -> int:
        """Confirmed + pending + what the engine still holds for nobody: a slot is free only when
        the engine has let go of it."""
        return self.book.load(inst) + len(inst.unowned)

    def confirmed(self, inst: InstanceRecord) -> int:
        return len(inst.confirmed)

    # ---- work (placement by work; see work.py) ----------------------------------------------------

    def work_ahead(self, inst: InstanceRecord) -> int:
        """Prompt tokens the instance has to process before a new request's: its last report, plus
        the estimates of the tasks placed there that the report did not list yet (O(1))."""
        reported = inst.work.prefill_tokens if inst.work is not None else 0
        return reported + self._unreported.tokens(inst.instance_id)

    def first_token_wait(self, inst: InstanceRecord, chars: int) -> float:
        # One ratio per model: a request's estimated size must not depend on the candidate.
        ratio = self.chars_per_token.get(inst.model, 0.0)
        rate = prefill_rate(inst.work, inst.capacity)
        return first_token_wait(self.work_ahead(inst), estimate_tokens(chars, ratio), rate)

    def short_wait(self, inst: InstanceRecord) -> float:
        return short_request_wait(prefill_rate(inst.work, inst.capacity))

    def observe(self, inst: InstanceRecord, work: InstanceWork | None, active: frozenset[TaskId]) -> None:
        """A heartbeat's picture of the instance: its work, and which active tasks nobody owns."""
        inst.work, inst.reported = work, active
        self._unreported.keep(inst.instance_id, lambda t: t not in active)
        if work is not None and work.chars_per_token > 0:
            # Smoothed over the model's instances and their reports (each already smoothed).
            old = self.chars_per_token.get(inst.model, 0.0)
            self.chars_per_token[inst.model] = (
                work.chars_per_token if old == 0 else 0.9 * old + 0.1 * work.chars_per_token
            )
        unowned = frozenset(
            t
            for t in active
            if (task := self.book.live.get(t)) is None or task.instance_id != inst.instance_id
        )
        if unowned != inst.unowned:
            inst.unowned = unowned
            self.reindex(inst)

    def hold(self, inst: InstanceRecord, task_id: TaskId) -> None:
        """The master ends a task the engine is running: its slot stays taken until a report says
        the engine let go (call before the task's own count is released)."""
        inst.unowned = inst.unowned | {task_id}

    # ---- the candidate index --------------------------------------------------------------------

    def reindex(self, inst: InstanceRecord) -> None:
        """An instance's load or eligibility changed: bring every pool it belongs to up to date."""
        iid, live = inst.instance_id, self.book.live
        # Tasks that ended here or moved away no longer wait for a prefill here.
        self._unreported.keep(iid, lambda t: (task := live.get(t)) is not None and task.instance_id == iid)
        eligible = self.eligible(inst)
        load = self.load(inst)
        model, pools = inst.model, self.pools
        for kind in inst.kinds:
            pool = pools.get((model, kind))
            if pool is None:
                pool = self.pool((model, kind))
            pool.update(inst, eligible, load)
        if eligible and load < inst.max_concurrency:
            self._woken.add(inst.model)
        elif not eligible:
            self._touched.add(inst.model)

    def drop_kind(self, inst: InstanceRecord, kind: TaskKind) -> None:
        """The instance stopped serving `kind`: it leaves that pool (its queue may be stranded)."""
        self.pool((inst.model, kind)).update(inst, False, 0)
        self._touched.add(inst.model)

    def pool(self, key: QueueKey) -> InstancePool:
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = InstancePool()
        return pool

    # ---- placement ------------------------------------------------------------------------------

    def place(self, task: TaskRecord, now: float) -> bool:
        """Bind a queued task to the instance the policy chooses; False when every one is full."""
        pool = self.pools.get((task.model, task.kind))
        if pool is None or not pool.members:
            return False
        avoid = frozenset({task.lost_on}) if task.lost_on is not None else _NOWHERE
        chars = prompt_chars(task.params)
        inst = self.policy.choose(pool, self, avoid, chars)
        if inst is None and avoid:
            inst = self.policy.choose(pool, self, _NOWHERE, chars)  # better the same instance than none
        if inst is None:
            return False
        if self.affinity is not None and task.prefixes:
            inst = self._prefer_prefix_holder(task, pool, inst, avoid, chars)
        load_before = self.load(inst)
        estimate = estimate_tokens(chars, self.chars_per_token.get(inst.model, 0.0))
        self._unreported.add(inst.instance_id, task.task_id, estimate)
        self.book.bind(task, inst, now)
        if self.affinity is not None and task.prefixes:
            self.affinity.remember(task.prefixes, inst.instance_id)
        self.stats.placements += 1
        self.out.append(
            TaskPlaced(
                task_id=task.task_id,
                instance_id=inst.instance_id,
                node_id=inst.node_id,
                policy=self.policy.name,
                attempt=task.attempts,
                load_before=load_before,
                waited=now - task.submitted_at,
            )
        )
        self.out.append(assign_message(task))
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
        best_score = score(self.load(chosen), chosen.capacity) + self.config.affinity_slack
        by_work = self.policy.name == "least-work"
        wait_limit = self.first_token_wait(chosen, chars) + self.short_wait(chosen) if by_work else 0.0
        for iid in holders:
            inst = pool.members.get(iid)
            if inst is None or iid in avoid or inst is chosen:
                continue
            load = self.load(inst)
            if load < inst.max_concurrency and (s := score(load, inst.capacity)) <= best_score:
                if by_work and self.first_token_wait(inst, chars) > wait_limit:
                    continue
                best, best_score = inst, s
        if best is None:
            if chosen.instance_id in holders:
                self.stats.affinity_hits += 1
            return chosen
        self.stats.affinity_hits += 1
        # The policy may have taken `chosen` off its heap: put it back, unchanged.
        self.reindex(chosen)
        return best

    def settle(self, now: float) -> None:
        """Second phase of every event: displaced tasks go back in line by age (or fail when their
        tries are spent), free slots serve the oldest waiting task of the kinds they take, and
        queues nobody can serve any more fail. Nearly free when nothing waits (the common case)."""
        if self.book.displaced:
            for task in self.book.take_displaced():
                if task.attempts >= self.config.max_attempts:
                    message = f"task not accepted after {task.attempts} attempts (last: {task.lost_reason})"
                    self.book.fail(task, now, message, unavailable=True)
                    continue
                self.book.requeue(task, now)
                self._woken.add(task.model)
                self._touched.add(task.model)
        if self._woken:
            if self.book.queues.waiting:
                # Placing only changes its own model's instances: nothing woken here is missed.
                for model in sorted(self._woken):
                    self._drain(model, now)
            self._woken.clear()
        if self._touched:
            if self.book.queues.waiting:
                for model in sorted(self._touched):
                    self._fail_stranded(model, now)
            self._touched.clear()

    def expire_waiting(self, now: float) -> None:
        """Fail requests that waited `queue_timeout` for a slot: never wait forever."""
        waiting = self.book.queues.waiting
        if not waiting:
            return
        limit = self.config.queue_timeout
        for task_id in [t for t in waiting if now - self.book.live[t].queued_at >= limit]:
            task = self.book.live[task_id]
            self.stats.queue_timeouts += 1
            message = (
                f"waited {now - task.queued_at:.0f} s for a free slot on model {task.model!r} "
                f"(the master's --queue-timeout is {limit:g} s); retry later or add instances"
            )
            self.book.fail(task, now, message, unavailable=True)

    def _drain(self, model: ModelId, now: float) -> None:
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
            if not self.place(self.book.live[task_id], now):
                blocked.add(key)

    def _fail_stranded(self, model: ModelId, now: float) -> None:
        queues = self.book.queues
        for key in queues.keys_of(model):
            if self.has_live_candidate(key):
                continue
            for task_id in queues.tasks(key):
                task = self.book.live[task_id]
                message = f"no live instance of model {model!r} is left"
                if task.lost_reason is not None:
                    message = f"{task.lost_reason}; {message}"
                self.book.fail(task, now, message, unavailable=True)
