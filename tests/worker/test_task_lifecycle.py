"""The worker's task lifecycle table (`task_lifecycle.TRANSITIONS`), and a Runner moving its tasks
along it: queued, running, output kept, acknowledged; cancelled while queued or running; refused."""

from __future__ import annotations

import itertools

import pytest

from exo_worker.sim_engine import SimEngine
from exo_worker.task_lifecycle import (
    TRANSITIONS,
    IllegalTaskMove,
    TaskState,
    Trigger,
    WorkerTask,
    advance,
)
from protocol.ids import TaskId
from protocol.messages import FinishReason, TaskChunk, TaskFinished
from tests.worker.runner_harness import GateEngine, Recorder, arun, assign, close, ready_runner

S = TaskState


def test_ended_states_have_no_way_out_but_the_acknowledgement() -> None:
    ended = [s for s in TaskState if not s.live]
    assert [row for row in TRANSITIONS if row[0] in ended] == [(S.OUTPUT_KEPT, Trigger.ACK)]
    # Every state but the entry ones (queued: accepted; refused: never accepted) is reached by a move.
    assert set(TRANSITIONS.values()) == set(TaskState) - {S.QUEUED, S.REFUSED}


@pytest.mark.parametrize(
    "state,trigger", [row for row in itertools.product(TaskState, Trigger) if row not in TRANSITIONS]
)
def test_every_unlisted_move_raises_and_changes_nothing(state: TaskState, trigger: Trigger) -> None:
    task = WorkerTask(assign("t"), state=state)
    with pytest.raises(IllegalTaskMove):
        advance(task, trigger)
    assert task.state is state


@arun
async def test_a_task_runs_keeps_its_output_until_acknowledged() -> None:
    engine, rec = GateEngine(), Recorder()
    runner = await ready_runner(engine, rec, max_concurrency=1)
    runner.submit(assign("a"))
    runner.submit(assign("b"))
    await engine.until_started(1)
    assert (runner.state_of(TaskId("a")), runner.state_of(TaskId("b"))) == (S.RUNNING, S.QUEUED)
    engine.release("a")
    await rec.final_of("a")
    assert runner.state_of(TaskId("a")) is S.OUTPUT_KEPT and TaskId("a") in runner.report().finished_tasks
    await engine.until_started(2)
    assert runner.state_of(TaskId("b")) is S.RUNNING  # the freed slot went to the queued task
    runner.acknowledged(TaskId("a"))
    assert runner.state_of(TaskId("a")) is S.ACKNOWLEDGED and not runner.report().finished_tasks
    await close(runner, engine)


@arun
async def test_cancelled_while_queued_or_running_and_refused_tasks_keep_no_output() -> None:
    engine, rec = GateEngine(), Recorder()
    runner = await ready_runner(engine, rec, max_concurrency=1)
    runner.submit(assign("run"))
    runner.submit(assign("wait"))
    await engine.until_started(1)
    runner.cancel(TaskId("wait"))
    assert runner.state_of(TaskId("wait")) is S.CANCELLED
    runner.cancel(TaskId("run"))  # its one stop signal: GateEngine ends it only when released
    assert runner.state_of(TaskId("run")) is S.RUNNING
    engine.release("run")
    await rec.final_of("run")
    await close(runner, engine)
    runner.submit(assign("late"))  # shutting down: refused
    assert runner.state_of(TaskId("late")) is S.REFUSED
    assert runner.report().finished_tasks == (TaskId("run"),)


@arun
async def test_a_running_task_stopped_by_its_signal_ends_cancelled() -> None:
    engine, rec = SimEngine(tokens_per_s=50.0), Recorder()
    runner = await ready_runner(engine, rec)
    runner.submit(assign("a", max_tokens=10_000))
    await rec.until(lambda: bool(rec.of("a", TaskChunk)))
    runner.cancel(TaskId("a"))
    final = await rec.final_of("a")
    assert isinstance(final, TaskFinished) and final.finish_reason is FinishReason.CANCELLED
    assert runner.state_of(TaskId("a")) is S.CANCELLED and not runner.report().finished_tasks
    await close(runner)
