"""Output recovery at scale: long streams over a lossy bus come back exact.

The core is driven with a simulated worker that keeps its output in the real `OutputLog` and
answers FetchOutput with it, while a seeded coin drops worker-to-master messages (chunks, finals,
heartbeats, replays). The budget is per gap, so the stream's length does not matter: 256-token
replies at 30% loss and 1,000-token replies at 10% loss both come back 64 of 64 exact. The test
also counts what recovery adds to the bus (the closing note quotes it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from exo_master.core import MasterCore
from exo_master.core.events import Effect, TaskCompleted, TaskErrored, TaskOutput, TaskPlaced
from exo_master.core.lifecycle import TaskRecord
from exo_master.core.output import missing_ranges
from exo_worker.output_log import OutputLog
from protocol.ids import InstanceId, TaskId
from protocol.messages import (
    MAX_COUNT,
    FetchOutput,
    FinishReason,
    TaskAccepted,
    TaskAck,
    TaskChunk,
    TaskFailed,
    TaskFinished,
)
from tests.master.cluster import burst, cluster, heartbeat, node_of, only, report

STEP = 0.01  # one token per task per step: 100 tokens/s per stream


@dataclass
class Traffic:
    chunks: int = 0  # worker -> master, first sends
    finals: int = 0
    replayed_chunks: int = 0  # worker -> master, answers to FetchOutput
    replayed_finals: int = 0
    fetches: int = 0  # master -> worker
    dropped: int = 0


@dataclass
class LossyRun:
    """Three nodes stream `tokens` chunks for each of `tasks` requests; `loss` of every
    worker-to-master message is dropped (and `loss_to_worker` of the master's)."""

    tokens: int
    loss: float
    loss_to_worker: float = 0.0
    tasks: int = 64
    seed: int = 1
    core: MasterCore = field(init=False)
    log: OutputLog = field(default_factory=lambda: OutputLog(max_tasks=4096))
    traffic: Traffic = field(default_factory=Traffic)
    text: dict[TaskId, list[str]] = field(default_factory=dict)
    ended: dict[TaskId, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.core = cluster(3, heartbeat_liveness=1000)

    def word(self, task: TaskPlaced, index: int) -> str:
        return f"{task.task_id}:{index} "

    def to_master(self, message: object, now: float) -> None:
        if self.rng.random() < self.loss:
            self.traffic.dropped += 1
            return
        self.effects(self.core.handle(message, now), now)  # type: ignore[arg-type]

    def effects(self, effects: list[Effect], now: float) -> None:
        for effect in effects:
            match effect:
                case TaskOutput():
                    self.text.setdefault(effect.task_id, []).append(effect.text)
                case TaskCompleted() | TaskErrored():
                    self.ended[effect.task_id] = effect
                case TaskAck():
                    self.log.forget(effect.task_id)
                case FetchOutput():
                    self.traffic.fetches += 1
                    if self.rng.random() >= self.loss_to_worker:
                        self.answer(effect, now)

    def answer(self, fetch: FetchOutput, now: float) -> None:
        held = self.log.replay(fetch.task_id, fetch.from_index, fetch.final, fetch.gaps)
        assert held is not None, "the worker forgot output the master still wants"
        chunks, final = held
        for index, text in chunks:
            self.traffic.replayed_chunks += 1
            msg = TaskChunk(
                node_id=fetch.node_id,
                task_id=fetch.task_id,
                instance_id=fetch.instance_id,
                index=index,
                text=text,
            )
            self.to_master(msg, now)
        if final is not None:
            self.traffic.replayed_finals += 1
            self.to_master(final, now)

    def run(self) -> None:
        placed = burst(self.core, self.tasks)
        self.where = {p.task_id: p.node_id for p in placed}
        for p in placed:
            self.log.started(p.task_id)
            self.to_master(TaskAccepted(node_id=p.node_id, task_id=p.task_id, instance_id=p.instance_id), 0.0)
        now = 0.0
        for index in range(self.tokens + 1):
            now += STEP
            for p in placed:
                if index < self.tokens:
                    text = self.word(p, index)
                    assert self.log.chunk(p.task_id, text) == index
                    self.traffic.chunks += 1
                    msg = TaskChunk(
                        node_id=p.node_id,
                        task_id=p.task_id,
                        instance_id=p.instance_id,
                        index=index,
                        text=text,
                    )
                    self.to_master(msg, now)
                else:
                    final = TaskFinished(
                        node_id=p.node_id,
                        task_id=p.task_id,
                        instance_id=p.instance_id,
                        finish_reason=FinishReason.LENGTH,
                        chunks=self.tokens,
                    )
                    self.log.ended(p.task_id, final)
                    self.traffic.finals += 1
                    self.to_master(final, now)
            self.effects(self.core.tick(now), now)
        for _ in range(10_000):  # after the streams: heartbeats each second, ticks each step
            if len(self.ended) == self.tasks:
                break
            now += STEP
            if round(now / STEP) % round(1 / STEP) == 0:
                self.heartbeats(now)
            self.effects(self.core.tick(now), now)
        assert len(self.ended) == self.tasks, "a task neither completed nor failed"
        self.expected = {p.task_id: "".join(self.word(p, i) for i in range(self.tokens)) for p in placed}

    def heartbeats(self, now: float) -> None:
        unacked = set(self.log.unacknowledged())
        for i in range(3):
            mine = [t for t in unacked if self.where[t] == node_of(i)]
            self.to_master(heartbeat(i, report(i, finished=mine)), now)

    def exact(self) -> int:
        return sum(
            1
            for task_id, end in self.ended.items()
            if isinstance(end, TaskCompleted)
            and "".join(self.text.get(task_id, [])) == self.expected[task_id]
        )


@pytest.mark.parametrize(("tokens", "loss"), [(256, 0.3), (1000, 0.1)], ids=["256 at 30%", "1000 at 10%"])
def test_long_streams_over_heavy_loss_come_back_exact(tokens: int, loss: float) -> None:
    run = LossyRun(tokens=tokens, loss=loss)
    run.run()
    assert run.exact() == run.tasks, [e for e in run.ended.values() if isinstance(e, TaskErrored)][:3]
    t = run.traffic
    sent = t.chunks + t.finals
    extra = t.replayed_chunks + t.replayed_finals + t.fetches
    # Recovery resends what was lost, a little more (replays are lost too), not whole streams.
    assert t.replayed_chunks < 2.5 * loss / (1 - loss) * t.chunks, t
    print(f"{tokens} tokens at {loss:.0%}: {sent} sent, recovery added {extra} ({extra / sent:.1%}): {t}")
    run.core.check_invariants()


def test_loss_both_ways_still_comes_back_exact() -> None:
    run = LossyRun(tokens=200, loss=0.1, loss_to_worker=0.1, tasks=32, seed=3)
    run.run()
    assert run.exact() == run.tasks


def test_a_gap_that_never_fills_fails_its_task_after_the_budget() -> None:
    """The worker answers, but chunk 5's replays are always lost: the task fails clearly, after
    `max_fetches` rounds, while chunks past it were recovered meanwhile."""
    core = cluster(1, heartbeat_liveness=1000, fetch_after=0.1, fetch_every=0.1, max_fetches=4)
    (p,) = burst(core, 1)
    for i in (*range(5), *range(6, 10)):
        core.handle(
            TaskChunk(node_id=p.node_id, task_id=p.task_id, instance_id=p.instance_id, index=i, text="x"), 0.0
        )
    rounds, errors = 0, []
    for step in range(1, 20):
        effects = core.tick(step * 0.1 + 0.01)
        rounds += len(only(effects, FetchOutput))
        errors += only(effects, TaskErrored)
    assert rounds == 4 and len(errors) == 1 and "chunk 5" in errors[0].message
    assert not isinstance(errors[0], TaskFailed)


def test_one_fetch_names_every_gap_and_the_tail_once_the_end_is_known() -> None:
    task = TaskRecord(task_id=TaskId("t"), params=None, submitted_at=0.0)  # type: ignore[arg-type]
    task.next_chunk = 2
    task.held = {3: "a", 4: "b", 7: "c"}
    assert missing_ranges(task, tail=False) == ((2, 3), (5, 7))
    assert missing_ranges(task, tail=True) == ((2, 3), (5, 7), (8, MAX_COUNT))
    task.final = TaskFinished(
        node_id=node_of(0),
        task_id=task.task_id,
        instance_id=InstanceId("i"),
        finish_reason=FinishReason.STOP,
        chunks=10,
    )
    assert missing_ranges(task, tail=False) == ((2, 3), (5, 7), (8, 10))


def test_progress_on_a_gap_renews_its_budget() -> None:
    """A gap that fills a chunk at a time never exhausts the budget, however long the stream."""
    core = cluster(1, heartbeat_liveness=1000, fetch_after=0.1, fetch_every=0.1, max_fetches=2)
    (p,) = burst(core, 1)
    send = lambda i, now: core.handle(  # noqa: E731
        TaskChunk(node_id=p.node_id, task_id=p.task_id, instance_id=p.instance_id, index=i, text="x"), now
    )
    send(50, 0.0)  # 0..49 missing
    errors: list[TaskErrored] = []
    now = 0.0
    for i in range(50):  # each round recovers one more chunk: progress every round
        now += 0.1
        errors += only(core.tick(now + 0.001), TaskErrored)
        send(i, now + 0.002)
    assert not errors
    task = core.task(p.task_id)
    assert task is not None and task.next_chunk == 51 and task.fetches > 40  # 25x the budget
