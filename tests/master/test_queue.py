"""Admission: late binding through the bounded per-(model, kind) wait queue, and rejections."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from exo_master.core import MasterCore
from exo_master.core.events import (
    CancelRequest,
    NodeSubscribed,
    RejectReason,
    SubmitTask,
    TaskErrored,
    TaskPlaced,
    TaskQueued,
    TaskRejected,
)
from exo_master.core.queue import WaitQueues
from protocol.cluster_view import TaskStatus
from protocol.ids import InstanceId, ModelId, TaskId
from protocol.messages import AssignTask, CancelTask, InstanceReport, InstanceStatus, TaskKind
from tests.master.cluster import (
    ALL_KINDS,
    MODEL,
    accept,
    burst,
    cluster,
    finish,
    heartbeat,
    instance_of,
    node_of,
    only,
    params,
    placement_of,
    report,
    submit,
)

K, C = 3, 2  # instances, slots per instance


def full_cluster(queue_limit: int = 256) -> tuple[MasterCore, list[TaskPlaced]]:
    """K instances with C slots each, every slot taken by a pending task."""
    core = cluster(K, max_concurrency=C, queue_limit=queue_limit)
    placed = burst(core, K * C, prefix="busy")
    return core, placed


def queued_position(effects: Sequence[object]) -> int:
    (queued,) = only(effects, TaskQueued)
    assert not only(effects, TaskPlaced) and not only(effects, AssignTask)
    return queued.position


def test_the_request_past_every_slot_is_queued_first_in_line() -> None:
    core, _ = full_cluster()
    assert sorted(core.load(i) for i in core.state.instances.values()) == [C] * K
    assert queued_position(submit(core, "extra")) == 1
    assert queued_position(submit(core, "extra2")) == 2
    core.check_invariants()


@pytest.mark.parametrize("freed", range(K))
def test_a_finished_task_hands_its_slot_to_the_head_of_the_queue(freed: int) -> None:
    core, placed = full_cluster()
    submit(core, "waiting", now=1.0)
    done = next(p for p in placed if p.instance_id == instance_of(freed))
    accept(core, done, now=1.5)
    effects = finish(core, done, now=2.0)
    bound = placement_of(effects)
    assert bound is not None and bound.task_id == "waiting"
    assert bound.instance_id == instance_of(freed)
    assert bound.waited == pytest.approx(1.0)
    assert [a.instance_id for a in only(effects, AssignTask)] == [instance_of(freed)]
    assert len(core.book.queues) == 0
    core.check_invariants()


@pytest.mark.parametrize("freed", range(K))
def test_a_cancelled_task_hands_its_slot_to_the_head_of_the_queue(freed: int) -> None:
    core, placed = full_cluster()
    submit(core, "waiting", now=1.0)
    gone = next(p for p in placed if p.instance_id == instance_of(freed))
    effects = core.handle(CancelRequest(task_id=gone.task_id), now=2.0)
    assert only(effects, CancelTask) == [
        CancelTask(task_id=gone.task_id, node_id=node_of(freed), instance_id=instance_of(freed))
    ]
    bound = placement_of(effects)
    assert bound is not None and (bound.task_id, bound.instance_id) == ("waiting", instance_of(freed))
    core.check_invariants()


def test_waiting_requests_are_bound_in_arrival_order() -> None:
    core, placed = full_cluster()
    waiting = [f"w{i}" for i in range(5)]
    for i, task_id in enumerate(waiting):
        assert queued_position(submit(core, task_id, now=1.0 + i)) == i + 1
    bound = []
    for i, p in enumerate(placed[:5]):
        got = placement_of(finish(core, p, now=10.0 + i))
        assert got is not None and got.instance_id == p.instance_id
        bound.append(got.task_id)
    assert bound == waiting
    core.check_invariants()


def test_past_the_queue_limit_requests_are_rejected_with_a_reason() -> None:
    core, _ = full_cluster(queue_limit=2)
    submit(core, "q1")
    submit(core, "q2")
    (rejected,) = only(submit(core, "q3"), TaskRejected)
    assert rejected.task_id == "q3" and rejected.reason is RejectReason.QUEUE_FULL
    assert "retry" in rejected.message and str(MODEL) in rejected.message
    assert core.task(TaskId("q3")) is None
    assert len(core.book.queues) == 2
    core.check_invariants()


def test_a_zero_queue_limit_rejects_as_soon_as_every_slot_is_taken() -> None:
    core, _ = full_cluster(queue_limit=0)
    (rejected,) = only(submit(core, "extra"), TaskRejected)
    assert rejected.reason is RejectReason.QUEUE_FULL


def test_queues_are_per_task_kind() -> None:
    core, _ = full_cluster(queue_limit=1)
    submit(core, "text")
    assert only(submit(core, "text2"), TaskRejected)[0].reason is RejectReason.QUEUE_FULL
    assert queued_position(submit(core, "image", kind=TaskKind.IMAGE_GENERATION)) == 1


def test_unknown_model_is_rejected() -> None:
    core = cluster(2)
    effects = core.handle(SubmitTask(task_id=TaskId("t"), params=params(model=ModelId("nope"))), 0.0)
    (rejected,) = only(effects, TaskRejected)
    assert rejected.reason is RejectReason.UNKNOWN_MODEL and "nope" in rejected.message
    assert len(effects) == 1 and not core.book.live


def test_a_kind_no_instance_serves_is_rejected() -> None:
    core = cluster(0)
    core.handle(NodeSubscribed(node_id=node_of(0)), 0.0)
    core.handle(heartbeat(0, report(0, kinds=(TaskKind.TEXT_GENERATION,))), 0.0)
    (rejected,) = only(submit(core, "img", kind=TaskKind.IMAGE_EDITS), TaskRejected)
    assert rejected.reason is RejectReason.UNSUPPORTED_KIND


def test_a_task_id_in_use_is_rejected_as_a_duplicate() -> None:
    core = cluster(1)
    (placed,) = burst(core, 1)
    assert only(submit(core, placed.task_id), TaskRejected)[0].reason is RejectReason.DUPLICATE_TASK
    finish(core, placed)
    assert only(submit(core, placed.task_id), TaskRejected)[0].reason is RejectReason.DUPLICATE_TASK
    assert core.state.instances[instance_of(0)].completed == 1


def test_a_model_whose_nodes_all_died_has_no_live_instance() -> None:
    core = cluster(2)
    core.tick(0.0)
    core.tick(3.5)  # no heartbeat for longer than 3 x 1 s
    assert not any(n.alive for n in core.state.nodes.values())
    (rejected,) = only(submit(core, "late", now=3.5), TaskRejected)
    assert rejected.reason is RejectReason.NO_LIVE_INSTANCE


def test_a_loading_instance_queues_requests_until_it_reports_ready() -> None:
    core = cluster(0)
    core.handle(NodeSubscribed(node_id=node_of(0)), 0.0)
    core.handle(heartbeat(0, report(0, status=InstanceStatus.LOADING)), 0.0)
    assert queued_position(submit(core, "a")) == 1
    assert queued_position(submit(core, "b", kind=TaskKind.IMAGE_GENERATION)) == 1
    effects = core.handle(heartbeat(0, report(0)), 1.0)
    assert sorted(p.task_id for p in only(effects, TaskPlaced)) == ["a", "b"]
    assert {a.instance_id for a in only(effects, AssignTask)} == {instance_of(0)}
    core.check_invariants()


def test_queued_requests_wait_while_a_node_lives_and_fail_when_the_last_one_dies() -> None:
    core, placed = full_cluster()
    for p in placed:
        accept(core, p)
    submit(core, "q1")
    submit(core, "q2")
    last = K - 1
    on_last = [p.task_id for p in placed if p.instance_id == instance_of(last)]
    for now in (1.0, 2.0, 3.0, 3.5):
        core.handle(heartbeat(last, report(last, max_concurrency=C, active=on_last)), now)
        effects = core.tick(now)
    assert [n.alive for n in core.state.nodes.values()] == [False] * (K - 1) + [True]
    assert not only(effects, TaskErrored)
    # The dead nodes' tasks had streamed nothing, so they wait for a slot again, ahead of q1 and q2.
    queue = core.book.queues.tasks((MODEL, TaskKind.TEXT_GENERATION))
    assert len(queue) == (K - 1) * C + 2 and queue[-2:] == ["q1", "q2"]
    effects = core.tick(7.0)  # now the last node is silent too
    errored = only(effects, TaskErrored)
    assert {e.task_id for e in errored} == {p.task_id for p in placed} | {"q1", "q2"}
    assert all(e.unavailable for e in errored)
    assert not core.book.live and len(core.book.queues) == 0
    core.check_invariants()


def test_every_queued_request_fails_when_its_only_node_dies() -> None:
    core = cluster(1, max_concurrency=1)
    burst(core, 1)
    submit(core, "q1")
    submit(core, "q2")
    effects = core.tick(3.5)
    errored = {e.task_id: e for e in only(effects, TaskErrored)}
    assert {"q1", "q2"} <= errored.keys()
    assert all(e.unavailable and "no live instance" in e.message for e in errored.values())
    assert len(core.book.queues) == 0
    core.check_invariants()


def test_queued_requests_fail_when_the_only_instance_reports_failed() -> None:
    core = cluster(1, max_concurrency=1)
    burst(core, 1)
    submit(core, "q1")
    effects = core.handle(heartbeat(0, report(0, max_concurrency=1, status=InstanceStatus.FAILED)), 1.0)
    errored = {e.task_id for e in only(effects, TaskErrored)}
    assert errored == {"t0", "q1"}
    assert len(core.book.queues) == 0 and not core.book.live
    core.check_invariants()


def test_queued_requests_fail_when_their_kind_is_no_longer_served() -> None:
    core = cluster(1, max_concurrency=1)
    burst(core, 1)
    submit(core, "img", kind=TaskKind.IMAGE_GENERATION)
    text_only = report(0, max_concurrency=1, kinds=(TaskKind.TEXT_GENERATION,), active=[TaskId("t0")])
    effects = core.handle(heartbeat(0, text_only), 1.0)
    assert [e.task_id for e in only(effects, TaskErrored)] == ["img"]
    core.check_invariants()


def test_queued_requests_survive_an_instance_replaced_within_one_heartbeat() -> None:
    core = cluster(1, max_concurrency=1)
    (first,) = burst(core, 1)
    submit(core, "q1")
    renamed = InstanceReport(
        instance_id=InstanceId("node0/1"), model=MODEL, kinds=ALL_KINDS, max_concurrency=1
    )
    effects = core.handle(heartbeat(0, renamed), 1.0)
    assert not only(effects, TaskErrored)
    # The new instance's one slot goes to a waiting request; the task from the gone instance waits
    # for the next slot, at the head of the line.
    (placed,) = only(effects, TaskPlaced)
    assert placed.instance_id == InstanceId("node0/1")
    assert core.book.queues.tasks((MODEL, TaskKind.TEXT_GENERATION)) == [
        ({first.task_id, "q1"} - {placed.task_id}).pop()
    ]
    core.check_invariants()


def test_cancelling_a_queued_request_removes_it_from_the_line() -> None:
    core, placed = full_cluster()
    for task_id in ("q1", "q2", "q3"):
        submit(core, task_id)
    effects = core.handle(CancelRequest(task_id=TaskId("q2")), 1.0)
    # It was never sent anywhere: nothing to tell a worker, only whoever waits on it.
    assert effects == [TaskErrored(task_id=TaskId("q2"), message="cancelled by client", cancelled=True)]
    assert core.book.queues.tasks((MODEL, TaskKind.TEXT_GENERATION)) == ["q1", "q3"]
    assert queued_position(submit(core, "q4")) == 3
    bound = [placement_of(finish(core, p, now=2.0)) for p in placed[:3]]
    assert [b.task_id for b in bound if b] == ["q1", "q3", "q4"]
    cancelled = core.task(TaskId("q2"))
    assert cancelled is not None and cancelled.status is TaskStatus.CANCELLED
    core.check_invariants()


def test_requeued_tasks_take_their_place_in_line_by_age() -> None:
    queues = WaitQueues(limit=2)
    key = (MODEL, TaskKind.TEXT_GENERATION)
    assert queues.push(key, TaskId("b"), 2) == 1
    assert queues.push(key, TaskId("d"), 4) == 2
    for task_id, admission in (("c", 3), ("a", 1), ("e", 5)):
        queues.requeue(key, TaskId(task_id), admission)  # admitted before: the bound does not apply
    assert queues.tasks(key) == ["a", "b", "c", "d", "e"]
    assert queues.remove(TaskId("c")) == 3 and len(queues) == 4
