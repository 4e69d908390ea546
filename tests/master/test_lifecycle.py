"""A task's life in the core: confirmation, output, the end, re-sends, TTL, node loss, heartbeat
healing, master heartbeats and subscriptions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from exo_master.core import MasterCore
from exo_master.core.events import (
    CancelRequest,
    NodeSubscribed,
    NodeUnsubscribed,
    TaskCompleted,
    TaskErrored,
    TaskOutput,
    TaskPlaced,
    TaskQueued,
)
from protocol.cluster_view import TaskStatus
from protocol.ids import InstanceId, NodeId, TaskId
from protocol.messages import (
    AssignTask,
    CancelTask,
    FinishReason,
    InstanceReport,
    InstanceStatus,
    MasterHeartbeat,
    TaskAccepted,
    TaskAck,
    TaskFinished,
    Usage,
)
from tests.master.cluster import (
    ALL_KINDS,
    MODEL,
    accept,
    burst,
    chunk,
    cluster,
    fail,
    finish,
    heartbeat,
    instance_of,
    node_of,
    only,
    placement_of,
    report,
    submit,
)


def keep_alive(
    core: MasterCore, now: float, nodes: Sequence[int], active: Mapping[int, Sequence[str]] | None = None
) -> list[object]:
    """Heartbeats from `nodes` (each with one instance, reporting `active` task ids), then a tick."""
    effects: list[object] = []
    for i in nodes:
        ids = [TaskId(t) for t in (active or {}).get(i, ())]
        effects += core.handle(heartbeat(i, report(i, active=ids)), now)
    return effects + core.tick(now)


def worker_effects(effects: list[object]) -> list[object]:
    return [e for e in effects if not isinstance(e, MasterHeartbeat)]


def task_status(core: MasterCore, task_id: str) -> TaskStatus:
    task = core.task(TaskId(task_id))
    assert task is not None
    return task.status


# ---- confirmation ------------------------------------------------------------------------------


def test_accept_moves_a_task_from_the_ledger_to_the_state_without_changing_load() -> None:
    core = cluster(2)
    (p,) = burst(core, 1)
    inst = core.state.instances[p.instance_id]
    assert (core.book.ledger.pending(p.instance_id), len(inst.confirmed), core.load(inst)) == (1, 0, 1)
    assert accept(core, p) == []
    assert (core.book.ledger.pending(p.instance_id), len(inst.confirmed), core.load(inst)) == (0, 1, 1)
    assert task_status(core, p.task_id) is TaskStatus.RUNNING
    core.check_invariants()


def test_a_duplicate_accept_is_harmless() -> None:
    core = cluster(2)
    (p,) = burst(core, 1)
    accept(core, p)
    assert accept(core, p) == []
    assert core.load(core.state.instances[p.instance_id]) == 1
    core.check_invariants()


def test_accepting_an_unknown_task_cancels_it_on_the_sender() -> None:
    core = cluster(1)
    msg = TaskAccepted(node_id=node_of(0), task_id=TaskId("ghost"), instance_id=instance_of(0))
    assert core.handle(msg, 0.0) == [
        CancelTask(task_id=TaskId("ghost"), node_id=node_of(0), instance_id=instance_of(0))
    ]
    assert core.stats.orphan_cancels == 1
    assert core.load(core.state.instances[instance_of(0)]) == 0


def test_accepting_a_finished_task_cancels_the_copy() -> None:
    core = cluster(1)
    (p,) = burst(core, 1)
    finish(core, p)
    assert accept(core, p) == [CancelTask(task_id=p.task_id, node_id=p.node_id, instance_id=p.instance_id)]
    assert core.load(core.state.instances[p.instance_id]) == 0
    core.check_invariants()


def test_accepting_a_task_that_was_placed_elsewhere_since_cancels_the_old_copy() -> None:
    core = cluster(2)
    (old,) = burst(core, 1)
    for now in (1.0, 2.0, 3.0, 4.0, 5.0):
        effects = keep_alive(core, now, [0, 1])
    new = placement_of(effects)
    assert new is not None and new.instance_id != old.instance_id
    late = accept(core, old, now=5.1)
    assert late == [CancelTask(task_id=old.task_id, node_id=old.node_id, instance_id=old.instance_id)]
    task = core.book.live[old.task_id]
    assert (task.status, task.instance_id) == (TaskStatus.PENDING, new.instance_id)
    core.check_invariants()


# ---- output ------------------------------------------------------------------------------------


def test_chunks_are_forwarded_in_order_and_duplicates_dropped() -> None:
    core = cluster(1)
    (p,) = burst(core, 1)
    accept(core, p)
    outputs = [chunk(core, p, i, text=f"c{i}") for i in (0, 1, 1, 0, 2)]
    assert outputs == [
        [TaskOutput(task_id=p.task_id, index=0, text="c0")],
        [TaskOutput(task_id=p.task_id, index=1, text="c1")],
        [],
        [],
        [TaskOutput(task_id=p.task_id, index=2, text="c2")],
    ]
    assert core.stats.duplicate_chunks == 2


def test_early_chunks_are_held_until_the_gap_fills_then_flow_in_order() -> None:
    core = cluster(1)
    (p,) = burst(core, 1)
    accept(core, p)
    chunk(core, p, 0)
    assert chunk(core, p, 3) == [] and chunk(core, p, 2) == []  # held, not delivered out of order
    assert core.stats.chunks_out_of_order == 2
    assert [o.index for o in only(chunk(core, p, 1), TaskOutput)] == [1, 2, 3]
    assert only(chunk(core, p, 4), TaskOutput)[0].index == 4


def test_a_chunk_before_the_accept_confirms_the_task() -> None:
    core = cluster(1)
    (p,) = burst(core, 1)
    assert chunk(core, p, 0) == [TaskOutput(task_id=p.task_id, index=0, text="x")]
    assert task_status(core, p.task_id) is TaskStatus.RUNNING
    assert core.book.ledger.pending(p.instance_id) == 0
    assert accept(core, p) == []  # the lost-and-found accept changes nothing
    assert core.load(core.state.instances[p.instance_id]) == 1
    core.check_invariants()


def test_a_chunk_for_an_unknown_task_is_counted_as_late() -> None:
    core = cluster(1)
    (p,) = burst(core, 1)
    finish(core, p)
    assert chunk(core, p, 0) == []
    assert core.stats.late_events == 1


# ---- the end -----------------------------------------------------------------------------------


def test_finished_task_completes_for_the_client_and_frees_its_slot() -> None:
    core = cluster(1, max_concurrency=1)
    (p,) = burst(core, 1)
    accept(core, p)
    usage = Usage(prompt_tokens=3, completion_tokens=5)
    effects = core.handle(
        TaskFinished(
            node_id=p.node_id,
            task_id=p.task_id,
            instance_id=p.instance_id,
            finish_reason=FinishReason.LENGTH,
            usage=usage,
        ),
        1.0,
    )
    assert effects == [
        TaskCompleted(task_id=p.task_id, finish_reason=FinishReason.LENGTH, usage=usage),
        TaskAck(task_id=p.task_id, node_id=p.node_id, instance_id=p.instance_id),  # the worker may forget it
    ]
    inst = core.state.instances[p.instance_id]
    assert (core.load(inst), inst.completed, task_status(core, p.task_id)) == (0, 1, TaskStatus.FINISHED)
    assert placement_of(submit(core, "next", now=1.0)) is not None
    core.check_invariants()


def test_failed_task_errors_for_the_client_and_frees_its_slot() -> None:
    core = cluster(1, max_concurrency=1)
    (p,) = burst(core, 1)
    accept(core, p)
    assert fail(core, p, reason="out of memory") == [TaskErrored(task_id=p.task_id, message="out of memory")]
    inst = core.state.instances[p.instance_id]
    assert (core.load(inst), inst.failed, task_status(core, p.task_id)) == (0, 1, TaskStatus.FAILED)
    core.check_invariants()


def test_a_task_can_finish_before_its_accept_arrives() -> None:
    core = cluster(1)
    (p,) = burst(core, 1)
    assert only(finish(core, p), TaskCompleted)
    assert len(core.book.ledger) == 0 and core.load(core.state.instances[p.instance_id]) == 0
    core.check_invariants()


def test_a_duplicate_final_message_ends_nothing_twice() -> None:
    core = cluster(1)
    (p,) = burst(core, 1)
    finish(core, p)
    assert finish(core, p) == [] and fail(core, p) == []
    assert core.state.instances[p.instance_id].completed == 1


@pytest.mark.parametrize("confirmed", [False, True])
def test_client_cancel_tells_the_worker_and_frees_the_slot_once_the_engine_lets_go(confirmed: bool) -> None:
    core = cluster(1)
    (p,) = burst(core, 1)
    if confirmed:
        accept(core, p)
    effects = core.handle(CancelRequest(task_id=p.task_id), 1.0)
    assert effects == [
        CancelTask(task_id=p.task_id, node_id=p.node_id, instance_id=p.instance_id),
        TaskErrored(task_id=p.task_id, message="cancelled by client", cancelled=True),
    ]
    assert task_status(core, p.task_id) is TaskStatus.CANCELLED
    inst = core.state.instances[p.instance_id]
    # A confirmed task is in the engine: its slot stays taken until the worker says it let go.
    assert core.load(inst) == (1 if confirmed else 0)
    assert core.handle(CancelRequest(task_id=p.task_id), 1.0) == []  # idempotent
    if confirmed:
        keep_alive(core, 1.2, [0], {0: [p.task_id]})  # still being stopped: still counted
        assert core.load(inst) == 1 and inst.unowned == {p.task_id}
        core.check_invariants()
    keep_alive(core, 1.4, [0])  # the engine let go
    assert core.load(inst) == 0 and not inst.unowned
    assert finish(core, p, now=1.5) == []  # the worker's cancelled final is late news
    core.check_invariants()


@pytest.mark.parametrize("output_sent", [False, True])
def test_a_worker_giving_a_live_task_up_is_a_lost_attempt_not_a_result(output_sent: bool) -> None:
    # A worker that shuts down ends its running tasks as CANCELLED; the master never asked for it.
    core = cluster(2)
    (p,) = burst(core, 1)
    accept(core, p)
    if output_sent:
        chunk(core, p, 0)
    effects = core.handle(
        TaskFinished(
            node_id=p.node_id,
            task_id=p.task_id,
            instance_id=p.instance_id,
            finish_reason=FinishReason.CANCELLED,
        ),
        1.0,
    )
    assert not only(effects, TaskCompleted)
    if output_sent:
        (errored,) = only(effects, TaskErrored)
        assert errored.unavailable and "gave the task up" in errored.message
    else:
        (again,) = only(effects, TaskPlaced)
        assert again.instance_id != p.instance_id and again.attempt == 2
    core.check_invariants()


# ---- re-sends and the ledger TTL ---------------------------------------------------------------


def test_assign_is_resent_on_tick_until_the_worker_confirms() -> None:
    core = cluster(1)
    core.tick(0.0)
    (p,) = burst(core, 1)
    sent = {now: only(core.tick(now), AssignTask) for now in (0.1, 0.25, 0.3, 0.5, 0.6)}
    assert {now: len(a) for now, a in sent.items()} == {0.1: 0, 0.25: 1, 0.3: 0, 0.5: 1, 0.6: 0}
    assert sent[0.25][0] == AssignTask(
        task_id=p.task_id, node_id=p.node_id, instance_id=p.instance_id, params=sent[0.25][0].params
    )
    accept(core, p, now=0.6)
    assert not any(only(core.tick(now), AssignTask) for now in (0.75, 1.0, 2.0))
    core.check_invariants()


def test_an_unconfirmed_task_is_placed_elsewhere_when_its_ttl_runs_out() -> None:
    core = cluster(2)
    (old,) = burst(core, 1)
    for now in (1.0, 2.0, 3.0, 4.0):
        assert not only(keep_alive(core, now, [0, 1]), TaskPlaced)
    effects = worker_effects(keep_alive(core, 5.0, [0, 1]))  # reserved at 0.0, TTL 5 s
    new = placement_of(effects)
    assert new is not None and new.task_id == old.task_id
    assert new.instance_id != old.instance_id and new.attempt == 2
    assert CancelTask(task_id=old.task_id, node_id=old.node_id, instance_id=old.instance_id) in effects
    assert core.book.ledger.stats.expired == 1 and core.stats.replacements == 1
    core.check_invariants()


def test_an_unconfirmed_task_with_nowhere_else_to_go_is_resent_to_the_same_instance_uncancelled() -> None:
    core = cluster(1)
    (old,) = burst(core, 1)
    for now in (1.0, 2.0, 3.0, 4.0, 5.0):
        effects = worker_effects(keep_alive(core, now, [0]))
    new = placement_of(effects)
    assert new is not None and (new.instance_id, new.attempt) == (old.instance_id, 2)
    assert not only(effects, CancelTask)  # a cancel would race with the new assignment
    core.check_invariants()


def test_a_task_nobody_confirms_fails_after_max_attempts() -> None:
    core = cluster(2)
    burst(core, 1)
    errored: list[TaskErrored] = []
    placements = 1
    for step in range(1, 40):
        effects = keep_alive(core, step * 0.5, [0, 1])
        placements += len(only(effects, TaskPlaced))
        errored += only(effects, TaskErrored)
    assert placements == core.config.max_attempts == 3
    assert len(errored) == 1 and errored[0].unavailable and "3 attempts" in errored[0].message
    assert not core.book.live and len(core.book.ledger) == 0
    core.check_invariants()


# ---- node death --------------------------------------------------------------------------------


def test_node_death_replaces_pending_work_and_fails_work_that_already_streamed() -> None:
    core = cluster(2)
    placed = burst(core, 6)  # three on each node
    dying = [p for p in placed if p.node_id == node_of(0)]
    pending, streamed, silent = dying
    for p in (streamed, silent):
        accept(core, p)
    chunk(core, streamed, 0)
    survivors = [p.task_id for p in placed if p.node_id == node_of(1)]
    for now in (1.0, 2.0, 3.0):
        assert core.state.nodes[node_of(0)].alive
        keep_alive(core, now, [1], {1: survivors})
    effects = keep_alive(core, 3.5, [1], {1: survivors})  # node0 silent for 3.5 s > 3 x 1 s
    assert not core.state.nodes[node_of(0)].alive
    assert only(effects, TaskErrored) == [
        TaskErrored(task_id=streamed.task_id, message=only(effects, TaskErrored)[0].message, unavailable=True)
    ]
    moved = {p.task_id: p for p in only(effects, TaskPlaced)}
    assert moved.keys() == {pending.task_id, silent.task_id}
    assert all(p.instance_id == instance_of(1) and p.attempt == 2 for p in moved.values())
    assert core.load(core.state.instances[instance_of(1)]) == 5
    core.check_invariants()


def test_a_dead_node_comes_back_with_its_next_heartbeat() -> None:
    core = cluster(2)
    keep_alive(core, 3.5, [1])
    assert not core.state.nodes[node_of(0)].alive
    assert {p.instance_id for p in burst(core, 4, now=3.5)} == {instance_of(1)}
    keep_alive(core, 4.0, [0, 1])
    assert core.state.nodes[node_of(0)].alive
    assert {p.instance_id for p in burst(core, 4, now=4.0, prefix="u")} == {instance_of(0)}
    core.check_invariants()


# ---- heartbeat snapshots heal the projection ---------------------------------------------------


def test_a_pending_task_listed_active_is_confirmed_by_the_snapshot() -> None:
    core = cluster(1)
    (p,) = burst(core, 1)
    assert core.handle(heartbeat(0, report(0, active=[p.task_id])), 0.5) == []
    assert task_status(core, p.task_id) is TaskStatus.RUNNING
    assert len(core.book.ledger) == 0
    core.check_invariants()


def test_a_pending_task_missing_from_the_snapshot_stays_pending() -> None:
    core = cluster(1)
    (p,) = burst(core, 1)
    assert core.handle(heartbeat(0, report(0)), 0.5) == []  # the assignment may still be on its way
    assert task_status(core, p.task_id) is TaskStatus.PENDING


@pytest.mark.parametrize("streamed", [False, True])
def test_a_confirmed_task_missing_from_the_snapshot_is_lost(streamed: bool) -> None:
    core = cluster(2)
    (p,) = burst(core, 1)
    accept(core, p)
    if streamed:
        chunk(core, p, 0)
    node = int(p.node_id.removeprefix("node"))
    effects = core.handle(heartbeat(node, report(node)), 1.0)
    if streamed:  # the client saw part of an answer: it cannot be silently restarted
        (errored,) = only(effects, TaskErrored)
        assert errored.task_id == p.task_id and errored.unavailable
        assert task_status(core, p.task_id) is TaskStatus.FAILED
    else:
        again = placement_of(effects)
        assert again is not None and again.instance_id != p.instance_id and again.attempt == 2
    core.check_invariants()


def test_an_active_task_unknown_to_the_master_is_cancelled() -> None:
    core = MasterCore()  # e.g. a restarted master hearing from a busy worker
    core.handle(NodeSubscribed(node_id=node_of(0)), 0.0)
    effects = core.handle(heartbeat(0, report(0, active=[TaskId("old")])), 0.0)
    assert effects == [CancelTask(task_id=TaskId("old"), node_id=node_of(0), instance_id=instance_of(0))]
    # The engine still runs it: a taken slot until it lets go.
    assert core.load(core.state.instances[instance_of(0)]) == 1


def test_an_instance_missing_from_the_snapshot_is_removed_and_its_tasks_handled() -> None:
    core = cluster(0)
    core.handle(NodeSubscribed(node_id=node_of(0)), 0.0)
    second = InstanceReport(
        instance_id=InstanceId("node0/1"), model=MODEL, kinds=ALL_KINDS, max_concurrency=99
    )
    core.handle(heartbeat(0, report(0), second), 0.0)
    placed = burst(core, 6)
    pending, running, streamed = [p for p in placed if p.instance_id == instance_of(0)]
    for p in (running, streamed):
        accept(core, p)
    chunk(core, streamed, 0)
    effects = core.handle(heartbeat(0, second), 1.0)  # node0/0 is gone (unloaded, crashed)
    assert instance_of(0) not in core.state.instances
    assert [e.task_id for e in only(effects, TaskErrored)] == [streamed.task_id]
    moved = only(effects, TaskPlaced)
    assert {p.task_id for p in moved} == {pending.task_id, running.task_id}
    assert {p.instance_id for p in moved} == {second.instance_id}
    assert core.load(core.state.instances[second.instance_id]) == 5
    core.check_invariants()


def test_an_instance_that_starts_loading_hands_its_pending_tasks_to_others() -> None:
    core = cluster(2)
    placed = burst(core, 4)
    effects = core.handle(heartbeat(0, report(0, status=InstanceStatus.LOADING)), 1.0)
    moved = only(effects, TaskPlaced)
    assert {p.task_id for p in moved} == {p.task_id for p in placed if p.instance_id == instance_of(0)}
    assert {p.instance_id for p in moved} == {instance_of(1)}
    assert {c.instance_id for c in only(effects, CancelTask)} == {instance_of(0)}
    core.check_invariants()


# ---- master heartbeat and subscriptions --------------------------------------------------------


def test_tick_emits_a_master_heartbeat_once_per_interval() -> None:
    core = MasterCore()
    beats = {now: only(core.tick(now), MasterHeartbeat) for now in (0.0, 0.5, 0.99, 1.0, 1.5, 2.0, 2.1, 3.5)}
    assert [now for now, b in beats.items() if b] == [0.0, 1.0, 2.0, 3.5]
    assert beats[0.0] == [MasterHeartbeat(session="master", interval=1.0)]


def test_a_node_gets_no_work_until_its_subscription_is_live() -> None:
    core = cluster(0)
    core.handle(heartbeat(0, report(0)), 0.0)
    effects = submit(core, "early")
    assert only(effects, TaskQueued) and not only(effects, AssignTask)
    effects = core.handle(NodeSubscribed(node_id=node_of(0)), 0.2)
    assert [a.task_id for a in only(effects, AssignTask)] == ["early"]
    core.check_invariants()


def test_subscribing_before_the_first_heartbeat_counts() -> None:
    core = cluster(0)
    core.handle(NodeSubscribed(node_id=node_of(0)), 0.0)
    core.handle(heartbeat(0, report(0)), 0.1)
    assert placement_of(submit(core, "t", now=0.2)) is not None


def test_an_unsubscribed_node_gets_no_new_work() -> None:
    core = cluster(2)
    core.handle(NodeUnsubscribed(node_id=node_of(0)), 0.0)
    assert {p.instance_id for p in burst(core, 5)} == {instance_of(1)}
    core.handle(NodeSubscribed(node_id=node_of(0)), 1.0)
    assert {p.instance_id for p in burst(core, 5, prefix="u", now=1.0)} == {instance_of(0)}
    core.check_invariants()


def test_unknown_nodes_can_subscribe_and_unsubscribe() -> None:
    core = MasterCore()
    assert core.handle(NodeSubscribed(node_id=NodeId("x")), 0.0) == []
    assert core.handle(NodeUnsubscribed(node_id=NodeId("x")), 0.0) == []


def test_a_dead_node_is_listed_for_a_while_then_forgotten() -> None:
    core = cluster(2, forget_dead_after=60.0)
    core.tick(10.0)  # both nodes silent past liveness: dead, still listed
    assert [n.alive for n in core.state.nodes.values()] == [False, False]
    assert {row.status for row in core.view(10.0).instances} == {"dead"}
    core.handle(heartbeat(1, report(1)), 30.0)  # node1 comes back; node0 stays silent
    core.tick(30.0)
    core.tick(61.0)
    assert list(core.state.nodes) == [node_of(1)] and list(core.state.instances) == [instance_of(1)]
    core.check_invariants()
