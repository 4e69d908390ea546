"""Two real `exo-worker` processes (MLX, no --model) run the ranks a (fake) master places.

Each worker heartbeats its ring ports and its models' shapes; LoadInstance with a shard assignment
loads rank 0 on one node and rank 1 on the other, each in a child process of its worker; both
report the assignment; rank 0 answers; then the follower's process is killed with -9 mid-stream:
the task fails as instance_lost, both ranks report FAILED with a reason, no rank process is left,
and both workers live on, unload the ranks and exit cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from exo_master.devtools.ports import free_port
from protocol import codec
from protocol.ids import InstanceId, ModelId, NodeId, TaskId
from protocol.messages import (
    INSTANCE_LOST,
    AssignTask,
    ChatMessage,
    InstanceReport,
    InstanceStatus,
    LoadInstance,
    TaskFailed,
    TextGenerationParams,
    UnloadInstance,
    WorkerHeartbeat,
)
from protocol.sharding import RingPorts, ShardAssignment, Sharding
from tests.worker.test_worker_bus import FakeMaster, _kill, is_chunk, is_final

pytestmark = [pytest.mark.e2e, pytest.mark.mlx]

NODES = (NodeId("rank-a"), NodeId("rank-b"))


def children(pid: int) -> set[int]:
    """The live child processes of `pid` (Linux /proc)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found |= {int(p) for p in text}
    return found


def task(task_id: str, max_tokens: int) -> AssignTask:
    params = TextGenerationParams(
        model=ModelId("tiny"),
        messages=(ChatMessage(role="user", content="Hello, world!"),),
        max_tokens=max_tokens,
        temperature=0.0,
    )
    return AssignTask(task_id=TaskId(task_id), node_id=NODES[0], instance_id=InstanceId("g.0"), params=params)


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.05)  # wait-ok: polling a condition with a deadline


async def spawn(log: Path, *args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    with log.open("wb") as out:  # the worker's (and its ranks') logs: a pipe nobody reads could fill
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "exo_worker.daemon", *args, env={**os.environ, **env}, stderr=out
        )


def report(hb: WorkerHeartbeat, instance: str) -> InstanceReport | None:
    return next((r for r in hb.instances if r.instance_id == instance), None)


def test_two_workers_run_placed_ranks_and_survive_a_killed_follower(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny").symlink_to(tiny_model_dir)
    asyncio.run(asyncio.wait_for(_scenario(models, tmp_path), timeout=180))


async def _scenario(models: Path, logs: Path) -> None:
    master = FakeMaster()
    procs = []
    try:
        for node in NODES:
            env = {"EXO_RING_PORTS": "52600-52610"} if node == NODES[1] else {}
            args = ["--master", f"127.0.0.1:{master.port}", "--node-id", node, "--engine", "mlx"]
            args += ["--models-dir", str(models), "--heartbeat-interval", "0.2", "--shard-timeout", "3"]
            args += ["--log-format", "json", "--prompt-cache-bytes", "0"]
            procs.append(await spawn(logs / f"{node}.log", *args, env=env))
        beats = [await master.connected(node) for node in NODES]
        assert beats[0].ring == RingPorts(host="127.0.0.1", first=52600, last=52699)
        assert beats[1].ring == RingPorts(host="127.0.0.1", first=52600, last=52610)
        [tiny] = [m for m in beats[0].models if m.model == "tiny"]
        assert tiny.shape is not None and tiny.shape.num_layers == 2

        hosts = (f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
        control = f"127.0.0.1:{free_port()}"
        for rank, node in enumerate(NODES):
            shard = ShardAssignment(
                group="g", rank=rank, hosts=hosts, sharding=Sharding.PIPELINE, control=control, split=(1, 1)
            )
            load = LoadInstance(
                node_id=node,
                instance_id=InstanceId(f"g.{rank}"),
                model=ModelId("tiny"),
                placement="p",
                shard=shard,
            )
            master.send(codec.node_topic(node), load)
        for rank, node in enumerate(NODES):
            hb = await master.expect(
                lambda m, n=node, i=f"g.{rank}": (
                    isinstance(m, WorkerHeartbeat)
                    and m.node_id == n
                    and (r := report(m, i)) is not None
                    and r.status is InstanceStatus.READY
                ),
                timeout=120,
            )
            assert isinstance(hb, WorkerHeartbeat)
            ready = report(hb, f"g.{rank}")
            assert ready is not None and ready.shard is not None and ready.shard.rank == rank

        master.assign(task("t1", 6))
        done = await master.expect(is_final("t1"), timeout=60)
        assert not isinstance(done, TaskFailed), done

        follower_worker = procs[1].pid
        [follower] = children(follower_worker)
        [leader] = children(procs[0].pid)
        master.assign(task("t2", 2000))
        await master.expect(is_chunk("t2"), timeout=60)
        os.kill(follower, signal.SIGKILL)
        failed = await master.expect(is_final("t2"), timeout=15)
        assert isinstance(failed, TaskFailed) and failed.code == INSTANCE_LOST
        for node, instance in zip(NODES, ("g.0", "g.1"), strict=True):
            hb = await master.expect(
                lambda m, n=node, i=instance: (
                    isinstance(m, WorkerHeartbeat)
                    and m.node_id == n
                    and (r := report(m, i)) is not None
                    and r.status is InstanceStatus.FAILED
                ),
                timeout=15,
            )
            assert isinstance(hb, WorkerHeartbeat)
            broken = report(hb, instance)
            assert broken is not None and broken.error
        await until(lambda: leader not in children(procs[0].pid), 10, "rank 0's process reaped")
        assert not children(follower_worker)
        assert all(p.returncode is None for p in procs)  # both workers live on

        for rank, node in enumerate(NODES):
            master.send(
                codec.node_topic(node), UnloadInstance(node_id=node, instance_id=InstanceId(f"g.{rank}"))
            )
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        for proc in procs:
            _kill(proc)
            await proc.wait()
        master.close()
