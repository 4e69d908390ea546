"""Runners: the per-instance task executor (`exo_worker.runner_group` routes master commands to them).

A Runner owns one Engine and its `max_concurrency` slots: every task holding a slot is running in
the engine at the same time (a batching engine such as MlxEngine decodes them together, its batch
as wide as the slots). Tasks beyond the slots wait in a local FIFO (the master should not send
them, but baseline placement policies overfill on purpose). Each task moves along the table of
`task_lifecycle` (queued, running, output kept, acknowledged, cancelled, refused). Everything a
runner reports is a protocol message handed to one sink (`send`, the bus shell's), so this module
can be tested without sockets.

Idempotency: the master re-sends AssignTask until it sees TaskAccepted, so a task id may arrive
many times. Live tasks answer with TaskAccepted again; recently ended tasks answer with their
final message again (from a bounded LRU); only an id never seen (or long forgotten, or cancelled)
runs.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable

import structlog

from exo_worker.engine import (
    Engine,
    EngineError,
    ModelLoadError,
    ReportsFailure,
    ReportsPromptCache,
    ReportsWork,
    RunOutcome,
)
from exo_worker.output_log import OutputLog
from exo_worker.task_lifecycle import FinalMessage, TaskState, Trigger, WorkerTask, advance, ending
from protocol.ids import InstanceId, ModelId, NodeId, TaskId
from protocol.messages import (
    AssignTask,
    FetchOutput,
    FinishReason,
    InstanceReport,
    InstanceStatus,
    TaskAccepted,
    TaskChunk,
    TaskFailed,
    TaskFinished,
    Usage,
)
from protocol.sharding import ShardAssignment

log = structlog.get_logger("exo_worker.runner")

_CANCELLED = RunOutcome(FinishReason.CANCELLED, Usage())

RunnerMessage = TaskAccepted | TaskChunk | TaskFinished | TaskFailed
# Where a runner's messages go (the bus shell's `send`). Called on the event loop; must not block.
Send = Callable[[RunnerMessage], None]


class Runner:
    """One model instance: its engine, its slots, its queue, and its recently ended tasks."""

    def __init__(
        self,
        *,
        node_id: NodeId,
        instance_id: InstanceId,
        model: ModelId,
        engine: Engine,
        send: Send,
        max_concurrency: int = 4,
        capacity: float = 1.0,
        max_queue: int = 1024,
        final_lru_size: int = 1024,
        placement: str = "",
        memory_bytes: int = 0,
        shard: ShardAssignment | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.node_id = node_id
        self.instance_id = instance_id
        self.model = model
        self.engine = engine
        self.max_concurrency = max_concurrency
        self.capacity = capacity
        self._send = send
        self._max_queue = max_queue
        self._final_lru_size = final_lru_size
        self.status = InstanceStatus.LOADING
        self.error: str | None = None
        # Placed by the master (its placement id; "" when declared with --model), the memory the
        # instance holds, and how far its load has got (heartbeats carry all three).
        self.placement = placement
        self.memory_bytes = memory_bytes
        self.shard = shard  # rank 0 of a sharded instance: its assignment, echoed in every report
        self.progress = 0.0
        # Indexes by status: live tasks (queued or running) in acceptance order; the queued ones in
        # FIFO order; the ended ones, least recently used first (bounded). Chunks live in `_outputs`.
        self._live: dict[TaskId, WorkerTask] = {}
        self._queue: deque[TaskId] = deque()
        self._ended: OrderedDict[TaskId, WorkerTask] = OrderedDict()
        self._outputs = OutputLog()
        self._closing = False
        self._log = log.bind(instance_id=instance_id)

    # ---- the instance ------------------------------------------------------------------------

    async def load(self) -> None:
        """Load the engine: status loading -> ready, or failed (and ModelLoadError re-raised)."""
        self.status, self.error = InstanceStatus.LOADING, None
        try:
            await self.engine.load(self._on_progress)
        except ModelLoadError as exc:
            self.status, self.error = InstanceStatus.FAILED, str(exc)
            raise
        except Exception as exc:  # a backend bug: still report the instance as failed, then surface it
            self.status, self.error = InstanceStatus.FAILED, f"{type(exc).__name__}: {exc}"
            raise
        self.status, self.progress = InstanceStatus.READY, 1.0

    def _on_progress(self, what: str, fraction: float) -> None:
        self.progress = min(max(fraction, 0.0), 1.0)

    async def shutdown(self, grace: float = 2.0) -> None:
        """Refuse new work, cancel everything, give running tasks `grace` seconds to end cleanly."""
        self._closing = True
        while self._queue:
            self._cancel_queued(self._live[self._queue[0]])
        handles: list[asyncio.Task[None]] = []
        for task in self._live.values():
            task.stop.set()
            if task.handle is not None:
                handles.append(task.handle)
        if not handles:
            return
        _, pending = await asyncio.wait(handles, timeout=grace)
        for handle in pending:  # an engine that ignores its stop signal: stop it the hard way
            handle.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # ---- commands from the master ------------------------------------------------------------

    def submit(self, assign: AssignTask) -> None:
        task_id = assign.task_id
        ended = self._ended.get(task_id)
        if ended is not None and ended.replayable:
            assert ended.final is not None
            self._ended.move_to_end(task_id)
            self._send(ended.final)
            return
        if ended is not None:
            # The bus is FIFO per publisher, so an assignment that arrives after its cancel was sent
            # after it: the master wants the task again (re-placed here). Replaying the cancelled
            # result would end the client's request with output it never asked to stop.
            del self._ended[task_id]
        if task_id in self._live:
            self._send(self._accepted(task_id))
            return
        task = WorkerTask(assign)
        reason = self._refusal(assign)
        if reason is not None:
            self._log.warning("task.refused", task_id=task_id, reason=reason)
            task.state = TaskState.REFUSED  # never accepted: it enters the table ended
            self._end(task, self._failed(task_id, reason, refused=True))
            return
        self._live[task_id] = task
        self._queue.append(task_id)
        self._outputs.started(task_id)
        self._send(self._accepted(task_id))
        self._fill_slots()

    def cancel(self, task_id: TaskId) -> None:
        task = self._live.get(task_id)
        if task is None:
            return  # unknown or already ended: nothing to do
        if task.state is TaskState.RUNNING:
            task.stop.set()  # the engine notices within one token and returns CANCELLED
            return
        self._cancel_queued(task)

    def fetch(self, request: FetchOutput) -> None:
        """Send again what the master is missing of a task's output (chunks, and the final)."""
        held = self._outputs.replay(request.task_id, request.from_index, request.final, request.gaps)
        if held is None:
            reason = f"the output of task {request.task_id} is no longer held by {self.node_id}"
            self._send(self._failed(request.task_id, reason))
            return
        chunks, final = held
        for index, text in chunks:
            self._send_chunk(request.task_id, index, text)
        if final is not None:
            self._send(final)

    def acknowledged(self, task_id: TaskId) -> None:
        if task_id in self._live:
            return  # the master acknowledges ended tasks only: this one is an older attempt's
        task = self._ended.get(task_id)
        if task is not None and task.state is TaskState.OUTPUT_KEPT:
            advance(task, Trigger.ACK)
        self._outputs.forget(task_id)  # also when its record has left the LRU already

    # ---- views -------------------------------------------------------------------------------

    @property
    def running(self) -> tuple[TaskId, ...]:
        return tuple(t for t, task in self._live.items() if task.state is TaskState.RUNNING)

    @property
    def queued(self) -> tuple[TaskId, ...]:
        return tuple(self._queue)

    def state_of(self, task_id: TaskId) -> TaskState | None:
        task = self._live.get(task_id) or self._ended.get(task_id)
        return task.state if task is not None else None

    def report(self) -> InstanceReport:
        broke = self.engine.failure if isinstance(self.engine, ReportsFailure) else None
        if broke is not None and self.status is InstanceStatus.READY:
            # It broke after it loaded; its process is gone, and the memory with it.
            self.status, self.error, self.memory_bytes = InstanceStatus.FAILED, broke, 0
        return InstanceReport(
            instance_id=self.instance_id,
            model=self.model,
            kinds=tuple(self.engine.kinds),
            status=self.status,
            max_concurrency=self.max_concurrency,
            capacity=self.capacity,
            active_tasks=tuple(self._live),
            finished_tasks=self._outputs.unacknowledged(),
            error=self.error,
            prompt_cache=(
                self.engine.prompt_cache_stats() if isinstance(self.engine, ReportsPromptCache) else None
            ),
            memory_bytes=self.memory_bytes,
            progress=self.progress,
            placement=self.placement,
            shard=self.shard,
            # Counted by the engine: a cancelled prompt still being stopped is still work here.
            work=self.engine.work() if isinstance(self.engine, ReportsWork) else None,
            context_length=self.engine.context_length if isinstance(self.engine, ReportsWork) else 0,
        )

    # ---- the moves ---------------------------------------------------------------------------

    def _refusal(self, assign: AssignTask) -> str | None:
        if self._closing:
            return "worker is shutting down"
        if self.status is not InstanceStatus.READY:
            detail = f": {self.error}" if self.error else ""
            return f"instance {self.instance_id} is {self.status.value}, not ready{detail}"
        if assign.kind not in self.engine.kinds:
            supported = ", ".join(k.value for k in self.engine.kinds)
            return f"instance {self.instance_id} does not support {assign.kind.value} (supports: {supported})"
        running = len(self._live) - len(self._queue)
        if running >= self.max_concurrency and len(self._queue) >= self._max_queue:
            return f"instance {self.instance_id} queue is full ({self._max_queue} waiting)"
        return None

    def _fill_slots(self) -> None:
        """Free slots take the oldest queued tasks (queued -> running)."""
        while self._queue and len(self._live) - len(self._queue) < self.max_concurrency:
            task = self._live[self._queue.popleft()]
            advance(task, Trigger.START)
            name = f"task:{task.assign.task_id}"
            task.handle = asyncio.get_running_loop().create_task(self._run(task), name=name)

    def _cancel_queued(self, task: WorkerTask) -> None:
        task_id = task.assign.task_id
        self._queue.remove(task_id)
        del self._live[task_id]
        advance(task, Trigger.CANCEL)
        self._end(task, self._finished(task_id, _CANCELLED))

    async def _run(self, task: WorkerTask) -> None:
        task_id = task.assign.task_id
        final: FinalMessage
        try:
            outcome = await self.engine.run(
                task.assign.params, lambda text: self._on_text(task, text), task.stop
            )
            final = self._finished(task_id, outcome)
        except EngineError as exc:
            final = self._failed(task_id, str(exc) or type(exc).__name__, code=exc.code)
        except asyncio.CancelledError:
            # Hard-stopped at shutdown: still tell the master how it ended, then let it unwind.
            self._end_running(task, self._finished(task_id, _CANCELLED))
            raise
        except Exception as exc:
            self._log.exception("task.engine_crashed", task_id=task_id)
            final = self._failed(task_id, f"engine error: {type(exc).__name__}: {exc}")
        self._end_running(task, final)

    def _on_text(self, task: WorkerTask, text: str) -> None:
        if (
            task.state is not TaskState.RUNNING or not text
        ):  # nothing after the end; empty pieces carry nothing
            return
        task_id = task.assign.task_id
        self._send_chunk(task_id, self._outputs.chunk(task_id, text), text)

    def _end_running(self, task: WorkerTask, final: FinalMessage) -> None:
        del self._live[task.assign.task_id]
        advance(task, ending(final))
        self._end(task, final)
        self._fill_slots()  # a slot is free: the oldest queued task takes it

    def _end(self, task: WorkerTask, final: FinalMessage) -> None:
        """The task has ended (its status says how): keep what the master may still ask for."""
        task_id = task.assign.task_id
        task.final = final
        if task.state is TaskState.OUTPUT_KEPT:
            self._outputs.ended(task_id, final)
        else:
            self._outputs.forget(task_id)  # cancelled or refused: nobody will fetch it
        self._ended[task_id] = task
        self._ended.move_to_end(task_id)
        while len(self._ended) > self._final_lru_size:
            self._ended.popitem(last=False)
        self._send(final)

    # ---- messages ----------------------------------------------------------------------------

    def _send_chunk(self, task_id: TaskId, index: int, text: str) -> None:
        chunk = TaskChunk(
            node_id=self.node_id, task_id=task_id, instance_id=self.instance_id, index=index, text=text
        )
        self._send(chunk)

    def _accepted(self, task_id: TaskId) -> TaskAccepted:
        return TaskAccepted(node_id=self.node_id, task_id=task_id, instance_id=self.instance_id)

    def _finished(self, task_id: TaskId, outcome: RunOutcome) -> TaskFinished:
        return TaskFinished(
            node_id=self.node_id,
            task_id=task_id,
            instance_id=self.instance_id,
            finish_reason=outcome.finish_reason,
            usage=outcome.usage,
            chunks=self._outputs.count(task_id),
            tool_calls=outcome.tool_calls,
            stop_sequence=outcome.stop_sequence,
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
