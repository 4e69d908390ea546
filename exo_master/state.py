"""The master's projection of the cluster: nodes, instances and live tasks, as workers report them.

Mutable records with incrementally kept counters; the core is the only writer. Per-instance
confirmed in-flight is the set of RUNNING tasks bound to it, so a load lookup is O(1).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass, field

from protocol.ids import InstanceId, ModelId, NodeId, TaskId
from protocol.messages import FinishReason, InstanceStatus, TaskKind, TaskParams, Usage


class TaskStatus(enum.StrEnum):
    QUEUED = "queued"  # waiting at the master for a free slot
    PENDING = "pending"  # assigned; counted by the ledger until the worker confirms
    RUNNING = "running"  # confirmed by the worker; counted by the state
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset({TaskStatus.FINISHED, TaskStatus.FAILED, TaskStatus.CANCELLED})


@dataclass(slots=True)
class TaskRecord:
    task_id: TaskId
    params: TaskParams
    submitted_at: float
    admission: int = 0  # the core's running count of admitted requests: orders them by age
    status: TaskStatus = TaskStatus.QUEUED
    instance_id: InstanceId | None = None
    node_id: NodeId | None = None
    assigned_at: float | None = None
    ended_at: float | None = None
    attempts: int = 0
    next_chunk: int = 0
    finish_reason: FinishReason | None = None
    error: str | None = None
    usage: Usage | None = None

    @property
    def kind(self) -> TaskKind:
        return self.params.KIND

    @property
    def model(self) -> ModelId:
        return self.params.model


@dataclass(slots=True)
class InstanceView:
    instance_id: InstanceId
    node_id: NodeId
    model: ModelId
    kinds: tuple[TaskKind, ...]
    status: InstanceStatus
    max_concurrency: int
    capacity: float
    error: str | None = None
    confirmed: set[TaskId] = field(default_factory=set)
    completed: int = 0
    failed: int = 0
    retired: bool = False  # being removed: never eligible again


@dataclass(slots=True)
class NodeView:
    node_id: NodeId
    last_seen: float
    address: str = ""
    alive: bool = True
    subscribed: bool = False
    instances: set[InstanceId] = field(default_factory=set)
    master_session: str = ""


class ClusterState:
    def __init__(self, recent_limit: int = 2048) -> None:
        self.nodes: dict[NodeId, NodeView] = {}
        self.instances: dict[InstanceId, InstanceView] = {}
        self.by_model: dict[ModelId, dict[InstanceId, InstanceView]] = {}
        self.tasks: dict[TaskId, TaskRecord] = {}  # live (not final) tasks only
        # Final tasks, newest last, bounded: for display and for recognising late worker events.
        self.recent: OrderedDict[TaskId, TaskRecord] = OrderedDict()
        self._recent_limit = recent_limit

    def task(self, task_id: TaskId) -> TaskRecord | None:
        return self.tasks.get(task_id) or self.recent.get(task_id)

    def add_instance(self, inst: InstanceView) -> None:
        assert inst.instance_id not in self.instances, f"instance {inst.instance_id} exists"
        self.instances[inst.instance_id] = inst
        self.by_model.setdefault(inst.model, {})[inst.instance_id] = inst
        self.nodes[inst.node_id].instances.add(inst.instance_id)

    def remove_instance(self, instance_id: InstanceId) -> InstanceView:
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

    def finalize(self, task: TaskRecord) -> None:
        """Move a task that just reached a final status out of the live set."""
        assert task.status.is_final, f"task {task.task_id} finalized in status {task.status}"
        self.tasks.pop(task.task_id, None)
        self.recent[task.task_id] = task
        while len(self.recent) > self._recent_limit:
            self.recent.popitem(last=False)
