"""The task lifecycle: every status a task can be in, every move between them, and what each move
does, in one table.

    queued --place--> pending --confirm--> running --finish--> finished
       ^                 |                    |
       +-----unbind------+--------------------+      (a lost attempt: expiry, evacuation, refusal)
    queued | pending | running --fail--> failed      --cancel--> cancelled

`TRANSITIONS` has one row per (status, cause): the new status, the guard the move needs (if any),
and the effects applied with it, in order (in the spirit of dask's transitions table). The effects
keep every count that depends on a task's status right: the wait queues, the pending ledger, the
instances' confirmed sets, the AssignTask re-send schedule, the candidate pools (every effect that
changes an instance's load re-indexes it), the ended records, and the client's final answer.

`advance(book, task, cause, step)` is the only way a task's status changes; a move the table does
not list, or whose guard does not hold, is a broken invariant of the core and fails loudly (like
h11's `_state.py`). A cause is the trigger with what the move needs to know (`Place(instance)`,
`Fail(message)`...); callers ask `permits(task, Unbind)` where a guard decides between two moves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from exo_master.core.affinity import reply_hasher
from exo_master.core.events import Step, TaskCompleted, TaskErrored
from protocol.cluster_view import TaskStatus
from protocol.ids import InstanceId, ModelId, NodeId, TaskId
from protocol.messages import FinishReason, TaskFinished, TaskKind, TaskParams, ToolCall, Usage

if TYPE_CHECKING:
    from exo_master.core.records import InstanceRecord
    from exo_master.core.tasks import TaskBook


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


# ---- causes: the trigger of a move and what its effects need ------------------------------------


@dataclass(frozen=True, slots=True)
class Place:
    """A policy chose an instance with a free slot."""

    instance: InstanceRecord


@dataclass(frozen=True, slots=True)
class Confirm:
    """TaskAccepted, output, a result, or a snapshot listing the task, from its instance."""


@dataclass(frozen=True, slots=True)
class Unbind:
    """The attempt is lost (expired, instance gone or not ready, worker refused or gave it up)."""

    why: str


@dataclass(frozen=True, slots=True)
class Finish:
    """The bound instance's result arrived, with all of its output."""

    reason: FinishReason
    usage: Usage | None
    tool_calls: tuple[ToolCall, ...] = ()  # parsed from the output by the worker, if the request had tools
    stop_sequence: str | None = None  # the stop string the worker says ended the answer


@dataclass(frozen=True, slots=True)
class Fail:
    """Worker failure, output lost, no instance left, tries or wait time spent."""

    message: str
    unavailable: bool = False  # the cluster's fault (HTTP 503), not the request's
    code: str | None = None  # names a request error (context_length_exceeded: HTTP 400)


@dataclass(frozen=True, slots=True)
class Cancel:
    """The client went away or an operator cancelled."""

    reason: str


Cause = Place | Confirm | Unbind | Finish | Fail | Cancel
CONFIRM = Confirm()
C = TypeVar("C")
MoveEffect = Callable[["TaskBook", TaskRecord, C, Step], None]


@dataclass(frozen=True, slots=True)
class Move(Generic[C]):
    to: TaskStatus
    effects: tuple[MoveEffect[C], ...]
    guard: Callable[[TaskRecord], bool] | None = None


class IllegalTransition(AssertionError):
    """The core tried a move the lifecycle table does not allow: a bug, never an input error."""


# ---- guards -------------------------------------------------------------------------------------


def nothing_delivered(task: TaskRecord) -> bool:
    """No output of this attempt reached the client: running it again elsewhere gives the same kind
    of answer. Once text went out, a second run would not continue it, so the task fails instead."""
    return task.next_chunk == 0


# ---- effects: leaving a status (what it held) ---------------------------------------------------


def leave_queue(book: TaskBook, task: TaskRecord, cause: object, step: Step) -> None:
    book.queues.remove(task.task_id)  # a task placed at admission never waited: nothing to remove


def drop_reservation(book: TaskBook, task: TaskRecord, cause: object, step: Step) -> None:
    assert task.instance_id is not None
    book.ledger.release(task.task_id)  # idempotent: an expired entry is already gone
    book.resend.pop(task.task_id, None)
    inst = book.state.instances.get(task.instance_id)
    if inst is not None:
        book.candidates.reindex(inst)


def leave_instance(book: TaskBook, task: TaskRecord, cause: object, step: Step) -> None:
    assert task.instance_id is not None
    inst = book.state.instances.get(task.instance_id)
    assert inst is not None, f"running task {task.task_id} on unknown instance"
    inst.confirmed.discard(task.task_id)
    book.candidates.reindex(inst)


# ---- effects: entering a status -----------------------------------------------------------------


def reserve(book: TaskBook, task: TaskRecord, cause: Place, step: Step) -> None:
    """Count the task on its instance at once (the ledger), before any worker has heard of it."""
    inst = cause.instance
    book.ledger.reserve(task.task_id, inst.instance_id, step.now)
    task.instance_id, task.node_id, task.assigned_at = inst.instance_id, inst.node_id, step.now
    task.attempts += 1
    book.resend[task.task_id] = step.now + book.config.assign_resend
    book.candidates.reindex(inst)


