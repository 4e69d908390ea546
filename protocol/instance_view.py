"""Read-only rows of /v1/instances: placements (the master's desired state with what is actually
loaded), their replicas and recent steps, and placement previews. In `protocol/` because exoctl
decodes them too. Field names are a public contract (`exoctl instances ... --json` prints them).
"""

from __future__ import annotations

import msgspec


class ReplicaRow(msgspec.Struct, frozen=True, kw_only=True):
    instance_id: str
    node_id: str
    state: str  # placing | loading | ready | draining | unloading | failed
    progress: float  # while loading, 0..1
    memory_bytes: int
    reason: str = ""
    # A rank of a sharded instance: its rank, its instance (rank 0's id) and its ring address.
    rank: int | None = None
    group: str = ""
    address: str = ""


class EventRow(msgspec.Struct, frozen=True, kw_only=True):
    age: float  # seconds ago
    what: str  # placed, load, loading, ready, failed, draining, unloading, gone, adopted, ...
    instance_id: str = ""
    node_id: str = ""
    detail: str = ""


class PlacementRow(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    model: str
    # placing | loading | ready | degraded (fewer ready than asked) | draining | failed (gave up)
    status: str
    managed: bool  # False: an instance a worker declared itself (--model)
    replicas: int  # asked for
    ready: int
    nodes: list[str]
    max_concurrency: int
    capacity: float
    need_bytes: int  # memory one replica needs (0 when unknown)
    reason: str = ""
    instances: list[ReplicaRow] = []
    events: list[EventRow] = []
    shards: int = 1  # ranks per replica (1: each replica is one node's)
    sharding: str = ""  # tensor | pipeline, when sharded


class PlanView(msgspec.Struct, frozen=True, kw_only=True):
    """Where a placement would go and why (the preview, and the body of a 409)."""

    model: str
    replicas: int
    fits: bool
    need_bytes: int
    nodes: list[str]  # chosen, one per replica that fits (a sharded replica: its rank 0's node)
    reasons: dict[str, str]  # node -> why it took no replica (or no further one)
    shards: int = 1
    sharding: str = ""
    # Sharded: the ranks of each replica that fits, and why the others do not (heads that do not
    # divide by the shard count, not enough memory or nodes).
    ranks: list[list[RankPlanRow]] = []
    problems: list[str] = []


class RankPlanRow(msgspec.Struct, frozen=True, kw_only=True):
    rank: int
    node_id: str
    address: str  # its ring socket
    layers: list[int]  # [start, end)
    need_bytes: int
