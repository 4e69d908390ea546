"""Runner and RunnerGroup without sockets: idempotency, cancel, slots, final-result LRU, failures."""

from __future__ import annotations

import asyncio
import math

import pytest

from exo_worker.engine import EngineError
from exo_worker.runner import Runner
from exo_worker.runner_group import RunnerGroup
from exo_worker.sim_engine import SimEngine
from protocol.ids import InstanceId, TaskId
from protocol.messages import (
    AssignTask,
    CancelTask,
    FinishReason,
    ImageGenerationParams,
    InstanceStatus,
    TaskAccepted,
    TaskChunk,
    TaskFailed,
    TaskFinished,
    TaskKind,
)
from tests.worker.runner_harness import (
    INSTANCE,
    MODEL,
    NODE,
    TIMEOUT,
    FailingEngine,
    GateEngine,
    Recorder,
    arun,
    assign,
    close,
    kinds_of,
    make_runner,
    ready_runner,
)

# ---- happy path ------------------------------------------------------------------------------


@arun
async def test_accepted_then_contiguous_chunks_then_finished() -> None:
    rec = Recorder()
    runner = await ready_runner(SimEngine(math.inf), rec)
    runner.submit(assign("t1", max_tokens=6))
    final = await rec.final_of("t1")
    assert isinstance(final, TaskFinished)
    assert final.finish_reason is FinishReason.LENGTH
    assert final.usage.completion_tokens == 6
    events = rec.of("t1")
    assert kinds_of(events) == ["TaskAccepted"] + ["TaskChunk"] * 6 + ["TaskFinished"]
    assert [e.index for e in events if isinstance(e, TaskChunk)] == list(range(6))
    assert runner.report().active_tasks == ()
    await close(runner)


@arun
async def test_report_reflects_instance() -> None:
    rec = Recorder()
    runner = make_runner(SimEngine(math.inf), rec, max_concurrency=3, capacity=2.5)
    assert runner.report().status is InstanceStatus.LOADING
    await runner.load()
    report = runner.report()
    assert report.status is InstanceStatus.READY
    assert (report.instance_id, report.model, report.max_concurrency, report.capacity) == (
        INSTANCE,
        MODEL,
        3,
        2.5,
    )
    assert set(report.kinds) == set(TaskKind)
    assert report.error is None


# ---- idempotency -----------------------------------------------------------------------------


@arun
async def test_duplicate_assign_while_running_reaccepts_and_runs_once() -> None:
    rec, engine = Recorder(), GateEngine()
    runner = await ready_runner(engine, rec)
    runner.submit(assign("t1"))
    await engine.until_started(1)
    runner.submit(assign("t1"))
    assert kinds_of(rec.of("t1", TaskAccepted)) == ["TaskAccepted", "TaskAccepted"]
    engine.release("t1")
    await rec.final_of("t1")
    assert engine.started == ["t1"]
    await close(runner, engine)


@arun
async def test_duplicate_assign_while_queued_reaccepts() -> None:
    rec, engine = Recorder(), GateEngine()
    runner = await ready_runner(engine, rec, max_concurrency=1)
    runner.submit(assign("a"))
    runner.submit(assign("b"))
    assert runner.queued == ("b",)
    runner.submit(assign("b"))
    assert len(rec.of("b", TaskAccepted)) == 2
    assert runner.queued == ("b",)
    await close(runner, engine)


@arun
async def test_duplicate_after_finish_resends_the_same_final() -> None:
    rec = Recorder()
    runner = await ready_runner(SimEngine(math.inf), rec)
    runner.submit(assign("t1", max_tokens=3))
    first = await rec.final_of("t1")
    before = len(rec.events)
    runner.submit(assign("t1", max_tokens=3))
    assert rec.events[before:] == [first]  # no re-run: no accept, no chunks, same final
    await close(runner)


@arun
async def test_final_lru_is_bounded() -> None:
    rec = Recorder()
    runner = await ready_runner(SimEngine(math.inf), rec, final_lru_size=2)
    for task_id in ("a", "b", "c"):
        runner.submit(assign(task_id, max_tokens=1))
        await rec.final_of(task_id)
    before = len(rec.events)
    runner.submit(assign("c", max_tokens=1))  # still remembered
    assert kinds_of(rec.events[before:]) == ["TaskFinished"]
    runner.submit(assign("a", max_tokens=1))  # evicted: treated as new and run again
    await rec.until(lambda: len(rec.of("a", TaskFinished)) == 2)
    assert kinds_of(rec.of("a", TaskAccepted)) == ["TaskAccepted", "TaskAccepted"]
    await close(runner)


@arun
async def test_lru_hit_refreshes_recency() -> None:
    rec = Recorder()
    runner = await ready_runner(SimEngine(math.inf), rec, final_lru_size=2)
    for task_id in ("a", "b"):
        runner.submit(assign(task_id, max_tokens=1))
        await rec.final_of(task_id)
    runner.submit(assign("a", max_tokens=1))  # touch "a": now "b" is the oldest
    runner.submit(assign("c", max_tokens=1))
    await rec.final_of("c")
    before = len(rec.events)
    runner.submit(assign("a", max_tokens=1))
    assert kinds_of(rec.events[before:]) == ["TaskFinished"]
    await close(runner)


