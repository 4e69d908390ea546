"""Loss handling in two phases and age order everywhere: the three defects of the single-module
core, plus worker refusals. Written against `handle`/`tick` and their effects only."""

from __future__ import annotations

from collections import Counter

from exo_master.core import CoreConfig, MasterCore
from exo_master.core.events import NodeSubscribed, TaskErrored, TaskPlaced, TaskQueued
from protocol.ids import InstanceId, NodeId, TaskId
from protocol.messages import AssignTask, InstanceReport, TaskFailed, TaskKind, WorkerHeartbeat
from tests.master.cluster import MODEL, finish, only, placement_of, submit

TEXT, IMAGE = TaskKind.TEXT_GENERATION, TaskKind.IMAGE_GENERATION


def inst(node: int, j: int = 0, capacity: float = 1.0, max_concurrency: int = 100) -> InstanceReport:
    return InstanceReport(
        instance_id=InstanceId(f"node{node}/{j}"),
        model=MODEL,
        kinds=(TEXT, IMAGE),
        capacity=capacity,
        max_concurrency=max_concurrency,
    )


def join(core: MasterCore, node: int, *reports: InstanceReport, now: float = 0.0) -> list[object]:
    node_id = NodeId(f"node{node}")
    core.handle(NodeSubscribed(node_id=node_id), now)
    return list(core.handle(WorkerHeartbeat(node_id=node_id, instances=reports), now))


def placements_per_task(effects: list[object]) -> Counter[TaskId]:
    return Counter(p.task_id for p in only(effects, TaskPlaced))


# ---- one loss costs one attempt ----------------------------------------------------------------


def test_a_node_with_two_instances_dying_re_places_each_task_once_on_a_live_node() -> None:
    core = MasterCore(CoreConfig(max_attempts=2))
    # node0's two fast instances take the burst; node1's slower one is the only survivor.
    join(core, 0, inst(0, 0, capacity=4), inst(0, 1, capacity=4))
    first = [placement_of(submit(core, f"t{i}")) for i in range(2)]
    assert {p.instance_id for p in first if p} == {"node0/0", "node0/1"}
    join(core, 1, inst(1, capacity=1))
    core.handle(WorkerHeartbeat(node_id=NodeId("node1"), instances=(inst(1, capacity=1),)), 3.5)
    effects = core.tick(3.5)  # node0 silent since 0.0: dead
    assert not only(effects, TaskErrored), "a task failed while node1 had free slots"
    assert placements_per_task(effects) == {TaskId("t0"): 1, TaskId("t1"): 1}
    assert {p.instance_id for p in only(effects, TaskPlaced)} == {"node1/0"}
    assert all(a.node_id == "node1" for a in only(effects, AssignTask)), "work sent to a dead node"
    core.check_invariants()


def test_two_nodes_dying_in_one_tick_cost_each_task_one_attempt() -> None:
    core = MasterCore(CoreConfig(max_attempts=2))
    join(core, 0, inst(0, capacity=4))
    join(core, 1, inst(1, capacity=4))
    for i in range(2):
        submit(core, f"t{i}")
    join(core, 2, inst(2, capacity=1))
    core.handle(WorkerHeartbeat(node_id=NodeId("node2"), instances=(inst(2, capacity=1),)), 3.5)
    effects = core.tick(3.5)
    assert not only(effects, TaskErrored)
    assert placements_per_task(effects) == {TaskId("t0"): 1, TaskId("t1"): 1}
    assert {p.instance_id for p in only(effects, TaskPlaced)} == {"node2/0"}
    core.check_invariants()


def test_a_heartbeat_dropping_several_instances_re_places_their_tasks_once() -> None:
    core = MasterCore(CoreConfig(max_attempts=2))
    join(core, 0, inst(0, 0, capacity=4), inst(0, 1, capacity=4))
    join(core, 1, inst(1, capacity=1))
    for i in range(2):
        submit(core, f"t{i}")
    # node0 unloads both instances at once.
    effects = core.handle(WorkerHeartbeat(node_id=NodeId("node0"), instances=()), 1.0)
    assert not only(effects, TaskErrored)
    assert placements_per_task(effects) == {TaskId("t0"): 1, TaskId("t1"): 1}
    assert {p.instance_id for p in only(effects, TaskPlaced)} == {"node1/0"}
    core.check_invariants()


# ---- age order ---------------------------------------------------------------------------------


def test_expired_tasks_are_re_placed_before_younger_waiting_requests() -> None:
    core = MasterCore(CoreConfig(ledger_ttl=5.0, heartbeat_liveness=100))
    join(core, 0, inst(0, max_concurrency=1))
    join(core, 1, inst(1, max_concurrency=1))
    submit(core, "t0")
    submit(core, "t1")
    assert only(submit(core, "t2"), TaskQueued)
    effects = core.tick(5.0)  # neither worker confirmed: both entries expire in this tick
    assert sorted(p.task_id for p in only(effects, TaskPlaced)) == ["t0", "t1"], "a younger request won"
    core.check_invariants()


def test_a_freed_slot_serves_the_oldest_waiting_request_across_kinds() -> None:
    core = MasterCore()
    join(core, 0, inst(0, max_concurrency=1))
    running = placement_of(submit(core, "t0", kind=TEXT))
    assert running is not None
    assert only(submit(core, "i1", kind=IMAGE), TaskQueued)  # older
    assert only(submit(core, "t2", kind=TEXT), TaskQueued)  # younger
    effects = finish(core, running, now=1.0)
    assert [p.task_id for p in only(effects, TaskPlaced)] == ["i1"]
    core.check_invariants()


# ---- refusals ----------------------------------------------------------------------------------


def test_a_refusal_before_accepting_is_re_placed_not_failed() -> None:
    core = MasterCore()
    join(core, 0, inst(0))
    join(core, 1, inst(1))
    placed = placement_of(submit(core, "t0"))
    assert placed is not None
    refusal = TaskFailed(
        node_id=placed.node_id,
        task_id=placed.task_id,
        instance_id=placed.instance_id,
        reason="worker is shutting down",
        refused=True,
    )
    effects = core.handle(refusal, 0.1)
    assert not only(effects, TaskErrored)
    again = placement_of(effects)
    assert again is not None and again.instance_id != placed.instance_id and again.attempt == 2
    core.check_invariants()


def test_a_failure_after_starting_still_fails_the_request() -> None:
    core = MasterCore()
    join(core, 0, inst(0))
    placed = placement_of(submit(core, "t0"))
    assert placed is not None
    failure = TaskFailed(
        node_id=placed.node_id, task_id=placed.task_id, instance_id=placed.instance_id, reason="engine died"
    )
    (errored,) = only(core.handle(failure, 0.1), TaskErrored)
    assert errored.message == "engine died" and not errored.unavailable
