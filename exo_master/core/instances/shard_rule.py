"""Placing sharded instances: K ranks on K nodes, each with its ring port (pure).

A sharded placement asks for `replicas` instances of `shards` ranks each. One instance at a time:
    - the nodes that could take a rank: alive, allowed by the placement, not backing off, holding
      the model, and able to run a rank (they report a ring port range; sim workers and workers
      started with --model do not);
    - `core.shard_plan.plan_shards` chooses K of them by free memory and splits the model (tensor:
      every rank a slice of every layer; pipeline: layer ranges by memory share), or says why not
      (heads that do not divide, not enough memory, not enough nodes);
    - each rank gets a port from its node's range (rank 0 two: the ring's and the control
      channel's), never one another rank on the same host holds, starting after the last one
      given out there, so a port just freed is not reused at once (a killed rank's socket may
      linger).
The next instance sees the memory and ports the previous ones took.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from exo_master.core.instances.desired import PlacementSpec
from exo_master.core.instances.memory import DEFAULT_CONTEXT_TOKENS
from exo_master.core.instances.rule import NodeView, Plan, RankPlace, excluded, model_info
from exo_master.core.shard_plan import Candidate, Impossible, ModelShape, RankAssignment, plan_shards
from protocol.ids import NodeId
from protocol.sharding import RingPorts


@dataclass(slots=True)
class PortBook:
    """The ring ports taken on each host, and where the next search starts (the controller's)."""

    taken: dict[str, set[int]]
    cursor: dict[str, int]

    def take(self, ring: RingPorts, count: int) -> list[int] | None:
        """`count` free ports from `ring`'s range (None: not that many free), marked taken."""
        used = self.taken.setdefault(ring.host, set())
        span = ring.last - ring.first + 1
        start = self.cursor.get(ring.host, ring.first)
        start = start if ring.first <= start <= ring.last else ring.first
        got: list[int] = []
        for offset in range(span):
            port = ring.first + (start - ring.first + offset) % span
            if port not in used:
                got.append(port)
                if len(got) == count:
                    used.update(got)
                    self.cursor[ring.host] = ring.first + (port - ring.first + 1) % span
                    return got
        return None


def plan_sharded(
    spec: PlacementSpec,
    wanted: int,
    nodes: Sequence[NodeView],
    ports: PortBook,
    avoid: frozenset[NodeId] = frozenset(),
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
) -> Plan:
    """Plan `wanted` more instances of `spec`, `spec.shards` ranks each. `ports` is updated with the
    ports the planned ranks take (pass a copy for a preview)."""
    info = model_info(spec, nodes)
    if info is None:
        nowhere = {n.node_id: f"does not hold model {spec.model!r}" for n in nodes}
        return Plan(wanted=wanted, chosen=(), need=0, reasons=dict(sorted(nowhere.items())))
    if info.shape is None:
        problem = (
            f"the shape of {spec.model!r} is unknown (its config.json lacks fields): it cannot be sharded"
        )
        return Plan(wanted=wanted, chosen=(), need=0, reasons={}, problems=(problem,))
    shape = ModelShape.from_report(info.shape, info.weights_bytes or info.size_bytes)
    reasons: dict[NodeId, str] = {}
    free: dict[NodeId, int] = {}
    views = {n.node_id: n for n in nodes}
    for node in nodes:
        why = excluded(spec, node, avoid)
        if why is None and node.ring is None:
            why = "cannot run a rank (no ring ports: a sim worker, or one started with --model)"
        if why is None:
            free[node.node_id] = node.free
        else:
            reasons[node.node_id] = why
    groups: list[tuple[RankPlace, ...]] = []
    problems: tuple[str, ...] = ()
    for _ in range(wanted):
        candidates = [Candidate(nid, room) for nid, room in sorted(free.items())]
        result = plan_shards(
            shape,
            candidates,
            spec.shards,
            spec.sharding,
            kv_reserve_tokens=context_tokens * spec.max_concurrency,
        )
        if isinstance(result, Impossible):
            problems = result.reasons
            break
        group = _with_ports(result.ranks, views, ports)
        if group is None:
            problems = ("no free ring ports left on the chosen nodes",)
            break
        for place in group:
            free[place.node_id] -= place.need
        groups.append(group)
    return Plan(
        wanted=wanted,
        chosen=tuple(g[0].node_id for g in groups),
        need=max((r.need for g in groups for r in g), default=0),
        reasons=dict(sorted(reasons.items())),
        groups=tuple(groups),
        problems=problems if len(groups) < wanted else (),
    )


def _with_ports(
    ranks: Sequence[RankAssignment], views: Mapping[NodeId, NodeView], ports: PortBook
) -> tuple[RankPlace, ...] | None:
    places = []
    for assignment in ranks:
        node_id = NodeId(assignment.node_id)
        ring = views[node_id].ring
        assert ring is not None, f"{node_id} was a candidate without ring ports"
        got = ports.take(ring, 2 if assignment.rank == 0 else 1)
        if got is None:
            return None
        places.append(
            RankPlace(
                rank=assignment.rank,
                node_id=node_id,
                address=f"{ring.host}:{got[0]}",
                control=f"{ring.host}:{got[1]}" if assignment.rank == 0 else "",
                layers=(assignment.layer_start, assignment.layer_end),
                need=assignment.bytes_needed,
            )
        )
    return tuple(places)
