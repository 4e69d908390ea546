"""What the placement rules see of each node: its memory, less what is placed there but not loaded
yet, the models it holds, its ring ports, and how many replicas of each placement it has."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from exo_master.core.instances.lifecycle import ReplicaState
from exo_master.core.instances.records import NodeInfo, Replica
from exo_master.core.instances.rule import NodeView
from protocol.ids import NodeId

_COMING = (ReplicaState.PLACING, ReplicaState.LOADING)


def node_views(
    nodes: Iterable[NodeInfo], replicas: Iterable[Replica], node_alive: Callable[[NodeId], bool | None]
) -> list[NodeView]:
    by_node: dict[NodeId, list[Replica]] = {}
    for replica in replicas:
        by_node.setdefault(replica.node_id, []).append(replica)
    views = []
    for info in nodes:
        alive = node_alive(info.node_id)
        if alive is None:
            continue  # forgotten by the core; the controller drops it at its next reconcile
        on_node = by_node.get(info.node_id, [])
        # Placed but not loaded yet: the node's available memory does not show it yet.
        coming = sum(max(0, r.need - r.memory_bytes) for r in on_node if r.state in _COMING)
        counts: dict[str, int] = {}
        for r in on_node:
            if r.state.live:
                counts[r.placement_id] = counts.get(r.placement_id, 0) + 1
        views.append(
            NodeView(
                node_id=info.node_id,
                alive=bool(alive),
                memory_total=info.memory_total,
                free=info.memory_available - coming,
                models=info.models,
                replicas=counts,
                ring=info.ring,
            )
        )
    return views
