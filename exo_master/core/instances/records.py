"""The instance controller's records: its settings, what it knows of each node, each replica and each
placement, the steps it logs, and the little it needs from the scheduling core."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from exo_master.core.instances.desired import PlacementSpec
from exo_master.core.instances.lifecycle import ReplicaState
from protocol.ids import InstanceId, ModelId, NodeId
from protocol.messages import InstanceReport, InstanceStatus, LocalModel
from protocol.sharding import RingPorts, ShardAssignment


class CoreSide(Protocol):
    """What the controller needs from the scheduling core."""

    def node_alive(self, node_id: NodeId) -> bool | None: ...  # None: the core forgot the node

    def in_flight(self, instance_id: InstanceId) -> int: ...

    def set_draining(self, instance_id: InstanceId) -> None: ...

    def broken(self, instance_id: InstanceId, why: str) -> None: ...  # lost its tasks: see core_side

    def set_coming(self, models: frozenset[ModelId]) -> None: ...  # being placed or loaded


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    resend: float = 1.0  # LoadInstance / UnloadInstance re-sent this often until seen done
    start_timeout: float = 10.0  # a node that never starts loading: failed
    load_timeout: float = 900.0  # from LoadInstance to ready
    drain_grace: float = 60.0  # in-flight tasks get this long once a replica drains
    backoff_initial: float = 1.0
    backoff_max: float = 30.0
    max_failures: int = 8  # failed loads in a row before a placement stops retrying
    adopt_grace: float = 3.0  # after a restore: wait for heartbeats before placing anything
    context_tokens: int = 4096
    max_events: int = 256


@dataclass(slots=True)
class NodeInfo:
    node_id: NodeId
    memory_total: int = 0
    memory_available: int = 0
    backend: str = ""
    host: str = ""
    models: dict[ModelId, LocalModel] = field(default_factory=dict)
    ring: RingPorts | None = None
    reports: dict[InstanceId, InstanceReport] = field(default_factory=dict)


@dataclass(slots=True)
class Replica:
    instance_id: InstanceId
    placement_id: str
    model: ModelId
    node_id: NodeId
    need: int
    state: ReplicaState
    since: float  # when it entered this state
    sent_at: float = float("-inf")  # last LoadInstance / UnloadInstance
    progress: float = 0.0
    memory_bytes: int = 0
    reason: str = ""
    drain_until: float = 0.0
    shard: ShardAssignment | None = None  # a rank of a sharded instance; None: a whole instance

    @classmethod
    def adopted(cls, node_id: NodeId, report: InstanceReport, now: float) -> Replica:
        """What a node reports holding for a placement (after a master restart), taken as is."""
        state = ReplicaState.READY if report.status is InstanceStatus.READY else ReplicaState.LOADING
        return cls(
            instance_id=report.instance_id,
            placement_id=report.placement,
            model=report.model,
            node_id=node_id,
            need=report.memory_bytes,
            state=state,
            since=now,
            progress=1.0 if state is ReplicaState.READY else report.progress,
            memory_bytes=report.memory_bytes,
            shard=report.shard,
        )

    @property
    def index(self) -> int | None:
        """Its number within the placement (NODE/PLACEMENT.N, and .rR after it for a rank > 0)."""
        _, _, tail = self.group.rpartition(".")
        return int(tail) if tail.isdigit() else None

    @property
    def rank(self) -> int:
        return self.shard.rank if self.shard is not None else 0

    @property
    def group(self) -> InstanceId:
        """The instance this replica is part of: rank 0's id (its own for a whole instance)."""
        return InstanceId(self.shard.group) if self.shard is not None else self.instance_id


@dataclass(slots=True)
class PlacementRecord:
    spec: PlacementSpec
    deleting: bool = False
    next_index: int = 0
    failures: int = 0  # failed loads in a row
    retry_at: float = float("-inf")
    backoff: dict[NodeId, float] = field(default_factory=dict)  # node -> until
    reason: str = ""  # why it is short of replicas, when it is


@dataclass(frozen=True, slots=True)
class InstanceEvent:
    """One step of an instance's life: logged by the shell and shown by exoctl."""

    at: float
    placement_id: str
    what: str
    instance_id: str = ""
    node_id: str = ""
    detail: str = ""
