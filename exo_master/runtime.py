"""Drives the pure core from one asyncio loop: feeds it inputs with the time, routes its outputs.

Every input (worker message, subscription, HTTP submission or cancel, timer tick) reads the clock
once and calls the core; the effects go to the bus (worker messages) or to the HTTP request that
waits for that task (client effects). Being single-threaded on the loop, no locks are needed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

import msgspec
import structlog

from exo_master.bus.sockets import Inbound, MasterBus
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
from exo_master.core.instances.desired import PlacementSpec
from exo_master.core.instances.records import InstanceEvent
from exo_master.core.instances.rule import Plan
from exo_master.http.connection_cap import ConnectionCap
from protocol import codec
from protocol.cluster_view import ClusterView, TaskStatus
from protocol.ids import TaskId
from protocol.messages import (
    AssignTask,
    CancelTask,
    FetchOutput,
    InstanceStatus,
    LoadInstance,
    MasterHeartbeat,
    NodeRefused,
    TaskAck,
    TaskParams,
    UnloadInstance,
)

log = structlog.get_logger("exo_master")
# What msgspec raises for a value msgpack cannot hold (an int beyond 64 bits, an unsupported type).
_UNENCODABLE = (msgspec.EncodeError, OverflowError, TypeError)

Clock = Callable[[], float]


def _info_enabled() -> bool:
    """Whether structlog's configured level lets info lines through (cheap: no logger is bound)."""
    wrapper = structlog.get_config()["wrapper_class"]
    enabled = getattr(wrapper, "is_enabled_for", None)
    return True if enabled is None else bool(enabled(wrapper, logging.INFO))


DecisionObserver = Callable[[float], None]


class ClientGone(Exception):
    """The HTTP client of a task went away."""


class TaskWaiter:
    """The client side of one task: its client effects, in order, and whether its client left.

    A deque and one future at a time rather than an asyncio.Queue raced against the disconnect
    watcher with asyncio.wait: that race cost two tasks and a wait per effect, per request.
    """

    def __init__(self, task_id: TaskId) -> None:
        self.task_id = task_id
        self._inbox: deque[ClientEffect] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._gone = False
        self.done = False

    def put(self, effect: ClientEffect) -> None:
        self._inbox.append(effect)
        self._wake()

    def abandon(self) -> None:
        """The client disconnected: `next()` raises ClientGone once no effect is waiting."""
        self._gone = True
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def next(self) -> ClientEffect:
        while not self._inbox:
            if self._gone:
                raise ClientGone
            self._wakeup = asyncio.get_running_loop().create_future()
            await self._wakeup
        effect = self._inbox.popleft()
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
        # Called with every placement after /v1/instances changes them (--state-dir keeps them).
        self.save_desired: Callable[[tuple[PlacementSpec, ...]], None] | None = None
        self.connection_cap: ConnectionCap | None = None  # the API's (set by the daemon), for /metrics

    # ---- reads for the shells (HTTP, metrics) ----------------------------------------------------

    def view(self, task_limit: int = 0, status: TaskStatus | None = None) -> ClusterView:
        """The core's read-only view now (no task rows unless asked), with the bus's gap counts."""
        gaps = self.bus.sequences.gaps if self.bus is not None else {}
        view = self.core.view(self.clock(), task_limit=task_limit, gaps=gaps, status=status)
        if self.bus is not None and self.bus.insecure:
            view = msgspec.structs.replace(view, insecure=True)
        return view

    def served_models(self) -> list[str]:
        """The models some live instance serves or is loading, sorted."""
        live = (InstanceStatus.READY, InstanceStatus.LOADING)
        served = {row.model for row in self.view().instances if row.status in live}
        # Placed models are listed too, while their replicas load (exo_master.core.instances).
        return sorted(served | {spec.model for spec in self.core.instances.specs()})

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

    def place_instances(self, spec: PlacementSpec) -> Plan:
        result, effects = self.core.place_instances(spec, self.clock())
        self._dispatch(effects)
        return result

    def delete_instances(self, placement_id: str) -> bool:
        found, effects = self.core.delete_instances(placement_id, self.clock())
        self._dispatch(effects)
        return found

    # ---- outputs --------------------------------------------------------------------------------

    def _dispatch(self, effects: list[Effect]) -> None:
        for effect in effects:
            for observe in self.effect_observers:
                observe(effect)
            match effect:
                case (
                    AssignTask()
                    | CancelTask()
                    | FetchOutput()
                    | TaskAck()
                    | NodeRefused()
                    | LoadInstance()
                    | UnloadInstance()
                ):
                    self._outbox.put_nowait((codec.node_topic(effect.node_id), effect))
                case MasterHeartbeat():
                    self._outbox.put_nowait((codec.BROADCAST_TOPIC, effect))
                case InstanceEvent():
                    log.info(
                        f"instance.{effect.what}",
                        placement=effect.placement_id,
                        instance_id=effect.instance_id or None,
                        node_id=effect.node_id or None,
                        detail=effect.detail or None,
                    )
                case _:
                    if isinstance(effect, TaskPlaced):
                        self._log_placement(effect)
                    waiter = self._waiters.get(effect.task_id)
                    if waiter is not None:
                        waiter.put(effect)

    def _log_placement(self, placed: TaskPlaced) -> None:
        if not _info_enabled():
            return  # one line per request: not even its fields are gathered when info is off
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
            # One wake-up sends everything that is ready: a burst of placements is one batch.
            topic, message = await self._outbox.get()
            self._send(topic, message)
            for _ in range(self._outbox.qsize()):
                topic, message = self._outbox.get_nowait()
                self._send(topic, message)

    def _send(self, topic: bytes, message: WorkerEffect | MasterHeartbeat) -> None:
        assert self.bus is not None
        try:
            self.bus.send_now(topic, message)
        except _UNENCODABLE as exc:
            self._unsendable(message, exc)

    # ---- guard: one message that cannot be encoded fails its own task, never the sender loop ----

    def _unsendable(self, message: WorkerEffect | MasterHeartbeat, exc: Exception) -> None:
        log.error("bus.unsendable", message=type(message).__name__, error=repr(exc))
        if not isinstance(message, AssignTask):
            return
        waiter = self._waiters.get(message.task_id)
        if waiter is not None:
            error = f"the task cannot be sent to its worker: {exc}"
            waiter.put(TaskErrored(task_id=message.task_id, message=error))
        self.cancel(message.task_id, "the task cannot be encoded for the bus")

    async def run_ticker(self, period: float) -> None:
        while True:
            self.tick()
            await asyncio.sleep(period)
