"""Builders for driving MasterCore in tests: nodes, heartbeats, requests, effect filters."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

from exo_master.core import CoreConfig, MasterCore
from exo_master.events import Effect, NodeSubscribed, SubmitTask, TaskPlaced
from protocol.ids import InstanceId, ModelId, NodeId, TaskId
from protocol.messages import (
    ChatMessage,
    ImageEditsParams,
    ImageGenerationParams,
    InstanceReport,
    InstanceStatus,
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
) -> InstanceReport:
    return InstanceReport(
        instance_id=instance_of(i),
        model=model,
        kinds=kinds,
        status=status,
        max_concurrency=max_concurrency,
        capacity=capacity,
        active_tasks=tuple(active),
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


def submit(core: MasterCore, task_id: str, now: float = 0.0, kind: TaskKind = TaskKind.TEXT_GENERATION) -> list[Effect]:
    return core.handle(SubmitTask(task_id=TaskId(task_id), params=params(kind)), now)


def only(effects: Iterable[object], cls: type[E]) -> list[E]:
    return [e for e in effects if isinstance(e, cls)]


def placement_of(effects: Iterable[object]) -> TaskPlaced | None:
    placed = only(effects, TaskPlaced)
    assert len(placed) <= 1
    return placed[0] if placed else None
