"""Instances loaded and unloaded on the master's command (LoadInstance / UnloadInstance).

Both commands are idempotent (the master re-sends them until a heartbeat shows them done): a load
of an instance already here, or an unload of one that is not, does nothing. Loads run one at a time
(bounded peak memory) with their progress in the heartbeats; a model this node does not hold, or a
load that fails, leaves a failed instance that the master sees, unloads, and places elsewhere. An
unload stops the instance at once: the master drained it first.

A LoadInstance with a shard assignment is one rank of a sharded instance (shard_ranks.py): rank 0
is a runner whose engine runs in a child process, a rank > 0 a `FollowerRank` process reported
beside the runners. Ranks do not queue for the one-load-at-a-time lock: rank 0's load waits for
its followers, so two groups spread over the same nodes could otherwise wait on each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import structlog

from exo_worker.engine import Engine, EngineError, ModelLoadError, ProgressSink, RunOutcome, TextSink
from exo_worker.engine_choice import ModelEngineFactory
from exo_worker.process_engine import ProcessEngine
from exo_worker.runner import Runner, Send
from exo_worker.runner_group import RunnerGroup
from exo_worker.shard_ranks import FollowerRank, ShardLauncher
from protocol.ids import InstanceId, ModelId, NodeId
from protocol.messages import (
    AssignTask,
    InstanceReport,
    InstanceStatus,
    LoadInstance,
    LocalModel,
    TaskFailed,
    TaskKind,
    TaskParams,
    UnloadInstance,
)

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
        shards: ShardLauncher | None = None,
    ) -> None:
        self.node_id = node_id
        self.runners = runners
        self.send = send
        self.catalog = catalog
        self.engine_for = engine_for
        self.context_tokens = context_tokens
        self.shards = shards  # None: this node cannot run ranks of sharded instances
        self.followers: dict[InstanceId, FollowerRank] = {}
        self._load_lock = asyncio.Lock()
        self._loads: dict[InstanceId, asyncio.Task[None]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def memory_in_use(self) -> int:
        held = sum(r.memory_bytes for r in self.runners.runners.values())
        return held + sum(f.memory_bytes for f in self.followers.values())

    def holds(self, instance_id: InstanceId) -> bool:
        return instance_id in self.runners.runners or instance_id in self.followers

    def rank_reports(self) -> tuple[InstanceReport, ...]:
        """The followers' reports (the runners report themselves)."""
        return tuple(f.report() for f in self.followers.values())

    def refuse_rank_task(self, assign: AssignTask) -> bool:
        """A task for a follower is refused (rank 0 takes the instance's tasks): True when it was."""
        follower = self.followers.get(assign.instance_id)
        if follower is None:
            return False
        reason = (
            f"instance {assign.instance_id} is rank {follower.shard.rank} of sharded instance "
            f"{follower.shard.group}: it takes no tasks"
        )
        failed = TaskFailed(
            node_id=self.node_id,
            task_id=assign.task_id,
            instance_id=assign.instance_id,
            reason=reason,
            refused=True,
        )
        self.send(failed)
        return True

    def load(self, cmd: LoadInstance) -> None:
        if self.holds(cmd.instance_id):
            return  # already here (loading, ready or failed): the heartbeat says which
        local = self.catalog.get(cmd.model)
        need = (
            0
            if local is None
            else local.weights_bytes + local.kv_bytes_per_token * self.context_tokens * cmd.max_concurrency
        )
        if cmd.shard is not None and cmd.shard.rank > 0:
            self._start_follower(cmd, local)
            return
        engine: Engine | None = None
        error = None
        if local is None:
            error = f"node {self.node_id} does not hold model {cmd.model!r}"
        elif cmd.shard is not None:
            need = cmd.shard.memory_bytes
            if self.shards is None:
                error = f"node {self.node_id} cannot run ranks of sharded instances"
            elif self.shards.simulated:
                engine = self.engine_for(cmd.model, cmd.instance_id, cmd.max_concurrency)
            else:
                engine = self.shards.rank0(local.path, cmd)
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
            shard=cmd.shard,
        )
        self.runners.runners[cmd.instance_id] = runner
        if error is not None:
            runner.status, runner.error = InstanceStatus.FAILED, error
            log.error("instance.load_failed", instance_id=cmd.instance_id, model=cmd.model, error=error)
            return
        log.info("instance.load", instance_id=cmd.instance_id, model=cmd.model, placement=cmd.placement)
        load = self._load(runner, exclusive=cmd.shard is None)
        task = asyncio.get_running_loop().create_task(load, name=f"load:{cmd.instance_id}")
        self._loads[cmd.instance_id] = task
        task.add_done_callback(lambda _: self._loads.pop(cmd.instance_id, None))

    def _start_follower(self, cmd: LoadInstance, local: LocalModel | None) -> None:
        assert cmd.shard is not None
        follower = FollowerRank(self.node_id, cmd, self.shards.stop_grace if self.shards else 3.0)
        self.followers[cmd.instance_id] = follower
        if local is None:
            follower.fail(f"node {self.node_id} does not hold model {cmd.model!r}")
        elif self.shards is None:
            follower.fail(f"node {self.node_id} cannot run ranks of sharded instances")
        else:
            log.info("instance.load", instance_id=cmd.instance_id, model=cmd.model, rank=cmd.shard.rank)
            follower.start(self.shards.follower_argv(local.path, cmd.shard))

    async def _load(self, runner: Runner, exclusive: bool = True) -> None:
        async with self._load_lock if exclusive else contextlib.nullcontext():
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
        follower = self.followers.pop(cmd.instance_id, None)
        if follower is not None:
            log.info("instance.unload", instance_id=cmd.instance_id, model=follower.cmd.model)
            self._track(
                asyncio.get_running_loop().create_task(follower.stop(), name=f"unload:{cmd.instance_id}")
            )
            return
        runner = self.runners.runners.pop(cmd.instance_id, None)
        if runner is None:
            return
        loading = self._loads.pop(cmd.instance_id, None)
        if loading is not None:
            loading.cancel()
        log.info("instance.unload", instance_id=cmd.instance_id, model=runner.model)
        self._track(
            asyncio.get_running_loop().create_task(self._close(runner), name=f"unload:{cmd.instance_id}")
        )

    def _track(self, task: asyncio.Task[None]) -> None:
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
        # Rank processes end with the worker (they would also notice their stdin close); rank 0's
        # tasks are cancelled first, as every instance's are at shutdown.
        ranks0 = [r for r in self.runners.runners.values() if isinstance(r.engine, ProcessEngine)]
        await asyncio.gather(*(r.shutdown(grace=1.0) for r in ranks0))
        for runner in ranks0:
            assert isinstance(runner.engine, ProcessEngine)
            runner.engine.close()
        stopping = [f.stop() for f in self.followers.values()]
        self.followers.clear()
        await asyncio.gather(*stopping, return_exceptions=True)


class _NoEngine:
    """Stands in for the engine of an instance that failed before it had one: never loaded or run."""

    @property
    def kinds(self) -> tuple[TaskKind, ...]:
        return ()

    async def load(self, progress: ProgressSink | None = None) -> None:
        raise ModelLoadError("this instance has no engine")

    async def run(self, params: TaskParams, on_text: TextSink, cancel: threading.Event) -> RunOutcome:
        raise EngineError("this instance has no engine")
