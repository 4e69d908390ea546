"""Runners: the per-instance task executor, and the group that routes master commands to them.

A Runner owns one Engine and its `max_concurrency` slots: every task holding a slot is running in
the engine at the same time (a batching engine such as MlxEngine decodes them together, its batch
as wide as the slots). Tasks beyond the slots wait in a local FIFO (the master should not send
them, but baseline placement policies overfill on purpose). It
reports what happens through callbacks that take protocol messages, so the bus shell only has to
publish them and this module can be tested without sockets.

Idempotency: the master re-sends AssignTask until it sees TaskAccepted, so a task id may arrive
many times. Active tasks answer with TaskAccepted again; recently ended tasks answer with their
final message again (from a bounded LRU); only an id never seen (or long forgotten) runs.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from exo_worker.engine import Engine, EngineError, ModelLoadError, ReportsPromptCache, ReportsWork
from exo_worker.output_log import OutputLog
from protocol.ids import InstanceId, ModelId, NodeId, TaskId
from protocol.messages import (
    AssignTask,
    CancelTask,
    FetchOutput,
    FinishReason,
    InstanceReport,
    InstanceStatus,
    TaskAccepted,
    TaskAck,
    TaskChunk,
    TaskFailed,
    TaskFinished,
    Usage,
)

log = structlog.get_logger("exo_worker.runner")

FinalMessage = TaskFinished | TaskFailed


@dataclass(frozen=True, slots=True)
class RunnerCallbacks:
    """Where a runner's events go. Called on the event loop thread; must not block."""

    accepted: Callable[[TaskAccepted], None]
    chunk: Callable[[TaskChunk], None]
    finished: Callable[[TaskFinished], None]
    failed: Callable[[TaskFailed], None]

    @classmethod
    def to(
        cls, send: Callable[[TaskAccepted | TaskChunk | TaskFinished | TaskFailed], None]
    ) -> RunnerCallbacks:
        """All four events to one sink (the bus shell's `send`)."""
        return cls(accepted=send, chunk=send, finished=send, failed=send)


@dataclass(slots=True)
class _Task:
    assign: AssignTask
    cancel: threading.Event = field(default_factory=threading.Event)
    next_index: int = 0
    handle: asyncio.Task[None] | None = None
    done: bool = False