# ---- cancellation ----------------------------------------------------------------------------


@arun
async def test_cancel_running_task_finishes_cancelled() -> None:
    rec = Recorder()
    runner = await ready_runner(SimEngine(1000.0), rec)
    runner.submit(assign("t1", max_tokens=1_000_000))
    await rec.until(lambda: len(rec.of("t1", TaskChunk)) >= 2)
    runner.cancel(TaskId("t1"))
    final = await rec.final_of("t1")
    assert isinstance(final, TaskFinished)
    assert final.finish_reason is FinishReason.CANCELLED
    chunks = len(rec.of("t1", TaskChunk))
    assert final.usage.completion_tokens == chunks
    assert runner.report().active_tasks == ()
    await close(runner)


@arun
async def test_cancel_queued_task_removes_it_and_never_runs_it() -> None:
    rec, engine = Recorder(), GateEngine()
    runner = await ready_runner(engine, rec, max_concurrency=1)
    runner.submit(assign("a"))
    runner.submit(assign("b"))
    runner.cancel(TaskId("b"))
    final = rec.final("b")
    assert isinstance(final, TaskFinished)
    assert final.finish_reason is FinishReason.CANCELLED
    assert runner.queued == ()
    assert runner.report().active_tasks == ("a",)
    engine.release("a")
    await rec.final_of("a")
    assert engine.started == ["a"]
    await close(runner, engine)


@arun
async def test_assign_after_a_cancel_runs_the_task_again() -> None:
    # The master re-placed the task here after cancelling it: replaying the remembered CANCELLED
    # final would end the client's request with a cancellation nobody asked for.
    rec = Recorder()
    runner = await ready_runner(SimEngine(1000.0), rec)
    runner.submit(assign("t1", max_tokens=1_000_000))
    await rec.until(lambda: len(rec.of("t1", TaskChunk)) >= 1)
    runner.cancel(TaskId("t1"))
    await rec.final_of("t1")
    before = len(rec.events)
    runner.submit(assign("t1", max_tokens=3))
    await rec.until(lambda: any(isinstance(e, TaskFinished) for e in rec.events[before:]))
    rerun = rec.events[before:]
    assert kinds_of(rerun) == ["TaskAccepted", "TaskChunk", "TaskChunk", "TaskChunk", "TaskFinished"]
    assert rerun[-1].finish_reason is FinishReason.LENGTH  # type: ignore[union-attr]
    await close(runner)


@arun
async def test_cancel_unknown_or_finished_task_is_ignored() -> None:
    rec = Recorder()
    runner = await ready_runner(SimEngine(math.inf), rec)
    runner.cancel(TaskId("nope"))
    runner.submit(assign("t1", max_tokens=1))
    await rec.final_of("t1")
    before = len(rec.events)
    runner.cancel(TaskId("t1"))
    assert len(rec.events) == before
    await close(runner)


# ---- slots and queue -------------------------------------------------------------------------


@arun
async def test_concurrency_slots_respected_and_fifo_order() -> None:
    rec, engine = Recorder(), GateEngine()
    runner = await ready_runner(engine, rec, max_concurrency=2)
    for task_id in "abcde":
        runner.submit(assign(task_id))
    assert runner.running == ("a", "b")
    assert runner.queued == ("c", "d", "e")
    assert runner.report().active_tasks == tuple("abcde")
    await engine.until_started(2)
    assert engine.started == ["a", "b"]
    engine.release("b")
    await engine.until_started(3)
    assert engine.started == ["a", "b", "c"]
    assert runner.running == ("a", "c")
    for task_id in "acde":
        engine.release(task_id)
    await rec.until(lambda: all(rec.final(t) is not None for t in "abcde"))
    assert engine.started == list("abcde")
    assert runner.report().active_tasks == ()
    await close(runner, engine)


@arun
async def test_queue_bound_fails_the_overflow() -> None:
    rec, engine = Recorder(), GateEngine()
    runner = await ready_runner(engine, rec, max_concurrency=1, max_queue=1)
    for task_id in "abc":
        runner.submit(assign(task_id))
    final = rec.final("c")
    assert isinstance(final, TaskFailed)
    assert "queue is full" in final.reason
    await close(runner, engine)


# ---- failure paths ---------------------------------------------------------------------------


@arun
async def test_assign_before_ready_fails_clearly() -> None:
    rec = Recorder()
    runner = make_runner(SimEngine(math.inf), rec)
    runner.submit(assign("t1"))
    final = rec.final("t1")
    assert isinstance(final, TaskFailed)
    assert "loading" in final.reason and "not ready" in final.reason
    assert rec.of("t1", TaskAccepted) == []


