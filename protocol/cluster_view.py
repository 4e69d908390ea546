"""Read-only views of the master's state, as served on GET /v1/cluster/state and read by exoctl.

They live in `protocol/` because both sides read them: the master's core builds them, and exoctl
(the operator's client) decodes them without importing the scheduler.

Field names here are a public, documented contract (`exoctl ... --json` prints them).
"""

from __future__ import annotations

import enum

import msgspec


class TaskStatus(enum.StrEnum):
    QUEUED = "queued"  # admitted, waiting at the master for a free slot (or re-placement)
    PENDING = "pending"  # assigned; counted by the ledger until the worker confirms
    RUNNING = "running"  # confirmed by the worker; counted by the instance's confirmed set
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL


FINAL = frozenset({TaskStatus.FINISHED, TaskStatus.FAILED, TaskStatus.CANCELLED})


class InstanceRow(msgspec.Struct, frozen=True, kw_only=True):
    instance_id: str
    node_id: str
    model: str
    kinds: list[str]
    status: str  # loading | ready | failed | dead (its node stopped heartbeating)
    in_flight: int  # confirmed by the worker
    pending: int  # assigned, awaiting the worker's confirmation (the ledger)
    queued: int  # waiting at the master for this instance's model
    capacity: float
    max_concurrency: int
    completed: int
    failed: int
    error: str | None = None
    # The instance's prompt (KV) cache, as its worker reports it (0 when it has none).
    prompt_cache_hits: int = 0
    prompt_cache_misses: int = 0
    prompt_cache_bytes: int = 0
    # Prompt tokens the cache spared the model, and all prompt tokens: their ratio is the saving.
    prompt_cache_reused_tokens: int = 0
    prompt_tokens: int = 0
    # The engine's work as its worker last reported it (placement by work): prompt tokens still to
    # prefill, sequences decoding, requests waiting for a batch slot; `unowned`: tasks the engine
    # still runs that no live task here owns (a cancelled prompt being stopped): they keep a slot.
    prefill_tokens: int = 0
    decoding: int = 0
    engine_waiting: int = 0
    unowned: int = 0
    # Measured speeds (0: not measured yet), the chars-per-token ratio the master estimates prompt
    # tokens with, the model's context length (0: unknown), and the master's estimate of the
    # seconds before a short request placed there now would get its first token.
    prefill_rate: float = 0.0
    decode_rate: float = 0.0
    chars_per_token: float = 0.0
    context_length: int = 0
    first_token_wait: float = 0.0


class NodeRow(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str
    address: str
    alive: bool
    subscribed: bool
    last_heartbeat_age: float  # seconds
    instances: list[str]
    sequence_gaps: int = 0
    # What the node reports about itself (0 / "" from workers that predate it).
    memory_total: int = 0  # bytes
    memory_available: int = 0
    backend: str = ""  # mlx-metal | mlx-cpu | sim


class TaskRow(msgspec.Struct, frozen=True, kw_only=True):
    task_id: str
    kind: str
    model: str
    status: str
    instance_id: str | None
    node_id: str | None
    age: float  # seconds since submission
    attempts: int
    error: str | None = None


class ModelRow(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    instances: int
    ready: int
    queued: int


class ClusterView(msgspec.Struct, frozen=True, kw_only=True):
    policy: str
    session: str
    nodes: list[NodeRow]
    instances: list[InstanceRow]
    models: list[ModelRow]
    tasks: list[TaskRow]
    # True when the master runs a plaintext bus on a reachable address (--insecure).
    insecure: bool = False
    # Prefix-aware placement: on (the policy takes it and --no-prefix-affinity is not set), the chat
    # placements for which some instance held a prefix of the chat, and how many went to it.
    prefix_affinity: bool = False
    affinity_lookups: int = 0
    affinity_hits: int = 0
