"""The task lifecycle table itself (`lifecycle.TRANSITIONS`): every row is taken by some real course
of events through the core, every move the table does not list raises before anything changes, and
the one guard (a running task is re-run only while nothing reached its client) holds."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any, get_args

import pytest

from exo_master.core import MasterCore
from exo_master.core.events import CancelRequest, Step, TaskPlaced
from exo_master.core.lifecycle import (
    TRANSITIONS,
    Cancel,
    Cause,
    Confirm,
    Fail,
    Finish,
    IllegalTransition,
    Move,
    Place,
    Unbind,
    advance,
    permits,
)
from protocol.cluster_view import TaskStatus
from protocol.ids import TaskId
from protocol.messages import FinishReason, TaskFinished
from tests.master.cluster import accept, burst, chunk, cluster, fail, finish, placement_of, submit

Row = tuple[TaskStatus, type[Cause]]
Q, P, R = TaskStatus.QUEUED, TaskStatus.PENDING, TaskStatus.RUNNING


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Row]]:
    """Records every row of the table the core applies, in order."""
    rows: list[Row] = []

    def noting(row: Row) -> Callable[..., None]:
        return lambda book, task, cause, step: rows.append(row)

    for row, move in list(TRANSITIONS.items()):
        monkeypatch.setitem(TRANSITIONS, row, Move(move.to, (noting(row), *move.effects), move.guard))
    yield rows


def _placed(core: MasterCore, task_id: str, now: float = 0.0) -> TaskPlaced:
    p = placement_of(submit(core, task_id, now))
    assert p is not None
    return p


def _queue_one(core: MasterCore, task_id: str) -> None:
    """Fill the single slot, then submit `task_id`: it waits in the queue."""
    _placed(core, f"{task_id}-filler")
    assert placement_of(submit(core, task_id)) is None


# One course of events per row, through MasterCore's public entry points only.
SCENARIOS: dict[Row, Callable[[], MasterCore]] = {}


def scenario(row: Row) -> Callable[[Callable[[], MasterCore]], Callable[[], MasterCore]]:
    def register(fn: Callable[[], MasterCore]) -> Callable[[], MasterCore]:
        SCENARIOS[row] = fn
        return fn

    return register


@scenario((Q, Place))
def _place() -> MasterCore:
    core = cluster(1)
    _placed(core, "a")
    return core


@scenario((P, Confirm))
def _confirm() -> MasterCore:
    core = cluster(1)
    accept(core, _placed(core, "a"))
    return core


@scenario((P, Unbind))
def _expire() -> MasterCore:
    core = cluster(2, ledger_ttl=1.0, heartbeat_liveness=100)
    _placed(core, "a")
    core.tick(1.5)  # nobody confirmed it within the TTL: placed again
    return core


@scenario((R, Unbind))
def _given_up_after_confirm() -> MasterCore:
    core = cluster(2)
    p = _placed(core, "a")
    accept(core, p)
    # The worker gives a confirmed task up before any output: a lost attempt, run elsewhere.
    given_up = TaskFinished(
        node_id=p.node_id, task_id=p.task_id, instance_id=p.instance_id, finish_reason=FinishReason.CANCELLED
    )
    core.handle(given_up, 0.0)
    return core


@scenario((R, Finish))
def _finish() -> MasterCore:
    core = cluster(1)
    p = _placed(core, "a")
    accept(core, p)
    finish(core, p)
    return core


@scenario((Q, Fail))
def _queue_timeout() -> MasterCore:
    core = cluster(1, max_concurrency=1, queue_timeout=10.0, heartbeat_liveness=100)
    _queue_one(core, "a")
    core.tick(11.0)
    return core


@scenario((P, Fail))
def _fail_pending() -> MasterCore:
    core = cluster(1)
    fail(core, _placed(core, "a"))
    return core


@scenario((R, Fail))
def _fail_running() -> MasterCore:
    core = cluster(1)
    p = _placed(core, "a")
    accept(core, p)
    fail(core, p)
    return core


def _cancel_in(status: TaskStatus) -> Callable[[], MasterCore]:
    def run() -> MasterCore:
        core = cluster(1, max_concurrency=1)
        if status is Q:
            _queue_one(core, "a")
        else:
            p = _placed(core, "a")
            if status is R:
                accept(core, p)
        core.handle(CancelRequest(task_id=TaskId("a")), 0.0)
        return core

    return run


for _status in (Q, P, R):
    SCENARIOS[(_status, Cancel)] = _cancel_in(_status)


def test_every_row_of_the_table_has_a_scenario() -> None:
    assert set(SCENARIOS) == set(TRANSITIONS)


@pytest.mark.parametrize("row", list(SCENARIOS), ids=lambda r: f"{r[0]}-{r[1].__name__}")
def test_every_row_is_reachable_through_the_core(row: Row, taken: list[Row]) -> None:
    core = SCENARIOS[row]()
    assert row in taken
    assert set(taken) <= set(TRANSITIONS)
    core.check_invariants()


def _book_with(status: TaskStatus) -> tuple[MasterCore, Any]:
    """A core holding task "a" in `status` (reached through the core, as a client would)."""
    core = cluster(1, max_concurrency=1)
    if status is Q:
        _queue_one(core, "a")
    elif status in (P, R, TaskStatus.FINISHED, TaskStatus.FAILED):
        p = _placed(core, "a")
        if status is not P:
            accept(core, p)
        if status is TaskStatus.FINISHED:
            finish(core, p)
        elif status is TaskStatus.FAILED:
            fail(core, p)
    else:
        _placed(core, "a")
        core.handle(CancelRequest(task_id=TaskId("a")), 0.0)
    task = core.task(TaskId("a"))
    assert task is not None and task.status is status
    return core, task


def _cause(kind: type[Cause], core: MasterCore) -> Cause:
    samples: dict[type[Cause], Cause] = {
        Place: Place(next(iter(core.state.instances.values()))),
        Confirm: Confirm(),
        Unbind: Unbind("lost"),
        Finish: Finish(FinishReason.STOP, None),
        Fail: Fail("boom"),
        Cancel: Cancel("bye"),
    }
    return samples[kind]


UNLISTED = [
    (status, kind)
    for status, kind in itertools.product(TaskStatus, get_args(Cause))
    if (status, kind) not in TRANSITIONS
]


@pytest.mark.parametrize("status,kind", UNLISTED, ids=lambda v: getattr(v, "__name__", str(v)))
def test_every_unlisted_move_raises_and_changes_nothing(status: TaskStatus, kind: type[Cause]) -> None:
    core, task = _book_with(status)
    before = (task.status, task.instance_id, task.attempts, core.counters())
    step = Step(1.0)
    with pytest.raises(IllegalTransition):
        advance(core.book, task, _cause(kind, core), step)
    assert (task.status, task.instance_id, task.attempts, core.counters()) == before
    assert step.effects == [] and not permits(task, kind)
    core.check_invariants()


def test_final_statuses_have_no_way_out_and_every_status_is_entered() -> None:
    assert not [row for row in TRANSITIONS if row[0].is_final]
    assert {move.to for move in TRANSITIONS.values()} == set(TaskStatus)


def test_a_running_task_whose_output_reached_the_client_cannot_be_unbound() -> None:
    core = cluster(1)
    p = burst(core, 1)[0]
    accept(core, p)
    task = core.task(p.task_id)
    assert task is not None and permits(task, Unbind)
    chunk(core, p, 0)
    assert not permits(task, Unbind) and permits(task, Fail)
    with pytest.raises(IllegalTransition, match="nothing_delivered"):
        advance(core.book, task, Unbind("lost"), Step(1.0))
    assert task.status is R and task.instance_id == p.instance_id
    core.check_invariants()
