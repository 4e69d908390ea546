"""The instance controller inside MasterCore: LoadInstance goes out, a loaded replica takes
requests like any instance, and a deleted one takes no new request while its running one finishes."""

from __future__ import annotations

from exo_master.core import CoreConfig, MasterCore
from exo_master.core.events import NodeSubscribed, SubmitTask, TaskPlaced
from exo_master.core.instances.desired import PlacementSpec
from protocol.ids import InstanceId, ModelId, NodeId, TaskId
from protocol.messages import (
    ChatMessage,
    InstanceReport,
    LoadInstance,
    LocalModel,
    TaskAccepted,
    TextGenerationParams,
    UnloadInstance,
    WorkerHeartbeat,
)

GIB = 2**30
MODEL = ModelId("m")


def beat(node: str, *instances: InstanceReport) -> WorkerHeartbeat:
    local = LocalModel(model=MODEL, weights_bytes=GIB)
    return WorkerHeartbeat(
        node_id=NodeId(node),
        instances=instances,
        memory_total=8 * GIB,
        memory_available=4 * GIB,
        models=(local,),
    )


def ready(load: LoadInstance, active: tuple[TaskId, ...] = ()) -> InstanceReport:
    return InstanceReport(
        instance_id=load.instance_id,
        model=load.model,
        placement=load.placement,
        max_concurrency=load.max_concurrency,
        active_tasks=active,
    )


def submit(core: MasterCore, task: str, now: float) -> list[object]:
    params = TextGenerationParams(model=MODEL, messages=(ChatMessage(role="user", content="hi"),))
    return list(core.handle(SubmitTask(task_id=TaskId(task), params=params), now))


def test_a_placed_replica_serves_and_a_deleted_one_drains_before_it_unloads() -> None:
    core = MasterCore(CoreConfig(heartbeat_liveness=1000))
    for node in ("a", "b"):
        core.handle(NodeSubscribed(node_id=NodeId(node)), 0.0)
        core.handle(beat(node), 0.0)
    plan, effects = core.place_instances(PlacementSpec(placement_id="p", model="m", replicas=1), 0.0)
    assert plan.chosen == (NodeId("a"),)
    [load] = [e for e in effects if isinstance(e, LoadInstance)]
    core.handle(beat("a", ready(load)), 1.0)
    [placed] = [e for e in submit(core, "t1", 1.0) if isinstance(e, TaskPlaced)]
    assert placed.instance_id == load.instance_id
    core.handle(TaskAccepted(node_id=NodeId("a"), task_id=TaskId("t1"), instance_id=load.instance_id), 1.0)

    found, effects = core.delete_instances("p", 2.0)
    assert found and not [e for e in effects if isinstance(e, UnloadInstance)]  # t1 still runs
    inst = core.state.instances[InstanceId(load.instance_id)]
    assert not core.eligible(inst)
    assert not [e for e in submit(core, "t2", 2.0) if isinstance(e, TaskPlaced)]
    assert core.view(2.0).instances[0].status == "draining"
    # t1 ends (the worker's snapshot no longer lists it as active): the replica unloads.
    core.handle(beat("a", ready(load)), 3.0)
    effects = core.tick(3.0)
    assert [e.instance_id for e in effects if isinstance(e, UnloadInstance)] == [load.instance_id]
    core.handle(beat("a"), 4.0)
    core.tick(4.0)
    assert core.instances.placements == {} and core.instances.replicas == {}