@arun
async def test_load_failure_marks_instance_failed() -> None:
    rec = Recorder()
    runner = make_runner(SimEngine(math.inf, load_error="weights missing at /x"), rec)
    with pytest.raises(Exception, match="weights missing"):
        await runner.load()
    report = runner.report()
    assert report.status is InstanceStatus.FAILED
    assert report.error == "weights missing at /x"
    runner.submit(assign("t1"))
    final = rec.final("t1")
    assert isinstance(final, TaskFailed)
    assert "failed" in final.reason and "weights missing at /x" in final.reason


@arun
async def test_unsupported_kind_fails_clearly() -> None:
    rec = Recorder()
    runner = await ready_runner(SimEngine(math.inf, kinds=(TaskKind.TEXT_GENERATION,)), rec)
    image = AssignTask(
        task_id=TaskId("img"),
        node_id=NODE,
        instance_id=INSTANCE,
        params=ImageGenerationParams(model=MODEL, prompt="a fox"),
    )
    runner.submit(image)
    final = rec.final("img")
    assert isinstance(final, TaskFailed)
    assert "ImageGeneration" in final.reason
    await close(runner)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (EngineError("prompt too long"), "prompt too long"),
        (ZeroDivisionError("boom"), "ZeroDivisionError: boom"),
    ],
)
def test_engine_errors_fail_the_task_and_free_the_slot(error: Exception, expected: str) -> None:
    async def scenario() -> None:
        rec = Recorder()
        runner = await ready_runner(FailingEngine(error), rec, max_concurrency=1)
        runner.submit(assign("a"))
        runner.submit(assign("b"))
        for task_id in "ab":
            final = await rec.final_of(task_id)
            assert isinstance(final, TaskFailed)
            assert expected in final.reason
        assert runner.report().active_tasks == ()
        before = len(rec.events)
        runner.submit(assign("a"))  # the failure is remembered too
        assert rec.events[before:] == [rec.final("a")]
        await close(runner)

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))


@arun
async def test_shutdown_cancels_running_and_queued_and_refuses_new() -> None:
    rec = Recorder()
    runner = await ready_runner(SimEngine(1000.0), rec, max_concurrency=1)
    runner.submit(assign("a", max_tokens=1_000_000))
    runner.submit(assign("b", max_tokens=1_000_000))
    await runner.shutdown(grace=TIMEOUT)
    for task_id in "ab":
        final = rec.final(task_id)
        assert isinstance(final, TaskFinished) and final.finish_reason is FinishReason.CANCELLED
    runner.submit(assign("c"))
    final = rec.final("c")
    assert isinstance(final, TaskFailed) and "shutting down" in final.reason


@arun
async def test_shutdown_hard_stops_an_engine_that_ignores_cancel() -> None:
    rec, engine = Recorder(), GateEngine()  # GateEngine never looks at its cancel event
    runner = await ready_runner(engine, rec)
    runner.submit(assign("a"))
    await engine.until_started(1)
    await runner.shutdown(grace=0.05)
    final = rec.final("a")
    assert isinstance(final, TaskFinished) and final.finish_reason is FinishReason.CANCELLED


# ---- group routing ---------------------------------------------------------------------------


async def make_group(rec: Recorder, count: int = 2) -> RunnerGroup:
    runners = [
        Runner(
            node_id=NODE,
            instance_id=InstanceId(f"{NODE}/{i}"),
            model=MODEL,
            engine=SimEngine(math.inf),
            send=rec.send,
        )
        for i in range(count)
    ]
    group = RunnerGroup(NODE, runners, rec.send)
    await group.load_all()
    return group


@arun
async def test_group_routes_by_instance_and_reports_all() -> None:
    rec = Recorder()
    group = await make_group(rec)
    group.handle_assign(assign("t0", instance=f"{NODE}/0", max_tokens=1))
    group.handle_assign(assign("t1", instance=f"{NODE}/1", max_tokens=1))
    for task_id, instance in (("t0", f"{NODE}/0"), ("t1", f"{NODE}/1")):
        final = await rec.final_of(task_id)
        assert final.instance_id == instance
    assert [r.instance_id for r in group.reports()] == [f"{NODE}/0", f"{NODE}/1"]
    await group.shutdown()


@arun
async def test_group_unknown_instance_fails_clearly() -> None:
    rec = Recorder()
    group = await make_group(rec)
    group.handle_assign(assign("t1", instance="other/9"))
    final = rec.final("t1")
    assert isinstance(final, TaskFailed)
    assert "unknown instance other/9" in final.reason
    await group.shutdown()


@arun
async def test_group_cancel_reaches_task_even_with_wrong_instance() -> None:
    rec = Recorder()
    group = await make_group(rec)
    group.handle_assign(assign("t1", instance=f"{NODE}/1", max_tokens=1_000_000))
    await rec.until(lambda: len(rec.of("t1", TaskChunk)) >= 1)
    group.handle_cancel(CancelTask(task_id=TaskId("t1"), node_id=NODE, instance_id=InstanceId("bogus")))
    final = await rec.final_of("t1")
    assert isinstance(final, TaskFinished) and final.finish_reason is FinishReason.CANCELLED
    await group.shutdown()