def start_attempt(book: TaskBook, task: TaskRecord, cause: object, step: Step) -> None:
    """A new attempt starts from nothing: no output delivered, held or fetched, no reply hashed."""
    task.next_chunk = 0
    task.held.clear()
    task.final = None
    task.fetches = 0
    task.reply_hash = reply_hasher(task.chat_hash) if task.chat_hash else None


def confirm(book: TaskBook, task: TaskRecord, cause: Confirm, step: Step) -> None:
    """The worker has it: the instance's confirmed set counts it now, not the ledger (load unchanged:
    pending -1, confirmed +1, so nothing to re-index)."""
    assert task.instance_id is not None
    book.ledger.confirm(task.task_id)
    book.resend.pop(task.task_id, None)
    book.state.instances[task.instance_id].confirmed.add(task.task_id)


def set_aside(book: TaskBook, task: TaskRecord, cause: Unbind, step: Step) -> None:
    """Displaced: settling puts it back in line by age (or fails it when its tries are spent), and
    re-placement avoids the instance that lost it if it can."""
    task.lost_reason, task.lost_on = cause.why, task.instance_id
    task.instance_id = task.node_id = None
    book.stats.replacements += 1
    book.displaced.append(task)


def complete(book: TaskBook, task: TaskRecord, cause: Finish, step: Step) -> None:
    task.finish_reason, task.usage = cause.reason, cause.usage
    _close(book, task, step)
    _instance_of(book, task).completed += 1
    usage = cause.usage or Usage()
    step.emit(
        TaskCompleted(
            task_id=task.task_id,
            finish_reason=cause.reason,
            usage=usage,
            tool_calls=cause.tool_calls,
            stop_sequence=cause.stop_sequence,
        )
    )


def report_failure(book: TaskBook, task: TaskRecord, cause: Fail, step: Step) -> None:
    """End without a result and tell the client why (503 when `unavailable`; `code` names a
    request error, such as context_length_exceeded)."""
    task.error = cause.message
    _close(book, task, step)
    if task.instance_id is not None and task.instance_id in book.state.instances:
        book.state.instances[task.instance_id].failed += 1
    step.emit(
        TaskErrored(
            task_id=task.task_id, message=cause.message, unavailable=cause.unavailable, code=cause.code
        )
    )


def report_cancel(book: TaskBook, task: TaskRecord, cause: Cancel, step: Step) -> None:
    task.error = cause.reason
    _close(book, task, step)
    # Whoever still waits on the task (not a client that went away) learns why it ended.
    step.emit(TaskErrored(task_id=task.task_id, message=cause.reason, cancelled=True))


def _close(book: TaskBook, task: TaskRecord, step: Step) -> None:
    """A final status: the record leaves the live tasks for the bounded list of recent ones."""
    task.ended_at = step.now
    book.archive(task)
    book.stats.finals[task.status] = book.stats.finals.get(task.status, 0) + 1


def _instance_of(book: TaskBook, task: TaskRecord) -> InstanceRecord:
    assert task.instance_id is not None
    return book.state.instances[task.instance_id]


# ---- the table ----------------------------------------------------------------------------------

Q, P, R = TaskStatus.QUEUED, TaskStatus.PENDING, TaskStatus.RUNNING
FINISHED, FAILED, CANCELLED = TaskStatus.FINISHED, TaskStatus.FAILED, TaskStatus.CANCELLED
# What a status holds, released by every move out of it.
_LEAVE: dict[TaskStatus, MoveEffect[object]] = {Q: leave_queue, P: drop_reservation, R: leave_instance}

TRANSITIONS: dict[tuple[TaskStatus, type[Cause]], Move[Any]] = {
    (Q, Place): Move(P, (leave_queue, reserve, start_attempt)),
    (P, Confirm): Move(R, (confirm,)),
    (P, Unbind): Move(Q, (drop_reservation, set_aside)),
    (R, Unbind): Move(Q, (leave_instance, set_aside), guard=nothing_delivered),
    # A result is taken only once the task is confirmed (its sender confirms it first).
    (R, Finish): Move(FINISHED, (leave_instance, complete)),
    **{(s, Fail): Move(FAILED, (_LEAVE[s], report_failure)) for s in (Q, P, R)},
    **{(s, Cancel): Move(CANCELLED, (_LEAVE[s], report_cancel)) for s in (Q, P, R)},
}


def permits(task: TaskRecord, cause: type[Cause]) -> bool:
    """The table has a move for `task` on `cause` and its guard holds."""
    move = TRANSITIONS.get((task.status, cause))
    return move is not None and (move.guard is None or move.guard(task))


def advance(book: TaskBook, task: TaskRecord, cause: Cause, step: Step) -> TaskStatus:
    """Move `task` along the table, apply the row's effects, and return its new status; a move the
    table does not list (or whose guard fails) raises before anything changes."""
    move = TRANSITIONS.get((task.status, type(cause)))
    if move is None:
        raise IllegalTransition(f"task {task.task_id}: no transition from {task.status} on {cause}")
    if move.guard is not None and not move.guard(task):
        raise IllegalTransition(f"task {task.task_id}: {move.guard.__name__} does not hold for {cause}")
    task.status = move.to
    for effect in move.effects:
        effect(book, task, cause, step)
    return move.to
