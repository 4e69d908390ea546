"""The rows of /v1/instances, built from the controller and the core's projection (read-only)."""

from __future__ import annotations

from exo_master.core.instances.controller import InstanceController
from exo_master.core.instances.desired import PlacementSpec
from exo_master.core.instances.lifecycle import ReplicaState
from exo_master.core.instances.records import PlacementRecord
from exo_master.core.instances.rule import Plan
from exo_master.core.records import ClusterState
from protocol.instance_view import EventRow, PlacementRow, PlanView, RankPlanRow, ReplicaRow


def plan_view(spec: PlacementSpec, plan: Plan) -> PlanView:
    return PlanView(
        model=spec.model,
        replicas=plan.wanted,
        fits=plan.complete,
        need_bytes=plan.need,
        nodes=list(plan.chosen),
        reasons={str(node): why for node, why in plan.reasons.items()},
        shards=spec.shards,
        sharding=spec.sharding.value if spec.shards > 1 else "",
        ranks=[
            [
                RankPlanRow(
                    rank=r.rank,
                    node_id=r.node_id,
                    address=r.address,
                    layers=list(r.layers),
                    need_bytes=r.need,
                )
                for r in group
            ]
            for group in plan.groups
        ],
        problems=list(plan.problems),
    )


def placement_rows(
    ctl: InstanceController, state: ClusterState, now: float, events: int = 0
) -> list[PlacementRow]:
    rows = [_managed(ctl, record, now, events) for record in ctl.placements.values()]
    managed = set(ctl.replicas)
    for inst in state.instances.values():
        if inst.instance_id in managed:
            continue
        report = ctl.nodes.get(inst.node_id)
        placement = report.reports.get(inst.instance_id) if report is not None else None
        if placement is not None and placement.placement:
            continue  # a stray of some placement, being unloaded
        alive = state.node_alive(inst)
        status = str(inst.phase) if alive else "dead"
        rows.append(
            PlacementRow(
                id=inst.instance_id,
                model=inst.model,
                status=status,
                managed=False,
                replicas=1,
                ready=int(status == "ready"),
                nodes=[inst.node_id],
                max_concurrency=inst.max_concurrency,
                capacity=inst.capacity,
                need_bytes=0,
                reason=inst.error or "",
                instances=[
                    ReplicaRow(
                        instance_id=inst.instance_id,
                        node_id=inst.node_id,
                        state=status,
                        progress=1.0 if status == "ready" else 0.0,
                        memory_bytes=placement.memory_bytes if placement is not None else 0,
                    )
                ],
            )
        )
    return sorted(rows, key=lambda r: (not r.managed, r.model, r.id))


def _managed(ctl: InstanceController, record: PlacementRecord, now: float, events: int) -> PlacementRow:
    spec = record.spec
    replicas = sorted(
        (r for r in ctl.replicas.values() if r.placement_id == spec.placement_id), key=lambda r: r.instance_id
    )
    ready = sum(1 for r in replicas if r.state is ReplicaState.READY and r.rank == 0)
    if record.deleting:
        status = "draining"
    elif ready >= spec.replicas:
        status = "ready"
    elif record.failures >= ctl.config.max_failures:
        status = "failed"
    elif any(r.state in (ReplicaState.PLACING, ReplicaState.LOADING) for r in replicas):
        status = "loading" if ready == 0 else "degraded"
    else:
        status = "degraded" if ready else "placing"
    steps = [e for e in ctl.events if e.placement_id == spec.placement_id][-events:] if events else []
    return PlacementRow(
        id=spec.placement_id,
        model=spec.model,
        status=status,
        managed=True,
        replicas=spec.replicas,
        ready=ready,
        nodes=[r.node_id for r in replicas if r.state.live],
        max_concurrency=spec.max_concurrency,
        capacity=spec.capacity,
        need_bytes=max((r.need for r in replicas), default=0),
        reason=record.reason,
        instances=[
            ReplicaRow(
                instance_id=r.instance_id,
                node_id=r.node_id,
                state=r.state.value,
                progress=round(r.progress, 3),
                memory_bytes=r.memory_bytes,
                reason=r.reason,
                rank=r.shard.rank if r.shard is not None else None,
                group=r.group if r.shard is not None else "",
                address=r.shard.hosts[r.shard.rank] if r.shard is not None else "",
            )
            for r in replicas
        ],
        shards=spec.shards,
        sharding=spec.sharding.value if spec.shards > 1 else "",
        events=[
            EventRow(
                age=round(now - e.at, 3),
                what=e.what,
                instance_id=e.instance_id,
                node_id=e.node_id,
                detail=e.detail,
            )
            for e in steps
        ],
    )
