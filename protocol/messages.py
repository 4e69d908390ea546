"""Every message that crosses the bus, as frozen msgspec Structs with explicit string tags.

Unknown fields are ignored on decode (msgspec's default), so a newer peer may add fields without
breaking an older one. Defaults on new fields keep old frames decodable.
"""

from __future__ import annotations

import enum
from typing import Annotated, ClassVar

import msgspec

from protocol.ids import InstanceId, ModelId, NodeId, TaskId


class TaskKind(enum.StrEnum):
    TEXT_GENERATION = "TextGeneration"
    IMAGE_GENERATION = "ImageGeneration"
    IMAGE_EDITS = "ImageEdits"


class InstanceStatus(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: str
    content: str


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# ---- request parameters, one Struct per task kind, tagged by kind --------------------------


class TextGenerationParams(msgspec.Struct, frozen=True, kw_only=True, tag="TextGeneration", tag_field="kind"):
    KIND: ClassVar[TaskKind] = TaskKind.TEXT_GENERATION
    model: ModelId
    messages: tuple[ChatMessage, ...]
    max_tokens: int = 256
    # None: the model's default (its generation_config.json, else a conservative one; see
    # exo_worker.sampling_defaults). The 1.0 defaults are what these fields always had, so code
    # that builds params without them, and old peers, mean what they meant before.
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


class ImageGenerationParams(
    msgspec.Struct, frozen=True, kw_only=True, tag="ImageGeneration", tag_field="kind"
):
    KIND: ClassVar[TaskKind] = TaskKind.IMAGE_GENERATION
    model: ModelId
    prompt: str
    size: str = "512x512"
    n: int = 1
    seed: int | None = None


class ImageEditsParams(msgspec.Struct, frozen=True, kw_only=True, tag="ImageEdits", tag_field="kind"):
    KIND: ClassVar[TaskKind] = TaskKind.IMAGE_EDITS
    model: ModelId
    prompt: str
    image_b64: str
    size: str = "512x512"
    n: int = 1
    seed: int | None = None


TaskParams = TextGenerationParams | ImageGenerationParams | ImageEditsParams


# ---- worker -> master ------------------------------------------------------------------------


class InstanceReport(msgspec.Struct, frozen=True, kw_only=True):
    """One model instance as its worker sees it; part of every heartbeat (a full snapshot)."""

    instance_id: InstanceId
    model: ModelId
    kinds: tuple[TaskKind, ...] = (TaskKind.TEXT_GENERATION,)
    status: InstanceStatus = InstanceStatus.READY
    max_concurrency: int = 1
    # Relative speed; placement divides load by it, so it must be positive (checked on decode).
    capacity: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    active_tasks: tuple[TaskId, ...] = ()
    error: str | None = None


class WorkerHeartbeat(msgspec.Struct, frozen=True, kw_only=True, tag="WorkerHeartbeat", tag_field="type"):
    node_id: NodeId
    instances: tuple[InstanceReport, ...] = ()
    address: str = ""
    # Echo of the last master session the worker heard from; "" when none yet.
    master_session: str = ""


class TaskAccepted(msgspec.Struct, frozen=True, kw_only=True, tag="TaskAccepted", tag_field="type"):
    node_id: NodeId
    task_id: TaskId
    instance_id: InstanceId


class TaskChunk(msgspec.Struct, frozen=True, kw_only=True, tag="TaskChunk", tag_field="type"):
    node_id: NodeId
    task_id: TaskId
    instance_id: InstanceId
    index: int
    text: str


class TaskFinished(msgspec.Struct, frozen=True, kw_only=True, tag="TaskFinished", tag_field="type"):
    node_id: NodeId
    task_id: TaskId
    instance_id: InstanceId
    finish_reason: FinishReason
    usage: Usage = Usage()


class TaskFailed(msgspec.Struct, frozen=True, kw_only=True, tag="TaskFailed", tag_field="type"):
    node_id: NodeId
    task_id: TaskId
    instance_id: InstanceId
    reason: str
    # True when the worker never started the task (shutting down, instance not ready or unknown):
    # the master re-places it instead of failing the request.
    refused: bool = False


WorkerMessage = WorkerHeartbeat | TaskAccepted | TaskChunk | TaskFinished | TaskFailed


# ---- master -> worker ------------------------------------------------------------------------


class AssignTask(msgspec.Struct, frozen=True, kw_only=True, tag="AssignTask", tag_field="type"):
    task_id: TaskId
    node_id: NodeId
    instance_id: InstanceId
    params: TaskParams

    @property
    def kind(self) -> TaskKind:
        return self.params.KIND


class CancelTask(msgspec.Struct, frozen=True, kw_only=True, tag="CancelTask", tag_field="type"):
    task_id: TaskId
    node_id: NodeId
    instance_id: InstanceId


class MasterHeartbeat(msgspec.Struct, frozen=True, kw_only=True, tag="MasterHeartbeat", tag_field="type"):
    # A fresh id per master process: workers notice a restarted master by a new session.
    session: str
    interval: float = 1.0


MasterMessage = AssignTask | CancelTask | MasterHeartbeat
Message = WorkerMessage | MasterMessage
