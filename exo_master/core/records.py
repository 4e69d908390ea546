"""The master's projection of the cluster's machines: nodes and their model instances.

Mutable records, written only by the core, with the per-instance counters kept incrementally: the
set of RUNNING tasks bound to an instance is its confirmed load, so a load lookup is O(1). An
instance's phase changes only along `instance_state.PHASE_MOVES`. Tasks live in `tasks.TaskBook`;
the read-only rows served to clients are built by `view`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from exo_master.core.instance_state import Phase
from protocol.ids import InstanceId, ModelId, NodeId, TaskId
from protocol.messages import InstanceWork, PromptCacheStats, TaskKind


@dataclass(slots=True)
class InstanceRecord:
    instance_id: InstanceId
    node_id: NodeId
    model: ModelId
    kinds: tuple[TaskKind, ...]
    phase: Phase  # changed only by instance_state.move
    max_concurrency: int
    capacity: float
    error: str | None = None
    prompt_cache: PromptCacheStats | None = None  # from the latest heartbeat
    confirmed: set[TaskId] = field(default_factory=set)
    completed: int = 0
    failed: int = 0
    # From the latest heartbeat: the engine's work and speeds, the model's context length, and the
    # task ids the worker listed as active (work for tasks bound since is estimated by the master).
    work: InstanceWork | None = None
    context_length: int = 0
    reported: frozenset[TaskId] = frozenset()
    # Tasks the engine still holds that no live task here owns (cancelled, or moved elsewhere):
    # they occupy a slot until the worker's report says the engine let go.
    unowned: frozenset[TaskId] = frozenset()


@dataclass(slots=True)
class NodeRecord:
    node_id: NodeId
    last_seen: float
    address: str = ""
    alive: bool = True  # heard from within the liveness window (instance_state.Link)
    subscribed: bool = False  # the master's XPUB saw its subscription
    instances: set[InstanceId] = field(default_factory=set)
    master_session: str = ""


class ClusterState:
    def __init__(self) -> None:
        self.nodes: dict[NodeId, NodeRecord] = {}
        self.instances: dict[InstanceId, InstanceRecord] = {}
        self.by_model: dict[ModelId, dict[InstanceId, InstanceRecord]] = {}
        # Models with an instance the master is placing or loading (the instance controller's
        # word): requests for them wait for it instead of failing while the placement heals.
        self.coming_models: frozenset[ModelId] = frozenset()

    def add_instance(self, inst: InstanceRecord) -> None:
        assert inst.instance_id not in self.instances, f"instance {inst.instance_id} exists"
        self.instances[inst.instance_id] = inst
        self.by_model.setdefault(inst.model, {})[inst.instance_id] = inst
        self.nodes[inst.node_id].instances.add(inst.instance_id)

    def remove_instance(self, instance_id: InstanceId) -> InstanceRecord:
        inst = self.instances.pop(instance_id)
        assert not inst.confirmed, f"instance {instance_id} removed with confirmed tasks"
        models = self.by_model[inst.model]
        del models[instance_id]
        if not models:
            del self.by_model[inst.model]
        node = self.nodes.get(inst.node_id)
        if node is not None:
            node.instances.discard(instance_id)
        return inst

    def node_alive(self, inst: InstanceRecord) -> bool:
        node = self.nodes.get(inst.node_id)
        return node is not None and node.alive
