"""Candidates: which instances may take work now, at what load, kept up to date incrementally.

One `InstancePool` per (model, kind) holds that model's ELIGIBLE instances (`instance_state`) with
their load. The load of an instance is the rule of the core, stated once: confirmed in flight (the
instance's set of RUNNING tasks) + pending (the ledger), never both for one task. Whatever changes an
instance's load (a lifecycle move) or its eligibility (a phase change, its node's link) calls
`reindex`; the pools then offer it at its new score. The models touched that way are noted for the
scheduler's settling step: `woken` (a slot may have freed: drain the queue) and `touched` (an
instance became ineligible: the queue may be stranded).

Occupancy is honest: a task the engine still holds that no live task here owns (cancelled while
running, or moved away) keeps its slot (`unowned`) until the worker's report says the engine let go.
Placement by work (see work.py) reads `first_token_wait`: the instance's reported prefill work plus
the estimates of the tasks bound to it since (`UnreportedWork`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from exo_master.core.instance_state import Availability, availability
from exo_master.core.ledger import PendingLedger
from exo_master.core.pool import InstancePool
from exo_master.core.queue import QueueKey
from exo_master.core.records import ClusterState, InstanceRecord
from exo_master.core.work import (
    UnreportedWork,
    estimate_tokens,
    first_token_wait,
    prefill_rate,
    short_request_wait,
)
from protocol.ids import ModelId, TaskId
from protocol.messages import InstanceWork, TaskKind

if TYPE_CHECKING:
    from exo_master.core.lifecycle import TaskRecord


class Candidates:
    def __init__(self, state: ClusterState, ledger: PendingLedger) -> None:
        self.state = state
        self.ledger = ledger
        self.pools: dict[QueueKey, InstancePool] = {}
        self.woken: set[ModelId] = set()  # models with an instance that has a free slot now
        self.touched: set[ModelId] = set()  # models whose instances changed eligibility or left
        self.live: dict[TaskId, TaskRecord] = {}  # the TaskBook's live tasks (it hands over its dict)
        self.chars_per_token: dict[ModelId, float] = {}  # per model, from the workers' reports
        # Placement by work: the estimated prompts of tasks no heartbeat has listed yet.
        self.unreported = UnreportedWork()

    # ---- the rules, each stated once (the policies read loads through here: placement.LoadView) --

    def placed(self, inst: InstanceRecord) -> int:
        """Confirmed in flight (state) + pending (ledger), never both: the ledger's whole point."""
        return len(inst.confirmed) + self.ledger.pending(inst.instance_id)

    def load(self, inst: InstanceRecord) -> int:
        """The placed tasks + what the engine still holds for nobody: a slot is free only when the
        engine has let go of it."""
        return self.placed(inst) + len(inst.unowned)

    def confirmed(self, inst: InstanceRecord) -> int:
        return len(inst.confirmed)

    def eligible(self, inst: InstanceRecord) -> bool:
        """May receive an AssignTask now (instance_state.AVAILABILITY)."""
        return availability(inst, self.state.nodes.get(inst.node_id)) is Availability.ELIGIBLE

    def may_serve(self, inst: InstanceRecord, kind: TaskKind) -> bool:
        """Will take `kind` requests now or soon: worth waiting for."""
        return kind in inst.kinds and (
            availability(inst, self.state.nodes.get(inst.node_id)) is not Availability.UNAVAILABLE
        )

    def has_live_candidate(self, key: QueueKey) -> bool:
        model, kind = key
        if model in self.state.coming_models:
            return True
        return any(self.may_serve(inst, kind) for inst in self.state.by_model.get(model, {}).values())

    # ---- work (placement by work; see work.py) --------------------------------------------------

    def work_ahead(self, inst: InstanceRecord) -> int:
        """Prompt tokens the instance has to process before a new request's: its last report, plus
        the estimates of the tasks placed there that the report did not list yet (O(1))."""
        reported = inst.work.prefill_tokens if inst.work is not None else 0
        return reported + self.unreported.tokens(inst.instance_id)

    def estimate(self, inst: InstanceRecord, chars: int) -> int:
        # One ratio per model: a request's estimated size must not depend on the candidate.
        return estimate_tokens(chars, self.chars_per_token.get(inst.model, 0.0))

    def first_token_wait(self, inst: InstanceRecord, chars: int) -> float:
        rate = prefill_rate(inst.work, inst.capacity)
        return first_token_wait(self.work_ahead(inst), self.estimate(inst, chars), rate)

    def short_wait(self, inst: InstanceRecord) -> float:
        return short_request_wait(prefill_rate(inst.work, inst.capacity))

    def observe(self, inst: InstanceRecord, work: InstanceWork | None, active: frozenset[TaskId]) -> None:
        """A heartbeat's picture of the instance: its work, and which active tasks nobody owns."""
        inst.work, inst.reported = work, active
        self.unreported.keep(inst.instance_id, lambda t: t not in active)
        if work is not None and work.chars_per_token > 0:
            # Smoothed over the model's instances and their reports (each already smoothed).
            old = self.chars_per_token.get(inst.model, 0.0)
            self.chars_per_token[inst.model] = (
                work.chars_per_token if old == 0 else 0.9 * old + 0.1 * work.chars_per_token
            )
        unowned = frozenset(
            t for t in active if (task := self.live.get(t)) is None or task.instance_id != inst.instance_id
        )
        if unowned != inst.unowned:
            inst.unowned = unowned
            self.reindex(inst)

    def hold(self, inst: InstanceRecord, task_id: TaskId) -> None:
        """The master ends a task the engine is running: its slot stays taken until a report says
        the engine let go (call before the task's own count is released)."""
        inst.unowned = inst.unowned | {task_id}

    # ---- the index ------------------------------------------------------------------------------

    def reindex(self, inst: InstanceRecord) -> None:
        """An instance's load or eligibility changed: bring every pool it belongs to up to date."""
        iid, live = inst.instance_id, self.live
        # Tasks that ended here or moved away no longer wait for a prefill here.
        self.unreported.keep(iid, lambda t: (task := live.get(t)) is not None and task.instance_id == iid)
        eligible = self.eligible(inst)
        load = self.load(inst)
        model, pools = inst.model, self.pools
        for kind in inst.kinds:
            pool = pools.get((model, kind))
            if pool is None:
                pool = self.pool((model, kind))
            pool.update(inst, eligible, load)
        if eligible and load < inst.max_concurrency:
            self.woken.add(inst.model)
        elif not eligible:
            self.touched.add(inst.model)

    def drop_kind(self, inst: InstanceRecord, kind: TaskKind) -> None:
        """The instance stopped serving `kind`: it leaves that pool (its queue may be stranded)."""
        self.pool((inst.model, kind)).update(inst, False, 0)
        self.touched.add(inst.model)

    def pool(self, key: QueueKey) -> InstancePool:
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = InstancePool()
        return pool