class Runner:
    """One model instance: its engine, its slots, its queue, and its recent final results."""

    def __init__(
        self,
        *,
        node_id: NodeId,
        instance_id: InstanceId,
        model: ModelId,
        engine: Engine,
        callbacks: RunnerCallbacks,
        max_concurrency: int = 4,
        capacity: float = 1.0,
        max_queue: int = 1024,
        final_lru_size: int = 1024,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.node_id = node_id
        self.instance_id = instance_id
        self.model = model
        self.engine = engine
        self.max_concurrency = max_concurrency
        self.capacity = capacity
        self._callbacks = callbacks
        self._max_queue = max_queue
        self._final_lru_size = final_lru_size
        self.status = InstanceStatus.LOADING
        self.error: str | None = None
        # Every accepted, unfinished task (running or queued), in acceptance order.
        self._active: dict[TaskId, _Task] = {}
        self._running: set[TaskId] = set()
        self._queue: deque[TaskId] = deque()
        self._finals: OrderedDict[TaskId, FinalMessage] = OrderedDict()
        self._outputs = OutputLog()
        self._closing = False
        self._log = log.bind(instance_id=instance_id)

    # ---- lifecycle ---------------------------------------------------------------------------

    async def load(self) -> None:
        """Load the engine: status loading -> ready, or failed (and ModelLoadError re-raised)."""
        self.status, self.error = InstanceStatus.LOADING, None
        try:
            await self.engine.load()
        except ModelLoadError as exc:
            self.status, self.error = InstanceStatus.FAILED, str(exc)
            raise
        except Exception as exc:  # a backend bug: still report the instance as failed, then surface it
            self.status, self.error = InstanceStatus.FAILED, f"{type(exc).__name__}: {exc}"
            raise
        self.status = InstanceStatus.READY

    async def shutdown(self, grace: float = 2.0) -> None:
        """Refuse new work, cancel everything, give running tasks `grace` seconds to end cleanly."""
        self._closing = True
        while self._queue:
            self._end_queued(self._queue.popleft())
        handles: list[asyncio.Task[None]] = []
        for task_id in list(self._running):
            task = self._active[task_id]
            task.cancel.set()
            if task.handle is not None:
                handles.append(task.handle)
        if not handles:
            return
        _, pending = await asyncio.wait(handles, timeout=grace)
        for handle in pending:  # an engine that ignores its cancel event: stop it the hard way
            handle.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # ---- commands from the master ------------------------------------------------------------

    def submit(self, assign: AssignTask) -> None:
        task_id = assign.task_id
        final = self._finals.get(task_id)
        if final is not None and not _was_cancelled(final):
            self._finals.move_to_end(task_id)
            self._emit_final(final)
            return
        if final is not None:
            # The bus is FIFO per publisher, so an assignment that arrives after its cancel was sent
            # after it: the master wants the task again (re-placed here). Replaying the cancelled
            # result would end the client's request with output it never asked to stop.
            del self._finals[task_id]
        if task_id in self._active:
            self._callbacks.accepted(self._accepted(task_id))
            return
        reason = self._refusal(assign)
        if reason is not None:
            self._log.warning("task.refused", task_id=task_id, reason=reason)
            self._finish(task_id, self._failed(task_id, reason, refused=True))
            return
        self._active[task_id] = _Task(assign)
        self._outputs.started(task_id)
        self._callbacks.accepted(self._accepted(task_id))
        if len(self._running) < self.max_concurrency:
            self._start(task_id)
        else:
            self._queue.append(task_id)

    def cancel(self, task_id: TaskId) -> None:
        task = self._active.get(task_id)
        if task is None:
            return  # unknown or already ended: nothing to do
        if task_id in self._running:
            task.cancel.set()  # the engine notices within one token and returns CANCELLED
            return
        self._queue.remove(task_id)
        self._end_queued(task_id)

    def fetch(self, request: FetchOutput) -> None:
        """Send again what the master is missing of a task's output (chunks, and the final)."""
        held = self._outputs.replay(request.task_id, request.from_index, request.final)
        if held is None:
            reason = f"the output of task {request.task_id} is no longer held by {self.node_id}"
            self._callbacks.failed(self._failed(request.task_id, reason))
            return
        chunks, final = held
        for offset, text in enumerate(chunks):
            self._send_chunk(request.task_id, request.from_index + offset, text)
        if final is not None:
            self._emit_final(final)

    def acknowledged(self, task_id: TaskId) -> None:
        self._outputs.forget(task_id)

    # ---- views -------------------------------------------------------------------------------

    @property
    def running(self) -> tuple[TaskId, ...]:
        return tuple(t for t in self._active if t in self._running)

    @property
    def queued(self) -> tuple[TaskId, ...]:
        return tuple(self._queue)

    def report(self) -> InstanceReport:
        return InstanceReport(
            instance_id=self.instance_id,
            model=self.model,
            kinds=tuple(self.engine.kinds),
            status=self.status,
            max_concurrency=self.max_concurrency,
            capacity=self.capacity,
            active_tasks=tuple(self._active),
            finished_tasks=self._outputs.unacknowledged(),
            error=self.error,
            prompt_cache=(
                self.engine.prompt_cache_stats() if isinstance(self.engine, ReportsPromptCache) else None
            ),
            # Counted by the engine: a cancelled prompt still being stopped is still work here.
            work=self.engine.work() if isinstance(self.engine, ReportsWork) else None,
            context_length=self.engine.context_length if isinstance(self.engine, ReportsWork) else 0,
        )

    # ---- internals ---------------------------------------------------------------------------

    def _refusal(self, assign: AssignTask) -> str | None:
        if self._closing:
            return "worker is shutting down"
        if self.status is not InstanceStatus.READY:
            detail = f": {self.error}" if self.error else ""
            return f"instance {self.instance_id} is {self.status.value}, not ready{detail}"
        if assign.kind not in self.engine.kinds:
            supported = ", ".join(k.value for k in self.engine.kinds)
            return f"instance {self.instance_id} does not support {assign.kind.value} (supports: {supported})"
        if len(self._running) >= self.max_concurrency and len(self._queue) >= self._max_queue:
            return f"instance {self.instance_id} queue is full ({self._max_queue} waiting)"
        return None

    def _start(self, task_id: TaskId) -> None:
        self._running.add(task_id)
        task = self._active[task_id]
        task.handle = asyncio.get_running_loop().create_task(self._run(task), name=f"task:{task_id}")

    async def _run(self, task: _Task) -> None:
        task_id = task.assign.task_id
        final: FinalMessage
        try:
            outcome = await self.engine.run(
                task.assign.params, lambda text: self._on_text(task, text), task.cancel
            )
            final = self._finished(task_id, outcome.finish_reason, outcome.usage)
        except EngineError as exc:
            final = self._failed(task_id, str(exc) or type(exc).__name__, code=exc.code)
        except asyncio.CancelledError:
            # Hard-stopped at shutdown: still tell the master how it ended, then let it unwind.
            self._end_running(task, self._finished(task_id, FinishReason.CANCELLED, Usage()))
            raise
        except Exception as exc:
            self._log.exception("task.engine_crashed", task_id=task_id)
            final = self._failed(task_id, f"engine error: {type(exc).__name__}: {exc}")
        self._end_running(task, final)

    def _on_text(self, task: _Task, text: str) -> None:
        if task.done or not text:  # nothing after the final message; empty pieces carry nothing
            return
        task_id = task.assign.task_id
        self._send_chunk(task_id, self._outputs.chunk(task_id, text), text)

    def _send_chunk(self, task_id: TaskId, index: int, text: str) -> None:
        self._callbacks.chunk(
            TaskChunk(
                node_id=self.node_id, task_id=task_id, instance_id=self.instance_id, index=index, text=text
            )
        )

    def _end_running(self, task: _Task, final: FinalMessage) -> None:
        task_id = task.assign.task_id
        task.done = True
        self._running.discard(task_id)
        self._active.pop(task_id, None)
        self._finish(task_id, final)
        # A slot is free: the oldest queued task takes it.
        while self._queue and len(self._running) < self.max_concurrency:
            self._start(self._queue.popleft())

    def _end_queued(self, task_id: TaskId) -> None:
        task = self._active.pop(task_id)
        task.done = True
        self._finish(task_id, self._finished(task_id, FinishReason.CANCELLED, Usage()))

    def _finish(self, task_id: TaskId, final: FinalMessage) -> None:
        if _was_cancelled(final) or (isinstance(final, TaskFailed) and final.refused):
            self._outputs.forget(task_id)  # nobody will fetch it: the master moved on
        else:
            self._outputs.ended(task_id, final)
        self._finals[task_id] = final
        self._finals.move_to_end(task_id)
        while len(self._finals) > self._final_lru_size:
            self._finals.popitem(last=False)
        self._emit_final(final)

    def _emit_final(self, final: FinalMessage) -> None:
        if isinstance(final, TaskFinished):
            self._callbacks.finished(final)
        else:
            self._callbacks.failed(final)

    def _accepted(self, task_id: TaskId) -> TaskAccepted:
        return TaskAccepted(node_id=self.node_id, task_id=task_id, instance_id=self.instance_id)

    def _finished(self, task_id: TaskId, reason: FinishReason, usage: Usage) -> TaskFinished:
        return TaskFinished(
            node_id=self.node_id,
            task_id=task_id,
            instance_id=self.instance_id,
            finish_reason=reason,
            usage=usage,
            chunks=self._outputs.count(task_id),
        )

    def _failed(
        self, task_id: TaskId, reason: str, refused: bool = False, code: str | None = None
    ) -> TaskFailed:
        return TaskFailed(
            node_id=self.node_id,
            task_id=task_id,
            instance_id=self.instance_id,
            reason=reason,
            refused=refused,
            code=code,
        )


class RunnerGroup:
    """All instances of one worker: routes AssignTask/CancelTask by instance id, builds snapshots."""

    def __init__(self, node_id: NodeId, runners: Sequence[Runner], callbacks: RunnerCallbacks) -> None:
        self.node_id = node_id
        self.runners: dict[InstanceId, Runner] = {r.instance_id: r for r in runners}
        self._callbacks = callbacks

    def handle_assign(self, assign: AssignTask) -> None:
        runner = self.runners.get(assign.instance_id)
        if runner is not None:
            runner.submit(assign)
            return
        # Not stored in any LRU: the answer is the same every time the duplicate comes back.
        log.warning("task.unknown_instance", task_id=assign.task_id, instance_id=assign.instance_id)
        known = ", ".join(self.runners) or "none"
        reason = f"unknown instance {assign.instance_id} on node {self.node_id} (instances: {known})"
        self._callbacks.failed(
            TaskFailed(
                node_id=self.node_id,
                task_id=assign.task_id,
                instance_id=assign.instance_id,
                reason=reason,
                refused=True,
            )
        )

    def handle_fetch(self, request: FetchOutput) -> None:
        runner = self.runners.get(request.instance_id)
        if runner is not None:
            runner.fetch(request)

    def handle_ack(self, ack: TaskAck) -> None:
        runner = self.runners.get(ack.instance_id)
        if runner is not None:
            runner.acknowledged(ack.task_id)

    def handle_cancel(self, cancel: CancelTask) -> None:
        runner = self.runners.get(cancel.instance_id)
        if runner is not None:
            runner.cancel(cancel.task_id)
            return
        # A cancel naming the wrong instance still reaches the task, wherever it runs here.
        for candidate in self.runners.values():
            candidate.cancel(cancel.task_id)

    def reports(self) -> tuple[InstanceReport, ...]:
        return tuple(r.report() for r in self.runners.values())

    async def load_all(self) -> None:
        """Load instances one after another (bounded peak memory); the first ModelLoadError stops it."""
        for runner in self.runners.values():
            await runner.load()

    async def shutdown(self, grace: float = 2.0) -> None:
        await asyncio.gather(*(r.shutdown(grace) for r in self.runners.values()))


def _was_cancelled(final: FinalMessage) -> bool:
    return isinstance(final, TaskFinished) and final.finish_reason is FinishReason.CANCELLED
