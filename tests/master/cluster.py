"""Builders for driving MasterCore in tests: nodes, heartbeats, requests, effect filters."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TypeVar

from exo_master.core import CoreConfig, MasterCore
from exo_master.core.events import Effect, NodeSubscribed, SubmitTask, TaskPlaced
from protocol.cluster_view import TaskStatus
from protocol.ids import InstanceId, ModelId, NodeId, TaskId
from protocol.messages import (
    ChatMessage,
    FinishReason,
    ImageEditsParams,
    ImageGenerationParams,
    InstanceReport,
    InstanceStatus,
    TaskAccepted,
    TaskChunk,
    TaskFailed,
    TaskFinished,
    TaskKind,
    TaskParams,
    TextGenerationParams,
    WorkerHeartbeat,
)

MODEL = ModelId("m")
ALL_KINDS = (TaskKind.TEXT_GENERATION, TaskKind.IMAGE_GENERATION, TaskKind.IMAGE_EDITS)
E = TypeVar("E")


def node_of(i: int) -> NodeId:
    return NodeId(f"node{i}")


def instance_of(i: int) -> InstanceId:
    return InstanceId(f"node{i}/0")


def report(
    i: int,
    *,
    model: ModelId = MODEL,
    capacity: float = 1.0,
    max_concurrency: int = 10_000,
    status: InstanceStatus = InstanceStatus.READY,
    active: Iterable[TaskId] = (),
    kinds: tuple[TaskKind, ...] = ALL_KINDS,
    finished: Iterable[TaskId] = (),
) -> InstanceReport:
    return InstanceReport(
        instance_id=instance_of(i),
        model=model,
        kinds=kinds,
        status=status,
        max_concurrency=max_concurrency,
        capacity=capacity,
        active_tasks=tuple(active),
        finished_tasks=tuple(finished),
    )


def heartbeat(i: int, *reports: InstanceReport) -> WorkerHeartbeat:
    return WorkerHeartbeat(node_id=node_of(i), instances=reports)


def params(kind: TaskKind = TaskKind.TEXT_GENERATION, model: ModelId = MODEL) -> TaskParams:
    match kind:
        case TaskKind.TEXT_GENERATION:
            return TextGenerationParams(model=model, messages=(ChatMessage(role="user", content="hi"),))
        case TaskKind.IMAGE_GENERATION:
            return ImageGenerationParams(model=model, prompt="a cat")
        case TaskKind.IMAGE_EDITS:
            return ImageEditsParams(model=model, prompt="hat", image_b64="AAAA")


def cluster(
    k: int,
    *,
    policy: str = "least-loaded",
    capacities: Sequence[float] | None = None,
    max_concurrency: int = 10_000,
    queue_limit: int = 256,
    now: float = 0.0,
    **config: float,
) -> MasterCore:
    """A core with k ready, subscribed single-instance nodes of MODEL."""
    core = MasterCore(CoreConfig(policy=policy, queue_limit=queue_limit, **config))  # type: ignore[arg-type]
    for i in range(k):
        cap = capacities[i] if capacities else 1.0
        core.handle(NodeSubscribed(node_id=node_of(i)), now)
        core.handle(heartbeat(i, report(i, capacity=cap, max_concurrency=max_concurrency)), now)
    return core


def submit(
    core: MasterCore, task_id: str, now: float = 0.0, kind: TaskKind = TaskKind.TEXT_GENERATION
) -> list[Effect]:
    return core.handle(SubmitTask(task_id=TaskId(task_id), params=params(kind)), now)


def only(effects: Iterable[object], cls: type[E]) -> list[E]:
    return [e for e in effects if isinstance(e, cls)]


def placement_of(effects: Iterable[object]) -> TaskPlaced | None:
    placed = only(effects, TaskPlaced)
    assert len(placed) <= 1
    return placed[0] if placed else None


# ---- worker replies -------------------------------------------------------------------------------


def accept(core: MasterCore, placed: TaskPlaced, now: float = 0.0) -> list[Effect]:
    """The worker confirms a placement (TaskAccepted from the node the task was placed on)."""
    return core.handle(
        TaskAccepted(node_id=placed.node_id, task_id=placed.task_id, instance_id=placed.instance_id), now
    )


def finish(core: MasterCore, placed: TaskPlaced, now: float = 0.0) -> list[Effect]:
    return core.handle(
        TaskFinished(
            node_id=placed.node_id,
            task_id=placed.task_id,
            instance_id=placed.instance_id,
            finish_reason=FinishReason.STOP,
        ),
        now,
    )


def fail(core: MasterCore, placed: TaskPlaced, now: float = 0.0, reason: str = "boom") -> list[Effect]:
    return core.handle(
        TaskFailed(
            node_id=placed.node_id, task_id=placed.task_id, instance_id=placed.instance_id, reason=reason
        ),
        now,
    )


def chunk(
    core: MasterCore, placed: TaskPlaced, index: int, now: float = 0.0, text: str = "x"
) -> list[Effect]:
    return core.handle(
        TaskChunk(
            node_id=placed.node_id,
            task_id=placed.task_id,
            instance_id=placed.instance_id,
            index=index,
            text=text,
        ),
        now,
    )


# ---- bursts and loads -----------------------------------------------------------------------------


def burst(
    core: MasterCore, n: int, now: float = 0.0, prefix: str = "t", kinds: Sequence[TaskKind] = ()
) -> list[TaskPlaced]:
    """Submit n requests back to back (no worker reply in between); return their placements.

    With `kinds`, request i is of kind kinds[i % len(kinds)]; otherwise all are text generation.
    """
    placed = []
    for i in range(n):
        kind = kinds[i % len(kinds)] if kinds else TaskKind.TEXT_GENERATION
        p = placement_of(submit(core, f"{prefix}{i}", now, kind))
        assert p is not None, f"request {prefix}{i} was not placed"
        placed.append(p)
    return placed


def per_instance(placements: Iterable[TaskPlaced]) -> Counter[InstanceId]:
    return Counter(p.instance_id for p in placements)


def loads(core: MasterCore) -> dict[InstanceId, int]:
    """Every instance's load as the core counts it (confirmed + pending + unowned)."""
    return {iid: core.load(inst) for iid, inst in core.state.instances.items()}


def recount_loads(core: MasterCore) -> dict[InstanceId, int]:
    """Every instance's load recounted from the task records, plus the work its engine still holds
    for no task (cancelled, or moved elsewhere, until a heartbeat says it let go)."""
    counts = {iid: len(inst.unowned) for iid, inst in core.state.instances.items()}
    for task in core.book.live.values():
        if task.status in (TaskStatus.PENDING, TaskStatus.RUNNING):
            assert task.instance_id is not None
            counts[task.instance_id] += 1
    return counts
