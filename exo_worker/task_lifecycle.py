"""A task's life on the worker: its statuses and every move between them, in one table.

    accepted --> queued --start--> running --end--> output kept --ack--> acknowledged
                   |                  |
                   +---cancel---+     +--stopped--> cancelled
                                v
                            cancelled                  refused (never accepted)

- QUEUED: accepted, waiting in the runner's FIFO for one of the instance's slots.
- RUNNING: holds a slot; the engine is generating. Its one stop signal (`WorkerTask.stop`) asks the
  engine to end it within a token (a master's CancelTask, shutdown, or the awaiting task went away).
- OUTPUT_KEPT: the engine returned (a result, or a failure); its chunks and final message are kept
  until the master acknowledges them (TaskAck), so any of them lost on the bus can be fetched again.
- ACKNOWLEDGED: the master has everything; the output is released, the final kept for replays.
- CANCELLED: ended by its stop signal (or before it started). Nobody will fetch its output.
- REFUSED: never ran (shutting down, not ready, unsupported kind, queue full).

Every ended task keeps its final message in a bounded LRU, so a duplicate AssignTask (the master
re-sends until it sees TaskAccepted) gets the same answer again; only a cancelled task runs anew
when assigned again. `advance` is the only way a status changes; an unlisted move raises.
"""

from __future__ import annotations

import asyncio
import enum
import threading
from dataclasses import dataclass, field

from protocol.messages import AssignTask, FinishReason, TaskFailed, TaskFinished

FinalMessage = TaskFinished | TaskFailed


class TaskState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    OUTPUT_KEPT = "output-kept"
    ACKNOWLEDGED = "acknowledged"
    CANCELLED = "cancelled"
    REFUSED = "refused"

    @property
    def live(self) -> bool:
        """Holds (or waits for) a slot."""
        return self in (TaskState.QUEUED, TaskState.RUNNING)


class Trigger(enum.StrEnum):
    START = "start"  # a slot is free: the engine takes the oldest queued task
    CANCEL = "cancel"  # cancelled while it waited (by the master, or at shutdown)
    END = "end"  # the engine returned a result, or failed the task
    STOPPED = "stopped"  # the engine honoured the stop signal (or was stopped hard at shutdown)
    ACK = "ack"  # the master has the whole output


S = TaskState
TRANSITIONS: dict[tuple[TaskState, Trigger], TaskState] = {
    (S.QUEUED, Trigger.START): S.RUNNING,
    (S.QUEUED, Trigger.CANCEL): S.CANCELLED,
    (S.RUNNING, Trigger.END): S.OUTPUT_KEPT,
    (S.RUNNING, Trigger.STOPPED): S.CANCELLED,
    (S.OUTPUT_KEPT, Trigger.ACK): S.ACKNOWLEDGED,
}


class IllegalTaskMove(AssertionError):
    """The runner tried a move the table does not allow: a bug, never an input error."""


@dataclass(eq=False, slots=True)
class WorkerTask:
    assign: AssignTask
    state: TaskState = TaskState.QUEUED
    # The request's one stop signal, handed to the engine (which sets it too when its awaiting task
    # goes away): set, the engine ends the task within a token and reports it CANCELLED.
    stop: threading.Event = field(default_factory=threading.Event)
    handle: asyncio.Task[None] | None = None
    final: FinalMessage | None = None  # once ended

    @property
    def replayable(self) -> bool:
        """Its final answers a duplicate AssignTask (a cancelled task is run again instead)."""
        return self.state in (TaskState.OUTPUT_KEPT, TaskState.ACKNOWLEDGED, TaskState.REFUSED)


def advance(task: WorkerTask, trigger: Trigger) -> TaskState:
    new = TRANSITIONS.get((task.state, trigger))
    if new is None:
        raise IllegalTaskMove(f"task {task.assign.task_id}: no move from {task.state} on {trigger}")
    task.state = new
    return new


def ending(final: FinalMessage) -> Trigger:
    """How a running task's final message moves it: stopped (cancelled) or ended."""
    cancelled = isinstance(final, TaskFinished) and final.finish_reason is FinishReason.CANCELLED
    return Trigger.STOPPED if cancelled else Trigger.END
