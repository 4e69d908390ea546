"""A sharded instance inside MasterCore: rank 0 takes the requests (the ranks > 0 are invisible to
the scheduler), and when a rank fails the tasks on rank 0 are lost at once with the cause: a task
whose output reached the client fails (503, naming the lost rank), one without output waits for
the instance the master places again."""

from __future__ import annotations

from exo_master.core import CoreConfig, MasterCore
from exo_master.core.events import NodeSubscribed, SubmitTask, TaskErrored, TaskOutput, TaskPlaced
from exo_master.core.instances.desired import PlacementSpec
from protocol.cluster_view import TaskStatus
from protocol.ids import NodeId, TaskId
from protocol.messages import (
    ChatMessage,
    InstanceReport,
    InstanceStatus,
    LoadInstance,
    TaskAccepted,
    TaskChunk,
    TextGenerationParams,
    WorkerHeartbeat,
)
from protocol.sharding import RingPorts, Sharding
from tests.master.test_shard_controller import LOCAL

GIB = 2**30


def beat(node: str, *instances: InstanceReport) -> WorkerHeartbeat:
    return WorkerHeartbeat(
        node_id=NodeId(node),
        instances=instances,
        memory_total=8 * GIB,
        memory_available=6 * GIB,
        models=(LOCAL,),
        ring=RingPorts(host="127.0.0.1", first=7000, last=7099),
    )


def report(load: LoadInstance, status: InstanceStatus = InstanceStatus.READY) -> InstanceReport:
    return InstanceReport(
        instance_id=load.instance_id,
        model=load.model,
        placement=load.placement,
        max_concurrency=load.max_concurrency,
        status=status,
        shard=load.shard,
        error="exited with code -9" if status is InstanceStatus.FAILED else None,
    )


def submit(core: MasterCore, task: str, now: float) -> list[object]:
    params = TextGenerationParams(model=LOCAL.model, messages=(ChatMessage(role="user", content="hi"),))
    return list(core.handle(SubmitTask(task_id=TaskId(task), params=params), now))


def test_a_lost_rank_fails_the_streaming_task_with_its_cause_and_requeues_the_silent_one() -> None:
    core = MasterCore(CoreConfig(heartbeat_liveness=1000))
    for node in ("a", "b", "c"):
        core.handle(NodeSubscribed(node_id=NodeId(node)), 0.0)
        core.handle(beat(node), 0.0)
    spec = PlacementSpec(placement_id="p", model=str(LOCAL.model), shards=3, sharding=Sharding.TENSOR)
    plan, effects = core.place_instances(spec, 0.0)
    assert plan.complete
    loads = {e.node_id: e for e in effects if isinstance(e, LoadInstance)}
    leader = next(e for e in loads.values() if e.shard and e.shard.rank == 0)
    follower = next(e for e in loads.values() if e.shard and e.shard.rank == 2)
    for node, load in loads.items():
        core.handle(beat(node, report(load)), 1.0)
    assert [i.instance_id for i in core.view(1.0).instances] == [leader.instance_id]  # rank 0 only

    [first] = [e for e in submit(core, "t1", 1.0) if isinstance(e, TaskPlaced)]
    assert first.instance_id == leader.instance_id
    node = NodeId(leader.node_id)
    core.handle(TaskAccepted(node_id=node, task_id=TaskId("t1"), instance_id=leader.instance_id), 1.0)
    chunk = TaskChunk(node_id=node, task_id=TaskId("t1"), instance_id=leader.instance_id, index=0, text="Pa")
    assert any(isinstance(e, TaskOutput) for e in core.handle(chunk, 1.0))
    assert [e for e in submit(core, "t2", 1.0) if isinstance(e, TaskPlaced)]  # not accepted yet

    effects = list(core.handle(beat(follower.node_id, report(follower, InstanceStatus.FAILED)), 2.0))
    [errored] = [e for e in effects if isinstance(e, TaskErrored)]
    assert errored.task_id == "t1" and errored.unavailable
    assert f"sharded instance {leader.instance_id} lost a rank: rank 2" in errored.message
    assert "exited with code -9" in errored.message
    t2 = core.task(TaskId("t2"))
    assert t2 is not None and t2.status is TaskStatus.QUEUED  # waits for the instance placed again
    assert not core.eligible(core.state.instances[leader.instance_id])

    # The master places the whole instance again at once; requests wait for it, new ones too.
    again = {e.node_id: e for e in core.tick(2.5) if isinstance(e, LoadInstance)}
    assert len(again) == 3 and leader.instance_id not in {e.instance_id for e in again.values()}
    assert not [e for e in submit(core, "t3", 2.6) if isinstance(e, (TaskErrored, TaskPlaced))]
    for node, load in again.items():
        core.handle(beat(node, report(load)), 3.0)
    new_leader = next(e for e in again.values() if e.shard and e.shard.rank == 0)
    placed = {core.task(TaskId(t)).instance_id for t in ("t2", "t3")}  # type: ignore[union-attr]
    assert placed == {new_leader.instance_id}
