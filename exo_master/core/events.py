"""What goes into the core besides worker messages, and what comes out of it.

Inputs from the master's own shells (API, bus) are plain frozen Structs, like the wire messages, so
the core has one `handle(event, now)` entry point. Outputs are either wire messages for a worker
(AssignTask, CancelTask, MasterHeartbeat) or client-facing results the API shell routes to the
waiting HTTP request. A `Step` carries them: one per event (or tick), passed down explicitly to
whatever may emit, and returned whole.
"""

from __future__ import annotations

import enum

import msgspec

from exo_master.core.instances.records import InstanceEvent
from protocol.ids import InstanceId, NodeId, TaskId
from protocol.messages import (
    FinishReason,
    MasterMessage,
    TaskParams,
    ToolCall,
    Usage,
    WorkerMessage,
)

# ---- inputs -------------------------------------------------------------------------------------


class SubmitTask(msgspec.Struct, frozen=True, kw_only=True):
    task_id: TaskId
    params: TaskParams


class CancelRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A client went away or an operator cancelled: stop the task wherever it is."""

    task_id: TaskId
    reason: str = "cancelled by client"


class NodeSubscribed(msgspec.Struct, frozen=True, kw_only=True):
    """The master's XPUB saw the node subscribe to its topic: assignments can now reach it."""

    node_id: NodeId


class NodeUnsubscribed(msgspec.Struct, frozen=True, kw_only=True):
    node_id: NodeId


MasterEvent = SubmitTask | CancelRequest | NodeSubscribed | NodeUnsubscribed
CoreInput = MasterEvent | WorkerMessage

# ---- outputs ------------------------------------------------------------------------------------


class RejectReason(enum.StrEnum):
    UNKNOWN_MODEL = "unknown_model"  # HTTP 404
    UNSUPPORTED_KIND = "unsupported_kind"  # HTTP 400
    NO_LIVE_INSTANCE = "no_live_instance"  # HTTP 503
    QUEUE_FULL = "queue_full"  # HTTP 429
    DUPLICATE_TASK = "duplicate_task"  # HTTP 409


class TaskPlaced(msgspec.Struct, frozen=True, kw_only=True):
    task_id: TaskId
    instance_id: InstanceId
    node_id: NodeId
    policy: str
    attempt: int
    # The chosen instance's load (confirmed + pending as the policy saw it) before this task.
    load_before: int
    waited: float  # seconds spent in the wait queue (0 when placed at once)


class TaskQueued(msgspec.Struct, frozen=True, kw_only=True):
    task_id: TaskId
    position: int  # 1-based, in its model's queue


class TaskRejected(msgspec.Struct, frozen=True, kw_only=True):
    task_id: TaskId
    reason: RejectReason
    message: str


class TaskOutput(msgspec.Struct, frozen=True, kw_only=True):
    task_id: TaskId
    index: int
    text: str


class TaskCompleted(msgspec.Struct, frozen=True, kw_only=True):
    task_id: TaskId
    finish_reason: FinishReason
    usage: Usage
    tool_calls: tuple[ToolCall, ...] = ()
    # The stop string the worker says ended the answer (the HTTP path reports it only if the
    # request asked for it: see http/api.py `ending`).
    stop_sequence: str | None = None


class TaskErrored(msgspec.Struct, frozen=True, kw_only=True):
    """The task ended without a result: worker failure, node loss, no instance left, retries spent."""

    task_id: TaskId
    message: str
    # True when the failure is the cluster's (node lost, no instance): HTTP 503 rather than 500.
    unavailable: bool = False
    # True when an operator (or the master's API) cancelled the task.
    cancelled: bool = False
    # The worker's code for a request error (context_length_exceeded: HTTP 400); None otherwise.
    code: str | None = None


ClientEffect = TaskPlaced | TaskQueued | TaskRejected | TaskOutput | TaskCompleted | TaskErrored
WorkerEffect = MasterMessage  # every master -> worker message is some step's effect
# InstanceEvent: a step of an instance's life (placed, loading, ready, draining...), for the log.
Effect = ClientEffect | WorkerEffect | InstanceEvent


class Step:
    """One application of an event (or a tick) to the core: the time it happens at, and the effects
    it emits, in order. `MasterCore` makes one per call and returns its effects; every part of the
    core that may emit takes the step as an argument, so a reader sees where each message comes from."""

    __slots__ = ("effects", "now")

    def __init__(self, now: float) -> None:
        self.now = now
        self.effects: list[Effect] = []

    def emit(self, effect: Effect) -> None:
        self.effects.append(effect)
