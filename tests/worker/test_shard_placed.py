"""Ranks the master places (LoadInstance with a shard assignment), on the tiny offline llama with
real MLX on loopback: a node's InstanceHost runs rank 0 in a child process (ProcessEngine) and a
follower in another; both report the assignment; rank 0 answers; a follower takes no task; a
follower killed with -9 mid-stream fails the task as instance_lost and the instance, and leaves no
rank process behind; an unload ends a follower."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from exo_master.devtools.ports import free_ports
from exo_worker.engine import Engine
from exo_worker.instance_host import InstanceHost
from exo_worker.local_models import estimate
from exo_worker.process_engine import ProcessEngine
from exo_worker.runner_group import RunnerGroup
from exo_worker.shard_ranks import ShardLauncher
from protocol.ids import InstanceId, ModelId, NodeId, TaskId
from protocol.messages import (
    INSTANCE_LOST,
    AssignTask,
    ChatMessage,
    InstanceStatus,
    LoadInstance,
    TaskChunk,
    TaskFailed,
    TaskFinished,
    TaskKind,
    TextGenerationParams,
    UnloadInstance,
)
from protocol.sharding import ShardAssignment, Sharding

pytestmark = pytest.mark.mlx

NODE = NodeId("n")
MODEL = ModelId("tiny")


def arun(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    def wrapper(tiny_model_dir: Path) -> None:
        asyncio.run(asyncio.wait_for(test(tiny_model_dir), timeout=150))

    wrapper.__name__ = test.__name__
    return wrapper


class Node:
    def __init__(self, model_dir: Path, **launcher: Any) -> None:
        self.sent: list[object] = []
        self.group = RunnerGroup(NODE, [], self.sent.append)

        def no_whole_instances(model: ModelId, instance_id: InstanceId, slots: int) -> Engine:
            raise AssertionError("only ranks are placed here")

        settings = ShardLauncher(prompt_cache_bytes=0, loss_timeout=3.0, log_level="warning", **launcher)
        catalog = {MODEL: estimate(MODEL, model_dir)}
        self.host = InstanceHost(
            NODE, self.group, self.sent.append, catalog, no_whole_instances, shards=settings
        )
        first, second, control = free_ports(3)
        self.hosts = (f"127.0.0.1:{first}", f"127.0.0.1:{second}")
        self.control = f"127.0.0.1:{control}"

    def load(self, rank: int) -> LoadInstance:
        shard = ShardAssignment(
            group="g/0",
            rank=rank,
            hosts=self.hosts,
            sharding=Sharding.PIPELINE,
            control=self.control,
            split=(1, 1),
            memory_bytes=1000 + rank,
        )
        cmd = LoadInstance(
            node_id=NODE,
            instance_id=InstanceId(f"g/{rank}"),
            model=MODEL,
            placement="p",
            max_concurrency=2,
            shard=shard,
        )
        self.host.load(cmd)
        return cmd

    def report(self, rank: int) -> Any:
        [report] = [
            r for r in self.group.reports() + self.host.rank_reports() if r.instance_id == f"g/{rank}"
        ]
        return report

    def assign(self, rank: int, task: str, max_tokens: int) -> None:
        params = TextGenerationParams(
            model=MODEL,
            messages=(ChatMessage(role="user", content="Hello, world!"),),
            max_tokens=max_tokens,
            temperature=0.0,
        )
        assign = AssignTask(
            task_id=TaskId(task),
            node_id=NODE,
            instance_id=InstanceId(f"g/{rank}"),
            params=params,
        )
        if not self.host.refuse_rank_task(assign):
            self.group.handle_assign(assign)

    def final(self, task: str) -> TaskFinished | TaskFailed | None:
        for message in self.sent:
            if isinstance(message, TaskFinished | TaskFailed) and message.task_id == task:
                return message
        return None


async def until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := condition()):
        assert asyncio.get_running_loop().time() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.02)  # wait-ok: polling a condition with a deadline
    return value


def alive(pid: int | None) -> bool:
    assert pid is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@arun
async def test_placed_ranks_answer_refuse_follower_tasks_and_a_killed_follower_fails_the_instance(
    tiny_model_dir: Path,
) -> None:
    node = Node(tiny_model_dir)
    follower_cmd, leader_cmd = node.load(1), node.load(0)
    assert node.report(0).shard == leader_cmd.shard and node.report(1).shard == follower_cmd.shard
    assert (node.report(0).status, node.report(1).status) == (InstanceStatus.LOADING, InstanceStatus.LOADING)
    assert (node.report(0).memory_bytes, node.report(1).memory_bytes) == (1000, 1001)
    await until(lambda: node.report(0).status is InstanceStatus.READY, 120, "rank 0 ready")
    await until(lambda: node.report(1).status is InstanceStatus.READY, 10, "rank 1 ready")
    assert not node.report(1).takes_tasks and node.report(1).kinds == (TaskKind.TEXT_GENERATION,)

    node.assign(0, "t1", 8)
    done = await until(lambda: node.final("t1"), 60, "the answer")
    assert isinstance(done, TaskFinished) and done.usage.completion_tokens == 8
    node.assign(1, "t2", 8)
    refused = node.final("t2")
    assert isinstance(refused, TaskFailed) and refused.refused and "takes no tasks" in refused.reason

    engine = node.group.runners[InstanceId("g/0")].engine
    follower = node.host.followers[InstanceId("g/1")]
    assert isinstance(engine, ProcessEngine)
    pids = (engine.pid, follower.pid)
    node.assign(0, "t3", 2000)
    await until(lambda: any(isinstance(m, TaskChunk) and m.task_id == "t3" for m in node.sent), 60, "output")
    assert node.final("t3") is None
    os.kill(follower.pid or 0, signal.SIGKILL)
    failed = await until(lambda: node.final("t3"), 15, "the stream's end")
    assert isinstance(failed, TaskFailed) and failed.code == INSTANCE_LOST and not failed.refused
    leader = await until(
        lambda: (r := node.report(0)).status is InstanceStatus.FAILED and r, 5, "rank 0 failed"
    )
    assert leader.error is not None and "lost a rank" in leader.error
    follower_report = await until(
        lambda: (r := node.report(1)).status is InstanceStatus.FAILED and r, 5, "rank 1 failed"
    )
    assert follower_report.error == "the rank process was killed by signal 9"
    assert await asyncio.to_thread(engine.exited.wait, 10)  # rank 0's process left by itself
    assert not any(alive(pid) for pid in pids)

    node.host.unload(UnloadInstance(node_id=NODE, instance_id=InstanceId("g/0")))
    node.host.unload(UnloadInstance(node_id=NODE, instance_id=InstanceId("g/1")))
    await node.host.shutdown()
    assert node.group.reports() == () and node.host.rank_reports() == ()


@arun
async def test_an_unload_ends_a_follower(tiny_model_dir: Path) -> None:
    node = Node(tiny_model_dir)
    node.load(1)  # its rank 0 never comes: it waits (in the ring's set-up)
    follower = node.host.followers[InstanceId("g/1")]
    assert node.report(1).status is InstanceStatus.LOADING
    node.host.unload(UnloadInstance(node_id=NODE, instance_id=InstanceId("g/1")))
    assert node.host.rank_reports() == () and node.host.memory_in_use() == 0
    await node.host.shutdown()
    assert follower.exited.is_set() and follower.exit_code == -signal.SIGTERM and not alive(follower.pid)
