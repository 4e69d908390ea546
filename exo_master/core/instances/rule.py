"""The memory-aware placement rule: a pure function of (desired, nodes, instances).

Replicas go one at a time to the best node that can hold one more, where every node must
    - be alive, allowed by the placement (its node list, its exclusions) and not backing off after
      a failed load of this placement,
    - hold the model on disk (or be able to fetch it: `can_fetch`),
    - have room: its free memory (what it reports available, less what instances placed on it but
      not loaded yet will still take) at least the instance's need (weights + KV headroom).
Among those, the best is the first by (replicas of this placement already there: spread first;
not holding the model: holders first; most free memory; node id): deterministic, whatever the
order the nodes come in. A node never gets more than its memory allows, however many replicas
are asked for. When not every replica fits, the result names each node's reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from exo_master.core.instances.desired import PlacementSpec
from exo_master.core.instances.memory import DEFAULT_CONTEXT_TOKENS, human_bytes, instance_need
from protocol.ids import ModelId, NodeId
from protocol.messages import LocalModel
from protocol.sharding import RingPorts


@dataclass(frozen=True, slots=True)
class NodeView:
    node_id: NodeId
    alive: bool
    memory_total: int
    free: int  # bytes a new instance may use now
    models: Mapping[ModelId, LocalModel] = field(default_factory=dict)
    replicas: Mapping[str, int] = field(default_factory=dict)  # placement id -> live replicas here
    can_fetch: bool = False  # could get a model it does not hold (no node can, in this project yet)
    ring: RingPorts | None = None  # where it lets MLX distributed listen; None: it runs no ranks


@dataclass(frozen=True, slots=True)
class RankPlace:
    """One rank of a planned instance."""

    rank: int
    node_id: NodeId
    address: str  # HOST:PORT of its ring socket
    control: str  # rank 0: HOST:PORT of its control socket; "" for the others
    layers: tuple[int, int]  # [start, end)
    need: int  # bytes


@dataclass(frozen=True, slots=True)
class Plan:
    wanted: int
    chosen: tuple[NodeId, ...]  # one entry per replica placed (a node twice only when it must)
    need: int  # bytes per replica; 0 when no node knows the model
    reasons: dict[NodeId, str]  # why each node took no replica (or no further one)
    # Sharded placements: the ranks of each planned instance (rank 0 first; its node is in `chosen`)
    # and, when not every instance fits, why (heads that do not divide, memory, too few nodes).
    groups: tuple[tuple[RankPlace, ...], ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return len(self.chosen) == self.wanted

    def why(self) -> str:
        """Why it is short, in one line: its problems, then each node's reason."""
        parts = [*self.problems, *(f"{n}: {why}" for n, why in self.reasons.items())]
        return "; ".join(parts) or "no nodes have joined"


def model_info(spec: PlacementSpec, nodes: Sequence[NodeView]) -> LocalModel | None:
    """The model's files as some node reports them: the largest report wins (the safe estimate)."""
    reports = [n.models[spec.model_id] for n in nodes if spec.model_id in n.models]
    if not reports:
        return None
    return max(reports, key=lambda m: (m.weights_bytes or m.size_bytes, m.kv_bytes_per_token, m.path))


def plan(
    spec: PlacementSpec,
    wanted: int,
    nodes: Sequence[NodeView],
    avoid: frozenset[NodeId] = frozenset(),
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
) -> Plan:
    """Choose nodes for `wanted` more replicas of `spec` (it may already have some: `replicas`)."""
    info = model_info(spec, nodes)
    if info is None:
        nowhere = {n.node_id: f"does not hold model {spec.model!r}" for n in nodes}
        return Plan(wanted=wanted, chosen=(), need=0, reasons=dict(sorted(nowhere.items())))
    need = instance_need(info, spec.max_concurrency, context_tokens)
    reasons: dict[NodeId, str] = {}
    free: dict[NodeId, int] = {}
    views = {n.node_id: n for n in nodes}
    for node in nodes:
        why = excluded(spec, node, avoid)
        if why is None and node.free < need:
            why = _no_room(need, node.free, node.memory_total)
        if why is None:
            free[node.node_id] = node.free
        else:
            reasons[node.node_id] = why
    count = {nid: views[nid].replicas.get(spec.placement_id, 0) for nid in free}
    chosen: list[NodeId] = []
    for _ in range(wanted):
        fitting = [nid for nid, room in free.items() if room >= need]
        if not fitting:
            break
        best = min(
            fitting,
            key=lambda nid: (count[nid], spec.model_id not in views[nid].models, -free[nid], nid),
        )
        chosen.append(best)
        free[best] -= need
        count[best] += 1
    if len(chosen) < wanted:
        for nid, room in free.items():
            if room < need:
                reasons[nid] = _no_room(need, room, views[nid].memory_total, more=nid in chosen)
    return Plan(wanted=wanted, chosen=tuple(chosen), need=need, reasons=dict(sorted(reasons.items())))


def excluded(spec: PlacementSpec, node: NodeView, avoid: frozenset[NodeId]) -> str | None:
    if not node.alive:
        return "node is not alive"
    why = spec.allows(node.node_id)
    if why is not None:
        return why
    if node.node_id in avoid:
        return "backing off after a failed load of this placement"
    if spec.model_id not in node.models and not node.can_fetch:
        return f"does not hold model {spec.model!r}"
    if node.memory_total <= 0:
        return "reports no memory (an older worker, or one started with --model)"
    return None


def _no_room(need: int, free: int, total: int, more: bool = False) -> str:
    what = "another replica" if more else "one replica"
    return (
        f"not enough memory for {what}: needs {human_bytes(need)}, "
        f"{human_bytes(max(free, 0))} free of {human_bytes(total)}"
    )
