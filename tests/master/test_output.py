"""Output integrity in the core: held chunks, held finals, fetching missing output from the worker,
acknowledging the end; plus the queue wait limit and the node bound."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from exo_master.core import CoreConfig, MasterCore
from exo_master.core.events import TaskCompleted, TaskErrored, TaskOutput, TaskPlaced, TaskQueued
from protocol.ids import NodeId, TaskId
from protocol.messages import FetchOutput, FinishReason, TaskAck, TaskChunk, TaskFinished, WorkerHeartbeat
from tests.master.cluster import (
    accept,
    burst,
    chunk,
    cluster,
    heartbeat,
    only,
    report,
    submit,
)


def finished(p: TaskPlaced, chunks: int | None) -> TaskFinished:
    return TaskFinished(
        node_id=p.node_id,
        task_id=p.task_id,
        instance_id=p.instance_id,
        finish_reason=FinishReason.STOP,
        chunks=chunks,
    )


def running(**config: float) -> tuple[MasterCore, TaskPlaced]:
    core = cluster(1, heartbeat_liveness=1000, **config)
    (p,) = burst(core, 1)
    accept(core, p)
    return core, p


def test_a_final_that_overtakes_its_last_chunk_waits_for_it() -> None:
    core, p = running()
    chunk(core, p, 0, text="Hello")
    assert core.handle(finished(p, chunks=2), 0.1) == []  # chunk 1 is still on its way
    effects = chunk(core, p, 1, now=0.15, text=" world")
    assert only(effects, TaskOutput)[0].text == " world"
    assert only(effects, TaskCompleted) and only(effects, TaskAck)
    core.check_invariants()


def test_a_lost_chunk_is_fetched_again_from_the_worker() -> None:
    core, p = running(fetch_after=0.2)
    chunk(core, p, 0)
    chunk(core, p, 2)  # 1 was lost
    assert not only(core.tick(0.1), FetchOutput)  # within the reorder grace: maybe only late
    (fetch,) = only(core.tick(0.3), FetchOutput)
    assert (fetch.task_id, fetch.from_index, fetch.final, fetch.node_id) == (p.task_id, 1, True, p.node_id)
    # The worker answers with everything from index 1 and the final; duplicates are harmless.
    effects = chunk(core, p, 1, now=0.35) + chunk(core, p, 2, now=0.35)
    effects += core.handle(finished(p, chunks=3), 0.36)
    assert [o.index for o in only(effects, TaskOutput)] == [1, 2]
    assert only(effects, TaskCompleted)
    assert core.counters().output_fetches == 1


def test_output_that_cannot_be_recovered_fails_the_request_clearly() -> None:
    core, p = running(fetch_after=0.1, fetch_every=0.1, max_fetches=3)
    chunk(core, p, 0)
    core.handle(finished(p, chunks=2), 0.0)
    fetches = []
    errors: list[TaskErrored] = []
    for i in range(1, 10):
        effects = core.tick(i * 0.1 + 0.01)
        fetches += only(effects, FetchOutput)
        errors += only(effects, TaskErrored)
    assert len(fetches) == 3
    (error,) = errors
    assert error.unavailable and "output" in error.message and "lost" in error.message
    assert core.counters().outputs_lost == 1
    core.check_invariants()


def test_a_snapshot_listing_a_finished_task_recovers_its_lost_final() -> None:
    core, p = running()
    chunk(core, p, 0)
    # The TaskFinished was lost; the worker's snapshot says the task ended there.
    hb = heartbeat(0, report(0, finished=[p.task_id]))
    assert not only(core.handle(hb, 0.5), TaskErrored), "a finished task was treated as lost"
    (fetch,) = only(core.tick(0.5), FetchOutput)
    assert fetch.from_index == 1 and fetch.final
    effects = core.handle(finished(p, chunks=1), 0.6)
    assert only(effects, TaskCompleted)


def test_a_confirmed_task_in_neither_list_is_still_lost() -> None:
    core, p = running()
    chunk(core, p, 0)
    (error,) = only(core.handle(heartbeat(0, report(0)), 0.5), TaskErrored)
    assert error.unavailable


def test_a_finished_task_the_master_already_ended_is_acknowledged() -> None:
    core, p = running()
    core.handle(finished(p, chunks=0), 0.1)
    effects = core.handle(heartbeat(0, report(0, finished=[p.task_id])), 0.5)
    assert TaskAck(task_id=p.task_id, node_id=p.node_id, instance_id=p.instance_id) in effects


def test_a_new_attempt_starts_with_an_empty_reorder_window() -> None:
    core = cluster(2, heartbeat_liveness=1000)
    (p,) = burst(core, 1)
    chunk(core, p, 1)  # an early chunk; nothing reached the client yet
    # The worker restarts: the task is gone from its snapshot, so it is placed again.
    effects = core.handle(heartbeat(int(p.node_id[-1]), report(int(p.node_id[-1]))), 0.5)
    effects += core.tick(0.5)
    task = core.task(p.task_id)
    assert task is not None and task.attempts == 2 and not task.held
    core.check_invariants()


@given(order=st.permutations(range(8)), duplicate=st.lists(st.integers(0, 7), max_size=4))
def test_any_arrival_order_delivers_exactly_the_text_in_order(order: list[int], duplicate: list[int]) -> None:
    core, p = running()
    delivered: list[str] = []
    for i in [*order, *duplicate]:
        delivered += [o.text for o in only(chunk(core, p, i, text=f"w{i} "), TaskOutput)]
    effects = core.handle(finished(p, chunks=8), 1.0)
    assert "".join(delivered) == "".join(f"w{i} " for i in range(8))
    assert only(effects, TaskCompleted)


# ---- bounds in the core --------------------------------------------------------------------------


def test_a_request_waits_at_most_the_queue_timeout() -> None:
    core = cluster(1, max_concurrency=1, queue_timeout=30.0, heartbeat_liveness=1000)
    burst(core, 1)
    assert only(submit(core, "waiting", now=1.0), TaskQueued)
    assert not only(core.tick(30.0), TaskErrored)
    (error,) = only(core.tick(31.0), TaskErrored)
    assert error.task_id == TaskId("waiting") and error.unavailable and "queue-timeout" in error.message
    assert core.counters().queue_timeouts == 1
    core.check_invariants()


def test_nodes_beyond_the_limit_are_ignored_and_counted() -> None:
    core = MasterCore(CoreConfig(max_nodes=2))
    for i in range(3):
        core.handle(WorkerHeartbeat(node_id=NodeId(f"n{i}"), instances=()), 0.0)
    assert [n.node_id for n in core.view(0.0).nodes] == ["n0", "n1"]
    assert core.counters().refused_nodes == 1
    core.handle(WorkerHeartbeat(node_id=NodeId("n0"), instances=()), 1.0)  # known nodes still count
    assert core.view(1.0).nodes[0].last_heartbeat_age == 0.0


def test_chunk_messages_from_another_node_are_ignored() -> None:
    core, p = running()
    forged = TaskChunk(
        node_id=NodeId("intruder"), task_id=p.task_id, instance_id=p.instance_id, index=0, text="x"
    )
    assert core.handle(forged, 0.1) == []
    assert core.counters().late_events == 1


def test_a_node_that_streams_stays_alive_without_heartbeats() -> None:
    core = cluster(1)  # default liveness: 3 s
    (p,) = burst(core, 1)
    accept(core, p)
    for i in range(10):  # 5 s of output, no heartbeat at all (they were lost)
        chunk(core, p, i, now=0.5 * (i + 1))
        assert not only(core.tick(0.5 * (i + 1)), TaskErrored)
    assert core.view(5.0).nodes[0].alive
