"""The task lifecycle: every status a task can be in, and every move between them, in one table.

    queued --place--> pending --confirm--> running --finish--> finished
       ^                 |                    |
       +-----unbind------+--------------------+      (a lost attempt: expiry, evacuation, refusal)
    queued | pending | running --fail--> failed      --cancel--> cancelled

`advance(task, trigger)` is the only way a task's status changes; a move the table does not list is
a broken invariant of the core and fails loudly (like h11's `_state.py` or dask's
`_TRANSITIONS_TABLE`). What each move does to the counters (ledger, confirmed sets, queues) lives
in `tasks.TaskBook`, which calls `advance` and nothing else does.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from protocol.cluster_view import TaskStatus
from protocol.ids import InstanceId, ModelId, NodeId, TaskId
from protocol.messages import FinishReason, TaskFinished, TaskKind, TaskParams, Usage


class Trigger(enum.StrEnum):
    PLACE = "place"  # a policy chose an instance with a free slot
    CONFIRM = "confirm"  # TaskAccepted, output, or a snapshot listing the task, from its instance
    UNBIND = "unbind"  # the attempt is lost (expired, instance gone or not ready, worker refused)
    FINISH = "finish"  # the bound instance reported a result
    FAIL = "fail"  # worker failure, output lost with its node, no instance left, tries spent
    CANCEL = "cancel"  # the client went away or an operator cancelled


Q, P, R = TaskStatus.QUEUED, TaskStatus.PENDING, TaskStatus.RUNNING
TRANSITIONS: dict[tuple[TaskStatus, Trigger], TaskStatus] = {
    (Q, Trigger.PLACE): P,
    (P, Trigger.CONFIRM): R,
    (P, Trigger.UNBIND): Q,
    (R, Trigger.UNBIND): Q,  # only while no output has reached the client
    # A result from the bound instance also confirms (its TaskAccepted may have been lost).
    (P, Trigger.FINISH): TaskStatus.FINISHED,
    (R, Trigger.FINISH): TaskStatus.FINISHED,
    **{(s, Trigger.FAIL): TaskStatus.FAILED for s in (Q, P, R)},
    **{(s, Trigger.CANCEL): TaskStatus.CANCELLED for s in (Q, P, R)},
}


class IllegalTransition(AssertionError):
    """The core tried a move the lifecycle table does not allow: a bug, never an input error."""


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
    next_chunk: int = 0  # the next output index the client gets: everything before it was delivered
    held: dict[int, str] = field(default_factory=dict)  # chunks that arrived early (reorder window)
    final: TaskFinished | None = None  # a TaskFinished that arrived before all its chunks
    fetches: int = 0  # FetchOutput requests sent for the current attempt
    queued_at: float = 0.0  # when it last started waiting in a queue (for --queue-timeout)
    # Prefix affinity (affinity.py): the chat's hash chain from its first reply on, the hash of all
    # its messages (empty: no affinity), and a running hash of the reply so far, which becomes the
    # next turn's prefix when the task completes.
    prefixes: tuple[bytes, ...] = ()
    chat_hash: bytes = b""
    reply_hash: Any = None
    # Why the last attempt was lost, and where: re-placement avoids that instance if it can.
    lost_reason: str | None = None
    lost_on: InstanceId | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None
    usage: Usage | None = None

    @property
    def kind(self) -> TaskKind:
        return self.params.KIND

    @property
    def model(self) -> ModelId:
        return self.params.model


def advance(task: TaskRecord, trigger: Trigger) -> TaskStatus:
    """Move `task` along the table and return its new status; an unlisted move raises."""
    new = TRANSITIONS.get((task.status, trigger))
    if new is None:
        raise IllegalTransition(f"task {task.task_id}: no transition from {task.status} on {trigger}")
    task.status = new
    return new
