"""Instances loaded and unloaded on the master's command (LoadInstance / UnloadInstance).

Both commands are idempotent (the master re-sends them until a heartbeat shows them done): a load
of an instance already here, or an unload of one that is not, does nothing. Loads run one at a time
(bounded peak memory) with their progress in the heartbeats; a model this node does not hold, or a
load that fails, leaves a failed instance that the master sees, unloads, and places elsewhere. An
unload stops the instance at once: the master drained it first.
"""

from __future__ import annotations

import asyncio
import threading

import structlog

from exo_worker.engine import Engine, EngineError, ModelLoadError, ProgressSink, RunOutcome, TextSink
from exo_worker.engine_choice import ModelEngineFactory
from exo_worker.runner import Runner, RunnerGroup, Send
from protocol.ids import InstanceId, ModelId, NodeId
from protocol.messages import InstanceStatus, LoadInstance, LocalModel, TaskKind, TaskParams, UnloadInstance

log = structlog.get_logger("exo_worker.instances")


class InstanceHost:
    def __init__(
        self,
        node_id: NodeId,
        runners: RunnerGroup,
        send: Send,
        catalog: dict[ModelId, LocalModel],
        engine_for: ModelEngineFactory,
        context_tokens: int = 4096,
    ) -> None:
        self.node_id = node_id
        self.runners = runners
        self.send = send
        self.catalog = catalog
        self.engine_for = engine_for
        self.context_tokens = context_tokens
        self._load_lock = asyncio.Lock()
        self._loads: dict[InstanceId, asyncio.Task[None]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def memory_in_use(self) -> int:
        return sum(r.memory_bytes for r in self.runners.runners.values())

    def load(self, cmd: LoadInstance) -> None:
        if cmd.instance_id in self.runners.runners:
            return  # already here (loading, ready or failed): the heartbeat says which
        local = self.catalog.get(cmd.model)
        need = (
            0
            if local is None
            else local.weights_bytes + local.kv_bytes_per_token * self.context_tokens * cmd.max_concurrency
        )
        engine: Engine | None = None
        error = None
        if local is None:
            error = f"node {self.node_id} does not hold model {cmd.model!r}"
        else:
            try:
                engine = self.engine_for(cmd.model, cmd.instance_id, cmd.max_concurrency)
            except ModelLoadError as exc:
                error = str(exc)
        runner = Runner(
            node_id=self.node_id,
            instance_id=cmd.instance_id,
            model=cmd.model,
            engine=engine if engine is not None else _NoEngine(),
            send=self.send,
            max_concurrency=cmd.max_concurrency,
            capacity=cmd.capacity,
            placement=cmd.placement,
            memory_bytes=need if engine is not None else 0,
        )
        self.runners.runners[cmd.instance_id] = runner
        if error is not None:
            runner.status, runner.error = InstanceStatus.FAILED, error
            log.error("instance.load_failed", instance_id=cmd.instance_id, model=cmd.model, error=error)
            return
        log.info("instance.load", instance_id=cmd.instance_id, model=cmd.model, placement=cmd.placement)
        task = asyncio.get_running_loop().create_task(self._load(runner), name=f"load:{cmd.instance_id}")
        self._loads[cmd.instance_id] = task
        task.add_done_callback(lambda _: self._loads.pop(cmd.instance_id, None))

    async def _load(self, runner: Runner) -> None:
        async with self._load_lock:
            if self.runners.runners.get(runner.instance_id) is not runner:
                return  # unloaded while it waited for its turn
            try:
                await runner.load()
            except ModelLoadError as exc:
                runner.memory_bytes = 0
                log.error("instance.load_failed", instance_id=runner.instance_id, error=str(exc))
                return
        log.info("instance.ready", instance_id=runner.instance_id, model=runner.model)

    def unload(self, cmd: UnloadInstance) -> None:
        runner = self.runners.runners.pop(cmd.instance_id, None)
        if runner is None:
            return
        loading = self._loads.pop(cmd.instance_id, None)
        if loading is not None:
            loading.cancel()
        log.info("instance.unload", instance_id=cmd.instance_id, model=runner.model)
        task = asyncio.get_running_loop().create_task(self._close(runner), name=f"unload:{cmd.instance_id}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close(runner: Runner) -> None:
        await runner.shutdown(grace=1.0)
        close = getattr(runner.engine, "close", None)
        if callable(close):
            close()  # the MLX engine's thread ends; its weights are freed with the engine

    async def shutdown(self) -> None:
        for task in list(self._loads.values()):
            task.cancel()
        await asyncio.gather(*self._loads.values(), *self._closing, return_exceptions=True)


class _NoEngine:
    """Stands in for the engine of an instance that failed before it had one: never loaded or run."""

    @property
    def kinds(self) -> tuple[TaskKind, ...]:
        return ()

    async def load(self, progress: ProgressSink | None = None) -> None:
        raise ModelLoadError("this instance has no engine")

    async def run(self, params: TaskParams, on_text: TextSink, cancel: threading.Event) -> RunOutcome:
        raise EngineError("this instance has no engine")
