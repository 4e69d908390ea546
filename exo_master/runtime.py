"""Drives the pure core from one asyncio loop: feeds it inputs with the time, routes its outputs.

Every input (worker message, subscription, HTTP submission or cancel, timer tick) reads the clock
once and calls the core; the effects go to the bus (worker messages) or to the HTTP request that
waits for that task (client effects). Being single-threaded on the loop, no locks are needed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from exo_master.bus import Inbound, MasterBus
from exo_master.core import MasterCore
from exo_master.core.events import (
    CancelRequest,
    ClientEffect,
    Effect,
    SubmitTask,
    TaskCompleted,
    TaskErrored,
    TaskPlaced,
    TaskRejected,
    WorkerEffect,
)
from protocol import codec
from protocol.ids import TaskId
from protocol.messages import AssignTask, CancelTask, FetchOutput, MasterHeartbeat, TaskAck, TaskParams

log = structlog.get_logger("exo_master")

Clock = Callable[[], float]
DecisionObserver = Callable[[float], None]


class TaskWaiter:
    """The client side of one task: an inbox of its client effects."""

    def __init__(self, task_id: TaskId) -> None:
        self.task_id = task_id
        self.inbox: asyncio.Queue[ClientEffect] = asyncio.Queue()
        self.done = False

    async def next(self) -> ClientEffect:
        effect = await self.inbox.get()
        if isinstance(effect, TaskCompleted | TaskErrored | TaskRejected):
            self.done = True
        return effect


class MasterRuntime:
    def __init__(self, core: MasterCore, bus: MasterBus | None, clock: Clock = time.monotonic) -> None:
        self.core = core
        self.bus = bus
        self.clock = clock
        self._waiters: dict[TaskId, TaskWaiter] = {}
        self._outbox: asyncio.Queue[tuple[bytes, WorkerEffect]] = asyncio.Queue()
        self.decision_observers: list[DecisionObserver] = []
        self.effect_observers: list[Callable[[Effect], None]] = []

    # ---- inputs ---------------------------------------------------------------------------------

    def submit(self, task_id: TaskId, params: TaskParams) -> TaskWaiter:
        waiter = TaskWaiter(task_id)
        self._waiters[task_id] = waiter
        started = time.perf_counter()
        effects = self.core.handle(SubmitTask(task_id=task_id, params=params), self.clock())
        elapsed = time.perf_counter() - started
        for observe in self.decision_observers:
            observe(elapsed)
        self._dispatch(effects)
        return waiter

    def cancel(self, task_id: TaskId, reason: str) -> bool:
        """Cancel a live task; False when no such task is live."""
        if not self.core.is_live(task_id):
            return False
        self._dispatch(self.core.handle(CancelRequest(task_id=task_id, reason=reason), self.clock()))
        return True

    def release(self, waiter: TaskWaiter, reason: str = "client disconnected") -> None:
        """The HTTP side is done with this task: cancel it if it is still running."""
        self._waiters.pop(waiter.task_id, None)
        if not waiter.done:
            self.cancel(waiter.task_id, reason)

    async def deliver(self, event: Inbound) -> None:
        self._dispatch(self.core.handle(event, self.clock()))

    def tick(self) -> None:
        self._dispatch(self.core.tick(self.clock()))

    # ---- outputs --------------------------------------------------------------------------------

    def _dispatch(self, effects: list[Effect]) -> None:
        for effect in effects:
            for observe in self.effect_observers:
                observe(effect)
            match effect:
                case AssignTask() | CancelTask() | FetchOutput() | TaskAck():
                    self._outbox.put_nowait((codec.node_topic(effect.node_id), effect))
                case MasterHeartbeat():
                    self._outbox.put_nowait((codec.BROADCAST_TOPIC, effect))
                case _:
                    if isinstance(effect, TaskPlaced):
                        self._log_placement(effect)
                    waiter = self._waiters.get(effect.task_id)
                    if waiter is not None:
                        waiter.inbox.put_nowait(effect)

    def _log_placement(self, placed: TaskPlaced) -> None:
        task = self.core.task(placed.task_id)
        if task is None:
            return
        # The loads the decision compared (bounded: a log line is no place for 1000 instances).
        loads = self.core.loads_of(task.model, limit=16)
        log.info(
            "placement",
            task_id=placed.task_id,
            instance_id=placed.instance_id,
            node_id=placed.node_id,
            policy=placed.policy,
            attempt=placed.attempt,
            load_before=placed.load_before,
            loads_after=loads,
            waited_s=round(placed.waited, 4),
        )

    # ---- loops ----------------------------------------------------------------------------------

    async def run_sender(self) -> None:
        assert self.bus is not None
        while True:
            topic, message = await self._outbox.get()
            await self.bus.send(topic, message)

    async def run_ticker(self, period: float) -> None:
        while True:
            self.tick()
            await asyncio.sleep(period)
