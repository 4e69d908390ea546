"""Candidates: which instances may take work now, at what load, kept up to date incrementally.

One `InstancePool` per (model, kind) holds that model's ELIGIBLE instances (`instance_state`) with
their load. The load of an instance is the rule of the core, stated once: confirmed in flight (the
instance's set of RUNNING tasks) + pending (the ledger), never both for one task. Whatever changes an
instance's load (a lifecycle move) or its eligibility (a phase change, its node's link) calls
`reindex`; the pools then offer it at its new score. The models touched that way are noted for the
scheduler's settling step: `woken` (a slot may have freed: drain the queue) and `touched` (an
instance became ineligible: the queue may be stranded).
"""

from __future__ import annotations

from exo_master.core.instance_state import Availability, availability
from exo_master.core.ledger import PendingLedger
from exo_master.core.pool import InstancePool
from exo_master.core.queue import QueueKey
from exo_master.core.records import ClusterState, InstanceRecord
from protocol.ids import ModelId
from protocol.messages import TaskKind


class Candidates:
    def __init__(self, state: ClusterState, ledger: PendingLedger) -> None:
        self.state = state
        self.ledger = ledger
        self.pools: dict[QueueKey, InstancePool] = {}
        self.woken: set[ModelId] = set()  # models with an instance that has a free slot now
        self.touched: set[ModelId] = set()  # models whose instances changed eligibility or left

    # ---- the rules, each stated once (the policies read loads through here: placement.LoadView) --

    def load(self, inst: InstanceRecord) -> int:
        """Confirmed in flight (state) + pending (ledger): the ledger's whole point."""
        return len(inst.confirmed) + self.ledger.pending(inst.instance_id)

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
        return any(self.may_serve(inst, kind) for inst in self.state.by_model.get(model, {}).values())

    # ---- the index ------------------------------------------------------------------------------

    def reindex(self, inst: InstanceRecord) -> None:
        """An instance's load or eligibility changed: bring every pool it belongs to up to date."""
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
